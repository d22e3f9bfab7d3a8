"""One writer per run folder: ``<output_dir>/run.lock``, taken before anything else is written there.

The lock is an exclusive ``flock`` on that file, which the kernel releases when its process ends however it
ends (SIGKILL, power loss of a node aside), plus a record of its holder in the file (host, PID, start time,
command) so a refused launch can name it. A file whose lock is not held (its process died without
releasing it) is stale: the next launch takes it over and says whose it was. Only the main process of a
multi-process launch takes the lock; the others write under its protection (they start after it, behind a
barrier). A process that already holds a folder's lock (a recipe that failed in-process, then ran again, as
the tests do) takes it again without a conflict.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import make_folder

LOCK_FILE = "run.lock"


class RunLock:
    """The held lock of one folder; :meth:`release` (also at exit) removes the file and unlocks it."""

    def __init__(self, out: Path, fd: int):
        self.out, self.fd = out, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        _HELD.pop(self.out, None)
        # Unlink while still locked: a launch waiting on the old file then sees it gone and retries.
        (self.out / LOCK_FILE).unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


_HELD: dict[Path, RunLock] = {}


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


def _holder(text: str) -> dict:
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that left no record"
    return (f"process {holder.get('pid')} on host {holder.get('host')} ({holder.get('command', '?')}, "
            f"started {holder.get('started', '?')})")


def _alive(holder: dict) -> bool:
    """Whether the recorded holder still runs; only knowable on this host."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(out: Path, command: str) -> RunLock:
    """Take ``out``'s lock for ``command`` (creating ``out``), or raise InputError naming its holder."""
    out = Path(out).resolve()
    if out in _HELD:
        return _HELD[out]
    make_folder(out)
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path.read_text(errors="replace")) if path.exists() else {}
            os.close(fd)
            raise InputError(
                f"output_dir {out.parent / out.name} is in use by {_describe(holder)} (lock {path}); one "
                "run writes a folder at a time: wait for it to end, or choose another output_dir") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the holder released (and removed) the file between our open and flock: try again
    previous = _holder(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
    if previous:
        state = "still running but not holding it" if _alive(previous) else "no longer running"
        print(f"output_dir {out}: taking over the stale lock of {_describe(previous)}, {state}")
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    _HELD[out] = lock = RunLock(out, fd)
    return lock


def release_lock(out: Path) -> bool:
    """Release ``out``'s lock if this process holds it (a recipe's end; exit does it too); return whether
    it did."""
    lock = _HELD.get(Path(out).resolve())
    if lock is not None:
        lock.release()
    return lock is not None
