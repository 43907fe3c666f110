"""Nothing lost, nothing silent (issue 18), on the command line and the training loops: Ctrl-C sent
to real `lra train` / `lm train` processes (saved, resumable, exit 130), checkpoints and --resume
for `lm train`, non-finite losses stopped, zero counts and unwritable outputs refused before any
work, full disks (monkeypatched fsync; a real tiny tmpfs where this machine allows one) leaving no
half-written file, damaged run files named, a progress bar and an honest summary for `lra generate`,
an estimate of a run's time and memory, `bench --keep-going`, busy points marked and left out of
the slopes. Library-side checks are in tests/test_safety.py.

File-system faults: the tests may run as root, where chmod does not stop writes; read-only folders
are then simulated by making `tempfile.mkstemp` (every write of ours starts there) refuse them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import longrange
import longrange.lra as lra
from longrange.cli import app
from longrange.lra.tasks import TASKS, LRADataset
from longrange.lra.train import TrainConfig, train
from longrange.models import CausalLM
from longrange.models.memory import byte_lm_config, train_segments

runner = CliRunner()
SRC = str(Path(longrange.__file__).resolve().parents[1])
TEXT = ("the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs. " * 40)
LM_SMALL = ["--segment", "16", "--mem-len", "16", "--batch-size", "4", "--dim", "16", "--heads", "2", "--layers",
            "1", "--ffn-dim", "32", "--threads", "1"]
#: a hang guard for the subprocess tests (never a speed claim): far beyond what they take
HANG_GUARD_S = 600


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def fake_split(task, split, data_dir=None, *, max_length=None, length=24, **options):
    spec = TASKS[task]
    n = {"train": 32, "val": 8, "test": 8}[split]
    rng = np.random.default_rng({"train": 0, "val": 1, "test": 2}[split])
    symbols = [rng.integers(0, spec.vocab_size - 2, size=length).astype(np.uint8) for _ in range(n)]
    labels = [int(s[0]) % spec.num_classes for s in symbols]
    return LRADataset(spec, symbols, labels, max_length=length + 1, synthetic=True, split=split)


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(lra, "load_split", fake_split)


def lra_args(out, *extra):
    return ["lra", "train", "--preset", "tiny", "--batch-size", "8", "--eval-every", "2", "--log-every", "1",
            "--no-progress", "--no-tensorboard", "--threads", "1", "--out", str(out), *extra]


@contextlib.contextmanager
def read_only(folder: Path, monkeypatch):
    """`folder` refuses new files: chmod 0555 when that binds (not root), else mkstemp refuses it."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    yield


def full_disk_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def start_cli(args, cwd) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "longrange.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, proc: subprocess.Popen) -> None:
    """Poll until condition() (the run has started working), failing if the process ends first."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (rc {proc.returncode}) before it was interrupted:\n{out}\n{err}")
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)


def interrupt(proc: subprocess.Popen) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the process did not stop after SIGINT")
    return proc.returncode, out, err


def checkpoint_step(path: Path, key=("state", "step")) -> int:
    data = torch.load(path, weights_only=True)
    for k in key:
        data = data[k]
    return data


# -- 2. Ctrl-C: saved, resumable, exit 130 -----------------------------------------------------------------------
def test_ctrl_c_in_lra_train_saves_prints_the_resume_command_and_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(lra_args(out, "--steps", "100000", "--data-opt", "variant=short", "--checkpoint-every",
                              "1000"), tmp_path)
    metrics = out / "metrics.csv"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)  # 2 steps logged
    rc, _, err = interrupt(proc)
    assert rc == 130, err
    m = re.search(r"interrupted at step (\d+) of 100000; checkpoint saved in (\S+); continue with: "
                  r"longrange lra train --resume --out (\S+)", err)
    assert m, err
    step = int(m.group(1))
    assert step >= 2 and Path(m.group(3)) == out
    assert checkpoint_step(out / "checkpoint" / "trainer.pt") == step  # saved at the step it names
    assert "Traceback" not in err
    summary = train(TrainConfig(out=str(out), resume=True, steps=step + 1, progress=False, tensorboard=False))
    assert summary["steps"] == step + 1


def test_ctrl_c_in_lm_train_saves_and_resume_continues(tmp_path):
    path, out = corpus(tmp_path), tmp_path / "lm"
    proc = start_cli(["lm", "train", str(path), "--out", str(out), "--steps", "1000000", "--checkpoint-every", "2",
                      "--eval-bytes", "0", *LM_SMALL], tmp_path)
    trainer = out / "checkpoint" / "trainer.pt"
    wait_for(trainer.is_file, proc)
    rc, _, err = interrupt(proc)
    assert rc == 130, err
    m = re.search(r"interrupted at step (\d+) of 1000000; checkpoint saved in (\S+); continue with: "
                  r"(longrange lm train .* --resume --steps 1000000)", err)
    assert m, err
    step = int(m.group(1))
    assert checkpoint_step(trainer, ("step",)) == step and "Traceback" not in err
    r = runner.invoke(app, ["lm", "train", str(path), "--out", str(out), "--resume", "--steps", str(step + 2),
                            "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert checkpoint_step(trainer, ("step",)) == step + 2
    assert CausalLM.from_pretrained(out).config.max_length == 16


def test_lm_training_resumed_from_its_checkpoint_is_bit_identical(tmp_path):
    tokens = torch.tensor(list(TEXT.encode()))

    def model(seed):
        torch.manual_seed(seed)
        return CausalLM(byte_lm_config("compressive", dim=16, heads=2, layers=1, ffn_dim=32, segment=16, mem_len=16,
                                       options={"cmem_len": 8, "compression_rate": 2}))

    kw = dict(segment_len=16, batch_size=4, lr=3e-3)
    straight = model(0)
    losses = train_segments(straight, tokens, steps=12, **kw)
    cut = model(0)
    train_segments(cut, tokens, steps=5, checkpoint=tmp_path / "ck", checkpoint_every=2, **kw)
    resumed = model(1)  # other weights: all of them must come from the checkpoint
    again = train_segments(resumed, tokens, steps=12, checkpoint=tmp_path / "ck", resume=True, **kw)
    assert again == losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"trainer.pt was written with segment_len=16, this run has segment_len=8"):
        train_segments(model(0), tokens, steps=14, checkpoint=tmp_path / "ck", resume=True,
                       **{**kw, "segment_len": 8})


# -- 3. lm train --out unwritable: before training; a failed final write keeps the weights -------------------------
def test_lm_train_refuses_an_unwritable_out_before_training(tmp_path, monkeypatch):
    path = corpus(tmp_path)
    with read_only(tmp_path / "ro", monkeypatch):
        r = runner.invoke(app, ["lm", "train", str(path), "--out", str(tmp_path / "ro" / "lm"), "--steps", "5",
                                *LM_SMALL])
    assert r.exit_code == 2 and "--out" in flat(r.output) and "not writable" in flat(r.output), r.output
    assert "bits/byte" not in r.output  # nothing was evaluated or trained
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["lm", "train", str(path), "--out", str(tmp_path / "file" / "lm"), *LM_SMALL])
    assert r.exit_code == 2 and "is not a folder" in flat(r.output)


def test_lm_train_keeps_the_weights_when_the_final_write_fails(tmp_path, monkeypatch):
    import longrange.models.checkpoint as ckpt

    path, out = corpus(tmp_path), tmp_path / "lm"
    real = ckpt.save

    def save(model, folder, overwrite=True):
        if Path(folder) == out:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        return real(model, folder, overwrite)

    monkeypatch.setattr(ckpt, "save", save)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    r = runner.invoke(app, ["lm", "train", str(path), "--out", str(out), "--steps", "3", "--eval-bytes", "0",
                            *LM_SMALL])
    assert r.exit_code == 1, r.output
    m = re.search(r"Error: could not write \S+: \S+: No space left on device; the trained weights are saved in (\S+) "
                  r"instead", flat(r.output))
    assert m, r.output
    rescued = CausalLM.from_pretrained(m.group(1))
    assert Path(m.group(1)).parent == tmp_path / "tmp" and rescued.config.max_length == 16


# -- 4. lra generate on a full disk ----------------------------------------------------------------------------------
def test_lra_generate_on_a_full_disk_leaves_no_half_written_file(tmp_path, monkeypatch):
    out = tmp_path / "lo"
    out.mkdir()
    (out / "basic_train.tsv").write_text("Source\tTarget\nold\t1\n")
    full_disk_fsync(monkeypatch)
    r = runner.invoke(app, ["lra", "generate", "listops", "--out", str(out), "--train", "30", "--val", "3",
                            "--test", "3"])
    assert r.exit_code == 1, r.output
    assert "No space left on device" in flat(r.output) and "none is half-written" in flat(r.output)
    assert sorted(p.name for p in out.iterdir()) == ["basic_train.tsv"]  # no temporary file left
    assert (out / "basic_train.tsv").read_text() == "Source\tTarget\nold\t1\n"  # the old file intact


def tiny_tmpfs_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not tiny_tmpfs_available(), reason="no user namespace to mount a tiny tmpfs in")
def test_lra_generate_into_a_real_tiny_tmpfs(tmp_path):
    """The real thing: a 200 KB tmpfs (in a private mount namespace) fills up during basic_train.tsv."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=200k tmpfs {mount} && {sys.executable} -m longrange.cli lra generate listops "
              f"--out {mount}/lo --train 300 --val 5 --test 5; echo rc=$?; ls -A {mount}/lo")
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=HANG_GUARD_S)
    assert "rc=1" in done.stdout, done.stdout + done.stderr
    assert "No space left on device" in done.stderr and "Traceback" not in done.stderr
    left = done.stdout.split("rc=1", 1)[1].split()
    assert left == [], left  # no basic_train.tsv cut mid-row, no temporary file


# -- 5. non-finite losses and weights -----------------------------------------------------------------------------
def test_lra_train_stops_on_a_non_finite_loss_and_keeps_the_last_finite_checkpoint(tmp_path, fake_data):
    out = tmp_path / "nan"
    r = runner.invoke(app, lra_args(out, "--lr", "1e6", "--steps", "40", "--checkpoint-every", "1"))
    assert r.exit_code == 1, r.output
    # the loss turns NaN, or (first) the weights after an update: either stops before anything is saved
    m = re.search(r"Error: (?:the training loss at step (\d+) is nan|the weights after step (\d+) hold NaN or inf "
                  r"\(.*\)): the run diverged and was stopped; the last checkpoint \(step (\d+), all finite\) is kept "
                  r"in (\S+)", flat(r.output))
    assert m, r.output
    step, kept = int(m.group(1) or m.group(2)), int(m.group(3))
    assert kept == step - 1 and checkpoint_step(out / "checkpoint" / "trainer.pt") == kept
    from longrange.lra.model import load_model

    model = load_model(out / "checkpoint")  # loads: every tensor finite
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert not (out / "summary.json").exists()  # no accuracy reported for a diverged run


def test_lra_resume_and_load_refuse_non_finite_weights(tmp_path, fake_data):
    from safetensors.torch import load_file, save_file

    from longrange.lra.model import load_model

    out = tmp_path / "run"
    train(TrainConfig(task="listops", preset="tiny", steps=2, batch_size=8, out=str(out), progress=False,
                      tensorboard=False, threads=1))
    weights = out / "checkpoint" / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"hold NaN or inf \({re.escape(name)}"):
        train(TrainConfig(out=str(out), resume=True, steps=4, progress=False, tensorboard=False))
    with pytest.raises(ValueError, match="allow_nonfinite=True"):
        load_model(out / "checkpoint")
    assert torch.isnan(load_model(out / "checkpoint", allow_nonfinite=True).state_dict()[name]).any()


def test_lm_training_stops_on_a_non_finite_loss(tmp_path):
    from longrange.models.training import NonFiniteLoss

    torch.manual_seed(0)
    model = CausalLM(byte_lm_config("xl", dim=16, heads=2, layers=1, ffn_dim=32, segment=16, mem_len=16))
    tokens = torch.tensor(list(TEXT.encode()))
    with pytest.raises(NonFiniteLoss, match=r"(loss at|weights after) step \d+ .*the last checkpoint \(step \d+"):
        train_segments(model, tokens, segment_len=16, batch_size=4, steps=200, lr=1e6, clip=1e12,
                       checkpoint=tmp_path / "ck", checkpoint_every=1)
    assert all(torch.isfinite(t).all() for t in CausalLM.from_pretrained(tmp_path / "ck").state_dict().values())
    path = corpus(tmp_path)
    r = runner.invoke(app, ["lm", "train", str(path), "--out", str(tmp_path / "lm"), "--lr", "1e6", "--steps", "200",
                            "--eval-bytes", "0", *LM_SMALL])
    assert r.exit_code == 1 and "the run diverged and was stopped" in flat(r.output), r.output


# -- 6. --opt bools ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "causal"), [("False", False), ("false", False), ("0", False), ("TRUE", True),
                                              ("1", True)])
def test_opt_bools_are_read_as_bools(text, causal, monkeypatch):
    from longrange.cli import options

    seen = options.key_values([f"causal={text}"], attention="full")
    assert seen == {"causal": causal}
    assert options.scoped_key_values([f"full.causal={text}"]) == {"full": {"causal": causal}}


def test_opt_bool_that_is_not_one_is_a_usage_error_naming_it(tmp_path):
    r = runner.invoke(app, ["bench", "--out", str(tmp_path), "-m", "full", "--opt", "full.causal=yes"])
    assert r.exit_code == 2 and "--opt" in flat(r.output) and "causal takes true or false" in flat(r.output)
    r = runner.invoke(app, lra_args(tmp_path / "x", "--opt", "causal=maybe"))
    assert r.exit_code == 2 and "causal takes true or false" in flat(r.output)


# -- 7 / 12. zero counts and wrong flags, before any work -----------------------------------------------------------
@pytest.mark.parametrize(("flag", "value"), [("--steps", "0"), ("--batch-size", "0"), ("--steps", "-3"),
                                             ("--eval-every", "0"), ("--checkpoint-every", "0")])
def test_lra_train_zero_or_negative_counts_name_the_flag(tmp_path, flag, value):
    out = tmp_path / "run"
    r = runner.invoke(app, lra_args(out, flag, value))
    assert r.exit_code == 2, r.output
    assert f"Invalid value for {flag}" in flat(r.output) and "must be a positive int" in flat(r.output)
    assert not out.exists()  # checked before anything is written


@pytest.mark.parametrize(("flag", "value"), [("--steps", "0"), ("--segment", "0"), ("--batch-size", "-1"),
                                             ("--lr", "0")])
def test_lm_train_bad_counts_name_the_right_flag_before_evaluating(tmp_path, flag, value):
    path = corpus(tmp_path)
    r = runner.invoke(app, ["lm", "train", str(path), "--out", str(tmp_path / "lm"), *LM_SMALL, flag, value])
    assert r.exit_code == 2 and f"Invalid value for {flag}" in flat(r.output), r.output
    assert "untrained" not in r.output and not (tmp_path / "lm").exists()


def test_bench_failed_point_exits_non_zero_unless_keep_going(tmp_path):
    args = ["bench", "-m", "full", "-n", "64,128", "--dim", "32", "--heads", "4", "--repeats", "1", "--warmup", "0",
            "--timeout", "0.01", "--no-plot"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 1, r.output
    assert "1 point(s) failed" in flat(r.output) and "--keep-going" in flat(r.output)
    points = json.loads((tmp_path / "a" / "results.json").read_text())["points"]
    assert len(points) == 1  # stopped at the failed point
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--keep-going"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "b" / "results.json").read_text())["points"]) == 2


# -- 11. damaged files and bad outputs named ---------------------------------------------------------------------
def test_resume_names_a_truncated_trainer_state_or_a_corrupt_run_json(tmp_path, fake_data):
    out = tmp_path / "run"
    assert runner.invoke(app, lra_args(out, "--steps", "2")).exit_code == 0
    trainer = out / "checkpoint" / "trainer.pt"
    good = trainer.read_bytes()
    trainer.write_bytes(good[: len(good) // 2])
    r = runner.invoke(app, lra_args(out, "--resume", "--steps", "4"))
    assert r.exit_code == 2 and f"{trainer} is unreadable" in flat(r.output), r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    trainer.write_bytes(good)
    run_json = out / "checkpoint" / "run.json"
    run_json.write_text('{"task": "listops", "steps": ')
    r = runner.invoke(app, lra_args(out, "--resume", "--steps", "4"))
    assert r.exit_code == 2 and f"{run_json} is unreadable or corrupt" in flat(r.output), r.output
    assert len(r.output.strip().splitlines()) == 1


def test_binary_garbage_as_a_listops_tsv_names_file_and_line(tmp_path):
    (tmp_path / "basic_train.tsv").write_bytes(b"Source\tTarget\n( 1 )\t1\n\x89PNG\r\n\x1a\n\xff\xfe\x00garbage\n")
    with pytest.raises(lra.LRADataError, match=r"basic_train.tsv:3: not UTF-8 text \(byte 0x89 at column 1\)"):
        lra.load_split("listops", "train", str(tmp_path))


def test_convert_from_a_truncated_source_is_one_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "src")
    weights = tmp_path / "src" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    r = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--max-length", "64"])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and str(weights) in lines[0] and lines[0].startswith("Error: could not load"), r.output
    assert not (tmp_path / "dst").exists()


def test_convert_into_an_existing_folder_keeps_its_other_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "src")
    dst = tmp_path / "dst"
    (dst / "sub").mkdir(parents=True)
    (dst / "notes.txt").write_text("mine")
    (dst / "sub" / "x").write_text("kept")
    r = runner.invoke(app, ["convert", str(tmp_path / "src"), str(dst), "--max-length", "64", "--opt", "window=8",
                            "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "sub" / "x").read_text() == "kept"
    assert (dst / "model.safetensors").is_file()


def test_bench_out_at_a_file_or_an_unwritable_folder_names_the_flag(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["bench", "--out", str(tmp_path / "file")])
    assert r.exit_code == 2 and "Invalid value for --out" in flat(r.output) and "is not a folder" in flat(r.output)
    with read_only(tmp_path / "ro", monkeypatch):
        r = runner.invoke(app, ["bench", "--out", str(tmp_path / "ro" / "b")])
        assert r.exit_code == 2 and "Invalid value for --out" in flat(r.output), r.output
        assert "not writable" in flat(r.output)
        r = runner.invoke(app, ["bench", "report", "--results", str(tmp_path), "--out", str(tmp_path / "ro")])
        assert r.exit_code == 2


# -- 13. lra generate: progress and summary ----------------------------------------------------------------------
def test_lra_generate_reports_progress_and_what_it_wrote(tmp_path):
    from longrange.lra.generate import generate

    calls = []
    generate("listops", tmp_path / "lo", train=20, val=2, test=2, progress=lambda *a: calls.append(a))
    assert calls and calls[-1][:2] == (24, 24) and "candidate trees drawn" in calls[-1][2]
    r = runner.invoke(app, ["lra", "generate", "listops", "--out", str(tmp_path / "l2"), "--train", "20", "--val",
                            "2", "--test", "2"])
    assert r.exit_code == 0, r.output
    out = flat(r.output)
    assert "basic_train.tsv (20 examples)" in out and "basic_test.tsv (2 examples)" in out
    assert "candidate trees drawn" in out
    r = runner.invoke(app, ["lra", "generate", "pathfinder", "--out", str(tmp_path / "pf"), "--train", "8"])
    assert r.exit_code == 0, r.output
    assert "wrote 10 images (5 connected, 5 not) in 1 folder(s)" in flat(r.output)


# -- 14. an estimate of the run --------------------------------------------------------------------------------------
def test_lra_train_prints_an_estimate_after_the_first_steps(tmp_path, fake_data):
    args = [a for a in lra_args(tmp_path / "run", "--steps", "5") if a != "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    m = re.search(r"estimate after 3 steps: ([\d.e+-]+) s/step -> .* for the 2 steps left \(.* for all 5; evaluation "
                  r"extra\); peak resident memory so far ([\d.]+) GiB", flat(r.output))
    assert m, r.output
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0


def test_format_duration():
    from longrange.lra.train import format_duration

    assert [format_duration(s) for s in (42, 600, 3725, 7325, 5 * 86400 + 3 * 3600)] == [
        "42 s", "10 min", "62 min", "2 h 2 min", "5 d 3 h"]


# -- 15. busy points ---------------------------------------------------------------------------------------------
def bench_points():
    base = dict(mode="fwd", dim=8, heads=2, batch=1, mem_mb=1.0, peak_mb=10.0, flops=1, error=None)
    quiet = [{**base, "mechanism": "full", "n": n, "time_ms": float(n) ** 2 / 1e3, "other_cpus": 0.0}
             for n in (256, 512, 1024)]
    noisy = {**base, "mechanism": "full", "n": 2048, "time_ms": 0.5, "other_cpus": 1.7}  # a busy, wrong time
    return quiet + [noisy]


def test_busy_points_are_left_out_of_the_slopes_unless_asked():
    from longrange.bench import report

    clean = report.slopes(bench_points())[0]
    assert clean["time_slope"] == pytest.approx(2.0) and clean["busy_left_out"] == 1 and clean["points"] == 3
    everything = report.slopes(bench_points(), include_busy=True)[0]
    assert everything["time_slope"] < 1.5 and everything["busy_left_out"] == 0


def test_busy_points_are_marked_in_the_table_the_csv_and_the_plot(tmp_path, monkeypatch):
    import csv

    import matplotlib.axes
    from rich.console import Console

    from longrange.bench import report

    points = bench_points()
    report.write_csv(tmp_path / "r.csv", points)
    with open(tmp_path / "r.csv", newline="") as f:
        assert [row["busy"] for row in csv.DictReader(f)] == ["False", "False", "False", "True"]
    console = Console(width=200, record=True)
    console.print(report.results_table({"points": points}))
    text = console.export_text()
    assert text.count("busy: others used 1.7 CPUs, not in the slopes") == 1
    calls = []
    real = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        calls.append((args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    report.plot_scaling(tmp_path / "p.png", points)
    hollow = [args for args, kw in calls if kw.get("markerfacecolor") == "none"]
    lines = [args for args, kw in calls if kw.get("label")]
    assert hollow and all(list(args[0]) == [2048] for args in hollow)  # the busy point alone, hollow
    assert all(2048 not in list(args[0]) for args in lines)  # and not in the fitted line


def test_bench_cli_takes_include_busy(tmp_path, monkeypatch):
    import longrange.bench as bench

    seen = {}

    def fake_run(settings, *args, **kwargs):
        seen["settings"] = settings
        return {"points": [], "meta": {}}

    monkeypatch.setattr(bench, "run_bench", fake_run)
    r = runner.invoke(app, ["bench", "--out", str(tmp_path), "--include-busy", "--keep-going"])
    assert r.exit_code == 0, r.output
    assert seen["settings"].include_busy and seen["settings"].keep_going
