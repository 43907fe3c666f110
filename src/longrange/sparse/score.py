"""Additive score terms: one description, run by the engine and by FlexAttention alike.

A `ScoreTerm` is an elementwise function fn(b, h, q, kv) -> float tensor of broadcastable long
index tensors (FlexAttention's `score_mod` indices, without the score): the term added to the
scaled scores before the softmax. Masked pairs stay masked whatever the term.

- FlexAttention calls it through `score_mod(score, b, h, q_idx, kv_idx) = score + fn(...)`
  (`ScoreTerm.score_mod`), once per computed pair inside its kernel.
- The engine evaluates it on each chunk's index grid (`ScoreTerm.engine_bias`, a
  `sparse.bias.ScoreBias`, the engine's per-chunk form of a term): O(chunk) memory, never an N×N
  tensor. Tensors a term's fn closes over get no gradient on either backend (the engine says so
  under autograd); a term that must train its tensors is a `ScoreBias` declaring them as `inputs`
  (ETC's `RelativeBias`), engine only.
- Tests evaluate it on the whole grid (`ScoreTerm.dense`).

Positions are absolute: q is the query's position (q_offset + its index in a rectangular layout),
kv the key's position; extra keys (`extra_kv`, e.g. per-example global tokens) come after the
n_kv keys, at positions n_kv + e. fn is also called on tile padding (positions up to the next
tile multiple, padding queries included): it must not index out of range there (clamp lookups);
what it returns there is masked or dropped.

Built in: `alibi` (Press et al., a slope per head times the distance), `relative_position`
(Shaw et al. as ETC: q·a_label gathered by clipped relative distance, a CROSS label for extra keys)
and `distance_table` (a per-query score per distance, Transformer-XL's position term).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from longrange.sparse.bias import FunctionBias

#: fn(b, h, q, kv) -> float tensor, broadcasting like its index arguments
TermFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ScoreTerm:
    """An additive score term fn(b, h, q, kv), see the module docstring.

    batch, heads: how many batch / head indices fn distinguishes (1 = it ignores that index; the
    engine then evaluates it once and broadcasts). fn must give the same value for every b (h)
    when batch (heads) is 1.
    """

    fn: TermFn
    batch: int = 1
    heads: int = 1
    name: str = "score term"

    # -- FlexAttention ---------------------------------------------------------------------------
    def score_mod(self, q_offset: int = 0, n_kv: int | None = None, extra_start: int | None = None):
        """FlexAttention's score_mod. Flex's key index kv_idx >= `extra_start` is extra key
        kv_idx - extra_start, at position n_kv + (kv_idx - extra_start) for fn."""
        fn = self.fn

        if extra_start is None:
            if q_offset == 0:
                return lambda score, b, h, q_idx, kv_idx: score + fn(b, h, q_idx, kv_idx)
            return lambda score, b, h, q_idx, kv_idx: score + fn(b, h, q_idx + q_offset, kv_idx)

        shift = n_kv - extra_start

        def score_mod(score, b, h, q_idx, kv_idx):
            kv = torch.where(kv_idx >= extra_start, kv_idx + shift, kv_idx)
            return score + fn(b, h, q_idx + q_offset, kv)

        return score_mod

    # -- the engine --------------------------------------------------------------------------------
    def engine_bias(self, n_kv: int, num_extra: int = 0, q_offset: int = 0) -> FunctionBias:
        """The engine's `score_bias(q_tok [R, r], kv_tok [Hp, R, c])` -> [B or 1, R, H or Hp or 1,
        r, c + g]: fn on the chunk's positions (queries at q_offset + q_tok), the g extra keys at
        n_kv .. n_kv + g - 1."""
        fn, batch, heads = self.fn, self.batch, self.heads

        def score_bias(q_tok: torch.Tensor, kv_tok: torch.Tensor) -> torch.Tensor:
            rows, r = q_tok.shape
            hp, _, c = kv_tok.shape
            device = q_tok.device
            kv = kv_tok.permute(1, 0, 2)  # (R, Hp, c)
            if num_extra:
                extra = torch.arange(n_kv, n_kv + num_extra, device=device).expand(rows, hp, num_extra)
                kv = torch.cat([kv, extra], dim=2)  # (R, Hp, c + g)
            b = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1)
            h = torch.arange(heads, device=device).view(1, 1, heads, 1, 1)
            return fn(b, h, q_tok.view(1, rows, 1, r, 1) + q_offset, kv.view(1, rows, hp, 1, c + num_extra))

        return FunctionBias(score_bias)

    # -- the oracle's view -----------------------------------------------------------------------
    def dense(self, n: int, n_kv: int | None = None, q_offset: int = 0, num_extra: int = 0, device=None):
        """[B or 1, H or 1, n, n_kv + g] float: the whole term (quadratic; tests only)."""
        n_kv = n if n_kv is None else n_kv
        q = torch.arange(q_offset, q_offset + n, device=device).view(1, 1, n, 1)
        kv = torch.arange(n_kv + num_extra, device=device).view(1, 1, 1, -1)
        b = torch.arange(self.batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(self.heads, device=device).view(1, -1, 1, 1)
        out = self.fn(b, h, q, kv)
        return out.expand(out.shape[0], out.shape[1], n, n_kv + num_extra)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al., 2022): the geometric sequence 2^(-8i/H), i = 1..H, for a
    power-of-two H; otherwise the closest power of two's slopes followed by every other slope of
    the next one (as in the paper's code). [H] float32."""
    def power_of_two(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if heads & (heads - 1) == 0:
        slopes = power_of_two(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi(slopes: torch.Tensor) -> ScoreTerm:
    """ALiBi: -slope[h]·|q - kv| (slopes [H], e.g. `alibi_slopes(H)`, in the scores' dtype).
    On causal patterns this is the paper's -slope·(q - kv)."""
    if not isinstance(slopes, torch.Tensor) or slopes.dim() != 1:
        raise ValueError(f"slopes must be a 1-d tensor [H], got {getattr(slopes, 'shape', type(slopes))}")

    def fn(b, h, q, kv):
        return -slopes[h] * (q - kv).abs()

    return ScoreTerm(fn, heads=len(slopes), name="alibi")


def relative_position(qa: torch.Tensor, max_distance: int, n_kv: int | None = None,
                      q_offset: int = 0) -> ScoreTerm:
    """Shaw et al.'s relative positions as ETC uses them: fn = qa[b, h, q, label] with
    label = clip(kv - q, -k, k) + k for keys, and the CROSS label 2k + 1 for extra keys.

    qa [B, H, n, 2k + 2]: each query's scores against the label vectors (q·a_label, scaled),
    one row per query (query q_offset + i is row i); n_kv: the keys' count (default n)."""
    if qa.dim() != 4 or qa.shape[3] != 2 * max_distance + 2:
        raise ValueError(f"qa must be [B, H, n, 2k + 2] with k = max_distance = {max_distance}, "
                         f"got {list(qa.shape)}")
    batch, heads, n, _ = qa.shape
    n_kv = n if n_kv is None else n_kv
    k, cross = max_distance, 2 * max_distance + 1

    def fn(b, h, q, kv):
        label = torch.where(kv >= n_kv, cross, (kv - q).clamp(-k, k) + k)
        return qa[b, h, (q - q_offset).clamp(0, n - 1), label]

    return ScoreTerm(fn, batch=batch, heads=heads, name="relative position")


def distance_table(table: torch.Tensor, d_max: int, q_offset: int = 0, scale: float = 1.0) -> ScoreTerm:
    """A per-query score for each distance q - kv: fn = scale · table[b, h, q - q_offset, d_max - (q - kv)]
    (columns clamped to the table), as Transformer-XL's position term (q_i + v)·W_r r_{q - kv}.

    table [B, H, n, R]: row i for the query at position q_offset + i, column c for distance d_max - c."""
    if table.dim() != 4:
        raise ValueError(f"table must be [B, H, n, R], got {list(table.shape)}")
    batch, heads, n, r = table.shape

    def fn(b, h, q, kv):
        col = (d_max - (q - kv)).clamp(0, r - 1)
        return table[b, h, (q - q_offset).clamp(0, n - 1), col] * scale

    return ScoreTerm(fn, batch=batch, heads=heads, name="distance table")
