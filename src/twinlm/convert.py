"""Convert transformers BERT, GPT-2 and Llama models into the equivalent twinlm models.

`from_hf(model)` maps the config and copies every weight, so that the converted model's eval-mode logits
equal the original's (to float rounding). That proves the `bert-base` and `gpt2-small` presets describe
those architectures exactly, and lets users start from released BERT / GPT-2 weights:

    from transformers import GPT2LMHeadModel
    from twinlm.convert import from_hf
    twin = from_hf(GPT2LMHeadModel.from_pretrained("path/to/gpt2"))

On the command line, `twinlm convert SRC_DIR OUT_DIR` converts a saved checkpoint directory.

Notes on what "equivalent" means:
- BertModel's pooler (dense + tanh over [CLS]) is dropped: twinlm's pooler belongs to the
  sequence-classification head, which starts fresh when fine-tuning, as BERT's own recipe allows.
- GPT-2 has no pad token: the twinlm config gets pad_token_id=None so that no embedding row is
  frozen as padding; a pad token for generate() stays in the copied generation config.
- GPT-2 passes token_type_ids through its token embeddings; twinlm's GPT-2 (type_vocab_size=0)
  ignores them. Nobody uses that path for GPT-2, but it is the one input on which the two differ.
- Llama is twinlm's modern decoder: pre-norm RMSNorm, RoPE (rotate-half, default scaling), SwiGLU, grouped-query
  attention; a Llama with rope scaling or a head_dim other than hidden_size / heads is refused.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from twinlm.errors import TwinLMError, is_out_of_memory
from twinlm.fileio import atomic_folder, check_output_folder
from twinlm.model import TwinLMConfig, TwinLMForCausalLM, TwinLMForMaskedLM, TwinLMModel
from twinlm.model_folder import check_weights, load_error

# transformers class name -> the equivalent twinlm class
SUPPORTED: dict[str, type[nn.Module]] = {
    "BertForMaskedLM": TwinLMForMaskedLM,
    "BertModel": TwinLMModel,
    "GPT2LMHeadModel": TwinLMForCausalLM,
    "GPT2Model": TwinLMModel,
    "LlamaForCausalLM": TwinLMForCausalLM,
    "LlamaModel": TwinLMModel,
}
# model_type in config.json -> the Auto class that loads a checkpoint of that type for conversion
AUTO_CLASS_FOR_TYPE = {
    "bert": "AutoModelForMaskedLM",
    "gpt2": "AutoModelForCausalLM",
    "llama": "AutoModelForCausalLM",
}

# transformers activation name -> twinlm hidden_act. The tanh approximations of GELU are the same
# function written three ways (differences ~1e-7).
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_fast": "gelu_new",
    "relu": "relu",
}

# Files of a tokenizer saved next to a checkpoint; copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)

# A weight transform: HF tensor -> twinlm tensor (None = copy as is).
Transform = Callable[[torch.Tensor], torch.Tensor] | None


def _supported_names() -> str:
    return ", ".join(SUPPORTED)


# ---------------------------------------------------------------------------------------------------
# Config mapping


def _activation(name: Any, field_name: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise TwinLMError(
            f"{field_name}={name!r} has no twinlm equivalent; supported: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def _bert_config(hf: Any, with_mlm_head: bool) -> dict[str, Any]:
    if getattr(hf, "is_decoder", False) or getattr(hf, "add_cross_attention", False):
        raise TwinLMError(
            "BERT configs with is_decoder=True or add_cross_attention=True (encoder-decoder use) are not "
            "supported; convert a bidirectional BertForMaskedLM or BertModel"
        )
    position_type = getattr(hf, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise TwinLMError(f"BERT position_embedding_type={position_type!r} is not supported; only 'absolute'")
    act = _activation(hf.hidden_act, "hidden_act")
    return dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        type_vocab_size=hf.type_vocab_size,
        is_causal=False,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="post",
        embedding_norm=True,
        hidden_act=act,
        attention_scoring="scaled_dot",
        # BERT's embedding dropout is its hidden dropout.
        hidden_dropout_prob=float(hf.hidden_dropout_prob),
        attention_probs_dropout_prob=float(hf.attention_probs_dropout_prob),
        embedding_dropout_prob=float(hf.hidden_dropout_prob),
        classifier_dropout=None if hf.classifier_dropout is None else float(hf.classifier_dropout),
        layer_norm_eps=hf.layer_norm_eps,
        initializer_range=hf.initializer_range,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.tie_word_embeddings,
        pad_token_id=hf.pad_token_id,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
    )


def _gpt2_config(hf: Any) -> dict[str, Any]:
    if getattr(hf, "add_cross_attention", False):
        raise TwinLMError("GPT-2 configs with add_cross_attention=True are not supported")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        raise TwinLMError(
            "GPT-2 scale_attn_by_inverse_layer_idx=True (per-layer attention scaling) has no twinlm equivalent"
        )
    # reorder_and_upcast_attn only changes the order of float operations (same values in float32).
    return dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.n_embd,
        num_hidden_layers=hf.n_layer,
        num_attention_heads=hf.n_head,
        intermediate_size=hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd,
        max_position_embeddings=hf.n_positions,
        type_vocab_size=0,
        is_causal=True,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="pre",
        embedding_norm=False,
        hidden_act=_activation(hf.activation_function, "activation_function"),
        attention_scoring="scaled_dot" if hf.scale_attn_weights else "dot",
        hidden_dropout_prob=float(hf.resid_pdrop),
        attention_probs_dropout_prob=float(hf.attn_pdrop),
        embedding_dropout_prob=float(hf.embd_pdrop),
        layer_norm_eps=hf.layer_norm_epsilon,
        initializer_range=hf.initializer_range,
        scale_residual_init=True,  # GPT-2 scales its c_proj init by 1/sqrt(2 * n_layer)
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.tie_word_embeddings,
        # GPT-2's embedding has no padding row: None keeps every row trainable, as in GPT-2.
        pad_token_id=None,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
    )


def _llama_config(hf: Any) -> dict[str, Any]:
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TwinLMError(
            f"Llama rope_type={rope.get('rope_type')!r} (rope scaling) has no twinlm equivalent; only 'default'"
        )
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise TwinLMError(
            f"Llama head_dim={head_dim} x num_attention_heads={hf.num_attention_heads} != hidden_size="
            f"{hf.hidden_size}: twinlm's heads split the hidden size"
        )
    if hf.hidden_act != "silu":
        raise TwinLMError(
            f"Llama hidden_act={hf.hidden_act!r} has no twinlm equivalent; only 'silu' (SwiGLU)"
        )
    return dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads,
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        type_vocab_size=0,
        is_causal=True,
        position_embedding_type="rope",
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_type="rmsnorm",
        norm_position="pre",
        embedding_norm=False,
        hidden_act="swiglu",
        attention_scoring="scaled_dot",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=float(hf.attention_dropout),
        embedding_dropout_prob=0.0,
        layer_norm_eps=hf.rms_norm_eps,
        initializer_range=hf.initializer_range,
        attention_bias=hf.attention_bias,
        mlp_bias=hf.mlp_bias,
        tie_word_embeddings=hf.tie_word_embeddings,
        pad_token_id=hf.pad_token_id,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
    )


def config_from_hf(hf_config: Any, with_mlm_head: bool = True) -> TwinLMConfig:
    """The TwinLMConfig equivalent to a transformers BertConfig, GPT2Config or LlamaConfig."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "bert":
        values = _bert_config(hf_config, with_mlm_head)
    elif model_type == "gpt2":
        values = _gpt2_config(hf_config)
    elif model_type == "llama":
        values = _llama_config(hf_config)
    else:
        raise TwinLMError(f"model_type={model_type!r} cannot be converted; supported: bert, gpt2, llama")
    try:
        return TwinLMConfig(**values)
    except ValueError as err:  # e.g. hidden size not divisible by the head count
        raise TwinLMError(f"the {model_type} config has no valid twinlm equivalent: {err}") from err


# ---------------------------------------------------------------------------------------------------
# Weight mapping: (twinlm key, HF key, transform) for every twinlm weight.


def _bert_weights(config: TwinLMConfig, prefix: str, mlm_head: bool) -> Iterator[tuple[str, str, Transform]]:
    p = prefix
    yield "model.embeddings.word_embeddings.weight", f"{p}embeddings.word_embeddings.weight", None
    yield "model.positions.embeddings.weight", f"{p}embeddings.position_embeddings.weight", None
    yield "model.embeddings.token_type_embeddings.weight", f"{p}embeddings.token_type_embeddings.weight", None
    for kind in ("weight", "bias"):
        yield f"model.embeddings.norm.{kind}", f"{p}embeddings.LayerNorm.{kind}", None
    for i in range(config.num_hidden_layers):
        src, dst = f"{p}encoder.layer.{i}.", f"model.layers.{i}."
        names = {
            "attention.q_proj": "attention.self.query",
            "attention.k_proj": "attention.self.key",
            "attention.v_proj": "attention.self.value",
            "attention.o_proj": "attention.output.dense",
            "attention_norm": "attention.output.LayerNorm",
            "mlp.up_proj": "intermediate.dense",
            "mlp.down_proj": "output.dense",
            "mlp_norm": "output.LayerNorm",
        }
        for twin_name, hf_name in names.items():
            for kind in ("weight", "bias"):
                yield f"{dst}{twin_name}.{kind}", f"{src}{hf_name}.{kind}", None
    if mlm_head:
        for kind in ("weight", "bias"):
            yield f"head_dense.{kind}", f"cls.predictions.transform.dense.{kind}", None
            yield f"head_norm.{kind}", f"cls.predictions.transform.LayerNorm.{kind}", None
        yield "lm_head.weight", "cls.predictions.decoder.weight", None
        # The forward pass adds decoder.bias; cls.predictions.bias is the same tensor when the
        # embeddings are tied and unused otherwise.
        yield "lm_head.bias", "cls.predictions.decoder.bias", None


def _conv1d(t: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)."""
    return t.t() if t.dim() == 2 else t


def _fused_part(index: int, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Slice q (0), k (1) or v (2) out of GPT-2's fused c_attn = [q | k | v] along the output axis."""
    return lambda t: _conv1d(t)[index * size : (index + 1) * size]


def _gpt2_weights(config: TwinLMConfig, prefix: str, lm_head: bool) -> Iterator[tuple[str, str, Transform]]:
    p, h = prefix, config.hidden_size
    yield "model.embeddings.word_embeddings.weight", f"{p}wte.weight", None
    yield "model.positions.embeddings.weight", f"{p}wpe.weight", None
    for i in range(config.num_hidden_layers):
        src, dst = f"{p}h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                yield f"{dst}attention.{proj}.{kind}", f"{src}attn.c_attn.{kind}", _fused_part(index, h)
            yield f"{dst}attention.o_proj.{kind}", f"{src}attn.c_proj.{kind}", _conv1d
            yield f"{dst}mlp.up_proj.{kind}", f"{src}mlp.c_fc.{kind}", _conv1d
            yield f"{dst}mlp.down_proj.{kind}", f"{src}mlp.c_proj.{kind}", _conv1d
            yield f"{dst}attention_norm.{kind}", f"{src}ln_1.{kind}", None
            yield f"{dst}mlp_norm.{kind}", f"{src}ln_2.{kind}", None
    for kind in ("weight", "bias"):
        yield f"model.final_norm.{kind}", f"{p}ln_f.{kind}", None
    if lm_head:
        yield "lm_head.weight", "lm_head.weight", None


def _llama_weights(config: TwinLMConfig, prefix: str, lm_head: bool) -> Iterator[tuple[str, str, Transform]]:
    p = prefix
    yield "model.embeddings.word_embeddings.weight", f"{p}embed_tokens.weight", None
    kinds = {"attention": ("weight", "bias") if config.attention_bias else ("weight",)}
    kinds["mlp"] = ("weight", "bias") if config.mlp_bias else ("weight",)
    for i in range(config.num_hidden_layers):
        src, dst = f"{p}layers.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for kind in kinds["attention"]:
                yield f"{dst}attention.{proj}.{kind}", f"{src}self_attn.{proj}.{kind}", None
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for kind in kinds["mlp"]:
                yield f"{dst}mlp.{proj}.{kind}", f"{src}mlp.{proj}.{kind}", None
        yield f"{dst}attention_norm.weight", f"{src}input_layernorm.weight", None
        yield f"{dst}mlp_norm.weight", f"{src}post_attention_layernorm.weight", None
    yield "model.final_norm.weight", f"{p}norm.weight", None
    if lm_head:
        yield "lm_head.weight", "lm_head.weight", None


def _weight_plan(
    class_name: str, config: TwinLMConfig
) -> tuple[list[tuple[str, str, Transform]], tuple[str, ...]]:
    """The weight mapping for one supported class, and the HF key prefixes that are dropped on purpose."""
    if class_name == "BertForMaskedLM":
        return list(_bert_weights(config, "bert.", mlm_head=True)), ("cls.predictions.bias",)
    if class_name == "BertModel":
        return list(_bert_weights(config, "", mlm_head=False)), ("pooler.",)
    if class_name == "GPT2LMHeadModel":
        return list(_gpt2_weights(config, "transformer.", lm_head=True)), ()
    if class_name == "LlamaForCausalLM":
        return list(_llama_weights(config, "model.", lm_head=True)), ()
    if class_name == "LlamaModel":
        return list(_llama_weights(config, "", lm_head=False)), ()
    return list(_gpt2_weights(config, "", lm_head=False)), ()


def from_hf(model: nn.Module) -> TwinLMForMaskedLM | TwinLMForCausalLM | TwinLMModel:
    """The twinlm model equivalent to a transformers BertForMaskedLM, GPT2LMHeadModel, LlamaForCausalLM or their
    bare models (BertModel, GPT2Model, LlamaModel).

    The config is mapped field by field and every weight is copied (shape-checked; GPT-2's Conv1D
    weights transposed and its fused q|k|v split). Any HF weight the mapping would not use is an
    error, except BertModel's pooler. The result is in eval mode, on the source model's device and
    dtype; its logits match the source's (in eval mode) to float rounding.
    """
    class_name = type(model).__name__
    if class_name not in SUPPORTED:
        raise TwinLMError(f"cannot convert a {class_name}; supported classes: {_supported_names()}")
    twin_class = SUPPORTED[class_name]
    config = config_from_hf(model.config, with_mlm_head=class_name == "BertForMaskedLM")
    plan, dropped_prefixes = _weight_plan(class_name, config)
    if twin_class is TwinLMModel:  # the bare stack's keys lack the heads' "model." prefix
        plan = [(key.removeprefix("model."), hf_key, transform) for key, hf_key, transform in plan]

    hf_state = model.state_dict()
    twin = twin_class(config)
    reference = twin.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for twin_key, hf_key, transform in plan:
        if hf_key not in hf_state:
            raise TwinLMError(
                f"the {class_name} has no weight {hf_key!r} (needed for {twin_key}); is it a {class_name}?"
            )
        used.add(hf_key)
        tensor = hf_state[hf_key]
        tensor = transform(tensor) if transform is not None else tensor
        expected = reference[twin_key].shape
        if tuple(tensor.shape) != tuple(expected):
            raise TwinLMError(
                f"weight {hf_key!r} has shape {tuple(tensor.shape)} but {twin_key} needs {tuple(expected)}"
            )
        new_state[twin_key] = tensor.detach().to(device="cpu", dtype=reference[twin_key].dtype)
    leftover = sorted(k for k in set(hf_state) - used if not k.startswith(dropped_prefixes))
    if leftover:
        raise TwinLMError(
            f"the {class_name} has weights the conversion would drop: {', '.join(leftover[:5])}"
            + (f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else "")
        )
    missing, unexpected = twin.load_state_dict(new_state, strict=False)
    if missing or unexpected:  # a mapping bug, not bad input: fail loudly
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings and hasattr(twin, "lm_head"):
        if twin.lm_head.weight is not twin.model.embeddings.word_embeddings.weight:
            raise RuntimeError("twinlm lost the tie between lm_head and the word embeddings")

    generation_config = getattr(model, "generation_config", None)
    if twin.can_generate() and generation_config is not None:
        twin.generation_config = copy.deepcopy(generation_config)
    parameter = next(model.parameters())
    return twin.to(device=parameter.device, dtype=parameter.dtype).eval()


# ---------------------------------------------------------------------------------------------------
# Measuring equivalence


def random_padded_batch(
    config: TwinLMConfig, batch_size: int = 3, seq_len: int = 16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids with varied lengths: right padding for BERT-style models (with token_type_ids:
    segment 0 then 1), left padding for GPT-style ones (as generate() pads), plus an attention mask."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = min(seq_len, config.max_position_embeddings)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    lengths = [seq_len] + torch.randint(1, seq_len + 1, (batch_size - 1,), generator=generator).tolist()
    mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for row, length in enumerate(lengths[:batch_size]):
        if config.is_causal:
            mask[row, seq_len - length :] = 1
        else:
            mask[row, :length] = 1
    batch = {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}
    if not config.is_causal and config.type_vocab_size > 1:
        segment = torch.zeros_like(mask)
        for row, length in enumerate(lengths[:batch_size]):
            segment[row, length // 2 : length] = 1
        batch["token_type_ids"] = segment
    return batch


def _outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


@torch.no_grad()
def max_logit_difference(
    hf_model: nn.Module, twin: nn.Module, batch_size: int = 3, seq_len: int = 16, seed: int = 0
) -> float:
    """Max |logit difference| (hidden state difference for bare models) over the real tokens of a
    random padded batch, both models in eval mode. GPT-2 derives no positions from the attention
    mask, so it gets the positions generate() would give it; twinlm derives them itself."""
    batch = random_padded_batch(twin.config, batch_size, seq_len, seed)
    device = next(twin.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    hf_batch = dict(batch)
    if twin.config.is_causal:
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        hf_batch["position_ids"] = positions
    modes = hf_model.training, twin.training
    hf_model.eval()
    twin.eval()
    try:
        difference = (_outputs(hf_model, hf_batch) - _outputs(twin, batch)).abs()
    finally:
        hf_model.train(modes[0])
        twin.train(modes[1])
    real = batch["attention_mask"].bool()
    return float(difference[real].max())


# ---------------------------------------------------------------------------------------------------
# Converting a checkpoint directory


@dataclass
class ConversionSummary:
    source: Path
    output: Path
    source_class: str
    twin_class: str
    num_parameters: int
    max_logit_difference: float
    tokenizer_files: list[str] = field(default_factory=list)

    def format(self) -> str:
        return "\n".join(
            [
                f"converted {self.source_class} ({self.num_parameters:,} parameters) -> {self.twin_class}",
                f"  source:    {self.source}",
                f"  output:    {self.output}",
                f"  tokenizer: {', '.join(self.tokenizer_files) if self.tokenizer_files else 'none found'}",
                f"  max |logit difference| on a random padded batch: {self.max_logit_difference:.3g}",
            ]
        )


def _checkpoint_loader(source: Path) -> Any:
    """The transformers class that loads the checkpoint in `source` (checked before any loading)."""
    import transformers

    if not source.is_dir():
        raise TwinLMError(
            f"source {source} is not a directory; give a checkpoint directory (config.json + weights)"
        )
    config_file = source / "config.json"
    if not config_file.is_file():
        raise TwinLMError(f"{source} has no config.json; give a directory written by save_pretrained()")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise TwinLMError(f"{config_file} is not valid JSON ({err.msg} at line {err.lineno})") from err
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in AUTO_CLASS_FOR_TYPE:
        raise TwinLMError(
            f"{config_file}: model_type={model_type!r} cannot be converted; supported: "
            f"{', '.join(AUTO_CLASS_FOR_TYPE)}"
        )
    # A checkpoint saved from a supported class is loaded as that class (a BertModel must not get a
    # random masked-LM head); others (e.g. BertForPreTraining) through the Auto class of their type.
    architectures = raw.get("architectures") or []
    name = next((a for a in architectures if a in SUPPORTED), None)
    return getattr(transformers, name or AUTO_CLASS_FOR_TYPE[model_type])


def _load_hf(loader: Any, source: Path) -> nn.Module:
    try:
        model, info = loader.from_pretrained(source, local_files_only=True, output_loading_info=True)
    except Exception as err:  # a damaged file, a wrongly typed config field (huggingface_hub's strict errors)
        if is_out_of_memory(err):
            raise
        raise load_error(err, source) from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise TwinLMError(f"{source} lacks weights of a {type(model).__name__}: {', '.join(missing[:5])}")
    return model


def _name_the_tokenizer(source: Path, out: Path) -> None:
    """A tokenizer_config.json without `tokenizer_class` (the Hub's bert-base-uncased, gpt2) is loaded by the
    class its model_type names; beside a twinlm config that fallback is gone and AutoTokenizer gave a bare
    tokenizer without [CLS]/[MASK]/[PAD] (or GPT-2's <|endoftext|>). Name the class and its special tokens."""
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if config.get("tokenizer_class"):
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception:  # noqa: BLE001 - the files stay as they were copied; the weights are what was converted
        return
    config["tokenizer_class"] = type(tokenizer).__name__
    for key, value in tokenizer.special_tokens_map.items():
        if isinstance(value, str):
            config.setdefault(key, value)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_checkpoint(source: str | Path, output: str | Path, seed: int = 0) -> ConversionSummary:
    """Load a saved BERT / GPT-2 checkpoint, convert it, save the twinlm model (with its code, so that
    it loads with trust_remote_code=True) and the tokenizer files, and measure the logit difference."""
    source, output = Path(source), Path(output)
    if output.resolve() == source.resolve():
        raise TwinLMError(f"output {output} is the source directory; choose another output directory")
    loader = _checkpoint_loader(source)
    check_weights(source)  # a damaged or missing weights file: one line naming it
    check_output_folder(output, "output")

    with tqdm(total=4, desc="convert", unit="step") as steps:
        steps.set_postfix_str("loading")
        hf_model = _load_hf(loader, source)
        steps.update()
        steps.set_postfix_str("converting")
        twin = from_hf(hf_model)
        steps.update()
        steps.set_postfix_str("comparing logits")
        difference = max_logit_difference(hf_model, twin, seed=seed)
        steps.update()
        steps.set_postfix_str("saving")
        copied = []
        with atomic_folder(output, "the converted model") as tmp:
            twin.save_pretrained(tmp)
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
                    copied.append(name)
            if copied:
                _name_the_tokenizer(source, tmp)
        steps.update()
    return ConversionSummary(
        source=source,
        output=output,
        source_class=type(hf_model).__name__,
        twin_class=type(twin).__name__,
        num_parameters=twin.num_parameters(),
        max_logit_difference=difference,
        tokenizer_files=copied,
    )


__all__ = [
    "from_hf",
    "config_from_hf",
    "max_logit_difference",
    "random_padded_batch",
    "convert_checkpoint",
    "ConversionSummary",
    "SUPPORTED",
]
