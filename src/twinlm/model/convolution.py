"""The convolution sub-layer beside attention (conv_kernel_size=k): Conformer's convolution module (Gulati et
al. 2020), the local mixing that ConvBERT (Jiang et al. 2020) adds to BERT, between attention and the
feed-forward network of every block:

    pointwise conv to 2 x width -> GLU -> depthwise conv over k tokens -> norm -> SiLU -> pointwise conv back

The depthwise conv of a causal model sees a token and the k - 1 before it (taps at offsets -(k-1)..0); of a
bidirectional one, k // 2 tokens on each side (k odd). It never reaches across padding (padded inputs are
zeroed, so they add nothing) nor across packed documents (position ids restarting at 0): each document is laid
out with zeros before it, as many as the kernel reaches, so that one F.conv1d over the row equals the documents
convolved one by one (ConvLayout). A generating decoder keeps each layer's last k - 1 inputs as a conv state in
transformers' cache, as Mamba-style models do: the `conv_states` of its linear-attention cache layers (the
hybrid ones for softmax layers, see `with_conv_states`).

Conformer's batch norm after the depthwise conv is the model's norm_type here: batch norm (statistics over real
tokens only), or layer/RMS norm, which normalise each token alone and so keep a causal model's training free of
the batch's future tokens.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionAndStaticFullAttentionLayer,
    LinearAttentionAndStaticSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from .configuration_twinlm import TwinLMConfig
from .layers import RESIDUALS, ResidualProjection, TwinLMDropout, build_norm


def conv_reach(kernel_size: int, is_causal: bool) -> tuple[int, int]:
    """(left, right): the tokens a depthwise tap reaches before and after its own."""
    return (kernel_size - 1, 0) if is_causal else (kernel_size // 2, kernel_size // 2)


@dataclass(frozen=True)
class ConvLayout:
    """Where the convolution's inputs sit, built once per forward: the padding (zeroed inputs) and, for packed
    documents, each token's place in a row with `gap` zeros before every document but the first."""

    token_mask: torch.Tensor | None = None  # (batch, q_len) bool: False for padding
    index: torch.Tensor | None = None  # (batch, q_len) place of each token in the spread row
    length: int = 0  # the spread row's length

    @classmethod
    def of(
        cls, config: TwinLMConfig, token_mask: torch.Tensor | None, documents: torch.Tensor | None
    ) -> "ConvLayout":
        """`documents`: (batch, q_len) document id per token of a packed row (ids grow along the row), or None."""
        if config.conv_kernel_size is None or documents is None:
            return cls(token_mask)
        gap = max(conv_reach(config.conv_kernel_size, config.is_causal))
        later = documents - documents[:, :1]  # documents before the token's own in its row
        index = torch.arange(documents.shape[1], device=documents.device) + gap * later
        return cls(token_mask, index, int(index.max()) + 1)  # (one size for the batch: a data-dependent sync)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels, q_len) -> (batch, channels, length): the documents apart (as is, without documents)."""
        if self.index is None:
            return x
        row = x.new_zeros(x.shape[0], x.shape[1], self.length)
        return row.scatter(2, self.index[:, None, :].expand_as(x), x)

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of `spread`: each token's output, (batch, channels, q_len)."""
        if self.index is None:
            return y
        return y.gather(2, self.index[:, None, :].expand(-1, y.shape[1], -1))


PLAIN_ROWS = ConvLayout()  # no padding, no packed documents

# A cache layer's conv state index: 0 is linear attention's own (its zero-width conv state counts the tokens).
CONV_STATE = 1

# Cache layer class -> the transformers cache layer that also keeps conv states, and its constructor's arguments
# read off the layer. A static sliding layer keeps min(window, max_cache_len) slots, and that size is all it tells
# publicly: it stands for both (the same slots; only `is_croppable`, for assisted decoding, may then read True
# where the original max_cache_len was past the window).
CONV_CACHE_LAYERS = {
    DynamicLayer: (LinearAttentionAndFullAttentionLayer, {}),
    DynamicSlidingWindowLayer: (
        LinearAttentionAndSlidingWindowAttentionLayer,
        {"sliding_window": "sliding_window"},
    ),
    StaticLayer: (LinearAttentionAndStaticFullAttentionLayer, {"max_cache_len": "max_cache_len"}),
    StaticSlidingWindowLayer: (
        LinearAttentionAndStaticSlidingWindowAttentionLayer,
        {"max_cache_len": "max_cache_len", "sliding_window": "max_cache_len"},
    ),
    LinearAttentionLayer: (LinearAttentionLayer, {}),
}


def with_conv_states(cache: Cache, config: TwinLMConfig) -> Cache:
    """`cache` with room for every layer's conv state (state CONV_STATE): the layers that a cache built from the
    config has (key/value, sliding window, linear attention) become transformers' hybrid layers, which keep
    conv states beside them, while the cache is still empty. Without a convolution, the cache as it is."""
    if config.conv_kernel_size is None:
        return cache
    layers = cache.layers
    ready = [
        isinstance(layer, LinearAttentionCacheLayerMixin) and layer.number_of_states > CONV_STATE
        for layer in layers
    ]
    if len(layers) == config.num_hidden_layers and all(ready):
        return cache
    known = all(ready[i] or type(layer) in CONV_CACHE_LAYERS for i, layer in enumerate(layers))
    if len(layers) != config.num_hidden_layers or not known or cache.get_seq_length() > 0:
        raise ValueError(
            f"conv_kernel_size={config.conv_kernel_size} keeps each layer's last inputs in the cache: pass "
            "DynamicCache(config=model.config) or StaticCache(config=model.config, ...) (or no cache), empty, instead "
            f"of a {type(cache).__name__} of {len(layers)} layer(s) "
            f"({', '.join(sorted({type(layer).__name__ for layer in layers})) or 'created lazily'})"
        )
    for i, layer in enumerate(layers):
        if not ready[i]:
            hybrid, arguments = CONV_CACHE_LAYERS[type(layer)]
            values = {name: getattr(layer, attribute) for name, attribute in arguments.items()}
            layers[i] = hybrid(number_of_states=CONV_STATE + 1, **values)
    return cache


class NoConvolution(nn.Module):
    """conv_kernel_size=None: no convolution sub-layer, the stream passes unchanged."""

    can_select_queries = True  # (every later step is per token: sparse prediction may skip queries)

    def forward(self, hidden: torch.Tensor, layout: ConvLayout, cache: Cache | None = None) -> torch.Tensor:
        return hidden


class TwinLMConvolution(nn.Module):
    """The convolution sub-layer: Conformer's module (`convolve`), with its own norm (in the block's norm position),
    dropout and residual. Unlike attention and the feed-forward network it carries its norm and residual itself,
    because it is optional: a block without it holds a NoConvolution, and its forward reads the same."""

    can_select_queries = False  # a kept token's convolution reads its neighbours' attention outputs

    def __init__(self, config: TwinLMConfig, layer_idx: int):
        super().__init__()
        width, k = config.hidden_size, config.conv_kernel_size
        self.layer_idx = layer_idx
        self.left, self.right = conv_reach(k, config.is_causal)
        self.norm = build_norm(config)
        self.pointwise_in = nn.Linear(width, 2 * width, bias=config.mlp_bias)
        # padding=0: `convolve` pads the row itself, with the cached inputs or zeros
        self.depthwise = nn.Conv1d(width, width, k, groups=width, bias=config.mlp_bias)
        self.depthwise_norm = build_norm(config)
        self.act = nn.SiLU()
        self.pointwise_out = ResidualProjection(width, width, bias=config.mlp_bias)
        self.dropout = TwinLMDropout(config.hidden_dropout_prob)
        self.residual = RESIDUALS[config.use_residual]

    def convolve(self, hidden: torch.Tensor, layout: ConvLayout, cache: Cache | None) -> torch.Tensor:
        """Conformer's convolution module, (batch, q_len, width) -> (batch, q_len, width)."""
        x = F.glu(self.pointwise_in(hidden), dim=-1)
        if layout.token_mask is not None:  # padding contributes nothing to its neighbours
            x = x * layout.token_mask[..., None].to(x.dtype)
        x = x.transpose(1, 2)  # (batch, width, q_len): channels first, as conv1d and the cache's conv states
        after = x.new_zeros(*x.shape[:2], self.right)
        x = self.depthwise(torch.cat([self.context(x, cache), layout.spread(x), after], dim=2))
        x = layout.gather(x).transpose(1, 2)
        return self.pointwise_out(self.act(self.depthwise_norm(x, layout.token_mask)))

    def context(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """The `left` inputs before this forward's: the cache's (which then keeps the newest), or zeros."""
        if cache is None:
            return x.new_zeros(*x.shape[:2], self.left)
        n = x.shape[2]
        # transformers returns this forward's inputs after the state (the first time: left-padded with zeros up
        # to the state's size, if shorter); the state keeps at least one input (a size-0 state is not allowed)
        full = cache.update_conv_state(x, self.layer_idx, CONV_STATE, conv_kernel_size=max(self.left, 1))
        full = F.pad(full, (max(self.left + n - full.shape[2], 0), 0))
        return full[..., full.shape[2] - n - self.left : full.shape[2] - n]


class PostNormConvolution(TwinLMConvolution):
    def forward(self, hidden: torch.Tensor, layout: ConvLayout, cache: Cache | None = None) -> torch.Tensor:
        update = self.dropout(self.convolve(hidden, layout, cache))
        return self.norm(self.residual(hidden, update), layout.token_mask)


class PreNormConvolution(TwinLMConvolution):
    def forward(self, hidden: torch.Tensor, layout: ConvLayout, cache: Cache | None = None) -> torch.Tensor:
        update = self.dropout(self.convolve(self.norm(hidden, layout.token_mask), layout, cache))
        return self.residual(hidden, update)


CONVOLUTIONS = {"post": PostNormConvolution, "pre": PreNormConvolution}


def build_convolution(config: TwinLMConfig, layer_idx: int) -> nn.Module:
    """The block's convolution sub-layer in its norm position, or NoConvolution without conv_kernel_size."""
    if config.conv_kernel_size is None:
        return NoConvolution()
    return CONVOLUTIONS[config.norm_position](config, layer_idx)
