"""Ring attention (`full` sharded over gloo ranks) equals one process: outputs, input and parameter
gradients in float64, with padding, odd lengths, uneven and empty shards, causal or not; its traffic
matches the documented bytes; dropout in training is refused on every rank."""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from longrange.distributed import ContextParallel, ContextParallelUnsupported, Shards
from sharded_checks import check_keyless_example, check_sharded, shard_of
from workers import assert_on_ranks

#: (config, n, uneven, padding): one spawned run checks them all
CASES = [
    ({}, 13, False, True),
    ({}, 13, True, True),
    ({}, 11, True, False),
    ({"causal": True}, 13, True, True),
    ({"causal": True}, 12, False, False),
    ({"causal": True}, 3, False, True),  # 4 ranks: the last holds no token
    ({}, 3, True, False),
]


def _traffic(rank: int, world: int) -> None:
    """Bytes sent per rank: forward (P-1)·(2X + M), backward (P-1)·(2X + M) + P·2X with X = B·H·L·D·8
    (L the longest shard) and M = B·L (the uint8 mask), as the module docstring says."""
    torch.manual_seed(2)
    b, h, d, n = 2, 2, 4, 10
    attn = lr.build_attention("full", dim=h * d, heads=h).double()
    cp = ContextParallel()
    x = torch.randn(b, n, h * d, dtype=torch.float64)
    keep = torch.ones(b, n, dtype=torch.bool)
    offsets = (0, 3, 10) if world == 2 else (0, 1, 3, 6, 10)
    shards = Shards(offsets, rank)
    x_s = shard_of(x, shards).clone().requires_grad_()
    y = cp(attn, x_s, shard_of(keep, shards))
    longest = max(shards.lengths())
    kv, mask = 2 * b * h * longest * d * 8, b * longest
    assert cp.comm.sent["ring:kv"] == (world - 1) * kv, cp.comm.sent
    assert cp.comm.sent["ring:mask"] == (world - 1) * mask, cp.comm.sent
    y.sum().backward()
    assert cp.comm.sent["ring:kv:backward"] == (world - 1) * kv, cp.comm.sent
    assert cp.comm.sent["ring:grad:backward"] == world * kv, cp.comm.sent


def _dropout_refused(rank: int, world: int) -> None:
    attn = lr.build_attention("full", dim=8, heads=2, dropout=0.1).double().train()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    with pytest.raises(ContextParallelUnsupported, match="dropout"):
        ContextParallel()(attn, x)
    attn.eval()  # no dropout in eval: runs
    ContextParallel()(attn, x)


def ring_worker(rank: int, world: int) -> None:
    from longrange.distributed import ring

    for config, n, uneven, padding in CASES:
        check_sharded(rank, world, "full", config, n, uneven=uneven, padding=padding)
    ring.ROW_CHUNK_BYTES = 1  # one query row at a time against each block: the chunked path
    for config, n, uneven, padding in CASES[:4]:
        check_sharded(rank, world, "full", config, n, uneven=uneven, padding=padding)
    ring.ROW_CHUNK_BYTES = 64 * 2**20
    check_keyless_example(rank, world, "full", {}, n=9, seed=1)  # an example with no real token
    _traffic(rank, world)
    _dropout_refused(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_full_matches_one_process(world, tmp_path):
    assert_on_ranks(ring_worker, world, tmp_path, timeout_s=120)
