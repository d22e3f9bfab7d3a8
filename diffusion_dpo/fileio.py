"""Files that are either absent or whole: written under a temporary name, flushed, then renamed.

A process killed while writing (SIGKILL, a power cut) leaves at most the temporary file, never a truncated
``path`` that a rerun would trust; ``os.replace`` is atomic on POSIX and Windows.

    atomic_write_text(out / "report.json", json.dumps(report))
    atomic_write(out / "grid.png", lambda tmp: image.save(tmp, format="PNG"))

Reading and making paths with errors that name them: :func:`read_text` (a UTF-8 file) and :func:`make_folder`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

from diffusion_dpo.errors import InputError


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


# ------------------------------------------------------------------------------- reading and making paths

def not_a_file(path: str | Path) -> str:
    """Why ``path``, which is not a file, cannot be read as one: "is a folder; expected a file" or "does not
    exist"."""
    return "is a folder; expected a file" if Path(path).is_dir() else "does not exist"


def read_text(path: str | Path, what: str = "file", error: type[InputError] = InputError) -> str:
    """The whole of a UTF-8 text file ``path`` (``what`` names it in errors: "config file", "prompt file").

    Raises ``error`` (an InputError) naming the file when it does not exist, is a folder, cannot be read, or
    is not UTF-8 (then with the line and the byte of the first undecodable byte), never a raw OSError or
    UnicodeDecodeError."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} {not_a_file(path)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{what} {path}, line {line}: byte {e.start - line_start + 1} of the line "
                    f"(0x{data[e.start]:02x}) is not UTF-8; expected UTF-8 text (save the file as UTF-8)") from None


def check_folder(path: str | Path, what: str = "output_dir") -> Path:
    """Raise InputError naming ``path`` and why when it cannot be, or become, a folder this process writes
    into (a file in the way, a name too long, no permission), without creating anything: bad input found
    later must leave no folder behind. :func:`make_folder` creates it."""
    path = Path(path)
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as e:  # the kernel's answer for a name too long, or a path it cannot look up
        raise InputError(f"{what} {path} cannot be created: {_reason(e)}") from None
    if not existing.is_dir():
        raise InputError(f"{what} {path}: {existing} is a file; expected a folder (or a path that does not "
                         "exist yet)")
    longest = max(len(os.fsencode(part)) for part in path.parts)
    if longest > os.pathconf(existing, "PC_NAME_MAX"):
        raise InputError(f"{what} {path} cannot be created: the name is too long ({longest} bytes in one part)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path} cannot be {'written into' if existing == path else 'created'}: "
                         f"permission denied on {existing}")
    return path


def _reason(e: OSError) -> str:
    return "the name is too long" if e.errno == errno.ENAMETOOLONG else (e.strerror or str(e))


def make_folder(path: str | Path, what: str = "output_dir") -> Path:
    """Create folder ``path`` (and its parents) unless it exists; InputError naming ``path`` and why when it
    cannot be made or written into (a file in the way, no permission, a read-only disk, a name too long)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise InputError(f"{what} {path}: {in_the_way} is a file; expected a folder (or a path that does not "
                         "exist yet)") from None
    except OSError as e:
        raise InputError(f"{what} {path} cannot be created: {_reason(e)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path} cannot be written into: permission denied")
    return path
