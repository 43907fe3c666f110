"""`dilated`: sliding window with a dilation per head (Longformer §3.1).

A window of radius r with dilation d on a sequence is an undilated window of radius r on each of
the d interleaved subsequences (tokens with the same position mod d). So each group of heads that
shares a dilation is permuted into d subsequences (folded into the batch axis), run through the
engine's plain window layout, and permuted back: cost O(N·r) per head whatever d, where a
block layout in natural order would compute d times more.
"""

from __future__ import annotations

import dataclasses

import torch

from longrange.core.config import check_positive_int
from longrange.core.interface import CacheSpec, Capabilities
from longrange.core.masking import pad_to_multiple
from longrange.mechanisms.local import WindowAttention, WindowConfig
from longrange.patterns import Dilated, Window


@dataclasses.dataclass
class DilatedConfig(WindowConfig):
    """`window` counts dilated steps: window // 2 steps of `dilation` tokens on each side."""

    name = "dilated"
    dilation: int | tuple[int, ...] | None = None  # one int, one per head, or None: `growing_dilations(heads)`
    causal: bool = False

    def validate(self):
        super().validate()
        dils = self.dilations
        if len(dils) != self.heads:
            raise ValueError(f"dilation needs one value per head ({self.heads}), got {len(dils)}: {dils}")
        for d in dils:
            check_positive_int("dilation", d)

    @property
    def dilations(self) -> tuple[int, ...]:
        if self.dilation is None:
            return growing_dilations(self.heads)
        return (self.dilation,) * self.heads if isinstance(self.dilation, int) else tuple(self.dilation)


def growing_dilations(heads: int) -> tuple[int, ...]:
    """Longformer §3.1's idea, small dilations for some heads and larger ones for others: heads split
    1 : 2 : 2 : 1 into dilations 1, 2, 4, 8. 12 heads: (1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 8, 8)."""
    bounds = [round(heads * f) for f in (1 / 6, 3 / 6, 5 / 6)]
    return tuple(2 ** sum(h >= b for b in bounds) for h in range(heads))


class DilatedAttention(WindowAttention):
    config_class = DilatedConfig
    capabilities = Capabilities(causal=True)

    def build_pattern(self):
        return Dilated(self.config.window // 2, self.config.dilations, causal=self.config.causal)

    def cache_spec(self) -> CacheSpec:
        """A ring of the last (window // 2)·max(dilation) keys: every one is reached by a later query."""
        super().cache_spec()  # causal only
        return CacheSpec("kv", window=self.config.window // 2 * max(self.config.dilations),
                         pattern=self.current_pattern())

    def attend(self, q, k, v, keep, **extra):
        B, H, N, D = q.shape
        dils = torch.tensor(self.config.dilations)
        out = torch.empty_like(q)
        window = Window(self.config.window // 2, causal=self.config.causal)
        for d in sorted(set(self.config.dilations)):
            heads = (dils == d).nonzero().flatten().to(q.device)
            sub = [_interleave(t.index_select(1, heads), d) for t in (q, k, v)]  # [B·d, Hd, M, D]
            m = sub[0].shape[2]
            sub_keep = _interleave_keep(keep, B, N, d, q.device)  # [B·d, M] or None
            layout = self.cached_layout(window, m, q.device, tag="window")
            o = self.run_layout(*sub, layout, sub_keep)
            out = out.index_copy(1, heads, _deinterleave(o, d, N))
        return out

    def computed_pairs(self, n):
        """Each head runs an undilated window on d interleaved subsequences of ceil(n / d) tokens."""
        window = Window(self.config.window // 2, causal=self.config.causal)
        total = 0
        for d in self.config.dilations:  # one entry per head
            total += d * self.cached_layout(window, -(-n // d), "cpu", tag="window").computed_pairs()
        return total

    @classmethod
    def test_configs(cls):
        return [{"window": 4, "dilation": 2, "tile": 2}, {"window": 6, "dilation": (1, 3), "causal": True}]


def _interleave(t: torch.Tensor, d: int) -> torch.Tensor:
    """[B, H, N, D] -> [B·d, H, M, D], M = ceil(N / d); subsequence s holds tokens s, s+d, s+2d, ..."""
    t = pad_to_multiple(t, d, dim=2)
    B, H, n_pad, D = t.shape
    t = t.view(B, H, n_pad // d, d, D).permute(0, 3, 1, 2, 4)  # (B, d, H, M, D)
    return t.reshape(B * d, H, n_pad // d, D)


def _deinterleave(t: torch.Tensor, d: int, n: int) -> torch.Tensor:
    """Inverse of `_interleave`: [B·d, H, M, D] -> [B, H, N, D]."""
    Bd, H, M, D = t.shape
    t = t.view(Bd // d, d, H, M, D).permute(0, 2, 3, 1, 4)  # (B, H, M, d, D)
    return t.reshape(Bd // d, H, M * d, D)[:, :, :n]


def _interleave_keep(keep, B, N, d, device):
    if keep is None and N % d == 0:
        return None
    full = torch.ones(B, N, dtype=torch.bool, device=device) if keep is None else keep
    full = pad_to_multiple(full, d, dim=1, value=False)  # padding tokens are not real
    return full.view(B, -1, d).transpose(1, 2).reshape(B * d, -1)  # (B·d, M)
