"""The README's Python examples run as written and say what they claim."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "the README lost its usage examples"
    scope: dict = {}
    exec(compile(blocks[0] + "\n" + blocks[1], str(README), "exec"), scope)
    assert scope["y"].shape == scope["x"].shape
    assert torch.isfinite(scope["y"]).all()
    torch.testing.assert_close(scope["out"], scope["ref"], atol=1e-4, rtol=1e-4)


def test_readme_functional_example_runs():
    """The `lr.functional` block runs on small [B, H, N, D] tensors."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if "lr.functional.lsh(" in b]
    import longrange as lr

    n = 256
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    scope = {"lr": lr, "q": q, "k": k, "v": v, "qk": q, "keep": torch.ones(1, n, dtype=torch.bool),
             "E": torch.randn(32, n) / n**0.5, "F": torch.randn(32, n) / n**0.5}
    exec(compile(block, str(README), "exec"), scope)
    assert scope["o"].shape == q.shape and torch.isfinite(scope["o"]).all()
