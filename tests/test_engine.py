"""The shared engine: an accumulation window's loss is the mean over all its target tokens, so
`grad_accum=4 x batch 2` takes the same step as `batch 8` (one process here; two in a slow test)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """8 rows with very different numbers of target tokens (a mean of per-batch means would be biased)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (8, 16), generator=g)
    labels = ids.clone()
    for row in range(8):
        labels[row, 2 + 2 * row :] = -100  # row r has 1 + 2r targets after the causal shift
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


def step_once(batch_size: int, grad_accum: int, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """One engine step over the 8 rows (this process's `rows`); returns the parameters after it."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    from twinlm import TwinLMForCausalLM
    from twinlm.training.engine import Engine, EngineSettings, count_lm_targets

    torch.manual_seed(0)
    model = TwinLMForCausalLM(tiny_config(is_causal=True))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # gloo: Accelerate creates the group itself
    acc = Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if distributed else [],
        cpu=True,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum, sync_with_dataloader=False
        ),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = acc.prepare(model, optimizer)
    full = _batches()[0]
    mine = {k: v[rows] for k, v in full.items()}
    chunks = [
        (0, i, {k: v[i * batch_size : (i + 1) * batch_size] for k, v in mine.items()})
        for i in range(len(mine["input_ids"]) // batch_size)
    ]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda _: 1.0)
    engine = Engine(
        acc, model, optimizer, scheduler, lambda state: itertools.cycle(chunks), count_lm_targets(True),
        EngineSettings(max_steps=1, grad_accum=grad_accum), [],
    )  # fmt: skip
    engine.train()
    return {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def test_accumulated_window_steps_like_one_big_batch() -> None:
    big = step_once(batch_size=8, grad_accum=1)
    accumulated = step_once(batch_size=2, grad_accum=4)
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, atol=1e-5, rtol=0, msg=name)


def test_a_mean_of_micro_batch_means_would_differ() -> None:
    """The check above can fail: weighting each micro-batch equally moves the parameters elsewhere."""
    from twinlm.training.engine import Engine

    original = Engine.forward_backward_step

    def mean_of_means(self: Engine, batch: dict, targets: float, total: float) -> torch.Tensor:
        return original(
            self, batch, 1.0, float(self.settings.grad_accum)
        )  # every micro-batch weighs the same

    big = step_once(batch_size=8, grad_accum=1)
    Engine.forward_backward_step = mean_of_means  # type: ignore[method-assign]
    try:
        biased = step_once(batch_size=2, grad_accum=4)
    finally:
        Engine.forward_backward_step = original  # type: ignore[method-assign]
    assert max((biased[k] - big[k]).abs().max().item() for k in big) > 1e-4


WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_engine import step_once
rank = int(__import__("os").environ["RANK"])
params = step_once(batch_size=2, grad_accum=2, rows=slice(4 * rank, 4 * rank + 4))
if rank == 0:
    torch.save(params, {out!r})
# Leave together and tear the gloo group down: a process that exits with the group alive can abort
# ("terminate called without an active exception") while its peer is still shutting down.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_accumulate_like_one_big_batch(tmp_path: Path) -> None:
    """2 processes x grad_accum 2 x batch 2 (gloo) against one process with batch 8."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path / "params.pt")))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "params.pt")
    big = step_once(batch_size=8, grad_accum=1)
    for name, value in big.items():
        torch.testing.assert_close(two[name], value, atol=1e-5, rtol=0, msg=name)
