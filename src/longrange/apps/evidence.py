"""The evidence run: does a longer context win once the evidence lies beyond what a short model reads?

For each built-in task (synthetic), input length and attention, fine-tune a fresh model of the same
size for the same steps and score it on held-out examples (QA exact match, DNA accuracy, summary
ROUGE-L), over several seeds:

- `full` reads only the first `short` tokens of every input (BERT's 512, scaled down here);
- the long attentions read all of it: `bigbird`, `longformer` (question / [CLS] tokens global),
  `etc` (with structure: a global token per sentence or per 64 DNA tokens, plus the question or
  [CLS] as globals), and a low-rank one (`linformer`, k = 32).

    from longrange.apps.evidence import EvidenceConfig, run_evidence
    print(run_evidence(EvidenceConfig(out="docs/results/apps-evidence")))   # the Markdown table

Rows go to PREFIX.csv as each run ends (a stopped sweep continues where it stopped); PREFIX.md
holds the table (mean ± standard deviation over seeds) and PREFIX.png the plot.

Each task runs in the variant a tiny model learns within the sweep's few hundred steps
(`TASK_SETTINGS`): QA with the answer the only fact of the document (question-key matching, with
distractor facts, stays at chance after 800 steps even at 64 tokens: associative recall needs
thousands of steps), DNA with the label set by the far (enhancer) motif on overlapping 6-mer
tokens (characters, or the promoter/enhancer agreement rule, stayed at chance after 600 steps), and
summaries of 2 facts of one value each.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path

from longrange.apps.finetune import METRIC, FinetuneConfig, finetune
from longrange.apps.tasks import TASK_OF
from longrange.core.config import ConfigError

FIELDS = ("task", "attention", "length", "reads", "seed", "metric", "value", "params", "steps", "train_seconds",
          "tokens_per_s")
#: the built-in task variants of the evidence run and their learning rates (see the module docstring)
TASK_SETTINGS = {
    "long-qa": {"data_options": {"facts": 1, "max_values": 3}, "lr": 2e-3, "steps": 200},
    "dna-motif": {"data_options": {"rule": "enhancer", "k": 6, "overlap": True}, "lr": 2e-3, "steps": 150},
    "spread-summary": {"data_options": {"facts": 2, "values": 1, "value_vocab": 16, "keys_in_summary": False},
                       "lr": 3e-3, "steps": 400},
}


@dataclasses.dataclass
class EvidenceConfig:
    out: str = "apps-evidence"  # prefix of .csv / .md / .png
    tasks: tuple = ("long-qa", "dna-motif", "spread-summary")
    lengths: tuple = (32, 64, 128, 256)
    attentions: tuple = ("full", "bigbird", "longformer", "etc", "linformer")
    short: int = 32  # what `full` reads: BERT's 512 scaled by 1/16, like the lengths (512..4K -> 32..256)
    seeds: tuple = (0, 1, 2)
    steps: int | None = None  # None: the task's (TASK_SETTINGS)
    batch_size: int = 8
    sizes: tuple = (3200, 16, 128)  # train (never repeated within 400 steps of 8), val, test examples
    dim: int = 64
    heads: int = 4
    layers: int = 2
    ffn_dim: int = 128
    block: int = 8  # bigbird block size (BigBird's 64, scaled by 1/8)
    window: int = 16  # longformer window
    radius: int = 8  # etc radius
    linformer_k: int = 16  # LRA's k
    dna_block: int = 16  # etc on DNA: one global token per this many tokens
    threads: int | None = 1
    workers: int = 1  # points run in this many processes at once
    progress: bool = True

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_SETTINGS]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; the evidence tasks are {sorted(TASK_SETTINGS)}", "tasks")
        if min(self.lengths) < 32:
            raise ConfigError(f"lengths must be >= 32, got {self.lengths}", "lengths")


def attention_settings(config: EvidenceConfig, attention: str, length: int) -> dict:
    """FinetuneConfig fields of one attention in the sweep (what it reads, its options, structure)."""
    if attention == "full":
        return {"attention": "full", "max_length": min(config.short, length)}
    options = {"bigbird": {"block_size": config.block}, "longformer": {"window": config.window},
               "etc": {"radius": config.radius, "max_distance": 8}, "linformer": {"k": config.linformer_k},
               "local": {"window": config.window}}.get(attention, {})
    return {"attention": attention, "options": options, "max_length": length,
            "structure": "sentences" if attention == "etc" else "none", "block": config.dna_block}


def run_point(config: EvidenceConfig, task: str, attention: str, length: int, seed: int) -> dict:
    settings = TASK_SETTINGS[task]
    steps = config.steps or settings["steps"]
    fc = FinetuneConfig(data=task, length=length, size=config.sizes, data_seed=seed, seed=seed, steps=steps,
                        batch_size=config.batch_size, lr=settings["lr"], data_options=dict(settings["data_options"]),
                        dim=config.dim, heads=config.heads, layers=config.layers, ffn_dim=config.ffn_dim,
                        dropout=0.0, norm="pre", init_std=0.1, threads=config.threads, progress=config.progress,
                        **attention_settings(config, attention, length))
    s = finetune(fc)
    metric = METRIC[TASK_OF[task]]
    return {"task": task, "attention": attention, "length": length, "reads": s["max_length"], "seed": seed,
            "metric": metric, "value": s["test"][metric], "params": s["params"], "steps": s["steps"],
            "train_seconds": round(s["train_seconds"], 2), "tokens_per_s": round(s["tokens_per_s"])}


def _point(args) -> dict:
    return run_point(*args)


def _run_points(config: EvidenceConfig, todo: list[tuple]):
    """Rows of the `todo` points as they finish (in `workers` processes when more than one)."""
    args = [(config, *point) for point in todo]
    if config.workers <= 1:
        yield from map(_point, args)
        return
    import multiprocessing

    quiet = dataclasses.replace(config, progress=False)
    with multiprocessing.get_context("spawn").Pool(config.workers) as pool:
        yield from pool.imap_unordered(_point, [(quiet, *point) for point in todo])


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_evidence(config: EvidenceConfig) -> str:
    """Run every missing (task, attention, length, seed) point, then write the table and plot; returns the table."""
    config.validate()
    csv_path = Path(f"{config.out}.csv")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(csv_path)
    done = {(r["task"], r["attention"], int(r["length"]), int(r["seed"])) for r in rows}
    if not csv_path.is_file():
        with csv_path.open("w", newline="") as f:
            csv.writer(f).writerow(FIELDS)
    todo = [(task, attention, length, seed) for length in config.lengths for task in config.tasks
            for attention in config.attentions for seed in config.seeds
            if (task, attention, length, seed) not in done]
    t0 = time.perf_counter()
    for row in _run_points(config, todo):
        with csv_path.open("a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in FIELDS])
        rows.append({k: str(v) for k, v in row.items()})
    wall = time.perf_counter() - t0
    table = markdown_table(rows, config)
    Path(f"{config.out}.md").write_text(table + f"\n\nWall time of this call: {wall / 60:.1f} min.\n")
    (Path(f"{config.out}.json")).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    plot(rows, config, Path(f"{config.out}.png"))
    return table


def summarise(rows: list[dict]) -> dict:
    """(task, attention, length) -> (mean, std, n) over seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["attention"], int(r["length"])), []).append(float(r["value"]))
    out = {}
    for key, values in groups.items():
        m = sum(values) / len(values)
        sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[key] = (m, sd, len(values))
    return out


def markdown_table(rows: list[dict], config: EvidenceConfig) -> str:
    stats = summarise(rows)
    params = {}
    for r in rows:
        params.setdefault((r["task"], r["attention"]), set()).add(int(r["params"]))
    lines = []
    for task in config.tasks:
        metric = METRIC[TASK_OF[task]]
        lines.append(f"**{task}** (synthetic; test {metric.replace('_', ' ')}, mean ± std over seeds "
                     f"{','.join(map(str, config.seeds))})\n")
        lines.append("| attention | " + " | ".join(f"{n} tokens" for n in config.lengths) + " | parameters |")
        lines.append("|---" * (len(config.lengths) + 2) + "|")
        for attention in config.attentions:
            name = {"full": f"full (reads {config.short})", "etc": "etc + structure"}.get(attention, attention)
            cells = []
            for n in config.lengths:
                s = stats.get((task, attention, n))
                cells.append("" if s is None else f"{s[0]:.3f} ± {s[1]:.3f}" + (f" (n={s[2]})" if s[2] != len(
                    config.seeds) else ""))
            p = params.get((task, attention), set())
            ptext = f"{min(p):,}" if len(p) == 1 else (f"{min(p):,}–{max(p):,}" if p else "")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {ptext} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], config: EvidenceConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(rows)
    fig, axes = plt.subplots(1, len(config.tasks), figsize=(4.2 * len(config.tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], config.tasks, strict=True):
        for attention in config.attentions:
            pts = [(n, *stats[(task, attention, n)][:2]) for n in config.lengths if (task, attention, n) in stats]
            if pts:
                xs, ms, sds = zip(*pts, strict=True)
                label = f"full (first {config.short})" if attention == "full" else attention
                ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(config.lengths), [str(n) for n in config.lengths])
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel(METRIC[TASK_OF[task]].replace("_", " "))
        ax.set_title(f"{task} (synthetic)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
