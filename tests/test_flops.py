"""Analytic MAC counts (`module.macs(n)`) against what torch's FlopCounterMode measures, for every
registered mechanism; the seed text's BERT-base example; the `longrange flops` command."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import longrange as lr
from longrange.mechanisms import ATTENTIONS

DIM, HEADS = 16, 2  # the registry's test configs are written for 2 heads
CASES = [
    pytest.param(name, cfg, id=f"{name}-{i}")
    for name in lr.list_attentions()
    for i, cfg in enumerate(ATTENTIONS.get(name)[1].test_configs())
]


def counted_flops(module, x, **kwargs) -> int:
    """FLOPs FlopCounterMode sees in one forward. SDPA runs in its math form: the counter cannot see
    inside the fused CPU kernel (it would report only the projections)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(x, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("n", [33, 40])
@pytest.mark.parametrize(("name", "cfg"), CASES)
def test_analytic_macs_equal_counted_flops(name, cfg, n):
    torch.manual_seed(0)
    module = lr.build_attention(name, dim=DIM, heads=HEADS, **cfg).eval()
    count = module.macs(n)
    measured = counted_flops(module, torch.randn(1, n, DIM))
    expected = count.total
    if name == "full" and cfg.get("causal"):  # the math form computes all n² pairs and masks half
        expected = lr.build_attention("full", dim=DIM, heads=HEADS).macs(n).total
    if name == "nystrom" and cfg.get("pinv_iterations", 6) is None:  # the counter does not see linalg.inv
        expected -= HEADS * cfg["num_landmarks"] ** 3
    assert measured == 2 * expected, f"counted {measured} FLOPs, analytic {2 * expected}"
    assert count.projections == module.projection_macs(n) or name == "linformer"


def test_longformer_global_tokens_are_counted():
    n, g = 64, 3
    module = lr.build_attention("longformer", dim=DIM, heads=HEADS, window=8, block_size=4).eval()
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, :g] = True
    measured = counted_flops(module, torch.randn(1, n, DIM), global_mask=mask)
    assert measured == 2 * module.macs(n, global_tokens=g).total
