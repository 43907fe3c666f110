"""One optimizer update, shared by every training loop (LRA classifiers, the byte-level LM, ...).

The learning rate is a plain function of the step, set on the optimizer before each update
(nanoGPT's way): nothing to save in a checkpoint, and a resumed run computes the same rate.

    backward(loss, scaler)                          # as often as there are micro-batches
    apply_update(opt, lr, parameters=model.parameters(), clip=1.0, scaler=scaler)
"""

from __future__ import annotations

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
