"""Every registered mechanism, one file per family, and the registry that names them."""

from __future__ import annotations

from longrange.core.interface import Capabilities
from longrange.core.registry import Registry
from longrange.mechanisms.axial import AxialAttention, AxialConfig
from longrange.mechanisms.bigbird import BigBirdAttention, BigBirdConfig
from longrange.mechanisms.dilated import DilatedAttention, DilatedConfig
from longrange.mechanisms.etc import ETCAttention, ETCConfig
from longrange.mechanisms.full import FullAttention, FullConfig
from longrange.mechanisms.inducing import InducingAttention, InducingConfig
from longrange.mechanisms.linear import LinearAttention, LinearConfig
from longrange.mechanisms.linformer import LinformerAttention, LinformerConfig
from longrange.mechanisms.local import LocalAttention, LocalConfig
from longrange.mechanisms.longformer import LongformerAttention, LongformerConfig
from longrange.mechanisms.memory import CompressiveAttention, CompressiveConfig, XLAttention, XLConfig
from longrange.mechanisms.memory_compressed import MemoryCompressedAttention, MemoryCompressedConfig
from longrange.mechanisms.nystrom import NystromAttention, NystromConfig
from longrange.mechanisms.performer import PerformerAttention, PerformerConfig
from longrange.mechanisms.reformer import ReformerAttention, ReformerConfig
from longrange.mechanisms.routing import RoutingAttention, RoutingConfig
from longrange.mechanisms.sinkhorn import SinkhornAttention, SinkhornConfig
from longrange.mechanisms.sparse_transformer import SparseTransformerAttention, SparseTransformerConfig
from longrange.mechanisms.synthesizer import SynthesizerAttention, SynthesizerConfig

ATTENTIONS = Registry("attention")
for _config, _module in (
    (FullConfig, FullAttention),
    (LinformerConfig, LinformerAttention),
    (NystromConfig, NystromAttention),
    (PerformerConfig, PerformerAttention),
    (ReformerConfig, ReformerAttention),
    (LinearConfig, LinearAttention),
    (LocalConfig, LocalAttention),
    (DilatedConfig, DilatedAttention),
    (LongformerConfig, LongformerAttention),
    (BigBirdConfig, BigBirdAttention),
    (SparseTransformerConfig, SparseTransformerAttention),
    (ETCConfig, ETCAttention),
    (XLConfig, XLAttention),
    (CompressiveConfig, CompressiveAttention),
    # the survey's other families (docs/survey.md)
    (RoutingConfig, RoutingAttention),
    (SinkhornConfig, SinkhornAttention),
    (AxialConfig, AxialAttention),
    (InducingConfig, InducingAttention),
    (SynthesizerConfig, SynthesizerAttention),
    (MemoryCompressedConfig, MemoryCompressedAttention),
):
    ATTENTIONS.add(_config, _module)


def list_attentions() -> list[str]:
    """Names accepted by `build_attention`."""
    return ATTENTIONS.names()


def build_attention(name: str, **options):
    """Build a mechanism by name: `build_attention("bigbird", dim=768, heads=12, block_size=64)`.
    Unknown option names are a TypeError naming them."""
    return ATTENTIONS.build(name, **options)


def config_class(name: str):
    return ATTENTIONS.get(name)[0]


def capabilities(name: str) -> Capabilities:
    """What the mechanism `name` supports (declared on its class)."""
    return ATTENTIONS.get(name)[1].capabilities


def backends(name: str) -> tuple[str, ...]:
    """The backends that can run `name`'s layout: ("engine", "flex") for the mechanisms on a block
    layout (their config's `backend`: "auto" chooses, `longrange.sparse.backends`); () for those with
    a kernel of their own."""
    return ("engine", "flex") if "backend" in ATTENTIONS.get(name)[0].option_defaults() else ()


def options_for_length(name: str, options: dict, n: int) -> dict:
    """`options` with the mechanism's length options (`Capabilities.length_options`, e.g. Linformer's
    seq_len) set to n where they are not given."""
    missing = {key: n for key in capabilities(name).length_options if options.get(key) is None}
    return {**options, **missing}


__all__ = [
    "ATTENTIONS", "BigBirdAttention", "DilatedAttention", "FullAttention", "LinearAttention", "LinformerAttention",
    "LocalAttention", "LongformerAttention", "NystromAttention", "PerformerAttention", "ReformerAttention",
    "SparseTransformerAttention", "build_attention", "capabilities", "config_class", "list_attentions",
    "options_for_length", "backends",
    "CompressiveAttention", "XLAttention",
    "ETCAttention",
    "AxialAttention", "RoutingAttention", "SinkhornAttention",
    "InducingAttention", "MemoryCompressedAttention", "SynthesizerAttention",
]
