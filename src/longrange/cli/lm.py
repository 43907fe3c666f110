"""`longrange lm`: byte-level language modelling over long text with segment memory (XL, compressive).

    longrange lm train corpus.txt --attention xl --out lm-xl --steps 300     # small, CPU-friendly
    longrange lm stream corpus.txt --model lm-xl --segment 128 --mem-len 256  # bits per byte, tokens/s

Argument parsing and progress bars only; the work is `longrange.models.memory` (byte_lm_config,
read_chunks, stream_perplexity, train_segments). Files are read as bytes: one token per byte
(vocabulary 257, 256 = padding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from longrange.cli.options import key_values
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
    import json

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
        json_out.write_text(json.dumps(row, indent=2) + "\n")


@lm_app.command("train")
def train(
    file: Annotated[Path, typer.Argument(help="Training text, read as bytes.")],
    out: Annotated[Path, Opt(help="Folder for the trained CausalLM (config.json + model.safetensors).")],
    attention: Annotated[str, Opt(help="xl or compressive (or any causal attention: no memory then).")] = "xl",
    steps: Annotated[int, Opt(help="Optimizer steps.")] = 300,
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
    overwrite: Annotated[bool, Opt(help="Replace OUT if it exists and is not empty.")] = False,
) -> None:
    """Train a small byte-level LM segment by segment, the memory carried between batches (XL's recipe)."""
    import torch
    from rich.console import Console

    from longrange.models import CausalLM
    from longrange.models.memory import train_segments

    size = _check_file(file)
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # subnormal optimizer states are ~100x slower on x86 CPUs (see lra train)
    if out.exists() and any(out.iterdir() if out.is_dir() else [out]) and not overwrite:
        raise typer.BadParameter(f"{out} exists and is not empty (pass --overwrite)", param_hint="--out")
    eval_bytes = min(16384, size // 10) if eval_bytes is None else eval_bytes
    if not 0 <= eval_bytes < size - segment:
        raise typer.BadParameter(f"must be in [0, {size - segment}) for a {size}-byte file", param_hint="--eval-bytes")
    torch.manual_seed(seed)
    try:
        lm = CausalLM(byte_lm_config(attention, dim=dim, heads=heads, layers=layers, ffn_dim=ffn_dim, segment=segment,
                                     mem_len=mem_len, options=key_values(opt, example="compression=mean", attention=attention)))
    except (TypeError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--attention/--opt") from None
    data = file.read_bytes()
    train_tokens = torch.frombuffer(bytearray(data[: size - eval_bytes]), dtype=torch.uint8).long()
    console = Console()
    before = _held_out(lm, data, eval_bytes, segment, console, "untrained") if eval_bytes else None
    losses: list[float] = []
    with _progress(console) as bar:
        task = bar.add_task(f"training {attention}", total=steps, info="")

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            recent = losses[-20:]
            bar.update(task, completed=step + 1, info=f"{sum(recent) / len(recent) / 0.6931:.3f} bits/byte")

        try:
            train_segments(lm, train_tokens, segment_len=segment, batch_size=batch_size, steps=steps, lr=lr,
                           on_step=on_step)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--segment/--batch-size") from None
    first, last = losses[: max(1, steps // 10)], losses[-max(1, steps // 10) :]
    console.print(f"trained {steps} steps on {train_tokens.numel()} bytes of {file.name}: training loss "
                  f"{sum(first) / len(first) / 0.6931:.3f} -> {sum(last) / len(last) / 0.6931:.3f} bits/byte")
    lm.eval()
    if eval_bytes:
        after = _held_out(lm, data, eval_bytes, segment, console, "trained")
        console.print(f"held-out {eval_bytes} bytes: {before:.3f} bits/byte untrained -> {after:.3f} trained")
    lm.save_pretrained(out, overwrite=True)
    console.print(f"wrote {out}; measure it with: longrange lm stream {file} --model {out} --segment {segment}")


def _held_out(lm, data: bytes, eval_bytes: int, segment: int, console, label: str) -> float:
    from longrange.models import stream_perplexity

    was_training = lm.training
    lm.eval()
    result = stream_perplexity(lm, data[-eval_bytes:], segment)
    lm.train(was_training)
    console.print(f"{label}: {result.bits_per_token:.3f} bits/byte on the held-out {eval_bytes} bytes")
    return result.bits_per_token
