"""Which backend runs a block layout, in one place: the engine (`sparse.engine`) or PyTorch's
FlexAttention (`sparse.flex`), chosen by the caller or by the "auto" rule (`flex.choose_backend`).

Every pattern mechanism calls `run_layout` instead of a backend directly, so `backend="engine" |
"flex" | "auto"` means the same for all of them, an explicit backend that cannot run a call is an
error naming why (never a quiet switch), and `decide` gives the same answer `explain()` prints.
A debug log line (logger "longrange.backend") records each decision.

What only the engine does: attention dropout, log-sum-exp outputs (`return_lse`, used to merge
factorised patterns) and a `ScoreBias` that trains its inputs (ETC's relative positions): "auto"
picks the engine for those calls, "flex" is an error. Both run rectangular layouts (n queries among
n_kv != n keys: memory segments, cached decoding, a shard's queries among the keys it fetched).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from longrange.core.dropout import DropoutIndex
from longrange.core.masking import check_qkv
from longrange.patterns.base import Pattern
from longrange.sparse.bias import ScoreBias
from longrange.sparse.engine import block_sparse_attention
from longrange.sparse.flex import BACKENDS, FlexUnavailable, choose_backend, flex_block_sparse_attention, flex_problem
from longrange.sparse.gather import TokenKeys
from longrange.sparse.layout import BlockLayout, compile_layout
from longrange.sparse.score import ScoreTerm

log = logging.getLogger("longrange.backend")

#: how the flex backend runs: None = its fused (compiled) kernel; False = flex's eager reference path
#: (it builds the n×n scores: tests on CPU set it to check the lowering without compiling)
FLEX_COMPILED: bool | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """backend: "engine" or "flex"; why: the rule's reason in words."""

    backend: str
    why: str

    def __str__(self) -> str:
        return f"{self.backend} ({self.why})"


def check_backend(backend: str, option: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{option} must be one of {BACKENDS}, got {backend!r}")
    return backend


def decide(q: torch.Tensor, layout: BlockLayout, backend: str = "auto", *, needs_grad: bool = False,
           dropout_p: float = 0.0, engine_only: str | None = None, compiled: bool | None = None) -> Decision:
    """The backend for one call. engine_only: why this call needs the engine (return_lse, a training
    ScoreBias), or None. An explicit backend that cannot run is a ValueError naming the reason."""
    check_backend(backend)
    if backend == "engine":
        return Decision("engine", "asked for")
    if backend == "flex":
        if engine_only:
            raise FlexUnavailable(f"{engine_only}; use backend='engine' or 'auto'")
        compiled = FLEX_COMPILED is not False if compiled is None else compiled
        problem = flex_problem(q, needs_grad=needs_grad, dropout_p=dropout_p, compiled=compiled)
        if problem:
            raise FlexUnavailable(problem)
        return Decision("flex", "asked for")
    if engine_only:
        return Decision("engine", f"auto: {engine_only}")
    chosen, why = choose_backend(q, layout, needs_grad=needs_grad, dropout_p=dropout_p)
    return Decision(chosen, f"auto: {why}")


def records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call_records_grad(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd records module(x): x needs gradients, or the module's parameters do."""
    return records_grad(x) or (torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | BlockLayout,
    tile: int = 64,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "engine",
    score: ScoreTerm | None = None,
    compiled: bool | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """Attention of q over k, v restricted to `pattern`, computed blockwise in linear memory.

    q, k, v: [B, H, N, D]. pattern: a `Pattern` (compiled here for N and `tile`) or a
    `BlockLayout` compiled beforehand (a rectangular one, n queries among n_kv keys: k, v are
    [B, H, n_kv, D], key_padding_mask [B, n_kv]). tile: the kernel's block of queries and keys in tokens (the
    pattern's meaning does not depend on it). key_padding_mask: [B, N] bool, True = real token.
    Any N works: it is padded to a multiple of the tile and un-padded. Returns [B, H, N, D];
    a query with no allowed real key gets zeros.

    backend: "engine" (`longrange.sparse.engine`), "flex" (PyTorch's FlexAttention on the same
    layout, `longrange.sparse.flex`; an error naming the reason where it cannot run, never a quiet
    switch) or "auto" (`decide`). score: an additive `ScoreTerm` (ALiBi, relative positions), the
    same description on either backend. compiled: flex only (None = its fused kernel, False = its
    eager reference path). dropout_p, dropout_seed: attention-probability dropout, see
    `block_sparse_attention` (engine only: flex has no dropout; "auto" picks the engine for it).
    """
    check_backend(backend)
    if isinstance(pattern, BlockLayout):
        layout = pattern
    elif isinstance(pattern, Pattern):
        check_qkv(q, k, v)
        layout = compile_layout(pattern, q.shape[2], tile)
    else:
        raise TypeError(f"pattern must be a longrange Pattern or BlockLayout, got {type(pattern).__name__}")
    if score is not None and not isinstance(score, ScoreTerm):
        raise TypeError(f"score must be a longrange ScoreTerm (longrange.sparse.score), got {type(score).__name__}")
    if compiled is not None and backend != "flex":
        raise ValueError("compiled= applies to backend='flex' only")
    if layout.is_square:
        check_qkv(q, k, v)
        if layout.n != q.shape[2]:
            raise ValueError(f"layout was compiled for length {layout.n}, but q has length {q.shape[2]}")
    heads = layout.num_heads
    if heads is not None and heads != q.shape[1]:
        raise ValueError(f"pattern is defined for {heads} heads, but q has {q.shape[1]} heads")
    return run_layout(q, k, v, layout, key_padding_mask, backend=backend, score=score, dropout_p=dropout_p,
                      dropout_seed=dropout_seed, scale=scale, compiled=compiled)


def run_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
               key_padding_mask: torch.Tensor | None = None, *, backend: str = "auto",
               extra_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | TokenKeys | None = None,
               score: ScoreTerm | None = None, score_bias: ScoreBias | None = None, dropout_p: float = 0.0,
               dropout_seed: int | None = None, return_lse: bool = False, scale: float | None = None,
               compiled: bool | None = None, who: str = "",
               dropout_index: DropoutIndex | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`layout` on the chosen backend: the engine's `block_sparse_attention` contract (q [B, H, n, D],
    k, v [B, H, n_kv, D], key_padding_mask [B, n_kv] bool, extra_kv, dropout_p).

    score: an additive `ScoreTerm` (either backend); score_bias: the engine's per-chunk form, given
    when its inputs train (engine only; with both, flex runs `score` and the engine `score_bias`).
    compiled: flex only (None: `FLEX_COMPILED`). who: the caller's name for the log line.
    dropout_index: where the rows and columns sit in the caller's coordinates, for dropout (engine)."""
    extra = () if extra_kv is None or isinstance(extra_kv, TokenKeys) else extra_kv[:2]
    needs_grad = records_grad(q, k, v, *extra, *(score_bias.inputs if score_bias is not None else ()))
    engine_only = None
    if return_lse:
        engine_only = "the call needs log-sum-exp outputs (return_lse), which flex's kernel does not return"
    elif score_bias is not None and score is None:
        engine_only = "the call's score bias exists in the engine's form only"
    elif score_bias is not None and needs_grad and any(t.requires_grad for t in score_bias.inputs):
        engine_only = "the score bias's inputs need gradients (the engine's ScoreBias backward)"
    compiled = FLEX_COMPILED if compiled is None else compiled
    decision = decide(q, layout, backend, needs_grad=needs_grad, dropout_p=dropout_p, engine_only=engine_only,
                      compiled=compiled is not False)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s n=%d %s %s grad=%s: %s", who or "layout", layout.n, q.device.type, str(q.dtype).split(".")[-1],
                  needs_grad, decision)
    if decision.backend == "flex":
        if isinstance(extra_kv, TokenKeys):
            extra_kv = extra_kv.as_extra_kv(k, v)
        return flex_block_sparse_attention(q, k, v, layout, key_padding_mask, scale=scale, extra_kv=extra_kv,
                                           score=score, compiled=compiled)
    bias = score_bias if score_bias is not None else (None if score is None else score.engine_bias(
        layout.n_kv, _extra_count(extra_kv), layout.q_offset))
    return block_sparse_attention(q, k, v, layout.to(q.device), key_padding_mask, scale=scale, extra_kv=extra_kv,
                                  score_bias=bias, dropout_p=dropout_p, dropout_seed=dropout_seed,
                                  dropout_index=dropout_index, return_lse=return_lse)


def _extra_count(extra_kv) -> int:
    if extra_kv is None:
        return 0
    return extra_kv.count if isinstance(extra_kv, TokenKeys) else extra_kv[0].shape[2]
