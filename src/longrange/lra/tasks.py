"""The six Long Range Arena tasks: what each one is, one dataset type for all, and the batch collator.

    import longrange as lr
    ds = lr.lra.load_split("listops", "train")                       # built-in tiny ListOps, no files
    ds = lr.lra.load_split("listops", "train", "data/listops-1000")  # LRA's released TSVs
    batch = lr.lra.collate([ds[0], ds[1]], pad_to_multiple=64)       # input_ids, attention_mask, labels

Token ids, every task: 0 = pad, 1 = CLS (prepended to every sequence), task symbols from 2 up
(ListOps: 15 symbols; bytes and pixels: value + 2). `TaskSpec.max_length` counts task tokens, as the
paper does (LRA's models add their CLS inside the model); `LRADataset.max_length` counts every token
of `input_ids`, CLS included, so it is at most `TaskSpec.max_length + 1`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

PAD_ID = 0
CLS_ID = 1
#: task symbol k (a ListOps token index, a byte, a pixel value) has id k + TOKEN_OFFSET
TOKEN_OFFSET = 2
SPLITS = ("train", "val", "test")


class LRADataError(ValueError):
    """A data file (or an option) that does not match the released format; the message names file:line."""


@dataclass(frozen=True)
class TaskSpec:
    """One LRA task as the paper defines it."""

    name: str  # "listops" | "text" | "retrieval" | "image" | "pathfinder" | "pathx"
    num_classes: int
    max_length: int  # the paper's length in task tokens (CLS not counted); per document for retrieval
    vocab_size: int  # ids 0..vocab_size-1; 0 = pad, 1 = CLS
    dual: bool = False  # retrieval: two documents per example
    pad_id: int = PAD_ID
    cls_id: int = CLS_ID


#: ListOps has 15 symbols (digits, 4 operators, "]"); bytes and pixels have 256 values
TASKS: dict[str, TaskSpec] = {
    "listops": TaskSpec("listops", num_classes=10, max_length=2000, vocab_size=TOKEN_OFFSET + 15),
    "text": TaskSpec("text", num_classes=2, max_length=4000, vocab_size=TOKEN_OFFSET + 256),
    "retrieval": TaskSpec("retrieval", num_classes=2, max_length=4000, vocab_size=TOKEN_OFFSET + 256, dual=True),
    "image": TaskSpec("image", num_classes=10, max_length=1024, vocab_size=TOKEN_OFFSET + 256),
    "pathfinder": TaskSpec("pathfinder", num_classes=2, max_length=1024, vocab_size=TOKEN_OFFSET + 256),
    "pathx": TaskSpec("pathx", num_classes=2, max_length=16384, vocab_size=TOKEN_OFFSET + 256),
}


def get_task(task: str) -> TaskSpec:
    """The spec of `task`, or an error listing the known names."""
    if task not in TASKS:
        raise ValueError(f"task: unknown LRA task {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[task]


def check_split(split: str) -> str:
    """`split` itself, or an error naming the three valid splits."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return split


class LRADataset(torch.utils.data.Dataset):
    """Examples of one split of one task.

    Symbols are held as small integer arrays (uint8: the symbol index, without the +2 offset) and
    turned into ids on access, so a split of byte-level text costs one byte per character.
    `symbols` may be any sequence (a list, or a lazy reader that decodes a PNG per item).
    """

    def __init__(self, spec: TaskSpec, symbols: Sequence[np.ndarray], labels: Sequence[int], *, max_length: int,
                 synthetic: bool = False, symbols2: Sequence[np.ndarray] | None = None, split: str = "",
                 source: str = ""):
        if len(symbols) != len(labels) or (symbols2 is not None and len(symbols2) != len(labels)):
            raise ValueError("LRADataset: symbols, symbols2 and labels must have the same length")
        if spec.dual != (symbols2 is not None):
            raise ValueError(f"LRADataset: task {spec.name!r} {'needs' if spec.dual else 'takes no'} symbols2")
        self.spec = spec
        self.max_length = int(max_length)  # longest input_ids (CLS included) this dataset can yield
        self.synthetic = bool(synthetic)  # a stand-in, not the real task: label it so in reports
        self.split = split
        self.source = source  # where the examples came from, for reports and logs
        self._symbols = symbols
        self._symbols2 = symbols2
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": _with_cls(self._symbols[i], self.spec.cls_id), "label": int(self._labels[i])}
        if self._symbols2 is not None:
            item["input_ids2"] = _with_cls(self._symbols2[i], self.spec.cls_id)
        return item

    @property
    def labels(self) -> np.ndarray:
        """All labels, [len(self)] int64 (class balance, majority baselines)."""
        return self._labels

    def __repr__(self) -> str:
        return (f"LRADataset({self.spec.name}/{self.split}, {len(self)} examples, max_length={self.max_length}, "
                f"synthetic={self.synthetic}, source={self.source!r})")


def _with_cls(symbols: np.ndarray, cls_id: int) -> torch.Tensor:
    """[CLS, symbols + TOKEN_OFFSET] as a LongTensor."""
    ids = torch.empty(len(symbols) + 1, dtype=torch.long)
    ids[0] = cls_id
    ids[1:] = torch.from_numpy(np.asarray(symbols, dtype=np.int64)) + TOKEN_OFFSET
    return ids


def collate(batch: list[dict], pad_id: int = PAD_ID, pad_to_multiple: int | None = None) -> dict:
    """Pad a list of examples into a batch.

    -> {"input_ids": [B, L] long, "attention_mask": [B, L] bool (True = real token), "labels": [B] long}
    and for dual tasks "input_ids2", "attention_mask2", padded to the same L as the first documents
    (so a shared tower can run both as one [2B, L] batch). L is the longest sequence in the batch,
    rounded up to a multiple of pad_to_multiple when given.
    """
    if not batch:
        raise ValueError("collate: batch is empty")
    if pad_to_multiple is not None and pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple: expected a positive int or None, got {pad_to_multiple!r}")
    keys = ["input_ids"] + (["input_ids2"] if "input_ids2" in batch[0] else [])
    length = max(len(example[key]) for example in batch for key in keys)
    if pad_to_multiple:
        length = math.ceil(length / pad_to_multiple) * pad_to_multiple
    out = {}
    for key in keys:
        mask_key = key.replace("input_ids", "attention_mask")
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)  # (B, L)
        for row, example in enumerate(batch):
            seq = example[key]
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        out[key], out[mask_key] = ids, mask
    out["labels"] = torch.tensor([int(example["label"]) for example in batch], dtype=torch.long)
    return out
