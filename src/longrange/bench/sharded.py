"""The bench with one sequence sharded over P processes (`longrange bench --nproc P`): context
parallelism's time, memory and traffic per rank, beside one process on the same layer.

For each (mechanism, length, mode) point of the sweep, P fresh ranks (a gloo group, started by
`longrange.distributed.launch` from `longrange.cli.bench`: bench/ and distributed/ are peers that do
not import each other, so the glue lives in cli/, and this module holds everything else);
rank r holds tokens `split_bounds(n, P)[r:r + 2]`, builds the same layer as the one-process bench
(same options, same seed, so the same weights) and its own shard of the input (no full-length
tensor anywhere), and runs warm-up + timed calls of `ContextParallel` on it, with a barrier before
each call. Each rank reports:

- time: the median of its timed calls (a call ends on a rank when its output rows are done; the
  point's time is the slowest rank's);
- memory: the same meter as the one-process bench (`longrange.measure`): the peak of this process
  over its set-up baseline (`mem_mb`, the layer, its shard and the process group built), and the
  total peak (`peak_mb`);
- bytes sent per call, forward and backward apart (`cp.comm.sent`; kinds ending in ":backward"
  are the adjoints' traffic), beside what an all-gather of K and V would send (each rank's K and V
  shard to every other rank) and, where the strategy's module exposes it, the volume it planned
  before running (`PLANNED_HOOK`).

The one-process reference is `longrange.bench.point` at the same n (and, where that fails or is
not asked for, at the longest shard n/P), in its own fresh process with the sweep's threads.

A mechanism with no sharded form is a row "refused: <reason>" unless `fallback="gather"` (every
rank gathers the whole sequence: exact, O(N) memory per rank); the `path` column says which ran.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from longrange.bench import report
from longrange.bench.harness import BenchSettings, plan_points, run_point_subprocess
from longrange.bench.specs import ours, point_options
from longrange.core.config import ConfigError
from longrange.core.files import atomic_write
from longrange.measure import machine_meta, make_console

#: what a point runs against, one process: at n ("n"), at the longest shard ("shard"), at n and,
#: when that fails (out of memory, timeout), at the shard ("auto"), or nothing ("none")
REFERENCES = ("auto", "n", "shard", "none")
#: ContextParallel's fallback for a mechanism without a sharded form (None: refuse it)
FALLBACKS = (None, "gather")
#: the traffic a strategy plans from the layout before running: fn(cp, attn, n, batch, dtype) -> the
#: bytes this rank sends per call (an int: forward), or {kind: bytes} with ":backward" kinds for the
#: adjoints. A bare name is looked up in the module of the mechanism's strategy (absent: no planned
#: column); "module:function" names one function for every strategy
PLANNED_HOOK = "planned_bytes"
CSV_FIELDS = (
    "mechanism", "mode", "n", "nproc", "path", "strategy", "rank", "n_local", "time_ms", "peak_mb", "mem_mb",
    "mem_source", "sent_fwd_bytes", "sent_bwd_bytes", "planned_bytes", "planned_bwd_bytes", "kv_allgather_bytes",
    "point_time_ms", "point_mem_mb", "ref_n", "ref_time_ms", "ref_peak_mb", "ref_mem_mb", "time_vs_one",
    "mem_vs_one", "dim", "heads", "batch", "dtype", "threads", "rank_threads", "repeats", "warmup",
    "global_tokens", "options", "refused", "error", "note",
)


@dataclasses.dataclass
class ShardedSettings:
    """A bench sweep (`BenchSettings`: mechanisms, lengths, modes, width, dtype, repeats...) run on
    `nproc` ranks with `rank_threads` torch threads each (default: the sweep's threads shared out,
    at least 1). single_repeat_from: points at n >= this run one timed call (huge points)."""

    bench: BenchSettings
    nproc: int
    rank_threads: int | None = None
    fallback: str | None = None
    reference: str = "auto"
    single_repeat_from: int | None = None

    def threads_per_rank(self) -> int:
        return self.rank_threads or max(1, self.bench.threads // self.nproc)

    def to_dict(self) -> dict[str, Any]:
        return {**self.bench.to_dict(), "nproc": self.nproc, "rank_threads": self.threads_per_rank(),
                "fallback": self.fallback, "reference": self.reference,
                "single_repeat_from": self.single_repeat_from}


def make_sharded_settings(bench: BenchSettings, nproc: int, *, rank_threads: int | None = None,
                          fallback: str | None = None, reference: str = "auto",
                          single_repeat_from: int | None = None) -> ShardedSettings:
    """Check the sharded options (a ConfigError naming the option) and bundle them with the sweep's."""
    for name, value, least in (("nproc", nproc, 1), ("rank_threads", rank_threads, 1),
                               ("single_repeat_from", single_repeat_from, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}", name)
    fallback = None if fallback in (None, "none") else fallback
    if fallback not in FALLBACKS:
        raise ConfigError(f"cp_fallback must be none or gather, got {fallback!r}", "cp_fallback")
    if reference not in REFERENCES:
        raise ConfigError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}", "reference")
    if bench.device != "cpu":
        raise ConfigError(f"the sharded bench runs gloo ranks on the CPU; got device {bench.device!r}", "device")
    if bench.resume:
        raise ConfigError("resume is not supported with nproc: a sharded sweep runs whole", "resume")
    short = [n for n in bench.lengths if n < nproc]
    if short:
        raise ConfigError(f"lengths {short} are shorter than nproc={nproc}: every rank needs a token", "lengths")
    return ShardedSettings(bench, nproc, rank_threads, fallback, reference, single_repeat_from)


# -- planning ------------------------------------------------------------------------------------------
def plan_sharded_points(ss: ShardedSettings) -> tuple[list[dict[str, Any]], list[str]]:
    """The sweep's points (as the one-process bench plans them) with the sharded settings added."""
    specs, notes = plan_points(ss.bench)
    for spec in specs:
        spec.update(nproc=ss.nproc, rank_threads=ss.threads_per_rank(), fallback=ss.fallback)
        if ss.single_repeat_from is not None and spec["n"] >= ss.single_repeat_from:
            spec["repeats"] = 1
    return specs, notes


# -- inside one rank -----------------------------------------------------------------------------------
def shard_global_inputs(layer, global_tokens: int, batch: int, lo: int, length: int) -> dict[str, Any]:
    """The part of `layer.global_token_inputs(global_tokens, batch, n)` (the first global_tokens
    positions global) held by the rank with positions lo .. lo + length - 1, built for it alone."""
    import torch

    if global_tokens == 0:
        return {}
    kind = layer.capabilities.global_tokens
    if kind == "num_global":
        return {"num_global": global_tokens}
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, : max(0, min(global_tokens - lo, length))] = True
    return {kind: mask}


def planned_hook(strategy, hook: str = PLANNED_HOOK):
    """The function PLANNED_HOOK names for this strategy, or None."""
    if strategy is None:
        return None
    module, _, name = hook.rpartition(":")
    if module:
        import importlib

        return getattr(importlib.import_module(module), name)
    return getattr(sys.modules.get(strategy.__module__), name, None)


def planned_bytes_of(strategy, cp, attn, n: int, batch: int, dtype) -> dict[str, Any]:
    """What the mechanism's strategy planned to send per call ({} without a PLANNED_HOOK; a hook that
    cannot plan this mechanism: `planned_error`)."""
    hook = planned_hook(strategy)
    if hook is None:
        return {}
    try:
        planned = hook(cp, attn, n, batch, dtype)
    except (TypeError, ValueError, NotImplementedError) as err:
        return {"planned_error": f"{type(err).__name__}: {err}"[:300]}
    if isinstance(planned, Mapping):
        return {"planned_by_kind": dict(planned), "planned_bytes": _forward(planned),
                "planned_bwd_bytes": _backward(planned)}
    return {"planned_bytes": int(planned)}


def _forward(by_kind: Mapping[str, int]) -> int:
    return sum(v for k, v in by_kind.items() if not k.endswith(":backward"))


def _backward(by_kind: Mapping[str, int]) -> int:
    return sum(v for k, v in by_kind.items() if k.endswith(":backward"))


def rank_layer(spec: dict[str, Any]):
    """The point's layer, as the one-process bench builds it (its options, its seed: the same weights
    on every rank)."""
    import torch

    from longrange.measure.machine import DTYPES
    from longrange.mechanisms import build_attention

    name = spec["mechanism"]
    torch.manual_seed(int(spec.get("seed", 0)))
    layer = build_attention(ours(name), dim=int(spec["dim"]), heads=int(spec["heads"]),
                            **point_options(name, int(spec["n"]), spec.get("options", {})))
    return layer.to(dtype=DTYPES[spec.get("dtype", "fp32")])


def rank_input(spec: dict[str, Any], rank: int, length: int):
    """This rank's tokens [batch, length, dim] alone (no full-length tensor anywhere)."""
    import torch

    from longrange.measure.machine import DTYPES

    torch.manual_seed(int(spec.get("seed", 0)) + 1 + rank)
    return torch.randn(int(spec.get("batch", 1)), length, int(spec["dim"]), dtype=DTYPES[spec.get("dtype", "fp32")])


def measure_rank(step, spec: dict[str, Any], comm, barrier) -> dict[str, Any]:
    """Warm-up + timed calls of step() with barrier() before each (untimed), the process's peak
    memory over them (the one-process bench's meter) and the bytes `comm` counted per call."""
    import torch

    from longrange.measure import timed_runs

    warmup, repeats = int(spec.get("warmup", 1)), max(int(spec.get("repeats", 3)), 1)
    comm.reset_counters()
    times, _, memory = timed_runs(step, lambda: None, torch.device("cpu"), warmup, repeats, before=barrier)
    sent = {k: v // (warmup + repeats) for k, v in comm.sent.items()}
    return {"time_ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times], **memory,
            "sent_by_kind": sent, "sent_fwd_bytes": _forward(sent), "sent_bwd_bytes": _backward(sent),
            "threads_used": torch.get_num_threads()}


def kv_allgather_bytes(n_local: int, world: int, batch: int, dim: int, itemsize: int) -> int:
    """What one rank sends to all-gather K and V: its shard of each, to every other rank."""
    return 2 * (world - 1) * batch * n_local * dim * itemsize


def sharded_step(call, layer, x, inputs: dict, mode: str):
    """One call(layer, x, **inputs) (ContextParallel's): forward under no_grad (eval), or forward +
    backward (train, a random output gradient)."""
    import torch

    if mode == "fwd":
        layer.eval()

        def forward():
            with torch.no_grad():
                call(layer, x, **inputs)

        return forward
    if mode != "fwdbwd":
        raise ValueError(f"mode must be fwd or fwdbwd, got {mode!r}")
    layer.train()
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    params = list(layer.parameters())

    def forward_backward():
        x.grad = None
        for p in params:
            p.grad = None
        call(layer, x, **inputs).backward(grad)

    return forward_backward


# -- one point -----------------------------------------------------------------------------------------
def refused_point(spec: dict[str, Any], reason: str) -> dict[str, Any]:
    return {**spec, "path": "refused", "refused": reason, "ranks": [], "error": None}


def failed_point(spec: dict[str, Any], error: str, wall_s: float) -> dict[str, Any]:
    return {**spec, "path": "failed", "ranks": [], "error": error[:500], "wall_s": wall_s}


def point_from_ranks(spec: dict[str, Any], ranks: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """The point's row from its ranks' results (a rank that reports `refused`: the point is refused)."""
    refused = [r["refused"] for r in ranks if r.get("refused")]
    if refused:
        return refused_point(spec, refused[0])
    return {**spec, "path": ranks[0]["path"], "strategy": ranks[0]["strategy"], "ranks": ranks, "error": None,
            "wall_s": wall_s, **_slowest(ranks)}


def _slowest(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The point's figures: the slowest rank's time, the largest rank's memory and traffic."""
    def most(key):
        values = [r[key] for r in ranks if r.get(key) is not None]
        return max(values) if values else None

    return {"time_ms": most("time_ms"), "peak_mb": most("peak_mb"), "mem_mb": most("mem_mb"),
            "mem_source": ranks[0].get("mem_source"), "sent_fwd_bytes": most("sent_fwd_bytes"),
            "sent_bwd_bytes": most("sent_bwd_bytes"), "planned_bytes": most("planned_bytes"),
            "kv_allgather_bytes": most("kv_allgather_bytes")}


def reference_spec(spec: dict[str, Any], n: int, ss: ShardedSettings) -> dict[str, Any]:
    """The one-process bench point of this sharded point, at length n, with the sweep's threads."""
    base = {k: v for k, v in spec.items() if k not in ("nproc", "rank_threads", "fallback")}
    return {**base, "n": n, "threads": ss.bench.threads}


def shard_length(n: int, nproc: int) -> int:
    return -(-n // nproc)


def run_reference(spec: dict[str, Any], ss: ShardedSettings) -> dict[str, Any] | None:
    """The one-process point at n, or at the longest shard (see REFERENCES); None for "none"."""
    if ss.reference == "none":
        return None
    n, shard = spec["n"], shard_length(spec["n"], ss.nproc)
    full_error = None
    if ss.reference in ("auto", "n"):
        ref = run_point_subprocess(reference_spec(spec, n, ss), ss.bench.timeout)
        if not ref.get("error") or ss.reference == "n":
            return _reference_row(ref, "n")
        full_error = ref["error"]
    ref = run_point_subprocess(reference_spec(spec, shard, ss), ss.bench.timeout)
    return {**_reference_row(ref, "n/P"), "n_error": full_error}


def _reference_row(ref: dict[str, Any], at: str) -> dict[str, Any]:
    keys = ("n", "time_ms", "times_ms", "peak_mb", "mem_mb", "mem_source", "threads_used", "backend", "error")
    return {"at": at, **{k: ref.get(k) for k in keys}}


def add_ratios(point: dict[str, Any]) -> dict[str, Any]:
    """Per-rank over one-process time and memory (mem_mb: growth over set-up, the bench's measure)."""
    ref = point.get("reference")
    usable = ref is not None and not ref.get("error") and not point.get("error") and point.get("ranks")
    point["time_vs_one"] = _ratio(point.get("time_ms"), ref.get("time_ms")) if usable else None
    point["mem_vs_one"] = _ratio(point.get("mem_mb"), ref.get("mem_mb")) if usable else None
    for r in point.get("ranks", []):
        r["mem_vs_one"] = _ratio(r.get("mem_mb"), ref.get("mem_mb")) if usable else None
    return point


def _ratio(a, b):
    return a / b if a is not None and b else None


# -- the sweep -----------------------------------------------------------------------------------------
def run_sharded_bench(ss: ShardedSettings, run_point: Callable[[dict, ShardedSettings], dict],
                      console=None) -> dict[str, Any]:
    """Every point through run_point(spec, ss) (the ranks' row: `longrange.cli.bench.run_sharded_point`
    starts them; bench/ does not import distributed/), with its one-process reference; writes
    sharded.json and sharded.csv under the sweep's out folder after each point; prints the tables."""
    console = make_console(console)
    specs, notes = plan_sharded_points(ss)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    out = ss.bench.out
    out.mkdir(parents=True, exist_ok=True)
    meta = machine_meta(ss.to_dict(), "cpu")
    meta["notes"] = list(notes) + meta["notes"]
    points: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for spec in specs:
        label = f"{spec['mechanism']} n={spec['n']} {spec['mode']} on {ss.nproc} ranks"
        console.print(f"[dim]{label}...[/dim]")
        point = run_point(spec, ss)
        if not point.get("refused") and not point.get("error"):
            point["reference"] = run_reference(spec, ss)
        points.append(add_ratios(point))
        write_sharded_outputs(out, {"meta": meta, "points": points})
        if point.get("error"):
            console.print(f"[red]{label}: {point['error']}[/red]")
            if not ss.bench.keep_going:
                meta["stopped"] = (f"stopped at the failed point {label}: {len(specs) - len(points)} point(s) not "
                                   "run (--keep-going runs past failed points)")
                meta["notes"].append(meta["stopped"])
                break
    meta["sweep_s"] = time.perf_counter() - t_start
    result = {"meta": meta, "points": points}
    result["files"] = {k: str(v) for k, v in write_sharded_outputs(out, result).items()}
    print_sharded_report(console, result)
    return result


# -- files ---------------------------------------------------------------------------------------------
def csv_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (point, rank); a refused or failed point one row without a rank."""
    import json

    rows = []
    for p in points:
        ref = p.get("reference") or {}
        shared = {**p, "options": json.dumps(p.get("options", {}), sort_keys=True), "point_time_ms": p.get("time_ms"),
                  "point_mem_mb": p.get("mem_mb"), "ref_n": ref.get("n"), "ref_time_ms": ref.get("time_ms"),
                  "ref_peak_mb": ref.get("peak_mb"), "ref_mem_mb": ref.get("mem_mb"),
                  "threads": (ref.get("threads_used") or p.get("threads")), "note": point_note(p)}
        if not p.get("ranks"):
            rows.append({**shared, "rank": None})
        for r in p.get("ranks", []):
            rows.append({**shared, **{k: v for k, v in r.items() if k != "path"}})
    return rows


def write_sharded_outputs(out: Path, result: dict[str, Any]) -> dict[str, Path]:
    """sharded.json (meta and points, each rank nested) and sharded.csv (one row per rank)."""
    import csv

    paths = {"json": out / "sharded.json", "csv": out / "sharded.csv"}
    report.write_json(paths["json"], result["meta"], result["points"])

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(csv_rows(result["points"]))

    atomic_write(paths["csv"], write)
    return paths


# -- terminal ------------------------------------------------------------------------------------------
def human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def point_note(p: dict[str, Any]) -> str:
    ref = p.get("reference") or {}
    notes = []
    if ref.get("at") == "n/P":
        why = f": at n {ref['n_error'][:80]}" if ref.get("n_error") else ""
        notes.append(f"1-proc at n/P = {ref.get('n')}{why}")
    if ref.get("error"):
        notes.append(f"1-proc failed: {ref['error'][:80]}")
    if p.get("repeats") == 1:
        notes.append("1 timed call")
    planned_errors = {r["planned_error"] for r in p.get("ranks", []) if r.get("planned_error")}
    notes.extend(f"planned: {e}" for e in sorted(planned_errors))
    return "; ".join(notes)


def _label(p: dict[str, Any]) -> str:
    return f"{p['mechanism']} {p['mode']} {p['n']}"


def rank_table(result: dict[str, Any]):
    from rich.table import Table

    t = Table(title="per rank: median ms per call, this process's peak memory, bytes sent per call",
              title_justify="left")
    for col in ("point", "rank", "tokens", "ms", "peak MiB", "+MiB", "+MiB/1-proc", "sent fwd", "sent bwd",
                "planned", "K,V all-gather"):
        t.add_column(col, justify="left" if col == "point" else "right", no_wrap=True)
    for p in result["points"]:
        if p.get("refused") or p.get("error"):
            t.add_row(_label(p), *["-"] * 10)
            continue
        for r in p["ranks"]:
            t.add_row(_label(p), str(r["rank"]), str(r["n_local"]), report._f(r["time_ms"]),
                      report._f(r["peak_mb"], "{:.0f}"), report._f(r["mem_mb"], "{:.0f}"),
                      report._f(r.get("mem_vs_one"), "{:.2f}x"), human_bytes(r["sent_fwd_bytes"]),
                      human_bytes(r["sent_bwd_bytes"]) if p["mode"] == "fwdbwd" else "-",
                      human_bytes(r.get("planned_bytes")), human_bytes(r["kv_allgather_bytes"]))
    return t


def summary_table(result: dict[str, Any]):
    from rich.table import Table

    nproc = result["meta"]["settings"]["nproc"]
    t = Table(title=f"{nproc} ranks against one process: the slowest rank's time, the largest rank's memory and "
                    "bytes", title_justify="left")
    for col in ("point", "path", "ms", "1-proc ms", "t/1-proc", "+MiB", "1-proc +MiB", "mem/1-proc", "sent fwd",
                "sent/K,V", "note"):
        t.add_column(col, justify="left" if col in ("point", "path", "note") else "right", no_wrap=col != "note",
                     overflow="fold")
    for p in result["points"]:
        if p.get("refused"):
            t.add_row(_label(p), "[yellow]refused[/yellow]", *[""] * 8, f"[yellow]refused: {p['refused']}[/yellow]")
            continue
        if p.get("error"):
            t.add_row(_label(p), "[red]failed[/red]", *[""] * 8, f"[red]{p['error'][:200]}[/red]")
            continue
        ref = p.get("reference") or {}
        t.add_row(_label(p), p["path"], report._f(p["time_ms"]), report._f(ref.get("time_ms")),
                  report._f(p.get("time_vs_one"), "{:.2f}x"), report._f(p["mem_mb"], "{:.0f}"),
                  report._f(ref.get("mem_mb"), "{:.0f}"), report._f(p.get("mem_vs_one"), "{:.2f}x"),
                  human_bytes(p["sent_fwd_bytes"]),
                  report._f(_ratio(p["sent_fwd_bytes"], p["kv_allgather_bytes"]), "{:.2f}x"), point_note(p))
    return t


def print_sharded_report(console, result: dict[str, Any]) -> None:
    s = result["meta"]["settings"]
    console.print(rank_table(result))
    console.print(summary_table(result))
    lines = [
        f"dim {s['dim']}, {s['heads']} heads, batch {s['batch']}, {s['dtype']}, {s['nproc']} gloo ranks with "
        f"{s['rank_threads']} thread(s) each, median of {s['repeats']} after {s['warmup']} warm-up, a barrier before "
        f"each call; 1-proc: the one-process bench point with {s['threads']} thread(s)",
        "path: sharded (the mechanism's strategy) or gather fallback (every rank gathers the whole sequence: "
        "O(N) memory per rank); +MiB: peak over the set-up baseline (as the one-process bench)",
        "sent: bytes this rank handed to collectives per call (fwd; bwd = the adjoints'); K,V all-gather: what "
        "gathering K and V would send; planned: the strategy's own figure, where it has one",
        *result["meta"].get("notes", []),
    ]
    if "sweep_s" in result["meta"]:
        lines.append(f"sweep took {result['meta']['sweep_s']:.1f} s")
    if result.get("files"):
        lines.append("wrote " + ", ".join(result["files"].values()))
    for line in lines:
        console.print(f"[dim]{line}[/dim]")
