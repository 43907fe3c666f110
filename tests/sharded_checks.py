"""What every context-parallel test checks, run inside each spawned rank (see workers.assert_on_ranks):
the sharded call's output rows, input gradients and summed parameter gradients equal one
process's on the whole sequence, in float64."""

from __future__ import annotations

import torch

import longrange as lr
from longrange.distributed import ContextParallel, Shards


def uneven_offsets(n: int, world: int) -> tuple[int, ...]:
    """Shards of unequal length: rank r gets roughly (r + 1) parts (and the cut ignores tiles)."""
    weights = [r + 1 for r in range(world)]
    cuts, acc = [0], 0
    for w in weights[:-1]:
        acc += w
        cuts.append(min(n, round(n * acc / sum(weights))))
    return tuple(cuts + [n])


def shard_of(t: torch.Tensor, shards: Shards) -> torch.Tensor:
    return t[:, shards.lo : shards.hi]


def check_sharded(rank: int, world: int, name: str, config: dict, n: int, *, batch: int = 2, dim: int = 16,
                  heads: int = 2, padding: bool = True, uneven: bool = False, global_tokens: int = 0,
                  fallback: str | None = None, grads: bool = True, train: bool = False, atol: float = 1e-9,
                  seed: int = 0, offsets: tuple[int, ...] | None = None, fetch: str = "auto") -> None:
    """offsets: an explicit cut (default: even, or `uneven_offsets` with uneven=True)."""
    torch.manual_seed(seed)
    attn = lr.build_attention(name, dim=dim, heads=heads, **config).double()
    attn.train(train)
    x = torch.randn(batch, n, dim, dtype=torch.float64)
    keep = None
    if padding:
        keep = torch.ones(batch, n, dtype=torch.bool)
        keep[-1, n - max(1, n // 5):] = False  # the last example right-padded
    inputs = {}
    if global_tokens and attn.capabilities.global_tokens is None:  # extra globals by mask (BigBird's)
        inputs = {"global_mask": torch.zeros(batch, n, dtype=torch.bool)}
        inputs["global_mask"][:, :global_tokens] = True
    elif global_tokens:
        inputs = attn.global_token_inputs(global_tokens, batch, n)
    if "global_mask" in inputs and batch > 1:  # per-example globals: a different extra one in example 0
        inputs["global_mask"][0, n // 2] = True
    weight = torch.randn(batch, n, dim, dtype=torch.float64)

    x_ref = x.clone().requires_grad_()
    torch.manual_seed(seed + 1)  # the same draws (dropout seeds) in both calls
    y_ref = attn(x_ref, keep, **inputs)
    if grads:
        (y_ref * weight).sum().backward()
    ref_param_grads = {k: p.grad.clone() for k, p in attn.named_parameters() if p.grad is not None}
    attn.zero_grad(set_to_none=True)

    if offsets is None:
        offsets = uneven_offsets(n, world) if uneven else Shards.even(n, world, rank).offsets
    shards = Shards(offsets, rank)
    cp = ContextParallel(fallback=fallback, fetch=fetch)
    x_s = shard_of(x, shards).clone().requires_grad_()
    local_inputs = {k: shard_of(v, shards) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    torch.manual_seed(seed + 1)
    y_s = cp(attn, x_s, None if keep is None else shard_of(keep, shards), **local_inputs)
    assert cp.shards == shards, (cp.shards, shards)
    torch.testing.assert_close(y_s, shard_of(y_ref, shards), atol=atol, rtol=1e-7,
                               msg=lambda m: f"{name} {config} output, rank {rank}: {m}")
    if not train:  # inference (no autograd) takes other paths (in-place merges, reused buffers)
        with torch.no_grad():
            y_ng = cp(attn, x_s.detach(), None if keep is None else shard_of(keep, shards), **local_inputs)
        torch.testing.assert_close(y_ng, shard_of(y_ref, shards).detach(), atol=atol, rtol=1e-7,
                                   msg=lambda m: f"{name} {config} output without autograd, rank {rank}: {m}")
    if not grads:
        return
    (y_s * shard_of(weight, shards)).sum().backward()
    torch.testing.assert_close(x_s.grad, shard_of(x_ref.grad, shards), atol=atol, rtol=1e-7,
                               msg=lambda m: f"{name} {config} input gradient, rank {rank}: {m}")
    cp.reduce_gradients(attn)
    for k, p in attn.named_parameters():
        if k in ref_param_grads:
            torch.testing.assert_close(p.grad, ref_param_grads[k], atol=atol, rtol=1e-7,
                                       msg=lambda m, k=k: f"{name} {config} gradient of {k}, rank {rank}: {m}")


def check_keyless_example(rank: int, world: int, name: str, config: dict, n: int = 7, seed: int = 3) -> None:
    """An example with no real token gives what one process gives (zeros), with finite gradients."""
    torch.manual_seed(seed)
    attn = lr.build_attention(name, dim=8, heads=2, **config).double()
    x = torch.randn(2, n, 8, dtype=torch.float64)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1] = False
    x_ref = x.clone().requires_grad_()
    y_ref = attn(x_ref, keep)
    y_ref.sum().backward()
    shards = Shards.even(n, world, rank)
    x_s = shard_of(x, shards).clone().requires_grad_()
    y_s = ContextParallel()(attn, x_s, shard_of(keep, shards))
    y_s.sum().backward()
    torch.testing.assert_close(y_s, shard_of(y_ref, shards), atol=1e-9, rtol=1e-7, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(x_s.grad, shard_of(x_ref.grad, shards), atol=1e-9, rtol=1e-7,
                               msg=lambda m: f"{name} gradient: {m}")
    assert torch.isfinite(x_s.grad).all()
