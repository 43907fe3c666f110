"""`sparse_transformer`: Child et al.'s factorized patterns, strided and fixed, as the merged-head
union A(1) ∪ A(2) (every head sees both factors), causal by default, on the sparse engine.

strided (stride l): A(1) the previous l tokens, A(2) every l-th token before. O(n·(l + n/l)).
In natural order A(2)'s columns touch almost every key block, so it runs factor by factor, as the
paper's kernel does on a transposed layout: A(1) is a causal window of radius l - 1 in natural
order; A(2) without its one overlap with A(1) (the query itself) is strictly-causal attention
inside each of the l interleaved subsequences i ≡ s (mod l) (folded into the batch axis, as
`dilated` does); the two softmaxes merge exactly through their log-sum-exps
(`sparse.engine.merge_softmax`). Its cost follows the keys each query sees.
fixed (stride l, c): A(1) the own l-chunk, A(2) the last c tokens of every chunk (summary columns).
O(n·(l + n·c/l)), on the natural-order layout, on tiles that the summary columns fill (see
`default_tile`): 64-token tiles would compute each 32-token summary twice over (measured 1.4x
slower at 16K, one thread).
"""

from __future__ import annotations

import dataclasses

import torch

from longrange.core.config import AttentionConfig, check_positive_int
from longrange.core.interface import CacheSpec, Capabilities
from longrange.mechanisms.base import PatternAttention
from longrange.mechanisms.dilated import _deinterleave, _interleave, _interleave_keep
from longrange.patterns import Band, Window, fixed, strided
from longrange.patterns.band import INF
from longrange.sparse.backends import check_backend, decide, records_grad
from longrange.sparse.engine import merge_softmax
from longrange.sparse.factored import Factor, factored_attention
from longrange.sparse.layout import BlockLayout, compile_layout

MODES = ("strided", "fixed")
#: strided's subsequences (n / stride tokens) up to this length run as one dense tile each; measured at
#: 16K tokens (stride 128: 128-token subsequences) the far factor took 80 ms this way against 165 ms on
#: 64-token tiles (gathers and padding copies of the interleaved q, k, v)
FAR_SINGLE_TILE = 1024


@dataclasses.dataclass
class SparseTransformerConfig(AttentionConfig):
    name = "sparse_transformer"
    mode: str = "fixed"
    stride: int = 128
    c: int = 32  # fixed mode: summary tokens per chunk (LRA: 128, c=32)
    causal: bool = True
    tile: int | None = None  # the engine's tile; None: `default_tile`
    backend: str = "auto"  # "auto" | "engine" | "flex": what runs the layout (longrange.sparse.backends)
    renamed = {"block_size": "tile"}

    def validate(self):
        super().validate()
        check_backend(self.backend)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_positive_int("stride", self.stride)
        check_positive_int("c", self.c)
        if self.tile is not None:
            check_positive_int("tile", self.tile)
        if self.mode == "fixed" and self.c > self.stride:
            raise ValueError(f"c={self.c} must be at most stride={self.stride}")


class SparseTransformerAttention(PatternAttention):
    config_class = SparseTransformerConfig
    capabilities = Capabilities(causal=True)

    def default_tile(self) -> int:
        """64; in fixed mode the largest power of two <= 64 dividing c and the stride (the summary
        columns then fill whole tiles), at least 16 (smaller tiles cost more than they save)."""
        c = self.config
        tile = 64
        if c.mode == "fixed":
            while tile > 16 and (c.c % tile or c.stride % tile):
                tile //= 2
        return tile

    def build_pattern(self):
        c = self.config
        if c.mode == "strided":
            return strided(c.stride, causal=c.causal)
        return fixed(c.stride, c.c, causal=c.causal)

    # -- strided, factor by factor --------------------------------------------------------------------
    def near_pattern(self):
        """A(1): the previous stride - 1 tokens and the query itself (both sides without causal)."""
        return Window(self.config.stride - 1, causal=self.config.causal)

    def far_pattern(self):
        """A(2) inside a subsequence of every stride-th token, without the query itself (it is in A(1))."""
        before = Band(1, INF)
        return before if self.config.causal else before | Band(-INF, -1)

    def far_layout(self, m: int, device) -> BlockLayout:
        """The subsequences' layout at length m: one tile of m tokens while m <= `FAR_SINGLE_TILE`
        (every key of a subsequence is in A(2) but the query's own: dense, so the engine reads the
        interleaved q, k, v in place, with no gather), else the mechanism's tile."""
        key = ("far", m, str(device))
        if key not in self._layouts:
            tile = m if m <= FAR_SINGLE_TILE else min(self.tile, m)
            self._layouts[key] = compile_layout(self.far_pattern(), m, tile).to(device)
        return self._layouts[key]

    def attend(self, q, k, v, keep, **extra):
        if self.config.mode != "strided" or self._whole_on_flex(q, k, v):
            return super().attend(q, k, v, keep, **extra)
        B, H, N, D = q.shape
        stride = self.config.stride
        near_layout = self.cached_layout(self.near_pattern(), N, q.device, tag="near")
        if N % stride == 0 and records_grad(q, k, v):  # training: one function, the factors' backward fused
            return self._factored(q, k, v, keep, near_layout)
        near = self.run_layout(q, k, v, near_layout, keep, return_lse=True)
        sub = [_interleave(t, stride) for t in (q, k, v)]  # [B·l, H, M, D]: subsequence s holds s, s + l, ...
        sub_keep = _interleave_keep(keep, B, N, stride, q.device)
        far_out, far_lse = self.run_layout(*sub, self.far_layout(sub[0].shape[2], q.device), sub_keep,
                                           return_lse=True)
        if N % stride:  # the subsequences were padded: back to natural order with a copy
            far = (_deinterleave(far_out, stride, N), _deinterleave(far_lse.unsqueeze(-1), stride, N).squeeze(-1))
            return merge_softmax(near, far, inplace=True)
        # token i = m·l + s is row m of subsequence s: both factors as [B, H, M, l] rows, far's a
        # permuted view (read in place); inference merges into near's buffer (its head merge is a view)
        M = N // stride
        near5 = (near[0].view(B, H, M, stride, D), near[1].view(B, H, M, stride))
        far5 = (far_out.view(B, stride, H, M, D).permute(0, 2, 3, 1, 4),
                far_lse.view(B, stride, H, M).permute(0, 2, 3, 1))
        return merge_softmax(near5, far5, inplace=True).reshape(B, H, N, D)

    def _factored(self, q, k, v, keep, near_layout) -> torch.Tensor:
        """Both factors as one autograd function (`sparse.factored`): the merged output and
        log-sum-exp are all it keeps, and each factor's backward runs on the fused kernel."""
        B, H, N, D = q.shape
        stride = self.config.stride
        M = N // stride

        def to_far(t):  # natural [B, H, N, X] -> subsequences [B·l, H, M, X]
            return t.unflatten(2, (M, stride)).permute(0, 3, 1, 2, 4).reshape(B * stride, H, M, t.shape[-1])

        def from_far(t):  # [B·l, H, M, X] -> natural [B, H, N, X]
            return t.unflatten(0, (B, stride)).permute(0, 2, 3, 1, 4).reshape(B, H, N, t.shape[-1])

        far = Factor(*(_interleave(t, stride) for t in (q, k, v)), self.far_layout(M, q.device),
                     _interleave_keep(keep, B, N, stride, q.device), to_far, from_far)
        return factored_attention([Factor(q, k, v, near_layout, keep), far], dropout_p=self.attention_dropout())

    def _whole_on_flex(self, q, k, v) -> bool:
        """Strided on flex runs its whole layout in one call (flex's BlockMask skips the empty
        blocks itself); the engine runs it factor by factor, merged by log-sum-exp."""
        if self.backend == "engine":
            return False
        # the near layout: same length and device, and the engine compiles it anyway
        near = self.cached_layout(self.near_pattern(), q.shape[2], q.device, tag="near")
        decision = decide(q, near, self.backend, needs_grad=records_grad(q, k, v), dropout_p=self.attention_dropout())
        return decision.backend == "flex"

    def computed_pairs(self, n: int) -> int:
        if self.config.mode != "strided":
            return super().computed_pairs(n)
        stride = self.config.stride
        near = self.cached_layout(self.near_pattern(), n, "cpu", tag="near").computed_pairs()
        far = stride * self.far_layout(-(-n // stride), "cpu").computed_pairs()
        return (near + far) * self.config.heads

    def cache_spec(self) -> CacheSpec:
        """fixed: a ring of the last stride - 1 keys (the own chunk) and every chunk's last c keys kept
        forever (the summary columns: n·c / stride slots after n tokens). strided: every key (its
        columns reach back to the first token)."""
        super().cache_spec()  # causal only
        c = self.config
        if c.mode == "strided":
            return CacheSpec("kv", pattern=self.current_pattern())
        stride, summary = c.stride, c.c
        return CacheSpec("kv", window=stride - 1, keep=lambda pos: pos % stride >= stride - summary,
                         pattern=self.current_pattern())

    @classmethod
    def test_configs(cls):
        return [
            {"mode": "strided", "stride": 3, "tile": 2},
            {"mode": "fixed", "stride": 4, "c": 1, "tile": 3},
            {"mode": "fixed", "stride": 4, "c": 2, "causal": False, "tile": 2},
            {"mode": "strided", "stride": 4, "causal": False, "tile": 4},
        ]
