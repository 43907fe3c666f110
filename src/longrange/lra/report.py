"""`longrange lra report`: our LRA runs beside the published Table 1 (accuracy) and Table 2 (speed, memory).

    runs = collect_runs(["runs/"])              # every summary.json under the given folders
    paths = write_report(runs, "lra-report")    # {"md": report.md, "png": report.png}

Speed and memory: the paper's Table 2 was measured on byte-level text at batch 32 on a TPU v3, so
absolute figures do not compare across machines; the report also gives each mechanism's speed
relative to `full` on the same task and preset, beside the paper's ratio to its Transformer at
the nearest length.
"""

from __future__ import annotations

import json
from pathlib import Path

from longrange.lra.published import (
    ACCURACY,
    SOURCE,
    SPEED_LENGTHS,
    STEPS_PER_SECOND,
    TASK_ORDER,
    paper_name,
    published_accuracy,
    published_speed,
)

SUMMARY = "summary.json"


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
    if not runs:
        raise FileNotFoundError(f"RUNS: no {SUMMARY} under {[str(p) for p in paths]}; finish a `longrange lra train` "
                                "run first")
    return runs


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


def accuracy_table(runs: list[dict]) -> list[str]:
    lines = ["| Task | Attention | Preset | Data | Steps | Test acc. (ours) | Published (Table 1) | Majority | "
             "Params (× full) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=_order):
        pub = published_accuracy(r["attention"], r["task"])
        data = f"{r.get('data', '?')}{' (synthetic)' if r.get('synthetic') else ''}"
        rule = "" if r.get("param_rule_ok", True) else " ⚠ outside ±10%"
        lines.append(f"| {r['task']} | {r['attention']} | {r['preset']} | {data} | {r['steps']} | "
                     f"{100 * r['test_accuracy']:.2f} | {_fmt(pub)} | {_fmt(100 * r.get('test_majority', 0))} | "
                     f"{r.get('params', 0):,} ({_fmt(r.get('param_ratio'), '.3f')}){rule} |")
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


def write_markdown(runs: list[dict], path: Path, chart: str) -> None:
    text = ["# Long Range Arena: our runs beside the published figures", "",
            f"Published figures: {SOURCE}. Path-X: every model in the paper FAILs.",
            "Runs on built-in or synthetic data are smoke tests of the pipeline, not LRA results.", "",
            "## Accuracy", "", *accuracy_table(runs), "",
            "## Speed and memory", "",
            "Table 2 of the paper: byte-level text, batch 32, TPU v3, at lengths "
            f"{', '.join(str(n) for n in SPEED_LENGTHS)}; absolute figures do not transfer across machines, the "
            "ratios to the full-attention baseline do. CPU memory is the process's peak resident set.", "",
            *speed_table(runs), "", f"![accuracy and speed]({chart})", ""]
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
    ours = [100 * r["test_accuracy"] for r in runs]
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


def write_report(runs: list[dict], out: str | Path) -> dict[str, Path]:
    """report.md + report.png into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "report.png", out / "report.md"
    write_chart(runs, png)
    write_markdown(runs, md, png.name)
    return {"md": md, "png": png}


__all__ = ["ACCURACY", "STEPS_PER_SECOND", "collect_runs", "paper_name", "write_report"]
