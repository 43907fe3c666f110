"""Reversible residual layers (RevNet, as in Reformer): activations are recomputed, not stored.

Two streams: y1 = x1 + F(x2), y2 = x2 + G(y1), with F / G a block's pre-norm attention / FFN
branches. The whole stack is one autograd Function that keeps only its final outputs; its
backward walks the blocks in reverse, rebuilding each input from the output
(x2 = y2 - G(y1), x1 = y1 - F(x2)) and differentiating one block at a time.

DDP-safe by construction: every parameter is an explicit input of the Function and its gradient
is *returned* from `backward` (never written into `.grad` by a nested backward), so autograd
accumulates it as for any other layer and DistributedDataParallel's hooks fire once per
parameter, with `find_unused_parameters` on or off. Dropout draws are replayed (RNG state saved
per branch) and autocast is re-entered as it was in the forward.
"""

from __future__ import annotations

import contextlib

import torch


class _RngState:
    """The CPU (and, for CUDA tensors, the device's) RNG state at one moment, to replay dropout."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else [], device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    kind = device.type
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, blocks, kwargs, *params):
        ctx.blocks, ctx.kwargs, ctx.n_params = blocks, kwargs, len(params)
        ctx.params = params
        ctx.autocast = _autocast_state(x1.device)
        ctx.rng = []
        for block in blocks:  # grad mode is off inside Function.forward
            rng_f = _RngState(x1.device)
            x1 = x1 + block.f(x2, **kwargs)
            rng_g = _RngState(x1.device)
            x2 = x2 + block.g(x1)
            ctx.rng.append((rng_f, rng_g))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        kind, enabled, dtype = ctx.autocast
        grads: dict[int, torch.Tensor] = {}
        for block, (rng_f, rng_g) in zip(reversed(ctx.blocks), reversed(ctx.rng), strict=True):
            params = [p for p in block.parameters() if p.requires_grad]
            with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled), rng_g.restored():
                y1_ = y1.detach().requires_grad_(True)
                gy = block.g(y1_)
            dy1_g, *pg = torch.autograd.grad(gy, (y1_, *params), dy2, allow_unused=True)
            z1 = dy1 + dy1_g  # total gradient reaching y1
            x2 = (y2 - gy).detach()
            with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled), rng_f.restored():
                x2_ = x2.requires_grad_(True)
                fx = block.f(x2_, **ctx.kwargs)
            dx2_f, *pf = torch.autograd.grad(fx, (x2_, *params), z1, allow_unused=True)
            x1 = (y1 - fx).detach()
            for p, g in zip(params + params, pg + pf, strict=True):
                if g is not None:
                    grads[id(p)] = g if id(p) not in grads else grads[id(p)] + g
            y1, y2, dy1, dy2 = x1, x2, z1, dy2 + dx2_f
        return (dy1, dy2, None, None, *[grads.get(id(p)) for p in ctx.params])


def reversible_forward(blocks, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run `blocks` (pre-norm TransformerBlocks) as a reversible stack: x [B, N, C] -> [B, N, C].

    Streams start as (x, x) and end averaged. kwargs (attention_mask, global_mask) must need no
    gradient; cross-attention memory is not supported (it would need one)."""
    if kwargs.get("memory") is not None:
        raise ValueError("reversible layers do not support cross-attention memory; use reversible=False "
                         "for the decoder of an EncoderDecoder")
    kwargs = {k: v for k, v in kwargs.items() if k != "memory" and k != "memory_mask"}
    if torch.is_grad_enabled():
        params = [p for block in blocks for p in block.parameters() if p.requires_grad]
        y1, y2 = _ReversibleStack.apply(x, x, list(blocks), kwargs, *params)
    else:
        y1, y2 = reversible_equations(blocks, x, x, kwargs)
    return (y1 + y2) / 2


def reversible_equations(blocks, x1, x2, kwargs, caches=None):
    """The plain forward (y1 = x1 + F(x2), y2 = x2 + G(y1)) with autograd storing everything: the
    reference for tests, the inference path, and the decoding path (with caches)."""
    for i, block in enumerate(blocks):
        x1 = x1 + block.f(x2, cache=None if caches is None else caches[i], **kwargs)
        x2 = x2 + block.g(x1)
    return x1, x2
