"""Reversible residual layers (RevNet, as in Reformer): activations are recomputed, not stored.

Two streams: y1 = x1 + F(x2), y2 = x2 + G(y1), with F / G a block's pre-norm attention / FFN
branches. Each block is one autograd Function that keeps none of its inputs or outputs: the stack
keeps only its final outputs, in a `_Carry` the blocks share. Autograd runs the blocks' backwards
last to first; each takes its outputs from the carry, rebuilds its inputs (x2 = y2 - G(y1),
x1 = y1 - F(x2)), differentiates its two branches, and leaves its inputs in the carry for the block
before it. So activation memory is one block's whatever the depth, and each block's parameter
gradients are handed to autograd (and accumulated) as soon as its backward ends, not all at once.

DDP-safe by construction: every parameter is an explicit input of its block's Function and its
gradient is *returned* from `backward` (never written into `.grad` by a nested backward), so
autograd accumulates it as for any other layer and DistributedDataParallel's hooks fire once per
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


class _Carry:
    """The outputs (y1, y2) of block `index`, the one whose backward runs next, passed from block to
    block (the first block leaves nothing: the stack's input needs no rebuilding)."""

    def __init__(self):
        self.index: int | None = None
        self.streams: tuple[torch.Tensor, torch.Tensor] | None = None

    def put(self, index: int, y1: torch.Tensor, y2: torch.Tensor) -> None:
        self.index, self.streams = index, (y1.detach(), y2.detach())

    def take(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.streams is None or self.index != index:
            raise RuntimeError("reversible backward ran out of order (or twice): differentiate the stack's output "
                               "once, without retain_graph")
        streams, self.index, self.streams = self.streams, None, None
        return streams


class _ReversibleBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, block, index, kwargs, carry, *params):
        ctx.block, ctx.index, ctx.kwargs, ctx.carry, ctx.params = block, index, kwargs, carry, params
        ctx.autocast = _autocast_state(x1.device)
        ctx.rng_f = _RngState(x1.device)  # grad mode is off inside Function.forward
        y1 = x1 + block.f(x2, **kwargs)
        ctx.rng_g = _RngState(x1.device)
        y2 = x2 + block.g(y1)
        return y1, y2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.carry.take(ctx.index)
        block, params = ctx.block, list(ctx.params)
        kind, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled), ctx.rng_g.restored():
            y1_ = y1.detach().requires_grad_(True)
            gy = block.g(y1_)
        dy1_g, *pg = torch.autograd.grad(gy, (y1_, *params), dy2, allow_unused=True)
        z1 = dy1 + dy1_g  # total gradient reaching y1
        x2 = (y2 - gy).detach()
        del gy, y2
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled), ctx.rng_f.restored():
            x2_ = x2.requires_grad_(True)
            fx = block.f(x2_, **ctx.kwargs)
        dx2_f, *pf = torch.autograd.grad(fx, (x2_, *params), z1, allow_unused=True)
        if ctx.index > 0:  # this block's inputs: the outputs of the one before it
            ctx.carry.put(ctx.index - 1, y1 - fx, x2)
        grads = [_add(a, b) for a, b in zip(pg, pf, strict=True)]
        return (z1, dy2 + dx2_f, None, None, None, None, *grads)


def _add(a, b):
    return b if a is None else a if b is None else a + b


def reversible_forward(blocks, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run `blocks` (pre-norm TransformerBlocks) as a reversible stack: x [B, N, C] -> [B, N, C].

    Streams start as (x, x) and end averaged. kwargs (attention_mask, global_mask) must need no
    gradient; cross-attention memory is not supported (it would need one)."""
    if kwargs.get("memory") is not None:
        raise ValueError("reversible layers do not support cross-attention memory; use reversible=False "
                         "for the decoder of an EncoderDecoder")
    kwargs = {k: v for k, v in kwargs.items() if k != "memory" and k != "memory_mask"}
    if not torch.is_grad_enabled():
        y1, y2 = reversible_equations(blocks, x, x, kwargs)
        return (y1 + y2) / 2
    carry = _Carry()
    y1, y2 = x, x
    for index, block in enumerate(blocks):
        params = [p for p in block.parameters() if p.requires_grad]
        y1, y2 = _ReversibleBlock.apply(y1, y2, block, index, kwargs, carry, *params)
    carry.put(len(blocks) - 1, y1, y2)  # the last block's outputs (the same storage as y1, y2)
    return (y1 + y2) / 2


def reversible_equations(blocks, x1, x2, kwargs, caches=None):
    """The plain forward (y1 = x1 + F(x2), y2 = x2 + G(y1)) with autograd storing everything: the
    reference for tests, the inference path, and the decoding path (with caches)."""
    for i, block in enumerate(blocks):
        x1 = x1 + block.f(x2, cache=None if caches is None else caches[i], **kwargs)
        x2 = x2 + block.g(x1)
    return x1, x2
