"""twinlm: BERT-style and GPT-style twins of one transformers architecture.

`import twinlm` is light (no torch, no transformers: `twinlm --help` answers at once): the model classes
are loaded on first use (`twinlm.TwinLMConfig`, `from twinlm import TwinLMForCausalLM`). Loading them
registers twinlm with transformers' Auto classes through their public `register` calls, so after
`import twinlm.model` (or any use of a twinlm class) `AutoConfig.for_model("twinlm")` and
`AutoModelForCausalLM.from_pretrained(path)` work without trust_remote_code. Saved checkpoints carry their
code, so `from_pretrained(path, trust_remote_code=True)` works anywhere, without twinlm installed.
"""

from __future__ import annotations

import importlib
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
