"""twinlm: BERT-style and GPT-style twins of one transformers architecture.

`import twinlm` registers the model with transformers' Auto classes.
"""

from twinlm.model import (
    TwinLMConfig,
    TwinLMForCausalLM,
    TwinLMForMaskedLM,
    TwinLMForSequenceClassification,
    TwinLMForTokenClassification,
    TwinLMModel,
    TwinLMPreTrainedModel,
)

__version__ = "0.1.0"

__all__ = [
    "TwinLMConfig",
    "TwinLMPreTrainedModel",
    "TwinLMModel",
    "TwinLMForMaskedLM",
    "TwinLMForCausalLM",
    "TwinLMForSequenceClassification",
    "TwinLMForTokenClassification",
]
