"""Built-in long-range tasks: generated, seeded, SYNTHETIC (labelled so wherever they are reported).

Each puts the evidence a model needs far from where it is asked for, so that a model that reads
only the first 512 tokens cannot answer once the input is longer:

- `long-qa` (extractive QA): the question "what is kX ?" comes first; the document is filler
  sentences with a few facts "kY is v v v ." (distinct keys, 1-3 values); the answer is the value
  span of the fact whose key is kX, anywhere in the document (uniform), so thousands of tokens
  from the question at 4K.
- `dna-motif` (classification, DNA characters): random bases with a "promoter" motif (one of two
  8-mers) within the first 128 bases and an "enhancer" motif (one of two other 8-mers) anywhere
  after it; the label is 1 when their variants match (A0 with B0, A1 with B1), else 0 — it
  depends on the far motif. No motif occurs anywhere else (the generator removes chance hits).
- `dna-tags` (token classification): the same sequences, each base tagged 1 inside the promoter
  motif, 2 inside the enhancer motif, 0 elsewhere.
- `spread-summary` (summarization): a document of filler sentences with `facts` numbered facts
  "nT kX is v v ." placed one per equal part of the document (parts in random order); the summary
  lists the facts in number order, "kX v v" for n1, n2, ... — every part of the input is needed.

    data = builtin_task("long-qa", length=2048, size="small", seed=0)
    data.splits["train"][0]      # {"input_ids": [...], "question_len": 6, "start": 1234, "end": 1236}
    data.tokenizer.decode(data.splits["train"][0]["input_ids"][:6])    # "what is k17 ?"

Sizes (train / val / test examples): tiny 32/16/16, small 256/64/64, medium 2000/200/200,
large 20000/1000/1000, or a tuple. Every example is drawn from its own generator seeded by
(task seed, split, index, length): any subset can be regenerated alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from longrange.apps.tokenizers import CLS, SEP, DNATokenizer, Tokenizer, WordTokenizer
from longrange.core.config import ConfigError

SIZES = {"tiny": (32, 16, 16), "small": (256, 64, 64), "medium": (2000, 200, 200), "large": (20000, 1000, 1000)}
SPLITS = ("train", "val", "test")
#: the finetuning task each built-in data set is for
TASK_OF = {"long-qa": "qa", "dna-motif": "classify", "dna-tags": "tokens", "spread-summary": "summarize"}

FILLER, KEYS, VALUES, NUMBERS = 200, 64, 100, 16
QUESTION = ("what", "is")


@dataclasses.dataclass
class TaskData:
    """A task's splits (lists of example dicts), its tokenizer and what kind of task it is."""

    name: str
    task: str  # classify | qa | tokens | summarize
    splits: dict[str, list[dict]]
    tokenizer: Tokenizer
    num_labels: int = 2
    synthetic: bool = True
    length: int | None = None
    source: str = "built-in (synthetic)"


def word_tokenizer() -> WordTokenizer:
    """The built-in word vocabulary: filler words w*, keys k*, values v*, fact numbers n*, function words."""
    words = ([f"w{i}" for i in range(FILLER)] + [f"k{i}" for i in range(KEYS)] + [f"v{i}" for i in range(VALUES)]
             + [f"n{i}" for i in range(1, NUMBERS + 1)] + [*QUESTION, "?", ".", ";"])
    return WordTokenizer(words)


def task_sizes(size) -> tuple[int, int, int]:
    if isinstance(size, str):
        if size not in SIZES:
            raise ConfigError(f"size must be one of {list(SIZES)} or (train, val, test), got {size!r}", "size")
        return SIZES[size]
    sizes = tuple(int(s) for s in size)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ConfigError(f"size must be three positive counts (train, val, test), got {size!r}", "size")
    return sizes


def builtin_task(name: str, length: int = 1024, size="small", seed: int = 0, **options) -> TaskData:
    """Generate a built-in task at `length` tokens per input ([CLS] ... [SEP] included)."""
    makers = {"long-qa": _long_qa, "dna-motif": _dna_motif, "dna-tags": _dna_tags, "spread-summary": _spread_summary}
    if name not in makers:
        raise ConfigError(f"unknown built-in task {name!r}; built-in: {sorted(makers)}", "data")
    if not isinstance(length, int) or length < 32:
        raise ConfigError(f"length must be an int >= 32 for the built-in tasks, got {length!r}", "length")
    counts = task_sizes(size)
    make, tokenizer, num_labels = makers[name](**options)
    splits = {split: [make(np.random.default_rng([seed, s, i, length]), length) for i in range(count)]
              for s, (split, count) in enumerate(zip(SPLITS, counts, strict=True))}
    return TaskData(name, TASK_OF[name], splits, tokenizer, num_labels, True, length)


# -- long-document QA ---------------------------------------------------------------------------------------------
def _long_qa(facts: int = 6, max_values: int = 3, keys: int = KEYS, link: bool = True):
    tok = word_tokenizer()
    ids = tok.index

    def make(rng: np.random.Generator, length: int) -> dict:
        chosen = rng.choice(keys, size=facts, replace=False)
        asked = int(chosen[0])
        question = [CLS, ids["what"], ids["is"], ids[f"k{asked}"], ids["?"], SEP]
        fact_rows = [[ids[f"k{int(k)}"]] + ([ids["is"]] if link else [])
                     + [ids[f"v{int(v)}"] for v in rng.integers(VALUES, size=int(rng.integers(1, max_values + 1)))]
                     + [ids["."]] for k in chosen]
        budget = length - len(question) - 1  # the document between the question and the final [SEP]
        doc, where = _place(rng, fact_rows, budget, tok, spread=False)
        start = len(question) + where[0] + (2 if link else 1)  # after "kX is"
        end = len(question) + where[0] + len(fact_rows[0]) - 2  # the last value
        return {"input_ids": question + doc + [SEP], "question_len": len(question), "start": start, "end": end}

    return make, tok, 2


def _filler(rng: np.random.Generator, n: int, tok: WordTokenizer) -> list[list[int]]:
    """Filler sentences of 5..12 words + "." totalling exactly n tokens (n >= 0)."""
    out: list[list[int]] = []
    while n > 0:
        m = int(rng.integers(6, 14))
        if n - m < 6:
            m = n if n <= 13 else n - 6
        words = [tok.index[f"w{int(w)}"] for w in rng.integers(FILLER, size=max(m - 1, 0))]
        out.append(words + [tok.index["."]] if m > 1 else [tok.index["."]])
        n -= m
    return out


def _place(rng, rows: list[list[int]], budget: int, tok, spread: bool, order=None) -> tuple[list[int], list[int]]:
    """Filler sentences with `rows` inserted between sentences, `budget` tokens in all. spread=False:
    each row at a uniform sentence boundary; spread=True: row i in part order[i] of len(rows) equal
    parts. Returns (tokens, start offset of each row)."""
    need = sum(len(r) for r in rows)
    if need > budget:
        raise ConfigError(f"length is too short for {len(rows)} facts ({need} tokens)", "length")
    filler = _filler(rng, budget - need, tok)
    bounds = np.cumsum([0] + [len(s) for s in filler])  # token offset of each sentence boundary (filler only)
    if spread:
        parts = len(rows)
        slots = []
        for i in range(parts):
            part = order[i]
            lo, hi = part * len(filler) // parts, (part + 1) * len(filler) // parts
            slots.append(int(rng.integers(lo, max(hi, lo + 1))))
    else:
        slots = [int(s) for s in rng.integers(0, len(filler) + 1, size=len(rows))]
    order_rows = sorted(range(len(rows)), key=lambda i: (slots[i], i))
    doc: list[int] = []
    starts = [0] * len(rows)
    at = 0
    for i in order_rows:
        while at < slots[i]:
            doc.extend(filler[at])
            at += 1
        starts[i] = len(doc)
        doc.extend(rows[i])
    for s in filler[at:]:
        doc.extend(s)
    assert len(doc) == budget and bounds[-1] + need == budget
    return doc, starts


# -- DNA: a promoter motif and a far enhancer motif ---------------------------------------------------------------
MOTIFS = ("TATAATGC", "GACCTTAG", "CGGTACAA", "ATGCCGTT")  # A0, A1 (promoter) and B0, B1 (enhancer)
PROMOTER_WINDOW = 128


def dna_sequence(rng: np.random.Generator, bases: int) -> tuple[str, int, int, int, int]:
    """(sequence, promoter variant, promoter start, enhancer variant, enhancer start), chance motif hits removed."""
    m = len(MOTIFS[0])
    a = int(rng.integers(2))
    b = int(rng.integers(2))
    pa = int(rng.integers(0, min(PROMOTER_WINDOW, bases // 4) - m + 1))
    pb = int(rng.integers(pa + m + 16, bases - m + 1))
    seq = list(np.array(list("ACGT"))[rng.integers(4, size=bases)])
    seq[pa:pa + m], seq[pb:pb + m] = MOTIFS[a], MOTIFS[2 + b]
    planted = {pa, pb}
    while True:
        text = "".join(seq)
        hits = [i for motif in MOTIFS for i in _find_all(text, motif) if i not in planted]
        hits += [i for i in range(max(0, pa - m + 1), pa + m) if i != pa and text[i:i + m] in MOTIFS]
        hits += [i for i in range(max(0, pb - m + 1), pb + m) if i != pb and text[i:i + m] in MOTIFS]
        free = [j for i in hits for j in range(i, i + m) if not (pa <= j < pa + m or pb <= j < pb + m)]
        if not hits:
            return text, a, pa, b, pb
        j = free[0] if free else None
        if j is None:  # cannot happen with these motifs (no two of them overlap into a third)
            raise RuntimeError("a motif hit made only of planted bases")
        seq[j] = "ACGT"[(("ACGT".index(seq[j])) + 1 + int(rng.integers(3))) % 4]


def _find_all(text: str, motif: str) -> list[int]:
    out, i = [], text.find(motif)
    while i >= 0:
        out.append(i)
        i = text.find(motif, i + 1)
    return out


def _dna_motif(k: int = 1, overlap: bool = False, rule: str = "match"):
    tok = DNATokenizer(k, overlap)
    if rule not in ("match", "enhancer"):
        raise ConfigError(f"dna-motif rule must be match or enhancer, got {rule!r}", "rule")

    def make(rng, length):
        seq, a, _, b, _ = dna_sequence(rng, _bases(length - 2, k, overlap))
        return {"input_ids": [CLS] + tok.encode(seq).ids + [SEP], "label": int(a == b) if rule == "match" else b}

    return make, tok, 2


def _bases(tokens: int, k: int, overlap: bool) -> int:
    """Bases that make `tokens` DNA tokens."""
    return tokens + k - 1 if overlap else tokens * k


def _dna_tags():
    tok = DNATokenizer(1)
    m = len(MOTIFS[0])

    def make(rng, length):
        seq, _, pa, _, pb = dna_sequence(rng, length - 2)
        labels = [0] * len(seq)
        labels[pa:pa + m] = [1] * m
        labels[pb:pb + m] = [2] * m
        return {"input_ids": [CLS] + tok.encode(seq).ids + [SEP], "labels": [-100] + labels + [-100]}

    return make, tok, 3


# -- summarization with facts spread over the whole input ---------------------------------------------------------
def _spread_summary(facts: int = 4, values: int = 2, value_vocab: int = VALUES, keys_in_summary: bool = True):
    if not 1 <= facts <= NUMBERS:
        raise ConfigError(f"facts must be in 1..{NUMBERS}, got {facts}", "facts")
    tok = word_tokenizer()
    ids = tok.index

    def make(rng, length):
        keys = rng.choice(KEYS, size=facts, replace=False)
        vals = rng.integers(min(value_vocab, VALUES), size=(facts, values))
        rows = [[ids[f"n{t + 1}"], ids[f"k{int(keys[t])}"], ids["is"]] + [ids[f"v{int(v)}"] for v in vals[t]]
                + [ids["."]] for t in range(facts)]
        order = [int(p) for p in rng.permutation(facts)]  # fact t lies in part order[t] of the document
        doc, _ = _place(rng, rows, length - 2, tok, spread=True, order=order)
        target = [t for i in range(facts) for t in [ids[f"k{int(keys[i])}"]] * keys_in_summary
                  + [ids[f"v{int(v)}"] for v in vals[i]]]
        return {"input_ids": [CLS] + doc + [SEP], "target_ids": target + [SEP]}

    return make, tok, 2
