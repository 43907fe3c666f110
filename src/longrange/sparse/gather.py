"""What one chunk of the engine reads: its keys and values (`KeySource`, one gather per chunk, and
the scatter of their gradients back) and its token masks (`chunk_mask` for query blocks,
`dense_mask` for dense rows). Shared by the engine's forward (`sparse.engine`) and its recomputing
backward (`sparse.recompute`)."""

from __future__ import annotations

import dataclasses

import torch

from longrange.sparse.layout import BlockLayout


@dataclasses.dataclass(frozen=True)
class TokenKeys:
    """Extra keys that are tokens of the sequence itself (per-example global tokens, Longformer's
    and BigBird's): idx [B, g] long, their key positions; keep [B, g] bool (or per query
    [B, N, g]), which of them count. The engine reads them from k and v in place and adds their
    gradients back to those rows, so no copy of k and v is made to append them; anything else
    (flex, dense rows) takes `as_extra_kv`, the same keys as tensors."""

    idx: torch.Tensor
    keep: torch.Tensor

    @property
    def count(self) -> int:
        return self.idx.shape[1]

    def as_extra_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_e, v_e, keep_e): the tokens' keys and values [B, H, g, D], by indexing (differentiable)."""
        b, h = k.shape[:2]
        batch = torch.arange(b, device=k.device)[:, None, None]
        heads = torch.arange(h, device=k.device)[None, :, None]
        at = self.idx.to(k.device)[:, None, :]
        return k[batch, heads, at], v[batch, heads, at], self.keep


class KeySource:
    """The keys and values a pass reads, k, v [B, H, n_pad + g, D] contiguous (the g extra keys
    after the padded sequence, or among its tokens: `extra_tokens`), and the place their gradients
    go back to.

    A chunk of query blocks fetches its key/value blocks with one index_select each, laid out
    [B·nc, H, k·b + g, D] so masks that do not vary by head broadcast over H. Without extra keys the
    rows of a gather are whole [b, D] blocks; with them single tokens, so blocks and extras land in
    one buffer in one pass. With `reuse` the results land in buffers reused by every chunk (on CPU
    a fresh multi-MB allocation per chunk page-faults, ~3x the copy itself, measured); without,
    fresh tensors (for autograd to keep).
    """

    def __init__(self, k, v, n_pad: int, layout: BlockLayout, reuse: bool = True,
                 extra_tokens: torch.Tensor | None = None):
        """extra_tokens [B, g] or None: the extra keys are these tokens of k, v (`TokenKeys`), not
        rows appended after n_pad."""
        B, H, total, D = k.shape
        b, nb = layout.tile, layout.num_kv_blocks
        self.B, self.H, self.D, self.b, self.kpr, self.n_pad = B, H, D, b, layout.blocks_per_row, n_pad
        self.keys, self.values = k, v
        self.kv_index = layout.kv_index
        self.g = total - n_pad if extra_tokens is None else extra_tokens.shape[1]
        if self.g == 0:
            self.base = (torch.arange(B * H, device=k.device) * nb).view(B, 1, H, 1)  # first block of (b, h)
        else:
            self.base = (torch.arange(B * H, device=k.device) * total).view(B, 1, H, 1)  # first token of (b, h)
            if extra_tokens is None:
                self.extra_ids = self.base + n_pad + torch.arange(self.g, device=k.device)  # (B, 1, H, g)
            else:
                self.extra_ids = self.base + extra_tokens.to(k.device).view(B, 1, 1, self.g)
            self.offsets = torch.arange(b, device=k.device)
        self.reuse = reuse
        self.buffers: dict[int, torch.Tensor] = {}
        # one query tile against one key tile (a short sequence, a subsequence): the keys are the
        # gather, read where they are (any strides; `single_tile`)
        self.whole = single_tile(layout) and self.g == 0 and total == n_pad

    def rows(self, c0: int, c1: int) -> torch.Tensor:
        """Row ids of query blocks [c0, c1)'s keys in the flattened source: blocks or tokens."""
        blocks = self.kv_index[:, c0:c1].permute(1, 0, 2)[None]  # (1, nc, Hp, k)
        if self.g == 0:
            return (self.base + blocks).reshape(-1)  # (B, nc, H, k)
        tokens = (self.base[..., None] + (blocks * self.b)[..., None] + self.offsets).flatten(3)  # (B, nc, H, k·b)
        extra = self.extra_ids.expand(self.B, c1 - c0, self.H, self.g)
        return torch.cat([tokens, extra], dim=3).reshape(-1)

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, n_pad + g, D] contiguous -> its rows as a view: blocks, or tokens with extra keys."""
        return t.view(-1, self.b, self.D) if self.g == 0 else t.view(-1, self.D)

    def __call__(self, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> keys and values of query blocks [c0, c1): two [B·nc, H, k·b + g, D]."""
        if self.whole:
            return self.keys, self.values
        ids = self.rows(c0, c1)
        shape = (self.B * (c1 - c0), self.H, self.kpr * self.b + self.g, self.D)
        got = []
        for i, src in enumerate((self.keys, self.values)):
            rows = self.flat(src)
            if not self.reuse:
                got.append(rows.index_select(0, ids).view(shape))
                continue
            need = ids.numel() * rows[0].numel()
            buf = self.buffers.get(i)
            if buf is None or buf.numel() < need:
                buf = self.buffers[i] = torch.empty(need, dtype=src.dtype, device=src.device)
            got.append(torch.index_select(rows, 0, ids, out=buf[:need].view(ids.numel(), *rows.shape[1:])).view(shape))
        return got[0], got[1]

    def scatter_add_(self, dk, dv, grads, c0: int, c1: int) -> None:
        """Add a chunk's key/value gradients [B·nc, H, k·b + g, D] into dk, dv [B, H, n_pad + g, D]
        at the rows they were gathered from (a row gathered by several query blocks collects each)."""
        if self.whole:
            dk += grads[0]
            dv += grads[1]
            return
        ids = self.rows(c0, c1)
        for acc, grad in zip((dk, dv), grads, strict=True):
            rows = self.flat(acc)
            rows.index_add_(0, ids, grad.reshape(ids.numel(), *rows.shape[1:]))


def single_tile(layout: BlockLayout) -> bool:
    """One query tile against one key tile holding every key, and no dense rows: the engine then
    reads q, k, v as given (no padding copy, no gather)."""
    return (layout.num_blocks == 1 and layout.num_kv_blocks == 1 and layout.blocks_per_row == 1
            and layout.n == layout.tile and layout.n_kv == layout.tile and len(layout.dense_rows) == 0)


def chunk_mask(layout: BlockLayout, keep, c0, c1, B, keep_e, live=None):
    """Token mask for the chunk, [B·nc or nc, H or 1, b, k·b (+ g)] bool, or None. keep_e: the extra
    keys' keep mask ([B, g] or per query [B, nb·b, g]) or None; live [nb] bool or None: query blocks
    whose rows may see the extra keys here (dense rows see them in the dense pass instead)."""
    b, kpr = layout.tile, layout.blocks_per_row
    valid = layout.valid[:, c0:c1]  # [Hp, nc, k]
    partial = layout.partial[:, c0:c1]
    any_partial = bool(partial.any())
    if keep is None and keep_e is None and not any_partial and bool(valid.all()):
        return None
    hp, nc = valid.shape[0], c1 - c0
    device = valid.device
    offs = torch.arange(b, device=device)
    kv_tok = layout.kv_index[:, c0:c1, :, None] * b + offs  # [Hp, nc, k, b]
    m = valid.permute(1, 0, 2)[:, :, None, :, None].expand(nc, hp, b, kpr, b)  # (nc, Hp, b(q), k, b(kv))
    if any_partial:
        q_tok = (torch.arange(c0, c1, device=device) * b)[:, None] + offs  # [nc, b]
        heads = torch.arange(hp, device=device).view(1, hp, 1, 1, 1)
        tok = layout.mask_mod(heads, q_tok[:, None, :, None, None], kv_tok.permute(1, 0, 2, 3)[:, :, None])
        m = m & tok
    m = m.reshape(1, nc, hp, b, kpr * b)  # (1, nc, Hp, b, k·b)
    if keep is not None:
        k_keep = keep[:, kv_tok.permute(1, 0, 2, 3).reshape(nc, hp, kpr * b)]  # (Bk, nc, Hp, k·b)
        m = m & k_keep[:, :, :, None, :]  # (Bm, nc, Hp, b, k·b)
    if keep_e is not None:  # (B, g) or per query (B, nb·b, g)
        g = keep_e.shape[-1]
        if keep_e.dim() == 2:
            m_e = keep_e[:, None, None, None, :]  # (B, 1, 1, 1, g)
        else:
            m_e = keep_e[:, c0 * b : c1 * b].view(keep_e.shape[0], nc, 1, b, g)  # (B, nc, 1, b, g)
        if live is not None:
            m_e = m_e & live[c0:c1].view(1, nc, 1, 1, 1)
        bm = max(m.shape[0], keep_e.shape[0])
        m_e = m_e.expand(bm, nc, hp, b, g)
        m = torch.cat([m.expand(bm, *m.shape[1:]), m_e], dim=-1)
    if m.shape[0] != B:  # a mask shared by the batch, but q folds batch and chunk together
        m = m.expand(B, *m.shape[1:])
    return m.reshape(B * nc, hp, b, m.shape[-1])


def dense_mask(layout: BlockLayout, keep, keep_e, q_tok, n_pad, B):
    """Mask of dense-row tokens q_tok [r] against every key (then the extra keys): n_pad = the
    padded key count nbk·b; [B or 1, Hp or 1, r, n_pad (+ g)] bool, or None when they see every key."""
    full = bool(layout.dense_full[(layout.dense_rows == q_tok[0] // layout.tile).nonzero()].all())
    m = None if full else dense_row_mask(layout, q_tok, n_pad)  # [1, Hp, r, n_pad]
    if keep is not None:
        m = keep[:, None, None, :] if m is None else m & keep[:, None, None, :]
    if keep_e is not None:
        m = torch.ones(1, 1, 1, n_pad, dtype=torch.bool, device=q_tok.device) if m is None else m
        hm = m.shape[1]
        m_e = keep_e[:, None, None, :] if keep_e.dim() == 2 else keep_e[:, None, q_tok]  # (B, 1, 1 or r, g)
        m_e = m_e.expand(B, hm, len(q_tok), keep_e.shape[-1])
        m = torch.cat([m.expand(B, hm, len(q_tok), n_pad), m_e], dim=-1)
    return m


def dense_row_mask(layout: BlockLayout, q_tok, n_pad):
    hp = layout.kv_index.shape[0]
    kv_tok = torch.arange(n_pad, device=q_tok.device)
    heads = torch.arange(hp, device=q_tok.device).view(hp, 1, 1)
    m = layout.mask_mod(heads, q_tok[None, :, None], kv_tok[None, None, :]).expand(hp, len(q_tok), n_pad)
    return (m & (kv_tok < layout.n_kv))[None]
