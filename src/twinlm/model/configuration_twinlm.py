"""TwinLMConfig: one architecture, every classic Transformer design choice as a validated switch.

This file ships to the Hub as remote code: it imports only transformers, huggingface_hub and the
standard library.
"""

import math
import os
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import PreTrainedConfig

# The allowed values of each switch. The model builds one component per switch from a table keyed
# by these strings, so adding a variant means one new class plus one entry here and there.
CHOICES: dict[str, tuple[str, ...]] = {
    "position_embedding_type": ("learned", "sinusoidal", "relative", "rope", "alibi", "none"),
    "norm_type": ("layernorm", "rmsnorm", "batchnorm"),
    "norm_position": ("post", "pre"),
    "hidden_act": ("relu", "gelu", "gelu_new", "swiglu", "geglu"),
    "attention_scoring": ("scaled_dot", "dot", "additive"),
    "classifier_pooling": ("cls", "mean", "last"),
}

# Absolute position encodings: positions past the table (or past what the model was trained on) are
# an error rather than a silent wrap-around or extrapolation.
ABSOLUTE_POSITIONS = ("learned", "sinusoidal")

# Written into every saved config so that any head loads with trust_remote_code=True from any checkpoint.
AUTO_MAP = {
    "AutoConfig": "configuration_twinlm.TwinLMConfig",
    "AutoModel": "modeling_twinlm.TwinLMModel",
    "AutoModelForMaskedLM": "modeling_twinlm.TwinLMForMaskedLM",
    "AutoModelForCausalLM": "modeling_twinlm.TwinLMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_twinlm.TwinLMForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_twinlm.TwinLMForTokenClassification",
}


@strict
class TwinLMConfig(PreTrainedConfig):
    r"""Configuration of a twinlm model (BERT-style when `is_causal=False`, GPT-style when True).

    Field names follow transformers' conventions. The switches:
      position_embedding_type: learned | sinusoidal | relative (T5 bucketed bias) | rope | alibi | none
      norm_type: layernorm | rmsnorm | batchnorm (statistics over real tokens only)
      norm_position: post (2017 paper, BERT) | pre (GPT-2 and later)
      embedding_norm: normalise the embedding sum (BERT); None = True for post-norm, False for pre-norm
      hidden_act: relu | gelu | gelu_new | swiglu | geglu
      attention_scoring: scaled_dot | dot (no 1/sqrt(d_k)) | additive (Bahdanau-style, per head)
      sliding_window: None (full attention) or a window size w: a causal token sees itself and the
        w - 1 tokens before it; a bidirectional token sees w // 2 tokens on each side
      share_qk: one projection for queries and keys
      scale_embeddings: multiply token embeddings by sqrt(hidden_size) (2017 paper)
      sparse_prediction: masked-LM training runs the LM head on masked positions only
    """

    model_type = "twinlm"

    # sizes
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    # variant
    is_causal: bool = False
    # switches
    position_embedding_type: str = "learned"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    rope_theta: float | int = 10000.0
    norm_type: str = "layernorm"
    norm_position: str = "post"
    embedding_norm: bool | None = None
    hidden_act: str = "gelu"
    attention_scoring: str = "scaled_dot"
    sliding_window: int | None = None
    share_qk: bool = False
    scale_embeddings: bool = False
    # dropout
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    embedding_dropout_prob: float | int = 0.1
    activation_dropout_prob: float | int = 0.0
    classifier_dropout: float | int | None = None
    # heads and the rest
    classifier_pooling: str | None = None
    tie_word_embeddings: bool = True
    layer_norm_eps: float | int = 1e-12
    initializer_range: float | int = 0.02
    attention_bias: bool = True
    mlp_bias: bool = True
    sparse_prediction: bool = False
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # transformers keeps unknown keyword arguments as plain attributes (checkpoints carry extra
        # metadata); a near-miss of a real field is a typo that would silently do nothing: refuse it.
        typos = {key: _close_field(key) for key in kwargs if not key.startswith("_")}
        typos = {key: close for key, close in typos.items() if close}
        if typos:
            raise ValueError(
                "TwinLMConfig: unknown field(s) "
                + ", ".join(f"{key!r} (did you mean {close!r}?)" for key, close in typos.items())
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.embedding_norm is None:
            self.embedding_norm = self.norm_position == "post"
        if self.classifier_pooling is None:
            self.classifier_pooling = "last" if self.is_causal else "cls"
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        # transformers validates only when saving; a bad config should fail where it is built, with
        # the plain ValueError that names the field (not huggingface_hub's wrapper around it).
        try:
            self.validate()
        except StrictDataclassClassValidationError as err:
            raise ValueError(f"TwinLMConfig: {err.__cause__}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_architecture(self) -> None:
        """Every switch and size checked here, so that nothing fails later inside a forward pass."""
        for field, allowed in CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not supported; choose one of {', '.join(allowed)}")
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be a positive integer")
        if self.type_vocab_size < 0:
            raise ValueError(
                f"type_vocab_size={self.type_vocab_size} must be >= 0 (0 = no segment embeddings)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.share_qk and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"share_qk=True needs num_key_value_heads == num_attention_heads "
                f"(got {self.num_key_value_heads} and {self.num_attention_heads}): keys are the queries"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(
                f"position_embedding_type='rope' needs an even head dimension, got {self.head_dim}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be None (full attention) or >= 1")
        for field in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "embedding_dropout_prob",
            "activation_dropout_prob",
            "classifier_dropout",
        ):
            value = getattr(self, field)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{field}={value} must be in [0, 1)")
        if not (self.layer_norm_eps > 0 and math.isfinite(self.layer_norm_eps)):
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be a small positive number")
        if self.initializer_range <= 0:
            raise ValueError(f"initializer_range={self.initializer_range} must be positive")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be positive")

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def preset_names(cls) -> list[str]:
        """Names of the presets shipped in configs/model/ (available when twinlm is installed)."""
        directory = _preset_dir()
        return sorted(p.stem for p in directory.glob("*.yaml")) if directory else []

    @classmethod
    def from_preset(cls, name: str | os.PathLike, **overrides: Any) -> "TwinLMConfig":
        """Build a config from a named preset (e.g. 'bert-base', 'tiny-modern-decoder') or a YAML file.

        Keyword overrides replace preset fields; a key that is not a config field is an error.
        """
        import yaml  # only needed here, and present wherever twinlm is installed

        path = Path(name)
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            directory = _preset_dir()
            path = directory / f"{name}.yaml" if directory else path
            if not path.is_file():
                raise ValueError(
                    f"unknown preset {str(name)!r}; choose one of {', '.join(cls.preset_names())} "
                    "or give the path of a YAML file"
                )
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a model preset must be a mapping of config fields")
        values.update(overrides)
        check_config_keys(values, source=str(path) if not overrides else f"{path} + overrides")
        return cls(**values)


def check_config_keys(values: dict[str, Any], source: str = "config") -> None:
    """Reject keys that are not TwinLMConfig fields (transformers itself silently keeps typos)."""
    known = set(TwinLMConfig.__dataclass_fields__) | {"num_labels", "problem_type", "id2label", "label2id"}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{source}: unknown TwinLMConfig field(s): {', '.join(hints)}")


def _close_field(key: str) -> str | None:
    """The TwinLMConfig field that `key` (not itself a field) is a misspelling of, if any."""
    import difflib

    fields = [*TwinLMConfig.__dataclass_fields__, "num_labels"]
    if key in fields:
        return None
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
    return close[0] if close else None


def _preset_dir() -> Path | None:
    """configs/model/ of a source checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "presets", here.parents[2] / "configs" / "model"):
        if candidate.is_dir():
            return candidate
    return None


__all__ = ["TwinLMConfig", "CHOICES", "ABSOLUTE_POSITIONS", "check_config_keys"]
