"""Writing files so that nothing is lost: each file atomically (a temporary file in the same folder,
flushed to disk, then renamed over the target), new folders and files with the user's umask,
writability checked before long work, and read errors that name the file.

    atomic_write(path, lambda tmp: tmp.write_text(text))   # `path` holds the old bytes or the new, never half
    with staged_folder(folder) as stage:                    # write files into `stage`; at the end they land in
        write_checkpoint(model, stage)                      #   `folder`, each replacing its namesake; nothing
                                                            #   else in `folder` is touched
    check_writable(folder, need_bytes=2**20)                # before training, not after it

A rename within one file system is atomic (POSIX), so readers and crashes see either the old file
or the complete new one. Data is fsync'ed before the rename and the folder after it, so a power cut
cannot leave a renamed but empty file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (the renames in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object], *, sync: bool = True) -> Path:
    """Create `path` (or replace it) with what `write(tmp)` writes to a temporary file beside it.

    The temporary file gets the mode a plain `open(path, "w")` would (0666 & ~umask), is fsync'ed
    (sync=True) and renamed over `path`. On any error (a full disk, Ctrl-C) it is removed and
    `path` keeps its old content, or stays absent."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600
        write(tmp)
        if sync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, *, sync: bool = True) -> Path:
    """atomic_write of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), sync=sync)


@contextlib.contextmanager
def staged_folder(folder: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files land in `folder`, on error it is removed.

    A new `folder` appears whole: the stage (beside it) is renamed into place. An existing one gets
    each staged file renamed over its namesake (atomic per file; every file is flushed to disk
    before the first rename, so a full disk stops the save before it changes anything) and keeps
    everything else: notes, sub-folders, tokenizer files. Folders and files get the user's umask.
    overwrite=False: a non-empty existing `folder` is a FileExistsError before anything is written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output {folder} exists and is not a folder")
    existing = folder.is_dir()
    if existing and not overwrite and any(folder.iterdir()):
        raise FileExistsError(f"output folder {folder} exists and is not empty (pass overwrite=True / "
                              "--overwrite)")
    if not existing:
        folder.parent.mkdir(parents=True, exist_ok=True)
    parent = folder if existing else folder.parent
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
    try:
        yield stage
        _finish_stage(stage)
        if existing:
            _merge_into(stage, folder)
        else:
            stage.rename(folder)
            fsync_folder(folder.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _finish_stage(stage: Path) -> None:
    """Give the stage what plain mkdir / open would (mkdtemp makes 0700, and writers such as
    safetensors' may make 0600): folders 0777 & ~umask, files 0666 & ~umask; then flush every file
    to disk, so that the renames that follow cannot leave an empty file behind."""
    mask = umask()
    os.chmod(stage, 0o777 & ~mask)
    for path in stage.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        if path.is_file():
            _fsync_file(path)


def _merge_into(stage: Path, folder: Path) -> None:
    """Move every file of `stage` over its namesake in `folder` (sub-folders merged likewise); the
    weights before the config that describes them (config.json last)."""
    for src in sorted(stage.iterdir(), key=lambda p: (p.name == "config.json", p.name)):
        dst = folder / src.name
        if src.is_dir() and not src.is_symlink():
            if dst.exists() and not dst.is_dir():
                raise NotADirectoryError(f"{dst} exists and is not a folder; cannot write {src.name}/ into {folder}")
            dst.mkdir(exist_ok=True)
            _merge_into(src, dst)
            continue
        os.replace(src, dst)
    fsync_folder(folder)


def sync_tree(folder: str | Path) -> None:
    """fsync every file under `folder` and the folder itself (before renaming it into place)."""
    folder = Path(folder)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)
    fsync_folder(folder)


def replace_folder(tmp: str | Path, final: str | Path) -> None:
    """Move the complete folder `tmp` to `final` (same file system): an old `final` is moved aside
    first and removed after, so `final` is at every moment the old folder or the new one."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_folder(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def nearest_existing(path: Path) -> Path:
    """`path` or its closest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: str | Path, what: str = "output", need_bytes: int = 0) -> None:
    """An OSError naming `folder` when files cannot be created there (read-only, not a folder, no
    permission) or its file system has fewer than `need_bytes` free; creates nothing that stays."""
    folder = Path(folder)
    base = nearest_existing(folder)
    if not base.is_dir():
        raise NotADirectoryError(f"{what} {folder}: {base} exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".longrange-write-test.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"{what} {folder} is not writable ({base}: {err.strerror or err})") from None
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise OSError(errno.ENOSPC, f"{what} {folder}: only {free / 2**20:.1f} MiB free on its file system "
                                        f"({base}), about {need_bytes / 2**20:.1f} MiB needed")


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: its message with the file it concerns."""
    text = err.strerror or str(err)
    if err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text
