"""`longrange lm`: byte-level language modelling over long text with segment memory (XL, compressive).

    longrange lm train corpus.txt --attention xl --out lm-xl --steps 300     # small, CPU-friendly
    longrange lm stream corpus.txt --model lm-xl --segment 128 --mem-len 256  # bits per byte, tokens/s

Argument parsing and progress bars only; the work is `longrange.models.memory` (byte_lm_config,
read_chunks, stream_perplexity, train_segments). Files are read as bytes: one token per byte
(vocabulary 257, 256 = padding).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from longrange.cli.options import fail, key_values, training_stops
from longrange.core.files import atomic_write_text
from longrange.models.memory import byte_lm_config, read_chunks

lm_app = typer.Typer(help="Byte-level language modelling over long text with segment memory (xl, compressive).",
                     no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
Opt = typer.Option


def _check_file(path: Path, param: str = "FILE") -> int:
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint=param)
    size = path.stat().st_size
    if size < 2:
        raise typer.BadParameter(f"{path} has {size} byte(s); at least 2 are needed (one to predict)", param_hint=param)
    return size


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=True)


def run_stream(model, path: Path, segment: int, mem_len: int | None, limit: int | None, console, label: str) -> dict:
    from longrange.models import stream_perplexity

    total = min(path.stat().st_size, limit or path.stat().st_size) - 1
    with _progress(console) as bar:
        task = bar.add_task(f"streaming {path.name}", total=total, info="")
        result = stream_perplexity(model, read_chunks(path, limit), segment, mem_len=mem_len,
                                   progress=lambda done: bar.update(task, completed=done))
    row = {"model": label, **result.to_dict()}
    console.print(f"{label}: {result.tokens} bytes in {result.segments} segments of {segment}, "
                  f"{result.bits_per_token:.3f} bits/byte (perplexity {result.perplexity:.2f}), "
                  f"{result.tokens_per_second:,.0f} tokens/s, memory {result.max_memory_tokens} slots per layer")
    return row


@lm_app.command("stream")
def stream(
    file: Annotated[Path, typer.Argument(help="A text file, read as bytes (one token per byte), in chunks.")],
    model: Annotated[Path | None, Opt("--model", help="A CausalLM folder (`lm train --out`). Default: an untrained "
                                                      "byte-level model, labelled so.")] = None,
    segment: Annotated[int, Opt(help="Tokens per segment (at most the model's max_length).")] = 128,
    mem_len: Annotated[int | None, Opt("--mem-len", help="Memory length to evaluate with (default: the model's; "
                                                         "may exceed the training one).")] = None,
    attention: Annotated[str, Opt(help="Attention of the untrained model (without --model).")] = "xl",
    limit: Annotated[int | None, Opt(help="Only the first LIMIT bytes of FILE.")] = None,
    threads: Annotated[int | None, Opt(help="torch.set_num_threads.")] = None,
    seed: Annotated[int, Opt(help="Seed of the untrained model's weights.")] = 0,
    json_out: Annotated[Path | None, Opt("--json", help="Also write the result here as JSON.")] = None,
) -> None:
    """Perplexity (bits per byte) and throughput of a byte-level LM over a long file, segment by
    segment with bounded memory."""

    import torch
    from rich.console import Console

    from longrange.models import CausalLM

    _check_file(file)
    if threads:
        torch.set_num_threads(threads)
    if segment <= 0:
        raise typer.BadParameter(f"must be a positive int, got {segment}", param_hint="--segment")
    if model is None:
        torch.manual_seed(seed)
        try:
            lm = CausalLM(byte_lm_config(attention, segment=segment, mem_len=segment if mem_len is None else mem_len))
        except (TypeError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--attention") from None
        label = f"untrained {attention} (seed {seed}; train one with `longrange lm train`)"
    else:
        try:
            lm = CausalLM.from_pretrained(model)
        except (OSError, TypeError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--model") from None
        label = f"{model} ({lm.config.attention})"
        if lm.config.vocab_size < 256:
            raise typer.BadParameter(f"{model} has vocab_size={lm.config.vocab_size}; a byte-level model needs 256+",
                                     param_hint="--model")
        if segment > lm.config.max_length:
            raise typer.BadParameter(f"segment={segment} exceeds the model's max_length={lm.config.max_length}",
                                     param_hint="--segment")
    lm.eval()
    try:
        row = run_stream(lm, file, segment, mem_len, limit, Console(), label)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--mem-len") from None
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(row, indent=2) + "\n")


#: what `lm train` records in OUT/train.json: the run's settings, which --resume reuses
RUN_SETTINGS = ("attention", "segment", "mem_len", "batch_size", "dim", "heads", "layers", "ffn_dim", "lr", "opt",
                "eval_bytes", "seed")
RUN_JSON = "train.json"
CHECKPOINT = "checkpoint"


@lm_app.command("train")
def train(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Training text, read as bytes.")],
    out: Annotated[Path, Opt(help="Folder for the trained CausalLM (config.json + model.safetensors), its "
                                  "train.json and checkpoint/ (the latest state, for --resume).")],
    attention: Annotated[str, Opt(help="xl or compressive (or any causal attention: no memory then).")] = "xl",
    steps: Annotated[int, Opt(help="Optimizer steps (with --resume: the total to reach).")] = 300,
    segment: Annotated[int, Opt(help="Tokens per segment (BPTT length; the model's max_length).")] = 64,
    mem_len: Annotated[int, Opt("--mem-len", help="Memory length per layer during training.")] = 64,
    batch_size: Annotated[int, Opt("--batch-size", help="Parallel streams (the text is cut into this many "
                                                         "contiguous parts).")] = 8,
    dim: Annotated[int, Opt(help="Hidden size.")] = 64,
    heads: Annotated[int, Opt(help="Attention heads.")] = 4,
    layers: Annotated[int, Opt(help="Layers.")] = 2,
    ffn_dim: Annotated[int, Opt("--ffn-dim", help="Feed-forward size.")] = 256,
    lr: Annotated[float, Opt(help="AdamW learning rate.")] = 3e-3,
    opt: Annotated[list[str] | None, Opt("--opt", help="Attention option KEY=VALUE, repeatable, e.g. "
                                                        "--opt compression=mean --opt cmem_len=32")] = None,
    eval_bytes: Annotated[int | None, Opt("--eval-bytes", help=(
        "Hold out the last EVAL_BYTES bytes and report bits/byte on them before and after training (0: none; "
        "default: a tenth of FILE, at most 16384)."))] = None,
    seed: Annotated[int, Opt(help="Seed of the weights.")] = 0,
    threads: Annotated[int | None, Opt(help="torch.set_num_threads.")] = None,
    overwrite: Annotated[bool, Opt(help="Start again in OUT if it exists and is not empty.")] = False,
    checkpoint_every: Annotated[int, Opt("--checkpoint-every", help="Steps between checkpoints in OUT/checkpoint "
                                                                   "(also written at the end and on Ctrl-C).")] = 100,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in OUT from its checkpoint (same FILE; the "
                                                 "settings come from OUT/train.json; --steps may grow).")] = False,
) -> None:
    """Train a small byte-level LM segment by segment, the memory carried between batches (XL's recipe).

    Every check happens before any work; the state is saved in OUT/checkpoint every --checkpoint-every
    steps and on Ctrl-C (then `--resume` continues); a non-finite loss stops the run (exit 1); a failed
    final write keeps the weights elsewhere and says where."""
    import hashlib

    import torch
    from rich.console import Console

    from longrange.core.config import ConfigError
    from longrange.core.files import check_writable, describe_os_error
    from longrange.models import CausalLM
    from longrange.models.checkpoint import read_config
    from longrange.models.memory import check_segments, train_segments

    size = _check_file(file)
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    checkpoint = out / CHECKPOINT
    given = {k: v for k, v in locals().items() if k in RUN_SETTINGS}
    if resume:
        settings = _resume_settings(ctx, out, given, file, size, digest)
    else:
        if out.exists() and any(out.iterdir() if out.is_dir() else [out]) and not overwrite:
            raise typer.BadParameter(f"{out} exists and is not empty (pass --overwrite to start again, or --resume to "
                                     "continue its run)", param_hint="--out")
        settings = given
    s = settings
    for flag, value in (("--steps", steps), ("--segment", s["segment"]), ("--batch-size", s["batch_size"]),
                        ("--dim", s["dim"]), ("--heads", s["heads"]), ("--layers", s["layers"]),
                        ("--ffn-dim", s["ffn_dim"]), ("--checkpoint-every", checkpoint_every)):
        if value <= 0:
            raise typer.BadParameter(f"must be a positive int, got {value}", param_hint=flag)
    if s["mem_len"] < 0:
        raise typer.BadParameter(f"must be a non-negative int, got {s['mem_len']}", param_hint="--mem-len")
    if not s["lr"] > 0:
        raise typer.BadParameter(f"must be a positive number, got {s['lr']}", param_hint="--lr")
    eval_bytes = min(16384, size // 10) if s["eval_bytes"] is None else s["eval_bytes"]
    if not 0 <= eval_bytes < size - s["segment"]:
        raise typer.BadParameter(f"must be in [0, {size - s['segment']}) for a {size}-byte file",
                                 param_hint="--eval-bytes")
    try:
        check_segments(size - eval_bytes, s["segment"], s["batch_size"])
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint="--segment/--batch-size") from None
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # subnormal optimizer states are ~100x slower on x86 CPUs (see lra train)
    torch.manual_seed(s["seed"])
    try:
        if resume:
            lm = CausalLM(read_config(checkpoint)[1])
        else:
            options = key_values(s["opt"], example="compression=mean", attention=s["attention"])
            lm = CausalLM(byte_lm_config(s["attention"], dim=s["dim"], heads=s["heads"], layers=s["layers"],
                                         ffn_dim=s["ffn_dim"], segment=s["segment"], mem_len=s["mem_len"],
                                         options=options))
    except (TypeError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--out" if resume else "--attention/--opt") from None
    params = sum(p.numel() for p in lm.parameters())
    try:  # room for the model, the checkpoint (weights + AdamW's two moments) and its replacement
        check_writable(out, "--out", need_bytes=params * 4 * 8)
    except OSError as e:
        raise typer.BadParameter(describe_os_error(e), param_hint="--out") from None

    console = Console()
    if not resume:
        if overwrite and out.is_dir():
            shutil.rmtree(checkpoint, ignore_errors=True)  # a new run: the old run's state must not be resumed
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / RUN_JSON, json.dumps({**settings, "file": str(file), "bytes": size,
                                                          "sha256": digest}, indent=2) + "\n")
        except OSError as e:
            fail(f"could not write {out / RUN_JSON}: {describe_os_error(e)}", code=1)
    train_tokens = torch.frombuffer(bytearray(data[: size - eval_bytes]), dtype=torch.uint8).long()
    before = _held_out(lm, data, eval_bytes, s["segment"], console, "untrained") if eval_bytes and not resume \
        else None
    losses: list[float] = []
    resume_command = f"longrange lm train {file} --out {out} --resume --steps {steps}"
    try:
        with training_stops(resume=resume_command, checkpoint=str(checkpoint)), _progress(console) as bar:
            task = bar.add_task(f"training {s['attention']}", total=steps, info="")

            def on_step(step: int, loss: float) -> None:
                losses.append(loss)
                recent = losses[-20:]
                bar.update(task, completed=step + 1, info=f"{sum(recent) / len(recent) / 0.6931:.3f} bits/byte")

            losses = train_segments(lm, train_tokens, segment_len=s["segment"], batch_size=s["batch_size"],
                                    steps=steps, lr=s["lr"], on_step=on_step, checkpoint=checkpoint,
                                    checkpoint_every=checkpoint_every, resume=resume)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # a resume that does not fit (names the file)
        fail(str(e), code=2)
    except OSError as e:  # the disk filled up or turned read-only while writing a checkpoint
        fail(_rescue(lm, out, e, "a checkpoint"), code=1)
    first, last = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    console.print(f"trained {len(losses)} steps on {train_tokens.numel()} bytes of {file.name}: training loss "
                  f"{sum(first) / len(first) / 0.6931:.3f} -> {sum(last) / len(last) / 0.6931:.3f} bits/byte")
    lm.eval()
    if eval_bytes:
        after = _held_out(lm, data, eval_bytes, s["segment"], console, "trained")
        if before is not None:
            console.print(f"held-out {eval_bytes} bytes: {before:.3f} bits/byte untrained -> {after:.3f} trained")
    try:
        lm.save_pretrained(out, overwrite=True)
    except OSError as e:
        fail(_rescue(lm, out, e, str(out)), code=1)
    console.print(f"wrote {out}; measure it with: longrange lm stream {file} --model {out} --segment {s['segment']}")


def _resume_settings(ctx, out: Path, given: dict, file: Path, size: int, digest: str) -> dict:
    """The settings saved in OUT/train.json; a flag given with another value, another FILE or a
    missing / corrupt file is a usage error naming it."""
    path = out / RUN_JSON
    if not (out / CHECKPOINT / "trainer.pt").is_file():
        raise typer.BadParameter(f"no checkpoint to resume in {out} ({out / CHECKPOINT / 'trainer.pt'} is missing); "
                                 "start the run without --resume", param_hint="--resume")
    try:
        saved = json.loads(path.read_text())
        settings = {k: saved[k] for k in RUN_SETTINGS}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise typer.BadParameter(f"{path} is missing or corrupt ({type(e).__name__}: {e}); it holds the run's "
                                 "settings", param_hint="--resume") from None
    if saved.get("bytes") != size or saved.get("sha256") != digest:
        raise typer.BadParameter(f"{file} is not the text this run was trained on ({saved.get('file')}, "
                                 f"{saved.get('bytes')} bytes)", param_hint="FILE")
    for key, value in given.items():
        source = ctx.get_parameter_source(key)
        if getattr(source, "name", None) == "COMMANDLINE" and value != settings[key]:
            raise typer.BadParameter(f"the run in {out} has {key}={settings[key]!r} ({path}); a resumed run keeps "
                                     "its settings", param_hint="--" + key.replace("_", "-"))
    return settings


def _rescue(lm, out: Path, err: OSError, what: str) -> str:
    """Save the weights somewhere that takes them (the temporary folder, then the working folder) and
    return the one-line message: what failed, and where the weights are now."""
    import tempfile

    from longrange.core.files import describe_os_error

    name = f"longrange-lm-rescue-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}"
    for base in (Path(tempfile.gettempdir()), Path.cwd()):
        try:
            lm.save_pretrained(base / name, overwrite=False)
        except OSError:
            continue
        return (f"could not write {what}: {describe_os_error(err)}; the trained weights are saved in {base / name} "
                f"instead (CausalLM.from_pretrained reads them)")
    return f"could not write {what}: {describe_os_error(err)}; no other folder took the weights either: they are lost"


def _held_out(lm, data: bytes, eval_bytes: int, segment: int, console, label: str) -> float:
    from longrange.models import stream_perplexity

    was_training = lm.training
    lm.eval()
    result = stream_perplexity(lm, data[-eval_bytes:], segment)
    lm.train(was_training)
    console.print(f"{label}: {result.bits_per_token:.3f} bits/byte on the held-out {eval_bytes} bytes")
    return result.bits_per_token
