"""Readers for Long Range Arena's released files, each pointed at a local folder (nothing is downloaded).

What data_dir holds, per task (a sub-folder named in brackets is looked into too):
- listops: `basic_{train,val,test}.tsv` [`listops-1000/`]; header `Source<TAB>Target`, then `source<TAB>label`.
- text: IMDb, aclImdb's `{train,test}/{pos,neg}/*.txt` [`aclImdb/`], or `{split}*.csv` / `{split}*.parquet`
  with `text` and `label` columns. LRA has no IMDb val split: val reads the test data unless a val file exists.
- retrieval: `new_aan_pairs.{train,eval,test}.tsv` [`tsv_data/`]; no header, `label id1 id2 text1 text2`
  separated by tabs, no quote handling.
- image: CIFAR-10 Python batches `data_batch_1..5`, `test_batch` [`cifar-10-batches-py/`].
- pathfinder, pathx: a difficulty folder (`curv_contour_length_14` by default) [`pathfinder32/`,
  `pathfinder128/`] holding `metadata/*.npy` (text, one line per image: `sub-folder file-name _ label ...`)
  and the PNGs.

Task definitions kept from LRA: text and retrieval are byte level and truncated to max_length
(retrieval first cuts each text at 10,000 characters); a ListOps row longer than max_length is an
error (LRA's pipeline fails on it too); CIFAR-10 is turned grey as `tf.image.rgb_to_grayscale`
does; Pathfinder skips empty (0-byte) PNGs and splits 80/10/10 after a seeded shuffle.
Every malformed line fails with `LRADataError` naming file:line and what was expected.
"""

from __future__ import annotations

import csv
import math
import pickle
import re
from pathlib import Path

import numpy as np

from longrange.lra import listops
from longrange.lra.tasks import LRADataError, LRADataset, TaskSpec

RETRIEVAL_CHAR_LIMIT = 10_000  # LRA cuts each AAN text at 10,000 characters before tokenising
PATHFINDER_DIFFICULTY = "curv_contour_length_14"  # the difficulty everyone reports
_RESOLUTION = {"pathfinder": 32, "pathx": 128}


def load_released(spec: TaskSpec, split: str, data_dir: Path, *, max_length: int | None = None,
                  **options) -> LRADataset:
    """One split of `spec`'s task from LRA's released files under data_dir (see the module docstring)."""
    if not data_dir.exists():
        raise FileNotFoundError(f"data_dir: {data_dir} does not exist")
    loader, allowed = _LOADERS[spec.name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"load_split({spec.name!r}, data_dir=...): unknown option(s) {unknown}; "
                         f"this loader takes {sorted(allowed) or 'none'}")
    return loader(spec, split, data_dir, max_length=max_length or spec.max_length, **options)


# ---------------------------------------------------------------------------------------------- ListOps
def load_listops(spec: TaskSpec, split: str, data_dir: Path, *, max_length: int) -> LRADataset:
    """`basic_{split}.tsv`: header `Source\\tTarget`; parentheses deleted, tokens split on whitespace."""
    path = _find(data_dir, [f"basic_{split}.tsv", f"listops-1000/basic_{split}.tsv"])
    symbols, labels = [], []
    lines = text_lines(path)
    _, header = next(lines, (1, ""))
    if header.split("\t") != ["Source", "Target"]:
        raise LRADataError(f"{path}:1: expected the header 'Source<TAB>Target', got {header[:60]!r}")
    for lineno, line in lines:
        if not line.strip():
            continue
        tokens, label = _listops_row(line, spec, max_length, where=f"{path}:{lineno}")
        symbols.append(tokens)
        labels.append(label)
    return LRADataset(spec, symbols, labels, max_length=1 + max_length, split=split, source=str(path))


def _listops_row(line: str, spec: TaskSpec, max_length: int, where: str) -> tuple[np.ndarray, int]:
    """Symbols and label of one `source<TAB>target` row."""
    fields = line.split("\t")
    if len(fields) != 2:
        raise LRADataError(f"{where}: expected 2 tab-separated fields (Source, Target), got {len(fields)}")
    try:
        tokens = listops.tokenize(fields[0])
    except KeyError as err:
        raise LRADataError(f"{where}: {err.args[0]}") from None
    if len(tokens) == 0:
        raise LRADataError(f"{where}: empty Source")
    if len(tokens) > max_length:
        raise LRADataError(f"{where}: {len(tokens)} tokens, more than max_length={max_length} (LRA does not "
                           f"truncate ListOps); pass a larger max_length")
    return tokens, _label(fields[1], spec.num_classes, where)


# ---------------------------------------------------------------------------------------------- text (IMDb)
def load_text(spec: TaskSpec, split: str, data_dir: Path, *, max_length: int) -> LRADataset:
    """IMDb reviews as UTF-8 bytes, truncated to max_length; neg = 0, pos = 1."""
    root = data_dir / "aclImdb" if (data_dir / "aclImdb").is_dir() else data_dir
    folder = "train" if split == "train" else "test"  # LRA: the test split serves as val and test
    if (root / folder / "pos").is_dir() or (root / folder / "neg").is_dir():
        texts, labels = _imdb_folder(root / folder)
        source = str(root / folder)
    else:
        path = _imdb_table_file(data_dir, split)
        texts, labels = _read_table(path, spec)
        source = str(path)
    symbols = [np.frombuffer(text[:max_length], dtype=np.uint8) for text in texts]
    return LRADataset(spec, symbols, labels, max_length=1 + max_length, split=split, source=source)


def _imdb_folder(folder: Path) -> tuple[list[bytes], list[int]]:
    """aclImdb's `neg/*.txt` (label 0) then `pos/*.txt` (label 1), each in file-name order."""
    texts, labels = [], []
    for label, name in enumerate(("neg", "pos")):
        if not (folder / name).is_dir():
            raise LRADataError(f"{folder / name}: missing (aclImdb layout: {folder}/pos and {folder}/neg)")
        for path in sorted((folder / name).glob("*.txt")):
            texts.append(path.read_bytes())
            labels.append(label)
    if not texts:
        raise LRADataError(f"{folder}: no *.txt reviews under pos/ or neg/")
    return texts, labels


def _imdb_table_file(data_dir: Path, split: str) -> Path:
    """`{split}*.csv` or `{split}*.parquet` in data_dir (or one level down); val falls back to test."""
    for name in ([split] if split != "val" else ["val", "valid", "validation", "test"]):
        found = sorted(p for pattern in (f"{name}*.csv", f"{name}*.parquet", f"*/{name}*.csv", f"*/{name}*.parquet")
                       for p in data_dir.glob(pattern))
        if len(found) > 1:
            raise LRADataError(f"{data_dir}: several {name} files {[str(p) for p in found]}; keep one per split")
        if found:
            return found[0]
    raise FileNotFoundError(f"{data_dir}: no IMDb data for split {split!r}: expected aclImdb/{{train,test}}/{{pos,neg}}"
                            f"/*.txt or {split}.csv / {split}.parquet with columns text,label")


def _read_table(path: Path, spec: TaskSpec) -> tuple[list[bytes], list[int]]:
    """(text bytes, label) rows of a CSV (with a header) or Parquet file with `text` and `label` columns."""
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        rows = _csv_rows(path)
    texts, labels = [], []
    for where, text, label in rows:
        texts.append(text.encode("utf-8"))
        labels.append(_label(label, spec.num_classes, where))
    return texts, labels


def _csv_rows(path: Path):
    """(file:line, text, label) per row of a CSV with `text` and `label` columns."""
    reader = csv.DictReader(line for _, line in text_lines(path, keep_ends=True))  # UTF-8 errors name file:line
    missing = {"text", "label"} - set(reader.fieldnames or [])
    if missing:
        raise LRADataError(f"{path}:1: missing column(s) {sorted(missing)}; expected a header with text,label")
    for row in reader:
        if row["text"] is None or row["label"] is None:
            raise LRADataError(f"{path}:{reader.line_num}: expected fields text and label")
        yield f"{path}:{reader.line_num}", row["text"], row["label"]


def _parquet_rows(path: Path):
    """(file row N, text, label) per row of a Parquet file (needs pandas and pyarrow)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(f"reading {path} needs pandas and pyarrow (pip install pandas pyarrow), or convert it "
                          "to CSV with columns text,label") from None
    frame = pd.read_parquet(path)
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise LRADataError(f"{path}: missing column(s) {sorted(missing)}; expected columns text,label")
    for i, (text, label) in enumerate(zip(frame["text"], frame["label"], strict=True)):
        yield f"{path} row {i}", str(text), str(label)


# ---------------------------------------------------------------------------------------------- retrieval (AAN)
def load_retrieval(spec: TaskSpec, split: str, data_dir: Path, *, max_length: int) -> LRADataset:
    """`new_aan_pairs.{train,eval,test}.tsv`: label, id1, id2, text1, text2; tab-split, no quote handling."""
    name = {"train": "train", "val": "eval", "test": "test"}[split]
    path = _find(data_dir, [f"new_aan_pairs.{name}.tsv", f"tsv_data/new_aan_pairs.{name}.tsv"])
    firsts, seconds, labels = [], [], []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 5:
            raise LRADataError(f"{path}:{lineno}: expected 5 tab-separated fields (label, id1, id2, text1, "
                               f"text2), got {len(fields)}")
        labels.append(_label(fields[0], spec.num_classes, f"{path}:{lineno}"))
        firsts.append(_document_bytes(fields[3], max_length))
        seconds.append(_document_bytes(fields[4], max_length))
    return LRADataset(spec, firsts, labels, symbols2=seconds, max_length=1 + max_length, split=split,
                      source=str(path))


def _document_bytes(text: str, max_length: int) -> np.ndarray:
    """An AAN text as bytes: cut at 10,000 characters, UTF-8, then truncated to max_length bytes."""
    return np.frombuffer(text[:RETRIEVAL_CHAR_LIMIT].encode("utf-8")[:max_length], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- image (CIFAR-10)
def load_image(spec: TaskSpec, split: str, data_dir: Path, *, max_length: int) -> LRADataset:
    """CIFAR-10 in grey: train = first 90% of data_batch_1..5 (45,000), val = last 10% (5,000), test = test_batch."""
    _check_fits(spec, 32 * 32, max_length)
    root = data_dir / "cifar-10-batches-py" if (data_dir / "cifar-10-batches-py").is_dir() else data_dir
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    batches = [_cifar_batch(_find(root, [name])) for name in names]
    pixels = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    if split != "test":
        cut = len(labels) * 9 // 10
        pixels, labels = (pixels[:cut], labels[:cut]) if split == "train" else (pixels[cut:], labels[cut:])
    grey = rgb_to_grey(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)).reshape(len(labels), -1)
    return LRADataset(spec, list(grey), labels, max_length=1 + 32 * 32, split=split, source=str(root))


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 -> [...] uint8 as `tf.image.rgb_to_grayscale`: ITU-R 601 luma on [0, 1] floats
    (0.2989 R + 0.5870 G + 0.1140 B, float32), back to uint8 by x 255.5 and truncation."""
    weights = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
    luma = (rgb.astype(np.float32) * np.float32(1 / 255)) @ weights
    return (luma * np.float32(255.5)).astype(np.uint8)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only (CIFAR-10 batches); anything else is refused."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR-10 batch)")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [N, 3072] uint8 as R plane, G plane, B plane; labels [N]) of one CIFAR-10 Python batch."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise LRADataError(f"{path}: not a CIFAR-10 Python batch ({err})") from None
    if not isinstance(batch, dict):
        raise LRADataError(f"{path}: expected a dict with b'data' and b'labels', got {type(batch).__name__}")
    data, labels = batch.get(b"data", batch.get("data")), batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise LRADataError(f"{path}: missing b'data' or b'labels' (keys: {sorted(map(str, batch))})")
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise LRADataError(f"{path}: expected data [N, 3072] uint8 and N labels, got data {data.dtype} "
                           f"{list(data.shape)} and {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if len(bad):
        raise LRADataError(f"{path}: label {labels[bad[0]]} at row {bad[0]} is out of range (expected 0..9)")
    return data, labels


# ---------------------------------------------------------------------------------------------- Pathfinder, Path-X
def load_pathfinder(spec: TaskSpec, split: str, data_dir: Path, *, max_length: int,
                    difficulty: str = PATHFINDER_DIFFICULTY, split_seed: int | None = 0,
                    resolution: int | None = None) -> LRADataset:
    """PNG images listed by `metadata/*.npy` (text): 80/10/10 of all images after a shuffle by split_seed
    (None keeps file order). Images are decoded on access; empty (0-byte) PNGs are skipped."""
    resolution = resolution or _RESOLUTION[spec.name]
    _check_fits(spec, resolution * resolution, max_length)
    root = _pathfinder_root(data_dir, difficulty, resolution)
    samples = read_pathfinder_metadata(root)
    order = np.arange(len(samples))
    if split_seed is not None:
        np.random.default_rng(split_seed).shuffle(order)
    n_train, n_val, _ = pathfinder_split_sizes(len(samples))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(samples))}
    lo, hi = bounds[split]
    chosen = [samples[i] for i in order[lo:hi]]
    return LRADataset(spec, _PngImages([p for p, _ in chosen], resolution), [label for _, label in chosen],
                      max_length=1 + resolution * resolution, split=split, source=str(root))


def pathfinder_split_sizes(num_images: int) -> tuple[int, int, int]:
    """(train, val, test) sizes of LRA's 80/10/10 split: 200,000 images -> 160,000 / 20,000 / 20,000."""
    tenth = num_images // 10
    return num_images - 2 * tenth, tenth, tenth


def _pathfinder_root(data_dir: Path, difficulty: str, resolution: int) -> Path:
    """The folder holding `metadata/`: data_dir itself, data_dir/difficulty or data_dir/pathfinder{R}/difficulty."""
    candidates = [data_dir, data_dir / difficulty, data_dir / f"pathfinder{resolution}" / difficulty]
    for root in candidates:
        if (root / "metadata").is_dir():
            return root
    raise FileNotFoundError(f"data_dir: no Pathfinder metadata/ folder in any of {[str(c) for c in candidates]}")


def read_pathfinder_metadata(root: Path) -> list[tuple[Path, int]]:
    """(PNG path, label) for every line of root/metadata/*.npy, in numeric file order; 0-byte PNGs skipped.

    Each line: field 0 = sub-folder, 1 = file name, 3 = label (0 or 1); further fields are ignored.
    """
    files = sorted((root / "metadata").glob("*.npy"), key=_numeric_key)
    if not files:
        raise FileNotFoundError(f"{root / 'metadata'}: no *.npy metadata files")
    samples = []
    for meta in files:
        for lineno, line in text_lines(meta):
            fields = line.split()
            if not fields:
                continue
            where = f"{meta}:{lineno}"
            if len(fields) < 4:
                raise LRADataError(f"{where}: expected at least 4 space-separated fields (sub-folder, file "
                                   f"name, _, label), got {len(fields)}")
            label = _label(fields[3], 2, where)
            path = root / fields[0] / fields[1]
            if not path.is_file():
                raise LRADataError(f"{where}: image {path} does not exist")
            if path.stat().st_size > 0:  # LRA skips the release's empty images
                samples.append((path, label))
    return samples


def _numeric_key(path: Path):
    """Sort metadata/2.npy before metadata/10.npy."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]


class _PngImages:
    """A lazy sequence of grey PNGs, each decoded on access to a flat [R*R] uint8 array."""

    def __init__(self, paths: list[Path], resolution: int):
        self.paths, self.resolution = paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L"), dtype=np.uint8)
        except OSError as err:
            raise LRADataError(f"{path}: cannot decode PNG ({err})") from None
        if pixels.shape != (self.resolution, self.resolution):
            raise LRADataError(f"{path}: expected a {self.resolution}x{self.resolution} image, got "
                               f"{pixels.shape[1]}x{pixels.shape[0]}")
        return pixels.reshape(-1)


# ---------------------------------------------------------------------------------------------- helpers
def text_lines(path: Path, keep_ends: bool = False):
    """(line number, line without its end, or with it when keep_ends) of a UTF-8 text file, read as
    bytes and decoded line by line: bytes that are not UTF-8 (binary garbage, another encoding) are an
    LRADataError naming file:line, not a UnicodeDecodeError without them."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LRADataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                   f"{err.start + 1}); expected a text file, is this the right file?") from None
            yield lineno, line if keep_ends else line.rstrip("\r\n")


def _find(data_dir: Path, names: list[str]) -> Path:
    """The first of data_dir/name that exists, or an error listing them all."""
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"data_dir: none of {[str(data_dir / n) for n in names]} exists")


def _label(text: str, num_classes: int, where: str) -> int:
    """An integer label in 0..num_classes-1 ("1" and "1.0" both read as 1), or an error naming `where`."""
    try:
        value = float(text)
    except ValueError:
        raise LRADataError(f"{where}: label {text!r} is not a number (expected 0..{num_classes - 1})") from None
    if not math.isfinite(value) or value != int(value) or not 0 <= value < num_classes:
        raise LRADataError(f"{where}: label {text!r} is out of range (expected an integer 0..{num_classes - 1})")
    return int(value)


def _check_fits(spec: TaskSpec, length: int, max_length: int) -> None:
    """Images cannot be truncated: max_length must hold every pixel."""
    if max_length < length:
        raise ValueError(f"max_length: {spec.name} images have {length} pixels; got max_length={max_length}")


_LOADERS = {
    "listops": (load_listops, ()),
    "text": (load_text, ()),
    "retrieval": (load_retrieval, ()),
    "image": (load_image, ()),
    "pathfinder": (load_pathfinder, ("difficulty", "split_seed", "resolution")),
    "pathx": (load_pathfinder, ("difficulty", "split_seed", "resolution")),
}
