"""What one attention layer computes, counted in multiply-accumulates (MACs; 1 MAC = 2 FLOPs).

Every mechanism module answers `module.macs(n)` for one example of length n with a `MacCount`, so
the count follows the path the module actually takes (its block layout, its landmarks, its
feature count). Layer-hook counters see only the `nn.Linear` layers (`projections`); the products
between activations (`scores`, `weighted`, `other`) are what they miss, and for full attention
those are the quadratic part.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class MacCount:
    """MACs of one forward pass, batch 1, by kind."""

    projections: int = 0  # the layer's own linear maps: Q, K, V (and global Q/K/V) and output
    scores: int = 0  # query·key products: QKᵀ over the computed pairs, or its analogue
    weighted: int = 0  # weights·values products: P·V, or its analogue
    other: int = 0  # other products between activations: compression, features, pseudo-inverse, conv
    exps: int = 0  # exponentials (softmax or feature maps): elementwise, reported, not in `total`
    pairs: int = 0  # (query, key) pairs scored, all heads; 0 where attention is not pairwise

    @property
    def attention(self) -> int:
        """MACs of the products between activations: what a layer-hook counter misses."""
        return self.scores + self.weighted + self.other

    @property
    def total(self) -> int:
        return self.projections + self.attention

    def scaled(self, factor: int) -> MacCount:
        return MacCount(**{f.name: getattr(self, f.name) * factor for f in dataclasses.fields(self)})

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "attention": self.attention, "total": self.total}


def pairwise(pairs: int, head_dim: int, projections: int, other: int = 0) -> MacCount:
    """Softmax attention over `pairs` (query, key) pairs: QKᵀ and PV cost D MACs per pair each."""
    return MacCount(projections=projections, scores=pairs * head_dim, weighted=pairs * head_dim, other=other,
                    exps=pairs, pairs=pairs)
