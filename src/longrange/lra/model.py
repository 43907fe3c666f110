"""The LRA classifier: a longrange `Encoder` (any attention) + LRA's classifier head.

As LRA's model code: pre-LayerNorm blocks with a final LayerNorm, learned positions, no token
types, tanh-approximated GELU, LayerNorm eps 1e-6. The head pools (token 0 = CLS, or the mean
over real tokens), then Dense(mlp) -> ReLU -> Dense(classes). Retrieval (`dual=True`) runs two
towers with shared weights and classifies [x1, x2, x1 * x2, x1 - x2] through Dense(mlp) -> ReLU ->
Dense(mlp / 2) -> ReLU -> Dense(classes) (LRA's `classifier_head_dual`).

    model = build_model(get_preset("listops", "tiny"), "bigbird", num_classes=10, vocab_size=20, max_length=512)
    logits = model(input_ids, attention_mask)                                  # [B, classes]
    logits = model(ids1, mask1, input_ids2=ids2, attention_mask2=mask2)         # dual
    save_model(model, folder); load_model(folder)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from longrange.models import Encoder, ModelConfig
from longrange.models.checkpoint import check_finite, read_safetensors, unique_state_dict
from longrange.models.heads import pool

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"


class LRAClassifier(nn.Module):
    """Encoder (no head of its own) + LRA's single or dual classifier head."""

    def __init__(self, config: ModelConfig, num_classes: int, mlp_dim: int, dual: bool = False):
        super().__init__()
        if config.head is not None:
            raise ValueError(f"the LRA classifier brings its own head; build the Encoder with head=None, "
                             f"got head={config.head!r}")
        self.config, self.num_classes, self.mlp_dim, self.dual = config, num_classes, mlp_dim, dual
        self.encoder = Encoder(config)
        if dual:
            self.head = nn.Sequential(nn.Linear(4 * config.dim, mlp_dim), nn.ReLU(),
                                      nn.Linear(mlp_dim, max(1, mlp_dim // 2)), nn.ReLU(),
                                      nn.Linear(max(1, mlp_dim // 2), num_classes))
        else:
            self.head = nn.Sequential(nn.Linear(config.dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, num_classes))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, N] ids (+ bool mask) -> pooled [B, C]. With CLS pooling, token 0 is made global for
        attentions that take global tokens (as `Encoder` does for its own classification head)."""
        global_mask = None
        if self.config.pooling == "cls" and self.encoder.supports_global_mask:
            global_mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            global_mask[:, 0] = True
        h = self.encoder(input_ids, attention_mask=attention_mask, global_mask=global_mask).last_hidden_state
        return pool(h, attention_mask, self.config.pooling)  # (B, C)

    def forward(self, input_ids, attention_mask=None, input_ids2=None, attention_mask2=None) -> torch.Tensor:
        """Logits [B, num_classes]; dual models need input_ids2 (+ attention_mask2)."""
        x1 = self.encode(input_ids, attention_mask)
        if not self.dual:
            return self.head(x1)
        if input_ids2 is None:
            raise ValueError("a dual (retrieval) model needs input_ids2, the second document's ids [B, N2]")
        x2 = self.encode(input_ids2, attention_mask2)
        return self.head(torch.cat([x1, x2, x1 * x2, x1 - x2], dim=-1))  # (B, num_classes)


def model_config(preset, attention: str, *, vocab_size: int, max_length: int, options: dict,
                 pad_id: int = 0) -> ModelConfig:
    """The Encoder's ModelConfig under `preset` with `attention` and its (resolved) options."""
    return ModelConfig(
        vocab_size=vocab_size, dim=preset.dim, heads=preset.heads, layers=preset.layers, ffn_dim=preset.mlp_dim,
        max_length=max_length, attention=attention, attention_options=dict(options), position_style="absolute",
        type_vocab_size=0, pad_token_id=pad_id, layer_norm_eps=1e-6, dropout=preset.dropout, activation="gelu_tanh",
        norm="pre", head=None, pooling=preset.pooling,
    )


def build_model(preset, attention: str, *, num_classes: int, vocab_size: int, max_length: int, options: dict,
                dual: bool = False, pad_id: int = 0) -> LRAClassifier:
    """An LRA classifier with `attention` under `preset` (options: from `presets.attention_options`)."""
    config = model_config(preset, attention, vocab_size=vocab_size, max_length=max_length, options=options,
                          pad_id=pad_id)
    return LRAClassifier(config, num_classes, preset.mlp_dim, dual)


def describe_model(model: LRAClassifier) -> dict:
    """What `load_model` needs to rebuild the model (written as model.json)."""
    return {"format": "longrange-lra", "model": model.config.to_dict(), "num_classes": model.num_classes,
            "mlp_dim": model.mlp_dim, "dual": model.dual}


def write_model(model: LRAClassifier, folder: Path) -> None:
    """model.json + model.safetensors into an existing folder (callers make it atomic)."""
    from safetensors.torch import save_file

    (Path(folder) / MODEL_JSON).write_text(json.dumps(describe_model(model), indent=2) + "\n")
    save_file(unique_state_dict(model), str(Path(folder) / WEIGHTS), metadata={"format": "pt"})


def load_model(folder: str | Path, map_location="cpu", *, allow_nonfinite: bool = False) -> LRAClassifier:
    """Rebuild an LRAClassifier from a folder with model.json + model.safetensors (no pickle). Weights
    holding NaN / inf are an error naming them unless allow_nonfinite=True."""
    folder = Path(folder)
    meta_path, weights = folder / MODEL_JSON, folder / WEIGHTS
    for path in (meta_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not an LRA checkpoint folder (written by `lra train`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err}): corrupt; it describes the model of "
                         f"{folder}") from None
    if not isinstance(meta, dict) or meta.get("format") != "longrange-lra":
        raise ValueError(f"{meta_path} is not an LRA model description (no \"format\": \"longrange-lra\")")
    model = LRAClassifier(ModelConfig.from_dict(meta["model"]), meta["num_classes"], meta["mlp_dim"], meta["dual"])
    state = read_safetensors(weights, map_location)
    check_finite(state, weights, allow_nonfinite)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_names(model)]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {meta_path}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model.to(map_location)


def _tied_names(model: nn.Module) -> set[str]:
    """state_dict names dropped by `unique_state_dict` (second names of shared tensors)."""
    return set(model.state_dict()) - set(unique_state_dict(model))
