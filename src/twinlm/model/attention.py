"""Multi-head attention with switchable scoring: scaled dot-product, unscaled dot-product, additive.

The scoring function is picked once from `SCORINGS`; the kernel that computes dot-product attention
(`eager` or PyTorch's `sdpa`) follows transformers' `attn_implementation`. Masks arrive as one additive
float bias (padding, causality, sliding window, document boundaries and ALiBi/T5 position biases
already folded together by the model), or as None with `is_causal` for the fast unmasked path.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_twinlm import TwinLMConfig
from .positions import apply_rotary


def eager_attention(
    scores: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, is_causal: bool, dropout: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores + bias) @ value, written out so that the weights can be returned."""
    if is_causal:  # only reached without a bias: build the causal mask here
        q_len, k_len = scores.shape[-2:]
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).triu(k_len - q_len + 1)
        scores = scores.masked_fill(future, float("-inf"))
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    output = torch.matmul(F.dropout(weights, p=dropout, training=dropout > 0), value)
    return output, weights


class DotProductScoring(nn.Module):
    """score(q, k) = q . k * scale; scale = 1/sqrt(d_k) ('scaled_dot') or 1 ('dot')."""

    def __init__(self, config: TwinLMConfig, scaled: bool = True):
        super().__init__()
        self.config = config
        self.scale = 1.0 / math.sqrt(config.head_dim) if scaled else 1.0

    def forward(self, query, key, value, bias, is_causal, dropout, output_attentions):
        if output_attentions or self.config._attn_implementation == "eager":
            scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
            return eager_attention(scores, value, bias, is_causal, dropout)
        if bias is not None:
            bias = bias.to(query.dtype)
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=dropout, is_causal=is_causal, scale=self.scale
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

    def forward(self, query, key, value, bias, is_causal, dropout, output_attentions):
        hidden = torch.tanh(query.unsqueeze(-2) + key.unsqueeze(-3))  # (b, h, q, k, d)
        scores = torch.einsum("bhqkd,hd->bhqk", hidden, self.score_vector.to(hidden.dtype))
        return eager_attention(scores, value, bias, is_causal, dropout)


SCORINGS = {
    "scaled_dot": lambda config: DotProductScoring(config, scaled=True),
    "dot": lambda config: DotProductScoring(config, scaled=False),
    "additive": AdditiveScoring,
}


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, kv_heads, s, d) -> (b, kv_heads * groups, s, d) for grouped-query attention."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


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
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.scoring = SCORINGS[config.attention_scoring](config)
        self.dropout = config.attention_probs_dropout_prob

    def forward(
        self,
        hidden_states: torch.Tensor,
        bias: torch.Tensor | None,
        is_causal: bool,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        key = (self.k_proj or self.q_proj)(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        if bias is not None and bias.shape[-1] != key.shape[-2]:
            bias = bias[..., -key.shape[-2] :]  # a sliding-window cache keeps only the newest keys
        output, weights = self.scoring(
            query, key, value, bias, is_causal, self.dropout if self.training else 0.0, output_attentions
        )
        output = output.transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(output), weights
