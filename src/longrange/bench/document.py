"""`longrange bench report`: one self-contained document from one or more bench result folders.

Reads `results.json` (written by `longrange bench`; several folders are merged, later folders
winning for the same point) and writes `report.html` (plots embedded, no other files needed) and
`report.md` with `scaling.png` beside it:
- time and memory against length on log-log axes, fitted slopes;
- crossover lengths against the baseline (dense attention): the length where a mechanism's time
  (or memory) falls below the baseline's, interpolated on log-log axes between measured lengths;
- useful throughput as a fraction of the machine's dense matmul rate measured in the same run;
- the machine, versions and settings each folder ran with, and its notes.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from longrange.bench import report
from longrange.bench.harness import check_output_folder
from longrange.core.config import ConfigError
from longrange.core.files import atomic_write_text


def load_results(folders: list[Path]) -> dict[str, Any]:
    """Merge the results.json of `folders` -> {'metas': [...], 'points': [...], 'slopes': [...]}."""
    metas, merged = [], {}
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.exists():
            raise ConfigError(f"no bench results in {folder} (expected {path}); run `longrange bench "
                              f"--out {folder}` first, or pass --run", "results")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}", "results") from e
        meta = data.get("meta", {})
        meta["folder"] = str(folder)
        metas.append(meta)
        for p in data.get("points", []):
            key = (p["mechanism"], p["mode"], p["n"], p.get("dtype"), p.get("device"))
            merged[key] = {**p, "folder": str(folder)}
    points = list(merged.values())
    baseline = (metas[-1].get("settings") or {}).get("baseline", "full") if metas else "full"
    probe = max((m.get("probe", {}).get("gflops") or 0 for m in metas), default=0) or None
    report.derive(points, probe, baseline)
    return {"metas": metas, "points": points, "slopes": report.slopes(points), "baseline": baseline}


def crossovers(points: list[dict[str, Any]], baseline: str = "full") -> list[dict[str, Any]]:
    """Per (mechanism, mode): the length where its time (and memory) drops below the baseline's.
    'below from the start' when it is already cheaper at the shortest common length; None when it
    never is over the measured lengths."""
    series = report.series(points)
    rows = []
    for (mech, mode), pts in series.items():
        base = {p["n"]: p for p in series.get((baseline, mode), [])}
        common = [p for p in pts if p["n"] in base]
        if mech == baseline or len(common) == 0:
            continue
        rows.append({
            "mechanism": mech, "mode": mode,
            "time_crossover": _crossover([(p["n"], p["time_ms"], base[p["n"]]["time_ms"]) for p in common]),
            "mem_crossover": _crossover([(p["n"], p["mem_mb"], base[p["n"]]["mem_mb"]) for p in common]),
        })
    return rows


def _crossover(triples: list[tuple[int, float, float]]) -> float | str | None:
    """(n, ours, baseline) sorted by n -> the interpolated n where ours / baseline crosses 1."""
    triples = sorted(t for t in triples if t[1] and t[2] and t[1] > 0 and t[2] > 0)
    if not triples:
        return None
    ratios = [(n, math.log(a / b)) for n, a, b in triples]
    if ratios[0][1] < 0:
        return "below from the start"
    for (n0, r0), (n1, r1) in zip(ratios, ratios[1:], strict=False):
        if r0 >= 0 > r1:  # log-log linear interpolation of the log ratio
            t = r0 / (r0 - r1)
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    return None


# -- documents ---------------------------------------------------------------------------------------------
def write_report(folders: list[Path], out: Path, title: str = "longrange scaling report") -> dict[str, Path]:
    """Write report.html, report.md and scaling.png under `out`; returns their paths."""
    data = load_results(folders)
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    png = report.plot_scaling(out / "scaling.png", data["points"], data["metas"][-1] if data["metas"] else None)
    cross = crossovers(data["points"], data["baseline"])
    tables = _tables(data, cross)
    paths = {"png": png, "md": out / "report.md", "html": out / "report.html"}
    _atomic_write(paths["md"], _markdown(title, tables, data["metas"], png.name))
    _atomic_write(paths["html"], _html(title, tables, data["metas"], png))
    return paths


def _tables(data, cross) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, header, rows) for the results, the slopes and the crossovers."""
    f = report._f
    results = []
    for p in sorted(report.ok(data["points"]), key=lambda p: (p["mode"], p["mechanism"], p["n"])):
        results.append([p["mechanism"], p["mode"], str(p["n"]), f(p["time_ms"]), f(p["mem_mb"]),
                        f(p.get("matmul_frac") and 100 * p["matmul_frac"], "{:.0f}%"),
                        f(p.get("time_vs_baseline"), "{:.2f}x"), f(p.get("mem_vs_baseline"), "{:.2f}x"),
                        p.get("peer") or "-", f(p.get("time_vs_peer"), "{:.2f}x"), f(p.get("mem_vs_peer"), "{:.2f}x")])
    slopes = [[r["mechanism"], r["mode"], f"{r['n_min']}-{r['n_max']} ({r['points']}"
               + (f", {r['busy_left_out']} busy left out)" if r.get("busy_left_out") else ")"),
               f(r["time_slope"], "{:.2f}"), f(r["mem_slope"], "{:.2f}")] for r in data["slopes"]]

    def fmt_cross(value):
        return value if isinstance(value, str) else ("never (measured range)" if value is None else f"{value:,.0f}")

    crossings = [[r["mechanism"], r["mode"], fmt_cross(r["time_crossover"]), fmt_cross(r["mem_crossover"])]
                 for r in cross]
    baseline = data["baseline"]
    return [
        ("Results (time in ms; memory = peak growth over set-up, MiB; % matmul = useful FLOP/s over the same "
         "run's dense fp32 matmul rate)",
         ["mechanism", "mode", "n", "time ms", "mem MiB", "% matmul", f"t/{baseline}", f"mem/{baseline}", "peer",
          "t/peer", "mem/peer"], results),
        ("Log-log slopes against n (1 = linear, 2 = quadratic)",
         ["mechanism", "mode", "lengths", "time slope", "memory slope"], slopes),
        (f"Crossover lengths against {baseline}: where time / memory falls below {baseline}'s",
         ["mechanism", "mode", "time crossover n", "memory crossover n"], crossings),
    ]


def _machine_lines(meta: dict[str, Any]) -> list[str]:
    s = meta.get("settings", {})
    probe = meta.get("probe", {})
    return [
        f"folder {meta.get('folder')}: {meta.get('date')}, {meta.get('platform')}, {meta.get('cpu_count')} CPUs",
        f"python {meta.get('python')}, torch {meta.get('torch')}, transformers {meta.get('transformers')}, "
        f"longrange {meta.get('longrange')}",
        f"dim {s.get('dim')}, {s.get('heads')} heads, batch {s.get('batch')}, {s.get('dtype')}, {s.get('device')}, "
        f"{s.get('threads')} threads, median of {s.get('repeats')}; matmul probe "
        f"{probe.get('gflops', 0):.1f} GFLOP/s",
        *[f"note: {n}" for n in meta.get("notes", [])],
    ]


def _markdown(title, tables, metas, png_name) -> str:
    lines = [f"# {title}", "", f"![time and memory against length]({png_name})", ""]
    for caption, header, rows in tables:
        lines += [f"## {caption}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += ["## Machine and settings", ""]
    for meta in metas:
        lines += [f"- {line}" for line in _machine_lines(meta)]
    return "\n".join(lines) + "\n"


def _html(title, tables, metas, png: Path) -> str:
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<img alt='time and memory against length' src='data:image/png;base64,{image}'>"]
    for caption, header, rows in tables:
        parts.append(f"<h2>{esc(caption)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("<h2>Machine and settings</h2><ul>")
    for meta in metas:
        parts += [f"<li>{esc(line)}</li>" for line in _machine_lines(meta)]
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)
