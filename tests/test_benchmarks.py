"""Smoke test of `make bench` and benchmarks/gpu.sh's Python part: every benchmark at toy size, 1 repeat.

Functional only: the files and tables come out complete and well-formed; no timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SECTIONS = {"training", "generation", "data", "end_to_end", "quality", "long_context"}

pytestmark = pytest.mark.slow  # subprocesses


def _run(script: str, *args: str, out: Path) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and value == value and value > 0


def test_run_all_quick_writes_every_section(tmp_path: Path) -> None:
    stdout = _run("run_all.py", "--quick", out=tmp_path)
    payload = json.loads((tmp_path / "benchmarks.json").read_text())
    machine = payload["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["torch"] and machine["date"]
    sections = {s["name"]: s for s in payload["sections"]}
    assert set(sections) == SECTIONS

    training = sections["training"]["rows"]
    references = ("BertForMaskedLM", "GPT2LMHeadModel", "ModernBertForMaskedLM", "LlamaForCausalLM")
    assert {(r["reference"], r["precision"]) for r in training} == {
        (ref, prec) for ref in references for prec in ("fp32", "bf16 autocast")
    }
    for row in training:
        for key in ("reference tok/s", "twinlm tok/s", "speed-up", "twinlm % of matmul peak", "memory ratio"):
            assert _number(row[key]), (key, row)
        # sparse prediction keeps the masked-LM twin's saved activations below BERT's full-vocabulary logits
        if row["reference"] == "BertForMaskedLM":
            assert row["twinlm activations MiB"] < row["reference activations MiB"], row

    generation = sections["generation"]["rows"]
    assert {(r["batch"], r["cache"]) for r in generation} == {
        (1, "dynamic"),
        (1, "static"),
        (8, "dynamic"),
        (8, "static"),
    }
    for row in generation:  # an error would be recorded rather than raised: here none is expected
        assert row["error"] is None and _number(row["speed-up"]) and row["same tokens"] is True, row

    data = sections["data"]["rows"]
    assert len(data) == 3 and all(_number(r["twinlm / reference (speed)"]) for r in data)
    # the same tokenizers either way (WordPiece's last, tied tokens may differ between any two trainings)
    assert [r["tokens in common"] >= 0.98 for r in data[1:]] == [True, True], data

    e2e = sections["end_to_end"]["rows"]
    assert [r["objective"].split(" ")[0] for r in e2e] == ["causal", "masked"]
    for row in e2e:
        for key in (
            "Trainer wall s",
            "twinlm wall s",
            "twinlm train tok/s",
            "Trainer val loss",
            "twinlm val loss",
        ):
            assert _number(row[key]), (key, row)

    quality = sections["quality"]["rows"]
    assert [r["objective"] for r in quality] == ["clm", "mlm"]
    for row in quality:
        assert _number(row["reference final val loss"])
        # the reference reaches its own final loss at its last evaluation at the latest (in 4 quick steps
        # the loss may not fall: then the evaluation before training, at 0 s, already counts)
        assert isinstance(row["reference s to target"], float) and row["reference s to target"] >= 0
        assert (tmp_path / row["curve"]).stat().st_size > 1000  # a PNG was drawn

    long_context = sections["long_context"]
    rows = long_context["rows"]
    variants = {r["variant"] for r in rows}
    assert {"full", "full, packed documents", "linear"} <= variants and len(variants) == 6
    assert {(r["variant"], r["precision"]) for r in rows} == {
        (v, p) for v in variants for p in ("fp32", "bf16 autocast")
    }
    for row in rows:
        for key in ("fwd+bwd s", "attention fwd+bwd s", "layer activations MiB", "attention activations MiB"):
            assert _number(row[key]), (key, row)
        assert row["attention fwd+bwd s"] < row["fwd+bwd s"]
    slopes = long_context["tables"][
        "Log-log slopes (1 = linear in n, 2 = quadratic), from the second length on"
    ]
    # memory is counted exactly: windows in blocks and linear attention grow linearly, the dense mask faster
    for row in slopes:
        if (
            row["variant"].startswith("window")
            and "dense" not in row["variant"]
            or row["variant"] == "linear"
        ):
            assert row["attention memory slope"] < 1.15, row
        if row["variant"] == "full, packed documents":
            assert row["attention memory slope"] > 1.3, row
    decode = next(
        rows for title, rows in long_context["tables"].items() if title.startswith("Greedy decoding")
    )
    assert {r["variant"] for r in decode} == {"full", "window 8", "linear"}
    cache = {(r["variant"], r["context"]): r["cache MiB"] for r in decode}
    assert cache[("full", 128)] > cache[("full", 32)] and cache[("linear", 128)] == cache[("linear", 32)]
    for name in long_context["files"]:
        assert (tmp_path / name).stat().st_size > 1000  # the plots were drawn
    assert any("window 16 vs full attention" in h["benchmark"] for h in long_context["headline"])

    md = (tmp_path / "benchmarks.md").read_text()
    assert "## Headline" in md and "| benchmark | twinlm / reference |" in md
    assert "| benchmark | twinlm / reference |" in stdout  # the headline table is printed
    assert md.count("\n## ") == len(SECTIONS) + 1


def test_run_all_rejects_unknown_benchmark(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--only", "trainig", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "unknown benchmark(s) trainig" in result.stderr


def test_gpu_bench_code_paths_on_cpu(tmp_path: Path) -> None:
    _run("gpu_bench.py", "--cpu-toy", out=tmp_path)
    rows = json.loads((tmp_path / "gpu-cpu-toy.json").read_text())["sections"][0]["rows"]
    assert not [r for r in rows if "error" in r], rows
    variants = {(r["section"], r["variant"]) for r in rows}
    assert ("twinlm throughput", "sdpa + torch.compile") in variants
    assert any(s.startswith("DeepSpeed ZeRO-2") for s, _ in variants)
    speedups = [r["speed-up"] for r in rows if r.get("speed-up") is not None]
    assert len(speedups) == 2 and all(_number(s) for s in speedups)
