"""One server per data folder: `girandole serve` holds an exclusive lock on
`<data_dir>/girandole.lock` for as long as it runs.

A second server started on the same folder (two models on two ports, both on the default cache
folder) used to start and then take the first one's work for a crashed server's: it failed the
background responses the first was still generating and ran the same batch jobs again. The lock
is an flock, so the kernel drops it when the holder dies, SIGKILL included: a stale file never
blocks a restart. The `girandole keys|usage|models` commands do not take it (they may run
beside a server, as SQLite's WAL allows).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

logger = logging.getLogger("girandole.api")

LOCK_NAME = "girandole.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; the server runs there without the check
    fcntl = None  # type: ignore[assignment]


def lock_data_dir(folder: str | Path) -> int | None:
    """Take the folder's lock (making the folder, the owner's only, as the database does) and
    return its descriptor, kept open for the process's life; OSError naming --data-dir and the
    holder's pid when another server holds it."""
    if fcntl is None:
        return None
    path = Path(folder)
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        path.chmod(0o700)  # mkdir's mode passes through the umask
    fd = os.open(path / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)  # not inherited (O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if isinstance(exc, BlockingIOError):
            raise _in_use(fd, path) from None
        os.close(fd)
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without
            logger.warning(  # locks (some NFS mounts): serve, as before there was a lock
                "--data-dir %s cannot be locked (%s): make sure no other server uses it",
                path,
                exc.strerror,
            )
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _in_use(fd: int, path: Path) -> OSError:
    """The error for a folder another server holds (its pid, from the lock file)."""
    try:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return OSError(
        f"--data-dir {str(path)!r} is in use by another girandole server"
        + (f" (pid {holder})" if holder.isdigit() else "")
        + ": stop it, or give this server a --data-dir of its own"
    )
