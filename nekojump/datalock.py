"""One server per data directory: a lock held for as long as the server runs."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "server.lock"


class DataDirectoryInUse(Exception):
    """Another server holds the data directory's lock."""


def lock_data_dir(data_dir: Path) -> int:
    """Take ``data_dir``'s server lock and write our pid into it; the open
    descriptor, to keep for as long as the server runs (the lock goes with the
    process, however it ends).

    Two servers on one directory would each take the other's live forwards and
    pid for stale ones; the second is refused here, naming the first.  Raises
    OSError for a directory it cannot make or write."""
    if not data_dir.is_dir():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataDirectoryInUse(
            f"data directory {data_dir} is in use by another nekojump server (pid {holder}); "
            "give this one its own [storage] data_dir"
        ) from None
    except OSError:
        os.close(fd)
        raise
    record_pid(fd)
    return fd


def record_pid(fd: int) -> None:
    """Write this process's pid into the lock file ``fd``: again once the server
    runs, since a daemonizing twistd forks after the lock was taken (the lock goes
    with the descriptor to the child; the pid written before names the parent)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
