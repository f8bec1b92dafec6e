"""One run per output_dir: a lock file with the owner's pid and host, taken over when that process is dead."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from twinlm.errors import TwinLMError

LOCK_FILE = ".twinlm-run.lock"


def _alive(pid: int) -> bool:
    """Whether a process of this machine is running (a zombie, killed but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """Held by the main process for the whole run; a second run on the same output_dir is refused."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.enabled = enabled
        self.held = False
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def __enter__(self) -> RunLock:
        if self.enabled:
            self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.owner, fh)
            self.held = True
            return
        raise TwinLMError(f"could not lock {self.path}: another run keeps taking it")

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, OSError):
            print(f"taking over {self.path}: unreadable (a run died while writing it)")
            self.path.unlink(missing_ok=True)
            return
        here = host == socket.gethostname()
        if here and pid == os.getpid():  # an earlier run in this process ended without releasing it
            self.path.unlink(missing_ok=True)
            return
        if not here or _alive(pid):
            raise TwinLMError(
                f"output_dir {self.path.parent} is in use by another run (pid {pid} on {host}); wait for it to "
                f"finish or choose another output_dir (if that run is gone, delete {self.path})"
            )
        print(f"taking over {self.path} from a run that is gone (pid {pid} on {host})")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False
