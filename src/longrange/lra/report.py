"""`longrange lra report`: our LRA runs beside the published Table 1 (accuracy) and Table 2 (speed, memory).

    runs = collect_runs(["runs/"])              # every summary.json under the given folders
    paths = write_report(runs, "lra-report")    # {"md": report.md, "png": report.png}
    speed = collect_speed(["lra-speed/"])       # rows of `longrange lra speed` sweeps (speed.json)
    paths = write_report(runs, "lra-report", speed=speed)   # + their Table 2 rows and speed.png

Partial runs are reported too: a run stopped by `lra train --max-minutes` has a summary marked
`stopped_early` (steps done of those planned, final val and test accuracy); a run folder with
run.json and metrics.csv but no summary.json (killed) gives its last logged step, train loss and
validation accuracy (`partial_run`), and no test accuracy.

Speed and memory: the paper's Table 2 was measured on byte-level text at batch 32 on a TPU v3, so
absolute figures do not compare across machines; the report also gives each mechanism's speed
relative to `full` on the same task and preset, beside the paper's ratio to its Transformer at
the nearest length. Rows of `longrange lra speed` (Table 2's own measurement: random batches of
exactly each length) get the paper's figures only at lengths within 10% of a Table 2 length.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from longrange.lra.published import (
    ACCURACY,
    PEAK_MEMORY_GB,
    SOURCE,
    SPEED_LENGTHS,
    STEPS_PER_SECOND,
    TASK_ORDER,
    paper_name,
    published_accuracy,
    published_speed,
)

SUMMARY = "summary.json"
SPEED_JSON = "speed.json"
RUN_JSON, METRICS_CSV, RUN_SPEED_CSV = "run.json", "metrics.csv", "speed.csv"
#: a length counts as a Table 2 length when it is within this fraction of one (1000 ~ 1K, 4000 ~ 4K)
TABLE2_TOLERANCE = 0.10


def collect_runs(paths) -> list[dict]:
    """The summary.json of every run under `paths` (run folders or folders of runs), each with its `run` folder."""
    runs = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"RUNS: {path} does not exist (give run folders written by `longrange lra train`)")
        found = [path / SUMMARY] if (path / SUMMARY).is_file() else sorted(path.rglob(SUMMARY))
        for file in found:
            data = json.loads(file.read_text())
            data["run"] = str(file.parent)
            runs.append(data)
        runs += [partial_run(folder) for folder in killed_runs(path)]
    if not runs:
        raise FileNotFoundError(f"RUNS: no {SUMMARY} under {[str(p) for p in paths]}; finish a `longrange lra train` "
                                "run first")
    return runs


# -- partial runs: killed before summary.json ---------------------------------------------------------------------
def killed_runs(path: Path) -> list[Path]:
    """Run folders at or under `path` with run.json and metrics.csv but no summary.json."""
    candidates = [path] if (path / METRICS_CSV).is_file() else sorted(f.parent for f in path.rglob(METRICS_CSV))
    return [f for f in candidates if (f / RUN_JSON).is_file() and not (f / SUMMARY).is_file()]


def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def partial_run(folder: str | Path) -> dict:
    """A summary-like dict of a killed run: the last logged step, train loss and validation accuracy
    (metrics.csv), steps/s and peak memory (speed.csv); `test_accuracy` None, `killed` True."""
    from longrange.lra.presets import get_preset

    folder = Path(folder)
    config = json.loads((folder / RUN_JSON).read_text())
    preset = get_preset(config["task"], config.get("preset") or ("tiny" if config.get("data_dir") is None
                                                                    else "released"))
    rows = _csv_rows(folder / METRICS_CSV)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    speed = _csv_rows(folder / RUN_SPEED_CSV)
    model_json = folder / "checkpoint" / "model.json"  # the model's length (CLS included), once checkpointed
    tokens = config.get("max_length") or preset.max_length
    length = (json.loads(model_json.read_text())["model"]["max_length"] if model_json.is_file()
              else 1 + tokens if tokens else 0)
    return {
        "task": config["task"], "attention": config["attention"], "preset": preset.name,
        "data": config.get("data_dir") or "built-in", "run": str(folder), "killed": True, "stopped_early": True,
        "steps": max((int(r["step"]) for r in rows), default=0), "planned_steps": config.get("steps") or preset.steps,
        "batch_size": config.get("batch_size") or preset.batch_size, "max_length": length,
        "device": config.get("device"), "amp": config.get("amp"),
        "train_loss": float(train[-1]["loss"]) if train else None,
        "val_accuracy": float(val[-1]["accuracy"]) if val else None,
        "best_val_accuracy": max((float(r["accuracy"]) for r in val), default=None),
        "test_accuracy": None, "test_majority": None,
        "steps_per_s": float(speed[-1]["steps_per_s"]) if speed else None,
        "peak_memory_mb": float(speed[-1]["peak_memory_mb"]) if speed else None,
        "memory_kind": "cuda_max_allocated" if str(config.get("device", "")).startswith("cuda") else "cpu_peak_rss",
    }


def steps_cell(run: dict) -> str:
    """`steps`, and for a partial run how far it got and why it ended."""
    if not run.get("stopped_early"):
        return str(run["steps"])
    planned = f" of {run['planned_steps']}" if run.get("planned_steps") else ""
    why = "killed: no summary, last logged step" if run.get("killed") else "stopped early (--max-minutes)"
    return f"{run['steps']}{planned}, {why}"


def accuracy_cell(run: dict) -> str:
    """Test accuracy (%), or for a killed run the last validation accuracy."""
    if run.get("test_accuracy") is not None:
        return f"{100 * run['test_accuracy']:.2f}"
    val = run.get("val_accuracy")
    return "–" if val is None else f"– (val {100 * val:.2f})"


def _fmt(x, spec: str = ".2f", missing: str = "–") -> str:
    return missing if x is None else format(x, spec)


def speed_ratio(run: dict, runs: list[dict]) -> float | None:
    """This run's steps/s over `full`'s on the same task, preset and length (None without such a run)."""
    for other in runs:
        if (other["attention"] == "full" and other["task"] == run["task"] and other["preset"] == run["preset"]
                and other["max_length"] == run["max_length"] and other.get("steps_per_s")):
            return run["steps_per_s"] / other["steps_per_s"] if run.get("steps_per_s") else None
    return None


def paper_speed_ratio(attention: str, length: int) -> float | None:
    """The paper's steps/s of `attention` over its Transformer's, at the Table 2 length nearest `length`."""
    mine, base = published_speed(attention, length), published_speed("full", length)
    return mine[0] / base[0] if mine and base else None


def table2_length(length: int) -> int | None:
    """The Table 2 length (1024 ... 4096) within 10% of `length`, or None (no published figure to compare)."""
    for n in SPEED_LENGTHS:
        if abs(length - n) <= TABLE2_TOLERANCE * n:
            return n
    return None


def paper_table2(attention: str, length: int) -> dict:
    """The paper's steps/s, GB and both ratios to its Transformer at `length` (Nones off Table 2's lengths)."""
    n = table2_length(length)
    mine, base = (published_speed(attention, n), published_speed("full", n)) if n else (None, None)
    if not mine or not base:
        return {"paper_steps_per_s": None, "paper_gb": None, "paper_ratio": None, "paper_memory_ratio": None}
    return {"paper_steps_per_s": mine[0], "paper_gb": mine[1], "paper_ratio": mine[0] / base[0],
            "paper_memory_ratio": mine[1] / base[1]}


def add_speed_ratios(rows: list[dict]) -> list[dict]:
    """Copies of `lra speed` rows with ratio_full / memory_ratio_full (over `full` at the same length,
    batch, task, preset, device and amp; None without a measured full) and the paper's Table 2 figures."""
    def key(r):
        return tuple(r.get(k) for k in ("length", "batch_size", "task", "preset", "device", "amp"))

    full = {key(r): r for r in rows if r.get("attention") == "full" and not r.get("error")}
    out = []
    for r in rows:
        base, ok = full.get(key(r)), not r.get("error")
        ratio = r["steps_per_s"] / base["steps_per_s"] if ok and base and base.get("steps_per_s") else None
        mem = (r["peak_memory_mb"] / base["peak_memory_mb"]
               if ok and base and base.get("peak_memory_mb") and r.get("peak_memory_mb") is not None else None)
        out.append({**r, "ratio_full": ratio, "memory_ratio_full": mem, **paper_table2(r["attention"], r["length"])})
    return out


def collect_speed(paths) -> list[dict]:
    """The rows of every `lra speed` folder (or speed.json file) in `paths`, ratios added."""
    rows = []
    for path in map(Path, paths):
        file = path / SPEED_JSON if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"--speed: no {SPEED_JSON} at {file} (write one with `longrange lra speed "
                                    "--out DIR`)")
        data = json.loads(file.read_text())
        meta = data.get("meta", {})
        rows += [{**r, "gpu": meta.get("gpu"), "source": str(file), "sweep": describe_sweep(meta),
                  "notes": meta.get("notes", [])} for r in data.get("rows", [])]
    return add_speed_ratios(rows)


def is_speed_folder(path: Path) -> bool:
    """A folder written by `lra speed` (speed.json at its top, no run summary)."""
    return (path / SPEED_JSON).is_file() and not (path / SUMMARY).is_file()


def speed_sweep_table(rows: list[dict]) -> list[str]:
    """Markdown rows of `lra speed` measurements beside Table 2."""
    lines = ["| Attention | Length | Batch | Device | Steps/s | Examples/s | × full (ours) | × Transformer (paper) | "
             "Peak MB | Memory × full (ours) | Paper steps/s | Paper GB | Memory × Transformer (paper) | Params |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(("full", "local", "longformer", "linformer", "reformer", "bigbird",
                                               "linear", "performer"))}
    for r in sorted(add_speed_ratios(rows), key=lambda r: (r["length"], order.get(r["attention"], 99),
                                                          r["attention"])):
        device = r.get("gpu") or r.get("device", "?")
        if r.get("amp"):
            device += " amp"
        if r.get("error"):
            lines.append(f"| {r['attention']} | {r['length']} | {r['batch_size']} | {device} | error: "
                         f"{str(r['error'])[:120].replace('|', '/')} | | | {_fmt(r.get('paper_ratio'))} | | | "
                         f"{_fmt(r.get('paper_steps_per_s'), '')} | {_fmt(r.get('paper_gb'), '')} | "
                         f"{_fmt(r.get('paper_memory_ratio'))} | |")
            continue
        kind = "RSS growth" if r.get("memory_kind") == "cpu_rss_growth" else "max allocated"
        lines.append(f"| {r['attention']} | {r['length']} | {r['batch_size']} | {device} | "
                     f"{_fmt(r.get('steps_per_s'), '.3g')} | {_fmt(r.get('examples_per_s'), '.3g')} | "
                     f"{_fmt(r.get('ratio_full'))} | {_fmt(r.get('paper_ratio'))} | "
                     f"{_fmt(r.get('peak_memory_mb'), '.0f')} ({kind}) | {_fmt(r.get('memory_ratio_full'))} | "
                     f"{_fmt(r.get('paper_steps_per_s'), '')} | {_fmt(r.get('paper_gb'), '')} | "
                     f"{_fmt(r.get('paper_memory_ratio'))} | {_fmt(r.get('params'), ',')} |")
    return lines


def describe_sweep(meta: dict) -> str:
    """One line: what an `lra speed` sweep measured, where and when."""
    s = meta.get("settings", {})
    where = meta.get("gpu") or f"CPU ({meta.get('cpu_count')} cores, {s.get('threads') or 'default'} threads)"
    return (f"`longrange lra speed`: task {s.get('task')}, preset {s.get('preset')}, batch {s.get('batch_size')}, "
            f"{s.get('steps')} timed steps after {s.get('warmup')} warm-up, {where}{', amp' if s.get('amp') else ''}"
            f"{', subnormals flushed to zero' if s.get('flush_denormal') else ''}; torch {meta.get('torch')}, "
            f"{meta.get('date')}.")


def speed_sweep_markdown(rows: list[dict], meta: dict | None = None, title: bool = False) -> list[str]:
    """The `lra speed` section: what was measured, the table, the sweep's notes."""
    lines = ["# LRA speed and memory (Table 2 measurement)", ""] if title else []
    sweeps = [describe_sweep(meta)] if meta else list(dict.fromkeys(r["sweep"] for r in rows if r.get("sweep")))
    lines += [line for sweep in sweeps for line in (sweep, "")]
    lines += ["Training steps (forward, backward, AdamW) on random batches of exactly each length, every point in "
              "a fresh process. Paper: Table 2 of Tay et al. (byte-level text, batch 32, TPU v3). Absolute figures "
              "do not transfer across machines; the ratios to full attention at the same length do. Peak memory: "
              "CUDA max allocated (parameters and optimizer state included, as the paper's peak); on CPU the growth "
              "of the resident-set peak over the process after set-up (optimizer state, gradients, activations).",
              "", *speed_sweep_table(rows), ""]
    notes = (meta or {}).get("notes") or list(dict.fromkeys(n for r in rows for n in r.get("notes", [])))
    lines += [f"- {note}" for note in notes]
    return lines


def accuracy_table(runs: list[dict]) -> list[str]:
    lines = ["| Task | Attention | Preset | Data | Steps | Test acc. (ours) | Published (Table 1) | Majority | "
             "Params (× full) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=_order):
        pub = published_accuracy(r["attention"], r["task"])
        data = f"{r.get('data', '?')}{' (synthetic)' if r.get('synthetic') else ''}"
        rule = "" if r.get("param_rule_ok", True) else " ⚠ outside ±10%"
        majority = None if r.get("test_majority") is None else 100 * r["test_majority"]
        lines.append(f"| {r['task']} | {r['attention']} | {r['preset']} | {data} | {steps_cell(r)} | "
                     f"{accuracy_cell(r)} | {_fmt(pub)} | {_fmt(majority)} | "
                     f"{_fmt(r.get('params'), ',')} ({_fmt(r.get('param_ratio'), '.3f')}){rule} |")
    return lines


def speed_table(runs: list[dict]) -> list[str]:
    lines = ["| Task | Attention | Length | Batch | Device | Steps/s | × full (ours) | × Transformer (paper) | "
             "Peak MB | Paper steps/s, GB (nearest length) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=_order):
        pub = published_speed(r["attention"], r["max_length"])
        paper = f"{pub[0]} steps/s, {pub[1]} GB" if pub else "–"
        lines.append(f"| {r['task']} | {r['attention']} | {r['max_length']} | {r['batch_size']} | {r.get('device')} | "
                     f"{_fmt(r.get('steps_per_s'))} | {_fmt(speed_ratio(r, runs))} | "
                     f"{_fmt(paper_speed_ratio(r['attention'], r['max_length']))} | "
                     f"{_fmt(r.get('peak_memory_mb'), '.0f')} ({r.get('memory_kind', '?')}) | {paper} |")
    return lines


def _order(run: dict):
    task = TASK_ORDER.index(run["task"]) if run["task"] in TASK_ORDER else len(TASK_ORDER)
    return task, run["preset"], run["attention"]


def write_markdown(runs: list[dict], path: Path, chart: str | None, speed: list[dict] | None = None,
                   speed_chart: str | None = None) -> None:
    """report.md: accuracy and run speed (when there are runs), then `lra speed` rows (when given)."""
    text = ["# Long Range Arena: our runs beside the published figures", "",
            f"Published figures: {SOURCE}. Path-X: every model in the paper FAILs."]
    if runs:
        text += ["Runs on built-in or synthetic data are smoke tests of the pipeline, not LRA results.", "",
                 "## Accuracy", "", *accuracy_table(runs)]
    text += ["", "## Speed and memory", "",
             "Table 2 of the paper: byte-level text, batch 32, TPU v3, at lengths "
             f"{', '.join(str(n) for n in SPEED_LENGTHS)}; absolute figures do not transfer across machines, the "
             "ratios to the full-attention baseline do.", ""]
    if runs:
        text += ["Training runs (CPU memory: the process's peak resident set):", "", *speed_table(runs), "",
                 f"![accuracy and speed]({chart})", ""]
    if speed:
        text += ["### Table 2 measurement (`longrange lra speed`)", "", *speed_sweep_markdown(speed)]
        if speed_chart:
            text += [f"![speed and memory against full attention]({speed_chart})", ""]
    path.write_text("\n".join(text))


def write_chart(runs: list[dict], path: Path) -> None:
    """Two panels: test accuracy (ours vs Table 1) and speed relative to full (ours vs Table 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=_order)
    labels = [f"{r['task']} ({r['max_length']})\n{r['attention']}" for r in runs]
    x = list(range(len(runs)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(runs) + 2), 7), sharex=True)
    ours = [100 * (r.get("test_accuracy") or 0) for r in runs]
    pub = [published_accuracy(r["attention"], r["task"]) for r in runs]
    ax1.bar([i - 0.2 for i in x], ours, width=0.4, label="ours")
    ax1.bar([i + 0.2 for i in x], [p or 0 for p in pub], width=0.4, label="published (Table 1)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.legend(fontsize=8)
    ours_r = [speed_ratio(r, runs) for r in runs]
    paper_r = [paper_speed_ratio(r["attention"], r["max_length"]) for r in runs]
    ax2.bar([i - 0.2 for i in x], [v or 0 for v in ours_r], width=0.4, label="ours: steps/s ÷ full")
    ax2.bar([i + 0.2 for i in x], [v or 0 for v in paper_r], width=0.4, label="paper: ÷ Transformer (Table 2)")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylabel("speed relative to full")
    ax2.legend(fontsize=8)
    ax2.set_xticks(x, labels, fontsize=7)
    fig.suptitle("LRA: ours vs published (Tay et al. 2021)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_speed_chart(rows: list[dict], path: Path) -> None:
    """Two panels per `lra speed` sweep: steps/s and peak memory over full's, ours beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in add_speed_ratios(rows) if not r.get("error") and r["attention"] != "full"]
    rows.sort(key=lambda r: (r["length"], r["attention"]))
    labels = [f"{r['attention']}\n{r['length']}" for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.6 * len(rows) + 2), 7), sharex=True)
    for ax, ours, paper, what in ((axes[0], "ratio_full", "paper_ratio", "steps/s"),
                                  (axes[1], "memory_ratio_full", "paper_memory_ratio", "peak memory")):
        ax.bar([i - 0.2 for i in x], [r.get(ours) or 0 for r in rows], width=0.4, label=f"ours: {what} ÷ full")
        ax.bar([i + 0.2 for i in x], [r.get(paper) or 0 for r in rows], width=0.4,
               label="paper: ÷ Transformer (Table 2)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel(f"{what} relative to full")
        ax.legend(fontsize=8)
    axes[1].set_xticks(x, labels, fontsize=7)
    fig.suptitle("LRA speed (Table 2 measurement): ours vs published", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs: list[dict], out: str | Path, speed: list[dict] | None = None) -> dict[str, Path]:
    """report.md, report.png (with runs) and speed.png (with `lra speed` rows) into `out`; returns their paths."""
    if not runs and not speed:
        raise FileNotFoundError("nothing to report: give run folders (RUNS) or `lra speed` folders (--speed)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md"}
    if runs:
        paths["png"] = out / "report.png"
        write_chart(runs, paths["png"])
    if speed:
        paths["speed_png"] = out / "speed.png"
        write_speed_chart(speed, paths["speed_png"])
    write_markdown(runs, paths["md"], paths.get("png", Path("")).name or None, speed,
                   paths.get("speed_png", Path("")).name or None)
    return paths


__all__ = ["ACCURACY", "PEAK_MEMORY_GB", "STEPS_PER_SECOND", "collect_runs", "collect_speed", "paper_name",
           "write_report"]
