"""The tokenised-data cache: each source is tokenised once and reused by later runs until an input changes.

An entry is keyed by a hash of everything its rows depend on (for tokenised documents: the source's content
identity, `twinlm.data.sources.source_identity`, how its documents are read, and the tokenizer's full state
with the document separators; for packed blocks: those tokens, the documents taken and the block length).
Its Arrow files are written by `datasets` (each to a temporary file, then renamed); the entry's manifest,
`twinlm-<stage>-<key>.json`, naming the files with their sizes, is written last and atomically. An entry
exists only once its manifest does, so a run killed while tokenising leaves nothing that a later run trusts;
a manifest whose files are missing or of another size is ignored (the entry is rebuilt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
from datasets import Dataset

from twinlm.data.config import DataConfig

__all__ = ["cache_root", "load_entry", "new_entry", "store_entry"]

MANIFEST_VERSION = 1


def cache_root(cfg: DataConfig) -> Path:
    """`data.cache_dir`, or `twinlm/` in the `datasets` cache (HF_DATASETS_CACHE, under HF_HOME)."""
    root = (
        Path(cfg.cache_dir)
        if cfg.cache_dir is not None
        else Path(datasets.config.HF_DATASETS_CACHE) / "twinlm"
    )
    root.mkdir(parents=True, exist_ok=True)
    return root


def new_entry(root: Path, stage: str, key: str) -> str:
    """The Arrow file to write an entry into (`datasets` adds `_NNNNN_of_NNNNN` per process), with whatever
    an earlier, unfinished or damaged attempt left under that key removed first (`datasets` would read it)."""
    for leftover in root.glob(f"twinlm-{stage}-{key}*"):
        leftover.unlink(missing_ok=True)
    return str(root / f"twinlm-{stage}-{key}.arrow")


def _manifest(root: Path, stage: str, key: str) -> Path:
    return root / f"twinlm-{stage}-{key}.json"


def load_entry(root: Path, stage: str, key: str) -> Dataset | None:
    """The cached dataset of a complete entry (memory-mapped), or None when there is none or it is damaged."""
    path = _manifest(root, stage, key)
    try:
        manifest = json.loads(path.read_text())
        files = [(root / entry["file"], int(entry["size"])) for entry in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.get("version") != MANIFEST_VERSION or not files:
        return None
    if any(not file.is_file() or file.stat().st_size != size for file, size in files):
        return None
    parts = [Dataset.from_file(str(file)) for file, _ in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def store_entry(root: Path, stage: str, key: str, ds: Dataset) -> Dataset:
    """Record `ds` (just written by `datasets` into `new_entry(root, stage, key)`) as a complete entry;
    returns it read back from the cache, so that every run uses the same memory-mapped files."""
    files = [Path(f["filename"]) for f in ds.cache_files]
    if not files or any(f.parent.resolve() != root.resolve() for f in files):
        raise ValueError(f"the dataset's files {files} are not in the cache folder {root}")
    manifest = {
        "version": MANIFEST_VERSION,
        "files": [{"file": f.name, "size": f.stat().st_size} for f in files],
        "rows": len(ds),
    }
    path = _manifest(root, stage, key)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps(manifest, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    loaded = load_entry(root, stage, key)
    assert loaded is not None
    return loaded
