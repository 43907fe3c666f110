"""Masked-LM pretraining of a long encoder from text files, JSONL or FASTA (`longrange pretrain`),
with ETC's CPC objective on request.

    from longrange.apps import PretrainConfig, pretrain
    summary = pretrain(PretrainConfig(data=["corpus/"], attention="bigbird", max_length=4096, out="runs/pt"))
    summary["initial_val_loss"], summary["val_loss"]      # held-out MLM loss before and after

The model is an `Encoder` with a masked-LM head (any attention), or with `structure="sentences"`
an `ETCEncoder` (attention `etc`) with one global token per sentence (per `block` tokens for DNA);
`init` starts from a model folder (e.g. `longrange convert`'s BERT/RoBERTa → long, whose
tokenizer is then used). Masking: BERT's 80/10/10 over tokens, whole words or spans
(`longrange.apps.masking`), special tokens and padding never touched. `cpc=True` (ETC only) adds
Contrastive Predictive Coding (`longrange.apps.cpc`): `cpc_fraction` of each example's sentences
are masked whole and their global tokens must pick their own sentence's encoding among the
batch's; loss = MLM + cpc_weight · CPC.

A run folder holds `run.json`, `metrics.csv` (step, split, loss, mlm_loss, mlm_accuracy, cpc_loss,
lr: deterministic), `speed.csv` (tokens/s, peak memory: wall-clock figures), `checkpoint/`
(model + optimizer + RNG states of every process, replaced atomically every `checkpoint_every`
steps), and at the end `model/` (the encoder + its tokenizer: `longrange finetune --init`) and
`summary.json`. The data order and every mask are pure functions of (seed, step, example), and the
checkpoint carries the dropout RNG, so `resume=True` after a kill ends, on
CPU, with bit-identical parameters and the same metrics.csv as a run never stopped. `batch_size` is
the global batch (split over torchrun processes and `accumulate` micro-batches); bf16 autocast is
on by default on GPU; `gradient_checkpointing` recomputes each block in the backward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from longrange.apps.corpus import PackedCorpus, corpus_files, is_fasta, pack_corpus, read_documents
from longrange.apps.cpc import CPCHead, choose_sentences, sentence_batch
from longrange.apps.masking import MaskingConfig, mask_tokens, maskable_positions, regular_ids
from longrange.apps.run import default_warmup, linear_schedule, progress_bar, save_model_folder
from longrange.apps.structure import etc_inputs
from longrange.apps.tokenizers import Tokenizer, tokenizer_for
from longrange.core.config import ConfigError
from longrange.measure import process_peak_mb
from longrange.mechanisms import capabilities
from longrange.models import Encoder, ETCEncoder, ModelConfig
from longrange.models.checkpoint import read_config, write_checkpoint
from longrange.models.training import (
    BatchPlan,
    Dist,
    RunSettings,
    StopOnInterrupt,
    TrainingInterrupted,
    append_row,
    apply_update,
    autocast_for,
    backward,
    check_loss,
    keep_rows,
    replace_folder,
    rng_state,
    seed_everything,
    set_rng_state,
    start_run_folder,
    training_process,
    unwrap,
)

RUN_JSON, SUMMARY_JSON, METRICS_CSV, SPEED_CSV = "run.json", "summary.json", "metrics.csv", "speed.csv"
CHECKPOINT, MODEL, TRAINER_STATE, OBJECTIVE = "checkpoint", "model", "trainer.pt", "objective.safetensors"
METRIC_FIELDS = ("step", "split", "loss", "mlm_loss", "mlm_accuracy", "cpc_loss", "lr")
SPEED_FIELDS = ("step", "seconds", "tokens_per_s", "peak_memory_mb")


@dataclasses.dataclass
class PretrainConfig(RunSettings):
    kind = "pretrain"

    data: list = dataclasses.field(default_factory=list)  # files / folders: text, .jsonl, FASTA
    out: str | None = None  # None: runs/pretrain
    tokenizer: str | None = None  # byte | dna[:k=N,overlap] | a folder; None: init's, dna for FASTA, else byte
    text_field: str = "text"  # JSONL field
    init: str | None = None  # a model folder (longrange convert / pretrain / finetune output)
    attention: str | None = None  # None: etc with structure="sentences", else bigbird
    options: dict = dataclasses.field(default_factory=dict)
    structure: str = "none"  # none | sentences (ETCEncoder, one global token per sentence)
    max_length: int = 4096
    block: int = 64  # sentences of DNA (no sentence ends): fixed blocks of this many tokens
    dim: int = 128
    heads: int = 4
    layers: int = 2
    ffn_dim: int = 512
    dropout: float = 0.1
    masking: str = "token"  # token | word | span
    mlm_probability: float = 0.15
    cpc: bool = False
    cpc_fraction: float = 0.1  # share of each example's sentences masked for CPC
    cpc_weight: float = 1.0
    cpc_max_tokens: int = 256  # the target pass reads at most this many tokens of a sentence
    steps: int = 1000
    batch_size: int = 8  # global, per optimizer step
    accumulate: int = 1
    lr: float = 5e-4
    warmup: int | None = None  # None: 10% of the steps
    weight_decay: float = 0.01
    clip_grad: float | None = 1.0
    gradient_checkpointing: bool = False
    amp: bool | None = None  # None: bf16 autocast on GPU, off on CPU
    seed: int = 0
    val_fraction: float = 0.05
    max_tokens: int | None = None  # read at most this many tokens of the corpus
    eval_every: int | None = None  # None: ~10 evaluations per run
    eval_batches: int | None = 8  # held-out batches per evaluation (None: all)
    checkpoint_every: int | None = None  # None: eval_every
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    threads: int | None = None
    flush_denormal: bool = True  # CPU: see lra.train.TrainConfig.flush_denormal
    progress: bool = True

    def run_dir(self) -> Path:
        return Path(self.out or "runs/pretrain")

    def attention_name(self) -> str:
        return self.attention or ("etc" if self.structure == "sentences" else "bigbird")

    def masking_config(self) -> MaskingConfig:
        return MaskingConfig(probability=self.mlm_probability, unit=self.masking)

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("give the training data: text files, JSONL or FASTA (files or folders)", "data")
        if self.structure not in ("none", "sentences"):
            raise ConfigError(f"structure must be none or sentences, got {self.structure!r}", "structure")
        if self.structure == "sentences" and self.attention_name() != "etc":
            raise ConfigError(f"structure='sentences' is ETC's global input: it needs attention 'etc', got "
                              f"{self.attention_name()!r}", "attention")
        if self.cpc and self.structure != "sentences":
            raise ConfigError("cpc (ETC's Contrastive Predictive Coding) needs structure='sentences' (attention etc)",
                              "cpc")
        if not 0.0 < self.cpc_fraction < 1.0:
            raise ConfigError(f"cpc_fraction must be in (0, 1), got {self.cpc_fraction}", "cpc_fraction")
        for name in ("steps", "batch_size", "accumulate", "max_length", "block", "log_every", "cpc_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}", name)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}", "lr")
        self.masking_config()


# -- what a run is made of ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    config: PretrainConfig
    tokenizer: Tokenizer
    train: PackedCorpus
    val: PackedCorpus
    model: nn.Module  # the objective (model + CPC head), DDP-wrapped when distributed
    plan: BatchPlan
    warmup: int
    device: torch.device
    dist: Dist
    replacements: torch.Tensor  # ids random replacements are drawn from


def choose_tokenizer(config: PretrainConfig) -> Tokenizer:
    """--tokenizer, else the init folder's tokenizer, else DNA characters for FASTA-only data, else bytes."""
    fasta = config.tokenizer is None and all(is_fasta(f) for f in corpus_files(config.data))
    return tokenizer_for(config.tokenizer, config.init, default="dna" if fasta else "byte")


def build_encoder(config: PretrainConfig, tokenizer: Tokenizer) -> nn.Module:
    """A fresh Encoder / ETCEncoder with a masked-LM head, or `init`'s (its MLM head kept when it has one)."""
    etc = config.structure == "sentences"
    cls = ETCEncoder if etc else Encoder
    if config.init is not None:
        kind, saved = read_config(config.init)
        if kind != cls.__name__:
            raise ConfigError(f"--init {config.init} holds a {kind}; structure={config.structure!r} needs a "
                              f"{cls.__name__}", "init")
        if saved.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"--init {config.init} has vocab_size {saved.vocab_size} < the tokenizer's "
                              f"{tokenizer.vocab_size}", "tokenizer")
        if not etc and config.max_length > saved.max_length:
            raise ConfigError(f"max_length {config.max_length} exceeds --init's position table ({saved.max_length}); "
                              f"convert it longer (`longrange convert --max-length`)", "max_length")
        return cls.from_pretrained(config.init, head="masked_lm", dropout=config.dropout,
                                   gradient_checkpointing=config.gradient_checkpointing).train()
    mcfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=config.dim, heads=config.heads, layers=config.layers,
                       ffn_dim=config.ffn_dim, max_length=config.max_length, attention=config.attention_name(),
                       attention_options=dict(config.options), pad_token_id=tokenizer.pad_id, dropout=config.dropout,
                       head="masked_lm", gradient_checkpointing=config.gradient_checkpointing)
    return cls(mcfg)


class PretrainObjective(nn.Module):
    """The encoder and the CPC head behind one forward (so DDP sees one call per micro-batch):
    batch -> (loss, MLM loss, CPC loss or None, correct MLM predictions, MLM targets)."""

    def __init__(self, encoder: nn.Module, tokenizer: Tokenizer, cpc: bool, cpc_weight: float, block: int):
        super().__init__()
        self.encoder = encoder
        self.cpc = CPCHead(encoder.config.dim) if cpc else None
        self.cpc_weight = cpc_weight
        self.tokenizer, self.block = tokenizer, block

    def forward(self, batch: dict):
        ids, keep, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        kw = {}
        if isinstance(self.encoder, ETCEncoder):
            kw = etc_inputs(ids, keep, self.tokenizer, sentence_ids=batch["sentence_ids"], block=self.block)
        out = self.encoder(ids, attention_mask=keep, labels=labels, **kw)
        target = labels != -100
        count = target.sum()
        mlm = out.loss if bool(count > 0) else out.logits.sum() * 0.0
        correct = ((out.logits.argmax(-1) == labels) & target).sum()
        cpc = None
        if self.cpc is not None and len(batch["cpc_which"]) >= 2:
            rows, sents = batch["cpc_which"][:, 0], batch["cpc_which"][:, 1]
            context = out.global_last_hidden_state[rows, sents]  # (M, C): the masked sentences' globals
            cpc = self.cpc(context, self.sentence_encodings(batch["cpc_ids"], batch["cpc_keep"]))
        loss = mlm if cpc is None else mlm + self.cpc_weight * cpc
        return loss, mlm, cpc, correct, count

    def sentence_encodings(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """[M, T] sentences alone -> [M, C]: the final state of one global token that sees only its sentence."""
        m = ids.shape[0]
        g_ids = torch.full((m, 1), self.tokenizer.sentence_id, dtype=torch.long, device=ids.device)
        l2g = keep[:, :, None]
        out = self.encoder(ids, attention_mask=keep, global_ids=g_ids, long_to_global=l2g,
                           global_to_long=l2g.transpose(1, 2))
        return out.global_last_hidden_state[:, 0]


def mask_seed(*parts: int) -> int:
    """One 63-bit seed from integers, via numpy's SeedSequence."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


EVAL_STREAM = 1  # mask_seed(seed, stream, ...): 0 = training steps, 1 = held-out evaluation


def make_batch(setup: Setup, corpus: PackedCorpus, indices: list[int], stream: int, step: int) -> dict:
    """Masked inputs, labels and (ETC) sentence ids / CPC sentences for `indices`, on CPU. Example i
    is masked by its own generator, seeded by (seed, stream, step, i): the masks do not depend on how
    a batch is split over processes or micro-batches."""
    c, tok = setup.config, setup.tokenizer
    rows = []
    for i in indices:
        gen = torch.Generator().manual_seed(mask_seed(c.seed, stream, step, i))
        rows.append(mask_example(setup, corpus.input_ids[i:i + 1].long(), corpus.word_ids[i:i + 1].long(),
                                 corpus.sentence_ids[i:i + 1].long(), gen))
    batch = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels", "attention_mask", "sentence_ids")}
    if c.cpc:
        chosen = [(b, s) for b, r in enumerate(rows) for s in r["cpc_sentences"]]
        sents = batch["sentence_ids"]
        pick = torch.zeros(len(rows), int(sents.max()) + 1, dtype=torch.bool)
        for b, s in chosen:
            pick[b, s] = True
        original = torch.cat([corpus.input_ids[i:i + 1].long() for i in indices])
        batch["cpc_ids"], batch["cpc_keep"], which = sentence_batch(original, sents, pick, tok.pad_id,
                                                                    c.cpc_max_tokens)
        batch["cpc_which"] = torch.tensor(which, dtype=torch.long).reshape(-1, 2)
    return batch


def mask_example(setup: Setup, ids, words, sents, generator: torch.Generator) -> dict:
    """One example [1, L]: CPC sentences (all their regular tokens -> [MASK], not MLM targets), then MLM masking."""
    c, tok = setup.config, setup.tokenizer
    keep = words >= 0
    maskable = maskable_positions(ids, tok.special_ids, keep)
    out = {"attention_mask": keep, "sentence_ids": sents, "cpc_sentences": []}
    if c.cpc:
        present = torch.zeros(1, int(sents.max()) + 1, dtype=torch.bool)
        present[0, sents[maskable]] = True  # sentences holding a regular token
        chosen = choose_sentences(sents, c.cpc_fraction, generator, sentence_ok=present)
        out["cpc_sentences"] = torch.where(chosen[0])[0].tolist()
        hidden = chosen.gather(1, sents.clamp(min=0)) & maskable
        ids = ids.masked_fill(hidden, tok.mask_id)
        maskable &= ~hidden
    out["input_ids"], out["labels"] = mask_tokens(ids, maskable=maskable, mask_id=tok.mask_id,
                                                  replacement_ids=setup.replacements, config=c.masking_config(),
                                                  word_ids=words, generator=generator)
    return out


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def load_corpus(config: PretrainConfig, tokenizer: Tokenizer) -> tuple[PackedCorpus, PackedCorpus]:
    docs = read_documents(config.data, config.text_field)
    corpus = pack_corpus(docs, tokenizer, config.max_length, block=config.block, max_tokens=config.max_tokens)
    return corpus.split(config.val_fraction)


def build_setup(config: PretrainConfig, device: torch.device, group: Dist) -> Setup:
    tokenizer = choose_tokenizer(config)
    train, val = load_corpus(config, tokenizer)
    seed_everything(config.seed)
    encoder = build_encoder(config, tokenizer)
    model = PretrainObjective(encoder, tokenizer, config.cpc, config.cpc_weight, config.block).to(device)
    plan = BatchPlan(len(train), config.batch_size, group.world, config.accumulate, config.seed)
    return Setup(config, tokenizer, train, val, model, plan, default_warmup(config.warmup, config.steps), device, group,
                 regular_ids(tokenizer.vocab_size, tokenizer.special_ids))


# -- the run ------------------------------------------------------------------------------------------------------
def prepare_config(config: PretrainConfig) -> PretrainConfig:
    """resume: the run's saved config (steps, progress, device and threads may change); else the
    config, checked, and a non-empty run folder needs overwrite."""
    run = config.run_dir()
    if config.resume:
        saved = run / CHECKPOINT / RUN_JSON
        if config.out is None:
            raise ConfigError("resume needs the run folder: pass --out DIR of the run to continue", "out")
        if not saved.is_file():
            raise ConfigError(f"resume: no checkpoint in {run} ({saved} is missing); start without --resume", "resume")
        old = PretrainConfig.from_dict(json.loads(saved.read_text()))
        keep = {k: getattr(config, k) for k in ("progress", "device", "threads")}
        if config.steps != PretrainConfig.steps:
            keep["steps"] = config.steps
        return dataclasses.replace(old, **keep, resume=True, out=str(run))
    config.validate()
    if run.exists() and any(run.iterdir()) and not config.overwrite:
        raise ConfigError(f"--out {run} exists and is not empty; pass --resume to continue it or --overwrite",
                          "out")
    return config


def pretrain(config: PretrainConfig, *, on_step=None) -> dict:
    """Run (or resume) a pretraining run; returns the summary (also summary.json).
    on_step(step, metrics): called after every optimizer step (tests use it to kill the run)."""
    with training_process(config.device, config.threads, config.flush_denormal) as (device, group):
        config = prepare_config(config)
        group.barrier()
        return _pretrain(config, device, group, on_step)


def _pretrain(config: PretrainConfig, device: torch.device, group: Dist, on_step) -> dict:
    setup = build_setup(config, device, group)
    run = config.run_dir()
    start_run_folder(run, config, group, replace=config.overwrite and not config.resume)
    objective = setup.model
    opt = torch.optim.AdamW(objective.parameters(), lr=0.0, weight_decay=config.weight_decay)
    amp = device.type == "cuda" if config.amp is None else config.amp
    autocast, amp_dtype = autocast_for(device, amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state = {"step": 0, "log_loss": 0.0, "log_mlm": 0.0, "log_cpc": 0.0, "log_correct": 0.0, "log_count": 0.0,
             "log_steps": 0, "initial_val_loss": None}
    if config.resume:
        state = load_checkpoint(setup, opt, scaler)
    if group.main:
        for name, fields in ((METRICS_CSV, METRIC_FIELDS), (SPEED_CSV, SPEED_FIELDS)):
            keep_rows(run / name, fields, state["step"])
    if not config.resume:
        first = evaluate(setup, autocast)
        state["initial_val_loss"] = first["mlm_loss"]
        log_metric(setup, 0, "val", first, 0.0)
        seed_everything(config.seed + 7919 * (group.rank + 1))  # the dropout stream, distinct per process
    if group.world > 1:  # parameters a step may not use: CPC's (fewer than 2 masked sentences), global projections
        encoder = objective.encoder
        unused = config.cpc or any(capabilities(encoder.config.attention_spec(i)[0]).global_tokens == "global_mask"
                                   for i in range(encoder.config.layers))
        setup.model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    setup.model.train()
    seconds, tokens_seen = 0.0, 0
    every_eval = config.eval_every or max(1, config.steps // 10)
    every_ckpt = config.checkpoint_every or every_eval
    label = f"pretrain {unwrap(setup.model).encoder.config.attention}{' + cpc' if config.cpc else ''}"
    with StopOnInterrupt(**({} if group.main else {"message": None})) as stop, \
            progress_bar(config.progress and group.main, config.steps, state["step"], label) as advance:
        while state["step"] < config.steps:
            step = state["step"]
            lr = linear_schedule(config.lr, step, setup.warmup, config.steps)
            t0 = time.perf_counter()
            totals = train_step(setup, step, opt, lr, autocast, scaler)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            totals = group.sum(totals, device)  # loss, mlm, cpc, correct, count, tokens (summed over processes)
            tokens_seen += int(totals[5])
            state["step"] += 1
            kept = (f"the last checkpoint is kept in {config.run_dir() / CHECKPOINT}"
                    if (config.run_dir() / CHECKPOINT).exists() else "no checkpoint was written before it")
            check_loss(totals[0], state["step"], kept)  # before a checkpoint could save the diverged weights
            metrics = after_step(setup, state, totals, lr, every_eval, autocast, seconds, tokens_seen)
            if state["step"] % every_ckpt == 0 or state["step"] == config.steps or stop.requested:
                save_checkpoint(setup, state, opt, scaler)
            if stop.requested and state["step"] < config.steps:
                raise TrainingInterrupted(state["step"], config.steps, str(config.run_dir() / CHECKPOINT),
                                          f"longrange pretrain --out {config.run_dir()} --resume")
            advance(f"loss {metrics['loss']:.3f}" + (f" · val {metrics['val_loss']:.3f}" if "val_loss" in metrics
                                                      else ""), int(totals[5]))
            if on_step is not None:
                on_step(state["step"], metrics)
    final = evaluate(setup, autocast)
    summary = finish(setup, state, final, seconds, tokens_seen)
    return summary


def train_step(setup: Setup, step: int, opt, lr: float, autocast, scaler) -> list[float]:
    """One optimizer step over this process's micro-batches: [loss, mlm, cpc, correct, count, tokens].

    The MLM loss is the mean over every masked token of the global batch (token losses summed, divided
    by the count over all micro-batches and processes), so splitting a batch over processes or
    micro-batches changes nothing but rounding. CPC (in-batch negatives) is a mean per micro-batch."""
    c, world = setup.config, setup.dist.world
    batches = [make_batch(setup, setup.train, indices, 0, step) for indices in setup.plan.micro_batches(
        step, setup.dist.rank)]
    local = float(sum(int((b["labels"] != -100).sum()) for b in batches))
    targets = max(setup.dist.sum([local], setup.device)[0], 1.0)  # masked tokens of the global batch
    totals = [0.0] * 6
    for j, cpu_batch in enumerate(batches):
        batch = batch_to(cpu_batch, setup.device)
        last = j == len(batches) - 1
        sync = setup.model.no_sync() if world > 1 and not last else contextlib.nullcontext()
        with sync:
            with autocast():
                _, mlm, cpc, correct, count = setup.model(batch)
            mlm_part = mlm * (float(count) * world / targets)  # DDP averages over processes: × world
            cpc_part = cpc / len(batches) if cpc is not None else None
            loss = mlm_part if cpc_part is None else mlm_part + c.cpc_weight * cpc_part
            backward(loss, scaler)
        totals[1] += mlm_part.item() / world
        totals[2] += (cpc_part.item() if cpc_part is not None else 0.0) / world
        totals[3] += float(correct)
        totals[4] += float(count)
        totals[5] += float(batch["attention_mask"].sum())
    totals[0] = totals[1] + c.cpc_weight * totals[2]
    apply_update(opt, lr, parameters=setup.model.parameters(), clip=c.clip_grad, scaler=scaler)
    return totals


def after_step(setup: Setup, state: dict, totals: list[float], lr: float, every_eval: int, autocast, seconds: float,
               tokens_seen: int) -> dict:
    """Accumulate the step; a train row every log_every steps, a held-out row every eval_every."""
    c, step = setup.config, state["step"]
    state["log_loss"] += totals[0]
    state["log_mlm"] += totals[1]
    state["log_cpc"] += totals[2]
    state["log_correct"] += totals[3]
    state["log_count"] += totals[4]
    state["log_steps"] += 1
    metrics = {"loss": totals[0], "lr": lr}
    last = step == c.steps
    if step % c.log_every == 0 or last:
        n = state["log_steps"]
        row = {"loss": state["log_loss"] / n, "mlm_loss": state["log_mlm"] / n,
               "mlm_accuracy": state["log_correct"] / max(state["log_count"], 1.0),
               "cpc_loss": state["log_cpc"] / n if c.cpc else None}
        log_metric(setup, step, "train", row, lr)
        if setup.dist.main:
            peak = process_peak_mb(setup.device)[0]
            append_row(c.run_dir() / SPEED_CSV, SPEED_FIELDS,
                       [step, f"{seconds:.3f}", f"{tokens_seen / max(seconds, 1e-9):.6g}", f"{peak:.1f}"])
        state.update(log_loss=0.0, log_mlm=0.0, log_cpc=0.0, log_correct=0.0, log_count=0.0, log_steps=0)
    if step % every_eval == 0 or last:
        val = evaluate(setup, autocast)
        log_metric(setup, step, "val", val, lr)
        metrics["val_loss"] = val["mlm_loss"]
    return metrics


def log_metric(setup: Setup, step: int, split: str, row: dict, lr: float) -> None:
    if not setup.dist.main:
        return
    fmt = lambda v: "" if v is None else f"{v:.8g}"  # noqa: E731
    append_row(setup.config.run_dir() / METRICS_CSV, METRIC_FIELDS,
               [step, split, fmt(row["loss"]), fmt(row["mlm_loss"]), fmt(row["mlm_accuracy"]), fmt(row["cpc_loss"]),
                fmt(lr)])


@torch.no_grad()
def evaluate(setup: Setup, autocast) -> dict:
    """Held-out loss with fixed masks (the same at every evaluation), shared out over processes; RNG untouched."""
    c = setup.config
    model = unwrap(setup.model)
    bs = setup.plan.micro
    idx = list(range(setup.dist.rank, len(setup.val), setup.dist.world))
    batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
    if c.eval_batches is not None:
        batches = batches[:c.eval_batches]
    sums = [0.0] * 4  # mlm loss · count, cpc loss, correct, count
    cpc_batches = 0.0
    was = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        for indices in batches:
            batch = batch_to(make_batch(setup, setup.val, indices, EVAL_STREAM, 0), setup.device)
            with autocast():
                _, mlm, cpc, correct, count = model(batch)
            sums[0] += mlm.item() * float(count)
            sums[2] += float(correct)
            sums[3] += float(count)
            if cpc is not None:
                sums[1] += cpc.item()
                cpc_batches += 1
    model.train(was)
    total = setup.dist.sum([*sums, cpc_batches], setup.device)
    mlm_loss = total[0] / max(total[3], 1.0)
    cpc_loss = total[1] / total[4] if total[4] else None
    loss = mlm_loss + (c.cpc_weight * cpc_loss if cpc_loss is not None else 0.0)
    return {"loss": loss, "mlm_loss": mlm_loss, "mlm_accuracy": total[2] / max(total[3], 1.0), "cpc_loss": cpc_loss}


def finish(setup: Setup, state: dict, final: dict, seconds: float, tokens_seen: int) -> dict:
    c = setup.config
    run = c.run_dir()
    encoder = unwrap(setup.model).encoder
    peak, kind = process_peak_mb(setup.device)
    summary = {"data": [str(p) for p in c.data], "tokenizer": setup.tokenizer.describe(),
               "model": type(encoder).__name__, "attention": encoder.config.attention,
               "structure": c.structure, "cpc": c.cpc, "masking": c.masking, "init": c.init,
               "max_length": c.max_length, "train_examples": len(setup.train), "val_examples": len(setup.val),
               "corpus_tokens": setup.train.tokens + setup.val.tokens, "steps": state["step"],
               "batch_size": c.batch_size, "processes": setup.dist.world,
               "params": sum(p.numel() for p in encoder.parameters()),
               "initial_val_loss": state.get("initial_val_loss"), "val_loss": final["mlm_loss"],
               "val_mlm_accuracy": final["mlm_accuracy"], "val_cpc_loss": final["cpc_loss"],
               "train_seconds_this_call": seconds, "tokens_per_s": tokens_seen / max(seconds, 1e-9),
               "peak_memory_mb": peak, "memory_kind": kind, "device": str(setup.device)}
    if setup.dist.main:
        info = {"kind": "pretrained", "structure": c.structure, "max_length": c.max_length, "block": c.block,
                "masking": c.masking, "cpc": c.cpc}
        save_model_folder(encoder, setup.tokenizer, run / MODEL, info)
        (run / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    setup.dist.barrier()
    return summary


# -- checkpoints --------------------------------------------------------------------------------------------------
def save_checkpoint(setup: Setup, state: dict, opt, scaler) -> None:
    """checkpoint/ replaced atomically: every process writes its RNG state into one temporary folder,
    the main one the model (config.json + model.safetensors), the CPC head, optimizer and state."""
    from safetensors.torch import save_file

    run = setup.config.run_dir()
    tmp, final = run / f".{CHECKPOINT}.tmp", run / CHECKPOINT
    if setup.dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    setup.dist.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{setup.dist.rank}.pt")
    if setup.dist.main:
        objective = unwrap(setup.model)
        write_checkpoint(objective.encoder, tmp)
        if objective.cpc is not None:
            save_file({k: v.detach().contiguous() for k, v in objective.cpc.state_dict().items()}, str(tmp / OBJECTIVE))
        torch.save({"state": state, "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "world": setup.dist.world},
                   tmp / TRAINER_STATE)
        (tmp / RUN_JSON).write_text(json.dumps(setup.config.to_dict(), indent=2) + "\n")
    setup.dist.barrier()
    if setup.dist.main:
        replace_folder(tmp, final)
    setup.dist.barrier()


def load_checkpoint(setup: Setup, opt, scaler) -> dict:
    """Restore model, CPC head, optimizer, scaler and this process's RNG state; return the run state."""
    from safetensors.torch import load_file

    folder = setup.config.run_dir() / CHECKPOINT
    trainer = torch.load(folder / TRAINER_STATE, weights_only=True, map_location="cpu")
    if trainer["world"] != setup.dist.world:
        raise ConfigError(f"resume: the checkpoint was written by {trainer['world']} process(es), this run has "
                          f"{setup.dist.world}; resume with the same number", "resume")
    objective = unwrap(setup.model)
    objective.encoder.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(setup.device)),
                                      strict=False)
    if objective.cpc is not None:
        objective.cpc.load_state_dict(load_file(str(folder / OBJECTIVE), device=str(setup.device)))
    opt.load_state_dict(trainer["optimizer"])
    if scaler is not None and trainer["scaler"] is not None:
        scaler.load_state_dict(trainer["scaler"])
    set_rng_state(torch.load(folder / f"rng-rank{setup.dist.rank}.pt", weights_only=True))
    return trainer["state"]
