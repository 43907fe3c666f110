"""Which backend runs a block layout, in one place: the engine (`sparse.engine`) or PyTorch's
FlexAttention (`sparse.flex`), chosen by the caller or by the "auto" rule (`flex.choose_backend`).

Every pattern mechanism calls `run_layout` instead of a backend directly, so `backend="engine" |
"flex" | "auto"` means the same for all of them, an explicit backend that cannot run a call is an
error naming why (never a quiet switch), and `decide` gives the same answer `explain()` prints.
A debug log line (logger "longrange.backend") records each decision.

What only the engine does: attention dropout, log-sum-exp outputs (`return_lse`, used to merge
factorised patterns) and a `ScoreBias` that trains its inputs (ETC's relative positions): "auto"
picks the engine for those calls, "flex" is an error. What only flex does: rectangular layouts
(n queries among n_kv != n keys).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from longrange.sparse.bias import ScoreBias
from longrange.sparse.engine import block_sparse_attention
from longrange.sparse.flex import BACKENDS, choose_backend, flex_block_sparse_attention, flex_problem
from longrange.sparse.layout import BlockLayout
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
           dropout_p: float = 0.0, engine_only: str | None = None) -> Decision:
    """The backend for one call. engine_only: why this call needs the engine (return_lse, a training
    ScoreBias), or None. An explicit backend that cannot run is a ValueError naming the reason."""
    check_backend(backend)
    if backend == "engine":
        if not layout.is_square:
            raise ValueError("backend='engine' runs self-attention layouts only (n_kv == n); this layout is "
                             "rectangular: use backend='flex' or 'auto'")
        return Decision("engine", "asked for")
    if backend == "flex":
        if engine_only:
            raise ValueError(f"backend='flex' cannot run this call: {engine_only}; use backend='engine' or 'auto'")
        problem = flex_problem(q, needs_grad=needs_grad, dropout_p=dropout_p, compiled=FLEX_COMPILED is not False)
        if problem:
            raise ValueError(f"backend='flex' cannot run this call: {problem}")
        return Decision("flex", "asked for")
    if engine_only and layout.is_square:
        return Decision("engine", f"auto: {engine_only}")
    chosen, why = choose_backend(q, layout, needs_grad=needs_grad, dropout_p=dropout_p)
    return Decision(chosen, f"auto: {why}")


def records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
               key_padding_mask: torch.Tensor | None = None, *, backend: str = "auto",
               extra_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               score: ScoreTerm | None = None, score_bias: ScoreBias | None = None, dropout_p: float = 0.0,
               return_lse: bool = False, scale: float | None = None,
               who: str = "") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`layout` on the chosen backend: the engine's `block_sparse_attention` contract (q [B, H, n, D],
    k, v [B, H, n_kv, D], key_padding_mask [B, n_kv] bool, extra_kv, dropout_p).

    score: an additive `ScoreTerm` (either backend); score_bias: the engine's per-chunk form, given
    when its inputs train (engine only; with both, flex runs `score` and the engine `score_bias`).
    who: the caller's name for the log line."""
    extra = () if extra_kv is None else extra_kv[:2]
    needs_grad = records_grad(q, k, v, *extra, *(score_bias.inputs if score_bias is not None else ()))
    engine_only = None
    if return_lse:
        engine_only = "the call needs log-sum-exp outputs (return_lse), which flex's kernel does not return"
    elif score_bias is not None and score is None:
        engine_only = "the call's score bias exists in the engine's form only"
    elif score_bias is not None and needs_grad and any(t.requires_grad for t in score_bias.inputs):
        engine_only = "the score bias's inputs need gradients (the engine's ScoreBias backward)"
    decision = decide(q, layout, backend, needs_grad=needs_grad, dropout_p=dropout_p, engine_only=engine_only)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s n=%d %s %s grad=%s: %s", who or "layout", layout.n, q.device.type, str(q.dtype).split(".")[-1],
                  needs_grad, decision)
    if decision.backend == "flex":
        return flex_block_sparse_attention(q, k, v, layout, key_padding_mask, scale=scale, extra_kv=extra_kv,
                                           score=score, compiled=FLEX_COMPILED)
    bias = score_bias if score_bias is not None else (None if score is None else score.engine_bias(
        layout.n_kv, 0 if extra_kv is None else extra_kv[0].shape[2]))
    return block_sparse_attention(q, k, v, layout.to(q.device), key_padding_mask, scale=scale, extra_kv=extra_kv,
                                  score_bias=bias, dropout_p=dropout_p, return_lse=return_lse)
