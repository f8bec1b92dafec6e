"""Continued pretraining: a run that starts from a trained twinlm model (`model.from_pretrained`: a folder
written by save_pretrained, e.g. a run's final/, or a Hub repo id at `model.revision`) with its tokenizer.

The model keeps its shapes and layers: overrides may change what no weight depends on (dropout, the window, the
attention implementation). Everything is checked before the first step, in one line each: a source that is
neither a model folder nor a Hub repo (a run folder or a training checkpoint is named as such), a model of
another type, and a run model that does not fit the saved weights (the changed settings named).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinlm.errors import TwinLMError

# A Hub repo id: "owner/name" (a source that is not a folder here is read as one only in this form).
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Settings every weight's shape depends on: refused before the config is built (its checks would name
# something else, e.g. a factorised embedding width).
WIDTHS = ("hidden_size", "embedding_size")


def local_folder(section: Any) -> Path | None:
    """The source as a folder here, or None for a Hub repo id; TwinLMError for anything else."""
    source = section.from_pretrained
    path = Path(source).expanduser()
    if path.is_dir():
        if section.revision is not None:
            raise TwinLMError(
                f"model.revision={section.revision!r} names a Hub revision, and {source} is a folder here: leave "
                "model.revision out (or give the Hub repo id)"
            )
        problem = _not_a_model_folder(path)
        if problem:
            raise TwinLMError(f"model.from_pretrained: {problem}")
        return path
    if not REPO_ID.fullmatch(source):
        raise TwinLMError(
            f"model.from_pretrained: {source!r} is not a folder here, nor a Hub repo id ('owner/name'); give a "
            "folder written by save_pretrained (a run's final/) or a repo id"
        )
    return None


def _not_a_model_folder(path: Path) -> str | None:
    if (path / "config.json").is_file():
        return None
    if (path / "final" / "config.json").is_file():
        return f"{path} is a pretraining run: continue from its model, model.from_pretrained={path / 'final'}"
    if (path / "train_state.json").is_file() or (path / "checkpoints").is_dir():
        return (
            f"{path} holds training state (it resumes its own run: training.resume_from_checkpoint), not a saved "
            "model: continue from the run's final/"
        )
    return f"{path} has no config.json: give a folder written by save_pretrained (a run's final/) or a Hub repo id"


def saved_config(section: Any) -> dict[str, Any]:
    """The saved config.json of the source (TwinLMError when there is none or it is not twinlm's)."""
    from twinlm import TwinLMConfig

    local_folder(section)
    try:
        saved, _ = TwinLMConfig.get_config_dict(section.from_pretrained, revision=section.revision)
    except Exception as err:  # noqa: BLE001 - OSError, a network error, a corrupt file: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TwinLMError(
            f"model.from_pretrained: cannot load a config from {section.source} (not a folder here; as a Hub "
            f"repo: {first})"
        ) from None
    if saved.get("model_type") != "twinlm":
        kind = saved.get("model_type") or "model without a model_type"
        raise TwinLMError(
            f"model.from_pretrained: {section.source} holds a {kind}, not a twinlm model: convert it first "
            "(twinlm convert SOURCE OUT_DIR) and continue from OUT_DIR"
        )
    return saved


def pretrained_config(section: Any, overrides: dict[str, Any]) -> Any:
    """The source's TwinLMConfig with `overrides` (layer_types re-derived when what it derives from changes,
    as TwinLMConfig.from_dict does)."""
    from twinlm import TwinLMConfig
    from twinlm.model.configuration_twinlm import LAYER_TYPE_SOURCES, check_config_keys

    saved = saved_config(section)
    check_config_keys(overrides, source="model.overrides")
    for key in WIDTHS:
        if key in overrides and saved.get(key) is not None and overrides[key] != saved[key]:
            raise TwinLMError(
                f"model.overrides.{key}={overrides[key]} changes the shape of every weight of {section.source} "
                f"(saved: {saved[key]}): continued pretraining keeps the model's shapes"
            )
    derived = {key: overrides[key] for key in LAYER_TYPE_SOURCES if key in overrides}
    rest = {key: value for key, value in overrides.items() if key not in derived}
    return TwinLMConfig.from_dict({**saved, **rest}, **derived)


def pretrained_tokenizer(section: Any) -> Any:
    """The source's tokenizer (a folder or a Hub repo, at model.revision)."""
    from twinlm.tokenization import auto_tokenizer

    local_folder(section)
    try:
        return auto_tokenizer(section.from_pretrained, revision=section.revision)
    except Exception as err:  # noqa: BLE001 - no tokenizer there, a network error, a corrupt file: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TwinLMError(
            f"model.from_pretrained: cannot load the tokenizer of {section.source}: {first}; name one with "
            "tokenizer.path"
        ) from None


def saved_shapes(section: Any) -> dict[str, tuple[int, ...]]:
    """{weight name: shape} from the source's safetensors headers (a Hub repo's files are downloaded into the
    cache, where from_pretrained then finds them)."""
    from safetensors import safe_open

    folder = local_folder(section)
    index = "model.safetensors.index.json"

    def fetch(name: str) -> Path | None:
        if folder is not None:
            return folder / name if (folder / name).is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(section.from_pretrained, name, revision=section.revision))
        except EntryNotFoundError:
            return None

    try:
        single = fetch("model.safetensors")
        listed = fetch(index) if single is None else None
        if single is None and listed is None:
            raise TwinLMError(f"model.from_pretrained: {section.source} has no model.safetensors: no weights")
        files = [single] if single is not None else []
        if listed is not None:
            shards = sorted(set(json.loads(listed.read_text())["weight_map"].values()))
            files = [fetch(name) for name in shards]
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            if file is None:
                raise TwinLMError(f"model.from_pretrained: a weights shard of {section.source} is missing")
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open objects are not iterable
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        return shapes
    except TwinLMError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated header, a network error: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TwinLMError(
            f"model.from_pretrained: cannot read the weights of {section.source}: {first}"
        ) from None


def check_fit(model_class: Any, model_config: Any, section: Any) -> None:
    """TwinLMError when the run's model does not fit the saved weights: a weight of another shape, or a layer
    or embedding the one has and the other not (a head may differ: it is noted when loading). Names the
    settings in which the run's model differs from the saved one."""
    from twinlm import TwinLMConfig

    shapes = saved_shapes(section)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_class(model_config).state_dict().items()}
    prefix = model_class.base_model_prefix + "."
    mismatched = sorted(k for k in expected.keys() & shapes.keys() if expected[k] != shapes[k])
    missing = sorted(k for k in expected.keys() - shapes.keys() if k.startswith(prefix))
    unused = sorted(k for k in shapes.keys() - expected.keys() if k.startswith(prefix))
    if not (mismatched or missing or unused):
        return
    if mismatched:
        what = f"{mismatched[0]} is {expected[mismatched[0]]} here and {shapes[mismatched[0]]} there"
    elif missing:
        what = f"{len(missing)} weights of the run's model are not in it (first: {missing[0]})"
    else:
        what = f"{len(unused)} of its weights would go unused (first: {unused[0]})"
    saved = TwinLMConfig.from_pretrained(section.from_pretrained, revision=section.revision).to_dict()
    ours = model_config.to_dict()
    ignore = {"transformers_version", "layer_types", "architectures", "auto_map", "dtype", "torch_dtype"}
    changed = [
        f"{k}={ours[k]!r} (saved: {saved.get(k)!r})"
        for k in sorted(ours)
        if k not in ignore and ours[k] != saved.get(k)
    ]
    raise TwinLMError(
        f"model.from_pretrained: the run's model does not fit the weights of {section.source}: {what}"
        + (f"; it differs in {', '.join(changed)}" if changed else "")
        + ": continued pretraining keeps the model's shapes and layers"
    )


def load_pretrained(model_class: Any, model_config: Any, section: Any) -> nn.Module:
    """`model_class.from_pretrained` of model.from_pretrained (float32, for training), after `check_fit`; a note
    names the head weights that start from scratch or go unused (a fine-tuned classifier continued as a
    language model)."""
    check_fit(model_class, model_config, section)
    try:
        model, info = model_class.from_pretrained(
            section.from_pretrained,
            revision=section.revision,
            config=model_config,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except Exception as err:  # noqa: BLE001 - corrupt weights, a network error: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TwinLMError(
            f"model.from_pretrained: cannot load the weights of {section.source}: {first}"
        ) from None
    for key, what in (("missing_keys", "start from scratch"), ("unexpected_keys", "go unused")):
        names = sorted(info.get(key) or [])
        if names:
            print(f"note: {len(names)} weights of the heads {what} ({section.source}): {names[:4]}")
    return model


__all__ = [
    "check_fit",
    "load_pretrained",
    "local_folder",
    "pretrained_config",
    "pretrained_tokenizer",
    "saved_config",
    "saved_shapes",
]
