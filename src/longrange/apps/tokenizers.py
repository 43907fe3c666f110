"""Tokenizers for pretraining and fine-tuning: bytes (the default), DNA (characters or k-mers, for
FASTA), whitespace words over a fixed vocabulary (the built-in tasks) and a local Hugging Face
tokenizer folder (transformers imported only then; nothing is downloaded).

Every tokenizer has the same special tokens, named the same way: `pad_id`, `cls_id`, `sep_id`,
`mask_id`, `unk_id` and `sentence_id` (the id ETC's sentence-summary global tokens carry), a set
`special_ids` that masking never touches, and `sentence_end_ids` (tokens that end a sentence, for
ETC's structure; empty for DNA, which is cut into fixed blocks instead). `encode(text)` gives an
`Encoding`: ids, the word each token belongs to (for whole-word and span masking) and each token's
character span in the text (for extractive QA answers).

    tok = make_tokenizer("byte")                 # or "dna", "dna:k=3", "dna:k=6,overlap", "path/to/hf-folder"
    enc = tok.encode("Long documents. Short ones.")
    tok.decode(enc.ids)                          # the text back
    tok.save("out"); load_tokenizer("out")       # tokenizer.longrange.json (+ the HF files for HF folders)

Round trips: bytes give back any UTF-8 text; DNA gives back the sequence upper-cased (letters other
than A, C, G, T, N are an error, or become N with `strict=False`); words give back the text with
single spaces.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

from longrange.core.config import ConfigError

TOKENIZER_FILE = "tokenizer.longrange.json"
#: the special tokens of the byte, DNA and word tokenizers, ids 0.. in this order
SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[SENT]", "[PARA]", "[Q]")
PAD, CLS, SEP, MASK, UNK, SENT = range(6)
DNA_ALPHABET = "ACGTN"
MAX_KMER = 6


@dataclasses.dataclass
class Encoding:
    """What `encode` returns: token ids, the word index of each token (0, 1, ...) and each token's
    (start, end) character span in the text."""

    ids: list[int]
    words: list[int]
    offsets: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.ids)


class Tokenizer:
    """The interface every tokenizer here implements (see the module docstring)."""

    kind = ""
    vocab_size: int
    pad_id = PAD
    cls_id = CLS
    sep_id = SEP
    mask_id = MASK
    unk_id = UNK
    sentence_id = SENT

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(len(SPECIALS)))

    @property
    def sentence_end_ids(self) -> frozenset[int]:
        return frozenset()

    def encode(self, text: str) -> Encoding:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    def save(self, folder: str | Path) -> Path:
        """Write tokenizer.longrange.json (and, for HF, the tokenizer files) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TOKENIZER_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return folder

    def describe(self) -> str:
        return f"{self.kind} (vocabulary {self.vocab_size})"


# -- bytes --------------------------------------------------------------------------------------------------------
class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte (id = byte + 8, after the special tokens). A word is a run of
    non-space bytes; each whitespace byte is a word of its own. Sentences end at '.', '!' and '?'."""

    kind = "byte"
    offset = len(SPECIALS)
    vocab_size = 256 + len(SPECIALS)

    @property
    def sentence_end_ids(self) -> frozenset[int]:
        return frozenset(self.offset + b for b in b".!?")

    def encode(self, text: str) -> Encoding:
        ids, words, offsets = [], [], []
        word, prev_space = -1, True
        for i, ch in enumerate(text):
            space = ch.isspace()
            if space or prev_space:
                word += 1
            prev_space = space
            for b in ch.encode("utf-8"):
                ids.append(self.offset + b)
                words.append(word)
                offsets.append((i, i + 1))
        return Encoding(ids, words, offsets)

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")


# -- DNA ----------------------------------------------------------------------------------------------------------
class DNATokenizer(Tokenizer):
    """DNA as characters (k=1) or k-mers (k <= 6): non-overlapping k-mers cut from the left (the last
    one may be shorter; every length 1..k has its ids), or overlapping ones (DNABERT's: one token per
    position, s[i:i+k], the last k-1 positions without a token of their own). Each token is a word.
    No sentence ends: ETC's structure cuts DNA into fixed blocks (`corpus.sentence_ids`)."""

    kind = "dna"

    def __init__(self, k: int = 1, overlap: bool = False, strict: bool = True):
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_KMER:
            raise ConfigError(f"DNA k-mer size must be an int in 1..{MAX_KMER}, got {k!r}", "tokenizer")
        self.k, self.overlap, self.strict = k, bool(overlap), strict
        self.mers = ["".join(p) for n in range(1, k + 1) for p in itertools.product(DNA_ALPHABET, repeat=n)]
        self.index = {m: len(SPECIALS) + i for i, m in enumerate(self.mers)}
        self.vocab_size = len(SPECIALS) + len(self.mers)

    def clean(self, seq: str) -> str:
        seq = re.sub(r"\s+", "", seq).upper()
        bad = set(seq) - set(DNA_ALPHABET)
        if bad:
            if self.strict:
                raise ValueError(f"DNA sequence holds letters other than {DNA_ALPHABET}: {''.join(sorted(bad))} "
                                 f"(pass strict=False to read them as N)")
            seq = re.sub(f"[^{DNA_ALPHABET}]", "N", seq)
        return seq

    def encode(self, text: str) -> Encoding:
        seq = self.clean(text)
        k = self.k
        if self.overlap and len(seq) >= k:
            starts = range(len(seq) - k + 1)
            spans = [(i, i + k) for i in starts]
        else:
            spans = [(i, min(i + k, len(seq))) for i in range(0, len(seq), k)]
        ids = [self.index[seq[a:b]] for a, b in spans]
        return Encoding(ids, list(range(len(ids))), spans)

    def decode(self, ids) -> str:
        mers = [self.mers[int(i) - len(SPECIALS)] for i in ids if len(SPECIALS) <= int(i) < self.vocab_size]
        if self.overlap and mers and len(mers[0]) == self.k:
            return "".join(m[0] for m in mers[:-1]) + mers[-1]
        return "".join(mers)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "k": self.k, "overlap": self.overlap, "strict": self.strict}

    def describe(self) -> str:
        what = "characters" if self.k == 1 else f"{'overlapping ' if self.overlap else ''}{self.k}-mers"
        return f"dna {what} (vocabulary {self.vocab_size})"


# -- words over a fixed vocabulary (the built-in tasks) -----------------------------------------------------------
class WordTokenizer(Tokenizer):
    """Whitespace-separated words, one token each, over a fixed vocabulary (unknown words: [UNK]).
    `sentence_end` words end sentences."""

    kind = "word"

    def __init__(self, words, sentence_end=(".",)):
        self.words = list(words)
        if len(set(self.words)) != len(self.words) or set(self.words) & set(SPECIALS):
            raise ValueError("a word vocabulary must hold distinct words, none of them a special token")
        self.index = {w: len(SPECIALS) + i for i, w in enumerate(self.words)}
        self.sentence_end = tuple(sentence_end)
        self.vocab_size = len(SPECIALS) + len(self.words)

    @property
    def sentence_end_ids(self) -> frozenset[int]:
        return frozenset(self.index[w] for w in self.sentence_end if w in self.index)

    def id(self, word: str) -> int:
        return self.index.get(word, UNK) if word not in SPECIALS else SPECIALS.index(word)

    def encode(self, text: str) -> Encoding:
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        ids = [self.id(text[a:b]) for a, b in spans]
        return Encoding(ids, list(range(len(ids))), spans)

    def decode(self, ids) -> str:
        table = list(SPECIALS) + self.words
        return " ".join(table[int(i)] for i in ids if len(SPECIALS) <= int(i) < self.vocab_size)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "words": self.words, "sentence_end": list(self.sentence_end)}


# -- a local Hugging Face tokenizer folder ------------------------------------------------------------------------
class HFTokenizer(Tokenizer):
    """A tokenizer folder saved by transformers (e.g. the one `longrange convert` writes beside a
    converted BERT/RoBERTa), read with local_files_only=True. Word ids come from a fast tokenizer's
    word_ids(); the sentence-summary id is [unused0] when the vocabulary has it, else [UNK]."""

    kind = "hf"

    def __init__(self, folder: str | Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError("an HF tokenizer folder needs transformers (pip install 'longrange[apps]')") from None
        self.folder = Path(folder)
        self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        t = self.tok
        ids = {"pad": t.pad_token_id, "cls": t.cls_token_id if t.cls_token_id is not None else t.bos_token_id,
               "sep": t.sep_token_id if t.sep_token_id is not None else t.eos_token_id, "mask": t.mask_token_id,
               "unk": t.unk_token_id}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"tokenizer in {folder} has no {missing} token(s); masked-LM pretraining needs "
                             f"pad, cls (or bos), sep (or eos), mask and unk")
        self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id = (ids[k] for k in ids)
        unused = t.convert_tokens_to_ids("[unused0]")
        self.sentence_id = unused if isinstance(unused, int) and unused != self.unk_id else self.unk_id
        self.vocab_size = len(t)
        vocab = t.get_vocab()
        self._ends = frozenset(i for w, i in vocab.items() if w.lstrip("Ġ▁") in (".", "!", "?"))

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.tok.all_special_ids) | {self.sentence_id}

    @property
    def sentence_end_ids(self) -> frozenset[int]:
        return self._ends

    def encode(self, text: str) -> Encoding:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=self.tok.is_fast)
        ids = list(enc["input_ids"])
        if self.tok.is_fast:
            words = [w if w is not None else -1 for w in enc.word_ids()]
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        else:
            words, offsets = list(range(len(ids))), [(0, 0)] * len(ids)
        return Encoding(ids, _dense_words(words), offsets)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    def save(self, folder: str | Path) -> Path:
        folder = super().save(folder)
        self.tok.save_pretrained(str(folder))
        return folder

    def describe(self) -> str:
        return f"hf {type(self.tok).__name__} from {self.folder} (vocabulary {self.vocab_size})"


def _dense_words(words: list[int]) -> list[int]:
    """Word ids with None/-1 (special or unknown) turned into words of their own, numbered 0, 1, ..."""
    out, last, n = [], object(), -1
    for w in words:
        if w < 0 or w != last:
            n += 1
        out.append(n)
        last = w
    return out


# -- building and loading -----------------------------------------------------------------------------------------
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def make_tokenizer(spec: str | Path | None) -> Tokenizer:
    """"byte" (None), "dna", "dna:k=3", "dna:k=6,overlap" (also strict=false), or a folder: a longrange
    tokenizer (tokenizer.longrange.json) or a local HF tokenizer."""
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    text = str(spec)
    if text == "dna" or text.startswith("dna:"):
        options = {"k": 1, "overlap": False, "strict": True}
        for item in filter(None, text[4:].split(",")):
            key, eq, value = item.partition("=")
            if key in ("overlap", "strict") and not eq:
                options[key] = True
            elif key == "k" and value.isdigit():
                options["k"] = int(value)
            elif key in ("overlap", "strict") and value.lower() in ("true", "false"):
                options[key] = value.lower() == "true"
            else:
                raise ConfigError(f"unknown DNA tokenizer option {item!r}; expected k=N, overlap, strict=false",
                                  "tokenizer")
        return DNATokenizer(**options)
    folder = Path(text)
    if folder.is_dir():
        return load_tokenizer(folder)
    raise ConfigError(f"tokenizer {text!r}: expected byte, dna[:k=N,overlap] or a tokenizer folder", "tokenizer")


def tokenizer_for(spec: str | None, init: str | Path | None, default: str = "byte") -> Tokenizer:
    """A run's tokenizer: `spec` (--tokenizer) when given, else the `init` folder's saved one, else `default`."""
    if spec is not None:
        return make_tokenizer(spec)
    if init is not None:
        try:
            return load_tokenizer(init)
        except FileNotFoundError:
            pass
    return make_tokenizer(default)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer saved in `folder` (tokenizer.longrange.json), or the HF tokenizer files there."""
    folder = Path(folder)
    path = folder / TOKENIZER_FILE
    if path.is_file():
        data = json.loads(path.read_text())
        kind = data.pop("kind", None)
        if kind == "byte":
            return ByteTokenizer()
        if kind == "dna":
            return DNATokenizer(**data)
        if kind == "word":
            return WordTokenizer(data["words"], data.get("sentence_end", (".",)))
        if kind == "hf":
            return HFTokenizer(folder)
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r}")
    if any((folder / f).is_file() for f in HF_FILES):
        return HFTokenizer(folder)
    raise FileNotFoundError(f"{folder} holds no tokenizer ({TOKENIZER_FILE} or HF tokenizer files)")
