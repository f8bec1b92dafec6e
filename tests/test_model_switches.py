"""Issue 19's switches: residual connections on/off (use_residual) and the convolution module beside attention
(conv_kernel_size). What each computes is checked here; the other model tests also run both through their paths
(every switch trains, cached generation, static caches, sparse prediction, windows in blocks, linear attention,
describe's counts)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from torch.nn import functional as F
from transformers import DynamicCache

from twinlm import TwinLMConfig, TwinLMForCausalLM, TwinLMForMaskedLM
from twinlm.model import modeling_twinlm
from twinlm.model.convolution import CONV_STATE, ConvLayout, TwinLMConvolution


def lm(causal: bool, **overrides):
    torch.manual_seed(0)
    return (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(tiny_config(is_causal=causal, **overrides))


def ids_of(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, 97, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Residual connections


def record(module: torch.nn.Module, seen: dict, name: str) -> None:
    """seen[name] = (first input, output) of the module's forward."""
    module.register_forward_hook(
        lambda m, args, out: seen.__setitem__(name, (args[0], out[0] if isinstance(out, tuple) else out))
    )


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_a_block_adds_or_drops_the_skip_connection_around_each_sublayer(norm_position, residual):
    """The wiring, read off one block's sub-layers: post-norm x = norm([x +] sublayer(x)), pre-norm
    x = [x +] sublayer(norm(x)), for attention and the feed-forward network alike."""
    model = lm(True, norm_position=norm_position, use_residual=residual).eval()
    layer, seen = model.model.layers[0], {}
    for name in ("attention", "mlp", "attention_norm", "mlp_norm"):
        record(getattr(layer, name), seen, name)
    record(layer, seen, "block")
    model(ids_of(2, 7))
    x, out = seen["block"]
    attended, ffn = seen["attention"][1], seen["mlp"][1]
    skip = (lambda stream, update: stream + update) if residual else (lambda stream, update: update)
    if norm_position == "post":
        torch.testing.assert_close(seen["attention_norm"][0], skip(x, attended))
        torch.testing.assert_close(seen["mlp"][0], seen["attention_norm"][1])
        torch.testing.assert_close(seen["mlp_norm"][0], skip(seen["mlp"][0], ffn))
        torch.testing.assert_close(out, seen["mlp_norm"][1])
    else:
        torch.testing.assert_close(seen["attention"][0], seen["attention_norm"][1])
        stream = skip(x, attended)
        torch.testing.assert_close(seen["mlp_norm"][0], stream)
        torch.testing.assert_close(out, skip(stream, ffn))


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_without_residuals_the_same_weights_compute_something_else_and_every_layer_learns(
    causal, norm_position
):
    with_residuals = lm(causal, norm_position=norm_position).train()
    without = lm(causal, norm_position=norm_position, use_residual=False).train()
    without.load_state_dict(with_residuals.state_dict())  # the switch adds and removes no weight
    ids = ids_of(3, 10)
    assert not torch.allclose(with_residuals(ids).logits, without(ids).logits, atol=1e-3)
    loss = without(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for index, layer in enumerate(without.model.layers):  # gradients reach the first block too
        norms = [p.grad.norm() for p in layer.parameters()]
        assert all(torch.isfinite(n) and n > 0 for n in norms), index


def test_without_residuals_post_and_pre_norm_are_one_network():
    """norm(sublayer(x)) chained is sublayer(norm(x)) chained, shifted by one norm: post-norm's embedding norm
    is pre-norm's first attention norm, pre-norm's final norm post-norm's last. With the default embedding norm
    (post: on, pre: off) the two are the same network (an ablation of post vs pre without residuals would
    measure nothing)."""
    ids = ids_of(2, 9)
    post = lm(True, norm_position="post", use_residual=False).eval()
    pre = lm(True, norm_position="pre", use_residual=False).eval()
    torch.testing.assert_close(post(ids).logits, pre(ids).logits)
    with_residuals = lm(True, norm_position="pre").eval()
    assert not torch.allclose(post(ids).logits, with_residuals(ids).logits, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# The convolution module: against a naive reference


def naive_convolve(conv: TwinLMConvolution, hidden, real, documents, causal: bool) -> torch.Tensor:
    """The convolution module written out: each real token's depthwise output is the sum, over the kernel's taps,
    of weight x GLU input at the tap's position, for the positions inside the row, real, and in the token's
    document (causal taps -(k-1)..0, bidirectional -(k//2)..k//2)."""
    x = F.glu(conv.pointwise_in(hidden), dim=-1)
    weight = conv.depthwise.weight[:, 0, :]  # (channels, k)
    k = weight.shape[1]
    left = k - 1 if causal else k // 2
    batch, n, _ = hidden.shape
    rows = []
    for b in range(batch):
        row = []
        for i in range(n):
            total = (
                conv.depthwise.bias.clone() if conv.depthwise.bias is not None else torch.zeros_like(x[0, 0])
            )
            for tap in range(k):
                j = i + tap - left
                if 0 <= j < n and real[b, j] and documents[b, j] == documents[b, i]:
                    total = total + weight[:, tap] * x[b, j]
            row.append(total)
        rows.append(torch.stack(row))
    depthwise = torch.stack(rows)
    return conv.pointwise_out(conv.act(conv.depthwise_norm(depthwise, real)))


def layout_case(kind: str, causal: bool, n: int = 13):
    """(real-token mask, document ids) for plain rows, padding, packed documents, or both."""
    real = torch.ones(2, n, dtype=torch.bool)
    positions = torch.arange(n).expand(2, n).clone()
    if "padded" in kind and causal:  # a decoder is padded on the left
        real[0, :4] = False
    if "padded" in kind and not causal:  # an encoder on the right
        real[1, -5:] = False
    if "packed" in kind:  # documents of 5 + 8 tokens, and 2 + 3 + 8 (a short middle one)
        positions[0] = torch.cat([torch.arange(5), torch.arange(n - 5)])
        positions[1] = torch.cat([torch.arange(2), torch.arange(3), torch.arange(n - 5)])
    return real, (positions == 0).long().cumsum(-1)


CONV_CASES = [
    (causal, k, kind, norm)
    for causal, kernels in ((True, (1, 2, 4)), (False, (1, 3, 5)))
    for k in kernels
    for kind, norm in (
        ("plain", "layernorm"),
        ("padded", "rmsnorm"),
        ("packed", "layernorm"),
        ("padded+packed", "batchnorm"),
    )
]


@pytest.mark.parametrize(
    "causal,k,kind,norm",
    CONV_CASES,
    ids=[f"{'clm' if c else 'mlm'}-k{k}-{kind}-{norm}" for c, k, kind, norm in CONV_CASES],
)
def test_the_convolution_module_equals_its_naive_definition(causal, k, kind, norm):
    """Outputs and gradients (of the input and of every weight) in float32, to 1e-5; batch norm in training
    mode (statistics over the real tokens)."""
    torch.manual_seed(0)
    config = tiny_config(is_causal=causal, conv_kernel_size=k, norm_type=norm)
    conv = modeling_twinlm.TwinLMModel(config).layers[0].conv.train()
    real, documents = layout_case(kind, causal)
    # unit-scale signals (not the init's small ones): every tap matters, and no gradient is tiny
    with torch.no_grad():
        for layer in (conv.pointwise_in, conv.depthwise, conv.pointwise_out):
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(std=fan_in**-0.5)
            layer.bias.normal_(std=0.1)
    hidden = torch.randn(2, real.shape[1], config.hidden_size, requires_grad=True)
    probe = torch.randn(2, real.shape[1], config.hidden_size)
    results = []
    for compute in (
        lambda: conv.convolve(hidden, ConvLayout.of(config, real, documents), None),
        lambda: naive_convolve(conv, hidden, real, documents, causal),
    ):
        conv.zero_grad()
        hidden.grad = None
        out = compute()
        (out * probe)[real].sum().backward()
        grads = {name: p.grad.clone() for name, p in conv.named_parameters() if p.grad is not None}
        results.append((out.detach()[real], hidden.grad.clone(), grads))
    (out, grad, grads), (ref, ref_grad, ref_grads) = results
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and "depthwise.weight" in grads
    # Batch norm removes a shift shared by the batch (the depthwise bias) and, for k = 1, a per-channel scale (the
    # depthwise weight): their gradients are 0 up to rounding, amplified by 1 / std, and compared no further.
    cancelled = (
        {"depthwise.bias", *(["depthwise.weight"] if k == 1 else [])} if norm == "batchnorm" else set()
    )
    for name in grads.keys() - cancelled:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------
# The convolution in the model: padding, documents, causality


MODEL_CASES = [
    dict(conv_kernel_size=5),
    dict(conv_kernel_size=3, norm_position="pre", position_embedding_type="rope", use_residual=False),
    dict(conv_kernel_size=3, norm_type="batchnorm", sliding_window=4),
    dict(conv_kernel_size=3, attention_scoring="linear", position_embedding_type="rope"),
]


def model_case(causal: bool, overrides: dict) -> dict:
    """A decoder gets an even kernel (only odd ones are centred, so only odd ones for an encoder)."""
    return {**overrides, "conv_kernel_size": overrides["conv_kernel_size"] + causal}


@pytest.mark.parametrize("overrides", MODEL_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_padding_and_packed_documents_change_nothing_for_real_tokens(causal, overrides):
    model = lm(causal, **model_case(causal, overrides)).eval()
    doc_a, doc_b = ids_of(1, 7), ids_of(1, 6, seed=2)
    alone_a, alone_b = model(doc_a).logits, model(doc_b).logits
    packed = model(
        torch.cat([doc_a, doc_b], 1), position_ids=torch.cat([torch.arange(7), torch.arange(6)])[None]
    )
    torch.testing.assert_close(packed.logits[:, :7], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.logits[:, 7:], alone_b, atol=1e-5, rtol=1e-4)
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([pad, doc_a], 1) if causal else torch.cat([doc_a, pad], 1)
    out = model(padded, attention_mask=(padded != 0).long()).logits
    torch.testing.assert_close(out[:, 5:] if causal else out[:, :7], alone_a, atol=1e-5, rtol=1e-4)


def test_batch_norm_in_the_convolution_takes_statistics_over_real_tokens_only():
    model = lm(False, conv_kernel_size=3, norm_type="batchnorm").train()
    ids = ids_of(2, 8)
    alone = model.model(ids).last_hidden_state
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], 1)
    out = model.model(padded, attention_mask=(padded != 0).long()).last_hidden_state
    torch.testing.assert_close(out[:, :8], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_causal_convolution_looks_only_left(k):
    model = lm(True, conv_kernel_size=k, position_embedding_type="rope").eval()
    ids = ids_of(2, 10)
    changed = ids.clone()
    changed[:, 6:] = ids_of(2, 4, seed=3)
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_a_bidirectional_convolution_looks_both_ways_within_its_reach():
    """With attention that sees only the token itself (a window of 1), a token's output changes only when a
    token within k // 2 on either side does: the convolution's reach, no more."""
    model = lm(False, conv_kernel_size=5, sliding_window=1, num_hidden_layers=1).eval()
    ids = ids_of(1, 11)
    base = model(ids).logits
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] - 5 + 1) % 92 + 5
    moved = (model(changed).logits - base).abs().amax(-1)[0]
    assert torch.equal(moved > 1e-6, (torch.arange(11) - 5).abs() <= 2), moved


# ---------------------------------------------------------------------------------------------------
# Generation: the cache keeps each layer's last k - 1 inputs


GENERATION = [
    dict(conv_kernel_size=4, position_embedding_type="rope"),
    dict(conv_kernel_size=2, sliding_window=3, norm_position="post", use_residual=False),
    dict(conv_kernel_size=7, attention_scoring="linear"),  # a state longer than the prompt at first
]


@pytest.mark.parametrize("overrides", GENERATION, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_cached_generation_equals_uncached_tokens_and_logits(overrides):
    model = lm(True, **overrides).eval()
    prompt = ids_of(2, 5)
    kwargs = dict(
        max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-5, rtol=1e-4)
    k, layers = overrides["conv_kernel_size"], cached.past_key_values.layers
    assert all(layer.conv_states[CONV_STATE].shape == (2, 32, max(k - 1, 1)) for layer in layers)


def test_left_padded_prompts_generate_like_single_prompts():
    model = lm(True, conv_kernel_size=4, position_embedding_type="rope").eval()
    long, short = ids_of(1, 8), ids_of(1, 3, seed=2)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=(batch != 0).long(), **kwargs)
    assert torch.equal(together[0:1, 8:], model.generate(long, **kwargs)[:, 8:])
    assert torch.equal(together[1:2, 8:], model.generate(short, **kwargs)[:, 3:])


def test_a_cache_without_room_for_conv_states_is_refused_in_one_line():
    model = lm(True, conv_kernel_size=3).eval()
    with pytest.raises(
        ValueError, match=r"^conv_kernel_size=3 keeps .*pass DynamicCache\(config=model.config\)"
    ):
        model(ids_of(1, 4), cache=DynamicCache(), use_cache=True)
    out = model(
        ids_of(1, 4), cache=DynamicCache(config=model.config), use_cache=True
    )  # made room while empty
    assert int(out.cache.get_seq_length()) == 4


# ---------------------------------------------------------------------------------------------------
# Training paths: sparse prediction, gradient checkpointing


def test_sparse_prediction_with_a_convolution_computes_every_query_of_the_last_block(monkeypatch):
    """A kept token's convolution reads its neighbours' attention outputs: the last block computes them all
    (no forward_queries), and the loss and gradients are those of the dense head."""
    calls = []
    original = modeling_twinlm.TwinLMPostNormLayer.forward_queries
    monkeypatch.setattr(
        modeling_twinlm.TwinLMPostNormLayer,
        "forward_queries",
        lambda self, *a: calls.append(1) or original(self, *a),
    )
    ids = ids_of(2, 10)
    labels = torch.where(torch.arange(10) % 3 == 0, ids, torch.full_like(ids, -100))
    sparse = lm(False, conv_kernel_size=3, sparse_prediction=True).train()
    dense = lm(False, conv_kernel_size=3).train()
    out, reference = sparse(ids, labels=labels), dense(ids, labels=labels)
    assert out.logits.shape == (8, 97) and not calls
    torch.testing.assert_close(out.loss, reference.loss)
    out.loss.backward()
    reference.loss.backward()
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("use_residual", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients_and_batch_statistics(use_residual):
    ids = ids_of(2, 9)
    results = []
    for checkpointing in (False, True):
        model = lm(False, conv_kernel_size=3, norm_type="batchnorm", use_residual=use_residual).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((grads, model.model.layers[0].conv.depthwise_norm.running_mean.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])  # updated once per step, not again on recompute


# ---------------------------------------------------------------------------------------------------
# Configuration, saving, remote code


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            dict(conv_kernel_size=0),
            r"conv_kernel_size=0 must be None \(no convolution\) or an odd integer in \[1, ",
        ),
        (dict(conv_kernel_size=4), r"conv_kernel_size=4 must be .*odd.*centred on the token"),
        (
            dict(conv_kernel_size=-3, is_causal=True),
            r"conv_kernel_size=-3 must be None \(no convolution\) or an integer in",
        ),
        (dict(conv_kernel_size=5000, is_causal=True), r"conv_kernel_size=5000 must be .*\[1, 1025\]"),
        (dict(conv_kernel_size="3"), r"conv_kernel_size='3'"),
        (dict(use_residual="no"), r"use_residual='no'"),
    ],
)
def test_bad_switch_values_are_one_line_naming_the_field_and_the_allowed_values(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        tiny_config(**overrides)
    assert "\n" not in str(info.value)


def test_even_kernels_are_for_causal_models_and_the_defaults_change_nothing():
    assert tiny_config(is_causal=True, conv_kernel_size=4).conv_kernel_size == 4
    config = TwinLMConfig()
    assert config.use_residual is True and config.conv_kernel_size is None
    model = lm(False)
    assert not any(".conv." in name for name, _ in model.named_parameters())


def test_save_and_load_in_a_process_without_twinlm(tmp_path):
    """save_pretrained ships convolution.py with the model code: a fresh process that imports only transformers
    loads a decoder (convolution, no residuals) and an encoder (convolution) with trust_remote_code=True and
    computes identical outputs, and generates the same tokens with its cache."""
    ids = ids_of(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    prompt = ids_of(2, 4, seed=5)
    torch.save({"ids": ids, "mask": mask, "prompt": prompt}, tmp_path / "inputs.pt")
    expected = {}
    cases = {
        "AutoModelForCausalLM": (True, dict(conv_kernel_size=4, use_residual=False, norm_position="pre")),
        "AutoModelForMaskedLM": (False, dict(conv_kernel_size=3, norm_type="batchnorm")),
    }
    for name, (causal, overrides) in cases.items():
        model = lm(causal, **overrides).eval()
        model.save_pretrained(tmp_path / name)
        expected[name] = model(ids, attention_mask=mask).logits
        assert (tmp_path / name / "convolution.py").is_file()
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert {key: saved[key] for key in ("conv_kernel_size", "use_residual")} == {
            "conv_kernel_size": overrides["conv_kernel_size"],
            "use_residual": overrides.get("use_residual", True),
        }
        again = type(model).from_pretrained(tmp_path / name).eval()
        torch.testing.assert_close(again(ids, attention_mask=mask).logits, expected[name], atol=0, rtol=0)
    generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected["tokens"] = lm(True, **cases["AutoModelForCausalLM"][1]).eval().generate(prompt, **generate)
    script = textwrap.dedent(
        f"""
        import sys, torch, transformers
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        results, models = {{}}, {{}}
        for name in {list(cases)!r}:
            models[name] = getattr(transformers, name).from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True).eval()
            results[name] = models[name](inputs["ids"], attention_mask=inputs["mask"]).logits
        results["tokens"] = models["AutoModelForCausalLM"].generate(inputs["prompt"], **{generate!r})
        assert not any(m == "twinlm" or m.startswith("twinlm.") for m in sys.modules), "twinlm was imported"
        torch.save(results, {str(tmp_path / "results.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    results = torch.load(tmp_path / "results.pt")
    for name in cases:
        torch.testing.assert_close(results[name], expected[name], atol=0, rtol=0)
    assert torch.equal(results["tokens"], expected["tokens"])
