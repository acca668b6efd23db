"""Atomic writes: a result file is the old one or the whole new one, never a part.

Every writer of results (run records, adapters, checkpoints, sweep selections, tables, figures,
the report) writes into a temporary file beside its target and renames it over the target once
its bytes are on disk, so a kill or a full disk mid-write never leaves a file that looks complete
and makes Snakemake or a reader take it for finished. The temporary name is unique (two writers
never collide), hidden and ends in ``.tmp``, so globs for results (``*.json``) never see one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


def temporary_pattern(path: str | os.PathLike) -> str:
    """The glob, in ``path``'s folder, of the temporary files a killed writer of ``path`` left."""
    return f".{glob.escape(Path(path).name)}.*{TEMPORARY_SUFFIX}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder for a writer to fill; when the block ends
    without error, fsync it and rename it over ``path``. On any exception (KeyboardInterrupt
    included) delete it, leaving ``path`` as it was, or absent if it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    temporary = Path(name)
    try:
        os.close(handle)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp's 0600 would make results unreadable to others
        yield temporary
        _fsync(temporary, os.O_RDONLY)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder; the rename is done either way
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
