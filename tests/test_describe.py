"""`twinlm describe`: its parameter counts against the built model, its FLOPs against torch's FlopCounterMode.

The FLOP counts are compared exactly (to float rounding): describe counts the matrix products the model runs,
which is what FlopCounterMode counts (mm, addmm, bmm, baddbmm; elementwise work is in neither). Attention runs
eagerly so that its products are visible to the counter (SDPA's CPU kernel has no FLOP formula there).
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from twinlm import TwinLMConfig, TwinLMForCausalLM, TwinLMForMaskedLM
from twinlm.cli import main
from twinlm.describe import describe, kv_cache_size
from twinlm.errors import TwinLMError

TINY = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    embedding_dropout_prob=0.0,
)
ENCODER = dict(is_causal=False)
DECODER = dict(is_causal=True, norm_position="pre", type_vocab_size=0)

# Each switch that changes a count, at least once for the encoder and (where it applies) the decoder.
GRID = {
    "bert-like": {**ENCODER},
    "encoder-rmsnorm-rope-swiglu-nobias": {
        **ENCODER,
        "norm_type": "rmsnorm",
        "norm_position": "pre",
        "position_embedding_type": "rope",
        "hidden_act": "swiglu",
        "attention_bias": False,
        "mlp_bias": False,
    },
    "encoder-sparse": {**ENCODER, "sparse_prediction": True, "position_embedding_type": "rope"},
    "encoder-sparse-untied-geglu": {
        **ENCODER,
        "sparse_prediction": True,
        "tie_word_embeddings": False,
        "hidden_act": "geglu",
        "type_vocab_size": 3,
    },
    "encoder-sparse-batchnorm": {**ENCODER, "sparse_prediction": True, "norm_type": "batchnorm"},
    "encoder-sparse-window-blocks": {
        **ENCODER,
        "sparse_prediction": True,
        "sliding_window": 4,
        "global_attention_every_n_layers": 2,
        "position_embedding_type": "alibi",
        "num_hidden_layers": 4,
    },
    "encoder-window-dense-fallback": {**ENCODER, "sliding_window": 8, "position_embedding_type": "relative"},
    "encoder-additive-sinusoidal": {
        **ENCODER,
        "attention_scoring": "additive",
        "position_embedding_type": "sinusoidal",
        "embedding_norm": False,
    },
    "encoder-conv-sparse-batchnorm": {
        **ENCODER,
        "conv_kernel_size": 5,
        "sparse_prediction": True,
        "norm_type": "batchnorm",
        "position_embedding_type": "rope",
    },
    "encoder-conv-no-residual-sparse-window": {
        **ENCODER,
        "conv_kernel_size": 3,
        "use_residual": False,
        "sparse_prediction": True,
        "sliding_window": 4,
        "mlp_bias": False,
    },
    "encoder-linear-sparse": {
        **ENCODER,
        "attention_scoring": "linear",
        "sparse_prediction": True,
        "position_embedding_type": "none",
    },
    "gpt2-like": {**DECODER},
    "decoder-gqa-swiglu-untied": {
        **DECODER,
        "num_key_value_heads": 2,
        "hidden_act": "swiglu",
        "position_embedding_type": "rope",
        "norm_type": "rmsnorm",
        "tie_word_embeddings": False,
        "attention_bias": False,
    },
    "decoder-mqa-share-qk-embedding-norm": {
        **DECODER,
        "share_qk": True,
        "embedding_norm": True,
        "type_vocab_size": 2,
    },
    "decoder-mqa": {**DECODER, "num_key_value_heads": 1, "position_embedding_type": "alibi"},
    "decoder-window-local-global": {
        **DECODER,
        "sliding_window": 4,
        "global_attention_every_n_layers": 2,
        "num_hidden_layers": 3,
        "position_embedding_type": "rope",
        "local_rope_theta": 1000.0,
    },
    "decoder-additive-relative-post-norm": {
        **DECODER,
        "attention_scoring": "additive",
        "position_embedding_type": "relative",
        "norm_position": "post",
    },
    "decoder-conv-no-residual-gqa-swiglu": {
        **DECODER,
        "conv_kernel_size": 4,
        "use_residual": False,
        "num_key_value_heads": 2,
        "hidden_act": "swiglu",
        "position_embedding_type": "rope",
    },
    "decoder-conv-window-post-norm": {
        **DECODER,
        "conv_kernel_size": 1,
        "sliding_window": 4,
        "norm_position": "post",
        "num_hidden_layers": 3,
        "global_attention_every_n_layers": 2,
    },
    "decoder-conv-linear": {
        **DECODER,
        "conv_kernel_size": 3,
        "attention_scoring": "linear",
        "position_embedding_type": "none",
    },
    "decoder-linear-gqa": {
        **DECODER,
        "attention_scoring": "linear",
        "num_key_value_heads": 2,
        "position_embedding_type": "rope",
    },
}
SEQ_LEN = 16
BATCH = 2
MASKED = 4  # masked tokens per row with sparse prediction (mlm_probability = MASKED / SEQ_LEN)


def tiny(name: str, **extra) -> TwinLMConfig:
    return TwinLMConfig(**{**TINY, **GRID[name], **extra}, attn_implementation="eager")


def build(config: TwinLMConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return (TwinLMForCausalLM if config.is_causal else TwinLMForMaskedLM)(config)


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRID)
def test_parameter_groups_are_the_model_parameters(name):
    config = tiny(name)
    model = build(config)
    desc = describe(config, seq_len=SEQ_LEN)
    params = dict(model.named_parameters())  # a tied weight appears once, under its first name
    owners: dict[str, list[str]] = {}
    for param_name in params:
        owners[param_name] = [
            g.component for g in desc.parameters if any(fnmatch.fnmatch(param_name, m) for m in g.modules)
        ]
    assert all(len(found) == 1 for found in owners.values()), {k: v for k, v in owners.items() if len(v) != 1}
    for group in desc.parameters:
        mine = [n for n, found in owners.items() if found == [group.component]]
        assert group.count == sum(params[n].numel() for n in mine), group
        assert group.biases == sum(params[n].numel() for n in mine if n.endswith(".bias")), group
        if group.per_layer is not None:
            assert group.count == group.per_layer * config.num_hidden_layers
    assert desc.total_parameters == sum(p.numel() for p in params.values())
    tables = sum(
        p.numel() for n, p in params.items() if n.endswith("embeddings.weight") or ".positions." in n
    )
    assert desc.parameters_without_embeddings == desc.total_parameters - tables
    tied = model.lm_head.weight is model.model.embeddings.word_embeddings.weight
    assert tied == config.tie_word_embeddings


def test_mfu_rule_is_training_tracking_rule():
    from twinlm.training.tracking import model_flops_per_token

    for name in ("bert-like", "decoder-gqa-swiglu-untied", "encoder-window-dense-fallback"):
        config = tiny(name)
        expected = model_flops_per_token(build(config), config.num_hidden_layers, config.hidden_size, SEQ_LEN)
        assert describe(config, seq_len=SEQ_LEN).mfu_rule_flops_per_token == expected


# ------------------------------------------------------------------------------------------------
# FLOPs, against FlopCounterMode
# ------------------------------------------------------------------------------------------------
# describe's components -> the modules whose forward runs their products (FlopCounterMode's module names,
# without the model class). The attention products are what the attention module runs besides its projections.
PROJECTIONS = {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "o_proj"}
FFN = {"FFN up": "up_proj", "FFN gate": "gate_proj", "FFN down": "down_proj"}
CONV = {
    "conv pointwise in": "pointwise_in",
    "conv depthwise": "depthwise",
    "conv pointwise out": "pointwise_out",
}
HEADS = {"MLM transform": "head_dense", "MLM decoder": "lm_head", "LM head": "lm_head"}
ATTENTION = ("QK^T", "AV", "additive scores", "linear attention")


def counted(counter: FlopCounterMode) -> dict[str, float]:
    """FLOPs per describe component from the counter's per-module totals."""
    by_module = {
        name.split(".", 1)[1]: sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if "." in name
    }

    def under(pattern: str) -> float:
        return sum(value for name, value in by_module.items() if fnmatch.fnmatch(name, pattern))

    found = {c: under(f"model.layers.*.attention.{m}") for c, m in PROJECTIONS.items()}
    found |= {c: under(f"model.layers.*.mlp.{m}") for c, m in FFN.items()}
    found |= {c: under(f"model.layers.*.conv.{m}") for c, m in CONV.items()}
    found |= {c: under(m) for c, m in HEADS.items()}
    found["attention"] = under("model.layers.*.attention") - sum(found[c] for c in PROJECTIONS)
    return found


def conv_backward_flop(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """The gradients of a convolution, each as many products as its forward. torch's own formula counts the
    weight gradient of a grouped convolution as if it were dense, `groups` times too many (torch 2.13's
    conv_backward_flop: "details involving ... groups ... I skip"): the depthwise convolution is one group per
    channel. (twinlm runs no transposed convolution.)"""
    transposed, output_mask = args[4], args[7]  # (bias sizes, stride, padding, dilation, transposed, ...)
    assert not transposed
    return conv_flop_count(x_shape, w_shape, grad_out_shape) * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode, with the convolution's gradients counted per group (conv_backward_flop)."""
    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}
    )


def expected(rows, value) -> dict[str, float]:
    """describe's rows as counted() groups them (the attention products together; share_qk runs K in q_proj)."""
    found = {row.component: value(row) for row in rows}
    found["attention"] = sum(found.pop(c, 0.0) for c in ATTENTION)
    return found


def compare(mine: dict[str, float], theirs: dict[str, float], share_qk: bool) -> None:
    if share_qk:  # the keys are q_proj's output: its module runs both
        mine["Q"] += mine.pop("K")
        theirs.pop("K")
    for component, value in mine.items():
        assert theirs[component] == pytest.approx(value, rel=1e-9), component


def training_batch(config: TwinLMConfig) -> dict[str, torch.Tensor]:
    """BATCH rows of SEQ_LEN tokens; masked LM: MASKED labelled tokens in every row (sparse prediction's
    queries are the same count per row, as describe assumes)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config.vocab_size, (BATCH, SEQ_LEN), generator=generator)
    if config.is_causal:
        return {"input_ids": ids, "labels": ids}
    labels = torch.full_like(ids, -100)
    for row in range(BATCH):
        where = torch.randperm(SEQ_LEN, generator=generator)[:MASKED]
        labels[row, where] = ids[row, where]
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("name", GRID)
def test_training_flops_are_the_counted_flops(name):
    config = tiny(name)
    model = build(config).train()
    desc = describe(config, seq_len=SEQ_LEN, mlm_probability=MASKED / SEQ_LEN)
    tokens = BATCH * SEQ_LEN
    with flop_counter() as forward:
        loss = model(**training_batch(config)).loss
    with flop_counter() as backward:
        loss.backward()
    assert forward.get_total_flops() == pytest.approx(desc.forward_flops_per_token * tokens, rel=1e-9)
    total = forward.get_total_flops() + backward.get_total_flops()
    assert total == pytest.approx(desc.training_flops_per_token * tokens, rel=1e-9)
    mine = expected(desc.training_flops, lambda row: row.forward * tokens)
    compare(mine, counted(forward), config.share_qk)


def test_a_linear_decoder_over_several_chunks():
    """Causal linear attention pads to whole chunks of LINEAR_CHUNK tokens: a length past one chunk."""
    from twinlm.model.linear_attention import LINEAR_CHUNK

    seq_len = LINEAR_CHUNK + 6
    config = tiny("decoder-linear-gqa")
    model = build(config).train()
    ids = torch.randint(1, config.vocab_size, (1, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == pytest.approx(
        describe(config, seq_len=seq_len).training_flops_per_token * seq_len, rel=1e-9
    )


def test_windows_cost_less_than_full_attention_and_causal_full_attention_costs_n_squared():
    full = describe(tiny("bert-like", position_embedding_type="rope"), seq_len=128)
    window = describe(tiny("bert-like", position_embedding_type="rope", sliding_window=8), seq_len=128)
    attention = lambda d: sum(r.forward for r in d.training_flops if r.component in ATTENTION)  # noqa: E731
    assert attention(window) < attention(full) / 4
    causal = describe(tiny("gpt2-like"), seq_len=128)
    assert attention(causal) == attention(full)  # the masked half is computed too (eager / SDPA math)


def cache_bytes(cache) -> int:
    """Bytes of the tensors a DynamicCache holds: keys and values, linear layers' and convolutions' states."""
    tensors = []
    for layer in cache.layers:
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += [
            *getattr(layer, "recurrent_states", {}).values(),
            *getattr(layer, "conv_states", {}).values(),
        ]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


DECODERS = [name for name, values in GRID.items() if values.get("is_causal")]


@pytest.mark.parametrize("context", [3, 9])
@pytest.mark.parametrize("name", DECODERS)
def test_generation_flops_and_kv_cache_are_one_cached_decoding_step(name, context):
    from transformers.cache_utils import DynamicCache

    config = tiny(name)
    model = build(config).eval()
    desc = describe(config, seq_len=SEQ_LEN, context=context)
    ids = torch.randint(1, config.vocab_size, (BATCH, context + 1))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :context], cache=cache, use_cache=True)
        assert cache_bytes(cache) == BATCH * desc.kv_cache.bytes_at_context
        with FlopCounterMode(display=False) as counter:
            model(ids[:, context:], cache=cache, use_cache=True)
    assert counter.get_total_flops() == pytest.approx(BATCH * desc.generation_flops_per_token, rel=1e-9)
    mine = expected(desc.generation_flops, lambda row: row.flops * BATCH)
    compare(mine, counted(counter), config.share_qk)


def test_kv_cache_grows_in_full_layers_and_stays_in_windows():
    config = tiny("decoder-window-local-global")  # layers: full, sliding (window 4), full
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2  # bfloat16
    small, large = kv_cache_size(config, 2, "bfloat16"), kv_cache_size(config, 100, "bfloat16")
    assert small.bytes_at_context == 3 * 2 * per_token
    assert large.bytes_at_context == (2 * 100 + 3) * per_token
    assert large.bytes_per_token == 2 * per_token
    linear = kv_cache_size(tiny("decoder-linear-gqa"), 100)
    assert linear.bytes_per_token == 0 and linear.bytes_at_context == linear.constant_bytes > 0


def test_an_encoder_has_no_generation():
    desc = describe(tiny("bert-like"), seq_len=SEQ_LEN)
    assert desc.generation_flops is None and desc.kv_cache is None and desc.context is None


def test_lengths_past_absolute_positions_are_refused():
    with pytest.raises(TwinLMError, match="past max_position_embeddings=128"):
        describe(tiny("bert-like"), seq_len=129)
    with pytest.raises(TwinLMError, match="no position for a new token"):
        describe(tiny("gpt2-like"), seq_len=16, context=128)
    assert describe(tiny("decoder-mqa"), seq_len=1024, context=4096).context == 4096  # ALiBi: no table


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["describe", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_json(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def counted_parameters(config: TwinLMConfig) -> int:
    return sum(p.numel() for p in build(config).parameters())


def test_cli_a_preset_as_table_and_json(capsys):
    code, out, _ = run_cli(capsys, "tiny-gpt2-small")
    config = TwinLMConfig.from_preset("tiny-gpt2-small")
    total = counted_parameters(config)
    assert code == 0
    assert f"total  {total:,}".replace("  ", "") in out.replace(" ", "")
    for section in (
        "Parameters",
        "FLOPs per token, one training step",
        "FLOPs per generated token",
        "KV cache",
    ):
        assert section in out
    values = cli_json(capsys, "tiny-gpt2-small", "--seq-len", "64", "--context", "32")
    assert values["total_parameters"] == total
    assert values["seq_len"] == 64 and values["context"] == 32
    assert values["training_flops_per_token"] == describe(config, 64, 32).training_flops_per_token


def test_cli_overrides_set_config_fields(capsys):
    values = cli_json(capsys, "tiny-modern-decoder", "hidden_size=32", "--num_hidden_layers", "3")
    config = TwinLMConfig.from_preset("tiny-modern-decoder", hidden_size=32, num_hidden_layers=3)
    assert values["total_parameters"] == counted_parameters(config)
    assert sum(values["layer_types"].values()) == 3


def test_cli_a_run_config_takes_its_model_vocabulary_and_lengths(capsys):
    path = str(Path(__file__).parents[1] / "configs" / "pretrain" / "tiny-mlm.yaml")
    run = yaml.safe_load(Path(path).read_text())
    values = cli_json(capsys, path)
    config = TwinLMConfig.from_preset(
        run["model"]["preset"],
        **run["model"].get("overrides", {}),
        vocab_size=run["tokenizer"]["train"]["vocab_size"],
    )
    assert values["total_parameters"] == counted_parameters(config)
    assert values["seq_len"] == run["data"]["seq_len"]
    embeddings = next(p for p in values["parameters"] if p["component"] == "token embeddings")
    assert embeddings["count"] == run["tokenizer"]["train"]["vocab_size"] * config.hidden_size
    again = cli_json(capsys, path, "intermediate_size=40")
    assert again["total_parameters"] == counted_parameters(
        TwinLMConfig.from_preset(
            run["model"]["preset"],
            **{**run["model"].get("overrides", {}), "intermediate_size": 40},
            vocab_size=run["tokenizer"]["train"]["vocab_size"],
        )
    )


def test_cli_a_run_config_with_a_trained_tokenizer_takes_its_vocabulary(capsys, tmp_path):
    from twinlm.tokenization import train_tokenizer

    texts = [f"line {i} of a small corpus, with words that repeat and repeat" for i in range(50)]
    tokenizer = train_tokenizer(
        "bpe", texts=texts, vocab_size=300, out_dir=tmp_path / "tok", show_progress=False
    )
    run = {
        "model": {"preset": "tiny-gpt2-small"},
        "tokenizer": {"path": str(tmp_path / "tok")},
        "data": {"seq_len": 48},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    values = cli_json(capsys, str(tmp_path / "run.yaml"))
    config = TwinLMConfig.from_preset("tiny-gpt2-small", vocab_size=len(tokenizer))
    assert values["total_parameters"] == counted_parameters(config)
    assert values["seq_len"] == 48 and values["context"] == 47


def test_cli_a_saved_folder_with_or_without_weights(capsys, tmp_path):
    config = tiny("decoder-gqa-swiglu-untied")
    build(config).save_pretrained(tmp_path / "model")
    config.save_pretrained(tmp_path / "config-only")
    total = counted_parameters(config)
    for folder in ("model", "config-only"):
        assert cli_json(capsys, str(tmp_path / folder), "--seq-len", "32")["total_parameters"] == total
    wider = cli_json(capsys, str(tmp_path / "model"), "--seq-len", "32", "intermediate_size=48")
    assert wider["total_parameters"] == counted_parameters(
        tiny("decoder-gqa-swiglu-untied", intermediate_size=48)
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-preset"], "unknown preset 'no-such-preset'; choose one of"),
        (["tiny-gpt2-small", "hiden_size=32"], "unknown TwinLMConfig field.*did you mean 'hidden_size'"),
        (["tiny-gpt2-small", "norm_type=groupnorm"], "norm_type='groupnorm' is not supported"),
        (["tiny-gpt2-small", "model.hidden_size=32"], "overrides are TwinLMConfig fields"),
        (["tiny-gpt2-small", "hidden_size=30"], "must be divisible by num_attention_heads"),
        (["tiny-gpt2-small", "--seq-len", "100000"], "past max_position_embeddings"),
        (["tiny-gpt2-small", "--seq-len", "0"], "--seq-len 0 must be at least 1"),
        (["{folder}", "num_attention_heads=3"], "config.json: .*divisible"),
        (["{bert}"], "is a bert model, not a twinlm one"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    tiny("gpt2-like").save_pretrained(tmp_path / "folder")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    argv = [a.format(folder=tmp_path / "folder", bert=tmp_path / "bert") for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twinlm describe: error:"), err
    assert re.search(message, lines[0]), lines[0]
