"""`LongrangeCache`: a transformers `Cache` that keeps only what the layer's pattern can still reach.

    model.generate(ids, attention_mask=mask, past_key_values=lr.hf.LongrangeCache(), max_new_tokens=64)
    cache.nbytes()                 # constant once the window is full (a window with sinks)

Each layer is a `LongrangeCacheLayer` holding our `KVCache` (`longrange.nn.decoding`): a ring buffer
for the window, fixed slots for sinks and global tokens. HF's model calls `update` with the new keys
(already rotated by RoPE at their absolute positions) right before the attention function; `update`
returns them tagged with the layer, and the longrange attention function computes attention over the
stored keys and the new ones, then stores the new ones by the pattern's rule (it alone knows the
padding and the pattern). So the cache works with the longrange attention backends only; with any
other attention implementation the first call is an error, never a silently wrong result.
"""

from __future__ import annotations

import torch

from longrange.nn.decoding import KVCache

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"lr.hf.LongrangeCache needs the optional dependency `transformers`: pip install longrange[hf] "
                      f"({err})") from err


class LongrangeCacheLayer(CacheLayerMixin):
    """One layer: the tokens seen (cache positions, padding included) and our `KVCache`, created on the
    first attention call from the layer's pattern."""

    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.core: KVCache | None = None
        self.seen = 0
        self._pending = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Count the new tokens and hand them to the attention function, tagged with this layer."""
        if self._pending:
            raise RuntimeError("LongrangeCache needs a longrange attention implementation (lr.hf.register(), "
                               "attn_implementation='longrange-...'): the previous call's keys were never attended "
                               "(another attention implementation, or an error in that call); start a new cache")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self._pending = True
        key_states._longrange_cache = self
        return key_states, value_states

    def attend(self, setup, query, key, value, q_pos, q_keep, scale):
        """Called by the attention function: attention over the stored keys and the new ones, then store."""
        if self.core is None:
            self.core = KVCache(setup.cache_spec)
        elif self.core.spec is not setup.cache_spec:
            raise ValueError("the layer's pattern changed during generation (model.config.longrange or the model's "
                             "train/eval mode); start a new LongrangeCache")
        self._pending = False
        return self.core.attend_positions(
            query, key, value, q_pos, q_keep, scale=scale,
            prefill=lambda q, k, v, keep: setup.engine(scale, 0.0, q, k, v, keep))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """HF's view: cache positions 0 .. seen + query_length - 1 (we store a subset of them)."""
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return 0 if self.core is None else self.core.nbytes()

    def reset(self) -> None:
        self.core, self.seen, self._pending = None, 0, False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LongrangeCache cannot be cropped: the keys that left the window are gone "
                                  "(assisted decoding needs a croppable cache such as DynamicCache)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.core is not None:
            self.core.select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.core is not None and self.core.batch_size:
            self.core.select_batch(torch.arange(self.core.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.core is not None:
            self.core.select_batch(indices)


class LongrangeCache(Cache):
    """HF `past_key_values` for models on a longrange attention backend: per layer, only the keys its
    pattern can still reach (`longrange.nn.decoding.KVCache`)."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=LongrangeCacheLayer)

    def nbytes(self) -> int:
        """Bytes held by every layer (keys, values, positions, allocated slots included)."""
        return sum(layer.nbytes() for layer in self.layers)

    def memory_tokens(self) -> int:
        """Most keys one example holds in any layer."""
        return max((layer.core.memory_tokens() for layer in self.layers if layer.core is not None), default=0)
