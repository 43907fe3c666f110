"""Train and evaluate an LRA classifier: any registered attention under a per-task preset.

    from longrange.lra.train import TrainConfig, train, evaluate
    summary = train(TrainConfig(task="listops", attention="bigbird", preset="tiny", out="runs/lo-bb"))
    evaluate("runs/lo-bb", "test")          # {"accuracy": ..., "loss": ..., "examples": ...}

A run folder holds:

- `run.json`: the resolved TrainConfig; `summary.json` at the end (accuracies, steps/s, memory, parameters);
- `metrics.csv` (step, split, loss, accuracy, lr): deterministic, so a resumed run writes the same file;
  `speed.csv` (wall-clock figures, never part of that promise); `tb/` (TensorBoard, when installed);
- `checkpoint/`: the latest state, replaced atomically (written to a temporary folder, then renamed):
  model.safetensors + model.json, trainer.pt (optimizer, grad scaler, step, logging
  accumulators), rng-rank{R}.pt (torch, CUDA, numpy and python RNG states of each process);
  `best/`: the model with the best validation accuracy (safetensors).

A non-finite training loss stops the run (`NonFiniteLoss`, naming the step; the last checkpoint,
all finite, is kept); Ctrl-C stops it after the current step with a checkpoint
(`TrainingInterrupted`, which says how to resume); after ESTIMATE_AFTER_STEPS steps the progress
bar's console gets an estimate of the whole run's time and peak memory.

`max_minutes` (`--max-minutes`) limits one `train` call's wall-clock time (data loading included):
the run stops cleanly after a step, keeps a checkpoint, evaluates val and test, and writes a summary
with `stopped_early: true`, the steps done and the planned ones (`TimeBudget`); `--resume` continues it.

Resume (`resume=True`) restores all of it, and the data order is a pure function of (seed, step):
epoch e visits the training set in `randperm(n, seed · 1_000_003 + e)`; optimizer step s takes the
global batch `s mod steps_per_epoch` of epoch `s // steps_per_epoch`. So on CPU a killed run resumed
from its checkpoint reaches bit-identical parameters and the same metrics.csv as a straight run.

`batch_size` is the global batch per optimizer step: it is split over processes (torchrun/DDP,
gloo on CPU or NCCL on GPU) and `accumulate` micro-batches, so changing either gives the same
training run up to floating-point rounding (without dropout).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import shutil
import time
import warnings
from pathlib import Path

import torch

from longrange.core.config import ConfigError
from longrange.core.files import check_writable, replace_folder, sync_tree
from longrange.lra.model import LRAClassifier, build_model, load_model, write_model
from longrange.lra.presets import Preset, attention_options, get_preset, parameter_check, schedule_factor
from longrange.measure import process_peak_mb
from longrange.models.checkpoint import check_finite, read_safetensors
from longrange.models.training import (
    AMP_DTYPES,
    BatchPlan,
    Dist,
    NonFiniteLoss,
    RunSettings,  # the pieces every training loop shares (re-exported here)
    StopOnInterrupt,
    TrainingInterrupted,
    append_row,
    apply_update,
    autocast_for,
    backward,
    keep_rows,
    nonfinite_parameters,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
    start_run_folder,
    training_process,
    unwrap,
)

RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
METRICS_CSV = "metrics.csv"
SPEED_CSV = "speed.csv"
CHECKPOINT = "checkpoint"
BEST = "best"
TRAINER_STATE = "trainer.pt"
METRIC_FIELDS = ("step", "split", "loss", "accuracy", "lr")
SPEED_FIELDS = ("step", "seconds", "steps_per_s", "examples_per_s", "peak_memory_mb")
#: counts that must be positive ints when given (None: the preset's); the names are the flags' (--steps, ...)
POSITIVE_COUNTS = ("steps", "batch_size", "accumulate", "max_length", "eval_every", "checkpoint_every",
                   "eval_batches", "eval_batch_size", "log_every")
#: after this many steps the run prints its estimate of the whole run's time and memory
ESTIMATE_AFTER_STEPS = 3


@dataclasses.dataclass
class TrainConfig(RunSettings):
    """One training run. None fields come from the preset (or, for `preset`, from `data_dir`:
    tiny without data, released with)."""

    kind = "train"

    task: str = "listops"
    attention: str = "full"
    preset: str | None = None  # released | paper | tiny | a full name (listops-paper); None: see above
    data_dir: str | None = None  # None: the built-in tiny version of the task
    data_options: dict = dataclasses.field(default_factory=dict)  # passed to load_split (seed, variant, ...)
    options: dict = dataclasses.field(default_factory=dict)  # attention options over the LRA defaults
    max_length: int | None = None  # task tokens per document; None: the preset's (or the data's)
    steps: int | None = None
    batch_size: int | None = None  # global batch per optimizer step
    accumulate: int = 1  # micro-batches per optimizer step (per process)
    lr: float | None = None
    weight_decay: float | None = None
    warmup: int | None = None
    dropout: float | None = None  # None: the preset's
    clip_grad: float | None = None  # LRA clips nothing
    amp: bool = False  # autocast: bf16 (CPU; GPU with bf16 support) or fp16 (older GPUs, with a grad scaler)
    amp_dtype: str | None = None  # bf16 | fp16 (None: bf16 where supported)
    seed: int = 0
    out: str | None = None  # None: runs/{task}-{attention}
    resume: bool = False
    overwrite: bool = False
    eval_every: int | None = None  # steps between validation passes (None: the preset's or ~10 per run)
    checkpoint_every: int | None = None  # None: eval_every
    eval_batches: int | None = None  # cap the batches of each periodic validation (None: the whole split)
    eval_batch_size: int | None = None  # None: the micro-batch size
    log_every: int = 10
    max_minutes: float | None = None  # wall-clock budget of this call; None: none (see TimeBudget)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch.set_num_threads
    # CPU: flush subnormal floats to zero (as GPUs/TPUs do). AdamW's second moments of rarely-seen
    # embedding rows decay into the subnormal range, where x86 arithmetic is ~100x slower: one step
    # took 155 s instead of 9 s at 4K tokens (`lra speed`). Process-wide (torch.set_flush_denormal).
    flush_denormal: bool = True
    tensorboard: bool | None = None  # None: when installed; True: required
    progress: bool = True

    def resolved_preset(self) -> Preset:
        """The preset with this run's dropout override applied."""
        preset = get_preset(self.task, self.preset or ("tiny" if self.data_dir is None else "released"))
        if self.dropout is not None:
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
            preset = dataclasses.replace(preset, dropout=self.dropout)
        return preset

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.task}-{self.attention}")


# -- the run ------------------------------------------------------------------------------------------------------
def prepare_config(config: TrainConfig) -> TrainConfig:
    """For resume: the saved config of the run folder (steps, progress, tensorboard, device and
    threads may change). Otherwise the config itself, checked; a non-empty run folder needs
    overwrite=True."""
    run = config.run_dir()
    if config.resume:
        if config.out is None:
            raise ValueError("--resume needs the run folder: pass --out DIR of the run to continue")
        saved = run / CHECKPOINT / RUN_JSON
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {run} ({saved} is missing); start the run "
                                    f"without --resume")
        old = read_run_json(saved)
        keep = {k: getattr(config, k) for k in ("progress", "tensorboard", "device", "threads", "max_minutes")}
        if config.steps is not None:
            check_counts(config, ("steps",))
            keep["steps"] = config.steps
        check_writable(run, "--out")
        return dataclasses.replace(old, **keep, resume=True, out=str(run))
    check_counts(config)
    if config.amp_dtype not in (None, *AMP_DTYPES):
        raise ValueError(f"amp_dtype must be one of {list(AMP_DTYPES)}, got {config.amp_dtype!r}")
    config.resolved_preset()  # unknown task / preset: an error before anything is written
    if run.exists() and any(run.iterdir()) and not config.overwrite:
        raise FileExistsError(f"--out {run} exists and is not empty; pass --resume to continue it or "
                              f"--overwrite to start again")
    check_writable(run, "--out")  # a read-only or missing disk: now, not after the data is loaded
    return config


def check_counts(config: TrainConfig, names=POSITIVE_COUNTS) -> None:
    """Each count that is given must be a positive int (0 is not "the preset's": None is); warmup may be 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive int (leave it out for the preset's), got {value!r}", name)
    if config.warmup is not None and (isinstance(config.warmup, bool) or not isinstance(config.warmup, int)
                                      or config.warmup < 0):
        raise ConfigError(f"warmup must be a non-negative int, got {config.warmup!r}", "warmup")


def read_run_json(path: Path) -> TrainConfig:
    """The TrainConfig saved in a run.json; an unreadable or corrupt file is a ValueError naming it."""
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} is unreadable or corrupt ({type(err).__name__}: {err}); it is the saved "
                         "configuration of the run: restore it, or start the run again") from None


@dataclasses.dataclass
class Setup:
    """Everything a run is made of, built once."""

    config: TrainConfig
    preset: Preset
    spec: object
    datasets: dict
    model: LRAClassifier
    options: dict
    plan: BatchPlan
    total_steps: int
    warmup: int
    device: torch.device
    dist: Dist
    budget: TimeBudget | None = None  # --max-minutes


def load_datasets(config: TrainConfig, preset: Preset) -> dict:
    """train/val/test splits via `longrange.lra.load_split` (the preset's length unless overridden)."""
    from longrange.lra import load_split

    length = config.max_length or preset.max_length
    return {split: load_split(config.task, split, config.data_dir, max_length=length, **config.data_options)
            for split in ("train", "val", "test")}


def build_setup(config: TrainConfig, device: torch.device, group: Dist) -> Setup:
    """Datasets, model (seeded), batch plan and step counts of a run."""
    preset = config.resolved_preset()
    datasets = load_datasets(config, preset)
    spec = datasets["train"].spec
    length = max(ds.max_length for ds in datasets.values())
    options = attention_options(preset, config.attention, length, config.options)
    seed_everything(config.seed)
    model = build_model(preset, config.attention, num_classes=spec.num_classes, vocab_size=spec.vocab_size,
                        max_length=length, options=options, dual=spec.dual, pad_id=spec.pad_id).to(device)
    batch_size = preset.batch_size if config.batch_size is None else config.batch_size
    plan = BatchPlan(len(datasets["train"]), batch_size, group.world, config.accumulate, config.seed)
    total = preset.total_steps(len(datasets["train"]), batch_size) if config.steps is None else config.steps
    warmup = config.warmup if config.warmup is not None else preset.warmup_steps(len(datasets["train"]), batch_size)
    return Setup(config, preset, spec, datasets, model, options, plan, total, min(warmup, total), device, group)


def make_optimizer(model, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on every parameter, as LRA's flax Adam; the learning rate is
    set before each step (`learning_rate`)."""
    return torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=weight_decay, betas=(0.9, 0.98), eps=1e-9)


def learning_rate(config: TrainConfig, preset: Preset, step: int, warmup: int, total: int) -> float:
    """The base rate (the run's, else the preset's) times the preset's schedule at optimizer step `step`."""
    base = config.lr if config.lr is not None else preset.lr
    return base * schedule_factor(preset.schedule, step, warmup, total)


def autocast_context(config: TrainConfig, device: torch.device):
    """autocast when --amp (bf16 on CPU; bf16 on GPUs that support it, else fp16), else nothing."""
    return autocast_for(device, config.amp, config.amp_dtype)


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits of a collated batch (dual tasks pass the second documents)."""
    return model(batch["input_ids"], batch["attention_mask"], batch.get("input_ids2"), batch.get("attention_mask2"))


def make_batch(setup: Setup, split: str, indices: list[int]) -> dict:
    from longrange.lra import collate

    ds = setup.datasets[split]
    return batch_to(collate([ds[i] for i in indices], pad_id=setup.spec.pad_id), setup.device)


# -- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_split(model, setup: Setup, split: str, max_batches: int | None = None) -> dict:
    """Loss and accuracy on `split`, the examples shared out over processes; RNG states untouched."""
    ds = setup.datasets[split]
    bs = setup.config.eval_batch_size or setup.plan.micro
    model = unwrap(model)  # no DDP hooks (or buffer broadcasts) in evaluation: shards may differ in size
    indices = list(range(setup.dist.rank, len(ds), setup.dist.world))
    batches = [indices[i:i + bs] for i in range(0, len(indices), bs)]
    if max_batches is not None:
        batches = batches[:max_batches]
    autocast, _ = autocast_context(setup.config, setup.device)
    counts = torch.zeros(setup.spec.num_classes, dtype=torch.float64)
    loss_sum = correct = 0.0
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        for idx in batches:
            batch = make_batch(setup, split, idx)
            with autocast():
                logits = forward_logits(model, batch).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            counts += torch.bincount(batch["labels"].cpu(), minlength=setup.spec.num_classes).double()
    model.train(was_training)
    totals = setup.dist.sum([loss_sum, correct, *counts.tolist()], setup.device)
    n = max(sum(totals[2:]), 1.0)
    return {"loss": totals[0] / n, "accuracy": totals[1] / n, "examples": int(n), "majority": max(totals[2:]) / n}


def evaluate(run_or_checkpoint: str | Path, split: str = "test", *, data_dir: str | None = None,
             batch_size: int | None = None, device: str = "auto", allow_nonfinite: bool = False) -> dict:
    """Accuracy and loss of a trained model on `split`. `run_or_checkpoint`: a run folder (its best/
    model, else checkpoint/) or a checkpoint folder itself. data_dir: where the data lives now
    (default: the run's). NaN / inf weights are an error unless allow_nonfinite=True."""
    from longrange.lra.tasks import check_split

    check_split(split)
    folder = find_model_folder(Path(run_or_checkpoint))
    config = read_run_json(folder / RUN_JSON)
    if data_dir is not None:
        config.data_dir = data_dir
    config.eval_batch_size = batch_size or config.eval_batch_size
    dev = pick_device(device)
    preset = config.resolved_preset()
    model = load_model(folder, map_location=dev, allow_nonfinite=allow_nonfinite)
    from longrange.lra import load_split

    ds = load_split(config.task, split, config.data_dir, max_length=config.max_length or preset.max_length,
                    **config.data_options)
    setup = Setup(config, preset, ds.spec, {split: ds}, model, {}, None, 0, 0, dev, Dist())
    if setup.config.eval_batch_size is None:
        setup.config.eval_batch_size = 32
    result = evaluate_split(model, setup, split)
    return {"split": split, "accuracy": result["accuracy"], "loss": result["loss"], "examples": result["examples"],
            "majority": result["majority"], "model": str(folder)}


def find_model_folder(path: Path) -> Path:
    """A folder with model.json: `path` itself, or its best/ or checkpoint/."""
    for candidate in (path, path / BEST, path / CHECKPOINT):
        if (candidate / "model.json").is_file() and (candidate / RUN_JSON).is_file():
            return candidate
    raise FileNotFoundError(f"--run {path}: no trained model there (expected {path}/{BEST}/ or {path}/{CHECKPOINT}/ "
                            f"written by `longrange lra train`)")


# -- checkpoints --------------------------------------------------------------------------------------------------
def save_checkpoint(setup: Setup, state: dict, opt, scaler) -> None:
    """Write checkpoint/ atomically: every process writes its RNG state into one temporary folder,
    the main process adds model, optimizer and trainer state, then renames it over the old one."""
    run = setup.config.run_dir()
    tmp, final = run / f".{CHECKPOINT}.tmp", run / CHECKPOINT
    refuse_nonfinite(setup, state["step"])
    if setup.dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    setup.dist.barrier()
    ok = 1.0
    try:
        torch.save(rng_state(), tmp / f"rng-rank{setup.dist.rank}.pt")
        if setup.dist.main:
            write_model(unwrap(setup.model), tmp)
            trainer = {"state": state, "optimizer": opt.state_dict(),
                       "scaler": scaler.state_dict() if scaler is not None else None, "world": setup.dist.world}
            torch.save(trainer, tmp / TRAINER_STATE)
            (tmp / RUN_JSON).write_text(json.dumps(setup.config.to_dict(), indent=2) + "\n")
    except BaseException:
        ok = 0.0
        if setup.dist.world == 1:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if setup.dist.sum([ok], setup.device)[0] < setup.dist.world:
        if setup.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"writing the checkpoint in {run} failed on some process; the previous one is kept")
    if setup.dist.main:
        sync_tree(tmp)
        replace_folder(tmp, final)
    setup.dist.barrier()


def refuse_nonfinite(setup: Setup, step: int) -> None:
    """NonFiniteLoss when the weights hold NaN / inf (a checkpoint must never replace a finite one with them)."""
    bad = nonfinite_parameters(unwrap(setup.model))
    if bad:
        raise NonFiniteLoss(step, float("nan"), last_checkpoint(setup),
                            what=f"the weights after step {step} hold NaN or inf ({', '.join(bad[:3])})")


def last_checkpoint(setup: Setup) -> str:
    """What is kept on disk, for messages: the last checkpoint's step and where it is, or that there is none."""
    path = setup.config.run_dir() / CHECKPOINT / TRAINER_STATE
    try:
        step = torch.load(path, weights_only=True, map_location="cpu")["state"]["step"]
    except Exception:  # none yet, or unreadable: say so
        return "no checkpoint was written before it"
    return f"the last checkpoint (step {step}, all finite) is kept in {path.parent}"


def save_best(setup: Setup) -> None:
    """best/: the model (safetensors) + run.json, written atomically (main process)."""
    if not setup.dist.main:
        return
    run = setup.config.run_dir()
    if nonfinite_parameters(unwrap(setup.model)):
        return  # never a "best" model with NaN weights (the loop stops on the next loss)
    tmp = run / f".{BEST}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_model(unwrap(setup.model), tmp)
        (tmp / RUN_JSON).write_text(json.dumps(setup.config.to_dict(), indent=2) + "\n")
        sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, run / BEST)


def load_checkpoint(setup: Setup, opt, scaler) -> dict:
    """Restore model, optimizer, scaler and this process's RNG state; return the trainer state. A
    missing, truncated or corrupt file, or weights holding NaN / inf, are errors naming the file."""
    folder = setup.config.run_dir() / CHECKPOINT
    trainer = read_torch_file(folder / TRAINER_STATE)
    if not isinstance(trainer, dict) or not {"state", "optimizer", "world"} <= set(trainer):
        raise ValueError(f"--resume: {folder / TRAINER_STATE} is not a trainer state written by `lra train`")
    if trainer["world"] != setup.dist.world:
        raise ValueError(f"--resume: the checkpoint was written by {trainer['world']} process(es), this run has "
                         f"{setup.dist.world}; resume with the same number")
    model = unwrap(setup.model)
    weights = folder / "model.safetensors"
    tensors = read_safetensors(weights, setup.device)
    check_finite(tensors, weights)
    model.load_state_dict(tensors, strict=False)
    try:
        opt.load_state_dict(trainer["optimizer"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise ValueError(f"--resume: the optimizer state in {folder / TRAINER_STATE} does not fit this model "
                         f"({err})") from None
    if scaler is not None and trainer["scaler"] is not None:
        scaler.load_state_dict(trainer["scaler"])
    set_rng_state(read_torch_file(folder / f"rng-rank{setup.dist.rank}.pt"))
    return trainer["state"]


def read_torch_file(path: Path):
    """torch.load(weights_only=True) of a checkpoint file; missing, truncated or corrupt: an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} is missing; the checkpoint is incomplete")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # EOFError, RuntimeError, pickle.UnpicklingError, ... from a damaged file
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"--resume: {path} is unreadable ({type(err).__name__}: {detail}): truncated or "
                         "corrupt") from None


# -- logging ------------------------------------------------------------------------------------------------------
class Logger:
    """metrics.csv + speed.csv (+ TensorBoard) on the main process; resume keeps the rows up to the checkpoint."""

    def __init__(self, setup: Setup, start_step: int):
        self.main = setup.dist.main
        self.run = setup.config.run_dir()
        self.writer = None
        if not self.main:
            return
        self.run.mkdir(parents=True, exist_ok=True)
        for name, fields in ((METRICS_CSV, METRIC_FIELDS), (SPEED_CSV, SPEED_FIELDS)):
            keep_rows(self.run / name, fields, start_step)
        self.writer = tensorboard_writer(setup.config.tensorboard, self.run / "tb")

    def metric(self, step: int, split: str, loss: float, accuracy: float, lr: float) -> None:
        if not self.main:
            return
        append_row(self.run / METRICS_CSV, METRIC_FIELDS,
                   [step, split, f"{loss:.8g}", f"{accuracy:.8g}", f"{lr:.8g}"])
        if self.writer is not None:
            self.writer.add_scalar(f"{split}/loss", loss, step)
            self.writer.add_scalar(f"{split}/accuracy", accuracy, step)
            if split == "train":
                self.writer.add_scalar("train/lr", lr, step)

    def speed(self, step: int, seconds: float, steps_per_s: float, examples_per_s: float, peak_mb: float) -> None:
        if not self.main:
            return
        append_row(self.run / SPEED_CSV, SPEED_FIELDS,
                   [step, f"{seconds:.3f}", f"{steps_per_s:.4g}", f"{examples_per_s:.4g}", f"{peak_mb:.1f}"])
        if self.writer is not None:
            self.writer.add_scalar("speed/steps_per_s", steps_per_s, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer(wanted: bool | None, folder: Path):
    """A SummaryWriter when the `tensorboard` package is installed; None (with a note) otherwise.
    wanted=False: none; wanted=True and missing: an error naming the extra to install."""
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        message = ("TensorBoard logging needs the `tensorboard` package (pip install 'longrange[lra]'); "
                   "metrics go to metrics.csv only")
        if wanted:
            raise ImportError(message) from None
        return None
    return SummaryWriter(str(folder))


# -- training -----------------------------------------------------------------------------------------------------
def train_step(model, micro_batches: list[dict], opt, lr: float, autocast, *, scaler=None, clip: float | None = None,
               distributed: bool = False) -> tuple[float, float, int]:
    """One optimizer step at learning rate `lr` over the gradients of `micro_batches` (accumulated;
    under DDP only the last one synchronises): (summed loss / micro-batches, correct, examples)."""
    loss_total = correct = 0.0
    n = 0
    for j, batch in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not distributed else model.no_sync()
        with sync:
            with autocast():
                logits = forward_logits(model, batch)
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"]) / len(micro_batches)
            backward(loss, scaler)
        loss_total += loss.item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        n += len(batch["labels"])
    apply_update(opt, lr, parameters=model.parameters(), clip=clip, scaler=scaler)
    return loss_total, correct, n


def step_batches(setup: Setup, step: int) -> list[dict]:
    """This process's micro-batches at optimizer step `step` (a pure function of the seed and step)."""
    return [make_batch(setup, "train", idx) for idx in setup.plan.micro_batches(step, setup.dist.rank)]


def train(config: TrainConfig, *, on_step=None) -> dict:
    """Run (or resume) one training run; returns the summary (also written to summary.json).

    on_step(step, metrics): called after every optimizer step (tests use it to simulate a kill)."""
    budget = TimeBudget(config.max_minutes)  # counts from here: data loading and set-up included
    with training_process(config.device, config.threads, config.flush_denormal) as (device, group):
        config = prepare_config(config)  # every process checks the folder before the main one writes to it
        group.barrier()
        return _train(config, device, group, on_step, budget)


@dataclasses.dataclass
class Clock:
    """Wall-clock seconds, steps and examples of the training steps alone (no evaluation, no checkpoints)."""

    seconds: float = 0.0
    steps: int = 0
    examples: int = 0

    def rates(self) -> tuple[float, float]:
        """(steps/s, examples/s)."""
        t = max(self.seconds, 1e-9)
        return self.steps / t, self.examples / t


def _train(config: TrainConfig, device: torch.device, group: Dist, on_step, budget: TimeBudget | None = None) -> dict:
    """The run on this process: setup, restore or seed, the step loop, the final evaluation."""
    setup = build_setup(config, device, group)
    setup.budget = budget if budget is not None else TimeBudget(config.max_minutes)
    start_run_folder(config.run_dir(), config, group, replace=config.overwrite and not config.resume)
    check = parameter_check(setup.preset, config.attention, num_classes=setup.spec.num_classes,
                            vocab_size=setup.spec.vocab_size, dual=setup.spec.dual,
                            max_length=unwrap(setup.model).config.max_length, options=config.options, warn=False)
    if not check.ok and group.main:
        warnings.warn(check.describe(), stacklevel=3)
    opt = make_optimizer(setup.model, config.weight_decay if config.weight_decay is not None
                         else setup.preset.weight_decay)
    autocast, amp_dtype = autocast_context(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state = {"step": 0, "best_val": -1.0, "log_loss": 0.0, "log_correct": 0.0, "log_n": 0, "log_steps": 0}
    if config.resume:
        state = load_checkpoint(setup, opt, scaler)
    else:
        seed_everything(config.seed + 7919 * (group.rank + 1))  # dropout stream, distinct per process
    if group.world > 1:
        setup.model = torch.nn.parallel.DistributedDataParallel(
            setup.model, device_ids=[device.index] if device.type == "cuda" else None)
    setup.model.train()
    logger = Logger(setup, state["step"])
    clock = Clock()
    recent = collections.deque(maxlen=config.log_every)  # the last steps' losses, for summary.json
    stopped = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with progress_bar(config.progress and group.main, setup.total_steps, state["step"],
                      f"{config.task}/{config.attention}") as bar, StopOnInterrupt(
            "Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once, without "
            "saving)" if group.main else None) as interrupt:
        while state["step"] < setup.total_steps:
            lr = learning_rate(config, setup.preset, state["step"], setup.warmup, setup.total_steps)
            t0 = time.perf_counter()
            loss, correct, n = train_step(setup.model, step_batches(setup, state["step"]), opt, lr, autocast,
                                          scaler=scaler, clip=config.clip_grad, distributed=group.world > 1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            clock.seconds += time.perf_counter() - t0
            clock.steps += 1
            clock.examples += n * group.world
            state["step"] += 1
            totals = group.sum([loss, correct, n], device)
            if not math.isfinite(totals[0]):  # stop: nothing of this step is saved
                raise NonFiniteLoss(state["step"], totals[0], last_checkpoint(setup))
            metrics = after_step(setup, state, logger, clock, lr, totals)
            recent.append(metrics["loss"])
            if state["step"] % checkpoint_interval(setup) == 0 or state["step"] == setup.total_steps:
                timed_checkpoint(setup, state, opt, scaler)
            bar.advance(metrics)
            if clock.steps == ESTIMATE_AFTER_STEPS and state["step"] < setup.total_steps:
                bar.print(run_estimate(setup, clock, state["step"]))
            if on_step is not None:
                on_step(state["step"], metrics)
            if state["step"] == setup.total_steps:
                break
            out_of_time, interrupted = stop_reasons(setup, clock, interrupt.requested)
            if out_of_time or interrupted:
                if state["step"] % checkpoint_interval(setup):
                    timed_checkpoint(setup, state, opt, scaler)  # so --resume continues from here
                if interrupted:
                    logger.close()
                    run = config.run_dir()
                    raise TrainingInterrupted(state["step"], setup.total_steps, str(run / CHECKPOINT),
                                              f"longrange lra train --resume --out {run}")
                stopped = True
                break
    extra = {"planned_steps": setup.total_steps, "stopped_early": stopped, "max_minutes": config.max_minutes,
             "train_loss": sum(recent) / len(recent) if recent else None}
    summary = finish(setup, setup.model, state, check, clock, logger, extra)
    logger.close()
    return summary


def eval_interval(setup: Setup) -> int:
    return setup.config.eval_every or setup.preset.eval_every or max(1, setup.total_steps // 10)


def checkpoint_interval(setup: Setup) -> int:
    return setup.config.checkpoint_every or eval_interval(setup)


def after_step(setup: Setup, state: dict, logger: Logger, clock: Clock, lr: float, totals: list[float]) -> dict:
    """Accumulate the step's (summed over processes) loss and accuracy; log a train row every
    `log_every` steps and a validation row every `eval_every` (keeping best/). Returns the bar's metrics."""
    world, step, last = setup.dist.world, state["step"], state["step"] == setup.total_steps
    loss, correct, n = totals
    state["log_loss"] += loss / world
    state["log_correct"] += correct
    state["log_n"] += int(n)
    state["log_steps"] += 1
    metrics = {"loss": loss / world, "lr": lr}
    if step % setup.config.log_every == 0 or last:
        logger.metric(step, "train", state["log_loss"] / state["log_steps"],
                      state["log_correct"] / max(state["log_n"], 1), lr)
        logger.speed(step, clock.seconds, *clock.rates(), process_peak_mb(setup.device)[0])
        state.update(log_loss=0.0, log_correct=0.0, log_n=0, log_steps=0)
    if step % eval_interval(setup) == 0 or last:
        t0 = time.perf_counter()
        val = evaluate_split(setup.model, setup, "val", setup.config.eval_batches)
        if setup.budget is not None:
            setup.budget.note_eval(time.perf_counter() - t0, val["examples"])
        logger.metric(step, "val", val["loss"], val["accuracy"], lr)
        metrics["val_accuracy"] = val["accuracy"]
        if val["accuracy"] > state["best_val"]:
            state["best_val"] = val["accuracy"]
            save_best(setup)
    return metrics


def finish(setup: Setup, model, state, check, clock: Clock, logger: Logger, extra: dict | None = None) -> dict:
    """Final validation and test passes, summary.json (`extra`: more fields, e.g. the time budget's)."""
    val = evaluate_split(model, setup, "val")
    test = evaluate_split(model, setup, "test")
    step = state["step"]
    logger.metric(step, "test", test["loss"], test["accuracy"], 0.0)
    peak, peak_kind = process_peak_mb(setup.device)
    c, m, train_set = setup.config, unwrap(model).config, setup.datasets["train"]
    summary = {
        "task": c.task, "attention": c.attention, "preset": setup.preset.name, "options": setup.options,
        "data": getattr(train_set, "source", "") or c.data_dir or "built-in",
        "synthetic": bool(getattr(train_set, "synthetic", False)),
        "steps": step, "batch_size": setup.plan.batch_size, "max_length": m.max_length,
        "processes": setup.dist.world, "accumulate": c.accumulate, "amp": c.amp, "device": str(setup.device),
        "val_accuracy": val["accuracy"], "best_val_accuracy": max(state["best_val"], val["accuracy"]),
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_majority": test["majority"],
        "chance": 1.0 / setup.spec.num_classes,
        "steps_per_s": clock.rates()[0] if clock.steps else None,
        "examples_per_s": clock.rates()[1] if clock.steps else None,
        "train_seconds": clock.seconds, "timed_steps": clock.steps, "peak_memory_mb": peak, "memory_kind": peak_kind,
        "params": check.params, "base_params": check.base_params, "param_ratio": check.ratio,
        "param_rule_ok": check.ok,
        **(extra or {}),
    }
    if setup.budget is not None:
        summary["wall_seconds"] = setup.budget.elapsed()
    if setup.dist.main:
        (c.run_dir() / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# -- time budget (--max-minutes) ----------------------------------------------------------------------------------
class TimeBudget:
    """A wall-clock limit on one `train` call, counted from its start (data loading included).

    After each optimizer step the run stops when the time left would not cover one more step, a
    checkpoint and 1.5× the final val + test evaluation. The evaluation's cost is measured on the
    periodic validation passes (seconds per example); before the first one, a forward pass is
    taken as a third of a training step."""

    def __init__(self, minutes: float | None):
        check_max_minutes(minutes)
        self.seconds = None if minutes is None else 60.0 * minutes  # None: no limit
        self.start = time.perf_counter()
        self.eval_seconds_per_example: float | None = None
        self.checkpoint_seconds = 0.0  # the slowest checkpoint so far

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def note_eval(self, seconds: float, examples: int) -> None:
        """A validation pass took `seconds` for `examples` (the latest pass counts: the first carries warm-up)."""
        if examples:
            self.eval_seconds_per_example = seconds / examples

    def final_eval_seconds(self, setup: Setup, clock: Clock) -> float:
        """Expected seconds of the final val + test passes."""
        examples = len(setup.datasets["val"]) + len(setup.datasets["test"])
        if self.eval_seconds_per_example is not None:
            return examples * self.eval_seconds_per_example
        step = clock.seconds / max(clock.steps, 1)
        return examples / setup.plan.batch_size * step / 3

    def exhausted(self, setup: Setup, clock: Clock) -> bool:
        """True when one more step, a checkpoint and the final evaluation would not fit."""
        if self.seconds is None:
            return False
        step = clock.seconds / max(clock.steps, 1)
        needed = step + self.checkpoint_seconds + 1.5 * self.final_eval_seconds(setup, clock)
        return self.elapsed() + needed > self.seconds


def check_max_minutes(minutes) -> None:
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes <= 0):
        raise ValueError(f"max_minutes must be a positive number of minutes (or None for no limit), got {minutes!r}")


def stop_reasons(setup: Setup, clock: Clock, interrupted: bool) -> tuple[bool, bool]:
    """(out of time, interrupted by Ctrl-C), agreed by every process: one that has a reason stops them all."""
    out_of_time = setup.budget is not None and setup.budget.exhausted(setup, clock)
    if setup.dist.world > 1:
        out_of_time, interrupted = (v > 0 for v in setup.dist.sum([float(out_of_time), float(interrupted)],
                                                                  setup.device))
    return bool(out_of_time), bool(interrupted)


def run_estimate(setup: Setup, clock: Clock, step: int) -> str:
    """One line after the first steps: the whole run's time at this pace and the peak memory so far."""
    per_step = clock.seconds / max(clock.steps, 1)
    left = setup.total_steps - step
    peak, kind = process_peak_mb(setup.device)
    where = "GPU memory" if kind.startswith("cuda") else "resident memory"
    return (f"estimate after {clock.steps} steps: {per_step:.3g} s/step -> {format_duration(per_step * left)} for the "
            f"{left:,} steps left ({format_duration(per_step * setup.total_steps)} for all {setup.total_steps:,}; "
            f"evaluation extra); peak {where} so far {peak / 1024:.2f} GiB. Released presets are GPU-sized "
            "(docs/lra.md); --max-minutes caps a run, --steps shortens it")


def format_duration(seconds: float) -> str:
    """3725 -> '1 h 2 min', 432000 -> '5 d 0 h', 42 -> '42 s'."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    if hours < 48:
        return f"{int(hours)} h {int(minutes % 60)} min"
    return f"{int(hours // 24)} d {int(hours % 24)} h"


def timed_checkpoint(setup: Setup, state: dict, opt, scaler) -> None:
    """save_checkpoint, its duration noted for the budget."""
    t0 = time.perf_counter()
    save_checkpoint(setup, state, opt, scaler)
    if setup.budget is not None:
        setup.budget.checkpoint_seconds = max(setup.budget.checkpoint_seconds, time.perf_counter() - t0)


class _Bar:
    """What `progress_bar` yields: advance(metrics) after each step, print(text) above the bar."""

    def __init__(self, progress=None, task=None):
        self.progress, self.task, self.last = progress, task, {}

    def advance(self, metrics: dict) -> None:
        if self.progress is None:
            return
        self.last.update(metrics)
        info = f"loss {self.last['loss']:.3f}"
        if "val_accuracy" in self.last:
            info += f" · val acc {self.last['val_accuracy']:.3f}"
        self.progress.update(self.task, advance=1, info=info)

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, done: int, label: str):
    """A rich progress bar; yields a _Bar (whose methods do nothing when disabled)."""
    if not enabled:
        yield _Bar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        yield _Bar(progress, progress.add_task("train", total=total, completed=done, info=""))


def describe_plan(config: TrainConfig) -> str:
    """A one-line account of what `train(config)` will do (for the CLI)."""
    p = config.resolved_preset()
    steps = p.steps if config.steps is None else config.steps
    batch = p.batch_size if config.batch_size is None else config.batch_size
    return (f"task {config.task} · preset {p.name} · attention {config.attention} · "
            f"{f'{steps} steps' if steps else f'{p.epochs} epochs'} · batch {batch} · "
            f"data {config.data_dir or 'built-in'}")

