"""Built-in tiny versions of the six tasks: `load_split(task, split)` with no data_dir.

Generated in memory, deterministically from `seed`, and cached per process (no files, no download).

| task | what | sizes (train/val/test) | input_ids length (CLS included) |
|---|---|---|---|
| listops, variant "tiny" | the LRA generator, 30 < length < 256, max_depth 6, max_args 6 | 5000/500/500 | <= 256 |
| listops, variant "short" | the LRA generator, 20 < length < 100, max_depth 4, max_args 5 | 10000/1000/1000 | <= 100 |
| text | synthetic (marker-word counting), 128-512 bytes | 4000/500/500 | <= 513 |
| retrieval | synthetic (shared citation key), 96-256 bytes per document | 4000/500/500 | <= 257 |
| image | synthetic (ten grey shapes), 32x32 | 5000/500/500 | 1025 |
| pathfinder | the Pathfinder-style generator, 32x32, 6 dashes per contour | 2000/250/250 | 1025 |
| pathx | the same at 128x128, 14 dashes per contour | 400/50/50 | 16385 |

"short" ListOps is the one a small model learns well above chance (10%) in minutes on a CPU; the
ListOps splits are one deduplicated draw cut into train/val/test, as LRA does. text, retrieval and
image are synthetic stand-ins (`synthetic=True`). Options: seed, sizes=(train, val, test),
variant (listops), resolution and difficulty (pathfinder, pathx).
"""

from __future__ import annotations

import functools

import numpy as np

from longrange.lra import listops, pathfinder, synthetic
from longrange.lra.tasks import SPLITS, LRADataset, TaskSpec

LISTOPS_VARIANTS = {
    "tiny": {"min_length": 30, "max_length": 256, "max_depth": 6, "max_args": 6},
    "short": {"min_length": 20, "max_length": 100, "max_depth": 4, "max_args": 5},
}
SIZES = {
    "listops": (5000, 500, 500), "listops-short": (10_000, 1000, 1000), "text": (4000, 500, 500),
    "retrieval": (4000, 500, 500), "image": (5000, 500, 500), "pathfinder": (2000, 250, 250), "pathx": (400, 50, 50),
}
TEXT_BYTES = (128, 512)
RETRIEVAL_BYTES = (96, 256)
PATHFINDER = {"pathfinder": (32, "curv_baseline"), "pathx": (128, "curv_contour_length_14")}
_OPTIONS = {
    "listops": {"seed", "sizes", "variant"}, "text": {"seed", "sizes"}, "retrieval": {"seed", "sizes"},
    "image": {"seed", "sizes"}, "pathfinder": {"seed", "sizes", "resolution", "difficulty"},
    "pathx": {"seed", "sizes", "resolution", "difficulty"},
}


def builtin_split(spec: TaskSpec, split: str, *, max_length: int | None = None, **options) -> LRADataset:
    """One split of the built-in tiny version of `spec`'s task (see the module docstring)."""
    unknown = sorted(set(options) - _OPTIONS[spec.name])
    if unknown:
        raise ValueError(f"load_split({spec.name!r}) built-in: unknown option(s) {unknown}; "
                         f"expected some of {sorted(_OPTIONS[spec.name])}")
    seed = int(options.get("seed", 0))
    key = spec.name + ("-short" if options.get("variant") == "short" else "")
    sizes = _check_sizes(options.get("sizes") or SIZES[key])
    source = f"built-in tiny {key} (seed {seed})"
    if spec.name == "listops":
        return _listops(spec, split, seed, sizes, options.get("variant", "tiny"), max_length, source)
    if spec.name in ("pathfinder", "pathx"):
        resolution, difficulty = PATHFINDER[spec.name]
        resolution = int(options.get("resolution", resolution))
        difficulty = options.get("difficulty", difficulty)
        return _pathfinder(spec, split, seed, sizes, resolution, difficulty, max_length, source)
    if spec.name == "image":
        _check_room(spec, 32 * 32, max_length)
        images, labels = _cached_images(seed, split, sizes[SPLITS.index(split)])
        return LRADataset(spec, list(images.reshape(len(labels), -1)), labels, max_length=1 + 32 * 32,
                          synthetic=True, split=split, source=source)
    cap = min(max_length or spec.max_length, (TEXT_BYTES if spec.name == "text" else RETRIEVAL_BYTES)[1])
    data = _cached_documents(spec.name, seed, split, sizes[SPLITS.index(split)])
    docs = [[doc[:cap] for doc in part] for part in data[:-1]]
    return LRADataset(spec, docs[0], data[-1], symbols2=docs[1] if spec.dual else None, max_length=1 + cap,
                      synthetic=True, split=split, source=source)


def _listops(spec, split, seed, sizes, variant, max_length, source) -> LRADataset:
    """Built-in ListOps: one deduplicated draw of train+val+test trees, cut in that order."""
    if variant not in LISTOPS_VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(LISTOPS_VARIANTS)}, got {variant!r}")
    longest = LISTOPS_VARIANTS[variant]["max_length"] - 1  # kept trees have length < max_length
    _check_room(spec, longest, max_length)
    symbols, labels = _cached_listops(variant, seed, sizes)
    lo = sum(sizes[: SPLITS.index(split)])
    hi = lo + sizes[SPLITS.index(split)]
    return LRADataset(spec, symbols[lo:hi], labels[lo:hi], max_length=1 + longest, split=split, source=source)


def _pathfinder(spec, split, seed, sizes, resolution, difficulty, max_length, source) -> LRADataset:
    """Built-in Pathfinder / Path-X images from the generator, each split from its own seed stream."""
    _check_room(spec, resolution * resolution, max_length)
    images, labels = _cached_pathfinder(seed, split, sizes[SPLITS.index(split)], resolution, difficulty)
    return LRADataset(spec, list(images.reshape(len(labels), -1)), labels, max_length=1 + resolution ** 2,
                      split=split, source=f"{source}, {resolution}x{resolution}, {difficulty}")


@functools.lru_cache(maxsize=8)
def _cached_listops(variant: str, seed: int, sizes: tuple[int, int, int]):
    """(symbol arrays, labels) of sum(sizes) distinct trees."""
    examples = listops.generate_examples(sum(sizes), seed=seed, **LISTOPS_VARIANTS[variant])
    return [listops.tokenize(text) for text, _ in examples], np.array([label for _, label in examples])


@functools.lru_cache(maxsize=16)
def _cached_pathfinder(seed: int, split: str, num: int, resolution: int, difficulty: str):
    """(images [num, R, R], labels [num]) for one split."""
    style = pathfinder.PathfinderStyle.for_resolution(resolution, difficulty)
    return pathfinder.generate_images(num, seed=_split_seed(seed, split), style=style)


@functools.lru_cache(maxsize=8)
def _cached_images(seed: int, split: str, num: int):
    """(images [num, 32, 32], labels [num]) of synthetic shapes for one split."""
    return synthetic.synthetic_images(num, np.random.default_rng([seed, SPLITS.index(split), 3]))


@functools.lru_cache(maxsize=16)
def _cached_documents(task: str, seed: int, split: str, num: int):
    """Synthetic text (docs, labels) or retrieval (docs1, docs2, labels) for one split."""
    words = synthetic.lexicon(seed)
    rng = np.random.default_rng([seed, SPLITS.index(split), 1 if task == "text" else 2])
    if task == "text":
        return synthetic.synthetic_text(num, rng, words, min_bytes=TEXT_BYTES[0], max_bytes=TEXT_BYTES[1])
    return synthetic.synthetic_retrieval(num, rng, words, min_bytes=RETRIEVAL_BYTES[0], max_bytes=RETRIEVAL_BYTES[1])


def _split_seed(seed: int, split: str) -> int:
    """A distinct seed per (seed, split), so the splits of a generated task do not share images."""
    return seed * 3 + SPLITS.index(split) + 1_000_003


def _check_sizes(sizes) -> tuple[int, int, int]:
    """(train, val, test) as three non-negative ints (a "train,val,test" string is accepted too)."""
    if isinstance(sizes, str):
        sizes = sizes.split(",")
    try:
        sizes = tuple(int(n) for n in sizes)
    except (TypeError, ValueError):
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 0:
        raise ValueError("sizes: expected (train, val, test) as three non-negative ints")
    return sizes


def _check_room(spec: TaskSpec, needed: int, max_length: int | None) -> None:
    """Built-in sequences that cannot be cut (ListOps, images) need max_length >= their length."""
    if max_length is not None and max_length < needed:
        raise ValueError(f"max_length: the built-in {spec.name} has sequences of up to {needed} tokens; "
                         f"got max_length={max_length}")
