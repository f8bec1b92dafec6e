"""twinlm: BERT-style and GPT-style twins of one transformers architecture.

`import twinlm` is light (no torch, no transformers): the model classes are loaded on first use
(`twinlm.TwinLMConfig`, `from twinlm import TwinLMForCausalLM`), and the Auto classes of transformers
learn about twinlm the first time they look anything up, so `AutoConfig.for_model("twinlm")` and
`AutoModelForCausalLM.from_pretrained(path)` work after `import twinlm` without trust_remote_code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "TwinLMConfig",
    "TwinLMPreTrainedModel",
    "TwinLMModel",
    "TwinLMForMaskedLM",
    "TwinLMForCausalLM",
    "TwinLMForSequenceClassification",
    "TwinLMForTokenClassification",
    "TwinLMForPreTraining",
]

_MODEL_ATTRIBUTES = frozenset([*__all__, "AUTO_CLASSES"])


def __getattr__(name: str) -> Any:
    """PEP 562: load the model package (torch, transformers) only when a model class is asked for."""
    if name in _MODEL_ATTRIBUTES:
        value = getattr(importlib.import_module("twinlm.model"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'twinlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODEL_ATTRIBUTES})


# ------------------------------------------------------------------------------------------------
# Deferred Auto-class registration.
#
# Registering needs the real classes (torch, ~4 s), so instead the registries that transformers'
# Auto classes consult (`_extra_content` of CONFIG_MAPPING and of the model mappings) are swapped,
# as soon as their modules exist, for a dict that imports `twinlm.model` (whose import registers
# everything) the first time it is read. Reads happen when a user calls an Auto class, never while
# transformers is still importing, so the import cannot run into a half-initialised module.
# ------------------------------------------------------------------------------------------------
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"
# model Auto classes twinlm registers with (names only: the classes live in twinlm.model.AUTO_CLASSES)
_AUTO_MODEL_NAMES = (
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForPreTraining",
)


def _register_now() -> None:
    importlib.import_module("twinlm.model")  # registers on import (twinlm.model.register)


class _RegisterOnFirstRead(dict):
    """An Auto mapping's registry of extra entries that registers twinlm the first time it is read."""

    _pending = True  # shared by every instance: one registration serves all mappings

    def _ensure(self) -> None:
        if _RegisterOnFirstRead._pending:
            _RegisterOnFirstRead._pending = False
            _register_now()

    def __contains__(self, key: object) -> bool:
        self._ensure()
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> Any:
        self._ensure()
        return super().__getitem__(key)

    def __iter__(self) -> Any:
        self._ensure()
        return super().__iter__()

    def __len__(self) -> int:
        self._ensure()
        return super().__len__()

    def get(self, key: Any, default: Any = None) -> Any:
        self._ensure()
        return super().get(key, default)

    def keys(self) -> Any:
        self._ensure()
        return super().keys()

    def values(self) -> Any:
        self._ensure()
        return super().values()

    def items(self) -> Any:
        self._ensure()
        return super().items()


def _defer(mapping: Any) -> None:
    """Swap `mapping._extra_content` for a registering dict (or register now if its layout is unknown)."""
    extra = getattr(mapping, "_extra_content", None)
    if isinstance(extra, _RegisterOnFirstRead):
        return
    if type(extra) is not dict:  # a transformers version we do not know: pay for the import now
        _register_now()
        return
    mapping._extra_content = _RegisterOnFirstRead(extra)


def _defer_config_auto(module: ModuleType) -> None:
    _defer(module.CONFIG_MAPPING)


def _defer_model_auto(module: ModuleType) -> None:
    for name in _AUTO_MODEL_NAMES:
        _defer(getattr(module, name)._model_mapping)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a named module has been executed (a post-import hook)."""

    def __init__(self, callbacks: dict[str, Callable[[ModuleType], None]]) -> None:
        self.callbacks = callbacks

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        callback = self.callbacks.get(name)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                execute = spec.loader.exec_module

                def exec_module(module: ModuleType, execute: Callable = execute) -> None:
                    execute(module)
                    callback(module)

                spec.loader.exec_module = exec_module  # this spec's own loader instance
                return spec
        return None


def _install_auto_registration() -> None:
    hooks = {_CONFIG_AUTO: _defer_config_auto, _MODEL_AUTO: _defer_model_auto}
    for name, hook in list(hooks.items()):
        module = sys.modules.get(name)
        if module is not None:  # transformers' Auto classes were imported before twinlm
            try:
                hook(module)
            except AttributeError:  # module still initialising: register the ordinary way
                _register_now()
            del hooks[name]
    if hooks and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(hooks))


_install_auto_registration()
