"""Graph statistics of patterns (`lr.analysis`), checked by brute force on the dense matrix; the
pictures' sizes and shades; the `longrange pattern` command."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
import torch
from typer.testing import CliRunner

import longrange as lr
from longrange.analysis import draw_pattern, graph_stats
from longrange.analysis import graph as G
from longrange.analysis.pictures import cell_fractions, cell_size, picture_size
from longrange.cli import app
from longrange.patterns import (
    BlockWindow,
    Causal,
    Dilated,
    Global,
    Pattern,
    RandomBlocks,
    Segments,
    Window,
    fixed,
    global_blocks,
    strided,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """The hop search is many small tensor ops: one thread is faster on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- the brute-force oracle: BFS by boolean matrix products on the dense n×n graph ---------------------
def brute_distances(dense: torch.Tensor) -> torch.Tensor:
    """dense [n, n] (query, key) -> D [t, s] long: layers until t has heard s (-1 = never)."""
    n = dense.shape[-1]
    m = dense.float()
    reach = torch.eye(n)
    dist = torch.where(reach.bool(), 0, -1)
    level = 0
    while True:
        level += 1
        nxt = (reach + m @ reach) > 0  # t hears s within `level` layers
        new = nxt & ~reach.bool()
        if not new.any():
            return dist
        dist[new] = level
        reach = nxt.float()


def brute_stats(dense: torch.Tensor, depth: int) -> dict:
    n = dense.shape[-1]
    d = brute_distances(dense)
    ecc = torch.where((d < 0).any(1), -1, d.max(1).values)
    finite = ecc[ecc >= 0]
    return {
        "edges": int(dense.sum()),
        "out": dense.sum(1), "in": dense.sum(0),
        "hops": None if (d < 0).any() else int(d.max()),
        "hops_reachable": int(d.max()),
        "radius": int(finite.min()) if len(finite) else None,
        "ecc": ecc,
        "reachable": float((d >= 0).double().mean()),
        "within": float(((d >= 0) & (d <= depth)).double().mean()),
        "n": n,
    }


def assert_matches(s, want: dict):
    n = want["n"]
    assert s.edges == want["edges"]
    assert s.density == pytest.approx(want["edges"] / n**2)
    for spread, deg in ((s.out_degree, want["out"]), (s.in_degree, want["in"])):
        assert (spread.min, spread.max) == (int(deg.min()), int(deg.max()))
        assert spread.mean == pytest.approx(float(deg.double().mean()))
    assert s.hops_level == "token"
    assert s.hops == want["hops"]
    assert s.hops_reachable == want["hops_reachable"]
    assert s.radius == want["radius"]
    assert torch.equal(s.eccentricity, want["ecc"])
    assert s.reachable == pytest.approx(want["reachable"])
    assert s.reach_within_depth == pytest.approx(want["within"])
    assert s.connected == (want["hops"] is not None)


CASES = {
    "window": (Window(3), 37, 8),
    "window_fine_split": (Window(5), 70, 16),
    "causal_window": (Window(3, causal=True), 37, 8),
    "window_global": (Window(2) | Global([0, -1]), 40, 8),
    "window_global_partial": (Window(3) | Global([5]), 50, 16),
    "bigbird_like": (BlockWindow(1, 4) | global_blocks(4) | RandomBlocks(2, 4, num_heads=2, seed=1), 44, 4),
    "dilated": (Dilated(2, dilation=(1, 2)), 33, 4),
    "strided": (strided(4), 30, 4),
    "fixed": (fixed(4, 1, causal=False), 30, 4),
    "causal": (Causal(), 21, 8),
    "segments": (Segments(5), 23, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_stats_match_brute_force(case):
    pattern, n, b = CASES[case]
    depth = 2
    s = graph_stats(pattern, n, tile=b, depth=depth)
    dense = pattern.to_dense(n)
    union = dense.any(0) if dense.dim() == 3 else dense
    assert_matches(s, brute_stats(union, depth))
    assert s.heads_differ == (dense.dim() == 3)
    if dense.dim() == 3:
        assert [h.head for h in s.per_head] == list(range(dense.shape[0]))
        for h, head in zip(s.per_head, dense, strict=True):
            assert_matches(h, brute_stats(head, depth))
        assert s.edges_all_heads == int(dense.sum())
    else:
        assert s.per_head == [] and s.edges_all_heads == s.edges


def test_bigbird_argument_window_needs_n_over_r_layers_globals_two():
    n, r = 1024, 32
    window = graph_stats(Window(r), n, tile=32)
    assert window.hops == math.ceil((n - 1) / r) and window.radius == math.ceil((n - 1) / 2 / r)
    assert window.connected_within(window.hops) and not window.connected_within(window.hops - 1)
    with_global = graph_stats(Window(r) | Global([0]), n, tile=32)
    assert with_global.hops == 2 and with_global.radius == 1
    causal = graph_stats(Window(r, causal=True), n, tile=32)
    assert causal.hops is None and causal.hops_reachable == math.ceil((n - 1) / r)
    assert causal.connected is False and causal.reachable == pytest.approx((n + 1) / (2 * n))


def test_block_level_bounds_when_token_level_is_out_of_reach(monkeypatch):
    pattern, n, b = Window(8) | Global([20]), 45, 4  # full tiles near the diagonal: a finite upper bound
    exact = graph_stats(pattern, n, tile=b)
    monkeypatch.setattr(G, "MAX_MASK_ELEMS", 0)  # no masks kept: token-level search impossible
    s = graph_stats(pattern, n, tile=b)
    assert s.hops_level == "block" and "block-level" in s.note
    assert s.hops <= exact.hops <= s.hops_upper
    assert bool((s.eccentricity <= exact.eccentricity).all())
    assert s.reachable >= exact.reachable and s.hops_reachable is None
    assert s.edges == exact.edges  # edges and degrees stay exact
    assert s.connected_within(s.hops_upper) is True and s.connected_within(s.hops - 1) is False


def test_over_budget_reports_no_hops():
    s = graph_stats(Window(3), 40, tile=8, max_work=1)
    assert s.hops_level == "none" and s.hops is None and s.connected_within(100) is None
    assert s.edges == int(Window(3).to_dense(40).sum())


def test_no_dense_matrix_is_built(monkeypatch):
    def refuse(self, n):
        raise AssertionError("graph_stats built an n×n matrix")

    monkeypatch.setattr(Pattern, "to_dense", refuse)
    s = graph_stats(lr.build_attention("bigbird", dim=32, heads=2, tile=16), 2048, heads=0)
    assert s.hops == 2 and s.radius == 1 and len(s.per_head) == 1


def test_modules():
    local = lr.build_attention("local", dim=32, heads=2, window=8, tile=4)
    s = graph_stats(local, 50)
    assert s.tile == 4 and s.heads == 2 and s.name == "local"
    assert s.edges == int(Window(4).to_dense(50).sum()) and s.edges_all_heads == 2 * s.edges
    full = graph_stats(lr.build_attention("full", dim=32, heads=2), 40, tile=8)
    assert (full.edges, full.hops, full.radius) == (1600, 1, 1)
    causal = graph_stats(lr.build_attention("full", dim=32, heads=2, causal=True), 40, tile=8)
    assert causal.hops is None and causal.hops_reachable == 1 and causal.edges == 40 * 41 // 2
    longformer = lr.build_attention("longformer", dim=32, heads=2, window=8, tile=4)
    assert graph_stats(longformer, 60, global_tokens=1).hops == 2
    with pytest.raises(ValueError, match="no global tokens"):
        graph_stats(local, 50, global_tokens=1)
    with pytest.raises(ValueError, match="no fixed attention graph"):
        graph_stats(lr.build_attention("linformer", dim=32, heads=2, seq_len=64), 64)
    with pytest.raises(ValueError, match="heads"):
        graph_stats(lr.build_attention("bigbird", dim=32, heads=2, tile=4), 40, heads=[5])


def test_to_dict_is_json():
    s = graph_stats(Dilated(1, dilation=(1, 2)), 30, tile=4, depth=3)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["hops"] == s.hops and d["per_head"][1]["hops"] is None  # dilation 2 alone: two residues
    assert d["connected_within_depth"] is False and d["eccentricity"]["min"] == s.radius


# -- pictures --------------------------------------------------------------------------------------
def pooled_dense(dense: torch.Tensor, p: int) -> torch.Tensor:
    n = dense.shape[-1]
    m = -(-n // p)
    pad = torch.zeros(m * p, m * p)
    pad[:n, :n] = dense.float()
    real = torch.zeros(m * p, m * p)
    real[:n, :n] = 1
    return pad.view(m, p, m, p).sum((1, 3)) / real.view(m, p, m, p).sum((1, 3))


@pytest.mark.parametrize(("n", "b", "max_pixels"), [(50, 8, 64), (100, 8, 30), (100, 4, 10)])
def test_cell_shades_are_pooled_dense(n, b, max_pixels):
    pattern = Window(3) | Global([7]) | RandomBlocks(1, b, seed=2)
    p = cell_size(n, b, max_pixels)
    assert -(-n // p) <= max_pixels
    layout = lr.compile_layout(pattern, n, b)
    heads = list(range(layout.kv_index.shape[0]))
    frac = cell_fractions(G.graph_tiles(layout, heads, pool=min(p, b), keep_masks=False), p)
    torch.testing.assert_close(frac, pooled_dense(pattern.to_dense(n).any(0), p))


def png_size(path) -> tuple[int, int]:
    h, w = matplotlib.image.imread(path).shape[:2]
    return w, h


def test_pictures_have_the_documented_size(tmp_path):
    one = draw_pattern(Window(4) | Global([0]), 64, tmp_path / "small.png")
    assert png_size(one) == picture_size(1)
    bigbird = lr.build_attention("bigbird", dim=32, heads=2, block_size=16)
    two = draw_pattern(bigbird, 1024, tmp_path / "sub" / "bigbird.png")  # cells of 2×2 tokens
    assert png_size(two) == picture_size(2)
    many = lr.build_attention("bigbird", dim=192, heads=12, block_size=8)
    capped = draw_pattern(many, 96, tmp_path / "capped.png")
    assert png_size(capped) == picture_size(8) == (4 * 800, 2 * 860)  # at most 8 panels, 4 a row
    single = draw_pattern(many, 96, tmp_path / "head3.png", heads=3)
    assert png_size(single) == picture_size(1)


# -- the command line ------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_json_and_png(tmp_path):
    out = tmp_path / "bb.png"
    r = runner.invoke(app, ["pattern", "bigbird", "--n", "512", "--heads", "2", "--opt", "block_size=32",
                            "--out", str(out), "--format", "json", "--depth", "2"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert (d["hops"], d["radius"], d["connected_within_depth"], d["tile"]) == (2, 1, True, 32)
    assert len(d["per_head"]) == 2 and png_size(out) == picture_size(2)


def test_cli_table_for_a_named_pattern(tmp_path):
    r = runner.invoke(app, ["pattern", "window", "--n", "200", "--opt", "radius=20", "--out",
                            str(tmp_path / "w.png")])
    assert r.exit_code == 0, r.output
    assert "Window(20)" in r.output and "hops exact" in r.output and "wrote" in r.output


@pytest.mark.parametrize(("args", "param", "text"), [
    (["nope"], "NAME", "unknown pattern or mechanism"),
    (["linformer"], "NAME", "no fixed attention graph"),
    (["local", "--opt", "windw=8"], "--opt", "windw"),
    (["local", "--opt", "window"], "--opt", "KEY=VALUE"),
    (["window", "--opt", "size=3"], "--opt", "radius"),
    (["local", "--global-tokens", "1"], "--global-tokens", "no global tokens"),
    (["local", "--n", "0"], "--n", "at least 1"),
    (["causal", "--format", "xml"], "--format", "table or json"),
])
def test_cli_errors_name_the_option(args, param, text, tmp_path):
    r = runner.invoke(app, ["pattern", *args, "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2
    flat = " ".join(r.output.replace("│", " ").split())
    assert param in flat and text in flat
