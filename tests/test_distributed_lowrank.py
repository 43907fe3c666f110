"""Kernel and low-rank mechanisms sharded over gloo ranks (`longrange.distributed.lowrank`) equal one
process exactly (the same random features and projections): outputs, input and summed parameter
gradients in float64, with padding, odd lengths, uneven and empty shards, causal where the mechanism
has it. Refused mechanisms raise `ContextParallelUnsupported` on every rank and run with
fallback="gather"."""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from longrange.distributed import ContextParallel, ContextParallelUnsupported, ShardError, Shards
from sharded_checks import check_keyless_example, check_sharded
from workers import assert_on_ranks

#: (name, config, n, uneven, padding): one spawned run per world size checks them all
CASES = [
    ("performer", {"nb_features": 16, "seed": 1}, 13, True, True),
    ("performer", {"nb_features": 16, "seed": 1}, 12, False, False),
    ("performer", {"nb_features": 16, "causal": True, "chunk_size": 3}, 13, True, True),
    ("performer", {"nb_features": 6, "kernel": "relu", "orthogonal": False}, 11, True, True),
    ("performer", {"nb_features": 6, "kernel": "relu", "orthogonal": False, "causal": True, "chunk_size": 5},
     11, False, True),
    ("performer", {"nb_features": 8}, 3, False, True),  # 4 ranks: the last holds no token
    ("linear", {}, 13, True, True),
    ("linear", {"causal": True, "chunk_size": 3}, 13, True, True),
    ("linear", {"causal": True, "chunk_size": 2}, 3, False, True),  # 4 ranks: the last holds no token
    ("linformer", {"seq_len": 48, "k": 5}, 13, True, True),
    ("linformer", {"seq_len": 41, "k": 3, "sharing": "none"}, 13, True, True),
    ("linformer", {"seq_len": 64, "k": 4, "sharing": "kv", "bias": False}, 11, False, True),
    ("linformer", {"seq_len": 13, "k": 4}, 13, True, False),  # n = seq_len
    ("linformer", {"seq_len": 8, "k": 2, "sharing": "none"}, 3, False, True),
    ("nystrom", {"num_landmarks": 4}, 13, True, True),  # segments of 4 straddle the shards
    ("nystrom", {"num_landmarks": 4}, 12, False, False),
    ("nystrom", {"num_landmarks": 3, "pinv_iterations": 2, "conv_kernel": 3}, 13, True, True),
    ("nystrom", {"num_landmarks": 8, "pinv_iterations": None}, 13, True, True),  # empty (padding) landmarks
    ("nystrom", {"num_landmarks": 2, "conv_kernel": 5}, 11, True, True),  # halos spanning several shards
    ("nystrom", {"num_landmarks": 5, "conv_kernel": 3}, 3, False, True),  # N < m; 4 ranks: an empty shard
    ("inducing", {"num_inducing": 4}, 13, True, True),
    ("inducing", {"num_inducing": 9, "bias": False}, 11, False, True),
    ("inducing", {"num_inducing": 1}, 3, False, False),
]

#: the refused families, each with a config that runs at n = 12, and a word of its reason
REFUSED = [
    ("synthesizer", {"max_length": 48}, "position-specific"),
    ("axial", {"shape": (-1, 3)}, "column pass"),
    ("routing", {"num_clusters": 2, "cluster_size": 3, "window": 4}, "top-w"),
    ("sinkhorn", {"block_size": 3, "gumbel_noise": False}, "soft mixtures"),
    ("reformer", {"bucket_size": 2, "n_hashes": 2}, "hash bucket"),
    ("memory_compressed", {"compression": 3}, "straddle shards"),
]


def _linformer_too_long(rank: int, world: int) -> None:
    """The whole sequence must fit seq_len, as in one process: an error naming seq_len on every rank,
    although each shard alone would fit."""
    attn = lr.build_attention("linformer", dim=8, heads=2, seq_len=10, k=3).double()
    shards = Shards.even(12, world, rank)
    with pytest.raises((ShardError, ValueError), match="seq_len=10"):
        ContextParallel()(attn, torch.randn(1, shards.length, 8, dtype=torch.float64))


def _traffic(rank: int, world: int) -> None:
    """Performer (softmax kernel) sends one all-reduce of [B, H, m, D+1] and one max of [B, H]; causal
    linear sends (P-1) copies of its [B, H, D, D+1] total: the module docstring's formulas."""
    b, h, d, m = 2, 2, 4, 16
    x = torch.randn(b, 4, h * d, dtype=torch.float64)
    ring = lambda elements: 2 * (world - 1) * elements * 8 // world  # noqa: E731
    cp = ContextParallel()
    cp(lr.build_attention("performer", dim=h * d, heads=h, nb_features=m).double(), x)
    assert cp.comm.sent["all_reduce:summary"] == ring(b * h * m * (d + 1)), cp.comm.sent
    assert cp.comm.sent["max"] == ring(b * h), cp.comm.sent
    cp = ContextParallel()
    cp(lr.build_attention("linear", dim=h * d, heads=h, causal=True).double(), x)
    assert cp.comm.sent["all_gather:prefix"] == (world - 1) * b * h * d * (d + 1) * 8, cp.comm.sent


def lowrank_worker(rank: int, world: int) -> None:
    for name, config, n, uneven, padding in CASES:
        check_sharded(rank, world, name, config, n, uneven=uneven, padding=padding)
    check_sharded(rank, world, "performer", {"nb_features": 8}, 9, uneven=True, train=True)
    for name, config in [("performer", {"nb_features": 8}), ("linear", {"causal": True}), ("nystrom", {}),
                         ("inducing", {"num_inducing": 3}), ("linformer", {"seq_len": 7, "k": 2})]:
        check_keyless_example(rank, world, name, config)
    _linformer_too_long(rank, world)
    _traffic(rank, world)


def refused_worker(rank: int, world: int) -> None:
    for name, config, reason in REFUSED:
        attn = lr.build_attention(name, dim=16, heads=2, **config).double()
        x = torch.randn(1, 12 // world, 16, dtype=torch.float64)
        with pytest.raises(ContextParallelUnsupported, match=reason):
            ContextParallel()(attn, x)
        check_sharded(rank, world, name, config, 12, fallback="gather")


@pytest.mark.parametrize("world", [2, 4])
def test_lowrank_matches_one_process(world, tmp_path):
    assert_on_ranks(lowrank_worker, world, tmp_path, timeout_s=150)


def test_refused_mechanisms_raise_on_every_rank_and_gather(tmp_path):
    assert_on_ranks(refused_worker, 2, tmp_path, timeout_s=120)
