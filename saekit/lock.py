"""One writer at a time for what independent commands share (an activation cache, the model
cache, a run's analysis folder, an atlas): an exclusive `fcntl.flock` on a lock file `X.lock`
beside the thing `X` it guards.

The kernel drops a flock when its holder's process ends, however it ends (`kill -9` included),
so a lock is never stale: nothing has to guess whether a holder is still alive, and a waiting
process takes over the moment it dies. The holder writes `pid@host since TIME` into the file;
a waiting process prints it, so a user sees whom it waits for. Lock files are kept, never
deleted: a process may already have opened one, and a new file would give a second holder.

On a shared file system the lock holds across nodes only where the file system carries flock
between them (README, "Several processes"); where flock is refused, a warning says that
writers are not coordinated and the work goes on unlocked.
"""

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from saekit.errors import SaekitError

POLL_S = 0.5  # how often a waiting process tries again
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class FileLock:
    """An exclusive lock on the file `path` (created when missing). `doing` says what the holder
    does, for the waiting line: "the activation cache C/ab12 is being harvested". Use it as a
    context manager (waits as long as it takes), or `acquire(timeout)` / `release()`."""

    def __init__(self, path: str | Path, doing: str):
        self.path, self.doing = Path(path), doing
        self._fd: int | None = None
        self._held = False
        self._seen = ""  # the holder last announced

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock, waiting at most `timeout` seconds (None: until it is free); True once held.
        While it waits, it prints one line per holder: who holds the lock, since when."""
        if self._fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise SaekitError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise SaekitError(f"cannot lock {self.path}: {e.strerror or e}") from None
                print(f"saekit: warning: the file system refuses locks on {self.path} ({e.strerror}); other "
                      "commands writing the same files at the same time are not kept apart", file=sys.stderr)
                return True
            else:
                since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, f"{os.getpid()}@{socket.gethostname()} since {since}\n".encode(), 0)
                self._held = True
                return True
            holder = os.pread(self._fd, 512, 0).decode(errors="replace").strip()
            if holder and holder != self._seen:  # empty: the holder is writing its line right now
                print(f"saekit: {self.doing} by {holder}; waiting for it", file=sys.stderr, flush=True)
                self._seen = holder
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic())))

    def release(self) -> None:
        """Give the lock up (its holder line is cleared); a lock not taken is left to its holder."""
        if self._fd is None:
            return
        try:
            if self._held:
                os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd, self._held = None, False

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
