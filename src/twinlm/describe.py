"""`twinlm describe CONFIG_OR_PRESET`: parameters and FLOPs of a model config, per component, without training.

Parameters per component (embeddings, Q/K/V/O, convolution, FFN, norms, heads; tied weights once), FLOPs per
token of one training step at a sequence length (forward + backward) and of one generated token with a KV cache
at a context length, and the KV cache's size. The numbers are computed from the config by following what the
model code runs (dense, blocked-window and linear attention, the convolution module, sparse prediction, GQA, GLU,
shared Q/K): tests/test_describe.py checks them against the parameters of the built model and against torch's
FlopCounterMode.

FLOPs here are 2 x the multiply-adds of the matrix products, as FlopCounterMode counts them; elementwise work
(norms, activations, softmax, RoPE, the loss) is left out.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinlm.errors import TwinLMError

if TYPE_CHECKING:
    from twinlm.model.configuration_twinlm import TwinLMConfig

# KV cache element sizes of the dtypes a model generates in.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Linear attention's recurrent state is float32 whatever the model's dtype (linear_attention.py).
LINEAR_STATE_BYTES = 4
# The convolution module's pointwise layers: in to 2 x width (the GLU halves it), out from width.
CONV_IN_WIDTH = 2
# The masked share of tokens when nothing else says (BERT's, and DataConfig.mlm_probability's default).
DEFAULT_MLM_PROBABILITY = 0.15
# A training step is the forward pass and a backward pass that computes, for every product, the gradient of
# each operand (two products of the same size): 3 x the forward.
TRAINING_PASSES = 3

# Parameter counts of one norm, per hidden unit: (weight, bias).
NORM_PARAMETERS = {"layernorm": (1, 1), "rmsnorm": (1, 0), "batchnorm": (1, 1)}


@dataclass(frozen=True)
class ParameterGroup:
    """One component's parameters; `modules` are the fnmatch patterns of their names in the pretraining model."""

    section: str  # "embeddings", "blocks" or "head"
    component: str
    count: int  # all layers together
    biases: int  # of which bias vectors (Linear biases and norm shifts)
    modules: tuple[str, ...]
    per_layer: int | None = None  # for the blocks' components
    lookup_table: bool = False  # read by index, not multiplied (left out of "without embeddings")
    note: str = ""


@dataclass(frozen=True)
class TrainingFlops:
    """One component's FLOPs per token of a training step."""

    component: str
    forward: float
    training: float  # forward + backward


@dataclass(frozen=True)
class GenerationFlops:
    """One component's FLOPs for one new token generated with a KV cache."""

    component: str
    flops: float


@dataclass(frozen=True)
class KVCacheSize:
    """What a generating decoder keeps per sequence: keys and values of softmax layers, linear layers' state."""

    dtype: str
    bytes_per_token: int  # growth per token once every window is full (full-attention layers)
    bytes_at_context: int  # held with `context` tokens cached
    constant_bytes: int  # fixed-size states: linear layers' (float32), the convolution's last k - 1 inputs


@dataclass(frozen=True)
class Description:
    """Parameters and FLOPs of one config (see `describe`)."""

    source: str
    architecture: str
    model_class: str
    layer_types: dict[str, int]
    seq_len: int
    context: int | None  # None for an encoder (no generation)
    mlm_probability: float | None  # the masked share sparse prediction assumes; None where unused
    parameters: tuple[ParameterGroup, ...]
    total_parameters: int
    parameters_without_embeddings: int
    training_flops: tuple[TrainingFlops, ...]
    forward_flops_per_token: float
    training_flops_per_token: float
    mfu_rule_flops_per_token: float  # twinlm.training.tracking.flops_per_token: what training's MFU uses
    generation_flops: tuple[GenerationFlops, ...] | None
    generation_flops_per_token: float | None
    kv_cache: KVCacheSize | None
    assumptions: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The readable report: three tables, the cache, the assumptions."""
        return format_description(self)


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------
def parameter_groups(config: TwinLMConfig) -> tuple[ParameterGroup, ...]:
    """Every parameter of the pretraining model (masked-LM or causal-LM) in one group, tied weights once."""
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    q_width, kv_width = heads * config.head_dim, config.num_key_value_heads * config.head_dim
    norm_weight, norm_bias = (d * n for n in NORM_PARAMETERS[config.norm_type])
    attention_bias, mlp_bias = int(config.attention_bias), int(config.mlp_bias)
    inner = config.intermediate_size
    tied = bool(config.tie_word_embeddings)
    groups: list[ParameterGroup] = []

    def table(component: str, count: int, name: str, note: str = "") -> None:
        """A lookup table of the embeddings (read by index)."""
        groups.append(
            ParameterGroup("embeddings", component, count, 0, (name,), lookup_table=True, note=note)
        )

    def block(component: str, weights: int, biases: int, modules: tuple[str, ...], note: str = "") -> None:
        """A component of every block (the counts of one layer)."""
        per_layer, names = weights + biases, tuple(f"model.layers.*.{m}" for m in modules)
        groups.append(
            ParameterGroup(
                "blocks", component, per_layer * layers, biases * layers, names, per_layer, note=note
            )
        )

    def single(
        section: str, component: str, weights: int, biases: int, modules: tuple[str, ...], note: str = ""
    ) -> None:
        """A component that exists once (a norm, a head)."""
        groups.append(ParameterGroup(section, component, weights + biases, biases, modules, note=note))

    tied_note = "also the LM head's weight (tied)" if tied else ""
    table("token embeddings", config.vocab_size * d, "model.embeddings.word_embeddings.weight", tied_note)
    if config.type_vocab_size > 0:
        table(
            "segment embeddings", config.type_vocab_size * d, "model.embeddings.token_type_embeddings.weight"
        )
    if config.position_embedding_type == "learned":
        table("position embeddings", config.max_position_embeddings * d, "model.positions.embeddings.weight")
    if config.position_embedding_type == "relative":
        buckets = config.relative_attention_num_buckets * heads
        table(
            "relative position biases", buckets, "model.positions.bias.weight", "buckets x heads, all layers"
        )
    if config.embedding_norm:
        single("embeddings", "embedding norm", norm_weight, norm_bias, ("model.embeddings.norm.*",))

    block("Q", d * q_width, q_width * attention_bias, ("attention.q_proj.*",))
    if config.share_qk:
        block("K", 0, 0, (), note="share_qk: keys come from Q's projection")
    else:
        block("K", d * kv_width, kv_width * attention_bias, ("attention.k_proj.*",))
    block("V", d * kv_width, kv_width * attention_bias, ("attention.v_proj.*",))
    block("O", q_width * d, d * attention_bias, ("attention.o_proj.*",))
    if config.attention_scoring == "additive":
        block("additive scoring vectors", q_width, 0, ("attention.scoring.score_vector",))
    if config.conv_kernel_size is not None:
        k, conv_in = config.conv_kernel_size, CONV_IN_WIDTH * d
        block("conv pointwise in", d * conv_in, conv_in * mlp_bias, ("conv.pointwise_in.*",), "then GLU")
        block("conv depthwise", d * k, d * mlp_bias, ("conv.depthwise.*",), f"kernel {k}, one per channel")
        block("conv pointwise out", d * d, d * mlp_bias, ("conv.pointwise_out.*",))
    block("FFN up", d * inner, inner * mlp_bias, ("mlp.up_proj.*",))
    if _gated(config):
        block("FFN gate", d * inner, inner * mlp_bias, ("mlp.gate_proj.*",))
    block("FFN down", inner * d, d * mlp_bias, ("mlp.down_proj.*",))
    norms, note = ("attention_norm.*", "mlp_norm.*"), ""
    if config.conv_kernel_size is not None:
        norms, note = (*norms, "conv.norm.*", "conv.depthwise_norm.*"), "with the convolution's two"
    count = len(norms)
    block("norms", count * norm_weight, count * norm_bias, norms, note)
    if config.norm_position == "pre":
        single("blocks", "final norm", norm_weight, norm_bias, ("model.final_norm.*",))

    head_weight = 0 if tied else config.vocab_size * d
    if config.is_causal:
        note = "tied to the token embeddings (counted there)" if tied else ""
        single("head", "LM head", head_weight, 0, ("lm_head.*",), note)
    else:
        transform = ("head_dense.*", "head_norm.*")
        single("head", "MLM transform (dense + norm)", d * d + norm_weight, d + norm_bias, transform)
        note = "weight tied to the token embeddings (counted there); its bias here" if tied else ""
        single("head", "MLM decoder", head_weight, config.vocab_size, ("lm_head.*",), note)
    return tuple(groups)


def _gated(config: TwinLMConfig) -> bool:
    """Whether the feed-forward block is a GLU (three matrices: gate, up, down)."""
    from twinlm.model.layers import FEED_FORWARDS, TwinLMGatedMLP

    return FEED_FORWARDS[config.hidden_act][0] is TwinLMGatedMLP


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
def forward_flops(
    config: TwinLMConfig, tokens: int, past: int = 0, predicted: float | None = None
) -> dict[str, float]:
    """FLOPs per component of one forward pass over one row of `tokens` new tokens after `past` cached ones.
    `predicted`: how many of them the head runs on (sparse prediction's masked tokens; default all)."""
    predicted = tokens if predicted is None else predicted
    last_selects = predicted != tokens and _last_block_selects_queries(config)
    flops: dict[str, float] = {}
    for index, layer_type in enumerate(config.layer_types):
        queries = predicted if last_selects and index == config.num_hidden_layers - 1 else tokens
        for component, value in _block_flops(config, layer_type, tokens, past, queries).items():
            flops[component] = flops.get(component, 0.0) + value
    d, vocab = config.hidden_size, config.vocab_size
    if not config.is_causal:
        flops["MLM transform"] = 2.0 * predicted * d * d
    flops["LM head" if config.is_causal else "MLM decoder"] = 2.0 * predicted * d * vocab
    return flops


def _last_block_selects_queries(config: TwinLMConfig) -> bool:
    """Whether sparse prediction also computes only the masked tokens' queries in the last block (see
    TwinLMModel._can_skip_queries: not for linear attention, whose mask has no rows, nor batch norm, nor with a
    convolution, which reads the neighbours)."""
    return (
        not config.is_causal
        and config.norm_type != "batchnorm"
        and config.layer_types[-1] != "linear_attention"
        and config.conv_kernel_size is None
    )


def _block_flops(
    config: TwinLMConfig, layer_type: str, tokens: int, past: int, queries: float
) -> dict[str, float]:
    """One block: projections (queries on `queries` tokens, keys and values on all), attention, FFN."""
    d, inner = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    flops = {
        "Q": 2.0 * queries * d * q_width,
        # share_qk runs Q's projection again over every token for the keys: the same products as a K
        "K": 2.0 * tokens * d * kv_width,
        "V": 2.0 * tokens * d * kv_width,
        "O": 2.0 * queries * q_width * d,
    }
    flops.update(_attention_flops(config, layer_type, tokens, past, queries))
    if config.conv_kernel_size is not None:  # (on every token: the last block then computes every query)
        flops["conv pointwise in"] = 2.0 * tokens * d * CONV_IN_WIDTH * d
        flops["conv depthwise"] = 2.0 * tokens * d * config.conv_kernel_size
        flops["conv pointwise out"] = 2.0 * tokens * d * d
    flops["FFN up"] = 2.0 * queries * d * inner
    if _gated(config):
        flops["FFN gate"] = 2.0 * queries * d * inner
    flops["FFN down"] = 2.0 * queries * inner * d
    return flops


def _attention_flops(
    config: TwinLMConfig, layer_type: str, tokens: int, past: int, queries: float
) -> dict[str, float]:
    """The products between queries and keys: scores and weights x values, or linear attention's."""
    heads, head_dim = config.num_attention_heads, config.head_dim
    if layer_type == "linear_attention":
        return {"linear attention": heads * _linear_attention_per_head(config, tokens, past)}
    pairs = query_key_pairs(config, layer_type, tokens, past, queries)
    # additive scoring: w . tanh(q + k) is one head_dim product per pair, like q . k
    scores = "additive scores" if config.attention_scoring == "additive" else "QK^T"
    return {scores: 2.0 * pairs * heads * head_dim, "AV": 2.0 * pairs * heads * head_dim}


def query_key_pairs(config: TwinLMConfig, layer_type: str, tokens: int, past: int, queries: float) -> float:
    """The (query, key) pairs a softmax layer computes for one row, as the model runs it: dense over every key
    (also when causal), a sliding window in blocks of queries (WindowBlocks), each selected query against its
    own window (WindowQueries), a decoding token against the cache's keys."""
    from twinlm.model.attention import WindowBlocks, block_size, window_reach

    if layer_type != "sliding_attention":
        return queries * (past + tokens)
    window = config.sliding_window
    if past:  # the sliding cache keeps window - 1 keys; the new tokens come after them
        return queries * (min(past, window - 1) + tokens)
    left, right = window_reach(window, config.is_causal)
    if not WindowBlocks.applies(tokens, left, right):  # short sequences: a dense masked product
        return queries * tokens
    if queries != tokens:  # sparse prediction's last block: each query against exactly its window
        return queries * (left + right + 1)
    block = block_size(left, right)
    groups = -(-(left + tokens + right) // block)
    return groups * block * (block + left + right)


def _linear_attention_per_head(config: TwinLMConfig, tokens: int, past: int) -> float:
    """Linear attention's products for one head (linear_attention.py): bidirectional, one phi(K)^T V and one
    phi(Q) S; causal, in chunks of LINEAR_CHUNK tokens (padded), each with its masked (chunk x chunk)
    products, its own K^T V and the earlier chunks' sum; plus phi(Q) times a cached state."""
    from twinlm.model.linear_attention import LINEAR_CHUNK

    d, dv = config.head_dim, config.head_dim + 1  # a column of ones carries the denominator
    if config.is_causal:
        padded = -(-tokens // LINEAR_CHUNK) * LINEAR_CHUNK
        flops = 2.0 * padded * LINEAR_CHUNK * (d + dv) + 2 * 2.0 * padded * d * dv
    else:
        flops = 2 * 2.0 * tokens * d * dv
    if past:  # generating: the state of the tokens before
        flops += 2.0 * tokens * d * dv
    return flops


def training_flops(
    config: TwinLMConfig, seq_len: int, mlm_probability: float = DEFAULT_MLM_PROBABILITY
) -> tuple[TrainingFlops, ...]:
    """FLOPs per token of one training step over rows of `seq_len` tokens (masked LM with sparse prediction:
    the head, and the last block's queries, on `mlm_probability` of them)."""
    sparse = config.sparse_prediction and not config.is_causal
    predicted = mlm_probability * seq_len if sparse else None
    return tuple(
        TrainingFlops(component, value / seq_len, TRAINING_PASSES * value / seq_len)
        for component, value in forward_flops(config, seq_len, predicted=predicted).items()
    )


def generation_flops(config: TwinLMConfig, context: int) -> tuple[GenerationFlops, ...]:
    """FLOPs of one new token generated after `context` cached tokens (a decoder's forward pass of one token)."""
    return tuple(
        GenerationFlops(component, value)
        for component, value in forward_flops(config, 1, past=context).items()
    )


def kv_cache_size(config: TwinLMConfig, context: int, dtype: str = "float32") -> KVCacheSize:
    """Bytes a decoder's cache holds per sequence with `context` tokens cached: keys and values of every
    softmax layer (a sliding layer keeps window - 1 tokens), a float32 state per linear layer, and with a
    convolution each layer's last k - 1 inputs (at least one)."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * DTYPE_BYTES[dtype]
    growth = held = constant = 0
    if config.conv_kernel_size is not None and context:
        inputs = max(config.conv_kernel_size - 1, 1)
        constant += config.num_hidden_layers * inputs * config.hidden_size * DTYPE_BYTES[dtype]
    for layer_type in config.layer_types:
        if layer_type == "linear_attention":
            state = config.num_attention_heads * config.head_dim * (config.head_dim + 1)
            constant += state * LINEAR_STATE_BYTES if context else 0
        elif layer_type == "sliding_attention":
            held += per_token * min(context, config.sliding_window - 1)
        else:
            growth += per_token
            held += per_token * context
    return KVCacheSize(dtype, growth, held + constant, constant)


# ------------------------------------------------------------------------------------------------
# The whole description
# ------------------------------------------------------------------------------------------------
def describe(
    config: TwinLMConfig,
    seq_len: int | None = None,
    context: int | None = None,
    mlm_probability: float = DEFAULT_MLM_PROBABILITY,
    dtype: str = "float32",
    source: str = "",
) -> Description:
    """Parameters per component, training FLOPs per token at `seq_len` (default max_position_embeddings) and,
    for a decoder, generation FLOPs and KV cache at `context` cached tokens (default seq_len - 1: the last
    token of a full row, which attends to seq_len keys)."""
    from twinlm.training.tracking import LOOKUP_TABLES, flops_per_token

    seq_len = config.max_position_embeddings if seq_len is None else seq_len
    context = seq_len - 1 if context is None else context
    _check_lengths(config, seq_len, context, mlm_probability, dtype)
    groups = parameter_groups(config)
    total = sum(g.count for g in groups)
    lookups = sum(g.count for g in groups if g.lookup_table)
    train = training_flops(config, seq_len, mlm_probability)
    forward = sum(row.forward for row in train)
    # training's MFU rule leaves out the position and segment tables (token embeddings multiply in the head)
    rule_tables = sum(g.count for g in groups if any(t in m for m in g.modules for t in LOOKUP_TABLES))
    generation = generation_flops(config, context) if config.is_causal else None
    sparse = config.sparse_prediction and not config.is_causal
    return Description(
        source=source,
        architecture=architecture_line(config),
        model_class="TwinLMForCausalLM" if config.is_causal else "TwinLMForMaskedLM",
        layer_types=dict(Counter(config.layer_types)),
        seq_len=seq_len,
        context=context if config.is_causal else None,
        mlm_probability=mlm_probability if sparse else None,
        parameters=groups,
        total_parameters=total,
        parameters_without_embeddings=total - lookups,
        training_flops=train,
        forward_flops_per_token=forward,
        training_flops_per_token=sum(row.training for row in train),
        mfu_rule_flops_per_token=flops_per_token(
            total - rule_tables, config.num_hidden_layers, config.hidden_size, seq_len
        ),
        generation_flops=generation,
        generation_flops_per_token=sum(row.flops for row in generation) if generation else None,
        kv_cache=kv_cache_size(config, context, dtype) if config.is_causal else None,
        assumptions=assumptions(config, seq_len, context, mlm_probability),
    )


def _check_lengths(
    config: TwinLMConfig, seq_len: int, context: int, mlm_probability: float, dtype: str
) -> None:
    """Lengths the model can run (absolute positions end at max_position_embeddings), a masked share in (0, 1]."""
    if seq_len < 1:
        raise TwinLMError(f"--seq-len {seq_len} must be at least 1")
    if context < 0:
        raise TwinLMError(f"--context {context} must be >= 0 (the tokens cached before the new one)")
    if not 0 < mlm_probability <= 1:
        raise TwinLMError(f"--mlm-probability {mlm_probability} must be in (0, 1]")
    if dtype not in DTYPE_BYTES:
        raise TwinLMError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPE_BYTES)}")
    limit = config.position_encoding.max_positions(config)  # None: the scheme has no end
    if limit is None:
        return
    if seq_len > limit:
        raise TwinLMError(
            f"--seq-len {seq_len} is past max_position_embeddings={limit} of {config.position_embedding_type} "
            f"positions; use --seq-len <= {limit} or set max_position_embeddings"
        )
    if config.is_causal and context + 1 > limit:
        raise TwinLMError(
            f"--context {context} leaves no position for a new token (max_position_embeddings={limit}); "
            f"use --context <= {limit - 1}"
        )


def architecture_line(config: TwinLMConfig) -> str:
    """The config in one line: kind, sizes, the switches that change the counts."""
    kind = "causal decoder" if config.is_causal else "bidirectional encoder"
    heads = f"{config.num_attention_heads} heads"
    if config.num_key_value_heads != config.num_attention_heads:
        heads += f" ({config.num_key_value_heads} key/value heads)"
    parts = [
        kind,
        f"{config.num_hidden_layers} layers",
        f"hidden {config.hidden_size}",
        heads,
        f"FFN {config.intermediate_size} ({config.hidden_act})",
        f"vocabulary {config.vocab_size:,}",
        f"{config.position_embedding_type} positions",
        f"{config.norm_position}-norm {config.norm_type}",
        f"{config.attention_scoring} attention",
    ]
    if config.sliding_window is not None:
        parts.append(f"window {config.sliding_window}")
    if config.conv_kernel_size is not None:
        parts.append(f"convolution module (kernel {config.conv_kernel_size})")
    if not config.use_residual:
        parts.append("no residual connections")
    for switch in ("share_qk", "sparse_prediction"):
        if getattr(config, switch):
            parts.append(switch)
    if not config.tie_word_embeddings:
        parts.append("untied head")
    return ", ".join(parts)


def assumptions(config: TwinLMConfig, seq_len: int, context: int, mlm_probability: float) -> tuple[str, ...]:
    """What the FLOP counts assume, for this config."""
    from twinlm.model.attention import WindowBlocks, block_size, window_reach
    from twinlm.model.linear_attention import LINEAR_CHUNK

    notes = [
        "FLOPs = 2 x multiply-adds of the matrix products (what torch's FlopCounterMode counts); norms, "
        "activations, softmax, RoPE, position biases and the loss are elementwise and left out",
        "training = forward + backward = 3 x forward (the backward pass of each product computes the gradients "
        "of both operands); per token = per sequence / seq_len",
    ]
    types = set(config.layer_types)
    if "full_attention" in types:
        notes.append(
            f"full attention: every query against all {seq_len} keys of the row, also when causal (eager and SDPA's "
            "math path compute the masked pairs; flash/flex kernels skip masked blocks: about half for a causal "
            "model); one document per row (packed documents cost the same on these paths)"
        )
    if "sliding_attention" in types:
        window = config.sliding_window
        left, right = window_reach(window, config.is_causal)
        reach = f"{left} before" if config.is_causal else f"{left} on each side"
        if WindowBlocks.applies(seq_len, left, right):
            block = block_size(left, right)
            keys = query_key_pairs(config, "sliding_attention", seq_len, 0, seq_len) / seq_len
            notes.append(
                f"sliding window {window} ({reach}), in blocks: {block} queries against {block + left + right} "
                f"keys, padded to whole blocks: {keys:.1f} keys per query at seq_len {seq_len} (the window itself: "
                f"{left + right + 1})"
            )
        else:
            notes.append(
                f"sliding window {window} ({reach}): at seq_len {seq_len} blocks would not save work, so the "
                f"model computes the dense masked product ({seq_len} keys per query)"
            )
    if "linear_attention" in types:
        how = (
            f"in chunks of {LINEAR_CHUNK} tokens (padded to whole chunks): per head and token "
            f"2 x {LINEAR_CHUNK} x (2 d + 1) for the masked products inside a chunk and 4 d (d + 1) for the "
            "states (d = head_dim); a decoding step runs one whole padded chunk plus phi(Q) times the state"
            if config.is_causal
            else "bidirectional: one phi(K)^T V and one phi(Q) S per head, 4 d (d + 1) per token (d = head_dim)"
        )
        notes.append(f"linear attention (elu + 1 features, keys and values repeated to every head): {how}")
    if config.conv_kernel_size is not None:
        k = config.conv_kernel_size
        notes.append(
            f"convolution module (kernel {k}): per token 2 x d x 2d (pointwise in), 2 x d x {k} (depthwise) and "
            "2 x d x d (pointwise out) (d = hidden_size); GLU, norm and SiLU are elementwise; one document per "
            "row (packed documents are spread apart by zeros: a little more work)"
        )
    if not config.use_residual:
        notes.append("no residual connections: the same products (a residual add is elementwise)")
    if config.sparse_prediction and not config.is_causal:
        where = (
            "and the last block's queries, O and FFN too (its K and V on every token)"
            if _last_block_selects_queries(config)
            else "(the last block runs on every token: linear attention / batch norm / a convolution need all "
            "of them)"
        )
        notes.append(
            f"sparse prediction: the MLM transform and decoder run on the masked tokens only ({mlm_probability:g} "
            f"of them, the same count in every row) {where}"
        )
    if config.share_qk:
        notes.append("share_qk: one weight for Q and K, but the keys are still a projection of every token")
    if config.is_causal:
        reads = {
            "full_attention": f"{context + 1} keys in full layers",
            "sliding_attention": f"min({context + 1}, {config.sliding_window}) keys in sliding layers (the cache "
            "keeps window - 1)",
            "linear_attention": "a constant state in linear layers",
        }
        read, ran = [text for kind, text in reads.items() if kind in types], "projections, FFN"
        if config.conv_kernel_size is not None:
            read.append(f"the last {config.conv_kernel_size - 1} inputs of each layer's convolution")
            ran = "projections, convolution, FFN"
        notes.append(
            f"generation: one new token after {context} cached tokens reads "
            + ", ".join(read)
            + f"; {ran} and LM head run on that token only"
        )
    return tuple(notes)


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def human(value: float) -> str:
    """3 significant digits with a k/M/G/T suffix (FLOPs, bytes)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.3g}"


def _columns(rows: list[list[str]], header: list[str]) -> list[str]:
    """Rows as aligned text: names and notes (the first and a last "note" column) left, numbers right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = {0, len(header) - 1} if header[-1] == "note" else {0}

    def line(row: list[str]) -> str:
        cells = [
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  " + "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def format_description(desc: Description) -> str:
    """Parameters, training FLOPs, generation FLOPs and KV cache, assumptions: as aligned text."""
    total = desc.total_parameters
    layers = ", ".join(f"{n} x {kind}" for kind, n in desc.layer_types.items())
    out = [
        f"{desc.source or 'config'}: {desc.model_class}",
        f"  {desc.architecture}",
        f"  layers: {layers}",
        "",
    ]

    rows = []
    for g in desc.parameters:
        per_layer = f"{g.per_layer:,}" if g.per_layer is not None else ""
        share = f"{100 * g.count / total:.1f}%" if total else ""
        rows.append([g.component, per_layer, f"{g.count:,}", f"{g.biases:,}", share, g.note])
    rows.append(["total", "", f"{total:,}", f"{sum(g.biases for g in desc.parameters):,}", "100.0%", ""])
    rows.append(
        [
            "total without embeddings",
            "",
            f"{desc.parameters_without_embeddings:,}",
            "",
            "",
            "lookup tables left out",
        ]
    )
    out.append("Parameters")
    out += _columns(rows, ["component", "per layer", "total", "biases", "share", "note"])

    out += ["", f"FLOPs per token, one training step at seq_len {desc.seq_len} (forward + backward)"]
    train_total = desc.training_flops_per_token
    rows = [
        [r.component, human(r.forward), human(r.training), f"{100 * r.training / train_total:.1f}%"]
        for r in desc.training_flops
    ]
    rows.append(["total", human(desc.forward_flops_per_token), human(train_total), "100.0%"])
    out += _columns(rows, ["component", "forward", "training", "share"])
    out.append(
        f"  (the MFU of `twinlm pretrain` counts 6 N + 12 L d n = {human(desc.mfu_rule_flops_per_token)})"
    )

    out.append("")
    if desc.generation_flops is None:
        out.append("Generation: none (a bidirectional encoder keeps no KV cache)")
    else:
        gen_total = desc.generation_flops_per_token or 0.0
        out.append(f"FLOPs per generated token, KV cache of {desc.context} tokens")
        rows = [
            [r.component, human(r.flops), f"{100 * r.flops / gen_total:.1f}%"] for r in desc.generation_flops
        ]
        rows.append(["total", human(gen_total), "100.0%"])
        out += _columns(rows, ["component", "forward", "share"])
        cache = desc.kv_cache
        assert cache is not None
        line = f"KV cache ({cache.dtype}): {cache.bytes_per_token:,} bytes per token"
        if cache.constant_bytes:
            line += f" + {cache.constant_bytes:,} bytes of fixed-size state (linear attention, convolution)"
        out.append(f"{line}; {human(cache.bytes_at_context)}B per sequence at context {desc.context}")

    out += ["", "Assumptions", *(f"  - {note}" for note in desc.assumptions)]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Where the config comes from
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A config and the run settings that go with it (a pretraining run config's seq_len and masking)."""

    config: TwinLMConfig
    name: str
    seq_len: int | None = None
    mlm_probability: float | None = None


def load_source(source: str, overrides: dict[str, Any] | None = None) -> Source:
    """The config named by `source`: a saved model folder (config.json), a pretraining run config (its model
    section, the vocabulary of its tokenizer settings), a model preset YAML or a preset name; `overrides` set
    TwinLMConfig fields. Any problem is a one-line TwinLMError."""
    from twinlm.model.configuration_twinlm import check_config_keys

    overrides = dict(overrides or {})
    try:
        check_config_keys(overrides, source="override")
    except ValueError as err:
        raise TwinLMError(str(err)) from None
    path = Path(source)
    if path.is_dir():
        return Source(_folder_config(path, overrides), source)
    if path.is_file() and path.suffix in (".yaml", ".yml") and _is_run_config(path):
        return _run_config_source(path, overrides)
    from twinlm import TwinLMConfig

    try:
        return Source(TwinLMConfig.from_preset(source, **overrides), source)
    except (ValueError, TypeError) as err:
        raise TwinLMError(" ".join(str(err).split())) from None


def _is_run_config(path: Path) -> bool:
    """A pretraining run config has a `model` section; a model preset has config fields at the top."""
    from twinlm.config import read_config_file

    values = read_config_file(path, "config", "configs/pretrain/tiny-clm.yaml")
    return isinstance(values.get("model"), dict)


def _folder_config(folder: Path, overrides: dict[str, Any]) -> TwinLMConfig:
    """A saved model's config.json (weights not needed), overrides applied and the whole config checked again."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    from twinlm import TwinLMConfig
    from twinlm.model_folder import read_twinlm_config

    values = read_twinlm_config(folder, "model folder")
    try:
        config = TwinLMConfig.from_dict(values, **overrides)
        config.validate()  # from_dict sets overrides after the config's own checks ran
    except StrictDataclassClassValidationError as err:
        raise TwinLMError(f"{folder / 'config.json'}: {err.__cause__}") from None
    except (ValueError, TypeError) as err:
        raise TwinLMError(f"{folder / 'config.json'}: {' '.join(str(err).split())}") from None
    return config


def _run_config_source(path: Path, overrides: dict[str, Any]) -> Source:
    """A pretraining run's model config (as the run builds it: preset or file, model.overrides, the tokenizer's
    vocabulary), its data.seq_len and mlm_probability."""
    from twinlm.training.config import load_run_config
    from twinlm.training.loop import build_model_config, run_model_config

    cfg = load_run_config(path, [(f"model.overrides.{key}", value) for key, value in overrides.items()])
    if cfg.tokenizer.path is not None:  # a trained tokenizer: its vocabulary and special tokens
        from twinlm.tokenization import load_tokenizer

        config = build_model_config(cfg, load_tokenizer(cfg.tokenizer.path))
    else:
        config = run_model_config(cfg)
    return Source(config, str(path), cfg.data.seq_len, cfg.data.mlm_probability)


def describe_source(
    source: str,
    overrides: dict[str, Any] | None = None,
    seq_len: int | None = None,
    context: int | None = None,
    mlm_probability: float | None = None,
    dtype: str = "float32",
) -> Description:
    """`describe` of a preset, YAML, run config or model folder; a run config's seq_len and masking are the
    defaults."""
    found = load_source(source, overrides)
    return describe(
        found.config,
        seq_len=seq_len if seq_len is not None else found.seq_len,
        context=context,
        mlm_probability=next(
            p for p in (mlm_probability, found.mlm_probability, DEFAULT_MLM_PROBABILITY) if p is not None
        ),
        dtype=dtype,
        source=found.name,
    )


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def field_overrides(words: list[str]) -> dict[str, Any]:
    """Command-line overrides (`hidden_size=512`, `--sliding_window 128`) as TwinLMConfig fields."""
    from twinlm.config import parse_overrides

    values = {}
    for key, value in parse_overrides(words):
        if "." in key:
            raise TwinLMError(
                f"override {key}: describe's overrides are TwinLMConfig fields, e.g. hidden_size=512 (no section)"
            )
        values[key] = value
    return values


def run(args: argparse.Namespace) -> int:
    desc = describe_source(
        args.source,
        field_overrides(list(args.overrides)),
        seq_len=args.seq_len,
        context=args.context,
        mlm_probability=args.mlm_probability,
        dtype=args.dtype,
    )
    print(json.dumps(desc.to_dict(), indent=2) if args.json else desc.table())
    return 0


USAGE = "%(prog)s [-h] CONFIG_OR_PRESET [--seq-len N] [--context N] [--json] [field=value ...]"
EPILOG = """CONFIG_OR_PRESET: a preset name (gpt2-small, mini-modern-encoder, ...), a model preset YAML, a pretraining
run config (configs/pretrain/*.yaml: its model, its tokenizer's vocabulary, its data.seq_len) or a saved model
folder (config.json). Overrides set TwinLMConfig fields: hidden_size=512 sliding_window=128 (values read as YAML).
examples:
  twinlm describe gpt2-small --seq-len 512 --context 1023 num_key_value_heads=4
  twinlm describe configs/pretrain/tiny-mlm.yaml --json"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "describe",
        help="parameters and FLOPs of a config, per component",
        description=__doc__.split("\n\n")[0],
        usage=USAGE,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="CONFIG_OR_PRESET", help="preset name, YAML file or model folder")
    parser.add_argument(
        "--seq-len",
        type=int,
        help="training sequence length (default: the run's, else max_position_embeddings)",
    )
    parser.add_argument(
        "--context", type=int, help="cached tokens before a generated one (default: seq-len - 1)"
    )
    parser.add_argument(
        "--mlm-probability",
        type=float,
        help=f"masked share for sparse prediction (default: the run's, else {DEFAULT_MLM_PROBABILITY})",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=list(DTYPE_BYTES), help="KV cache dtype (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    # an `overrides` default marks a command that takes config overrides (see twinlm.cli.parse_args)
    parser.set_defaults(func=run, overrides=[])
    return parser
