"""One optimizer update, shared by every training loop (LRA classifiers, the byte-level LM, ...),
and what those loops share around it: stopping on a non-finite loss, and Ctrl-C as a request to
stop at the next step boundary (so the loop can save a checkpoint and say how to resume).

The learning rate is a plain function of the step, set on the optimizer before each update
(nanoGPT's way): nothing to save in a checkpoint, and a resumed run computes the same rate.

    backward(loss, scaler)                          # as often as there are micro-batches
    apply_update(opt, lr, parameters=model.parameters(), clip=1.0, scaler=scaler)
    check_loss(loss, step)                          # NonFiniteLoss naming the step
    with StopOnInterrupt() as stop:                 # Ctrl-C sets stop.requested (twice: KeyboardInterrupt now)
        for step in ...:
            ...
            if stop.requested: save, then raise TrainingInterrupted(step, checkpoint, resume)
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from collections.abc import Iterable

import torch


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
