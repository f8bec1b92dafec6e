"""Shared test helpers: tiny model configs and the location of ../shared/data."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep torch from oversubscribing the 2 CI cores when tests start subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def tiny_config(**overrides):
    """A TwinLMConfig small enough that a forward/backward pass takes milliseconds."""
    from twinlm import TwinLMConfig

    values = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        embedding_dropout_prob=0.0,
        pad_token_id=0,
    )
    values.update(overrides)
    return TwinLMConfig(**values)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or a skip that says why."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (the tests read real text from ../shared/data)")
    return SHARED_DATA


def inject_nan_at(monkeypatch, step: int) -> None:
    """Make the loss and the gradients of the given optimizer step NaN (the engine's non-finite guard tests)."""
    from twinlm.training.engine import Engine

    original = Engine.forward_backward_step

    def poisoned(self, *args):
        loss = original(self, *args)
        if self.state.step + 1 == step:
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(Engine, "forward_backward_step", poisoned)


def hold_run_lock(output_dir):
    """A live process that holds OUTPUT_DIR's run lock (as a run in progress does); kill it to release."""
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from twinlm.training.lock import RunLock\n"
        "lock = RunLock(sys.argv[1]); lock.acquire()\n"
        "print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(output_dir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def free_port() -> int:
    """A free TCP port for a launch's rendezvous (other jobs on the machine may hold accelerate's default)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
