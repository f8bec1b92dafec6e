"""Files that are never half there: atomic files and folders, output folders checked before work starts.

Every command writes through these helpers, so that a full disk, a read-only folder or a path that lies
under a file ends in one line naming what failed and what to do, and leaves no `.tmp` behind: the earlier
version of the file or folder (if any) stays as it was.

    with atomic_folder(out / "final", "the final model") as tmp:
        model.save_pretrained(tmp)
    write_json_atomic(out / "results.json", results, "the results")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twinlm.errors import TwinLMError, resource_problem


def _existing_parent(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def free_mb(path: Path) -> float:
    """MB free on the file system that holds `path` (or its nearest existing parent)."""
    try:
        return shutil.disk_usage(_existing_parent(Path(path))).free / 1e6
    except OSError:
        return float("nan")


def write_failure(err: BaseException, target: Path, what: str) -> TwinLMError | None:
    """The one-line error for a write that failed because a resource ran out or the path cannot be written
    (None for anything else, which keeps its traceback)."""
    problem = resource_problem(err)
    if problem is None:
        return None
    space = "" if problem == "out of memory" else f" ({free_mb(target):,.1f} MB free on its file system)"
    return TwinLMError(
        f"writing {what} to {target} failed: {problem}{space}; nothing half-written was left behind: free "
        "space or choose another folder, then run the same command again"
    )


def _no_file_in_the_way(path: Path, what: str, folder: bool) -> None:
    """A TwinLMError when `path` (a folder to be) is a file, or lies under a file."""
    if folder and path.exists() and not path.is_dir():
        raise TwinLMError(f"{what} {str(path)!r} is a file, not a folder; give a folder path")
    blocking = _existing_parent(path.parent)
    if not blocking.is_dir():
        raise TwinLMError(
            f"{what} {str(path)!r} lies under {str(blocking)!r}, which is a file; give another path"
        )


def _writable(folder: Path, what: str, shown: Path) -> None:
    """Create `folder` (and parents) and prove it writable; one line naming `what` otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".twinlm-write-test-"):
            pass
    except OSError as err:
        reason = resource_problem(err) or err.strerror or str(err)
        raise TwinLMError(
            f"{what} {str(shown)!r} cannot be written ({reason}); give a writable folder"
        ) from None


def ensure_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder `path` (and parents) and prove it writable; a path that is a file, lies under a
    file, or cannot be written is a one-line TwinLMError naming `what` (e.g. 'output_dir')."""
    path = Path(path)
    _no_file_in_the_way(path, what, folder=True)
    _writable(path, what, path)
    return path


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """A folder that will be written atomically (OUT.tmp, then renamed): not a file, not under a file, and
    its parent writable (created)."""
    path = Path(path)
    _no_file_in_the_way(path, what, folder=True)
    _writable(path.parent, what, path)
    return path


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """An output file: not a folder, not under a file, its folder writable (created)."""
    path = Path(path)
    if path.is_dir():
        raise TwinLMError(f"{what} {str(path)!r} is a folder; give a file path")
    _no_file_in_the_way(path, what, folder=False)
    _writable(path.parent, what, path)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield `TARGET.tmp` to write into; on success it replaces `target` in one rename (an older `target` is
    kept until then). On any failure the `.tmp` is removed and a resource problem becomes a TwinLMError."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    try:
        _remove(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        if target.exists():
            old = target.with_name(target.name + ".old")
            _remove(old)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        _remove(tmp)
        failure = write_failure(err, target, what) if isinstance(err, Exception) else None
        if failure is not None:
            raise failure from None
        raise


@contextmanager
def atomic_file(target: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write to (e.g. a plot's savefig); it replaces `target` on
    success and is removed on failure (a resource problem becomes a TwinLMError)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp{target.suffix}")  # keep the suffix: savefig reads it
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        failure = write_failure(err, target, what) if isinstance(err, Exception) else None
        if failure is not None:
            raise failure from None
        raise


def write_text_atomic(target: str | os.PathLike, text: str, what: str = "a file") -> Path:
    """Write text to `target` through a temporary file and one rename (fsynced: it survives a crash)."""
    with atomic_file(target, what) as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(target)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object written by these helpers, or {} when the file is missing, torn or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json_atomic(target: str | os.PathLike, value: Any, what: str = "a file") -> Path:
    return write_text_atomic(target, json.dumps(value, indent=2, default=str), what)


__all__ = [
    "atomic_file",
    "atomic_folder",
    "check_output_folder",
    "check_writable_file",
    "ensure_output_dir",
    "free_mb",
    "read_json",
    "write_failure",
    "write_json_atomic",
    "write_text_atomic",
]
