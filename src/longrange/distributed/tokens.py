"""What a sharded model does per token: embeddings at absolute positions and the loss shares
(used by `distributed.models` and `distributed.memory`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longrange.distributed.context import ContextParallel
from longrange.distributed.shards import Shards


def embed(emb, cp: ContextParallel, s: Shards, input_ids, token_type_ids=None) -> torch.Tensor:
    """`Embeddings.forward` at this shard's absolute positions: input_ids [B, n_r] -> [B, n_r, C]."""
    x = emb.word(input_ids)  # (B, n_r, C)
    if emb.position is not None:
        x = x + emb.position(global_position_ids(emb, cp, s, input_ids))
    if emb.token_type is not None:
        x = x + emb.token_type(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
    return emb.dropout(emb.norm(x))


def global_position_ids(emb, cp: ContextParallel, s: Shards, input_ids) -> torch.Tensor:
    """[B, n_r] position ids of this shard in the whole sequence. "padding_offset" gathers every
    rank's count of real tokens per example (B ints per rank)."""
    if s.total > emb.max_length:
        raise ValueError(f"{s.total} tokens exceed max_length={emb.max_length} (the position table); "
                         "convert or build the model with a larger max_length")
    b, n = input_ids.shape
    if emb.position_style == "padding_offset":
        real = input_ids.ne(emb.pad_token_id).long()  # (B, n_r)
        counts = cp.comm.gather_ints(real.sum(dim=1).tolist())  # [P][B]
        before = torch.tensor([sum(c[i] for c in counts[: s.rank]) for i in range(b)], dtype=torch.long,
                              device=input_ids.device)
        return (torch.cumsum(real, dim=1) + before[:, None]) * real + emb.pad_token_id
    return torch.arange(s.lo, s.hi, device=input_ids.device).expand(b, n)


def global_loss(cp: ContextParallel, share: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of every rank's loss share (= one process's loss), detached, on every rank."""
    return None if share is None else cp.comm.all_reduce(share.detach(), "loss")


def token_loss_share(cp: ContextParallel, logits, targets) -> torch.Tensor | None:
    """logits [B, n_r, V], targets [B, n_r] (-100 = ignore) -> this rank's summed cross-entropy / the
    number of targets on all ranks (one gather of an int)."""
    if targets is None:
        return None
    summed = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    count = sum(g[0] for g in cp.comm.gather_ints([int((targets != -100).sum())]))
    return summed / count


def next_token_targets(cp: ContextParallel, s: Shards, labels) -> torch.Tensor:
    """labels [B, n_r] -> the next-token targets of this rank's tokens [B, n_r]: its own labels shifted
    by one, then the first label of the next rank holding tokens (-100 after the last token).
    Communicates B + 1 ints per rank."""
    b, n = labels.shape
    firsts = cp.comm.gather_ints([int(n > 0), *(labels[:, 0].tolist() if n else [-100] * b)])
    after = next((f[1:] for f in firsts[s.rank + 1 :] if f[0]), [-100] * b)
    nxt = torch.tensor(after, dtype=labels.dtype, device=labels.device)[:, None]  # (B, 1)
    return torch.cat([labels[:, 1:], nxt], dim=1)[:, :n]


def lm_loss_share(cp: ContextParallel, s: Shards, logits, labels) -> torch.Tensor | None:
    """`CausalLM._loss` as shares: logits [B, n_r, V], labels [B, n_r] (unshifted, -100 = ignore)."""
    if labels is None:
        return None
    return token_loss_share(cp, logits, next_token_targets(cp, s, labels.long()))
