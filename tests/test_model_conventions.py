"""twinlm as a transformers v5 model: attention functions registered in transformers' AttentionInterface, the
forward's kwargs passed down to them, padding-free batches equal padded ones (transformers' common test), no
document starts invented by padding, torch.compile(fullgraph=True) and compiled static-cache decoding in one graph,
ignore_mismatched_sizes for every head, loading without warnings, tensor parallelism over 2 CPU processes, position
schemes that declare what they need (a toy scheme registered here runs through every attention path), and a model
folder on public torch APIs only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, tiny_config
from test_flash_attention import reference_flash
from transformers import (
    AttentionInterface,
    CompileConfig,
    DataCollatorWithFlattening,
    DynamicCache,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from twinlm import (
    TwinLMForCausalLM,
    TwinLMForMaskedLM,
    TwinLMForSequenceClassification,
    TwinLMForTokenClassification,
    TwinLMModel,
)
from twinlm.model import attention
from twinlm.model.modeling_twinlm import check_tensor_parallel
from twinlm.model.positions import POSITION_ENCODINGS, PositionEncoding

MODEL_DIR = REPO / "src" / "twinlm" / "model"


def lm(causal: bool, **overrides):
    torch.manual_seed(0)
    return (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(tiny_config(is_causal=causal, **overrides))


def holes(causal: bool, n: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and a mask with padding at the start (decoder), the end (encoder) and a hole in the middle."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 97, (2, n), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 4] = 0  # a hole
    mask[1, 6:8] = 0
    if causal:
        mask[1, :2] = 0
    else:
        mask[0, -2:] = 0
    ids[mask == 0] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# Attention functions registered in transformers' AttentionInterface


@pytest.fixture
def registered(monkeypatch):
    """Registers attention functions under new names for the test (undone afterwards); returns the calls."""
    calls = []

    def register(name, function, mask_form=None):
        def recording(module, query, key, value, attention_mask, **kwargs):
            calls.append((name, module.layer_idx, kwargs.get("marker")))
            return function(module, query, key, value, attention_mask, **kwargs)

        monkeypatch.setitem(AttentionInterface._global_mapping, name, recording)
        if mask_form is not None:
            monkeypatch.setitem(AttentionMaskInterface._global_mapping, name, mask_form)

    return register, calls


def eager_style(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """An eager function as transformers' models write them: the mask is added, causality included."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    return (scores.softmax(-1) @ value).transpose(1, 2), None


REGISTERED_CASES = [
    dict(position_embedding_type="rope", num_key_value_heads=2),
    dict(position_embedding_type="alibi"),  # a float bias in the mask
    dict(position_embedding_type="learned", sliding_window=3),  # a window: the dense mask, not blocks
    dict(attention_scoring="dot", position_embedding_type="relative", share_qk=True),
]


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
@pytest.mark.parametrize(
    "overrides", REGISTERED_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_registered_attention_functions_run_the_dot_product_scorings(registered, causal, overrides):
    """attn_implementation=<a registered name> computes what twinlm's SDPA computes (padding, holes, packed
    documents, windows, position biases, grouped-query heads), through that function in every layer, which also
    receives the forward's keyword arguments; a function registered with transformers' eager mask form gets it."""
    register, calls = registered
    register("twinlm-test-sdpa", sdpa_attention_forward)
    register("twinlm-test-eager", eager_style, mask_form=eager_mask)
    model = lm(causal, **overrides).eval()
    ids, mask = holes(causal)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6], list(range(11))])
    for kwargs, real in (
        (dict(attention_mask=mask), mask.bool()),
        (dict(position_ids=packed), None),
        ({}, None),
    ):
        model.set_attn_implementation("sdpa")
        expected = model(ids, **kwargs).logits
        for name in ("twinlm-test-sdpa", "twinlm-test-eager"):
            model.set_attn_implementation(name)
            calls.clear()
            got = model(ids, marker=name, **kwargs).logits
            assert calls == [(name, i, name) for i in range(model.config.num_hidden_layers)]
            real = torch.ones_like(ids, dtype=torch.bool) if real is None else real
            torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    if causal:  # decoding with a cache through the registered function
        model.set_attn_implementation("sdpa")
        prompt, generate = ids[:, :5], dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = model.generate(prompt, attention_mask=mask[:, :5], **generate)
        model.set_attn_implementation("twinlm-test-eager")
        assert torch.equal(model.generate(prompt, attention_mask=mask[:, :5], **generate), expected)


def test_flash_attention_receives_the_forward_kwargs(monkeypatch):
    """Flash kernels read their own kwargs (cu_seq_lens_* from DataCollatorWithFlattening): passed down."""
    seen = []

    def flash(module, *args, **kwargs):
        seen.append(sorted(k for k in kwargs if k.startswith("cu_seq_lens") or k.startswith("max_length")))
        return reference_flash(module, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash)
    model = lm(True, position_embedding_type="rope").eval()
    model.config._attn_implementation = "flash_attention_2"
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    )
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    model(**kwargs)
    assert seen == [["cu_seq_lens_k", "cu_seq_lens_q", "max_length_k", "max_length_q"]] * 2


def test_serving_backend_contract():
    """_supports_attention_backend's other promises: logits_to_keep as a tensor, a default tensor-parallel plan."""
    assert TwinLMForCausalLM.is_backend_compatible() and TwinLMForMaskedLM.is_backend_compatible()
    model = lm(True).eval()
    ids = torch.randint(5, 97, (2, 8))
    keep = torch.tensor([1, 5, 7])
    torch.testing.assert_close(model(ids, logits_to_keep=keep).logits, model(ids).logits[:, keep])
    assert model.supports_tp_plan and model.tp_plan["lm_head"] == "colwise_gather_output"
    assert model.tp_plan["model.layers.*.attention.o_proj"] == "rowwise"


# ---------------------------------------------------------------------------------------------------
# Padding-free batches equal padded ones; padding never starts a document


PADDING_FREE = [  # (windows count token indices, holes included: a padded row with holes is another input there)
    (TwinLMForCausalLM, True, dict(position_embedding_type="rope", num_key_value_heads=2)),
    (TwinLMForCausalLM, True, dict(position_embedding_type="learned", attention_scoring="linear")),
    (TwinLMForMaskedLM, False, dict(position_embedding_type="alibi")),
    (TwinLMForMaskedLM, False, dict(position_embedding_type="relative", norm_type="batchnorm")),
    (TwinLMForTokenClassification, False, dict(position_embedding_type="sinusoidal", num_labels=3)),
]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "cls,causal,overrides",
    PADDING_FREE,
    ids=[f"{c.__name__}-{o['position_embedding_type']}" for c, _, o in PADDING_FREE],
)
def test_padding_matches_padding_free_with_position_ids(tmp_path, implementation, cls, causal, overrides):
    """transformers' common test (attention_mask_padding_matches_padding_free_with_position_ids), which
    _supports_attention_backend enables: a batch with padding and holes in its mask, and position ids that are 0
    at the padding, gives the logits of its real tokens packed into one row (position ids restarting, no mask).
    Before the fix a padding token's position 0 started a document: real tokens after a hole lost their left
    context (0.137 apart). Here in float32 to 1e-5 (transformers' test: bfloat16 to its epsilon)."""
    torch.manual_seed(0)
    cls(tiny_config(is_causal=causal, **overrides)).save_pretrained(tmp_path)
    model = cls.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 97, (3, 13), generator=generator)
    mask = (torch.rand(3, 13, generator=generator) > 0.35).long()
    mask[:, -1] = 1  # transformers' random_attention_mask: holes anywhere, the last token real
    ids[mask == 0] = 0
    position_ids = (mask.cumsum(1) - 1) * mask  # 0 at the padding
    padded = model(ids, attention_mask=mask, position_ids=position_ids).logits[mask.bool()]
    lengths = mask.sum(1).tolist()
    packed_positions = torch.cat([torch.arange(n) for n in lengths])[None]
    padding_free = model(ids[mask.bool()][None], position_ids=packed_positions).logits[0]
    torch.testing.assert_close(padded, padding_free, atol=1e-5, rtol=1e-4)
    # and without position ids (derived from the mask) it is the same again
    torch.testing.assert_close(
        model(ids, attention_mask=mask).logits[mask.bool()], padding_free, atol=1e-5, rtol=1e-4
    )


def test_real_tokens_restarting_at_zero_under_a_mask_still_start_documents():
    """twinlm's collators right-pad packed rows of unequal length and send the mask with the position ids: a real
    token at position 0 starts a document there (padding does not)."""
    model = lm(False, position_embedding_type="rope").eval()
    doc_a, doc_b = [11, 12, 13], [21, 22, 23, 24]
    ids = torch.tensor([doc_a + doc_b + [0, 0], doc_b + doc_a + [0, 0]])
    mask = torch.tensor([[1] * 7 + [0, 0]] * 2)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 0, 1, 2, 0, 0]])
    out = model(ids, attention_mask=mask, position_ids=positions).logits
    alone_a, alone_b = model(torch.tensor([doc_a])).logits[0], model(torch.tensor([doc_b])).logits[0]
    torch.testing.assert_close(out[0, :3], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0, 3:7], alone_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, 4:7], alone_a, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# torch.compile


COMPILE_CASES = [
    (TwinLMForMaskedLM, False, dict(position_embedding_type="relative", sliding_window=3)),
    (
        TwinLMForMaskedLM,
        False,
        dict(attention_scoring="linear", position_embedding_type="rope", norm_type="batchnorm"),
    ),
    (TwinLMForCausalLM, True, dict(position_embedding_type="alibi", num_key_value_heads=2)),
    (TwinLMForCausalLM, True, dict(attention_scoring="additive", hidden_act="swiglu", norm_position="pre")),
    (TwinLMForSequenceClassification, False, dict(num_labels=3, position_embedding_type="learned")),
    (
        TwinLMForTokenClassification,
        True,
        dict(num_labels=3, position_embedding_type="sinusoidal", sliding_window=4),
    ),
]


@pytest.mark.parametrize(
    "cls,causal,overrides",
    COMPILE_CASES,
    ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(COMPILE_CASES)],
)
def test_inference_compiles_as_one_graph(cls, causal, overrides):
    """_can_compile_fullgraph: torch.compile(fullgraph=True) traces an inference forward without a graph break
    (padding included) and computes the same logits. Dynamo's tracing is what fullgraph checks; the 'eager'
    backend runs the traced graph without the minute inductor would take to generate code on a CPU."""
    torch.manual_seed(0)
    model = cls(tiny_config(is_causal=causal, **overrides)).eval()
    ids, mask = holes(causal)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for kwargs in ({}, dict(attention_mask=mask)):
        torch.testing.assert_close(compiled(ids, **kwargs).logits, model(ids, **kwargs).logits)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(position_embedding_type="rope", num_key_value_heads=2),
        dict(position_embedding_type="alibi"),
        dict(norm_type="batchnorm"),
    ],
    ids=["rope-gqa", "alibi", "batchnorm"],
)
def test_compiled_static_cache_decoding_of_a_padded_batch_is_one_graph(overrides):
    """transformers' test_generate_compile_model_forward_fullgraph: generate() with a static cache compiles the
    decoding step (fullgraph, static shapes) once for all the new tokens of a left-padded batch, and gives the
    dynamic cache's tokens. (Before, the 2D mask grew a column each step: a recompilation per token.) Sliding-window
    layers still recompile per step: transformers' static sliding-window cache layer counts in a Python int (its
    own Mistral does the same)."""
    model = lm(True, **overrides).eval()
    prompt = torch.randint(5, 97, (2, 5))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend=counting_backend, mode=None)
    compile_config._compile_all_devices = True  # transformers' own test switch: compile on a CPU too
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(prompt, **kwargs)
    torch._dynamo.reset()
    static = model.generate(prompt, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert torch.equal(static, dynamic)
    assert len(graphs) == 1  # one compilation, reused by the 5 decoding steps


# ---------------------------------------------------------------------------------------------------
# Loading: other heads and vocabularies, no warnings


@pytest.mark.parametrize(
    "cls,causal",
    [
        (TwinLMModel, False),
        (TwinLMForMaskedLM, False),
        (TwinLMForCausalLM, True),
        (TwinLMForSequenceClassification, False),
        (TwinLMForTokenClassification, True),
    ],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_ignore_mismatched_sizes_for_every_head_and_vocabulary(tmp_path, cls, causal, tied):
    """from_pretrained(..., ignore_mismatched_sizes=True) with another vocabulary or label count: the mismatched
    weights start afresh (the init's scale, a zero padding row, the head tied again), everything else is loaded."""
    torch.manual_seed(0)
    saved = cls(tiny_config(is_causal=causal, num_labels=3, tie_word_embeddings=tied))
    saved.save_pretrained(tmp_path)
    changes = [dict(vocab_size=140)]
    if cls in (TwinLMForSequenceClassification, TwinLMForTokenClassification):
        changes.append(dict(num_labels=5, id2label={i: str(i) for i in range(5)}))
    for change in changes:
        model = cls.from_pretrained(tmp_path, ignore_mismatched_sizes=True, **change).eval()
        embeddings = model.get_input_embeddings().weight
        if "vocab_size" in change:
            assert embeddings.shape == (140, 32) and torch.all(embeddings[0] == 0)
            assert 0.015 < embeddings[1:].std().item() < 0.025  # initializer_range 0.02
        if hasattr(model, "lm_head"):
            assert (
                model.lm_head.weight is embeddings
            ) == tied and model.lm_head.out_features == model.config.vocab_size
        if "num_labels" in change:
            assert model.classifier.out_features == 5 and 0.015 < model.classifier.weight.std().item() < 0.025
        layer = "layers.0.attention.q_proj.weight"
        loaded = dict(model.named_parameters())
        key = layer if cls is TwinLMModel else f"model.{layer}"
        assert torch.equal(loaded[key], dict(saved.named_parameters())[key])  # the rest was loaded
        out = model(torch.randint(5, model.config.vocab_size, (2, 7)))
        assert torch.isfinite(out.logits if hasattr(out, "logits") else out.last_hidden_state).all()


def test_checkpoint_and_tokenizer_load_without_warnings(tmp_path):
    """A checkpoint folder with its tokenizer loads without a transformers warning: in a process without twinlm
    through the Auto classes with trust_remote_code=True (the model card's code), and in a twinlm process through
    twinlm's tokenizer loader, which registers twinlm with AutoConfig first (AutoTokenizer reads config.json first:
    unregistered, transformers asks whether to run the folder's code, then warns 'You are using a model of type
    `twinlm` to instantiate a model of type ``')."""
    from twinlm.tokenization import train_tokenizer

    tokenizer = train_tokenizer(
        "wordpiece",
        texts=["the quick brown fox jumps over the lazy dog"] * 20,
        vocab_size=60,
        show_progress=False,
    )
    for name, cls, causal in (("mlm", TwinLMForMaskedLM, False), ("clm", TwinLMForCausalLM, True)):
        cls(tiny_config(is_causal=causal, vocab_size=len(tokenizer))).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    fresh = textwrap.dedent(
        f"""
        import sys, warnings, transformers
        warnings.simplefilter("error")  # any Python warning fails
        for name, auto in (("mlm", "AutoModelForMaskedLM"), ("clm", "AutoModelForCausalLM")):
            folder = {str(tmp_path)!r} + "/" + name
            transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
            getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True)
        assert "twinlm" not in sys.modules
        """
    )
    in_twinlm = textwrap.dedent(
        f"""
        import warnings
        warnings.simplefilter("error")
        import twinlm  # light: registers nothing yet
        from twinlm.tokenization import auto_tokenizer
        for name in ("mlm", "clm"):
            auto_tokenizer({str(tmp_path)!r} + "/" + name)
        """
    )
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning", "PYTHONPATH": str(REPO / "src")}
    for script, env_ in ((fresh, {k: v for k, v in env.items() if k != "PYTHONPATH"}), (in_twinlm, env)):
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=env_,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip() and "it/s]" not in line]
        assert not lines, "\n".join(lines)  # progress bars aside, nothing: no warning, no remote-code prompt


# ---------------------------------------------------------------------------------------------------
# Tensor parallelism (transformers' DTensor plan) over 2 CPU processes


TP_CASES = {
    "clm-rope-gqa-swiglu": (
        True,
        dict(
            position_embedding_type="rope",
            num_key_value_heads=2,
            hidden_act="swiglu",
            norm_type="rmsnorm",
            norm_position="pre",
            attention_bias=False,
            mlp_bias=False,
        ),
    ),
    "mlm-learned-bert": (False, dict()),
    "clm-untied-window": (
        True,
        dict(tie_word_embeddings=False, sliding_window=3, position_embedding_type="rope"),
    ),
    "mlm-linear": (False, dict(attention_scoring="linear", position_embedding_type="rope")),
    "mlm-shareqk-batchnorm-geglu": (
        False,
        dict(share_qk=True, norm_type="batchnorm", hidden_act="geglu", position_embedding_type="none"),
    ),
    "refused-alibi": (True, dict(position_embedding_type="alibi")),
    "refused-additive": (False, dict(attention_scoring="additive")),
    "refused-one-kv-head": (True, dict(num_key_value_heads=1, position_embedding_type="rope")),
}

TP_WORKER = """
import json, os, sys, torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.distributed import DistributedConfig
results = {{}}
for name in {names!r}:
    folder = {folder!r} + "/" + name
    reference = torch.load(folder + "/reference.pt")
    auto = AutoModelForCausalLM if reference["causal"] else AutoModelForMaskedLM
    try:
        model = auto.from_pretrained(folder, trust_remote_code=True, tp_plan="auto").eval()
    except ValueError as err:
        results[name] = {{"refused": str(err)}}
        continue
    with torch.no_grad():
        logits = model(reference["ids"], attention_mask=reference["mask"]).logits
    weight = model.model.layers[0].attention.v_proj.weight
    result = {{"difference": (logits - reference["logits"]).abs().max().item(), "local_rows": weight.to_local().shape[0], "rows": weight.shape[0]}}
    if reference["causal"]:
        generated = model.generate(reference["ids"][:, :4], attention_mask=reference["mask"][:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        result["same_tokens"] = torch.equal(generated, reference["generated"])
    results[name] = result
if os.environ["RANK"] == "0":
    json.dump(results, open({out!r}, "w"))
torch.distributed.barrier()  # leave together, with the gloo group torn down (see test_engine's worker)
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_tensor_parallel_logits_equal_one_process(tmp_path):
    """AutoModelFor*.from_pretrained(folder, tp_plan="auto") under torchrun with 2 CPU processes (gloo): each rank
    holds half of every projection (the plan's columns and rows) and computes the single-process logits (1e-5,
    fp32) and greedy tokens, for both twins and the attention variants the plan splits; what it cannot split
    (a bias or a score vector over all heads, one key/value head for 2 ranks) is refused in one line."""
    for name, (causal, overrides) in TP_CASES.items():
        torch.manual_seed(0)
        model = (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(
            tiny_config(is_causal=causal, **overrides)
        ).eval()
        model.save_pretrained(tmp_path / name)
        ids, mask = holes(causal)
        reference = {
            "ids": ids,
            "mask": mask,
            "causal": causal,
            "logits": model(ids, attention_mask=mask).logits.detach(),
        }
        if causal:
            reference["generated"] = model.generate(
                ids[:, :4], attention_mask=mask[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0
            )
        torch.save(reference, tmp_path / name / "reference.pt")
    script = tmp_path / "worker.py"
    script.write_text(
        TP_WORKER.format(names=list(TP_CASES), folder=str(tmp_path), out=str(tmp_path / "results.json"))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the workers load the saved model code, not twinlm
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    print(json.dumps(results, indent=1))
    for name, result in results.items():
        if name.startswith("refused"):
            assert "tensor parallelism over 2 ranks cannot split" in result["refused"], result
            assert "\n" not in result["refused"]
            continue
        assert result["difference"] < 1e-5, (name, result)
        assert 2 * result["local_rows"] == result["rows"], (name, result)  # really split
        assert result.get("same_tokens", True), name
    assert "position_embedding_type='alibi'" in results["refused-alibi"]["refused"]
    assert "attention_scoring='additive'" in results["refused-additive"]["refused"]
    assert "num_key_value_heads=1" in results["refused-one-kv-head"]["refused"]


def test_tensor_parallel_plan_follows_the_config():
    """The base model's plan names exactly the modules the config builds (no rule that matches nothing)."""
    for overrides in (
        dict(),
        dict(hidden_act="swiglu", share_qk=True),
        dict(hidden_act="geglu", num_key_value_heads=2),
    ):
        model = TwinLMModel(tiny_config(**overrides))
        names = {n.replace(".0.", ".*.") for n, _ in model.named_modules()}
        assert set(model.config.base_model_tp_plan) <= names, overrides
        layer_modules = {n for n in names if n.startswith("layers.*.") and n.endswith("_proj")}
        assert {k for k in model.config.base_model_tp_plan if k.startswith("layers.")} == layer_modules
    with pytest.raises(ValueError, match=r"cannot split num_attention_heads=4 \(not a multiple of 3\)"):
        check_tensor_parallel(TwinLMModel(tiny_config()), 3)
    check_tensor_parallel(TwinLMModel(tiny_config(num_key_value_heads=2)), 2)


# ---------------------------------------------------------------------------------------------------
# Position schemes declare what they need: a toy scheme, registered here, through every attention path


class ToyBiasPositions(PositionEncoding):
    """A made-up relative scheme: head h subtracts (h + 1) / 4 per token of distance, up to 3 tokens."""

    biases_attention = True

    def attention_bias(self, distance):
        slopes = torch.arange(1, self.config.num_attention_heads + 1, device=distance.device) / 4
        return -(slopes[:, None, None] * distance[:, None].abs().clamp(max=3))  # (r, heads, q, k)


class ToyRotaryAbsolutePositions(PositionEncoding):
    """A made-up absolute + rotary scheme: a fixed cosine table added to the embeddings (bounded by
    max_position_embeddings), and queries and keys turned by position / (i + 2)."""

    bounded = True

    @classmethod
    def check_config(cls, config):
        if config.head_dim % 2:
            raise ValueError(
                f"position_embedding_type='toy-rotary' needs an even head dimension, got {config.head_dim}"
            )

    def absolute(self, position_ids):
        dims = torch.arange(self.config.hidden_size, device=position_ids.device)
        return torch.cos(position_ids.float()[..., None] * (dims + 1) / 7)

    def rotary(self, position_ids, layer_type="full_attention"):
        half = torch.arange(self.config.head_dim // 2, device=position_ids.device)
        angles = position_ids.float()[..., None] / (half + 2)
        emb = torch.cat((angles, angles), dim=-1)[:, None]
        return emb.cos(), emb.sin()


@pytest.fixture
def toy_schemes(monkeypatch):
    monkeypatch.setitem(POSITION_ENCODINGS, "toy-bias", ToyBiasPositions)
    monkeypatch.setitem(POSITION_ENCODINGS, "toy-rotary", ToyRotaryAbsolutePositions)


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers' flex integration with torch's eager flex_attention (no compile on a CPU)."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as integration

    monkeypatch.setattr(
        integration,
        "compile_friendly_flex_attention",
        lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs),
    )


def test_a_registered_scheme_is_a_config_value_and_is_asked_what_it_needs(toy_schemes):
    """The config takes any key of the table and asks the scheme (its limit, its check, its bias); so do the
    model's position check, the training loop's sequence check and the tensor-parallel check."""
    from twinlm.errors import TwinLMError
    from twinlm.training.loop import check_sequence_length

    bias, rotary = (
        tiny_config(position_embedding_type="toy-bias"),
        tiny_config(position_embedding_type="toy-rotary"),
    )
    with pytest.raises(ValueError, match="toy-bias"):
        tiny_config(position_embedding_type="toy-bais")  # a typo: the message lists the registered schemes
    with pytest.raises(
        ValueError, match="attention_scoring='linear' cannot add position_embedding_type='toy-bias'"
    ):
        tiny_config(position_embedding_type="toy-bias", attention_scoring="linear")
    with pytest.raises(ValueError, match="toy-rotary' needs an even head dimension"):
        tiny_config(position_embedding_type="toy-rotary", hidden_size=36, num_attention_heads=4)
    long = SimpleNamespace(data=SimpleNamespace(seq_len=200))
    with pytest.raises(
        TwinLMError, match="data.seq_len=200 is beyond the model's max_position_embeddings=64"
    ):
        check_sequence_length(long, rotary)
    check_sequence_length(long, bias)  # no bound
    with pytest.raises(ValueError, match="position id 70 is past max_position_embeddings=64"):
        TwinLMModel(rotary)(torch.randint(5, 97, (1, 71)))
    TwinLMModel(bias)(torch.randint(5, 97, (1, 71)))
    with pytest.raises(ValueError, match="cannot split position_embedding_type='toy-bias'"):
        check_tensor_parallel(TwinLMModel(bias), 2)
    check_tensor_parallel(TwinLMModel(rotary), 2)


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_every_attention_path_honours_a_registered_bias_scheme(monkeypatch, toy_schemes, eager_flex, causal):
    """A scheme that biases attention: eager and SDPA agree, a window in blocks equals the dense window, the
    masked-LM's last block on masked queries only equals the full one; the bias really counts (a zero bias is
    the 'none' scheme); flash and flex kernels, which take no bias, refuse it by name."""
    ids, mask = holes(causal, n=23)
    real = mask.bool()
    for window in (None, 4):
        model = lm(causal, position_embedding_type="toy-bias", sliding_window=window).eval()
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=1e-4)
        none = lm(causal, position_embedding_type="none", sliding_window=window).eval()
        assert (none(ids, attention_mask=mask).logits[real] - sdpa[real]).abs().max() > 1e-4  # (tiny logits)
        with monkeypatch.context() as patch:
            patch.setattr(
                ToyBiasPositions, "attention_bias", lambda self, d: torch.zeros(d.shape[0], 4, *d.shape[1:])
            )
            torch.testing.assert_close(
                model(ids, attention_mask=mask).logits, none(ids, attention_mask=mask).logits
            )
        if window is not None:
            blocked, dense = blocked_and_dense(monkeypatch, model, ids, mask)
            torch.testing.assert_close(blocked[real], dense[real], atol=1e-5, rtol=1e-4)
    if not causal:  # sparse prediction: the last block runs its masked queries only (each against its window)
        for window in (None, 4):
            model = lm(
                False, position_embedding_type="toy-bias", sparse_prediction=True, sliding_window=window
            ).train()
            labels = torch.full_like(ids, -100)
            labels[:, 3::4] = ids[:, 3::4]
            labels[mask == 0] = -100
            sparse = model(ids, attention_mask=mask, labels=labels).logits
            model.config.sparse_prediction = False
            dense = model(ids, attention_mask=mask, labels=labels).logits[labels != -100]
            torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-4)
    model = lm(causal, position_embedding_type="toy-bias").eval()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", reference_flash)
    for implementation in ("flash_attention_2", "flex_attention"):
        model.config._attn_implementation = implementation
        with pytest.raises(
            ValueError, match=f"'{implementation}' cannot compute position_embedding_type='toy-bias'"
        ):
            model(ids)


def blocked_and_dense(monkeypatch, model, ids, mask):
    """The logits with the window in blocks (checked to have run so) and as one dense masked attention."""
    calls = []
    original = attention.WindowBlocks.attend

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(attention.WindowBlocks, "attend", counting)
        blocked = model(ids, attention_mask=mask).logits
    assert len(calls) == model.config.num_hidden_layers, "the window ran in blocks"
    with monkeypatch.context() as patch:
        patch.setattr(attention.WindowBlocks, "applies", staticmethod(lambda *args: False))
        dense = model(ids, attention_mask=mask).logits
    return blocked, dense


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_every_attention_path_honours_a_registered_rotary_absolute_scheme(
    monkeypatch, toy_schemes, eager_flex, causal
):
    """A scheme with an absolute table and rotary angles: eager, SDPA, flash (the CPU reference of its contract)
    and flex agree on padded and packed batches, a window in blocks equals the dense window, packed documents
    equal the documents one by one, a cached decoder generates the uncached tokens; the scheme really counts."""
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", reference_flash)
    ids, mask = holes(causal, n=23)
    model = lm(causal, position_embedding_type="toy-rotary").eval()
    none = lm(causal, position_embedding_type="none").eval()
    positions = torch.tensor([list(range(9)) + list(range(14)), list(range(23))])
    with torch.no_grad():
        for kwargs, real in (
            (dict(attention_mask=mask), mask.bool()),
            (dict(position_ids=positions), torch.ones_like(mask, dtype=torch.bool)),
        ):
            model.config._attn_implementation = "sdpa"
            expected = model(ids, **kwargs).logits
            assert (none(ids, **kwargs).logits[real] - expected[real]).abs().max() > 1e-2
            for implementation in ("eager", "flash_attention_2", "flex_attention"):
                model.config._attn_implementation = implementation
                got = model(ids, **kwargs).logits
                torch.testing.assert_close(
                    got[real], expected[real], atol=1e-5, rtol=1e-4, msg=implementation
                )
        model.config._attn_implementation = "sdpa"
        packed = model(ids, position_ids=positions).logits[0]
        torch.testing.assert_close(packed[9:], model(ids[:1, 9:]).logits[0], atol=1e-5, rtol=1e-4)
        windowed = lm(causal, position_embedding_type="toy-rotary", sliding_window=4).eval()
        blocked, dense = blocked_and_dense(monkeypatch, windowed, ids, mask)
        torch.testing.assert_close(blocked[mask.bool()], dense[mask.bool()], atol=1e-5, rtol=1e-4)
    if causal:
        prompt = ids[:1, :5]
        generated = model.generate(
            prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, cache=DynamicCache(config=model.config)
        )
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
        assert torch.equal(generated, uncached)


# ---------------------------------------------------------------------------------------------------
# The model folder (remote code) uses public torch APIs only


def test_model_folder_uses_public_torch_apis_only():
    """No `torch._*` / `torch._C` attribute, no import from a private torch module, anywhere in the model folder
    (it runs as remote code on other people's torch releases)."""
    offences = []
    for path in sorted(MODEL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
                private = [p for p in node.module.split(".") if p.startswith("_")]
                private += [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    offences.append(f"{path.name}:{node.lineno} from {node.module} import {private}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in ("torch", "F", "nn", "forward_ad"):
                    offences.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not offences, "\n".join(offences)
