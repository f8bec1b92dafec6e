"""twinlm.convert: transformers BERT / GPT-2 / Llama -> twinlm with the same logits, the presets, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from twinlm import TwinLMConfig, TwinLMForCausalLM, TwinLMForMaskedLM, TwinLMModel
from twinlm.cli import main
from twinlm.convert import config_from_hf, from_hf, max_logit_difference, random_padded_batch
from twinlm.errors import TwinLMError

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
VOCAB = 99


def tiny_bert_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    return BertConfig(**{**values, **overrides})


def tiny_gpt2_config(**overrides) -> GPT2Config:
    values = dict(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    return GPT2Config(**{**values, **overrides})


def seeded(model_class, config, seed: int = 0):
    torch.manual_seed(seed)
    model = model_class(config)
    # Non-trivial norms and biases (HF initialises them to 1 and 0), so that a mix-up shows.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def real_logits_difference(hf_model, twin, hf_batch: dict, twin_batch: dict) -> float:
    with torch.no_grad():
        hf_logits = hf_model(**hf_batch).logits
        twin_logits = twin(**twin_batch).logits
    assert hf_logits.shape == twin_logits.shape
    real = twin_batch["attention_mask"].bool()
    return float((hf_logits - twin_logits).abs()[real].max())


# ---------------------------------------------------------------------------------------------------
# Faithfulness


@pytest.mark.parametrize(
    "overrides",
    [{}, {"hidden_act": "gelu_new", "tie_word_embeddings": False, "layer_norm_eps": 1e-5}],
    ids=["default", "gelu_new-untied"],
)
def test_bert_masked_lm_logits_match(overrides):
    hf_model = seeded(BertForMaskedLM, tiny_bert_config(**overrides))
    twin = from_hf(hf_model)
    assert isinstance(twin, TwinLMForMaskedLM) and not twin.training
    tied = twin.lm_head.weight is twin.model.embeddings.word_embeddings.weight
    assert tied == hf_model.config.tie_word_embeddings
    # Untied, BERT keeps a second output bias that its forward pass never uses.
    unused = 0 if tied else hf_model.cls.predictions.bias.numel()
    assert twin.num_parameters() == hf_model.num_parameters() - unused
    for seed in range(3):  # right padding, two segments
        batch = random_padded_batch(twin.config, batch_size=4, seq_len=24, seed=seed)
        assert (batch["attention_mask"] == 0).any() and (batch["token_type_ids"] == 1).any()
        assert real_logits_difference(hf_model, twin, batch, batch) < TOLERANCE
    assert max_logit_difference(hf_model, twin, seed=5) < TOLERANCE


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "activation_function": "relu",
            "n_inner": 40,
            "tie_word_embeddings": False,
            "scale_attn_weights": False,
        },
    ],
    ids=["default", "relu-inner40-untied-unscaled"],
)
def test_gpt2_lm_logits_match(overrides):
    hf_model = seeded(GPT2LMHeadModel, tiny_gpt2_config(**overrides))
    twin = from_hf(hf_model)
    assert isinstance(twin, TwinLMForCausalLM) and twin.config.pad_token_id is None
    assert twin.num_parameters() == hf_model.num_parameters()
    if not overrides:
        assert twin.lm_head.weight is twin.model.embeddings.word_embeddings.weight
    else:
        assert twin.config.attention_scoring == "dot" and twin.config.intermediate_size == 40

    # Left padding (as generate() pads): GPT-2 needs explicit positions; twinlm derives them from the mask.
    left = random_padded_batch(twin.config, batch_size=4, seq_len=24, seed=1)
    assert (left["attention_mask"][:, 0] == 0).any()
    positions = (left["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert real_logits_difference(hf_model, twin, {**left, "position_ids": positions}, left) < TOLERANCE
    # ... and with the same explicit positions on both sides.
    both = {**left, "position_ids": positions}
    assert real_logits_difference(hf_model, twin, both, both) < TOLERANCE
    # Right padding and no positions: both count from 0.
    mask = left["attention_mask"].flip(-1)
    right = {"input_ids": left["input_ids"].flip(-1), "attention_mask": mask}
    assert real_logits_difference(hf_model, twin, right, right) < TOLERANCE
    # No mask at all: the plain causal path.
    plain = {"input_ids": left["input_ids"], "attention_mask": torch.ones_like(mask)}
    assert real_logits_difference(hf_model, twin, {"input_ids": plain["input_ids"]}, plain) < TOLERANCE


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500000.0,
    )
    return LlamaConfig(**{**values, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4}],
    ids=["default-untied-gqa", "tied-biases-mha"],
)
def test_llama_lm_logits_and_generation_match(overrides):
    """Llama is twinlm's modern decoder (pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention)."""
    hf_model = seeded(LlamaForCausalLM, tiny_llama_config(**overrides))
    twin = from_hf(hf_model)
    assert isinstance(twin, TwinLMForCausalLM) and twin.config.rope_theta == 500000.0
    assert twin.num_parameters() == hf_model.num_parameters()
    assert (twin.lm_head.weight is twin.model.embeddings.word_embeddings.weight) == bool(overrides)
    for seed in range(2):
        assert max_logit_difference(hf_model, twin, batch_size=4, seq_len=24, seed=seed) < TOLERANCE
    batch = random_padded_batch(twin.config, batch_size=3, seq_len=10, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(twin.generate(**batch, **kwargs), hf_model.generate(**batch, **kwargs))
    bare = seeded(LlamaModel, tiny_llama_config(**overrides))
    assert max_logit_difference(bare, from_hf(bare)) < TOLERANCE


def test_llama_variants_twinlm_cannot_reproduce_are_refused():
    with pytest.raises(TwinLMError, match="rope_type='linear'"):
        from_hf(
            LlamaForCausalLM(
                tiny_llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
            )
        )
    with pytest.raises(TwinLMError, match="head_dim=16"):
        from_hf(LlamaForCausalLM(tiny_llama_config(head_dim=16)))


def test_difference_measure_detects_wrong_weights():
    """The measure is not vacuous: a twin with one weight off, or a random twin, is far from the original.
    (Not a key bias: it adds the same score to every key of a query, which softmax cancels.)"""
    hf_model = seeded(GPT2LMHeadModel, tiny_gpt2_config())
    twin = from_hf(hf_model)
    with torch.no_grad():
        twin.model.layers[1].attention.v_proj.bias[3] += 0.5
    assert max_logit_difference(hf_model, twin) > 1e-3
    torch.manual_seed(1)
    assert max_logit_difference(hf_model, TwinLMForCausalLM(twin.config).eval()) > 1e-2
    bert = seeded(BertForMaskedLM, tiny_bert_config())
    twin = from_hf(bert)
    assert max_logit_difference(bert, twin) < TOLERANCE
    with torch.no_grad():
        twin.model.layers[0].mlp_norm.bias[0] += 0.5
    assert max_logit_difference(bert, twin) > 1e-3


@pytest.mark.parametrize("hf_class", [BertModel, GPT2Model], ids=["bert", "gpt2"])
def test_bare_models_hidden_states_match(hf_class):
    config = tiny_bert_config() if hf_class is BertModel else tiny_gpt2_config()
    hf_model = seeded(hf_class, config)
    twin = from_hf(hf_model)
    assert type(twin) is TwinLMModel
    pooler = sum(p.numel() for p in hf_model.pooler.parameters()) if hf_class is BertModel else 0
    assert twin.num_parameters() == hf_model.num_parameters() - pooler  # BERT's pooler is dropped
    assert max_logit_difference(hf_model, twin, seed=2) < TOLERANCE


def test_greedy_generate_matches():
    hf_model = seeded(GPT2LMHeadModel, tiny_gpt2_config())
    twin = from_hf(hf_model)
    batch = random_padded_batch(twin.config, batch_size=3, seq_len=10, seed=3)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=VOCAB - 1, eos_token_id=None)
    with torch.no_grad():
        expected = hf_model.generate(**batch, **kwargs)
        generated = twin.generate(**batch, **kwargs)
    assert expected.shape == (3, 22)
    assert torch.equal(generated, expected)
    assert len(set(expected[:, 10:].flatten().tolist())) > 1  # not a degenerate repetition


# ---------------------------------------------------------------------------------------------------
# The presets are exactly BERT-base and GPT-2 small


@pytest.mark.parametrize(
    "preset,hf_config", [("bert-base", BertConfig()), ("gpt2-small", GPT2Config())], ids=["bert", "gpt2"]
)
def test_default_configs_map_to_presets(preset, hf_config):
    mapped = config_from_hf(hf_config)
    expected = TwinLMConfig.from_preset(preset)
    fields = list(TwinLMConfig.__annotations__)  # every architecture field the config declares
    assert len(fields) > 30
    differences = {
        f: (getattr(mapped, f), getattr(expected, f))
        for f in fields
        if getattr(mapped, f) != getattr(expected, f)
    }
    assert differences == {}


# ---------------------------------------------------------------------------------------------------
# Command line


def save_tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary, saved as transformers writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="w0").save_pretrained(
        directory
    )


def test_cli_converts_gpt2_checkpoint(tmp_path):
    source, output = tmp_path / "gpt2", tmp_path / "twin"
    hf_model = seeded(GPT2LMHeadModel, tiny_gpt2_config())
    hf_model.save_pretrained(source)
    save_tiny_tokenizer(source)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "twinlm", "convert", str(source), str(output)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "GPT2LMHeadModel" in result.stdout and "TwinLMForCausalLM" in result.stdout
    reported = float(result.stdout.split("max |logit difference| on a random padded batch:")[1].split()[0])
    assert reported < TOLERANCE

    saved = json.loads((output / "config.json").read_text())
    assert saved["model_type"] == "twinlm" and "AutoModelForCausalLM" in saved["auto_map"]
    assert (output / "modeling_twinlm.py").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (output / name).read_bytes() == (source / name).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("w3 w5")["input_ids"] == [3, 5]

    loaded = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "TwinLMForCausalLM"
    assert max_logit_difference(hf_model, loaded, seed=7) < TOLERANCE


def test_cli_converts_bert_checkpoint(tmp_path, capsys):
    source, output = tmp_path / "bert", tmp_path / "twin"
    hf_model = seeded(BertForMaskedLM, tiny_bert_config())
    hf_model.save_pretrained(source)
    assert main(["convert", str(source), str(output)]) == 0
    out = capsys.readouterr().out
    assert "BertForMaskedLM" in out and "tokenizer: none found" in out
    loaded = AutoModelForMaskedLM.from_pretrained(output, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "TwinLMForMaskedLM"
    assert max_logit_difference(hf_model, loaded, seed=8) < TOLERANCE


def test_a_hub_style_bert_folder_keeps_its_special_tokens(tmp_path):
    """The Hub's bert-base-uncased ships vocab.txt and a tokenizer_config.json naming no tokenizer class:
    transformers picks BertTokenizer from the model's config. Copied beside a twinlm config that fallback is
    gone, and AutoTokenizer gave a tokenizer without [CLS], [SEP], [MASK] or [PAD]; conversion names them."""
    from twinlm.convert import convert_checkpoint

    source, output = tmp_path / "bert", tmp_path / "twin"
    seeded(BertForMaskedLM, tiny_bert_config()).save_pretrained(source)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (source / "vocab.txt").write_text("\n".join(specials + [f"w{i}" for i in range(VOCAB - 5)]) + "\n")
    (source / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512})
    )
    expected = AutoTokenizer.from_pretrained(source)
    assert expected.mask_token == "[MASK]"  # what transformers makes of the source folder
    convert_checkpoint(source, output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    for name in ("cls_token", "sep_token", "mask_token", "pad_token", "unk_token"):
        assert getattr(tokenizer, name) == getattr(expected, name), name
    assert tokenizer("w3 w5")["input_ids"] == expected("w3 w5")["input_ids"]


def test_cli_bad_inputs(tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["convert", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("twinlm convert: error:")
        return lines[0]

    assert "not a directory" in error(str(tmp_path / "missing"), str(tmp_path / "out"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in error(str(empty), str(tmp_path / "out"))
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    message = error(str(mistral), str(tmp_path / "out"))
    assert "'mistral'" in message and "bert, gpt2, llama" in message
    assert "source directory" in error(str(mistral), str(mistral))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Bad models


def test_from_hf_rejects_what_it_cannot_reproduce():
    with pytest.raises(
        TwinLMError, match="BertForMaskedLM, BertModel, GPT2LMHeadModel, GPT2Model, LlamaForCausalLM"
    ):
        from_hf(BertForSequenceClassification(tiny_bert_config()))
    with pytest.raises(TwinLMError, match="supported classes"):
        from_hf(TwinLMForCausalLM(config_from_hf(tiny_gpt2_config())))
    with pytest.raises(TwinLMError, match="is_decoder"):
        from_hf(BertForMaskedLM(tiny_bert_config(is_decoder=True)))
    with pytest.raises(TwinLMError, match="scale_attn_by_inverse_layer_idx"):
        from_hf(GPT2LMHeadModel(tiny_gpt2_config(scale_attn_by_inverse_layer_idx=True)))
    with pytest.raises(TwinLMError, match="activation_function='silu'.*supported: gelu"):
        from_hf(GPT2LMHeadModel(tiny_gpt2_config(activation_function="silu")))


def test_relu_bert_converts_with_its_head():
    """BERT's head transform uses the model's activation; so does twinlm's."""
    mlm = seeded(BertForMaskedLM, tiny_bert_config(hidden_act="relu"))
    assert max_logit_difference(mlm, from_hf(mlm)) < TOLERANCE
    bare = seeded(BertModel, tiny_bert_config(hidden_act="relu"))
    assert max_logit_difference(bare, from_hf(bare)) < TOLERANCE
