"""ListOps: the generator with LRA's published rules, its text format, and the fixed token vocabulary.

Follows `lra_benchmarks/data/listops.py`: operators `[MIN [MAX [MED [SM` closed by `]`, leaves 0-9;
MED = int(median), SM = sum % 10. A node below `max_depth` is an operator with probability 0.25,
otherwise a leaf; an operator takes randint(2, max_args) children one level deeper; the root is at
depth 1; at max_depth always a leaf. Length counts operators, `]` and leaves; a tree is kept when
min_length < length < max_length. Trees are nested pairs, written with parentheses around every pair:

    ((("[MAX", 2), 9), "]")   ->   "( ( ( [MAX 2 ) 9 ) ] )"   -> label 9

Two departures, both for reproducibility: the random streams are seeded `random.Random`s, and
duplicates are dropped keeping first-seen order (LRA iterates a Python set, whose order changes
from run to run).

Candidate trees are drawn in chunks of `CHUNK_DRAWS`, chunk k from its own stream seeded with
the string `longrange-listops/{seed}/{k}`; the chunks' kept trees are merged in chunk order,
duplicates dropped, until `num` are found. A chunk depends on (seed, k) alone, so `workers`
processes computing chunks side by side give exactly the examples, in exactly the order, of one
process computing them one after the other:

    examples = generate_examples(96_000, seed=0, workers=16)   # == generate_examples(96_000, seed=0)
    examples_digest(examples[:1000])                           # SHA-256 of the first 1K, to compare runs
"""

from __future__ import annotations

import hashlib
import itertools
import random
import statistics

import numpy as np

MIN, MAX, MED, SUM_MOD = "[MIN", "[MAX", "[MED", "[SM"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
END = "]"
VALUES = tuple(range(10))
VALUE_P = 0.25  # probability that a node above max_depth is an operator
#: the fixed vocabulary: symbol index k has token id k + 2 (0 = pad, 1 = CLS)
SYMBOLS = tuple(str(v) for v in VALUES) + OPERATORS + (END,)
SYMBOL_INDEX = {symbol: k for k, symbol in enumerate(SYMBOLS)}
#: the paper's generator settings; `generate_examples` defaults to them
PAPER = {"min_length": 500, "max_length": 2000, "max_depth": 10, "max_args": 10}
PAPER_SIZES = (96_000, 2_000, 2_000)
#: candidate trees per seeded chunk; part of the stream's definition (another value gives other examples)
CHUNK_DRAWS = 1024


def generate_tree(rng: random.Random, depth: int = 1, max_depth: int = 10, max_args: int = 10):
    """A random tree (nested pairs) and its length, drawn exactly as LRA's `generate_tree`."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.choice(VALUES), 1
    length = 2  # the operator and its "]"
    values = []
    for _ in range(rng.randint(2, max_args)):
        sub_tree, sub_length = generate_tree(rng, depth + 1, max_depth, max_args)
        values.append(sub_tree)
        length += sub_length
    tree = (rng.choice(OPERATORS), values[0])
    for value in values[1:]:
        tree = (tree, value)
    return (tree, END), length


def to_string(tree) -> str:
    """The tree in LRA's text format: parentheses around every pair."""
    if not isinstance(tree, tuple):
        return str(tree)
    return "( " + to_string(tree[0]) + " " + to_string(tree[1]) + " )"


def to_value(tree):
    """The tree's value (an int 0-9), evaluated as LRA's `to_value` does."""
    if not isinstance(tree, tuple):
        return tree
    left, right = to_value(tree[0]), to_value(tree[1])
    if left in OPERATORS:  # an operator with its first argument
        return (left, [right])
    if right == END:  # a complete operator
        return apply_operator(left[0], left[1])
    return (left[0], left[1] + [right])  # one more argument


def apply_operator(op: str, args: list[int]) -> int:
    """MIN, MAX, MED = int(median), SM = sum % 10."""
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == MED:
        return int(statistics.median(args))
    if op == SUM_MOD:
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def generate_examples(num: int, *, seed: int = 0, min_length: int = 500, max_length: int = 2000,
                      max_depth: int = 10, max_args: int = 10, max_tries: int | None = None,
                      workers: int = 1, progress=None) -> list[tuple[str, int]]:
    """`num` distinct (source text, label) pairs whose trees satisfy min_length < length < max_length.

    Draws at most `max_tries` candidate trees (rounded up to whole chunks). `workers` > 1 computes
    chunks in that many processes; the result is the same for every `workers` (module docstring).
    progress(kept, num, drawn): called after each chunk (distinct trees kept so far, candidates drawn)."""
    _check_settings(min_length=min_length, max_length=max_length, max_depth=max_depth, max_args=max_args)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers: expected a positive int, got {workers!r}")
    max_tries = max_tries if max_tries is not None else 2_000 * num + 100_000
    max_chunks = -(-max_tries // CHUNK_DRAWS)
    rules = (seed, min_length, max_length, max_depth, max_args)
    kept: dict[str, int] = {}  # insertion-ordered dedup
    if num > 0:
        chunks = _chunks_in_processes(rules, max_chunks, workers) if workers > 1 else \
            (draw_chunk(*rules, chunk=k) for k in range(max_chunks))
        try:
            for k, examples in enumerate(chunks):
                for text, label in examples:
                    kept.setdefault(text, label)
                if progress is not None:
                    progress(min(len(kept), num), num, (k + 1) * CHUNK_DRAWS)
                if len(kept) >= num:
                    break
        finally:
            chunks.close()  # stops the worker processes early
    if len(kept) < num:
        raise RuntimeError(f"ListOps: found only {len(kept)} of {num} distinct trees with {min_length} < length < "
                           f"{max_length} (max_depth={max_depth}, max_args={max_args}) in {max_chunks * CHUNK_DRAWS} "
                           f"draws; widen the length window or raise max_depth/max_args")
    return list(kept.items())[:num]


def draw_chunk(seed: int, min_length: int, max_length: int, max_depth: int, max_args: int, *,
               chunk: int) -> list[tuple[str, int]]:
    """The (text, label) of every tree kept among chunk `chunk`'s CHUNK_DRAWS draws, in draw order."""
    rng = random.Random(f"longrange-listops/{seed}/{chunk}")  # str seeds go through SHA-512: stable everywhere
    kept = []
    for _ in range(CHUNK_DRAWS):
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if min_length < length < max_length:
            kept.append((to_string(tree), int(to_value(tree))))
    return kept


def _draw_chunk_args(args: tuple) -> list[tuple[str, int]]:
    *rules, chunk = args
    return draw_chunk(*rules, chunk=chunk)


def _chunks_in_processes(rules: tuple, max_chunks: int, workers: int):
    """Chunks 0, 1, ... computed by `workers` processes, yielded in chunk order (a generator; close()
    it to stop early). At most 4 chunks per worker are in flight ahead of the consumer."""
    import concurrent.futures
    import multiprocessing

    # spawn: the workers never touch torch, but the parent may hold threads that fork would copy
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        todo = iter(range(max_chunks))
        pending = [pool.submit(_draw_chunk_args, (*rules, k)) for k in itertools.islice(todo, 4 * workers)]
        while pending:
            result = pending.pop(0).result()
            pending += [pool.submit(_draw_chunk_args, (*rules, k)) for k in itertools.islice(todo, 1)]
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def examples_digest(examples) -> str:
    """SHA-256 (hex) of (text, label) pairs as TSV rows `text<TAB>label\\n`: one line to compare two draws."""
    h = hashlib.sha256()
    for text, label in examples:
        h.update(f"{text}\t{label}\n".encode())
    return h.hexdigest()


def _check_settings(*, min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
    """Reject generator settings that cannot produce a tree."""
    if not 0 <= min_length < max_length - 1:
        raise ValueError(f"ListOps: need 0 <= min_length < max_length - 1, got min_length={min_length}, "
                         f"max_length={max_length}")
    if max_depth < 1:
        raise ValueError(f"ListOps: max_depth must be >= 1, got {max_depth}")
    if max_args < 2:
        raise ValueError(f"ListOps: max_args must be >= 2, got {max_args}")


def tokenize(source: str) -> np.ndarray:
    """Symbol indices of a source text: delete "(" and ")", split on whitespace (LRA's pipeline).

    Raises KeyError naming the first unknown token.
    """
    tokens = source.replace("(", "").replace(")", "").split()
    try:
        return np.fromiter((SYMBOL_INDEX[t] for t in tokens), dtype=np.uint8, count=len(tokens))
    except KeyError as err:
        raise KeyError(f"unknown ListOps token {err.args[0]!r} (expected one of {' '.join(SYMBOLS)})") from None
