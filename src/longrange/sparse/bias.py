"""Additive score terms for the sparse engine (relative positions, ALiBi, ...): what a bias is given,
what it returns, and how its gradient reaches the tensors it reads.

The engine adds a bias to the scaled scores of each chunk of queries, before the softmax. A bias
that depends on tensors needing gradients (ETC's q·a_label) declares them in `inputs`, each with
the query position on axis 1 ([B, M, ...]); the engine slices them to the rows it is scoring and
hands the slices to the bias. That makes the bias's gradient local to the chunk: the engine's
recomputing backward calls `ScoreBias.backward(dscores, ...)` per chunk, which by default re-runs
the bias on detached slices under autograd and returns the slices' gradients (O(chunk), never a
full-size tensor per chunk), and accumulates them into the inputs' gradients. A subclass may
override `add_to` (and `backward`) with a cheaper structured version.

A plain function f(q_tok, kv_tok) is also accepted; it is taken to read no tensor that needs a
gradient, and the engine checks that (an error, never a silently dropped gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class ScoreBias:
    """An additive term for the engine's scores: subclasses set `inputs` and implement `__call__`.

    __call__(q_tok [R, r] long, kv_tok [Hp, R, c] long, *rows) -> float tensor broadcastable to
    [B, R, H, r, c (+ g)]: R groups of r query rows; the c block keys' columns of each group, then
    the g extra keys'. Positions >= N are padding (masked or dropped anyway). rows: each of
    `inputs` at the scored queries, [B, R, r, ...] (rows past an input's length read as zeros).
    Chunks of query blocks are R = nc groups of r = tile rows; dense (global) rows are one group
    (R = 1) against every key (c = padded N).
    """

    #: tensors [B, M, ...] the bias reads, indexed by query position on axis 1 (may need gradients)
    inputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, q_tok: torch.Tensor, kv_tok: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_to(self, scores: torch.Tensor, q_tok: torch.Tensor, kv_tok: torch.Tensor, *rows: torch.Tensor) -> None:
        """scores [B, R, H, r, c + g] += the bias, in place. An override may add the bias plus any
        constant per query row (the softmax ignores it), the same constant wherever that row is scored."""
        scores += self(q_tok, kv_tok, *rows).to(scores.dtype)

    def masked_into(self, out: torch.Tensor, mask: torch.Tensor | None, q_tok: torch.Tensor, kv_tok: torch.Tensor,
                    *rows: torch.Tensor) -> None:
        """out [B, R, H, r, c + g] <- the bias (as `add_to` adds it) where mask (bool, broadcastable
        to out, or None = everywhere), -inf elsewhere: the additive mask of a fused kernel."""
        out.zero_()
        self.add_to(out, q_tok, kv_tok, *rows)
        if mask is not None:
            out.masked_fill_(~mask, float("-inf"))

    def backward(self, dscores: torch.Tensor, q_tok: torch.Tensor, kv_tok: torch.Tensor,
                 *rows: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients of `rows` given dscores = ∂loss/∂bias [B, R, H, r, c + g] (None: no gradient).
        The default re-runs the bias on detached rows under autograd."""
        detached = [t.detach().requires_grad_() for t in rows]
        with torch.enable_grad():
            bias = self(q_tok, kv_tok, *detached)
            bias = bias.reshape((1,) * (dscores.dim() - bias.dim()) + tuple(bias.shape)).expand(dscores.shape)
            return torch.autograd.grad(bias, detached, dscores.to(bias.dtype), allow_unused=True)


class FunctionBias(ScoreBias):
    """A plain function f(q_tok, kv_tok) -> bias, reading no tensor that needs a gradient."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(self, q_tok, kv_tok, *rows):
        return self.fn(q_tok, kv_tok)


def as_score_bias(bias) -> ScoreBias | None:
    if bias is None or isinstance(bias, ScoreBias):
        return bias
    if callable(bias):
        return FunctionBias(bias)
    raise TypeError(f"score_bias must be a ScoreBias or a function (q_tok, kv_tok) -> tensor, "
                    f"got {type(bias).__name__}")


def check_inputs(bias: ScoreBias, batch: int) -> tuple[torch.Tensor, ...]:
    inputs = tuple(bias.inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != batch:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"score_bias.inputs[{i}] must be a tensor [B, M, ...] with B = {batch} (query "
                             f"position on axis 1), got {shape}")
    return inputs


def rows_of(inputs: Sequence[torch.Tensor], start: int, stop: int, groups: int) -> list[torch.Tensor]:
    """Each input's query rows [start, stop) as [B, groups, (stop - start) / groups, ...]; rows past an
    input's length are zeros (padding queries, whose outputs are dropped)."""
    out = []
    for t in inputs:
        part = t[:, start:min(stop, t.shape[1])]
        if part.shape[1] < stop - start:
            pad = part.new_zeros((part.shape[0], stop - start - part.shape[1], *part.shape[2:]))
            part = torch.cat([part, pad], dim=1)
        out.append(part.unflatten(1, (groups, -1)))
    return out


def rows_at(inputs: Sequence[torch.Tensor], tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each input at query positions `tokens` [r] as [B, 1, r, ...] (positions past its length read
    the last row; they are padding queries, whose outputs and gradients are dropped)."""
    return [t.index_select(1, tokens.clamp(max=t.shape[1] - 1)).unsqueeze(1) for t in inputs]


def add_rows_(grads: Sequence[torch.Tensor | None], got: Sequence[torch.Tensor | None], start: int) -> None:
    """grads[i][:, start:start + m] += got[i] (flattened [B, R·r, ...], cut to the input's length)."""
    for acc, g in zip(grads, got, strict=True):
        if acc is None or g is None:
            continue
        g = g.flatten(1, 2)
        m = min(g.shape[1], acc.shape[1] - start)
        if m > 0:
            acc[:, start:start + m] += g[:, :m].to(acc.dtype)


def add_rows_at_(grads: Sequence[torch.Tensor | None], got: Sequence[torch.Tensor | None],
                 tokens: torch.Tensor) -> None:
    """grads[i][:, tokens] += got[i] [B, 1, r, ...] (tokens past the input's length dropped)."""
    for acc, g in zip(grads, got, strict=True):
        if acc is None or g is None:
            continue
        g = g.flatten(1, 2)
        real = tokens < acc.shape[1]
        acc.index_add_(1, tokens[real], g[:, real].to(acc.dtype))
