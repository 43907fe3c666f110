"""Every Python block of README.md and docs/*.md runs as written, page by page in order (one namespace
per page, in a fresh working folder), and says what it claims. A block may opt out only with a
`<!-- no-run: reason -->` line right above it."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(<!-- no-run: (?P<why>[^>]*) -->\n)?```python\n(?P<code>.*?)```", re.S)
#: README.md's size limit: what it is, the two commands, a quick start, the tables, the links
README_BYTES = 10_000


def python_blocks(page: pathlib.Path) -> list[str]:
    return [m["code"] for m in FENCE.finditer(page.read_text()) if m["why"] is None]


# -- what a page needs before it runs (files a reader would have) ---------------------------------------------
def _tiny_bert_folder(tmp_path: pathlib.Path) -> dict:
    """docs/hf.md converts "path/to/bert": a tiny random BERT saved there (nothing is downloaded)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "path" / "to" / "bert")
    return {}


def _released_listops(tmp_path: pathlib.Path) -> dict:
    """docs/lra.md reads "lra_release/listops-1000": files our generator writes in the released format."""
    from longrange.lra.generate import generate

    generate("listops", tmp_path / "lra_release" / "listops-1000", train=20, val=10, test=10, seed=0,
             min_length=5, max_length=60)
    return {"torch": torch}


SETUP = {"hf.md": _tiny_bert_folder, "lra.md": _released_listops}


# -- what each page claims -----------------------------------------------------------------------------------
def _readme(scope):
    assert scope["y"].shape == scope["x"].shape and torch.isfinite(scope["y"]).all()
    torch.testing.assert_close(scope["out"], scope["ref"], atol=1e-4, rtol=1e-4)


def _patterns(scope):
    torch.testing.assert_close(scope["out"], scope["ref"], atol=1e-4, rtol=1e-4)


def _mechanisms(scope):
    assert scope["y"].shape == scope["x"].shape and torch.isfinite(scope["y"]).all()
    assert scope["longformer"].capabilities.inputs == ("global_mask",)
    assert scope["o"].shape == scope["q"].shape and torch.isfinite(scope["o"]).all()


def _models(scope):
    assert scope["out"].logits.shape == (2, 3) and torch.isfinite(scope["out"].loss)
    assert (scope["tagger"].config.head, scope["tagger"].config.num_labels) == ("token_classification", 5)
    assert scope["new"].shape == (1, 70)
    assert scope["summary"].shape[0] == 2 and scope["summary"].shape[1] <= 17
    assert scope["tokens"].shape == (1, 84) and scope["cache"].memory_tokens() == 8 + 4 and scope["cache"].nbytes() > 0


def _hf(scope):
    assert scope["long"].config.max_length == 4096 and (pathlib.Path("bert-long") / "config.json").is_file()
    assert scope["ours"] is not None
    assert scope["out"].shape[0] == 2 and scope["cache"].memory_tokens() == 32 + 4


def _structure(scope):
    assert scope["out"].aux_loss is not None and torch.isfinite(scope["out"].aux_loss)
    assert all(m.shape[1] <= 64 for m in scope["state"].mem)
    assert 0 < scope["ppl"].bits_per_token < 20


def _analysis(scope):
    assert (scope["s"].hops, scope["s"].radius, scope["s"].connected_within(2)) == (2, 1, True)
    assert pathlib.Path("longformer.png").is_file()
    advice = scope["advice"]
    assert advice.choice is not None and advice.choice.memory_mb <= 1024
    assert "performer" in {c.mechanism for c in advice.candidates if c.ruled_out}


def _survey(scope):
    assert scope["y"].shape == scope["x"].shape and torch.isfinite(scope["y"]).all()
    assert scope["out"].last_hidden_state.shape == (2, 300, 64) and torch.isfinite(scope["loss"])
    assert scope["out"].aux_loss is not None and float(scope["out"].aux_loss) > 0


def _lra(scope):
    assert len(scope["val"]) == 10
    assert scope["batch"]["input_ids"].shape[0] == 32 and scope["batch"]["attention_mask"].dtype == torch.bool


def _applications(scope):
    assert scope["summary"]["val_loss"] < scope["summary"]["initial_val_loss"] - 1.0
    assert scope["inputs"].shape == scope["ids"].shape and torch.isfinite(scope["loss"])
    assert (scope["labels"][scope["ids"] == scope["tok"].cls_id] == -100).all()
    assert set(scope["result"]["test"]) == {"exact_match", "f1", "examples"} and scope["info"]["task"] == "qa"


def _distributed(scope):
    import torch.distributed as dist

    assert not dist.is_initialized(), "the page's example leaves no process group behind"
    torch.testing.assert_close(scope["y"], scope["attn"](scope["x"]), atol=1e-5, rtol=1e-5)
    assert scope["cp"].bytes_sent == 0  # one rank: nothing to send


CHECKS = {"README.md": _readme, "distributed.md": _distributed, "applications.md": _applications,
          "patterns-and-engine.md": _patterns, "mechanisms.md": _mechanisms, "models.md": _models, "hf.md": _hf,
          "memory-and-structure.md": _structure, "analysis.md": _analysis, "lra.md": _lra, "survey.md": _survey}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_runs_and_says_what_it_claims(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope = SETUP.get(page.name, lambda _: {})(tmp_path)
    blocks = python_blocks(page)
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.relative_to(ROOT)} (python block {i + 1})", "exec"), scope)
    if blocks:
        assert page.name in CHECKS, f"{page.name} has Python blocks but no check in tests/test_docs.py"
        CHECKS[page.name](scope)


def test_every_page_is_linked_from_the_readme_and_short_enough():
    text = README.read_text()
    assert len(README.read_bytes()) <= README_BYTES, f"README.md is {len(README.read_bytes())} bytes"
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def test_opted_out_blocks_say_why():
    for page in PAGES:
        for m in FENCE.finditer(page.read_text()):
            assert m["why"] is None or m["why"].strip(), f"{page.name}: a no-run block without a reason"


def test_linked_files_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_no_page_keeps_a_placeholder():
    """Measured figures are pasted in, never left as a FILLED_LATER-style token."""
    token = re.compile(r"\b[A-Z][A-Z0-9]*_(?:TABLE|SECTION|LINE|FIGURES?)\b")
    for page in PAGES:
        found = token.findall(page.read_text())
        assert not found, f"{page.name} still holds {found}"
