"""TwinLMConfig: one architecture, every classic Transformer design choice as a validated switch.

This file ships to the Hub as remote code: it imports only transformers, huggingface_hub, the standard library
and its siblings positions.py (whose table of position encodings is the list of valid position_embedding_type
values, and whose classes say what each scheme needs of a config) and layers.py (the feed-forward classes
declare their tensor-parallel plan).
"""

import difflib
import math
import os
from collections.abc import Collection
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, get_args

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import PreTrainedConfig
from transformers.utils import logging

from .layers import FEED_FORWARDS
from .positions import POSITION_ENCODINGS

logger = logging.get_logger(__name__)

# The switches, as typed fields (validated by huggingface_hub's @strict). The model builds one component per
# switch from a table keyed by these strings, so adding a variant means one new class, one table entry and
# one value here. position_embedding_type takes any key of positions.POSITION_ENCODINGS (a new scheme is a class
# and an entry there, nothing here).
NormType = Literal["layernorm", "rmsnorm", "batchnorm"]
NormPosition = Literal["post", "pre"]
HiddenAct = Literal["relu", "gelu", "gelu_new", "swiglu", "geglu"]
AttentionScoring = Literal["scaled_dot", "dot", "additive", "linear"]
ClassifierPooling = Literal["cls", "mean", "last"]

# field -> allowed values, read off the Literal types above (one source of truth).
CHOICES: dict[str, Collection[str]] = {
    "position_embedding_type": POSITION_ENCODINGS.keys(),  # a live view: schemes registered later count
    "norm_type": get_args(NormType),
    "norm_position": get_args(NormPosition),
    "hidden_act": get_args(HiddenAct),
    "attention_scoring": get_args(AttentionScoring),
    "classifier_pooling": get_args(ClassifierPooling),
}

# Per-layer attention, with transformers v5's names (config.layer_types; its caches build one layer per entry:
# a growing KV cache, one that keeps only the window, or a constant-size recurrent state).
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")

# Upper bounds for sizes no machine can train (a typo such as hidden_size=100000 or a vocabulary of 10**9 ends
# here in one line instead of in an allocator's traceback): each several times the largest published model.
SIZE_LIMITS = {
    "vocab_size": 2**21,  # 2,097,152 (the largest vocabularies in use: ~256k-900k)
    "hidden_size": 2**16,  # 65,536 (the largest models: 12k-25k)
    "intermediate_size": 2**18,  # 262,144
    "num_hidden_layers": 1024,
    "num_attention_heads": 2048,
    "max_position_embeddings": 2**21,
    "type_vocab_size": 1024,
}

# The widest convolution kernel (conv_kernel_size): a local module; a wider reach is attention's job.
MAX_CONV_KERNEL = 1025

# Written into every saved config so that any head loads with trust_remote_code=True from any checkpoint.
AUTO_MAP = {
    "AutoConfig": "configuration_twinlm.TwinLMConfig",
    "AutoModel": "modeling_twinlm.TwinLMModel",
    "AutoModelForMaskedLM": "modeling_twinlm.TwinLMForMaskedLM",
    "AutoModelForCausalLM": "modeling_twinlm.TwinLMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_twinlm.TwinLMForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_twinlm.TwinLMForTokenClassification",
    "AutoModelForPreTraining": "modeling_twinlm.TwinLMForPreTraining",
}

# True while a saved config is being loaded (from_dict): extra keys are then kept, as in every transformers
# config, instead of being refused as typos (which is right only for configs that people write).
_LOADING_SAVED_CONFIG: ContextVar[bool] = ContextVar("twinlm_loading_saved_config", default=False)


def choice_error(field: str, value: Any) -> str:
    """The message for a switch set to a value it does not have: field, value, allowed values, a guess."""
    allowed = CHOICES[field]
    close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{field}={value!r} is not supported; choose one of {', '.join(allowed)}{hint}"


def _explain_bad_choices(cls: type) -> type:
    """@strict checks a Literal field before any custom validator, with a message that has no did-you-mean:
    check the switch values first, with the message of `choice_error`."""
    strict_setattr = cls.__setattr__

    def __setattr__(self: Any, name: str, value: Any) -> None:
        allowed = CHOICES.get(name)
        if (
            allowed is not None
            and value not in allowed
            and not (value is None and name == "classifier_pooling")
        ):
            raise ValueError(choice_error(name, value))
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as err:  # a wrong type, e.g. hidden_size='abc'
            raise ValueError(f"{name}={value!r}: {err.__cause__ or err}") from None

    cls.__setattr__ = __setattr__
    return cls


@_explain_bad_choices
@strict
class TwinLMConfig(PreTrainedConfig):
    r"""Configuration of a twinlm model (BERT-style when `is_causal=False`, GPT-style when True).

    Field names follow transformers' conventions. The switches:
      position_embedding_type: learned | sinusoidal | relative (T5 bucketed bias) | rope | alibi | none
      norm_type: layernorm | rmsnorm | batchnorm (statistics over real tokens only)
      norm_position: post (2017 paper, BERT) | pre (GPT-2 and later)
      embedding_norm: normalise the embedding sum (BERT); None = True for post-norm, False for pre-norm
      hidden_act: relu | gelu | gelu_new | swiglu | geglu
      attention_scoring: scaled_dot | dot (no 1/sqrt(d_k)) | additive (Bahdanau-style, per head) | linear
        (Katharopoulos et al. 2020, elu + 1 features: O(n d^2) time and memory, a constant-size recurrent state
        instead of a KV cache when generating; no window, no ALiBi/T5 bias, no attention dropout)
      sliding_window: None (full attention) or a window size w: a causal token sees itself and the
        w - 1 tokens before it; a bidirectional token sees w // 2 tokens on each side. Computed in blocks
        (each block of queries against the keys its window reaches): O(n w) time and memory
      layer_types: per layer, "full_attention" | "sliding_attention" | "linear_attention" (transformers' names);
        None = derived: every layer "linear_attention" with linear scoring, else "sliding_attention" where
        sliding_window is set (every layer, or all but every n-th with global_attention_every_n_layers),
        else "full_attention"
      global_attention_every_n_layers: with sliding_window, layers 0, n, 2n, ... attend to everything and
        the others to their window (ModernBERT: 3, Longformer-style local/global mix)
      local_rope_theta: RoPE base of the sliding_attention layers (None = rope_theta; ModernBERT: 10k local,
        160k global)
      share_qk: one projection for queries and keys
      scale_embeddings: multiply token embeddings by sqrt(hidden_size) (2017 paper)
      use_residual: the skip connection around every sub-layer (He et al. 2016; Vaswani et al. 2017: x +
        sublayer(x)). False removes all of them, to measure why they are there: post-norm x = norm(sublayer(x)),
        pre-norm x = sublayer(norm(x)). Named as transformers names its on/off switches (use_cache,
        use_sliding_window); a bool, since no third kind of connection is offered
      conv_kernel_size: None (no convolution) or k: every block gets Conformer's convolution module (Gulati et
        al. 2020; local mixing as in ConvBERT, Jiang et al. 2020) between attention and the feed-forward
        network, with its own norm (in the block's norm position) and residual: pointwise conv to 2 x width,
        GLU, depthwise conv over k tokens (causal: itself and the k - 1 before; bidirectional: k // 2 on each
        side, k odd), the model's norm (Conformer's batch norm), SiLU, pointwise conv back. It never reaches
        across padding or packed documents; a generating decoder's cache keeps each layer's last k - 1 inputs
      sparse_prediction: masked-LM training runs the LM head, and the last block's queries, on masked
        positions only (exact: everything after the last attention is per token; with a convolution the last
        block computes every token, since a kept token's convolution reads its neighbours)
      scale_residual_init: GPT-2's init: the residual output projections (attention o_proj, MLP down_proj, the
        convolution's pointwise_out) get std initializer_range / sqrt(writes * num_hidden_layers), writes = 2 per
        layer (3 with a convolution)
    Sizes as in transformers; `embedding_size` (ALBERT, ELECTRA: None = hidden_size) is the width of the
    token, segment and absolute-position embeddings, projected to hidden_size when it differs (encoders
    only): it lets a small ELECTRA generator share the discriminator's embeddings.
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
    embedding_size: int | None = None
    # variant
    is_causal: bool = False
    # switches
    position_embedding_type: str = "learned"  # a key of positions.POSITION_ENCODINGS (CHOICES)
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    rope_theta: float | int = 10000.0
    norm_type: NormType = "layernorm"
    norm_position: NormPosition = "post"
    embedding_norm: bool | None = None
    hidden_act: HiddenAct = "gelu"
    attention_scoring: AttentionScoring = "scaled_dot"
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    global_attention_every_n_layers: int | None = None
    local_rope_theta: float | int | None = None
    share_qk: bool = False
    scale_embeddings: bool = False
    use_residual: bool = True
    conv_kernel_size: int | None = None
    # dropout
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    embedding_dropout_prob: float | int = 0.1
    activation_dropout_prob: float | int = 0.0
    classifier_dropout: float | int | None = None
    # heads and the rest
    classifier_pooling: ClassifierPooling | None = None
    tie_word_embeddings: bool = True
    layer_norm_eps: float | int = 1e-12
    initializer_range: float | int = 0.02
    scale_residual_init: bool = False
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
        # A saved config.json (from_pretrained) keeps them all, as every transformers config does: tools add
        # their own keys (e.g. layer_norm_epsilon) and the file must still load.
        typos = {key: _close_field(key) for key in kwargs if not key.startswith("_")}
        typos = {key: close for key, close in typos.items() if close}
        if typos:
            message = ", ".join(f"{key!r} (did you mean {close!r}?)" for key, close in typos.items())
            if not _LOADING_SAVED_CONFIG.get():
                raise ValueError(f"TwinLMConfig: unknown field(s) {message}")
            logger.warning(f"TwinLMConfig: kept unknown key(s) of a saved config as attributes: {message}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        if self.embedding_norm is None:
            self.embedding_norm = self.norm_position == "post"
        if self.classifier_pooling is None:
            self.classifier_pooling = "last" if self.is_causal else "cls"
        if self.layer_types is None:
            self.layer_types = self._derived_layer_types()
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

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun), Megatron-style: the attention
        heads and the feed-forward's hidden units are split across the ranks (column-parallel projections in,
        row-parallel projections out: one all-reduce per sub-layer), the vocabulary of the token embeddings too;
        norms, position tables and the rest are replicated. Only the modules this config has (a gated MLP's
        gate_proj, a k_proj unless share_qk). What cannot be split is refused when the plan is applied
        (modeling_twinlm.check_tensor_parallel)."""
        plan = {"embeddings.word_embeddings": "embedding_rowwise"}
        projections = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
        if self.share_qk:  # keys come from q_proj: there is no k_proj
            del projections["k_proj"]
        plan |= {f"layers.*.attention.{name}": style for name, style in projections.items()}
        mlp = FEED_FORWARDS[self.hidden_act][0].tp_plan
        return plan | {f"layers.*.mlp.{name}": style for name, style in mlp.items()}

    @property
    def position_encoding(self) -> type:
        """The class of this config's position scheme (positions.POSITION_ENCODINGS): ask it what the scheme
        needs (biases_attention, max_positions, check_config) instead of testing its name."""
        return POSITION_ENCODINGS[self.position_embedding_type]

    def _derived_layer_types(self) -> list[str]:
        """layer_types from the shortcuts: linear scoring, sliding_window, global_attention_every_n_layers."""
        return derive_layer_types({field: getattr(self, field) for field in LAYER_TYPE_SOURCES})

    def validate_layer_type(self) -> None:
        """layer_types against the layers, the window and the scoring (transformers' check, with twinlm's
        messages: field, value, allowed values)."""
        layer_types = self.layer_types
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise ValueError(f"layer_types={layer_types!r} must be a list of strings, one per layer")
        unknown = sorted({t for t in layer_types if t not in LAYER_TYPES})
        if unknown:
            raise ValueError(
                f"layer_types has {', '.join(map(repr, unknown))}; each entry must be one of {', '.join(LAYER_TYPES)}"
            )
        if len(layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(layer_types)} entries but num_hidden_layers={self.num_hidden_layers}: "
                "give one per layer (or leave layer_types unset to derive it)"
            )
        every = self.global_attention_every_n_layers
        if every is not None:
            if every < 1:
                raise ValueError(f"global_attention_every_n_layers={every} must be None or >= 1")
            if self.sliding_window is None:
                raise ValueError(
                    f"global_attention_every_n_layers={every} needs sliding_window (the other layers' window)"
                )
            if layer_types != self._derived_layer_types():
                raise ValueError(
                    f"layer_types={layer_types} disagrees with global_attention_every_n_layers={every}; "
                    "give one of the two"
                )
        linear = [t == "linear_attention" for t in layer_types]
        if self.attention_scoring == "linear" and not all(linear):
            raise ValueError(
                f"attention_scoring='linear' makes every layer linear; layer_types={layer_types} has others"
            )
        if self.attention_scoring != "linear" and any(linear):
            raise ValueError(
                "layer_types 'linear_attention' needs attention_scoring='linear' (twinlm does not mix linear "
                f"and softmax layers); got attention_scoring={self.attention_scoring!r}"
            )
        if "sliding_attention" in layer_types and self.sliding_window is None:
            raise ValueError(
                "layer_types has 'sliding_attention' layers but sliding_window is None; set a window"
            )
        if self.sliding_window is not None and "sliding_attention" not in layer_types:
            raise ValueError(
                f"sliding_window={self.sliding_window} is set but no layer is 'sliding_attention' "
                f"(layer_types={layer_types}); set sliding_window=None or use sliding layers"
            )

    def validate_architecture(self) -> None:
        """Every switch and size checked here, so that nothing fails later inside a forward pass."""
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
            "embedding_size",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be a positive integer")
        for field, limit in SIZE_LIMITS.items():
            if getattr(self, field) > limit:
                raise ValueError(
                    f"{field}={getattr(self, field):,} is beyond what any machine can train here (at most "
                    f"{limit:,}); check the value"
                )
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
        if self.is_causal and self.embedding_size != self.hidden_size:
            raise ValueError(
                f"embedding_size={self.embedding_size} differs from hidden_size={self.hidden_size}: factorised "
                "embeddings are for encoders (is_causal=False); leave embedding_size unset for a causal model"
            )
        self.position_encoding.check_config(self)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be None (full attention) or >= 1")
        if self.attention_scoring == "linear":
            self._check_linear_attention()
        self._check_convolution()
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
        if self.local_rope_theta is not None and self.local_rope_theta <= 0:
            raise ValueError(
                f"local_rope_theta={self.local_rope_theta} must be None (= rope_theta) or positive"
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id={self.pad_token_id} is outside the vocabulary (vocab_size={self.vocab_size}); "
                f"use an id in [0, {self.vocab_size - 1}] or None"
            )

    def _check_linear_attention(self) -> None:
        """Linear attention never forms the (query, key) weights: no window, no bias on them, no dropout of them."""
        if self.sliding_window is not None:
            raise ValueError(
                f"attention_scoring='linear' attends to every token (O(n) already); sliding_window="
                f"{self.sliding_window} must be None"
            )
        if self.position_encoding.biases_attention:
            unbiased = [name for name, scheme in POSITION_ENCODINGS.items() if not scheme.biases_attention]
            raise ValueError(
                f"attention_scoring='linear' cannot add position_embedding_type={self.position_embedding_type!r}'s "
                f"bias to weights it never forms; choose one of {', '.join(unbiased)}"
            )
        if self.attention_probs_dropout_prob:
            raise ValueError(
                "attention_scoring='linear' has no attention weights to drop: set attention_probs_dropout_prob=0 "
                f"(got {self.attention_probs_dropout_prob})"
            )

    def _check_convolution(self) -> None:
        """A kernel of at least one tap; a bidirectional kernel is centred on its token, so its width is odd."""
        k = self.conv_kernel_size
        odd = not self.is_causal
        if k is not None and not (1 <= k <= MAX_CONV_KERNEL and (k % 2 or not odd)):
            allowed = "an odd integer" if odd else "an integer"
            why = " (a bidirectional model's kernel is centred on the token)" if odd else ""
            raise ValueError(
                f"conv_kernel_size={k!r} must be None (no convolution) or {allowed} in [1, {MAX_CONV_KERNEL}]{why}"
            )

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "TwinLMConfig":
        """transformers' loader (from_pretrained, AutoConfig): a saved config's extra keys are kept. Keyword
        overrides of what layer_types derives from (e.g. sliding_window=64, num_hidden_layers=2) apply before the
        config is built, so that a derived layer_types follows them (transformers would set them afterwards)."""
        changed = {key: kwargs.pop(key) for key in LAYER_TYPE_SOURCES if key in kwargs}
        if changed:
            saved = {key: config_dict.get(key, FIELD_DEFAULTS[key]) for key in LAYER_TYPE_SOURCES}
            derived = config_dict.get("layer_types") in (None, derive_layer_types(saved))
            config_dict = {**config_dict, **changed}
            if derived:
                config_dict.pop("layer_types", None)
        token = _LOADING_SAVED_CONFIG.set(True)
        try:
            return super().from_dict(config_dict, **kwargs)
        finally:
            _LOADING_SAVED_CONFIG.reset(token)

    @classmethod
    def preset_names(cls) -> list[str]:
        """Names of the presets shipped in configs/model/ (available when twinlm is installed)."""
        directory = _preset_dir()
        return sorted(p.stem for p in directory.glob("*.yaml")) if directory else []

    @classmethod
    def from_preset(cls, name: str | os.PathLike, **overrides: Any) -> "TwinLMConfig":
        """Build a config from a named preset (e.g. 'bert-base', 'tiny-modern-decoder') or a YAML file.

        A preset may name a parent (`extends: gpt2-small`) and state only what differs. Keyword overrides
        replace preset fields; a key that is not a config field is an error.
        """
        values = load_preset(name)
        check_config_keys(overrides, source="overrides")
        return cls(**{**values, **overrides})


# The fields layer_types is derived from (when it is not given).
LAYER_TYPE_SOURCES = (
    "num_hidden_layers",
    "attention_scoring",
    "sliding_window",
    "global_attention_every_n_layers",
)
FIELD_DEFAULTS = {key: TwinLMConfig.__dataclass_fields__[key].default for key in LAYER_TYPE_SOURCES}


def derive_layer_types(values: dict[str, Any]) -> list[str]:
    """Every layer linear_attention with linear scoring; else sliding_attention where a window is set (all of
    them, or all but layers 0, n, 2n, ... with global_attention_every_n_layers=n); else full_attention."""
    layers, every = range(values["num_hidden_layers"]), values["global_attention_every_n_layers"]
    if values["attention_scoring"] == "linear":
        return ["linear_attention" for _ in layers]
    if values["sliding_window"] is None:
        return ["full_attention" for _ in layers]
    if every is None:
        return ["sliding_attention" for _ in layers]
    return ["full_attention" if i % max(every, 1) == 0 else "sliding_attention" for i in layers]


def load_preset(name: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The field values of a preset (a name in configs/model/ or a YAML path), its `extends:` chain resolved:
    the parent's values, then the file's own. Each file's keys are checked against the config fields."""
    import yaml  # only needed here, and present wherever twinlm is installed

    path = _preset_path(name, _chain[-1].parent if _chain else None)
    if path in _chain:
        loop = " -> ".join(p.name for p in (*_chain, path))
        raise ValueError(f"presets extend each other in a loop: {loop}; remove one of the `extends:`")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a model preset must be a mapping of config fields")
    parent = values.pop("extends", None)
    check_config_keys(values, source=str(path))
    if parent is None:
        return values
    if not isinstance(parent, str):
        raise ValueError(
            f"{path}: extends={parent!r} must be the name of a preset or the path of a YAML file"
        )
    return {**load_preset(parent, (*_chain, path)), **values}


def _preset_path(name: str | os.PathLike, relative_to: Path | None) -> Path:
    """A YAML file named directly (relative to the extending preset's folder, if any) or a shipped preset."""
    path = Path(name)
    candidates = [relative_to / path, relative_to / f"{name}.yaml"] if relative_to else []
    candidates.append(path)
    directory = _preset_dir()
    if directory:
        candidates.append(directory / f"{name}.yaml")
    for candidate in candidates:
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate.resolve()
    names = ", ".join(TwinLMConfig.preset_names())
    raise ValueError(f"unknown preset {str(name)!r}; choose one of {names} or give the path of a YAML file")


def check_config_keys(values: dict[str, Any], source: str = "config") -> None:
    """Reject keys that are not TwinLMConfig fields (transformers itself silently keeps typos)."""
    known = set(TwinLMConfig.__dataclass_fields__) | {"num_labels", "problem_type", "id2label", "label2id"}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{source}: unknown TwinLMConfig field(s): {', '.join(hints)}")


def _close_field(key: str) -> str | None:
    """The TwinLMConfig field that `key` (not itself a field) is a misspelling of, if any."""
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


__all__ = [
    "TwinLMConfig",
    "CHOICES",
    "LAYER_TYPES",
    "SIZE_LIMITS",
    "check_config_keys",
    "load_preset",
]
