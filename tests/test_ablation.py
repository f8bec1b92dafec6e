"""`twinlm ablate`: variants x seeds as normal runs, measurements, an answer judged against the spread."""

from __future__ import annotations

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
    # the answer follows from the numbers: a paired t-test over the two seeds (scipy's, computed here)
    from scipy.stats import ttest_rel

    ans = result["answer"]
    a, b = table["scaled"]["val_loss"], table["unscaled"]["val_loss"]
    assert ans["measurable"] == (ttest_rel(a["values"], b["values"]).pvalue < 0.05)
    assert ("no measurable difference" in ans["text"]) == (not ans["measurable"])
    assert "paired t-test over 2 seeds, p = " in ans["text"]
    claim = ans["claims"][0]
    sa, su = table["scaled"]["saturation"]["values"], table["unscaled"]["saturation"]["values"]
    differences = [x - y for x, y in zip(sa, su, strict=True)]
    if len(set(differences)) == 1:  # no spread between the seeds: no test
        assert claim["verdict"] == "untested"
    else:
        p_value = ttest_rel(sa, su).pvalue
        expected = (
            "no measurable difference"
            if p_value >= 0.05
            else "agrees"
            if sum(differences) < 0
            else "disagrees"
        )
        assert claim["verdict"] == expected and claim["test"]["p_value"] == pytest.approx(p_value)
    report = (out / "report.md").read_text()
    assert "Textbook claim scaled vs unscaled on saturation" in report
    assert question["question"] in report and "Measured answer" in report and "results.png" in report
    assert (out / "results.png").stat().st_size > 1000

    # finished runs are read back, not retrained
    import twinlm.training

    monkeypatch.setattr(twinlm.training, "pretrain", lambda *a, **k: pytest.fail("a finished run was rerun"))
    again = run_ablation(path, out)
    assert again["table"] == table


def test_learned_positions_past_their_table_are_reported_not_a_crash(base_run):
    from twinlm.ablation import load_ablation, run_variant
    from twinlm.ablation.measures import measure_length

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
    run_variant(config, "learned", 0, base_run / "learned" / "runs")
    values = measure_length(
        base_run / "learned" / "runs" / "learned" / "seed0", {}, {"factors": [1, 4], "blocks": 2}
    )
    assert (
        values["ppl@1L"] > 1 and values["ppl@4L"] is None and "max_position_embeddings" in values["note@4L"]
    )


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


def test_variants_share_the_first_runs_tokenizer(tmp_path, base_run):
    from twinlm.ablation import load_ablation
    from twinlm.ablation.runs import _shared_tokenizer

    question = {
        "question": "q",
        "textbook": "t",
        "base": {"config": str(base_run / "run.yaml")},
        "variants": {"wp": {"tokenizer.train.type": "wordpiece"}, "a": {}, "b": {}},
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(question))
    config = load_ablation(path)
    assert _shared_tokenizer(config, "b", 0, tmp_path) == {}  # nothing trained yet: b trains its own
    trained = tmp_path / "a" / "seed0" / "tokenizer"
    trained.mkdir(parents=True)
    (trained / "tokenizer.json").write_text("{}")
    assert _shared_tokenizer(config, "a", 0, tmp_path) == {}  # the run that trains it
    assert _shared_tokenizer(config, "a", 1, tmp_path)["tokenizer.path"] == str(trained)
    assert _shared_tokenizer(config, "b", 0, tmp_path)["tokenizer.path"] == str(trained)
    assert _shared_tokenizer(config, "wp", 0, tmp_path) == {}  # a variant that changes the tokenizer


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


def test_shipped_questions_validate():
    from twinlm.ablation import load_ablation

    shipped = sorted((ROOT / "configs" / "ablations").glob("*.yaml"))
    assert len(shipped) == 13  # 01-12, and 13-long-documents
    for path in shipped:
        config = load_ablation(path)
        assert len(config.seeds) >= 2 and config.textbook, path


def test_index_of_several_questions(tmp_path):
    from twinlm.ablation import write_index

    result = {
        "question": "Does it matter?",
        "answer": {"text": "a is best", "claims": [{"verdict": "agrees"}, {"verdict": "disagrees"}]},
    }
    path = write_index({"01-q": result}, {"01-q": 12.3}, tmp_path)
    text = path.read_text()
    assert "[Does it matter?](01-q/report.md) | a is best | 1 / 1 / 0 / 0 | 12 |" in text
    assert "Total wall time: 12 s over 1 question(s)." in text


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
    run_ablation(base_run / "share.yaml", base_run / "share")
    runs = base_run / "share" / "runs"
    first = runs / "a" / "seed0" / "tokenizer"
    for name, seed in (("a", 1), ("b", 0), ("b", 1)):
        config = yaml.safe_load((runs / name / f"seed{seed}" / "run_config.yaml").read_text())
        assert config["tokenizer"]["path"] == str(first) and config["tokenizer"]["train"] is None
