"""Incremental decoding for causal self-attention: one cache object per layer.

    cache = self_attention_cache(module)     # the cache the mechanism declares (`module.cache_spec()`)
    y = cache.attend(module, x_new)          # x_new [B, T, C]: the next T tokens -> [B, T, C]

- "kv" (`KVCache`): the keys and values the mechanism's pattern can still reach, and nothing
  else: a ring buffer for a window (`local`, `dilated`, `sparse_transformer` fixed's own chunk),
  fixed slots for keys kept forever (attention sinks, leading global tokens, the fixed pattern's
  summary columns), every key where the pattern reaches back to the first token (`full`, strided).
  With a window and sinks its memory is constant however long the generation.
- "state": the module's own O(1) `initial_state(batch, device=, dtype=)` / `step(q, k, v, state)`
  (linear attention, Performer).
- "recompute": the layer's past inputs, re-run each step (any causal mechanism; correct, not fast).

Positions. A key is stored as the mechanism computed it, with its absolute position: our models add
learned positions before the attention, and HF models apply RoPE before their cache, so the stored
keys are already rotated by their absolute position and stay right as the window slides; the pattern
is evaluated on absolute positions (`CacheSpec.pattern`). Nothing is re-rotated on read (the
StreamingLLM variant that renumbers the cached keys would change the model's function: cached
decoding here equals the full masked forward). Positions count each example's real tokens from 0
(`cumsum(keep) - 1`, HF's `position_ids`), so a left-padded example decodes as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from longrange.core.interface import CacheSpec
from longrange.core.masking import sdpa_zero_empty_rows
from longrange.patterns import Causal

#: query rows x keys evaluated per masked-attention call (bounds the [B, H, rows, L] mask)
MASK_ELEMENTS = 1 << 22
#: initial slots for keys kept forever when their number is not known in advance (doubles as needed)
GROWING_SLOTS = 16


def self_attention_cache(module: nn.Module):
    """The cache `module` declares (`cache_spec()`); a ValueError for non-causal attention."""
    spec = module.cache_spec()
    if spec.kind == "kv":
        return KVCache(spec)
    if spec.kind == "state":
        return StateCache()
    if spec.kind == "recompute":
        return RecomputeCache()
    raise ValueError(f"{module.config.name!r} declares an unknown cache kind {spec.kind!r}")


# -- attention at explicit positions ------------------------------------------------------------------------------
def repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hk, L, D] -> [B, H, L, D]: grouped-query attention, query head h reads key head h // (H / Hk)."""
    b, hk, n, d = t.shape
    if hk == heads:
        return t
    if heads % hk:
        raise ValueError(f"{hk} key/value heads must divide {heads} query heads")
    return t[:, :, None].expand(b, hk, heads // hk, n, d).reshape(b, heads, n, d)


def positional_attention(q, k, v, q_pos, k_pos, k_valid, pattern=None, *, scale: float | None = None):
    """Softmax attention of queries at positions q_pos over keys at positions k_pos, restricted to
    `pattern` (a `Pattern` on absolute positions; None: causal, key <= query).

    q [B, H, T, D]; k, v [B, Hk, L, D] (Hk divides H); q_pos [B, T], k_pos [B, L] long; k_valid [B, L]
    bool (False: an empty slot or padding). -> [B, H, T, D]; a query with no allowed key gets zeros.
    Queries run in chunks so the mask stays below MASK_ELEMENTS x B elements: O(T·L) time, the
    rectangular case the block engine does not take (decoding, chunked prefill)."""
    b, h, t, _ = q.shape
    k, v = repeat_heads(k, h), repeat_heads(v, h)
    pattern = Causal() if pattern is None else pattern
    n = int(torch.maximum(q_pos.max(), k_pos.max())) + 1 if t and k_pos.numel() else 1
    fn = pattern.mask_mod(n, q.device)
    heads = torch.arange(pattern.num_heads or 1, device=q.device)[None, :, None, None]
    rows = max(1, MASK_ELEMENTS // max(1, k.shape[2] * (pattern.num_heads or 1)))
    outs = []
    for t0 in range(0, t, rows):
        qp = q_pos[:, None, t0 : t0 + rows, None]  # [B, 1, r, 1]
        allowed = fn(heads, qp, k_pos[:, None, None, :]) & k_valid[:, None, None, :]  # [B, Hp, r, L]
        outs.append(sdpa_zero_empty_rows(q[:, :, t0 : t0 + rows], k, v, allowed, scale))
    return torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape[:3] + (v.shape[-1],))


def real_positions(keep: torch.Tensor) -> torch.Tensor:
    """[B, N] bool -> [B, N] long: each real token's number among its example's real tokens (HF's
    `position_ids` for a padded batch); padding gets the number of the real token before it."""
    return keep.long().cumsum(1) - 1


def compacted(fn: Callable, q, k, v, keep: torch.Tensor | None):
    """fn(q, k, v, keep) -> [B, H, N, D] run with each example's real tokens moved to the front (a
    left- or inner-padded batch becomes right-padded: token i is then at position cumsum(keep)[i] - 1,
    as for the example alone), the outputs put back in place. Right-padded or unpadded input runs as is."""
    if keep is None or bool((keep[:, 1:] <= keep[:, :-1]).all()):  # no real token after a padding one
        return fn(q, k, v, keep)
    b, n = keep.shape
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # (B, N): real tokens first, in order
    take = [torch.gather(t, 2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])) for t in (q, k, v)]
    keep_c = torch.arange(n, device=keep.device)[None, :] < keep.sum(1, keepdim=True)
    out_c = fn(*take, keep_c)  # (B, H, N, D)
    index = order[:, None, :, None].expand(-1, out_c.shape[1], -1, out_c.shape[3])
    return torch.zeros_like(out_c).scatter(2, index, out_c)


# -- the pattern's cache ------------------------------------------------------------------------------------------
class KVCache:
    """The keys and values a causal pattern can still reach (`CacheSpec` "kv"), for one layer.

    Storage, allocated on the first write and never re-shaped for a window with sinks:
    ring   [B, Hk, R + 1, D] keys and values of the last R = spec.window positions, position p in slot
           p mod R (slot R takes discarded writes); ring_pos [B, R + 1] (-1: empty)
    fixed  [B, Hk, C + 1, D] keys kept forever (sinks; spec.keep positions; every key without a
           window), appended in order; fixed_pos [B, C + 1]; C = spec.sinks, or grows by doubling
    Every key lives in exactly one place (a kept-forever key's ring slot is marked empty), so no key
    enters a softmax twice. `attend` evaluates spec.pattern on the stored positions: the cache equals
    recomputing the full masked forward whenever it holds every key the pattern lets a later query see.
    """

    def __init__(self, spec: CacheSpec):
        if spec.kind != "kv":
            raise ValueError(f"KVCache needs a 'kv' CacheSpec, got {spec.kind!r}")
        self.spec = spec
        self.window = spec.window  # R, or None: keep every key
        self.ring_k = self.ring_v = self.ring_pos = None
        self.fixed_k = self.fixed_v = self.fixed_pos = self.fixed_count = None
        self.length = 0  # positions given so far through `attend(module, x)` (our models: no padding)

    # -- what is stored ---------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Examples stored (0 before the first write)."""
        pos = self.ring_pos if self.ring_pos is not None else self.fixed_pos
        return 0 if pos is None else pos.shape[0]

    def is_empty(self) -> bool:
        """No key stored yet (padding seen so far does not count)."""
        return not any(bool((p >= 0).any()) for p in (self.ring_pos, self.fixed_pos) if p is not None)

    def stored(self):
        """(k, v [B, Hk, S, D], pos [B, S] long, valid [B, S] bool): the ring's R slots, then the
        fixed slots in use."""
        parts = []
        if self.ring_pos is not None:
            r = self.window
            parts.append((self.ring_k[:, :, :r], self.ring_v[:, :, :r], self.ring_pos[:, :r]))
        if self.fixed_pos is not None:
            c = int(self.fixed_count.max())
            parts.append((self.fixed_k[:, :, :c], self.fixed_v[:, :, :c], self.fixed_pos[:, :c]))
        if not parts:
            return None, None, None, torch.zeros(0, 0, dtype=torch.bool)
        if len(parts) == 1:  # views, no copy
            k, v, pos = parts[0]
            return k, v, pos, pos >= 0
        k, v, pos = (torch.cat(t, dim=-2 if i < 2 else 1) for i, t in enumerate(zip(*parts, strict=True)))
        return k, v, pos, pos >= 0

    def positions(self) -> list[list[int]]:
        """The stored positions of each example, sorted (for tests and inspection)."""
        _, _, pos, valid = self.stored()
        if pos is None:
            return []
        return [sorted(p[m].tolist()) for p, m in zip(pos, valid, strict=True)]

    def memory_tokens(self) -> int:
        """Most keys one example has stored (a window and sinks: at most R + sinks)."""
        valid = self.stored()[3]
        return int(valid.sum(1).max()) if valid.numel() else 0

    def nbytes(self) -> int:
        """Bytes the cache holds (keys, values and their positions), allocated capacity included."""
        tensors = (self.ring_k, self.ring_v, self.ring_pos, self.fixed_k, self.fixed_v, self.fixed_pos,
                   self.fixed_count)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- the call ---------------------------------------------------------------------------------------------
    def attend(self, module, x: torch.Tensor) -> torch.Tensor:
        """Our models: x [B, T, C] are the next T tokens (no padding) -> [B, T, C]."""
        q, k, v = module.project(x)  # 3 x (B, H, T, D)
        b, t = x.shape[:2]
        pos = torch.arange(self.length, self.length + t, device=x.device).expand(b, t)
        prefill = None if self.length else (lambda q_, k_, v_, keep: module.attend(q_, k_, v_, keep))
        o = self.attend_positions(q, k, v, pos, prefill=prefill)
        self.length += t
        return module.merge(o)

    def attend_positions(self, q, k, v, pos, keep=None, *, scale: float | None = None, prefill=None):
        """Attention of the new tokens over the stored keys and themselves, then store them.

        q [B, H, T, D]; k, v [B, Hk, T, D] (Hk divides H); pos [B, T] long: each new token's position
        (its example's real tokens numbered from 0); keep [B, T] bool (False: padding, never stored or
        attended) or None. prefill(q, k, v, keep) -> [B, H, T, D], optional: the block engine for a
        first chunk, whose tokens are then numbered 0.. (after `compacted`) so the pattern applies as is.
        """
        b, _, t, _ = q.shape
        keep = torch.ones(b, t, dtype=torch.bool, device=q.device) if keep is None else keep
        if prefill is not None and self.is_empty() and bool((pos[keep] == real_positions(keep)[keep]).all()):
            o = compacted(prefill, q, k, v, None if bool(keep.all()) else keep)
        elif self.window is None:  # nothing is ever dropped: store first, attend over the stored slots (views)
            self.write(k, v, pos, keep)
            ks, vs, ps, valid = self.stored()
            return positional_attention(q, ks, vs, pos, ps, valid, self.spec.pattern, scale=scale)
        else:
            ks, vs, ps, valid = self.stored()
            if ks is not None:
                k_all, v_all = torch.cat([ks, k], dim=2), torch.cat([vs, v], dim=2)
                pos_all, valid_all = torch.cat([ps, pos], dim=1), torch.cat([valid, keep], dim=1)
            else:
                k_all, v_all, pos_all, valid_all = k, v, pos, keep
            o = positional_attention(q, k_all, v_all, pos, pos_all, valid_all, self.spec.pattern, scale=scale)
        self.write(k, v, pos, keep)
        return o

    # -- storing ----------------------------------------------------------------------------------------------
    def kept_forever(self, pos: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        out = pos < spec.sinks
        if spec.keep is not None:
            out = out | spec.keep(pos)
        if self.window is None:
            out = torch.ones_like(out)
        return out

    @torch.no_grad()
    def write(self, k, v, pos, keep) -> None:
        """Store the new keys (k, v [B, Hk, T, D] at pos [B, T], real where keep) by the spec's rule."""
        forever = self.kept_forever(pos) & keep
        if self.window:
            self._write_ring(k, v, pos, keep, forever)
        if bool(forever.any()):
            self._write_fixed(k, v, pos, forever)

    def _write_ring(self, k, v, pos, keep, forever) -> None:
        r = self.window
        b, hk, t, d = k.shape
        if self.ring_pos is None:
            self.ring_k = k.new_zeros(b, hk, r + 1, d)
            self.ring_v = v.new_zeros(b, hk, r + 1, d)
            self.ring_pos = torch.full((b, r + 1), -1, dtype=torch.long, device=k.device)
        last = torch.where(keep, pos, -1).max(dim=1, keepdim=True).values  # (B, 1): newest real position
        recent = keep & (pos > last - r)  # the last r real positions: distinct slots
        slot = torch.where(recent, pos % r, r)  # (B, T); r = the discard slot
        index = slot[:, None, :, None].expand(b, hk, t, d)
        self.ring_k.scatter_(2, index, k)
        self.ring_v.scatter_(2, index, v)
        self.ring_pos.scatter_(1, slot, torch.where(forever, -1, pos))  # kept-forever keys live in `fixed`
        self.ring_pos[:, r] = -1

    def _write_fixed(self, k, v, pos, forever) -> None:
        b, hk, t, d = k.shape
        if self.fixed_pos is None:
            cap = self.spec.sinks if self.window is not None and self.spec.keep is None else GROWING_SLOTS
            self._allocate_fixed(b, hk, d, k, max(cap, 1))
        added = forever.long().cumsum(1)  # (B, T)
        needed = int((self.fixed_count + added[:, -1]).max())
        cap = self.fixed_pos.shape[1] - 1
        if needed > cap:
            self._allocate_fixed(b, hk, d, k, max(needed, 2 * cap))
            cap = self.fixed_pos.shape[1] - 1
        slot = torch.where(forever, self.fixed_count[:, None] + added - 1, cap)  # cap = the discard slot
        index = slot[:, None, :, None].expand(b, hk, t, d)
        self.fixed_k.scatter_(2, index, k)
        self.fixed_v.scatter_(2, index, v)
        self.fixed_pos.scatter_(1, slot, pos)
        self.fixed_pos[:, cap] = -1
        self.fixed_count += added[:, -1]

    def _allocate_fixed(self, b, hk, d, like, cap) -> None:
        """(Re)allocate `cap` fixed slots (+1 discard slot), keeping what is stored."""
        new_k = like.new_zeros(b, hk, cap + 1, d)
        new_v = like.new_zeros(b, hk, cap + 1, d)
        new_pos = torch.full((b, cap + 1), -1, dtype=torch.long, device=like.device)
        if self.fixed_pos is not None:
            old = self.fixed_pos.shape[1] - 1
            new_k[:, :, :old] = self.fixed_k[:, :, :old]
            new_v[:, :, :old] = self.fixed_v[:, :, :old]
            new_pos[:, :old] = self.fixed_pos[:, :old]
        else:
            self.fixed_count = torch.zeros(b, dtype=torch.long, device=like.device)
        self.fixed_k, self.fixed_v, self.fixed_pos = new_k, new_v, new_pos

    # -- batch bookkeeping (HF generation: beams, repeated prompts) -----------------------------------------------
    def select_batch(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat examples: every stored tensor takes rows `index` [B'] long."""
        for name in ("ring_k", "ring_v", "ring_pos", "fixed_k", "fixed_v", "fixed_pos", "fixed_count"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))


class StateCache:
    """The mechanism's own recurrent state (`initial_state` / `step`), O(1) in the length."""

    def __init__(self):
        self.state = None

    def attend(self, module, x: torch.Tensor) -> torch.Tensor:
        q, k, v = module.project(x)  # 3 x (B, H, T, D)
        if self.state is None:
            self.state = module.initial_state(x.shape[0], device=x.device, dtype=x.dtype)
        o, self.state = module.step(q, k, v, self.state)
        return module.merge(o)

    def memory_tokens(self) -> int:
        return 0

    def nbytes(self) -> int:
        state = self.state
        tensors = state.values() if isinstance(state, dict) else state if isinstance(state, (tuple, list)) else [state]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class RecomputeCache:
    """Keeps the layer's past inputs and re-runs the module on all of them (any causal mechanism)."""

    def __init__(self):
        self.x = None

    def attend(self, module, x: torch.Tensor) -> torch.Tensor:
        self.x = x if self.x is None else torch.cat([self.x, x], dim=1)  # (B, L, C)
        return module(self.x)[:, -x.shape[1] :]

    def memory_tokens(self) -> int:
        return 0 if self.x is None else self.x.shape[1]

    def nbytes(self) -> int:
        return 0 if self.x is None else self.x.numel() * self.x.element_size()
