"""FLOP and MAC accounting for attention layers, and what other counters report for the same layer.

`count_macs` asks the module itself (`module.macs(n)`, see `longrange.core.flops`), so the count
follows the path the mechanism takes at that length. Units: MACs (multiply-accumulates); 1 MAC =
2 FLOPs. Categories:
- projections: the layer's own linear maps (Q, K, V, output; Longformer's global ones);
- attention products: products between activations, the part a layer-hook counter misses:
  scores (QKᵀ or its analogue), weighted (PV or its analogue), other (compression, feature maps,
  pseudo-inverse, convolution);
- exps: exponentials, reported beside the MACs, not added to them.

`compare_counters` runs the seed text's case: one layer through (a) a layer-hook counter that sees
only `nn.Linear` layers, (b) ptflops when installed, (c) torch's `FlopCounterMode` as the layer
runs (it cannot see inside the fused CPU SDPA kernel), (d) `FlopCounterMode` with SDPA in its math
form, and (e) the analytic count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from longrange.core.config import ConfigError
from longrange.core.flops import MacCount
from longrange.mechanisms import build_attention, list_attentions, options_for_length
from longrange.models import ModelConfig
from longrange.models.checkpoint import read_config
from longrange.models.common import layer_attention

#: named settings for `longrange flops --preset`
PRESETS: dict[str, dict[str, Any]] = {
    # BERT-base's BertSelfAttention: Q, K, V projections and the attention products, no output
    # projection (that lives in BertSelfOutput). The seed text's example.
    "bert-base-self-attention": {"mechanisms": ("full",), "dim": 768, "heads": 12, "output_projection": False,
                                 "lengths": (512, 1024)},
    # one BERT-base attention layer with its output projection, every registered mechanism
    "bert-base-attention": {"mechanisms": None, "dim": 768, "heads": 12, "output_projection": True,
                            "lengths": (512, 1024, 2048, 4096, 8192, 16384)},
    # a whole BERT-base encoder layer: attention + the 768 -> 3072 -> 768 feed-forward
    "bert-base-layer": {"mechanisms": None, "dim": 768, "heads": 12, "output_projection": True, "ffn_dim": 3072,
                        "lengths": (512, 1024, 2048, 4096, 8192, 16384)},
}


@dataclasses.dataclass
class FlopRow:
    mechanism: str
    n: int
    dim: int
    heads: int
    options: dict[str, Any]
    macs: MacCount
    activation_bytes: int | None = None  # measured with `saved_activation_bytes` when asked
    feed_forward: int = 0  # MACs of the feed-forward block(s) (2·n·C·F per layer), when counted
    head: int = 0  # MACs of a model's task head, for whole models

    @property
    def layer_total(self) -> int:
        return self.macs.total + self.feed_forward + self.head

    def to_dict(self) -> dict[str, Any]:
        m = self.macs
        return {"activation_bytes": self.activation_bytes, "feed_forward": self.feed_forward, "head": self.head,
                "layer_macs": self.layer_total, **{
            "mechanism": self.mechanism, "n": self.n, "dim": self.dim, "heads": self.heads, "options": self.options,
            "macs": m.total, "projections": m.projections, "attention_products": m.attention,
            "scores": m.scores, "weighted": m.weighted, "other": m.other, "exps": m.exps, "pairs": m.pairs,
            "flops": 2 * m.total,
        }}


def count_macs(
    name: str,
    n: int,
    dim: int = 768,
    heads: int = 12,
    options: dict[str, Any] | None = None,
    *,
    output_projection: bool = True,
    global_tokens: int = 0,
) -> MacCount:
    """MACs of one forward pass of mechanism `name` at length n, batch 1."""
    module = build_for_length(name, n, dim, heads, options)
    count = module.macs(n, global_tokens=global_tokens)
    if not output_projection:
        count.projections -= n * dim * dim
    return count


def build_for_length(name: str, n: int, dim: int, heads: int, options: dict[str, Any] | None = None):
    """Our module for length n (its length options, e.g. Linformer's `seq_len`, default to n)."""

    return build_attention(name, dim=dim, heads=heads, **options_for_length(name, dict(options or {}), n))


def flop_rows(
    mechanisms, lengths, dim: int = 768, heads: int = 12, options: dict[str, dict[str, Any]] | None = None,
    *, output_projection: bool = True, memory: bool = False, ffn_dim: int = 0,
) -> list[FlopRow]:
    """One row per (mechanism, length); `memory` also measures the saved activations (runs the layer);
    `ffn_dim` > 0 adds a feed-forward block C -> F -> C (2·n·C·F MACs) to each layer."""
    options = options or {}
    rows = []
    for name in mechanisms:
        for n in lengths:
            macs = count_macs(name, n, dim, heads, options.get(name), output_projection=output_projection)
            saved = None
            if memory:
                saved = saved_activation_bytes(build_for_length(name, n, dim, heads, options.get(name)), n, dim)
            rows.append(FlopRow(name, n, dim, heads, dict(options.get(name) or {}), macs, saved,
                                feed_forward=2 * n * dim * ffn_dim))
    return rows


# -- whole models ------------------------------------------------------------------------------------
def model_rows(model, lengths) -> list[FlopRow]:
    """MACs of an encoder stack described by a `ModelConfig`, a checkpoint folder or its config.json:
    per length, the sum over layers of each layer's attention (its own mechanism and options,
    `layer_options` included) and feed-forward, plus the head. Embedding lookups cost no MACs.
    Per-example global tokens (`global_mask`, or the CLS token a classification head makes global)
    are inputs, not config, and are not counted."""
    from pathlib import Path


    if isinstance(model, str | Path):
        path = Path(model)
        _, config = read_config(path.parent if path.name == "config.json" else path)
    elif isinstance(model, ModelConfig):
        config = model
    else:
        raise TypeError(f"model must be a ModelConfig or a checkpoint folder, got {type(model).__name__}")
    rows = []
    for n in lengths:
        total, names = MacCount(), []
        for layer in range(config.layers):
            module = layer_attention(config, layer)
            count = module.macs(n)
            total = MacCount(**{f.name: getattr(total, f.name) + getattr(count, f.name)
                                for f in dataclasses.fields(MacCount)})
            names.append(module.config.name)
        label = f"{config.layers} layers: " + ", ".join(sorted(set(names)))
        row = FlopRow(label, n, config.dim, config.heads, {}, total,
                      feed_forward=config.layers * 2 * n * config.dim * config.ffn_dim)
        row.head = _head_macs(config, n)
        rows.append(row)
    return rows


def _head_macs(config, n: int) -> int:
    c = config.dim
    return {
        None: 0,
        "classification": c * c + c * config.num_labels,  # pooler-style dense + classifier on one vector
        "token_classification": n * c * config.num_labels,
        "masked_lm": n * c * c + n * c * config.vocab_size,  # transform + decoder over the vocabulary
        "question_answering": n * c * 2,
    }[config.head]


# -- activation memory -------------------------------------------------------------------------------
def saved_activation_bytes(module: nn.Module, n: int, dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes autograd keeps for the backward pass of one training forward at length n, batch 1:
    the layer's activation memory. Measured, not estimated: every tensor saved for backward is
    recorded through `saved_tensors_hooks` and each storage counted once; the weights and the
    input (which exist anyway) are left out."""
    module = module.to(dtype).train()
    x = torch.randn(1, n, dim, dtype=dtype, requires_grad=True)
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


# -- other counters ------------------------------------------------------------------------------------
def linear_hook_macs(module: nn.Module, *inputs, **kwargs) -> int:
    """What a layer-hook counter reports: MACs of the `nn.Linear` layers only (tokens · in · out),
    counted from forward hooks, as ptflops' and thop's module hooks do."""
    total = 0

    def hook(layer, args, output):
        nonlocal total
        total += args[0].numel() // layer.in_features * layer.in_features * layer.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            module(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return total


def flop_counter_macs(module: nn.Module, *inputs, math_sdpa: bool = False, **kwargs) -> int:
    """MACs torch's FlopCounterMode counts (half its FLOPs). It counts matmul-like ops only; with
    `math_sdpa` SDPA runs as explicit matmuls it can see, otherwise the fused CPU kernel is invisible."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    backend = sdpa_kernel(SDPBackend.MATH) if math_sdpa else nullcontext()
    with torch.no_grad(), backend, FlopCounterMode(display=False) as counter:
        module(*inputs, **kwargs)
    return counter.get_total_flops() // 2


def ptflops_macs(module: nn.Module, n: int, dim: int) -> tuple[int | None, str]:
    """ptflops' count for input [1, n, dim], or (None, why) when it is not installed."""
    try:
        from ptflops import get_model_complexity_info
    except ImportError:
        return None, "ptflops not installed (pip install ptflops)"
    from importlib.metadata import version as package_version

    version = package_version("ptflops")
    macs, _ = get_model_complexity_info(module, (n, dim), as_strings=False, print_per_layer_stat=False,
                                        verbose=False, backend="pytorch")
    return int(macs), f"ptflops {version}"


def hf_bert_self_attention(dim: int = 768, heads: int = 12, implementation: str = "sdpa"):
    """A randomly initialised HF `BertSelfAttention` (transformers is optional), called on x."""
    try:
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertSelfAttention
        from transformers.utils import logging
    except ImportError as e:
        raise ImportError("the HF comparison needs transformers: pip install 'longrange[hf]'") from e
    logging.set_verbosity_error()
    config = BertConfig(hidden_size=dim, num_attention_heads=heads, intermediate_size=4 * dim,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = implementation
    layer = BertSelfAttention(config).eval()
    return _FirstOutput(layer)


class _FirstOutput(nn.Module):
    """Calls a HF attention layer and returns its first output (a tensor), for the counters."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


def compare_counters(lengths=(512, 1024), dim: int = 768, heads: int = 12, *, hf: bool | None = None
                     ) -> list[dict[str, Any]]:
    """The seed text's BERT-base self-attention at each length, through every counter (in MACs):
    our `full` layer without its output projection and, when transformers is installed (or
    `hf=True`), HF's `BertSelfAttention` with its default SDPA implementation."""
    import importlib.util

    if hf is None:
        hf = importlib.util.find_spec("transformers") is not None
    rows = []
    for n in lengths:
        x = torch.randn(1, n, dim)
        analytic = count_macs("full", n, dim, heads, output_projection=False)
        layers = {"longrange full, no output projection": _WithoutOutput(build_for_length("full", n, dim, heads))}
        if hf:
            layers["HF BertSelfAttention (sdpa)"] = hf_bert_self_attention(dim, heads, "sdpa")
        for label, layer in layers.items():
            pt, pt_label = ptflops_macs(layer, n, dim)
            rows.append({
                "layer": label, "n": n,
                "linear_hooks": linear_hook_macs(layer, x),
                "ptflops": pt, "ptflops_version": pt_label,
                "flop_counter": flop_counter_macs(layer, x),
                "flop_counter_math_sdpa": flop_counter_macs(layer, x, math_sdpa=True),
                "analytic": analytic.total,
                "analytic_projections": analytic.projections,
                "analytic_attention_products": analytic.attention,
            })
    return rows


class _WithoutOutput(nn.Module):
    """Our `full` module up to the merged heads (no output projection), like BertSelfAttention."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        q, k, v = self.module.project(x)
        o = self.module.attend(q, k, v, None)
        b, h, n, d = o.shape
        return o.transpose(1, 2).reshape(b, n, h * d)


# -- plot ------------------------------------------------------------------------------------------------
def plot_macs(rows: list[FlopRow], path, title: str | None = None):
    """Log-log plot of total MACs against length, one line per mechanism; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    by_name: dict[str, list[FlopRow]] = {}
    for r in rows:
        by_name.setdefault(r.mechanism, []).append(r)
    for name, pts in by_name.items():
        pts = sorted(pts, key=lambda r: r.n)
        ax.plot([r.n for r in pts], [r.macs.total / 1e9 for r in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("GMACs per layer (forward, batch 1)")
    ax.set_title(title or "attention layer cost against length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- tables ----------------------------------------------------------------------------------------------
def _g(value) -> str:
    return "-" if value is None else f"{value / 1e9:.3f}"


def flops_table(rows: list[FlopRow], title: str = "MACs per layer (forward, batch 1), in G"):
    from rich.table import Table

    table = Table(title=title)
    memory = any(r.activation_bytes is not None for r in rows)
    ffn = any(r.feed_forward or r.head for r in rows)
    cols = ["mechanism", "n", "total", "projections", "attention products", "scores", "weighted", "other", "exps"]
    cols += (["feed-forward", "head", "with FFN + head"] if ffn else []) + (["saved activations MiB"] if memory else [])
    for col in cols:
        table.add_column(col, justify="left" if col == "mechanism" else "right")
    for r in rows:
        m = r.macs
        cells = [r.mechanism, str(r.n), _g(m.total), _g(m.projections), _g(m.attention), _g(m.scores),
                 _g(m.weighted), _g(m.other), _g(m.exps)]
        if ffn:
            cells += [_g(r.feed_forward), _g(r.head), _g(r.layer_total)]
        if memory:
            cells.append("-" if r.activation_bytes is None else f"{r.activation_bytes / 2**20:.1f}")
        table.add_row(*cells)
    return table


def counters_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="one BERT-base self-attention layer: what each counter reports (GMACs)")
    for col in ("layer", "n", "nn.Linear hooks", "ptflops", "FlopCounterMode", "FlopCounterMode, math SDPA",
                "analytic", "of which attention products"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in rows:
        table.add_row(r["layer"], str(r["n"]), _g(r["linear_hooks"]), _g(r["ptflops"]), _g(r["flop_counter"]),
                      _g(r["flop_counter_math_sdpa"]), _g(r["analytic"]), _g(r["analytic_attention_products"]))
    return table


# -- a report over mechanisms and lengths ------------------------------------------------------------------
def flop_report(*, preset: str | None = None, mechanisms: tuple[str, ...] | None = None,
                lengths: tuple[int, ...] | None = None, dim: int | None = None, heads: int | None = None,
                options: dict[str, dict[str, Any]] | None = None, output_projection: bool | None = None,
                ffn_dim: int | None = None, compare: bool = False, memory: bool = False,
                model=None) -> tuple[dict[str, Any], list[FlopRow]]:
    """MACs per mechanism and length from a preset (PRESETS) with overrides, or of a whole saved `model`.
    Returns (a JSON-able result, the rows). Bad settings raise ConfigError naming the option."""

    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}", "preset")
    base = PRESETS.get(preset or "", {})
    if model is not None:  # a whole model from its config: its own attention, sizes and layers
        try:
            rows = model_rows(model, lengths or (512, 1024, 2048, 4096))
        except (OSError, TypeError, ValueError) as e:
            raise ConfigError(str(e), "model") from e
        return {"model": str(model), "unit": "MACs", "rows": [r.to_dict() for r in rows]}, rows
    names = mechanisms or base.get("mechanisms") or tuple(list_attentions())
    for name in names:
        if name not in list_attentions():
            raise ConfigError(f"unknown mechanism {name!r}; registered: {', '.join(list_attentions())}", "mechanisms")
    unknown = sorted(set(options or {}) - set(names))
    if unknown:
        raise ConfigError(f"options name mechanism(s) {unknown} that are not counted ({list(names)})", "options")
    lens = lengths or base.get("lengths", (512, 1024, 2048, 4096))
    dim = dim or base.get("dim", 768)
    heads = heads or base.get("heads", 12)
    if dim % heads:
        raise ConfigError(f"heads={heads} must divide dim={dim}", "heads")
    output_projection = base.get("output_projection", True) if output_projection is None else output_projection
    try:
        ffn_dim = base.get("ffn_dim", 0) if ffn_dim is None else ffn_dim
        rows = flop_rows(names, lens, dim, heads, options, output_projection=output_projection, memory=memory,
                         ffn_dim=ffn_dim)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad options: {e}", "options") from e
    result: dict[str, Any] = {"dim": dim, "heads": heads, "output_projection": output_projection, "unit": "MACs",
                              "rows": [r.to_dict() for r in rows]}
    if compare:
        result["counters"] = compare_counters(lens, dim, heads)
    return result, rows
