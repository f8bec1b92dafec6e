"""Position encodings: one small class per `position_embedding_type`, one shared interface.

Each encoding contributes through at most one of three hooks, and the base class makes the other two
no-ops, so the model calls all three and never branches on the config:
  absolute(position_ids)            -> added to the token embeddings (learned, sinusoidal)
  rotary(position_ids, layer_type)  -> (cos, sin) applied to queries and keys (rope; per layer type, for
                                       local layers' own base)
  attention_bias(distance)          -> added to the attention scores (relative, alibi), from key - query
                                       distances (r, q, k) (r: 1, or one per row of the batch)
and declares what it needs from the rest of the model as class attributes, which the model, the config's
validation and the training loop ask instead of testing the scheme's name:
  biases_attention   its bias needs every (query, key) score: no flash or flex kernel, no linear attention,
                     and a bias the width of the attention heads (no tensor-parallel split of the heads)
  bounded            positions past max_position_embeddings are an error (a table, or fixed vectors the model
                     never saw past its training length); the others take any position
and `check_config` refuses, when the config is built, a config the scheme cannot serve. A new scheme is one
class here plus one entry in POSITION_ENCODINGS (the config accepts every key of that table).

Attention biases are computed from distances in the text, not from position ids: the model passes key index -
query index (with the indices a cache's keys really have), or, where a row's padding mask has holes, the number
of real tokens between the two (padding is no distance). Within one document of a packed batch and among the
real tokens of a padded batch these are the position ids' distances, and they stay valid when a sliding-window
cache drops old keys or a static cache has unfilled slots.
No buffers are registered: frequencies and slopes are recomputed on the fly (cheap), which keeps
`from_pretrained` (meta-device init) and device moves trivially correct.

This file is imported by configuration_twinlm (to validate position_embedding_type against the table), so it
imports the config class only for type hints.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .configuration_twinlm import TwinLMConfig


class PositionEncoding(nn.Module):
    """No positional information (position_embedding_type='none'); also the base of the others."""

    # attention_bias uses the (query, key) distances: without, the model never builds that q x k matrix, and
    # the kernels that take no bias (flash, flex, linear attention) can serve the scheme
    biases_attention = False
    # positions past max_position_embeddings are an error (see max_positions)
    bounded = False

    def __init__(self, config: TwinLMConfig):
        super().__init__()
        self.config = config

    @classmethod
    def check_config(cls, config: TwinLMConfig) -> None:
        """Raise ValueError (naming the field and value) for a config this scheme cannot serve."""

    @classmethod
    def max_positions(cls, config: TwinLMConfig) -> int | None:
        """The number of positions the scheme encodes (position ids 0 .. n - 1), or None for any position."""
        return config.max_position_embeddings if cls.bounded else None

    def absolute(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        return None

    def rotary(
        self, position_ids: torch.Tensor, layer_type: str = "full_attention"
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) of the positions' angles for the layers of `layer_type` (their own RoPE base)."""
        return None

    def attention_bias(self, distance: torch.Tensor) -> torch.Tensor | None:
        """An additive (r, heads, q, k) bias from `distance` (r, q, k) = key - query distance in tokens."""
        return None


class LearnedPositions(PositionEncoding):
    """A trained vector per position (BERT, GPT-2)."""

    bounded = True

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)

    def absolute(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(position_ids)


class SinusoidalPositions(PositionEncoding):
    """The 2017 paper's fixed sines and cosines, interleaved: PE[p, 2i] = sin(p / 10000^(2i/d))."""

    bounded = True  # defined for any position, but the model never saw those past its training length

    def absolute(self, position_ids: torch.Tensor) -> torch.Tensor:
        dim = self.config.embedding_size
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim))
        angles = position_ids.float()[..., None] * inv_freq  # (..., dim/2)
        table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
        return table[..., :dim]


class RotaryPositions(PositionEncoding):
    """RoPE (Su et al. 2021), in the rotate-half layout of GPT-NeoX and Llama."""

    @classmethod
    def check_config(cls, config: TwinLMConfig) -> None:
        if config.head_dim % 2:
            raise ValueError(
                f"position_embedding_type={config.position_embedding_type!r} rotates pairs of dimensions: it needs "
                f"an even head dimension, got {config.head_dim} (hidden_size={config.hidden_size} / "
                f"num_attention_heads={config.num_attention_heads})"
            )

    def rotary(
        self, position_ids: torch.Tensor, layer_type: str = "full_attention"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dim, theta = self.config.head_dim, rope_theta(self.config, layer_type)
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim))
        angles = position_ids.float()[..., None] * inv_freq  # (batch, seq, dim/2)
        emb = torch.cat((angles, angles), dim=-1)[:, None]  # (batch, 1, seq, dim): broadcast over heads
        return emb.cos(), emb.sin()


def rope_theta(config: TwinLMConfig, layer_type: str) -> float:
    """The RoPE base of a layer type: local_rope_theta for sliding-window layers where set (ModernBERT's
    short-range local layers), rope_theta otherwise."""
    local = config.local_rope_theta if layer_type == "sliding_attention" else None
    return config.rope_theta if local is None else local


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of a (batch, heads, seq, head_dim) tensor by their position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class RelativePositions(PositionEncoding):
    """T5-style: a learned scalar per head and per bucket of relative distance (log-spaced buckets)."""

    biases_attention = True

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        self.bias = nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads)

    def attention_bias(self, distance: torch.Tensor) -> torch.Tensor:
        buckets = relative_position_bucket(
            distance,
            bidirectional=not self.config.is_causal,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        return self.bias(buckets).permute(0, 3, 1, 2)  # (r, heads, q, k)


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing: exact buckets for small distances, logarithmic ones up to max_distance."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = max(num_buckets // 2, 1)
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(
        max(max_distance / max_exact, 1.0 + 1e-6)
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class AlibiPositions(PositionEncoding):
    """ALiBi (Press et al. 2022): a fixed, per-head linear penalty on distance; no parameters."""

    biases_attention = True

    def attention_bias(self, distance: torch.Tensor) -> torch.Tensor:
        slopes = alibi_slopes(self.config.num_attention_heads, distance.device)
        # |distance|: causal masking hides the future; a bidirectional model penalises both directions.
        return -(slopes[:, None, None] * distance[:, None].abs().float())  # (r, heads, q, k)


def alibi_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """Geometric slopes 2^(-8/n), ...; for a head count that is not a power of two, the paper's interleave."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, device=device)


POSITION_ENCODINGS: dict[str, type[PositionEncoding]] = {
    "learned": LearnedPositions,
    "sinusoidal": SinusoidalPositions,
    "rope": RotaryPositions,
    "relative": RelativePositions,
    "alibi": AlibiPositions,
    "none": PositionEncoding,
}
