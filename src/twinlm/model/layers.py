"""Normalisation layers, residual connections and feed-forward networks, each picked from a table by a config
switch.

Every norm takes `(hidden_states, token_mask)` so that the layer code is the same for all of them;
only batch norm uses the mask (its statistics must not count padding).

Like the rest of the model folder (remote code, run on other people's torch releases), public torch APIs only.
configuration_twinlm imports this file (the feed-forward classes declare their tensor-parallel plan), so it
imports the config class only for type hints.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from .configuration_twinlm import TwinLMConfig

# ---------------------------------------------------------------------------------------------------
# Norms


class TwinLMLayerNorm(nn.LayerNorm):
    def __init__(self, config: TwinLMConfig, size: int | None = None):
        super().__init__(size or config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(hidden_states)


class TwinLMRMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no centring, no bias; computed in float32."""

    def __init__(self, config: TwinLMConfig, size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size or config.hidden_size))
        self.eps = config.layer_norm_eps

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(hidden_states.dtype)


class TwinLMBatchNorm(nn.Module):
    """Batch norm over the feature dimension, with statistics taken over real tokens only.

    nn.BatchNorm1d would count padding positions, so that a batch's padding changed every output. Here
    training statistics come from the tokens where `token_mask` is True; running statistics (momentum
    0.1, unbiased variance, as in PyTorch) are used in eval mode. Note for causal models: training-time
    batch statistics mix in future tokens of the batch, a leak that the running statistics of eval mode
    do not have. That is part of what an experiment with this switch measures.
    """

    def __init__(self, config: TwinLMConfig, size: int | None = None, momentum: float = 0.1):
        super().__init__()
        size = size or config.hidden_size
        self.eps = config.layer_norm_eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.register_buffer("running_mean", torch.zeros(size))
        self.register_buffer("running_var", torch.ones(size))

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden_states.float()
        if self.training:
            tokens = x.reshape(-1, x.shape[-1])
            if token_mask is not None:
                tokens = tokens[token_mask.reshape(-1).bool()]
            mean = tokens.mean(0)
            var = tokens.var(0, unbiased=False)
            if not RECOMPUTING.get():  # activation checkpointing runs a block's forward twice per step
                with torch.no_grad():
                    count = tokens.shape[0]
                    unbiased = var * count / max(count - 1, 1)
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                    self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return (x * self.weight + self.bias).to(hidden_states.dtype)


# True while activation checkpointing re-runs a block's forward for the backward pass (see checkpoint_once).
RECOMPUTING: ContextVar[bool] = ContextVar("twinlm_recomputing", default=False)


def checkpoint_once(checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """`checkpoint` (torch.utils.checkpoint or any function of the same form, as transformers' activation
    checkpointing passes it to each block) with RECOMPUTING set while it re-runs the function for the backward
    pass: the first call of the function is the forward, every later one a recomputation. Batch norm's running
    statistics then move once per step, in reentrant and non-reentrant checkpointing alike."""

    def run_checkpointed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls = 0

        def counted(*inner_args: Any, **inner_kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            token = RECOMPUTING.set(calls > 1)
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                RECOMPUTING.reset(token)

        return checkpoint(counted, *args, **kwargs)

    return run_checkpointed


class NoNorm(nn.Module):
    """Identity with the norm interface (e.g. no embedding norm in pre-norm models)."""

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden_states


NORMS: dict[str, type[nn.Module]] = {
    "layernorm": TwinLMLayerNorm,
    "rmsnorm": TwinLMRMSNorm,
    "batchnorm": TwinLMBatchNorm,
}


def build_norm(config: TwinLMConfig, enabled: bool = True, size: int | None = None) -> nn.Module:
    """The configured norm over `size` features (default hidden_size), or the identity when not enabled."""
    return NORMS[config.norm_type](config, size) if enabled else NoNorm()


# ---------------------------------------------------------------------------------------------------
# Residual connections: how a sub-layer's output meets the stream it read (use_residual)


def add_residual(hidden: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + sublayer(x): the skip connection (He et al. 2016), around every sub-layer since Vaswani et al. 2017."""
    return hidden + update


def no_residual(hidden: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """sublayer(x) alone: a plain deep network, which the skip connections were introduced to fix."""
    return update


RESIDUALS = {True: add_residual, False: no_residual}


# ---------------------------------------------------------------------------------------------------
# Dropout

DROP_LEVELS = 1 << 16  # on CPU the drop probability is rounded to a multiple of 2^-16


def dropout_mask(
    x: torch.Tensor, p: float, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, float] | None:
    """(keep, scale) for dropping elements of `x` with probability p on CPU, or None where F.dropout should
    run instead (another device; torch.compile, whose generated code fuses its own; p rounding to 0 or 1).
    `keep` holds 1 (kept) or 0 in `dtype` (default x's): a mask of the operand's dtype multiplies 2-7x faster
    than a bool one, which every multiplication would convert again.

    The mask comes from 16-bit slices of 64-bit random draws: one draw of the generator per 4 elements
    instead of one Bernoulli sample per element (torch's CPU dropout), ~3.5-4x faster for the same
    distribution. Each element is kept with probability 1 - levels / 2^16 and `scale` is its inverse, so the
    expectation is exact; torch's default generator supplies the bits (seeds and saved RNG states hold). The
    draw is an out-of-place torch.randint, so that torch.func.vmap's randomness modes treat it as they treat
    F.dropout ('different': a mask per example; 'error': an error)."""
    if not fast_dropout_applies(x, p):
        return None
    levels = round(p * DROP_LEVELS)
    n = x.numel()
    bits = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= levels - (1 << 15)
    return keep.to(dtype or x.dtype), DROP_LEVELS / (DROP_LEVELS - levels)


def fast_dropout_applies(x: torch.Tensor, p: float) -> bool:
    """Whether dropout_mask serves x: on CPU, p not rounding to 0 or 1, and not under torch.compile (its
    generated code fuses its own dropout). torch.func transforms and forward-mode AD need no exception: the
    autograd Functions here define setup_context, jvp and a generated vmap rule."""
    if x.device.type != "cpu" or not 0 < round(p * DROP_LEVELS) < DROP_LEVELS:
        return False
    return not torch.compiler.is_compiling()


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving only the mask (bool: 1 byte an element) for the backward pass; hidden states
    are small beside attention weights, so converting it twice costs little."""

    generate_vmap_rule = True  # torch.func.vmap: the forward is plain tensor operations

    @staticmethod
    def forward(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        return x.mul(keep).mul_(scale)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        _, keep, ctx.scale = inputs
        ctx.save_for_backward(keep)
        ctx.save_for_forward(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor, keep_tangent: None, scale_tangent: None) -> torch.Tensor:
        (keep,) = ctx.saved_tensors
        return x_tangent.mul(keep).mul_(ctx.scale)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout, with dropout_mask's faster mask on CPU."""
    if not training or p == 0:
        return x
    mask = dropout_mask(x, p, torch.bool)
    return F.dropout(x, p, training) if mask is None else _MaskedScale.apply(x, *mask)


class TwinLMDropout(nn.Dropout):
    """nn.Dropout (same attributes, same place in the module tree) computed by `dropout` above."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training)


# ---------------------------------------------------------------------------------------------------
# Feed-forward networks


class ResidualProjection(nn.Linear):
    """A linear layer whose output is added to the residual stream (attention o_proj, MLP down_proj): a
    type of its own so that the init can find it (GPT-2 scales it by 1/sqrt(2 * layers))."""


class TwinLMMLP(nn.Module):
    """down(act(up(x))): the 2017/BERT/GPT-2 feed-forward block."""

    # tensor parallelism: the hidden units split across ranks (column-parallel in, row-parallel out)
    tp_plan = {"up_proj": "colwise", "down_proj": "rowwise"}

    def __init__(self, config: TwinLMConfig, activation: nn.Module):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = ResidualProjection(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )
        self.act = activation
        self.dropout = TwinLMDropout(config.activation_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.act(self.up_proj(x))))


class TwinLMGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the GLU variants of Shazeer 2020 (SwiGLU, GeGLU)."""

    tp_plan = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}

    def __init__(self, config: TwinLMConfig, activation: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = ResidualProjection(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )
        self.act = activation
        self.dropout = TwinLMDropout(config.activation_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.act(self.gate_proj(x)) * self.up_proj(x)))


class GELUTanh(nn.Module):
    """GPT-2's tanh approximation of GELU ('gelu_new')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


# hidden_act -> (feed-forward class, activation)
FEED_FORWARDS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "relu": (TwinLMMLP, nn.ReLU),
    "gelu": (TwinLMMLP, nn.GELU),
    "gelu_new": (TwinLMMLP, GELUTanh),
    "swiglu": (TwinLMGatedMLP, nn.SiLU),
    "geglu": (TwinLMGatedMLP, nn.GELU),
}


def build_feed_forward(config: TwinLMConfig) -> nn.Module:
    mlp_class, activation = FEED_FORWARDS[config.hidden_act]
    return mlp_class(config, activation())
