"""Helpers for the tests' spawned worker processes (DDP over gloo)."""

from __future__ import annotations

import os
from pathlib import Path


def own_output(path: str | Path) -> None:
    """Send this worker's stdout and stderr to its own file instead of the pytest capture files it
    inherited: workers writing into the parent's capture were seen to abort ("terminate called
    without an active exception"), depending on which tests ran before."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
