"""Nothing lost, nothing silent (issue 18), in the library: checkpoints that keep a folder's other
files and the user's umask, atomic writes under a full disk, non-finite weights caught on load,
config fields checked against their annotations, Global indices inside the sequence, and bad
inputs (masks, token ids, empty prompts, truncated files) as errors naming the argument or file.
The command line's side is in tests/test_safety_cli.py; the empty-input rule of every mechanism
in tests/test_mechanisms.py (`test_empty_input_gives_an_empty_output`)."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

import longrange as lr
from longrange.core.config import ConfigError
from longrange.mechanisms import config_class
from longrange.models import CausalLM, Encoder, ModelConfig

VOCAB = 50


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=16, heads=2, layers=1, ffn_dim=32, max_length=32, dropout=0.0, attention="full")
    return ModelConfig(**{**base, **changes})


def full_disk(monkeypatch, after: int = 0):
    """os.fsync raises ENOSPC from its (after + 1)-th call on: what a full disk reports for buffered writes."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- 1. save_pretrained keeps the folder's other files, writes each file atomically, uses the umask ----------------
def test_save_pretrained_keeps_other_files_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "model"
    (out / "sub").mkdir(parents=True)
    others = {"notes.txt": "my notes", "sub/data.txt": "kept", "tokenizer.json": "{}", "vocab.txt": "a\nb\n",
              "tokenizer_config.json": '{"model_max_length": 32}'}
    for name, text in others.items():
        (out / name).write_text(text)
    torch.manual_seed(0)
    first = Encoder(tiny())
    first.save_pretrained(out)
    torch.manual_seed(1)
    second = Encoder(tiny())
    second.save_pretrained(out)  # a converted model loaded and saved back to its folder
    for name, text in others.items():
        assert (out / name).read_text() == text, name
    assert listing(out) == sorted([*others, "sub", "config.json", "model.safetensors"])  # no temporary files left
    loaded = Encoder.from_pretrained(out)
    torch.testing.assert_close(loaded.embeddings.word.weight, second.embeddings.word.weight)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_saved_folders_and_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        Encoder(tiny()).save_pretrained(tmp_path / "new" / "model")
    finally:
        os.umask(old)
    for path, full in ((tmp_path / "new" / "model", 0o777), (tmp_path / "new" / "model" / "config.json", 0o666),
                       (tmp_path / "new" / "model" / "model.safetensors", 0o666)):
        assert stat.S_IMODE(path.stat().st_mode) == full & ~mask, path


def test_a_full_disk_during_save_keeps_the_old_checkpoint_and_the_other_files(tmp_path, monkeypatch):
    out = tmp_path / "model"
    torch.manual_seed(0)
    Encoder(tiny()).save_pretrained(out)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    full_disk(monkeypatch, after=1)  # the first file is flushed, the second is not
    with pytest.raises(OSError, match="No space left"):
        Encoder(tiny(layers=2)).save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert listing(tmp_path) == ["model", "model/config.json", "model/model.safetensors", "model/notes.txt"]


def test_atomic_write_under_a_full_disk_leaves_the_old_file(tmp_path, monkeypatch):
    from longrange.core.files import atomic_write_text

    path = tmp_path / "a.txt"
    path.write_text("old")
    full_disk(monkeypatch)
    with pytest.raises(OSError):
        atomic_write_text(path, "new" * 1000)
    assert path.read_text() == "old" and listing(tmp_path) == ["a.txt"]


def test_a_staged_new_folder_appears_only_when_complete(tmp_path):
    from longrange.core.files import staged_folder

    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "new") as stage:
            (stage / "half.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert listing(tmp_path) == []


def test_check_writable_names_the_folder(tmp_path, monkeypatch):
    from longrange.core.files import check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        check_writable(tmp_path / "file" / "out", "--out")
    with pytest.raises(OSError, match=r"MiB free"):
        check_writable(tmp_path / "out", "--out", need_bytes=2**62)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(OSError, match=r"--out .*/out is not writable"):
        check_writable(tmp_path / "out", "--out")
    assert not (tmp_path / "out").exists()


# -- 5. non-finite weights -------------------------------------------------------------------------------------------
def test_from_pretrained_refuses_non_finite_weights_unless_asked(tmp_path):
    model = Encoder(tiny())
    with torch.no_grad():
        model.embeddings.word.weight[3, 1] = float("nan")
        model.stack.blocks[0].ffn.fc1.bias[0] = float("inf")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"model.safetensors: 2 tensor\(s\) hold NaN or inf .*embeddings.word.weight"):
        Encoder.from_pretrained(tmp_path / "m")
    loaded = Encoder.from_pretrained(tmp_path / "m", allow_nonfinite=True)
    assert loaded.embeddings.word.weight[3, 1].isnan()


# -- 6. config fields against their annotations ----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options", "field"), [
    ("full", {"causal": "false"}, "causal"),
    ("full", {"causal": 0}, "causal"),
    ("local", {"window": 8.0}, "window"),
    ("local", {"window": True}, "window"),
    ("bigbird", {"block_size": "64"}, "block_size"),
    ("dilated", {"window": 8, "dilation": (1, "2")}, "dilation"),
    ("full", {"dim": 16.0}, "dim"),
    ("performer", {"redraw_interval": 1.5}, "redraw_interval"),
])
def test_config_fields_are_checked_against_their_annotations(name, options, field):
    with pytest.raises(ConfigError, match=rf"{field} must be") as err:
        lr.build_attention(name, **{"dim": 16, "heads": 2, **options})
    assert err.value.option == field


def test_config_types_normalise_what_fits():
    layer = lr.build_attention("dilated", dim=16, heads=2, window=8, dilation=[1, 2], dropout=0)
    assert layer.config.dilation == (1, 2) and layer.config.dropout == 0.0 and isinstance(layer.config.dropout, float)
    assert lr.build_attention("full", dim=16, heads=2, causal=False).config.causal is False
    with pytest.raises(ConfigError, match="tie_word_embeddings must be a bool"):
        tiny(tie_word_embeddings="false")
    with pytest.raises(ConfigError, match="vocab_size must be an int"):
        tiny(vocab_size=50.0)
    with pytest.raises(ConfigError, match="bos_token_id must be an int or None"):
        tiny(bos_token_id="1")


@pytest.mark.parametrize(("text", "value"), [("false", False), ("False", False), ("FALSE", False), ("0", False),
                                             (0, False), ("true", True), ("True", True), (1, True), ("1", True)])
def test_command_line_bools_are_read_in_any_case(text, value):
    from longrange.core.config import bools_from_text

    assert bools_from_text(config_class("full"), {"causal": text}) == {"causal": value}


@pytest.mark.parametrize("text", ["yes", "no", "2", 2, "f", [True]])
def test_command_line_bools_reject_anything_else_naming_the_key(text):
    from longrange.core.config import bools_from_text

    with pytest.raises(ConfigError, match=r"causal takes true or false") as err:
        bools_from_text(config_class("full"), {"causal": text}, "options")
    assert err.value.option == "options"


# -- 11. bad input as errors naming the argument or the file ---------------------------------------------------------
def test_reference_attention_names_a_mask_of_the_wrong_shape():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"mask must broadcast to \[B, H, N, M\] = \[1, 2, 4, 4\], got \[3, 4\]"):
        lr.reference_attention(q, q, q, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"k and v must be"):
        lr.reference_attention(q, q, q[..., :4])
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        lr.reference_attention(q, q, q, torch.ones(4, 4))
    assert (lr.reference_attention(q, q[:, :, :0], q[:, :, :0]) == 0).all()  # no keys: zeros


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 10, -1])
def test_token_ids_outside_the_vocabulary_are_named(bad):
    ids = torch.tensor([[1, 2, bad]])
    for model in (Encoder(tiny()), CausalLM(tiny())):
        with pytest.raises(ValueError, match=rf"token id {bad}, outside the vocabulary \[0, {VOCAB}\)"):
            model(ids)


def test_generate_with_an_empty_prompt_is_named():
    for lm in (CausalLM(tiny()), CausalLM(tiny(attention="xl", attention_options={"mem_len": 8},
                                               position_style="none"))):
        with pytest.raises(ValueError, match=r"input_ids: generate needs a prompt of at least one token"):
            lm.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=3)


@pytest.mark.parametrize("keep", [10, 200])
def test_a_truncated_safetensors_file_is_named(tmp_path, keep):
    Encoder(tiny()).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file .*truncated or corrupt"):
        Encoder.from_pretrained(tmp_path / "m")


# -- 8. Global indices -------------------------------------------------------------------------------------------------
def test_global_index_outside_the_sequence_is_an_error_through_a_mechanism_too():
    from longrange.patterns import Global, Window

    q = torch.randn(1, 1, 64, 4)
    with pytest.raises(ValueError, match=r"Global: index 100 is outside a sequence of n=64 tokens"):
        lr.sparse_attention(q, q, q, Window(2) | Global([100]), tile=8)
    # BigBird's own global blocks are "the first and last block": shorter inputs are all global
    layer = lr.build_attention("bigbird", dim=16, heads=2, block_size=16)
    assert layer(torch.randn(1, 5, 16)).shape == (1, 5, 16)
