"""The sweep: settings and presets, one fresh process per point, resume, the matmul probe.

`run_bench(settings)` plans the (length, mechanism, mode) points, runs each one through
`python -m longrange.bench.point` in its own process (honest peak memory, no allocator state
carried between points), saves the JSON after every point (so `resume` can pick up an interrupted
sweep) and hands the results to `longrange.bench.report` for tables, CSV/JSON and the plot.

A failed point (an error, a timeout) stops the sweep unless `keep_going` (the points so far are
written; `resume` continues). Points measured while other processes kept the CPUs busy are
marked and left out of the fitted slopes unless `include_busy`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from longrange.bench import report
from longrange.bench.calibration import write_calibration
from longrange.bench.specs import (
    PEERS,
    check_mechanism,
    mechanism_options,
    peer_missing,
    split_backend,
    takes_global_tokens,
    validate_options,
    with_backends,
)
from longrange.core.config import ConfigError, parse_lengths, parse_names
from longrange.core.files import check_writable, describe_os_error
from longrange.measure import machine_meta, make_console, matmul_probe, run_in_subprocess
from longrange.mechanisms import list_attentions

MODES = ("fwd", "fwdbwd")
DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")

PRESETS: dict[str, dict[str, Any]] = {
    # the README's one-minute run on 2 cores
    "quick": {"mechanisms": ("full", "local", "longformer", "bigbird"), "lengths": (1024, 2048, 4096),
              "modes": ("fwd",), "repeats": 3},
    # the target sweep (many minutes): BERT-base shapes, ours against the HF peers
    "targets": {"mechanisms": ("full", "longformer", "bigbird", "hf-longformer", "hf-bigbird"),
                "lengths": (2048, 4096, 8192, 16384), "modes": ("fwd", "fwdbwd"), "repeats": 3},
    # every registered mechanism and every peer (those not installed are skipped, with a note)
    "all": {"mechanisms": tuple(list_attentions()) + tuple(PEERS), "lengths": (1024, 2048, 4096, 8192, 16384),
            "modes": ("fwd",), "repeats": 3},
    # the low-rank / kernel / hashing family against lucidrains' packages (forward, 1K-16K)
    "lowrank": {"mechanisms": ("full", "performer", "linear", "linformer", "reformer", "nystrom", "lucid-performer",
                               "lucid-linformer", "lucid-reformer", "lucid-nystrom"),
                "lengths": (1024, 2048, 4096, 8192, 16384), "modes": ("fwd",), "repeats": 3},
    # the survey's other families (docs/survey.md) against lucidrains' packages; synthesizer's dense
    # form is quadratic by design (heads·N² logits), so this preset stops at 8K
    "survey": {"mechanisms": ("full", "routing", "sinkhorn", "axial", "inducing", "memory_compressed", "synthesizer",
                              "lucid-routing", "lucid-sinkhorn", "lucid-axial", "lucid-isab"),
               "lengths": (1024, 2048, 4096, 8192), "modes": ("fwd",), "repeats": 3},
}


@dataclasses.dataclass
class BenchSettings:
    mechanisms: tuple[str, ...]
    lengths: tuple[int, ...]
    modes: tuple[str, ...] = ("fwd",)
    dim: int = 768  # BERT-base
    heads: int = 12
    batch: int = 1
    dtype: str = "fp32"
    device: str = "cpu"
    threads: int = 2
    repeats: int = 3
    warmup: int = 1
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per mechanism, preset merged
    global_tokens: int = 1  # for longformer / hf-longformer, at positions 0..g-1
    baseline: str | None = "full"
    out: Path = Path("bench-results")
    resume: bool = False
    timeout: float = 3600.0  # per point, seconds
    plot: bool = True
    preset: str = "quick"
    keep_going: bool = False  # False: the first failed point stops the sweep (and the command exits non-zero)
    include_busy: bool = False  # fit slopes over points measured on a busy machine too

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def make_settings(
    preset: str = "quick",
    *,
    mechanisms: str | tuple[str, ...] | None = None,
    lengths: str | tuple[int, ...] | None = None,
    mode: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    repeats: int | None = None,
    backend: str | tuple[str, ...] | None = None,
    **fields: Any,
) -> BenchSettings:
    """Settings from a preset with overrides; `options` = {mechanism: {option: value}} over the bench's
    settings (BENCH_OPTIONS) and the configs' defaults. Every problem is a ConfigError naming its option."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}", "preset")
    base = PRESETS[preset]
    mechs = parse_names(mechanisms, "mechanisms") if isinstance(mechanisms, str) else tuple(
        mechanisms or base["mechanisms"])
    if backend is not None:  # every mechanism on a block layout once per backend: name@backend
        chosen = parse_names(backend, "backend") if isinstance(backend, str) else tuple(backend)
        bad = [b for b in chosen if b not in ("engine", "flex", "auto")]
        if bad or not chosen:
            raise ConfigError(f"backend takes engine, flex and/or auto (comma-separated), got {backend!r}", "backend")
        mechs = with_backends(mechs, chosen)
    for name in mechs:
        check_mechanism(name)
    lens = parse_lengths(lengths) if isinstance(lengths, str) else tuple(lengths or base["lengths"])
    if any(not isinstance(n, int) or n <= 0 for n in lens):
        raise ConfigError(f"lengths must be positive integers, got {lens}", "lengths")
    if mode is None:
        modes = tuple(base["modes"])
    elif mode == "both":
        modes = MODES
    elif mode in MODES:
        modes = (mode,)
    else:
        raise ConfigError(f"mode must be fwd, fwdbwd or both, got {mode!r}", "mode")
    fields = {k: v for k, v in fields.items() if v is not None}
    s = BenchSettings(mechanisms=mechs, lengths=lens, modes=modes, preset=preset,
                      repeats=repeats if repeats is not None else base["repeats"], **fields)
    s.out = Path(s.out)
    _check_settings(s)
    options = dict(options or {})
    for name in options:
        check_mechanism(name)
    extra = sorted(set(options) - set(mechs) - {split_backend(m)[0] for m in mechs})
    if extra:
        raise ConfigError(f"options name mechanism(s) {extra} that are not in the sweep {list(mechs)}", "options")
    s.options = {}
    for name in mechs:
        merged = mechanism_options(name, {**options.get(split_backend(name)[0], {}), **options.get(name, {})})
        validate_options(name, merged, s.dim, s.heads)
        s.options[name] = merged
    return s


def _check_settings(s: BenchSettings) -> None:
    def positive(name, value, zero_ok=False):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero_ok else 1):
            kind = "a non-negative" if zero_ok else "a positive"
            raise ConfigError(f"{name} must be {kind} integer, got {value!r}", name)

    for name in ("dim", "heads", "batch", "threads", "repeats"):
        positive(name, getattr(s, name))
    positive("warmup", s.warmup, zero_ok=True)
    positive("global_tokens", s.global_tokens, zero_ok=True)
    if s.dim % s.heads:
        raise ConfigError(f"heads={s.heads} must divide dim={s.dim}", "heads")
    if s.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {s.dtype!r}", "dtype")
    if s.device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {s.device!r}", "device")
    if s.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but torch.cuda.is_available() is False", "device")
    if s.baseline in ("", "none"):
        s.baseline = None
    if s.baseline is not None:
        check_mechanism(s.baseline)
    if not isinstance(s.timeout, int | float) or isinstance(s.timeout, bool) or not s.timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {s.timeout!r}", "timeout")
    check_output_folder(s.out)


def check_output_folder(out: Path, option: str = "out") -> None:
    """A ConfigError naming `option` when `out` is a file or cannot be written (before any point runs)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder", option)
    try:
        check_writable(out, str(out))
    except OSError as e:
        raise ConfigError(describe_os_error(e), option) from None


# -- points ----------------------------------------------------------------------------------------
def plan_points(s: BenchSettings) -> tuple[list[dict[str, Any]], list[str]]:
    """-> (point specs in run order: length-major, so a partial sweep covers every mechanism; notes)."""
    notes, runnable = [], []
    for name in s.mechanisms:
        missing = peer_missing(name)
        if missing:
            notes.append(missing)
        else:
            runnable.append(name)
    specs = []
    for n in s.lengths:
        for name in runnable:
            for mode in s.modes:
                specs.append({
                    "mechanism": name, "n": n, "mode": mode, "dim": s.dim, "heads": s.heads, "batch": s.batch,
                    "dtype": s.dtype, "device": s.device, "threads": s.threads, "repeats": s.repeats,
                    "warmup": s.warmup, "options": s.options.get(name, {}),
                    "global_tokens": s.global_tokens if takes_global_tokens(name) else 0, "seed": 0,
                })
    return specs, notes


def point_key(p: dict[str, Any]) -> tuple:
    """What makes two points the same measurement (for --resume)."""
    return (p["mechanism"], p["n"], p["mode"], p["dim"], p["heads"], p.get("batch", 1), p.get("dtype", "fp32"),
            p.get("device", "cpu"), p.get("threads", 2), json.dumps(p.get("options", {}), sort_keys=True),
            p.get("global_tokens", 0))


def run_point_subprocess(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """One bench point in a fresh interpreter (`longrange.bench.point`); a failed point is a row with `error`."""
    return run_in_subprocess(spec, "longrange.bench.point", timeout)


def probe(s: BenchSettings) -> dict[str, Any]:
    """The machine's matmul rate with the sweep's threads, device, dtype and width."""
    return matmul_probe(dim=s.dim, threads=s.threads, device=s.device, dtype=s.dtype)


def load_previous(out: Path) -> dict[tuple, dict[str, Any]]:
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot resume: cannot read {path}: {e}", "resume") from e
    return {point_key(p): p for p in data.get("points", []) if not p.get("error")}


def run_bench(s: BenchSettings, console=None, *, show_progress: bool = True) -> dict[str, Any]:
    """Run the sweep, write results.json / results.csv / scaling.png under `s.out`, print the tables."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


    console = make_console(console)
    specs, notes = plan_points(s)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    previous = load_previous(s.out) if s.resume else {}
    s.out.mkdir(parents=True, exist_ok=True)
    first = probe(s)
    meta = machine_meta(s.to_dict(), s.device)
    meta.update(probe=first, notes=list(notes) + meta["notes"])
    console.print(f"matmul probe {first['shape']} {first['dtype']}: {first['gflops']:.1f} GFLOP/s "
                  f"({s.threads} threads)")
    points: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False, disable=not show_progress)
    with progress:
        task = progress.add_task("bench", total=len(specs))
        for spec in specs:
            label = f"{spec['mechanism']} n={spec['n']} {spec['mode']}"
            old = previous.get(point_key(spec))
            if old is not None:
                points.append({**old, "resumed": True})
                progress.update(task, advance=1, description=f"{label} (resumed)")
                continue
            progress.update(task, description=label)
            result = run_point_subprocess(spec, s.timeout)
            if result.get("error"):
                progress.console.print(f"[red]{label}: {result['error']}[/red]")
            points.append(result)
            report.write_json(s.out / "results.json", meta, points)  # after every point: resumable
            write_calibration(s.out, meta, points)
            progress.update(task, advance=1)
            if result.get("error") and not s.keep_going:
                left = len(specs) - len(points)
                meta["stopped"] = (f"stopped at the failed point {label}: {left} point(s) not run (--keep-going runs "
                                   "past failed points; --resume continues)")
                break
    meta["sweep_s"] = time.perf_counter() - t_start
    end_probe = probe(s)  # the better of two probes: one busy moment should not set the bar
    meta["probes"] = [first, end_probe]
    meta["probe"] = max(first, end_probe, key=lambda p: p["gflops"])
    if meta.get("stopped"):
        meta["notes"].append(meta["stopped"])
    result = report.finish(meta, points, s)
    report.write_outputs(s.out, result, plot=s.plot)
    write_calibration(s.out, meta, points)  # what `longrange advise --calibration` reads
    report.print_report(console, result)
    return result
