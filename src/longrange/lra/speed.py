"""`longrange lra speed`: LRA's Table 2 measurement (training steps/s and peak memory) for our mechanisms.

Table 2 of the paper: byte-level text, the released text config (emb 256, 4 heads, 4 layers, mlp
1024, CLS pooling), batch 32, lengths 1K-4K, TPU v3. Here each (mechanism, length) point runs in a
fresh process (`python -m longrange.lra.speed '<spec json>'`, as the layer bench does: honest peak
memory, no allocator state carried over) and

- builds the model exactly as `lra train` does: the preset, LRA's attention defaults
  (`presets.attention_options`), `model.build_model`, AdamW (`train.make_optimizer`) at the schedule's
  rate (`train.learning_rate`), autocast (`train.autocast_context`, --amp), and runs `train.train_step`;
- feeds random token batches of exactly `length` tokens (CLS + length - 1 task tokens, an all-true
  attention mask as training passes it, no padding);
- times `steps` optimizer steps (forward, backward, AdamW) after `warmup` untimed ones;
- flushes subnormal floats to zero (`flush_denormal`, default on), as TPUs and GPUs do in hardware:
  on x86 CPUs subnormals go through microcode, and with LRA's tiny warm-up learning rates they
  appear after a few steps (seen at 4K: one step 5-15× slower than the others);
- records steps/s, examples/s, peak memory (CUDA: `max_memory_allocated`, params and optimizer
  state included, as the paper's peak; CPU: growth of the resident-set peak over the process after
  set-up, via `longrange.measure`), parameters, and the CPUs other processes kept busy.

    rows = speed_sweep(SpeedSettings(attentions=("full", "performer"), lengths=(1024, 2048), device="cuda"))
    row = speed_point({"attention": "full", "length": 1024, "batch_size": 2, "task": "text", "preset": "tiny"})

A failed point (an error, out of memory, a timeout) is a row with `error` set; the sweep goes on.
`speed.json` (settings, machine, rows) is rewritten after every point; `speed.csv` and `speed.md`
at the end. `longrange lra report --speed DIR` puts the rows beside Table 2.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from longrange.core.config import ConfigError, parse_lengths, parse_names
from longrange.lra.model import build_model
from longrange.lra.presets import attention_options, get_preset
from longrange.lra.report import add_speed_ratios, speed_sweep_markdown
from longrange.lra.tasks import TOKEN_OFFSET, get_task
from longrange.lra.train import (
    TrainConfig,
    autocast_context,
    learning_rate,
    make_optimizer,
    pick_device,
    seed_everything,
    train_step,
)
from longrange.measure import (
    busy,
    contention_note,
    machine_meta,
    make_console,
    measure_safely,
    point_main,
    run_in_subprocess,
    timed_runs,
)
from longrange.mechanisms import list_attentions

SPEED_JSON = "speed.json"
SPEED_CSV = "speed.csv"
SPEED_MD = "speed.md"
DEFAULT_ATTENTIONS = ("full", "local", "linformer", "reformer", "bigbird", "linear", "performer")
DEFAULT_LENGTHS = (1024, 2048, 3072, 4096)
DEVICES = ("cpu", "cuda")
#: the columns of speed.csv (speed.json rows hold these and a few more: raw memory figures, step times)
FIELDS = ("attention", "length", "batch_size", "task", "preset", "device", "threads", "amp", "flush_denormal",
          "steps", "warmup",
          "seconds", "steps_per_s", "examples_per_s", "ratio_full", "paper_ratio", "peak_memory_mb", "memory_kind",
          "memory_ratio_full", "paper_steps_per_s", "paper_gb", "paper_memory_ratio", "params", "other_cpus",
          "wall_s", "error")


@dataclasses.dataclass
class SpeedSettings:
    """One sweep: every attention at every length, under one task/preset/batch/device."""

    attentions: tuple[str, ...] = DEFAULT_ATTENTIONS
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    batch_size: int = 32
    steps: int = 5
    warmup: int = 1
    task: str = "text"
    preset: str = "released"
    device: str = "cpu"
    threads: int | None = None  # torch threads (and OMP/MKL) per point; None: torch's default
    amp: bool = False
    flush_denormal: bool = True  # torch.set_flush_denormal in each point (CPU: as accelerators do)
    out: Path = Path("lra-speed")
    timeout: float = 1800.0  # seconds per point
    options: dict[str, dict] = dataclasses.field(default_factory=dict)  # per attention, over the LRA defaults
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


# -- settings -----------------------------------------------------------------------------------------------------
def parse_attentions(text: str) -> tuple[str, ...]:
    """'full, bigbird' -> ('full', 'bigbird'); every name must be a registered attention."""

    names = parse_names(text, "attentions")
    unknown = [n for n in names if n not in list_attentions()]
    if unknown:
        raise ConfigError(f"unknown attention(s) {unknown}; expected names from {list_attentions()}", "attentions")
    return names


def check_settings(s: SpeedSettings) -> SpeedSettings:
    """Every problem is a ConfigError naming its option; returns `s` (lengths sorted)."""

    if isinstance(s.attentions, str):
        s.attentions = parse_attentions(s.attentions)
    else:
        s.attentions = parse_attentions(",".join(s.attentions))
    if isinstance(s.lengths, str):
        s.lengths = parse_lengths(s.lengths)
    if not s.lengths or any(not _is_int(n) or n < 2 for n in s.lengths):
        raise ConfigError(f"lengths must be integers >= 2 (CLS + tokens), got {s.lengths!r}", "lengths")
    s.lengths = tuple(sorted(set(s.lengths)))
    for name, low in (("batch_size", 1), ("steps", 1), ("warmup", 0)):
        value = getattr(s, name)
        if not _is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}", name)
    if s.threads is not None and (not _is_int(s.threads) or s.threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {s.threads!r}", "threads")
    if not isinstance(s.timeout, int | float) or s.timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {s.timeout!r}", "timeout")
    _check_device(s.device)
    try:
        get_preset(s.task, s.preset)
    except ValueError as e:
        raise ConfigError(str(e), "task" if "unknown task" in str(e) else "preset") from None
    extra = sorted(set(s.options) - set(s.attentions))
    if extra:
        raise ConfigError(f"options given for {extra}, which are not in the sweep {list(s.attentions)}", "options")
    s.out = Path(s.out)
    return s


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {list(DEVICES)}, got {device!r}", "device")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device cuda asked for but torch.cuda.is_available() is False; use --device cpu",
                                   "device")


def plan_points(s: SpeedSettings) -> list[dict[str, Any]]:
    """Point specs, length-major (a partial sweep covers every mechanism at the shorter lengths)."""
    return [{"attention": name, "length": n, "batch_size": s.batch_size, "task": s.task, "preset": s.preset,
             "device": s.device, "threads": s.threads, "amp": s.amp, "flush_denormal": s.flush_denormal,
             "steps": s.steps, "warmup": s.warmup,
             "options": s.options.get(name, {}), "seed": s.seed}
            for n in s.lengths for name in s.attentions]


# -- one point (in its own process) -------------------------------------------------------------------------------
def random_batch(task_spec, batch_size: int, length: int, generator, device) -> dict:
    """`batch_size` sequences of exactly `length` ids (CLS, then random task symbols), all-true masks, labels."""
    import torch


    def ids():
        x = torch.randint(TOKEN_OFFSET, task_spec.vocab_size, (batch_size, length), generator=generator)
        x[:, 0] = task_spec.cls_id
        return x

    batch = {"input_ids": ids(), "attention_mask": torch.ones(batch_size, length, dtype=torch.bool),
             "labels": torch.randint(0, task_spec.num_classes, (batch_size,), generator=generator)}
    if task_spec.dual:
        batch.update(input_ids2=ids(), attention_mask2=torch.ones(batch_size, length, dtype=torch.bool))
    return {k: v.to(device) for k, v in batch.items()}


class SpeedPoint(NamedTuple):
    model: Any
    batch: dict
    options: dict
    device: Any
    step: Callable[[], None]


def build_point(spec: dict[str, Any]) -> SpeedPoint:
    """SpeedPoint(model, batch, attention options, device, step function) of one point, built as `lra
    train` builds a run and stepped by its `train_step` at the schedule's learning rate."""
    import torch


    device = pick_device(spec.get("device", "cpu"))
    preset, task = get_preset(spec["task"], spec.get("preset")), get_task(spec["task"])
    length, attention = int(spec["length"]), spec["attention"]
    options = attention_options(preset, attention, length, spec.get("options") or {})
    seed_everything(int(spec.get("seed", 0)))
    model = build_model(preset, attention, num_classes=task.num_classes, vocab_size=task.vocab_size,
                        max_length=length, options=options, dual=task.dual, pad_id=task.pad_id).to(device)
    model.train()
    total = int(spec["warmup"]) + int(spec["steps"])
    config = TrainConfig(task=spec["task"], attention=attention, preset=preset.name, amp=bool(spec["amp"]))
    opt = make_optimizer(model, preset.weight_decay)
    autocast, amp_dtype = autocast_context(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    batch = random_batch(task, int(spec["batch_size"]), length, gen, device)
    steps = iter(range(total))

    def step() -> None:
        lr = learning_rate(config, preset, next(steps), min(preset.warmup_steps(), total), total)
        train_step(model, [batch], opt, lr, autocast, scaler=scaler)

    return SpeedPoint(model, batch, options, device, step)


def speed_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (attention, length) point in this process: the spec plus steps/s, memory, params."""
    import torch


    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    flushed = bool(spec.get("flush_denormal", True)) and torch.set_flush_denormal(True)
    model, _, options, device, step = build_point(spec)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times, others, memory = timed_runs(step, sync, device, int(spec["warmup"]), int(spec["steps"]))
    seconds = sum(times)
    cuda = device.type == "cuda"
    return {
        **spec,
        "seconds": seconds,
        "step_ms": [t * 1e3 for t in times],
        "steps_per_s": len(times) / seconds,
        "examples_per_s": len(times) * int(spec["batch_size"]) / seconds,
        "peak_memory_mb": memory["cuda_peak_mb"] if cuda else memory["rss_increase_mb"],
        "memory_kind": "cuda_max_allocated" if cuda else "cpu_rss_growth",
        "rss_base_mb": memory["rss_base_mb"],
        "rss_peak_mb": memory["rss_peak_mb"],
        "params": sum(p.numel() for p in model.parameters()),
        "attention_options": options,
        "other_cpus": others,
        "threads_used": torch.get_num_threads(),
        "flush_denormal": flushed,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "error": None,
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m longrange.lra.speed '<spec json>'`: one point, one JSON line on stdout."""

    return point_main(speed_point, "longrange.lra.speed", argv)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """`speed_point(spec)`, or the spec with `error` set when it raises (a row, not a crash of the sweep)."""

    return measure_safely(speed_point, spec)


# -- the sweep ----------------------------------------------------------------------------------------------------
def run_point_subprocess(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """One point in a fresh interpreter; never raises for a failed point: the row's `error` says why."""
    return run_in_subprocess(spec, "longrange.lra.speed", timeout)


def contention_notes(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The machine's busy-at-start note, and one naming the points measured while others kept CPUs busy."""
    note = contention_note(rows, lambda r: f"{r['attention']}@{r['length']}")
    return [n for n in meta.get("notes", []) if n.startswith("machine busy")] + ([note] if note else [])


def speed_sweep(settings: SpeedSettings | None = None, *, console=None, show_progress: bool = True,
                **fields: Any) -> list[dict[str, Any]]:
    """Run every point of `settings` (or SpeedSettings(**fields)) in its own process; write speed.json
    (after every point), speed.csv and speed.md under `settings.out`; print the table; return the rows."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if settings is not None and fields:
        raise TypeError(f"speed_sweep: pass settings or fields, not both (got settings and {sorted(fields)})")
    s = check_settings(settings if settings is not None else SpeedSettings(**fields))
    console = make_console(console)
    s.out.mkdir(parents=True, exist_ok=True)
    meta, rows = machine_meta(s.to_dict(), s.device), []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not show_progress)
    t0 = time.perf_counter()
    with progress:
        bar = progress.add_task("lra speed", total=len(s.attentions) * len(s.lengths))
        for spec in plan_points(s):
            label = f"{spec['attention']} n={spec['length']}"
            progress.update(bar, description=label)
            row = run_point_subprocess(spec, s.timeout)
            if row.get("error"):
                progress.console.print(f"[red]{label}: {row['error']}[/red]")
            rows.append(row)
            write_json(s.out / SPEED_JSON, meta, add_speed_ratios(rows))
            progress.update(bar, advance=1)
    meta["sweep_s"] = time.perf_counter() - t0
    meta["notes"] = contention_notes(meta, rows)
    write_outputs(s.out, meta, add_speed_ratios(rows))
    print_table(console, meta, rows)
    return rows


# -- outputs ------------------------------------------------------------------------------------------------------
def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """speed.json, written to a temporary file and renamed (a killed sweep leaves a readable file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    tmp.replace(path)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """speed.csv: the FIELDS columns, one row per point."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in FIELDS})


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_outputs(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Path]:
    """speed.json, speed.csv and speed.md under `out`."""
    paths = {"json": out / SPEED_JSON, "csv": out / SPEED_CSV, "md": out / SPEED_MD}
    write_json(paths["json"], meta, rows)
    write_csv(paths["csv"], rows)
    paths["md"].write_text("\n".join(speed_sweep_markdown(rows, meta, title=True)) + "\n")
    return paths


def _f(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def print_table(console, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The rich table: ours beside Table 2, then the sweep's notes."""
    from rich.table import Table

    s = meta["settings"]
    where = meta.get("gpu") or f"cpu, {s['threads'] or 'default'} threads"
    table = Table(title=f"LRA speed: {s['task']} ({s['preset']}), batch {s['batch_size']}, {where}"
                        f"{', amp' if s['amp'] else ''}; paper: Table 2 (TPU v3, batch 32)")
    for col in ("attention", "length", "steps/s", "examples/s", "× full", "× Transformer (paper)", "peak MB",
                "mem × full", "paper GB", "params", "note"):
        table.add_column(col, justify="left" if col in ("attention", "note") else "right")
    for r in add_speed_ratios(rows):
        note = f"[red]{r['error']}[/red]" if r.get("error") else (
            f"[yellow]busy: others used {r['other_cpus']:.1f} CPUs[/yellow]"
            if busy(r) else "")
        table.add_row(r["attention"], str(r["length"]), _f(r.get("steps_per_s"), ".3g"),
                      _f(r.get("examples_per_s"), ".3g"), _f(r.get("ratio_full")), _f(r.get("paper_ratio")),
                      _f(r.get("peak_memory_mb"), ".0f"), _f(r.get("memory_ratio_full")), _f(r.get("paper_gb")),
                      _f(r.get("params"), ","), note)
    console.print(table)
    for note in meta.get("notes", []):
        console.print(f"[yellow]{note}[/yellow]")


def load_speed(folder: str | Path) -> dict[str, Any]:
    """{"meta": ..., "rows": [...]} of a speed folder (or a speed.json file)."""
    path = Path(folder)
    path = path / SPEED_JSON if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--speed: no {SPEED_JSON} at {path} (run `longrange lra speed --out DIR` first)")
    return json.loads(path.read_text())


if __name__ == "__main__":
    raise SystemExit(main())
