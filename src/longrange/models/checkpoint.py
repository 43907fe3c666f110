"""Checkpoints: `config.json` (the ModelConfig) + `model.safetensors`, each written atomically.

Loading reads tensors with safetensors only (no pickle), so it is safe on untrusted folders, and
checks they are finite (`allow_nonfinite=True` to load NaN/inf anyway). Saving into a folder
replaces only our two files, each atomically (a temporary file, fsync'ed, renamed over it), and
keeps everything else there (notes, sub-folders, tokenizer files), as HF's `save_pretrained`
does; a new folder appears only when complete. Files and folders get the user's umask.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from longrange.core.files import staged_folder
from longrange.models.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "longrange"


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (safetensors stores each tensor once)."""
    seen: set[tuple[int, int, tuple]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def write_checkpoint(model: nn.Module, folder: Path) -> None:
    """config.json + model.safetensors into a (staging) folder (use inside `staged_folder`)."""
    from safetensors.torch import save_file

    save_file(unique_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": FORMAT, "model": type(model).__name__, **model.config.to_dict()}
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def save(model: nn.Module, folder: str | Path, overwrite: bool = True) -> Path:
    """Write the checkpoint into `folder`, replacing config.json and model.safetensors atomically
    and keeping every other file there; overwrite=False: a non-empty folder is a FileExistsError."""
    with staged_folder(folder, overwrite) as stage:
        write_checkpoint(model, stage)
    return Path(folder)


def read_safetensors(path: str | Path, device="cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file is a ValueError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors' SafetensorError (a bare Exception subclass), OSError
        raise ValueError(f"{path} is not a readable safetensors file ({err}): truncated or corrupt; write it "
                         "again") from None


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path, allow_nonfinite: bool = False) -> None:
    """A ValueError naming the tensors of `path` that hold NaN or inf (unless allow_nonfinite)."""
    if allow_nonfinite:
        return
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:5])}"
                         f"{', ...' if len(bad) > 5 else ''}): the file is corrupt or its run diverged; pass "
                         "allow_nonfinite=True to load it anyway")


def read_config(folder: str | Path) -> tuple[str, ModelConfig]:
    """(model class name, config) from `folder/config.json`, with errors naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a longrange checkpoint (save one with save_pretrained)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
        raise ValueError(f"{path} is not a longrange model config (no \"format\": \"{FORMAT}\"); "
                         "HF checkpoints are converted with lr.hf.convert_to_long / `longrange convert`")
    return data.pop("model", ""), ModelConfig.from_dict(data)


def load(cls, folder: str | Path, map_location="cpu", *, allow_nonfinite: bool = False, **overrides):
    """Build `cls` from `folder/config.json` (+ overrides) and load `folder/model.safetensors`.

    Overriding `head` (e.g. head="classification", num_labels=3 on a masked-LM checkpoint) starts
    the new head from fresh weights; everything else must match the checkpoint exactly. Tensors
    holding NaN or inf are an error unless allow_nonfinite=True."""
    folder = Path(folder)
    saved_cls, config = read_config(folder)
    if saved_cls and saved_cls != cls.__name__:
        raise ValueError(f"{folder} holds a {saved_cls} checkpoint; load it with lr.models.{saved_cls}.from_pretrained")
    new_head = "head" in overrides and overrides["head"] != config.head
    config = config.replace(**overrides) if overrides else config
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    tensors = read_safetensors(weights, map_location)
    check_finite(tensors, weights, allow_nonfinite)
    model = cls(config)
    expected = unique_state_dict(model)
    if new_head:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {cls.__name__}({CONFIG_NAME}): missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    bad = [f"{k}: checkpoint {list(tensors[k].shape)} vs model {list(v.shape)}"
           for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{weights}: shape mismatch for {len(bad)} tensor(s): {'; '.join(bad[:5])}")
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    model.to(dtype=dtype)
    model.load_state_dict(tensors, strict=False)
    return model.to(map_location).eval()


class Pretrained:
    """save_pretrained / from_pretrained for nn.Modules with a `config: ModelConfig`."""

    config: ModelConfig

    def save_pretrained(self, folder: str | Path, overwrite: bool = True) -> Path:
        """Write config.json + model.safetensors into `folder`, each atomically; other files there are kept."""
        return save(self, folder, overwrite)

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location="cpu", *, allow_nonfinite: bool = False, **overrides):
        """Load a folder written by `save_pretrained` (safetensors only: no pickle). Config fields
        can be overridden, e.g. `Encoder.from_pretrained(f, head="classification", num_labels=3)`.
        NaN / inf weights are an error naming the tensors unless allow_nonfinite=True."""
        return load(cls, folder, map_location, allow_nonfinite=allow_nonfinite, **overrides)
