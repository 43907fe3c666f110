"""Where a split comes from: the built-in tiny version of a task (generated in memory) or LRA's
released files (`longrange.lra.loaders`). `tasks` defines what the tasks are; this module picks a source."""

from __future__ import annotations

from pathlib import Path

from longrange.lra.builtin import builtin_split
from longrange.lra.loaders import load_released
from longrange.lra.tasks import LRADataset, check_split, get_task


def load_split(task: str, split: str, data_dir: str | Path | None = None, *, max_length: int | None = None,
               **options) -> LRADataset:
    """One split ("train", "val" or "test") of one LRA task.

    data_dir None -> the built-in tiny version of the task (generated deterministically in memory,
    no download; text, retrieval and image are synthetic stand-ins, `synthetic=True`). Otherwise read
    LRA's released files from data_dir (see `longrange.lra.loaders` for each task's layout).
    max_length counts task tokens per document (CLS not counted), default the task's length: text
    and retrieval are truncated to it (LRA's task definition); a longer ListOps row is an error.
    Options -- built-in: seed, sizes=(train, val, test), variant ("tiny"|"short", ListOps),
    resolution (Pathfinder); files: difficulty, split_seed (Pathfinder/Path-X).
    """
    spec = get_task(task)
    check_split(split)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
    if data_dir is None:
        return builtin_split(spec, split, max_length=max_length, **options)
    return load_released(spec, split, Path(data_dir), max_length=max_length, **options)
