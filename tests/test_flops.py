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


@pytest.mark.parametrize("g", [3, 40])  # folded into the queries, or K, V projected for every token
def test_longformer_global_tokens_are_counted(g):
    n = 64
    module = lr.build_attention("longformer", dim=DIM, heads=HEADS, window=8, tile=4).eval()
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, :g] = True
    measured = counted_flops(module, torch.randn(1, n, DIM), global_mask=mask)
    assert measured == 2 * module.macs(n, global_tokens=g).total


# -- the seed text's example -------------------------------------------------------------------------------
def test_seed_example_is_one_command():
    """`longrange flops --preset bert-base-self-attention --lengths 512,1024 --format json`: per length,
    total MACs split into the Q/K/V projections (3·n·C²) and the attention products (2·n²·C)."""
    import json

    from typer.testing import CliRunner

    from longrange.cli import app

    result = CliRunner().invoke(app, ["flops", "--preset", "bert-base-self-attention", "--lengths", "512,1024",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert [r["n"] for r in rows] == [512, 1024]
    for r in rows:
        n, c = r["n"], 768
        assert r["projections"] == 3 * n * c * c
        assert r["attention_products"] == 2 * n * n * c
        assert r["macs"] == r["projections"] + r["attention_products"] and r["flops"] == 2 * r["macs"]
    # the layer-hook figures of the seed text: 906 MMac and 1.81 GMac; the true counts are 1.31 and 3.42
    assert [round(r["projections"] / 1e6) for r in rows] == [906, 1812]
    assert [round(r["macs"] / 1e7) / 100 for r in rows] == [1.31, 3.42]


def test_counters_side_by_side_show_what_hooks_miss():
    from longrange.analysis.flops import compare_counters

    for row in compare_counters(lengths=(64,), dim=32, heads=2, hf=True):
        n, c = 64, 32
        assert row["linear_hooks"] == 3 * n * c * c == row["analytic_projections"]
        assert row["flop_counter"] == row["linear_hooks"], "the fused CPU SDPA kernel is invisible to it"
        assert row["flop_counter_math_sdpa"] == row["analytic"] == 3 * n * c * c + 2 * n * n * c
        if row["ptflops"] is not None:
            assert row["ptflops"] >= row["linear_hooks"]


def test_saved_activations_grow_linearly_for_sparse_and_fused_layers():
    from longrange.analysis.flops import saved_activation_bytes

    for name, opts in (("full", {}), ("local", {"window": 16}), ("bigbird", {"block_size": 8}),
                       ("linformer", {"seq_len": 1024, "k": 16})):
        small, big = (saved_activation_bytes(lr.build_attention(name, dim=DIM, heads=HEADS, **opts), n, DIM)
                      for n in (512, 1024))
        assert 1.6 < big / small < 2.4, (name, small, big)


def test_flops_command_table_plot_and_csv(tmp_path):
    from typer.testing import CliRunner

    from longrange.cli import app

    png = tmp_path / "macs.png"
    runner = CliRunner()
    result = runner.invoke(app, ["flops", "-m", "full,bigbird,nystrom", "-n", "256,512", "--dim", "32", "--heads",
                                 "2", "--opt", "bigbird.block_size=16", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "bigbird" in result.output and "attention products" in result.output
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (800, 500)
    result = runner.invoke(app, ["flops", "-m", "local", "-n", "128", "--dim", "32", "--heads", "2", "--format",
                                 "csv"])
    header = result.output.splitlines()[0]
    assert result.exit_code == 0 and header.startswith("activation_bytes,feed_forward,head,layer_macs,mechanism,n")


def test_flops_command_bad_settings_name_the_option():
    from typer.testing import CliRunner

    from longrange.cli import app

    runner = CliRunner()
    for args, needle in ((["--preset", "bert-huge"], "unknown preset"), (["-m", "nope"], "unknown mechanism"),
                         (["--format", "xml"], "format must be"), (["--opt", "bigbird.block_size=0"], "block_size"),
                         (["--dim", "30", "--heads", "4"], "must divide")):
        result = runner.invoke(app, ["flops", "-n", "64", *args])
        assert result.exit_code == 2 and needle in result.output, (args, result.output)


def test_feed_forward_is_counted_beside_attention():
    from longrange.analysis.flops import flop_rows

    (row,) = flop_rows(["full"], [64], dim=32, heads=2, ffn_dim=128)
    assert row.feed_forward == 2 * 64 * 32 * 128
    assert row.to_dict()["layer_macs"] == row.macs.total + row.feed_forward


@pytest.mark.parametrize("head", [None, "classification", "masked_lm", "token_classification", "question_answering"])
def test_whole_model_count_equals_flop_counter(tmp_path, head):
    """`longrange flops --model FOLDER`: per layer its own attention (layer_options honoured), the
    FFN and the head; equal to what FlopCounterMode sees in the Encoder's forward."""
    import json

    from typer.testing import CliRunner

    from longrange.cli import app
    from longrange.models import Encoder, ModelConfig

    config = ModelConfig(vocab_size=50, dim=DIM, heads=HEADS, layers=3, ffn_dim=32, max_length=128,
                         attention="local", attention_options={"tile": 4},
                         layer_options=[{"window": 8}, {"window": 16}, {"attention": "bigbird"}], head=head,
                         global_cls=False)  # per-example global tokens are not part of the count
    Encoder(config).save_pretrained(tmp_path / "ckpt")
    n = 40
    result = CliRunner().invoke(app, ["flops", "--model", str(tmp_path / "ckpt"), "-n", str(n), "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["rows"]
    model = Encoder.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(1, 50, (1, n)))
    assert 2 * row["layer_macs"] == counter.get_total_flops()
    assert row["feed_forward"] == 3 * 2 * n * DIM * 32
    assert row["mechanism"] == "3 layers: bigbird, local"


def test_model_count_errors_name_the_option(tmp_path):
    from typer.testing import CliRunner

    from longrange.cli import app

    result = CliRunner().invoke(app, ["flops", "--model", str(tmp_path / "missing"), "-n", "64"])
    assert result.exit_code == 2 and "--model" in result.output
