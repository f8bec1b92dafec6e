"""`make bench`: every CPU benchmark, twinlm against its reference side by side, in one process.

Writes benchmarks/results/benchmarks.{md,json} (with the machine it ran on) and prints the headline
table. `--quick` runs every benchmark at toy size with 1 repeat (the smoke test; numbers mean nothing).
The GPU benchmark is separate: `bash benchmarks/gpu.sh` on a machine with an NVIDIA GPU.

    python benchmarks/run_all.py [--quick] [--only training,generation,data,end_to_end,quality,long_context] [--out DIR]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU-only benchmarks: keep DeepSpeed's probe quiet

import bench_data  # noqa: E402
import bench_end_to_end  # noqa: E402
import bench_generation  # noqa: E402
import bench_long_context  # noqa: E402
import bench_quality  # noqa: E402
import bench_training  # noqa: E402
from common import Section, machine_info, markdown_table, parser, write_results  # noqa: E402

BENCHMARKS = {
    "training": bench_training.run,
    "generation": bench_generation.run,
    "data": bench_data.run,
    "end_to_end": bench_end_to_end.run,
    "quality": bench_quality.run,
    "long_context": bench_long_context.run,
}


def headline(sections: list[Section]) -> str:
    """One table of every benchmark's headline ratios (twinlm / reference) with the targets."""
    rows = [row for s in sections for row in s.headline]
    return markdown_table(rows)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run")
    args = p.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    machine = machine_info()
    sections = []
    start = time.perf_counter()
    for name in chosen:
        began = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        section = BENCHMARKS[name](args)
        section.seconds = time.perf_counter() - began
        sections.append(section)
        print(f"[bench] {name} done in {section.seconds:.0f} s", flush=True)
    machine["total_seconds"] = round(time.perf_counter() - start, 1)
    md = write_results(sections, args.out, "benchmarks", machine)
    table = headline(sections)
    with md.open("a") as fh:
        fh.write("\n## Headline\n\n" + table + "\n")
    print("\n" + table)
    print(
        f"\n{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['date']}; "
        f"{machine['total_seconds']:.0f} s in all"
    )
    print(f"written: {md} and {md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
