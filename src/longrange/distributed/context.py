"""`ContextParallel`: one attention call on a sequence sharded over the ranks of a process group.

    cp = ContextParallel()                      # the default group, contiguous shards
    y_shard = cp(attn, x_shard, attention_mask=keep_shard)   # x_shard [B, n_r, C] on rank r

Each mechanism family has its own way to communicate (a *strategy*, registered here by the
module that implements it for the mechanism's class): block patterns fetch the remote key blocks
their layout visits, kernel and low-rank methods all-reduce their summaries, `full` runs a ring.
A mechanism without one is refused with `ContextParallelUnsupported`, naming why, unless the caller
asks for `fallback="gather"` (every rank gathers the whole sequence and runs the mechanism on it:
exact, but O(N) memory per rank, so never chosen silently).

Parameter gradients: each rank's backward gives its share; their sum over ranks is the gradient of
the summed loss (`reduce_gradients`, or DDP on the same group).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from longrange.core.interface import Attention
from longrange.core.masking import check_key_padding_mask
from longrange.distributed.blocks import FETCH_MODES
from longrange.distributed.comm import Comm, ShardError
from longrange.distributed.shards import Shards

#: (mechanism class, strategy) in registration order; a subclass uses its nearest registered base
_STRATEGIES: dict[type, Callable] = {}
#: mechanism class -> why it has no sharded form
_REFUSED: dict[type, str] = {}
FALLBACKS = (None, "gather")


class ContextParallelUnsupported(ShardError, ValueError):
    """This mechanism (or this call's options) has no sharded form; the message says why."""


def sharded(*classes: type):
    """Register `fn(cp, attn, x, keep, **inputs) -> y` as the strategy of these mechanism classes."""

    def register(fn):
        for cls in classes:
            _STRATEGIES[cls] = fn
        return fn

    return register


def refuse(cls: type, why: str) -> None:
    """Record why a mechanism class cannot run sharded (shown in `ContextParallelUnsupported`)."""
    _REFUSED[cls] = why


def strategy_for(attn: Attention) -> Callable | None:
    for cls in type(attn).__mro__:
        if cls in _REFUSED:
            return None
        if cls in _STRATEGIES:
            return _STRATEGIES[cls]
    return None


def unsupported_reason(attn: Attention) -> str | None:
    """Why `attn` cannot run sharded (None: it can)."""
    for cls in type(attn).__mro__:
        if cls in _REFUSED:
            return _REFUSED[cls]
        if cls in _STRATEGIES:
            return None
    return f"{attn.config.name!r} has no sharded form yet"


class ContextParallel:
    """Shard one sequence over `group` (None: the default group). fallback: None (refuse what has
    no sharded form) or "gather" (run it on the gathered sequence, O(N) memory per rank). fetch:
    how block patterns bring their remote key blocks, "once" (one all-to-all), "by_source" (one
    source rank at a time, merged by log-sum-exp: about one shard of remote keys held at a time) or
    "auto" (once, unless a rank would hold more than `FETCH_ONCE_FACTOR` times its shard)."""

    def __init__(self, group=None, *, fallback: str | None = None, fetch: str = "auto"):
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if fetch not in FETCH_MODES:
            raise ValueError(f"fetch must be one of {FETCH_MODES}, got {fetch!r}")
        self.comm = Comm(group)
        self.fallback = fallback
        self.fetch = fetch
        self.shards: Shards | None = None  # of the last call

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world(self) -> int:
        return self.comm.world

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank handed to collectives since the last `reset_counters` (forward and backward)."""
        return self.comm.bytes_sent

    def reset_counters(self) -> None:
        self.comm.reset_counters()

    # -- the call --------------------------------------------------------------------------------------
    def agree_shards(self, n_local: int, batch: int, dim: int, masked: bool = False) -> tuple[Shards, bool]:
        """The cut of the sequence, from every rank's shard length (checks batch and width agree),
        and whether any rank has a padding mask (then every rank passes one)."""
        got = self.comm.gather_ints([n_local, batch, dim, int(masked)])
        if len({(b, c) for _, b, c, _ in got}) > 1:
            raise ShardError(f"ranks hold shards of different batch or width: [(n, B, C, mask) per rank] = {got}")
        offsets = [0]
        for n, _, _, _ in got:
            offsets.append(offsets[-1] + n)
        return Shards(tuple(offsets), self.rank), any(m for *_, m in got)

    def __call__(self, attn: Attention, x: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs):
        """x [B, n_r, C]: this rank's tokens (rank order = sequence order); attention_mask [B, n_r]
        bool (True = real); other inputs the mechanism takes, sharded the same way ([B, n_r, ...])
        or whole (ints). Returns this rank's [B, n_r, C], equal to the same rows of attn on the
        whole sequence."""
        if not isinstance(attn, Attention):
            raise TypeError(f"attn must be a longrange Attention, got {type(attn).__name__}")
        with self.comm.guard():
            keep = attn.check_input(x, attention_mask)
            strategy = strategy_for(attn)
            if strategy is None and self.fallback != "gather":
                raise ContextParallelUnsupported(f"{unsupported_reason(attn)}; pass fallback='gather' to run it on the "
                                                 "gathered sequence (O(N) memory per rank)")
        self.shards, masked = self.agree_shards(x.shape[1], x.shape[0], x.shape[2], keep is not None)
        if masked and keep is None:  # another rank has padding: every rank passes a mask alike
            keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if strategy is None:
            return gather_fallback(self, attn, x, keep, **inputs)
        return strategy(self, attn, x, keep, **inputs)

    # -- helpers for users and strategies ----------------------------------------------------------------
    def gather_tokens(self, t: torch.Tensor, dim: int = 1, kind: str = "gather") -> torch.Tensor:
        """Every rank's shard of t along `dim`, concatenated in rank order (differentiable)."""
        moved = t.movedim(dim, 0)
        return self.comm.all_gather(moved, kind).movedim(0, dim)

    def reduce_gradients(self, module: torch.nn.Module) -> None:
        """Sum every parameter's .grad over the ranks: the gradient of the loss summed over ranks. A
        parameter without a gradient on this rank (unused by its tokens) counts as zeros, so every
        rank makes the same collectives."""
        for p in module.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.comm.group)


def sharded_inputs(cp: ContextParallel, inputs: dict, n_local: int) -> dict:
    """Inputs laid out per token ([B, n_r, ...] tensors) gathered whole; others as they are."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == n_local:
            out[name] = cp.gather_tokens(value, 1, "gather:inputs")
        else:
            out[name] = value
    return out


def gather_fallback(cp: ContextParallel, attn: Attention, x, keep, **inputs):
    """The whole sequence on every rank, this rank's rows of the result: exact, O(N) per rank."""
    s = cp.shards
    x_all = cp.gather_tokens(x, 1, "gather:x")
    keep_all = None if keep is None else cp.gather_tokens(keep, 1, "gather:mask")  # every rank has one, or none
    keep_all = check_key_padding_mask(keep_all, x_all.shape[0], x_all.shape[1], "attention_mask")
    y = attn(x_all, keep_all, **sharded_inputs(cp, inputs, x.shape[1]))
    return y[:, s.lo : s.hi]
