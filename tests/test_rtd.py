"""Replaced-token detection (ELECTRA, objective: rtd): the generator's shape and shared embeddings, the joint
loss and its labels, no gradient through the sample, exact resume of a mixed-source run, exports that load
with the Auto classes (as remote code too) and fine-tune unchanged, two processes (DDP) and DeepSpeed ZeRO-2; a
discriminator that can see its replacements learns to find them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_training
import torch

from twinlm.errors import TwinLMError
from twinlm.training import pretrain
from twinlm.training.tracking import read_metrics

ROOT, DP_LAUNCH, _env, _launch = (
    test_training.ROOT,
    test_training.DP_LAUNCH,
    test_training._env,
    test_training._launch,
)
run_config, needs_corpus = test_training.run_config, test_training.needs_corpus
assets = test_training.assets  # the module-scoped fixture: corpus excerpt and tokenizers
RTD_METRICS = ("loss", "gen_loss", "disc_loss", "disc_accuracy", "replaced_fraction", "gen_accuracy")


def _pair(preset: str = "tiny-modern-encoder", weight: float = 50.0, **overrides: object):
    from twinlm import TwinLMConfig, TwinLMForMaskedLM, TwinLMForPreTraining
    from twinlm.training.objectives import ReplacedTokenDetection, generator_config

    values = {"vocab_size": 97, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96}
    config = TwinLMConfig.from_preset(preset, **{**values, **overrides})
    torch.manual_seed(0)
    discriminator = TwinLMForPreTraining(config)
    generator = TwinLMForMaskedLM(generator_config(config, 0.25))
    return ReplacedTokenDetection(generator, discriminator, weight)


def test_the_generator_is_a_narrow_masked_lm_on_the_shared_embeddings() -> None:
    from twinlm.training.objectives import generator_config

    model = _pair("tiny-bert-base", num_hidden_layers=4)  # learned positions and an embedding norm
    gen, disc = model.generator.config, model.discriminator.config
    assert (gen.hidden_size, gen.num_attention_heads, gen.head_dim) == (16, 1, disc.head_dim)
    assert gen.intermediate_size == 24 and gen.num_hidden_layers == 4 and gen.embedding_size == 64
    assert generator_config(disc, 0.5, layers=0.5).num_hidden_layers == 2
    g, d = model.generator, model.discriminator
    shared = d.model.embeddings.word_embeddings.weight
    assert g.model.embeddings.word_embeddings.weight is shared and g.lm_head.weight is shared
    assert g.model.positions.embeddings.weight is d.model.positions.embeddings.weight
    assert g.model.embeddings.norm.weight is d.model.embeddings.norm.weight
    assert g.model.embeddings_project.weight.shape == (16, 64)  # shared width -> the generator's own
    # one optimizer over both: every shared tensor once
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


def _forced(model, token: int) -> None:
    """Make the generator sample `token` at every masked position."""
    with torch.no_grad():
        model.generator.lm_head.bias.fill_(-1e4)
        model.generator.lm_head.bias[token] = 1e4


def test_labels_loss_and_padding() -> None:
    """A sample equal to the original counts as original; the discriminator's loss is its mean binary
    cross-entropy over the non-padding tokens; loss = generator MLM + 50 x discriminator."""
    model = _pair()
    ids = torch.full((2, 12), 7)
    labels = torch.full_like(ids, -100)
    labels[:, 2:8:2] = 7  # 3 masked tokens per row
    ids[labels != -100] = 4  # [MASK]
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # 3 padding tokens in the second row

    _forced(model, 7)  # the generator "guesses right": nothing is replaced
    out = model(ids, labels, attention_mask=mask)
    assert out.metrics["replaced_fraction"] == 0 and out.metrics["gen_accuracy"] == 1
    torch.testing.assert_close(out.loss, out.metrics["gen_loss"] + 50 * out.metrics["disc_loss"])

    _forced(model, 9)  # every masked token is replaced by 9
    out = model(ids, labels, attention_mask=mask)
    real = mask.bool()
    assert out.metrics["replaced_fraction"].item() == pytest.approx(6 / real.sum().item())
    corrupted = torch.where(labels != -100, torch.tensor(9), torch.full_like(ids, 7))
    logits = model.discriminator(corrupted, attention_mask=mask).logits
    replaced = (labels != -100).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[real], replaced[real])
    torch.testing.assert_close(out.metrics["disc_loss"], expected.detach())


def test_the_discriminator_learns_to_find_replacements_it_can_see() -> None:
    """The discriminator, its head and loss can learn: on counting sequences (each token the previous + 1), 12%
    of the tokens replaced by uniformly random ones break the pattern where they stand; 150 AdamW steps take the
    loss far below the entropy of the base rate and find most replacements. (The 30-minute RTD recipe's
    discriminator stays at its base rate: its generator's replacements are plausible words, see
    docs/recipes.md; this test separates that regime from a model that cannot learn.)"""
    import math

    pair = _pair()
    discriminator, vocab = pair.discriminator.train(), pair.discriminator.config.vocab_size
    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        start = torch.randint(0, vocab, (16, 1), generator=g)
        ids = (start + torch.arange(32)) % vocab
        replaced = torch.rand(ids.shape, generator=g) < 0.12
        corrupted = torch.where(replaced, torch.randint(0, vocab, ids.shape, generator=g), ids)
        labels = (corrupted != ids).long()
        out = discriminator(corrupted, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    rate = labels.float().mean().item()
    base_rate_entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    found = ((out.logits > 0) & labels.bool()).sum() / labels.sum()
    assert out.loss.item() < 0.5 * base_rate_entropy, (out.loss.item(), base_rate_entropy)
    assert found > 0.6, found


def test_no_gradient_flows_through_the_sample() -> None:
    """The discriminator's loss reaches the generator only through the shared embeddings."""

    def grads(weight: float) -> dict[str, torch.Tensor]:
        """Gradients by (model, name): the shared embedding table under both models' names."""
        model = _pair(weight=weight)
        ids = torch.randint(5, 97, (4, 16), generator=torch.Generator().manual_seed(1))
        labels = torch.full_like(ids, -100)
        labels[:, ::4] = ids[:, ::4]
        masked = ids.clone()
        masked[:, ::4] = 4
        torch.manual_seed(3)  # the same samples in both runs
        model(masked, labels).loss.backward()
        discriminator = {id(p) for p in model.discriminator.parameters()}
        return {
            (
                part if part == "discriminator" or id(p) not in discriminator else "shared",
                name,
            ): p.grad.clone()
            for part in ("generator", "discriminator")
            for name, p in getattr(model, part).named_parameters()
        }

    light, heavy = grads(1.0), grads(1000.0)
    own = [key for key in light if key[0] == "generator"]
    assert len(own) > 10 and all(torch.equal(light[key], heavy[key]) for key in own)
    shared = ("shared", "model.embeddings.word_embeddings.weight")
    assert shared in light and not torch.allclose(light[shared], heavy[shared])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objective=rtd", "does not fit the model"),  # a causal preset
        ("objective=mlm", "does not fit the model"),
        ("rtd.generator_size=0", "rtd.generator_size"),
        ("objective=electra", "objective"),
    ],
)
def test_objective_errors_before_any_work(
    assets: dict[str, Path], tmp_path: Path, override: str, message: str
) -> None:
    config = run_config(assets, tmp_path / "out", causal=True)
    config["tokenizer"] = {"train": {"type": "bpe", "vocab_size": 300}}
    with pytest.raises(TwinLMError, match=message):
        pretrain(config, [override])
    assert not (tmp_path / "out" / "tokenizer").exists()


def _weighted_halves(assets: dict[str, Path]) -> list[dict]:
    """Two sources, the halves of the excerpt, weighted 3:1."""
    text = assets["excerpt"].read_text()
    halves = [assets["base"] / "first.txt", assets["base"] / "second.txt"]
    halves[0].write_text(text[: len(text) // 2])
    halves[1].write_text(text[len(text) // 2 :])
    return [{"path": str(halves[0]), "weight": 3}, {"path": str(halves[1]), "weight": 1}]


def _rtd_config(assets: dict[str, Path], out: Path, **training: object) -> dict:
    """The tiny encoder (dropout on) trained with rtd on the two weighted halves of the excerpt."""
    config = run_config(assets, out, causal=False, **training)
    config["data"]["sources"] = _weighted_halves(assets)
    config["objective"] = "rtd"
    return config


def _metrics(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out / "metrics.jsonl") if m.get("loss") is not None}


@needs_corpus
def test_rtd_run_resumes_exactly_exports_and_fine_tunes(assets: dict[str, Path], tmp_path: Path) -> None:
    from test_finetune import seq_config, write_sentiment
    from transformers import AutoModel, AutoModelForMaskedLM

    from twinlm.evaluation import pretraining_facts
    from twinlm.finetune import finetune
    from twinlm.model_card import write_model_card

    full = tmp_path / "full"
    summary = pretrain(_rtd_config(assets, full, grad_accum=2))
    straight = _metrics(full)
    assert summary["objective"] == "replaced-token-detection" and summary["val_disc_loss"] > 0
    assert set(RTD_METRICS) <= set(straight[1]) and 0 < straight[6]["replaced_fraction"] < 0.3
    sources = summary["data_sources"]
    assert [s["weight"] for s in sources] == [0.75, 0.25] and all(s["tokens_seen"] > 0 for s in sources)
    assert sum(s["tokens_seen"] for s in sources) == summary["tokens_seen"]

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for part in ("checkpoints/checkpoint-6", "final", "generator"):
        shutil.rmtree(cut / part)
    resumed = pretrain(_rtd_config(assets, cut, grad_accum=2, resume_from_checkpoint="latest"))
    again = _metrics(cut)
    for step in (4, 5, 6):
        for key in RTD_METRICS:
            assert again[step][key] == pytest.approx(straight[step][key], abs=1e-6), (step, key)
    assert resumed["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-6)
    assert resumed["data_sources"] == sources

    # final/ is the discriminator: an ordinary encoder checkpoint; generator/ a masked-LM on its embeddings
    final, generator = Path(summary["final_model"]), Path(summary["generator_model"])
    assert generator == full / "generator" and (generator / "tokenizer.json").is_file()
    body = AutoModel.from_pretrained(final)
    gen, info = AutoModelForMaskedLM.from_pretrained(generator, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(
        gen.get_input_embeddings().weight, body.get_input_embeddings().weight, rtol=0, atol=0
    )
    assert pretraining_facts(str(final))["objective"] == "replaced-token-detection"
    card = write_model_card(final).read_text()
    assert "replaced-token-detection" in card and "## Data" in card and "first.txt" in card

    data = write_sentiment(tmp_path / "sentiment", n_train=64, n_eval=32)
    tuned = finetune(seq_config(final, data, tmp_path / "tuned", epochs=1, batch_size=16, baseline=False))
    assert tuned["best"]["dev"]["accuracy"] >= 0.0 and not tuned.get("interrupted_by")


@needs_corpus
@pytest.mark.slow  # a subprocess without twinlm
def test_rtd_exports_load_as_remote_code(assets: dict[str, Path], tmp_path: Path) -> None:
    summary = pretrain(_rtd_config(assets, tmp_path / "run", max_steps=2, save_every=0))
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoModelForSequenceClassification\n"
        f"final, gen = {summary['final_model']!r}, {summary['generator_model']!r}\n"
        "clf = AutoModelForSequenceClassification.from_pretrained(final, trust_remote_code=True, num_labels=2)\n"
        "disc = AutoModelForPreTraining.from_pretrained(final, trust_remote_code=True)\n"
        "mlm = AutoModelForMaskedLM.from_pretrained(gen, trust_remote_code=True)\n"
        "ids = torch.tensor([[2, 40, 41, 42, 3]])\n"
        "assert clf(ids).logits.shape == (1, 2) and disc(ids).logits.shape == (1, 5)\n"
        "assert mlm(ids).logits.shape[:2] == (1, 5)\n"
        "assert torch.equal(clf.model.layers[0].mlp.up_proj.weight, disc.model.layers[0].mlp.up_proj.weight)\n"
        "assert not any(name == 'twinlm' or name.startswith('twinlm.') for name in sys.modules)\n"
        "print('LOADED', type(clf).__name__, type(disc).__name__, type(mlm).__name__)\n"
    )
    env = _env()
    env.pop("PYTHONPATH")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "LOADED TwinLMForSequenceClassification TwinLMForPreTraining TwinLMForMaskedLM" in done.stdout, (
        done.stderr[-3000:]
    )


@needs_corpus
@pytest.mark.slow
def test_rtd_two_process_data_parallel(assets: dict[str, Path], tmp_path: Path) -> None:
    """DDP (gloo, 2 processes) with a weighted mix: the joint model learns, both models are exported, and
    the per-source token counts add up over the processes (exact resume: the single-process test above)."""
    out = tmp_path / "run"
    rtd = ("objective=rtd", f"data.sources={json.dumps(_weighted_halves(assets))}")
    summary, curve = _launch(
        assets, out, DP_LAUNCH, _env(ACCELERATE_USE_CPU="1"), causal=False, overrides=rtd
    )
    assert "MULTI" in summary["distributed_type"] and summary["objective"] == "replaced-token-detection"
    assert (curve[7] + curve[8]) / 2 < (curve[1] + curve[2]) / 2 - 0.1, curve
    assert sum(s["tokens_seen"] for s in summary["data_sources"]) == summary["tokens_seen"]
    assert (out / "generator" / "model.safetensors").is_file() and (
        out / "final" / "model.safetensors"
    ).is_file()


@needs_corpus
@pytest.mark.slow
def test_rtd_deepspeed_zero2(assets: dict[str, Path], tmp_path: Path) -> None:
    launch = ["--config_file", str(ROOT / "configs" / "accelerate" / "deepspeed-zero2.yaml")]
    env = _env()
    env.pop("ACCELERATE_USE_CPU", None)
    out = tmp_path / "run"
    summary, curve = _launch(assets, out, launch, env, causal=False, overrides=("objective=rtd",))
    assert "DEEPSPEED" in summary["distributed_type"] and summary["processes"] == 2
    assert (curve[7] + curve[8]) / 2 < (curve[1] + curve[2]) / 2 - 0.1, curve
    metrics = _metrics(out)
    assert metrics[8]["disc_loss"] < metrics[1]["disc_loss"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["TwinLMForPreTraining"]
    assert (out / "generator" / "model.safetensors").is_file()


def test_saving_tied_weights_raises_no_alarm_but_other_shared_storage_does(tmp_path: Path, caplog) -> None:
    """accelerate's save_state drops every alias of a shared tensor and warns "Removed shared tensor ... check
    by verifying ...". For the models' own ties (the LM head on the embeddings, RTD's shared embeddings) the
    model is tied again before a resume fills it, so the checkpoint says nothing; storage shared any other way
    still warns."""
    from accelerate import Accelerator
    from conftest import tiny_config

    from twinlm import TwinLMForMaskedLM
    from twinlm.training.checkpoint import save_checkpoint

    class Aliased(torch.nn.Module):  # two Parameters over one storage: not a tie a rebuilt model restores
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.ones(4))
            self.b = torch.nn.Parameter(self.a.data)

    notices = {}
    for name, model in [("rtd", _pair()), ("mlm", TwinLMForMaskedLM(tiny_config())), ("aliased", Aliased())]:
        accelerator = Accelerator(cpu=True)
        accelerator.prepare(model)
        caplog.clear()
        with caplog.at_level("WARNING"):
            path = save_checkpoint(accelerator, tmp_path / name, 1, {"step": 1}, keep_last=1)
        assert (path / "model.safetensors").exists()
        notices[name] = [r.getMessage() for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    assert notices["rtd"] == [] and notices["mlm"] == []
    assert len(notices["aliased"]) == 1 and "'b'" in notices["aliased"][0]
