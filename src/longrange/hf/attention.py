"""Load HF transformers attention modules into longrange modules with the same weights.

    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
    ours = lr.hf.attention_from_hf(hf_layer.attention.self, output=hf_layer.attention.output.dense)

What maps to what (HF -> longrange, weights copied, never shared):

- `LongformerSelfAttention` (or its `LongformerAttention` wrapper) -> `longformer` with
  `window = config.attention_window[layer_id]` (two-sided in both libraries). `qkv` = [query; key;
  value], `qkv_global` = [query_global; key_global; value_global]. HF's global tokens
  (`is_index_global_attn`, i.e. mask value > 0) are our `global_mask`, HF's padding
  (`is_index_masked`, mask value < 0) is our `attention_mask == False`.
- `BigBirdBlockSparseAttention` (or a `BigBirdAttention` wrapper in "block_sparse" mode) ->
  `bigbird` ITC with HF's fixed geometry (3-block window, first and last block global) and its
  `block_size`, `num_random_blocks`, `seed` (the layer index in HF models; 0 when unset).
  `random_in_eval="none"` by default: HF draws no random blocks in eval mode (see the caveat below).
- `BigBirdSelfAttention` (a `BigBirdAttention` wrapper in "original_full" mode, the mode HF's
  model switches to for short inputs) -> `full` (`causal=config.is_decoder`: HF applies the
  decoder's causal mask at the model level, we apply it in the module).

The output projection is not part of HF's self-attention modules: it is the `dense` Linear of the
`...SelfOutput` that follows (dense -> dropout -> LayerNorm(x + residual)). `output=None` sets our
`out` to the identity (weight I, bias 0), so our module returns exactly HF's context layer;
passing HF's `SelfOutput.dense` copies it, so ours returns `dense(context)` (the residual and the
LayerNorm stay outside the attention module, as in every longrange model).

Bias: our config has one `bias` flag for `qkv` and `out`. When HF has a bias on either side
(BigBird's `use_bias=False` with a biased `SelfOutput.dense`), we use `bias=True` and set the
missing biases to zero: the same function, though those zeros are then trainable.

Known differences, none of them in the copied weights:

- Dropout on attention probabilities is not applied by longrange (HF applies
  `attention_probs_dropout_prob` in train mode); the rate is carried in `config.dropout` only.
- HF BigBird in eval mode does not drop its random blocks: it points all of them at block 0, so
  for the non-global query blocks the first (global) block enters the softmax 1 + r times.
  Parity with our `random_in_eval="none"` is exact for `num_random_blocks=0`; with r > 0 HF's
  eval output up-weights block 0. In train mode the layouts are equal once HF's draw is replaced
  by ours (`aligned_random_blocks`).
- HF BigBird pads inputs to a multiple of `block_size` and makes the padded last *block* global;
  our bigbird on an unpadded length makes the last `block_size` *tokens* global. Pad as HF does
  (`attention_mask=False` on the padding) for identical graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from longrange.core.interface import Attention
from longrange.mechanisms import BigBirdAttention, build_attention

INSTALL_HINT = "pip install longrange[hf]"


def _import_hf():
    """(modeling_longformer, modeling_big_bird), imported on first use: transformers is optional."""
    try:
        from transformers.models.big_bird import modeling_big_bird
        from transformers.models.longformer import modeling_longformer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"longrange.hf needs the optional dependency `transformers`: {INSTALL_HINT} ({err})") from err
    return modeling_longformer, modeling_big_bird


def attention_from_hf(module: nn.Module, output: nn.Linear | None = None, *, random_in_eval: str = "none") -> Attention:
    """A longrange attention module with the weights and settings of an HF attention module.

    module: `LongformerSelfAttention` / `LongformerAttention`, `BigBirdBlockSparseAttention` /
        `BigBirdSelfAttention` / `BigBirdAttention` (the wrapper is unwrapped via `.self`).
    output: HF's `SelfOutput.dense` Linear(C, C) to copy into our `out`; None makes `out` the
        identity, so `ours(x, ...)` equals HF's context layer (before dense, LayerNorm, residual).
    random_in_eval: BigBird only, our eval-mode policy for random blocks; "none" mirrors HF's
        switching them off in eval, "same" keeps the seeded training draw.

    The result has `module`'s dtype and device, and the same train/eval mode. Weights are copied.

        ours = attention_from_hf(hf_bigbird_attention, output=hf_bigbird_attention.output.dense)
        y = ours(x, attention_mask=keep)  # x [B, N, C], keep [B, N] bool (True = real token)
    """
    hf_longformer, hf_bigbird = _import_hf()
    wrappers = (hf_longformer.LongformerAttention, hf_bigbird.BigBirdAttention)
    inner = module.self if isinstance(module, wrappers) else module
    if output is not None and not isinstance(output, nn.Linear):
        raise TypeError(f"output must be HF's SelfOutput.dense nn.Linear or None, got {type(output).__name__}")

    if isinstance(inner, hf_longformer.LongformerSelfAttention):
        has_bias = _any_bias(inner.query, inner.key, inner.value, inner.query_global, output)
        ours = build_attention(
            "longformer",
            dim=inner.embed_dim,
            heads=inner.num_heads,
            window=2 * inner.one_sided_attn_window_size,
            dropout=float(inner.dropout),
            bias=has_bias,
        )
        _copy_fused(ours.qkv_global, (inner.query_global, inner.key_global, inner.value_global))
    elif isinstance(inner, hf_bigbird.BigBirdBlockSparseAttention):
        has_bias = _any_bias(inner.query, inner.key, inner.value, output)
        ours = build_attention(
            "bigbird",
            dim=inner.all_head_size,
            heads=inner.num_attention_heads,
            block_size=inner.block_size,
            num_random_blocks=inner.num_random_blocks,
            window_blocks=3,
            global_blocks_first=1,
            global_blocks_last=1,
            seed=inner.seed if isinstance(inner.seed, int) else 0,
            random_in_eval=random_in_eval,
            bias=has_bias,
        )
    elif isinstance(inner, hf_bigbird.BigBirdSelfAttention):
        has_bias = _any_bias(inner.query, inner.key, inner.value, output)
        ours = build_attention(
            "full",
            dim=inner.all_head_size,
            heads=inner.num_attention_heads,
            causal=bool(inner.is_decoder),
            dropout=float(inner.dropout.p),
            bias=has_bias,
        )
    else:
        supported = "LongformerSelfAttention, LongformerAttention, BigBirdBlockSparseAttention, "
        supported += "BigBirdSelfAttention, BigBirdAttention"
        name = f"{type(module).__module__}.{type(module).__qualname__}"
        raise TypeError(f"attention_from_hf does not support {name}; supported HF modules: {supported}")

    _copy_fused(ours.qkv, (inner.query, inner.key, inner.value))
    _copy_output(ours.out, output)
    weight = inner.query.weight
    return ours.to(device=weight.device, dtype=weight.dtype).train(inner.training)


def _any_bias(*linears: nn.Linear | None) -> bool:
    return any(lin is not None and lin.bias is not None for lin in linears)


@torch.no_grad()
def _copy_fused(fused: nn.Linear, parts: tuple[nn.Linear, ...]) -> None:
    """fused Linear(C, k·C) <- k Linear(C, C) stacked by output rows (q, then k, then v)."""
    c = fused.in_features
    for i, part in enumerate(parts):
        if tuple(part.weight.shape) != (c, c):
            raise ValueError(f"expected a Linear({c}, {c}) projection, got weight {list(part.weight.shape)}")
        fused.weight[i * c : (i + 1) * c].copy_(part.weight)
        if fused.bias is not None:
            fused.bias[i * c : (i + 1) * c].copy_(part.bias if part.bias is not None else 0.0)


@torch.no_grad()
def _copy_output(out: nn.Linear, output: nn.Linear | None) -> None:
    if output is None:
        out.weight.copy_(torch.eye(out.in_features))
        if out.bias is not None:
            out.bias.zero_()
        return
    if tuple(output.weight.shape) != tuple(out.weight.shape):
        raise ValueError(
            f"output must be Linear({out.in_features}, {out.out_features}), got {list(output.weight.shape)}"
        )
    out.weight.copy_(output.weight)
    if out.bias is not None:
        out.bias.copy_(output.bias if output.bias is not None else 0.0)


@contextlib.contextmanager
def aligned_random_blocks(hf_module: nn.Module, ours: Attention) -> Iterator[None]:
    """Within the block, HF BigBird draws our random blocks instead of its numpy ones (train mode).

    How: HF draws its random key blocks with the global numpy RNG in
    `_bigbird_block_rand_mask_with_head` (any length but 1024/3072/4096; returns, per head, an
    int array [nb - 2, r] of key-block ids for query blocks 1 .. nb - 2) or, per head,
    `_bigbird_block_rand_mask` (lengths 1024/3072/4096, sliced to nb - 2 rows). Both are replaced,
    on this HF module instance only, by functions returning rows 1 .. nb - 2 of our
    `ours.random_blocks.table(n)` ([H, nb, r]) in that format; a forward pre-hook records n. Our
    draw excludes the window and the global blocks, as HF's does, so no key block is counted
    twice; HF's extra rule (block 1 never draws block nb - 2, and back) does not affect the maths.
    HF still calls `np.random.seed(seed)` in train mode. HF calls the same functions in eval mode
    (where they return all-zero ids), so inside this block HF's eval uses our draw as well: compare
    it with our `random_in_eval="same"`.
    """
    _, hf_bigbird = _import_hf()
    hf = hf_module.self if isinstance(hf_module, hf_bigbird.BigBirdAttention) else hf_module
    if not isinstance(hf, hf_bigbird.BigBirdBlockSparseAttention):
        raise TypeError(f"aligned_random_blocks needs HF's BigBirdBlockSparseAttention, got {type(hf).__name__}")
    if not isinstance(ours, BigBirdAttention) or ours.config.num_random_blocks != hf.num_random_blocks:
        raise ValueError(
            f"ours must be a longrange bigbird with the HF module's num_random_blocks={hf.num_random_blocks}, "
            f"got {type(ours).__name__}"
        )
    state = {"n": None, "head": 0}

    def rows(n: int):  # [H, nb - 2, r] int32 numpy, HF's layout
        ours.current_pattern()  # builds (or rebuilds, after a redraw) `ours.random_blocks`
        table = ours.random_blocks.table(n)[:, 1:-1]
        if table.shape[-1] != hf.num_random_blocks or bool((table < 0).any()):
            raise ValueError(f"length {n} is too short for {hf.num_random_blocks} random blocks per query block")
        return table.numpy().astype("int32")

    def with_head(from_seq_length, num_heads, **_):
        return list(rows(from_seq_length)[:num_heads])

    def per_head(*_, **__):
        table = rows(state["n"])
        head, state["head"] = state["head"], (state["head"] + 1) % table.shape[0]
        return table[head]

    def record_length(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        state["n"], state["head"] = hidden.shape[1], 0

    hook = hf.register_forward_pre_hook(record_length, with_kwargs=True)
    hf._bigbird_block_rand_mask_with_head = with_head
    hf._bigbird_block_rand_mask = per_head
    try:
        yield
    finally:
        hook.remove()
        del hf._bigbird_block_rand_mask_with_head, hf._bigbird_block_rand_mask
