"""Block layouts: golden layouts drawn by hand, and the layout as the exact max-pool of the dense mask."""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from conftest import pool_dense
from longrange.patterns import (
    Band,
    BlockWindow,
    Causal,
    Dilated,
    Empty,
    Full,
    Global,
    Pattern,
    RandomBlocks,
    Segments,
    StridedColumns,
    SummaryColumns,
    Window,
    fixed,
    global_blocks,
    strided,
)
from longrange.sparse import layout as layout_module
from longrange.sparse.layout import DENSE_ROW_FACTOR


def t(rows, dtype=torch.long):
    return torch.tensor(rows, dtype=dtype)


def b(rows):
    return torch.tensor(rows, dtype=torch.bool)


# -- golden layouts --------------------------------------------------------------------------------
def test_golden_window2_n8_b2():
    # |i - j| <= 2 on 4 blocks of 2: diagonal tiles full, neighbour tiles partial (corner pair at distance 3)
    layout = lr.compile_layout(Window(2), 8, 2)
    assert layout.num_heads is None and layout.num_blocks == 4 and layout.blocks_per_row == 3
    expected = t([[2, 1, 0, 0], [1, 2, 1, 0], [0, 1, 2, 1], [0, 0, 1, 2]]).to(torch.int8)
    assert torch.equal(layout.block_matrix(), expected[None])
    assert torch.equal(layout.kv_index, t([[[0, 1, 0], [0, 1, 2], [1, 2, 3], [2, 3, 3]]]))
    assert torch.equal(layout.valid, b([[[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]]]))
    assert torch.equal(layout.partial, b([[[0, 1, 0], [1, 0, 1], [1, 0, 1], [1, 0, 0]]]))
    assert layout.dense_rows.tolist() == []


def test_golden_window2_n7_b3_last_block_is_short():
    # blocks [0 1 2] [3 4 5] [6]: the one-token tile (2, 2) is full; padding never counts
    layout = lr.compile_layout(Window(2), 7, 3)
    expected = t([[2, 1, 0], [1, 2, 1], [0, 1, 2]]).to(torch.int8)
    assert torch.equal(layout.block_matrix(), expected[None])
    assert torch.equal(layout.kv_index, t([[[0, 1, 0], [0, 1, 2], [1, 2, 2]]]))
    assert torch.equal(layout.valid, b([[[1, 1, 0], [1, 1, 1], [1, 1, 0]]]))


def test_golden_global0_or_window1_n8_b2():
    # token 0 sees everything and is seen by everyone; |i - j| <= 1 otherwise
    layout = lr.compile_layout(Global([0]) | Window(1), 8, 2)
    expected = t(
        [
            [2, 1, 1, 1],
            [1, 2, 1, 0],
            [1, 1, 2, 1],
            [1, 0, 1, 2],
        ]
    ).to(torch.int8)
    assert torch.equal(layout.block_matrix(), expected[None])
    assert torch.equal(layout.kv_index, t([[[0, 1, 2, 3], [0, 1, 2, 1], [0, 1, 2, 3], [0, 2, 3, 3]]]))
    assert torch.equal(layout.valid, b([[[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]]))
    assert torch.equal(layout.partial, b([[[0, 1, 1, 1], [1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 0, 0]]]))
    assert layout.dense_rows.tolist() == []


def test_golden_causal_window3_n8_b2():
    # i - 3 <= j <= i: diagonal tiles partial (upper corner), the tile below full, two below partial
    layout = lr.compile_layout(Window(3, causal=True), 8, 2)
    expected = t(
        [
            [1, 0, 0, 0],
            [2, 1, 0, 0],
            [1, 2, 1, 0],
            [0, 1, 2, 1],
        ]
    ).to(torch.int8)
    assert torch.equal(layout.block_matrix(), expected[None])
    assert torch.equal(layout.kv_index, t([[[0, 0, 0], [0, 1, 1], [0, 1, 2], [1, 2, 3]]]))
    assert torch.equal(layout.valid, b([[[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]]))
    assert torch.equal(layout.partial, b([[[1, 0, 0], [0, 1, 0], [1, 0, 1], [1, 0, 1]]]))


def test_golden_dense_row_for_a_global_token():
    # n=24, b=2: query block 0 visits all 12 key blocks, the others at most 4 -> block 0 is a dense row
    layout = lr.compile_layout(Global([0]) | Window(1), 24, 2)
    assert layout.dense_rows.tolist() == [0]
    assert layout.blocks_per_row == 4
    assert (layout.block_matrix()[0, 0] == 1).all()
    assert not layout.valid[0, 0].any()
    # row 5 (tokens 10, 11): key 0 via the global column, window tiles 4, 5, 6
    assert layout.kv_index[0, 5].tolist() == [0, 4, 5, 6]
    assert layout.valid[0, 5].tolist() == [True, True, True, True]
    assert layout.partial[0, 5].tolist() == [True, True, False, True]
    assert layout.block_matrix()[0, 5].tolist() == [1, 0, 0, 0, 1, 2, 1, 0, 0, 0, 0, 0]


def test_golden_bigbird_like_with_random_table_read_back():
    n, bs, heads = 16, 2, 2
    random = RandomBlocks(1, bs, num_heads=heads, seed=11, window=1, global_first=1, global_last=1)
    layout = lr.compile_layout(BlockWindow(1, bs) | global_blocks(bs) | random, n, bs)
    table = random.table(n)  # [H, nb, 1]
    assert table.shape == (heads, 8, 1)
    assert (table[:, [0, 7]] == -1).all(), "global query blocks draw no random block"
    base = t(
        [
            [2, 2, 2, 2, 2, 2, 2, 2],
            [2, 2, 2, 0, 0, 0, 0, 2],
            [2, 2, 2, 2, 0, 0, 0, 2],
            [2, 0, 2, 2, 2, 0, 0, 2],
            [2, 0, 0, 2, 2, 2, 0, 2],
            [2, 0, 0, 0, 2, 2, 2, 2],
            [2, 0, 0, 0, 0, 2, 2, 2],
            [2, 2, 2, 2, 2, 2, 2, 2],
        ]
    ).to(torch.int8)
    expected = base.repeat(heads, 1, 1)
    for h in range(heads):
        for qb in range(1, 7):
            kb = int(table[h, qb, 0])
            assert abs(kb - qb) > 1 and 0 < kb < 7, "random block outside the window and the globals"
            assert base[qb, kb] == 0
            expected[h, qb, kb] = 2
    assert layout.num_heads == heads
    assert torch.equal(layout.block_matrix(), expected)
    assert layout.dense_rows.tolist() == []
    assert not layout.partial.any()
    # the dense graph is the block matrix blown up to tokens
    dense = expected.repeat_interleave(bs, 1).repeat_interleave(bs, 2) == 2
    assert torch.equal(layout.mask_mod(torch.arange(heads)[:, None, None], torch.arange(n)[None, :, None],
                                       torch.arange(n)[None, None, :]), dense)


# -- layout == max-pool of the dense mask ------------------------------------------------------------
POOL_PATTERNS = {
    "window3": Window(3),
    "window0": Window(0),
    "causal_window2": Window(2, causal=True),
    "causal": Causal(),
    "dilated": Dilated(2, dilation=3),
    "dilated_per_head": Dilated(1, dilation=(1, 2, 4)),
    "global_ends": Global([0, 1, -1], clip=True),  # clip: also run at n = 1
    "window_or_global": Window(1) | Global([0]),
    "block_window": BlockWindow(1, 3),
    "segments": Segments(5),
    "band_unit": Band(-2, 1, unit=3),
    "strided": strided(3),
    "strided_bidir": strided(4, causal=False),
    "fixed": fixed(4, 1),
    "fixed_bidir": fixed(5, 2, causal=False),
    "strided_columns": StridedColumns(4),
    "summary_columns": SummaryColumns(3, 1),
    "full": Full(),
    "empty": Empty(),
    "not_window": ~Window(2),
    "window_and_not_causal": Window(3) & ~Causal(),
    "random_blocks": RandomBlocks(2, 4, num_heads=3, seed=2),
    "bigbird_like": BlockWindow(1, 4) | global_blocks(4) | RandomBlocks(1, 4, num_heads=3, seed=9),
}
POOL_LENGTHS = (1, 5, 8, 13, 16, 33)
POOL_BLOCKS = (1, 2, 3, 4, 8)


def assert_layout_is_max_pool(pattern, n, bsz):
    layout = lr.compile_layout(pattern, n, bsz)
    dense = pattern.to_dense(n)
    dense = dense if dense.dim() == 3 else dense[None]
    any_, full = pool_dense(dense, n, bsz)
    nb = -(-n // bsz)
    bm = layout.block_matrix()
    assert layout.num_heads == pattern.num_heads
    assert bm.shape == (dense.shape[0], nb, nb)
    rows = torch.ones(nb, dtype=torch.bool)
    rows[layout.dense_rows] = False
    # sparse rows: visited == any token pair in the tile; "full" == every real token pair
    assert torch.equal(bm[:, rows] > 0, any_[:, rows])
    assert torch.equal(bm[:, rows] == 2, any_[:, rows] & full[:, rows])
    # dense rows are computed against every key, so they cover whatever the pattern has
    assert (bm[:, ~rows] == 1).all()
    # slot invariants: used slots first, sorted and distinct; unused slots point at the row's block
    kv, valid, partial = layout.kv_index, layout.valid, layout.partial
    assert not (partial & ~valid).any()
    assert not valid[:, ~rows].any()
    own = torch.arange(nb)[None, :, None].expand_as(kv)
    assert torch.equal(kv[~valid], own[~valid])
    counts = valid.sum(-1, keepdim=True)
    assert torch.equal(valid, torch.arange(kv.shape[-1])[None, None, :] < counts)
    diffs = kv[..., 1:] - kv[..., :-1]
    assert (diffs[valid[..., 1:]] > 0).all()
    # k is the widest sparse row, and dense rows are the rows far above the median
    visits = any_.sum(-1).max(0).values  # [nb]
    if rows.any():
        assert layout.blocks_per_row == max(int(visits[rows].max()), 1)
    median = max(float(visits.float().median()), 1.0)
    assert torch.equal(~rows, visits > DENSE_ROW_FACTOR * median)
    return layout


@pytest.mark.parametrize("bsz", POOL_BLOCKS)
@pytest.mark.parametrize("name", sorted(POOL_PATTERNS))
def test_layout_equals_max_pool_of_dense_mask(name, bsz):
    for n in POOL_LENGTHS:
        assert_layout_is_max_pool(POOL_PATTERNS[name], n, bsz)


@pytest.mark.parametrize(("pattern", "n", "bsz"), [
    (Window(1) | Global([0]), 64, 4),
    (Window(2, causal=True) | Global([3, -1]), 61, 4),
    (Dilated(1, dilation=(1, 2)) | Global([7]), 50, 2),
    (BlockWindow(1, 3) | global_blocks(3) | RandomBlocks(1, 3, num_heads=2, seed=0), 70, 3),
])
def test_layout_with_dense_rows_is_max_pool(pattern, n, bsz):
    layout = assert_layout_is_max_pool(pattern, n, bsz)
    assert len(layout.dense_rows) > 0, "this case is meant to exercise dense rows"


@pytest.mark.parametrize("name", sorted(POOL_PATTERNS))
def test_block_candidates_contract(name):
    """`any` may over-approximate, `full` must never: the compiler trusts `full` without looking."""
    pattern = POOL_PATTERNS[name]
    for n in (7, 16, 21):
        for bsz in (1, 3, 4):
            any_c, full_c = pattern.block_candidates(n, bsz)
            dense = pattern.to_dense(n)
            any_, full = pool_dense(dense if dense.dim() == 3 else dense[None], n, bsz)
            assert not (any_ & ~any_c).any(), f"`any` misses a visited tile at n={n}, b={bsz}"
            assert not (full_c & ~full).any(), f"`full` claims a tile that is not full at n={n}, b={bsz}"


def test_random_blocks_compile_at_another_block_size():
    """A RandomBlocks pattern is a Pattern like any other: it must compile at any block size."""
    pattern = RandomBlocks(1, 2, num_heads=2, seed=0, window=0, global_first=0, global_last=0)
    for n, bsz in ((5, 4), (6, 4), (8, 3), (9, 2)):
        assert_layout_is_max_pool(pattern, n, bsz)


def test_layout_summaries():
    layout = lr.compile_layout(Full(), 16, 4)
    assert layout.density() == 1.0
    assert layout.computed_pairs() == 16 * 16
    text = str(layout)
    assert "BlockLayout(n=16" in text and "tile=4" in text
    window = lr.compile_layout(Window(2), 64, 4)
    assert 0 < window.density() < 0.2
    moved = window.to("cpu")
    assert torch.equal(moved.kv_index, window.kv_index) and moved.n == 64
    per_head = lr.compile_layout(Dilated(1, dilation=(1, 2)), 16, 4)
    assert per_head.block_matrix().shape == (2, 4, 4)
    assert per_head.computed_pairs() == per_head.kv_index.numel() * 16  # every gathered slot, used or not
    assert lr.compile_layout(Window(1), 10, 4).kv_index.shape[1] == 3


# -- the tile is not the graph's geometry -----------------------------------------------------------------------
class PredicateOnly(Pattern):
    """A pattern seen only through its predicate: the compiler evaluates every token pair (the definition)."""

    def __init__(self, inner):
        self.inner, self.num_heads = inner, inner.num_heads

    def mask_mod(self, n, device=None):
        return self.inner.mask_mod(n, device)


def assert_same_layout(a, b):
    for f in ("kv_index", "valid", "partial", "dense_rows", "dense_full", "dense_any", "dense_all"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("tile", [16, 32, 64, 128])
def test_bigbird_layouts_at_any_tile_equal_the_exhaustive_ones(tile):
    n, bs = 1000, 64
    pattern = BlockWindow(1, bs) | global_blocks(bs) | RandomBlocks(3, bs, num_heads=2, seed=4)
    layout = lr.compile_layout(pattern, n, tile)
    assert_same_layout(layout, lr.compile_layout(PredicateOnly(pattern), n, tile))
    assert layout.tile == tile and layout.num_blocks == -(-n // tile)


@pytest.mark.parametrize(("block_size", "tile", "n"), [(64, 128, 300), (64, 32, 300), (8, 12, 61), (8, 3, 50)])
def test_bigbird_graph_on_tiles_of_other_sizes_matches_its_reference(block_size, tile, n):
    """`bigbird` keeps its graph (block_size) whatever tile the engine runs: output = its dense reference."""
    torch.manual_seed(0)
    module = lr.build_attention("bigbird", dim=16, heads=2, block_size=block_size, num_random_blocks=1,
                                tile=tile).double()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, -5:] = False
    with torch.no_grad():
        assert torch.allclose(module(x, keep), module.reference_forward(x, keep), atol=1e-10, rtol=1e-8)
    assert module.layout(n).tile == tile


# -- rectangular layouts --------------------------------------------------------------------------------------------
RECT_CASES = [(5, 21, 16), (7, 30, 3), (1, 30, 29), (12, 12, 0), (9, 13, 4)]  # (n, n_kv, q_offset)


@pytest.mark.parametrize("bsz", [1, 3, 4, 8])
@pytest.mark.parametrize("name", ["window3", "causal_window2", "window_or_global", "dilated_per_head", "bigbird_like",
                                  "strided", "fixed", "summary_columns", "not_window"])
def test_rectangular_layout_equals_max_pool_of_dense_mask(name, bsz):
    """n queries at q_offset among n_kv keys: tiles are the exact max-pool of the dense rectangle, dense
    rows included (their tiles kept in dense_any / dense_all, and in tile_codes)."""
    pattern = POOL_PATTERNS[name]
    for n, n_kv, off in RECT_CASES:
        layout = lr.compile_layout(pattern, n, bsz, n_kv=n_kv, q_offset=off)
        dense = pattern.to_dense(max(n_kv, off + n))
        dense = (dense if dense.dim() == 3 else dense[None])[:, off : off + n, :n_kv]
        nb, nbk = -(-n // bsz), -(-n_kv // bsz)
        padded = torch.zeros(dense.shape[0], nb * bsz, nbk * bsz, dtype=torch.bool)
        padded[:, :n, :n_kv] = dense
        real = torch.zeros(nb * bsz, nbk * bsz, dtype=torch.bool)
        real[:n, :n_kv] = True
        tiles, real_tiles = padded.view(-1, nb, bsz, nbk, bsz), real.view(nb, bsz, nbk, bsz)
        any_ = tiles.any(dim=(2, 4))
        full = (tiles | ~real_tiles).all(dim=(2, 4)) & any_
        codes = layout.tile_codes()
        assert codes.shape == (dense.shape[0], nb, nbk)
        assert torch.equal(codes > 0, any_) and torch.equal(codes == 2, full)
        assert layout.mask_mod(torch.arange(dense.shape[0])[:, None, None], torch.arange(n)[None, :, None],
                               torch.arange(n_kv)[None, None, :]).expand_as(dense).equal(dense)
        assert layout.is_square == (n == n_kv and off == 0)


def test_square_layout_defaults_and_summary():
    layout = lr.compile_layout(Window(2), 10, 4)
    assert layout.n_kv == 10 and layout.q_offset == 0 and layout.is_square and layout.length == 10
    rect = lr.compile_layout(Window(2, causal=True), 3, 4, n_kv=20, q_offset=17)
    assert not rect.is_square and rect.length == 20 and rect.num_kv_blocks == 5
    assert "n_kv=20, q_offset=17" in str(rect)
    assert rect.block_matrix().shape == (1, 1, 5)
    assert rect.computed_pairs() == rect.kv_index.numel() * 16


@pytest.mark.parametrize("name", ["window_or_global", "dilated_per_head", "bigbird_like", "strided", "fixed"])
def test_compiling_in_row_chunks_gives_the_same_layout(name, monkeypatch):
    """Long layouts are compiled a few query tiles at a time (bounded memory); the result, dense rows
    included, is the one a single pass gives."""
    pattern = POOL_PATTERNS[name]
    for n, n_kv, off in [*RECT_CASES, (40, 40, 0), (37, 64, 20)]:
        whole = lr.compile_layout(pattern, n, 4, n_kv=n_kv, q_offset=off)
        monkeypatch.setattr(layout_module, "_CELLS_PER_STEP", 3)  # one or two query tiles per step
        chunked = lr.compile_layout(pattern, n, 4, n_kv=n_kv, q_offset=off)
        monkeypatch.undo()
        for field in ("kv_index", "valid", "partial", "dense_rows", "dense_full", "dense_any", "dense_all"):
            assert torch.equal(getattr(whole, field), getattr(chunked, field)), (field, n, n_kv, off)
