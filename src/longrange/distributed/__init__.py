"""Context parallelism: one sequence sharded over the processes of a `torch.distributed` group.

    torchrun --nproc-per-node 4 train.py
    dist.init_process_group("gloo")             # or "nccl"
    cp = lr.distributed.ContextParallel()
    y_shard = cp(attn, x_shard, attention_mask=keep_shard)

See docs/distributed.md: how each family communicates, what it costs, what is refused and why.
Importing this package registers every family's strategy (blocks, ring, low rank, memory).
"""

from longrange.distributed import block_mechanisms, lowrank, memory, ring  # noqa: F401 (register the strategies)
from longrange.distributed.blocks import FETCH_MODES, BlockPlan, FetchStep, plan_blocks
from longrange.distributed.comm import Comm, ShardError
from longrange.distributed.context import (
    ContextParallel,
    ContextParallelUnsupported,
    gather_fallback,
    refuse,
    sharded,
    strategy_for,
    unsupported_reason,
)
from longrange.distributed.models import is_sharded, shard_model, unshard_model
from longrange.distributed.shards import Shards, split_bounds, take_shard
from longrange.distributed.tokens import global_loss

__all__ = [
    "FETCH_MODES", "BlockPlan", "Comm", "ContextParallel", "ContextParallelUnsupported", "FetchStep", "ShardError",
    "Shards", "gather_fallback", "global_loss", "is_sharded", "plan_blocks", "refuse", "shard_model", "sharded",
    "split_bounds", "strategy_for", "take_shard", "unshard_model", "unsupported_reason",
]
