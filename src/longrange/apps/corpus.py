"""Pretraining text: documents from text files, JSONL or FASTA, tokenized and packed into examples.

    docs = read_documents(["corpus/"])                      # every .txt/.md/.jsonl/.fa... file, sorted
    corpus = pack_corpus(docs, tokenizer, max_length=4096)  # tensors [E, L]: ids, words, sentences
    train, val = corpus.split(val_fraction=0.05)

Formats, by file suffix: `.jsonl` / `.json` (one JSON object per line, its `text_field`, "text" by
default), `.fa` / `.fasta` / `.fna` / `.fas` (FASTA: one document per `>` record, sequence lines
joined), anything else plain text (one document per file). A folder means every file under it,
in sorted order.

Packing (BERT's, without next-sentence pairs): the documents' tokens run on in one stream with
[SEP] between documents, cut into examples of `max_length - 2` tokens, each wrapped in
[CLS] ... [SEP]; the last, shorter one is padded. Per token the example keeps its word index (for
whole-word / span masking) and its sentence index (for ETC's structure and CPC): a sentence ends at
a tokenizer's sentence-end token or a [SEP]; tokenizers without sentence ends (DNA) are cut into
blocks of `block` tokens. The whole corpus is held in memory (int32 tensors): this is for corpora
of up to some hundreds of MB, not for streaming a web crawl.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from longrange.apps.tokenizers import Tokenizer
from longrange.core.config import ConfigError

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas", ".ffn")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class CorpusError(ValueError):
    """A corpus file that cannot be read; the message names the file (and line)."""


def corpus_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files of `paths` (folders expanded, sorted; hidden files skipped)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist")
    if not out:
        raise CorpusError(f"no files in {[str(p) for p in paths]}")
    return out


def is_fasta(path: Path) -> bool:
    return path.suffix.lower() in FASTA_SUFFIXES


def read_documents(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Documents (strings) of every file, in order; empty documents are skipped."""
    for path in corpus_files(paths):
        suffix = path.suffix.lower()
        if suffix in JSON_SUFFIXES:
            yield from _jsonl(path, text_field)
        elif suffix in FASTA_SUFFIXES:
            yield from _fasta(path)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise CorpusError(f"{path}:{line_no}: expected an object with a string field {field!r}")
            if row[field].strip():
                yield row[field]


def _fasta(path: Path) -> Iterator[str]:
    seq: list[str] | None = None
    with path.open(encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith(">"):
                if seq:
                    yield "".join(seq)
                seq = []
            elif line and not line.startswith(";"):
                if seq is None:
                    raise CorpusError(f"{path}:{line_no}: sequence before the first '>' header: not FASTA")
                seq.append(line)
    if seq:
        yield "".join(seq)


@dataclasses.dataclass
class PackedCorpus:
    """Examples [E, L]: token ids, word index and sentence index per token (-1 on padding)."""

    input_ids: torch.Tensor  # [E, L] int32
    word_ids: torch.Tensor  # [E, L] int32, -1 on padding
    sentence_ids: torch.Tensor  # [E, L] int32, -1 on padding
    tokens: int  # real tokens (no padding)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.word_ids >= 0

    def subset(self, index) -> PackedCorpus:
        keep = self.word_ids[index] >= 0
        return PackedCorpus(self.input_ids[index], self.word_ids[index], self.sentence_ids[index], int(keep.sum()))

    def split(self, val_fraction: float = 0.05, min_val: int = 1) -> tuple[PackedCorpus, PackedCorpus]:
        """(train, held-out): the last examples are held out (deterministic)."""
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}", "val_fraction")
        e = len(self)
        n_val = max(min_val, int(round(e * val_fraction)))
        if e - n_val < 1:
            raise CorpusError(f"the corpus packs into {e} example(s): too few to hold {n_val} out and train on the "
                              f"rest; give more text or a shorter --max-length")
        return self.subset(slice(0, e - n_val)), self.subset(slice(e - n_val, e))


def sentence_ids(ids: list[int], ends: frozenset[int], block: int) -> list[int]:
    """Sentence index of each token: a sentence ends at a token in `ends` (which belongs to it);
    without `ends`, fixed blocks of `block` tokens."""
    if not ends:
        return [i // block for i in range(len(ids))]
    out, s = [], 0
    for t in ids:
        out.append(s)
        if t in ends:
            s += 1
    return out


def pack_corpus(documents: Iterable[str], tokenizer: Tokenizer, max_length: int, *, block: int = 64,
                max_tokens: int | None = None) -> PackedCorpus:
    """Tokenize `documents` and pack them into [CLS] ... [SEP] examples of `max_length` tokens (see the
    module docstring). max_tokens: stop after this many tokens."""
    if max_length < 8:
        raise ConfigError(f"max_length must be at least 8, got {max_length}", "max_length")
    ids: list[int] = []
    words: list[int] = []
    word_base = 0
    for doc in documents:
        enc = tokenizer.encode(doc)
        if ids:
            ids.append(tokenizer.sep_id)
            words.append(word_base)
            word_base += 1
        ids.extend(enc.ids)
        words.extend(w + word_base for w in enc.words)
        word_base = (words[-1] + 1) if words else word_base
        if max_tokens is not None and len(ids) >= max_tokens:
            ids, words = ids[:max_tokens], words[:max_tokens]
            break
    if not ids:
        raise CorpusError("the corpus holds no tokens")
    ends = frozenset(tokenizer.sentence_end_ids) | {tokenizer.sep_id}
    sents = sentence_ids(ids, ends if tokenizer.sentence_end_ids else frozenset(), block)
    body = max_length - 2
    n = (len(ids) + body - 1) // body
    out_ids = torch.full((n, max_length), tokenizer.pad_id, dtype=torch.int32)
    out_words = torch.full((n, max_length), -1, dtype=torch.int32)
    out_sents = torch.full((n, max_length), -1, dtype=torch.int32)
    t_ids, t_words, t_sents = (torch.tensor(x, dtype=torch.int64) for x in (ids, words, sents))
    for e in range(n):
        a, b = e * body, min((e + 1) * body, len(ids))
        m = b - a
        out_ids[e, 0], out_ids[e, 1:m + 1], out_ids[e, m + 1] = tokenizer.cls_id, t_ids[a:b].int(), tokenizer.sep_id
        w = t_words[a:b] - t_words[a] + 1  # [CLS] is word 0 of its example, [SEP] the last
        out_words[e, 0], out_words[e, 1:m + 1], out_words[e, m + 1] = 0, w.int(), int(w[-1]) + 1
        s = t_sents[a:b] - t_sents[a]
        out_sents[e, 0], out_sents[e, 1:m + 1], out_sents[e, m + 1] = 0, s.int(), int(s[-1])
    return PackedCorpus(out_ids, out_words, out_sents, tokens=len(ids))

