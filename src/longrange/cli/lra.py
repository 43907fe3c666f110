"""`longrange lra ...`: generate data, train, evaluate, report, speed, presets. Argument parsing only;
the work is in `longrange.lra.generate`, `.train`, `.report` and `.speed`.

    longrange lra train                                   # tiny ListOps, full attention, a few minutes on CPU
    longrange lra train --task listops --preset tiny --attention bigbird --data-opt variant=short
    torchrun --nproc_per_node 2 -m longrange.cli lra train --attention bigbird --out runs/ddp
    longrange lra eval --run runs/listops-bigbird --split test
    longrange lra report runs/ --out lra-report
    longrange lra speed --device cuda --out lra-speed      # LRA's Table 2: steps/s and peak memory, text, batch 32
    longrange lra report --speed lra-speed --out lra-report
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from longrange.cli.options import fail, flag_errors, key_values, training_stops

lra_app = typer.Typer(help="Long Range Arena: generate data, train any attention under the paper's settings, "
                           "evaluate, report beside the published tables.", no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)
Opt = typer.Option
#: `lra speed`'s default: the mechanisms of the paper's Table 2
SPEED_ATTENTIONS = "full,local,linformer,reformer,bigbird,linear,performer"


@lra_app.command()
def generate(
    task: Annotated[str, typer.Argument(help="listops, pathfinder or pathx.")],
    out: Annotated[Path, Opt(help="Folder for the files (LRA's released layout).")],
    train: Annotated[int | None, Opt(help="Training examples (default: the generator's).")] = None,
    val: Annotated[int | None, Opt(help="Validation examples.")] = None,
    test: Annotated[int | None, Opt(help="Test examples.")] = None,
    seed: Annotated[int, Opt(help="Random seed.")] = 0,
    paper_sizes: Annotated[bool, Opt("--paper-sizes", help="The paper's split sizes (ListOps 96K/2K/2K).")] = False,
    resolution: Annotated[int | None, Opt(help="Pathfinder image side: 32 (pathfinder) or 128 (Path-X).")] = None,
    workers: Annotated[int, Opt(help="ListOps: processes drawing trees (the files do not depend on it).")] = 1,
) -> None:
    """Generate ListOps or Pathfinder data in LRA's released formats (each file written atomically)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from longrange.core.files import describe_os_error
    from longrange.lra.generate import generate as run_generate
    from longrange.lra.generate import summarize

    options = {} if resolution is None else {"resolution": resolution}
    what = "distinct trees kept" if task == "listops" else "images"
    columns = (TextColumn(f"generating {task}: {what}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            job = bar.add_task(task, total=None, note="")
            last = {"note": ""}

            def progress(done: int, total: int, note: str) -> None:
                last["note"] = "" if note == "images" else note
                bar.update(job, completed=done, total=total, note=last["note"])

            paths = run_generate(task, out, train=train, val=val, test=test, seed=seed, paper_sizes=paper_sizes,
                                 workers=workers, progress=progress, **options)
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None
    except OSError as e:  # a read-only or full disk: no file is left half-written
        fail(f"{describe_os_error(e)} (files already complete are kept; none is half-written)", code=1)
    typer.echo(summarize(task, paths) + (f" ({last['note']})" if last["note"] else ""))


@lra_app.command("train")
def train_cmd(
    task: Annotated[str, Opt(help="listops, text, retrieval, image, pathfinder or pathx.")] = "listops",
    attention: Annotated[str, Opt(help="Any registered attention (see `longrange list`).")] = "full",
    data: Annotated[Path | None, Opt(help="LRA data folder (default: the built-in tiny version of the task).")] = None,
    preset: Annotated[str | None, Opt(help="released, paper, tiny or a full name such as listops-paper "
                                           "(default: tiny without --data, released with).")] = None,
    opt: Annotated[list[str] | None, Opt("--opt", help="Attention option KEY=VALUE over the LRA defaults, "
                                                       "repeatable, e.g. --opt num_random_blocks=2.")] = None,
    data_opt: Annotated[list[str] | None, Opt("--data-opt", help="load_split option KEY=VALUE, repeatable, e.g. "
                                                                 "--data-opt variant=short.")] = None,
    steps: Annotated[int | None, Opt(help="Optimizer steps (default: the preset's).")] = None,
    batch_size: Annotated[int | None, Opt(help="Global batch per optimizer step (default: the preset's).")] = None,
    accumulate: Annotated[int, Opt(help="Micro-batches per optimizer step (gradient accumulation).")] = 1,
    lr: Annotated[float | None, Opt(help="Base learning rate (default: the preset's).")] = None,
    max_length: Annotated[int | None, Opt(help="Task tokens per document (default: the preset's).")] = None,
    dropout: Annotated[float | None, Opt(help="Dropout (default: the preset's).")] = None,
    amp: Annotated[bool, Opt("--amp", help="Mixed precision: bf16 autocast (fp16 + scaler on GPUs without "
                                            "bf16).")] = False,
    amp_dtype: Annotated[str | None, Opt(help="bf16 or fp16 with --amp.")] = None,
    out: Annotated[Path | None, Opt(help="Run folder (default: runs/TASK-ATTENTION).")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Start again in a non-empty --out.")] = False,
    seed: Annotated[int, Opt(help="Random seed (model, data order, dropout).")] = 0,
    eval_every: Annotated[int | None, Opt(help="Steps between validation passes.")] = None,
    checkpoint_every: Annotated[int | None, Opt(help="Steps between checkpoints (default: --eval-every).")] = None,
    eval_batches: Annotated[int | None, Opt(help="Cap each periodic validation at this many batches.")] = None,
    log_every: Annotated[int, Opt(help="Steps between training-metric rows.")] = 10,
    max_minutes: Annotated[float | None, Opt(help="Wall-clock budget of this call (data loading included): stop "
                                                  "after a step, checkpoint, evaluate val and test, and mark "
                                                  "summary.json stopped_early; --resume continues.")] = None,
    device: Annotated[str, Opt(help="auto, cpu or cuda[:N].")] = "auto",
    threads: Annotated[int | None, Opt(help="torch.set_num_threads.")] = None,
    flush_denormal: Annotated[bool, Opt("--flush-denormal/--keep-denormal", help="On CPU, flush subnormal floats "
                                        "to zero (x86 is ~100x slower on them).")] = True,
    tensorboard: Annotated[bool | None, Opt("--tensorboard/--no-tensorboard", help="TensorBoard logs in OUT/tb "
                                            "(default: when the tensorboard package is installed).")] = None,
    progress: Annotated[bool, Opt("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train an LRA classifier; multi-process with `torchrun --nproc_per_node N -m longrange.cli lra train ...`."""
    from longrange.core.files import describe_os_error
    from longrange.lra.train import POSITIVE_COUNTS, TrainConfig, check_counts, describe_plan, train

    if out is None and resume:
        raise typer.BadParameter("--resume needs the run folder to continue: pass --out DIR", param_hint="--resume")
    config = TrainConfig(
        task=task, attention=attention, preset=preset, data_dir=None if data is None else str(data),
        data_options=key_values(data_opt, "--data-opt", "variant=short"),
        options=key_values(opt, example="block_size=32", attention=attention), max_length=max_length,
        steps=steps, batch_size=batch_size, accumulate=accumulate, lr=lr, dropout=dropout, amp=amp,
        amp_dtype=amp_dtype, seed=seed, out=None if out is None else str(out), resume=resume, overwrite=overwrite,
        eval_every=eval_every, checkpoint_every=checkpoint_every, eval_batches=eval_batches, log_every=log_every,
        max_minutes=max_minutes, device=device, threads=threads, flush_denormal=flush_denormal, tensorboard=tensorboard,
        progress=progress,
    )
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, only the first process prints
    try:
        with training_stops(main), flag_errors():  # a bad count or setting: a usage error naming its flag
            check_counts(config, ("steps",) if resume else POSITIVE_COUNTS)
            if not resume and main:
                typer.echo(describe_plan(config))
            summary = train(config)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:  # a full or read-only disk while writing the run folder
        fail(describe_os_error(e), code=1)
    if main:
        typer.echo(f"{summary['task']}/{summary['attention']} ({summary['preset']}): test accuracy "
                   f"{100 * summary['test_accuracy']:.2f}% (majority class {100 * summary['test_majority']:.1f}%), "
                   f"{summary['steps_per_s'] or 0:.2f} steps/s, params {summary['params']:,} "
                   f"({summary['param_ratio']:.3f}× full) -> {config.run_dir()}")
        if summary.get("stopped_early"):
            typer.echo(f"stopped early by --max-minutes at step {summary['steps']} of {summary['planned_steps']} "
                       f"(--resume --out {config.run_dir()} continues)")


@lra_app.command("eval")
def eval_cmd(
    run: Annotated[Path, Opt(help="Run folder (its best/ model) or a checkpoint folder.")],
    split: Annotated[str, Opt(help="train, val or test.")] = "test",
    data: Annotated[Path | None, Opt(help="Data folder, if it moved since training.")] = None,
    batch_size: Annotated[int | None, Opt(help="Evaluation batch size.")] = None,
    device: Annotated[str, Opt(help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Accuracy and loss of a trained model on one split (JSON on stdout)."""
    from longrange.lra.train import evaluate

    try:
        result = evaluate(run, split, data_dir=None if data is None else str(data), batch_size=batch_size,
                          device=device)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result))


@lra_app.command()
def report(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders, or folders holding runs (default: runs, "
                                                           "unless --speed is given); `lra speed` folders too.")]
    = None,
    speed: Annotated[list[Path] | None, Opt("--speed", help="A folder written by `longrange lra speed` (its "
                                                            "speed.json), repeatable.")] = None,
    out: Annotated[Path, Opt(help="Folder for report.md, report.png and speed.png.")] = Path("lra-report"),
) -> None:
    """Markdown + PNG: our accuracy, steps/s and peak memory beside the paper's Tables 1 and 2."""
    from longrange.lra.report import collect_runs, collect_speed, is_speed_folder, write_report

    speed_dirs = list(speed or []) + [p for p in runs or [] if is_speed_folder(p)]
    run_dirs = [p for p in runs or [] if not is_speed_folder(p)]
    if not run_dirs and not speed_dirs:
        run_dirs = [Path("runs")]
    try:
        paths = write_report(collect_runs(run_dirs) if run_dirs else [], out,
                             speed=collect_speed(speed_dirs) if speed_dirs else None)
    except FileNotFoundError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@lra_app.command("speed")
def speed_cmd(
    attention: Annotated[str, Opt(help="Comma-separated attentions (any registered one).")] = SPEED_ATTENTIONS,
    lengths: Annotated[str, Opt(help="Comma-separated sequence lengths (CLS included), e.g. 1024,2048,4k.")]
    = "1024,2048,3072,4096",
    batch_size: Annotated[int, Opt(help="Examples per optimizer step (Table 2: 32).")] = 32,
    steps: Annotated[int, Opt(help="Timed optimizer steps per point.")] = 5,
    warmup: Annotated[int, Opt(help="Untimed optimizer steps before them.")] = 1,
    task: Annotated[str, Opt(help="LRA task whose model is built (Table 2: text).")] = "text",
    preset: Annotated[str, Opt(help="released, paper, tiny or a full preset name (Table 2: released).")]
    = "released",
    device: Annotated[str, Opt(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, Opt(help="torch threads per point (default: torch's).")] = None,
    amp: Annotated[bool, Opt("--amp", help="Mixed precision as `lra train --amp` (bf16 autocast; fp16 + "
                                            "scaler on GPUs without bf16).")] = False,
    flush_denormal: Annotated[bool, Opt("--flush-denormal/--keep-denormal", help="Flush subnormal floats to zero "
                                        "(as accelerators do; x86 CPUs are 10-100x slower on them).")] = True,
    out: Annotated[Path, Opt(help="Folder for speed.csv, speed.json and speed.md.")] = Path("lra-speed"),
    timeout: Annotated[float, Opt(help="Seconds per point before it is stopped (an error row).")] = 1800.0,
    progress: Annotated[bool, Opt("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """LRA's Table 2 measurement: training steps/s and peak memory of each attention at each length
    (a fresh process per point), beside the paper's ratios to its Transformer."""
    from longrange.lra.speed import SpeedSettings, check_settings, speed_sweep

    with flag_errors():
        settings = check_settings(SpeedSettings(
            attentions=attention, lengths=lengths, batch_size=batch_size, steps=steps, warmup=warmup, task=task,
            preset=preset, device=device, threads=threads, amp=amp, flush_denormal=flush_denormal, out=out,
            timeout=timeout))
    rows = speed_sweep(settings, show_progress=progress)
    failed = sum(1 for r in rows if r.get("error"))
    typer.echo(f"{len(rows) - failed} point(s) measured, {failed} failed -> {out}/speed.csv, speed.json, speed.md")


@lra_app.command()
def presets(
    task: Annotated[str | None, Opt(help="Only this task's presets.")] = None,
    check: Annotated[str | None, Opt(help="Also check LRA's equal-size rule for these attentions "
                                          "(comma-separated, or 'all').")] = None,
) -> None:
    """The per-task presets (released configs, paper appendix, tiny) and, with --check, the parameter rule."""
    from longrange.lra.presets import PRESETS, TASK_NAMES, parameter_check

    if task is not None and task not in TASK_NAMES:
        raise typer.BadParameter(f"unknown task {task!r}; expected one of {list(TASK_NAMES)}", param_hint="--task")
    for p in PRESETS.values():
        if task and p.task != task:
            continue
        length = p.max_length or "data"
        steps = p.steps if p.steps is not None else f"{p.epochs} epochs"
        typer.echo(f"{p.name:18s} bs {p.batch_size:<4} {steps!s:>10} lr {p.lr:<7g} wd {p.weight_decay:<5g} "
                   f"{p.schedule:8s} dim {p.dim:<4} heads {p.heads:<2} layers {p.layers} mlp {p.mlp_dim:<5} "
                   f"{p.pooling:4s} dropout {p.dropout:<4g} len {length}")
        if check:
            from longrange.lra.tasks import TASKS
            from longrange.mechanisms import list_attentions

            spec = TASKS[p.task]
            names = list_attentions() if check == "all" else [n.strip() for n in check.split(",") if n.strip()]
            for name in names:
                try:
                    result = parameter_check(p, name, num_classes=spec.num_classes, vocab_size=spec.vocab_size,
                                             dual=spec.dual, max_length=p.max_length or 1024, warn=False)
                except ValueError as e:
                    raise typer.BadParameter(str(e), param_hint="--check") from None
                typer.echo(f"    {result.describe()}")
