"""Attention past O(n^2): sliding windows in blocks, local/global layer mixes, linear attention, flex_attention.

The blocked window must be the dense masked computation exactly (outputs and gradients, fp32, 1e-5) for
every combination the dense path supports; linear attention must equal its quadratic definition written out
naively; both must cost memory linear in the sequence length (saved activations, counted, not timed).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch.nn import functional as F
from transformers import DynamicCache

from twinlm import TwinLMConfig, TwinLMForCausalLM, TwinLMForMaskedLM, TwinLMModel
from twinlm.model import attention, linear_attention
from twinlm.model.configuration_twinlm import CHOICES

POSITIONS = CHOICES["position_embedding_type"]


def lm(causal: bool, **overrides):
    torch.manual_seed(0)
    return (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(tiny_config(is_causal=causal, **overrides))


@pytest.fixture
def blocked_calls(monkeypatch):
    """Counts the forwards that ran a sliding window in blocks (WindowBlocks) or per kept query (WindowQueries)."""
    calls = {"blocks": 0, "queries": 0}
    for name, cls in (("blocks", attention.WindowBlocks), ("queries", attention.WindowQueries)):
        original = cls.attend

        def counting(self, *args, original=original, name=name, **kwargs):
            calls[name] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "attend", counting)
    return calls


def dense_windows(monkeypatch) -> None:
    """From now on, windows run as one dense masked attention (the reference)."""
    monkeypatch.setattr(attention.WindowBlocks, "applies", staticmethod(lambda *args: False))


def inputs(kind: str, causal: bool, n: int = 23):
    """(ids, kwargs, real-token mask) for plain, padded (left for a decoder, right for an encoder), packed
    documents, or both."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 97, (2, n), generator=generator)
    kwargs, real = {}, torch.ones(2, n, dtype=torch.bool)
    if "padded" in kind:
        if causal:
            real[0, :5] = False
        else:
            real[1, -6:] = False
        kwargs["attention_mask"] = real.long()
    if "packed" in kind:
        kwargs["position_ids"] = torch.tensor([list(range(9)) + list(range(n - 9)), list(range(n))])
        kwargs["position_ids"][1, 4:] = torch.arange(n - 4)  # a second row with another boundary
    return ids, kwargs, real


def outputs_and_gradients(model, ids, kwargs):
    model.zero_grad()
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_same(got, expected, real):
    (logits, grads), (ref_logits, ref_grads) = got, expected
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------
# Sliding windows in blocks == the dense masked computation

WINDOW_CASES = [
    (causal, position, kind, window, kv_heads)
    for causal in (False, True)
    for position in POSITIONS
    for kind, window, kv_heads in (
        ("plain", 3, 4),
        ("padded", 4, 2),
        ("packed", 5, 1),
        ("padded+packed", 8, 2),
    )
]


@pytest.mark.parametrize(
    "causal,position,kind,window,kv_heads",
    WINDOW_CASES,
    ids=[f"{'clm' if c else 'mlm'}-{p}-{k}-w{w}-kv{h}" for c, p, k, w, h in WINDOW_CASES],
)
def test_blocked_window_equals_dense_masked_attention(
    monkeypatch, blocked_calls, causal, position, kind, window, kv_heads
):
    """Every position scheme, padding, packed documents, grouped-query heads, both directions: the same
    outputs and gradients as one dense masked attention."""
    model = lm(causal, sliding_window=window, position_embedding_type=position, num_key_value_heads=kv_heads)
    ids, kwargs, real = inputs(kind, causal)
    blocked = outputs_and_gradients(model.train(), ids, kwargs)
    assert blocked_calls["blocks"] == model.config.num_hidden_layers
    dense_windows(monkeypatch)
    assert_same(blocked, outputs_and_gradients(model, ids, kwargs), real)
    assert blocked_calls["blocks"] == model.config.num_hidden_layers  # the reference ran densely


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attn_implementation="eager"),
        dict(attention_scoring="additive"),
        dict(attention_scoring="dot", share_qk=True),
        dict(norm_type="batchnorm"),
        dict(sliding_window=1),  # each token sees only itself
        dict(conv_kernel_size=3),
        dict(use_residual=False, norm_position="pre"),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_blocked_window_with_other_switches(monkeypatch, blocked_calls, causal, overrides):
    overrides = dict(overrides)
    implementation = overrides.pop("attn_implementation", None)
    model = lm(causal, **{"sliding_window": 4, "position_embedding_type": "alibi", **overrides})
    if implementation:
        model.set_attn_implementation(implementation)
    ids, kwargs, real = inputs("padded+packed", causal)
    blocked = outputs_and_gradients(model.train(), ids, kwargs)
    assert blocked_calls["blocks"] > 0
    dense_windows(monkeypatch)
    assert_same(blocked, outputs_and_gradients(model, ids, kwargs), real)


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_blocked_window_drops_the_same_attention_weights(monkeypatch, blocked_calls, causal):
    """Attention dropout on the blocked layout: with a dropout mask that is a function of the score (so that
    both layouts drop the same (query, key) pairs), the blocked and dense computations agree."""

    def by_score(scores, p, dtype):
        return (scores > 0).to(dtype), 1 / (1 - p)  # keep the pairs with a positive score

    monkeypatch.setattr(attention, "dropout_mask", by_score)
    model = lm(causal, sliding_window=5, attention_probs_dropout_prob=0.3, position_embedding_type="rope")
    ids, kwargs, real = inputs("padded", causal)
    blocked = outputs_and_gradients(model.train(), ids, kwargs)
    assert blocked_calls["blocks"] > 0
    dense_windows(monkeypatch)
    expected = outputs_and_gradients(model, ids, kwargs)
    assert_same(blocked, expected, real)
    monkeypatch.undo()  # and the dropout does something: without it the outputs differ
    no_dropout = lm(causal, sliding_window=5, position_embedding_type="rope").eval()
    assert not torch.allclose(no_dropout(ids, **kwargs).logits[real], expected[0][real], atol=1e-3)


def test_sparse_prediction_runs_each_kept_query_against_its_window(monkeypatch, blocked_calls):
    """Masked LM with sparse prediction: the last block attends only the masked tokens' queries, each to its
    own window (WindowQueries): the same loss and gradients as computing every query densely."""
    model = lm(False, sliding_window=5, sparse_prediction=True, position_embedding_type="relative")
    ids, kwargs, real = inputs("padded+packed", False)
    labels = torch.full_like(ids, -100)
    labels[0, [1, 7, 8, 20]] = ids[0, [1, 7, 8, 20]]
    labels[1, 3] = ids[1, 3]
    results = []
    for dense in (False, True):
        if dense:
            dense_windows(monkeypatch)
        model.zero_grad()
        out = model.train()(ids, labels=labels, **kwargs)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert blocked_calls == {"blocks": 1, "queries": 1}  # layer 0 in blocks, the last layer per query
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_blocked_window_under_gradient_checkpointing():
    ids, kwargs, _ = inputs("padded+packed", True)
    grads = []
    for checkpointing in (False, True):
        model = lm(True, sliding_window=4, position_embedding_type="rope").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        grads.append(outputs_and_gradients(model, ids, kwargs)[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def saved_bytes(model: torch.nn.Module, length: int) -> int:
    """Bytes of the tensors a forward+backward saves for backward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(5, 97, (1, length), generator=torch.Generator().manual_seed(0))
    documents = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)])[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, position_ids=documents).last_hidden_state
    out.sum().backward()
    return sum(saved.values())


@pytest.mark.parametrize("overrides", [dict(sliding_window=16), dict(attention_scoring="linear")], ids=str)
def test_activation_memory_grows_linearly_with_length(overrides):
    """Packed documents (a dense model then needs an n x n mask): the windowed and the linear model's saved
    activations double with the length, the full model's grow faster (its mask is quadratic)."""
    config = dict(is_causal=True, num_hidden_layers=1, max_position_embeddings=4096)
    torch.manual_seed(0)
    model, full = TwinLMModel(tiny_config(**config, **overrides)), TwinLMModel(tiny_config(**config))
    sizes = [saved_bytes(model, n) for n in (512, 1024, 2048)]
    ratios = [b / a for a, b in zip(sizes, sizes[1:], strict=False)]
    assert all(1.8 < r < 2.2 for r in ratios), (sizes, ratios)
    assert saved_bytes(full, 2048) / saved_bytes(full, 1024) > 2.8  # quadratic: 4x in the limit
    assert sizes[-1] < saved_bytes(full, 2048) / 2


# ---------------------------------------------------------------------------------------------------
# Local/global layer mixes


def test_global_attention_every_n_layers_is_modernberts_layout():
    config = tiny_config(num_hidden_layers=7, sliding_window=4, global_attention_every_n_layers=3)
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"] * 2 + [
        "full_attention"
    ]
    again = TwinLMConfig.from_dict(config.to_dict())  # saved and loaded: both fields, consistent
    assert again.layer_types == config.layer_types
    assert tiny_config(attention_scoring="linear").layer_types == ["linear_attention"] * 2
    assert tiny_config(sliding_window=4).layer_types == ["sliding_attention"] * 2
    assert tiny_config().layer_types == ["full_attention"] * 2
    explicit = tiny_config(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    assert [layer.attention_type for layer in TwinLMModel(explicit).layers] == explicit.layer_types


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(layer_types=["full_attention"]), r"layer_types has 1 entries but num_hidden_layers=2"),
        (dict(layer_types=["full_attention", "local"]), r"'local'.*full_attention, sliding_attention"),
        (
            dict(layer_types=["sliding_attention"] * 2),
            r"'sliding_attention' layers but sliding_window is None",
        ),
        (dict(sliding_window=4, layer_types=["full_attention"] * 2), r"sliding_window=4 is set but no layer"),
        (dict(global_attention_every_n_layers=2), r"global_attention_every_n_layers=2 needs sliding_window"),
        (
            dict(sliding_window=4, global_attention_every_n_layers=2, layer_types=["sliding_attention"] * 2),
            r"disagrees with global_attention_every_n_layers=2",
        ),
        (dict(sliding_window=4, global_attention_every_n_layers=0), r"global_attention_every_n_layers=0"),
        (dict(layer_types=["linear_attention"] * 2), r"'linear_attention' needs attention_scoring='linear'"),
        (dict(local_rope_theta=-1.0), r"local_rope_theta=-1.0 must be"),
    ],
)
def test_layer_mix_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_loading_with_a_window_or_fewer_layers_rederives_layer_types(tmp_path):
    """from_pretrained(..., sliding_window=w) turns a saved full-attention model into a windowed one (as before
    layer_types existed); a layer_types the user wrote is kept, and must then fit."""
    lm(True, num_hidden_layers=3).save_pretrained(tmp_path / "full")
    windowed = TwinLMForCausalLM.from_pretrained(tmp_path / "full", sliding_window=4)
    assert windowed.config.layer_types == ["sliding_attention"] * 3
    config = TwinLMConfig.from_pretrained(
        tmp_path / "full", sliding_window=4, global_attention_every_n_layers=2
    )
    assert config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert len(TwinLMForCausalLM.from_pretrained(tmp_path / "full", num_hidden_layers=1).model.layers) == 1
    lm(True, sliding_window=4, layer_types=["sliding_attention", "full_attention"]).save_pretrained(
        tmp_path / "mix"
    )
    with pytest.raises(ValueError, match="layer_types has 2 entries but num_hidden_layers=1"):
        TwinLMConfig.from_pretrained(tmp_path / "mix", num_hidden_layers=1)


def test_a_config_changed_after_it_was_built_is_refused_by_the_model():
    config = tiny_config()
    config.sliding_window = 4  # layer_types was derived without it
    with pytest.raises(ValueError, match="sliding_window=4 is set but no layer is 'sliding_attention'"):
        TwinLMModel(config)


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_global_layers_see_everything_and_local_layers_their_window(causal):
    model = lm(causal, num_hidden_layers=3, sliding_window=4, global_attention_every_n_layers=2).eval()
    weights = model(torch.randint(5, 97, (1, 16)), output_attentions=True).attentions
    q, k = torch.arange(16)[:, None], torch.arange(16)[None, :]
    outside = (q - k > 3) if causal else (q - k).abs() > 2
    assert weights[0][0][:, outside].abs().min() > 0  # layer 0: global
    assert weights[1][0][:, outside].abs().max() == 0  # layer 1: its window only
    assert weights[2][0][:, outside].abs().min() > 0  # layer 2: global again


def test_local_rope_theta_turns_only_the_sliding_layers():
    """local_rope_theta changes the output of a mix (its local layers) and nothing in an all-global model."""
    ids = torch.randint(5, 97, (1, 12))

    def logits(**overrides):
        return lm(True, position_embedding_type="rope", rope_theta=160_000.0, **overrides).eval()(ids).logits

    mix = dict(sliding_window=4, global_attention_every_n_layers=2)
    assert not torch.allclose(logits(**mix), logits(**mix, local_rope_theta=10.0))
    torch.testing.assert_close(logits(), logits(local_rope_theta=10.0))
    from twinlm.model.positions import rope_theta

    config = tiny_config(sliding_window=4, rope_theta=160_000.0, local_rope_theta=10_000.0)
    assert (rope_theta(config, "sliding_attention"), rope_theta(config, "full_attention")) == (
        10_000.0,
        160_000.0,
    )


def test_long_modern_encoder_preset_is_modernberts_layout():
    config = TwinLMConfig.from_preset("long-modern-encoder")
    assert config.layer_types == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert (config.sliding_window, config.rope_theta, config.local_rope_theta) == (128, 160_000.0, 10_000.0)
    assert (config.hidden_size, config.num_attention_heads, config.is_causal) == (256, 4, False)
    assert config.max_position_embeddings >= 8192


MIXES = [
    dict(sliding_window=3, global_attention_every_n_layers=2, num_hidden_layers=3),
    dict(sliding_window=3, position_embedding_type="alibi", num_key_value_heads=2),
    dict(attention_scoring="linear", position_embedding_type="rope", num_key_value_heads=2),
    dict(attention_scoring="linear", position_embedding_type="learned"),
    dict(sliding_window=3, conv_kernel_size=4, num_key_value_heads=2),
    dict(attention_scoring="linear", conv_kernel_size=3, use_residual=False, norm_position="pre"),
    dict(
        sliding_window=1, num_hidden_layers=2
    ),  # transformers' window layer keeps every key for a window of 1
]


@pytest.mark.parametrize("overrides", MIXES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_cached_continuation_equals_one_pass(overrides):
    """A prompt, then several chunks through the model's own cache (a windowed cache for sliding layers, a
    recurrent state for linear ones) equals one pass over everything."""
    model = lm(True, **overrides).eval()
    ids = torch.randint(5, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    out = model(ids[:, :9], use_cache=True)
    pieces = [out.logits]
    for start, end in ((9, 10), (10, 16), (16, 21)):
        out = model(ids[:, start:end], cache=out.cache, use_cache=True)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids, use_cache=False).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides", MIXES[:3], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_left_padded_long_prompts_generate_like_single_prompts(blocked_calls, overrides):
    """A prompt long enough for windows in blocks, left-padded in a batch: each row generates what it
    generates alone (the padding's keys are masked in the blocks, then in the caches)."""
    model = lm(True, **overrides).eval()
    long, short = torch.randint(5, 97, (1, 20)), torch.randint(5, 97, (1, 13))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1)])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=(batch != 0).long(), **kwargs)
    assert torch.equal(together[0:1, 20:], model.generate(long, **kwargs)[:, 20:])
    assert torch.equal(together[1:2, 20:], model.generate(short, **kwargs)[:, 13:])
    if "sliding_window" in overrides:
        assert blocked_calls["blocks"] > 0


def test_sliding_window_cache_holds_the_window_and_linear_cache_a_constant_state():
    window_model = lm(True, sliding_window=4, global_attention_every_n_layers=2, num_hidden_layers=3).eval()
    linear_model = lm(True, attention_scoring="linear").eval()
    prompt = torch.randint(5, 97, (1, 5))
    sizes = {}
    for new in (3, 30):
        kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        cache = window_model.generate(prompt, **kwargs).cache
        sizes[new] = [layer.keys.shape[-2] for layer in cache.layers]
        state = linear_model.generate(prompt, **kwargs).cache
        assert int(state.get_seq_length()) == 5 + new - 1  # (the last token is never fed back)
        assert [state.get_recurrent_state(i).shape for i in range(2)] == [(1, 4, 8, 9)] * 2  # (d, d_v + 1)
    assert sizes[3] == [7, 3, 7]  # the global layers keep every token, the local one w - 1
    assert sizes[30] == [34, 3, 34]


def test_decoding_cost_past_the_window_does_not_grow(monkeypatch):
    """Past the window, a decoding step attends to the same number of keys whatever the context length."""
    model = lm(True, sliding_window=4).eval()
    seen = []
    original = attention.AttentionMask.attend

    def recording(self, attention_module, query, key, value, cache, *args):
        keys, values = attention.cached(cache, key, value, attention_module.layer_idx)
        seen.append((query.shape[-2], keys.shape[-2]))
        return original(self, attention_module, query, keys, values, None, *args)

    monkeypatch.setattr(attention.AttentionMask, "attend", recording)
    model.generate(torch.randint(5, 97, (1, 3)), max_new_tokens=20, do_sample=False, pad_token_id=0)
    decode = [keys for queries, keys in seen if queries == 1]
    assert decode[-10:] == [4] * 10  # the new token and the w - 1 kept


# ---------------------------------------------------------------------------------------------------
# Linear attention


def naive_linear_attention(q, k, v, causal, documents=None, key_real=None):
    """The definition, one (query, key) pair at a time: out_i = sum_j s_ij v_j / sum_j s_ij, s_ij =
    phi(q_i).phi(k_j) over the keys j that i may see."""
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    b, h, n, _ = q.shape
    out = torch.zeros_like(v)
    for row in range(b):
        for i in range(n):
            num, den = torch.zeros(h, v.shape[-1], dtype=q.dtype), torch.zeros(h, 1, dtype=q.dtype)
            for j in range(n):
                if (causal and j > i) or (key_real is not None and not key_real[row, j]):
                    continue
                if documents is not None and documents[row, i] != documents[row, j]:
                    continue
                s = (phi_q[row, :, i] * phi_k[row, :, j]).sum(-1, keepdim=True)
                num, den = num + s * v[row, :, j], den + s
            out[row, :, i] = num / den if bool((den > 0).all()) else 0.0
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n,chunk", [(13, 4), (16, 4), (7, 8), (22, 3)])
def test_linear_attention_equals_its_definition(causal, n, chunk):
    """Chunked cumulative sums (and one K^T V product) == the naive sum over pairs, with documents that start
    inside and span several chunks, and padding keys."""
    generator = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64, generator=generator) for _ in range(3))
    restarts = torch.rand(2, n, generator=generator) < 0.25
    restarts[:, 0] = True
    documents = restarts.long().cumsum(-1)
    key_real = torch.rand(2, n, generator=generator) > 0.2
    for docs in (None, documents):
        for real in (None, key_real):
            phi_k = F.elu(k) + 1
            phi_k = phi_k if real is None else phi_k * real[:, None, :, None]
            got, _ = linear_attention.linear_attention(F.elu(q) + 1, phi_k, v, causal, docs, chunk)
            torch.testing.assert_close(
                got, naive_linear_attention(q, k, v, causal, docs, real), atol=1e-10, rtol=0
            )


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_linear_attention_gradients_equal_the_definitions(causal):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 11, 3, dtype=torch.float64, generator=generator, requires_grad=True)
        for _ in range(3)
    )
    documents = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2])
    got, _ = linear_attention.linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, causal, documents, chunk=3)
    grads = torch.autograd.grad((got * torch.arange(3.0, dtype=torch.float64)).sum(), (q, k, v))
    expected = naive_linear_attention(q, k, v, causal, documents)
    reference = torch.autograd.grad((expected * torch.arange(3.0, dtype=torch.float64)).sum(), (q, k, v))
    for a, b in zip(grads, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_linear_model_respects_padding_and_documents(monkeypatch, causal):
    monkeypatch.setattr(linear_attention, "LINEAR_CHUNK", 4)  # several chunks in a short sequence
    monkeypatch.setattr(linear_attention.LinearMask, "chunk", 4)
    model = lm(causal, attention_scoring="linear", position_embedding_type="rope").eval()
    doc_a, doc_b = torch.randint(5, 97, (1, 7)), torch.randint(5, 97, (1, 6))
    packed = model(
        torch.cat([doc_a, doc_b], 1), position_ids=torch.cat([torch.arange(7), torch.arange(6)])[None]
    )
    torch.testing.assert_close(packed.logits[:, :7], model(doc_a).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.logits[:, 7:], model(doc_b).logits, atol=1e-5, rtol=1e-4)
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([pad, doc_a], 1) if causal else torch.cat([doc_a, pad], 1)
    out = model(padded, attention_mask=(padded != 0).long()).logits
    torch.testing.assert_close(
        out[:, 5:] if causal else out[:, :7], model(doc_a).logits, atol=1e-5, rtol=1e-4
    )
    if causal:  # and the future does not leak
        changed = torch.cat([doc_a[:, :4], doc_b[:, :3]], 1)
        torch.testing.assert_close(model(changed).logits[:, :4], model(doc_a).logits[:, :4])


def test_linear_encoder_with_sparse_prediction_computes_every_query():
    """Linear attention cannot take some queries only: the last block computes all, the loss is the same."""
    ids = torch.randint(5, 97, (2, 10))
    labels = torch.where(torch.arange(10) % 3 == 0, ids, torch.full_like(ids, -100))
    sparse = lm(False, attention_scoring="linear", sparse_prediction=True).train()
    dense = lm(False, attention_scoring="linear").train()
    out = sparse(ids, labels=labels)
    assert out.logits.shape == (8, 97)
    torch.testing.assert_close(out.loss, dense(ids, labels=labels).loss)


def test_linear_attention_weights_are_its_normalised_kernel():
    """output_attentions writes the weights out (O(n^2)): rows sum to 1, causal, and the outputs are those of
    the chunked computation."""
    model = lm(True, attention_scoring="linear").eval()
    ids = torch.randint(5, 97, (2, 9))
    out = model(ids, output_attentions=True, use_cache=False)
    weights = out.attentions[0]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))
    assert weights.triu(1).abs().max() == 0 and weights.min() >= 0
    torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(sliding_window=8), r"attention_scoring='linear' attends to every token.*sliding_window=8"),
        (dict(position_embedding_type="alibi"), r"cannot add position_embedding_type='alibi'"),
        (dict(position_embedding_type="relative"), r"cannot add position_embedding_type='relative'"),
        (dict(attention_probs_dropout_prob=0.1), r"set attention_probs_dropout_prob=0 \(got 0.1\)"),
        (dict(layer_types=["linear_attention", "full_attention"]), r"makes every layer linear"),
    ],
)
def test_linear_attention_refuses_what_it_cannot_compute(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(attention_scoring="linear", **overrides)


def test_linear_attention_needs_a_cache_built_from_the_config():
    model = lm(True, attention_scoring="linear").eval()
    with pytest.raises(ValueError, match=r"pass DynamicCache\(config=model.config\)"):
        model(torch.randint(5, 97, (1, 4)), cache=DynamicCache(), use_cache=True)
    out = model(torch.randint(5, 97, (1, 4)), cache=DynamicCache(config=model.config), use_cache=True)
    assert int(out.cache.get_seq_length()) == 4


# ---------------------------------------------------------------------------------------------------
# flex_attention (torch's; run eagerly here: its compiled kernel is for GPUs, scripts/gpu_checks.py)


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers' flex integration without its torch.compile: torch's eager flex_attention (the same
    block mask, evaluated densely)."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as integration

    monkeypatch.setattr(
        integration,
        "compile_friendly_flex_attention",
        lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs),
    )


pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FLEX_CASES = [
    dict(),
    dict(sliding_window=3),
    dict(sliding_window=4, global_attention_every_n_layers=2, num_key_value_heads=2),
]


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
@pytest.mark.parametrize(
    "overrides", FLEX_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "full"
)
def test_flex_attention_matches_sdpa(eager_flex, causal, overrides):
    model = lm(causal, position_embedding_type="rope", **overrides).eval()
    model.set_attn_implementation("flex_attention")  # _supports_flex_attn: transformers accepts it
    assert model.config._attn_implementation == "flex_attention"
    with torch.no_grad():  # eager flex_attention has no CPU backward
        for kind in ("plain", "padded", "packed"):
            ids, kwargs, real = inputs(kind, causal, n=12)
            model.config._attn_implementation = "sdpa"
            expected = model(ids, **kwargs).logits
            model.config._attn_implementation = "flex_attention"
            torch.testing.assert_close(
                model(ids, **kwargs).logits[real], expected[real], atol=1e-5, rtol=1e-4
            )
        if causal:
            prompt, kwargs = ids[:, :5], dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            model.config._attn_implementation = "sdpa"
            expected = model.generate(prompt, **kwargs)
            model.config._attn_implementation = "flex_attention"
            assert torch.equal(model.generate(prompt, **kwargs), expected)
            assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), expected)


def test_flex_attention_refuses_what_it_cannot_compute(eager_flex):
    model = lm(True, position_embedding_type="alibi").eval()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="'flex_attention' cannot compute position_embedding_type='alibi'"):
        model(torch.randint(5, 97, (1, 5)))
