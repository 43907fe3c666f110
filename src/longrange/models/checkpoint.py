"""Checkpoints: `config.json` (the ModelConfig) + `model.safetensors`, written atomically.

Loading reads tensors with safetensors only (no pickle), so it is safe on untrusted folders.
Writing goes to a temporary folder beside the target, renamed into place at the end: an error
midway leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from longrange.models.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "longrange"


@contextlib.contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `folder`, on error it is removed.

    overwrite=False: a non-empty existing `folder` is a FileExistsError (before anything is written)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {folder} exists and is not empty (pass overwrite=True / --overwrite)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
        old.rmdir()
        folder.rename(old)
    tmp.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    """config.json + model.safetensors into an existing folder (use inside `atomic_folder`)."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "model": type(model).__name__, **model.config.to_dict()}
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(unique_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def save(model: nn.Module, folder: str | Path, overwrite: bool = True) -> Path:
    with atomic_folder(folder, overwrite) as tmp:
        write_checkpoint(model, tmp)
    return Path(folder)


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


def load(cls, folder: str | Path, map_location="cpu", **overrides):
    """Build `cls` from `folder/config.json` (+ overrides) and load `folder/model.safetensors`.

    Overriding `head` (e.g. head="classification", num_labels=3 on a masked-LM checkpoint) starts
    the new head from fresh weights; everything else must match the checkpoint exactly."""
    from safetensors.torch import load_file

    folder = Path(folder)
    saved_cls, config = read_config(folder)
    if saved_cls and saved_cls != cls.__name__:
        raise ValueError(f"{folder} holds a {saved_cls} checkpoint; load it with lr.models.{saved_cls}.from_pretrained")
    new_head = "head" in overrides and overrides["head"] != config.head
    config = config.replace(**overrides) if overrides else config
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    tensors = load_file(str(weights), device=str(map_location))
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
        """Write config.json + model.safetensors to `folder` (atomically)."""
        return save(self, folder, overwrite)

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location="cpu", **overrides):
        """Load a folder written by `save_pretrained` (safetensors only: no pickle). Config fields
        can be overridden, e.g. `Encoder.from_pretrained(f, head="classification", num_labels=3)`."""
        return load(cls, folder, map_location, **overrides)
