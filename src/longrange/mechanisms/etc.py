"""`etc`: Extended Transformer Construction (Ainslie et al., EMNLP 2020): global-local attention.

The input is two sequences, concatenated along the length: g global tokens (e.g. one per sentence)
then n long tokens, x = [global ; long] of shape [B, g + n, C], with `num_global=g`. Four pieces:

    long → long      a sliding window of radius r, through the sparse engine       O(n·r)
    long → global    every global key, or those `long_to_global` [B, n, g] allows   O(n·g)
    global → global  every global key, or those `global_to_global` [B, g, g] allows O(g²)
    global → long    every long key, or those `global_to_long` [B, g, n] allows     O(g·n)

Each long query does ONE softmax over [its window keys ; the global keys it may see]; each global
query one softmax over [global keys ; the long keys it may see]. Never an (g+n)×(g+n) tensor.

Relative positions (Shaw et al. 2018, as ETC): score(i, j) = q_i·(k_j + a_label(i, j)) / √D with a
learned vector a per label and head. Labels: long→long and global→global pairs get
clip(j - i, -k, k) + k (k = `max_distance`, distances counted inside each sequence); every
global↔long pair gets one more learned label, CROSS = 2k + 1. No absolute positions are used,
so any length works. In the engine the long→long bias is gathered per chunk from
qa = q·Aᵀ [B, H, n, 2k + 2] (computed once): O(n·k) memory, see `score_bias` in
`longrange.sparse.engine`.

`share_global_projections=False` gives the global tokens their own Q/K/V projection (`qkv_global`)
as ETC's implementation allows; the output projection is shared. With `num_global=0` this is local
attention with relative positions.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from longrange.core.config import AttentionConfig, check_positive_int
from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Capabilities
from longrange.core.masking import sdpa_zero_empty_rows
from longrange.mechanisms.base import PatternAttention, auto_tile
from longrange.patterns import Window
from longrange.sparse.backends import check_backend
from longrange.sparse.bias import ScoreBias
from longrange.sparse.score import relative_position


@dataclasses.dataclass
class ETCConfig(AttentionConfig):
    name = "etc"
    radius: int = 84  # long→long window: |i - j| <= radius (ETC-base: 84)
    max_distance: int = 12  # relative labels clipped to [-k, k] (ETC-base: 12)
    share_global_projections: bool = True  # False: global tokens get their own Q/K/V (`qkv_global`)
    tile: int | None = None  # the engine's tile; None: `default_tile(radius)` (84 -> 64, 256 -> 256)
    backend: str = "auto"  # "auto" | "engine" | "flex": what runs the layout (longrange.sparse.backends)
    renamed = {"block_size": "tile"}

    def validate(self):
        super().validate()
        check_positive_int("radius", self.radius)
        check_backend(self.backend)
        check_positive_int("max_distance", self.max_distance)
        if not isinstance(self.share_global_projections, bool):
            raise ValueError(f"share_global_projections must be a bool, got {self.share_global_projections!r}")
        if self.tile is not None:
            check_positive_int("tile", self.tile)

    @property
    def num_labels(self) -> int:
        """2k + 1 clipped distances, then the CROSS label of global↔long pairs."""
        return 2 * self.max_distance + 2


def default_tile(radius: int) -> int:
    """As `local`: the largest power of two <= 256 dividing the radius (aligned windows, big blocks
    for the fused kernel) when that is at least 16; otherwise the largest power of two <= min(radius,
    64), so the masked keys of partial edge blocks (at most 2·b per query) stay within the window."""
    aligned = auto_tile(radius)
    if aligned >= 16:
        return aligned
    b = 1
    while b * 2 <= min(radius, 64):
        b *= 2
    return b


class ETCAttention(PatternAttention):
    """forward(x [B, g + n, C], attention_mask [B, g + n] bool, *, num_global=g, long_to_global
    [B, n, g], global_to_long [B, g, n], global_to_global [B, g, g]) -> [B, g + n, C].
    Structure masks are bool, True = may attend, None = full; padding comes from attention_mask."""

    config_class = ETCConfig
    capabilities = Capabilities(inputs=("num_global", "long_to_global", "global_to_long", "global_to_global"),
                                global_tokens="num_global")

    def __init__(self, config: ETCConfig):
        super().__init__(config)
        self.relative = nn.Embedding(config.num_labels, config.dim)  # a_label, all heads: (L, H·D)
        self.qkv_global = None
        if not config.share_global_projections:
            self.qkv_global = nn.Linear(config.dim, 3 * config.dim, bias=config.bias)

    def default_tile(self) -> int:
        return default_tile(self.config.radius)

    @property
    def cross_label(self) -> int:
        return self.config.num_labels - 1

    def build_pattern(self):
        return Window(self.config.radius)

    # -- inputs ----------------------------------------------------------------------------------
    def check_structure(self, x, attention_mask, num_global, long_to_global, global_to_long, global_to_global):
        """Validate every input; -> (keep [B, N] or None, g, n)."""
        keep = self.check_input(x, attention_mask)
        b, total = x.shape[0], x.shape[1]
        if not isinstance(num_global, int) or isinstance(num_global, bool) or not 0 <= num_global <= total:
            raise ValueError(f"num_global must be an int in [0, N] with N = x.shape[1] = {total} "
                             f"(x = [global ; long]), got {num_global!r}")
        g, n = num_global, total - num_global
        for name, mask, shape, what in (("long_to_global", long_to_global, (b, n, g), "[B, n, g]"),
                                        ("global_to_long", global_to_long, (b, g, n), "[B, g, n]"),
                                        ("global_to_global", global_to_global, (b, g, g), "[B, g, g]")):
            check_structure_mask(name, mask, shape, what)
        return keep, g, n

    # -- the call --------------------------------------------------------------------------------
    def forward(self, x, attention_mask=None, *, num_global: int = 0, long_to_global=None, global_to_long=None,
                global_to_global=None):
        keep, g, n = self.check_structure(x, attention_mask, num_global, long_to_global, global_to_long,
                                          global_to_global)
        q, k, v = self.project_parts(x, g)  # (B, H, g + n, D) each: [global ; long]
        qa = self.relative_scores(q)  # (B, H, g + n, L)
        keep_g, keep_l = split_keep(keep, g)
        parts = []
        if g:  # (B, H, g, D)
            parts.append(self.global_rows(q[:, :, :g], k, v, qa[:, :, :g], keep, global_to_global, global_to_long))
        if n:  # (B, H, n, D)
            parts.append(self.long_rows(q[:, :, g:], k[:, :, g:], v[:, :, g:], qa[:, :, g:], keep_l,
                                        k[:, :, :g], v[:, :, :g], keep_g, long_to_global))
        if len(parts) == 1:
            return self.merge(parts[0])
        # joined token-major: one copy, and the head merge below is then a view
        return self.merge(torch.cat([p.transpose(1, 2) for p in parts], dim=1).transpose(1, 2))

    def engine_only_reason(self, needs_grad: bool) -> str | None:
        if needs_grad:
            return "the relative-position bias trains its inputs (the engine's ScoreBias backward)"
        return None

    def explain_length(self, x, inputs) -> int:
        return x.shape[1] - inputs.get("num_global", 0)

    def attend(self, q, k, v, keep, **extra):
        """Long rows only (no global tokens): local attention with relative positions."""
        return self.long_rows(q, k, v, self.relative_scores(q), keep)

    def project_parts(self, x, g: int):
        """x [B, g + n, C] -> q, k, v [B, H, g + n, D]: global rows through `qkv_global` when the
        projections are not shared."""
        if self.qkv_global is None or g == 0:
            return self.project(x)
        b, total, _ = x.shape
        h, d = self.config.heads, self.config.head_dim
        qkv = torch.cat([self.qkv_global(x[:, :g]), self.qkv(x[:, g:])], dim=1).view(b, total, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # 3 x (B, H, g + n, D)
        return q, k, v

    def relative_scores(self, q):
        """q [B, H, M, D] -> q·a_label / √D for every label: [B, H, M, L]."""
        h, d = self.config.heads, self.config.head_dim
        a = self.relative.weight.view(-1, h, d).to(q.dtype)  # (L, H, D)
        return torch.einsum("bhmd,lhd->bhml", q, a) * d**-0.5

    def long_rows(self, q_l, k_l, v_l, qa_l, keep_l, k_g=None, v_g=None, keep_g=None, long_to_global=None):
        """Long queries [B, H, n, D] (qa_l = their relative scores [B, H, n, L]): window keys, then
        the global keys k_g, v_g [B, H, g, D], one softmax, on the engine."""
        b, _, n, _ = q_l.shape
        extra = None
        g = 0 if k_g is None else k_g.shape[2]
        if g:
            keep_e = torch.ones(b, g, dtype=torch.bool, device=q_l.device) if keep_g is None else keep_g
            if long_to_global is not None:
                keep_e = long_to_global & keep_e[:, None, :]  # (B, n, g)
            extra = (k_g, v_g, keep_e)
        bias = RelativeBias(qa_l, self.config.max_distance, g)  # the engine's form (trains qa)
        score = relative_position(qa_l, self.config.max_distance, n_kv=n)  # the same term, for flex
        return self.run_layout(q_l, k_l, v_l, self.layout(n, q_l.device), keep_l, extra_kv=extra, score=score,
                               score_bias=bias)

    def global_rows(self, q_g, k, v, qa_g, keep, global_to_global, global_to_long):
        """Global queries q_g [B, H, g, D] against every key k, v [B, H, g + n, D] ([global ; long])
        they may see, one dense softmax, O(g·(g + n)); qa_g: their relative scores [B, H, g, L]."""
        b, _, g, _ = q_g.shape
        n = k.shape[2] - g
        mask = global_row_mask(b, g, n, keep, global_to_global, global_to_long, q_g.device)
        pos = torch.arange(g, device=q_g.device)
        labels = relative_labels(pos[:, None], pos[None, :], self.config.max_distance)  # (g, g)
        bias_gg = torch.gather(qa_g, 3, labels.expand(*qa_g.shape[:2], g, g))  # (B, H, g, g)
        bias_gl = qa_g[..., self.cross_label :].expand(*qa_g.shape[:3], n)  # (B, H, g, n)
        bias = torch.cat([bias_gg, bias_gl], dim=3)  # (B, H, g, g + n)
        return sdpa_zero_empty_rows(q_g, k, v, mask, None, bias, dropout_p=self.attention_dropout())

    # -- cost -----------------------------------------------------------------------------------------
    def macs(self, n: int, global_tokens: int = 0) -> MacCount:
        """n = all tokens (x.shape[1]), global_tokens = g of them global (`num_global`). Projections 4·n·C²; the
        relative scores q·Aᵀ (n·H·L·D, in `other`); long rows: every slot of the window layout over
        the n - g long tokens (padding included) plus g global columns per padded long row; global
        rows: g + (n - g) keys each."""
        g = global_tokens
        long_n = n - g
        h, d = self.config.heads, self.config.head_dim
        pairs = h * g * n  # global rows
        if long_n:
            layout = self.layout(long_n)
            pairs += layout.computed_pairs() * h + h * layout.num_blocks * layout.tile * g
        return pairwise(pairs, d, self.projection_macs(n), other=n * h * self.config.num_labels * d)

    # -- the oracle's view -----------------------------------------------------------------------
    def dense_mask(self, n: int) -> torch.Tensor:
        """Long tokens only (num_global=0): the window."""
        return Window(self.config.radius).to_dense(n)

    def reference_attend(self, q, k, v, keep):
        return dense_etc_attention(q, k, v, self, keep, 0, None, None, None)

    def reference_forward(self, x, attention_mask=None, *, num_global: int = 0, long_to_global=None,
                          global_to_long=None, global_to_global=None):
        """The whole layer over the concatenated sequence with dense [g + n, g + n] masks and biases."""
        keep, g, n = self.check_structure(x, attention_mask, num_global, long_to_global, global_to_long,
                                          global_to_global)
        q, k, v = self.project_parts(x, g)
        out = dense_etc_attention(q, k, v, self, keep, g, long_to_global, global_to_long, global_to_global)
        return self.merge(out)

    @classmethod
    def test_configs(cls):
        return [{"radius": 2, "max_distance": 2, "tile": 2},
                {"radius": 3, "max_distance": 4, "share_global_projections": False},
                {"radius": 5, "max_distance": 1, "tile": 4}]


class RelativeBias(ScoreBias):
    """The engine's `score_bias` for long rows: q·a_label for the chunk's pairs from the chunk's
    rows of qa [B, n, H, L] (its `inputs`, so the engine differentiates through it; labels
    clip(j - i, -k, k) + k), then the CROSS label for the g extra (global) keys.

    `__call__` gathers every pair's label (the straightforward definition, used for gradients).
    `add_to` / `masked_into` use the clipping: beyond the band |j - i| < k every pair shares label
    0 (left) or 2k (right), so, up to the per-row constant qa[i, 0] that the softmax ignores, the
    bias is (qa[i, 2k] - qa[i, 0])·[j >= i + k] (one multiply-add pass with a head-independent
    step pattern), qa[i, label] - qa[i, 0] on the 2k - 1 band keys of each row (a scatter of
    r·(2k - 1) values instead of a gather of r·c), and qa[i, CROSS] - qa[i, 0] on the extra keys.
    It applies to chunks whose keys are whole aligned blocks of r tokens (the engine's chunks, and
    dense rows' tiles of keys when aligned); anything else takes `__call__`."""

    def __init__(self, qa: torch.Tensor, max_distance: int, num_extra: int):
        self.inputs = (qa.transpose(1, 2),)  # (B, n, H, L): the query position on axis 1
        self.k, self.g = max_distance, num_extra
        self._cache = None  # the last chunk's geometry, by its keys' positions relative to its first query

    def __call__(self, q_tok: torch.Tensor, kv_tok: torch.Tensor, qa: torch.Tensor) -> torch.Tensor:
        """q_tok [R, r], kv_tok [1, R, c], qa [B, R, r, H, L] -> [B, R, H, r, c + g]."""
        b, rows, r, h, _ = qa.shape
        c = kv_tok.shape[-1]
        labels = relative_labels(q_tok[:, :, None], kv_tok[0][:, None, :], self.k)  # (R, r, c)
        if self.g:  # the extra (global) keys take the CROSS label: one gather writes every column
            cross = labels.new_full((rows, r, self.g), 2 * self.k + 1)
            labels = torch.cat([labels, cross], dim=2)  # (R, r, c + g): small, no B or H
        qa = qa.transpose(2, 3)  # (B, R, H, r, L)
        return torch.gather(qa, 4, labels[None, :, None].expand(b, rows, h, r, c + self.g))  # (B, R, H, r, c + g)

    def add_to(self, scores, q_tok, kv_tok, qa):
        geometry = self.band_geometry(q_tok, kv_tok)
        if geometry is None:
            return super().add_to(scores, q_tok, kv_tok, qa)
        step, cols, ok, diagonal = geometry
        c = step.shape[-1]
        right, extra, band = self.row_terms(qa.to(scores.dtype), ok)
        scores[..., :c].addcmul_(right, step.to(scores.dtype)[None, :, None])
        if self.g:
            scores[..., c:] += extra
        self.add_band_(scores, cols, diagonal, band)

    def masked_into(self, out, mask, q_tok, kv_tok, qa):
        geometry = self.band_geometry(q_tok, kv_tok)
        if geometry is None:
            return super().masked_into(out, mask, q_tok, kv_tok, qa)
        step, cols, ok, diagonal = geometry
        c = step.shape[-1]
        right, extra, band = self.row_terms(qa.to(out.dtype), ok)
        base = torch.zeros((), dtype=out.dtype, device=out.device)
        if mask is not None:  # 0 where allowed, -inf where not: head-independent unless the mask is per head
            base = torch.zeros(mask.shape, dtype=out.dtype, device=out.device).masked_fill_(~mask, float("-inf"))
        block_base = base[..., :c] if base.dim() else base
        torch.addcmul(block_base, right, step.to(out.dtype)[None, :, None], out=out[..., :c])  # one pass
        if self.g:
            torch.add(base[..., c:] if base.dim() else base, extra, out=out[..., c:])
        self.add_band_(out, cols, diagonal, band)  # -inf + finite stays -inf: masked pairs stay masked

    def row_terms(self, qa, ok):
        """qa [B, R, r, H, L] -> (right - left [B, R, H, r, 1], CROSS - left [B, R, H, r, 1], band
        values minus left [B, R, H, r·(2k - 1)], zero where the band key is not in the chunk)."""
        k = self.k
        qa = qa.transpose(2, 3)  # (B, R, H, r, L)
        left = qa[..., :1]
        band = (qa[..., 1 : 2 * k] - left) * ok[None, :, None]  # labels 1 .. 2k - 1: offsets -(k - 1) .. k - 1
        return qa[..., 2 * k : 2 * k + 1] - left, qa[..., 2 * k + 1 :] - left, band.flatten(3)

    def add_band_(self, scores, cols, diagonal, band):
        """scores [B, R, H, r, W] += band [B, R, H, r·(2k - 1)] at the flat positions cols [R, r·(2k - 1)]
        of each group's r x W tile: a strided diagonal view when every group's band starts at the same
        column `diagonal` and runs on (the query's block and its neighbours in adjacent slots), else a scatter."""
        B, R, H, r, W = scores.shape
        if diagonal is not None and scores.stride()[3:] == (W, 1):
            width = 2 * self.k - 1
            view = scores.as_strided((B, R, H, r, width), (*scores.stride()[:3], W + 1, 1),
                                     scores.storage_offset() + diagonal)
            view += band.view(B, R, H, r, width)
            return
        scores.view(B, R, H, r * W).scatter_add_(3, cols[None, :, None].expand(B, R, H, -1), band)

    def band_geometry(self, q_tok, kv_tok):
        """For groups whose keys are whole aligned blocks of r tokens: (step [R, r, c] bool,
        key >= query + k; band flat positions [R, r·(2k - 1)] in each r x (c + g) tile; band keys
        present [R, r, 2k - 1] bool; the column where row 0's band starts when every band is one
        diagonal run at the same column in every group, else None). None otherwise (the caller falls
        back to `__call__`)."""
        R, r = q_tok.shape
        c = kv_tok.shape[-1]
        k = self.k
        if kv_tok.shape[0] != 1 or c % r or 2 * k - 1 > c // 2:
            return None
        kv = kv_tok[0]  # (R, c)
        offs = torch.arange(r, device=kv.device)
        q0 = q_tok[:, :1]
        # groups of r consecutive queries from a multiple of r: the geometry depends only on kv - q0
        relative = bool((q0 % r == 0).all()) and bool((q_tok == q0 + offs).all())
        if relative:
            rel = kv - q0
            hit = self._cache
            if hit is not None and hit[0].shape == rel.shape and torch.equal(hit[0], rel):
                return hit[1]
        geometry = self._band_geometry(q_tok, kv, r, c, offs)
        if relative:
            self._cache = (rel, geometry)
        return geometry

    def _band_geometry(self, q_tok, kv, r, c, offs):
        R, k = kv.shape[0], self.k
        blocks = kv.view(R, c // r, r)
        starts = blocks[..., 0]  # (R, slots)
        if bool((starts % r).any()) or not bool((blocks == starts[..., None] + offs).all()):
            return None
        step = kv[:, None, :] >= q_tok[:, :, None] + k  # (R, r, c)
        j = q_tok[:, :, None] + torch.arange(1 - k, k, device=kv.device)  # (R, r, 2k - 1) band keys
        match = (starts // r)[:, None, None, :] == torch.div(j, r, rounding_mode="floor")[..., None]
        ok = match.any(-1)  # the band key's block is one of the group's key blocks
        col = match.int().argmax(-1) * r + j % r  # its first slot: unused slots (repeats) come last
        flat = torch.where(ok, offs[:, None] * (c + self.g) + col, 0)
        diagonal = None
        first = col[0, 0, 0]  # row 0's first band key: on a diagonal run, row i's starts at first + i
        run = first + offs[:, None] + torch.arange(2 * k - 1, device=kv.device)  # (r, 2k - 1)
        if bool(ok.all()) and bool((col == run).all()):
            diagonal = int(first)
        return step, flat.flatten(1), ok, diagonal


def relative_labels(i: torch.Tensor, j: torch.Tensor, max_distance: int) -> torch.Tensor:
    """clip(j - i, -k, k) + k, broadcast over i and j: labels in [0, 2k]."""
    return (j - i).clamp(-max_distance, max_distance) + max_distance


def check_structure_mask(name, mask, shape, what):
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor {what} = {list(shape)} (True = may attend), got {got}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {list(shape)} (g = num_global, n = long tokens), "
                         f"got {list(mask.shape)}")


def split_keep(keep, g: int):
    """[B, g + n] or None -> (keep_g [B, g] or None, keep_l [B, n] or None)."""
    if keep is None:
        return None, None
    return keep[:, :g], keep[:, g:]


def global_row_mask(b, g, n, keep, global_to_global, global_to_long, device):
    """[B, 1, g, g + n] bool: which [global ; long] keys each global query may see (structure and
    key padding keep [B, g + n]), or None (all)."""
    if keep is None and global_to_global is None and global_to_long is None:
        return None
    gg = torch.ones(b, g, g, dtype=torch.bool, device=device) if global_to_global is None else global_to_global
    gl = torch.ones(b, g, n, dtype=torch.bool, device=device) if global_to_long is None else global_to_long
    mask = torch.cat([gg, gl], dim=2)  # (B, g, g + n)
    return (mask if keep is None else mask & keep[:, None, :])[:, None]  # (B, 1, g, g + n)


def dense_etc_attention(q, k, v, module: ETCAttention, keep, g, long_to_global, global_to_long, global_to_global):
    """The oracle: softmax over the concatenated [g + n] keys with a dense [B, 1, N, N] mask and a
    dense [B, H, N, N] relative bias, written out (quadratic; tests only). Empty rows give zeros."""
    b, _, total, d = q.shape
    n, kdist, device = total - g, module.config.max_distance, q.device
    pos = torch.cat([torch.arange(g, device=device), torch.arange(n, device=device)])  # index inside its sequence
    is_global = torch.arange(total, device=device) < g
    same = is_global[:, None] == is_global[None, :]
    labels = torch.where(same, relative_labels(pos[:, None], pos[None, :], kdist), module.cross_label)  # (N, N)
    qa = module.relative_scores(q)  # (B, H, N, L)
    bias = torch.gather(qa, 3, labels.expand(*qa.shape[:2], total, total))  # (B, H, N, N)
    mask = torch.ones(b, total, total, dtype=torch.bool, device=device)
    mask[:, g:, g:] = (pos[g:, None] - pos[None, g:]).abs() <= module.config.radius
    for block, rows, cols in ((long_to_global, slice(g, None), slice(None, g)),
                              (global_to_long, slice(None, g), slice(g, None)),
                              (global_to_global, slice(None, g), slice(None, g))):
        if block is not None:
            mask[:, rows, cols] = block
    if keep is not None:
        mask = mask & keep[:, None, :]
    scores = (q @ k.transpose(-1, -2)) * d**-0.5 + bias  # (B, H, N, N)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, 0.0))  # masked: exp(-inf) = 0
    denom = weights.sum(dim=-1, keepdim=True)
    return (weights / torch.where(denom > 0, denom, 1.0)) @ v  # rows with no key: zeros
