"""Fault injection: damaged and missing checkpoint files, NaN, a full disk, concurrent runs, torn metrics,
failing Hub pushes and SIGKILL at random points. Nothing is lost and a resume stays exact."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_training
import torch
import yaml
from conftest import hold_run_lock, inject_nan_at

from twinlm.errors import TwinLMError
from twinlm.training import pretrain
from twinlm.training.checkpoint import list_checkpoints, verify_checkpoint
from twinlm.training.lock import LOCK_FILE
from twinlm.training.tracking import read_metrics

ROOT, _env, run_config = test_training.ROOT, test_training._env, test_training.run_config
assets = test_training.assets  # the module-scoped fixture: corpus excerpt and tokenizers
pytestmark = test_training.needs_corpus
TIMING = ("tokens_per_s", "mfu", "train_seconds")


def config(assets: dict[str, Path], out: Path, **training: object) -> dict:
    settings = {"max_steps": 6, "save_every": 3, "eval_every": 3, "eval_on_start": True, "log_every": 2}
    return run_config(assets, out, **{**settings, **training})


def metrics_without_timing(out: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The uninterrupted run: checkpoints at 3 and 6, validation at 0, 3 and 6."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    return out, pretrain(config(assets, out, grad_accum=2))


def cut_copy(straight_out: Path, tmp_path: Path) -> Path:
    """A copy of the straight run as if it had been killed after its last checkpoint was written."""
    cut = tmp_path / "cut"
    shutil.copytree(straight_out, cut)
    shutil.rmtree(cut / "final")
    (cut / "summary.json").unlink()
    return cut


def assert_resumed_exactly(
    assets: dict[str, Path], cut: Path, straight: tuple[Path, dict], **extra: object
) -> dict:
    summary = pretrain(config(assets, cut, grad_accum=2, resume_from_checkpoint="latest", **extra))
    assert metrics_without_timing(cut) == metrics_without_timing(straight[0])  # no duplicate, same numbers
    assert summary["val_loss"] == pytest.approx(straight[1]["val_loss"], abs=1e-6)
    assert summary["initial_val_loss"] == pytest.approx(straight[1]["initial_val_loss"], abs=1e-9)
    assert summary["tokens_per_s"] and summary["tokens_per_s"] > 0
    return summary


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xff" * 64  # float32 0xffffffff is NaN
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-model": ("model.safetensors", _truncate),
    "truncated-optimizer": ("optimizer.bin", _truncate),
    "deleted-optimizer": ("optimizer.bin", Path.unlink),
    "truncated-train-state": ("train_state.json", _truncate),
    "nan-model": ("model.safetensors", _nan_bytes),
    "deleted-rng": ("random_states_0.pkl", Path.unlink),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_and_resumes_exactly(
    assets: dict[str, Path],
    straight: tuple[Path, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    damage: str,
) -> None:
    cut = cut_copy(straight[0], tmp_path)
    name, spoil = DAMAGE[damage]
    spoil(cut / "checkpoints" / "checkpoint-6" / name)
    capsys.readouterr()
    assert_resumed_exactly(assets, cut, straight)
    out = capsys.readouterr().out
    assert f"skipping checkpoint-6: {cut / 'checkpoints' / 'checkpoint-6' / name}" in out, out[-2000:]
    assert "resumed from" in out and "checkpoint-3 at step 3" in out
    assert verify_checkpoint(cut / "checkpoints" / "checkpoint-6") is None  # replaced by a good one


@pytest.mark.parametrize("damage", ["truncated-model", "deleted-rng"])
def test_an_explicit_damaged_checkpoint_is_a_one_line_error(
    assets: dict[str, Path], straight: tuple[Path, dict], tmp_path: Path, damage: str
) -> None:
    cut = cut_copy(straight[0], tmp_path)
    name, spoil = DAMAGE[damage]
    target = cut / "checkpoints" / "checkpoint-6"
    spoil(target / name)
    with pytest.raises(TwinLMError, match=name) as err:
        pretrain(config(assets, cut, grad_accum=2, resume_from_checkpoint=str(target)))
    assert "\n" not in str(err.value)


def test_a_checkpoint_of_another_model_size_is_a_one_line_error(
    assets: dict[str, Path], straight: tuple[Path, dict], tmp_path: Path
) -> None:
    cut = cut_copy(straight[0], tmp_path)
    cfg = config(assets, cut, grad_accum=2, resume_from_checkpoint="latest")
    cfg["model"]["overrides"]["intermediate_size"] = 96
    with pytest.raises(TwinLMError, match=r"model\.safetensors holds a model of another shape") as err:
        pretrain(cfg)
    assert "\n" not in str(err.value)


def test_a_torn_last_metrics_line_does_not_stop_a_resume(
    assets: dict[str, Path], straight: tuple[Path, dict], tmp_path: Path
) -> None:
    cut = cut_copy(straight[0], tmp_path)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-6")
    with (cut / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 7, "loss": 4.1')  # a run killed while writing
    assert_resumed_exactly(assets, cut, straight)


def test_a_nan_loss_stops_the_run_and_keeps_the_good_checkpoints(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    inject_nan_at(monkeypatch, 5)
    with pytest.raises(TwinLMError, match="non-finite loss nan and gradient norm nan at step 5") as err:
        pretrain(config(assets, out, keep_last=1))
    assert "\n" not in str(err.value)
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-3"]
    assert verify_checkpoint(out / "checkpoints" / "checkpoint-3") is None
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert not (out / LOCK_FILE).read_text()  # released: a resume may start at once


def test_nonfinite_skip_skips_and_counts_the_step(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject_nan_at(monkeypatch, 2)
    summary = pretrain(config(assets, tmp_path / "run", nonfinite="skip"))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    assert summary["val_loss"] == pytest.approx(summary["val_loss"])  # finite (NaN != NaN)
    from safetensors.torch import load_file

    weights = load_file(Path(summary["final_model"]) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_disk_full_during_a_checkpoint(
    assets: dict[str, Path], straight: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator

    original = Accelerator.save_state
    calls = []

    def fill_disk(self: Accelerator, output_dir: str, **kwargs: object) -> None:
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint: write part of it, then the disk is full
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))
        original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fill_disk)
    out = tmp_path / "run"
    with pytest.raises(
        TwinLMError, match=r"saving checkpoint-6 failed: the disk is full .* MB are free"
    ) as err:
        pretrain(config(assets, out, grad_accum=2))
    assert "\n" not in str(err.value) and "checkpoint-3" in str(err.value)
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-3"]
    monkeypatch.setattr(Accelerator, "save_state", original)
    assert_resumed_exactly(assets, out, straight)


def test_a_second_run_on_the_same_output_dir_is_refused(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_run_lock(out)
    try:
        with pytest.raises(TwinLMError, match=f"in use by another run \\(pid {holder.pid}") as err:
            pretrain(config(assets, out, max_steps=2))
        assert "\n" not in str(err.value) and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_run_is_taken_over(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import socket

    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    summary = pretrain(config(assets, out, max_steps=2, save_every=0, eval_every=0))
    assert summary["steps"] == 2
    assert f"taking over {out / LOCK_FILE} from a run that is gone (pid {dead.pid}" in capsys.readouterr().out
    assert not (out / LOCK_FILE).read_text()


@pytest.mark.parametrize("allow", [False, True])
def test_a_run_whose_hub_pushes_all_fail_says_so(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allow: bool
) -> None:
    import twinlm.hub

    def refuse(*args: object, **kwargs: object) -> str:
        raise twinlm.hub.HubPushError("connection refused by the Hub")

    monkeypatch.setattr(twinlm.hub, "check_can_push", lambda token=None: "hf_not_a_real_token")
    monkeypatch.setattr(twinlm.hub, "upload", refuse)  # every commit of every push fails
    out = tmp_path / "run"
    overrides = ["hub.push=true", "hub.repo_id=tester/never", f"hub.allow_failure={str(allow).lower()}"]
    cfg = config(assets, out, max_steps=2, save_every=0, eval_every=0)
    if allow:
        pretrain(cfg, overrides)
    else:
        with pytest.raises(TwinLMError, match=r"hub: 2 of 2 pushes to tester/never failed .*allow_failure"):
            pretrain(cfg, overrides)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hub_pushes"] == 2 and summary["hub_pushes_ok"] == 0  # the checkpoint and the final model
    assert summary["hub_failures"] == ["connection refused by the Hub"] * 2
    assert (out / "final" / "model.safetensors").is_file()  # the model is kept locally


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing(assets: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL a run (checkpoint every step, so some kills land mid-write) again and again; resuming each
    time, the run ends with the uninterrupted run's metrics and final validation."""
    steps = 30
    cfg = config(assets, tmp_path / "straight", max_steps=steps, save_every=1, eval_every=4, keep_last=2)
    # The reference runs in a subprocess with the same environment (threads) as the killed runs: float
    # reductions must happen in the same order for the metrics to agree bit for bit.
    (tmp_path / "straight.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(tmp_path / "straight.yaml")],
        cwd=ROOT,
        env=_env(),
        check=True,
        capture_output=True,
    )
    reference = json.loads((tmp_path / "straight" / "summary.json").read_text())
    out = tmp_path / "killed"
    cfg = config(
        assets, out, max_steps=steps, save_every=1, eval_every=4, keep_last=2, resume_from_checkpoint="latest"
    )
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rng = random.Random(0)
    kills = 0
    for attempt in range(7):  # six kills, then the run may finish
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(path)],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        while proc.poll() is None and f'"pid": {proc.pid},' not in _read(out / LOCK_FILE):
            time.sleep(0.02)  # until this process holds the run (imports done)
        deadline = time.monotonic() + rng.uniform(0.5, 2.5)  # set-up, training or a checkpoint write
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if attempt == 6:
            proc.wait(timeout=300)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    else:
        pytest.fail("the run never finished")
    assert kills >= 3, f"only {kills} kills: the test did not exercise interruption"
    assert metrics_without_timing(out) == metrics_without_timing(tmp_path / "straight")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)
