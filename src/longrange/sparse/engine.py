"""The one blockified sparse engine (BigBird's idea): every block pattern runs through here.

Legend: B batch, H heads, N length, D head dim, b = layout.tile (tokens per block), nb = ceil(N / b) query blocks,
k key blocks per query block, g extra (global) keys, nc query blocks per chunk.

1. Pad N up to nb·b (padding keys masked, padding queries dropped); the g extra keys, if any, go
   after the padded keys in the same buffer: k, v [B, H, nb·b + g, D], one copy at most.
2. For a chunk of query blocks, fetch its k key blocks per row with ONE index_select over the
   blocked keys/values (window, random and global blocks alike): [B·nc, H, k·b (+ g), D].
3. One fused attention kernel over the chunk, query blocks folded into the batch axis:
   [B·nc, H, b, D] x [B·nc, H, k·b, D]. A token mask is built only for chunks whose layout has
   partial or unused slots, or when keys are padded; it broadcasts over heads unless the pattern
   differs per head.
4. Dense rows (global query blocks) run against all N keys in a side path: O(g·b·N).
Optional, for relative positions and structure masks (ETC): `score_bias` adds a float term to
the scores of each chunk (`sparse.bias.ScoreBias`, built from the chunk's token positions, O(chunk)
memory), and the extra keys' keep mask may differ per query ([B, N, g] instead of [B, g]).
Memory O(N·k·b) for the scores the kernel tiles internally and O(chunk) for the gathered keys;
time O(N·k·b·D). Never an N×N tensor and no Python loop over single blocks (only over chunks,
whose size bounds the gathered-key memory). Softmax in float32 for fp16/bf16 inputs.

Two paths run these steps. Training (autograd recording the call), attention dropout and score
biases run `sparse.recompute`: a custom autograd function that saves only q, k, v, the output and
each row's log-sum-exp and recomputes each chunk's gathers and scores in backward (FlashAttention's
recomputation on blocks), so training memory stays O(N·D) plus one chunk. Plain inference runs the
chunks below with buffers reused across chunks (`_chunked`); with `_recompute=False` (tests only)
the same chunks are differentiated by autograd through the saved gathers, the reference the
recomputation is checked against. Attention dropout (`dropout_p`, `dropout_seed`) drops
probabilities by a hash of each pair's coordinates (`longrange.core.dropout`), regenerated in
backward, identical to what a dense reference with `dropout_keep` drops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longrange.core.dropout import AttentionDropout, DropoutIndex, check_dropout_p, resolve_seed
from longrange.core.masking import check_key_padding_mask, sdpa_zero_empty_rows
from longrange.sparse.bias import ScoreBias, as_score_bias, check_inputs, rows_at, rows_of
from longrange.sparse.gather import KeySource, TokenKeys, chunk_mask, dense_mask, single_tile
from longrange.sparse.layout import BlockLayout

#: gathered keys + values (+ scores) per chunk. On CPU small chunks stay cache-friendly and bound
#: forward memory; on GPU big chunks keep the kernels' launches large enough to fill the device.
CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 1 * 2**30}
#: blocks up to this many queries use `_attend_in_scratch` for CPU inference; the fused SDPA
#: kernel wins on larger ones (measured at 256: ~1.4x the other way)
SMALL_BLOCK = 64


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | TokenKeys | None = None,
    chunk_bytes: int | None = None,
    score_bias: ScoreBias | Callable | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    dropout_index: DropoutIndex | None = None,
    return_lse: bool = False,
    _recompute: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The engine. `extra_kv` = (k_e, v_e, keep_e): [B, H, g, D], [B, H, g, D] and keep_e bool
    [B, g] (keys every query sees besides its blocks: per-example global tokens, Longformer/ETC
    style) or [B, N, g] (which extra keys each query may see: ETC's structure masks). Or a
    `TokenKeys(idx, keep)`: extra keys that are tokens of k, v themselves, read in place (no copy
    of k and v to append them; layouts with dense rows take them as tensors).
    `chunk_bytes` bounds the memory of one chunk's gathered keys/values and scores (default:
    `CHUNK_BYTES` per device), in the forward and in the recomputing backward alike.

    `score_bias`: an additive term for the scores (after scaling, before the softmax), e.g.
    relative-position biases: a `longrange.sparse.ScoreBias` (whose `inputs` get gradients) or a
    plain function of the positions. It is called once per chunk with q_tok [R, r] long (the query
    positions of R query groups of r rows), kv_tok [Hp, R, c] long (the positions of each group's
    c block keys) and its inputs' rows; positions >= N are padding, masked or dropped anyway. It
    returns a float tensor broadcastable to [B, R, H, r, c (+ g)]: the block keys' columns, then
    the g extra keys'. Chunks are query blocks (R = nc, r = b, c = k·b); dense rows are one group
    against all keys (R = 1, c = nb·b). Masked pairs stay masked whatever the bias.

    `dropout_p`: attention-probability dropout, applied to the normalised probabilities, kept ones
    scaled by 1 / (1 - p); none at 0 (bit-identical to no dropout). Which pairs drop is a pure
    function of (seed, example, head, query position, key position) (`core.dropout.dropout_keep`;
    extra key e counts as position N + e), so it is reproducible, regenerated in backward without a
    stored mask, and equal to what a dense reference drops with the same seed. `dropout_seed`:
    None draws one from torch's default generator. `dropout_index` maps the engine's rows and
    columns to the caller's natural coordinates (permuted or folded sequences).

    `return_lse`: also return each query's log-sum-exp of its scaled, biased scores, [B, H, N] in
    float32 (float64 for float64 inputs), -inf for a query with no allowed key; differentiable. Two
    attentions over disjoint key sets merge exactly from (out, lse) pairs (`merge_softmax`).

    With autograd recording the call, the recomputing function of `longrange.sparse.recompute` runs
    (memory O(N·D) plus one chunk); `_recompute=False` (tests only) differentiates through the
    saved gathers instead, the path the recomputation is checked against."""
    B, H, N, D = q.shape
    b, nb = layout.tile, layout.num_blocks
    n_kv = k.shape[2]
    _check_layout_fits(layout, N, n_kv)
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, n_kv, "key_padding_mask")
    if nb * b < N:
        raise ValueError(f"layout covers {nb * b} tokens, fewer than N={N}")
    bias = as_score_bias(score_bias)
    bias_inputs = check_inputs(bias, B) if bias is not None else ()
    dropout_p = check_dropout_p(dropout_p)
    if (dropout_p > 0 or return_lse) and not _recompute:
        raise ValueError("attention dropout and return_lse need the recomputing path (_recompute=True)")
    n_pad, k_pad = nb * b, layout.num_kv_blocks * b
    keep = _padded_keep(key_padding_mask, B, n_kv, k_pad, q.device)  # [B or 1, nbk·b] or None
    extra_tokens = None
    if isinstance(extra_kv, TokenKeys):
        if len(layout.dense_rows):  # the dense pass reads the extra keys after every key: as tensors
            extra_kv = extra_kv.as_extra_kv(k, v)
        else:
            extra_tokens, keep_e = _check_token_keys(extra_kv, q, N, n_pad, n_kv)
            extra_kv = None
    k_e, v_e, keep_e = _check_extra_kv(extra_kv, q, N, n_pad) if extra_tokens is None else (None, None, keep_e)
    scale = D**-0.5 if scale is None else float(scale)
    given = q, k
    if not (single_tile(layout) and k_e is None and extra_tokens is None):  # else read as given (any strides)
        # contiguous once here, so every chunk below is a view or one gather, never a full copy
        q = _padded(q, n_pad)  # [B, H, nb·b, D]
        k, v = _padded(k, k_pad, k_e), _padded(v, k_pad, v_e)  # [B, H, nbk·b + g, D]: [keys ; padding ; extras]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *bias_inputs))
    if grad and _same_storage(q, given[0]) and _same_storage(q, given[1]) and not _same_storage(k, given[1]):
        # k and v were copied (extra keys, padding) but q is still a view of the caller's one q/k/v
        # buffer: saving it for backward would keep that whole buffer alive beside the copies. Own
        # q too (N·D more) so the buffer (3·N·D) can go.
        q = q.clone()
    if _recompute and (grad or dropout_p > 0 or bias is not None or return_lse):
        dropout = None
        if dropout_p > 0:
            dropout = AttentionDropout(dropout_p, resolve_seed(dropout_seed), dropout_index or DropoutIndex())
        out = _recomputed(q, k, v, layout, keep, keep_e, scale, chunk_bytes, bias, bias_inputs, dropout, grad,
                          return_lse, extra_tokens)
        if return_lse:
            return out[0][:, :, :N], out[1][:, :, :N]
    else:
        out = _chunked(q, k, v, layout, keep, keep_e, scale, chunk_bytes, bias, bias_inputs, reuse=not grad,
                       extra_tokens=extra_tokens)
    return out[:, :, :N]


def _check_layout_fits(layout: BlockLayout, n: int, n_kv: int) -> None:
    if layout.n_kv != n_kv or layout.n != n:
        raise ValueError(f"layout was compiled for {layout.n} queries among {layout.n_kv} keys, but q has {n} "
                         f"and k {n_kv}")


def _batch_slices(q, per_block: int, chunk_bytes: int | None) -> int:
    """How many batch slices the training path runs its chunks in (inside its one autograd
    function): chunks are query blocks of every example, so a batch of many short sequences
    (subsequences folded into the batch axis, as strided `sparse_transformer` and `dilated` do)
    can make one block's tile (its scores, dS and gathers; `per_block` bytes) far bigger than the
    budget."""
    B = q.shape[0]
    if B == 1:
        return 1
    es = 4 if q.dtype in (torch.float16, torch.bfloat16) else q.element_size()
    budget = CHUNK_BYTES.get(q.device.type, CHUNK_BYTES["cuda"]) if chunk_bytes is None else chunk_bytes
    # a tile up to q's own size keeps the peak within a constant of what is saved anyway (O(N·D));
    # more, smaller slices cost time (measured at 16K, strided's 128 subsequences: 11 slices 2.5 s
    # and +523 MiB fwd+bwd, 32 slices 2.7 s, one call 2.9 s and +1008 MiB)
    budget = max(budget, q.numel() * es) if chunk_bytes is None else budget
    return 1 if per_block <= 2 * budget else min(B, -(-per_block // budget))


def _extra_count(k: torch.Tensor, layout: BlockLayout, extra_tokens: torch.Tensor | None) -> int:
    """g: the extra keys, appended after the block keys or given as token positions."""
    return k.shape[2] - key_length(layout) if extra_tokens is None else extra_tokens.shape[1]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def key_length(layout: BlockLayout) -> int:
    """Keys the engine's buffers hold before the extra keys: nbk·b (= nb·b for self-attention)."""
    return layout.num_kv_blocks * layout.tile


def _padded(t: torch.Tensor, n_pad: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, N, D] -> contiguous [B, H, n_pad (+ g), D]: zero rows up to n_pad, then `extra`'s g
    rows. At most one copy (a cat writes every row once; padding only zeroes its own rows)."""
    B, H, N, D = t.shape
    if extra is None and N == n_pad:
        return t.contiguous()
    parts = [t]
    if n_pad > N:
        parts.append(t.new_zeros(B, H, n_pad - N, D))
    if extra is not None:
        parts.append(extra)
    return torch.cat(parts, dim=2)


def _chunked(q, k, v, layout, keep, keep_e, scale, chunk_bytes, bias, bias_inputs, reuse: bool, extra_tokens=None):
    """Inference (`reuse`: buffers shared by every chunk) or autograd through the gathers (tests)."""
    B, H, n_pad, D = q.shape
    cols = layout.blocks_per_row * layout.tile + _extra_count(k, layout, extra_tokens)
    chunk = _chunk_blocks(q, layout, cols, chunk_bytes, reuse, bias is not None)
    out = _run_chunks(q, k, v, layout, keep, keep_e, scale, chunk, cols, reuse, bias, bias_inputs,
                      extra_tokens)  # (B, H, nb·b, D)
    if len(layout.dense_rows):
        out = _dense_rows(q, k, v, layout, keep, keep_e, out, scale, inplace=reuse, score_bias=bias,
                          bias_inputs=bias_inputs)
    return out


def _recomputed(q, k, v, layout, keep, keep_e, scale, chunk_bytes, bias, bias_inputs, dropout, grad,
                want_lse=False, extra_tokens=None):
    """The training path (and any call with dropout or a score bias): `BlockSparseFunction` under
    autograd, its forward alone otherwise."""
    from longrange.sparse.recompute import BlockSparseFunction, attention_forward, public_lse

    plan = _make_plan(q, k, layout, keep, keep_e, scale, chunk_bytes, bias, dropout, grad, want_lse, extra_tokens)
    if not grad:
        out, lse, empty = attention_forward(plan, q, k, v, bias_inputs)
        return (out, public_lse(lse, empty)) if want_lse else out
    if bias is not None:
        _check_bias_declares_inputs(bias, layout, bias_inputs)
    return BlockSparseFunction.apply(plan, q, k, v, *bias_inputs)


def factor_plan(q, k, v, layout: BlockLayout, key_padding_mask=None, *, scale: float | None = None,
                dropout_p: float = 0.0, dropout_seed: int | None = None, chunk_bytes: int | None = None):
    """One factor of `sparse.factored.factored_attention` (no bias, no extra keys): q, k, v as the
    engine's training path runs them (padded to the tile, contiguous; one-tile layouts as given)
    and its `Plan`, with the row log-sum-exps that merge needs."""
    B, H, N, D = q.shape
    n_kv = k.shape[2]
    _check_layout_fits(layout, N, n_kv)
    n_pad, k_pad = layout.num_blocks * layout.tile, key_length(layout)
    keep = _padded_keep(check_key_padding_mask(key_padding_mask, B, n_kv, "key_padding_mask"), B, n_kv, k_pad,
                        q.device)
    if not single_tile(layout):
        q, k, v = _padded(q, n_pad), _padded(k, k_pad), _padded(v, k_pad)
    dropout = None
    if check_dropout_p(dropout_p) > 0:
        dropout = AttentionDropout(dropout_p, resolve_seed(dropout_seed), DropoutIndex())
    scale = D**-0.5 if scale is None else float(scale)
    plan = _make_plan(q, k, layout, keep, None, scale, chunk_bytes, None, dropout, True, True, None)
    return q, k, v, plan


def _make_plan(q, k, layout, keep, keep_e, scale, chunk_bytes, bias, dropout, grad, want_lse, extra_tokens):
    """The recomputing path's `Plan`: chunk sizes within the budget, kernels, batch slices."""
    from longrange.sparse.recompute import Plan, compute_dtype, fused_kernel_available

    B, H, n_pad, D = q.shape
    b = layout.tile
    k_pad = key_length(layout)
    g = _extra_count(k, layout, extra_tokens)
    cols = layout.blocks_per_row * b + g
    es = torch.finfo(compute_dtype(q.dtype)).bits // 8
    fused = fused_kernel_available(q.device, dropout)
    budget = CHUNK_BYTES.get(q.device.type, CHUNK_BYTES["cuda"]) if chunk_bytes is None else chunk_bytes
    # per query block: its gathered keys/values and their gradients, then score-sized buffers (scores,
    # dS, bias, the fused kernel's float mask; int64 hashes with dropout)
    per_score = es * (1 + (bias is not None)) if fused else es * (2 + (bias is not None))
    per_score += 24 if dropout is not None else 0
    per_block = B * H * (cols * D * es * 4 + b * cols * per_score)
    # dense rows against every key: the fused kernel tiles the keys itself, so only a per-row mask costs;
    # in backward, tiles of keys (their gradients are accumulated per tile)
    row_mask = bias is not None or not bool(layout.dense_full.all()) or (keep_e is not None and keep_e.dim() == 3)
    per_row = B * H * (k_pad + g) * (per_score if row_mask or not fused else 0)
    all_rows = len(layout.dense_rows) * b
    dense_rows = max(1, min(all_rows, budget // per_row)) if per_row else max(all_rows, 1)
    per_key = B * H * (dense_rows * (per_score + es) + D * es * 4)
    live = None
    if keep_e is not None and len(layout.dense_rows):  # dense rows meet their extra keys in the dense pass
        live = torch.ones(layout.num_blocks, dtype=torch.bool, device=q.device)
        live[layout.dense_rows] = False
    slices = 1 if not grad or bias is not None or len(layout.dense_rows) else _batch_slices(q, per_block, chunk_bytes)
    per_block = -(-per_block // slices)
    return Plan(layout, keep, keep_e, scale, chunk=max(1, min(layout.num_blocks, budget // per_block)),
                dense_chunk=dense_rows, dense_keys=max(1, budget // per_key), bias=bias, dropout=dropout, live=live,
                fused=fused, want_lse=want_lse, extra_tokens=extra_tokens, batch_slices=slices)


def merge_softmax(*parts: tuple[torch.Tensor, torch.Tensor], inplace: bool = False) -> torch.Tensor:
    """One softmax over the union of disjoint key sets, from each set's (out [B, H, N, D], lse
    [B, H, N]) as `block_sparse_attention(..., return_lse=True)` returns them: the outputs weighted
    by exp(lse_i - lse) with lse = log Σ exp(lse_i). Rows with no key in any set give zeros.
    Outputs may have any strides (a permuted view is read in place). `inplace`: write the result
    into the first part's output and return it (no new [B, H, N, D] tensor; only when nothing
    records autograd, else the same as out of place)."""
    lses = torch.stack([lse for _, lse in parts])  # (P, B, H, N)
    top = lses.detach().amax(0)  # any shift gives the same result: no gradient through it
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with no key anywhere
    weights = torch.exp(lses - top)  # exp(-inf) = 0 for a set without keys
    total = weights.sum(0)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    grad = torch.is_grad_enabled() and any(t.requires_grad for part in parts for t in part)
    if inplace and not grad:
        out = parts[0][0].mul_(weights[0].unsqueeze(-1).to(parts[0][0].dtype))
        for w, (o, _) in zip(weights[1:], parts[1:], strict=True):
            out.addcmul_(o, w.unsqueeze(-1).to(o.dtype))
        return out
    out = sum(w.unsqueeze(-1).to(o.dtype) * o for w, (o, _) in zip(weights, parts, strict=True))
    return out


def _check_bias_declares_inputs(bias: ScoreBias, layout: BlockLayout, bias_inputs) -> None:
    """Under autograd a bias must list every tensor it reads that needs a gradient in `inputs`:
    evaluated once on detached inputs, its result must not require grad (else that gradient would
    be lost, silently)."""
    b = layout.tile
    offs = torch.arange(b, device=layout.kv_index.device)
    kv_tok = (layout.kv_index[:, :1, :, None] * b + offs).flatten(2)  # (Hp, 1, k·b)
    with torch.enable_grad():
        got = bias(offs[None], kv_tok, *rows_of([t.detach() for t in bias_inputs], 0, b, 1))
    if isinstance(got, torch.Tensor) and got.requires_grad:
        raise ValueError("score_bias reads a tensor that requires grad without listing it in `inputs`, so its "
                         "gradient would be lost: subclass longrange.sparse.ScoreBias and declare the tensor in "
                         "`inputs` (see longrange.sparse.bias)")


def _check_token_keys(tokens: TokenKeys, q, N, n_pad, n_kv):
    """Validate `TokenKeys` -> (idx [B, g] long, keep [B, g] or [B, n_pad, g])."""
    B = q.shape[0]
    idx, keep_e = tokens.idx, tokens.keep
    if idx.dim() != 2 or idx.shape[0] != B or idx.dtype != torch.long:
        raise ValueError(f"TokenKeys idx must be long [B, g] = [{B}, g], got {idx.dtype} {list(idx.shape)}")
    g = idx.shape[1]
    if g and (int(idx.min()) < 0 or int(idx.max()) >= n_kv):
        raise ValueError(f"TokenKeys idx must be key positions in [0, {n_kv}), got {int(idx.min())}..{int(idx.max())}")
    return idx.to(q.device), _check_extra_keep(keep_e, B, N, g, n_pad)


def _check_extra_keep(keep_e, B, N, g, n_pad):
    if keep_e.dtype != torch.bool or keep_e.shape not in ((B, g), (B, N, g)):
        raise ValueError(f"extra_kv keep mask must be bool [B, g] = [{B}, {g}] or [B, N, g] = [{B}, {N}, {g}], "
                         f"got {keep_e.dtype} {list(keep_e.shape)}")
    if keep_e.dim() == 3 and n_pad > N:  # padding queries see no extra key (their rows are dropped)
        keep_e = torch.nn.functional.pad(keep_e, (0, 0, 0, n_pad - N), value=False)
    return keep_e


def _check_extra_kv(extra_kv, q, N, n_pad):
    """Validate (k_e, v_e, keep_e) -> (k_e, v_e, keep_e) or three Nones; a per-query keep_e
    [B, N, g] is padded to [B, n_pad, g]."""
    if extra_kv is None:
        return None, None, None
    B, H, _, D = q.shape
    k_e, v_e, keep_e = extra_kv
    g = k_e.shape[2] if k_e.dim() == 4 else -1
    if k_e.shape != (B, H, g, D) or v_e.shape != k_e.shape:
        raise ValueError(f"extra_kv keys and values must be [B, H, g, D] = [{B}, {H}, g, {D}], got "
                         f"{list(k_e.shape)} and {list(v_e.shape)}")
    if k_e.dtype != q.dtype or v_e.dtype != q.dtype:
        raise TypeError(f"extra_kv keys and values must have q's dtype {q.dtype}, got {k_e.dtype} and {v_e.dtype}")
    return k_e, v_e, _check_extra_keep(keep_e, B, N, g, n_pad)


def _chunk_blocks(q, layout: BlockLayout, cols: int, chunk_bytes: int | None, reuse: bool, bias: bool = False) -> int:
    """Query blocks per chunk: gathered keys, values and scores within `chunk_bytes`.

    With autograd the gathered blocks are saved for backward whatever the chunking, so chunks
    save no memory there, while each chunk's gather/slice backward would allocate and fill a
    full-size gradient (O(n²) over all chunks): one chunk then, unless the caller asks otherwise.
    """
    B, H, _, D = q.shape
    nb, b = layout.num_blocks, layout.tile
    per_block = B * H * cols * D * q.element_size() * 2 + B * H * b * cols * (8 if bias else 4)
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES.get(q.device.type, CHUNK_BYTES["cuda"])
        if not reuse:
            chunk_bytes = max(chunk_bytes, nb * per_block)
    return max(1, min(nb, chunk_bytes // per_block))


def _run_chunks(q, k, v, layout: BlockLayout, keep, keep_e, scale, chunk: int, cols: int, reuse: bool,
                score_bias=None, bias_inputs=(), extra_tokens=None):
    """Every query block through `_chunk`; returns (B, H, nb·b, D), a view of a token-major
    (B, nb·b, H, D) buffer so the caller's head merge needs no copy."""
    B, H, n_pad, D = q.shape
    nb, b = layout.num_blocks, layout.tile
    gather = KeySource(k, v, key_length(layout), layout, reuse, extra_tokens)
    scratch = None  # scores buffer for the CPU inference kernel, reused by every chunk
    if reuse and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and b <= SMALL_BLOCK:
        scratch = torch.empty(B * min(chunk, nb) * H * b * cols, dtype=q.dtype, device=q.device)
    qb = q.view(B, H, nb, b, D)
    spans = [(c0, min(c0 + chunk, nb)) for c0 in range(0, nb, chunk)]
    if reuse:  # inference: chunks written into one buffer, no graph to keep
        out = torch.empty(B, nb, b, H, D, dtype=q.dtype, device=q.device)
        for c0, c1 in spans:
            out[:, c0:c1] = _chunk(qb, gather, layout, keep, keep_e, c0, c1, scale, scratch,
                                   score_bias, bias_inputs).transpose(2, 3)
    else:
        pieces = [_chunk(qb, gather, layout, keep, keep_e, c0, c1, scale, None, score_bias,
                         bias_inputs).transpose(2, 3) for c0, c1 in spans]
        out = torch.cat(pieces, dim=1)
    return out.view(B, nb * b, H, D).transpose(1, 2)


def _padded_keep(mask, B, N, n_pad, device):
    if mask is None and n_pad == N:
        return None
    keep = torch.ones(1 if mask is None else B, n_pad, dtype=torch.bool, device=device)
    keep[:, N:] = False
    if mask is not None:
        keep[:, :N] = mask
    return keep


def _chunk(qb, gather: KeySource, layout: BlockLayout, keep, keep_e, c0, c1, scale, scratch=None,
           score_bias=None, bias_inputs=()):
    """Query blocks [c0, c1) of qb [B, H, nb, b, D]: returns [B, nc, H, b, D]."""
    B, H, _, b, D = qb.shape
    nc = c1 - c0
    kg, vg = gather(c0, c1)  # [B·nc, H, k·b (+ g), D] each
    qc = qb[:, :, c0:c1].transpose(1, 2).reshape(B * nc, H, b, D)  # (B·nc, H, b, D)
    mask = chunk_mask(layout, keep, c0, c1, B, keep_e)
    bias = None if score_bias is None else _chunk_bias(score_bias, bias_inputs, layout, c0, c1, B, kg)
    if scratch is None:
        out = sdpa_zero_empty_rows(qc, kg, vg, mask, scale, bias)  # (B·nc, H, b, D)
    else:
        out = _attend_in_scratch(qc, kg, vg, mask, scale, scratch, bias)
    return out.view(B, nc, H, b, D)


def _chunk_bias(score_bias: ScoreBias, bias_inputs, layout: BlockLayout, c0, c1, B, kg):
    """The caller's additive scores for query blocks [c0, c1): [B·nc, H or 1, b, k·b (+ g)] in kg's dtype."""
    b, nc, cols = layout.tile, c1 - c0, kg.shape[2]
    offs = torch.arange(b, device=kg.device)
    q_tok = (torch.arange(c0, c1, device=kg.device) * b)[:, None] + offs  # (nc, b)
    kv_tok = (layout.kv_index[:, c0:c1, :, None] * b + offs).flatten(2)  # (Hp, nc, k·b)
    rows = rows_of(bias_inputs, c0 * b, c1 * b, nc)
    return _as_bias(score_bias(q_tok, kv_tok, *rows), B, nc, b, cols, kg.dtype)


def _as_bias(bias: torch.Tensor, B: int, groups: int, rows: int, cols: int, dtype) -> torch.Tensor:
    """A `score_bias` result, broadcastable to [B, R, H, r, c], as SDPA's [B·R, H or 1, r, c]."""
    bias = bias.reshape((1,) * (5 - bias.dim()) + tuple(bias.shape))
    bias = bias.expand(B, groups, bias.shape[2], rows, cols)  # (B, R, H or 1, r, c)
    return bias.reshape(B * groups, bias.shape[2], rows, cols).to(dtype)


def _attend_in_scratch(q, k, v, mask, scale, scratch, bias=None):
    """CPU inference kernel: softmax(q kᵀ · scale) v as two batched matmuls, the scores in a reused
    buffer and the softmax in place. On 64-query blocks this ran ~1.5x faster than the fused CPU
    SDPA kernel (which splits such blocks into 32-row tiles). Same zero-row rule as the SDPA path.
    q [E, H, b, D], k, v [E, H, c, D], mask broadcastable to [E, H, b, c] or None."""
    E, H, b, D = q.shape
    cols = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    s = scratch[: E * H * b * cols].view(E * H, b, cols)
    torch.baddbmm(s, q.reshape(E * H, b, D), k.reshape(E * H, cols, D).transpose(1, 2), beta=0, alpha=scale, out=s)
    if bias is not None:
        s.view(E, H, b, cols).add_(bias)
    if mask is not None:
        s.view(E, H, b, cols).masked_fill_(~mask, float("-inf"))
    torch.softmax(s, dim=-1, out=s)
    if mask is not None:
        has_key = mask.any(dim=-1, keepdim=True)
        if not bool(has_key.all()):
            s.view(E, H, b, cols).masked_fill_(~has_key, 0.0)  # 0/0 rows -> zeros
    return torch.bmm(s, v.reshape(E * H, cols, D)).view(E, H, b, D)


def _dense_rows(q, k, v, layout: BlockLayout, keep, keep_e, out, scale, inplace=False, score_bias=None,
                bias_inputs=()):
    """Global query blocks against every key (and the extra keys): [B, H, g·b, D] x [B, H, nb·b (+ g), D];
    O(g·b·N). Rows that see every key (the usual global block) need no token mask at all."""
    B = q.shape[0]
    b = layout.tile
    k_pad = key_length(layout)
    offs = torch.arange(b, device=q.device)
    for rows in (layout.dense_rows[layout.dense_full], layout.dense_rows[~layout.dense_full]):
        if len(rows) == 0:
            continue
        q_tok = (rows[:, None] * b + offs).flatten()  # [g·b]
        m = dense_mask(layout, keep, keep_e, q_tok, k_pad, B)
        bias = None
        if score_bias is not None:  # one group of g·b rows against every key
            kv_tok = torch.arange(k_pad, device=q.device).view(1, 1, k_pad)
            got = score_bias(q_tok[None], kv_tok, *rows_at(bias_inputs, q_tok))
            bias = _as_bias(got, B, 1, len(q_tok), k.shape[2], q.dtype)  # (B, H|1, g·b, c)
        od = sdpa_zero_empty_rows(q[:, :, q_tok], k, v, m, scale, bias)  # [B, H, g·b, D]
        out = out.index_copy_(2, q_tok, od) if inplace else out.index_copy(2, q_tok, od)
    return out


