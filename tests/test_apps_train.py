"""longrange.apps, the runs: pretraining lowers held-out MLM loss (bytes, DNA, ETC + CPC, from a converted
BERT), resume after SIGKILL is bit-identical, two DDP processes train as one, every fine-tuning head runs,
saves and loads, and the command line names its flags in errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from typer.testing import CliRunner

from longrange.apps import ETCEncoderDecoder, FinetuneConfig, evaluate_task, finetune, load_finetuned
from longrange.apps.finetune import load_task_data
from longrange.apps.pretrain import PretrainConfig, pretrain
from longrange.cli import app
from longrange.core.config import ConfigError
from longrange.models import Encoder, ETCEncoder
from workers import finish_worker, rendezvous, start_worker


def corpus(tmp_path, sentences=400, seed=0):
    """A small learnable text: sentences of words from a 30-word vocabulary, '.'-terminated."""
    rng = np.random.default_rng(seed)
    words = [f"w{'abcdefghij'[i % 10]}{'xyz'[i // 10]}" for i in range(30)]
    text = " ".join(" ".join(rng.choice(words, size=int(rng.integers(4, 9)))) + "." for _ in range(sentences))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def tiny(tmp_path, name, **kw) -> PretrainConfig:
    base = dict(data=[str(corpus(tmp_path))], out=str(tmp_path / name), max_length=64, dim=32, heads=2, layers=2,
                ffn_dim=64, steps=6, batch_size=4, lr=2e-3, eval_every=3, log_every=2, eval_batches=2,
                progress=False, threads=1, attention="bigbird", options={"block_size": 8})
    return PretrainConfig(**{**base, **kw})


def model_weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def test_pretraining_lowers_held_out_mlm_loss(tmp_path):
    summary = pretrain(tiny(tmp_path, "pt", steps=40, masking="word"))
    assert summary["val_loss"] < summary["initial_val_loss"] - 1.0, summary
    run = tmp_path / "pt"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,split,loss,mlm_loss,mlm_accuracy,cpc_loss,lr" and rows[1].startswith("0,val,")
    enc = Encoder.from_pretrained(run / "model")
    assert enc.config.head == "masked_lm" and json.loads((run / "model" / "longrange.app.json").read_text())[
        "kind"] == "pretrained"
    speed = (run / "speed.csv").read_text().splitlines()
    assert speed[0] == "step,seconds,tokens_per_s,peak_memory_mb" and float(speed[-1].split(",")[2]) > 0


def test_etc_with_cpc_and_dna(tmp_path):
    summary = pretrain(tiny(tmp_path, "etc", structure="sentences", cpc=True, cpc_fraction=0.3, masking="span",
                            attention=None, options={"radius": 8, "max_distance": 4}, steps=4, batch_size=4,
                            max_length=128))
    assert summary["model"] == "ETCEncoder" and summary["cpc"] and summary["val_cpc_loss"] is not None
    rows = [r.split(",") for r in (tmp_path / "etc" / "metrics.csv").read_text().splitlines()[1:]]
    cpc = [float(r[5]) for r in rows if r[1] == "train"]
    assert cpc and all(np.isfinite(cpc)) and all(c > 0 for c in cpc)
    assert isinstance(ETCEncoder.from_pretrained(tmp_path / "etc" / "model"), ETCEncoder)
    fasta = tmp_path / "g.fa"
    rng = np.random.default_rng(0)
    fasta.write_text("".join(f">chr{i}\n" + "".join(rng.choice(list("ACGT"), 300)) + "\n" for i in range(6)))
    dna = pretrain(PretrainConfig(data=[str(fasta)], out=str(tmp_path / "dna"), tokenizer="dna:k=3,overlap",
                                  max_length=64, dim=32, heads=2, layers=1, ffn_dim=64, steps=3, batch_size=4,
                                  structure="sentences", cpc=True, block=16, options={"radius": 8},
                                  progress=False, threads=1))
    assert dna["tokenizer"].startswith("dna overlapping 3-mers") and np.isfinite(dna["val_loss"])


def test_gradient_checkpointing_trains_the_same_and_bf16_autocast_runs(tmp_path):
    pretrain(tiny(tmp_path, "plain", steps=2, dropout=0.0))
    pretrain(tiny(tmp_path, "ckpt", steps=2, dropout=0.0, gradient_checkpointing=True))
    a, b = model_weights(tmp_path / "plain"), model_weights(tmp_path / "ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    summary = pretrain(tiny(tmp_path, "bf16", steps=2, amp=True))
    assert np.isfinite(summary["val_loss"])


def test_config_errors_name_the_option(tmp_path):
    for kw, option in (({"cpc": True}, "cpc"), ({"structure": "sentences", "attention": "bigbird"}, "attention"),
                       ({"masking": "sentence"}, "masking"), ({"steps": 0}, "steps")):
        with pytest.raises(ConfigError) as err:
            pretrain(tiny(tmp_path, f"bad-{option}", **kw))
        assert err.value.option == option
    with pytest.raises(ConfigError, match="resume: no checkpoint"):
        pretrain(tiny(tmp_path, "nothing", resume=True))


_KILLED = """
import json, os, signal, sys
from longrange.apps.pretrain import PretrainConfig, pretrain

def kill(step, metrics):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler: a real kill

pretrain(PretrainConfig(**json.loads(sys.argv[1])), on_step=kill)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """ETC + CPC + span masking + dropout: a process SIGKILLed at step 5 (checkpoint at 4) and resumed in a
    fresh call ends with the same parameters, bit for bit, and the same metrics.csv as a run never stopped."""
    kw = tiny(tmp_path, "straight", structure="sentences", cpc=True, cpc_fraction=0.3, masking="span",
              attention="etc", options={"radius": 8, "max_distance": 4}, steps=7, checkpoint_every=2,
              eval_every=3, log_every=3, dropout=0.1, max_length=96).to_dict()
    pretrain(PretrainConfig(**kw))
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _KILLED, json.dumps({**kw, "out": str(killed)})],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(killed / "checkpoint" / "trainer.pt", weights_only=True)["state"]["step"] == 4
    pretrain(PretrainConfig(out=str(killed), resume=True, progress=False, threads=1))
    a, b = model_weights(tmp_path / "straight"), model_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (killed / "metrics.csv").read_text()


def _ddp_worker(rank: int, world: int, init_method: str, kw: dict) -> None:
    torch.set_num_threads(1)
    start_worker(rank, world, init_method, Path(kw["out"]).parent)
    try:
        pretrain(PretrainConfig(**kw))
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_worker()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """The masks are a function of (seed, step, example): 2 processes × 2 examples train as 1 × 4."""
    kw = tiny(tmp_path, "one", steps=3, dropout=0.0, masking="word").to_dict()
    pretrain(PretrainConfig(**kw))
    mp.spawn(_ddp_worker, args=(2, rendezvous(), {**kw, "out": str(tmp_path / "two")}), nprocs=2,
             join=True)
    a, b = model_weights(tmp_path / "one"), model_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


def test_pretrain_from_a_converted_bert(tmp_path):
    """`longrange convert` output (tokenizer files included) is a valid --init: its vocabulary and MLM head are used."""
    transformers = pytest.importorskip("transformers")
    from longrange.hf import convert_to_long

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "."] + [f"w{c}" for c in "abcdefghij"] + \
        [f"##{c}" for c in "xyz"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    src = tmp_path / "bert"
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"), model_max_length=32).save_pretrained(src)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32)).save_pretrained(src)
    convert_to_long(src, attention="bigbird", max_length=128, output_dir=tmp_path / "long", block_size=8)
    summary = pretrain(PretrainConfig(data=[str(corpus(tmp_path, 100))], init=str(tmp_path / "long"),
                                      out=str(tmp_path / "pt"), max_length=128, steps=3, batch_size=2, progress=False,
                                      threads=1))
    assert summary["tokenizer"].startswith("hf BertTokenizer") and summary["attention"] == "bigbird"
    assert np.isfinite(summary["val_loss"]) and (tmp_path / "pt" / "model" / "tokenizer_config.json").is_file()
    with pytest.raises(ConfigError, match="position table"):
        pretrain(PretrainConfig(data=[str(corpus(tmp_path, 100))], init=str(tmp_path / "long"),
                                out=str(tmp_path / "pt2"), max_length=256, steps=1, progress=False))


# -- fine-tuning --------------------------------------------------------------------------------------------------
FT = dict(length=128, size=(16, 8, 8), steps=2, batch_size=4, dim=32, heads=2, layers=1, ffn_dim=64, progress=False,
          threads=1)


@pytest.mark.parametrize("data, attention, structure", [
    ("dna-motif", "bigbird", "none"), ("long-qa", "longformer", "none"), ("long-qa", "etc", "sentences"),
    ("dna-tags", "linformer", "none"), ("spread-summary", "bigbird", "none"), ("spread-summary", "etc", "sentences"),
    ("dna-motif", "etc", "sentences")])
def test_every_head_fine_tunes_saves_and_loads(tmp_path, data, attention, structure):
    options = {"bigbird": {"block_size": 16}, "longformer": {"window": 16}, "etc": {"radius": 8},
               "linformer": {"k": 16}}[attention]
    config = FinetuneConfig(data=data, attention=attention, options=options, structure=structure,
                            out=str(tmp_path / "ft"), **FT)
    summary = finetune(config)
    metric = summary["metric"]
    assert 0.0 <= summary["test"][metric] <= 1.0 and summary["synthetic"]
    model, tok, info = load_finetuned(tmp_path / "ft")
    assert info["task"] == summary["task"] and info["structure"] == structure
    if data == "spread-summary" and structure == "sentences":
        assert isinstance(model, ETCEncoderDecoder)
    examples = load_task_data(config).splits["test"]
    again = evaluate_task(model, examples, summary["task"], tok, summary["max_length"], block=config.block)
    assert again == summary["test"], "the saved model scores what the trained one scored"


def test_full_attention_reads_only_max_length(tmp_path):
    """A QA answer beyond the cut cannot be matched: with max_length 16 on 128-token inputs every answer is out."""
    summary = finetune(FinetuneConfig(data="long-qa", attention="full", max_length=16, **FT))
    assert summary["max_length"] == 16 and summary["test"]["exact_match"] == 0.0


def test_finetune_from_pretrained_and_jsonl(tmp_path):
    pretrain(tiny(tmp_path, "pt", steps=2, max_length=64))
    rows = [{"text": f"{'good ' * (i % 3 + 1)}day", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = finetune(FinetuneConfig(task="classify", data=str(tmp_path / "cls.jsonl"), init=str(tmp_path / "pt" / "model"),
                                steps=2, batch_size=4, progress=False, threads=1))
    assert s["test"]["examples"] == 2 and s["attention"] == "bigbird" and not s["synthetic"]
    qa = [{"question": "who?", "context": f"filler text. the answer is bob{i}. more", "answer": f"bob{i}",
           "answer_start": len("filler text. the answer is ")} for i in range(10)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa) + "\n")
    data = load_task_data(FinetuneConfig(task="qa", data=str(tmp_path / "qa.jsonl")))
    ex = data.splits["train"][0]
    assert data.tokenizer.decode(ex["input_ids"][ex["start"]:ex["end"] + 1]) == "bob0"
    words = load_task_data(FinetuneConfig(data="long-qa", length=96, size="tiny"))
    as_bytes = load_task_data(FinetuneConfig(data="long-qa", length=96, size="tiny", tokenizer="byte"))
    for w, b in zip(words.splits["test"], as_bytes.splits["test"], strict=True):  # the same answers, in bytes
        assert as_bytes.tokenizer.decode(b["input_ids"][b["start"]:b["end"] + 1]) == \
            words.tokenizer.decode(w["input_ids"][w["start"]:w["end"] + 1])
    tags = [{"tokens": ["a", "bb", "c"], "tags": ["O", "X", "O"]}] * 10
    (tmp_path / "tags.jsonl").write_text("\n".join(json.dumps(r) for r in tags) + "\n")
    data = load_task_data(FinetuneConfig(task="tokens", data=str(tmp_path / "tags.jsonl")))
    ex = data.splits["train"][0]
    assert [(data.tokenizer.decode([t]), y) for t, y in zip(ex["input_ids"], ex["labels"], strict=True) if y >= 0] \
        == [("a", 0), ("b", 1), ("c", 0)]
    s = finetune(FinetuneConfig(task="summarize", data=str(_summaries(tmp_path)), init=str(tmp_path / "pt" / "model"),
                                steps=1, batch_size=2, progress=False, threads=1))
    assert 0.0 <= s["test"]["rouge_l"] <= 1.0


def _summaries(tmp_path):
    folder = tmp_path / "sum"
    folder.mkdir()
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        rows = [json.dumps({"text": f"long text {i}. end.", "summary": f"t{i}"}) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


# -- command line -------------------------------------------------------------------------------------------------
def test_cli_pretrain_finetune_and_errors(tmp_path):
    runner = CliRunner()
    text = corpus(tmp_path)
    r = runner.invoke(app, ["pretrain", str(text), "--out", str(tmp_path / "pt"), "--max-length", "64", "--dim", "32",
                            "--ffn-dim", "64", "--steps", "2", "--batch-size", "2", "--opt", "block_size=8",
                            "--no-progress", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "held-out MLM loss" in r.output and (tmp_path / "pt" / "model" / "config.json").is_file()
    r = runner.invoke(app, ["finetune", "qa", "--init", str(tmp_path / "pt" / "model"), "--data", "long-qa",
                            "--length", "64", "--size", "tiny", "--steps", "1", "--no-progress", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "(synthetic)" in r.output and "exact_match" in r.output
    r = runner.invoke(app, ["pretrain", str(text), "--cpc", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--cpc" in r.output
    r = runner.invoke(app, ["finetune", "qa", "--data", "squad", "--no-progress"])
    assert r.exit_code == 2 and "--data" in r.output
    r = runner.invoke(app, ["apps", "evidence", "--seeds", "a,b"])
    assert r.exit_code == 2 and "--seeds" in r.output


def test_a_diverging_pretraining_run_stops_and_keeps_its_checkpoint(tmp_path, monkeypatch):
    """A NaN loss stops the run at that step, before a checkpoint could save diverged weights."""
    from longrange.models.training import NonFiniteLoss

    pt = sys.modules["longrange.apps.pretrain"]  # the module (the package exports a function of that name)

    real = pt.train_step
    calls = []

    def nan_at_step_4(setup, step, *args):
        calls.append(step)
        totals = real(setup, step, *args)
        return [float("nan")] + totals[1:] if step == 3 else totals

    monkeypatch.setattr(pt, "train_step", nan_at_step_4)
    with pytest.raises(NonFiniteLoss, match="step 4 is nan.*last checkpoint is kept"):
        pretrain(tiny(tmp_path, "nan", steps=6, checkpoint_every=2))
    state = torch.load(tmp_path / "nan" / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["state"]["step"] == 2 and calls == [0, 1, 2, 3]


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    script = (f"import sys; sys.path.insert(0, 'tests'); from test_apps_train import tiny\n"
              f"from longrange.apps.pretrain import pretrain; import pathlib\n"
              f"pretrain(tiny(pathlib.Path({str(tmp_path)!r}), 'int', steps=100000, eval_every=100000))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    metrics = tmp_path / "int" / "metrics.csv"
    for _ in range(1200):  # the training loop runs once a train row is written (set-up writes a val row first)
        if (metrics.is_file() and ",train," in metrics.read_text()) or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "TrainingInterrupted" in err and "--resume" in err, err
    assert (tmp_path / "int" / "checkpoint" / "trainer.pt").is_file()
