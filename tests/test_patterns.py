"""Patterns as algebra and as graphs: combinators against elementwise logic on dense matrices,
and each built-in pattern against its definition written out in the test."""

from __future__ import annotations

import itertools

import pytest
import torch

import longrange as lr
from longrange.patterns import (
    Band,
    BlockWindow,
    Causal,
    Dilated,
    Empty,
    Full,
    Global,
    RandomBlocks,
    Segments,
    StridedColumns,
    SummaryColumns,
    Window,
    fixed,
    global_blocks,
    strided,
)
from longrange.patterns.base import TileGrid, exhaustive_tile_candidates

HEADS = 3

PATTERNS = {
    "window2": Window(2),
    "window0": Window(0),
    "causal_window3": Window(3, causal=True),
    "dilated_per_head": Dilated(1, dilation=(1, 2, 3)),
    "dilated_causal": Dilated(2, dilation=2, causal=True),
    "global": Global([0, 5, -1], clip=True),  # clip: LENGTHS has n = 1
    "block_window": BlockWindow(1, 3),
    "random_blocks": RandomBlocks(2, 2, num_heads=HEADS, seed=1),
    "strided": strided(3),
    "strided_bidir": strided(4, causal=False),
    "fixed": fixed(4, 2),
    "fixed_bidir": fixed(3, 1, causal=False),
    "segments": Segments(4),
    "causal": Causal(),
    "band_unit": Band(-1, 2, unit=2),
    "full": Full(),
    "empty": Empty(),
    "window_or_global": Window(1) | Global([2], clip=True),
    "window_and_causal": Window(3) & Causal(),
    "complement": ~Window(1),
    "bigbird_like": BlockWindow(1, 2) | global_blocks(2) | RandomBlocks(1, 2, num_heads=HEADS, seed=4),
}
LENGTHS = (1, 7, 12)


def as_heads(dense: torch.Tensor) -> torch.Tensor:
    return dense if dense.dim() == 3 else dense[None]


def ij(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(n)[:, None]
    return i, torch.arange(n)[None, :]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_complement_laws(name, n):
    a = PATTERNS[name]
    dense = a.to_dense(n)
    assert dense.dtype == torch.bool
    assert not (a & ~a).to_dense(n).any(), "A & ~A must be empty"
    assert (a | ~a).to_dense(n).all(), "A | ~A must be full"
    assert torch.equal((~a).to_dense(n), ~dense)
    assert torch.equal((~~a).to_dense(n), dense)


PAIRS = [
    ("window2", "global"), ("causal_window3", "dilated_causal"), ("dilated_per_head", "random_blocks"),
    ("strided", "fixed"), ("segments", "block_window"), ("window_or_global", "complement"),
    ("random_blocks", "causal"), ("fixed_bidir", "empty"), ("full", "band_unit"),
]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize(("a_name", "b_name"), PAIRS)
def test_union_intersection_are_elementwise_and_de_morgan_holds(a_name, b_name, n):
    a, b = PATTERNS[a_name], PATTERNS[b_name]
    da, db = as_heads(a.to_dense(n)), as_heads(b.to_dense(n))
    assert torch.equal(as_heads((a | b).to_dense(n)), da | db)
    assert torch.equal(as_heads((a & b).to_dense(n)), da & db)
    assert torch.equal(as_heads((~(a | b)).to_dense(n)), as_heads((~a & ~b).to_dense(n)))
    assert torch.equal(as_heads((~(a & b)).to_dense(n)), as_heads((~a | ~b).to_dense(n)))
    # associativity through nesting: (a | b) | ~a is full, (a & b) & ~b is empty
    assert ((a | b) | ~a).to_dense(n).all()
    assert not ((a & b) & ~b).to_dense(n).any()


@pytest.mark.parametrize("name", ["dilated_per_head", "random_blocks", "bigbird_like"])
def test_per_head_patterns_are_head_indexed(name):
    p = PATTERNS[name]
    assert p.num_heads == HEADS
    for n in LENGTHS:
        assert p.to_dense(n).shape == (HEADS, n, n)
        assert (p | Window(1)).to_dense(n).shape == (HEADS, n, n)
        assert (~p).to_dense(n).shape == (HEADS, n, n)


@pytest.mark.parametrize("name", ["window2", "global", "strided", "fixed", "segments", "full", "empty"])
def test_shared_patterns_are_two_dimensional(name):
    p = PATTERNS[name]
    assert p.num_heads is None
    assert p.to_dense(9).shape == (9, 9)


def test_union_of_shared_and_per_head_pattern_broadcasts_per_head():
    per_head, shared = Dilated(1, dilation=(1, 2, 3)), Window(0) | Global([4])
    union = (per_head | shared).to_dense(10)
    for h, d in enumerate((1, 2, 3)):
        assert torch.equal(union[h], Dilated(1, dilation=d).to_dense(10) | shared.to_dense(10))


# -- each pattern against its definition -----------------------------------------------------------
def test_window_literal():
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(Window(1).to_dense(5), expected)
    causal = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(Window(2, causal=True).to_dense(5), causal)


@pytest.mark.parametrize(("radius", "causal"), [(0, False), (1, True), (3, False), (4, True)])
def test_window_definition(radius, causal):
    i, j = ij(11)
    lo = 0 if causal else -radius
    assert torch.equal(Window(radius, causal=causal).to_dense(11), (i - j >= lo) & (i - j <= radius))
    assert Window(radius).to_dense(11).sum(1).max() == min(2 * radius + 1, 11)


def test_dilated_definition_per_head():
    r, dils, n = 2, (1, 2, 3), 13
    i, j = ij(n)
    dense = Dilated(r, dilation=dils).to_dense(n)
    for h, d in enumerate(dils):
        expected = ((i - j) % d == 0) & ((i - j).abs() <= r * d)
        assert torch.equal(dense[h], expected)
        assert torch.equal(dense[h], Dilated(r, dilation=d).to_dense(n))
    assert torch.equal(Dilated(r, dilation=1).to_dense(n), Window(r).to_dense(n))
    causal = Dilated(r, dilation=2, causal=True).to_dense(n)
    assert torch.equal(causal, ((i - j) % 2 == 0) & (i - j >= 0) & (i - j <= 2 * r))


def test_global_is_symmetric_and_reaches_everything():
    n = 9
    p = Global([0, 4, -1, 30, -30], clip=True)  # clip: out-of-range indices are dropped; -1 is the last token
    dense = p.to_dense(n)
    assert torch.equal(dense, dense.T)
    g = torch.tensor([1, 0, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    assert torch.equal(p.flags(n), g)
    assert torch.equal(dense, g[:, None] | g[None, :])
    assert dense[[0, 4, 8]].all() and dense[:, [0, 4, 8]].all()
    assert not dense[1:4, 1:4].any()
    assert not Global([]).to_dense(5).any()


@pytest.mark.parametrize("index", [9, 100, -10])
def test_global_index_outside_the_sequence_is_an_error_naming_it(index):
    with pytest.raises(ValueError, match=rf"Global: index {index} is outside a sequence of n=9 tokens"):
        Global([0, index]).to_dense(9)
    with pytest.raises(ValueError, match=rf"index {index} is outside"):
        lr.compile_layout(Window(1) | Global([index]), 9, 4)


def test_global_blocks_clip_to_short_sequences():
    """BigBird's global blocks are "the first and last block_size tokens": all of a shorter sequence."""
    assert global_blocks(64).flags(10).all()
    assert global_blocks(4, first=1, last=0).flags(3).all()


def test_global_blocks_are_first_and_last_blocks():
    assert torch.equal(global_blocks(2, first=1, last=1).flags(7), torch.tensor([1, 1, 0, 0, 0, 1, 1]).bool())
    assert torch.equal(global_blocks(3, first=1, last=0).flags(7), torch.tensor([1, 1, 1, 0, 0, 0, 0]).bool())
    assert not global_blocks(3, first=0, last=0).flags(7).any()


def test_block_window_and_segments_definitions():
    n, b = 10, 3
    i, j = ij(n)
    assert torch.equal(BlockWindow(1, b).to_dense(n), (i // b - j // b).abs() <= 1)
    assert torch.equal(BlockWindow(0, b).to_dense(n), i // b == j // b)
    assert torch.equal(Segments(4).to_dense(n), i // 4 == j // 4)
    assert torch.equal(Band(-1, 2, unit=2).to_dense(n), (i // 2 - j // 2 >= -1) & (i // 2 - j // 2 <= 2))
    assert torch.equal(Causal().to_dense(n), j <= i)
    assert Full().to_dense(n).all() and not Empty().to_dense(n).any()


@pytest.mark.parametrize("causal", [True, False])
def test_strided_and_fixed_match_child_et_al(causal):
    n, stride, c = 17, 4, 2
    i, j = ij(n)
    cut = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool)
    a1 = (i - j).abs() < stride
    a2 = (i - j) % stride == 0
    assert torch.equal(strided(stride, causal=causal).to_dense(n), (a1 | a2) & cut)
    f1 = i // stride == j // stride
    f2 = j % stride >= stride - c
    assert torch.equal(fixed(stride, c, causal=causal).to_dense(n), (f1 | f2) & cut)
    assert torch.equal(StridedColumns(stride).to_dense(n), a2)
    assert torch.equal(SummaryColumns(stride, c).to_dense(n), f2.expand(n, n))


def test_window_or_global_edge_count():
    # Window(2) at n=6 has 3+4+5+5+4+3 = 24 edges; Global([0]) adds row 0's keys 3..5 and column 0's
    # queries 3..5: 30. (The example in longrange.patterns' docstring says 26.)
    assert (Window(2) | Global([0])).to_dense(6).sum().item() == 30


# -- random blocks -----------------------------------------------------------------------------------
def test_random_block_table_respects_bigbird_rules():
    n, b, r, heads = 40, 2, 3, 4
    p = RandomBlocks(r, b, num_heads=heads, seed=7, window=1, global_first=1, global_last=2)
    table = p.table(n)
    nb = n // b
    assert table.shape == (heads, nb, r) and table.dtype == torch.long
    for h, qb in itertools.product(range(heads), range(nb)):
        picks = table[h, qb].tolist()
        if qb < 1 or qb >= nb - 2:
            assert picks == [-1] * r, "global query blocks draw no random blocks"
            continue
        assert len(set(picks)) == r, "drawn without replacement"
        for kb in picks:
            assert abs(kb - qb) > 1 and 1 <= kb < nb - 2
    # the dense graph is exactly the table: block (h, I, J) is all-True iff J is in table[h, I]
    dense = p.to_dense(n).view(heads, nb, b, nb, b)
    hit = torch.zeros(heads, nb, nb, dtype=torch.bool)
    for h, qb in itertools.product(range(heads), range(nb)):
        for kb in table[h, qb].tolist():
            if kb >= 0:
                hit[h, qb, kb] = True
    assert torch.equal(dense.all(dim=(2, 4)), hit)
    assert torch.equal(dense.any(dim=(2, 4)), hit)


def test_random_blocks_are_seeded_not_global_rng():
    a = RandomBlocks(2, 2, num_heads=2, seed=5).table(30)
    torch.manual_seed(123)
    b = RandomBlocks(2, 2, num_heads=2, seed=5).table(30)
    assert torch.equal(a, b)
    assert not torch.equal(a, RandomBlocks(2, 2, num_heads=2, seed=6).table(30))
    p = RandomBlocks(2, 2, num_heads=2, seed=5)
    p.redraw(6)
    assert p.seed == 6 and torch.equal(p.table(30), RandomBlocks(2, 2, num_heads=2, seed=6).table(30))


def test_random_blocks_at_short_length_take_what_is_available():
    p = RandomBlocks(3, 2, num_heads=2, seed=0)
    for n in (1, 2, 5, 6):  # at most 3 blocks: all are global or inside the window
        table = p.table(n)
        assert table.shape[-1] == 0
        assert not p.to_dense(n).any()
    table = p.table(10)  # 5 blocks: rows 1..3 have at most one block outside window and globals
    assert table.shape[-1] == 1
    assert (table[:, 1, 0] == 3).all() and (table[:, 3, 0] == 1).all() and (table[:, 2, 0] == -1).all()


# -- tile candidates on any grid: the tile is not the pattern's geometry -----------------------------------------
GRIDS = [  # (n queries, n_kv keys, q_offset, tile): square, tiles cutting or spanning blocks, rectangular
    (12, 12, 0, 1), (13, 13, 0, 4), (16, 16, 0, 8), (33, 33, 0, 5), (5, 21, 16, 4), (7, 30, 3, 3), (1, 30, 29, 4),
    (10, 40, 30, 16),
]
EXACT = ("window2", "causal_window3", "block_window", "random_blocks", "global", "band_unit", "segments", "full")


@pytest.mark.parametrize(("n", "n_kv", "q_offset", "tile"), GRIDS)
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_tile_candidates_keep_the_contract_on_any_grid(name, n, n_kv, q_offset, tile):
    """`any` covers every tile with an edge, `full` claims no tile with a non-edge; the analytic rules of
    bands, globals and random blocks are exact (equal to evaluating every pair)."""
    pattern = PATTERNS[name]
    length = max(n_kv, q_offset + n)
    grid = TileGrid.rect(n, n_kv, tile, q_offset)
    any_c, full_c = pattern.tile_candidates(grid, length)
    any_, full = exhaustive_tile_candidates(pattern, grid, length)
    assert any_c.shape == any_.shape == (pattern.num_heads or 1, -(-n // tile), -(-n_kv // tile))
    assert not (any_ & ~any_c).any() and not (full_c & ~full).any()
    if name in EXACT:
        assert torch.equal(any_c, any_) and torch.equal(full_c & any_c, full & any_)


@pytest.mark.parametrize("tile", [16, 32, 64, 128, 48, 100])
def test_bigbird_candidates_are_analytic_at_any_tile(tile, monkeypatch):
    """A 64-token BigBird graph on other tiles never falls back to evaluating token pairs, and equals
    the exhaustive evaluation."""
    n, bs = 1000, 64
    parts = (BlockWindow(1, bs), global_blocks(bs), RandomBlocks(3, bs, num_heads=2, seed=4))
    want = [exhaustive_tile_candidates(p, TileGrid.square(n, tile), n) for p in parts]
    for p in parts:
        monkeypatch.setattr(type(p), "mask_mod", lambda *a, **k: pytest.fail("evaluated the predicate"))
    for p, (any_, full) in zip(parts, want, strict=True):
        any_c, full_c = p.block_candidates(n, tile)
        assert torch.equal(any_c, any_) and torch.equal(full_c, full), repr(p)


def test_random_blocks_within_a_span_stay_in_it():
    """span: every draw lies in the query block's own span (the shard-aware draw); without it, the
    paper's draw over the whole sequence, unchanged."""
    n, b, r, heads, span = 96, 2, 3, 2, 24  # spans of 12 blocks
    p = RandomBlocks(r, b, num_heads=heads, seed=4, window=1, span=span)
    table = p.table(n)
    q_span = torch.arange(n // b)[None, :, None] // (span // b)
    drawn = table >= 0
    assert drawn.any() and ((table // (span // b)) == q_span)[drawn].all()
    assert not torch.equal(table, RandomBlocks(r, b, num_heads=heads, seed=4, window=1).table(n))
    with pytest.raises(ValueError, match="span must be a multiple of block_size=2"):
        RandomBlocks(r, b, span=5)
