"""One-GPU benchmark (run by benchmarks/gpu.sh): gpt2-small at sequence 1024 and bert-base at 512 in bf16.

1. twinlm throughput: tokens/s, MFU against the GPU's bf16 dense peak, peak memory
   (torch.cuda.max_memory_allocated), for SDPA and flash-attention (where flash_attn is installed), with
   torch.compile off and on.
2. DeepSpeed ZeRO-2 on one GPU (gpt2-small).
3. The two reference comparisons at full size: twinlm (converted with twinlm.convert.from_hf) vs
   GPT2LMHeadModel and vs BertForMaskedLM (the twin with sparse prediction), steps alternating.

Prints one table and writes gpu.json / gpu.md. `--cpu-toy` runs every code path on the CPU at toy sizes
(the smoke test); its numbers mean nothing. Sections stop being started once --budget-s is spent.

    python benchmarks/gpu_bench.py [--cpu-toy] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_training import Shape, make_batch, reference_model, train_step, twin_of
from common import (
    RESULTS,
    Section,
    alternate,
    machine_info,
    median,
    ratio,
    write_results,
)

from twinlm.training.tracking import model_flops_per_token

# bf16 dense tensor-core peaks (FLOP/s) from the data sheets; the longest matching name wins.
PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}
GPU_SHAPES = {
    "gpt2": Shape("gpt2-small", 12, 768, 12, 3072, 50257, 1024, 8),
    "bert": Shape("bert-base", 12, 768, 12, 3072, 30522, 512, 16),
}
TOY_SHAPES = {
    "gpt2": Shape("toy-gpt2", 2, 64, 4, 128, 512, 64, 2),
    "bert": Shape("toy-bert", 2, 64, 4, 128, 512, 32, 2),
}


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((PEAK_BF16[k] for k in sorted(PEAK_BF16, key=len, reverse=True) if k in name), None)


def to_device(model: torch.nn.Module, batch: dict, device: str) -> tuple[torch.nn.Module, dict]:
    return model.to(device), {k: v.to(device) for k, v in batch.items()}


def measure(step: Callable[[], None], device: str, steps: int) -> tuple[float, float | None]:
    """(median seconds per step after 3 warm-up steps, peak GiB allocated on the GPU or None on CPU)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median(alternate({"s": step}, repeats=steps, warmup=3)["s"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return seconds, peak


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def twin_model(kind: str, shape: Shape, attn: str) -> torch.nn.Module:
    """A twinlm model of the preset's architecture at `shape` (masked LM with sparse prediction)."""
    import twinlm

    preset = "gpt2-small" if kind == "gpt2" else "bert-base"
    config = twinlm.TwinLMConfig.from_preset(
        preset, vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.ffn,
        max_position_embeddings=max(shape.seq_len, 512),
    )  # fmt: skip
    if kind == "bert":
        config.sparse_prediction = True
    cls = twinlm.TwinLMForMaskedLM if kind == "bert" else twinlm.TwinLMForCausalLM
    return cls._from_config(config, attn_implementation=attn).train()


def attention_variants(device: str) -> list[tuple[str, bool]]:
    """(attn_implementation, compile) pairs: SDPA eager and compiled; flash-attention eager if installed."""
    variants = [("sdpa", False), ("sdpa", True)]
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        variants.append(("flash_attention_2", False))
    return variants


def throughput_row(kind: str, shape: Shape, attn: str, compiled: bool, device: str, steps: int) -> dict:
    model = twin_model(kind, shape, attn)
    batch = make_batch(kind, shape)
    model, batch = to_device(model, batch, device)
    if compiled:  # on the CPU toy path dynamo only (inductor's C++ build would take a minute)
        model.compile(backend="inductor" if device == "cuda" else "eager")
    seconds, peak = measure(train_step(model, batch, "bf16", device), device, steps)
    tps = shape.batch * shape.seq_len / seconds
    flops = model_flops_per_token(model, shape.layers, shape.hidden, shape.seq_len)
    gpu_peak = peak_flops(device)
    del model
    free(device)
    return {
        "section": "twinlm throughput",
        "model": f"{shape.name} T{shape.seq_len} B{shape.batch}",
        "variant": f"{attn}{' + torch.compile' if compiled else ''}",
        "tok/s": tps,
        "MFU %": 100 * tps * flops / gpu_peak if gpu_peak else None,
        "peak GiB": peak,
    }


def zero2_row(shape: Shape, device: str, steps: int) -> dict:
    """gpt2-small under DeepSpeed ZeRO-2 on one device (bf16), deepspeed.initialize directly."""
    import deepspeed

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    model = twin_model("gpt2", shape, "sdpa").to(device)
    config = {
        "train_micro_batch_size_per_gpu": shape.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batch = {k: v.to(device) for k, v in make_batch("gpt2", shape).items()}

    def step() -> None:
        engine.backward(engine(**batch).loss)
        engine.step()
        if device == "cuda":
            torch.cuda.synchronize()

    seconds, peak = measure(step, device, steps)
    tps = shape.batch * shape.seq_len / seconds
    gpu_peak = peak_flops(device)
    flops = model_flops_per_token(model, shape.layers, shape.hidden, shape.seq_len)
    return {
        "section": "DeepSpeed ZeRO-2, 1 device",
        "model": f"{shape.name} T{shape.seq_len} B{shape.batch}",
        "variant": "twinlm, bf16 (DeepSpeed)",
        "tok/s": tps,
        "MFU %": 100 * tps * flops / gpu_peak if gpu_peak else None,
        "peak GiB": peak,
    }


def reference_rows(kind: str, shape: Shape, device: str, steps: int) -> list[dict]:
    """Reference vs converted twin at full size, bf16 autocast, steps alternating; then each side's peak
    memory measured alone."""
    reference = reference_model(kind, shape)
    twin = twin_of(reference)
    batch = {k: v.to(device) for k, v in make_batch(kind, shape).items()}
    reference, twin = reference.to(device), twin.to(device)
    times = alternate(
        {
            "ref": train_step(reference, batch, "bf16", device),
            "twin": train_step(twin, batch, "bf16", device),
        },
        repeats=steps,
        warmup=3,
    )
    peaks = {}
    for name, model in (("ref", reference), ("twin", twin)):
        other = twin if name == "ref" else reference
        other.to("cpu")  # alone on the device (its optimizer state is freed with the closures above)
        free(device)
        peaks[name] = measure(train_step(model, batch, "bf16", device), device, 2)[1]
        other.to(device)
    del reference, twin
    free(device)
    names = {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}
    tps = {name: shape.batch * shape.seq_len / median(t) for name, t in times.items()}
    return [
        {
            "section": f"twinlm vs {names[kind]}",
            "model": f"{shape.name} T{shape.seq_len} B{shape.batch}",
            "variant": "reference"
            if name == "ref"
            else "twinlm (from_hf" + (", sparse)" if kind == "bert" else ")"),
            "tok/s": tps[name],
            "speed-up": ratio(tps["twin"], tps["ref"]) if name == "twin" else None,
            "peak GiB": peaks[name],
        }
        for name in ("ref", "twin")
    ]


def sections(device: str, shapes: dict[str, Shape], steps: int) -> list[tuple[str, Callable[[], list[dict]]]]:
    jobs: list[tuple[str, Callable[[], list[dict]]]] = []
    for kind in ("gpt2", "bert"):
        for attn, compiled in attention_variants(device):
            label = f"{shapes[kind].name} {attn}{' compiled' if compiled else ''}"
            jobs.append(
                (
                    label,
                    lambda k=kind, a=attn, c=compiled: [throughput_row(k, shapes[k], a, c, device, steps)],
                )
            )
    jobs.append(("ZeRO-2", lambda: [zero2_row(shapes["gpt2"], device, steps)]))
    for kind in ("gpt2", "bert"):
        jobs.append((f"reference {kind}", lambda k=kind: reference_rows(k, shapes[k], device, steps)))
    return jobs


def run(args: argparse.Namespace) -> Section:
    device = "cpu" if args.cpu_toy else "cuda"
    if args.cpu_toy:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_bench: no CUDA device visible to torch; use --cpu-toy to check the code on a CPU"
        )
    shapes = TOY_SHAPES if args.cpu_toy else GPU_SHAPES
    steps = 2 if args.cpu_toy else args.steps
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for label, job in sections(device, shapes, steps):
        if time.perf_counter() - start > args.budget_s:
            rows.append(
                {"section": label, "error": f"not started: the {args.budget_s:.0f} s budget was spent"}
            )
            continue
        try:
            rows += job()
            free(device)
        except Exception as err:  # one failing section (e.g. a missing kernel) must not lose the others
            rows.append(
                {"section": label, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
            )
            free(device)
        print(f"[gpu_bench] {label}: done at {time.perf_counter() - start:.0f} s", flush=True)
    notes = [
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (--cpu-toy: code check only)'}; "
        f"bf16 dense peak {peak_flops(device) or 'unknown'} FLOP/s",
        "bf16 = torch.autocast(bfloat16) with fp32 weights and AdamW; tok/s = median step after 3 warm-up "
        f"steps ({steps} timed); MFU = tok/s x (6 x parameters + 12 x layers x hidden x seq) / peak",
        "peak GiB = torch.cuda.max_memory_allocated over the timed steps (reference rows: each side alone)",
    ]
    return Section("gpu", "One GPU: throughput, MFU, memory, ZeRO-2, references", rows, notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-toy", action="store_true", help="toy sizes on the CPU (checks the code, not speed)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement on the GPU")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    machine = machine_info()
    start = time.perf_counter()
    section = run(args)
    section.seconds = time.perf_counter() - start
    md = write_results([section], args.out, "gpu" if not args.cpu_toy else "gpu-cpu-toy", machine)
    print(section.markdown())
    print(f"written: {md} and {md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
