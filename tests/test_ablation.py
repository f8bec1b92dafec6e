"""`twinlm ablate`: variants x seeds as normal runs, measurements, an answer judged against the spread."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from twinlm.errors import TwinLMError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal run config on a corpus excerpt with a small BPE tokenizer (seconds per run)."""
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    from twinlm.tokenization import train_tokenizer

    root = tmp_path_factory.mktemp("ablate")
    text = (CORPUS / "moby_dick.txt").read_bytes()[100_000:160_000].decode("utf-8", "ignore")
    (root / "excerpt.txt").write_text(text)
    train_tokenizer(
        "bpe", files=[root / "excerpt.txt"], vocab_size=400, out_dir=root / "bpe", show_progress=False
    )
    run = {
        "model": {
            "preset": "tiny-modern-decoder",
            "overrides": {
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            },
        },
        "tokenizer": {"path": str(root / "bpe")},
        "data": {
            "sources": [str(root / "excerpt.txt")],
            "seq_len": 32,
            "validation_size": 20,
            "cache_dir": str(root / "cache"),
            "num_proc": 1,
        },
        "training": {
            "batch_size": 4,
            "max_steps": 8,
            "lr": 3e-3,
            "warmup_steps": 1,
            "log_every": 2,
            "eval_every": 4,
            "eval_batches": 2,
            "save_every": 0,
        },
        "logging": {"report_to": "none"},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    return root


def test_ablation_runs_measures_and_answers(base_run, monkeypatch):
    from twinlm.ablation import run_ablation

    question = {
        "question": "Does scaling by 1/sqrt(d_k) matter?",
        "textbook": "Unscaled scores saturate the softmax and slow learning.",
        "expect": "scaled",
        "base": {"config": str(base_run / "run.yaml"), "overrides": {}},
        "variants": {
            "scaled": {"model.overrides.attention_scoring": "scaled_dot"},
            "unscaled": {"model.overrides.attention_scoring": "dot"},
        },
        "seeds": [0, 1],
        "compare": [{"better": "scaled", "worse": "unscaled", "metric": "saturation"}],
        "measures": [
            {"name": "curve"},
            {"name": "attention"},
            {"name": "length", "params": {"factors": [1, 2], "blocks": 2}},
            {"name": "cost", "params": {"sweep": "seq_len", "values": [16, 32], "batch": 2}},
            {"name": "generation", "params": {"new_tokens": 8}},
            {"name": "bits_per_byte"},
            {"name": "train_eval_gap"},
        ],
    }
    path = base_run / "scaled.yaml"
    path.write_text(yaml.safe_dump(question))
    out = base_run / "out"
    result = run_ablation(path, out)
    table = result["table"]
    assert set(table) == {"scaled", "unscaled"}
    for row in table.values():
        assert row["val_loss"]["n"] == 2 and row["val_loss"]["std"] >= 0
        assert 0 <= row["saturation"]["mean"] <= 1 and row["entropy"]["mean"] > 0
        assert row["ppl@2L"]["mean"] > 1  # rope positions go past the training length
        # attention memory grows with the sequence: activations at 32 tokens exceed those at 16
        assert row["activation_MB@32"]["mean"] > row["activation_MB@16"]["mean"]
        assert row["kv_cache_MB"]["mean"] > 0 and row["bits_per_byte"]["mean"] > 0
    # the two seeds are different runs with the same data order: different losses
    seeds = [r["values"]["val_loss"] for r in result["runs"] if r["variant"] == "scaled"]
    assert seeds[0] != seeds[1]
    # the answer follows from the numbers
    # the learning gate: a variant within 0.3 nats of the unigram cross-entropy did not learn (8 steps here)
    from twinlm.ablation.report import GATE_NATS, learned

    ans = result["answer"]
    for name, row in table.items():
        assert row["unigram_entropy"]["mean"] > 0
        expected = row["val_loss"]["mean"] < row["unigram_entropy"]["mean"] - GATE_NATS
        assert learned(table, name) == expected
    if not learned(table, "scaled"):  # the reference did not learn: no answer, every quality claim withheld
        assert ans["text"].startswith("no answer at this scale: scaled did not learn at this budget")
        assert ans["claims"][0]["verdict"] == "withheld"
    report = (out / "report.md").read_text()
    assert "| scaled beats unscaled on saturation |" in report and "Learning gate" in report
    assert question["question"] in report and "Measured answer" in report and "results.png" in report
    assert (out / "results.png").stat().st_size > 1000

    # finished runs are read back, not retrained
    import twinlm.training

    monkeypatch.setattr(twinlm.training, "pretrain", lambda *a, **k: pytest.fail("a finished run was rerun"))
    again = run_ablation(path, out)
    assert again["table"] == table

    # another question on the same runs measures costs at other lengths: each run keeps both measurements,
    # so the first question reads its timings back instead of retiming them (07 and 08 share a run)
    other = {
        **question,
        "compare": [],
        "measures": [{"name": "cost", "params": {"values": [24], "batch": 2}}],
    }
    (base_run / "other.yaml").write_text(yaml.safe_dump(other))
    second = run_ablation(base_run / "other.yaml", base_run / "out2", runs_dir=out / "runs")
    assert "seconds@24" in second["table"]["scaled"] and "seconds@16" not in second["table"]["scaled"]
    from twinlm.ablation import MEASURES

    taken = dataclasses.replace(
        MEASURES["cost"], run=lambda *a, **k: pytest.fail("a measurement was taken again")
    )
    monkeypatch.setitem(MEASURES, "cost", taken)
    assert run_ablation(path, out)["table"] == table
    assert (
        run_ablation(base_run / "other.yaml", base_run / "out2", runs_dir=out / "runs")["table"]
        == second["table"]
    )
    # measurements written before one entry per parameter set (one per measure) are read back as they are
    import json

    from twinlm.ablation import MEASURES_FILE

    for file in (out / "runs").glob(f"*/{MEASURES_FILE}"):
        entries = json.loads(file.read_text())
        file.write_text(json.dumps({name: kept[0] for name, kept in entries.items()}))
    assert run_ablation(path, out)["table"] == table


def test_learned_positions_past_their_table_are_reported_not_a_crash(base_run):
    from twinlm.ablation import load_ablation, plan_runs, run_variant
    from twinlm.ablation.measures import measure_init_gradients, measure_length
    from twinlm.ablation.runs import prepare_tokenizers

    question = {
        "question": "q",
        "textbook": "t",
        "base": {
            "config": str(base_run / "run.yaml"),
            "overrides": {"model.preset": "tiny-gpt2-small", "model.overrides.num_key_value_heads": None},
        },
        "variants": {"learned": {}, "learned2": {}},
    }
    path = base_run / "learned.yaml"
    path.write_text(yaml.safe_dump(question))
    config = load_ablation(path)
    planned = plan_runs(config, base_run / "learned" / "runs")
    prepare_tokenizers(planned)
    run_variant(config, planned[0])
    values = measure_length(planned[0].run_dir, {}, {"factors": [1, 4], "blocks": 2})
    assert (
        values["ppl@1L"] > 1 and values["ppl@4L"] is None and "max_position_embeddings" in values["note@4L"]
    )
    # gradients at initialisation: one norm per layer, finite and positive, the same for the same seed
    grads = measure_init_gradients(planned[0].run_dir, {}, {})
    layers = [k for k in grads if k.startswith("init_grad_L")]
    assert len(layers) == 2 and all(0 < grads[k] < float("inf") for k in layers)
    assert measure_init_gradients(planned[0].run_dir, {}, {}) == grads


def test_bad_ablation_configs(tmp_path, base_run):
    from twinlm.ablation import load_ablation

    good = {
        "question": "q",
        "textbook": "t",
        "base": {"config": str(base_run / "run.yaml")},
        "variants": {"a": {}, "b": {}},
    }
    for change, message in (
        ({"variants": {"a": {}}}, "variants"),
        ({"seeds": [0]}, "seeds"),
        ({"measures": [{"name": "nope"}]}, "unknown measure"),
        ({"expect": "c"}, "expect='c' is not a variant"),
        ({"compare": [{"better": "a", "worse": "z"}]}, "compare names"),
        ({"base": {"config": "missing.yaml"}}, "base.config 'missing.yaml' does not exist"),
    ):
        path = tmp_path / "q.yaml"
        path.write_text(yaml.safe_dump({**good, **change}))
        with pytest.raises(TwinLMError, match=message):
            load_ablation(path)


def test_runs_are_named_by_what_they_compute_and_share_tokenizers(tmp_path, base_run):
    from twinlm.ablation import load_ablation, plan_runs

    run = yaml.safe_load((base_run / "run.yaml").read_text())
    run["tokenizer"] = {"train": {"type": "bpe", "vocab_size": 300}}
    (tmp_path / "train-tok.yaml").write_text(yaml.safe_dump(run))
    question = {
        "question": "q",
        "textbook": "t",
        "base": {"config": str(tmp_path / "train-tok.yaml")},
        "variants": {
            "wp": {"tokenizer.train.type": "wordpiece"},
            "a": {},
            "same-as-a": {"model.overrides.hidden_size": run["model"]["overrides"]["hidden_size"]},
            "b": {"model.overrides.hidden_act": "relu"},
        },
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(question))
    planned = {(r.variant, r.seed): r for r in plan_runs(load_ablation(path), tmp_path / "runs")}
    # one tokenizer per tokenizer setting, shared by every seed and variant that keeps it
    assert planned["a", 0].group.folder == planned["b", 1].group.folder != planned["wp", 0].group.folder
    assert planned["a", 0].group.folder.parent == tmp_path / "runs" / "tokenizers"
    extra = dict(planned["a", 0].extra)
    assert extra["tokenizer.path"] == str(planned["a", 0].group.folder) and extra["tokenizer.train"] is None
    # a variant that spells out the default is the same run (trained once); seeds and changes are not
    assert planned["a", 0].run_dir == planned["same-as-a", 0].run_dir
    dirs = {planned[v, s].run_dir for v in ("a", "b", "wp") for s in (0, 1)}
    assert len(dirs) == 6 and all(d.parent == tmp_path / "runs" for d in dirs)
    assert dict(planned["b", 0].extra)["output_dir"] == str(planned["b", 0].run_dir)


def test_runs_from_other_pretrained_weights_are_other_runs(tmp_path, base_run):
    """Continued pretraining in a question: the run's name covers the starting weights (two folders of the
    same shape are two runs, the same folder again the same run); a Hub repo is refused (its branch moves)."""
    import torch

    from twinlm import TwinLMConfig, TwinLMForCausalLM
    from twinlm.ablation import load_ablation, plan_runs
    from twinlm.errors import TwinLMError
    from twinlm.tokenization import load_tokenizer

    run = yaml.safe_load((base_run / "run.yaml").read_text())
    tokenizer = load_tokenizer(base_run / "bpe")
    config = TwinLMConfig.from_preset(
        "tiny-modern-decoder", **run["model"]["overrides"], vocab_size=len(tokenizer)
    )
    for seed in (0, 1):
        torch.manual_seed(seed)
        TwinLMForCausalLM(config).save_pretrained(tmp_path / f"start{seed}")
        tokenizer.save_pretrained(tmp_path / f"start{seed}")
    run["model"] = {"from_pretrained": str(tmp_path / "start0")}
    run["tokenizer"] = {"path": str(tmp_path / "start0")}
    (tmp_path / "continue.yaml").write_text(yaml.safe_dump(run))
    question = {
        "question": "q",
        "textbook": "t",
        "base": {"config": str(tmp_path / "continue.yaml")},
        "variants": {
            "a": {},
            "same-as-a": {"model.from_pretrained": str(tmp_path / "start0")},
            "b": {"model.from_pretrained": str(tmp_path / "start1")},
        },
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(question))
    planned = {(r.variant, r.seed): r for r in plan_runs(load_ablation(path), tmp_path / "runs")}
    assert planned["a", 0].run_dir == planned["same-as-a", 0].run_dir != planned["b", 0].run_dir

    question["variants"]["hub"] = {"model.from_pretrained": "someone/model"}
    path.write_text(yaml.safe_dump(question))
    with pytest.raises(TwinLMError, match="is a Hub repo, whose revision may move"):
        plan_runs(load_ablation(path), tmp_path / "runs")


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_attention_map_for_both_variants(tmp_path, kind, capsys):
    from test_finetune import build_checkpoint

    from twinlm.cli import main

    ckpt = build_checkpoint(tmp_path / kind, kind=kind)
    out = tmp_path / "map.png"
    assert main(["attention-map", str(ckpt), "the cat sees the river", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000 and "2 layers x" in capsys.readouterr().out
    from twinlm.attention_map import attention_weights

    tokens, weights, whole = attention_weights(str(ckpt), "the cat sees the river")
    assert weights.shape[-1] == len(tokens) == whole and weights.sum(-1).sub(1).abs().max() < 1e-5
    # a folder as --out gets attention_map.png inside it; a long text is cut, and the map says so
    folder = tmp_path / "maps"
    folder.mkdir()
    long_text = " ".join(["the cat sees the river"] * 30)
    assert main(["attention-map", str(ckpt), long_text, "--out", str(folder), "--max-tokens", "16"]) == 0
    shown = capsys.readouterr().out
    assert (folder / "attention_map.png").is_file() and list(folder.iterdir()) == [
        folder / "attention_map.png"
    ]
    assert "the map shows the first 16" in shown and "over 16 tokens" in shown
    assert main(["attention-map", str(ckpt), "x", "--out", str(tmp_path / "map")]) == 2  # no image suffix
    assert "give an image file" in capsys.readouterr().err
    if kind == "bpe":  # causal: no weight on future tokens
        assert weights.triu(1).abs().max() == 0
    assert main(["attention-map", str(tmp_path), "x"]) == 2
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (ckpt / name).unlink(missing_ok=True)
    assert main(["attention-map", str(ckpt), "x"]) == 2
    assert "no loadable tokenizer" in capsys.readouterr().err


def test_shipped_questions_validate_at_every_scale():
    from twinlm.ablation import load_ablation
    from twinlm.ablation.config import DEFAULT_SCALES, load_scales

    shipped = sorted((ROOT / "configs" / "ablations").glob("*.yaml"))
    assert len(shipped) == 19  # 01-13, and the classic questions no config answered before (14-19)
    scales = load_scales(ROOT / DEFAULT_SCALES)
    assert {"tiny", "small"} <= set(scales)
    for path in shipped:
        for scale in (None, *scales):
            config = load_ablation(path, scale=scale, scales_file=ROOT / DEFAULT_SCALES)
            assert len(config.seeds) >= 2 and config.textbook, (path, scale)
            assert all(
                c.source and c.published for c in config.compare if c.source != "(a check, not a claim)"
            ), (
                path,
                "every textbook claim cites its source and the published result",
            )
        small = load_ablation(path, scale="small", scales_file=ROOT / DEFAULT_SCALES)
        assert len(small.seeds) >= 3 and small.base.config == scales["small"].config


def test_shipped_questions_pass_the_checks_before_the_first_run_at_every_scale(tmp_path, monkeypatch):
    """What `twinlm ablate` checks before anything trains (every variant's run and model config, every
    measure against each model: a cost sweep's widths, a head count against the KV heads, a position table
    against the sequence), for every shipped question at every scale: a mistake here would stop `make ablate`
    or `make ablate-small` at its first question."""
    from conftest import SHARED_DATA

    from twinlm.ablation import prepare_ablation
    from twinlm.ablation.config import DEFAULT_SCALES, load_scales

    monkeypatch.chdir(ROOT)  # the questions name their configs and data relative to the repository root
    scales = [
        name
        for name, scale in load_scales(ROOT / DEFAULT_SCALES).items()
        if name == "tiny" or SHARED_DATA.is_dir()  # the other scales read ../shared/data/corpus-modern
    ]
    for path in sorted((ROOT / "configs" / "ablations").glob("*.yaml")):
        for scale in scales:
            folder = tmp_path / scale / path.stem
            question = prepare_ablation(path, folder / "out", folder / "runs", scale=scale)
            assert len(question.planned) >= 2 * len(question.config.seeds), (path.name, scale)


def test_where_a_run_writes_logs_or_publishes_does_not_make_it_another_run(tmp_path, monkeypatch):
    """A run is named by what it computes: logging, Hub settings (a setting added to the Hub section by a new
    version, too) and the output folder leave its name alone; the budget does not."""
    from twinlm.ablation import prepare_ablation

    monkeypatch.chdir(ROOT)
    question = ROOT / "configs" / "ablations" / "02-scaled-attention.yaml"

    def names(*overrides: str) -> list[str]:
        planned = prepare_ablation(
            question, tmp_path / "out", tmp_path / "runs", overrides, scale="tiny"
        ).planned
        return [run.run_dir.name for run in planned]

    plain = names()
    assert (
        names(
            "base.overrides.logging.report_to=tensorboard",
            "base.overrides.hub.private=true",
            "base.overrides.hub.checkpoint_revision=step-{step}",
        )
        == plain
    )
    assert names("base.overrides.training.max_steps=7") != plain


def test_index_of_several_questions(tmp_path):
    from twinlm.ablation import write_index

    result = {
        "question": "Does it matter?",
        "answer": {"text": "a is best", "claims": [{"verdict": "agrees"}, {"verdict": "disagrees"}]},
        "table": {
            "a": {"train_seconds": {"mean": 10.0, "n": 3}},
            "b": {"train_seconds": {"mean": 20.0, "n": 3}},
        },
    }
    path = write_index({"01-q": result, "02-q": {**result, "table": {}}}, {"01-q": 12.3}, tmp_path)
    text = path.read_text()
    # what its runs cost (3 seeds x 10 s + 3 x 20 s), and what this invocation took (read back: none)
    assert "[Does it matter?](01-q/report.md) | a is best | 1 / 1 / 0 / 0 / 0 / 0 | 90 | 12 |" in text
    assert "(02-q/report.md) | a is best | 1 / 1 / 0 / 0 / 0 / 0 | n/a | n/a |" in text
    assert "Total wall time of this invocation: 12 s over 1 question(s)" in text


def test_runs_share_a_tokenizer_the_base_configures(base_run):
    """The base trains its tokenizer (settings in its overrides); every later run loads the first run's."""
    from twinlm.ablation import run_ablation

    run = yaml.safe_load((base_run / "run.yaml").read_text())
    run["tokenizer"] = {"train": {"type": "bpe", "vocab_size": 300}}
    run["training"].update(max_steps=2, eval_every=0)
    (base_run / "train-tok.yaml").write_text(yaml.safe_dump(run))
    question = {
        "question": "q",
        "textbook": "t",
        "base": {
            "config": str(base_run / "train-tok.yaml"),
            "overrides": {"tokenizer.train.min_frequency": 1},
        },
        "variants": {"a": {}, "b": {"model.overrides.hidden_act": "relu"}},
    }
    (base_run / "share.yaml").write_text(yaml.safe_dump(question))
    result = run_ablation(base_run / "share.yaml", base_run / "share")
    tokenizers = [t for t in (base_run / "share" / "runs" / "tokenizers").iterdir() if t.is_dir()]
    assert len(tokenizers) == 1  # trained once, before the first run
    for entry in result["runs"]:
        config = yaml.safe_load((Path(entry["run_dir"]) / "run_config.yaml").read_text())
        assert config["tokenizer"]["path"] == str(tokenizers[0]) and config["tokenizer"]["train"] is None


def _table(rows: dict[str, dict[str, list[float]]]) -> dict:
    from twinlm.stats import summarize

    return {v: {k: dataclasses.asdict(summarize(x)) for k, x in r.items()} for v, r in rows.items()}


def test_answers_and_claims_follow_the_paired_test_and_the_learning_gate(tmp_path, base_run):
    from scipy.stats import ttest_rel

    from twinlm.ablation import answer, load_ablation

    question = {
        "question": "q",
        "textbook": "t",
        "expect": "a",
        "base": {"config": str(base_run / "run.yaml")},
        "variants": {"a": {}, "b": {}, "flat": {}},
        "seeds": [0, 1, 2],
        "measures": [{"name": "cost", "params": {"values": [64]}}],
        "compare": [
            {
                "better": "a",
                "worse": "b",
                "source": "Someone et al. 2020, Table 1",
                "published": "a: 3.1 vs b: 3.4",
            },
            {"better": "b", "worse": "a"},
            {"better": "a", "worse": "flat"},
            {"better": "flat", "worse": "a", "metric": "seconds@64"},
        ],
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(question))
    config = load_ablation(path)
    unigram = [6.0, 6.0, 6.0]
    a, b = [4.0, 4.1, 3.9], [4.5, 4.7, 4.6]
    table = _table(
        {
            "a": {"val_loss": a, "unigram_entropy": unigram, "seconds@64": [1.0, 1.1, 1.2]},
            "b": {"val_loss": b, "unigram_entropy": unigram, "seconds@64": [1.0, 1.0, 1.0]},
            "flat": {
                "val_loss": [5.9, 5.8, 5.85],
                "unigram_entropy": unigram,
                "seconds@64": [0.5, 0.6, 0.55],
            },
        }
    )
    ans = answer(config, table)
    p_value = ttest_rel(a, b).pvalue
    assert ans["measurable"] == (p_value < 0.05) and ans["winner"] == ("a" if p_value < 0.05 else None)
    assert f"p = {p_value:.3g}" in ans["text"] and "paired t-test over 3 seeds" in ans["text"]
    assert "flat did not learn at this budget (validation loss 5.850 vs unigram 6.000 nats)" in ans["text"]
    assert ans["withheld"] == ["flat"]
    claims = ans["claims"]
    assert claims[0]["verdict"] == "agrees" and claims[0]["source"] == "Someone et al. 2020, Table 1"
    assert claims[1]["verdict"] == "disagrees"
    assert claims[2]["verdict"] == "withheld"  # a quality claim about a variant that did not learn
    assert claims[3]["verdict"] == "agrees"  # cost is measured whatever the model learned
    # the only variant that learned is the answer's subject; the others are named as not having learned
    table["b"]["val_loss"] = dataclasses.asdict(__import__("twinlm.stats").stats.summarize([5.95, 5.9, 5.9]))
    only = answer(config, table)
    assert only["text"].startswith("only a learned at this budget: b did not learn") and only["winner"] == "a"
    assert "flat did not learn" in only["text"] and not only["measurable"]
    # the reference variant (the first) did not learn: no answer at this scale
    table["a"]["val_loss"] = dataclasses.asdict(__import__("twinlm.stats").stats.summarize([5.9, 5.9, 5.95]))
    assert answer(config, table)["text"].startswith("no answer at this scale: a did not learn")


def test_what_is_measured_at_initialisation_is_not_gated(tmp_path, base_run):
    """Gradient norms at initialisation do not depend on what the model learned: a claim about them is judged
    even when a variant did not learn (Xiong et al.'s post-LN gradients, question 03)."""
    from twinlm.ablation import answer, load_ablation

    question = {
        "question": "q",
        "textbook": "t",
        "base": {"config": str(base_run / "run.yaml")},
        "variants": {"pre": {}, "post": {}},
        "seeds": [0, 1, 2],
        "measures": [{"name": "init_gradients"}],
        "compare": [{"better": "pre", "worse": "post", "metric": "init_grad_last_over_first"}],
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(question))
    unigram = [6.0, 6.0, 6.0]
    table = _table(
        {
            "pre": {
                "val_loss": [4.0, 4.1, 3.9],
                "unigram_entropy": unigram,
                "init_grad_last_over_first": [0.4, 0.45, 0.5],
            },
            "post": {
                "val_loss": [5.9, 5.95, 5.9],
                "unigram_entropy": unigram,
                "init_grad_last_over_first": [1.0, 1.01, 1.02],
            },
        }
    )
    (claim,) = answer(load_ablation(path), table)["claims"]
    assert claim["verdict"] == "agrees", claim


def test_claims_of_no_difference_and_of_closeness(tmp_path, base_run):
    """'No difference' claims (Vaswani et al.'s learned vs sinusoidal positions, RMSNorm vs LayerNorm) are
    equivalence claims within a margin, not 'X beats Y'; 'closer' claims judge the distance to a target
    (Xiong et al.: Pre-LN's gradient ratio about 1, Post-LN's far from it) whichever side it lies on."""
    from twinlm.ablation import answer, load_ablation
    from twinlm.ablation.report import format_report

    question = {
        "question": "q",
        "textbook": "t",
        "base": {"config": str(base_run / "run.yaml")},
        "variants": {"a": {}, "same": {}, "near": {}, "far": {}},
        "seeds": [0, 1, 2],
        "measures": [{"name": "init_gradients"}],
        "compare": [
            {"better": "a", "worse": "same", "kind": "no difference", "margin": 0.02},
            {"better": "a", "worse": "far", "kind": "no difference", "margin": 0.02},
            {"better": "a", "worse": "near", "kind": "no difference", "margin": 0.02},
            {
                "better": "a",
                "worse": "far",
                "kind": "closer",
                "target": 1.0,
                "metric": "init_grad_last_over_first",
            },
            {
                "better": "far",
                "worse": "a",
                "kind": "closer",
                "target": 1.0,
                "metric": "init_grad_last_over_first",
            },
        ],
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(question))
    config = load_ablation(path)
    unigram = [6.0, 6.0, 6.0]
    table = _table(
        {
            "a": {
                "val_loss": [4.0, 4.1, 3.9],
                "unigram_entropy": unigram,
                "init_grad_last_over_first": [1.02, 0.97, 1.05],
            },
            # the same within 0.02 nats, seed by seed: the interval of the difference lies inside the margin
            "same": {
                "val_loss": [4.003, 4.104, 3.902],
                "unigram_entropy": unigram,
                "init_grad_last_over_first": [1.0, 1.0, 1.1],
            },
            # 0.3 nats worse in every seed: significant, far beyond the margin
            "far": {
                "val_loss": [4.3, 4.41, 4.19],
                "unigram_entropy": unigram,
                "init_grad_last_over_first": [0.40, 0.45, 0.5],
            },
            # no significant gap, but three noisy seeds cannot show the two the same within 0.02
            "near": {
                "val_loss": [4.1, 3.95, 3.99],
                "unigram_entropy": unigram,
                "init_grad_last_over_first": [1.0, 1.0, 1.0],
            },
        }
    )
    claims = answer(config, table)["claims"]
    assert [c["verdict"] for c in claims] == ["agrees", "disagrees", "inconclusive", "agrees", "disagrees"]
    assert "the same within ±0.02" in claims[0]["text"] and "distance to 1" in claims[3]["text"]
    # the report states each claim as what it says, not as 'a beats b'
    report = format_report(config, {"table": table, "answer": answer(config, table)}, [])
    assert "| a and same do not differ on val_loss (within ±0.02) |" in report
    assert (
        "| a lies closer than far to 1 on init_grad_last_over_first |" in report
        and "inconclusive (neither shown the same" in report
    )
    assert "NOT reproduced (a gap beyond the margin)" in report and "two one-sided tests at 0.05" in report
    assert "90% CI" in claims[0]["text"]  # (not 'the opposite' of no difference)
    # a claim kind's setting is asked for by name, and refused on another kind
    for claim, message in (
        ({"kind": "no difference"}, "needs `margin`"),
        ({"kind": "closer"}, "needs `target`"),
        ({"margin": 0.1}, "`margin` belongs to claims of kind 'no difference'"),
        ({"kind": "closer", "target": 1.0, "lower_is_better": False}, "lower_is_better has no meaning"),
    ):
        path.write_text(yaml.safe_dump({**question, "compare": [{"better": "a", "worse": "far", **claim}]}))
        with pytest.raises(TwinLMError, match=re.escape(message)):
            load_ablation(path)


def test_the_unigram_reference_follows_the_data_files_with_a_given_tokenizer(tmp_path):
    """The learning gate's reference (the unigram cross-entropy of the validation tokens) is cached per
    tokenizer and data: with a given tokenizer (`tokenizer.path`, whose key hashes only its own files), a data
    file rewritten with other text gives a new reference, not the cached one of the old text."""
    import random

    from twinlm.ablation.runs import PlannedRun, TokenizerGroup, unigram_entropy
    from twinlm.tokenization import train_tokenizer
    from twinlm.training.config import load_run_config

    words = [f"w{i}" for i in range(300)]
    data = tmp_path / "data.txt"

    def write(skew: float, seed: int) -> None:  # Zipf-like text; skew sets how peaked the unigram is
        rng = random.Random(seed)
        weights = [1.0 / (rank + 1) ** skew for rank in range(len(words))]
        data.write_text("\n\n".join(" ".join(rng.choices(words, weights, k=12)) for _ in range(600)) + "\n")

    write(skew=0.3, seed=0)
    train_tokenizer("wordpiece", files=[data], vocab_size=400, out_dir=tmp_path / "tok", model_max_length=64)
    model = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    settings = {
        "model": {"preset": "tiny-bert-base", "overrides": {**model, "max_position_embeddings": 64}},
        "tokenizer": {"path": str(tmp_path / "tok")},
        "data": {
            "sources": [str(data)],
            "seq_len": 32,
            "validation_size": 30,
            "cache_dir": str(tmp_path / "cache"),
        },
        "training": {"max_steps": 2},
        "output_dir": str(tmp_path / "unused"),
    }

    def entropy() -> float:
        cfg = load_run_config(settings)
        group = TokenizerGroup("given", tmp_path / "tok", cfg, False, given=True)
        return unigram_entropy(PlannedRun("v", 0, cfg, tmp_path / "runs" / "v", "fp", group))

    flat = entropy()
    assert entropy() == flat  # read back from its cache
    write(skew=1.5, seed=1)  # the same file, other text: a far more peaked unigram
    peaked = entropy()
    assert peaked < flat - 0.5, (flat, peaked)


def test_a_shared_tokenizer_follows_files_a_recursive_glob_reaches(tmp_path):
    """The key of a shared tokenizer (ablate, sweep) and an ablation run's data fingerprint hash the files the
    loader reads: `dir/**/*.txt` reaches files at any depth, as the loader does (the key hashed none of them
    and kept a tokenizer trained on the old text)."""
    from twinlm.ablation.runs import _local_files
    from twinlm.training.config import load_run_config
    from twinlm.training.loop import shared_tokenizer_key

    deep = tmp_path / "corpus" / "a" / "b" / "deep.txt"
    deep.parent.mkdir(parents=True)
    deep.write_text("alpha beta gamma\n")
    settings = {
        "model": {"preset": "tiny-bert-base"},
        "tokenizer": {"train": {"type": "wordpiece", "vocab_size": 300}},
        "data": {"sources": [str(tmp_path / "corpus" / "**" / "*.txt")]},
        "output_dir": str(tmp_path / "unused"),
    }
    cfg = load_run_config(settings)
    assert _local_files(cfg) == [str(deep)]
    before = shared_tokenizer_key(cfg, causal=False)
    deep.write_text("delta epsilon zeta, another text\n")
    assert shared_tokenizer_key(cfg, causal=False) != before
