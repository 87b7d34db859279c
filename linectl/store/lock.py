"""One store, one owner: an exclusive advisory lock on `<db>.lock`, held by the writing process for its lifetime.

Why flock and not "a PID file": the kernel drops the lock when the holder dies,
however it dies (kill -9, power cut), so a stale lock file is never a lock and
no one has to guess whether a PID is still alive or was reused. The file's
content (PID, command, start time) only serves the error message of whoever
is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from linectl.store.model import StoreError


class StoreLocked(StoreError):
    """Another process holds the store (the daemon, or a writing command)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def lock_path(db_path: str) -> str:
    return f"{db_path}.lock"


def _holder_of(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8") or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (no holder details in the lock file)"
    return f"PID {holder.get('pid', '?')} ({holder.get('command', '?')}, since {holder.get('started_at', '?')})"


class StoreLock:
    """Held from acquire() to release(); the lock file itself stays (deleting it would race a new holder)."""

    def __init__(self, db_path: str, fd: int, info: dict[str, Any]) -> None:
        self.db_path = db_path
        self.path = lock_path(db_path)
        self._fd: int | None = fd
        self.info = info

    @classmethod
    def acquire(cls, db_path: str, command: str) -> StoreLock:
        """Take the lock without waiting; refuse naming the holder's PID when someone has it."""
        path = lock_path(db_path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"{db_path}: cannot open the lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_of(fd)
            os.close(fd)
            raise StoreLocked(
                f"{db_path}: the store is in use by {describe(holder)}; one store has one owner: "
                f"stop that process or send the command to the running daemon", holder
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"{db_path}: cannot lock {path}: {exc.strerror or exc}") from None
        info = {
            "pid": os.getpid(),
            "command": command,
            "argv": " ".join(sys.argv[:8])[:300],
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8") + b"\n", 0)
        except OSError:
            pass  # the lock is what counts; the details are only for the message of whoever is refused
        return cls(db_path, fd, info)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
