"""Metrics: experiment trackers (wandb / TensorBoard through Accelerate), metrics.jsonl, throughput and MFU."""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

# Dense bf16/fp16 tensor-core peak FLOP/s per device (vendor data sheets, without sparsity).
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops_per_device(override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the configured value, a known GPU's data-sheet value, or None (CPU)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # "L40S" before "L40" before "L4"
        if key in name:
            return PEAK_FLOPS[key]
    return None


# Embedding tables that are read (indexed), not multiplied: left out of the FLOP count. Token embeddings
# count: tied to the LM head, they multiply there.
LOOKUP_TABLES = ("position", "wpe", "token_type")


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters that multiply: without position/segment lookup tables), counting tied
    weights once."""
    seen: set[int] = set()
    total = lookups = 0
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = getattr(param, "ds_numel", param.numel())  # ZeRO-3 partitions parameters
        total += n
        if any(table in name for table in LOOKUP_TABLES):
            lookups += n
    return total, total - lookups


def flops_per_token(n_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matrix products (forward + backward) plus attention scores.

    The attention term is 12 * layers * hidden * seq_len (PaLM appendix B), which the 6N rule leaves out.
    """
    return 6.0 * n_params + 12.0 * num_layers * hidden_size * seq_len


def model_flops_per_token(model: torch.nn.Module, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """`flops_per_token` of a model's multiplying parameters: the one MFU rule of training and benchmarks."""
    return flops_per_token(parameter_counts(model)[1], num_layers, hidden_size, seq_len)


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def prepare_wandb_mode(report_to: str, is_main_process: bool) -> str | None:
    """Run wandb offline (and say so) when no API key is configured and WANDB_MODE is not set."""
    if report_to != "wandb":
        return None
    if "WANDB_MODE" not in os.environ and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        if is_main_process:
            print(
                "wandb: no API key configured (WANDB_API_KEY or `wandb login`); logging offline "
                "under the run's output_dir - upload later with `wandb sync`"
            )
    return os.environ.get("WANDB_MODE", "online")


def init_tracking(accelerator: Any, logging: Any, config: dict[str, Any], output_dir: Path) -> None:
    """Start the configured tracker (wandb or TensorBoard) with the flattened run config; wandb's
    files go under the run's output_dir, not into whatever folder the command was started from."""
    if logging.report_to == "none":
        return
    wandb_kwargs: dict[str, Any] = {"dir": str(output_dir)}
    if logging.run_name:
        wandb_kwargs["name"] = logging.run_name
    accelerator.init_trackers(logging.project, config=flatten(config), init_kwargs={"wandb": wandb_kwargs})


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat {'training.lr': 3e-4}; non-scalars become strings (TensorBoard hparams)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class MetricsLog:
    """metrics.jsonl on the main process: one JSON object per logged step; on resume, the lines after
    the checkpoint's step (and a torn last line of a killed run) are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [m for m in read_metrics(path) if m.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(m) + "\n" for m in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            clean = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
            }
            with self.path.open("a") as fh:
                fh.write(json.dumps(clean) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a run's metrics.jsonl (for plots, resumes and tests), skipping lines a crash left torn."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_training_curves(metrics: list[dict[str, Any]], out_path: Path, title: str) -> Path | None:
    """Training and validation loss against optimizer step, as a PNG (matplotlib, no display needed)."""
    train = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    from twinlm.fileio import atomic_file

    try:
        with atomic_file(out_path, "the loss curve") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return out_path
