"""Bench results: derived numbers (throughput, ratios, log-log slopes), files (JSON, CSV, PNG), tables.

Definitions used everywhere below:
- time: median wall time of one layer call (forward, or forward + backward), in ms;
- memory: the increase of peak memory over the set-up baseline (`mem_mb`; CPU: resident set,
  CUDA: allocated), beside the total peak (`peak_mb`);
- useful throughput: analytic FLOPs (`specs.layer_flops`; fwd+bwd counted as 3x forward) per
  second, and as a fraction of the dense matmul probe measured at the start of the same run;
- ratios: time and memory of a point over the baseline's (`--baseline`, default full) and over
  the peer with the same pattern (longformer vs hf-longformer, bigbird vs hf-bigbird), same n
  and mode; below 1 means less time or memory than the other;
- slope: least-squares fit of log(value) against log(n) over the measured lengths (1 = linear,
  2 = quadratic), over the points measured on a quiet machine: a point during which other
  processes kept >= BUSY_CPUS CPUs busy (`longrange.measure.busy`) is marked (table note, CSV
  column `busy`, a hollow marker in the plot) and left out of the slope unless include_busy.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from longrange.bench.specs import PEER_OF, ours, takes_global_tokens
from longrange.core.files import atomic_write, atomic_write_text
from longrange.measure import BUSY_CPUS, busy
from longrange.mechanisms import capabilities

PLOT_SIZE = (12.0, 5.0)  # inches; at PLOT_DPI the PNG is 1200 x 500 pixels
PLOT_DPI = 100
CSV_FIELDS = (
    "mechanism", "mode", "n", "time_ms", "peak_mb", "mem_mb", "mem_source", "gflops", "matmul_frac",
    "baseline", "time_vs_baseline", "mem_vs_baseline", "peer", "time_vs_peer", "mem_vs_peer", "flops", "pairs",
    "dim", "heads", "batch", "dtype", "device", "threads", "repeats", "warmup", "global_tokens", "options",
    "rss_base_mb", "rss_peak_mb", "ru_maxrss_mb", "other_cpus", "busy", "backend", "note", "error", "resumed",
)


# -- derived numbers ---------------------------------------------------------------------------------
def fit_slope(xs, ys) -> tuple[float, float] | None:
    """Least-squares line through (log x, log y) -> (slope, intercept); points with y <= 0 are left
    out (a zero memory increase has no logarithm). None with fewer than two distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True)
           if x is not None and y is not None and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    slope = sxy / sxx
    return slope, my - slope * mx


def ok(points):
    return [p for p in points if not p.get("error")]


def series(points) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(mechanism, mode) -> its successful points sorted by n, in first-seen order."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in ok(points):
        out.setdefault((p["mechanism"], p["mode"]), []).append(p)
    return {k: sorted(v, key=lambda p: p["n"]) for k, v in out.items()}


def slopes(points, include_busy: bool = False) -> list[dict[str, Any]]:
    """Log-log slopes per (mechanism, mode) over its points, busy ones left out unless include_busy
    (`busy_left_out` counts them; a series with fewer than two quiet lengths has no slope)."""
    rows = []
    for (mech, mode), pts in series(points).items():
        used = pts if include_busy else [p for p in pts if not busy(p)]
        ns = [p["n"] for p in used]
        t = fit_slope(ns, [p["time_ms"] for p in used])
        m = fit_slope(ns, [p["mem_mb"] for p in used])
        rows.append({"mechanism": mech, "mode": mode, "n_min": min(ns, default=None), "n_max": max(ns, default=None),
                     "points": len(used), "busy_left_out": len(pts) - len(used),
                     "time_slope": t[0] if t else None, "mem_slope": m[0] if m else None})
    return rows


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) and b > 0 else None


def derive(points, probe_gflops: float | None, baseline: str | None) -> list[dict[str, Any]]:
    """Add throughput and ratio fields to each point (in place) and return the points."""
    index = {(p["mechanism"], p["n"], p["mode"]): p for p in ok(points)}
    for p in points:
        if p.get("error"):
            continue
        p["gflops"] = p["flops"] / (p["time_ms"] / 1e3) / 1e9 if p.get("time_ms") else None
        p["matmul_frac"] = _ratio(p["gflops"], probe_gflops)
        base = index.get((baseline, p["n"], p["mode"])) if baseline else None
        p["baseline"] = baseline if base is not None else None
        p["time_vs_baseline"] = _ratio(p["time_ms"], base["time_ms"]) if base else None
        p["mem_vs_baseline"] = _ratio(p["mem_mb"], base["mem_mb"]) if base else None
        peer_name = PEER_OF.get(p["mechanism"])
        peer = index.get((peer_name, p["n"], p["mode"])) if peer_name else None
        p["peer"] = peer_name if peer is not None else None
        p["time_vs_peer"] = _ratio(p["time_ms"], peer["time_ms"]) if peer else None
        p["mem_vs_peer"] = _ratio(p["mem_mb"], peer["mem_mb"]) if peer else None
    return points


def finish(meta: dict[str, Any], points: list[dict[str, Any]], settings) -> dict[str, Any]:
    derive(points, meta.get("probe", {}).get("gflops"), settings.baseline)
    notes = meta.setdefault("notes", [])
    globals_ = [m for m in settings.mechanisms if takes_global_tokens(m)]
    if globals_ and settings.global_tokens:

        g = settings.global_tokens
        where = "1 global token at position 0" if g == 1 else f"{g} global tokens at positions 0..{g - 1}"
        marked = [m for m in globals_ if capabilities(ours(m)).global_tokens == "global_mask"]
        separate = [m for m in globals_ if capabilities(ours(m)).global_tokens == "num_global"]
        if marked:
            notes.append(f"{', '.join(marked)}: measured with {where} (HF's classification setting)")
        if separate:
            notes.append(f"{', '.join(separate)}: the first {g} of the n tokens are its global input (every "
                         "global↔long pair allowed)")
    if settings.baseline and settings.baseline not in settings.mechanisms:
        notes.append(f"baseline {settings.baseline!r} was not measured: no baseline ratios")
    include_busy = bool(getattr(settings, "include_busy", False))
    busy_points = [p for p in ok(points) if busy(p)]
    if busy_points:
        where = "kept in the slopes (--include-busy)" if include_busy else \
            "left out of the slopes (--include-busy keeps them)"
        notes.append(f"{len(busy_points)} point(s) ran while other processes kept >= {BUSY_CPUS} CPUs busy ('busy' "
                     f"in the note and the CSV, hollow in the plot): their times are not reliable, {where}; re-run "
                     "them on a quiet machine (--resume keeps the others)")
    failed = [p for p in points if p.get("error")]
    if failed:
        notes.append(f"{len(failed)} point(s) failed; see the 'error' column of results.csv")
    return {"meta": meta, "points": points, "slopes": slopes(points, include_busy)}


# -- files ---------------------------------------------------------------------------------------------
def write_json(path: Path, meta: dict[str, Any], points: list[dict[str, Any]], slopes_=None) -> None:
    data = {"meta": meta, "points": points}
    if slopes_ is not None:
        data["slopes"] = slopes_
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def write_csv(path: Path, points: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for p in points:
            row = dict(p)
            row["options"] = json.dumps(p.get("options", {}), sort_keys=True)
            row["busy"] = None if p.get("error") else busy(p)
            w.writerow(row)


def write_slopes_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = ("mechanism", "mode", "n_min", "n_max", "points", "busy_left_out", "time_slope", "mem_slope")
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_outputs(out: Path, result: dict[str, Any], plot: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "slopes": out / "slopes.csv"}
    write_json(paths["json"], result["meta"], result["points"], result["slopes"])
    atomic_write(paths["csv"], lambda tmp: write_csv(tmp, result["points"]))
    atomic_write(paths["slopes"], lambda tmp: write_slopes_csv(tmp, result["slopes"]))
    if plot:
        include_busy = bool(result["meta"].get("settings", {}).get("include_busy"))
        paths["png"] = plot_scaling(out / "scaling.png", result["points"], result["meta"], include_busy)
    result["files"] = {k: str(v) for k, v in paths.items()}
    return paths


def plot_scaling(path: Path, points: list[dict[str, Any]], meta: dict[str, Any] | None = None,
                 include_busy: bool = False) -> Path:
    """Log-log time and memory against n, one line per (mechanism, mode) through its quiet points with
    the fitted slope in the legend; points measured on a busy machine hollow (in the line and the fit
    only with include_busy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=PLOT_SIZE, dpi=PLOT_DPI)
    groups = series(points)
    colors = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(m for m, _ in groups))}
    lengths = sorted({p["n"] for pts in groups.values() for p in pts})
    any_busy = False
    for (mech, mode), pts in groups.items():
        used = pts if include_busy else [p for p in pts if not busy(p)]
        marked = [p for p in pts if busy(p)]
        any_busy = any_busy or bool(marked)
        ns = [p["n"] for p in used]
        marker = "o" if mode == "fwd" else "s"
        style = {"color": colors[mech], "marker": marker, "linestyle": "-" if mode == "fwd" else "--"}
        for ax, key in ((ax_t, "time_ms"), (ax_m, "mem_mb")):
            ys = [p[key] for p in used]
            fit = fit_slope(ns, ys)
            label = f"{mech} {mode}" + (f" (slope {fit[0]:.2f})" if fit else "")
            keep = [(n, y) for n, y in zip(ns, ys, strict=True) if y and y > 0]
            if keep:
                ax.plot(*zip(*keep, strict=True), label=label, **style)
            hollow = [(p["n"], p[key]) for p in marked if p[key] and p[key] > 0]
            if hollow:
                ax.plot(*zip(*hollow, strict=True), linestyle="none", marker=marker, markersize=9,
                        markerfacecolor="none", markeredgecolor=colors[mech], markeredgewidth=1.5)
    settings = (meta or {}).get("settings", {})
    ax_t.set_title("time per layer call")
    ax_t.set_ylabel("median time (ms)")
    ax_m.set_title("peak memory increase over set-up")
    ax_m.set_ylabel("memory (MiB)")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        if lengths:
            ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length n")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if settings:
        fig.suptitle(f"longrange bench: dim {settings.get('dim')}, {settings.get('heads')} heads, "
                     f"batch {settings.get('batch')}, {settings.get('dtype')}, {settings.get('device')}, "
                     f"{settings.get('threads')} threads", fontsize=10)
    if any_busy:
        fig.text(0.01, 0.01, "hollow markers: measured while other processes kept the CPUs busy (not reliable; "
                 + ("in the fitted slopes" if include_busy else "left out of the lines and slopes"), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


# -- terminal ------------------------------------------------------------------------------------------
def _f(value, fmt: str = "{:.1f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def results_table(result: dict[str, Any]):
    from rich.table import Table

    t = Table(title="longrange bench: one attention layer (projections + attention)", title_justify="left")
    for col, just in (("mechanism", "left"), ("mode", "left"), ("n", "right"), ("time ms", "right"),
                      ("peak MiB", "right"), ("+MiB", "right"), ("GFLOP/s", "right"), ("% matmul", "right"),
                      ("note", "left")):
        t.add_column(col, justify=just, overflow="fold", no_wrap=col != "note")
    for p in result["points"]:
        if p.get("error"):
            t.add_row(p["mechanism"], p["mode"], str(p["n"]), "[red]failed[/red]", "", "", "", "",
                      f"[red]{p['error'][:80]}[/red]")
            continue
        notes = [p.get("note")]
        time_cell = _f(p["time_ms"])
        if busy(p):
            notes.append(f"[yellow]busy: others used {p['other_cpus']:.1f} CPUs, not in the slopes[/yellow]")
            time_cell = f"[yellow]{time_cell} ![/yellow]"
        if p.get("resumed"):
            notes.append("resumed")
        note = "; ".join(x for x in notes if x)
        t.add_row(p["mechanism"], p["mode"], str(p["n"]), time_cell, _f(p["peak_mb"], "{:.0f}"),
                  _f(p["mem_mb"], "{:.0f}"), _f(p.get("gflops")), _f(p.get("matmul_frac"), "{:.0%}"), note)
    return t


def ratios_table(result: dict[str, Any]):
    from rich.table import Table

    pts = ok(result["points"])
    baseline = result["meta"].get("settings", {}).get("baseline")
    if not any(p.get("baseline") or p.get("peer") for p in pts):
        return None
    t = Table(title="ratios, same n and mode (t = time; below 1: less than the other)", title_justify="left")
    for col in ("mechanism", "mode", "n", f"t/{baseline}", f"mem/{baseline}", "peer", "t/peer", "mem/peer"):
        t.add_column(col, justify="left" if col in ("mechanism", "mode", "peer") else "right", no_wrap=True)
    for p in pts:
        if p["mechanism"] == baseline and not p.get("peer"):
            continue
        t.add_row(p["mechanism"], p["mode"], str(p["n"]), _f(p.get("time_vs_baseline"), "{:.2f}x"),
                  _f(p.get("mem_vs_baseline"), "{:.2f}x"), p.get("peer") or "-", _f(p.get("time_vs_peer"), "{:.2f}x"),
                  _f(p.get("mem_vs_peer"), "{:.2f}x"))
    return t


def slopes_table(result: dict[str, Any]):
    from rich.table import Table

    t = Table(title="log-log slopes against n (1 = linear, 2 = quadratic)", title_justify="left")
    for col in ("mechanism", "mode", "lengths", "time slope", "memory slope"):
        t.add_column(col, justify="left" if col in ("mechanism", "mode", "lengths") else "right", no_wrap=True)
    for r in result["slopes"]:
        left = f", {r['busy_left_out']} busy left out" if r.get("busy_left_out") else ""
        t.add_row(r["mechanism"], r["mode"], f"{r['n_min']}-{r['n_max']} ({r['points']}{left})",
                  _f(r["time_slope"], "{:.2f}"), _f(r["mem_slope"], "{:.2f}"))
    return t


def print_report(console, result: dict[str, Any]) -> None:
    meta = result["meta"]
    s = meta.get("settings", {})
    console.print(results_table(result))
    ratios = ratios_table(result)
    if ratios is not None:
        console.print(ratios)
    if any(r["time_slope"] is not None or r["mem_slope"] is not None for r in result["slopes"]):
        console.print(slopes_table(result))
    probe = meta.get("probe", {})
    lines = [
        f"dim {s.get('dim')}, {s.get('heads')} heads, batch {s.get('batch')}, {s.get('dtype')}, {s.get('device')}, "
        f"{s.get('threads')} threads, median of {s.get('repeats')} after {s.get('warmup')} warm-up; "
        f"each point in a fresh process",
        f"memory: +MiB = peak over the set-up baseline ({_mem_source(result)}); peak MiB = total",
        f"% matmul: analytic FLOPs per second over the {probe.get('shape')} {probe.get('dtype')} matmul probe "
        f"({probe.get('gflops', 0):.1f} GFLOP/s, the better of the probes before and after the sweep); "
        "fwdbwd FLOPs = 3x forward",
        *meta.get("notes", []),
    ]
    if "sweep_s" in meta:
        lines.append(f"sweep took {meta['sweep_s']:.1f} s")
    if result.get("files"):
        lines.append("wrote " + ", ".join(result["files"].values()))
    for line in lines:
        console.print(f"[dim]{line}[/dim]")


def _mem_source(result) -> str:
    sources = {p.get("mem_source") for p in ok(result["points"])}
    names = {"VmHWM": "resident set, high-water mark reset after set-up", "ru_maxrss": "ru_maxrss",
             "cuda": "torch.cuda.max_memory_allocated"}
    return ", ".join(names.get(s, str(s)) for s in sorted(x for x in sources if x)) or "-"
