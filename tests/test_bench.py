"""The scaling bench: slope fitting, option parsing, analytic FLOPs, memory metering, a tiny sweep."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

import longrange as lr
from longrange import measure
from longrange.bench import (
    fit_slope,
    layer_flops,
    make_settings,
    run_bench,
    slopes,
    specs,
)
from longrange.bench import point as bench_point
from longrange.bench.report import PLOT_DPI, PLOT_SIZE
from longrange.core.config import ConfigError, parse_scoped_key_values

# -- slopes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("power", [0.0, 1.0, 1.5, 2.0])
def test_fit_slope_recovers_power_law(power):
    ns = [1024, 2048, 4096, 8192]
    slope, intercept = fit_slope(ns, [3.0 * n**power for n in ns])
    assert slope == pytest.approx(power, abs=1e-9)
    assert intercept == pytest.approx(math.log(3.0), abs=1e-6)


def test_fit_slope_least_squares_and_degenerate_inputs():
    # log2 y = 0, 1, 3 at log2 x = 0, 1, 2: the least-squares slope in log-log is 1.5
    assert fit_slope([1, 2, 4], [1, 2, 8])[0] == pytest.approx(1.5)
    assert fit_slope([1, 2, 4], [1, 0, 4])[0] == pytest.approx(1.0)  # the zero is left out
    assert fit_slope([1024], [5.0]) is None
    assert fit_slope([1024, 1024], [5.0, 6.0]) is None
    assert fit_slope([], []) is None


def test_slopes_per_mechanism_and_mode():
    points = []
    for n in (1024, 2048, 4096):
        points.append({"mechanism": "full", "mode": "fwd", "n": n, "time_ms": n**2 / 1e4, "mem_mb": n / 10})
        points.append({"mechanism": "local", "mode": "fwd", "n": n, "time_ms": n / 1e2, "mem_mb": n / 20})
    points.append({"mechanism": "local", "mode": "fwd", "n": 8192, "error": "boom"})  # failed points are ignored
    rows = {r["mechanism"]: r for r in slopes(points)}
    assert rows["full"]["time_slope"] == pytest.approx(2.0)
    assert rows["full"]["mem_slope"] == pytest.approx(1.0)
    assert rows["local"]["time_slope"] == pytest.approx(1.0)
    assert (rows["local"]["n_min"], rows["local"]["n_max"], rows["local"]["points"]) == (1024, 4096, 3)


# -- options and settings ------------------------------------------------------------------------------


def test_parse_opts_values():
    got = parse_scoped_key_values(["bigbird.block_size=128", "local.causal=true", "dilated.dilation=[1,2]",
                                   "bigbird.seed=3"])
    assert got == {
        "bigbird": {"block_size": 128, "seed": 3}, "local": {"causal": True}, "dilated": {"dilation": [1, 2]},
    }


@pytest.mark.parametrize("bad", ["bigbird.block_size", "block_size=128", "bigbird.=3", ".x=1", "bigbird.block_size="])
def test_parse_opts_malformed_says_expected_form(bad):
    with pytest.raises(ConfigError, match=r"MECHANISM\.KEY=VALUE") as e:
        parse_scoped_key_values([bad])
    assert e.value.option == "options"


def test_unknown_mechanism_names_the_registered_ones():
    with pytest.raises(ConfigError) as e:
        make_settings(mechanisms="full,bigbrid")
    msg = str(e.value)
    assert "'bigbrid'" in msg
    for name in lr.list_attentions() + ["hf-longformer", "hf-bigbird"]:
        assert name in msg


def test_settings_from_presets_and_overrides():
    quick = make_settings()
    assert quick.mechanisms == ("full", "local", "longformer", "bigbird")
    assert quick.lengths == (1024, 2048, 4096) and quick.modes == ("fwd",) and quick.repeats == 3
    assert (quick.dim, quick.heads, quick.threads, quick.dtype, quick.batch) == (768, 12, 2, "fp32", 1)
    assert quick.options["bigbird"] == {}  # the bench sets nothing BigBird's config does not already
    assert quick.options["local"] == {} and make_settings("all").options["etc"] == {"radius": 256}
    assert quick.options["longformer"] == {}  # its window of 512 is the config default
    targets = make_settings("targets")
    assert targets.lengths == (2048, 4096, 8192, 16384) and targets.modes == ("fwd", "fwdbwd")
    assert {"hf-longformer", "hf-bigbird", "full"} <= set(targets.mechanisms)
    s = make_settings("targets", lengths="4k", mode="fwd", options={"bigbird": {"block_size": 128}})
    assert s.lengths == (4096,) and s.modes == ("fwd",)
    assert s.options["bigbird"] == {"block_size": 128}
    assert make_settings(mode="both").modes == ("fwd", "fwdbwd")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"options": {"bigbird": {"blok": 3}}}, r"unknown config key.*'blok'.*known keys"),
        ({"options": {"local": {"window": 7}}}, r"window must be a positive even int"),
        ({"options": {"dilated": {"window": 8}}}, r"not in the sweep"),
        ({"options": {"hf-bigbird": {"window": 8}}, "mechanisms": "hf-bigbird"},
         r"unknown option.*'window'.*hf-bigbird"),
        ({"options": {"full": {"dim": 64}}}, r"set dim for the whole sweep"),
        ({"mode": "sideways"}, r"fwd, fwdbwd or both"),
        ({"lengths": "1024,abc"}, r"positive integers"),
        ({"lengths": "0"}, r"positive"),
        ({"preset": "huge"}, r"presets: quick, targets"),
        ({"dtype": "fp8"}, r"dtype must be one of"),
        ({"heads": 5}, r"must divide dim"),
        ({"repeats": 0}, r"repeats must be a positive integer"),
    ],
)
def test_bad_settings_have_clear_errors(kwargs, pattern):
    kwargs = dict(kwargs)
    preset = kwargs.pop("preset", "quick")
    with pytest.raises(ConfigError, match=pattern):
        make_settings(preset, **kwargs)


# -- analytic FLOPs ------------------------------------------------------------------------------------


def test_flops_full_is_projections_plus_dense_pairs():
    n, c, h = 256, 64, 4
    f = layer_flops("full", n, c, h)
    assert f["proj"] == 2 * n * c * c * 4
    assert f["pairs"] == h * n * n
    assert f["attn"] == 2 * 2 * h * n * n * (c // h)
    assert f["total"] == f["proj"] + f["attn"]
    assert layer_flops("full", n, c, h, {"causal": True})["pairs"] == h * n * (n + 1) // 2
    assert layer_flops("full", n, c, h, batch=3)["total"] == 3 * f["total"]


def test_flops_sparse_use_the_modules_layout():
    n, c, h = 512, 64, 4
    local = lr.build_attention("local", dim=c, heads=h, window=64, tile=16)
    f = layer_flops("local", n, c, h, {"window": 64, "tile": 16}, module=local)
    # 32 blocks of 16; each query block gathers 5 key blocks: its own and 2 on each side (at the
    # ends some slots are unused, but they are gathered and masked, so computed all the same)
    assert local.layout(n).kv_index.shape[-1] == 5
    assert f["pairs"] == h * 32 * 5 * 16 * 16
    # without a module one is built from the options: the same count
    assert layer_flops("local", n, c, h, {"window": 64, "tile": 16}) == f
    bigbird = lr.build_attention("bigbird", dim=c, heads=h, block_size=16, num_random_blocks=2)
    fb = layer_flops("bigbird", n, c, h, {"block_size": 16, "num_random_blocks": 2}, module=bigbird)
    assert fb["pairs"] == bigbird.layout(n).computed_pairs()
    assert f["pairs"] < fb["pairs"] < h * n * n


def test_flops_longformer_globals_and_peers():
    n, c, h, w = 512, 64, 4, 64
    plain = layer_flops("longformer", n, c, h, {"window": w})
    one = layer_flops("longformer", n, c, h, {"window": w}, global_tokens=1)
    assert one["pairs"] - plain["pairs"] == 2 * h * n  # a global column for every row + one global row
    # one global token: its Q and its row's output projection, and K, V folded into its query and output
    assert one["proj"] - plain["proj"] == 2 * (2 * c * c + 2 * c * c)
    many = layer_flops("longformer", n, c, h, {"window": w}, global_tokens=100)
    assert many["proj"] - plain["proj"] == 2 * (2 * 100 * c * c + 2 * n * c * c)  # too many to fold: K, V for all
    assert layer_flops("hf-longformer", n, c, h, {"window": w}, global_tokens=1) == one
    assert layer_flops("hf-bigbird", n, c, h, {"block_size": 16}, dense_fallback=True) == layer_flops("full", n, c, h)


# -- memory metering and points ------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_memory_meter_sees_an_allocation_made_after_setup():
    meter = measure.MemoryMeter(torch.device("cpu"))
    meter.start()
    t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del t
    got = meter.stop()
    assert got["rss_source"] == "VmHWM"
    assert 60 <= got["mem_mb"] < 200
    assert got["peak_mb"] >= got["rss_base_mb"] + 60


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_cpu_contention_sees_a_busy_neighbour():
    spin = "import time\nt = time.time()\nwhile time.time() - t < 5: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)  # let it start spinning
        meter = measure.CpuContention()
        meter.start()
        time.sleep(1.0)  # this process idles; the child keeps (at least) one CPU busy
        others = meter.stop()
    finally:
        child.kill()
        child.wait()
    assert others >= 0.8


def _spec(**kw):
    base = {"mechanism": "full", "n": 32, "mode": "fwd", "dim": 16, "heads": 2, "threads": 1, "repeats": 2,
            "warmup": 0, "options": {}, "global_tokens": 0}
    return {**base, **kw}


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_run_point_in_process(mode):
    r = bench_point.run_point(_spec(mechanism="longformer", options={"window": 8}, global_tokens=1, mode=mode))
    assert r["error"] is None and r["note"] == "1 global"
    assert len(r["times_ms"]) == 2 and r["time_ms"] > 0
    assert r["mem_mb"] >= 0 and r["peak_mb"] > 0
    fwd = layer_flops("longformer", 32, 16, 2, {"window": 8}, global_tokens=1)["total"]
    assert r["flops"] == (fwd if mode == "fwd" else 3 * fwd)


def test_point_main_reports_errors_as_json(capsys):
    rc = bench_point.main([json.dumps(_spec(mechanism="bigbird", options={"block_size": 0}))])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1
    assert "block_size must be a positive int" in out["error"]


def test_peers_run_through_the_same_point():
    pytest.importorskip("transformers")
    r = bench_point.run_point(_spec(mechanism="hf-longformer", n=24, options={"window": 8}, global_tokens=1))
    assert r["error"] is None and r["time_ms"] > 0
    r = bench_point.run_point(_spec(mechanism="hf-bigbird", n=24, options={"block_size": 4, "num_random_blocks": 1}))
    assert r["note"] == "HF fell back to full (n <= 28)"
    assert r["flops"] == layer_flops("full", 24, 16, 2)["total"]
    r = bench_point.run_point(_spec(mechanism="hf-bigbird", n=40, options={"block_size": 4, "num_random_blocks": 1},
                                    mode="fwdbwd"))
    assert r["error"] is None and r["note"] is None


def test_hf_longformer_peer_computes_our_longformer():
    """The peer adapter is wired right: with our weights copied in, HF's layer gives our output."""
    pytest.importorskip("transformers")
    from longrange.bench.peers import build_peer

    c, h, n, w = 32, 2, 40, 8
    ours = lr.build_attention("longformer", dim=c, heads=h, window=w, tile=4).eval()
    peer, _ = build_peer("hf-longformer", c, h, n, {"window": w}, global_tokens=1)
    with torch.no_grad():
        for suffix, fused in (("", ours.qkv), ("_global", ours.qkv_global)):
            for i, name in enumerate(("query", "key", "value")):
                getattr(peer.attn, name + suffix).weight.copy_(fused.weight[i * c : (i + 1) * c])
                getattr(peer.attn, name + suffix).bias.copy_(fused.bias[i * c : (i + 1) * c])
        peer.out.load_state_dict(ours.out.state_dict())
        x = torch.randn(2, n, c)
        g = torch.zeros(2, n, dtype=torch.bool)
        g[:, 0] = True
        torch.testing.assert_close(peer.eval()(x), ours(x, global_mask=g), atol=2e-5, rtol=1e-4)


# -- a tiny sweep through fresh processes ----------------------------------------------------------------


def test_tiny_sweep_writes_csv_json_png_and_resumes(tmp_path):
    import matplotlib.image

    s = make_settings(mechanisms="full,bigbird", lengths="64,128", dim=32, heads=4, repeats=1, warmup=0,
                      threads=1, out=tmp_path, options={"bigbird": {"block_size": 16}},
                      include_busy=True)  # the slopes are fitted even when the test machine is busy
    console = Console(file=io.StringIO(), width=160)
    result = run_bench(s, console=console, show_progress=False)
    assert [p.get("error") for p in result["points"]] == [None] * 4

    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["points"]) == 4
    measured = {(p["mechanism"], p["n"]) for p in data["points"]}
    assert measured == {(m, n) for m in ("full", "bigbird") for n in (64, 128)}
    probes = data["meta"]["probes"]
    assert len(probes) == 2 and data["meta"]["probe"]["gflops"] == max(p["gflops"] for p in probes) > 0
    assert {r["mechanism"] for r in data["slopes"]} == {"full", "bigbird"}
    for p in data["points"]:
        assert p["time_ms"] > 0 and p["peak_mb"] > 0 and p["mem_mb"] >= 0
        assert p["options"] == ({"block_size": 16} if p["mechanism"] == "bigbird" else {})
        assert p["gflops"] > 0 and p["matmul_frac"] > 0
        assert p["time_vs_baseline"] == pytest.approx(
            p["time_ms"] / next(q["time_ms"] for q in data["points"] if q["mechanism"] == "full" and q["n"] == p["n"])
        )

    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["mechanism"] for r in rows} == {"full", "bigbird"}
    assert all(float(r["time_ms"]) > 0 for r in rows)
    assert (tmp_path / "slopes.csv").read_text().startswith("mechanism,mode,n_min,n_max")

    img = matplotlib.image.imread(tmp_path / "scaling.png")
    assert img.shape[:2] == (round(PLOT_SIZE[1] * PLOT_DPI), round(PLOT_SIZE[0] * PLOT_DPI))

    text = console.file.getvalue()
    assert "bigbird" in text and "log-log slopes" in text and "time ms" in text

    # resume: every point is re-used, none re-run (a fresh run would give new times)
    s.resume = True
    again = run_bench(s, console=Console(file=io.StringIO(), width=160), show_progress=False)
    assert all(p.get("resumed") for p in again["points"])
    old = {(p["mechanism"], p["n"]): p["time_ms"] for p in data["points"]}
    assert {(p["mechanism"], p["n"]): p["time_ms"] for p in again["points"]} == old

    # the report command reads the folder: one HTML with the plot inside, Markdown beside a PNG
    from typer.testing import CliRunner

    from longrange.cli import app

    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["bench", "report", "--results", str(tmp_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Crossover lengths against full" in page
    assert "bigbird" in page and "torch " in page and "GFLOP/s" in page
    md = (out / "report.md").read_text()
    assert "![time and memory against length](scaling.png)" in md and "| bigbird | fwd | 64 |" in md
    assert matplotlib.image.imread(out / "scaling.png").shape[0] > 0


def test_crossover_interpolates_on_log_axes():
    from longrange.bench.document import _crossover, crossovers

    # ours/baseline ratio 2 at n=1000, 0.5 at n=4000: log ratio crosses 0 halfway, at n=2000
    assert _crossover([(1000, 2.0, 1.0), (4000, 1.0, 2.0)]) == pytest.approx(2000)
    assert _crossover([(1000, 1.0, 2.0), (4000, 1.0, 4.0)]) == "below from the start"
    assert _crossover([(1000, 2.0, 1.0), (4000, 4.0, 1.0)]) is None
    points = [{"mechanism": m, "mode": "fwd", "n": n, "time_ms": t, "mem_mb": 10.0}
              for m, n, t in (("full", 1000, 1.0), ("full", 4000, 16.0), ("local", 1000, 2.0), ("local", 4000, 8.0))]
    (row,) = crossovers(points, "full")
    assert row["mechanism"] == "local" and row["time_crossover"] == pytest.approx(2000)
    assert row["mem_crossover"] is None  # equal memory is not below


def test_report_without_results_names_the_folder(tmp_path):
    from typer.testing import CliRunner

    from longrange.cli import app

    r = CliRunner().invoke(app, ["bench", "report", "--results", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no bench results in" in r.output


# -- the low-rank / kernel / hashing family and lucidrains' peers ----------------------------------------
LUCID = {"lucid-performer": "performer_pytorch", "lucid-linformer": "linformer",
         "lucid-reformer": "reformer_pytorch", "lucid-nystrom": "nystrom_attention"}


@pytest.mark.parametrize("peer", sorted(LUCID))
def test_lucid_peers_run_through_the_same_point(peer):
    pytest.importorskip(LUCID[peer])
    options = {"lucid-performer": {"nb_features": 8}, "lucid-linformer": {"k": 8},
               "lucid-reformer": {"bucket_size": 4, "n_hashes": 2}, "lucid-nystrom": {"num_landmarks": 4}}[peer]
    r = bench_point.run_point(_spec(mechanism=peer, n=20, options=options))
    assert r["error"] is None and r["time_ms"] > 0
    ours = specs.PEERS[peer][1]
    assert r["flops"] == layer_flops(ours, 20, 16, 2, options)["total"] > 0


def test_peer_missing_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(specs.importlib.util, "find_spec", lambda name: None)
    assert "pip install 'reformer-pytorch'" in specs.peer_missing("lucid-reformer")


def test_linformer_points_build_for_their_length():
    assert specs.point_options("linformer", 300, {"k": 8}) == {"k": 8, "seq_len": 300}
    assert specs.point_options("linformer", 300, {"k": 8, "seq_len": 512})["seq_len"] == 512
    r = bench_point.run_point(_spec(mechanism="linformer", n=40, options={"k": 8}))
    assert r["error"] is None


@pytest.mark.parametrize(
    ("name", "options"),
    [("linformer", {"seq_len": 64, "k": 8}), ("linformer", {"seq_len": 64, "k": 8, "sharing": "none"}),
     ("linformer", {"seq_len": 64, "k": 8, "sharing": "kv"}),
     ("nystrom", {"num_landmarks": 8}), ("nystrom", {"num_landmarks": 8, "conv_kernel": 5})],
)
def test_layer_flops_are_twice_the_modules_macs(name, options):
    n, c, h = 64, 32, 4
    module = lr.build_attention(name, dim=c, heads=h, **options)
    assert layer_flops(name, n, c, h, options)["total"] == 2 * module.macs(n).total > 0


def test_all_preset_covers_every_mechanism_and_peer(tmp_path):
    s = make_settings("all", out=tmp_path)
    assert set(lr.list_attentions()) | set(specs.PEERS) == set(s.mechanisms)
    for name in s.mechanisms:  # every preset option set is valid for its mechanism
        specs.validate_options(name, s.options[name], s.dim, s.heads)
