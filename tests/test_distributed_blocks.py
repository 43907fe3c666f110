"""Block-pattern mechanisms under context parallelism: equal to one process (outputs and
gradients, float64) on 2 and 4 gloo ranks; the plan of a hand-drawn layout; bytes counted equal to
bytes planned; a failing rank raises on every rank."""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from longrange.distributed import ContextParallel, ShardError, Shards, plan_blocks
from longrange.patterns import Global, Window
from sharded_checks import check_sharded
from workers import assert_on_ranks

CASES = [  # (mechanism, config, n, options of check_sharded)
    ("local", {"window": 4, "tile": 2}, 11, {}),
    ("local", {"window": 6, "causal": True}, 13, {"uneven": True}),
    ("local", {"window": 4, "tile": 2, "sink_tokens": 3}, 17, {"uneven": True}),
    ("dilated", {"window": 4, "dilation": 2, "tile": 2}, 15, {}),
    ("dilated", {"window": 6, "dilation": (1, 3), "causal": True}, 16, {"uneven": True}),
    ("sparse_transformer", {"mode": "strided", "stride": 3, "tile": 2}, 14, {"uneven": True}),
    ("sparse_transformer", {"mode": "fixed", "stride": 4, "c": 1, "tile": 3}, 19, {}),
    ("bigbird", {"block_size": 2, "num_random_blocks": 2, "seed": 3}, 21, {"uneven": True}),
    ("bigbird", {"block_size": 2, "num_random_blocks": 1, "tile": 4}, 24, {}),
    ("bigbird", {"block_size": 2, "num_random_blocks": 1}, 20, {"global_tokens": 2, "uneven": True}),
    ("bigbird", {"block_size": 2, "num_random_blocks": 2, "random_span": 8}, 24, {}),  # the shard-aware draw
    ("longformer", {"window": 4, "tile": 2}, 18, {"global_tokens": 3, "uneven": True}),
    ("longformer", {"window": 4, "tile": 2}, 17, {"padding": False}),
]


def _every_case(rank, world, fetch):
    for name, config, n, options in CASES:
        check_sharded(rank, world, name, config, n, fetch=fetch, **options)


@pytest.mark.parametrize(("world", "fetch"), [(2, "auto"), (4, "auto"), (3, "once"), (3, "by_source")])
def test_block_mechanisms_equal_one_process(tmp_path, world, fetch):
    """Outputs, input gradients and rank-summed parameter gradients equal one process's, float64:
    padding, odd lengths, unequal shards cut inside tiles, per-example globals, causal, dense rows;
    remote blocks fetched at once or one source rank at a time (merged by log-sum-exp)."""
    assert_on_ranks(_every_case, world, tmp_path, fetch, timeout_s=240)


def _dropout_and_tiny_shards(rank, world):
    # attention dropout in training: the same pairs dropped as one process with the same seed
    check_sharded(rank, world, "local", {"window": 4, "tile": 2, "dropout": 0.3}, 12, train=True, seed=5)
    check_sharded(rank, world, "bigbird", {"block_size": 2, "num_random_blocks": 1, "dropout": 0.3}, 16, train=True)
    # shards shorter than a tile and than the window; a rank holding no token
    check_sharded(rank, world, "local", {"window": 8, "tile": 4}, 5, padding=False)
    empty_first = (0, 0, 6, 13)
    check_sharded(rank, world, "longformer", {"window": 4, "tile": 2}, 13, global_tokens=2, offsets=empty_first)
    check_sharded(rank, world, "bigbird", {"block_size": 2, "num_random_blocks": 1}, 13, offsets=empty_first)
    for fetch in ("once", "by_source"):
        check_sharded(rank, world, "bigbird", {"block_size": 2, "num_random_blocks": 2, "dropout": 0.2}, 18,
                      train=True, fetch=fetch, uneven=True)


def test_dropout_and_shards_shorter_than_a_tile(tmp_path):
    assert_on_ranks(_dropout_and_tiny_shards, 3, tmp_path, timeout_s=120)


def _plan_and_bytes(rank, world):
    comm = lr.distributed.Comm()
    # hand-drawn: 32 tokens on tiles of 2 (blocks of 2), a window of 2 per side plus token 0 global; 2 ranks of 16
    pattern = Window(2) | Global([0])
    shards = Shards((0, 16, 32), rank)
    plan = plan_blocks(comm, shards, pattern, 2, fetch="once")
    step = plan.steps[0]
    if rank == 0:  # block 0's row sees all 16 blocks: a dense row; rows 1..7 reach block 8 (tokens 16, 17)
        assert step.blocks.tolist() == list(range(9))
        assert step.recv_counts == [0, 2] and step.send_counts == [0, 4]  # sends tokens 0, 1 (global) and 14, 15
        assert plan.dense_local.tolist() == [0, 1]
        assert step.source.tolist() == list(range(18))  # its 16 tokens, then the 2 fetched
    else:  # rows 8..15 see block 0 (the global key) and blocks 7..15
        assert step.blocks.tolist() == [0, *range(7, 16)]
        assert step.recv_counts == [4, 0] and step.send_counts == [2, 0]
        assert plan.dense_local.tolist() == []
        assert step.source.tolist() == [16, 17, 18, 19, *range(16)]  # fetched 0, 1, 14, 15 then its own
    assert plan.dense_counts == [2, 0] and plan.dense_positions.tolist() == [0, 1]
    # BigBird with its random blocks drawn within each shard: a rank fetches the window's halo block and
    # the other end's global block only (2 tokens each), not the sequence
    bird = lr.build_attention("bigbird", dim=8, heads=2, block_size=2, num_random_blocks=3, random_span=24)
    plan = plan_blocks(comm, Shards((0, 24, 48), rank), bird.current_pattern(), 2)
    assert plan.mode == "once" and sum(plan.steps[0].recv_counts) == 4, plan.steps[0].recv_counts
    # bytes counted in a call equal the plan's, kind by kind
    torch.manual_seed(0)
    attn = lr.build_attention("local", dim=16, heads=2, window=8, tile=4).double()
    n = 64
    cp = ContextParallel()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    s = Shards.even(n, world, rank)
    with torch.no_grad():
        cp(attn, x[:, s.lo : s.hi])
    got = {k: v for k, v in cp.comm.sent.items() if k != "plan"}
    from longrange.distributed.block_mechanisms import block_plan

    want = block_plan(cp, attn.current_pattern(), attn.tile, "cpu").bytes(2, 2, 8, 8, masked=False)
    assert got == want, (got, want)
    halo = 4  # one tile of 4 tokens from each neighbour: window 8 = 4 keys per side
    assert want["blocks:k"] == want["blocks:v"] == halo * 2 * 2 * 8 * 8  # tokens · B · H · D · float64


def test_plan_of_a_hand_drawn_layout_and_counted_bytes(tmp_path):
    assert_on_ranks(_plan_and_bytes, 2, tmp_path, timeout_s=60)


def _one_rank_fails(rank, world):
    attn = lr.build_attention("local", dim=16, heads=2, window=4, tile=2)
    cp = ContextParallel()
    x = torch.randn(1, 8, 16 if rank == 0 else 12)  # rank 1 passes the wrong width
    raised = pytest.raises(ValueError, match="x must be") if rank == 1 else pytest.raises(ShardError, match="rank 1 fa")
    with raised:
        cp(attn, x)
    cp(attn, torch.randn(1, 8, 16))  # the group still works after the failure


def test_a_failing_rank_raises_on_every_rank(tmp_path):
    assert_on_ranks(_one_rank_fails, 2, tmp_path, timeout_s=60)


def _refused(rank, world):
    attn = lr.build_attention("etc", dim=16, heads=2)
    with pytest.raises(lr.distributed.ContextParallelUnsupported, match="etc takes a separate global input"):
        ContextParallel()(attn, torch.randn(1, 8, 16))


def test_etc_is_refused_by_name(tmp_path):
    assert_on_ranks(_refused, 2, tmp_path, timeout_s=60)
