"""`ModelConfig`: one dataclass for every longrange model, saved as JSON beside each checkpoint.

It names the attention (any registered mechanism) and its settings, with optional per-layer
overrides (Longformer's growing window, dilation in the upper layers only, even another mechanism
for some layers). Embeddings, feed-forward and norms follow BERT so pretrained BERT/RoBERTa
weights load exactly.

    cfg = ModelConfig(vocab_size=1000, dim=64, heads=4, layers=2, ffn_dim=128, max_length=4096,
                      attention="longformer", attention_options={"window": 256},
                      layer_options=[{"window": 128}, {"window": 256}])
    ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
"""

from __future__ import annotations

import dataclasses
from typing import Any

from longrange.core.config import check_field_types, check_positive_int
from longrange.mechanisms import capabilities, config_class, list_attentions

POSITION_STYLES = ("absolute", "padding_offset", "none")  # BERT: 0..N-1; RoBERTa: cumsum(non-pad) + pad_token_id;
# none: no position embeddings (CausalLM; xl / compressive attention bring relative positions)
NORMS = ("post", "pre")  # post: BERT's LayerNorm(x + f(x)); pre: x + f(LayerNorm(x)) (needed by reversible)
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
HEADS = (None, "classification", "token_classification", "masked_lm", "question_answering")
POOLINGS = ("cls", "mean")
#: keys the model sets on every attention config itself
RESERVED_ATTENTION_KEYS = ("dim", "heads", "bias")


@dataclasses.dataclass
class ModelConfig:
    # -- sizes
    vocab_size: int = 30522
    dim: int = 768
    heads: int = 12
    layers: int = 12
    ffn_dim: int = 3072
    max_length: int = 4096  # usable positions (RoBERTa's two reserved rows come on top)
    # -- attention: a registered name, its options beside dim/heads, optional per-layer overrides
    attention: str = "longformer"
    attention_options: dict = dataclasses.field(default_factory=dict)
    layer_options: list | None = None  # one dict per layer, merged over attention_options; may set "attention"
    # -- embeddings, as BERT / RoBERTa
    position_style: str = "absolute"
    type_vocab_size: int = 2
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # -- block
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # BERT's hidden_dropout_prob: embeddings, attention output, FFN output
    activation: str = "gelu"  # exact (erf) GELU, as BERT
    norm: str = "post"
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    # -- heads (Encoder)
    head: str | None = None
    num_labels: int = 2
    pooling: str = "cls"
    classifier_dropout: float | None = None  # None: `dropout`
    global_cls: bool = True  # classification: make token 0 global when the attention has globals and none are given
    # -- memory / speed options
    pad_to_multiple_of: int | None = None  # pad inputs (masked) to a multiple, e.g. HF BigBird's block size
    gradient_checkpointing: bool = False
    ffn_chunk_size: int | None = None  # run the FFN over this many tokens at a time
    reversible: bool = False  # RevNet residuals (Reformer); needs norm="pre"
    # -- Encoder only: downsampling (Funnel-Transformer) and sparse feed-forward (Switch mixture of experts)
    funnel: tuple | None = None  # layers per block, e.g. (4, 4, 4) (the paper's B4-4-4), summing to `layers`
    funnel_stride: int = 2  # tokens per pooled token between blocks (the paper's mean pooling of 2)
    funnel_decoder_layers: int = 2  # full-length layers after upsampling, for token-level heads (the paper's 2)
    funnel_separate_cls: bool = True  # token 0 is never pooled with others (the paper's separate [CLS])
    moe_experts: int | None = None  # Switch feed-forward with this many experts; None: the dense FFN
    moe_capacity_factor: float = 1.25  # slots per expert = ⌈factor · tokens / experts⌉ (Switch's training setting)
    moe_every: int = 2  # every moe_every-th layer is a mixture (Switch: every other FFN)
    moe_aux_weight: float = 0.01  # α of the load-balancing loss in `aux_loss` (Switch's 10⁻²)
    moe_jitter: float = 0.01  # router input jitter ε in training (Switch; HF's router_jitter_noise)
    # -- EncoderDecoder (LED style: the attention above in the encoder, full attention in the decoder)
    decoder_layers: int | None = None  # None: `layers`
    decoder_max_length: int = 1024
    decoder_attention: str = "full"
    decoder_attention_options: dict = dataclasses.field(default_factory=dict)
    decoder_start_token_id: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)  # every field against its annotation (bool fields take only bools)
        self.validate()

    # -- checks ----------------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "dim", "heads", "layers", "ffn_dim", "max_length", "num_labels",
                     "decoder_max_length"):
            check_positive_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide dim={self.dim}")
        _choice("position_style", self.position_style, POSITION_STYLES)
        _choice("norm", self.norm, NORMS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("head", self.head, HEADS)
        _choice("pooling", self.pooling, POOLINGS)
        if self.reversible and self.norm != "pre":
            raise ValueError("reversible=True needs norm='pre' (a RevNet residual cannot be inverted through a "
                             "post-LayerNorm)")
        for name in ("pad_to_multiple_of", "ffn_chunk_size", "decoder_layers"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self._validate_funnel_and_moe()
        if self.layer_options is not None:
            if not isinstance(self.layer_options, (list, tuple)) or len(self.layer_options) != self.layers:
                raise ValueError(f"layer_options must be a list of {self.layers} dicts (one per layer), "
                                 f"got {self.layer_options!r}")
            self.layer_options = [dict(o or {}) for o in self.layer_options]
        for i in range(self.layers):
            self.attention_config(i)  # every layer's attention settings are valid
        self.attention_config(0, decoder=True, causal=True)  # the EncoderDecoder's decoder attention

    def _validate_funnel_and_moe(self) -> None:
        from longrange.nn.moe import check_capacity_factor

        if self.funnel is not None:
            if not isinstance(self.funnel, (list, tuple)) or not self.funnel:
                raise ValueError(f"funnel must be a list of layers per block, e.g. (4, 4, 4), got {self.funnel!r}")
            for size in self.funnel:
                check_positive_int("funnel (layers per block)", size)
            self.funnel = tuple(self.funnel)
            if sum(self.funnel) != self.layers:
                raise ValueError(f"funnel={list(self.funnel)} has {sum(self.funnel)} layers; it must sum to "
                                 f"layers={self.layers}")
            if self.reversible:
                raise ValueError("funnel cannot be used with reversible=True (pooling changes the length between "
                                 "layers; a RevNet residual needs equal lengths)")
        check_positive_int("funnel_stride", self.funnel_stride)
        if isinstance(self.funnel_decoder_layers, bool) or not isinstance(self.funnel_decoder_layers, int) \
                or self.funnel_decoder_layers < 0:
            raise ValueError(f"funnel_decoder_layers must be a non-negative int, got {self.funnel_decoder_layers!r}")
        if self.moe_experts is not None:
            check_positive_int("moe_experts", self.moe_experts)
            if self.reversible:
                raise ValueError("moe_experts cannot be used with reversible=True (a reversible stack calls the "
                                 "feed-forward without the padding mask the router needs)")
        check_capacity_factor("moe_capacity_factor", self.moe_capacity_factor)
        check_positive_int("moe_every", self.moe_every)
        for name, high in (("moe_aux_weight", None), ("moe_jitter", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or (high is not None and value >= high):
                bound = f"[0, {high})" if high is not None else ">= 0"
                raise ValueError(f"{name} must be a number {bound}, got {value!r}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer`'s feed-forward is the mixture of experts (every moe_every-th: 1, 3, .. for 2)."""
        return self.moe_experts is not None and (layer + 1) % self.moe_every == 0

    # -- what each layer gets --------------------------------------------------------------------
    def attention_spec(self, layer: int, *, decoder: bool = False) -> tuple[str, dict]:
        """(name, options beside dim/heads/bias) of `layer`'s self-attention."""
        if decoder:
            return self.decoder_attention, dict(self.decoder_attention_options)
        options = {**self.attention_options, **(self.layer_options[layer] if self.layer_options else {})}
        name = options.pop("attention", self.attention)
        return name, options

    def attention_config(self, layer: int, *, decoder: bool = False, causal: bool = False):
        """The validated attention config of `layer` (causal=True: the causal variant, or a clear error)."""

        name, options = self.attention_spec(layer, decoder=decoder)
        where = "decoder_attention_options" if decoder else f"attention options of layer {layer}"
        reserved = sorted(set(options) & set(RESERVED_ATTENTION_KEYS))
        if reserved:
            raise ValueError(f"{where}: {reserved} are set by the model (dim={self.dim}, heads={self.heads})")
        cls = config_class(name)
        if causal:
            if not capabilities(name).causal:
                raise ValueError(f"attention {name!r} has no causal variant; a causal model needs one of "
                                 f"{causal_attentions()}")
            options["causal"] = True
        try:
            return cls.from_dict({"attention": name, "dim": self.dim, "heads": self.heads, "bias": True, **options})
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None

    @property
    def position_table_size(self) -> int:
        """Rows of the position table: RoBERTa style reserves 0 .. pad_token_id on top of max_length."""
        return self.max_length + (self.pad_token_id + 1 if self.position_style == "padding_offset" else 0)

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise TypeError(f"a model config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def causal_attentions() -> list[str]:
    """Registered attentions with a causal variant."""

    return [n for n in list_attentions() if capabilities(n).causal]


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
