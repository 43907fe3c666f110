"""The FlexAttention backend: a `BlockLayout` lowered to a `BlockMask`, score terms as `score_mod`.

Legend as in `engine.py`: B batch, H heads, n queries, n_kv keys, D head dim, T = layout.tile,
nb = ceil(n / T) query tiles, nbk = ceil(n_kv / T) key tiles, g extra (global) keys.

The lowering (`block_mask`), with no n×n tensor on the way:
- The layout's exact tile codes [Hp, nb, nbk] (`BlockLayout.tile_codes`: dense rows included,
  they are rows with more key blocks, no side path) become `BlockMask.from_kv_blocks`: full
  tiles as `full_kv_num_blocks/full_kv_indices` (no mask evaluated), partial tiles as
  `kv_num_blocks/kv_indices`, refined by the pattern's predicate as `mask_mod`. BLOCK_SIZE is the
  layout's tile; Hp = heads maps to the head axis, Hp = 1 broadcasts.
- Key padding (`key_padding_mask` [B, n_kv]) and the keys past n_kv in the last tile enter the
  `mask_mod` as captured tensors; the block structure stays shared by the batch (B = 1): a key
  tile padded in some example is partial, one padded in every example is skipped.
- Extra keys (`extra_kv`: per-example global keys, keep mask [B, g] or per query [B, n, g]) are
  appended after the nbk·T (padded) keys, in ceil(g / T) extra key tiles that every query tile
  visits as partial tiles; their keep mask is captured by the `mask_mod`.
- The flex `mask_mod` is the exact predicate (the eager path evaluates it on every pair and
  ignores the blocks; the compiled kernels evaluate it on partial tiles only).
The block structure is cached with the layout (`BlockLayout.cache`) per device and per padding
summary; each call only wraps it with a `mask_mod` that captures that call's masks.

The call (`flex_block_sparse_attention`) mirrors the engine's `block_sparse_attention`. Compiled
(the default) it runs flex's fused kernel, compiled once per layout and shape family (the
compiled function is cached with the layout); `compiled=False` runs flex's eager reference path,
which materializes the n×n scores (tests, small inputs). What flex cannot do in torch 2.13 is an
error (`FlexUnavailable`) naming the reason, never a quiet switch to another backend: backward on
CPU, dropout, float64 compiled on CPU, no compiler.
"""

from __future__ import annotations

import copy
import functools
import shutil
import types
import warnings
from typing import TYPE_CHECKING

import torch

from longrange.core.masking import check_key_padding_mask
from longrange.sparse.score import ScoreTerm

if TYPE_CHECKING:  # the layout imports this module for `BlockLayout.to_block_mask`
    from longrange.sparse.layout import BlockLayout

#: dtypes flex's compiled CPU kernel accepts (torch 2.13)
CPU_COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: the `backend=` values of `sparse_attention`
BACKENDS = ("engine", "flex", "auto")
#: "auto" on CPU: compiled flex for inference from this many queries; None (the default): never.
#: Measured (`longrange bench -m local,bigbird --backend engine,flex -n 1k,4k,16k`, BERT-base layer,
#: fp32, 2 threads, each point a fresh process): compiled flex ran 0.97-1.08x the engine's speed at 4K
#: and 16K (local 812 vs 785 ms, bigbird 720 vs 779 ms at 16K) with 1.9x its memory growth (565 vs
#: 302 MiB), after a first call per shape that compiles for 10-60 s. On one thread the attention alone
#: was 1.3-2.7x faster on flex (scripts/flex_vs_engine.py). Not worth it by default; set a length here
#: to opt in for long inference-only CPU jobs.
AUTO_CPU_FLEX_MIN_TOKENS: int | None = None


class FlexUnavailable(RuntimeError, ValueError):
    """backend="flex" was asked for a call FlexAttention cannot run; the message says why. A
    ValueError too: the same kind of error as any other option that does not fit the call."""

    def __init__(self, reason: str):
        super().__init__(f"backend='flex' cannot run this call: {reason}")
        self.reason = reason


# -- can flex run this? ----------------------------------------------------------------------------
def flex_problem(q: torch.Tensor, *, needs_grad: bool = False, dropout_p: float = 0.0,
                 compiled: bool = True) -> str | None:
    """Why FlexAttention cannot run a call on q's device and dtype (None: it can)."""
    if _flex_module() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
    if dropout_p:
        return f"FlexAttention has no attention dropout (dropout_p={dropout_p}); use backend='engine'"
    if needs_grad and q.device.type == "cpu":
        return ("FlexAttention has no backward on CPU in torch 2.13 (inputs require grad); run under "
                "torch.no_grad() / inference_mode, or use backend='engine'")
    if compiled:
        if q.device.type == "cpu" and q.dtype not in CPU_COMPILED_DTYPES:
            return (f"compiled FlexAttention on CPU runs float32/float16/bfloat16 only, got {q.dtype} "
                    "(compiled=False runs flex's eager reference path)")
        missing = _compiler_missing(q.device.type)
        if missing:
            return missing
    return None


def choose_backend(q: torch.Tensor, layout: BlockLayout, *, needs_grad: bool = False,
                   dropout_p: float = 0.0) -> tuple[str, str]:
    """The "auto" rule: (backend, why). Flex on CUDA; the engine on CPU (for training flex has no CPU
    backward; for inference see `AUTO_CPU_FLEX_MIN_TOKENS`), with dropout and wherever flex cannot
    run."""
    problem = flex_problem(q, needs_grad=needs_grad, dropout_p=dropout_p, compiled=True)
    if problem:
        return "engine", f"flex cannot run: {problem}"
    if q.device.type == "cuda":
        return "flex", "CUDA: flex's fused kernel"
    if AUTO_CPU_FLEX_MIN_TOKENS is not None and layout.n >= AUTO_CPU_FLEX_MIN_TOKENS:
        return "flex", f"CPU inference at n={layout.n} >= AUTO_CPU_FLEX_MIN_TOKENS={AUTO_CPU_FLEX_MIN_TOKENS}"
    return "engine", ("CPU: the engine (compiled flex measured within 8% of its speed with 1.9x its memory, "
                      "plus a compile per shape)")


@functools.cache
def _flex_module():
    try:
        from torch.nn.attention import flex_attention
    except ImportError:  # torch < 2.5
        return None
    return flex_attention


@functools.cache
def _compiler_missing(device_type: str) -> str | None:
    if device_type == "cpu":
        for cxx in ("c++", "g++", "clang++"):
            if shutil.which(cxx):
                return None
        return "torch.compile on CPU needs a C++ compiler (c++, g++ or clang++ on PATH); compiled=False runs eager"
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "torch.compile on CUDA needs Triton"
        return None if has_triton() else "torch.compile on CUDA needs Triton (pip install triton)"
    return f"no FlexAttention kernel for device type {device_type!r}"


# -- layout -> BlockMask ---------------------------------------------------------------------------
def block_mask(layout: BlockLayout, key_padding_mask: torch.Tensor | None = None, *,
               extra_keep: torch.Tensor | None = None, device=None):
    """`layout` as a FlexAttention BlockMask for n queries and n_kv keys (+ g extra keys).

    key_padding_mask: [B, n_kv] bool, True = real key. extra_keep: [B, g] or [B, n, g] bool, the
    extra keys each example's (or each query's) rows may see; they sit after the keys, at flex key
    positions nbk·T .. nbk·T + g - 1 (pad the keys to nbk·T, then append them). The block structure
    is cached with the layout; the returned mask's `mask_mod` captures this call's masks.
    """
    device = torch.device(device) if device is not None else layout.kv_index.device
    if layout.kv_index.device != device:
        layout = layout.to(device)
    keep = check_key_padding_mask(key_padding_mask, _batch(key_padding_mask, extra_keep), layout.n_kv,
                                  "key_padding_mask")
    g = _check_extra_keep(extra_keep, layout)
    summary = _column_summary(layout, keep)  # (all real [nbk], all padded [nbk]) or None
    key = ("block_mask", str(device), -(-g // layout.tile),
           None if summary is None else tuple(torch.stack(summary).flatten().tolist()))
    if key not in layout.cache:
        layout.cache[key] = _structure(layout, summary, g)
    out = copy.copy(layout.cache[key])
    out.mask_mod = _mask_mod(layout, keep, extra_keep)
    return out


def _batch(keep, extra_keep):
    if keep is not None:
        return keep.shape[0]
    return extra_keep.shape[0] if extra_keep is not None else 1


def _check_extra_keep(extra_keep, layout: BlockLayout) -> int:
    if extra_keep is None:
        return 0
    ok = isinstance(extra_keep, torch.Tensor) and extra_keep.dtype == torch.bool and (
        extra_keep.dim() == 2 or (extra_keep.dim() == 3 and extra_keep.shape[1] == layout.n))
    if not ok:
        got = (f"{extra_keep.dtype} {list(extra_keep.shape)}" if isinstance(extra_keep, torch.Tensor)
               else type(extra_keep).__name__)
        raise ValueError(f"extra_keep must be bool [B, g] or [B, n, g] with n = {layout.n} queries, got {got}")
    return extra_keep.shape[-1]


def _column_summary(layout: BlockLayout, keep):
    """Per key tile: every example has every real key (the tile may stay full), and no example has
    any (the tile is skipped). None without a padding mask."""
    if keep is None:
        return None
    T, nbk, n_kv = layout.tile, layout.num_kv_blocks, layout.n_kv
    padded = torch.nn.functional.pad(keep, (0, nbk * T - n_kv), value=True).view(keep.shape[0], nbk, T)
    all_real = padded.all(2).all(0)
    none_real = ~torch.nn.functional.pad(keep, (0, nbk * T - n_kv), value=False).view(-1, nbk, T).any(2).any(0)
    return all_real, none_real


def _structure(layout: BlockLayout, summary, g: int):
    """The BlockMask's index tensors (mask_mod left as flex's no-op): [1, Hp, nb] counts and
    [1, Hp, nb, nbk + extra tiles] indices, partial and full."""
    bm_cls = _flex_module().BlockMask
    T, n_kv = layout.tile, layout.n_kv
    codes = layout.tile_codes()  # (Hp, nb, nbk) int8: 0 skip, 1 partial, 2 full
    if n_kv % T:  # the last key tile holds padding keys: the mask_mod removes them
        codes[..., -1] = codes[..., -1].clamp(max=1)
    if summary is not None:
        all_real, none_real = summary
        codes = torch.where(all_real, codes, codes.clamp(max=1))
        codes = torch.where(none_real, torch.zeros_like(codes), codes)
    if g:
        extra = torch.ones(*codes.shape[:2], -(-g // T), dtype=codes.dtype, device=codes.device)
        codes = torch.cat([codes, extra], dim=2)  # every row visits the extra key tiles, partially
    partial, full = codes == 1, codes == 2
    kv_len = (layout.num_kv_blocks * T + g) if g else n_kv
    return bm_cls.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=T, seq_lengths=(layout.n, kv_len),
    )


def _ordered(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Hp, rows, cols] bool -> flex's (num_blocks [1, Hp, rows], indices [1, Hp, rows, cols]) int32,
    visited columns first in increasing order."""
    num = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None].contiguous(), idx[None].contiguous()


def _mask_mod(layout: BlockLayout, keep, extra_keep):
    """flex's mask_mod(b, h, q_idx, kv_idx): the layout's predicate (q counted from the first
    query), real keys only, the captured padding mask, and the extra keys' keep mask after the
    padded keys."""
    pred, n, n_kv = layout.mask_mod, layout.n, layout.n_kv
    start = layout.num_kv_blocks * layout.tile  # first extra key
    if keep is not None:  # padding positions count as padding; one lookup per pair
        keep = torch.nn.functional.pad(keep, (0, start - n_kv), value=False)

    def regular(b, h, q_idx, kv_idx):
        ok = pred(h, q_idx, kv_idx) & (kv_idx < n_kv)
        return ok if keep is None else ok & keep[b, kv_idx]

    if extra_keep is None:
        return regular
    g = extra_keep.shape[-1]

    def with_extra(b, h, q_idx, kv_idx):
        kv = torch.clamp(kv_idx, max=start - 1)
        e = torch.clamp(kv_idx - start, 0, g - 1)
        if extra_keep.dim() == 2:
            sees = extra_keep[b, e]
        else:
            sees = extra_keep[b, torch.clamp(q_idx, max=n - 1), e]
        return torch.where(kv_idx >= start, sees, regular(b, h, q_idx, kv))

    return with_extra


# -- the call --------------------------------------------------------------------------------------
def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    score: ScoreTerm | None = None,
    compiled: bool | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """FlexAttention on `layout`, the engine's `block_sparse_attention` contract.

    q [B, H, n, D]; k, v [B, H, n_kv, D] (n_kv = layout.n_kv: rectangular layouts run here);
    key_padding_mask [B, n_kv] bool; extra_kv = (k_e, v_e, keep_e): [B, H, g, D] twice and keep_e
    [B, g] or [B, n, g] bool; score: a `ScoreTerm` added to the scaled scores (extra keys at
    positions n_kv + e). compiled: None = the fused kernel (or plain flex inside an outer
    torch.compile), True = the fused kernel, False = flex's eager path (n×n scores: tests only).
    A query with no allowed key gets zeros. Raises `FlexUnavailable` where flex cannot run.
    """
    B, H, n, D = _check_inputs(q, k, v, layout)
    compiled = True if compiled is None else compiled
    tensors = (q, k, v) + (tuple(extra_kv[:2]) if extra_kv is not None else ())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    problem = flex_problem(q, needs_grad=needs_grad, dropout_p=dropout_p, compiled=compiled)
    if problem:
        raise FlexUnavailable(problem)
    heads = layout.num_heads
    if heads is not None and heads != H:
        raise ValueError(f"pattern is defined for {heads} heads, but q has {H} heads")
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, layout.n_kv, "key_padding_mask")
    layout = layout.to(q.device)
    extra_keep, start = None, None
    if extra_kv is not None:
        k_e, v_e, extra_keep = _check_extra_kv(extra_kv, B, H, n, D)
        start = layout.num_kv_blocks * layout.tile
        k = torch.cat([_pad_keys(k, start), k_e], dim=2)  # (B, H, nbk·T + g, D)
        v = torch.cat([_pad_keys(v, start), v_e], dim=2)
    mask = block_mask(layout, key_padding_mask, extra_keep=extra_keep)
    score_mod = None
    if score is not None:
        if not isinstance(score, ScoreTerm):
            raise TypeError(f"score must be a longrange ScoreTerm, got {type(score).__name__}")
        score_mod = score.score_mod(layout.q_offset, layout.n_kv, start)
    family = (tuple(q.shape), tuple(k.shape), q.dtype, key_padding_mask is not None,
              None if extra_keep is None else tuple(extra_keep.shape), None if score is None else score.name)
    return _run(layout, compiled, family, q, k, v, score_mod=score_mod, block_mask=mask, scale=scale)


def _check_inputs(q, k, v, layout: BlockLayout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point 4-d tensor [B, H, N, D], got {got}")
    B, H, n, D = q.shape
    if not hasattr(layout, "tile_codes"):  # a BlockLayout
        raise TypeError(f"layout must be a BlockLayout (compile_layout(pattern, n, tile)), got {type(layout).__name__}")
    if n != layout.n:
        raise ValueError(f"layout was compiled for {layout.n} queries, but q has length {n}")
    if k.shape != (B, H, layout.n_kv, D) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, H, n_kv, D] = [{B}, {H}, {layout.n_kv}, {D}] (n_kv = layout.n_kv), "
                         f"got {list(k.shape)} and {list(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, H, n, D


def _check_extra_kv(extra_kv, B, H, n, D):
    k_e, v_e, keep_e = extra_kv
    g = k_e.shape[2] if k_e.dim() == 4 else -1
    if k_e.shape != (B, H, g, D) or v_e.shape != k_e.shape:
        raise ValueError(f"extra_kv keys and values must be [B, H, g, D] = [{B}, {H}, g, {D}], got "
                         f"{list(k_e.shape)} and {list(v_e.shape)}")
    if keep_e.dtype != torch.bool or keep_e.shape not in ((B, g), (B, n, g)):
        raise ValueError(f"extra_kv keep mask must be bool [B, g] = [{B}, {g}] or [B, n, g] = [{B}, {n}, {g}], "
                         f"got {keep_e.dtype} {list(keep_e.shape)}")
    return k_e, v_e, keep_e


def _pad_keys(t, length):
    return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[2]))


def _run(layout: BlockLayout, compiled: bool, family, *args, **kwargs):
    flex = _flex_module().flex_attention
    if torch.compiler.is_compiling():  # inside the caller's torch.compile: it fuses flex itself
        return flex(*args, **kwargs)
    if not compiled:
        with warnings.catch_warnings():  # eager was asked for explicitly: no "use torch.compile" warning
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex(*args, **kwargs)
    return compiled_flex(layout, family)(*args, **kwargs)


def compiled_flex(layout: BlockLayout, family=()):
    """`torch.compile(flex_attention)` for one shape family of calls on `layout` (shapes, dtype,
    which masks and score term), cached with the layout. Each is a code object of its own, so
    dynamo's guards and its recompile limit count per family: a model's many layouts, batch sizes
    and masks never exhaust a shared limit (past it dynamo would quietly run flex's eager path,
    which builds the n×n scores). Compiled once per family."""
    key = ("flex_fn", family)
    if key not in layout.cache:
        code = _flex_caller(None).__code__
        code = code.replace(co_name=f"flex_attention_{id(layout):x}_{len(layout.cache)}")  # a code object of its own
        fn = types.FunctionType(code, globals(), code.co_name, None, (types.CellType(_flex_module().flex_attention),))
        layout.cache[key] = torch.compile(fn, dynamic=False, fullgraph=True)
    return layout.cache[key]


def _flex_caller(flex):
    def call(*args, **kwargs):
        return flex(*args, **kwargs)

    return call
