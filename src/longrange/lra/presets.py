"""Per-task LRA settings as named presets, the LRA attention defaults, and the equal-size rule.

Three variants per task (REFERENCES.md §1, "Model settings"):

- `TASK` (e.g. `listops`): the released configs of google-research/long-range-arena;
- `TASK-paper` (e.g. `listops-paper`): the paper's appendix, where it differs;
- `TASK-tiny`: a small model for CPU runs on the built-in tiny data (ours, not LRA's).

    preset = get_preset("listops", "paper")          # or get_preset("listops-paper")
    options = attention_options(preset, "bigbird", max_length=2000, user={"num_random_blocks": 2})
    check = parameter_check(preset, "reformer", num_classes=10, vocab_size=20)   # LRA's 10% rule

Learning-rate schedules follow LRA's `create_learning_rate_scheduler` factors: "rsqrt" is
`constant * linear_warmup * rsqrt_decay` (lr · min(1, s/warmup) / sqrt(max(s, warmup)): with
lr 0.05 and warmup 1000 the peak is 0.05 / sqrt(1000) ≈ 1.6e-3), "cosine" is
`constant * linear_warmup * cosine_decay` over the whole run, "constant" is warmup then flat.
Steps s count from 1, so the first update does not have a zero learning rate.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from longrange.lra.model import build_model
from longrange.mechanisms import capabilities, config_class, list_attentions

#: where each variant's numbers come from
SOURCES = {
    "released": "google-research/long-range-arena released configs (REFERENCES.md §1)",
    "paper": "LRA paper appendix (Tay et al., ICLR 2021; REFERENCES.md §1)",
    "tiny": "longrange: a small model for CPU runs on the built-in tiny data",
}
VARIANTS = ("released", "paper", "tiny")
SCHEDULES = ("rsqrt", "cosine", "constant")
TASK_NAMES = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
#: LRA's rule for comparable results: parameters within this fraction of the base Transformer's
PARAM_TOLERANCE = 0.10


@dataclasses.dataclass(frozen=True)
class Preset:
    """One task's training and model settings. `steps` or `epochs` (then steps = epochs · batches
    per epoch); `warmup` None = one epoch (LRA's image and pathfinder configs); `max_length` None
    = the dataset's own length."""

    name: str
    task: str
    variant: str
    batch_size: int
    lr: float
    weight_decay: float
    schedule: str
    dim: int
    heads: int
    layers: int
    mlp_dim: int
    pooling: str  # "cls" or "mean"
    dropout: float
    attention_dropout: float  # recorded; our mechanisms apply no attention-probability dropout
    max_length: int | None
    steps: int | None = None
    epochs: int | None = None
    warmup: int | None = 0
    eval_every: int | None = None  # None: about 10 evaluations per run
    #: per-mechanism attention options over the LRA defaults (the tiny presets shrink blocks and windows)
    attention_overrides: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)
    source: str = ""

    def total_steps(self, train_examples: int | None = None, batch_size: int | None = None) -> int:
        """Optimizer steps of a run: `steps`, or `epochs` × (train_examples // batch_size)."""
        if self.steps is not None:
            return self.steps
        if train_examples is None:
            raise ValueError(f"preset {self.name!r} counts epochs ({self.epochs}); pass train_examples")
        return max(1, self.epochs * max(1, train_examples // (batch_size or self.batch_size)))

    def warmup_steps(self, train_examples: int | None = None, batch_size: int | None = None) -> int:
        """Warm-up steps: `warmup`, or one epoch when it is None."""
        if self.warmup is not None:
            return self.warmup
        if train_examples is None:
            return 0
        return max(1, train_examples // (batch_size or self.batch_size))


def _preset(task: str, variant: str, **fields) -> Preset:
    name = task if variant == "released" else f"{task}-{variant}"
    return Preset(name=name, task=task, variant=variant, source=SOURCES[variant], **fields)


# -- LRA's released configs ----------------------------------------------------------------------------------------
_LISTOPS = dict(batch_size=32, steps=5000, lr=0.05, weight_decay=0.1, warmup=1000, schedule="rsqrt", dim=512,
                heads=8, layers=4, mlp_dim=1024, pooling="cls", dropout=0.1, attention_dropout=0.1, max_length=2000,
                eval_every=500)
_TEXT = dict(batch_size=32, steps=20000, lr=0.05, weight_decay=0.1, warmup=8000, schedule="rsqrt", dim=256, heads=4,
             layers=4, mlp_dim=1024, pooling="cls", dropout=0.1, attention_dropout=0.1, max_length=1000,
             eval_every=1000)
_RETRIEVAL = dict(batch_size=32, steps=5000, lr=0.05, weight_decay=0.1, warmup=8000, schedule="rsqrt", dim=128,
                  heads=4, layers=4, mlp_dim=512, pooling="cls", dropout=0.1, attention_dropout=0.1, max_length=4000,
                  eval_every=500)
# image and pathfinder: weight decay 0 and one epoch of warm-up come from the released base configs
_IMAGE = dict(batch_size=256, epochs=200, lr=5e-4, weight_decay=0.0, warmup=None, schedule="cosine", dim=128,
              heads=8, layers=1, mlp_dim=128, pooling="cls", dropout=0.3, attention_dropout=0.2, max_length=1024)
_PATHFINDER = dict(batch_size=512, epochs=200, lr=1e-3, weight_decay=0.0, warmup=None, schedule="cosine", dim=32,
                   heads=4, layers=4, mlp_dim=32, pooling="mean", dropout=0.1, attention_dropout=0.1,
                   max_length=1024)
_PATHX = {**_PATHFINDER, "max_length": 16384}

_RELEASED = {"listops": _LISTOPS, "text": _TEXT, "retrieval": _RETRIEVAL, "image": _IMAGE,
             "pathfinder": _PATHFINDER, "pathx": _PATHX}

# -- the paper's appendix: only what differs ----------------------------------------------------------------------
_PAPER_CHANGES = {
    "listops": dict(layers=6, mlp_dim=2048),
    "text": dict(dim=512, heads=8, layers=6, mlp_dim=2048, max_length=4000),
    "retrieval": dict(lr=0.5),
    "image": dict(layers=3, heads=4),
    # "8 heads, 128": read as embedding and MLP width 128
    "pathfinder": dict(heads=8, dim=128, mlp_dim=128),
    "pathx": dict(heads=8, dim=128, mlp_dim=128),
}

# -- tiny: CPU-sized models on the built-in data; blocks and windows scaled down with the length -------------------
_TINY_ATTENTION = {
    "bigbird": {"block_size": 16, "num_random_blocks": 2},
    "longformer": {"window": 32},
    "local": {"window": 16, "tile": 8},
    "dilated": {"window": 16},
    "linformer": {"k": 16},
    "performer": {"nb_features": 32},
    "nystrom": {"num_landmarks": 16},
    "reformer": {"n_hashes": 1, "bucket_size": 16, "n_buckets": None},
    "sparse_transformer": {"stride": 32, "c": 8, "tile": 16},
    "sinkhorn": {"block_size": 16},
    # routing: fixed clusters of 32 tokens, ceil(length / 32) of them (any length runs)
    "routing": {"num_clusters": None, "cluster_size": 32, "window": 16, "tile": 8},
    "axial": {"shape": (-1, 32)},  # rows of 32 tokens (the images are 32 wide), padded at the end
    # Table 1's random + dot-product synthesizer holds heads·N² logits per layer (4·1025² at the tiny image length,
    # 4·16385² for pathx): the tiny presets use its factorized form (2·heads·N·8), same mixture, fused kernel
    "synthesizer": {"mode": "factorized_random", "rank": 8},
}
_TINY = dict(batch_size=32, steps=400, lr=2e-3, weight_decay=0.01, warmup=40, schedule="cosine", dim=64, heads=4,
             layers=2, mlp_dim=128, pooling="cls", dropout=0.0, attention_dropout=0.0, max_length=None, eval_every=100,
             attention_overrides=_TINY_ATTENTION)
_TINY_CHANGES = {
    "pathfinder": dict(pooling="mean"),
    "pathx": dict(pooling="mean", batch_size=4, steps=100),  # 16K tokens: keep full attention within CPU memory
    "retrieval": dict(steps=200),  # two towers: twice the work per step
}


def _build_presets() -> dict[str, Preset]:
    out = {}
    for task, released in _RELEASED.items():
        for p in (_preset(task, "released", **released),
                  _preset(task, "paper", **{**released, **_PAPER_CHANGES[task]}),
                  _preset(task, "tiny", **{**_TINY, **_TINY_CHANGES.get(task, {})})):
            out[p.name] = p
    return out


PRESETS: dict[str, Preset] = _build_presets()


def list_presets() -> list[str]:
    """Every preset name: `listops`, `listops-paper`, `listops-tiny`, ..."""
    return list(PRESETS)


def get_preset(task: str, preset: str | None = None) -> Preset:
    """The preset for `task`: `preset` is a variant (released, paper, tiny), a full name
    (listops-paper) or None (released). Unknown names are a ValueError listing the choices."""
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASK_NAMES)}")
    preset = preset or "released"
    name = task if preset == "released" else f"{task}-{preset}" if preset in VARIANTS else preset
    if name not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for task {task!r}; expected one of {list(VARIANTS)} or "
                         f"{[n for n in PRESETS if PRESETS[n].task == task]}")
    found = PRESETS[name]
    if found.task != task:
        raise ValueError(f"preset {preset!r} is for task {found.task!r}, not {task!r}")
    return found


# -- attention options ---------------------------------------------------------------------------------------------
#: Where LRA's model code sets a mechanism differently from our config defaults, in our option names
#: (REFERENCES.md §1, "Attention defaults"); what LRA shares with our defaults (BigBird's 64-token
#: blocks and 3 random blocks, Longformer's 512 window, Performer's 256 features) is not repeated.
#: LRA's local attention is block-local with blocks of 20; ours is a two-sided window of the same width.
LRA_ATTENTION_DEFAULTS: dict[str, dict] = {
    "linformer": {"k": 16},
    "reformer": {"n_hashes": 1, "bucket_size": 10, "n_buckets": 10},
    "local": {"window": 20, "tile": 10},
    "sparse_transformer": {"mode": "fixed", "stride": 128, "c": 32, "causal": False},
    # LRA's sinkhorn_attention.py: blocks of 50 and sort_activation="softmax" (a row softmax of the sort
    # net's logits: no Sinkhorn rounds, no Gumbel noise, no temperature)
    "sinkhorn": {"block_size": 50, "sinkhorn_iters": 0, "gumbel_noise": False, "temperature": 1.0},
    # LRA's SynthesizerEncoder: synthesizer_mode="random" with ignore_dot_product=False, i.e. softmax(R + QKᵀ/√d),
    # R [heads, max_len, max_len] (max_length follows the input length, as their max_len)
    "synthesizer": {"mode": "random", "dot_product": True, "mixing": "sum"},
}
#: per-task changes to the defaults (LRA: Linformer k = 32 for text)
LRA_TASK_DEFAULTS: dict[str, dict[str, dict]] = {"text": {"linformer": {"k": 32}}}


def attention_options(preset: Preset, attention: str, max_length: int, user: dict | None = None) -> dict:
    """The options `attention` gets under `preset`: LRA's defaults (where our config has the option),
    then the preset's overrides, then the mechanism's length options set to the input length
    (Linformer's seq_len), then `user` (--opt). A user key the mechanism does not have is a ValueError."""

    if attention not in list_attentions():
        raise ValueError(f"unknown attention {attention!r}; expected one of {list_attentions()}")
    fields = list(config_class(attention).option_defaults())
    options = {**LRA_ATTENTION_DEFAULTS.get(attention, {}),
               **LRA_TASK_DEFAULTS.get(preset.task, {}).get(attention, {}),
               **preset.attention_overrides.get(attention, {})}
    options.update({key: max_length for key in capabilities(attention).length_options})
    for key, value in (user or {}).items():
        if key in ("dim", "heads", "bias"):
            raise ValueError(f"attention option {key!r} is set by the preset (dim={preset.dim}, "
                             f"heads={preset.heads}); change the preset instead")
        if key not in fields:
            raise ValueError(f"attention option {key!r} does not apply to {attention!r}; its options: {fields}")
        options[key] = value
    return options


# -- LRA's equal-size rule ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamCheck:
    """Parameters of a mechanism's model beside the base Transformer (`full`) under the same preset."""

    attention: str
    params: int
    base_params: int

    @property
    def ratio(self) -> float:
        return self.params / self.base_params

    @property
    def ok(self) -> bool:
        """LRA's rule: within 10% of the base Transformer."""
        return abs(self.ratio - 1.0) <= PARAM_TOLERANCE + 1e-12

    def describe(self) -> str:
        verdict = "within" if self.ok else "OUTSIDE"
        return (f"{self.attention}: {self.params:,} parameters, {self.ratio:.3f}× the base Transformer's "
                f"{self.base_params:,} ({verdict} LRA's ±{PARAM_TOLERANCE:.0%} rule)")


def parameter_check(preset: Preset, attention: str, *, num_classes: int, vocab_size: int, dual: bool = False,
                    max_length: int | None = None, options: dict | None = None, warn: bool = True) -> ParamCheck:
    """Count the parameters of `attention`'s model and of `full`'s under `preset` (LRA's rule: within
    10%). warn=True: a UserWarning when outside."""

    length = max_length or preset.max_length or 1024
    counts = []
    for name, user in ((attention, options), ("full", None)):
        model = build_model(preset, name, num_classes=num_classes, vocab_size=vocab_size, dual=dual,
                            max_length=length, options=attention_options(preset, name, length, user))
        counts.append(sum(p.numel() for p in model.parameters()))
    check = ParamCheck(attention, counts[0], counts[1])
    if warn and not check.ok:
        warnings.warn(check.describe(), stacklevel=2)
    return check


def schedule_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (0-based; LRA's step = step + 1)."""
    s = step + 1
    warm = min(1.0, s / warmup) if warmup > 0 else 1.0
    if schedule == "rsqrt":
        return warm / math.sqrt(max(s, warmup, 1))
    if schedule == "cosine":
        progress = max(0.0, (s - warmup) / max(1, total - warmup))
        return warm * max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
    if schedule == "constant":
        return warm
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(SCHEDULES)}")
