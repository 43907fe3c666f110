"""The one blockified sparse engine (BigBird's idea): every block pattern runs through here.

Legend: B batch, H heads, N length, D head dim, b block size, nb = ceil(N / b) query blocks,
k key blocks per query block, g extra (global) keys, nc query blocks per chunk.

1. Pad N up to nb·b (padding keys masked, padding queries dropped).
2. For a chunk of query blocks, fetch its k key blocks per row with ONE index_select over the
   blocked keys/values (window, random and global blocks alike): [B·H, nc, k·b, D].
3. One fused `scaled_dot_product_attention` over the chunk, query blocks folded into the batch
   axes: [B·H, nc, b, D] x [B·H, nc, k·b, D]. A token mask is built only for chunks whose layout
   has partial or unused slots, or when keys are padded.
4. Dense rows (global query blocks) run against all N keys in a side path: O(g·b·N).
Memory O(N·k·b) for the scores the kernel tiles internally and O(chunk) for the gathered keys;
time O(N·k·b·D). Never an N×N tensor and no Python loop over single blocks (only over chunks,
whose size bounds the gathered-key memory). Gradients come from autograd through these ops.
SDPA accumulates its softmax in float32 for fp16/bf16 inputs on CPU and CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longrange.core.masking import check_key_padding_mask, check_qkv, pad_to_multiple
from longrange.patterns.base import Pattern
from longrange.sparse.layout import BlockLayout, compile_layout

#: gathered keys + values per chunk; keeps them cache-friendly and bounds forward memory
DEFAULT_CHUNK_BYTES = 16 * 2**20


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | BlockLayout,
    block_size: int = 64,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q over k, v restricted to `pattern`, computed blockwise in linear memory.

    q, k, v: [B, H, N, D]. pattern: a `Pattern` (compiled here for N and `block_size`) or a
    `BlockLayout` compiled beforehand. key_padding_mask: [B, N] bool, True = real token.
    Any N works: it is padded to a multiple of `block_size` and un-padded. Returns [B, H, N, D];
    a query with no allowed real key gets zeros.
    """
    check_qkv(q, k, v)
    n = q.shape[2]
    if isinstance(pattern, BlockLayout):
        layout = pattern
        if layout.n != n:
            raise ValueError(f"layout was compiled for length {layout.n}, but q has length {n}")
    elif isinstance(pattern, Pattern):
        layout = compile_layout(pattern, n, block_size)
    else:
        raise TypeError(f"pattern must be a longrange Pattern or BlockLayout, got {type(pattern).__name__}")
    heads = layout.num_heads
    if heads is not None and heads != q.shape[1]:
        raise ValueError(f"pattern is defined for {heads} heads, but q has {q.shape[1]} heads")
    return block_sparse_attention(q, k, v, layout.to(q.device), key_padding_mask, scale=scale)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """The engine. `extra_kv` = (k_e, v_e, keep_e): [B, H, g, D], [B, H, g, D], [B, g] bool, keys
    every query sees besides its blocks (per-example global tokens, Longformer/ETC style)."""
    B, H, N, D = q.shape
    b, nb = layout.block_size, layout.num_blocks
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, N, "key_padding_mask")
    if nb * b < N:
        raise ValueError(f"layout covers {nb * b} tokens, fewer than N={N}")
    keep = _padded_keep(key_padding_mask, B, N, nb * b, q.device)  # [B or 1, nb·b] or None
    # contiguous once here, so every chunk below is a view or one gather, never a full copy
    q, k, v = (pad_to_multiple(t, b, dim=2).contiguous() for t in (q, k, v))  # [B, H, nb·b, D]
    cols = layout.blocks_per_row * b + (extra_kv[0].shape[2] if extra_kv is not None else 0)
    per_row = B * H * cols * D * q.element_size() * 2 + B * H * b * cols * 4
    chunk = max(1, min(nb, chunk_bytes // max(per_row, 1)))
    pieces = [
        _chunk(q, k, v, layout, keep, c0, min(c0 + chunk, nb), scale, extra_kv) for c0 in range(0, nb, chunk)
    ]
    out = torch.cat(pieces, dim=1).view(B, H, nb * b, D)  # [B, H, nb·b, D]
    if len(layout.dense_rows):
        out = _dense_rows(q, k, v, layout, keep, out, scale, extra_kv)
    return out[:, :, :N]


def _padded_keep(mask, B, N, n_pad, device):
    if mask is None and n_pad == N:
        return None
    keep = torch.ones(1 if mask is None else B, n_pad, dtype=torch.bool, device=device)
    keep[:, N:] = False
    if mask is not None:
        keep[:, :N] = mask
    return keep


def _chunk(q, k, v, layout: BlockLayout, keep, c0, c1, scale, extra_kv):
    """Query blocks [c0, c1): returns [B·H, nc, b, D]."""
    B, H, n_pad, D = q.shape
    b, nb, kpr = layout.block_size, layout.num_blocks, layout.blocks_per_row
    nc = c1 - c0
    idx = layout.kv_index[:, c0:c1]  # [Hp, nc, k]
    base = (torch.arange(B * H, device=q.device) * nb).view(B, H, 1, 1)
    flat = (base + idx).reshape(-1)  # [B·H·nc·k]
    kg = k.reshape(B * H * nb, b, D).index_select(0, flat).view(B * H, nc, kpr * b, D)
    vg = v.reshape(B * H * nb, b, D).index_select(0, flat).view(B * H, nc, kpr * b, D)
    qc = q.view(B, H, nb, b, D)[:, :, c0:c1].reshape(B * H, nc, b, D)
    mask = _chunk_mask(layout, keep, c0, c1, B, H, q.device, force=extra_kv is not None)
    if extra_kv is not None:
        kg, vg, mask = _append_extra(kg, vg, mask, extra_kv, nc, b)
    return _sdpa_zero_empty_rows(qc, kg, vg, mask, scale)


def _chunk_mask(layout: BlockLayout, keep, c0, c1, B, H, device, force=False):
    """Token mask for the chunk, [B·H or 1, nc, b, k·b] bool, or None when nothing is masked."""
    b, kpr = layout.block_size, layout.blocks_per_row
    valid = layout.valid[:, c0:c1]  # [Hp, nc, k]
    partial = layout.partial[:, c0:c1]
    if keep is None and not force and bool(valid.all()) and not bool(partial.any()):
        return None
    hp, nc = valid.shape[0], c1 - c0
    offs = torch.arange(b, device=device)
    kv_tok = layout.kv_index[:, c0:c1, :, None] * b + offs  # [Hp, nc, k, b]
    m = valid[:, :, None, :, None].expand(hp, nc, b, kpr, b)  # [Hp, nc, b(q), k, b(kv)]
    if bool(partial.any()):
        q_tok = (torch.arange(c0, c1, device=device) * b)[:, None] + offs  # [nc, b]
        heads = torch.arange(hp, device=device).view(hp, 1, 1, 1, 1)
        tok = layout.mask_mod(heads, q_tok[None, :, :, None, None], kv_tok[:, :, None, :, :])
        m = m & tok
    m = m.reshape(hp, nc, b, kpr * b)
    if keep is not None:
        k_keep = keep[:, kv_tok.reshape(hp, nc, kpr * b)]  # [B or 1, Hp, nc, k·b]
        m = m[None] & k_keep[:, :, :, None, :]  # [B or 1, Hp, nc, b, k·b]
    else:
        m = m[None]
    bm, hm = m.shape[0], m.shape[1]
    if bm == 1 and hm == 1:
        return m[0]  # [1, nc, b, k·b], broadcast over B·H
    return m.expand(B, H, nc, b, kpr * b).reshape(B * H, nc, b, kpr * b)


def _append_extra(kg, vg, mask, extra_kv, nc, b):
    k_e, v_e, keep_e = extra_kv  # [B, H, g, D], [B, H, g, D], [B, g]
    B, H, g, D = k_e.shape
    kg = torch.cat([kg, k_e.reshape(B * H, 1, g, D).expand(B * H, nc, g, D)], dim=2)
    vg = torch.cat([vg, v_e.reshape(B * H, 1, g, D).expand(B * H, nc, g, D)], dim=2)
    m_e = keep_e[:, None, None, None, :].expand(B, H, nc, b, g).reshape(B * H, nc, b, g)
    mask = torch.cat([mask.expand(B * H, *mask.shape[1:]), m_e], dim=-1)
    return kg, vg, mask


def _sdpa_zero_empty_rows(q, k, v, mask, scale):
    """SDPA where a query row with no allowed key returns zeros (and passes no NaN to gradients):
    such a row gets one dummy key so the softmax stays finite, then its output is zeroed."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    has_key = mask.any(dim=-1, keepdim=True)  # [.., b, 1]
    if bool(has_key.all()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    first = torch.zeros(mask.shape[-1], dtype=torch.bool, device=mask.device)
    first[0] = True
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | (first & ~has_key), scale=scale)
    return out.masked_fill(~has_key, 0.0)


def _dense_rows(q, k, v, layout: BlockLayout, keep, out, scale, extra_kv):
    """Global query blocks against every key: [B, H, g·b, D] x [B, H, nb·b, D]; O(g·b·N).
    Rows that see every key (the usual global block) need no token mask at all."""
    B, H, n_pad, D = q.shape
    b = layout.block_size
    offs = torch.arange(b, device=q.device)
    for rows, full in ((layout.dense_rows[layout.dense_full], True), (layout.dense_rows[~layout.dense_full], False)):
        if len(rows) == 0:
            continue
        q_tok = (rows[:, None] * b + offs).flatten()  # [g·b]
        m = None if full else _dense_row_mask(layout, q_tok, n_pad)  # [1, Hp, g·b, n_pad]
        if keep is not None:
            m = keep[:, None, None, :] if m is None else m & keep[:, None, None, :]
        kk, vv = k, v
        if extra_kv is not None:
            k_e, v_e, keep_e = extra_kv
            kk, vv = torch.cat([k, k_e], dim=2), torch.cat([v, v_e], dim=2)
            m = torch.ones(1, 1, 1, n_pad, dtype=torch.bool, device=q.device) if m is None else m
            hm = m.shape[1]
            m_e = keep_e[:, None, None, :].expand(B, hm, len(q_tok), keep_e.shape[1])
            m = torch.cat([m.expand(B, hm, len(q_tok), n_pad), m_e], dim=-1)
        od = _sdpa_zero_empty_rows(q[:, :, q_tok], kk, vv, m, scale)  # [B, H, g·b, D]
        out = out.index_copy(2, q_tok, od)
    return out


def _dense_row_mask(layout: BlockLayout, q_tok, n_pad):
    hp = layout.kv_index.shape[0]
    kv_tok = torch.arange(n_pad, device=q_tok.device)
    heads = torch.arange(hp, device=q_tok.device).view(hp, 1, 1)
    m = layout.mask_mod(heads, q_tok[None, :, None], kv_tok[None, None, :]).expand(hp, len(q_tok), n_pad)
    return (m & (kv_tok < layout.n))[None]
