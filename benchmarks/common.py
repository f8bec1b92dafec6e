"""Shared pieces of the benchmarks: command line, machine description, alternating timers, the matmul
peak, training memory, FLOP counts and the result files (JSON + markdown).

Every benchmark measures twinlm and its reference side by side in one process, alternating the two
sides step by step so that machine noise hits both, and reports medians after warm-up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Quiet, offline, CPU-only defaults for the libraries (set before they are imported).
for _key, _value in {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED_CORPUS = REPO.parent / "shared" / "data" / "corpus"


# ---------------------------------------------------------------------------------------------------
# Command line and result sections


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick (toy sizes, 1 repeat), --repeats, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="toy sizes and 1 repeat (the smoke test)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per side (default: per benchmark)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"result folder (default {RESULTS})")
    return p


def repeats(args: argparse.Namespace, full: int) -> int:
    """Timed repeats: --repeats, else 1 with --quick, else the benchmark's full count."""
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
        return args.repeats
    return 1 if args.quick else full


@dataclass
class Section:
    """One benchmark's result: rows of a table (dicts with the same keys), notes, and headline lines."""

    name: str
    title: str
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    headline: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # more tables, by title

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", markdown_table(self.rows), ""]
        for title, rows in self.tables.items():
            parts += [f"### {title}", "", markdown_table(rows), ""]
        parts += [f"- {note}" for note in self.notes]
        if self.files:
            parts.append(f"- files: {', '.join(self.files)}")
        parts.append(f"- wall time of this benchmark: {self.seconds:.0f} s")
        return "\n".join(parts) + "\n"


def fmt(value: Any) -> str:
    """A table cell: floats with 3 significant digits (thousands separated), None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub markdown table of rows (dicts); the columns are the keys of all rows, in first-seen order."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, torch/transformers versions, date."""
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def write_results(sections: Sequence[Section], out: Path, stem: str, machine: dict[str, Any]) -> Path:
    """Write OUT/STEM.json (machine + every section) and OUT/STEM.md; returns the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "sections": [asdict(s) for s in sections]}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    header = [
        f"# twinlm benchmarks: {stem}",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
    ]
    md = out / f"{stem}.md"
    md.write_text("\n".join(header) + "\n".join(s.markdown() for s in sections))
    return md


def run_single(
    make: Callable[[argparse.Namespace], Section],
    description: str,
    argv: list[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """`python benchmarks/bench_x.py [--quick]`: run one benchmark, write its files, print its table.
    `extra` adds a benchmark's own options to the common ones."""
    p = parser(description)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    machine = machine_info()
    start = time.perf_counter()
    section = make(args)
    section.seconds = time.perf_counter() - start
    md = write_results([section], args.out, section.name, machine)
    print(section.markdown())
    print(f"written: {md} and {md.with_suffix('.json')}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Timing


def alternate(sides: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each side, run in turn (A B, then B A, ...) so that noise hits both sides.

    `warmup` untimed rounds first. Returns the timed seconds per side (`repeats` values each).
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def matmul_peak(dtype_name: str, size: int, repeats: int) -> float:
    """FLOP/s of one large square torch.matmul in `dtype_name` (median of `repeats` after a warm-up)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    times = alternate({"mm": lambda: torch.matmul(a, b)}, repeats=repeats, warmup=1)["mm"]
    return 2.0 * size**3 / median(times)


# ---------------------------------------------------------------------------------------------------
# Model accounting


def unique_parameters(model: Any) -> list[Any]:
    """Parameters counting tied ones once."""
    seen: dict[int, Any] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def training_memory(model: Any, step: Callable[[], Any]) -> dict[str, float]:
    """Bytes a training step holds at its peak, counted exactly from tensors:

    activations = the unique storages saved for backward (torch.autograd.graph.saved_tensors_hooks),
    not counting the parameters themselves; plus parameters, gradients and AdamW's two moments (fp32).
    `step` runs one forward + backward. Returned in MiB.
    """
    import torch

    params = unique_parameters(model)
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    mib = 2.0**20
    activations = sum(saved.values()) / mib
    weights = param_bytes / mib
    return {
        "activations_mib": activations,
        "total_mib": activations + weights * 4,  # parameters + gradients + 2 AdamW moments
    }


def limit_threads_note() -> str:
    import torch

    return f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"


def excerpt_texts(max_chars: int) -> tuple[list[str], str]:
    """Paragraphs of ../shared/data/corpus (or the embedded corpus when that is absent), up to `max_chars`.

    Returns (documents, where they came from). Paragraphs are taken round-robin over the files so that
    an excerpt mixes the books.
    """
    files = sorted(SHARED_CORPUS.glob("*.txt")) if SHARED_CORPUS.is_dir() else []
    if files:
        per_file = [
            [p.strip() for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()] for f in files
        ]
        where = f"{SHARED_CORPUS} ({len(files)} files, paragraphs round-robin)"
    else:
        from twinlm.corpus import default_corpus

        per_file = [default_corpus()]
        where = "twinlm.corpus.default_corpus()"
    docs: list[str] = []
    used = 0
    for i in range(max(len(p) for p in per_file)):
        for paragraphs in per_file:
            if i < len(paragraphs):
                docs.append(paragraphs[i])
                used += len(paragraphs[i])
                if used >= max_chars:
                    return docs, where
    return docs, where
