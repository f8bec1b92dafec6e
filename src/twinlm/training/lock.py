"""One run per output_dir: an OS file lock (filelock) on OUTPUT_DIR/.twinlm-run.lock.

The operating system releases the lock when the process holding it dies, so a crashed run never blocks
the next one. The holder writes its pid and host into the file: a second run names them in its message,
and a run that takes over from a dead one says so.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from twinlm.errors import TwinLMError

LOCK_FILE = ".twinlm-run.lock"


class RunLock:
    """Held by the main process for the whole run; a second run on the same output_dir is refused."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.enabled = enabled
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self._lock: Any = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def __enter__(self) -> RunLock:
        if self.enabled:
            self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _recorded_owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) and "pid" in owner else None

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            owner = self._recorded_owner() or {}
            raise TwinLMError(
                f"output_dir {self.path.parent} is in use by another run (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}); wait for it to finish or choose another output_dir"
            ) from None
        previous = self._recorded_owner()
        if previous is not None:  # the lock was free: its last holder died without releasing it
            print(
                f"taking over {self.path} from a run that is gone (pid {previous['pid']} on "
                f"{previous.get('host', '?')})"
            )
        self.path.write_text(json.dumps(self.owner))
        self._lock = lock

    def release(self) -> None:
        """Clear the owner record and release the lock (the file stays: removing it races with a waiter)."""
        if self._lock is None:
            return
        try:
            self.path.write_text("")
        except OSError:
            pass
        self._lock.release()
        self._lock = None
