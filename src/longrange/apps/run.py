"""What pretraining and fine-tuning runs share on top of `longrange.models.training`: the learning
rate schedule, a progress bar with tokens/s and ETA, and writing a model folder with its tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from longrange.apps.tokenizers import Tokenizer
from longrange.core.files import staged_folder
from longrange.models.checkpoint import write_checkpoint

APP_FILE = "longrange.app.json"


def linear_schedule(base: float, step: int, warmup: int, total: int) -> float:
    """BERT's schedule: linear warm-up over `warmup` steps to `base`, then linear decay to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * max(0.0, (total - step) / max(1, total - warmup))


def default_warmup(warmup: int | None, steps: int) -> int:
    """10% of the steps (at most 10,000) unless given."""
    return min(steps, warmup if warmup is not None else min(10_000, max(1, steps // 10)))


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, done: int, label: str):
    """A rich progress bar (steps, loss, tokens/s, elapsed, ETA); yields advance(info: str, tokens: int)."""
    if not enabled:
        yield lambda info, tokens=0: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("run", total=total, completed=done, info="")
        start, seen = time.perf_counter(), 0

        def advance(info: str, tokens: int = 0) -> None:
            nonlocal seen
            seen += tokens
            rate = seen / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, info=f"{info} · {rate:,.0f} tok/s" if tokens else info)

        yield advance


def save_model_folder(model, tokenizer: Tokenizer, folder: str | Path, info: dict) -> Path:
    """config.json + model.safetensors (the model), the tokenizer, and longrange.app.json (`info`:
    task, structure, metrics, ...), each written atomically (other files in an existing folder are kept)."""
    with staged_folder(folder) as tmp:
        write_checkpoint(model, tmp)
        tokenizer.save(tmp)
        (tmp / APP_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return Path(folder)


def read_app_info(folder: str | Path) -> dict:
    """longrange.app.json of a model folder ({} when absent, e.g. a `longrange convert` folder)."""
    path = Path(folder) / APP_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
