"""The frame every run-like command works in (pretrain, finetune, evaluate, ablate).

`run_folder(path, what)`: the output folder is checked before any work (not a file, not under a file,
writable: one-line errors naming `what`), and held for the whole command (RunLock: one run per folder,
released by the OS if the process dies). Commands that run many things also hold
`twinlm.stopping.stop_on_signal()`, so that SIGINT/SIGTERM stop all of them cleanly; writes inside go
through `twinlm.fileio` (atomic files and folders).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from twinlm.fileio import ensure_output_dir
from twinlm.training.lock import RunLock


def is_main_process() -> bool:
    """Rank 0, or no distributed launcher (torchrun / accelerate launch set RANK)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextmanager
def run_folder(path: str | os.PathLike, what: str, main_process: bool | None = None) -> Iterator[Path]:
    """Check and create the output folder, then hold its run lock (main process only) while inside."""
    main = is_main_process() if main_process is None else main_process
    folder = Path(path)
    if main:
        ensure_output_dir(folder, what)
    with RunLock(folder, enabled=main):
        yield folder


__all__ = ["is_main_process", "run_folder"]
