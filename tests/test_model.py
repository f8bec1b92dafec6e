"""The model: every switch in both variants, masking semantics, caching, saving and Auto classes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from huggingface_hub.errors import StrictDataclassFieldValidationError

import twinlm
from twinlm import (
    TwinLMConfig,
    TwinLMForCausalLM,
    TwinLMForMaskedLM,
    TwinLMForSequenceClassification,
    TwinLMForTokenClassification,
    TwinLMModel,
)
from twinlm.model.configuration_twinlm import CHOICES

# Every value of every switch. Each case builds a tiny model in both variants.
# (classifier_pooling is a head switch: the classification-head tests cover each of its values.)
SWITCH_VALUES: list[tuple[str, object]] = [
    (field, value) for field, values in CHOICES.items() if field != "classifier_pooling" for value in values
]
SWITCH_VALUES += [
    ("sliding_window", 3),
    ("share_qk", True),
    ("scale_embeddings", True),
    ("embedding_norm", True),
    ("embedding_norm", False),
    ("num_key_value_heads", 2),
    ("num_key_value_heads", 1),
    ("tie_word_embeddings", False),
    ("type_vocab_size", 0),
    ("attention_bias", False),
    ("mlp_bias", False),
    ("activation_dropout_prob", 0.1),
    ("sparse_prediction", True),
    ("use_residual", False),
    ("conv_kernel_size", 3),
]
POSITIONS = CHOICES["position_embedding_type"]


def lm_class(causal: bool):
    return TwinLMForCausalLM if causal else TwinLMForMaskedLM


def seeded_model(causal: bool, **overrides):
    torch.manual_seed(0)
    config = tiny_config(is_causal=causal, **overrides)
    return lm_class(causal)(config)


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
@pytest.mark.parametrize("field,value", SWITCH_VALUES, ids=[f"{f}={v}" for f, v in SWITCH_VALUES])
def test_every_switch_trains(field, value, causal):
    """Forward and backward: a finite loss and a gradient on every trainable parameter."""
    overrides = {field: value}
    model = seeded_model(causal, **overrides).train()
    torch.manual_seed(1)
    ids = torch.randint(5, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # some padding
    labels = ids.clone()
    if not causal:
        labels[torch.rand(labels.shape) > 0.3] = -100
        labels[:, 0] = ids[:, 0]  # at least one target per row
    labels[mask == 0] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss), out.loss
    out.loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"no gradient for {missing}"
    if field == "sparse_prediction" and not causal:
        assert out.logits.shape == (int((labels != -100).sum()), 97)


def test_sparse_prediction_matches_dense_loss():
    dense = seeded_model(False).train()
    sparse = seeded_model(False, sparse_prediction=True).train()
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(5, 97, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    torch.testing.assert_close(dense(ids, labels=labels).loss, sparse(ids, labels=labels).loss)


# ---------------------------------------------------------------------------------------------------
# Masking semantics (eval mode; batch norm then uses its running statistics)


@pytest.mark.parametrize("norm_type", ["layernorm", "batchnorm"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_padding_does_not_change_real_positions(causal, position, norm_type):
    model = seeded_model(causal, position_embedding_type=position, norm_type=norm_type).eval()
    ids = torch.randint(5, 97, (1, 8))
    alone = model(ids).logits
    pad = torch.zeros(1, 5, dtype=torch.long)
    # causal models are padded on the left (as for generation), encoders on the right
    padded = torch.cat([pad, ids], 1) if causal else torch.cat([ids, pad], 1)
    mask = (padded != 0).long()
    logits = model(padded, attention_mask=mask).logits
    real = logits[:, 5:] if causal else logits[:, :8]
    torch.testing.assert_close(real, alone, atol=1e-5, rtol=1e-4)


def test_batchnorm_statistics_ignore_padding_in_training():
    model = seeded_model(False, norm_type="batchnorm").train()
    ids = torch.randint(5, 97, (2, 8))
    alone = model.model(ids).last_hidden_state
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], 1)
    out = model.model(padded, attention_mask=(padded != 0).long()).last_hidden_state
    torch.testing.assert_close(out[:, :8], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", POSITIONS)
def test_future_tokens_do_not_leak_in_causal_variant(position):
    model = seeded_model(True, position_embedding_type=position).eval()
    ids = torch.randint(5, 97, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(5, 97, (2, 4))
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_encoder_is_bidirectional():
    model = seeded_model(False).eval()
    ids = torch.randint(5, 97, (1, 10))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1 - 5) % 92 + 5
    assert not torch.allclose(model(ids).logits[:, 0], model(changed).logits[:, 0])


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_packed_documents_do_not_see_each_other(causal, position):
    model = seeded_model(causal, position_embedding_type=position).eval()
    doc_a, doc_b = torch.randint(5, 97, (1, 7)), torch.randint(5, 97, (1, 5))
    packed = torch.cat([doc_a, doc_b], 1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    out = model(packed, position_ids=position_ids).logits
    torch.testing.assert_close(out[:, :7], model(doc_a).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, 7:], model(doc_b).logits, atol=1e-5, rtol=1e-4)


def test_masks_that_change_nothing_take_sdpa_is_causal(monkeypatch):
    """An all-ones padding mask (generate(), collators) and position ids with no second document build no
    bias: SDPA runs its is_causal path, with the same logits; real padding and real documents still mask."""
    from twinlm.model import attention

    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        mask = kwargs["attn_mask"]
        assert mask is None or mask.dtype == torch.bool  # no dense float bias without position biases
        calls.append((mask is None, kwargs["is_causal"]))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    model = seeded_model(True, position_embedding_type="rope").eval()
    ids = torch.randint(5, 97, (2, 9))
    plain = model(ids, use_cache=False).logits
    calls.clear()
    ones, arange = torch.ones_like(ids), torch.arange(9).expand(2, -1)
    trivial = model(ids, attention_mask=ones, position_ids=arange, use_cache=False).logits
    assert calls == [(True, True)] * model.config.num_hidden_layers
    torch.testing.assert_close(trivial, plain)
    calls.clear()
    packed = torch.cat([torch.arange(4), torch.arange(5)]).expand(2, -1)
    documents = model(ids, attention_mask=ones, position_ids=packed, use_cache=False).logits
    assert calls[0] == (False, False)
    torch.testing.assert_close(documents[:, 4:], model(ids[:, 4:], use_cache=False).logits)
    calls.clear()
    padded = ones.clone()
    padded[0, :2] = 0
    model(ids, attention_mask=padded, use_cache=False)
    assert calls[0] == (False, False)


def test_generate_sees_the_forward_signature():
    """forward's signature is computed once (generate() inspects it every step) and is the real one."""
    import inspect

    forward = TwinLMForCausalLM.forward
    assert forward.__signature__ == inspect.signature(inspect.unwrap(forward))
    assert "logits_to_keep" in inspect.signature(seeded_model(True).forward).parameters


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_sliding_window_limits_what_a_position_sees(causal):
    window = 4
    model = seeded_model(causal, sliding_window=window, num_hidden_layers=1).eval()
    ids = torch.randint(5, 97, (1, 16))
    out = model(ids, output_attentions=True)
    weights = out.attentions[0][0]  # (heads, q, k)
    q = torch.arange(16)[:, None]
    k = torch.arange(16)[None, :]
    outside = (q - k >= window) | (k > q) if causal else (q - k).abs() > window // 2
    assert weights[:, outside].abs().max() == 0
    assert (weights[:, ~outside] > 0).all()
    # and the outputs agree: changing a token outside every window of position 12 leaves it unchanged
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1 - 5) % 92 + 5
    torch.testing.assert_close(model(changed).logits[:, 12], out.logits[:, 12])
    assert not torch.allclose(model(changed).logits[:, 3], out.logits[:, 3])


@pytest.mark.parametrize(
    "scoring,kv_heads,positions",
    [("scaled_dot", 4, "alibi"), ("dot", 4, "alibi"), ("scaled_dot", 2, "alibi"), ("scaled_dot", 1, "rope")],
)
def test_sdpa_and_eager_agree(scoring, kv_heads, positions):
    """Also grouped-query attention, which SDPA runs without repeating keys and values (enable_gqa)."""
    torch.manual_seed(0)
    config = tiny_config(
        is_causal=True,
        attention_scoring=scoring,
        position_embedding_type=positions,
        num_key_value_heads=kv_heads,
    )
    model = TwinLMForCausalLM(config).eval()
    ids = torch.randint(5, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    config._attn_implementation = "sdpa"
    a = model(ids, attention_mask=mask).logits
    config._attn_implementation = "eager"
    b = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[1, 3:], b[1, 3:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)
    unmasked = {}
    for implementation in ("sdpa", "eager"):  # without padding: no bias at all with rope (is_causal)
        config._attn_implementation = implementation
        unmasked[implementation] = model(ids).logits
    torch.testing.assert_close(unmasked["sdpa"], unmasked["eager"], atol=1e-5, rtol=1e-4)


def test_output_attentions_and_hidden_states():
    model = seeded_model(False).eval()
    out = model(torch.randint(5, 97, (2, 6)), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 6, 6)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 6))
    assert len(out.hidden_states) == 3


# ---------------------------------------------------------------------------------------------------
# Generation with the KV cache


GENERATION_CASES = [dict(position_embedding_type=p) for p in POSITIONS] + [
    dict(sliding_window=3),
    dict(sliding_window=3, global_attention_every_n_layers=2, local_rope_theta=100.0),
    dict(attention_scoring="linear", position_embedding_type="rope"),
    dict(num_key_value_heads=2),
    dict(share_qk=True),
    dict(attention_scoring="additive"),
    dict(norm_type="batchnorm"),
    dict(use_residual=False),
    dict(use_residual=False, norm_position="post"),
    dict(conv_kernel_size=4),
    dict(conv_kernel_size=3, norm_position="post", use_residual=False, norm_type="batchnorm"),
    dict(conv_kernel_size=1, sliding_window=3),
]


@pytest.mark.parametrize(
    "overrides", GENERATION_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in GENERATION_CASES]
)
def test_greedy_generate_with_cache_equals_without(overrides):
    model = seeded_model(True, **overrides).eval()
    prompt = torch.randint(5, 97, (2, 5))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 17)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("position", POSITIONS)
def test_several_new_tokens_after_a_cache_see_no_future(position):
    """Continuing a cached prompt with a chunk of tokens (no attention_mask) equals one full pass."""
    model = seeded_model(True, position_embedding_type=position).eval()
    ids = torch.randint(5, 97, (2, 9))
    first = model(ids[:, :5], use_cache=True)
    rest = model(ids[:, 5:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(rest.logits, model(ids).logits[:, 5:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padded_batch_generates_like_single_prompts(position):
    model = seeded_model(True, position_embedding_type=position).eval()
    long, short = torch.randint(5, 97, (1, 6)), torch.randint(5, 97, (1, 3))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = (batch != 0).long()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    assert torch.equal(together[0:1, 6:], model.generate(long, **kwargs)[:, 6:])
    assert torch.equal(together[1:2, 6:], model.generate(short, **kwargs)[:, 3:])


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_generation_past_absolute_positions_is_a_clear_error(position):
    model = seeded_model(True, position_embedding_type=position, max_position_embeddings=8).eval()
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model.generate(torch.randint(5, 97, (1, 5)), max_new_tokens=10, do_sample=False, pad_token_id=0)


def test_rope_generates_past_max_position_embeddings():
    model = seeded_model(True, position_embedding_type="rope", max_position_embeddings=8).eval()
    out = model.generate(torch.randint(5, 97, (1, 5)), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 15)


# ---------------------------------------------------------------------------------------------------
# Heads, tying, checkpointing


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_sequence_classification_heads(causal, pooling):
    torch.manual_seed(0)
    config = tiny_config(is_causal=causal, classifier_pooling=pooling, num_labels=3)
    model = TwinLMForSequenceClassification(config).eval()
    ids = torch.randint(5, 97, (2, 7))
    out = model(ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    # padding does not change the prediction (last-token pooling finds the last real token)
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    if causal:
        padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    again = model(padded, attention_mask=(padded != 0).long()).logits
    torch.testing.assert_close(again, out.logits, atol=1e-5, rtol=1e-4)


def test_a_causal_classifier_without_a_mask_pools_the_last_token_that_is_not_padding():
    """No attention_mask: padding is told by pad_token_id (as transformers' GPT-2 classifier does), so last-token
    pooling of right-padded rows is that of the unpadded rows (it pooled the last pad)."""
    torch.manual_seed(0)
    config = tiny_config(is_causal=True, classifier_pooling="last", num_labels=2, pad_token_id=0)
    model = TwinLMForSequenceClassification(config).eval()
    ids = torch.randint(5, 97, (2, 7))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


def test_generate_in_train_mode_uses_its_cache():
    """generate() mid-training (model.train(), dropout 0) passes a cache; the model dropped it in train mode
    and predicted each new token from the last one alone, at position 0. A cache passed in is kept and filled."""
    from transformers import DynamicCache

    model = seeded_model(
        True, position_embedding_type="rope", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.train()
    ids = torch.randint(5, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :5], cache=cache, use_cache=True)
    assert out.cache is cache and cache.get_seq_length() == 5
    step = model(ids[:, 5:], cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, model(ids, use_cache=False).logits[:, -1], atol=1e-5, rtol=1e-4)
    assert model(ids, use_cache=True).cache is None  # no cache made in train mode when none is passed
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), model.eval().generate(ids, **kwargs))


def test_token_classification_head():
    torch.manual_seed(0)
    model = TwinLMForTokenClassification(tiny_config(num_labels=5))
    ids = torch.randint(5, 97, (2, 7))
    labels = torch.randint(0, 5, (2, 7))
    labels[:, 0] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 7, 5) and torch.isfinite(out.loss)


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_weight_tying(causal):
    model = seeded_model(causal)
    assert model.lm_head.weight is model.model.embeddings.word_embeddings.weight
    untied = seeded_model(causal, tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embeddings.word_embeddings.weight


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_batchnorm_statistics_update_once_per_step_under_checkpointing(reentrant):
    ids = torch.randint(5, 97, (2, 8))
    stats = []
    for checkpointing in (False, True):
        model = seeded_model(True, norm_type="batchnorm").train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        model(ids, labels=ids).loss.backward()
        stats.append([layer.attention_norm.running_mean.clone() for layer in model.model.layers])
    assert not torch.equal(stats[0][0], torch.zeros_like(stats[0][0]))  # the statistics did move
    for checkpointed, plain in zip(stats[1], stats[0], strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_config_takes_whole_numbers_for_float_fields():
    config = tiny_config(hidden_dropout_prob=0, rope_theta=500000, layer_norm_eps=1)  # as YAML writes them
    assert config.hidden_dropout_prob == 0 and config.rope_theta == 500000


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(5, 97, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = seeded_model(True).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------------
# Dropout on CPU: layers.dropout draws its mask 16 bits at a time, and with attention dropout the softmax
# is written out (SDPA would take its math path with torch's slower mask).


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_drops_the_share_asked_for_and_rescales_exactly(p):
    from twinlm.model.layers import DROP_LEVELS, dropout

    torch.manual_seed(0)
    x = torch.ones(1_000_000, requires_grad=True)
    y = dropout(x, p)
    kept = y != 0
    assert abs((1 - kept.float().mean().item()) - p) < 3e-3  # 1e6 draws: the share's std is <= 5e-4
    levels = round(p * DROP_LEVELS)
    assert torch.all(y[kept] == DROP_LEVELS / (DROP_LEVELS - levels))  # expectation exactly x
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the backward pass uses the forward's mask
    # Four mask elements come from each 64-bit draw: no position within the four may drop more often.
    columns = (dropout(torch.ones(4_000_000), p).view(-1, 4) == 0).float().mean(0)
    assert torch.all((columns - p).abs() < 3e-3), columns


def test_cpu_dropout_follows_the_seed_and_keeps_shape_and_dtype():
    from twinlm.model.layers import TwinLMDropout, dropout

    x = torch.randn(3, 5, 7, dtype=torch.bfloat16).transpose(0, 1)  # not contiguous
    masks = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        y = dropout(x, 0.3)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        masks.append(y != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    assert torch.all(dropout(x, 1.0) == 0)
    module = TwinLMDropout(0.3)
    assert isinstance(module, torch.nn.Dropout) and module.eval()(x) is x


def test_gradient_checkpointing_replays_the_cpu_dropout_masks():
    ids = torch.randint(5, 97, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = seeded_model(
            True, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, embedding_dropout_prob=0.2
        ).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(5)
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_dropped_attention_weights_have_the_gradients_of_autograd():
    """dropout(weights) @ value recomputes the dropped weights in its backward pass instead of saving them."""
    from twinlm.model.attention import _DroppedWeightsTimesValue

    torch.manual_seed(0)
    weights = torch.rand(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 3, 5, 5) > 0.3
    torch.autograd.gradcheck(
        lambda w, v: _DroppedWeightsTimesValue.apply(w, v, keep, 1 / 0.7), (weights, value)
    )


def test_a_bf16_autocast_step_with_cpu_dropout_gives_finite_gradients():
    model = seeded_model(True, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    ids = torch.randint(5, 97, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == sum(p.requires_grad for p in model.parameters())
    assert all(torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].attention.v_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "causal,inputs", [(False, "padded"), (True, "padded"), (True, "packed")], ids=["mlm", "clm", "clm-packed"]
)
def test_attention_written_out_for_cpu_dropout_matches_sdpa(monkeypatch, causal, inputs):
    """With attention dropout the model computes the softmax itself on CPU: with the dropout made the
    identity, it gives SDPA's outputs (padding, packed documents, grouped-query heads)."""
    from twinlm.model import attention

    model = seeded_model(causal, attention_probs_dropout_prob=0.1, num_key_value_heads=2)
    ids = torch.randint(5, 97, (2, 10))
    kwargs, real = {}, torch.ones(2, 10, dtype=torch.bool)
    if inputs == "padded":
        real[1, 6:] = False
        kwargs["attention_mask"] = real.long()
    else:
        kwargs["position_ids"] = torch.tensor([list(range(4)) + list(range(6)), list(range(10))])
    expected = model.eval()(ids, **kwargs).logits  # no dropout: SDPA
    calls = []
    keep_all = lambda w, p, dtype: calls.append(p) or (torch.ones_like(w, dtype=dtype), 1.0)  # noqa: E731
    monkeypatch.setattr(attention, "dropout_mask", keep_all)
    written_out = model.train()(ids, **kwargs).logits
    assert calls == [0.1] * model.config.num_hidden_layers
    torch.testing.assert_close(written_out[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_bf16_cpu_training_writes_short_attention_out(monkeypatch, causal):
    """Training under bfloat16 autocast on a CPU, attention over at most CPU_WRITTEN_OUT_MAX_KEYS keys is the
    softmax written out (about twice as fast as SDPA's kernel there), with SDPA's outputs and gradients up to
    bfloat16 rounding; longer rows and inference (eval mode) keep SDPA."""
    from twinlm.model import attention

    sdpa_calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k)
    )
    model = seeded_model(causal, position_embedding_type="rope", num_key_value_heads=2).train()
    ids = torch.randint(5, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def step(limit):
        monkeypatch.setattr(attention, "CPU_WRITTEN_OUT_MAX_KEYS", limit)
        model.zero_grad()
        sdpa_calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.logits.float()[mask.bool()], grads, len(sdpa_calls)

    written, written_grads, written_calls = step(512)
    model.activation_checkpointing_enable(
        {"use_reentrant": True}
    )  # forward without gradients, then recomputed
    checkpointed = step(512)[1]  # the same path both times: the gradients up to the order of their sums
    assert (checkpointed - written_grads).abs().max() < 1e-3 * written_grads.abs().max()
    model.activation_checkpointing_disable()
    kernel, kernel_grads, kernel_calls = step(8)  # 12 keys > 8: SDPA
    assert written_calls == 0 and kernel_calls == model.config.num_hidden_layers
    torch.testing.assert_close(written, kernel, atol=2e-2, rtol=2e-2)
    assert (written_grads - kernel_grads).abs().max() < 0.05 * kernel_grads.abs().max()
    sdpa_calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(ids, attention_mask=mask)
    assert len(sdpa_calls) == model.config.num_hidden_layers  # inference keeps the kernel


# ---------------------------------------------------------------------------------------------------
# Sparse prediction: the last block computes only the masked tokens' queries (exact).

SPARSE_CASES = [
    {},
    {"norm_position": "pre"},
    {"position_embedding_type": "rope", "num_key_value_heads": 2},
    {"position_embedding_type": "alibi"},
    {"position_embedding_type": "relative"},
    {"position_embedding_type": "sinusoidal", "sliding_window": 3},
    {"attention_scoring": "additive", "share_qk": True},
    {"norm_type": "rmsnorm", "hidden_act": "swiglu", "attn_implementation": "eager"},
    {"use_residual": False},
    {"use_residual": False, "norm_position": "pre", "position_embedding_type": "rope"},
    {"use_residual": False, "sliding_window": 3, "position_embedding_type": "alibi"},
]


@pytest.mark.parametrize(
    "overrides", SPARSE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "base"
)
def test_sparse_prediction_computes_only_masked_queries_in_the_last_block(monkeypatch, overrides):
    from twinlm.model import modeling_twinlm

    implementation = overrides.pop("attn_implementation", None)
    torch.manual_seed(0)
    ids = torch.randint(5, 97, (3, 10))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 9:] = 0
    attention_mask[2, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4, 8]] = ids[0, [1, 4, 8]]  # rows with 3, 1 and 0 masked tokens
    labels[1, 6] = ids[1, 6]
    calls = []
    original = modeling_twinlm.TwinLMModel._can_skip_queries
    results = []
    for skip in (True, False):
        model = seeded_model(False, sparse_prediction=True, **overrides).train()
        if implementation:
            model.set_attn_implementation(implementation)
        monkeypatch.setattr(
            modeling_twinlm.TwinLMModel,
            "_can_skip_queries",
            lambda self, *a, skip=skip: calls.append(skip) or (skip and original(self, *a)),
        )
        out = model(ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits, out.loss, grads))
    assert calls == [True, False]
    (logits, loss, grads), (full_logits, full_loss, full_grads) = results
    assert logits.shape == (4, 97)
    torch.testing.assert_close(logits, full_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, full_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sparse_prediction_keeps_every_query_where_something_needs_them(monkeypatch):
    from twinlm.model import modeling_twinlm

    calls = []
    original = modeling_twinlm.TwinLMPostNormLayer.forward_queries
    monkeypatch.setattr(
        modeling_twinlm.TwinLMPostNormLayer,
        "forward_queries",
        lambda self, *a: calls.append(1) or original(self, *a),
    )
    ids = torch.randint(5, 97, (2, 8))
    labels = torch.where(torch.arange(8) % 3 == 0, ids, torch.full_like(ids, -100))
    model = seeded_model(False, sparse_prediction=True).train()
    model(ids, labels=labels)
    assert len(calls) == 1
    out = model(ids, labels=labels, output_hidden_states=True)
    assert len(calls) == 1 and out.hidden_states[-1].shape == (2, 8, 32)
    seeded_model(False, sparse_prediction=True, norm_type="batchnorm").train()(ids, labels=labels)
    model.eval()(ids, labels=labels)  # evaluation: every position's logits
    assert len(calls) == 1


def test_the_last_block_runs_through_its_call_with_hooks_and_checkpointing():
    """FSDP, Accelerate's offload and user hooks hang on the block's __call__: the query-skipping path keeps
    them (and gradient checkpointing gives the same gradients)."""
    ids = torch.randint(5, 97, (2, 8))
    labels = torch.where(torch.arange(8) % 3 == 0, ids, torch.full_like(ids, -100))
    grads = []
    for checkpointing in (False, True):
        model = seeded_model(False, sparse_prediction=True).train()
        seen = []
        model.model.layers[-1].register_forward_hook(
            lambda module, args, out, seen=seen: seen.append(out[0].shape)
        )
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=labels).loss.backward()
        assert seen == [(2, 3, 32)]  # the last block saw the (batch, kept) queries
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_tokens_to_keep_must_be_boolean():
    with pytest.raises(ValueError, match="bool tensor"):
        TwinLMModel(tiny_config())(
            torch.randint(5, 97, (2, 8)), tokens_to_keep=torch.ones(2, 8, dtype=torch.long)
        )


def test_cpu_dropout_under_torch_func_and_forward_ad():
    """The fast CPU dropout's autograd functions (public APIs only: setup_context, jvp, a generated vmap rule)
    serve torch.func.vjp/jvp/vmap and forward-mode AD: derivatives are the forward's own mask times the scale,
    vmap's randomness modes behave as with F.dropout."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp, vjp, vmap

    from twinlm.model.attention import _DroppedWeightsTimesValue
    from twinlm.model.layers import dropout

    x = torch.randn(64, 32) + 5  # no element is 0: kept elements are exactly the nonzero outputs
    out, pullback = vjp(lambda t: dropout(t, 0.5), x)
    (gradient,) = pullback(torch.ones_like(x))
    assert torch.equal(gradient, (out != 0).float() * 2)
    assert 0.4 < (out == 0).float().mean() < 0.6
    out, tangent = jvp(lambda t: dropout(t, 0.5), (x,), (torch.ones_like(x),))
    assert torch.equal(tangent, (out != 0).float() * 2)
    with fwAD.dual_level():
        dual = dropout(fwAD.make_dual(x, torch.ones_like(x)), 0.5)
        out, tangent = fwAD.unpack_dual(dual)
    assert torch.equal(tangent, (out != 0).float() * 2)
    rows = vmap(lambda t: dropout(t, 0.5), randomness="different")(x)
    assert rows.shape == x.shape and not torch.equal(rows[0] != 0, rows[1] != 0)  # a mask per example
    same = vmap(lambda t: dropout(t, 0.5), randomness="same")(x)
    assert torch.equal(same[0] != 0, same[1] != 0)
    with pytest.raises(RuntimeError, match="randomness"):  # as torch's own dropout under vmap
        vmap(lambda t: dropout(t, 0.5))(x)
    # dropout(weights) @ value: forward-mode AD equals the reverse-mode derivative
    torch.manual_seed(0)
    weights, value = torch.rand(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 4, dtype=torch.float64)
    keep = (torch.rand(2, 3, 5, 5) > 0.3).double()
    torch.autograd.gradcheck(
        lambda w, v: _DroppedWeightsTimesValue.apply(w, v, keep, 1 / 0.7),
        (weights.requires_grad_(), value.requires_grad_()),
        check_forward_ad=True,
        check_backward_ad=True,
    )


def test_model_outputs_and_class_names():
    model = TwinLMModel(tiny_config())
    out = model(torch.randint(5, 97, (2, 6)))
    assert out.last_hidden_state.shape == (2, 6, 32)
    assert set(twinlm.__all__) >= {
        "TwinLMConfig",
        "TwinLMModel",
        "TwinLMForMaskedLM",
        "TwinLMForCausalLM",
        "TwinLMForSequenceClassification",
        "TwinLMForTokenClassification",
    }


def test_causal_and_masked_classes_refuse_the_wrong_variant():
    with pytest.raises(ValueError, match="is_causal=True"):
        TwinLMForCausalLM(tiny_config(is_causal=False))
    with pytest.raises(ValueError, match="is_causal=False"):
        TwinLMForMaskedLM(tiny_config(is_causal=True))


# ---------------------------------------------------------------------------------------------------
# Config validation and presets


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(position_embedding_type="absolute"), "position_embedding_type"),
        (dict(norm_type="groupnorm"), "norm_type"),
        (dict(norm_position="middle"), "norm_position"),
        (dict(hidden_act="tanh"), "hidden_act"),
        (dict(attention_scoring="cosine"), "attention_scoring"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(share_qk=True, num_key_value_heads=2), "share_qk"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(hidden_size="big"), "hidden_size"),
        (dict(hiden_size=64), "did you mean 'hidden_size'"),
        (dict(position_embeding_type="rope"), "did you mean 'position_embedding_type'"),
        (dict(position_embedding_type="rope", hidden_size=36, num_attention_heads=4), "rope"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    # wrong types are caught by huggingface_hub's strict dataclass, wrong values by TwinLMConfig
    with pytest.raises((ValueError, TypeError, StrictDataclassFieldValidationError)) as info:
        tiny_config(**overrides)
    assert field in str(info.value)


def test_presets_load_and_build():
    names = TwinLMConfig.preset_names()
    expected = {"bert-base", "gpt2-small", "original-2017", "modern-encoder", "modern-decoder"}
    assert expected | {f"tiny-{n}" for n in expected} <= set(names)
    for name in names:
        config = TwinLMConfig.from_preset(name)
        if name.startswith("tiny-"):
            model = lm_class(config.is_causal)(config)
            assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert TwinLMConfig.from_preset("tiny-gpt2-small", vocab_size=500).vocab_size == 500
    bert = TwinLMConfig.from_preset("bert-base")
    assert (bert.hidden_size, bert.num_hidden_layers, bert.norm_position, bert.is_causal) == (
        768,
        12,
        "post",
        False,
    )
    gpt2 = TwinLMConfig.from_preset("gpt2-small")
    assert (gpt2.max_position_embeddings, gpt2.norm_position, gpt2.hidden_act, gpt2.is_causal) == (
        1024,
        "pre",
        "gelu_new",
        True,
    )


def test_preset_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown preset 'bert-huge'.*bert-base"):
        TwinLMConfig.from_preset("bert-huge")
    with pytest.raises(ValueError, match="hiden_size.*did you mean 'hidden_size'"):
        TwinLMConfig.from_preset("tiny-bert-base", hiden_size=12)


# ---------------------------------------------------------------------------------------------------
# Saving, Auto classes and remote code


def test_auto_classes_are_registered():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    values = {k: v for k, v in tiny_config(is_causal=True).to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("twinlm", **values)
    assert isinstance(config, TwinLMConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), TwinLMForCausalLM)
    assert isinstance(AutoModelForMaskedLM.from_config(tiny_config()), TwinLMForMaskedLM)


HEADS = {
    "AutoModel": (TwinLMModel, False),
    "AutoModelForMaskedLM": (TwinLMForMaskedLM, False),
    "AutoModelForCausalLM": (TwinLMForCausalLM, True),
    "AutoModelForSequenceClassification": (TwinLMForSequenceClassification, False),
    "AutoModelForTokenClassification": (TwinLMForTokenClassification, True),
}


def test_save_and_load_every_head_in_a_process_without_twinlm(tmp_path):
    """save_pretrained ships the code: a fresh process that imports only transformers loads each head
    with trust_remote_code=True and computes identical outputs."""
    ids = torch.randint(5, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    expected = {}
    for auto_name, (cls, causal) in HEADS.items():
        torch.manual_seed(0)
        config = tiny_config(
            is_causal=causal,
            position_embedding_type="rope" if causal else "relative",
            norm_type="batchnorm" if auto_name == "AutoModel" else "layernorm",
            num_labels=3,
        )
        model = cls(config).eval()
        model.save_pretrained(tmp_path / auto_name)
        out = model(ids, attention_mask=mask)
        expected[auto_name] = out.logits if hasattr(out, "logits") else out.last_hidden_state
        files = {p.name for p in (tmp_path / auto_name).iterdir()}
        assert {"config.json", "model.safetensors", "modeling_twinlm.py", "configuration_twinlm.py"} <= files
        assert json.loads((tmp_path / auto_name / "config.json").read_text())["auto_map"][auto_name]
    script = textwrap.dedent(
        f"""
        import sys, torch, transformers
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        results = {{}}
        for name in {list(HEADS)!r}:
            model = getattr(transformers, name).from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True).eval()
            out = model(inputs["ids"], attention_mask=inputs["mask"])
            results[name] = (type(model).__name__, out.logits if hasattr(out, "logits") else out.last_hidden_state)
        assert not any(m == "twinlm" or m.startswith("twinlm.") for m in sys.modules), "twinlm was imported"
        torch.save(results, {str(tmp_path / "results.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    results = torch.load(tmp_path / "results.pt")
    for auto_name, (cls, _) in HEADS.items():
        class_name, logits = results[auto_name]
        assert class_name == cls.__name__
        torch.testing.assert_close(logits, expected[auto_name], atol=0, rtol=0)


def test_saved_tied_model_reloads_tied(tmp_path):
    model = seeded_model(True).eval()
    model.save_pretrained(tmp_path)
    again = TwinLMForCausalLM.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embeddings.word_embeddings.weight
    ids = torch.randint(5, 97, (1, 6))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope"])
def test_factorised_embeddings(position):
    """embedding_size (ALBERT, ELECTRA's generator): token/position tables of that width, projected to
    hidden_size, and a masked-LM head mapping back to it; unset, nothing changes in the weights' layout."""
    from twinlm import TwinLMForSequenceClassification

    config = tiny_config(embedding_size=16, position_embedding_type=position, embedding_norm=True)
    model = TwinLMForMaskedLM(config)
    assert model.model.embeddings.word_embeddings.weight.shape == (97, 16)
    assert model.model.embeddings_project.weight.shape == (32, 16)
    assert model.head_dense.weight.shape == (16, 32)
    assert model.lm_head.weight is model.model.embeddings.word_embeddings.weight
    ids = torch.randint(5, 97, (2, 9))
    labels = torch.where(torch.rand(2, 9) < 0.3, ids, -100)
    labels[0, 0] = ids[0, 0]
    out = model(ids, labels=labels)
    assert out.logits.shape[-1] == 97 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.embeddings_project.weight.grad is not None
    classifier = TwinLMForSequenceClassification(config)
    classifier.model.load_state_dict(model.model.state_dict())
    assert classifier(ids).logits.shape == (2, 2)
    plain = tiny_config()
    assert plain.embedding_size == plain.hidden_size
    assert not any("embeddings_project" in k for k in TwinLMForMaskedLM(plain).state_dict())
    with pytest.raises(ValueError, match="embedding_size=16 differs from hidden_size=32"):
        tiny_config(embedding_size=16, is_causal=True)
