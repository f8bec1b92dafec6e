"""The twinlm model, read top to bottom like the paper: embeddings -> attention -> feed-forward ->
block -> stack -> heads.

One architecture, two variants: `config.is_causal=False` is a BERT-style bidirectional encoder trained
with masked-LM, `True` a GPT-style decoder trained on the next token. Every design switch picks a
component from a table when the model is built (see positions.py, attention.py, layers.py), so the
forward passes below contain no `if config.x == ...` chains.

This folder ships to the Hub as remote code: it imports only torch, transformers and its siblings.
"""

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, is_flash_attention_requested
from transformers.utils.output_capturing import capture_outputs

from .attention import (
    OWN_IMPLEMENTATIONS,
    AdditiveScoring,
    AttentionMask,
    FlashMask,
    FlexMask,
    TwinLMAttention,
    WindowBlocks,
    WindowRecipe,
    window_reach,
)
from .configuration_twinlm import TwinLMConfig
from .convolution import PLAIN_ROWS, ConvLayout, build_convolution, with_conv_states
from .layers import (
    FEED_FORWARDS,
    RESIDUALS,
    ResidualProjection,
    TwinLMBatchNorm,
    TwinLMDropout,
    TwinLMRMSNorm,
    build_feed_forward,
    build_norm,
    checkpoint_once,
)
from .linear_attention import LinearMask
from .loss import causal_lm_loss, masked_lm_loss, replaced_token_loss
from .positions import POSITION_ENCODINGS

# ---------------------------------------------------------------------------------------------------
# Embeddings


class TwinLMEmbeddings(nn.Module):
    """Token (+ segment) (+ absolute position) embeddings, then optional norm and dropout; all of width
    `embedding_size` (hidden_size unless factorised, see TwinLMModel.embeddings_project)."""

    def __init__(self, config: TwinLMConfig):
        super().__init__()
        width = config.embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, width) if config.type_vocab_size > 0 else None
        )
        # The 2017 paper multiplies token embeddings by sqrt(d_model) so that they are not drowned by
        # the (unit-scale) sinusoids.
        self.scale = math.sqrt(width) if config.scale_embeddings else 1.0
        self.norm = build_norm(config, enabled=config.embedding_norm, size=width)
        self.dropout = TwinLMDropout(config.embedding_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        positions: torch.Tensor | None,
        token_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        hidden = (self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds) * self.scale
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            hidden = hidden + self.token_type_embeddings(token_type_ids)
        if positions is not None:
            hidden = hidden + positions.to(hidden.dtype)
        return self.dropout(self.norm(hidden, token_mask))


# ---------------------------------------------------------------------------------------------------
# Blocks: attention, (a convolution,) feed-forward sub-layers, each wrapped in a residual connection and a norm.
# Post-norm (2017, BERT): x = norm(x + sublayer(x)).  Pre-norm (GPT-2 on): x = x + sublayer(norm(x)).
# Without residuals (use_residual=False) the `x +` goes: x = norm(sublayer(x)), x = sublayer(norm(x)).


class TwinLMLayer(GradientCheckpointingLayer):
    def __init__(self, config: TwinLMConfig, layer_idx: int):
        super().__init__()
        # full_attention, sliding_attention or linear_attention: picks the mask (and RoPE base) the stack passes
        self.attention_type = config.layer_types[layer_idx]
        self.attention = TwinLMAttention(config, layer_idx)
        self.conv = build_convolution(config, layer_idx)  # with its own norm and residual; or nothing
        self.mlp = build_feed_forward(config)
        self.attention_norm = build_norm(config)
        self.mlp_norm = build_norm(config)
        self.dropout = TwinLMDropout(config.hidden_dropout_prob)
        self.residual = RESIDUALS[config.use_residual]

    # transformers' activation checkpointing hands each block its checkpoint function: wrapped so that the block
    # knows when a forward is the backward pass's recomputation (batch norm then leaves its statistics alone).
    @property
    def _gradient_checkpointing_func(self):
        return self.__dict__.get("_checkpoint_once")

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, checkpoint) -> None:
        self.__dict__["_checkpoint_once"] = checkpoint_once(checkpoint)


class TwinLMPostNormLayer(TwinLMLayer):
    def forward(
        self,
        hidden,
        token_mask,
        mask,
        rotary,
        cache=None,
        output_attentions=False,
        queries=None,
        conv_layout=PLAIN_ROWS,
        **kwargs,
    ):
        if queries is not None:
            return self.forward_queries(hidden, queries, mask, rotary, **kwargs), None
        attended, weights = self.attention(hidden, mask, rotary, cache, output_attentions, **kwargs)
        hidden = self.attention_norm(self.residual(hidden, self.dropout(attended)), token_mask)
        hidden = self.conv(hidden, conv_layout, cache)
        hidden = self.mlp_norm(self.residual(hidden, self.dropout(self.mlp(hidden))), token_mask)
        return hidden, weights

    def forward_queries(self, hidden, queries: "QuerySubset", mask, rotary, **kwargs):
        """The block's output at `queries.index` only (keys and values from every token); per-token norms.
        (Never with a convolution, which needs every token: see TwinLMModel._can_skip_queries.)"""
        selected = queries.gather(hidden)
        attended, _ = self.attention(
            hidden, mask, rotary, queries=selected, query_rotary=queries.rotary, **kwargs
        )
        selected = self.attention_norm(self.residual(selected, self.dropout(attended)))
        return self.mlp_norm(self.residual(selected, self.dropout(self.mlp(selected))))


class TwinLMPreNormLayer(TwinLMLayer):
    def forward(
        self,
        hidden,
        token_mask,
        mask,
        rotary,
        cache=None,
        output_attentions=False,
        queries=None,
        conv_layout=PLAIN_ROWS,
        **kwargs,
    ):
        if queries is not None:
            return self.forward_queries(hidden, queries, mask, rotary, **kwargs), None
        attended, weights = self.attention(
            self.attention_norm(hidden, token_mask), mask, rotary, cache, output_attentions, **kwargs
        )
        hidden = self.residual(hidden, self.dropout(attended))
        hidden = self.conv(hidden, conv_layout, cache)
        hidden = self.residual(hidden, self.dropout(self.mlp(self.mlp_norm(hidden, token_mask))))
        return hidden, weights

    def forward_queries(self, hidden, queries: "QuerySubset", mask, rotary, **kwargs):
        """The block's output at `queries.index` only (keys and values from every token); per-token norms.
        (Never with a convolution, which needs every token: see TwinLMModel._can_skip_queries.)"""
        normed = self.attention_norm(hidden)
        attended, _ = self.attention(
            normed, mask, rotary, queries=queries.gather(normed), query_rotary=queries.rotary, **kwargs
        )
        selected = self.residual(queries.gather(hidden), self.dropout(attended))
        return self.residual(selected, self.dropout(self.mlp(self.mlp_norm(selected))))


LAYERS = {"post": TwinLMPostNormLayer, "pre": TwinLMPreNormLayer}


# ---------------------------------------------------------------------------------------------------
# The stack


class TwinLMPreTrainedModel(PreTrainedModel):
    config_class = TwinLMConfig
    config: TwinLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TwinLMPostNormLayer", "TwinLMPreNormLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True  # where a variant allows it: see check_flash_attention
    _supports_flex_attn = True  # the variants flash computes (no attention dropout); static caches too
    # torch.compile(fullgraph=True) of an inference forward (every switch), and compiled static-cache decoding with
    # one graph for every step (create_masks_for_generate); training steps may break graphs (sparse prediction)
    _can_compile_fullgraph = True
    # transformers' contract for serving backends (vLLM, TGI): attention through the AttentionInterface (and its
    # mask forms), the forward's kwargs passed down to the attention function, logits_to_keep as a tensor, a
    # default tensor-parallel plan; transformers' padding-free tests (packed rows equal padded ones) run with it
    _supports_attention_backend = True
    # transformers' output recording (capture_outputs): each block's output is a hidden state (the first
    # one is the embeddings, the last the final norm's output), each attention module's weights an attention.
    _can_record_outputs = {"hidden_states": TwinLMLayer, "attentions": TwinLMAttention}

    # tensor parallelism: the base model's plan is the config's base_model_tp_plan; heads add their own
    @property
    def tp_plan(self) -> dict[str, str]:
        """The full tensor-parallel plan (transformers' property), refused in one line for a config whose heads
        cannot be split across `tp_size` ranks (read by transformers when it applies the plan)."""
        if (self.tp_size or 1) > 1:
            check_tensor_parallel(self, self.tp_size)
        return PreTrainedModel.tp_plan.fget(self)

    @tp_plan.setter
    def tp_plan(self, plan: dict[str, str] | None) -> None:
        PreTrainedModel.tp_plan.fset(self, plan)

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for matrices, convolution kernels and embeddings, the identity for norms;
        with scale_residual_init (GPT-2), std / sqrt(writes) for the projections that write the residual (writes:
        2 per layer, 3 with a convolution)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            if isinstance(module, ResidualProjection) and self.config.scale_residual_init:
                writes = 2 + (self.config.conv_kernel_size is not None)
                std = std / math.sqrt(writes * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, (nn.LayerNorm, TwinLMRMSNorm, TwinLMBatchNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if isinstance(module, TwinLMBatchNorm):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
        elif isinstance(module, AdditiveScoring):
            init.normal_(module.score_vector, mean=0.0, std=std)


class TwinLMModel(TwinLMPreTrainedModel):
    """The bare stack: embeddings, N blocks, and a final norm for pre-norm models."""

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        config.validate_layer_type()  # a config changed after it was built (num_hidden_layers, sliding_window)
        self.positions = POSITION_ENCODINGS[config.position_embedding_type](config)
        self.embeddings = TwinLMEmbeddings(config)
        # Factorised embeddings (ALBERT, ELECTRA's generator): embedding_size -> hidden_size.
        self.embeddings_project = (
            nn.Linear(config.embedding_size, config.hidden_size)
            if config.embedding_size != config.hidden_size
            else nn.Identity()
        )
        layer_class = LAYERS[config.norm_position]
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        # Pre-norm leaves the residual stream un-normalised: GPT-2 adds a final norm (ln_f).
        self.final_norm = build_norm(config, enabled=config.norm_position == "pre")
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        tokens_to_keep: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """`tokens_to_keep` (batch, seq) bool: last_hidden_state is then only those tokens' states, (n, hidden)
        in row-major order, and where nothing else needs every state (no cache, no recorded hidden states or
        attentions, no flash kernel, per-token norms, no convolution) the last block computes only their queries:
        exact, since everything after the last attention is per token (masked LM computes 15% of its last block).
        (With output_hidden_states, transformers makes the last recorded state last_hidden_state: kept rows.)"""
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        batch, q_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if q_len == 0:
            raise ValueError(f"the input has no tokens (shape ({batch}, 0)); give at least one token per row")
        output_attentions = kwargs.pop("output_attentions", None)  # the rest of kwargs goes on to attention
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        use_cache = config.use_cache if use_cache is None else use_cache
        cache = self._cache(cache, use_cache)
        past = cache.get_query_offset(0) if cache is not None else 0  # tokens before this forward's

        # this forward's columns of the 2D mask (which covers the cache's tokens too, or a static cache's slots)
        token_mask = query_columns(attention_mask, past, q_len).bool() if attention_mask is not None else None
        # Packed batches: explicit position_ids that restart at 0 start a new document, at real tokens only: a
        # padding token's position id says nothing (a hole in the mask must not cut its row in two).
        documents = None
        if q_len > 1 and position_ids is not None and cache_is_empty(cache):
            documents = position_ids if token_mask is None else position_ids.masked_fill(~token_mask, -1)
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                position_ids = query_columns((attention_mask.long().cumsum(-1) - 1).clamp(min=0), past, q_len)
            else:
                position_ids = (torch.arange(q_len, device=device) + past).expand(batch, -1)
        if not torch.compiler.is_compiling():  # data-dependent checks; a compiled decode step skips them
            self._check_inputs(attention_mask, position_ids, past + q_len, cache)

        # One mask and one set of rotary angles per layer type (full, sliding window, linear), built once.
        layer_types = dict.fromkeys(config.layer_types)
        attention_mask, document_positions = drop_trivial_masks(attention_mask, documents)
        # (where the mask has holes, ALiBi/T5 biases count the real tokens between two tokens, not the indices)
        real_index = real_token_index(attention_mask) if self.positions.biases_attention else None
        masks = {
            layer_type: LAYER_MASKS[layer_type](
                self,
                layer_type,
                attention_mask,
                document_positions,
                self._geometry(cache, layer_type, batch, q_len, past, real_index),
                output_attentions,
            )
            for layer_type in layer_types
        }
        rotary = {layer_type: self.positions.rotary(position_ids, layer_type) for layer_type in layer_types}
        hidden = self.embeddings(
            input_ids, inputs_embeds, token_type_ids, self.positions.absolute(position_ids), token_mask
        )
        hidden = self.embeddings_project(hidden)
        conv_layout = ConvLayout.of(config, token_mask, document_ids(document_positions))
        hidden = self._blocks(
            hidden, token_mask, masks, rotary, cache, output_attentions, tokens_to_keep, kwargs, conv_layout
        )
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache)

    def _geometry(
        self, cache: Cache | None, layer_type: str, batch: int, q_len: int, past, real_index=None
    ) -> "MaskGeometry":
        """Where this forward's queries and the keys of `layer_type`'s layers sit in the sequence: a static
        cache's keys are all its slots (unfilled ones masked as the future), a sliding-window cache's only the
        newest (the first such layer's cache tells); linear layers keep no keys."""
        if cache is None or layer_type == "linear_attention":
            return MaskGeometry(q_len, past, q_len, 0, exact=True, batch=batch, real_index=real_index)
        index = self.config.layer_types.index(layer_type)
        kv_len, kv_offset = cache.get_mask_sizes(q_len, index)
        exact = not cache.is_compileable
        if exact and layer_type == "sliding_attention" and self.config.sliding_window == 1:
            # transformers' dynamic window layer keeps the last w - 1 keys by slicing [-(w - 1):], which for a
            # window of 1 is [0:], every key, while its mask sizes count none: the sizes of what it holds
            layer = cache.layers[index]
            keys = getattr(layer, "keys", None)
            stored = keys.shape[-2] if getattr(layer, "is_initialized", False) and keys is not None else 0
            if not getattr(layer, "record_past", False):
                kv_len, kv_offset = stored + q_len, int(past) - stored
        return MaskGeometry(q_len, past, kv_len, kv_offset, exact, batch=batch, real_index=real_index)

    def _blocks(
        self, hidden, token_mask, masks, rotary, cache, output_attentions, tokens_to_keep, kwargs, conv_layout
    ):
        """The blocks and the final norm; with `tokens_to_keep`, only those tokens' states (row-major), the last
        block computing only their queries where `_can_skip_queries` allows."""
        queries, last = None, self.layers[-1].attention_type
        if tokens_to_keep is not None:
            if tokens_to_keep.dtype != torch.bool:
                raise ValueError(
                    "tokens_to_keep must be a bool tensor of shape (batch, seq) (True = keep), "
                    f"got {tokens_to_keep.dtype}"
                )
            tokens_to_keep = tokens_to_keep.to(hidden.device)
            if self._can_skip_queries(cache, masks[last], output_attentions, kwargs):
                queries = QuerySubset.of(tokens_to_keep, rotary[last])
        for layer in self.layers if queries is None else self.layers[:-1]:
            kind = layer.attention_type
            hidden, _ = layer(
                hidden,
                token_mask,
                masks[kind],
                rotary[kind],
                cache=cache,
                output_attentions=output_attentions,
                conv_layout=conv_layout,
                **kwargs,
            )
        if queries is not None:
            # through the block's __call__: its hooks (FSDP, Accelerate's offload, user hooks) and checkpointing
            hidden, _ = self.layers[-1](
                hidden, token_mask, masks[last].for_queries(queries), rotary[last], queries=queries, **kwargs
            )
            return self.final_norm(hidden)[queries.real]
        hidden = self.final_norm(hidden, token_mask)
        return hidden if tokens_to_keep is None else hidden[tokens_to_keep]

    def _can_skip_queries(self, cache, mask, output_attentions, kwargs) -> bool:
        """Whether the last block may compute only some queries (see forward's tokens_to_keep)."""
        hidden_states = kwargs.get("output_hidden_states", self.config.output_hidden_states)
        return (
            not torch.compiler.is_compiling()  # a query count per batch would recompile the graph
            and cache is None
            and not output_attentions
            and not hidden_states
            and mask.can_select_queries  # not flash, flex, linear or plain is_causal (a causal bias has rows)
            and self.config.norm_type != "batchnorm"  # its training statistics take every token
            and self.layers[-1].conv.can_select_queries  # a convolution reads the neighbours' states
        )

    def _cache(self, cache: Cache | None, use_cache: bool) -> Cache | None:
        """The KV cache to fill: only causal models keep one (an encoder attends both ways); in train mode only
        a cache the caller passed (generate() mid-training, as transformers' own models), none is made."""
        if not (self.config.is_causal and use_cache) or (cache is None and self.training):
            return None
        # With the config, each layer's cache follows its layer type (as in transformers' own models): a
        # sliding-window layer keeps only the window, a linear-attention layer a constant-size state.
        if cache is None:
            return with_conv_states(DynamicCache(config=self.config), self.config)
        linear = "linear_attention" in self.config.layer_types
        if linear and not (len(cache.layers) == self.config.num_hidden_layers and all(cache.is_linear)):
            raise ValueError(
                "attention_scoring='linear' keeps a recurrent state, not keys and values: pass "
                "DynamicCache(config=model.config) (or no cache) instead of a cache built without the config"
            )
        return with_conv_states(cache, self.config)  # a convolution keeps its last inputs there too

    def _check_inputs(
        self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor, seen: int, cache: Cache | None
    ) -> None:
        """Clear errors for a mask of the wrong size and positions past an absolute position table."""
        config = self.config
        # With a static cache the mask may cover all its slots (create_masks_for_generate: one shape every step).
        static = cache is not None and cache.is_compileable
        if attention_mask is not None and (
            attention_mask.dim() != 2
            or attention_mask.shape[-1] < seen
            or (attention_mask.shape[-1] > seen and not static)
        ):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; it must be 2D (batch, {int(seen)}): one "
                "entry per token of the input and the cache, 1 = real token, 0 = padding"
            )
        # The largest position id counts, not the row length: a padding-free packed row (documents whose
        # position ids restart at 0) may be longer than the table.
        limit = self.positions.max_positions(config)
        if limit is None:
            return
        largest = int(position_ids.max())
        if largest >= limit:
            unbounded = [
                name for name, scheme in POSITION_ENCODINGS.items() if scheme.max_positions(config) is None
            ]
            raise ValueError(
                f"position id {largest} is past max_position_embeddings={limit} of this model's "
                f"{config.position_embedding_type} positions; use shorter inputs or documents (packed documents "
                f"restart their position ids at 0), or a model with {'/'.join(unbounded)} positions"
            )


def softmax_attention_mask(
    model: TwinLMModel,
    layer_type: str,
    attention_mask: torch.Tensor | None,
    document_positions: torch.Tensor | None,
    geometry: "MaskGeometry",
    output_attentions: bool,
) -> AttentionMask | WindowBlocks | FlashMask | FlexMask:
    """What the softmax-attention layers of `layer_type` may attend to, for the kernel that will run them:
    flash and flex kernels take their own forms; a sliding window over a fresh sequence long enough to gain
    runs in blocks (O(n w)); otherwise one dense mask, (batch or 1, 1, q_len, kv_len): padding, causality,
    the window and document boundaries folded into one boolean mask, True where a query may attend; with
    ALiBi/T5 position biases, one additive float bias (-inf where forbidden) instead; none at all (with
    is_causal) when nothing but plain causality applies: SDPA's fast path (see drop_trivial_masks)."""
    config = model.config
    window = config.sliding_window if layer_type == "sliding_attention" else None
    device = model.embeddings.word_embeddings.weight.device
    if is_flash_attention_requested(config):
        return flash_attention_mask(
            config, attention_mask, document_positions, geometry, output_attentions, window
        )
    if config._attn_implementation == "flex_attention":
        return flex_attention_mask(
            model, attention_mask, document_positions, geometry, output_attentions, window
        )
    # (blocks are twinlm's own eager/SDPA code on a blocked layout; a registered function gets the dense mask)
    if window is not None and not output_attentions and geometry.fresh and owns_kernel(config):
        left, right = window_reach(window, config.is_causal)
        if WindowBlocks.applies(geometry.q_len, left, right):
            recipe = WindowRecipe(
                geometry.q_len,
                left,
                right,
                key_real=attention_mask.bool() if attention_mask is not None else None,
                documents=document_ids(document_positions),
                position_bias=model.positions.attention_bias,
                real_index=geometry.real_index,
            )
            return WindowBlocks.build(recipe, geometry.batch, device)
    q_idx, k_idx = geometry.indices(device)
    # (the q x k distances only where a position bias uses them: at 8k tokens they are 512 MB and a second)
    position_bias = (
        model.positions.attention_bias(geometry.distance(device))
        if model.positions.biases_attention
        else None
    )
    q_len, kv_len = geometry.q_len, geometry.kv_len
    plain = attention_mask is None and document_positions is None and window is None
    # Without a mask, when the keys are exactly the tokens so far: a causal query block that is the whole
    # sequence is SDPA's is_causal, and a single new token may see every key. Several new tokens after a
    # cache need the explicit (bottom-right aligned) mask: SDPA's is_causal aligns top-left.
    if plain and position_bias is None and geometry.exact and (not config.is_causal or q_len in (1, kv_len)):
        return AttentionMask(is_causal=config.is_causal and q_len > 1)

    allowed = allowed_pairs(config, window, geometry, q_idx, k_idx, attention_mask, document_positions)
    # Every query may see itself: padding queries get a harmless row instead of NaNs from an
    # all -inf softmax (their outputs are never used).
    allowed = allowed | (q_idx == k_idx)
    if position_bias is None:  # SDPA and eager take the boolean mask itself: no dense float bias
        return AttentionMask(bias=allowed)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill(~allowed, float("-inf"))
    return AttentionMask(bias=bias + position_bias.float())


def linear_attention_mask(
    model: TwinLMModel,
    layer_type: str,
    attention_mask: torch.Tensor | None,
    document_positions: torch.Tensor | None,
    geometry: "MaskGeometry",
    output_attentions: bool,
) -> LinearMask:
    """Linear attention forms no weights: it needs the direction, the padding of this forward's tokens (their
    keys count for nothing) and the documents of a packed batch. Any attn_implementation: no kernel applies."""
    key_real = (
        query_columns(attention_mask, geometry.past, geometry.q_len).bool()
        if attention_mask is not None
        else None
    )
    return LinearMask(model.config.is_causal, key_real, document_ids(document_positions))


# layer type -> the builder of its layers' mask (one per forward pass)
LAYER_MASKS = {
    "full_attention": softmax_attention_mask,
    "sliding_attention": softmax_attention_mask,
    "linear_attention": linear_attention_mask,
}


def document_ids(document_positions: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, seq) document index of each token of a packed row (position ids restart at 0), or None."""
    return None if document_positions is None else (document_positions == 0).long().cumsum(-1)


def flash_attention_mask(
    config: TwinLMConfig,
    attention_mask: torch.Tensor | None,
    document_positions: torch.Tensor | None,
    geometry: "MaskGeometry",
    output_attentions: bool,
    window: int | None,
) -> FlashMask:
    """Flash kernels take no bias: the padding mask (un-padding) or packed position ids (variable-length rows)."""
    check_flash_attention(config, output_attentions)
    if not geometry.exact:
        raise ValueError(
            f"attn_implementation={config._attn_implementation!r} with a static cache is not supported by "
            "twinlm (its unfilled slots would need un-padding); use cache_implementation='dynamic' or "
            "attn_implementation='sdpa'"
        )
    # transformers' flash path takes padding or packed documents, not both: with a padding mask
    # (generate() passes both, and then the documents are the padding's), padding wins.
    return FlashMask(
        is_causal=config.is_causal,
        padding_mask=attention_mask,
        packed_position_ids=document_positions if attention_mask is None else None,
        window=window,
    )


def flex_attention_mask(
    model: TwinLMModel,
    attention_mask: torch.Tensor | None,
    document_positions: torch.Tensor | None,
    geometry: "MaskGeometry",
    output_attentions: bool,
    window: int | None,
) -> FlexMask:
    """torch's flex_attention: the same pairs as the dense mask, as a mask_mod turned into a block-sparse
    BlockMask (blocks with no allowed pair are skipped by the kernel: a window costs O(n w) there). Building it
    evaluates mask_mod on every pair once per forward (create_block_mask), which is not saved for backward."""
    from torch.nn.attention.flex_attention import create_block_mask

    config = model.config
    check_flash_attention(config, output_attentions)
    padding = geometry.key_padding(attention_mask) if attention_mask is not None else None
    documents = document_ids(document_positions)
    left, right = window_reach(window, config.is_causal) if window is not None else (None, None)
    past, offset = geometry.past, geometry.kv_offset

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = q_idx + past, kv_idx + offset
        allowed = k <= q if config.is_causal else k == k  # (k == k: every pair)
        if window is not None:
            allowed = allowed & (k - q >= -left) & (k - q <= right)
        if padding is not None:
            allowed = allowed & padding[b, kv_idx]
        if documents is not None:
            allowed = allowed & (documents[b, q_idx] == documents[b, kv_idx])
        return allowed | (q == k)  # every query sees itself (padding queries: a harmless row)

    per_row = padding is not None or documents is not None
    block_mask = create_block_mask(
        mask_mod,
        geometry.batch if per_row else None,
        None,
        geometry.q_len,
        geometry.kv_len,
        device=model.embeddings.word_embeddings.weight.device,
    )
    return FlexMask(block_mask)


def allowed_pairs(
    config: TwinLMConfig,
    window: int | None,
    geometry: "MaskGeometry",
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    attention_mask: torch.Tensor | None,
    document_positions: torch.Tensor | None,
) -> torch.Tensor:
    """Which (query, key) pairs may attend, (batch or 1, 1, q_len, kv_len): causality, the layer's sliding
    window, padding and packed-document boundaries."""
    q_len, kv_len, device = geometry.q_len, geometry.kv_len, q_idx.device
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if config.is_causal:  # also hides a static cache's unfilled slots (they lie in the future)
        allowed &= k_idx <= q_idx
    if window is not None:
        # causal: the current and window - 1 previous tokens; bidirectional: window // 2 tokens on each side.
        left, right = window_reach(window, config.is_causal)
        allowed &= (k_idx - q_idx >= -left) & (k_idx - q_idx <= right)
    allowed = allowed[None, None]  # (1, 1, q, k)
    if attention_mask is not None:
        allowed = allowed & geometry.key_padding(attention_mask)[:, None, None, :]
    if document_positions is not None:  # only without a past: keys are the queries (plus unfilled slots)
        document = (document_positions == 0).long().cumsum(-1)  # (batch, seq): a new id at each restart
        key_document = F.pad(document, (0, kv_len - q_len), value=-1)
        allowed = allowed & (document[:, :, None] == key_document[:, None, :])[:, None]
    return allowed


@dataclass
class MaskGeometry:
    """Where the q_len queries and kv_len keys of one forward sit in the sequence: query i is token past + i,
    key j is token kv_offset + j (transformers' Cache.get_mask_sizes). `exact`: the keys are exactly the
    tokens so far (no cache, or a dynamic one), so that SDPA's is_causal can stand for the mask."""

    q_len: int
    past: int | torch.Tensor  # a static cache counts in a tensor (no recompilation per step)
    kv_len: int
    kv_offset: int
    exact: bool
    batch: int = 1
    # (batch, tokens so far) real tokens up to each token, where the padding mask has holes (real_token_index)
    real_index: torch.Tensor | None = None

    @property
    def fresh(self) -> bool:
        """The keys are exactly this forward's tokens (no cache past): what windows in blocks need."""
        return self.exact and self.kv_len == self.q_len and self.kv_offset == 0

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices of the queries (q_len, 1) and of the keys (1, kv_len)."""
        q_idx = (torch.arange(self.q_len, device=device) + self.past)[:, None]
        k_idx = (torch.arange(self.kv_len, device=device) + self.kv_offset)[None, :]
        return q_idx, k_idx

    def distance(self, device: torch.device) -> torch.Tensor:
        """Key minus query distance in tokens of text, (1 | batch, q_len, kv_len): token indices, or where the
        padding mask has holes the real tokens between the two (what ALiBi/T5 biases measure)."""
        q_idx, k_idx = self.indices(device)
        if self.real_index is None:
            return (k_idx - q_idx)[None]
        # a static cache's slots past the tokens so far: the future (causality hides them), any count will do
        counts = F.pad(self.real_index, (0, max(self.kv_offset + self.kv_len - self.real_index.shape[-1], 0)))
        q_real = counts.index_select(1, q_idx[:, 0])
        k_real = counts.index_select(1, k_idx[0])
        return k_real[:, None, :] - q_real[:, :, None]

    def key_padding(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The (batch, kv_len) padding mask of the keys. The 2D mask covers the tokens so far; a static
        cache's slots past them are future tokens (hidden by causality), so they count as real here."""
        end = self.kv_offset + self.kv_len
        padding = F.pad(attention_mask.bool(), (0, max(end - attention_mask.shape[-1], 0)), value=True)
        return padding[:, self.kv_offset : end]


@dataclass
class QuerySubset:
    """Some tokens of each row as the queries of the last block: `index` (batch, m) their positions (a row
    with fewer than m tokens repeats position 0, dropped by `real`), their rotary angles."""

    index: torch.Tensor
    real: torch.Tensor  # (batch, m) bool
    rotary: tuple[torch.Tensor, torch.Tensor] | None

    @classmethod
    def of(cls, keep: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> "QuerySubset":
        counts = keep.sum(-1)
        m = max(int(counts.max()), 1)
        # positions of the kept tokens first (stable sort keeps row order), then the rest (unused)
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :m]
        real = torch.arange(m, device=keep.device)[None] < counts[:, None]
        index = order.masked_fill(~real, 0)
        subset = cls(index, real, None)
        if rotary is not None:
            subset.rotary = tuple(subset.gather(r, dim=2) for r in rotary)
        return subset

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """x's entries at `index` along `dim` (x's batch dimension may be 1: broadcast)."""
        shape = [self.index.shape[0], *x.shape[1:]]
        view = [1] * x.dim()
        view[0], view[dim] = self.index.shape
        shape[dim] = self.index.shape[1]
        return x.expand(self.index.shape[0], *x.shape[1:]).gather(dim, self.index.view(view).expand(shape))


def drop_trivial_masks(
    attention_mask: torch.Tensor | None, document_positions: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """None for a padding mask without padding (generate() and collators pass all ones) and for position ids
    that start no second document in any row, so that plain causal attention takes SDPA's is_causal path
    instead of a dense bias. Data-dependent: a compiled forward keeps both as they are."""
    if torch.compiler.is_compiling():
        return attention_mask, document_positions
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if document_positions is not None and not bool((document_positions[:, 1:] == 0).any()):
        document_positions = None
    return attention_mask, document_positions


def cache_is_empty(cache: Cache | None) -> bool:
    """No tokens cached yet (the first forward of a generation, or no cache). A filled static cache counts in a
    tensor: a compiled forward does not read it (no graph break) and takes the cache as not empty."""
    if cache is None:
        return True
    length = cache.get_seq_length()
    if isinstance(length, torch.Tensor) and torch.compiler.is_compiling():
        return False
    return bool(length == 0)


def real_token_index(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each token's count of real tokens up to it, (batch, tokens), where some row's real tokens are not one run
    (holes in the mask): distances in the text then differ from distances in token indices. None otherwise (no
    mask, left or right padding), where index distances are the same; a compiled forward always counts."""
    if attention_mask is None:
        return None
    mask = attention_mask.long()
    if not torch.compiler.is_compiling():
        runs = (mask[:, 1:] > mask[:, :-1]).sum(-1) + mask[:, 0]  # where real tokens start
        if bool((runs <= 1).all()):
            return None
    return mask.cumsum(-1)


def query_columns(per_token: torch.Tensor, past: int | torch.Tensor, q_len: int) -> torch.Tensor:
    """The columns of a (batch, tokens so far) tensor (a 2D mask, or a static cache's mask over all its slots)
    that belong to this forward's q_len tokens: tokens past .. past + q_len - 1 (`past` a tensor with a static
    cache, so that a compiled decoding step is one graph)."""
    if isinstance(past, int) and per_token.shape[-1] == past + q_len:
        return per_token[:, past:]
    return per_token.index_select(1, torch.arange(q_len, device=per_token.device) + past)


def owns_kernel(config: TwinLMConfig) -> bool:
    """Whether attention runs twinlm's own eager/SDPA code (not a function registered in transformers'
    AttentionInterface, e.g. flash, flex or a user's)."""
    return config._attn_implementation in OWN_IMPLEMENTATIONS


def check_tensor_parallel(model: nn.Module, size: int) -> None:
    """Tensor parallelism splits the attention heads across `size` ranks: refuse, by name, what needs every head
    on one rank (a scoring with parameters of its own, per head; a position bias the width of all heads) or heads
    that do not split evenly."""
    config, needs = model.config, []
    if any(
        any(True for _ in module.scoring.parameters())
        for module in model.modules()
        if isinstance(module, TwinLMAttention)
    ):
        needs.append(f"attention_scoring={config.attention_scoring!r} (parameters of its own per head)")
    if config.position_encoding.biases_attention:
        needs.append(f"position_embedding_type={config.position_embedding_type!r} (a bias over all heads)")
    uneven = [
        field for field in ("num_attention_heads", "num_key_value_heads") if getattr(config, field) % size
    ]
    needs += [f"{field}={getattr(config, field)} (not a multiple of {size})" for field in uneven]
    if needs:
        hint = " or a tp_size that divides the head counts" if uneven else ""
        raise ValueError(
            f"tensor parallelism over {size} ranks cannot split {', '.join(needs)}; load this model without a "
            f"tp_plan{hint}"
        )


def check_flash_attention(config: TwinLMConfig, output_attentions: bool) -> None:
    """Flash (and flex) kernels compute softmax(q.k * scale) @ v with padding, causality, documents and a
    window, and nothing else here: refuse, by name, the switches that need more."""
    needs = []
    if config.attention_scoring == "additive":
        needs.append("attention_scoring='additive' (not a dot product)")
    if config.position_encoding.biases_attention:
        needs.append(f"position_embedding_type={config.position_embedding_type!r} (an attention bias)")
    if output_attentions:
        needs.append("output_attentions=True (these kernels return no weights)")
    if needs:
        raise ValueError(
            f"attn_implementation={config._attn_implementation!r} cannot compute {', '.join(needs)}; "
            "use attn_implementation='sdpa' or 'eager'"
        )


# ---------------------------------------------------------------------------------------------------
# Heads


class TwinLMForMaskedLM(TwinLMPreTrainedModel):
    """BERT-style masked-LM: a transform (dense, activation, norm) then a decoder tied to the embeddings.
    With factorised embeddings the transform maps hidden_size to embedding_size (ELECTRA's generator)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # the vocabulary split across ranks, the logits gathered

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        if config.is_causal:
            raise ValueError(
                "TwinLMForMaskedLM needs is_causal=False (a bidirectional encoder); use TwinLMForCausalLM"
            )
        self.model = TwinLMModel(config)
        self.head_dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.head_act = FEED_FORWARDS[config.hidden_act][1]()  # BERT: the model's activation
        self.head_norm = build_norm(config, size=config.embedding_size)
        self.lm_head = nn.Linear(config.embedding_size, config.vocab_size, bias=True)
        # transformers' ForMaskedLMLoss, without its float32 copy of the logits (see loss.py)
        self.loss_function = masked_lm_loss
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        """Loss as transformers' ForMaskedLMLoss (loss.py): honours num_items_in_batch (Trainer's gradient
        accumulation) and ignore_index (default -100)."""
        # Sparse prediction: the (vocabulary-sized) head, and the last block's queries, only where there is
        # something to predict; the logits come back as (num_masked, vocab), in the order of
        # `labels != ignore_index`.
        sparse = self.config.sparse_prediction and labels is not None and self.training
        selected = labels != kwargs.get("ignore_index", -100) if sparse else None
        # (recorded hidden states keep every token: their last one is last_hidden_state)
        keep = None if kwargs.get("output_hidden_states", self.config.output_hidden_states) else selected
        outputs = self.model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            tokens_to_keep=keep,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        token_mask = attention_mask.bool() if attention_mask is not None else None
        if sparse:
            hidden = hidden if keep is not None else hidden[selected]
            labels, token_mask = labels[selected], None
        logits = self.lm_head(self.head_norm(self.head_act(self.head_dense(hidden)), token_mask))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


@dataclass
class TwinLMForPreTrainingOutput(ModelOutput):
    """The discriminator's output: `logits` (batch, seq), one per token, > 0 where it says "replaced"."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class TwinLMDiscriminatorHead(nn.Module):
    """ELECTRA's discriminator head: dense, the model's activation, one logit per token."""

    def __init__(self, config: TwinLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = FEED_FORWARDS[config.hidden_act][1]()
        self.dense_prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_prediction(self.activation(self.dense(hidden))).squeeze(-1)


class TwinLMForPreTraining(TwinLMPreTrainedModel):
    """ELECTRA's discriminator (replaced-token detection, Clark et al. 2020; transformers'
    ElectraForPreTraining): for every token, was it replaced by a generator's sample? Its body is an
    ordinary encoder: the other heads (sequence and token classification) load it for fine-tuning."""

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        if config.is_causal:
            raise ValueError(
                "TwinLMForPreTraining needs is_causal=False (a bidirectional encoder): replaced-token "
                "detection looks at both sides of every token"
            )
        self.model = TwinLMModel(config)
        self.discriminator_predictions = TwinLMDiscriminatorHead(config)
        self.loss_function = replaced_token_loss
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> TwinLMForPreTrainingOutput:
        """`labels` (batch, seq): 1 replaced, 0 original, -100 ignored (padding is ignored too). The loss is the
        binary cross-entropy averaged over the labelled tokens, or their sum / num_items_in_batch."""
        outputs = self.model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
        logits = self.discriminator_predictions(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, attention_mask, **kwargs)
        return TwinLMForPreTrainingOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class TwinLMForCausalLM(TwinLMPreTrainedModel, GenerationMixin):
    """GPT-style language model: next-token prediction, KV-cached generation."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        if not config.is_causal:
            raise ValueError(
                "TwinLMForCausalLM needs is_causal=True (a causal decoder); use TwinLMForMaskedLM"
            )
        self.model = TwinLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # transformers' ForCausalLMLoss, without its float32 copy of the logits (see loss.py)
        self.loss_function = causal_lm_loss
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """Position t predicts token t+1. Loss as transformers' ForCausalLMLoss (loss.py): it shifts `labels`
        (or takes `shift_labels` as given, as context parallelism sends them) and honours
        num_items_in_batch and ignore_index."""
        outputs = self.model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def create_masks_for_generate(
        self, attention_mask: torch.Tensor | None = None, cache: Cache | None = None, **kwargs
    ) -> torch.Tensor | None:
        """generate() turns the 2D padding mask into transformers' 4D mask for compilable (static) caches;
        twinlm builds its own (windows, documents, position biases) from the 2D mask and the cache's sizes, and
        takes the 2D mask padded to the static cache's length (its slots past the tokens so far count as real:
        causality hides them), so that every compiled decoding step sees the same shapes instead of a mask one
        column longer each step (a recompilation per token)."""
        if attention_mask is None or cache is None or not cache.is_compileable:
            return attention_mask
        missing = cache.get_max_length() - attention_mask.shape[-1]
        return F.pad(attention_mask, (0, missing), value=1) if missing > 0 else attention_mask


# transformers' generate() inspects a remote-code model's forward signature at every decoding step; through
# the decorators' wrappers that costs more than the rest of a small model's step. Computed once here instead.
TwinLMForCausalLM.forward.__signature__ = inspect.signature(TwinLMForCausalLM.forward)


class TwinLMPooler(nn.Module):
    """One vector per sequence: the first real token (BERT's [CLS]), the mean of real tokens, or the last real
    token (GPT-style: the only one that has seen the whole input); then dense + tanh as in BERT."""

    def __init__(self, config: TwinLMConfig):
        super().__init__()
        self.pooling = config.classifier_pooling
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = attention_mask.to(hidden.dtype)
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pooling == "cls":  # the first real token: [CLS] in BERT, whichever side the padding is on
            pooled = hidden[batch, attention_mask.long().argmax(-1)]
        elif self.pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        else:  # "last": the right-most real token, whichever side the padding is on
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            pooled = hidden[batch, (positions * attention_mask.long()).argmax(-1)]
        return self.activation(self.dense(pooled))


class TwinLMClassifier(TwinLMPreTrainedModel):
    """What the classification heads share: the stack, dropout and a linear classifier over
    `features()` (one vector per sequence, or per token)."""

    output_class: type = SequenceClassifierOutput

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = TwinLMModel(config)
        dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = TwinLMDropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def features(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput | TokenClassifierOutput:
        outputs = self.model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
        pool_mask = attention_mask
        if pool_mask is None and input_ids is not None and self.config.pad_token_id is not None:
            # no mask: padding told by its id, as transformers' causal classifiers find the last non-pad token
            pool_mask = (input_ids != self.config.pad_token_id).long()
        logits = self.classifier(self.dropout(self.features(outputs.last_hidden_state, pool_mask)))
        return self.output_class(
            loss=self.compute_loss(logits, labels, **kwargs) if labels is not None else None,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class TwinLMForSequenceClassification(TwinLMClassifier):
    """One label per sequence (or pair), from the pooled sequence vector."""

    output_class = SequenceClassifierOutput

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        self.pooler = TwinLMPooler(config)
        self.post_init()

    def features(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.pooler(hidden, attention_mask)

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """transformers' ForSequenceClassificationLoss (problem_type: regression, single- or multi-label).
        Its cross-entropy honours num_items_in_batch; its MSE and BCE are a mean per call, which gradient
        accumulation would add up: with num_items_in_batch they become sum / num_items_in_batch here too."""
        loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config, **kwargs)
        num_items = kwargs.get("num_items_in_batch")
        if num_items is not None and self.config.problem_type != "single_label_classification":
            loss = loss * labels.numel() / num_items
        return loss


class TwinLMForTokenClassification(TwinLMClassifier):
    """One label per token (-100 labels are ignored, e.g. non-first sub-tokens)."""

    output_class = TokenClassifierOutput

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        self.post_init()

    def features(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return hidden

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """transformers' ForTokenClassification loss: ignore_index (-100, e.g. non-first sub-tokens) and
        num_items_in_batch honoured."""
        return self.loss_function(logits, labels, self.config, **kwargs)


__all__ = [
    "TwinLMPreTrainedModel",
    "TwinLMModel",
    "TwinLMForMaskedLM",
    "TwinLMForCausalLM",
    "TwinLMForPreTraining",
    "TwinLMForSequenceClassification",
    "TwinLMForTokenClassification",
]
