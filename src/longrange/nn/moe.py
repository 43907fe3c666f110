"""Switch-style mixture-of-experts feed-forward (Fedus et al. 2022, "Switch Transformers", §2.1-2.2):
top-1 routing, a capacity per expert, the load-balancing loss.

    p = softmax(x W_r)                        [T, E] router probabilities, in float32 (Switch's
                                              "selective precision")
    e = argmax p,  g = p[e]                   each token's expert and gate value
    y = g · FFN_e(x)                          for the first `capacity` tokens of each expert, in order
    y = 0                                     for dropped tokens and padding: the block's residual
                                              passes them through unchanged
    capacity = ⌈capacity_factor · T / E⌉      T = real (unpadded) tokens of the batch
    aux = E · Σ_i f_i · P_i                   f_i = share of tokens whose argmax is expert i,
                                              P_i = mean router probability of expert i (real tokens)

The capacity and the first-come order are over the whole batch (flattened [B·N], example-major):
as in Switch, routing is batch-level, so other examples can take an expert's slots; padding never
takes a slot and never enters f or P. In training the router input is jittered multiplicatively by
U(1 - ε, 1 + ε) (Switch's ε = `jitter`), drawn from the global RNG like dropout: `torch.manual_seed`
makes routing reproducible and gradient checkpointing replays it; eval mode routes without noise.

The experts run as one batched matmul over an [E, capacity, C] dispatch buffer (no loop over
experts): E·capacity·C·F·2 MACs, ≈ capacity_factor times a dense FFN's. The last forward's `aux`
is kept in `aux_loss` (with its graph) for the model to collect.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from longrange.core.config import check_positive_int
from longrange.nn.feedforward import ACTIVATIONS


@dataclasses.dataclass
class Routing:
    """One batch's routing of T flattened tokens."""

    expert: torch.Tensor  # [T] long: argmax expert
    gate: torch.Tensor  # [T] float32: its router probability
    position: torch.Tensor  # [T] long: arrival order at that expert (0-based)
    kept: torch.Tensor  # [T] bool: real and within capacity
    capacity: int
    aux: torch.Tensor  # scalar: E · Σ f_i · P_i


class SwitchFeedForward(nn.Module):
    """x [B, N, C] (+ attention_mask [B, N], True = real) -> [B, N, C]; zero rows for dropped tokens."""

    takes_mask = True  # the block passes its attention_mask (padding takes no capacity)

    def __init__(self, dim: int, hidden: int, experts: int, capacity_factor: float = 1.25, activation: str = "gelu",
                 jitter: float = 0.01):
        super().__init__()
        check_positive_int("experts", experts)
        check_capacity_factor("capacity_factor", capacity_factor)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        self.experts, self.capacity_factor, self.activation, self.jitter = experts, capacity_factor, activation, jitter
        self.router = nn.Linear(dim, experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(experts, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(experts, dim))
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Every weight ~ N(0, std), biases 0 (BERT's init, expert by expert)."""
        for w in (self.router.weight, self.w1, self.w2):
            w.normal_(0.0, std)
        self.b1.zero_()
        self.b2.zero_()

    def capacity(self, tokens: int) -> int:
        """Slots per expert for `tokens` real tokens: ⌈capacity_factor · tokens / E⌉ (Switch's formula)."""
        return math.ceil(self.capacity_factor * tokens / self.experts)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        flat = x.reshape(b * n, c)
        real = None if attention_mask is None else attention_mask.reshape(b * n)
        routing = self.route(flat, real)
        self.aux_loss = routing.aux
        return self.dispatch(flat, routing).view(b, n, c)

    def route(self, flat: torch.Tensor, real: torch.Tensor | None = None) -> Routing:
        """Top-1 routing of flat [T, C] tokens (real [T] bool or None)."""
        t, e = flat.shape[0], self.experts
        inputs = flat.float()
        if self.training and self.jitter > 0:
            inputs = inputs * torch.empty_like(inputs).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        probs = torch.softmax(F.linear(inputs, self.router.weight.float()), dim=-1)  # (T, E) float32
        gate, expert = probs.max(dim=-1)
        real = torch.ones(t, dtype=torch.bool, device=flat.device) if real is None else real
        chosen = F.one_hot(expert, e) * real[:, None]  # (T, E) int: real tokens' choices
        position = (chosen.cumsum(dim=0) - 1).gather(1, expert[:, None]).squeeze(1)  # arrival order at its expert
        count = int(real.sum())
        capacity = self.capacity(count)
        share = chosen.sum(dim=0).float() / max(count, 1)  # f_i
        mean_prob = (probs * real[:, None]).sum(dim=0) / max(count, 1)  # P_i
        aux = e * (share * mean_prob).sum()
        return Routing(expert, gate, position, real & (position < capacity), capacity, aux)

    def dispatch(self, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Kept tokens into [E, capacity, C] slots, the experts as two batched matmuls, results
        scaled by the gate and put back; every other row is zero. [T, C] -> [T, C]."""
        t, c = flat.shape
        e, cap = self.experts, routing.capacity
        idx = routing.kept.nonzero().squeeze(1)  # (K,)
        slot = routing.expert[idx] * cap + routing.position[idx]  # (K,)
        buffer = flat.new_zeros(e * cap, c).index_copy(0, slot, flat[idx]).view(e, cap, c)
        hidden = ACTIVATIONS[self.activation](torch.baddbmm(self.b1[:, None], buffer, self.w1))  # (E, cap, F)
        out = torch.baddbmm(self.b2[:, None], hidden, self.w2).view(e * cap, c)  # (E·cap, C)
        y = out[slot] * routing.gate[idx, None].to(flat.dtype)
        return flat.new_zeros(t, c).index_copy(0, idx, y)


def check_capacity_factor(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number (slots per expert = ⌈{name} · tokens / experts⌉), "
                         f"got {value!r}")
