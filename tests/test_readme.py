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
