"""Peer layers from other libraries, shaped like ours: x [B, N, C] -> [B, N, C].

Each peer is the library's self-attention (its Q/K/V projections and kernel) plus an `nn.Linear`
output projection, so it does the same work as one of our `Attention` layers. Built from small
random configs in process: nothing is downloaded.

- `hf-longformer`: transformers' `LongformerSelfAttention` (two-sided `window`, global tokens at
  positions 0..g-1 with their separate global projections). The input is padded to a multiple of
  the window, as `LongformerModel` does, and the padding masked.
- `hf-bigbird`: transformers' BigBird block-sparse self attention (`BigBirdAttention` with
  attention_type="block_sparse"; its residual + LayerNorm output block is left out). Padded to a
  multiple of the block size like `BigBirdModel`; at n <= (5 + 2r)·block it switches to full
  attention, as `BigBirdModel` does, and the point says so. In eval mode HF's random blocks all
  point at block 0 (same cost, no randomness).
- `lucid-performer`, `lucid-linformer`, `lucid-reformer`, `lucid-nystrom`, `lucid-isab`: lucidrains'
  `performer-pytorch` (`SelfAttention`), `linformer` (`LinformerSelfAttention`, seq_len = N),
  `reformer-pytorch` (`LSHSelfAttention`; N padded to a multiple of 2·bucket_size and the padding
  masked, as it requires), `nystrom-attention` (`NystromAttention`) and `isab-pytorch` (`ISAB` with
  `num_latents` = our num_inducing; its output, not the latents it also returns). Each already holds
  its projections and output projection, so it is used as it is.
- `lucid-routing`, `lucid-sinkhorn`, `lucid-axial`: lucidrains' `routing-transformer`
  (`SelfAttention`), `sinkhorn-transformer` (`SinkhornSelfAttention`) and `axial-attention`
  (`AxialAttention`) with our mechanisms' settings (see their classes below).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def build_peer(name: str, dim: int, heads: int, n: int, options: dict[str, Any], global_tokens: int = 0):
    """-> (module with forward(x), note or None). `options` holds every knob the peer takes
    (`longrange.bench.specs.point_options`: our mechanism's settings)."""
    if name == "hf-longformer":
        layer = HFLongformerLayer(dim, heads, window=options["window"], global_tokens=global_tokens)
        note = f"{global_tokens} global" if global_tokens else None
        return layer, note
    if name == "hf-bigbird":
        layer = HFBigBirdLayer(
            dim, heads, n, block_size=options["block_size"],
            num_random_blocks=options["num_random_blocks"], seed=options["seed"],
        )
        note = f"HF fell back to full (n <= {layer.full_limit})" if layer.dense_fallback else None
        return layer, note
    if name in LUCID_BUILDERS:
        return LUCID_BUILDERS[name](dim, heads, n, options), None
    raise ValueError(f"unknown peer {name!r}")


def _lucid_performer(dim, heads, n, options):
    from performer_pytorch import SelfAttention

    return SelfAttention(dim=dim, heads=heads, dim_head=dim // heads, nb_features=options["nb_features"],
                         causal=options["causal"])


def _lucid_linformer(dim, heads, n, options):
    from linformer import LinformerSelfAttention

    return LinformerSelfAttention(dim=dim, seq_len=options["seq_len"] or n, k=options["k"], heads=heads)


def _lucid_reformer(dim, heads, n, options):
    return LucidReformerLayer(dim, heads, bucket_size=options["bucket_size"],
                              n_hashes=options["n_hashes"], causal=options["causal"])


def _lucid_nystrom(dim, heads, n, options):
    from nystrom_attention import NystromAttention

    conv = options["conv_kernel"]
    return NystromAttention(dim=dim, dim_head=dim // heads, heads=heads,
                            num_landmarks=options["num_landmarks"],
                            pinv_iterations=options["pinv_iterations"],
                            residual=conv is not None, residual_conv_kernel=conv or 33)


def _lucid_routing(dim, heads, n, options):
    return LucidRoutingLayer(dim, heads, n, options)


def _lucid_sinkhorn(dim, heads, n, options):
    return LucidSinkhornLayer(dim, heads, n, options)


def _lucid_axial(dim, heads, n, options):
    return LucidAxialLayer(dim, heads, n, options)


def _lucid_isab(dim, heads, n, options):
    return LucidISABLayer(dim, heads, options["num_inducing"])


LUCID_BUILDERS = {
    "lucid-performer": _lucid_performer,
    "lucid-linformer": _lucid_linformer,
    "lucid-reformer": _lucid_reformer,
    "lucid-nystrom": _lucid_nystrom,
    "lucid-routing": _lucid_routing,
    "lucid-sinkhorn": _lucid_sinkhorn,
    "lucid-axial": _lucid_axial,
    "lucid-isab": _lucid_isab,
}


def _padded_call(fn, x: torch.Tensor, multiple: int) -> torch.Tensor:
    """fn(x padded at the end to a multiple of `multiple`, its [B, N'] keep mask or None) cut back to N."""
    b, n, _ = x.shape
    pad = (-n) % multiple
    if not pad:
        return fn(x, None)
    keep = torch.ones(b, n + pad, dtype=torch.bool, device=x.device)
    keep[:, n:] = False
    return fn(F.pad(x, (0, 0, 0, pad)), keep)[:, :n]


class LucidRoutingLayer(nn.Module):
    """routing-transformer's `SelfAttention` (k-means heads + local heads; its auxiliary loss dropped)
    with our routing settings: clusters of `cluster_size` tokens, as many as ours (its
    max_seq_len = clusters · cluster_size), `heads - routed_heads` local heads whose window is our
    one-sided window (its look-around is one window each side), no relative positions (ours has none)."""

    def __init__(self, dim: int, heads: int, n: int, options: dict[str, Any]):
        super().__init__()
        from routing_transformer.routing_transformer import SelfAttention

        from longrange.mechanisms import config_class

        cfg = config_class("routing").from_dict({"dim": dim, "heads": heads, **options})
        clusters = cfg.clusters()
        size = cfg.cluster_size or n // clusters
        self.multiple = math.lcm(size, cfg.window // 2)
        self.attn = SelfAttention(dim, 1, clusters * size, heads, heads - cfg.num_routed, size,
                                  local_attn_window_size=cfg.window // 2, causal=cfg.causal,
                                  kmeans_ema_decay=cfg.ema_decay, rel_pos_emb=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _padded_call(lambda h, keep: self.attn(h, input_mask=keep)[0], x, self.multiple)


class LucidSinkhornLayer(nn.Module):
    """sinkhorn-transformer's `SinkhornSelfAttention` with Gumbel-Sinkhorn sorting
    (non_permutative=False: a soft permutation as ours, not its default differentiable top-k), our
    block size, Sinkhorn rounds and temperature; the input padded to whole blocks, as it requires."""

    def __init__(self, dim: int, heads: int, n: int, options: dict[str, Any]):
        super().__init__()
        from sinkhorn_transformer.sinkhorn_transformer import SinkhornSelfAttention

        b = options["block_size"]
        self.multiple = b
        self.attn = SinkhornSelfAttention(dim, b, -(-n // b) * b, heads=heads, causal=options["causal"],
                                          non_permutative=False, sinkhorn_iter=options["sinkhorn_iters"],
                                          temperature=options["temperature"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _padded_call(lambda h, keep: self.attn(h, input_mask=keep), x, self.multiple)


class LucidAxialLayer(nn.Module):
    """axial-attention's `AxialAttention` on x viewed as our grid (`shape`, or the most square one),
    one attention per axis applied in sequence (sum_axial_out=False, our passes' order of work; each
    axis has its own Q/K/V and output projections there)."""

    def __init__(self, dim: int, heads: int, n: int, options: dict[str, Any]):
        super().__init__()
        from axial_attention import AxialAttention

        from longrange.mechanisms.axial import resolve_shape

        self.grid = resolve_shape(options["shape"], n)
        self.attn = AxialAttention(dim, num_dimensions=len(self.grid), heads=heads, dim_index=-1,
                                   sum_axial_out=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        m = math.prod(self.grid)
        h = F.pad(x, (0, 0, 0, m - n)) if m > n else x
        return self.attn(h.reshape(b, *self.grid, c)).reshape(b, m, c)[:, :n]


class LucidISABLayer(nn.Module):
    """isab-pytorch's ISAB (latents attend to x, x attends to the latents), returning x's output only."""

    def __init__(self, dim: int, heads: int, num_inducing: int):
        super().__init__()
        from isab_pytorch import ISAB

        self.isab = ISAB(dim=dim, heads=heads, num_latents=num_inducing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.isab(x)[0]


class LucidReformerLayer(nn.Module):
    """reformer-pytorch's LSHSelfAttention, padded to a multiple of 2·bucket_size (its rule)."""

    def __init__(self, dim: int, heads: int, bucket_size: int = 64, n_hashes: int = 4, causal: bool = False):
        super().__init__()
        from reformer_pytorch import LSHSelfAttention

        self.multiple = 2 * bucket_size
        self.attn = LSHSelfAttention(dim=dim, heads=heads, bucket_size=bucket_size, n_hashes=n_hashes, causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        pad = (-n) % self.multiple
        if not pad:
            return self.attn(x)
        keep = torch.ones(b, n + pad, dtype=torch.bool, device=x.device)
        keep[:, n:] = False
        return self.attn(F.pad(x, (0, 0, 0, pad)), input_mask=keep)[:, :n]


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()


class HFLongformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, window: int = 512, global_tokens: int = 0):
        super().__init__()
        _quiet_transformers()
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        config = LongformerConfig(
            hidden_size=dim, num_attention_heads=heads, num_hidden_layers=1, attention_window=[window],
            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
        )
        self.window = window
        self.global_tokens = global_tokens
        self.attn = LongformerSelfAttention(config, layer_id=0)
        self.out = nn.Linear(dim, dim)
        self._masks: dict = {}

    def _mask(self, b: int, n: int, n_pad: int, like: torch.Tensor):
        """HF's per-layer mask [B, N_pad]: 0 = local, +max = global, min = padding (masked)."""
        key = (b, n, n_pad, like.device, like.dtype)
        if key not in self._masks:
            info = torch.finfo(like.dtype)
            m = torch.zeros(b, n_pad, dtype=like.dtype, device=like.device)
            m[:, n:] = info.min
            m[:, : self.global_tokens] = info.max
            masked, is_global = m < 0, m > 0
            self._masks[key] = (m, masked, is_global, bool(is_global.any()))
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        pad = (-n) % self.window
        h = F.pad(x, (0, 0, 0, pad)) if pad else x  # (B, N_pad, C)
        mask, masked, is_global, any_global = self._mask(b, n, n + pad, x)
        y = self.attn(h, attention_mask=mask, is_index_masked=masked, is_index_global_attn=is_global,
                      is_global_attn=any_global)[0]  # (B, N_pad, C)
        return self.out(y[:, :n])


class HFBigBirdLayer(nn.Module):
    def __init__(self, dim: int, heads: int, n: int, block_size: int = 64, num_random_blocks: int = 3, seed: int = 0):
        super().__init__()
        _quiet_transformers()
        from transformers import BigBirdConfig
        from transformers.models.big_bird.modeling_big_bird import BigBirdAttention

        config = BigBirdConfig(
            hidden_size=dim, num_attention_heads=heads, num_hidden_layers=1, attention_type="block_sparse",
            block_size=block_size, num_random_blocks=num_random_blocks,
            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
        )
        attn = BigBirdAttention(config, seed=seed)
        self.block_size = block_size
        self.full_limit = (5 + 2 * num_random_blocks) * block_size  # BigBirdModel's rule
        self.dense_fallback = n <= self.full_limit
        if self.dense_fallback:
            attn.set_attention_type("original_full")
        self.attn = attn.self  # Q/K/V projections + kernel
        self.out = nn.Linear(dim, dim)
        self._masks: dict = {}

    def _block_masks(self, b: int, n: int, n_pad: int, like: torch.Tensor):
        from transformers.models.big_bird.modeling_big_bird import BigBirdModel

        key = (b, n, n_pad, like.device, like.dtype)
        if key not in self._masks:
            keep = torch.zeros(b, n_pad, dtype=like.dtype, device=like.device)
            keep[:, :n] = 1
            blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(keep, self.block_size)
            self._masks[key] = (band, from_mask, to_mask, blocked)
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.dense_fallback:
            return self.out(self.attn(x)[0])
        pad = (-n) % self.block_size
        h = F.pad(x, (0, 0, 0, pad)) if pad else x  # (B, N_pad, C)
        band, from_mask, to_mask, blocked = self._block_masks(b, n, n + pad, x)
        y = self.attn(h, band, from_mask, to_mask, blocked, blocked)[0]  # (B, N_pad, C)
        return self.out(y[:, :n])
