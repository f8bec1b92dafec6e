"""The twinlm model: self-contained (imports only torch and transformers), shipped to the Hub as code."""

from .configuration_twinlm import TwinLMConfig
from .modeling_twinlm import (
    TwinLMForCausalLM,
    TwinLMForMaskedLM,
    TwinLMForPreTraining,
    TwinLMForSequenceClassification,
    TwinLMForTokenClassification,
    TwinLMModel,
    TwinLMPreTrainedModel,
)

# Auto class -> model class. Registered with transformers' Auto classes when this package is imported, and
# written into every saved config's `auto_map` so that a process without twinlm can load any head of a
# checkpoint with trust_remote_code=True (e.g. a sequence classifier from a masked-LM checkpoint).
AUTO_CLASSES = {
    "AutoModel": TwinLMModel,
    "AutoModelForMaskedLM": TwinLMForMaskedLM,
    "AutoModelForCausalLM": TwinLMForCausalLM,
    "AutoModelForSequenceClassification": TwinLMForSequenceClassification,
    "AutoModelForTokenClassification": TwinLMForTokenClassification,
    "AutoModelForPreTraining": TwinLMForPreTraining,
}


def register() -> None:
    import transformers

    transformers.AutoConfig.register(TwinLMConfig.model_type, TwinLMConfig, exist_ok=True)
    TwinLMConfig.register_for_auto_class()
    for auto_name, model_class in AUTO_CLASSES.items():
        getattr(transformers, auto_name).register(TwinLMConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_name)


register()

__all__ = [
    "TwinLMConfig",
    "TwinLMPreTrainedModel",
    *(c.__name__ for c in AUTO_CLASSES.values()),
    "AUTO_CLASSES",
]
