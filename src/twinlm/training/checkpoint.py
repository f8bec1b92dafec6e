"""Atomic checkpoints: every rank writes into `checkpoint-N.tmp`, then one rename makes `checkpoint-N`.

A directory named `checkpoint-N` is therefore always complete (it holds `train_state.json`, written
last); a crash leaves at most a `.tmp` directory, which is ignored and cleaned up by the next save.
Accelerate's `save_state` stores model, optimizer, (DeepSpeed shards,) RNG states and registered
objects such as the LR scheduler; `train_state.json` stores the loop's own counters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from twinlm.errors import TwinLMError

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "train_state.json"


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: Path, value: str | None) -> Path | None:
    """'latest' -> the newest complete checkpoint (None when the run has none yet), a path -> itself."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise TwinLMError(
            f"training.resume_from_checkpoint: {value!r} is not a complete checkpoint (no {STATE_FILE}); "
            "give 'latest' or a checkpoint-N directory"
        )
    return path


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, train_state: dict[str, Any], keep_last: int
) -> Path:
    """Save the full training state as `checkpoints/checkpoint-{step}` atomically; keep the newest `keep_last`.

    Must be called on every process (DeepSpeed writes one shard per rank).
    """
    root = checkpoints_root(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if final.exists():  # already saved at this step (e.g. save_every and the end coincide)
        return final
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # all ranks' files are written before the rename
    if accelerator.is_main_process:
        state_path = tmp / STATE_FILE
        with state_path.open("w") as fh:
            json.dump(train_state, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, RNG states from a checkpoint; return the loop's counters."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
