"""`longrange pretrain`, `longrange finetune` and `longrange apps evidence`: argument parsing only; the
work is in `longrange.apps` (pretrain, finetune, evidence).

    longrange pretrain corpus/ --attention bigbird --max-length 4096 --out runs/pt
    longrange pretrain genome.fa --tokenizer dna:k=6,overlap --structure sentences --cpc --out runs/dna
    torchrun --nproc_per_node 2 -m longrange.cli pretrain corpus/ --out runs/pt-ddp
    longrange finetune qa --init runs/pt/model --data long-qa --length 2048 --out runs/qa
    longrange apps evidence --out docs/results/apps-evidence
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from longrange.cli.options import fail, flag_errors, key_values, training_stops

apps_app = typer.Typer(help="Applications: the evidence run (accuracy against input length per attention).",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
Opt = typer.Option
PRETRAIN_FLAGS = {"data": "DATA", "config": "--resume"}
FINETUNE_FLAGS = {"task": "TASK"}


def pretrain(
    data: Annotated[list[Path], typer.Argument(help="Text files, JSONL (--text-field) or FASTA; files or folders.")],
    out: Annotated[Path | None, Opt(help="Run folder (default: runs/pretrain); the model lands in OUT/model.")] = None,
    attention: Annotated[str | None, Opt(help="Any registered attention (default: bigbird; etc with --structure "
                                              "sentences).")] = None,
    opt: Annotated[list[str] | None, Opt("--opt", help="Attention option KEY=VALUE, repeatable.")] = None,
    max_length: Annotated[int, Opt(help="Tokens per example (position table of a fresh model).")] = 4096,
    structure: Annotated[str, Opt(help="none, or sentences: ETC with one global token per sentence.")] = "none",
    cpc: Annotated[bool, Opt("--cpc", help="Add ETC's Contrastive Predictive Coding (needs --structure "
                                           "sentences).")] = False,
    masking: Annotated[str, Opt(help="token (BERT), word (whole words) or span (SpanBERT).")] = "token",
    mlm_probability: Annotated[float, Opt(help="Share of tokens to predict.")] = 0.15,
    tokenizer: Annotated[str | None, Opt(help="byte, dna, dna:k=6,overlap or a tokenizer folder (default: "
                                              "--init's, dna for FASTA, else byte).")] = None,
    text_field: Annotated[str, Opt(help="JSONL field holding the text.")] = "text",
    init: Annotated[Path | None, Opt(help="Start from a model folder (e.g. `longrange convert` output).")] = None,
    dim: Annotated[int, Opt(help="Width of a fresh model.")] = 128,
    layers: Annotated[int, Opt(help="Layers of a fresh model.")] = 2,
    heads: Annotated[int, Opt(help="Heads of a fresh model.")] = 4,
    ffn_dim: Annotated[int, Opt(help="Feed-forward width of a fresh model.")] = 512,
    steps: Annotated[int, Opt(help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, Opt(help="Global batch per step (split over processes and --accumulate).")] = 8,
    accumulate: Annotated[int, Opt(help="Micro-batches per step.")] = 1,
    lr: Annotated[float, Opt(help="Peak learning rate (linear warm-up and decay).")] = 5e-4,
    gradient_checkpointing: Annotated[bool, Opt("--gradient-checkpointing", help="Recompute blocks in the "
                                                                                 "backward pass.")] = False,
    amp: Annotated[bool | None, Opt("--amp/--no-amp", help="bf16 autocast (default: on GPU only).")] = None,
    seed: Annotated[int, Opt(help="Seed of the model, data order and masks.")] = 0,
    eval_every: Annotated[int | None, Opt(help="Steps between held-out evaluations.")] = None,
    checkpoint_every: Annotated[int | None, Opt(help="Steps between checkpoints (default: --eval-every).")] = None,
    max_tokens: Annotated[int | None, Opt(help="Read at most this many tokens of the corpus.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Start again in a non-empty --out.")] = False,
    device: Annotated[str, Opt(help="auto, cpu or cuda[:N].")] = "auto",
    threads: Annotated[int | None, Opt(help="torch.set_num_threads.")] = None,
    progress: Annotated[bool, Opt("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Masked-LM pretraining of a long encoder (ETC + CPC with --structure sentences --cpc); torchrun for several
    processes."""
    from longrange.apps.pretrain import PretrainConfig
    from longrange.apps.pretrain import pretrain as run_pretrain

    config = PretrainConfig(
        data=[str(p) for p in data], out=None if out is None else str(out), tokenizer=tokenizer,
        text_field=text_field, init=None if init is None else str(init), attention=attention,
        options=key_values(opt), structure=structure, max_length=max_length, dim=dim, heads=heads, layers=layers,
        ffn_dim=ffn_dim, masking=masking, mlm_probability=mlm_probability, cpc=cpc, steps=steps,
        batch_size=batch_size, accumulate=accumulate, lr=lr, gradient_checkpointing=gradient_checkpointing, amp=amp,
        seed=seed, eval_every=eval_every, checkpoint_every=checkpoint_every, max_tokens=max_tokens, resume=resume,
        overwrite=overwrite, device=device, threads=threads, progress=progress)
    main = int(os.environ.get("RANK", "0")) == 0
    with flag_errors(PRETRAIN_FLAGS):
        try:
            with training_stops(main):
                summary = run_pretrain(config)
        except (OSError, TypeError, ValueError) as e:
            if type(e).__name__ == "ConfigError":
                raise
            fail(str(e))
    if main:
        typer.echo(f"{summary['model']} ({summary['attention']}{', cpc' if summary['cpc'] else ''}), "
                   f"{summary['steps']} steps on {summary['corpus_tokens']:,} tokens ({summary['tokenizer']}): "
                   f"held-out MLM loss {summary['initial_val_loss']:.3f} -> {summary['val_loss']:.3f}, "
                   f"{summary['tokens_per_s']:,.0f} tokens/s -> {config.run_dir() / 'model'}")


def finetune(
    task: Annotated[str, typer.Argument(help="classify, qa, tokens or summarize.")],
    init: Annotated[Path | None, Opt(help="A model folder (pretrain's OUT/model, convert's output); default: "
                                          "a fresh model.")] = None,
    data: Annotated[str, Opt(help="A built-in task (long-qa, dna-motif, dna-tags, spread-summary; synthetic) or a "
                                  "JSONL file / folder.")] = "long-qa",
    length: Annotated[int, Opt(help="Built-in tasks: tokens per input.")] = 1024,
    size: Annotated[str, Opt(help="Built-in tasks: tiny, small, medium or large.")] = "small",
    max_length: Annotated[int | None, Opt(help="Cut inputs to this many tokens (default: the longest).")] = None,
    out: Annotated[Path | None, Opt(help="Folder for the model (OUT/model) and summary.json.")] = None,
    attention: Annotated[str, Opt(help="Attention of a fresh model.")] = "bigbird",
    opt: Annotated[list[str] | None, Opt("--opt", help="Attention option KEY=VALUE, repeatable.")] = None,
    data_opt: Annotated[list[str] | None, Opt("--data-opt", help="Built-in task option KEY=VALUE.")] = None,
    structure: Annotated[str, Opt(help="none, or sentences (ETC; attention etc).")] = "none",
    tokenizer: Annotated[str | None, Opt(help="JSONL data: byte, dna[:k=N] or a folder (default: --init's).")] = None,
    dim: Annotated[int, Opt(help="Width of a fresh model.")] = 64,
    layers: Annotated[int, Opt(help="Layers of a fresh model.")] = 2,
    heads: Annotated[int, Opt(help="Heads of a fresh model.")] = 4,
    steps: Annotated[int, Opt(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, Opt(help="Batch per step.")] = 8,
    lr: Annotated[float, Opt(help="Peak learning rate.")] = 1e-3,
    seed: Annotated[int, Opt(help="Seed of the model and data order.")] = 0,
    device: Annotated[str, Opt(help="auto, cpu or cuda[:N].")] = "auto",
    threads: Annotated[int | None, Opt(help="torch.set_num_threads.")] = None,
    progress: Annotated[bool, Opt("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Fine-tune and evaluate: accuracy/macro-F1 (classify, tokens), exact match/F1 (qa), ROUGE-L (summarize)."""
    from longrange.apps.finetune import FinetuneConfig
    from longrange.apps.finetune import finetune as run_finetune

    config = FinetuneConfig(
        task=task, data=data, init=None if init is None else str(init), out=None if out is None else str(out),
        tokenizer=tokenizer, length=length, size=size, max_length=max_length, attention=attention,
        options=key_values(opt), data_options=key_values(data_opt, "data_options", "facts=4"), structure=structure,
        dim=dim, layers=layers, heads=heads, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
        threads=threads, progress=progress)
    with flag_errors(FINETUNE_FLAGS):
        try:
            with training_stops():
                summary = run_finetune(config)
        except (OSError, TypeError, ValueError) as e:
            if type(e).__name__ == "ConfigError":
                raise
            fail(str(e))
    test = ", ".join(f"{k} {v:.3f}" for k, v in summary["test"].items() if k != "examples")
    label = " (synthetic)" if summary["synthetic"] else ""
    typer.echo(f"{summary['task']} on {summary['data']}{label}, {summary['attention']} "
               f"(structure {summary['structure']}), inputs cut to {summary['max_length']}: test {test}")
    if out is not None:
        typer.echo(json.dumps({"model": str(out / "model"), "summary": str(out / "summary.json")}))


def parse_seeds(text: str) -> tuple[int, ...]:
    from longrange.core.config import ConfigError, parse_names

    try:
        return tuple(int(s) for s in parse_names(text, "seeds"))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"seeds must be integers, e.g. 0,1,2; got {text!r}", "seeds") from None


@apps_app.command()
def evidence(
    out: Annotated[Path, Opt(help="Output prefix: PREFIX.csv, .md and .png.")] = Path("apps-evidence"),
    tasks: Annotated[str, Opt(help="Built-in tasks, comma-separated.")] = "long-qa,dna-motif,spread-summary",
    lengths: Annotated[str, Opt(help="Input lengths (tokens), comma-separated.")] = "32,64,128,256",
    attentions: Annotated[str, Opt(help="Mechanisms; 'etc' runs with structure.")] =
        "full,bigbird,longformer,etc,linformer",
    short: Annotated[int, Opt(help="`full` reads only the first SHORT tokens (BERT's 512, scaled).")] = 32,
    seeds: Annotated[str, Opt(help="Seeds, comma-separated.")] = "0,1,2",
    steps: Annotated[int | None, Opt(help="Optimizer steps per run (default: the task's: 200 QA, 150 DNA, "
                                             "400 summaries).")] = None,
    threads: Annotated[int | None, Opt(help="torch.set_num_threads per run.")] = 1,
    workers: Annotated[int, Opt(help="Runs at once, each in its own process.")] = 1,
    progress: Annotated[bool, Opt("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Accuracy (or ROUGE-L) against input length for each attention on the built-in tasks, 3 seeds: a CSV
    (rows are kept, so a stopped sweep continues), a Markdown table with mean ± std and a plot."""
    from longrange.apps.evidence import EvidenceConfig, run_evidence
    from longrange.core.config import parse_lengths, parse_names

    with flag_errors({"lengths": "--lengths", "tasks": "--tasks", "attentions": "--attentions", "seeds": "--seeds"}):
        config = EvidenceConfig(out=str(out), tasks=parse_names(tasks, "tasks"), lengths=parse_lengths(lengths),
                                attentions=parse_names(attentions, "attentions"), short=short,
                                seeds=parse_seeds(seeds), steps=steps, threads=threads,
                                workers=workers, progress=progress)
        table = run_evidence(config)
    typer.echo(table)
