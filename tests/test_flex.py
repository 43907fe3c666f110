"""The FlexAttention backend against the dense oracle, and the engine on the same descriptions.

Flex's eager path (compiled=False) runs on CPU in float64: it evaluates the `mask_mod` on every
pair and ignores the blocks, so the BlockMask's block structure is checked separately, by
simulating what the compiled kernels do (full tiles without the mask_mod, partial tiles with it,
skipped tiles not at all). Compiled CPU flex (float32, inference only) runs in one slow test.
"""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from conftest import TOL, assert_close, lengths_mask, random_qkv
from longrange.patterns import (
    BlockWindow,
    Dilated,
    Empty,
    Full,
    Global,
    RandomBlocks,
    Window,
    fixed,
    global_blocks,
    strided,
)
from longrange.sparse import flex
from longrange.sparse.backends import run_layout
from longrange.sparse.engine import block_sparse_attention
from longrange.sparse.flex import FlexUnavailable, block_mask, flex_block_sparse_attention
from longrange.sparse.score import ScoreTerm, alibi, alibi_slopes, relative_position

pytest.importorskip("torch.nn.attention.flex_attention")

PATTERNS = {
    "window2": lambda h, b: Window(2),
    "causal_window3_or_global": lambda h, b: Window(3, causal=True) | Global([0, -1]),
    "dilated_per_head": lambda h, b: Dilated(1, dilation=tuple(range(1, h + 1))),
    "bigbird_like": lambda h, b: BlockWindow(1, 3) | global_blocks(3) | RandomBlocks(1, 3, num_heads=h, seed=3),
    "strided": lambda h, b: strided(3),
    "fixed_bidir": lambda h, b: fixed(4, 1, causal=False),
    "full": lambda h, b: Full(),
}
SHAPES = [(1, 1, 1, 4), (2, 2, 8, 4), (3, 3, 13, 4), (2, 1, 17, 3), (1, 2, 24, 2), (2, 3, 37, 8)]  # (B, H, n, tile)


def oracle(q, k, v, mask, bias=None, scale=None):
    """softmax(q kᵀ · scale + bias, masked) v in float64; rows with no key give zeros.
    mask broadcastable to [B, H, n, m]; bias likewise (float)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.expand_as(probs).any(-1, keepdim=True), probs, 0.0)
    return (probs @ v.double()).to(q.dtype)


def dense(pattern, n, n_kv=None, q_offset=0, keep=None):
    """[B or 1, Hp, n, n_kv] bool: the pattern on absolute positions, padding keys removed."""
    n_kv = n if n_kv is None else n_kv
    m = pattern.to_dense(max(n_kv, q_offset + n))
    m = (m if m.dim() == 3 else m[None])[None, :, q_offset : q_offset + n, :n_kv]
    return m if keep is None else m & keep[:, None, None, :]


def eager(*args, **kwargs):
    return flex_block_sparse_attention(*args, compiled=False, **kwargs)


def simulate(bm, B, H):
    """What a compiled flex kernel allows, [B, H, q_len, kv_len] bool: full tiles as they are,
    partial tiles through the mask_mod, other tiles not at all."""
    q_len, kv_len = bm.seq_lengths
    tq, tk = bm.BLOCK_SIZE

    def tiles(num, idx):
        cols = idx.shape[-1]
        m = torch.zeros(*idx.shape[:-1], cols + 1, dtype=torch.bool)
        used = torch.arange(cols) < num[..., None]
        m.scatter_(-1, torch.where(used, idx.long(), cols), True)
        m = m[..., :cols].repeat_interleave(tq, -2).repeat_interleave(tk, -1)
        return m[..., :q_len, :kv_len]

    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = torch.arange(q_len).view(1, 1, q_len, 1)
    kv = torch.arange(kv_len).view(1, 1, 1, kv_len)
    pred = bm.mask_mod(b, h, q, kv).expand(B, H, q_len, kv_len)
    partial = tiles(bm.kv_num_blocks, bm.kv_indices).expand(B, H, q_len, kv_len)
    full = tiles(bm.full_kv_num_blocks, bm.full_kv_indices).expand(B, H, q_len, kv_len)
    assert not (partial & full).any(), "a tile is both partial and full"
    return full | (partial & pred)


# -- the lowering: block structure -----------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "heads", "n", "tile"), SHAPES)
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_block_mask_is_exact_for_the_compiled_kernels(name, batch, heads, n, tile):
    pattern = PATTERNS[name](heads, tile)
    layout = lr.compile_layout(pattern, n, tile)
    keep = lengths_mask([n, max(n - tile - 1, 0), 0][:batch], n)
    for kpm in (None, keep):
        bm = layout.to_block_mask(kpm)
        hp = pattern.num_heads or 1
        nb = -(-n // tile)
        assert bm.kv_indices.shape == (1, hp, nb, nb) and bm.BLOCK_SIZE == (tile, tile)
        assert bm.seq_lengths == (n, n)
        want = dense(pattern, n, keep=kpm).expand(batch, heads, n, n)
        assert torch.equal(simulate(bm, batch, heads), want)
    # as sparse as the layout: every visited tile once, dense (global) rows with their real tiles only
    bm = layout.to_block_mask()
    codes = layout.tile_codes()
    assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) == int((codes > 0).sum())
    full_tiles = int(bm.full_kv_num_blocks.sum())
    last_padded = (codes[..., -1] == 2).sum() if n % tile else 0
    assert full_tiles == int((codes == 2).sum()) - int(last_padded)


def test_dense_rows_are_rows_with_more_key_blocks():
    """A global query block is an ordinary BlockMask row that visits every key block it really sees."""
    pattern = Window(1) | Global([0])
    layout = lr.compile_layout(pattern, 24, 2)
    assert layout.dense_rows.tolist() == [0]
    bm = layout.to_block_mask()
    assert int(bm.full_kv_num_blocks[0, 0, 0]) == 1 and int(bm.kv_num_blocks[0, 0, 0]) == 11  # tile (0, 0) is full
    assert torch.equal(simulate(bm, 1, 1), dense(pattern, 24))


def test_block_mask_with_extra_keys_and_per_query_keep():
    n, tile, g = 11, 4, 3
    layout = lr.compile_layout(Window(2) | Global([4]), n, tile)
    keep = lengths_mask([n, 7], n)
    gen = torch.Generator().manual_seed(0)
    for keep_e in (torch.rand(2, g, generator=gen) > 0.4, torch.rand(2, n, g, generator=gen) > 0.4):
        bm = layout.to_block_mask(keep, extra_keep=keep_e)
        start = 3 * tile  # extra keys after the padded keys
        assert bm.seq_lengths == (n, start + g)
        got = simulate(bm, 2, 1)
        assert torch.equal(got[..., :n], dense(Window(2) | Global([4]), n, keep=keep).expand(2, 1, n, n))
        assert not got[..., n:start].any(), "tile padding keys are never seen"
        want_e = keep_e[:, None, None, :] if keep_e.dim() == 2 else keep_e[:, None]
        assert torch.equal(got[..., start:], want_e.expand(2, 1, n, g))


def test_block_mask_structure_is_cached_with_the_layout():
    layout = lr.compile_layout(Window(2) | Global([0]), 20, 4)
    a, b = block_mask(layout), layout.to_block_mask()
    assert a.kv_indices is b.kv_indices and a.full_kv_indices is b.full_kv_indices and a.q_indices is b.q_indices
    keep1, keep2 = lengths_mask([20, 18], 20), lengths_mask([17, 20], 20)
    c, d = layout.to_block_mask(keep1), layout.to_block_mask(keep2)  # same padded key tile: one structure
    assert c.kv_indices is d.kv_indices and c.mask_mod is not d.mask_mod
    e = layout.to_block_mask(lengths_mask([20, 9], 20))  # another tile padded: another structure
    assert e.kv_indices is not c.kv_indices
    assert flex.compiled_flex(layout) is flex.compiled_flex(layout)
    assert layout.to("cpu") is layout, "moving to the device it is on keeps the cache"


# -- eager flex vs the oracle, float64 ------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "heads", "n", "tile"), SHAPES)
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_flex_matches_dense_reference(name, batch, heads, n, tile):
    pattern = PATTERNS[name](heads, tile)
    q, k, v = random_qkv(batch, heads, n, 4, seed=n)
    keep = lengths_mask([n, max(n - tile - 1, 1), 0][:batch], n)
    if batch >= 2:
        keep[1, 0] = False  # padding need not be at the end
    layout = lr.compile_layout(pattern, n, tile)
    assert_close(eager(q, k, v, layout), oracle(q, k, v, dense(pattern, n)))
    out = eager(q, k, v, layout, keep, scale=0.3)
    assert_close(out, oracle(q, k, v, dense(pattern, n, keep=keep), scale=0.3))
    assert_close(out, block_sparse_attention(q, k, v, layout, keep, scale=0.3), msg="flex vs engine")
    if batch == 3:
        assert (out[2] == 0).all(), "a fully padded example gives zeros"


def test_rows_without_keys_are_zero_not_nan():
    q, k, v = random_qkv(2, 2, 11, 4)
    assert (eager(q, k, v, lr.compile_layout(Empty(), 11, 4)) == 0).all()
    out = eager(q, k, v, lr.compile_layout(Window(1) | Global([0]), 11, 4), lengths_mask([11, 0], 11))
    assert torch.isfinite(out).all() and (out[1] == 0).all()


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("tile", [2, 4, 5])
def test_flex_extra_keys_match_oracle_and_engine(per_query, tile):
    """Per-example global keys (Longformer's) as extra key tiles: keep [B, g] or per query [B, n, g]."""
    B, H, n, D, g = 3, 2, 13, 4, 3
    pattern = Window(2) | Global([5])
    q, k, v = random_qkv(B, H, n, D, seed=4)
    k_e, v_e, _ = random_qkv(B, H, g, D, seed=5)
    gen = torch.Generator().manual_seed(6)
    keep_e = torch.rand(B, n, g, generator=gen) > 0.4 if per_query else torch.rand(B, g, generator=gen) > 0.3
    keep = lengths_mask([n, 9, 0], n)
    layout = lr.compile_layout(pattern, n, tile)
    out = eager(q, k, v, layout, keep, extra_kv=(k_e, v_e, keep_e))
    mask_e = keep_e[:, None] if per_query else keep_e[:, None, None, :]
    mask = torch.cat([dense(pattern, n, keep=keep).expand(B, 1, n, n), mask_e.expand(B, 1, n, g)], dim=-1)
    assert_close(out, oracle(q, torch.cat([k, k_e], 2), torch.cat([v, v_e], 2), mask))
    assert_close(out, block_sparse_attention(q, k, v, layout, keep, extra_kv=(k_e, v_e, keep_e)), msg="vs engine")


def test_longformer_global_rows_and_long_rows_on_flex():
    """Longformer's local rows on flex (window keys + the example's global keys as extra keys) equal the
    engine's `long_rows`, which the mechanism tests hold to its oracle."""
    from longrange.mechanisms.globals import global_indices, long_rows, take_tokens

    B, H, n, D = 2, 2, 19, 4
    q, k, v = random_qkv(B, H, n, D, seed=8)
    keep = lengths_mask([n, 15], n)
    gmask = torch.zeros(B, n, dtype=torch.bool)
    gmask[0, [0, 7]] = True
    gmask[1, 3] = True
    layout = lr.compile_layout(Window(2), n, 4)
    want, _, _ = long_rows(q, k, v, layout, keep, gmask, block_sparse_attention)
    idx, valid = global_indices(gmask, keep)
    extra = (take_tokens(k, idx), take_tokens(v, idx), valid)
    got = eager(q, k, v, layout, keep & ~gmask, extra_kv=extra)
    assert_close(got, want)


# -- rectangular layouts ------------------------------------------------------------------------------------------
RECT = [  # (n queries, n_kv keys, q_offset, tile)
    (5, 21, 16, 4),  # a segment after 16 memory tokens (XL)
    (8, 24, 16, 8),
    (7, 30, 3, 4),  # queries in the middle, keys beyond them
    (1, 30, 29, 4),  # decoding one token with a cache of 30
    (10, 10, 0, 3),
]


@pytest.mark.parametrize(("n", "n_kv", "q_offset", "tile"), RECT)
@pytest.mark.parametrize("name", ["causal_window3_or_global", "bigbird_like", "dilated_per_head", "strided"])
def test_rectangular_layouts_on_flex(name, n, n_kv, q_offset, tile):
    B, H = 2, 3
    pattern = PATTERNS[name](H, tile)
    layout = lr.compile_layout(pattern, n, tile, n_kv=n_kv, q_offset=q_offset)
    assert layout.n == n and layout.n_kv == n_kv and layout.q_offset == q_offset
    assert layout.kv_index.shape[1] == -(-n // tile) and layout.num_kv_blocks == -(-n_kv // tile)
    gen = torch.Generator().manual_seed(n_kv)
    q = torch.randn(B, H, n, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, H, n_kv, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    keep = lengths_mask([n_kv, n_kv - 3], n_kv)
    want = dense(pattern, n, n_kv, q_offset, keep)
    assert torch.equal(simulate(layout.to_block_mask(keep), B, H), want.expand(B, H, n, n_kv))
    assert_close(eager(q, k, v, layout, keep), oracle(q, k, v, want))
    assert_close(lr.sparse_attention(q, k, v, layout, key_padding_mask=keep, backend="flex", compiled=False),
                 oracle(q, k, v, want))


@pytest.mark.parametrize(("n", "n_kv", "q_offset", "tile"), RECT)
@pytest.mark.parametrize("name", ["causal_window3_or_global", "bigbird_like", "dilated_per_head", "strided"])
def test_rectangular_layouts_on_the_engine(name, n, n_kv, q_offset, tile):
    """The engine runs n queries among n_kv keys too (dense rows, padding, extra keys), forward and
    through its recomputing backward, equal to the dense oracle in float64."""
    B, H = 2, 3
    pattern = PATTERNS[name](H, tile)
    layout = lr.compile_layout(pattern, n, tile, n_kv=n_kv, q_offset=q_offset)
    gen = torch.Generator().manual_seed(n_kv + 1)
    q = torch.randn(B, H, n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, H, n_kv, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k_e, v_e = (torch.randn(B, H, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keep = lengths_mask([n_kv, n_kv - 3], n_kv)
    keep_e = torch.tensor([[True, False], [True, True]])
    base = dense(pattern, n, n_kv, q_offset, keep).expand(B, H, n, n_kv)
    want_mask = torch.cat([base, keep_e[:, None, None].expand(B, H, n, 2)], -1)
    with torch.no_grad():
        got = lr.sparse_attention(q, k, v, layout, key_padding_mask=keep, backend="engine")
        assert_close(got, oracle(q, k, v, dense(pattern, n, n_kv, q_offset, keep)))
    inputs = (q, k, v, k_e, v_e)
    got = block_sparse_attention(q, k, v, layout, keep, extra_kv=(k_e, v_e, keep_e))
    want = oracle(q, torch.cat([k, k_e], 2), torch.cat([v, v_e], 2), want_mask)
    assert_close(got, want)
    weight = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((got * weight).sum(), inputs)
    want_grads = torch.autograd.grad((want * weight).sum(), inputs)
    for name_, g, w in zip("q k v k_e v_e".split(), grads, want_grads, strict=True):
        assert_close(g, w, msg=f"d{name_}")


# -- score terms ---------------------------------------------------------------------------------------------
def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s12 = alibi_slopes(12)
    assert torch.allclose(s12[:8], alibi_slopes(8)) and torch.allclose(s12[8:], alibi_slopes(16)[0::2][:4])


@pytest.mark.parametrize("name", ["causal_window3_or_global", "bigbird_like", "full"])
@pytest.mark.parametrize(("n", "tile"), [(13, 4), (24, 8), (7, 3)])
def test_alibi_on_both_backends_matches_dense(name, n, tile):
    B, H = 2, 3
    pattern = PATTERNS[name](H, tile)
    q, k, v = random_qkv(B, H, n, 4, seed=n)
    keep = lengths_mask([n, n - 2], n)
    term = alibi(alibi_slopes(H).double() * 4)  # steeper slopes: the bias matters at these lengths
    mask = dense(pattern, n, keep=keep)
    want = oracle(q, k, v, mask, bias=term.dense(n))
    layout = lr.compile_layout(pattern, n, tile)
    assert_close(eager(q, k, v, layout, keep, score=term), want, msg="flex")
    assert_close(lr.sparse_attention(q, k, v, pattern, tile, keep, score=term), want, msg="engine")
    assert not torch.allclose(want, oracle(q, k, v, mask)), "the term changes the result"


def test_score_term_on_rectangular_layouts_and_extra_keys():
    """Positions are absolute: queries at q_offset + i, extra keys at n_kv + e."""
    B, H, n, n_kv, off, g, tile = 2, 2, 6, 20, 14, 2, 4
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(H, 64, generator=gen, dtype=torch.float64)
    term = ScoreTerm(lambda b, h, q, kv: table[h, (kv - q).clamp(-31, 32) + 31], heads=H)
    q = torch.randn(B, H, n, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, H, n_kv, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    k_e, v_e = (torch.randn(B, H, g, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    keep_e = torch.tensor([[True, False], [True, True]])
    pattern = Window(4, causal=True)
    layout = lr.compile_layout(pattern, n, tile, n_kv=n_kv, q_offset=off)
    got = eager(q, k, v, layout, extra_kv=(k_e, v_e, keep_e), score=term)
    mask = torch.cat([dense(pattern, n, n_kv, off).expand(B, 1, n, n_kv), keep_e[:, None, None].expand(B, 1, n, g)], -1)
    want = oracle(q, torch.cat([k, k_e], 2), torch.cat([v, v_e], 2), mask, bias=term.dense(n, n_kv, off, g))
    assert_close(got, want)
    engine = run_layout(q, k, v, layout, backend="engine", extra_kv=(k_e, v_e, keep_e), score=term)
    assert_close(engine, want, msg="engine")


def etc_inputs(g, n, radius=3, max_distance=2, tile=4, seed=0):
    module = lr.build_attention("etc", dim=16, heads=2, radius=radius, max_distance=max_distance, tile=tile).double()
    x = torch.randn(2, g + n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return module, x


@pytest.mark.parametrize(("g", "n", "tile"), [(0, 17, 4), (3, 17, 4), (2, 23, 2)])
def test_etc_long_rows_on_flex_with_the_relative_position_term(g, n, tile):
    """ETC's long→long (window + relative positions) and long→global (extra keys, CROSS label, per-query
    structure mask) rows on flex and through the term's engine adapter equal the mechanism's engine path
    and its dense oracle."""
    from longrange.mechanisms.etc import dense_etc_attention, split_keep

    module, x = etc_inputs(g, n, tile=tile)
    keep = torch.ones(2, g + n, dtype=torch.bool)
    keep[1, -3:] = False
    l2g = torch.rand(2, n, g, generator=torch.Generator().manual_seed(1)) > 0.3 if g else None
    with torch.no_grad():
        q, k, v = module.project_parts(x, g)
        qa = module.relative_scores(q)
        keep_g, keep_l = split_keep(keep, g)
        want_engine = module.long_rows(q[:, :, g:], k[:, :, g:], v[:, :, g:], qa[:, :, g:], keep_l,
                                       k[:, :, :g], v[:, :, :g], keep_g, l2g)
        want = dense_etc_attention(q, k, v, module, keep, g, l2g, None, None)[:, :, g:]
        term = relative_position(qa[:, :, g:], module.config.max_distance)
        layout = module.layout(n)
        extra = None
        if g:
            keep_e = keep_g if l2g is None else l2g & keep_g[:, None, :]
            extra = (k[:, :, :g], v[:, :, :g], keep_e)
        got = eager(q[:, :, g:], k[:, :, g:], v[:, :, g:], layout, keep_l, extra_kv=extra, score=term)
        engine = block_sparse_attention(q[:, :, g:], k[:, :, g:], v[:, :, g:], layout, keep_l, extra_kv=extra,
                                        score_bias=term.engine_bias(n, g))
    assert_close(want_engine, want, msg="the mechanism's engine path vs its oracle")
    assert_close(got, want, msg="flex")
    assert_close(engine, want, msg="engine through the term's adapter")


# -- sparse_attention(backend=...) and the named errors -----------------------------------------------------------
def test_sparse_attention_backends_agree():
    q, k, v = random_qkv(2, 3, 21, 4)
    keep = lengths_mask([21, 15], 21)
    pattern = PATTERNS["bigbird_like"](3, 4)
    engine = lr.sparse_attention(q, k, v, pattern, 4, keep, backend="engine")
    assert_close(lr.sparse_attention(q, k, v, pattern, 4, keep, backend="flex", compiled=False), engine)
    # auto on CPU in float64 with grad: the engine (flex has no CPU backward)
    qg = q.clone().requires_grad_()
    out = lr.sparse_attention(qg, k, v, pattern, 4, keep, backend="auto")
    assert out.requires_grad
    assert_close(out.detach(), engine)
    name, why = flex.choose_backend(qg, lr.compile_layout(pattern, 21, 4), needs_grad=True)
    assert name == "engine" and "backward" in why


def test_bad_backend_arguments():
    q, k, v = random_qkv(1, 1, 8, 4)
    with pytest.raises(ValueError, match=r"backend must be one of \('engine', 'flex', 'auto'\)"):
        lr.sparse_attention(q, k, v, Window(1), 2, backend="triton")
    with pytest.raises(ValueError, match="compiled= applies to backend='flex' only"):
        lr.sparse_attention(q, k, v, Window(1), 2, compiled=True)
    with pytest.raises(TypeError, match="score must be a longrange ScoreTerm"):
        lr.sparse_attention(q, k, v, Window(1), 2, score=lambda s, b, h, i, j: s)
    layout = lr.compile_layout(Window(1), 8, 2)
    with pytest.raises(ValueError, match=r"k and v must be \[B, H, n_kv, D\] = \[1, 1, 8, 4\]"):
        eager(q, k[:, :, :5], v[:, :, :5], layout)
    with pytest.raises(ValueError, match="layout was compiled for 8 queries, but q has length 5"):
        eager(q[:, :, :5], k, v, layout)
    with pytest.raises(ValueError, match=r"extra_keep must be bool \[B, g\] or \[B, n, g\]"):
        layout.to_block_mask(extra_keep=torch.ones(1, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_kv must be a positive int"):
        lr.compile_layout(Window(1), 8, 2, n_kv=0)
    with pytest.raises(ValueError, match="q_offset must be a non-negative int"):
        lr.compile_layout(Window(1), 8, 2, q_offset=-1)


def test_flex_where_it_cannot_run_is_a_named_error(monkeypatch):
    q, k, v = random_qkv(1, 2, 8, 4, dtype=torch.float32)
    layout = lr.compile_layout(Window(1), 8, 2)
    with pytest.raises(FlexUnavailable, match="no backward on CPU.*backend='engine'"):
        flex_block_sparse_attention(q.requires_grad_(), k, v, layout, compiled=False)
    q = q.detach()
    with pytest.raises(FlexUnavailable, match="no attention dropout"):
        flex_block_sparse_attention(q, k, v, layout, compiled=False, dropout_p=0.1)
    with pytest.raises(FlexUnavailable, match="float32/float16/bfloat16 only, got torch.float64"):
        flex_block_sparse_attention(q.double(), k.double(), v.double(), layout)
    monkeypatch.setattr(flex, "_compiler_missing", lambda device_type: "torch.compile on CPU needs a C++ compiler")
    with pytest.raises(FlexUnavailable, match="needs a C\\+\\+ compiler"):
        lr.sparse_attention(q, k, v, layout, backend="flex")
    assert flex.choose_backend(q, layout)[0] == "engine", "auto never picks a flex that cannot run"
    with torch.no_grad():  # eager flex needs no compiler
        assert_close(flex_block_sparse_attention(q, k, v, layout, compiled=False),
                     block_sparse_attention(q, k, v, layout))


# -- compiled CPU flex ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_cpu_flex_matches_dense_reference():
    """The fused CPU kernel (float32, inference) on its block structure: per-head random blocks with
    dense rows, padding and per-example extra keys, tiles that cut BigBird's blocks, ALiBi, a
    rectangular layout. The compiled function is cached with the layout: a new padding mask with the
    same padded tiles reuses it without recompiling."""
    if flex.flex_problem(torch.zeros(1), compiled=True):
        pytest.skip(flex.flex_problem(torch.zeros(1), compiled=True))
    tol = TOL[torch.float32]
    B, H, n, D, g = 2, 3, 150, 16, 5
    pattern = BlockWindow(1, 16) | global_blocks(16) | RandomBlocks(1, 16, num_heads=H, seed=1)
    layout = lr.compile_layout(pattern, n, 32)  # 32-token tiles over 16-token graph blocks
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    k_e, v_e = (torch.randn(B, H, g, D, generator=gen) for _ in range(2))
    keep_e = torch.rand(B, g, generator=gen) > 0.3
    keep = lengths_mask([n, 120], n)
    term = alibi(alibi_slopes(H))
    with torch.no_grad():
        got = flex_block_sparse_attention(q, k, v, layout, keep, extra_kv=(k_e, v_e, keep_e), score=term)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        keep2 = lengths_mask([n - 1, 100], n)  # other lengths, same padded key tiles
        got2 = flex_block_sparse_attention(q, k, v, layout, keep2, extra_kv=(k_e, v_e, keep_e), score=term)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "no recompilation"
    for kp, out in ((keep, got), (keep2, got2)):
        mask = torch.cat([dense(pattern, n, keep=kp).expand(B, H, n, n), keep_e[:, None, None].expand(B, H, n, g)], -1)
        want = oracle(q, torch.cat([k, k_e], 2), torch.cat([v, v_e], 2), mask, bias=term.dense(n, num_extra=g))
        torch.testing.assert_close(out, want, **tol)
    rect = lr.compile_layout(Window(8, causal=True), 40, 16, n_kv=100, q_offset=60)
    q, k, v = torch.randn(1, 2, 40, D, generator=gen), *(torch.randn(1, 2, 100, D, generator=gen) for _ in range(2))
    with torch.no_grad():
        got = lr.sparse_attention(q, k, v, rect, backend="flex")
    torch.testing.assert_close(got, oracle(q, k, v, dense(Window(8, causal=True), 40, 100, 60)), **tol)


# -- CUDA ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tile", [64, 128])
def test_compiled_cuda_flex_forward_and_backward_match_the_engine(tile):
    """flex's fused Triton kernel, forward and backward, on a 32-token BigBird graph cut into other tiles,
    with padding and per-example extra keys, against the engine (both float32; TF32 may be on)."""
    B, H, n, D, g = 2, 4, 333, 32, 3
    pattern = BlockWindow(1, 32) | global_blocks(32) | RandomBlocks(2, 32, num_heads=H, seed=0)
    layout = lr.compile_layout(pattern, n, tile).to("cuda")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).cuda().requires_grad_() for _ in range(3))
    k_e, v_e = (torch.randn(B, H, g, D, generator=gen).cuda() for _ in range(2))
    keep_e = torch.tensor([[True, True, False], [True, False, False]], device="cuda")
    keep = lengths_mask([n, 250], n).cuda()
    term = alibi(alibi_slopes(H).cuda())
    out = flex_block_sparse_attention(q, k, v, layout, keep, extra_kv=(k_e, v_e, keep_e), score=term)
    ref = block_sparse_attention(q, k, v, layout, keep, extra_kv=(k_e, v_e, keep_e), score_bias=term.engine_bias(n, g))
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    up = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_transformer_xl_segment_on_flex_with_a_rectangular_layout_and_its_position_term():
    """XL within a segment: n queries after M memory slots (a rectangular layout), query q + u, and the
    position term (q + v)·W_r r_{q - kv} as a `distance_table` score term: equals the module's `attend`."""
    from longrange.patterns import Causal
    from longrange.sparse.score import distance_table

    B, n, M, C, H = 2, 7, 9, 16, 2
    module = lr.build_attention("xl", dim=C, heads=H, span=10).double()
    gen = torch.Generator().manual_seed(0)
    x, memory = torch.randn(B, n, C, generator=gen, dtype=torch.float64), torch.randn(B, M, C, generator=gen,
                                                                                        dtype=torch.float64)
    keep = torch.ones(B, M + n, dtype=torch.bool)
    keep[1, :3] = False  # some memory slots are padding
    with torch.no_grad():
        q, k, v = module.project_with_memory(x, memory)
        want = module.attend(q, k, v, keep)
        rel = module.position_keys(n, M + n, q)  # (H, D, R), distances M + n - 1 down
        bd = torch.matmul(q + module.position_bias[:, None], rel)  # (B, H, n, R)
        term = distance_table(bd, d_max=M + n - 1, q_offset=M, scale=q.shape[-1] ** -0.5)
        layout = lr.compile_layout(Causal() & Window(10), n, 4, n_kv=M + n, q_offset=M)
        got = eager(q + module.content_bias[:, None], k, v, layout, keep, score=term)
    assert_close(got, want)
