"""The launcher (`longrange.distributed.launch`) and the sharded bench (`longrange bench --nproc P`):
per-rank results, a failing rank named, per-rank tables with bytes, refused and fallback paths."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from typer.testing import CliRunner

import longrange as lr
from longrange.bench import sharded
from longrange.cli import app
from longrange.cli.bench import refusal
from longrange.distributed import Shards
from longrange.distributed.launch import LaunchError, launch

runner = CliRunner()


def flat(text: str) -> str:
    """Output with rich's box drawing removed and whitespace collapsed."""
    return " ".join(re.sub(r"[│╭╮╰╯─┃━┏┓┗┛┡┩┠┨╇╈┳┻╋└┘┴┬├┤┼]", " ", text).split())


# -- rank functions (module level: the ranks import them by name) ----------------------------------------
def summed_rank(rank: int, world: int, offset: int) -> dict:
    import torch.distributed as dist

    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": int(t), "threads": torch.get_num_threads()}


def failing_rank(rank: int, world: int) -> int:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank one refuses")
    dist.barrier()  # rank 0 waits on the dead rank 1 and fails after it
    return rank


def sleeping_rank(rank: int, world: int) -> None:
    time.sleep(120)


# -- the launcher ----------------------------------------------------------------------------------------
def test_launch_returns_every_ranks_result_in_rank_order():
    got = launch(summed_rank, 2, 10, timeout_s=120, threads_per_rank=1)
    assert [r["rank"] for r in got] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 21 and r["threads"] == 1 for r in got)


def test_launch_names_the_rank_that_failed_first():
    with pytest.raises(LaunchError) as e:
        launch(failing_rank, 2, timeout_s=120, collective_timeout_s=30)
    assert e.value.rank == 1 and e.value.error == "ValueError: rank one refuses"
    assert str(e.value).startswith("rank 1 of 2 failed: ValueError: rank one refuses")


def test_launch_kills_ranks_past_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"still running after 1 s \(timeout_s\)"):
        launch(sleeping_rank, 2, timeout_s=1)
    assert time.monotonic() - t0 < 30


def test_launch_checks_its_arguments():
    with pytest.raises(ValueError, match="nproc must be a positive number"):
        launch(summed_rank, 0)
    with pytest.raises(ValueError, match="threads_per_rank must be a positive number"):
        launch(summed_rank, 2, threads_per_rank=0)
    with pytest.raises(ValueError, match="picklable"):
        launch(lambda rank, world: rank, 2)


# -- pieces of the sharded bench ---------------------------------------------------------------------------
def test_each_rank_builds_only_its_part_of_the_global_mask():
    layer = lr.build_attention("longformer", dim=16, heads=2)
    full = layer.global_token_inputs(3, 2, 10)["global_mask"]
    for rank in range(4):
        shards = Shards.even(10, 4, rank)
        (mask,) = sharded.shard_global_inputs(layer, 3, 2, shards.lo, shards.length).values()
        assert torch.equal(mask, full[:, shards.lo : shards.hi])
    assert sharded.shard_global_inputs(layer, 0, 2, 0, 3) == {}


def test_planned_hook_names_a_function_of_the_strategys_module_or_any_module():
    assert sharded.planned_hook(None) is None
    assert sharded.planned_hook(summed_rank, "no_such_function") is None
    assert sharded.planned_hook(summed_rank, "summed_rank") is summed_rank  # looked up in its module
    assert sharded.planned_hook(summed_rank, "json:dumps") is json.dumps
    assert [sharded.human_bytes(b) for b in (None, 12, 2048, 3 * 2**20, 5 * 2**30)] == \
        ["-", "12 B", "2.0 KiB", "3.0 MiB", "5.0 GiB"]


def refused_mechanism() -> str | None:
    """A registered mechanism ContextParallel refuses (no sharded form), or None."""
    for name in lr.list_attentions():
        spec = {"mechanism": name, "n": 256, "dim": 32, "heads": 2, "options": {}, "fallback": None}
        if refusal(spec) is not None:
            return name
    return None


@pytest.mark.parametrize(("args", "flag", "message"), [
    (["--nproc", "0"], "--nproc", "nproc must be an integer >= 1"),
    (["--nproc", "4", "-n", "2"], "--lengths", "shorter than nproc=4"),
    (["--nproc", "2", "--cp-fallback", "scatter"], "--cp-fallback", "none or gather"),
    (["--nproc", "2", "--reference", "twice"], "--reference", "auto, n, shard, none"),
    (["--nproc", "2", "--resume"], "--resume", "not supported with nproc"),
])
def test_bench_nproc_bad_options_name_the_flag(args, flag, message, tmp_path):
    r = runner.invoke(app, ["bench", "-m", "local", "-n", "256", "--out", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    out = flat(r.output)
    assert flag in out and message in out, out


# -- the sharded bench end to end --------------------------------------------------------------------------
def test_bench_nproc_prints_per_rank_time_memory_and_bytes(tmp_path):
    refused = refused_mechanism()
    names = ["local", "full"] + ([refused] if refused else [])
    r = runner.invoke(app, ["bench", "--nproc", "2", "-m", ",".join(names), "-n", "256", "--dim", "32",
                            "--heads", "2", "--mode", "fwd", "--repeats", "1", "--warmup", "1", "--threads", "2",
                            "--reference", "n", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    out = flat(r.output)
    assert "per rank" in out and "sent fwd" in out and "K,V all-gather" in out and "mem/1-proc" in out
    data = json.loads((tmp_path / "sharded.json").read_text())
    points = {p["mechanism"]: p for p in data["points"]}
    assert data["meta"]["settings"]["nproc"] == 2 and data["meta"]["settings"]["rank_threads"] == 1
    for name in ("local", "full"):
        p = points[name]
        assert p["error"] is None and p["path"] in ("sharded", "gather fallback"), p
        assert [r["rank"] for r in p["ranks"]] == [0, 1] and [r["n_local"] for r in p["ranks"]] == [128, 128]
        for rank in p["ranks"]:
            assert rank["time_ms"] > 0 and rank["peak_mb"] > 0 and rank["mem_source"]
            assert rank["sent_fwd_bytes"] > 0 and rank["sent_bwd_bytes"] == 0
            assert rank["kv_allgather_bytes"] == 2 * 1 * 128 * 32 * 4  # K and V shards to the one other rank
        assert p["reference"]["at"] == "n" and p["reference"]["n"] == 256 and p["reference"]["error"] is None
        assert p["mem_vs_one"] == pytest.approx(p["mem_mb"] / p["reference"]["mem_mb"])
        assert f"{name} fwd 256" in out
    if refused:
        p = points[refused]
        assert p["path"] == "refused" and p["refused"] and p["ranks"] == [] and "reference" not in p
        assert f"{refused} fwd 256 refused" in out and "refused:" in out
    rows = (tmp_path / "sharded.csv").read_text().splitlines()
    assert rows[0].startswith("mechanism,mode,n,nproc,path") and len(rows) == 1 + 2 + 2 + bool(refused)


def test_bench_nproc_gather_fallback_says_which_path_ran(tmp_path):
    refused = refused_mechanism()
    if refused is None:
        pytest.skip("every registered mechanism has a sharded form")
    r = runner.invoke(app, ["bench", "--nproc", "2", "-m", refused, "-n", "256", "--dim", "32", "--heads", "2",
                            "--mode", "fwd", "--repeats", "1", "--warmup", "0", "--cp-fallback", "gather",
                            "--reference", "none", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (p,) = json.loads((tmp_path / "sharded.json").read_text())["points"]
    assert p["path"] == "gather fallback" and p["strategy"] is None and p["reference"] is None
    assert all(rank["sent_fwd_bytes"] > 0 for rank in p["ranks"])
    assert "gather fallback" in flat(r.output)
