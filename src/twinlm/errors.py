"""The exceptions every command turns into one line: bad input, a stop signal, a resource that ran out.

- `TwinLMError`: the user's input is wrong (exit status 2).
- `Interrupted`: SIGINT/SIGTERM stopped a command after it kept what was finished (exit 128 + signal).
- `resource_problem(err)`: what an error raised deep inside torch, safetensors or tokenizers means for the
  user (the disk is full, memory ran out, a folder cannot be written), or None when it is none of those.
  They do not all raise OSError: torch's save raises RuntimeError ("enforce fail at inline_container.cc")
  on a full disk and the tokenizers' save a plain Exception ("No space left on device (os error 28)").
"""

from __future__ import annotations

import errno
import signal


class TwinLMError(Exception):
    """An error caused by the user's input: the CLI prints it as one line and exits with status 2."""


class Interrupted(Exception):
    """A command stopped by SIGINT/SIGTERM once its finished work was saved: exit status 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


_DISK_FULL = ("no space left on device", "os error 28", "disk quota exceeded")
_NO_MEMORY = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc")
_TORCH_WRITE = ("inline_container.cc", "pytorchstreamwriter failed", "file write failed")


def resource_problem(err: BaseException) -> str | None:
    """'the disk is full', 'out of memory', 'cannot write ...' for errors that mean a resource ran out or a
    path cannot be written; None for anything else (a bug, which should keep its traceback)."""
    text = str(err).lower()
    if isinstance(err, MemoryError) or any(s in text for s in _NO_MEMORY):
        return "out of memory"
    code = getattr(err, "errno", None)
    name = getattr(err, "filename", None)
    where = f" {name}" if name else ""
    if code in (errno.ENOSPC, errno.EDQUOT) or any(s in text for s in _DISK_FULL):
        return "the disk is full"
    if code == errno.EFBIG:
        return f"cannot write{where}: the file size limit of this process was reached"
    if isinstance(err, RuntimeError) and any(s in text for s in _TORCH_WRITE):
        return "the disk is full or the folder cannot be written"
    if code == errno.EROFS:
        return f"cannot write{where}: the file system is read-only"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write{where}: permission denied"
    if code == errno.ENOTDIR:
        return f"{name or 'a path'} lies under a file, not a folder"
    if code == errno.EISDIR:
        return f"{name or 'a path'} is a folder where a file is to be written"
    return None


def is_out_of_memory(err: BaseException) -> bool:
    return resource_problem(err) == "out of memory"


__all__ = ["Interrupted", "TwinLMError", "is_out_of_memory", "resource_problem"]
