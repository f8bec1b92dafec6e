"""Fingerprints: what a finished result depends on, hashed, so that a changed input makes it stale.

`evaluate` stores one in every finished cell and control, `ablate` in every run and measurement; when the
same command runs again, a result whose fingerprint differs from the one its inputs give now is rerun
instead of being read back. File contents are hashed (SHA-256, each file once per process), not their
dates: a file rewritten with the same bytes is not a change, one rewritten in the same second is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_DIGESTS: dict[tuple[str, int, int, int], str] = {}

# Files of a model folder that do not change what the model computes (written after the export, or the
# model code, which every twinlm command takes from the installed package).
_NOT_THE_MODEL = {"README.md", "training_info.json", ".gitattributes", "control.json", "eval_results.json"}


# Sections of a run or fine-tuning config that never change what it computes: where it writes, what it
# logs to and where it publishes. Left out of fingerprints, so that a new setting there (a Hub option) does not
# make every finished run stale.
NOT_COMPUTED = ("output_dir", "logging", "hub")


def computed_settings(config: Any, exclude: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config's settings as JSON, less NOT_COMPUTED and `exclude` (pydantic's exclude form)."""
    return config.model_dump(mode="json", exclude={**dict.fromkeys(NOT_COMPUTED, True), **(exclude or {})})


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (remembered per path, size, modification time and inode)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def source_files(sources: list[Any]) -> list[str]:
    """The local paths of data sources as the loader reads them, for `files_digest`: a glob expanded as the
    loader expands it (recursively: `dir/**/*.txt`), `~` expanded, a file or folder as named."""
    import glob

    files: list[str] = []
    for source in sources:
        if source.path:
            path = os.path.expanduser(source.path)
            files += sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
    return files


def model_folder_digest(folder: str | os.PathLike) -> dict[str, str]:
    """{file: digest} of what a saved model is: the files save_pretrained writes at the folder's top level
    (config, weights, tokenizer), not its card or code, and nothing in sub-folders (an evaluation's own
    output kept inside the folder must not change the model's identity)."""
    folder = Path(folder)
    return {
        p.name: file_digest(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in _NOT_THE_MODEL and p.suffix != ".py" and not p.name.startswith(".")
    }


def files_digest(paths: list[str | os.PathLike]) -> dict[str, str | None]:
    """{path: digest} of files (folders: every file in them); None where nothing exists."""
    out: dict[str, str | None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            out[str(raw)] = file_digest(path)
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                out[str(file)] = file_digest(file)
        else:
            out[str(raw)] = None
    return out


def fingerprint(facts: dict[str, Any]) -> str:
    """SHA-256 of the facts as canonical JSON."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["file_digest", "files_digest", "fingerprint", "model_folder_digest"]
