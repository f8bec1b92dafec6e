"""Multi-head attention with switchable scoring: scaled dot-product, unscaled dot-product, additive.

The scoring function is picked once from `SCORINGS`; the kernel that computes dot-product attention
(`eager`, PyTorch's `sdpa`, or transformers' flash-attention integration) follows transformers'
`attn_implementation`. What attention may see arrives as one `AttentionMask`: for eager and SDPA a
boolean mask of the pairs that may attend (padding, causality, sliding window, document boundaries
folded together by the model), an additive float bias only where ALiBi/T5 position biases need one, or
None with `is_causal` for the fast unmasked path; for flash kernels, which take no mask, the padding
mask and the packed position ids.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_twinlm import TwinLMConfig
from .layers import ResidualProjection, dropout_mask, fast_dropout_applies
from .positions import apply_rotary


@dataclass
class AttentionMask:
    """What each query may attend to, in the form the attention kernel takes."""

    # (batch|1, heads|1, q, k): bool, True where a query may attend, or (with position biases) an additive
    # float bias, -inf where forbidden
    bias: torch.Tensor | None = None
    is_causal: bool = False  # with bias None: plain causal attention (SDPA's fast path)
    flash: bool = False  # flash kernels: no bias; the two fields below instead
    padding_mask: torch.Tensor | None = None  # (batch, keys), 1 = real token
    packed_position_ids: torch.Tensor | None = None  # (batch, q), restarting at 0 per document


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
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(F.dropout(weights, p=dropout, training=dropout > 0), value), weights


class _DroppedWeightsTimesValue(torch.autograd.Function):
    """dropout(weights) @ value = (weights * keep) @ value * scale, without keeping the dropped weights for
    the backward pass (autograd would save them beside the softmax output: one more (b, h, q, k) tensor per
    layer); they are recomputed there from the softmax output and the 0/1 mask. The scale multiplies the
    (b, h, q, d) output instead of the (b, h, q, k) weights."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # the backward runs under the forward's autocast state
    def forward(ctx, weights: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float):
        ctx.scale = scale
        ctx.save_for_backward(weights, value, keep)
        return torch.matmul(weights * keep, value).mul_(scale)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: torch.Tensor):
        weights, value, keep = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_weights = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_weights = torch.matmul(grad, value.transpose(-1, -2)).mul_(keep)
        if ctx.needs_input_grad[1]:
            grad_value = torch.matmul((weights * keep).transpose(-1, -2), grad)
        return grad_weights, grad_value, None, None


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

    def forward(self, query, key, value, mask, dropout, output_attentions):
        bias, is_causal = mask.bias, mask.is_causal
        groups = query.shape[1] // key.shape[1]
        # With dropout, SDPA on CPU takes its math path (in float32 even under bf16 autocast) with torch's
        # slow dropout mask: the same softmax written out here, with layers.dropout_mask, is faster.
        cpu_dropout = fast_dropout_applies(query, dropout)
        if output_attentions or cpu_dropout or self.config._attn_implementation == "eager":
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

    def forward(self, query, key, value, mask, dropout, output_attentions):
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        hidden = torch.tanh(query.unsqueeze(-2) + key.unsqueeze(-3))  # (b, h, q, k, d)
        scores = torch.einsum("bhqkd,hd->bhqk", hidden, self.score_vector.to(hidden.dtype))
        return eager_attention(scores, value, mask.bias, mask.is_causal, dropout)


SCORINGS = {
    "scaled_dot": lambda config: DotProductScoring(config, scaled=True),
    "dot": lambda config: DotProductScoring(config, scaled=False),
    "additive": AdditiveScoring,
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: AttentionMask,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        output_attentions: bool = False,
        queries: torch.Tensor | None = None,
        query_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`queries` (batch, m, hidden): other query inputs than `hidden_states` (some of its tokens, with
        their angles in `query_rotary`); keys and values always come from every token of hidden_states."""
        b, s, _ = hidden_states.shape
        q_in = hidden_states if queries is None else queries
        query = self.q_proj(q_in).view(b, q_in.shape[1], -1, self.head_dim).transpose(1, 2)
        key = (self.k_proj or self.q_proj)(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        if rotary is not None:
            query = apply_rotary(query, *(rotary if queries is None else query_rotary))
            key = apply_rotary(key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        dropout = self.dropout if self.training else 0.0
        if mask.flash:
            return self.o_proj(
                self._flash_attention(query, key, value, mask, dropout).reshape(b, s, -1)
            ), None
        output, weights = self.scoring(query, key, value, mask, dropout, output_attentions)
        output = output.transpose(1, 2).reshape(b, q_in.shape[1], -1)
        return self.o_proj(output), weights

    def _flash_attention(self, query, key, value, mask: AttentionMask, dropout: float) -> torch.Tensor:
        """transformers' flash-attention integration: padding by un-padding, packed documents by its
        variable-length path (which splits one row where position ids restart), the window as a band.
        Returns (batch, seq, heads, head_dim)."""
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        b, _, s, d = query.shape
        padding = mask.padding_mask[:, -key.shape[-2] :] if mask.padding_mask is not None else None
        position_ids = None
        if mask.packed_position_ids is not None:  # (b, h, s, d) -> (1, h, b*s, d): one row of documents
            query, key, value = (
                x.transpose(0, 1).reshape(x.shape[1], -1, d)[None] for x in (query, key, value)
            )
            position_ids = mask.packed_position_ids.reshape(1, -1)
        window = self.config.sliding_window
        if window is not None and not self.config.is_causal:
            window = window // 2 + 1  # flash's band of (w - 1) on each side == |i - j| <= sliding_window // 2
        output, _ = attention(
            self,
            query,
            key,
            value,
            padding,
            dropout=dropout,
            scaling=self.scoring.scale,
            sliding_window=window,
            is_causal=self.config.is_causal,
            position_ids=position_ids,
        )
        return output.reshape(b, s, -1, d)
