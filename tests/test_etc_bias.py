"""ETC's relative bias on the engine (mechanisms/etc.py `RelativeBias`): the structured `add_to` /
`masked_into` (step pattern, band scatter, CROSS columns) equal the straightforward per-pair gather
up to a constant per query row, which the softmax ignores; and the layer is exact either way."""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from conftest import assert_close
from longrange.mechanisms.etc import RelativeBias
from longrange.patterns import Window
from longrange.sparse.bias import rows_of


@pytest.mark.parametrize(("radius", "k", "tile", "g"), [(8, 3, 4, 0), (8, 3, 4, 5), (6, 2, 2, 1), (16, 4, 8, 2),
                                                        (5, 1, 4, 3)])
def test_structured_bias_equals_the_gather_up_to_a_row_constant(radius, k, tile, g):
    n, B, H = 37, 2, 3
    gen = torch.Generator().manual_seed(radius + k)
    qa = torch.randn(B, H, n, 2 * k + 2, generator=gen, dtype=torch.float64)
    bias = RelativeBias(qa, k, g)
    layout = lr.compile_layout(Window(radius), n, tile)
    b, nb = layout.tile, layout.num_blocks
    offs = torch.arange(b)
    q_tok = (torch.arange(nb) * b)[:, None] + offs  # every query block as one group
    kv_tok = (layout.kv_index[:, :, :, None] * b + offs).flatten(2)
    rows = rows_of(bias.inputs, 0, nb * b, nb)
    assert bias.band_geometry(q_tok, kv_tok) is not None, "the structured path applies to engine chunks"
    want = bias(q_tok, kv_tok, *rows).expand(B, nb, H, b, -1)
    got = torch.zeros_like(want)
    bias.add_to(got, q_tok, kv_tok, *rows)
    valid = torch.cat([layout.valid[0, :, :, None].expand(nb, -1, b).flatten(1), torch.ones(nb, g, dtype=torch.bool)],
                      1)  # (nb, c + g): slots in use (unused ones repeat a block and are masked)
    diff = (got - want).masked_fill(~valid[None, :, None, None, :], float("nan"))
    row_const = diff.nanmean(-1, keepdim=True)
    torch.testing.assert_close(torch.where(diff.isnan(), row_const, diff), row_const.expand_as(diff))
    mask = torch.rand(1, nb, 1, b, want.shape[-1], generator=gen) > 0.3
    into = torch.empty_like(want)
    bias.masked_into(into, mask, q_tok, kv_tok, *rows)
    assert torch.equal(into.isinf(), (~mask).expand_as(into))
    torch.testing.assert_close(into[mask.expand_as(into)], got[mask.expand_as(got)])


def test_layer_matches_its_reference_with_and_without_the_structured_bias(monkeypatch):
    """The whole layer (global tokens, padding) against `reference_forward`, then with the
    structured path switched off: the same outputs and gradients."""
    torch.manual_seed(0)
    module = lr.build_attention("etc", dim=16, heads=2, radius=8, max_distance=3, tile=4).double()
    x = torch.randn(2, 45, 16, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 45, dtype=torch.bool)
    keep[1, -9:] = False
    out = module(x, attention_mask=keep, num_global=5)
    assert_close(out, module.reference_forward(x, attention_mask=keep, num_global=5))
    grads = torch.autograd.grad(out.sum(), [x, module.relative.weight])
    monkeypatch.setattr(RelativeBias, "band_geometry", lambda self, q, kv: None)
    plain = module(x, attention_mask=keep, num_global=5)
    assert_close(out, plain)
    for a, b in zip(grads, torch.autograd.grad(plain.sum(), [x, module.relative.weight]), strict=True):
        assert_close(a, b)


def test_interior_groups_take_the_strided_diagonal_and_agree_with_the_scatter(monkeypatch):
    n, B, H, k, tile, radius, g = 64, 2, 2, 3, 8, 8, 2
    qa = torch.randn(B, H, n, 2 * k + 2, dtype=torch.float64)
    bias = RelativeBias(qa, k, g)
    layout = lr.compile_layout(Window(radius), n, tile)
    offs = torch.arange(tile)
    interior = torch.arange(2, 6)  # query blocks whose neighbours sit in the adjacent slots
    q_tok = (interior * tile)[:, None] + offs
    kv_tok = (layout.kv_index[:, interior, :, None] * tile + offs).flatten(2)
    rows = [t[:, interior] for t in rows_of(bias.inputs, 0, n, n // tile)]
    assert bias.band_geometry(q_tok, kv_tok)[3] is not None
    shape = (B, len(interior), H, tile, kv_tok.shape[-1] + g)
    strided = torch.randn(shape, dtype=torch.float64)
    scattered = strided.clone()
    bias.add_to(strided, q_tok, kv_tok, *rows)
    geometry = RelativeBias.band_geometry
    monkeypatch.setattr(RelativeBias, "band_geometry", lambda self, q, kv: (*geometry(self, q, kv)[:3], None))
    bias.add_to(scattered, q_tok, kv_tok, *rows)
    torch.testing.assert_close(strided, scattered)
