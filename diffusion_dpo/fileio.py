"""Files that are either absent or whole: written under a temporary name, flushed, then renamed.

A process killed while writing (SIGKILL, a power cut) leaves at most the temporary file, never a truncated
``path`` that a rerun would trust; ``os.replace`` is atomic on POSIX and Windows.

    atomic_write_text(out / "report.json", json.dumps(report))
    atomic_write(out / "grid.png", lambda tmp: image.save(tmp, format="PNG"))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def tmp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under: ``NAME.tmp`` beside it (readers that glob ``*.parquet``
    or ``*.png`` skip it)."""
    return path.with_name(path.name + ".tmp")


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (a rename), from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, writer: Callable[[Path], None], *, durable: bool = True) -> Path:
    """Call ``writer(tmp)`` to write the whole file under a temporary name, then rename it to ``path``.

    ``durable``: fsync the file before the rename and the folder after it, so the file survives a power cut
    too (a SIGKILL only needs the rename). A writer that fails leaves ``path`` as it was and removes the
    temporary file.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        writer(tmp)
        if durable:
            fsync_path(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), durable=durable)
