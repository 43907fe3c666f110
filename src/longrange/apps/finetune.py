"""Fine-tune a long encoder on classification, extractive QA, token tagging or summarization, and
evaluate it (accuracy / macro-F1, exact match / F1, ROUGE-L).

    from longrange.apps import FinetuneConfig, finetune
    summary = finetune(FinetuneConfig(task="qa", data="long-qa", length=2048, attention="bigbird",
                                      out="runs/qa-bigbird", steps=300))
    summary["test"]          # {"exact_match": ..., "f1": ..., "examples": ...}

Models: `init` is a model folder (`longrange pretrain`'s `model/`, `longrange convert`'s output or
a fine-tuned one); its encoder is kept and the task head starts fresh. Without `init`, a fresh
model of `dim`/`layers`/`heads`/`ffn_dim` with `attention` (+ `options`). `structure="sentences"`
uses ETC (`ETCEncoder`, or `ETCEncoderDecoder` for summaries) with one global token per sentence
(blocks of `block` tokens for DNA), plus a [CLS] global for classification and the question's
tokens as globals for QA. Summaries use the LED-style `EncoderDecoder`: the long attention in the
encoder, full attention in the decoder (`decoder_layers`), greedy decoding.

Inputs longer than `max_length` are cut to their first `max_length` tokens (that is how `full`
attention at 512 reads a 4K document). Evaluation always scores against the full example: a QA
answer beyond the cut cannot be matched, tags beyond it count as predicted 0. For attentions
with global-token inputs (longformer, bigbird) the question tokens are global in QA and [CLS] in
classification and summarization (as HF's Longformer / LED do).

Data: a built-in task name (`long-qa`, `dna-motif`, `dna-tags`, `spread-summary`; see
`longrange.apps.tasks`, synthetic) or JSONL files (a folder with train/val/test .jsonl, or one file
split 80/10/10), one object per line:
- classify: {"text": ..., "label": int or str}
- qa: {"question": ..., "context": ..., "answer": ..., "answer_start": character offset in context}
- tokens: {"tokens": [word, ...], "tags": [int or str, ...]}
- summarize: {"text": ..., "summary": ...}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch

from longrange.apps.metrics import accuracy, macro_f1, rouge_l, span_exact_match, span_f1
from longrange.apps.run import default_warmup, linear_schedule, progress_bar, read_app_info, save_model_folder
from longrange.apps.seq2seq import ETCEncoderDecoder
from longrange.apps.structure import etc_inputs
from longrange.apps.tasks import SPLITS, TASK_OF, TaskData, builtin_task
from longrange.apps.tokenizers import Tokenizer, load_tokenizer, tokenizer_for
from longrange.core.config import ConfigError
from longrange.mechanisms import capabilities
from longrange.models import Encoder, EncoderDecoder, ETCEncoder, ModelConfig
from longrange.models.checkpoint import read_config
from longrange.models.training import (
    BatchPlan,
    apply_update,
    autocast_for,
    backward,
    check_loss,
    pick_device,
    seed_everything,
)

TASKS = ("classify", "qa", "tokens", "summarize")
STRUCTURES = ("none", "sentences")
HEADS = {"classify": "classification", "qa": "question_answering", "tokens": "token_classification",
         "summarize": None}
METRIC = {"classify": "accuracy", "qa": "exact_match", "tokens": "macro_f1", "summarize": "rouge_l"}


@dataclasses.dataclass
class FinetuneConfig:
    task: str | None = None  # classify | qa | tokens | summarize (None: the built-in data's task)
    data: str = "long-qa"  # a built-in task name or a JSONL file / folder
    init: str | None = None  # a model folder; None: a fresh model (the sizes below)
    out: str | None = None  # where the fine-tuned model goes (model folder + summary.json); None: not saved
    tokenizer: str | None = None  # None: init's, else the built-in task's, else bytes
    length: int = 1024  # built-in tasks: tokens per input
    size: object = "small"  # built-in tasks: tiny | small | medium | large | (train, val, test)
    data_seed: int = 0
    data_options: dict = dataclasses.field(default_factory=dict)  # built-in tasks: their options (facts, ...)
    max_length: int | None = None  # inputs are cut to this many tokens; None: the longest input
    attention: str = "bigbird"
    options: dict = dataclasses.field(default_factory=dict)
    structure: str = "none"  # none | sentences (ETC)
    block: int = 64  # ETC structure for texts without sentence ends (DNA): tokens per block
    dim: int = 64
    heads: int = 4
    layers: int = 2
    ffn_dim: int = 128
    decoder_layers: int = 1
    dropout: float = 0.1
    norm: str = "post"  # post (BERT) | pre (trains faster from scratch at high learning rates)
    init_std: float | None = None  # fresh models: weights ~ N(0, init_std); None: BERT's 0.02
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int | None = None  # None: 10% of the steps
    weight_decay: float = 0.01
    clip_grad: float | None = 1.0
    seed: int = 0
    eval_batch_size: int = 16
    max_answer_length: int = 16  # QA: longest span considered
    gradient_checkpointing: bool = False
    amp: bool | None = None  # None: bf16 autocast on GPU, off on CPU
    device: str = "auto"
    threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task must be one of {list(TASKS)}, got {self.task!r}", "task")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"structure must be one of {list(STRUCTURES)}, got {self.structure!r}", "structure")
        if self.structure == "sentences" and self.init is None and self.attention != "etc":
            raise ConfigError(f"structure='sentences' is ETC's global input: it needs attention 'etc', got "
                              f"{self.attention!r}", "attention")
        for name in ("steps", "batch_size", "eval_batch_size", "max_answer_length", "block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}", name)
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 8):
            raise ConfigError(f"max_length must be an int >= 8, got {self.max_length!r}", "max_length")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}", "lr")


# -- data ---------------------------------------------------------------------------------------------------------
def load_task_data(config: FinetuneConfig) -> TaskData:
    """The built-in task of that name, or the JSONL data at `config.data` for `config.task`."""
    if config.data in TASK_OF:
        data = builtin_task(config.data, length=config.length, size=config.size, seed=config.data_seed,
                            **config.data_options)
        if config.task is not None and config.task != data.task:
            raise ConfigError(f"built-in data {config.data!r} is a {data.task!r} task, not {config.task!r}", "data")
        if config.init is not None or config.tokenizer is not None:
            data = retokenize(data, _tokenizer_for(config))
        return data
    path = Path(config.data)
    if not path.exists():
        raise ConfigError(f"data {config.data!r} is neither a built-in task ({sorted(TASK_OF)}) nor a file or folder",
                          "data")
    if config.task is None:
        raise ConfigError("JSONL data needs the task (classify, qa, tokens or summarize)", "task")
    tokenizer = _tokenizer_for(config)
    return load_jsonl_task(path, config.task, tokenizer)


def retokenize(data: TaskData, tokenizer: Tokenizer) -> TaskData:
    """A built-in task in another tokenizer (e.g. a pretrained model's): each example as text (the
    task's tokens decoded), encoded again. Token tagging keeps its tokenizer only."""
    if tokenizer.to_dict() == data.tokenizer.to_dict():
        return data
    if data.task == "tokens":
        raise ConfigError(f"built-in {data.name} is tagged per {data.tokenizer.describe()} token; fine-tune it "
                          f"with that tokenizer (a model pretrained on {data.tokenizer.kind} tokens)", "tokenizer")
    old = data.tokenizer
    spaced = old.kind == "word"
    labels: dict = {}
    splits = {}
    for split, examples in data.splits.items():
        rows = []
        for e in examples:
            ids = e["input_ids"]
            if data.task == "qa":
                q = e["question_len"]
                prefix = old.decode(ids[q:e["start"]])
                row = {"question": old.decode(ids[1:q - 1]), "context": old.decode(ids[q:]),
                       "answer": old.decode(ids[e["start"]:e["end"] + 1]),
                       "answer_start": len(prefix) + (1 if spaced and prefix else 0)}
            elif data.task == "summarize":
                row = {"text": old.decode(ids), "summary": old.decode(e["target_ids"])}
            else:
                row = {"text": old.decode(ids), "label": e["label"]}
            rows.append(_example(data.task, row, tokenizer, labels, f"{data.name}:{split}"))
        splits[split] = rows
    return dataclasses.replace(data, splits=splits, tokenizer=tokenizer,
                               source=f"{data.source}, re-encoded with {tokenizer.describe()}")


def _tokenizer_for(config: FinetuneConfig) -> Tokenizer:
    return tokenizer_for(config.tokenizer, config.init)


def _read_rows(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    return rows


def load_jsonl_task(path: Path, task: str, tokenizer: Tokenizer) -> TaskData:
    """JSONL rows (see the module docstring) tokenized into examples."""
    if path.is_dir():
        names = {"train": ["train"], "val": ["val", "validation", "dev"], "test": ["test"]}
        files = {s: next((path / f"{n}.jsonl" for n in names[s] if (path / f"{n}.jsonl").is_file()), None)
                 for s in SPLITS}
        if files["train"] is None:
            raise FileNotFoundError(f"{path} has no train.jsonl")
        raw = {s: _read_rows(f) for s, f in files.items() if f is not None}
        if "val" not in raw:
            raw["val"] = raw.get("test", raw["train"][-max(1, len(raw["train"]) // 10):])
        raw.setdefault("test", raw["val"])
    else:
        rows = _read_rows(path)
        n = len(rows)
        a, b = int(n * 0.8), int(n * 0.9)
        if min(a, b - a, n - b) < 1:
            raise ValueError(f"{path} holds {n} rows: too few to split 80/10/10")
        raw = {"train": rows[:a], "val": rows[a:b], "test": rows[b:]}
    labels: dict = {}
    splits = {s: [_example(task, row, tokenizer, labels, f"{path}:{s}[{i}]") for i, row in enumerate(raw[s])]
              for s in SPLITS}
    num = max(len(labels), 2) if task in ("classify", "tokens") else 2
    if task in ("classify", "tokens"):
        num = max(num, 1 + max((max(_labels_of(task, e)) for s in splits.values() for e in s), default=1))
    return TaskData(str(path), task, splits, tokenizer, num, synthetic=False, source=str(path))


def _labels_of(task, example) -> list[int]:
    return [example["label"]] if task == "classify" else [t for t in example["labels"] if t >= 0] or [0]


def _label_index(value, labels: dict) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return labels.setdefault(str(value), len(labels))


def _example(task: str, row: dict, tok: Tokenizer, labels: dict, where: str) -> dict:
    def need(*keys):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{where}: a {task} row needs {list(keys)}; missing {missing}")

    if task == "classify":
        need("text", "label")
        return {"input_ids": [tok.cls_id] + tok.encode(row["text"]).ids + [tok.sep_id],
                "label": _label_index(row["label"], labels)}
    if task == "summarize":
        need("text", "summary")
        return {"input_ids": [tok.cls_id] + tok.encode(row["text"]).ids + [tok.sep_id],
                "target_ids": tok.encode(row["summary"]).ids + [tok.sep_id]}
    if task == "tokens":
        need("tokens", "tags")
        if len(row["tokens"]) != len(row["tags"]):
            raise ValueError(f"{where}: {len(row['tokens'])} tokens but {len(row['tags'])} tags")
        text, starts = "", []
        for w in row["tokens"]:
            starts.append(len(text) + (1 if text else 0))
            text += (" " if text else "") + w
        enc = tok.encode(text)
        tags = [-100] * len(enc.ids)
        first = {}
        for i, (a, _) in enumerate(enc.offsets):
            first.setdefault(a, i)
        for s, tag in zip(starts, row["tags"], strict=True):
            if s in first:
                tags[first[s]] = _label_index(tag, labels)
        return {"input_ids": [tok.cls_id] + enc.ids + [tok.sep_id], "labels": [-100] + tags + [-100]}
    need("question", "context", "answer", "answer_start")
    q = [tok.cls_id] + tok.encode(row["question"]).ids + [tok.sep_id]
    enc = tok.encode(row["context"])
    a0, a1 = int(row["answer_start"]), int(row["answer_start"]) + len(row["answer"])
    inside = [i for i, (s, e) in enumerate(enc.offsets) if e > a0 and s < a1]
    if not inside:
        raise ValueError(f"{where}: the answer span [{a0}, {a1}) covers no token of the context")
    return {"input_ids": q + enc.ids + [tok.sep_id], "question_len": len(q), "start": len(q) + inside[0],
            "end": len(q) + inside[-1]}


def collate(examples: list[dict], task: str, tok: Tokenizer, max_length: int, pad_to: int | None = None) -> dict:
    """Examples -> CPU tensors, inputs cut to `max_length` and padded (to `pad_to` or the longest)."""
    ids = [e["input_ids"][:max_length] for e in examples]
    n = pad_to or max(len(x) for x in ids)
    input_ids = torch.full((len(ids), n), tok.pad_id, dtype=torch.long)
    keep = torch.zeros(len(ids), n, dtype=torch.bool)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        keep[i, :len(x)] = True
    batch = {"input_ids": input_ids, "attention_mask": keep}
    if task == "classify":
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    elif task == "tokens":
        labels = torch.full((len(ids), n), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            t = e["labels"][:max_length]
            labels[i, :len(t)] = torch.tensor(t)
        batch["labels"] = labels
    elif task == "qa":
        seen = [e["end"] < min(max_length, n) for e in examples]  # answers beyond the cut point at [CLS] (0)
        batch["start_positions"] = torch.tensor([e["start"] if ok else 0 for e, ok in zip(examples, seen, strict=True)])
        batch["end_positions"] = torch.tensor([e["end"] if ok else 0 for e, ok in zip(examples, seen, strict=True)])
        batch["question_len"] = torch.tensor([e["question_len"] for e in examples])
    else:
        t = max(len(e["target_ids"]) for e in examples)
        labels = torch.full((len(ids), t), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, :len(e["target_ids"])] = torch.tensor(e["target_ids"])
        batch["labels"] = labels
    return batch


# -- models -------------------------------------------------------------------------------------------------------
def fresh_model_config(config: FinetuneConfig, data: TaskData, task: str, max_length: int) -> ModelConfig:
    options = dict(config.options)
    for name in capabilities(config.attention).length_options:  # e.g. linformer's seq_len
        options.setdefault(name, max_length)
    tok = data.tokenizer
    return ModelConfig(vocab_size=tok.vocab_size, dim=config.dim, heads=config.heads, layers=config.layers,
                       ffn_dim=config.ffn_dim, max_length=max_length, attention=config.attention,
                       attention_options=options, pad_token_id=tok.pad_id, dropout=config.dropout,
                       norm=config.norm, initializer_range=config.init_std or 0.02, head=HEADS[task],
                       num_labels=data.num_labels, gradient_checkpointing=config.gradient_checkpointing,
                       decoder_layers=config.decoder_layers, decoder_max_length=max(64, _longest_target(data) + 2),
                       decoder_start_token_id=tok.cls_id, eos_token_id=tok.sep_id)


def _longest_target(data: TaskData) -> int:
    return max((len(e.get("target_ids", ())) for s in data.splits.values() for e in s), default=0)


def build_model(config: FinetuneConfig, data: TaskData, task: str, max_length: int):
    """A fresh model, or `config.init`'s encoder with a fresh task head (an encoder-decoder for summaries)."""
    etc = config.structure == "sentences"
    if config.init is None:
        cfg = fresh_model_config(config, data, task, max_length)
        if task == "summarize":
            return (ETCEncoderDecoder if etc else EncoderDecoder)(cfg)
        return (ETCEncoder if etc else Encoder)(cfg)
    kind, saved = read_config(config.init)
    etc = kind in ("ETCEncoder", "ETCEncoderDecoder")
    if etc != (config.structure == "sentences"):
        raise ConfigError(f"--init {config.init} holds a {kind}: use structure {'sentences' if etc else 'none'}",
                          "structure")
    if saved.vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"--init {config.init} has vocab_size {saved.vocab_size}, the tokenizer "
                          f"{data.tokenizer.vocab_size}", "tokenizer")
    overrides = {"dropout": config.dropout, "gradient_checkpointing": config.gradient_checkpointing}
    if task != "summarize":
        cls = ETCEncoder if etc else Encoder
        if kind not in ("Encoder", "ETCEncoder"):
            raise ConfigError(f"--init {config.init} holds a {kind}; {task} needs an encoder", "init")
        return cls.from_pretrained(config.init, head=HEADS[task], num_labels=data.num_labels, **overrides).train()
    if kind in ("EncoderDecoder", "ETCEncoderDecoder"):
        return (ETCEncoderDecoder if etc else EncoderDecoder).from_pretrained(config.init, **overrides).train()
    enc = (ETCEncoder if etc else Encoder).from_pretrained(config.init, **overrides)
    cfg = enc.config.replace(head=None, decoder_layers=config.decoder_layers,
                             decoder_max_length=max(64, _longest_target(data) + 2),
                             decoder_start_token_id=data.tokenizer.cls_id, eos_token_id=data.tokenizer.sep_id)
    s2s = (ETCEncoderDecoder if etc else EncoderDecoder)(cfg)
    target = s2s.etc if etc else s2s
    own = {k: v for k, v in enc.state_dict().items() if not k.startswith("head.")}
    if not etc:  # Encoder.stack -> EncoderDecoder.encoder
        own = {("encoder." + k[len("stack."):]) if k.startswith("stack.") else k: v for k, v in own.items()}
    missing = target.load_state_dict(own, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"--init {config.init}: unexpected weights {missing.unexpected_keys[:5]}")
    return s2s.train()


def is_etc(model) -> bool:
    return isinstance(model, ETCEncoder | ETCEncoderDecoder)


def forward_inputs(model, batch: dict, task: str, tok: Tokenizer, block: int) -> dict:
    """The model keywords for a collated batch: ETC's global inputs, or global tokens for attentions
    that take them (question tokens in QA, [CLS] in summaries; Encoder makes [CLS] global itself)."""
    ids, keep = batch["input_ids"], batch["attention_mask"]
    kw = {"attention_mask": keep}
    if is_etc(model):
        kw.update(etc_inputs(ids, keep, tok, question_len=batch.get("question_len"), cls=task == "classify",
                             block=block))
        return kw
    config = model.config
    takes_globals = any("global_mask" in capabilities(config.attention_spec(i)[0]).inputs
                        for i in range(config.layers))
    if takes_globals and task == "qa":
        kw["global_mask"] = (torch.arange(ids.shape[1])[None, :] < batch["question_len"][:, None]) & keep
    elif takes_globals and task == "summarize":
        kw["global_mask"] = torch.zeros_like(keep)
        kw["global_mask"][:, 0] = True
    return kw


def to_device(kw: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def loss_of(model, batch: dict, task: str, tok: Tokenizer, block: int, device):
    kw = to_device(forward_inputs(model, batch, task, tok, block), device)
    ids = batch["input_ids"].to(device)
    if task == "qa":
        return model(ids, start_positions=batch["start_positions"].to(device),
                     end_positions=batch["end_positions"].to(device), **kw).loss
    return model(ids, labels=batch["labels"].to(device), **kw).loss


# -- evaluation ---------------------------------------------------------------------------------------------------
def best_spans(start: torch.Tensor, end: torch.Tensor, allowed: torch.Tensor, max_len: int) -> torch.Tensor:
    """start, end [B, N] logits, allowed [B, N] bool -> [B, 2] (start, end) maximising start + end with
    start <= end < start + max_len, both allowed."""
    neg = torch.finfo(torch.float32).min / 4
    s = start.float().masked_fill(~allowed, neg)
    e = end.float().masked_fill(~allowed, neg)
    n = s.shape[1]
    scores = torch.full((s.shape[0], n, max_len), neg)
    for d in range(min(max_len, n)):
        scores[:, :n - d, d] = s[:, :n - d] + e[:, d:]
    flat = scores.flatten(1).argmax(1)
    i, d = flat // max_len, flat % max_len
    return torch.stack([i, i + d], dim=1)


@torch.no_grad()
def evaluate_task(model, examples: list[dict], task: str, tok: Tokenizer, max_length: int, *, block: int = 64,
                  batch_size: int = 16, max_answer_length: int = 16, device="cpu", autocast=None,
                  pad_to: int | None = None) -> dict:
    """The task's metrics over `examples` (scored against the full, uncut examples)."""
    autocast = autocast or contextlib.nullcontext
    was = model.training
    model.eval()
    preds, golds, scores = [], [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = collate(chunk, task, tok, max_length, pad_to)
        kw = to_device(forward_inputs(model, batch, task, tok, block), device)
        ids = batch["input_ids"].to(device)
        with autocast():
            if task == "summarize":
                t = batch["labels"].shape[1]
                out = model.generate(ids, max_new_tokens=t, **kw).cpu()
                for e, row in zip(chunk, out[:, 1:].tolist(), strict=True):
                    pred = row[:row.index(tok.sep_id)] if tok.sep_id in row else row
                    gold = e["target_ids"][:-1] if e["target_ids"][-1:] == [tok.sep_id] else e["target_ids"]
                    scores.append((rouge_l(pred, gold), float(pred == gold)))
                continue
            out = model(ids, **kw)
        if task == "classify":
            preds += out.logits.float().argmax(-1).tolist()
            golds += [e["label"] for e in chunk]
        elif task == "tokens":
            p = out.logits.float().argmax(-1).cpu()
            for j, e in enumerate(chunk):
                full = [int(x) for x in p[j, :len(e["labels"])]] + [0] * max(0, len(e["labels"]) - p.shape[1])
                for y, yhat in zip(e["labels"], full, strict=True):
                    if y != -100:
                        golds.append(y)
                        preds.append(yhat)
        else:
            allowed = batch["attention_mask"] & (torch.arange(ids.shape[1])[None] >= batch["question_len"][:, None])
            allowed &= batch["input_ids"] != tok.sep_id
            spans = best_spans(out.start_logits.cpu(), out.end_logits.cpu(), allowed, max_answer_length)
            for (s, e_), ex in zip(spans.tolist(), chunk, strict=True):
                scores.append((span_exact_match((s, e_), (ex["start"], ex["end"])),
                               span_f1((s, e_), (ex["start"], ex["end"]))))
    model.train(was)
    if task in ("classify", "tokens"):
        return {"accuracy": accuracy(preds, golds), "macro_f1": macro_f1(preds, golds), "examples": len(examples)}
    a, b = zip(*scores, strict=True) if scores else ((), ())
    names = ("rouge_l", "exact_match") if task == "summarize" else ("exact_match", "f1")
    return {names[0]: sum(a) / max(len(a), 1), names[1]: sum(b) / max(len(b), 1), "examples": len(examples)}


# -- the run ------------------------------------------------------------------------------------------------------
def finetune(config: FinetuneConfig) -> dict:
    """Train `config.steps` steps, evaluate on val and test, save to `config.out` (when given); returns
    the summary (also out/summary.json)."""
    config.validate()
    device = pick_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # see lra.train.TrainConfig.flush_denormal
    data = load_task_data(config)
    task = config.task or data.task
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}", "task")
    longest = max(len(e["input_ids"]) for s in data.splits.values() for e in s)
    max_length = config.max_length or longest
    if config.init is not None:
        max_length = min(max_length, read_config(config.init)[1].max_length) \
            if config.structure == "none" else max_length
    seed_everything(config.seed)
    model = build_model(config, data, task, max_length).to(device)
    pad_to = max_length if capabilities(model.config.attention).length_options else None
    amp = device.type == "cuda" if config.amp is None else config.amp
    autocast, amp_dtype = autocast_for(device, amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=config.weight_decay)
    train = data.splits["train"]
    plan = BatchPlan(len(train), min(config.batch_size, len(train)), 1, 1, config.seed)
    warmup = default_warmup(config.warmup, config.steps)
    model.train()
    t0 = time.perf_counter()
    tokens = 0
    losses = []
    label = f"{data.name}/{model.config.attention}{'+structure' if is_etc(model) else ''}/{max_length}"
    with progress_bar(config.progress, config.steps, 0, label) as advance:
        for step in range(config.steps):
            batch = collate([train[i] for i in plan.micro_batches(step, 0)[0]], task, data.tokenizer, max_length,
                            pad_to)
            with autocast():
                loss = loss_of(model, batch, task, data.tokenizer, config.block, device)
            check_loss(loss.item(), step + 1, "fine-tuning saves nothing before it ends")
            backward(loss, scaler)
            apply_update(opt, linear_schedule(config.lr, step, warmup, config.steps),
                         parameters=model.parameters(), clip=config.clip_grad, scaler=scaler)
            losses.append(loss.item())
            n = int(batch["attention_mask"].sum())
            tokens += n
            advance(f"loss {losses[-1]:.3f}", n)
    seconds = time.perf_counter() - t0
    kw = dict(block=config.block, batch_size=config.eval_batch_size, max_answer_length=config.max_answer_length,
              device=device, autocast=autocast, pad_to=pad_to)
    results = {s: evaluate_task(model, data.splits[s], task, data.tokenizer, max_length, **kw) for s in ("val", "test")}
    summary = {"task": task, "data": data.name, "synthetic": data.synthetic, "source": data.source,
               "length": data.length, "max_length": max_length, "attention": model.config.attention,
               "structure": "sentences" if is_etc(model) else "none", "init": config.init, "steps": config.steps,
               "batch_size": plan.batch_size, "seed": config.seed, "params": sum(p.numel() for p in model.parameters()),
               "metric": METRIC[task], "val": results["val"], "test": results["test"],
               "train_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1), "train_seconds": seconds,
               "tokens_per_s": tokens / max(seconds, 1e-9), "device": str(device)}
    if config.out is not None:
        out = Path(config.out)
        info = {"task": task, "structure": summary["structure"], "max_length": max_length, "block": config.block,
                "data": data.name, "test": results["test"]}
        save_model_folder(model, data.tokenizer, out / "model", info)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_finetuned(folder: str | Path):
    """(model, tokenizer, info) of a `finetune` output's model folder."""
    folder = Path(folder)
    folder = folder / "model" if (folder / "model" / "config.json").is_file() else folder
    kind, _ = read_config(folder)
    classes = {c.__name__: c for c in (Encoder, ETCEncoder, EncoderDecoder, ETCEncoderDecoder)}
    if kind not in classes:
        raise ValueError(f"{folder} holds a {kind}, not a fine-tuned encoder or encoder-decoder")
    return classes[kind].from_pretrained(folder), load_tokenizer(folder), read_app_info(folder)
