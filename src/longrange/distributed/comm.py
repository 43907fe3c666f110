"""The collectives context parallelism uses, differentiable and counted.

Each is a `torch.autograd.Function` whose backward is the collective's adjoint (an all-to-all's is
the reverse all-to-all, a sum all-reduce's is a sum all-reduce, a ring shift's is the opposite
shift), so training through a sharded call works. Every payload this rank hands to a collective is
counted in `Comm.sent` (bytes, by kind, forward and backward apart): what the plans compute before
running is checked against it.

A rank that fails must not leave the others waiting: `Comm.agree` turns a local error into a
`ShardError` raised on every rank, and the process group's timeout bounds any wait beyond that.
"""

from __future__ import annotations

import collections
import contextlib
import math

import torch
import torch.distributed as dist


class ShardError(RuntimeError):
    """A sharded call failed on some rank (raised on every rank, naming the rank and the reason)."""


class Comm:
    """A process group (None: the default one) with counted, differentiable collectives."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise ShardError("context parallelism needs an initialised torch.distributed process group: call "
                             "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the "
                             "environment it reads)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        #: where the small bookkeeping collectives (ints, flags, plans) run: NCCL takes CUDA tensors only
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.sent: collections.Counter = collections.Counter()  # bytes this rank sent, by kind

    # -- accounting -----------------------------------------------------------------------------------
    def count(self, kind: str, nbytes: int) -> None:
        """Add what this rank sent; kinds ending in ":backward" are the adjoints' traffic."""
        self.sent[kind] += int(nbytes)

    def forward_bytes(self) -> int:
        return sum(v for k, v in self.sent.items() if not k.endswith(":backward"))

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    def reset_counters(self) -> None:
        self.sent.clear()

    # -- agreement ------------------------------------------------------------------------------------
    def agree(self, failed_here: bool) -> None:
        """Every rank says whether it failed; where another rank failed, raise `ShardError` naming it
        (the failing rank raises its own error itself)."""
        flag = torch.tensor([self.rank + 1 if failed_here else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        failed = int(flag) - 1
        if failed >= 0 and not failed_here:
            raise ShardError(f"rank {failed} failed (its own error says why); rank {self.rank} stops too")

    @contextlib.contextmanager
    def guard(self):
        """Run a block whose local checks may fail: a failing rank raises its own error, every other
        rank a `ShardError` naming it, instead of waiting in the next collective."""
        try:
            yield
        except (ValueError, TypeError):
            self.agree(True)
            raise
        self.agree(False)

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of ints (same length on every rank), indexed by rank."""
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return [o.tolist() for o in out]

    def gather_objects(self, obj):
        """Every rank's picklable object (small: plans, shapes), indexed by rank."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # -- differentiable collectives -------------------------------------------------------------------
    def all_to_all(self, x: torch.Tensor, send: list[int], recv: list[int], kind: str = "all_to_all") -> torch.Tensor:
        """x [sum(send), *] rows: send[s] of them to rank s (in rank order) -> [sum(recv), *], recv[s]
        rows from rank s. Counted: the rows sent to other ranks."""
        return _AllToAll.apply(x, self, tuple(send), tuple(recv), kind)

    def all_reduce(self, x: torch.Tensor, kind: str = "all_reduce") -> torch.Tensor:
        """Sum over ranks (every rank gets it). Counted as a ring all-reduce: 2·(P-1)/P of x."""
        return _AllReduce.apply(x, self, kind)

    def all_gather(self, x: torch.Tensor, kind: str = "all_gather") -> torch.Tensor:
        """Every rank's x [m_r, *] concatenated in rank order -> [sum m, *] (m_r may differ)."""
        sizes = [s[0] for s in self.gather_ints([x.shape[0]])]
        return self.all_to_all(x.repeat(self.world, *([1] * (x.dim() - 1))), [x.shape[0]] * self.world, sizes,
                               kind)

    def max_all(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max over ranks (not differentiable: used for softmax shifts only)."""
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.MAX, group=self.group)
        self.count("max", _ring_bytes(y, self.world))
        return y

    def shift(self, x: torch.Tensor, step: int = 1, kind: str = "ring") -> torch.Tensor:
        """x sent to rank (r + step) % P, returning what rank (r - step) % P sent (same shape)."""
        return _Shift.apply(x, self, step, kind)


def _ring_bytes(x: torch.Tensor, world: int) -> int:
    return 2 * (world - 1) * x.numel() * x.element_size() // max(world, 1)


def _a2a(comm: Comm, x: torch.Tensor, send, recv, kind: str) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    row = math.prod(x.shape[1:]) * x.element_size()
    comm.count(kind, row * (sum(send) - send[comm.rank]))
    dist.all_to_all_single(out, x, list(recv), list(send), group=comm.group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, send, recv, kind):
        ctx.comm, ctx.send, ctx.recv, ctx.kind = comm, send, recv, kind
        return _a2a(comm, x, send, recv, kind)

    @staticmethod
    def backward(ctx, grad):
        return _a2a(ctx.comm, grad, ctx.recv, ctx.send, ctx.kind + ":backward"), None, None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, kind):
        ctx.comm, ctx.kind = comm, kind
        y = x.contiguous().clone()
        comm.count(kind, _ring_bytes(y, comm.world))
        dist.all_reduce(y, group=comm.group)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        ctx.comm.count(ctx.kind + ":backward", _ring_bytes(g, ctx.comm.world))
        dist.all_reduce(g, group=ctx.comm.group)
        return g, None, None


def _shift(comm: Comm, x: torch.Tensor, step: int, kind: str) -> torch.Tensor:
    x = x.contiguous()
    if comm.world == 1 or step % comm.world == 0:
        return x.clone()
    out = torch.empty_like(x)
    to, frm = (comm.rank + step) % comm.world, (comm.rank - step) % comm.world
    comm.count(kind, x.numel() * x.element_size())
    ops = [dist.P2POp(dist.isend, x, to, group=comm.group), dist.P2POp(dist.irecv, out, frm, group=comm.group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _Shift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, step, kind):
        ctx.comm, ctx.step, ctx.kind = comm, step, kind
        return _shift(comm, x, step, kind)

    @staticmethod
    def backward(ctx, grad):
        return _shift(ctx.comm, grad, -ctx.step, ctx.kind + ":backward"), None, None, None
