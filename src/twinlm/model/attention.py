"""Multi-head attention with switchable scoring: scaled dot-product, unscaled dot-product, additive, linear.

The scoring function is picked once from `SCORINGS`; how attention runs in one forward pass is decided once
per layer type by the model and arrives as a mask object whose `attend` runs it:
  AttentionMask   dense: a boolean mask of the pairs that may attend (padding, causality, window, document
                  boundaries folded together), an additive float bias only where ALiBi/T5 position biases need
                  one, or None with `is_causal` for the fast unmasked path. The dot-product scorings run it with
                  twinlm's eager or SDPA code, or any function registered in transformers' AttentionInterface
                  (attn_implementation="<its name>"), which gets this mask in SDPA's form (transformers'
                  eager form where its mask interface says so) and the forward's keyword arguments
  WindowBlocks    a sliding window in blocks: each block of queries against the keys its window reaches, so
                  that time and memory grow as n * window instead of n^2 (the same scoring on a blocked layout)
  FlashMask       transformers' flash-attention integration: padding mask and packed position ids, the window
                  as the kernel's band
  FlexMask        torch's flex_attention (transformers' integration) with a block-sparse mask
  LinearMask      linear attention (linear_attention.py): no weights at all, a recurrent state in the cache
Each `attend` takes queries, keys and values of shape (batch, heads, seq, head_dim) and returns the heads
concatenated, (batch, seq, heads * head_dim), and the weights where asked for and computed.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_twinlm import TwinLMConfig
from .layers import ResidualProjection, dropout_mask, fast_dropout_applies
from .linear_attention import LinearScoring
from .positions import apply_rotary

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def cached(
    cache, key: torch.Tensor, value: torch.Tensor, layer_idx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values to attend to: this forward's, after the cache's (which then keeps them)."""
    return (key, value) if cache is None else cache.update(key, value, layer_idx)


def merge_heads(output: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)."""
    return output.transpose(1, 2).reshape(output.shape[0], output.shape[2], -1)


@dataclass
class AttentionMask:
    """Dense attention (eager or SDPA): what each query may attend to, over every key."""

    # (batch|1, heads|1, q, k): bool, True where a query may attend, or (with position biases) an additive
    # float bias, -inf where forbidden
    bias: torch.Tensor | None = None
    is_causal: bool = False  # with bias None: plain causal attention (SDPA's fast path)

    @property
    def can_select_queries(self) -> bool:
        """Whether `for_queries` can give the rows of some queries (plain is_causal has no rows to take)."""
        return not self.is_causal

    def for_queries(self, queries) -> "AttentionMask":
        """The mask's rows of the kept queries (a modeling_twinlm.QuerySubset)."""
        return AttentionMask(bias=None if self.bias is None else queries.gather(self.bias, dim=2))

    def attend(self, attention, query, key, value, cache, dropout, output_attentions, **kwargs):
        key, value = cached(cache, key, value, attention.layer_idx)
        output, weights = attention.scoring(
            query, key, value, self, dropout, output_attentions, module=attention, **kwargs
        )
        return merge_heads(output), weights


# twinlm's own implementations of these names (the rest of ALL_ATTENTION_FUNCTIONS is called as registered)
OWN_IMPLEMENTATIONS = ("eager", "sdpa")
# arguments twinlm passes to an attention function itself: the same keys in the forward's kwargs are not passed on
EXPLICIT_ARGUMENTS = frozenset(
    {"dropout", "scaling", "is_causal", "sliding_window", "position_ids", "output_attentions"}
)


def passed_on(kwargs: dict) -> dict:
    """The forward's keyword arguments an attention function gets (transformers passes them all the way down:
    flash kernels read cu_seq_lens_*, serving backends their own), less those twinlm sets itself."""
    return {key: value for key, value in kwargs.items() if key not in EXPLICIT_ARGUMENTS}


def registered_attention(module, query, key, value, bias, is_causal, dropout, scaling, kwargs):
    """A function registered in transformers' AttentionInterface, called as transformers' models call it:
    (b, h, s, d) in, (b, s, h, d) out (returned here as (b, h, s, d) again). The mask is SDPA's form (bool, True
    = attend, or None with is_causal; additive float with position biases), or, when the name is registered in
    AttentionMaskInterface with transformers' eager mask, that form: additive, causality included."""
    function = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, None)
    if ALL_MASK_ATTENTION_FUNCTIONS.get(module.config._attn_implementation) is eager_mask:
        if bias is None and is_causal:
            q_len, k_len = query.shape[-2], key.shape[-2]
            bias = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        if bias is not None and bias.dtype == torch.bool:
            blocked = torch.zeros(bias.shape, dtype=query.dtype, device=query.device)
            bias = blocked.masked_fill_(~bias, torch.finfo(query.dtype).min)
        is_causal = False
    output, weights = function(
        module,
        query,
        key,
        value,
        bias,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **passed_on(kwargs),
    )
    return output.transpose(1, 2), weights


def eager_attention(
    scores: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, is_causal: bool, dropout: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores + bias) @ value, written out so that the weights can be returned. `scores` is fresh
    (no one else holds it): the mask is added in place, as -inf where attention is forbidden (an addition's
    backward pass passes the gradient through; masked_fill's would copy it, and the softmax's gradient is
    already 0 there)."""
    if is_causal:  # only reached without a bias: build the causal mask here
        q_len, k_len = scores.shape[-2:]
        future = torch.full((q_len, k_len), float("-inf"), dtype=scores.dtype, device=scores.device)
        scores = scores.add_(future.triu(k_len - q_len + 1))
    if bias is not None and bias.dtype == torch.bool:  # (batch|1, 1, q, k): heads times smaller than scores
        blocked = torch.zeros(bias.shape, dtype=scores.dtype, device=scores.device)
        scores = scores.add_(blocked.masked_fill_(~bias, float("-inf")))
    elif bias is not None:  # position biases (float32): the sum in float32, as transformers' eager
        scores = scores + bias
    mask = dropout_mask(scores, dropout, value.dtype) if dropout > 0 else None
    if mask is not None:  # CPU training: the softmax kernel accumulates in float32 and writes value's dtype
        weights = torch.softmax(scores.to(value.dtype), dim=-1)
        return _DroppedWeightsTimesValue.apply(weights, value, *mask), weights
    if scores.device.type == "cpu" and scores.dtype == value.dtype:
        weights = torch.softmax(scores, dim=-1)  # likewise: one (b, h, q, k) tensor of value's dtype, not two
    else:
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(F.dropout(weights, p=dropout, training=dropout > 0), value), weights


# Training on a CPU in bfloat16/float16 (autocast), SDPA's kernel takes about twice the forward + backward time of
# the softmax written out (eager_attention) at up to 128 keys, and about 1.3x at 256-512; past that it wins, and in
# float32 it is as fast or faster (measured: b*h*t = 16k, head_dim 64, one thread, torch 2.13). The written-out
# form saves the (b, h, q, k) weights for the backward pass: at most 512 keys keeps that small.
CPU_WRITTEN_OUT_MAX_KEYS = 512


def cpu_low_precision_training(query: torch.Tensor, key: torch.Tensor, training: bool) -> bool:
    """Whether attention over `key` runs faster written out than in SDPA: CPU, bfloat16/float16, a model in
    training mode (the mode, not whether gradients are on: a checkpointed block's forward and its recomputation
    take the same path), at most CPU_WRITTEN_OUT_MAX_KEYS keys."""
    return (
        training
        and query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and key.shape[-2] <= CPU_WRITTEN_OUT_MAX_KEYS
        and not torch.compiler.is_compiling()
    )


class _DroppedWeightsTimesValue(torch.autograd.Function):
    """dropout(weights) @ value = (weights * keep) @ value * scale, without keeping the dropped weights for
    the backward pass (autograd would save them beside the softmax output: one more (b, h, q, k) tensor per
    layer); they are recomputed there from the softmax output and the 0/1 mask. The scale multiplies the
    (b, h, q, d) output instead of the (b, h, q, k) weights. The backward pass runs under the forward's autocast
    state (what torch.amp.custom_bwd does); setup_context, jvp and a generated vmap rule serve torch.func and
    forward-mode AD."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weights: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float):
        return torch.matmul(weights * keep, value).mul_(scale)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        weights, value, keep, ctx.scale = inputs
        ctx.autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
        ctx.save_for_backward(weights, value, keep)
        ctx.save_for_forward(weights, value, keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, value, keep = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast("cpu", enabled=enabled, dtype=dtype):
            grad = grad * ctx.scale
            grad_weights = grad_value = None
            if ctx.needs_input_grad[0]:
                grad_weights = torch.matmul(grad, value.transpose(-1, -2)).mul_(keep)
            if ctx.needs_input_grad[1]:
                grad_value = torch.matmul((weights * keep).transpose(-1, -2), grad)
        return grad_weights, grad_value, None, None

    @staticmethod
    def jvp(ctx, weights_tangent, value_tangent, keep_tangent, scale_tangent):
        weights, value, keep = ctx.saved_tensors
        out = torch.zeros((), dtype=value.dtype, device=value.device)
        if weights_tangent is not None:
            out = out + torch.matmul(weights_tangent * keep, value)
        if value_tangent is not None:
            out = out + torch.matmul(weights * keep, value_tangent)
        return out * ctx.scale


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, kv_heads, s, d) -> (b, kv_heads * groups, s, d) for grouped-query attention."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


class DotProductScoring(nn.Module):
    """score(q, k) = q . k * scale; scale = 1/sqrt(d_k) ('scaled_dot') or 1 ('dot')."""

    def __init__(self, config: TwinLMConfig, scaled: bool = True):
        super().__init__()
        self.config = config
        self.scale = 1.0 / math.sqrt(config.head_dim) if scaled else 1.0

    def forward(self, query, key, value, mask, dropout, output_attentions, module=None, **kwargs):
        bias, is_causal = mask.bias, mask.is_causal
        groups = query.shape[1] // key.shape[1]
        implementation = self.config._attn_implementation
        if implementation not in OWN_IMPLEMENTATIONS and not output_attentions:
            return registered_attention(
                module, query, key, value, bias, is_causal, dropout, self.scale, kwargs
            )
        # With dropout, SDPA on CPU takes its math path (in float32 even under bf16 autocast) with torch's
        # slow dropout mask: the same softmax written out here, with layers.dropout_mask, is faster; so it is in
        # bfloat16 training over short rows (cpu_low_precision_training).
        cpu_dropout = fast_dropout_applies(query, dropout)
        written_out = cpu_dropout or cpu_low_precision_training(query, key, self.training)
        if output_attentions or written_out or implementation == "eager":
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
            query = query * self.scale if self.scale != 1.0 else query  # (.., q, d): smaller than the scores
            scores = torch.matmul(query, key.transpose(-1, -2))
            return eager_attention(scores, value, bias, is_causal, dropout)
        if bias is not None and bias.dtype != torch.bool:
            bias = bias.to(query.dtype)
        # Grouped-query attention inside SDPA (no repeated keys and values, no summing of their gradients);
        # CUDA's fused kernels take it only without a mask (transformers' use_gqa_in_sdpa), CPU's always.
        gqa = groups > 1 and (bias is None or query.device.type == "cpu")
        if groups > 1 and not gqa:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=bias,
            dropout_p=dropout,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=gqa,
        )
        return output, None


class AdditiveScoring(nn.Module):
    """Bahdanau-style additive attention per head: score(q, k) = w_h . tanh(q + k).

    The query and key projections play the roles of W_q and W_k; each head has its own vector w_h.
    It materialises a (batch, heads, q, k, head_dim) tensor: O(n^2 d) memory, which is the cost this
    switch lets an experiment measure. Always computed eagerly (no fused kernel exists).
    """

    def __init__(self, config: TwinLMConfig):
        super().__init__()
        self.score_vector = nn.Parameter(torch.empty(config.num_attention_heads, config.head_dim))
        nn.init.normal_(self.score_vector, std=config.initializer_range)

    def forward(self, query, key, value, mask, dropout, output_attentions, module=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        hidden = torch.tanh(query.unsqueeze(-2) + key.unsqueeze(-3))  # (b, h, q, k, d)
        scores = torch.einsum("bhqkd,hd->bhqk", hidden, self.score_vector.to(hidden.dtype))
        return eager_attention(scores, value, mask.bias, mask.is_causal, dropout)


SCORINGS = {
    "scaled_dot": lambda config: DotProductScoring(config, scaled=True),
    "dot": lambda config: DotProductScoring(config, scaled=False),
    "additive": AdditiveScoring,
    "linear": LinearScoring,  # only ever given a LinearMask (every layer of a linear model is linear_attention)
}


class TwinLMAttention(nn.Module):
    def __init__(self, config: TwinLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        # share_qk: keys are the queries (one projection, Kitaev et al. 2020); no k_proj then.
        self.k_proj = (
            None
            if config.share_qk
            else nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        )
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = ResidualProjection(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.scoring = SCORINGS[config.attention_scoring](config)
        self.dropout = config.attention_probs_dropout_prob
        # what transformers' attention functions read off the module they are given
        self.is_causal = config.is_causal
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = getattr(self.scoring, "scale", None)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: "AttentionMask | WindowBlocks | FlashMask | FlexMask",
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        output_attentions: bool = False,
        queries: torch.Tensor | None = None,
        query_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`queries` (batch, m, hidden): other query inputs than `hidden_states` (some of its tokens, with
        their angles in `query_rotary`); keys and values always come from every token of hidden_states.
        `kwargs`: the model's forward keyword arguments, passed on to the attention function (as transformers'
        models pass them)."""
        b, s, _ = hidden_states.shape
        q_in = hidden_states if queries is None else queries
        query = self.q_proj(q_in).view(b, q_in.shape[1], -1, self.head_dim).transpose(1, 2)
        key = (self.k_proj or self.q_proj)(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        if rotary is not None:
            query = apply_rotary(query, *(rotary if queries is None else query_rotary))
            key = apply_rotary(key, *rotary)
        dropout = self.dropout if self.training else 0.0
        output, weights = mask.attend(self, query, key, value, cache, dropout, output_attentions, **kwargs)
        return self.o_proj(output), weights


# ---------------------------------------------------------------------------------------------------
# Flash kernels (transformers' integration)


@dataclass
class FlashMask:
    """Flash kernels take no mask: the padding mask (un-padding) or packed position ids (variable-length
    rows), and the window as the kernel's band."""

    is_causal: bool
    padding_mask: torch.Tensor | None = None  # (batch, keys), 1 = real token
    packed_position_ids: torch.Tensor | None = None  # (batch, q), restarting at 0 per document
    window: int | None = None  # the layer's sliding_window (None: full attention)
    can_select_queries = False

    def attend(self, attention, query, key, value, cache, dropout, output_attentions, **kwargs):
        """transformers' flash-attention integration: padding by un-padding, packed documents by its
        variable-length path (which splits one row where position ids restart), the window as a band."""
        key, value = cached(cache, key, value, attention.layer_idx)
        function = ALL_ATTENTION_FUNCTIONS[attention.config._attn_implementation]
        b, _, s, d = query.shape
        padding = self.padding_mask[:, -key.shape[-2] :] if self.padding_mask is not None else None
        position_ids = None
        if self.packed_position_ids is not None:  # (b, h, s, d) -> (1, h, b*s, d): one row of documents
            query, key, value = (
                x.transpose(0, 1).reshape(x.shape[1], -1, d)[None] for x in (query, key, value)
            )
            position_ids = self.packed_position_ids.reshape(1, -1)
        window = self.window
        if window is not None and not self.is_causal:
            window = window // 2 + 1  # flash's band of (w - 1) on each side == |i - j| <= sliding_window // 2
        output, _ = function(
            attention,
            query,
            key,
            value,
            padding,
            dropout=dropout,
            scaling=attention.scoring.scale,
            sliding_window=window,
            is_causal=self.is_causal,
            position_ids=position_ids,
            **passed_on(kwargs),
        )
        return output.reshape(b, s, -1), None


# ---------------------------------------------------------------------------------------------------
# Sliding windows in blocks: O(n w) instead of O(n^2)

# Queries are grouped in blocks of min(window, MAX_WINDOW_BLOCK); a block attends to block + reach keys (reach:
# w - 1 for a causal window, w // 2 on each side for a bidirectional one). Smaller blocks waste fewer keys
# per query, larger ones make bigger matrix products; 64-128 measured best on a CPU at windows of 128-256.
MAX_WINDOW_BLOCK = 128


def window_reach(window: int, is_causal: bool) -> tuple[int, int]:
    """How far a query's window reaches to the left and to the right of it (twinlm's sliding_window)."""
    return (window - 1, 0) if is_causal else (window // 2, window // 2)


def block_size(left: int, right: int) -> int:
    """Queries per block: the window's width, at most MAX_WINDOW_BLOCK."""
    return max(min(left + right + 1, MAX_WINDOW_BLOCK), 1)


@dataclass
class WindowRecipe:
    """What decides which keys a query of a windowed layer may see, per token, so that the mask of any set
    of queries can be built in O(queries x window): the window's reach, the real keys, the documents and
    the position bias (a function of key index - query index)."""

    length: int  # tokens in the sequence (the keys are all of them: no cache past)
    left: int
    right: int
    key_real: torch.Tensor | None  # (batch, length) bool: False for padding
    documents: torch.Tensor | None  # (batch, length): a document id per token (packed rows)
    position_bias: Callable[[torch.Tensor], torch.Tensor | None]  # (r, q, k) distance -> (r, heads, q, k)
    real_index: torch.Tensor | None = None  # (batch, length) real tokens up to each, where the mask has holes

    def bias(
        self, q_tok: torch.Tensor, k_tok: torch.Tensor, distance: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """The mask of `groups` groups of queries, each against its own run of keys: q_tok (r, groups,
        block, 1) and k_tok (r, groups, 1, keys) token indices (r: 1 or batch), distance (block, keys) =
        k_tok - q_tok (the same in every group). Returns (batch * groups, 1 | heads, block, keys): bool, or
        float (-inf where forbidden) with position biases. Every query may see itself (padding queries get
        a harmless row)."""
        allowed = (distance >= -self.left) & (distance <= self.right)
        allowed = allowed & (k_tok >= 0) & (k_tok < self.length)  # keys past either end of the sequence
        k_at = k_tok.clamp(0, self.length - 1).expand(batch, -1, -1, -1)
        if self.key_real is not None:
            allowed = allowed & _take(self.key_real, k_at)
        if self.documents is not None:
            q_at = q_tok.clamp(0, self.length - 1).expand(batch, -1, -1, -1)
            allowed = allowed & (_take(self.documents, q_at) == _take(self.documents, k_at))
        allowed = (allowed | (distance == 0)).expand(batch, *allowed.shape[1:])
        allowed = allowed.reshape(-1, 1, *allowed.shape[-2:])  # (batch * groups, 1, block, keys)
        if self.real_index is None:
            position_bias = self.position_bias(distance[None])  # (1, heads, block, keys): every group's
        else:  # distances in real tokens, per row and group: (batch * groups, heads, block, keys)
            q_at = q_tok.clamp(0, self.length - 1).expand(batch, -1, -1, -1)
            real_distance = _take(self.real_index, k_at) - _take(self.real_index, q_at)
            position_bias = self.position_bias(real_distance.reshape(-1, *real_distance.shape[-2:]))
        if position_bias is None:
            return allowed
        blocked = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        return blocked.masked_fill_(~allowed, float("-inf")) + position_bias.float()


def _take(per_token: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """per_token (batch, length) at index (batch, ...)."""
    return per_token.gather(1, index.reshape(index.shape[0], -1)).view(index.shape)


@dataclass
class WindowBlocks:
    """A sliding window computed in blocks of queries: block g holds queries gB .. gB + B - 1 and attends to
    the keys gB - left .. gB + B - 1 + right, which its window reaches. Keys and values are laid out as
    overlapping views of one padded copy (no copy per block); each row of the batch has `groups` blocks
    (a few more than the queries need, so that the rows' blocks tile one flat sequence). The scoring runs on
    (batch * groups) small attention problems with the mask `bias`: the same eager, SDPA, dropout,
    grouped-query and additive code as dense attention, and exactly the same result."""

    block: int
    groups: int  # blocks per row of the batch
    recipe: WindowRecipe
    bias: torch.Tensor  # (batch * groups, 1 | heads, block, keys)
    can_select_queries = True

    @classmethod
    def build(cls, recipe: WindowRecipe, batch: int, device: torch.device) -> "WindowBlocks":
        block = block_size(recipe.left, recipe.right)
        keys = block + recipe.left + recipe.right
        groups = -(-(recipe.left + recipe.length + recipe.right) // block)
        g = torch.arange(groups, device=device)[None, :, None, None] * block
        a = torch.arange(block, device=device)[:, None]
        c = torch.arange(keys, device=device)[None, :]
        distance = c - recipe.left - a
        bias = recipe.bias(g + a, g + c - recipe.left, distance, batch)
        return cls(block, groups, recipe, bias)

    @staticmethod
    def applies(length: int, left: int, right: int) -> bool:
        """Whether blocks compute fewer (query, key) pairs than dense attention over `length` tokens."""
        block = block_size(left, right)
        return (length + left + right) * (block + left + right) < length * length

    def attend(self, attention, query, key, value, cache, dropout, output_attentions, **kwargs):
        key, value = cached(cache, key, value, attention.layer_idx)
        b, h, n, d = query.shape
        block, groups, left = self.block, self.groups, self.recipe.left
        keys = block + left + self.recipe.right
        row = groups * block  # every row of the batch padded to whole blocks, the keys shifted by `left`
        query = F.pad(query.transpose(1, 2), (0, 0, 0, 0, 0, row - n))
        query = query.view(b * groups, block, h, d).transpose(1, 2)  # (b * groups, h, block, d): a view

        def windows(x: torch.Tensor) -> torch.Tensor:
            """(b, kv_heads, n, d) -> (b * groups, kv_heads, keys, d): overlapping views of one padded copy."""
            padded = F.pad(x.transpose(1, 2), (0, 0, 0, 0, left, row - left - n))
            flat = F.pad(padded.reshape(b * row, *padded.shape[2:]), (0, 0, 0, 0, 0, keys - block))
            return flat.unfold(0, keys, block).permute(0, 1, 3, 2)

        output, _ = attention.scoring(
            query, windows(key), windows(value), AttentionMask(bias=self.bias), dropout, False
        )
        return output.transpose(1, 2).reshape(b, row, h * d)[:, :n], None

    def for_queries(self, queries) -> "WindowQueries":
        """The kept queries (a modeling_twinlm.QuerySubset), each against exactly the keys of its window."""
        recipe = self.recipe
        keys = recipe.left + recipe.right + 1
        distance = torch.arange(keys, device=queries.index.device)[None] - recipe.left
        q_tok = queries.index[:, :, None, None]
        k_tok = q_tok + distance
        batch = queries.index.shape[0]
        return WindowQueries(
            k_tok.clamp(0, recipe.length - 1)[:, :, 0], recipe.bias(q_tok, k_tok, distance, batch)
        )


@dataclass
class WindowQueries:
    """Some queries of a windowed layer (sparse prediction's last block), each against its own window of
    keys: O(queries x window)."""

    key_index: torch.Tensor  # (batch, m, keys): token index of each query's keys
    bias: torch.Tensor  # (batch * m, 1 | heads, 1, keys)
    can_select_queries = False

    def attend(self, attention, query, key, value, cache, dropout, output_attentions, **kwargs):
        b, h, m, d = query.shape
        index = self.key_index.reshape(b, -1, 1, 1)

        def windows(x: torch.Tensor) -> torch.Tensor:
            """(b, kv_heads, n, d) -> (b * m, kv_heads, keys, d): each query's keys, gathered."""
            taken = x.transpose(1, 2).gather(1, index.expand(-1, -1, x.shape[1], d))
            return taken.view(b * m, -1, x.shape[1], d).transpose(1, 2)

        query = query.transpose(1, 2).reshape(b * m, h, 1, d)
        output, _ = attention.scoring(
            query, windows(key), windows(value), AttentionMask(bias=self.bias), dropout, False
        )
        return output.reshape(b, m, h * d), None


# ---------------------------------------------------------------------------------------------------
# torch's flex_attention (transformers' integration)


@dataclass
class FlexMask:
    """flex_attention with a block-sparse mask: blocks of (query, key) pairs that nothing may attend are
    skipped, so a window costs O(n w) on a GPU (its kernel); the mask is built once per forward."""

    block_mask: "BlockMask"
    can_select_queries = False

    def attend(self, attention, query, key, value, cache, dropout, output_attentions, **kwargs):
        key, value = cached(cache, key, value, attention.layer_idx)
        function = ALL_ATTENTION_FUNCTIONS["flex_attention"]
        output, _ = function(
            attention,
            query,
            key,
            value,
            self.block_mask,
            scaling=attention.scoring.scale,
            dropout=dropout,
            **passed_on(kwargs),
        )
        return output.reshape(query.shape[0], query.shape[2], -1), None
