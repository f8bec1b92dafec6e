"""Pretraining: config validation, schedules, exact resume, interruption, export, multi-process runs.

Runs use a tiny model on an excerpt of ../shared/data/corpus/ so that each takes seconds on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port
from transformers import AutoModelForCausalLM

from twinlm.errors import TwinLMError
from twinlm.training import load_run_config, parse_overrides, pretrain
from twinlm.training.checkpoint import list_checkpoints, resolve_checkpoint
from twinlm.training.optim import build_scheduler, param_groups
from twinlm.training.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
EXCERPT_BYTES = 150_000
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"shared corpus not found at {CORPUS}")

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT / "src"),
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An excerpt of the shared corpus, and a BPE and a WordPiece tokenizer trained on it."""
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    from twinlm.tokenization import train_tokenizer

    base = tmp_path_factory.mktemp("training")
    text = (
        (CORPUS / "moby_dick.txt").read_bytes()[200_000 : 200_000 + EXCERPT_BYTES].decode("utf-8", "ignore")
    )
    excerpt = base / "excerpt.txt"
    excerpt.write_text(text)
    for kind in ("bpe", "wordpiece"):
        train_tokenizer(
            kind,
            files=[excerpt],
            vocab_size=512,
            out_dir=base / kind,
            model_max_length=64,
            show_progress=False,
        )
    return {
        "base": base,
        "excerpt": excerpt,
        "bpe": base / "bpe",
        "wordpiece": base / "wordpiece",
        "cache": base / "cache",
    }


def run_config(assets: dict[str, Path], out: Path, causal: bool = True, **training: object) -> dict:
    train = {
        "batch_size": 4,
        "grad_accum": 1,
        "max_steps": 6,
        "lr": 3e-3,
        "warmup_steps": 1,
        "schedule": "cosine",
        "log_every": 1,
        "eval_every": 0,
        "eval_batches": 4,
        "save_every": 3,
        "keep_last": 3,
        "seed": 1,
    }
    train.update(training)
    return {
        "model": {"preset": "tiny-gpt2-small" if causal else "tiny-bert-base", "overrides": dict(TINY)},
        "tokenizer": {"path": str(assets["bpe" if causal else "wordpiece"])},
        "data": {
            "sources": [str(assets["excerpt"])],
            "seq_len": 32,
            "validation_size": 30,
            "cache_dir": str(assets["cache"]),
            "num_proc": 1,
        },
        "training": train,
        "output_dir": str(out),
    }


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl") if m.get("loss") is not None}


# ------------------------------------------------------------------------------------------------
# Config: errors name the key
# ------------------------------------------------------------------------------------------------
def test_overrides_parse_and_apply(assets: dict[str, Path], tmp_path: Path) -> None:
    assert parse_overrides(
        ["--training.lr", "3e-4", "training.betas=[0.9, 0.95]", "--training.compile=true"]
    ) == [("training.lr", 3e-4), ("training.betas", [0.9, 0.95]), ("training.compile", True)]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(assets, tmp_path / "out")))
    cfg = load_run_config(
        path,
        ["--training.lr", "3e-4", "model.overrides.num_hidden_layers=2", "training.mixed_precision=none"],
    )
    assert cfg.training.lr == 3e-4 and cfg.model.overrides["num_hidden_layers"] == 2
    assert cfg.training.mixed_precision == "no"
    for shipped in sorted((ROOT / "configs" / "pretrain").glob("*.yaml")):
        loaded = load_run_config(shipped)
        assert (loaded.training.max_steps or 0) > 0 or loaded.training.max_minutes, shipped


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("training.lrr=1", "training.lrr"),
        ("training.max_steps=many", "training.max_steps"),
        ("training.max_steps=null", "training.max_steps"),  # no end: neither max_steps nor max_minutes
        ("training.max_minutes=0", "training.max_minutes"),
        ("logging.report_to=mlflow", "logging.report_to"),
        ("bogus.key=1", "bogus"),
        ("tokenizer.path=/no/such/tokenizer", "tokenizer.path"),
        ("training.resume_from_checkpoint=/no/such/ckpt", "training.resume_from_checkpoint"),
    ],
)
def test_bad_config_names_the_key(assets: dict[str, Path], tmp_path: Path, override: str, named: str) -> None:
    with pytest.raises(TwinLMError, match=named.replace(".", r"\.")):
        load_run_config(run_config(assets, tmp_path), [override])


def test_cli_takes_dotted_overrides_and_reports_bad_keys(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from twinlm.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(assets, tmp_path / "out")))
    assert main(["pretrain", "--config", str(path), "--training.lr", "3e-4", "--training.lrr", "3"]) == 2
    err = capsys.readouterr().err
    assert "training.lrr" in err and "training.lr:" not in err


def test_missing_config_file() -> None:
    with pytest.raises(TwinLMError, match="does not exist"):
        load_run_config("configs/pretrain/no-such-run.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.overrides.hidden_sise=64"], "hidden_sise"),  # unknown model field, with a suggestion
        (["model.overrides.vocab_size=100"], "smaller than the tokenizer"),
        (["data.seq_len=128"], "max_position_embeddings"),  # learned positions end at 64
        (["model.preset=no-such-preset"], "unknown preset"),
    ],
)
def test_bad_model_settings_fail_before_training(
    assets: dict[str, Path], tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(TwinLMError, match=message):
        pretrain(run_config(assets, tmp_path / "out"), overrides)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_sequence_length_is_checked_before_a_tokenizer_is_trained(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    config = run_config(assets, tmp_path / "out")
    config["tokenizer"] = {"train": {"type": "bpe", "vocab_size": 300}}
    with pytest.raises(TwinLMError, match="max_position_embeddings"):
        pretrain(config, ["data.seq_len=128"])
    assert not (tmp_path / "out" / "tokenizer").exists()


# ------------------------------------------------------------------------------------------------
# Optimizer and schedules
# ------------------------------------------------------------------------------------------------
def test_no_weight_decay_on_biases_and_norms() -> None:
    from twinlm import TwinLMConfig, TwinLMForMaskedLM

    model = TwinLMForMaskedLM(TwinLMConfig.from_preset("tiny-bert-base", **TINY, vocab_size=100))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "norm" in names[id(p)].lower() for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert any("bias" in names[id(p)] for p in no_decay["params"])
    assert any("norm" in names[id(p)].lower() for p in no_decay["params"])


def test_adamw_is_fused_on_cpu_unless_deepspeed_owns_the_step() -> None:
    """transformers' Trainer steps with adamw_torch_fused; so does twinlm wherever torch's kernel runs."""
    from twinlm import TwinLMConfig, TwinLMForMaskedLM
    from twinlm.training.config import TrainingSection
    from twinlm.training.optim import build_optimizer

    model = TwinLMForMaskedLM(TwinLMConfig.from_preset("tiny-bert-base", **TINY, vocab_size=100))
    cfg = TrainingSection(lr=1e-3, max_steps=10)
    assert build_optimizer(model, cfg).defaults["fused"] is True
    assert not build_optimizer(model, cfg, deepspeed=True).defaults["fused"]
    model.get_input_embeddings().weight.grad = torch.ones_like(model.get_input_embeddings().weight)
    build_optimizer(model, cfg).step()  # the fused kernel runs here (a parameter without a gradient too)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "inverse_sqrt", "constant"])
def test_schedules_warm_up_then_decay(schedule: str) -> None:
    from twinlm.training.config import TrainingSection

    cfg = TrainingSection(lr=1.0, warmup_steps=10, max_steps=100, schedule=schedule)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, cfg.max_steps)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[10] == pytest.approx(1.0)  # linear warmup to the peak
    after = {"linear": 0.5, "cosine": 0.5, "inverse_sqrt": math.sqrt(10 / 55), "constant": 1.0}[schedule]
    assert lrs[55] == pytest.approx(after, rel=0.05)
    assert lrs[99] <= lrs[55]


def test_wandb_runs_offline_without_an_api_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from twinlm.training.tracking import prepare_wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert prepare_wandb_mode("wandb", is_main_process=True) == "offline"
    assert os.environ["WANDB_MODE"] == "offline"
    assert "offline" in capsys.readouterr().out
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert prepare_wandb_mode("wandb", is_main_process=True) == "online"
    assert "WANDB_MODE" not in os.environ
    assert prepare_wandb_mode("none", is_main_process=True) is None


def test_offline_wandb_run_is_written_under_the_output_dir(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pretrain(run_config(assets, tmp_path / "out", max_steps=2, save_every=0), ["logging.report_to=wandb"])
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert not (tmp_path / "wandb").exists()


def test_latest_checkpoint_ignores_half_written_ones(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for name, complete in [
        ("checkpoint-2", True),
        ("checkpoint-10", True),
        ("checkpoint-12.tmp", True),
        ("checkpoint-11", False),
    ]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "train_state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-10"
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(TwinLMError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path, str(root / "checkpoint-11"))


def test_flops_and_mfu_inputs() -> None:
    from twinlm import TwinLMConfig, TwinLMForMaskedLM
    from twinlm.training.tracking import model_flops_per_token, parameter_counts, peak_flops_per_device

    # 6N plus the attention term 12 * layers * hidden * seq_len
    assert peak_flops_per_device(123e12) == 123e12
    config = TwinLMConfig.from_preset("tiny-bert-base", vocab_size=100)
    model = TwinLMForMaskedLM(config)
    total, multiplying = parameter_counts(model)
    named = dict(model.named_parameters())  # tied weights once
    lookups = sum(p.numel() for n, p in named.items() if "position" in n or "token_type" in n)
    assert any("position" in n for n in named) and any("token_type" in n for n in named)
    assert multiplying == total - lookups  # position and segment tables are read, not multiplied
    layers, hidden = config.num_hidden_layers, config.hidden_size
    assert model_flops_per_token(model, layers, hidden, 128) == 6 * multiplying + 12 * layers * hidden * 128


# ------------------------------------------------------------------------------------------------
# One process: training, exact resume, interruption, export
# ------------------------------------------------------------------------------------------------
@needs_corpus
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming-mlm"])
def test_resume_reproduces_the_uninterrupted_run(
    assets: dict[str, Path], tmp_path: Path, streaming: bool
) -> None:
    """6 steps straight vs. the checkpoint at step 3 resumed to 6: identical losses (dropout is on; the
    streaming case also masks with the RNG, and must skip the first 3 steps' batches without drawing)."""

    def config_for(out: Path, **training: object) -> dict:
        config = run_config(assets, out, causal=not streaming, **training)
        config["data"]["streaming"] = streaming
        return config

    full = tmp_path / "full"
    summary = pretrain(config_for(full, grad_accum=2))
    assert summary["steps"] == 6 and summary["val_loss"] is not None
    straight = losses(full)
    assert [c.name for c in list_checkpoints(full)] == ["checkpoint-3", "checkpoint-6"]

    # An interrupted copy: it stopped after step 3 (its checkpoint-6 never happened).
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-6")
    shutil.rmtree(cut / "final")
    assert resolve_checkpoint(cut, "latest").name == "checkpoint-3"
    resumed_summary = pretrain(config_for(cut, grad_accum=2, resume_from_checkpoint="latest"))
    resumed = losses(cut)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), (step, resumed, straight)
    assert resumed_summary["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-6)


@needs_corpus
def test_continued_pretraining_starts_from_the_trained_model_and_its_tokenizer(
    assets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """model.from_pretrained: the run starts from the saved model's weights (a step of lr ~0 leaves them as they
    were) and keeps its tokenizer; overrides that keep shapes apply; what cannot continue is one line."""
    from safetensors.torch import load_file

    base = tmp_path / "base"
    pretrain(run_config(assets, base, max_steps=4, save_every=4))

    def continued(out: Path, **model: object) -> dict:
        config = run_config(assets, out, max_steps=2, save_every=0, lr=1e-12, weight_decay=0.0)
        del config["tokenizer"]  # the model's own
        config["model"] = {"from_pretrained": str(base / "final"), **model}
        return config

    out = tmp_path / "continued"
    summary = pretrain(continued(out, overrides={"hidden_dropout_prob": 0.1, "sliding_window": 16}))
    assert summary["steps"] == 2
    before, after = (
        load_file(base / "final" / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0)
    assert (out / "final" / "tokenizer.json").read_bytes() == (base / "final" / "tokenizer.json").read_bytes()
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["hidden_dropout_prob"] == 0.1 and set(config["layer_types"]) == {"sliding_attention"}
    # a from-scratch run of the same shape starts far from the trained model: its first loss is higher
    scratch = pretrain(run_config(assets, tmp_path / "scratch", max_steps=1, save_every=0))
    assert losses(out)[1] < losses(tmp_path / "scratch")[1] - 0.1, (losses(out), scratch)

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    fits = "does not fit the weights of"
    for model, expected in (
        (
            {"overrides": {"intermediate_size": 128}},
            rf"{fits} .*; it differs in intermediate_size=128 \(saved: 64\)",
        ),
        ({"overrides": {"num_hidden_layers": 2}}, rf"{fits} .*weights of the run's model are not in it"),
        (
            {"overrides": {"hidden_size": 64}},
            r"hidden_size=64 changes the shape of every weight .*\(saved: 32\)",
        ),
        ({"overrides": {"vocab_size": 5000}}, rf"{fits} .*; it differs in vocab_size=5000"),
        ({"from_pretrained": str(bert)}, "holds a bert, not a twinlm model: convert it first"),
        ({"from_pretrained": str(tmp_path / "nowhere")}, "is not a folder here, nor a Hub repo id"),
        (
            {"from_pretrained": str(base)},
            r"is a pretraining run: continue from its model, model.from_pretrained=.*final",
        ),
        ({"from_pretrained": str(base / "checkpoints" / "checkpoint-4")}, "holds training state"),
        ({"revision": "step-2"}, "names a Hub revision, and .* is a folder here"),
    ):
        with pytest.raises(TwinLMError, match=expected):
            pretrain(continued(tmp_path / "bad", **model))
    with pytest.raises(TwinLMError, match=r"a trained model's position table cannot grow"):
        pretrain(
            continued(tmp_path / "bad", overrides={"position_embedding_type": "learned"}),
            ["data.seq_len=128"],
        )
    config = continued(tmp_path / "bad")
    with pytest.raises(TwinLMError, match="newly trained tokenizer"):
        pretrain({**config, "tokenizer": {"train": {"vocab_size": 300}}})
    with pytest.raises(TwinLMError, match="objective rtd builds"):
        pretrain({**config, "objective": "rtd"})
    with pytest.raises(TwinLMError, match="only a run from model.from_pretrained may leave both out"):
        pretrain({k: v for k, v in run_config(assets, tmp_path / "bad").items() if k != "tokenizer"})


def _cosine_at(train_seconds: float, budget_s: float, lr: float) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, train_seconds / budget_s)))


@needs_corpus
def test_time_budget_anneals_the_schedule_stops_on_time_and_resumes(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """training.max_minutes (the cramming setting), max_steps null: the cosine schedule's progress is
    training time / budget (LR ~0 at the end), the run stops at the first step past the budget, and a
    resume continues the clock from the checkpoint's training time."""
    budget_s, lr = 2.0, 3e-3
    config = run_config(assets, tmp_path / "full", max_steps=None, max_minutes=budget_s / 60, warmup_steps=0)
    config["training"]["save_every"] = 0
    summary = pretrain(config)
    records = [m for m in read_metrics(tmp_path / "full" / "metrics.jsonl") if m.get("lr") is not None]
    assert [m["step"] for m in records] == list(range(1, summary["steps"] + 1)) and summary["steps"] >= 4
    assert records[-2]["train_seconds"] < budget_s <= records[-1]["train_seconds"]  # stopped on time
    for m in records:  # the LR follows the clock, not the step count
        assert m["lr"] == pytest.approx(_cosine_at(m["train_seconds"], budget_s, lr), rel=1e-6, abs=1e-12)
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and records[0]["lr"] > 0.9 * lr
    saved = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert saved["ended_by"] == "max_minutes" and saved["max_minutes"] == pytest.approx(budget_s / 60)
    assert saved["steps"] == records[-1]["step"] and saved["train_seconds"] >= budget_s
    assert summary["final_model"] is not None and summary["val_loss"] is not None

    # max_steps as an upper bound ends the run (and the schedule) first; resuming without it, the clock
    # goes on from the checkpoint's training time to the same budget.
    cut = str(tmp_path / "cut")
    short = pretrain(config, [f"output_dir={cut}", "training.max_steps=2"])
    assert short["ended_by"] == "max_steps" and short["steps"] == 2 and short["train_seconds"] < budget_s
    assert [m["lr"] for m in read_metrics(Path(cut) / "metrics.jsonl") if "lr" in m][-1] == 0.0
    resumed = pretrain(config, [f"output_dir={cut}", "training.resume_from_checkpoint=latest"])
    after = [m for m in read_metrics(Path(cut) / "metrics.jsonl") if m.get("lr") is not None]
    assert [m["step"] for m in after] == list(range(1, resumed["steps"] + 1)) and resumed["steps"] > 3
    assert after[2]["train_seconds"] > short["train_seconds"]
    for m in after[2:]:
        assert m["lr"] == pytest.approx(_cosine_at(m["train_seconds"], budget_s, lr), rel=1e-6, abs=1e-12)
    assert resumed["ended_by"] == "max_minutes" and after[-2]["train_seconds"] < budget_s


@needs_corpus
@pytest.mark.slow  # a subprocess
def test_sigterm_saves_a_checkpoint_that_resumes_and_exports(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            run_config(
                assets,
                out,
                max_steps=10_000,
                save_every=0,
                log_every=1,
                mixed_precision="bf16",
                gradient_checkpointing=True,
            )
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(config)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "interrupted by SIGTERM" in output
    (checkpoint,) = list_checkpoints(out)
    stopped_at = json.loads((checkpoint / "train_state.json").read_text())["step"]
    assert 1 <= stopped_at < 10_000
    assert not list((out / "checkpoints").glob("*.tmp")) and not (out / "final").exists()

    # The checkpoint is loadable: resume two more steps, then export the model.
    summary = pretrain(
        config,
        [
            "training.resume_from_checkpoint=latest",
            f"training.max_steps={stopped_at + 2}",
            "logging.report_to=tensorboard",
            "logging.project=tb",
        ],
    )
    assert summary["steps"] == stopped_at + 2
    assert list((out / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    final = Path(summary["final_model"])
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()

    # The export loads with the Auto classes in a process that never imports twinlm.
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(final)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(final)!r})\n"
        "ids = t('Call me Ishmael.', return_tensors='pt').input_ids\n"
        "assert m(ids).logits.shape[-1] >= len(t)\n"
        "assert not any(name == 'twinlm' or name.startswith('twinlm.') for name in sys.modules)\n"
        "print('LOADED', type(m).__name__)\n"
    )
    env = _env()
    env.pop("PYTHONPATH")
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert "LOADED TwinLMForCausalLM" in loaded.stdout, loaded.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Two processes: data parallel, DeepSpeed ZeRO-2 and ZeRO-3 (CPU, gloo)
# ------------------------------------------------------------------------------------------------
DP_LAUNCH = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _launch(
    assets: dict[str, Path],
    out: Path,
    launch: list[str],
    env: dict[str, str],
    causal: bool = True,
    overrides: tuple[str, ...] = (),
    processes: int = 2,
    **training: object,
) -> tuple[dict, dict[int, float]]:
    """`accelerate launch --num_processes 2 scripts/pretrain.py` on a written config; (summary, losses)."""
    settings = {"max_steps": 8, "lr": 1e-2, "save_every": 0, "eval_batches": 2, **training}
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(run_config(assets, out, causal=causal, **settings)))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch,
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),  # other jobs on the machine may hold accelerate's default port
        str(ROOT / "scripts" / "pretrain.py"),
        "--config",
        str(config),
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == processes
    return summary, losses(out)


def _assert_learns(summary: dict, curve: dict[int, float]) -> None:
    assert sorted(curve) == list(range(1, 9))
    first, last = (curve[1] + curve[2]) / 2, (curve[7] + curve[8]) / 2
    assert last < first - 0.1, curve
    assert summary["val_loss"] < first, (summary, curve)
    assert Path(summary["final_model"], "model.safetensors").is_file()


@needs_corpus
@pytest.mark.slow
def test_two_process_data_parallel(assets: dict[str, Path], tmp_path: Path) -> None:
    summary, curve = _launch(assets, tmp_path / "run", DP_LAUNCH, _env(ACCELERATE_USE_CPU="1"))
    _assert_learns(summary, curve)
    assert "MULTI" in summary["distributed_type"]


@needs_corpus
@pytest.mark.slow
def test_two_nodes_on_loopback_train_like_two_local_processes(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """The README's multi-node command, 2 machines x 1 process on this one (rendezvous at 127.0.0.1, one
    shared output folder): the same losses, checkpoints and model as 2 processes on one machine."""
    env = _env(ACCELERATE_USE_CPU="1")
    local_summary, local = _launch(assets, tmp_path / "local", DP_LAUNCH, env, save_every=4)

    out = tmp_path / "nodes"
    config = out.with_suffix(".yaml")
    settings = {"max_steps": 8, "lr": 1e-2, "save_every": 4, "eval_batches": 2}
    config.write_text(yaml.safe_dump(run_config(assets, out, **settings)))
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ROOT / "configs" / "accelerate" / "multi-node.yaml"),
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                str(ROOT / "scripts" / "pretrain.py"),
                "--config",
                str(config),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and "MULTI" in summary["distributed_type"]
    assert losses(out) == pytest.approx(local, abs=1e-6)
    assert summary["val_loss"] == pytest.approx(local_summary["val_loss"], abs=1e-6)
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-8").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]  # each node's process wrote its own RNG state into the shared folder


NO_DROPOUT = tuple(
    f"model.overrides.{name}=0.0"
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout_prob")
)


def _cut_before_the_end(source: Path, target: Path) -> Path:
    """A copy of a run of 8 steps as if it had stopped before its last checkpoint (checkpoint-8): it resumes from
    the one before (checkpoint-4 with save_every=4, checkpoint-6 with save_every=2)."""
    shutil.copytree(source, target)
    for name in ("checkpoints/checkpoint-8", "final"):
        shutil.rmtree(target / name)
    (target / "summary.json").unlink()
    return target


@needs_corpus
@pytest.mark.slow
def test_resume_on_another_number_of_processes(assets: dict[str, Path], tmp_path: Path, capsys) -> None:
    """DDP: a checkpoint of 2 processes (batch 4 each) resumes on 1 (batch 4, grad_accum 2: the same global
    batch), and one of 1 resumes on 2. Every process deals from one shuffled order of the blocks, so the data
    position moves (4 micro-batches of 2 x 4 blocks = 8 micro-batches of 4) and the loss curve is the
    uninterrupted run's; a batch that cannot reach the position is refused in one line."""
    env = _env(ACCELERATE_USE_CPU="1")
    two_summary, two = _launch(assets, tmp_path / "two", DP_LAUNCH, env, overrides=NO_DROPOUT, save_every=4)
    one_run = run_config(
        assets, tmp_path / "one", max_steps=8, lr=1e-2, save_every=4, eval_batches=2, grad_accum=2
    )
    one_summary = pretrain(one_run, list(NO_DROPOUT))
    one = losses(tmp_path / "one")
    assert one == pytest.approx(two, abs=1e-4)  # the same blocks in every step, summed in another order

    # 2 processes -> 1
    cut = _cut_before_the_end(tmp_path / "two", tmp_path / "two-to-one")
    resume = ["training.resume_from_checkpoint=latest", *NO_DROPOUT]
    with pytest.raises(TwinLMError, match=r"have read 32 blocks of epoch 0.*training.batch_size=8"):
        pretrain(
            run_config(assets, cut, max_steps=8, lr=1e-2, save_every=4, eval_batches=2, batch_size=3), resume
        )
    capsys.readouterr()
    summary = pretrain(
        run_config(assets, cut, max_steps=8, lr=1e-2, save_every=4, eval_batches=2, grad_accum=2), resume
    )
    assert "resuming 2 process(es)' checkpoint on 1: epoch 0, 32 blocks read (batch 8 of 4 per process)" in (
        capsys.readouterr().out
    )
    resumed = losses(cut)
    for step in (5, 6, 7, 8):
        assert resumed[step] == pytest.approx(two[step], abs=1e-4), (step, resumed, two)
    # (evaluation reads eval_batches per process: compare with the uninterrupted run of as many processes)
    assert summary["val_loss"] == pytest.approx(one_summary["val_loss"], abs=1e-4)
    assert summary["data_sources"] == two_summary["data_sources"]

    # What cannot move is refused before anything loads: streamed data (split by process), DeepSpeed's shards
    cut = _cut_before_the_end(tmp_path / "two", tmp_path / "refused")
    config = run_config(assets, cut, max_steps=8, save_every=4, grad_accum=2)
    with pytest.raises(TwinLMError, match=r"streamed data \(data.streaming\) is split by process"):
        pretrain({**config, "data": {**config["data"], "streaming": True}}, resume)
    (cut / "checkpoints" / "checkpoint-4" / "pytorch_model").mkdir()  # the layout DeepSpeed saves
    with pytest.raises(TwinLMError, match=r"written under DeepSpeed and this run is under plain/DDP"):
        pretrain(config, resume)

    # 1 process -> 2
    cut = _cut_before_the_end(tmp_path / "one", tmp_path / "one-to-two")
    summary, resumed = _launch(assets, cut, DP_LAUNCH, env, overrides=(*resume,), save_every=4)
    for step in (5, 6, 7, 8):
        assert resumed[step] == pytest.approx(one[step], abs=1e-4), (step, resumed, one)
    assert summary["val_loss"] == pytest.approx(two_summary["val_loss"], abs=1e-4)


FSDP2_LAUNCH = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]


def test_fsdp_asked_of_one_cpu_process_is_refused(
    assets: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(TwinLMError, match="asks for FSDP, but accelerate runs one plain process here"):
        pretrain(run_config(assets, tmp_path / "run", max_steps=1))
    assert not (tmp_path / "run" / "checkpoints").exists()


@needs_corpus
@pytest.mark.slow
@pytest.mark.parametrize(
    ("use_cpu", "version", "expected"),
    [("", "2", "each would train alone"), ("1", "1", "runs FSDP on CPU processes only as FSDP2")],
    ids=["no-process-group", "fsdp1"],
)
def test_fsdp_that_cannot_run_here_is_refused_not_run_as_something_else(
    assets: dict[str, Path], tmp_path: Path, use_cpu: str, version: str, expected: str
) -> None:
    """The shipped FSDP config on a CPU without ACCELERATE_USE_CPU=1 (accelerate sets up no process group: the
    2 processes would each train alone), or asking for FSDP1 (GPU-only): refused in one line before any step."""
    out = tmp_path / "run"
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(run_config(assets, out, max_steps=2)))
    env = _env(**({"ACCELERATE_USE_CPU": use_cpu} if use_cpu else {}))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *FSDP2_LAUNCH, "--fsdp_version", version,
        "--num_processes", "2", "--main_process_port", str(free_port()), str(ROOT / "scripts" / "pretrain.py"),
        "--config", str(config),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split(expected)[0][-2000:]
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


@needs_corpus
@pytest.mark.slow
def test_fsdp2_on_cpu_processes_trains_resumes_and_moves_to_another_count(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """FSDP2 through accelerate (the shipped configs/accelerate/fsdp.yaml, ACCELERATE_USE_CPU=1: 2 processes over
    gloo, every parameter sharded as a DTensor): the loss curve of one plain process with the same global batch;
    its sharded checkpoints (torch DCP) resume exactly on 2 processes, on 1 (DCP re-shards the model and AdamW
    state, the data position moves), and a 1-process FSDP checkpoint resumes on 2; the export loads with
    from_pretrained. A checkpoint of another launch is refused in one line."""
    env = _env(ACCELERATE_USE_CPU="1")
    two_summary, two = _launch(
        assets, tmp_path / "two", FSDP2_LAUNCH, env, overrides=NO_DROPOUT, save_every=4
    )
    assert two_summary["distributed_type"] == "DistributedType.FSDP"
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()
    plain = pretrain(
        run_config(
            assets, tmp_path / "plain", max_steps=8, lr=1e-2, save_every=0, eval_batches=2, grad_accum=2
        ),
        list(NO_DROPOUT),
    )
    assert two == pytest.approx(
        losses(tmp_path / "plain"), abs=1e-4
    )  # the same blocks, summed in another order
    exported = AutoModelForCausalLM.from_pretrained(two_summary["final_model"], trust_remote_code=True)
    plain_model = AutoModelForCausalLM.from_pretrained(plain["final_model"], trust_remote_code=True)
    for (name, a), (_, b) in zip(
        exported.state_dict().items(), plain_model.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-4), name  # the whole model gathered from the shards

    resume = ("training.resume_from_checkpoint=latest", *NO_DROPOUT)
    for processes, accum in ((2, 1), (1, 2)):  # 2 -> 2 (exact), 2 -> 1 (the same global batch)
        cut = _cut_before_the_end(tmp_path / "two", tmp_path / f"two-to-{processes}")
        _, resumed = _launch(
            assets,
            cut,
            FSDP2_LAUNCH,
            env,
            overrides=resume,
            processes=processes,
            save_every=2,
            grad_accum=accum,
        )
        for step in (5, 6, 7, 8):
            tolerance = 1e-6 if processes == 2 else 1e-5  # (measured: 0 and 1e-6)
            assert resumed[step] == pytest.approx(two[step], abs=tolerance), (processes, step, resumed, two)

    # the 1-process run's checkpoint at step 6, resumed on 2
    again = _cut_before_the_end(tmp_path / "two-to-1", tmp_path / "one-to-two")
    _, resumed = _launch(assets, again, FSDP2_LAUNCH, env, overrides=resume, save_every=2)
    for step in (7, 8):
        assert resumed[step] == pytest.approx(two[step], abs=1e-5), (step, resumed, two)

    refused = _cut_before_the_end(tmp_path / "two", tmp_path / "refused")
    with pytest.raises(TwinLMError, match=r"written under FSDP and this run is under plain/DDP"):
        pretrain(run_config(assets, refused, max_steps=8, save_every=4, grad_accum=2), list(resume))


@needs_corpus
@pytest.mark.slow
def test_two_process_time_budget(assets: dict[str, Path], tmp_path: Path) -> None:
    """Both processes read one clock (the slowest's step time): the same LR, the same last step."""
    out = tmp_path / "run"
    summary, _ = _launch(
        assets, out, DP_LAUNCH, _env(ACCELERATE_USE_CPU="1"), max_steps=None, max_minutes=0.05, lr=3e-3
    )
    records = [m for m in read_metrics(out / "metrics.jsonl") if m.get("lr") is not None]
    assert summary["ended_by"] == "max_minutes" and summary["steps"] == records[-1]["step"] >= 2
    assert records[-2]["train_seconds"] < 3.0 <= records[-1]["train_seconds"]
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


@needs_corpus
@pytest.mark.slow
def test_two_process_resume_is_exact(assets: dict[str, Path], tmp_path: Path) -> None:
    """Two processes: 6 steps straight vs. resumed from the step-3 checkpoint give the same losses."""
    env = _env(ACCELERATE_USE_CPU="1")
    full = tmp_path / "full"
    _, straight = _launch(assets, full, DP_LAUNCH, env, max_steps=6, save_every=3, lr=3e-3)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-6")
    _, resumed = _launch(
        assets, cut, DP_LAUNCH, env, max_steps=6, save_every=3, lr=3e-3, resume_from_checkpoint="latest"
    )
    assert sorted(resumed) == list(range(1, 7))
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), (step, resumed, straight)


@needs_corpus
@pytest.mark.slow
@pytest.mark.parametrize(("stage", "causal"), [("zero2", True), ("zero3", False)])
def test_two_process_deepspeed(assets: dict[str, Path], tmp_path: Path, stage: str, causal: bool) -> None:
    launch = ["--config_file", str(ROOT / "configs" / "accelerate" / f"deepspeed-{stage}.yaml")]
    env = _env()
    env.pop("ACCELERATE_USE_CPU", None)
    summary, curve = _launch(assets, tmp_path / "run", launch, env, causal=causal)
    _assert_learns(summary, curve)
    assert "DEEPSPEED" in summary["distributed_type"]


@needs_corpus
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_resumes_on_another_number_of_processes(
    assets: dict[str, Path], tmp_path: Path, stage: str
) -> None:
    """ZeRO shards its optimizer state by process: a checkpoint of 2 processes resumes on 1 through DeepSpeed's
    universal checkpoint (converted once into checkpoint-N/universal), and that run's checkpoint resumes on 2
    again. Both continue the uninterrupted 2-process loss curve (the same global batch, the data position moved,
    AdamW's moments and step re-sharded): 2 -> 1 from step 4, 1 -> 2 from step 6."""
    launch = ["--config_file", str(ROOT / "configs" / "accelerate" / f"deepspeed-{stage}.yaml")]
    env = _env()
    env.pop("ACCELERATE_USE_CPU", None)
    _, two = _launch(assets, tmp_path / "two", launch, env, overrides=NO_DROPOUT, save_every=4)

    cut = _cut_before_the_end(tmp_path / "two", tmp_path / "two-to-one")
    resume = ("training.resume_from_checkpoint=latest", *NO_DROPOUT)
    _, resumed = _launch(assets, cut, launch, env, overrides=resume, processes=1, save_every=2, grad_accum=2)
    assert (cut / "checkpoints" / "checkpoint-4" / "universal" / "pytorch_model" / "zero").is_dir()
    for step in (5, 6, 7, 8):
        assert resumed[step] == pytest.approx(two[step], abs=1e-5), (step, resumed, two)

    again = _cut_before_the_end(cut, tmp_path / "one-to-two")
    _, resumed = _launch(assets, again, launch, env, overrides=resume, save_every=2)
    for step in (7, 8):
        assert resumed[step] == pytest.approx(two[step], abs=1e-5), (step, resumed, two)


@needs_corpus
def test_resume_with_other_schedule_settings_says_so(assets: dict[str, Path], tmp_path: Path, capsys) -> None:
    """A resume with a longer max_steps recomputes the schedule: the run says so (it is not an exact continuation)."""
    out = tmp_path / "out"
    pretrain(run_config(assets, out, max_steps=4, save_every=4, warmup_steps=5))
    assert "warmup_steps=5 >= training.max_steps=4" in capsys.readouterr().out
    pretrain(run_config(assets, out, max_steps=6, save_every=3, resume_from_checkpoint="latest"))
    said = capsys.readouterr().out
    assert "training.max_steps 4 -> 6" in said and "training.warmup_steps 5 -> 1" in said
    pretrain(run_config(assets, out, max_steps=6, save_every=3, resume_from_checkpoint="latest"))
    assert "since the checkpoint" not in capsys.readouterr().out  # same settings: nothing to say


@pytest.mark.slow  # trains a tokenizer on the whole corpus and packs it
@pytest.mark.parametrize("name", ["cpu-30min-mlm-books-sst2", "cpu-30min-clm-books-sst2"])
def test_the_cpu_recipes_run_as_shipped(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The issue-10 recipes read ../shared/data from the repository root (the corpus and SST-2's sentence
    column); two steps instead of 30 minutes."""
    monkeypatch.chdir(ROOT)
    summary = pretrain(
        ROOT / "configs" / "pretrain" / f"{name}.yaml",
        [
            f"output_dir={tmp_path}",
            "training.max_minutes=null",
            "training.max_steps=2",
            "training.eval_batches=2",
        ],
    )
    assert summary["steps"] == 2 and summary["val_loss"] is not None
    assert summary["objective"] == ("masked-lm" if "mlm" in name else "causal-lm")
    vocab = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 8192


MODERN_RECIPES = ["cpu-30min-mlm", "cpu-30min-rtd", "cpu-30min-clm"]  # (-tapt: mlm's, plus SST-2's sentences)
OBJECTIVES = {"mlm": "masked-lm", "rtd": "replaced-token-detection", "clm": "causal-lm"}


@pytest.mark.slow  # reads every corpus-modern file
@pytest.mark.parametrize("name", MODERN_RECIPES)
def test_the_corpus_modern_recipes_run_from_the_repository_root(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Each recipe as shipped (its files, weights, columns, model, tokenizer settings, objective), except that
    every source gives only its first 150 documents, for two steps instead of 30 minutes."""
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / "configs" / "pretrain" / f"{name}.yaml").read_text())
    for source in config["data"]["sources"]:
        source["max_documents"] = 150
    summary = pretrain(
        config,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.validation_size=40",
            "training.max_minutes=null",
            "training.max_steps=2",
            "training.eval_batches=2",
        ],
    )
    assert summary["steps"] == 2 and summary["val_loss"] is not None
    assert summary["objective"] == OBJECTIVES[name.split("-")[2]]
    weights = [s["weight"] for s in config["data"]["sources"]]
    assert [s["weight"] for s in summary["data_sources"]] == pytest.approx(
        [w / sum(weights) for w in weights]
    )
    assert sum(s["tokens_seen"] for s in summary["data_sources"]) == summary["tokens_seen"]
    assert (tmp_path / "run" / "generator").is_dir() == name.endswith("rtd")


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (ROOT / "configs" / "pretrain").glob("gpu-1h-*.yaml"))
)
def test_the_gpu_recipes_build_their_models(name: str) -> None:
    """One GPU, one hour, BERT-Small and BERT-Base shapes on the CPU recipes' mix: the config loads, its
    objective fits its model, and the model has the size its name says (built on the meta device)."""
    from twinlm import TwinLMConfig
    from twinlm.training.objectives import objective_for

    cfg = load_run_config(ROOT / "configs" / "pretrain" / f"{name}.yaml")
    cpu = load_run_config(ROOT / "configs" / "pretrain" / f"cpu-30min-{name.split('-')[2]}.yaml")
    assert cfg.training.max_minutes == 60 and cfg.training.mixed_precision == "bf16"
    assert cfg.data.sources == cpu.data.sources and cfg.objective == cpu.objective
    config = TwinLMConfig.from_preset(cfg.model.preset, **cfg.model.overrides, vocab_size=32768)
    objective = objective_for(cfg.objective, config.is_causal)
    with torch.device("meta"):
        model = objective.build_model(config, cfg)
    expected = {"small": (4, 512), "base": (12, 768)}[name.rsplit("-", 1)[1]]
    assert (config.num_hidden_layers, config.hidden_size) == expected
    sizes = objective.sizes(model, cfg.data.seq_len)
    millions = sizes["parameters"] / 1e6
    assert {"small": 25 < millions < 40, "base": 100 < millions < 140}[name.rsplit("-", 1)[1]], millions
    if cfg.objective == "rtd":  # the generator's own weights (its embeddings are the discriminator's)
        assert 0 < sizes["generator_parameters"] < sizes["parameters"] / 4


def test_a_resume_with_another_lr_and_weight_decay_trains_with_them(
    assets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """Loading the optimizer and scheduler state restores the checkpoint's lr, weight decay, betas and eps;
    the run said "the learning rate follows the new schedule" and went on at the old one. It now does."""
    out = tmp_path / "out"
    pretrain(
        run_config(assets, out, max_steps=2, save_every=2, schedule="constant", lr=1e-3, weight_decay=0.0)
    )
    pretrain(
        run_config(
            assets, out, max_steps=4, save_every=0, schedule="constant", lr=1e-2, weight_decay=0.1,
            resume_from_checkpoint="latest",
        )
    )  # fmt: skip
    said = capsys.readouterr().out
    assert "training.lr 0.001 -> 0.01" in said and "training.weight_decay 0.0 -> 0.1" in said
    rates = {m["step"]: m["lr"] for m in read_metrics(out / "metrics.jsonl") if m.get("lr") is not None}
    assert (
        rates[2] == pytest.approx(1e-3)
        and rates[3] == pytest.approx(1e-2)
        and rates[4] == pytest.approx(1e-2)
    )


def test_a_resume_with_another_batch_size_keeps_the_data_position(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """batch_in_epoch counts micro-batches of the checkpoint's batch size: resumed with twice the batch, the
    run skips the blocks read so far (not twice as many), as it does for another number of processes."""
    import twinlm.training.loop as loop

    out = tmp_path / "out"
    pretrain(run_config(assets, out, max_steps=2, save_every=2, batch_size=4))
    skipped = []
    original = loop._SkipSampler.__init__

    def spy(self, sampler, skip):
        skipped.append(skip)
        original(self, sampler, skip)

    loop._SkipSampler.__init__ = spy
    try:
        pretrain(
            run_config(assets, out, max_steps=3, save_every=0, batch_size=8, resume_from_checkpoint="latest")
        )
    finally:
        loop._SkipSampler.__init__ = original
    assert skipped == [8]  # two batches of 4 blocks were read: 8 blocks, one batch of 8


def test_a_resume_on_other_data_or_another_seed_says_so(
    assets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """The data position (epoch, batch) means the same blocks only with the same data and seed: a resume with
    another training.seed or other sources is not a continuation, and the run says so (it said nothing)."""
    out = tmp_path / "out"
    pretrain(run_config(assets, out, max_steps=2, save_every=2))
    capsys.readouterr()
    pretrain(run_config(assets, out, max_steps=3, save_every=3, resume_from_checkpoint="latest"))
    assert "the training data" not in capsys.readouterr().out  # the same data and seed: nothing to say
    pretrain(run_config(assets, out, max_steps=4, save_every=4, resume_from_checkpoint="latest", seed=2))
    assert "note: the training data (its sources" in capsys.readouterr().out
    other = run_config(assets, out, max_steps=5, save_every=0, resume_from_checkpoint="latest", seed=2)
    other["data"]["sources"] = [str(assets["excerpt"])] * 2  # the excerpt twice: other blocks
    pretrain(other)
    assert "goes on from step 4 and the same place in an epoch of other blocks" in capsys.readouterr().out


def test_a_new_run_in_a_used_folder_writes_its_own_checkpoints(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """A checkpoint of the same step left by an earlier run in output_dir was kept as if it were this run's
    (the summary and a later resume pointed at the other run's weights); only this run's own state is kept."""
    from twinlm.fingerprint import file_digest

    out = tmp_path / "out"
    pretrain(run_config(assets, out, max_steps=2, save_every=2, seed=1))
    weights = out / "checkpoints" / "checkpoint-2" / "model.safetensors"
    first = file_digest(weights)
    summary = pretrain(run_config(assets, out, max_steps=2, save_every=2, seed=2, lr=1e-2))  # a new run
    assert file_digest(weights) != first and Path(summary["checkpoint"]) == weights.parent
    again = file_digest(weights)
    pretrain(
        run_config(assets, out, max_steps=2, save_every=2, seed=2, lr=1e-2, resume_from_checkpoint="latest")
    )
    assert file_digest(weights) == again  # resumed at its last step: that very state, kept as it is


def test_a_new_run_trains_its_tokenizer_again_when_its_settings_changed(
    assets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """OUTPUT_DIR/tokenizer was loaded whatever tokenizer.train said: a new run with another vocabulary size
    trained with the old tokenizer. It is trained again for a new run, kept for a resumed one (its
    checkpoints were trained with it) and for the same settings."""
    out = tmp_path / "out"

    def run(vocab: int, **training: object) -> dict:
        config = run_config(assets, out, causal=False, **{"max_steps": 2, "save_every": 2, **training})
        config["tokenizer"] = {"train": {"type": "wordpiece", "vocab_size": vocab}}
        return pretrain(config)

    def vocab() -> int:
        return json.loads((out / "final" / "config.json").read_text())["vocab_size"]

    run(300)
    assert vocab() == 300
    run(300)
    assert "training it again" not in capsys.readouterr().out and vocab() == 300
    run(400)  # a new run with another vocabulary
    assert (
        "was trained with other tokenizer.train settings or data: training it again"
        in capsys.readouterr().out
    )
    assert vocab() == 400
    run(300, max_steps=3, resume_from_checkpoint="latest")  # resumed: the checkpoints' tokenizer stays
    assert "the resumed run keeps the tokenizer its checkpoints were trained with" in capsys.readouterr().out
    assert vocab() == 400
