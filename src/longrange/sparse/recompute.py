"""The engine's training path: attention over a block layout as one autograd function in linear
memory (FlashAttention's recomputation, applied to blocks).

Legend as in `engine`: B batch, H heads, b tile, nb query blocks, k key blocks per query block,
g extra keys, c = k·b (+ g) columns of a chunk, E = B·nc rows of a chunk's batched matmuls.

forward   for each chunk of query blocks: gather its key/value blocks, s = q kᵀ·scale + bias,
          masked; P = softmax(s) (dropped and rescaled if dropout is on); o = P v. Keep only the
          output and each row's log-sum-exp (lse).
saved     q and k, v (padded to the tile, the extra keys after them: the engine's one copy, or
          among them: `TokenKeys`), the output, lse [B, H, N] and the bias's inputs: O(N·D) in
          all, nothing per gathered block.
backward  per chunk again: gather, recompute s and P = exp(s - lse), then
              dP = dO·Vᵀ (∘ the dropout mask / (1 - p)),   dS = P ∘ (dP - rowsum(dO ∘ O)),
              dQ = scale·dS·K,   dK = scale·dSᵀ·Q,   dV = P_droppedᵀ·dO,
          dK, dV added back to their blocks with index_add_ over the gathered ids (a key block that
          several query blocks gathered collects from each of them), dS handed to the bias for
          its inputs' gradients (`ScoreBias.backward`).
Dense (global) rows go through the same kernels against every key: in forward in chunks of rows,
in backward in tiles of keys too (P = exp(s - lse) needs only the row's lse, so each tile's key
gradients are final and no tile makes a full-size one).

Tiles run on aten's fused CPU flash kernel where it applies (`fused_kernel_available`), else on two
batched matmuls with the softmax in a reused buffer (dropout, bias gradients, other devices).

Memory: the chunk's gathered keys/values, scores and their gradients (bounded by `chunk_bytes`)
on top of O(N·D); time: one more pass of q·kᵀ than autograd through saved blocks would take.
Rows with no allowed key give zeros and zero (finite) gradients: their lse is set to 0, and every
entry of their recomputed P is exp(-inf) = 0.
"""

from __future__ import annotations

import dataclasses

import torch

from longrange.core.dropout import AttentionDropout, col_keys, keep_from_keys, row_keys
from longrange.sparse.bias import ScoreBias, add_rows_, add_rows_at_, rows_at, rows_of
from longrange.sparse.gather import KeySource, chunk_mask, dense_mask
from longrange.sparse.layout import BlockLayout

_HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Plan:
    """Everything about one call that is not a differentiable tensor."""

    layout: BlockLayout
    keep: torch.Tensor | None  # [B or 1, n_pad] key keep (padding and tile padding), or None
    keep_e: torch.Tensor | None  # extra keys' keep [B, g] or per query [B, n_pad, g], or None
    scale: float
    chunk: int  # query blocks per chunk
    dense_chunk: int  # dense-row tokens per chunk
    dense_keys: int  # key columns per dense-row tile in backward
    bias: ScoreBias | None = None
    dropout: AttentionDropout | None = None
    live: torch.Tensor | None = None  # [nb] bool: False for dense rows (their extras come in the dense pass)
    fused: bool = False  # tiles run on the fused CPU flash kernel (see `fused_kernel_available`)
    want_lse: bool = False  # the caller also gets each row's log-sum-exp (-inf for a row with no key)
    extra_tokens: torch.Tensor | None = None  # [B, g]: the extra keys are these tokens of k, v (`TokenKeys`)
    batch_slices: int = 1  # the chunks run on this many slices of the batch, one after the other

    def slices(self, batch: int) -> list[slice]:
        size = -(-batch // self.batch_slices)
        return [slice(b0, min(b0 + size, batch)) for b0 in range(0, batch, size)]

    def for_batch(self, s: slice, batch: int) -> Plan:
        """This plan for the examples `s` of a batch of `batch` (no further slicing); dropout keeps
        each row's example id."""
        def cut(t):
            return t[s] if t is not None and t.shape[0] == batch and batch > 1 else t

        dropout = self.dropout
        if dropout is not None:
            ids = dropout.index.batch if dropout.index.batch is not None else torch.arange(batch)
            index = dataclasses.replace(dropout.index, batch=ids[s],
                                        **{f: cut(getattr(dropout.index, f)) for f in ("query", "key", "extra")
                                           if getattr(dropout.index, f) is not None
                                           and getattr(dropout.index, f).dim() == 2})
            dropout = dataclasses.replace(dropout, index=index)
        return dataclasses.replace(self, keep=cut(self.keep), keep_e=cut(self.keep_e), dropout=dropout,
                                   extra_tokens=cut(self.extra_tokens), batch_slices=1)


def fused_kernel_available(device: torch.device, dropout: AttentionDropout | None) -> bool:
    """On CPU without dropout, tiles run on aten's fused flash kernel (the one SDPA uses), which
    returns the log-sum-exp and has a backward that takes it: measured ~1.2x (forward) and ~1.4x
    (backward) faster than the two-matmul kernel on 64- and 256-query tiles (one thread, fp32).
    Dropout (our hash, not its RNG), a bias whose inputs need gradients (it does not return dS) and
    other devices take the two-matmul kernel below; so does a caller who turned flash SDPA off
    (`torch.nn.attention.sdpa_kernel` without FLASH_ATTENTION, e.g. to count FLOPs)."""
    return (device.type == "cpu" and dropout is None and _FLASH is not None
            and torch.backends.cuda.flash_sdp_enabled())


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax and accumulated gradients in float32 for fp16/bf16 inputs."""
    return torch.float32 if dtype in _HALF else dtype


class BlockSparseFunction(torch.autograd.Function):
    """apply(plan, q, k, v, *bias_inputs) -> out [B, H, n_pad, D], and lse [B, H, n_pad] when
    `plan.want_lse` (differentiable too); q [B, H, n_pad, D] and k, v [B, H, n_pad + g, D] padded
    to the tile and contiguous (the extra keys after the padded ones)."""

    @staticmethod
    def forward(ctx, plan: Plan, q, k, v, *bias_inputs):
        out, lse, empty = attention_forward(plan, q, k, v, bias_inputs)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, *bias_inputs)
        return (out, public_lse(lse, empty)) if plan.want_lse else out

    @staticmethod
    def backward(ctx, dout, dlse=None):
        q, k, v, out, lse, *bias_inputs = ctx.saved_tensors
        need_bias = ctx.needs_input_grad[4:]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dbias = attention_backward(ctx.plan, dout, q, k, v, out, lse, bias_inputs, need_bias, dlse)
        return (None, dq, dk, dv, *dbias)


def public_lse(lse: torch.Tensor, empty: torch.Tensor | None) -> torch.Tensor:
    """The log-sum-exp callers see: -inf for rows with no key (kept as 0 inside, where exp(s - lse)
    must stay 0 for their all -inf scores)."""
    return lse if empty is None else lse.masked_fill(empty, float("-inf"))


# -- forward --------------------------------------------------------------------------------------------
def attention_forward(plan: Plan, q, k, v, bias_inputs=()):
    """-> out [B, H, n_pad, D] (a view of a token-major buffer), lse [B, H, n_pad] (0 for rows with
    no key) and, when `plan.want_lse`, which rows have no key [B, H, n_pad] bool (else None)."""
    B, H, n_pad, D = q.shape
    layout, b = plan.layout, plan.layout.tile
    nb = layout.num_blocks
    cdt = compute_dtype(q.dtype)
    out = torch.empty(B, n_pad, H, D, dtype=q.dtype, device=q.device)  # token-major: the head merge is a view
    lse = torch.empty(B, H, n_pad, dtype=cdt, device=q.device)
    empty = torch.zeros(B, H, n_pad, dtype=torch.bool, device=q.device) if plan.want_lse else None
    if plan.batch_slices > 1:  # (no bias, no dense rows: see `engine._recomputed`)
        for s in plan.slices(B):
            o, lse[s], e = attention_forward(plan.for_batch(s, B), q[s], k[s], v[s])
            out[s] = o.transpose(1, 2)
            if empty is not None:
                empty[s] = e
        return out.transpose(1, 2), lse, empty
    gather = KeySource(k, v, _key_pad(layout), layout, extra_tokens=plan.extra_tokens)
    buf = _Scratch(q.device)
    for c0 in range(0, nb, plan.chunk):
        c1 = min(c0 + plan.chunk, nb)
        t = _sparse_tile(plan, q, gather, c0, c1, bias_inputs)
        o, lse_c = forward_tile(t, plan, buf)
        nc = c1 - c0
        out.view(B, nb, b, H, D)[:, c0:c1] = o.view(B, nc, H, b, D).transpose(2, 3)
        lse[:, :, c0 * b : c1 * b] = lse_c.view(B, nc, H, b).transpose(1, 2).reshape(B, H, nc * b)
        if empty is not None and t.mask is not None:
            no_key = (~t.mask.any(-1)).expand(B * nc, H, b)
            empty[:, :, c0 * b : c1 * b] = no_key.reshape(B, nc, H, b).transpose(1, 2).reshape(B, H, nc * b)
    for toks in _dense_spans(plan):
        t = _dense_tile(plan, q, gather, toks, bias_inputs, 0, k.shape[2])
        o, lse_d = forward_tile(t, plan, buf)
        out[:, toks] = o.transpose(1, 2).to(q.dtype)
        lse[:, :, toks] = lse_d
        if empty is not None and t.mask is not None:
            empty[:, :, toks] = (~t.mask.any(-1)).expand(B, H, len(toks))
    return out.transpose(1, 2), lse, empty


def forward_tile(t: Tile, plan: Plan, buf: _Scratch):
    """softmax(q kᵀ·scale + bias, masked) (dropped) v for one tile: -> o [E, H, r, D], lse [E, H, r]."""
    if plan.fused:
        return _FLASH(t.q, t.k, t.v, attn_mask=_float_mask(t, plan, buf), scale=t.scale)
    s = _scores(t, plan, buf.get("s", t.score_shape, t.q.dtype))  # [E, H, r, c]
    m = s.amax(dim=-1, keepdim=True)  # [E, H, r, 1]
    if t.mask is not None:
        m = m.masked_fill(m == float("-inf"), 0.0)  # rows with no key: exp(-inf - 0) = 0 below
    s.sub_(m).exp_()
    total = s.sum(dim=-1, keepdim=True)
    total = total.masked_fill(total == 0, 1.0)
    lse = (m + total.log()).squeeze(-1)
    if plan.dropout is not None:  # P ∘ keep / (1 - p), the normalisation folded into one pass
        s.masked_fill_(~t.drop_keep(plan.dropout), 0.0)
        total = total / plan.dropout.scale
    s.div_(total)
    E, H, r, c = s.shape
    o = torch.bmm(s.view(E * H, r, c), t.v.reshape(E * H, c, t.v.shape[-1]))
    return o.view(E, H, r, -1), lse


# -- backward -------------------------------------------------------------------------------------------
def attention_backward(plan: Plan, dout, q, k, v, out, lse, bias_inputs, need_bias, dlse=None):
    """-> dq [B, H, n_pad, D], dk, dv [B, H, n_pad + g, D], the bias inputs' gradients (None where
    not needed). dlse [B, H, n_pad] or None: the gradient of the returned log-sum-exp; since
    ∂lse_i/∂s_ij = P_ij it enters as dS = P ∘ (dP - (rowsum(dO ∘ O) - dlse))."""
    B, H, n_pad, D = q.shape
    layout, b = plan.layout, plan.layout.tile
    nb = layout.num_blocks
    cdt = compute_dtype(q.dtype)
    if plan.batch_slices > 1:  # (no bias, no dense rows: see `engine._recomputed`)
        dq = torch.empty(B, n_pad, H, D, dtype=q.dtype, device=q.device)
        dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
        for s in plan.slices(B):
            dq_s, dk[s], dv[s], _ = attention_backward(plan.for_batch(s, B), dout[s], q[s], k[s], v[s], out[s], lse[s],
                                                       (), (), None if dlse is None else dlse[s])
            dq[s] = dq_s.transpose(1, 2)
        return dq.transpose(1, 2), dk, dv, [None] * len(bias_inputs)
    gather = KeySource(k, v, _key_pad(layout), layout, extra_tokens=plan.extra_tokens)
    dq = torch.empty(B, n_pad, H, D, dtype=q.dtype, device=q.device)  # every row written once
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    dbias = [torch.zeros(t.shape, dtype=cdt, device=t.device) if need else None
             for t, need in zip(bias_inputs, need_bias, strict=True)]
    want_bias = plan.bias is not None and any(need_bias)
    buf = _Scratch(q.device)
    for c0 in range(0, nb, plan.chunk):
        c1 = min(c0 + plan.chunk, nb)
        nc = c1 - c0
        t = _sparse_tile(plan, q, gather, c0, c1, bias_inputs)
        rows = slice(c0 * b, c1 * b)
        do = _blocked(dout[:, :, rows], nc, cdt)  # (E, H, b, D)
        o = _blocked(out[:, :, rows], nc, cdt)
        lse_c, dlse_c = (None if x is None else _blocked_rows(x[:, :, rows], nc) for x in (lse, dlse))  # (E, H, b)
        dq_c, dk_c, dv_c, ds = backward_tile(t, plan, buf, do, o, lse_c, want_bias, dlse_c)
        dq.view(B, nb, b, H, D)[:, c0:c1] = dq_c.view(B, nc, H, b, D).transpose(2, 3)
        gather.scatter_add_(dk, dv, (dk_c, dv_c), c0, c1)
        if want_bias:
            add_rows_(dbias, _bias_backward(t, plan, ds.view(B, nc, H, b, -1)), c0 * b)
    for toks in _dense_spans(plan):  # in tiles of keys: each tile's key gradients are final
        do, o = (x[:, :, toks].to(cdt) for x in (dout, out))
        dq_d = torch.zeros(B, H, len(toks), D, dtype=cdt, device=q.device)
        for j0, j1 in _key_spans(plan, _key_pad(layout), k.shape[2]):
            t = _dense_tile(plan, q, gather, toks, bias_inputs, j0, j1)
            dq_c, dk_c, dv_c, ds = backward_tile(t, plan, buf, do, o, lse[:, :, toks], want_bias,
                                                 None if dlse is None else dlse[:, :, toks])
            dq_d += dq_c
            dk[:, :, j0:j1] += dk_c
            dv[:, :, j0:j1] += dv_c
            if want_bias:
                add_rows_at_(dbias, _bias_backward(t, plan, ds.unsqueeze(1)), toks)
        dq[:, toks] = dq_d.transpose(1, 2).to(q.dtype)  # the sparse pass wrote zeros there
    dbias = [None if g is None else g.to(t.dtype) for g, t in zip(dbias, bias_inputs, strict=True)]
    return dq.transpose(1, 2), dk.to(k.dtype), dv.to(v.dtype), dbias


def backward_tile(t: Tile, plan: Plan, buf: _Scratch, do, o, lse, want_ds: bool, dlse=None):
    """One tile's gradients from dO [E, H, r, D], O and lse [E, H, r] (and the lse's own gradient
    dlse [E, H, r] or None) -> dq [E, H, r, D], dk, dv [E, H, c, D] (possibly in `buf`: consume
    before the next tile) and dS [E, H, r, c] when asked."""
    if plan.fused and not want_ds and dlse is None:
        return (*_FLASH_BACKWARD(do, t.q, t.k, t.v, o, lse, 0.0, False, attn_mask=_float_mask(t, plan, buf),
                                 scale=t.scale), None)
    E, H, r, D = t.q.shape
    c = t.k.shape[2]
    s = _scores(t, plan, buf.get("s", t.score_shape, t.q.dtype))
    p = s.sub_(lse.unsqueeze(-1)).exp_()  # P: masked entries and rows with no key are exp(-inf) = 0
    q3, k3, v3, do3 = (x.reshape(E * H, -1, D) for x in (t.q, t.k, t.v, do))
    dp = torch.bmm(do3, v3.transpose(1, 2), out=buf.get("dp", (E * H, r, c), t.q.dtype)).view(E, H, r, c)
    keep = None
    if plan.dropout is not None:
        keep = t.drop_keep(plan.dropout)
        dp.masked_fill_(~keep, 0.0).mul_(plan.dropout.scale)
    delta = (do * o).sum(dim=-1, keepdim=True)  # rowsum(dO ∘ O) [E, H, r, 1]
    if dlse is not None:
        delta = delta - torch.nan_to_num(dlse.to(delta.dtype), nan=0.0, posinf=0.0, neginf=0.0).unsqueeze(-1)
    ds = dp.sub_(delta).mul_(p)  # dS = P ∘ (dP - delta), in dp's buffer
    ds3 = ds.view(E * H, r, c)
    dq = torch.bmm(ds3, k3).mul_(t.scale)
    if keep is not None:  # P -> the dropped, rescaled P that weighted the values
        p.masked_fill_(~keep, 0.0).mul_(plan.dropout.scale)
    p3 = p.view(E * H, r, c)
    dk = torch.bmm(ds3.transpose(1, 2), q3, out=buf.get("dk", (E * H, c, D), t.q.dtype)).mul_(t.scale)
    dv = torch.bmm(p3.transpose(1, 2), do3, out=buf.get("dv", (E * H, c, D), t.q.dtype))
    return dq.view(E, H, r, D), dk.view(E, H, c, D), dv.view(E, H, c, D), (ds if want_ds else None)


def _float_mask(t: Tile, plan: Plan, buf: _Scratch) -> torch.Tensor | None:
    """The fused kernel's additive mask: the bias (if any) with -inf where the token mask says no,
    in the compute dtype; the token mask's own broadcast shape without a bias, [E, H, r, c] with
    one; None when every pair is allowed and unbiased."""
    if t.mask is None and plan.bias is None:
        return None
    if plan.bias is None:
        return buf.get("fm", t.mask.shape, t.q.dtype).zero_().masked_fill_(~t.mask, float("-inf"))
    E, H, r, c = t.score_shape
    fm = buf.get("fm", (E, H, r, c), t.q.dtype)
    if t.extra != t.bias_extra:  # a dense-row tile of keys without the extra keys
        _add_bias(t, plan, fm.zero_())
        return fm if t.mask is None else fm.masked_fill_(~t.mask, float("-inf"))
    R = t.q_tok.shape[0]
    mask = None
    if t.mask is not None:  # [B·R or 1, Hp, r, c] -> [B or 1, R, Hp, r, c]
        mask = t.mask.unsqueeze(1) if R == 1 else t.mask.view(-1, R, *t.mask.shape[1:])
    plan.bias.masked_into(fm.view(t.batch, R, H, r, c), mask, t.q_tok, t.kv_tok, *t.bias_rows)
    return fm


# -- tiles: what one kernel call sees -------------------------------------------------------------------
@dataclasses.dataclass
class Tile:
    """One kernel call: E groups of r query rows against c key columns each."""

    q: torch.Tensor  # [E, H, r, D] compute dtype
    k: torch.Tensor  # [E, H, c, D]
    v: torch.Tensor
    mask: torch.Tensor | None  # bool broadcastable to [E, H, r, c]
    scale: float
    q_tok: torch.Tensor  # [R, r] query positions (R groups; E = B·R)
    kv_tok: torch.Tensor  # [Hp, R, c_blocks] key positions of the block columns
    extra: int  # extra key columns after the block columns (g, or 0 in a dense-row tile of keys)
    batch: int
    n_real: int  # the unpadded length N (extra key e sits at N + e for dropout)
    bias_rows: list[torch.Tensor]
    bias_extra: int  # g: the extra-key columns a bias appends

    @property
    def score_shape(self):
        return (self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[2])

    def drop_keep(self, dropout: AttentionDropout) -> torch.Tensor:
        """[E, H, r, c] bool: the pairs dropout keeps, from the hash of their coordinates."""
        B, H, R, r = self.batch, self.q.shape[1], self.q_tok.shape[0], self.q_tok.shape[1]
        idx = dropout.index
        dev = self.q.device
        bi = _lookup(idx.batch, torch.arange(B, device=dev)).view(B, 1, 1, 1, 1)
        hi = _lookup(idx.head, torch.arange(H, device=dev)).view(1, 1, H, 1, 1)
        qi = _positions(idx.query, self.q_tok, B).unsqueeze(2).unsqueeze(-1)  # (B or 1, R, 1, r, 1)
        rk = row_keys(dropout.seed, bi, hi, qi)  # (B, R, H, r, 1)
        kv = self.kv_tok.permute(1, 0, 2)  # (R, Hp, c_blocks)
        cols = _positions(idx.key, kv, B)  # (B or 1, R, Hp, c_blocks)
        if self.extra:
            e = torch.arange(self.extra, device=dev)
            ext = self.n_real + e if idx.extra is None else idx.extra.to(dev)
            ext = ext.view(-1, 1, 1, self.extra) if ext.dim() == 2 else ext.view(1, 1, 1, self.extra)
            bm = max(cols.shape[0], ext.shape[0])
            cols = torch.cat([cols.expand(bm, *cols.shape[1:]), ext.expand(bm, R, cols.shape[2], self.extra)], -1)
        ck = col_keys(dropout.seed, cols).unsqueeze(3)  # (B or 1, R, Hp, 1, c)
        keep = keep_from_keys(rk, ck, dropout.p)  # (B, R, H, r, c)
        return keep.reshape(B * R, H, r, keep.shape[-1])


def _lookup(table, default):
    return default if table is None else table.to(default.device)


def _positions(table, tok, B):
    """Natural positions of engine positions `tok` (any shape): table [N] or [B, N] or None (identity);
    -> tok's shape with a leading batch axis (B or 1). Padding positions (>= N) map to anything."""
    if table is None:
        return tok.unsqueeze(0)
    table = table.to(tok.device)
    n = table.shape[-1]
    clamped = tok.clamp(max=n - 1)
    if table.dim() == 1:
        return table[clamped].unsqueeze(0)
    return table[:, clamped.flatten()].view(B, *tok.shape)


def _sparse_tile(plan: Plan, q, gather: KeySource, c0: int, c1: int, bias_inputs) -> Tile:
    """Query blocks [c0, c1) against their gathered key blocks (and the extra keys)."""
    B, H, n_pad, D = q.shape
    layout, b = plan.layout, plan.layout.tile
    nc = c1 - c0
    cdt = compute_dtype(q.dtype)
    kg, vg = gather(c0, c1)  # (E, H, k·b (+ g), D)
    qc = _blocked(q[:, :, c0 * b : c1 * b], nc, cdt)  # (E, H, b, D)
    mask = chunk_mask(layout, plan.keep, c0, c1, B, plan.keep_e, plan.live)
    offs = torch.arange(b, device=q.device)
    q_tok = (torch.arange(c0, c1, device=q.device) * b)[:, None] + offs  # (nc, b)
    kv_tok = (layout.kv_index[:, c0:c1, :, None] * b + offs).flatten(2)  # (Hp, nc, k·b)
    rows = rows_of(bias_inputs, c0 * b, c1 * b, nc) if plan.bias is not None else []
    return Tile(qc, kg.to(cdt), vg.to(cdt), mask, plan.scale, q_tok, kv_tok, gather.g, B, layout.n_kv, rows, gather.g)


def _dense_tile(plan: Plan, q, gather: KeySource, toks: torch.Tensor, bias_inputs, j0: int, j1: int) -> Tile:
    """Dense-row tokens `toks` [r] against keys [j0, j1) of [every key ; the extra keys]: one group,
    E = B. Tiles of keys split the block keys only; the last one holds every extra key."""
    B = q.shape[0]
    n_pad = _key_pad(plan.layout)  # the block keys (padded), before the extra keys
    cdt = compute_dtype(q.dtype)
    mask = dense_mask(plan.layout, plan.keep, plan.keep_e, toks, n_pad, B)
    if mask is not None and (j0, j1) != (0, mask.shape[-1]):
        mask = mask[..., j0:j1]
    kv_tok = torch.arange(j0, min(j1, n_pad), device=q.device).view(1, 1, -1)
    rows = rows_at(bias_inputs, toks) if plan.bias is not None else []
    keys, values = (x[:, :, j0:j1].to(cdt) for x in (gather.keys, gather.values))
    return Tile(q[:, :, toks].to(cdt), keys, values, mask, plan.scale, toks[None], kv_tok, max(j1 - n_pad, 0), B,
                plan.layout.n_kv, rows, gather.g)


def _key_pad(layout: BlockLayout) -> int:
    """The padded block keys nbk·b (the extra keys follow them)."""
    return layout.num_kv_blocks * layout.tile


def _key_spans(plan: Plan, n_pad: int, total: int):
    """[j0, j1) tiles of at most `plan.dense_keys` block keys; the last one also holds the extra keys."""
    edges = list(range(0, n_pad, plan.dense_keys))
    return list(zip(edges, edges[1:] + [total], strict=True))


def _dense_spans(plan: Plan):
    """Dense-row tokens in chunks of at most `plan.dense_chunk`, rows that see every key first."""
    layout, b = plan.layout, plan.layout.tile
    if len(layout.dense_rows) == 0:
        return
    offs = torch.arange(b, device=layout.dense_rows.device)
    for rows in (layout.dense_rows[layout.dense_full], layout.dense_rows[~layout.dense_full]):
        toks = (rows[:, None] * b + offs).flatten()
        for s0 in range(0, len(toks), plan.dense_chunk):
            yield toks[s0 : s0 + plan.dense_chunk]


def _scores(t: Tile, plan: Plan, s: torch.Tensor) -> torch.Tensor:
    """s [E, H, r, c] <- q kᵀ·scale + bias, masked with -inf."""
    E, H, r, c = s.shape
    D = t.q.shape[-1]
    s3 = s.view(E * H, r, c)
    torch.baddbmm(s3, t.q.reshape(E * H, r, D), t.k.reshape(E * H, c, D).transpose(1, 2), beta=0, alpha=t.scale,
                  out=s3)
    if plan.bias is not None:
        _add_bias(t, plan, s)
    if t.mask is not None:
        s.masked_fill_(~t.mask, float("-inf"))
    return s


def _add_bias(t: Tile, plan: Plan, s: torch.Tensor) -> None:
    """s [E, H, r, c] += the bias. A dense-row tile of keys without the extra keys takes the bias's
    block columns only (the bias always appends the g extra keys' columns)."""
    E, H, r, c = s.shape
    s5 = s.view(t.batch, t.q_tok.shape[0], H, r, c)
    if t.extra == t.bias_extra:
        plan.bias.add_to(s5, t.q_tok, t.kv_tok, *t.bias_rows)
    else:  # through `add_to` too, so that any per-row constant it adds is the same in every tile
        full = s5.new_zeros(*s5.shape[:-1], c + t.bias_extra - t.extra)
        plan.bias.add_to(full, t.q_tok, t.kv_tok, *t.bias_rows)
        s5 += full[..., :c]


def _bias_backward(t: Tile, plan: Plan, ds: torch.Tensor):
    """The bias inputs' row gradients for a tile's dS [B, R, H, r, c] (zeros for extra columns it lacks)."""
    if t.extra != t.bias_extra:
        ds = torch.nn.functional.pad(ds, (0, t.bias_extra - t.extra))
    return plan.bias.backward(ds, t.q_tok, t.kv_tok, *t.bias_rows)


def _blocked_rows(x: torch.Tensor, nc: int) -> torch.Tensor:
    """[B, H, nc·b] -> [B·nc, H, b]."""
    B, H, m = x.shape
    return x.unflatten(2, (nc, m // nc)).transpose(1, 2).reshape(B * nc, H, m // nc)


def _blocked(x: torch.Tensor, nc: int, dtype) -> torch.Tensor:
    """[B, H, nc·b, D] (any strides) -> [B·nc, H, b, D] contiguous in `dtype`."""
    B, H, m, D = x.shape
    return x.unflatten(2, (nc, m // nc)).transpose(1, 2).reshape(B * nc, H, m // nc, D).to(dtype)


class _Scratch:
    """Buffers reused by every tile of one pass (on CPU a fresh multi-MB allocation per chunk page-faults)."""

    def __init__(self, device):
        self.device = device
        self.store: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        have = self.store.get(name)
        if have is None or have.numel() < numel or have.dtype != dtype:
            have = torch.empty(numel, dtype=dtype, device=self.device)
            self.store[name] = have
        return have[:numel].view(shape)

    def owned(self, t: torch.Tensor) -> torch.Tensor:
        """t itself, or a copy when it lives in one of these buffers."""
        return t.clone() if any(t.data_ptr() == b.data_ptr() for b in self.store.values()) else t
