"""The switches against transformers' reference implementations, every switch changes the output, the
BERT / GPT-2 initialisation, and presets derived from presets."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import REPO, tiny_config

from twinlm import TwinLMConfig, TwinLMForCausalLM, TwinLMForMaskedLM, TwinLMForSequenceClassification
from twinlm.model.configuration_twinlm import CHOICES
from twinlm.model.layers import GELUTanh, TwinLMGatedMLP, TwinLMRMSNorm
from twinlm.model.positions import (
    AlibiPositions,
    RotaryPositions,
    alibi_slopes,
    apply_rotary,
    relative_position_bucket,
)

# ---------------------------------------------------------------------------------------------------
# Reference implementations


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_llama(theta):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = tiny_config(is_causal=True, position_embedding_type="rope", rope_theta=theta, hidden_size=64)
    llama = LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": theta}
    )
    position_ids = torch.tensor([[0, 1, 2, 3, 40, 41, 1000, 7], [5, 4, 3, 2, 1, 0, 0, 9]])
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
    cos, sin = LlamaRotaryEmbedding(llama)(q, position_ids)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours = RotaryPositions(config).rotary(position_ids)
    difference = max(
        (apply_rotary(q, *ours) - ref_q).abs().max(), (apply_rotary(k, *ours) - ref_k).abs().max()
    )
    print(f"RoPE (theta={theta:g}) vs LlamaRotaryEmbedding + apply_rotary_pos_emb: max diff {difference:.2e}")
    assert difference < 1e-4


@pytest.mark.parametrize("heads", [4, 6, 12])
def test_alibi_matches_bloom(heads):
    """BLOOM adds slope * key position (the same per query row, up to a constant that softmax ignores)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    seq = 10
    bloom = build_alibi_tensor(torch.ones(1, seq), heads, torch.float32).view(heads, 1, seq)  # (h, 1, k)
    bloom_rows = bloom - bloom.transpose(1, 2)  # slope * (k - q): the same softmax per row as BLOOM's bias
    config = tiny_config(
        is_causal=True, position_embedding_type="alibi", num_attention_heads=heads, hidden_size=96
    )
    distance = torch.arange(seq)[None, :] - torch.arange(seq)[:, None]
    ours = AlibiPositions(config).attention_bias(distance[None])[0]  # (h, q, k)
    causal = distance <= 0
    difference = (ours - bloom_rows)[:, causal].abs().max().item()
    slopes = (alibi_slopes(heads, torch.device("cpu")) - bloom[:, 0, 1]).abs().max().item()
    print(
        f"ALiBi ({heads} heads) vs BLOOM build_alibi_tensor: max bias diff {difference:.2e}, slopes {slopes:.2e}"
    )
    assert difference < 1e-5 and slopes < 1e-6


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (16, 20), (8, 1000)])
def test_t5_buckets_match_t5(bidirectional, buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    distance = torch.arange(-300, 301)[None, :].expand(3, -1)
    ref = T5Attention._relative_position_bucket(distance, bidirectional, buckets, max_distance)
    ours = relative_position_bucket(distance, bidirectional, buckets, max_distance)
    difference = (ours - ref).abs().max().item()
    print(f"T5 buckets ({buckets}, {max_distance}, bidirectional={bidirectional}): max diff {difference}")
    assert difference == 0


def test_rmsnorm_matches_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = tiny_config(norm_type="rmsnorm", layer_norm_eps=1e-5)
    ours, ref = TwinLMRMSNorm(config), LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 32) * 4
    difference = (ours(x) - ref(x)).abs().max().item()
    bf16 = (ours(x.bfloat16()).float() - ref(x.bfloat16()).float()).abs().max().item()
    print(f"RMSNorm vs LlamaRMSNorm: max diff {difference:.2e} (bfloat16 input: {bf16:.2e})")
    assert difference < 1e-5 and bf16 < 0.1


def test_swiglu_matches_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = tiny_config(hidden_act="swiglu", mlp_bias=False)
    ours = TwinLMGatedMLP(config, torch.nn.SiLU())
    ref = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu", mlp_bias=False))
    ref.load_state_dict({k: v for k, v in ours.state_dict().items()})
    x = torch.randn(3, 7, 32)
    difference = (ours(x) - ref(x)).abs().max().item()
    print(f"SwiGLU vs LlamaMLP: max diff {difference:.2e}")
    assert difference < 1e-6


def test_gelu_new_matches_gpt2():
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-12, 12, 10001)
    difference = (GELUTanh()(x) - NewGELUActivation()(x)).abs().max().item()
    print(f"gelu_new vs NewGELUActivation: max diff {difference:.2e}")
    assert difference < 1e-6


# ---------------------------------------------------------------------------------------------------
# Every switch value changes the output (a switch that silently does nothing fails)


def _non_default(field: str) -> list:
    default = TwinLMConfig.__dataclass_fields__[field].default
    return [value for value in CHOICES[field] if value != default]


# (field, value, the config it needs to matter, how its effect shows)
SWITCHES: list[tuple[str, object, dict, str]] = [
    (field, value, {}, "forward")
    for field in CHOICES
    if field != "classifier_pooling"
    for value in _non_default(field)
]
# The pooling default depends on the variant (cls for encoders, last for decoders): each value against another.
SWITCHES += [
    ("classifier_pooling", value, {"classifier_pooling": other}, "classify")
    for value, other in (("cls", "mean"), ("mean", "last"), ("last", "cls"))
]
SWITCHES += [
    ("sliding_window", 3, {}, "forward"),
    ("share_qk", True, {}, "forward"),
    ("scale_embeddings", True, {}, "forward"),
    ("embedding_norm", False, {}, "forward"),  # the default (post-norm) is True
    ("num_key_value_heads", 2, {}, "forward"),
    ("type_vocab_size", 0, {}, "forward"),
    ("attention_bias", False, {}, "forward"),
    ("mlp_bias", False, {}, "forward"),
    ("rope_theta", 500.0, {"position_embedding_type": "rope"}, "forward"),
    ("global_attention_every_n_layers", 2, {"sliding_window": 3}, "forward"),
    ("layer_types", ["sliding_attention", "full_attention"], {"sliding_window": 3}, "forward"),
    (
        "local_rope_theta",
        500.0,
        {"position_embedding_type": "rope", "sliding_window": 3, "global_attention_every_n_layers": 2},
        "forward",
    ),
    ("relative_attention_num_buckets", 8, {"position_embedding_type": "relative"}, "forward"),
    (
        "relative_attention_max_distance",
        12,
        {
            "position_embedding_type": "relative",
            "relative_attention_num_buckets": 8,
        },  # log buckets from 4 (2)
        "forward",
    ),
    ("activation_dropout_prob", 0.5, {}, "train"),
    ("hidden_dropout_prob", 0.5, {}, "train"),
    ("attention_probs_dropout_prob", 0.5, {}, "train"),
    ("embedding_dropout_prob", 0.5, {}, "train"),
    ("sparse_prediction", True, {}, "train"),
    ("tie_word_embeddings", False, {}, "step"),
    ("scale_residual_init", True, {}, "init"),
]


def _build(causal: bool, mode: str, **overrides):
    torch.manual_seed(0)
    config = tiny_config(is_causal=causal, num_labels=3, **overrides)
    if mode == "classify":
        return TwinLMForSequenceClassification(config)
    return (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(config)


def _effect(model, mode: str, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What the switch should change: eval logits, train-mode logits (dropout, sparse prediction), logits
    after one SGD step (untied embeddings learn apart)."""
    if mode == "step":
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model.train()(ids, labels=labels).loss.backward()
        optimizer.step()
    torch.manual_seed(5)
    if mode == "train":
        return model.train()(ids, labels=labels).logits
    return model.eval()(ids).logits


# sparse_prediction is a masked-LM switch: the causal head has no masked positions.
SWITCH_CASES = [
    (*switch, causal)
    for switch in SWITCHES
    for causal in (False, True)
    if not (switch[0] == "sparse_prediction" and causal)
]


@pytest.mark.parametrize(
    "field,value,context,mode,causal",
    SWITCH_CASES,
    ids=[f"{f}={v}-{'clm' if c else 'mlm'}" for f, v, _, _, c in SWITCH_CASES],
)
def test_every_switch_value_changes_the_output(field, value, context, mode, causal):
    default = _build(causal, mode, **context)
    if mode != "init":
        # Random (not zero or one) values everywhere: a bias or norm weight at its init would hide a switch.
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in default.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
    switched = _build(causal, mode, **{**context, field: value})
    if mode != "init":  # the same weights wherever the two models have the same weight
        shapes = {k: v.shape for k, v in switched.state_dict().items()}
        shared = {k: v for k, v in default.state_dict().items() if shapes.get(k) == v.shape}
        switched.load_state_dict(shared, strict=False)
    ids = torch.randint(5, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.5, -100)
    labels[:, 1] = ids[:, 1]
    a, b = _effect(default, mode, ids, labels), _effect(switched, mode, ids, labels)
    assert a.shape != b.shape or not torch.allclose(a, b, atol=1e-6), f"{field}={value!r} changed nothing"


# ---------------------------------------------------------------------------------------------------
# Initialisation like BERT and GPT-2


def _std_ratios(twin, hf, class_name: str) -> dict[str, float]:
    """twinlm std / reference std for every mapped weight (twinlm.convert's mapping); constant tensors
    (biases, norm weights) must be the same constant."""
    from twinlm.convert import _weight_plan

    plan, _ = _weight_plan(class_name, twin.config)
    twin_state, hf_state = twin.state_dict(), hf.state_dict()
    ratios = {}
    for twin_key, hf_key, transform in plan:
        ours, ref = twin_state[twin_key].float(), hf_state[hf_key].float()
        ref = transform(ref) if transform is not None else ref
        if ref.std() == 0:
            assert ours.std() == 0 and ours.mean() == ref.mean(), twin_key
        else:
            ratios[twin_key] = (ours.std() / ref.std()).item()
    return ratios


@pytest.mark.parametrize("preset", ["bert-base", "gpt2-small"])
def test_init_matches_bert_and_gpt2(preset):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = TwinLMConfig.from_preset(preset)
    if preset == "bert-base":
        twin, hf, name = TwinLMForMaskedLM(config), BertForMaskedLM(BertConfig()), "BertForMaskedLM"
    else:
        twin, hf, name = TwinLMForCausalLM(config), GPT2LMHeadModel(GPT2Config()), "GPT2LMHeadModel"
    ratios = _std_ratios(twin, hf, name)
    worst = max(ratios, key=lambda k: abs(math.log(ratios[k])))
    print(f"{preset} init vs {name}: {len(ratios)} weights, worst std ratio {ratios[worst]:.4f} ({worst})")
    assert all(0.95 <= r <= 1.05 for r in ratios.values()), {
        k: r for k, r in ratios.items() if not 0.95 <= r <= 1.05
    }
    residual_std = twin.model.layers[0].attention.o_proj.weight.std().item()
    expected = 0.02 / math.sqrt(2 * 12) if preset == "gpt2-small" else 0.02
    assert residual_std == pytest.approx(expected, rel=0.05)


# ---------------------------------------------------------------------------------------------------
# Presets derived from presets


SIZES = ("tiny-", "mini-", "small-")
SMALLER = [name for name in TwinLMConfig.preset_names() if name.startswith(SIZES)]
DERIVED = {
    "num_key_value_heads": "num_attention_heads",
    "layer_types": "num_hidden_layers",
    "embedding_size": "hidden_size",
}


@pytest.mark.parametrize("name", SMALLER)
def test_smaller_preset_is_its_parent_except_the_listed_keys(name):
    own = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    parent = own.pop("extends")
    assert parent == name.split("-", 1)[1]
    child, base = TwinLMConfig.from_preset(name).to_dict(), TwinLMConfig.from_preset(parent).to_dict()
    differing = {key for key in child.keys() | base.keys() if child.get(key) != base.get(key)}
    # a field derived from a listed one (num_key_value_heads defaults to num_attention_heads, layer_types has
    # one entry per layer) may follow it
    derived = {key for key, source in DERIVED.items() if source in own and key not in own}
    assert differing <= set(own) | derived, differing - set(own) - derived
    assert all(child[key] == value for key, value in own.items())
    assert differing  # a tiny preset is smaller than its parent


# BERT-Mini and BERT-Small (Turc et al. 2019): (layers, hidden, heads), and BertForMaskedLM's parameter
# count at BERT's vocabulary of 30522. The modern presets' SwiGLU width keeps the per-block count.
TURC = {"mini": ((4, 256, 4), 11_201_594), "small": ((4, 512, 8), 28_795_194)}


@pytest.mark.parametrize("size", sorted(TURC))
@pytest.mark.parametrize("style", ["encoder", "decoder"])
def test_mini_and_small_presets_have_bert_mini_and_small_shapes(size, style):
    config = TwinLMConfig.from_preset(f"{size}-modern-{style}", vocab_size=30522)
    (layers, hidden, heads), bert_params = TURC[size]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (
        layers,
        hidden,
        heads,
    )
    assert (config.max_position_embeddings, config.is_causal) == (512, style == "decoder")
    assert config.num_attention_heads % config.num_key_value_heads == 0
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = (TwinLMForCausalLM if config.is_causal else TwinLMForMaskedLM)(config)
    params = sum(p.numel() for p in model.parameters())
    # encoder: within 3% of BERT's count; decoder: grouped-query attention saves up to 8% more
    low = 0.97 if style == "encoder" else 0.9
    assert low * bert_params < params < 1.03 * bert_params, params


def test_shipped_presets_are_one_folder():
    """configs/model/ is the source of truth; the package's presets/ (what a wheel ships) must agree."""
    source, packaged = REPO / "configs" / "model", REPO / "src" / "twinlm" / "presets"
    assert sorted(p.name for p in source.glob("*.yaml")) == sorted(p.name for p in packaged.glob("*.yaml"))
    for path in source.glob("*.yaml"):
        assert (packaged / path.name).read_bytes() == path.read_bytes(), path.name


def test_user_presets_extend_shipped_ones_and_files(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: tiny-gpt2-small\nhidden_size: 32\n")
    (tmp_path / "mine.yaml").write_text("extends: base\nnum_hidden_layers: 1\n")
    config = TwinLMConfig.from_preset(tmp_path / "mine.yaml", vocab_size=300)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.norm_position) == (
        32,
        1,
        300,
        "pre",
    )


def test_preset_inheritance_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b\nhidden_size: 32\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match=r"loop: a.yaml -> b.yaml -> a.yaml"):
        TwinLMConfig.from_preset(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: gpt3-huge\n")
    with pytest.raises(ValueError, match="unknown preset 'gpt3-huge'; choose one of .*gpt2-small"):
        TwinLMConfig.from_preset(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: tiny-bert-base\nhiden_size: 32\n")
    with pytest.raises(
        ValueError, match=r"d.yaml: unknown TwinLMConfig field\(s\): 'hiden_size' \(did you mean"
    ):
        TwinLMConfig.from_preset(tmp_path / "d.yaml")
