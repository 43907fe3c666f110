"""One attention over the union of disjoint key sets ("factors"), each its own block layout in its
own coordinates, merged exactly, as one autograd function (Sparse Transformer's strided pattern:
a window in natural order and the stride-th tokens as interleaved subsequences).

Legend: B batch, H heads, N natural length, D head dim; a factor f runs on q_f, k_f, v_f
[B_f, H, n_f, D] (another batch / row arrangement of the same tokens) and maps rows both ways.

forward   each factor on the engine's recomputing path, keeping its output o_f and row log-sum-exp
          lse_f; in natural coordinates out = Σ_f exp(lse_f - lse) o_f with lse = log Σ_f exp(lse_f).
saved     every factor's q, k, v, the merged out [B, H, N, D] and lse [B, H, N] (not the factors'
          outputs).
backward  ring attention's rule: the union's probabilities restricted to factor f are
          exp(s - lse) on f's keys, and rowsum(dO ∘ O) is the merged output's, so each factor's
          backward is the engine's own (fused CPU kernel, no log-sum-exp gradient) given dO, the
          merged out and the merged lse mapped into its coordinates. Through `merge_softmax` the
          factors' lse gradients would send every tile to the two-matmul kernel, and autograd
          would keep both factors' outputs for the merge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from longrange.sparse.engine import factor_plan
from longrange.sparse.layout import BlockLayout
from longrange.sparse.recompute import attention_backward, attention_forward, public_lse

#: natural [B, H, N, X] -> the factor's [B_f, H, n_f, X], and back (X: D, or 1 for row statistics)
RowMap = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Factor:
    """One key set: q, k, v [B_f, H, n_f, D] in the factor's coordinates, its layout, its key
    padding mask [B_f, n_kv] (True = real) or None, and the row maps (`to_factor`, `from_factor`;
    identity when the factor is in natural order)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: BlockLayout
    key_padding_mask: torch.Tensor | None = None
    to_factor: RowMap | None = None
    from_factor: RowMap | None = None


def factored_attention(factors: list[Factor], *, scale: float | None = None, dropout_p: float = 0.0,
                       dropout_seed: int | None = None, chunk_bytes: int | None = None) -> torch.Tensor:
    """softmax over the union of the factors' keys -> [B, H, N, D] in natural order (a view of a
    token-major buffer). Attention dropout: each factor's pairs by the engine's hash, in the
    factor's coordinates. Rows with no key in any factor give zeros."""
    prepared, maps, tensors = [], [], []
    for f in factors:
        q, k, v, plan = factor_plan(f.q, f.k, f.v, f.layout, f.key_padding_mask, scale=scale, dropout_p=dropout_p,
                                    dropout_seed=dropout_seed, chunk_bytes=chunk_bytes)
        prepared.append(plan)
        maps.append((f.to_factor or _same, f.from_factor or _same, f.q.shape[2]))
        tensors += [q, k, v]
    return FactoredFunction.apply(prepared, maps, *tensors)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class FactoredFunction(torch.autograd.Function):
    """apply(plans, maps, q_1, k_1, v_1, q_2, ...) -> out [B, H, N, D]; see the module docstring."""

    @staticmethod
    def forward(ctx, plans, maps, *tensors):
        outs, lses = [], []
        for i, plan in enumerate(plans):
            q, k, v = tensors[3 * i : 3 * i + 3]
            o, lse, empty = attention_forward(plan, q, k, v)
            _, back, n = maps[i]
            outs.append(back(o[:, :, :n]))  # (B, H, N, D)
            lses.append(back(public_lse(lse, empty)[:, :, :n].unsqueeze(-1)).squeeze(-1))  # (B, H, N)
        lse = torch.stack(lses)  # (F, B, H, N), -inf where a factor has no key
        top = lse.amax(0)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with no key anywhere: 0
        weights = torch.exp(lse - top)
        total = weights.sum(0)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
        B, H, N, D = outs[0].shape
        out = torch.empty(B, N, H, D, dtype=outs[0].dtype, device=outs[0].device).transpose(1, 2)  # token-major
        torch.mul(outs[0], weights[0].unsqueeze(-1).to(out.dtype), out=out)
        for w, o in zip(weights[1:], outs[1:], strict=True):
            out.addcmul_(o, w.unsqueeze(-1).to(out.dtype))
        merged_lse = torch.where(total > 0, top + torch.log(torch.where(total > 0, total, torch.ones_like(total))),
                                 torch.zeros_like(top))  # 0 for rows with no key: exp(-inf - 0) = 0 in backward
        ctx.plans, ctx.maps = plans, maps
        ctx.save_for_backward(*tensors, out, merged_lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        *tensors, out, lse = ctx.saved_tensors
        grads = []
        for i, plan in enumerate(ctx.plans):
            q, k, v = tensors[3 * i : 3 * i + 3]
            to, _, n = ctx.maps[i]
            n_pad = q.shape[2]
            do_f, o_f = (_rows(to(t), n_pad) for t in (dout, out))
            lse_f = _rows(to(lse.unsqueeze(-1)), n_pad).squeeze(-1)
            dq, dk, dv, _ = attention_backward(plan, do_f, q, k, v, o_f, lse_f, (), ())
            grads += [dq, dk, dv]
        return (None, None, *grads)


def _rows(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[B_f, H, n, X] -> [B_f, H, n_pad, X], zero rows for the tile padding (their outputs are dropped)."""
    n = t.shape[2]
    return t if n == n_pad else torch.nn.functional.pad(t, (0, 0, 0, n_pad - n))
