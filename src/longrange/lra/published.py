"""The published Long Range Arena figures, as data (what `longrange lra report` sets ours beside).

Source: Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", ICLR 2021
(arXiv:2011.04006), Table 1 (test accuracy, %) and Table 2 (byte-level text classification,
batch 32, TPU v3: training steps per second and peak memory in GB at lengths 1K-4K); copied from
the project's REFERENCES.md §1. Path-X: every model in the paper FAILs (chance level).
"""

from __future__ import annotations

SOURCE = ("Tay et al., Long Range Arena: A Benchmark for Efficient Transformers, ICLR 2021 "
          "(arXiv:2011.04006), Tables 1 and 2")

#: the order of Table 1's columns (Path-X has no numbers: every model FAILs)
TASK_ORDER = ("listops", "text", "retrieval", "image", "pathfinder")

#: the paper's model name for each of our registered attentions (None: not in the paper)
PAPER_NAMES = {
    "full": "Transformer",
    "local": "Local Attention",
    "sparse_transformer": "Sparse Trans.",
    "longformer": "Longformer",
    "linformer": "Linformer",
    "reformer": "Reformer",
    "bigbird": "BigBird",
    "linear": "Linear Trans.",
    "performer": "Performer",
    "synthesizer": "Synthesizer",
}

#: Table 1: test accuracy (%) per model and task (+ the paper's average without Path-X)
ACCURACY = {
    "Transformer": {"listops": 36.37, "text": 64.27, "retrieval": 57.46, "image": 42.44, "pathfinder": 71.40,
                    "avg": 54.39},
    "Local Attention": {"listops": 15.82, "text": 52.98, "retrieval": 53.39, "image": 41.46, "pathfinder": 66.63,
                        "avg": 46.06},
    "Sparse Trans.": {"listops": 17.07, "text": 63.58, "retrieval": 59.59, "image": 44.24, "pathfinder": 71.71,
                      "avg": 51.24},
    "Longformer": {"listops": 35.63, "text": 62.85, "retrieval": 56.89, "image": 42.22, "pathfinder": 69.71,
                   "avg": 53.46},
    "Linformer": {"listops": 35.70, "text": 53.94, "retrieval": 52.27, "image": 38.56, "pathfinder": 76.34,
                  "avg": 51.36},
    "Reformer": {"listops": 37.27, "text": 56.10, "retrieval": 53.40, "image": 38.07, "pathfinder": 68.50,
                 "avg": 50.67},
    "Sinkhorn": {"listops": 33.67, "text": 61.20, "retrieval": 53.83, "image": 41.23, "pathfinder": 67.45,
                 "avg": 51.39},
    "Synthesizer": {"listops": 36.99, "text": 61.68, "retrieval": 54.67, "image": 41.61, "pathfinder": 69.45,
                    "avg": 52.88},
    "BigBird": {"listops": 36.05, "text": 64.02, "retrieval": 59.29, "image": 40.83, "pathfinder": 74.87,
                "avg": 55.01},
    "Linear Trans.": {"listops": 16.13, "text": 65.90, "retrieval": 53.09, "image": 42.34, "pathfinder": 75.30,
                      "avg": 50.55},
    "Performer": {"listops": 18.01, "text": 65.40, "retrieval": 53.82, "image": 42.77, "pathfinder": 77.05,
                  "avg": 51.41},
}

#: Table 2's lengths (byte-level text)
SPEED_LENGTHS = (1024, 2048, 3072, 4096)

#: Table 2: training steps per second at 1K, 2K, 3K, 4K
STEPS_PER_SECOND = {
    "Transformer": (8.1, 4.9, 2.3, 1.4),
    "Local Attention": (9.2, 8.4, 7.4, 7.4),
    "Linformer": (9.3, 9.1, 8.5, 7.7),
    "Reformer": (4.4, 2.2, 1.5, 1.1),
    "BigBird": (7.4, 3.9, 2.7, 1.5),
    "Linear Trans.": (9.1, 9.3, 8.6, 7.8),
    "Performer": (9.5, 9.4, 8.7, 8.0),
}

#: Table 2: peak memory (GB) at 1K, 2K, 3K, 4K
PEAK_MEMORY_GB = {
    "Transformer": (0.85, 2.65, 5.51, 9.48),
    "Local Attention": (0.42, 0.76, 1.06, 1.37),
    "Linformer": (0.37, 0.55, 0.99, 0.99),
    "Reformer": (0.48, 0.99, 1.53, 2.28),
    "BigBird": (0.77, 1.49, 2.18, 2.88),
    "Linear Trans.": (0.37, 0.57, 0.80, 1.03),
    "Performer": (0.37, 0.59, 0.82, 1.06),
}


def paper_name(attention: str) -> str | None:
    """The paper's model name for a registered attention, or None when the paper has no such model."""
    return PAPER_NAMES.get(attention)


def published_accuracy(attention: str, task: str) -> float | None:
    """Table 1 accuracy (%) of `attention` on `task` (pathx and unknown pairs: None)."""
    name = paper_name(attention)
    return ACCURACY.get(name, {}).get(task) if name else None


def published_speed(attention: str, length: int) -> tuple[float, float] | None:
    """(steps/s, peak GB) from Table 2 at the paper's length nearest to `length`, or None."""
    name = paper_name(attention)
    if name not in STEPS_PER_SECOND:
        return None
    i = min(range(len(SPEED_LENGTHS)), key=lambda j: abs(SPEED_LENGTHS[j] - length))
    return STEPS_PER_SECOND[name][i], PEAK_MEMORY_GB[name][i]
