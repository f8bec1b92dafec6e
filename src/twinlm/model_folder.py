"""Checks for a saved model folder before any command loads it: a twinlm model whose files are whole.

transformers' `from_pretrained` meets a damaged folder with a traceback from deep inside safetensors (or,
for a folder of another model type, with a model of fresh random weights); every twinlm command that
loads a folder (evaluate, attention-map, finetune, ablate's measurements) asks here first and gets one
line naming the file that is wrong.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from twinlm.errors import TwinLMError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


def read_config(folder: Path, what: str) -> dict[str, Any]:
    """config.json of a local folder as a dict; a missing or unreadable file is a TwinLMError."""
    file = folder / "config.json"
    if not file.is_file():
        raise TwinLMError(
            f"{what} {str(folder)!r} has no config.json; give a folder written by save_pretrained "
            "(e.g. outputs/tiny-mlm/final)"
        )
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TwinLMError(f"{file} is damaged (not readable JSON: {err.__class__.__name__})") from None
    if not isinstance(values, dict):
        raise TwinLMError(f"{file} is damaged (not a JSON object)")
    return values


def _check_safetensors(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as fh:
            fh.keys()
    except Exception as err:  # safetensors raises SafetensorError(Exception), or OSError
        detail = " ".join(str(err).split()) or err.__class__.__name__
        raise TwinLMError(f"{file} is damaged or truncated ({detail}); save the model again") from None


def check_weights(folder: Path) -> Path:
    """The folder's weights file(s) exist and are whole (safetensors headers cover the file; a shard index
    names shards that are there); returns the main weights file."""
    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise TwinLMError(
            f"{str(folder)!r} has no weights ({', '.join(WEIGHT_FILES)}); the save was interrupted or the "
            "files were removed: save the model again"
        )
    main = found[0]
    if main.name == "model.safetensors":
        _check_safetensors(main)
    elif main.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(main.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise TwinLMError(f"{main} is damaged (no readable weight_map)") from None
        for shard in shards:
            if not (folder / shard).is_file():
                raise TwinLMError(f"{folder / shard} is missing (named in {main.name})")
            _check_safetensors(folder / shard)
    elif not zipfile.is_zipfile(main):
        raise TwinLMError(f"{main} is damaged or truncated (not a torch archive); save the model again")
    return main


def read_twinlm_config(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """config.json of a local folder that must be a twinlm model's (its weights are not looked at); a
    one-line TwinLMError otherwise."""
    folder = Path(path)
    if not folder.exists():
        raise TwinLMError(f"{what} {str(folder)!r} does not exist; give a folder written by save_pretrained")
    if not folder.is_dir():
        raise TwinLMError(f"{what} {str(folder)!r} is a file; give the folder written by save_pretrained")
    config = read_config(folder, what)
    model_type = config.get("model_type")
    if model_type != "twinlm":
        raise TwinLMError(
            f"{folder / 'config.json'} is a {model_type or 'unknown'} model, not a twinlm one; convert it first "
            "(`twinlm convert`) or give a twinlm checkpoint"
        )
    return config


def check_model_folder(
    path: str | os.PathLike, what: str = "checkpoint", tokenizer: bool = False
) -> dict[str, Any]:
    """The config of a local twinlm model folder, after checking it is one and its files are whole; a
    one-line TwinLMError naming the file otherwise. `tokenizer`: its tokenizer files must be there too."""
    config = read_twinlm_config(path, what)
    folder = Path(path)
    check_weights(folder)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TwinLMError(
            f"{what} {str(folder)!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the tokenizer next "
            "to the model (tokenizer.save_pretrained(folder)), e.g. use a pretraining run's final/ folder"
        )
    return config


def load_error(err: BaseException, folder: str | os.PathLike) -> TwinLMError:
    """A one-line TwinLMError for a load that failed anyway (e.g. weights damaged between check and load)."""
    detail = " ".join(str(err).split())[:300] or err.__class__.__name__
    return TwinLMError(f"cannot load the model in {str(folder)!r}: {detail}")


__all__ = ["check_model_folder", "check_weights", "load_error", "read_config", "read_twinlm_config"]
