"""What a bench point measures: mechanism names, their bench presets, `--opt` parsing, analytic FLOPs.

A mechanism is either one of ours (any name in `longrange.list_attentions()`, built with
`build_attention(name, dim=..., heads=..., **options)`) or a peer from another library run through
the same harness (`hf-longformer`, `hf-bigbird`; see `longrange.bench.peers`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from longrange.core.config import ConfigError
from longrange.mechanisms import (
    backends,
    build_attention,
    capabilities,
    config_class,
    list_attentions,
    options_for_length,
)

#: peers: name -> (package that must be importable, our mechanism with the same pattern)
PEERS: dict[str, tuple[str, str]] = {
    "hf-longformer": ("transformers", "longformer"),
    "hf-bigbird": ("transformers", "bigbird"),
    "lucid-performer": ("performer_pytorch", "performer"),
    "lucid-linformer": ("linformer", "linformer"),
    "lucid-reformer": ("reformer_pytorch", "reformer"),
    "lucid-nystrom": ("nystrom_attention", "nystrom"),
    "lucid-routing": ("routing_transformer", "routing"),
    "lucid-sinkhorn": ("sinkhorn_transformer", "sinkhorn"),
    "lucid-axial": ("axial_attention", "axial"),
    "lucid-isab": ("isab_pytorch", "inducing"),
}
#: pip requirement that brings each peer's package
PEER_PIP = {"transformers": "longrange[hf]", "performer_pytorch": "performer-pytorch", "linformer": "linformer",
            "reformer_pytorch": "reformer-pytorch", "nystrom_attention": "nystrom-attention",
            "routing_transformer": "routing-transformer", "sinkhorn_transformer": "sinkhorn-transformer",
            "axial_attention": "axial-attention", "isab_pytorch": "isab-pytorch"}
#: options a peer accepts (its pattern knobs); dim and heads come from the bench settings. A peer runs
#: with our mechanism's settings for these knobs (its config defaults, the bench's, then --opt).
PEER_OPTION_KEYS: dict[str, tuple[str, ...]] = {
    "hf-longformer": ("window",),
    "hf-bigbird": ("block_size", "num_random_blocks", "seed"),
    "lucid-performer": ("nb_features", "causal"),
    "lucid-linformer": ("seq_len", "k"),
    "lucid-reformer": ("bucket_size", "n_hashes", "causal"),
    "lucid-nystrom": ("num_landmarks", "pinv_iterations", "conv_kernel"),
    "lucid-routing": ("num_clusters", "cluster_size", "seq_len", "routed_heads", "window", "ema_decay", "causal"),
    "lucid-sinkhorn": ("block_size", "sinkhorn_iters", "temperature", "causal"),
    "lucid-axial": ("shape",),
    "lucid-isab": ("num_inducing",),
}
#: where the bench sets a mechanism (and its peer) differently from the mechanism's config defaults,
#: which hold every other setting (`--opt` overrides both)
BENCH_OPTIONS: dict[str, dict[str, Any]] = {
    "etc": {"radius": 256},  # long→long window as local's 512; --global-tokens g makes the first g tokens global
    "nystrom": {"num_landmarks": 256, "conv_kernel": 33},  # nystrom-attention's usual settings, as its peer
    "routing": {"num_clusters": None, "cluster_size": 512},  # fixed clusters of 512 (enwik8-8K's), n / 512 of them
    # the linear-time setting of memory-compressed attention (blocks of 768 = 256 slots of 3 tokens: as
    # many keys per query as the paper's 256-token local blocks); synthesizer runs its default dense form
    "memory_compressed": {"block_size": 768},
}
#: our mechanism -> the peer with the same pattern (ratios "vs peer")
PEER_OF = {ours: peer for peer, (_, ours) in PEERS.items()}


def known_mechanisms() -> list[str]:
    return list_attentions() + list(PEERS)


def is_peer(name: str) -> bool:
    return name in PEERS


def split_backend(name: str) -> tuple[str, str | None]:
    """"bigbird@flex" -> ("bigbird", "flex"): a mechanism on a block layout pinned to one backend
    (`--backend engine,flex` runs each such mechanism once per backend); "bigbird" -> ("bigbird", None)."""
    base, _, backend = name.partition("@")
    return base, (backend or None)


def with_backends(names: tuple[str, ...], chosen: tuple[str, ...] | None) -> tuple[str, ...]:
    """Each mechanism that runs a block layout once per backend of `chosen` (name@backend); the others,
    peers included, once. chosen None: every name as given (the config's backend, "auto")."""
    if not chosen:
        return names
    out = []
    for name in names:
        base, pinned = split_backend(name)
        out.extend([f"{base}@{b}" for b in chosen] if pinned is None and not is_peer(base) and backends(base)
                   else [name])
    return tuple(dict.fromkeys(out))


def check_mechanism(name: str) -> None:
    base, backend = split_backend(name)
    if base not in known_mechanisms():
        raise ConfigError(
            f"unknown mechanism {base!r}; registered attentions: {', '.join(list_attentions())}; "
            f"peers: {', '.join(PEERS)}",
            "mechanisms",
        )
    if backend is not None and (is_peer(base) or backend not in ("auto", *backends(base))):
        runs = backends(base) if not is_peer(base) else ()
        raise ConfigError(f"{name}: {base} runs on {', '.join(runs) if runs else 'its own kernel only'} "
                          "(name@backend pins a mechanism on a block layout to engine, flex or auto)", "mechanisms")


def peer_missing(name: str) -> str | None:
    """Why a peer cannot run here (its package is not installed), or None when it can."""
    if not is_peer(name):
        return None
    package = PEERS[name][0]
    if importlib.util.find_spec(package) is None:
        return f"{name} skipped: {package} is not installed (pip install '{PEER_PIP[package]}', or 'longrange[peers]')"
    return None


# -- options ---------------------------------------------------------------------------------------
def ours(name: str) -> str:
    """The registered mechanism behind `name` (itself without an @backend, or the one a peer shares
    its pattern with)."""
    base = split_backend(name)[0]
    return PEERS[base][1] if is_peer(base) else base


def mechanism_options(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bench's settings for `name` (BENCH_OPTIONS of its mechanism; name@backend: that backend)
    with `overrides` on top."""
    backend = split_backend(name)[1]
    return {**BENCH_OPTIONS.get(ours(name), {}), **({"backend": backend} if backend else {}), **(overrides or {})}


def point_options(name: str, n: int, options: dict[str, Any]) -> dict[str, Any]:
    """The options a point at length n builds with: the mechanism's length options (Linformer's
    seq_len) filled with n unless set; for a peer, every knob it takes, from our mechanism's config."""
    base = ours(name)
    options = options_for_length(base, options, n)
    if is_peer(name):
        resolved = {**config_class(base).option_defaults(), **options}
        return {k: v for k, v in resolved.items() if k in PEER_OPTION_KEYS[name]}
    return options


def takes_global_tokens(name: str) -> bool:
    """Whether the bench gives `name` its --global-tokens (mechanisms whose global tokens are part of
    their graph: Longformer, ETC; and their peers)."""
    return capabilities(ours(name)).global_tokens is not None


def validate_options(name: str, options: dict[str, Any], dim: int, heads: int) -> None:
    """Raise ConfigError naming the problem (unknown key, bad value) before any point runs."""
    check_mechanism(name)
    for reserved in ("dim", "heads"):
        if reserved in options:
            raise ConfigError(f"{name}: set {reserved} for the whole sweep ({reserved}=...), not as one mechanism's "
                              "option", "options")
    if is_peer(name):
        known = PEER_OPTION_KEYS[name]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for {name}; known: {list(known)}", "options")
        validate_options(PEERS[name][1], options, dim, heads)  # same pattern knobs as ours, same rules
        return
    try:
        config_class(ours(name)).from_dict({"dim": dim, "heads": heads, **options})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad options for {name}: {e}", "options") from e


# -- analytic FLOPs --------------------------------------------------------------------------------
def layer_flops(
    name: str,
    n: int,
    dim: int,
    heads: int,
    options: dict[str, Any] | None = None,
    global_tokens: int = 0,
    *,
    batch: int = 1,
    module=None,
    dense_fallback: bool = False,
) -> dict[str, int]:
    """Forward FLOPs of one attention layer (multiply-add = 2 FLOPs), batch `batch`, from the
    module's own count (`module.macs(n)`, see `longrange.core.flops`): what the module computes on
    its path (whole blocks of the layout, landmarks, compressed rows), not the pattern's bare edges.
    Peers are credited with the work of our module with the same settings (`dense_fallback`: HF
    BigBird switched to full attention). Returns {'proj', 'attn', 'pairs', 'total'}.
    """
    base, options = ours(name), dict(options or {})  # a peer's knobs are our mechanism's options
    if dense_fallback:
        base, options = "full", {}
    if module is None or is_peer(name) or dense_fallback:

        module = build_attention(base, dim=dim, heads=heads, **point_options(base, n, options))
    count = module.macs(n, global_tokens=global_tokens if takes_global_tokens(base) else 0)
    return {"proj": 2 * batch * count.projections, "attn": 2 * batch * count.attention,
            "pairs": batch * count.pairs, "total": 2 * batch * count.total}
