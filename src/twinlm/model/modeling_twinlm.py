"""The twinlm model, read top to bottom like the paper: embeddings -> attention -> feed-forward ->
block -> stack -> heads.

One architecture, two variants: `config.is_causal=False` is a BERT-style bidirectional encoder trained
with masked-LM, `True` a GPT-style decoder trained on the next token. Every design switch picks a
component from a table when the model is built (see positions.py, attention.py, layers.py), so the
forward passes below contain no `if config.x == ...` chains.

This folder ships to the Hub as remote code: it imports only torch, transformers and its siblings.
"""

import math

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
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import is_flash_attention_requested

from .attention import AdditiveScoring, AttentionMask, TwinLMAttention
from .configuration_twinlm import ABSOLUTE_POSITIONS, TwinLMConfig
from .layers import FEED_FORWARDS, TwinLMBatchNorm, TwinLMRMSNorm, build_feed_forward, build_norm
from .positions import POSITION_ENCODINGS

# ---------------------------------------------------------------------------------------------------
# Embeddings


class TwinLMEmbeddings(nn.Module):
    """Token (+ segment) (+ absolute position) embeddings, then optional norm and dropout."""

    def __init__(self, config: TwinLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        # The 2017 paper multiplies token embeddings by sqrt(d_model) so that they are not drowned by
        # the (unit-scale) sinusoids.
        self.scale = math.sqrt(config.hidden_size) if config.scale_embeddings else 1.0
        self.norm = build_norm(config, enabled=config.embedding_norm)
        self.dropout = nn.Dropout(config.embedding_dropout_prob)

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
# Blocks: attention and feed-forward sub-layers, each wrapped in a residual connection and a norm.
# Post-norm (2017, BERT): x = norm(x + sublayer(x)).  Pre-norm (GPT-2 on): x = x + sublayer(norm(x)).


class TwinLMLayer(GradientCheckpointingLayer):
    def __init__(self, config: TwinLMConfig, layer_idx: int):
        super().__init__()
        self.attention = TwinLMAttention(config, layer_idx)
        self.mlp = build_feed_forward(config)
        self.attention_norm = build_norm(config)
        self.mlp_norm = build_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class TwinLMPostNormLayer(TwinLMLayer):
    def forward(self, hidden, token_mask, mask, rotary, cache=None, output_attentions=False):
        attended, weights = self.attention(hidden, mask, rotary, cache, output_attentions)
        hidden = self.attention_norm(hidden + self.dropout(attended), token_mask)
        hidden = self.mlp_norm(hidden + self.dropout(self.mlp(hidden)), token_mask)
        return hidden, weights


class TwinLMPreNormLayer(TwinLMLayer):
    def forward(self, hidden, token_mask, mask, rotary, cache=None, output_attentions=False):
        attended, weights = self.attention(
            self.attention_norm(hidden, token_mask), mask, rotary, cache, output_attentions
        )
        hidden = hidden + self.dropout(attended)
        hidden = hidden + self.dropout(self.mlp(self.mlp_norm(hidden, token_mask)))
        return hidden, weights


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

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, the identity for norms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
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
        self.positions = POSITION_ENCODINGS[config.position_embedding_type](config)
        self.embeddings = TwinLMEmbeddings(config)
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
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        use_cache = (
            config.is_causal
            and not self.training
            and (use_cache if use_cache is not None else config.use_cache)
        )
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None

        batch, q_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        past = cache.get_seq_length() if cache is not None else 0
        k_len = past + q_len
        if config.position_embedding_type in ABSOLUTE_POSITIONS and k_len > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {k_len} exceeds max_position_embeddings={config.max_position_embeddings} "
                f"of this model's {config.position_embedding_type} positions; use shorter inputs (or a model "
                "with rope/alibi/relative positions, which have no such limit)"
            )
        if attention_mask is not None and attention_mask.shape[-1] != k_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the input (with cache) has {k_len}"
            )

        # Packed batches: explicit position_ids that restart at 0 start a new document.
        documents = position_ids is not None and past == 0 and q_len > 1
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past, k_len, device=device).expand(batch, -1)
        token_mask = attention_mask[:, -q_len:].bool() if attention_mask is not None else None

        mask = self._attention_mask(
            attention_mask, position_ids if documents else None, q_len, k_len, device, output_attentions
        )
        rotary = self.positions.rotary(position_ids)
        hidden = self.embeddings(
            input_ids, inputs_embeds, token_type_ids, self.positions.absolute(position_ids), token_mask
        )

        all_hidden, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden, weights = layer(
                hidden, token_mask, mask, rotary, cache=cache, output_attentions=output_attentions
            )
            if output_attentions:
                all_attentions.append(weights)
        hidden = self.final_norm(hidden, token_mask)
        if output_hidden_states:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )

    def _attention_mask(
        self,
        attention_mask: torch.Tensor | None,
        document_positions: torch.Tensor | None,
        q_len: int,
        k_len: int,
        device: torch.device,
        output_attentions: bool,
    ) -> AttentionMask:
        """Fold padding, causality, the sliding window, document boundaries and position biases into
        one additive bias of shape (batch or 1, heads or 1, q_len, k_len); -inf where attention is
        forbidden. No bias (with is_causal) when nothing but plain causality applies: the fast path.
        Flash kernels take no bias: they get the padding mask and packed position ids instead.
        """
        config = self.config
        if is_flash_attention_requested(config):
            check_flash_attention(config, output_attentions)
            # transformers' flash path takes padding (un-padding) or packed documents (variable-length
            # rows), not both: with a padding mask (generate() passes both, and then the documents are
            # the padding's), padding wins.
            return AttentionMask(
                flash=True,
                is_causal=config.is_causal,
                padding_mask=attention_mask,
                packed_position_ids=document_positions if attention_mask is None else None,
            )
        position_bias = self.positions.attention_bias(q_len, k_len, device)
        plain = attention_mask is None and document_positions is None and config.sliding_window is None
        # Without a mask: a causal query block that is the whole sequence is SDPA's is_causal, and a
        # single new token with a cache may see every key. Several new tokens after a cache need the
        # explicit (bottom-right aligned) mask: SDPA's is_causal aligns top-left.
        if plain and position_bias is None and (not config.is_causal or q_len == 1 or q_len == k_len):
            return AttentionMask(is_causal=config.is_causal and q_len > 1)

        q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        k_idx = torch.arange(k_len, device=device)[None, :]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        if config.is_causal:
            allowed &= k_idx <= q_idx
        if config.sliding_window is not None:
            # causal: the current and sliding_window - 1 previous tokens; bidirectional: sliding_window // 2
            # tokens on each side.
            distance = q_idx - k_idx
            allowed &= (
                distance < config.sliding_window
                if config.is_causal
                else distance.abs() <= config.sliding_window // 2
            )
        allowed = allowed[None, None]  # (1, 1, q, k)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        if document_positions is not None:
            document = (document_positions == 0).long().cumsum(-1)  # (batch, seq): a new id at each restart
            allowed = allowed & (document[:, :, None] == document[:, None, :])[:, None]
        # Every query may see itself: padding queries get a harmless row instead of NaNs from an
        # all -inf softmax (their outputs are never used).
        allowed = allowed | (q_idx == k_idx)
        dtype = torch.float32
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
        if position_bias is not None:
            bias = bias + position_bias.to(dtype)
        return AttentionMask(bias=bias)


def check_flash_attention(config: TwinLMConfig, output_attentions: bool) -> None:
    """Flash kernels compute softmax(q.k * scale) @ v with padding, causality, documents and a window,
    and nothing else: refuse, by name, the switches that need more."""
    needs = []
    if config.attention_scoring == "additive":
        needs.append("attention_scoring='additive' (not a dot product)")
    if config.position_embedding_type in ("relative", "alibi"):
        needs.append(f"position_embedding_type={config.position_embedding_type!r} (an attention bias)")
    if output_attentions:
        needs.append("output_attentions=True (flash kernels return no weights)")
    if needs:
        raise ValueError(
            f"attn_implementation={config._attn_implementation!r} cannot compute {', '.join(needs)}; "
            "use attn_implementation='sdpa' or 'eager'"
        )


# ---------------------------------------------------------------------------------------------------
# Heads


class TwinLMForMaskedLM(TwinLMPreTrainedModel):
    """BERT-style masked-LM: a transform (dense, activation, norm) then a decoder tied to the embeddings."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        if config.is_causal:
            raise ValueError(
                "TwinLMForMaskedLM needs is_causal=False (a bidirectional encoder); use TwinLMForCausalLM"
            )
        self.model = TwinLMModel(config)
        self.head_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.head_act = FEED_FORWARDS[config.hidden_act][1]()  # BERT: the model's activation
        self.head_norm = build_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        outputs = self.model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        token_mask = attention_mask.bool() if attention_mask is not None else None
        if self.config.sparse_prediction and labels is not None and self.training:
            # Run the (vocabulary-sized) head only where there is something to predict: the logits
            # come back as (num_masked, vocab), in the order of `labels != -100`.
            selected = labels != -100
            hidden, labels, token_mask = hidden[selected], labels[selected], None
        logits = self.lm_head(self.head_norm(self.head_act(self.head_dense(hidden)), token_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
            )
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class TwinLMForCausalLM(TwinLMPreTrainedModel, GenerationMixin):
    """GPT-style language model: next-token prediction, KV-cached generation."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        if not config.is_causal:
            raise ValueError(
                "TwinLMForCausalLM needs is_causal=True (a causal decoder); use TwinLMForMaskedLM"
            )
        self.model = TwinLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:  # generation needs only the last position's logits
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Position t predicts token t+1 (labels are the inputs, shifted here, as in transformers).
            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


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
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def features(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.classifier(self.dropout(self.features(outputs.last_hidden_state, attention_mask)))
        return self.output_class(
            loss=self.loss(logits, labels) if labels is not None else None,
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

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' problem_type convention: regression, single- or multi-label classification."""
        config = self.config
        if config.problem_type is None:
            if config.num_labels == 1:
                config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        if config.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
        if config.problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return F.cross_entropy(logits.float().view(-1, config.num_labels), labels.view(-1))


class TwinLMForTokenClassification(TwinLMClassifier):
    """One label per token (-100 labels are ignored, e.g. non-first sub-tokens)."""

    output_class = TokenClassifierOutput

    def __init__(self, config: TwinLMConfig):
        super().__init__(config)
        self.post_init()

    def features(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return hidden

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1), ignore_index=-100)


__all__ = [
    "TwinLMPreTrainedModel",
    "TwinLMModel",
    "TwinLMForMaskedLM",
    "TwinLMForCausalLM",
    "TwinLMForSequenceClassification",
    "TwinLMForTokenClassification",
]
