"""What every training loop shares (LRA classifiers, the byte-level LM, pretraining and fine-tuning in
`longrange.apps`): one optimizer update, stopping on a non-finite loss, Ctrl-C as a request to stop at
the next step boundary (so the loop can save a checkpoint and say how to resume), the process group,
seeds and RNG states, the data order, autocast, and the small file operations behind atomic
checkpoints and resumable CSV logs.

The learning rate is a plain function of the step, set on the optimizer before each update
(nanoGPT's way): nothing to save in a checkpoint, and a resumed run computes the same rate.

    backward(loss, scaler)                          # as often as there are micro-batches
    apply_update(opt, lr, parameters=model.parameters(), clip=1.0, scaler=scaler)
    check_loss(loss, step)                          # NonFiniteLoss naming the step
    with StopOnInterrupt() as stop:                 # Ctrl-C sets stop.requested (twice: KeyboardInterrupt now)
        for step in ...:
            ...
            if stop.requested: save, then raise TrainingInterrupted(step, checkpoint, resume)

The data order is a pure function of (seed, step) (`BatchPlan`), and `rng_state` / `set_rng_state`
carry every RNG of a process through a checkpoint, so a resumed run is bit-identical on CPU.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist

from longrange.core.config import ConfigError
from longrange.core.files import atomic_write_text, replace_folder  # noqa: F401  (re-exported: the training loops' folder swap)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RunSettings:
    """JSON round trip of a training run's settings dataclass (saved as the run's run.json): `to_dict`,
    and `from_dict`, which names unknown keys. `kind` names the settings in that error."""

    kind: ClassVar[str] = "run"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.kind} config key(s) {unknown}; known keys: {sorted(known)}", "config")
        return cls(**data)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
    """loss.backward(), through the fp16 gradient scaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def apply_update(optimizer: torch.optim.Optimizer, lr: float, *, parameters: Iterable[torch.Tensor] | None = None,
                 clip: float | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    """Set the learning rate, unscale (fp16) and clip the gradients to norm `clip` when asked, take the
    optimizer step and zero the gradients."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if clip is not None:
        if parameters is None:
            raise ValueError("clip needs the parameters whose gradients to clip")
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class NonFiniteLoss(FloatingPointError):
    """A training loss (or, after an update, a weight) was NaN or inf: the run stops at that step and
    its weights are not saved. `what` replaces the loss's description, e.g. for the weights."""

    def __init__(self, step: int, loss: float, kept: str = "", what: str | None = None):
        self.step, self.loss = step, loss
        what = what or f"the training loss at step {step} is {loss}"
        super().__init__(f"{what}: the run diverged and was stopped" + (f"; {kept}" if kept else "")
                         + " (a lower learning rate or gradient clipping may help)")


def check_loss(loss: float, step: int, kept: str = "") -> None:
    """NonFiniteLoss when `loss` is NaN or inf; `kept`: what was saved before (said in the message)."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(step, loss, kept)


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or inf (checked before a checkpoint is written)."""
    return [name for name, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training loop at a step boundary after it saved a checkpoint.

    step: optimizer steps done; checkpoint: where the state was saved; resume: the command (or call)
    that continues the run. A KeyboardInterrupt, so code that lets Ctrl-C through still stops."""

    def __init__(self, step: int, total: int, checkpoint: str, resume: str):
        self.step, self.total, self.checkpoint, self.resume = step, total, checkpoint, resume
        super().__init__(f"interrupted at step {step} of {total}; the run is saved in {checkpoint}; continue it "
                         f"with: {resume}")


class StopOnInterrupt:
    """Within the block, the first Ctrl-C (SIGINT) sets `requested` (the loop stops after its step and
    saves); a second one raises KeyboardInterrupt at once. Outside the main thread it does nothing
    (signals go to the main thread only)."""

    def __init__(self, message: str | None = "Ctrl-C: stopping after this step and saving a checkpoint "
                                              "(Ctrl-C again to quit at once, without saving)"):
        self.message = message
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.message:
            print(f"\n{self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def autocast_for(device: torch.device, amp: bool, amp_dtype: str | None = None):
    """(a context factory, the autocast dtype or None): bf16 autocast on CPU and on GPUs that support
    it, fp16 on older GPUs (give those a GradScaler); nothing when `amp` is off."""
    if not amp:
        return contextlib.nullcontext, None
    if amp_dtype not in (None, *AMP_DTYPES):
        raise ValueError(f"amp_dtype must be one of {list(AMP_DTYPES)}, got {amp_dtype!r}")
    name = amp_dtype or ("bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16")
    if device.type == "cpu" and name == "fp16":
        raise ValueError("amp_dtype: fp16 autocast needs a GPU; use bf16 on CPU")
    dtype = AMP_DTYPES[name]
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype


# -- processes ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    """This process's place in a (possibly one-process) group."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # we initialised the group (and destroy it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum over processes (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: torch.device) -> Dist:
    """Join the caller's process group, or start one from torchrun's environment (WORLD_SIZE > 1)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), owned=True)


def pick_device(name: str) -> torch.device:
    """auto: the local CUDA device (LOCAL_RANK under torchrun) when there is one, else CPU."""
    if name == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name!r} asked for but CUDA is not available; use --device cpu")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got {name!r}")
    return device


# -- randomness ---------------------------------------------------------------------------------------------------

def start_run_folder(run: Path, settings: RunSettings, group: Dist, *, replace: bool) -> None:
    """Create the run folder (replace=True: an old one is removed first: the user asked for
    --overwrite) and write the run's settings as run.json, on the main process; every process waits."""
    if group.main:
        if replace and run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "run.json", json.dumps(settings.to_dict(), indent=2) + "\n")
    group.barrier()


@contextlib.contextmanager
def training_process(device: str, threads: int | None = None, flush_denormal: bool = True):
    """This process set up for a training run, as (device, group): the device (`pick_device`), torch's
    threads, subnormal floats flushed to zero on CPU (x86 is 10-100x slower on them; accelerators flush
    too), and the process group under torchrun (`setup_distributed`), destroyed at the end if made here."""
    device = pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    if flush_denormal and device.type == "cpu":
        torch.set_flush_denormal(True)
    group = setup_distributed(device)
    try:
        yield device, group
    finally:
        if group.owned:
            dist.destroy_process_group()

def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), numpy and python RNGs from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG state of this process, in types `torch.load(weights_only=True)` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- data order ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which examples each process's micro-batches hold at each optimizer step (a pure function of the step)."""

    examples: int
    batch_size: int  # global, per optimizer step
    world: int
    accumulate: int
    seed: int

    def __post_init__(self):
        share = self.world * self.accumulate
        if self.batch_size % share:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by processes × accumulate = "
                             f"{self.world} × {self.accumulate} = {share}")
        if self.examples < self.batch_size:
            raise ValueError(f"batch_size={self.batch_size} is larger than the training set ({self.examples} "
                             f"examples); pass a smaller --batch-size")

    @property
    def micro(self) -> int:
        return self.batch_size // (self.world * self.accumulate)

    @property
    def steps_per_epoch(self) -> int:
        return self.examples // self.batch_size  # the last partial batch of an epoch is dropped

    def order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.examples, generator=gen)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """`accumulate` lists of example indices for process `rank` at optimizer step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        batch = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        out = []
        for j in range(self.accumulate):
            start = (j * self.world + rank) * self.micro
            out.append(batch[start:start + self.micro].tolist())
        return out


# -- files: atomic folders, resumable CSV logs ------------------------------------------------------------------
def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def keep_rows(path: Path, fields, last_step: int) -> None:
    """Rewrite `path` with its header and the rows of steps <= last_step (a fresh run: last_step 0
    keeps nothing but the header)."""
    rows = []
    if path.is_file() and last_step > 0:
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if r and int(r[0]) <= last_step]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        w.writerows(rows)


def append_row(path: Path, fields, row) -> None:
    with path.open("a", newline="") as f:
        csv.writer(f).writerow(row)
