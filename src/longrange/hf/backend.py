"""Any HF transformers model on longrange attention: an `AttentionInterface` backend.

    import longrange as lr
    lr.hf.register()          # "longrange-local", "longrange-bigbird", "longrange-longformer", ...
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="longrange-local")
    model.config.longrange = {"window": 4096, "sink_tokens": 4}     # options per model
    out = model.generate(ids, attention_mask=mask, past_key_values=lr.hf.LongrangeCache())

What runs. transformers calls our attention function in every attention layer with its own q, k, v
(after RoPE; grouped-query key/value heads as the model has them) and the mask our registered mask
function built. That mask is not a dense [T, L] tensor but a `LongrangeMask`: HF's 2-D padding mask
and where the queries and keys sit, with HF's mask function read once to tell causal from
bidirectional. Our function builds the mechanism's pattern from `model.config.longrange` (any option
of the mechanism's config; `causal` is the model's), intersected with the model's own sliding window
where the layer has one (Mistral, Qwen2, ModernBERT), and computes:
- a whole sequence (prefill, encoders, training): the block engine, `lr.sparse_attention`, with
  each example's real tokens numbered 0.. (left padding is moved out of the way and back);
- a few queries against a longer past (decoding with HF's DynamicCache): masked attention at
  explicit positions, O(T·L);
- with `LongrangeCache` as `past_key_values`: our `KVCache`, which keeps only the keys the pattern
  can still reach (a ring buffer for the window, fixed slots for sinks and global tokens).
Positions are each example's real-token numbers (`cumsum(attention_mask) - 1`, HF's position_ids in
`generate`), so a left-padded batch gives each example what it gets alone.

Refused with an error that says why: `output_attentions=True` (no dense attention matrix is ever
built), attention dropout while decoding with a cache in training mode, soft-capping and additive position
biases, a 4-D mask, masks that are neither causal nor bidirectional (image-token or packed-sequence
overlays), and incremental decoding for bigbird (its graph depends on the whole length).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import torch

from longrange.core.config import ConfigError
from longrange.core.interface import CacheSpec
from longrange.mechanisms import ATTENTIONS, build_attention, config_class, list_attentions
from longrange.mechanisms.base import PatternAttention
from longrange.nn.decoding import compacted, positional_attention, real_positions, repeat_heads
from longrange.patterns import Causal, Global, Window
from longrange.sparse.backends import run_layout

PREFIX = "longrange-"
INSTALL_HINT = "pip install longrange[hf]"
#: options the backend reads itself, beside the mechanism's config fields
BACKEND_OPTIONS = {"longformer": ("global_tokens",)}
#: HF attention kwargs that change the maths and that our engine does not compute
UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")
#: patterns kept per process (one per mechanism, options, heads, causal, window and mode)
_SETUPS = 64


def pattern_mechanisms() -> list[str]:
    """Registered mechanisms whose graph is a pattern and that need no input beside global tokens."""
    names = []
    for name in list_attentions():
        module_cls = ATTENTIONS.get(name)[1]
        if issubclass(module_cls, PatternAttention) and set(module_cls.capabilities.inputs) <= {"global_mask"}:
            names.append(name)
    return names


def register(mechanisms: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Register "longrange-NAME" for each pattern mechanism (default: all of them, `pattern_mechanisms()`)
    with HF's `AttentionInterface` and `AttentionMaskInterface`; returns the names. Idempotent."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"lr.hf.register needs the optional dependency `transformers`: {INSTALL_HINT} "
                          f"({err})") from err
    available = pattern_mechanisms()
    names = []
    for name in mechanisms or available:
        if name not in available:
            raise ValueError(f"{name!r} cannot be an HF attention backend; pattern mechanisms: {available}")
        AttentionInterface.register(PREFIX + name, functools.partial(longrange_attention, name))
        AttentionMaskInterface.register(PREFIX + name, longrange_mask)
        names.append(PREFIX + name)
    return names


# -- the mask -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LongrangeMask:
    """What HF's mask creation hands our attention function instead of a dense [B, 1, T, L] tensor.

    keep      [B, M] bool over cache positions 0 .. M-1 (True = real token), M >= kv_offset + kv_length
              and >= q_offset + q_length; None: no padding
    q_offset  cache position of the first query; q_length queries
    kv_offset cache position of the first key HF passes (a sliding-window cache drops older ones); kv_length keys
    causal    what HF's mask function says: key <= query (decoders) or every key (encoders)
    """

    keep: torch.Tensor | None
    q_offset: int
    q_length: int
    kv_offset: int
    kv_length: int
    causal: bool

    def positions(self, start: int, length: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(keep [B, length] or None, positions [B or 1, length]) of cache positions start .. start+length-1."""
        if self.keep is None:
            return None, torch.arange(start, start + length, device=device)[None]
        keep = self.keep.to(device)
        return keep[:, start : start + length], real_positions(keep)[:, start : start + length]


def longrange_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> LongrangeMask:
    """HF's `AttentionMaskInterface` signature (see transformers' `sdpa_mask`) -> a `LongrangeMask`.
    HF's mask function is evaluated on 3 x q_length pairs (diagonal, previous and next key) only."""
    if kwargs.get("use_vmap"):
        raise ValueError("this model adds its own overlay to the attention mask (or_mask_function / "
                         "and_mask_function, e.g. bidirectional image tokens); the longrange backends follow plain "
                         "causal or bidirectional masks only: use attn_implementation='sdpa' for this model")
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    causal = True if mask_function is None else _probe_causal(mask_function, q_offset, q_length)
    keep = None
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)
        width = max(kv_offset + kv_length, q_offset + q_length)
        if keep.shape[-1] < width:  # as HF's prepare_padding_mask: positions past the mask are not tokens
            keep = torch.nn.functional.pad(keep, (0, width - keep.shape[-1]), value=False)
        if bool(keep.all()):
            keep = None
    return LongrangeMask(keep, q_offset, q_length, kv_offset, kv_length, causal)


def _probe_causal(mask_function, q_offset: int, q_length: int) -> bool:
    """True for a causal mask function, False for a bidirectional one, else a ValueError."""
    q = torch.arange(q_offset, q_offset + q_length)
    zero = torch.zeros(1, dtype=torch.long)

    def allowed(kv):
        return mask_function(zero, zero, q, kv).expand(q_length).to(torch.bool)

    diag, nxt = allowed(q), allowed(q + 1)
    prev = allowed((q - 1).clamp(min=0))[q > 0]
    if bool(diag.all()) and bool(prev.all()) and not bool(nxt.any()):
        return True
    if bool(diag.all()) and bool(prev.all()) and bool(nxt.all()):
        return False
    raise ValueError("the model's attention mask is neither causal nor bidirectional (packed sequences or a "
                     "custom mask function); the longrange backends follow plain causal or bidirectional masks only")


# -- the pattern for a layer ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerSetup:
    """What one layer runs: the mechanism module (its tile and layout cache), the final pattern, and its
    decoding cache (None with the reason when it cannot decode incrementally)."""

    attention: PatternAttention
    pattern: Any
    tag: str
    cache_spec: CacheSpec | None
    no_cache: str | None

    def engine(self, scale, dropout_p, q, k, v, keep):
        """The block layout on q [B, H, N, D], k / v [B, Hk, N, D] with this pattern (layouts compiled once
        per length) on the mechanism's backend ("auto" by default); keep [B, N] bool or None, real tokens
        numbered 0.. -> [B, H, N, D]. dropout_p: attention dropout (HF passes its config's in training)."""
        h = q.shape[1]
        layout = self.attention.cached_layout(self.pattern, q.shape[2], q.device, tag=self.tag)
        return run_layout(q, repeat_heads(k, h), repeat_heads(v, h), layout, keep, scale=scale,
                          backend=self.attention.backend, dropout_p=dropout_p, who=f"hf {self.attention.config.name}")


def layer_setup(name: str, options: dict | None, heads: int, causal: bool, sliding_window: int | None,
                training: bool) -> LayerSetup:
    """The pattern of mechanism `name` with `options` (model.config.longrange) for a layer with `heads`
    query heads, causal or not, with the model's own sliding window (HF's `sliding_window` kwarg: w
    keys back, the query's own included), in training or eval mode (bigbird's random_in_eval)."""
    key = json.dumps(options or {}, sort_keys=True, default=str)
    return _layer_setup(name, key, heads, causal, sliding_window, training)


@functools.lru_cache(maxsize=_SETUPS)
def _layer_setup(name, options_json, heads, causal, sliding_window, training) -> LayerSetup:
    options = json.loads(options_json)
    if not isinstance(options, dict):
        raise ConfigError(f"model.config.longrange must be a dict of {name} options, got {options!r}", "longrange")
    extra = {k: options.pop(k) for k in BACKEND_OPTIONS.get(name, ()) if k in options}
    fields = {f.name for f in dataclasses.fields(config_class(name))}
    if "causal" in options and bool(options["causal"]) != causal:
        raise ConfigError(f"model.config.longrange sets causal={options['causal']!r}, but this model's attention is "
                          f"{'causal' if causal else 'bidirectional'}: leave `causal` out (the model sets it)",
                          "longrange")
    if "causal" in fields:
        options["causal"] = causal
    for reserved in ("dim", "heads"):
        if reserved in options:
            raise ConfigError(f"model.config.longrange must not set {reserved!r}: it comes from the model", "longrange")
    try:
        att = build_attention(name, dim=heads, heads=heads, **options)
    except (TypeError, ValueError) as err:
        backend = list(BACKEND_OPTIONS.get(name, ()))
        raise ConfigError(f"model.config.longrange for longrange-{name}: {err}"
                          + (f" (backend options: {backend})" if backend else ""), "longrange") from None
    att.train(training)
    if getattr(att.config, "random_in_eval", None) == "hf":
        raise ConfigError("random_in_eval='hf' reproduces HF BigBird's own eval graph; as an attention backend use "
                          "'same' or 'none'", "longrange")
    pattern = att.current_pattern()
    g = _global_tokens(extra.get("global_tokens", 0))
    if g:
        pattern = pattern | Global(g, clip=True)  # positions not reached yet (prefill, decoding) are dropped
    if causal and ("causal" not in fields or g):
        pattern = pattern & Causal()
    if sliding_window:
        pattern = pattern & Window(int(sliding_window) - 1, causal=causal)
    spec, why = _cache_spec(att, name, g, causal, sliding_window, pattern)
    tag = f"hf:{causal}:{sliding_window}:{g}:{training}"
    return LayerSetup(att, pattern, tag, spec, why)


def _global_tokens(value) -> tuple[int, ...]:
    """global_tokens: g (the first g tokens) or a list of token positions."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return tuple(range(value))
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in value):
        return tuple(sorted(set(value)))
    raise ConfigError(f"global_tokens must be a count g (the first g tokens) or a list of non-negative positions, "
                      f"got {value!r}", "longrange")


def _cache_spec(att, name, g, causal, sliding_window, pattern) -> tuple[CacheSpec | None, str | None]:
    if not causal:
        return None, "the model is bidirectional"
    try:
        if name == "longformer":  # a global query sees every key before it: keep all up to the last global token
            base = att.cache_spec(global_tokens=max(g) + 1 if g else 0)
        else:
            base = att.cache_spec()
    except ValueError:
        return None, (f"{name}'s graph depends on the whole length (its last block is global, its random blocks are "
                      "drawn per length), so earlier outputs would change as tokens are added")
    if base.kind != "kv":
        return None, f"{name} declares a {base.kind!r} cache"
    window = base.window
    if sliding_window:
        window = sliding_window - 1 if window is None else min(window, sliding_window - 1)
    return dataclasses.replace(base, window=window, pattern=pattern), None


# -- the attention function ---------------------------------------------------------------------------------------
def longrange_attention(name: str, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, sliding_window: int | None = None, **kwargs):
    """HF's attention-function signature (see transformers' `sdpa_attention_forward`): query [B, H, T, D],
    key / value [B, Hk, L, D] -> (output [B, T, H, D], None)."""
    _refuse(name, module, dropout, kwargs)
    b, h, t, _ = query.shape
    mask = attention_mask
    if mask is not None and not isinstance(mask, LongrangeMask):
        raise ValueError(f"longrange-{name} got a prepared {type(mask).__name__} attention mask; it needs HF's 2-D "
                         "attention_mask (a 4-D mask would be the dense [T, L] matrix it never builds)")
    if getattr(module, "is_cross_attention", False):
        return _cross_attention(query, key, value, mask, scaling), None
    causal = mask.causal if mask is not None else bool(is_causal if is_causal is not None else
                                                       getattr(module, "is_causal", False))
    options = getattr(getattr(module, "config", None), "longrange", None)
    setup = layer_setup(name, options, h, causal, sliding_window, bool(module.training))
    layer = getattr(key, "_longrange_cache", None)
    if mask is None:
        mask = LongrangeMask(None, 0, t, 0, key.shape[2], causal)
    q_keep, q_pos = mask.positions(mask.q_offset, t, query.device)
    drop = dropout if module.training else 0.0
    if drop and not (layer is None and t == key.shape[2] and mask.q_offset == 0 and mask.kv_offset == 0):
        raise ValueError(f"longrange-{name} applies attention dropout (dropout={dropout}) to whole sequences, not "
                         "while decoding with a cache in training mode: call model.eval() to generate")
    if layer is not None:  # LongrangeCache: only the keys the pattern can still reach
        if setup.cache_spec is None:
            raise ValueError(f"longrange-{name} cannot decode with LongrangeCache: {setup.no_cache}")
        out = layer.attend(setup, query, key, value, q_pos.expand(b, t), q_keep, scaling)
    elif t == key.shape[2] and mask.q_offset == 0 and mask.kv_offset == 0:  # a whole sequence: the block engine
        out = compacted(functools.partial(setup.engine, scaling, drop), query, key, value, q_keep)
    else:  # a few queries against a longer past (HF's DynamicCache): masked attention at positions
        if setup.cache_spec is None and causal:
            raise ValueError(f"longrange-{name} cannot decode incrementally: {setup.no_cache}; generate with "
                             "use_cache=False")
        k_keep, k_pos = mask.positions(mask.kv_offset, key.shape[2], query.device)
        k_valid = torch.ones(b, key.shape[2], dtype=torch.bool, device=query.device) if k_keep is None else k_keep
        out = positional_attention(query, key, value, q_pos.expand(b, t), k_pos.expand(b, -1), k_valid,
                                   setup.pattern, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _cross_attention(query, key, value, mask, scale):
    """Cross-attention (decoder to encoder) is not the pattern's business: every real encoder key."""
    h = query.shape[1]
    k, v = repeat_heads(key, h), repeat_heads(value, h)
    keep = None if mask is None or mask.keep is None else mask.keep[:, None, None, : key.shape[2]]
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=keep, scale=scale)
    return out.transpose(1, 2).contiguous()


def _refuse(name, module, dropout, kwargs) -> None:
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
        raise ValueError(f"longrange-{name} cannot return attention weights (output_attentions=True): it never builds "
                         "the dense [T, L] attention matrix; use attn_implementation='eager' to inspect weights")
    for key in UNSUPPORTED_KWARGS:
        if kwargs.get(key) is not None:
            raise ValueError(f"longrange-{name} does not support the `{key}` this model passes to its attention")



__all__ = ["LayerSetup", "LongrangeMask", "layer_setup", "longrange_attention", "longrange_mask",
           "pattern_mechanisms", "register"]
