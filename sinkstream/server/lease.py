"""Leases for session files in a folder that several replicas share (`sinkstream.deploy`; the protocol is in
`sinkstream.server.sessions`' docstring): the save count a file records, the lock a save holds, the error a
lost race gets, and which leftovers a replica may remove on start."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from .errors import ApiError

LEFTOVER_SECONDS = 3600  # sharing a folder, tmp files and unnamed logs older than this are removed on start


def lease_epoch(extra) -> int:
    """The save count in a session's ``extra["lease"]``; 0 for a file saved before leases existed."""
    lease = extra.get("lease") if isinstance(extra, dict) else None
    epoch = lease.get("epoch") if isinstance(lease, dict) else None
    return epoch if isinstance(epoch, int) and epoch >= 0 else 0


def conflict(sid: str, held: int | None, on_disk: int | None) -> ApiError:
    """The error of a save whose copy came with epoch `held` (None: a create) while the file holds `on_disk`."""
    if held is None:
        return ApiError(409, f"session {sid!r} already exists", param="id", code="session_exists")
    if on_disk is None:
        return ApiError(404, f"session {sid!r} was deleted meanwhile; this turn is not kept", param="session",
                        code="session_not_found")
    return ApiError(409, f"session {sid!r} was continued by another replica meanwhile (its save {on_disk}, "
                         f"this replica's copy is at save {held}); this turn is not kept: send it again",
                    param="session", code="session_conflict")


@contextlib.contextmanager
def exclusive(lock: Path, *, remove: bool = False):
    """Hold an exclusive ``flock`` on the file `lock` (every replica that mounts the folder sees it; the
    kernel drops it if the process dies). `remove`: unlink the lock file before letting go (a delete);
    whoever then holds the unlinked file notices and locks the new one."""
    import fcntl
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    break
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                lock.unlink()
        os.close(fd)  # releases the lock


def old_leftover(path: Path) -> bool:
    """Whether a tmp file or unnamed log is older than any save in progress could be."""
    try:
        return time.time() - path.stat().st_mtime > LEFTOVER_SECONDS
    except OSError:
        return False
