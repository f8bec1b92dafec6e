"""Attention against sequence length: full vs sliding window (in blocks) vs linear, time and memory per layer.

One twinlm layer (pre-norm RMSNorm, RoPE, GELU MLP; H256, 4 heads, FF1024; causal; batch 1) per attention
variant, forward + backward of a fixed input at lengths 512 .. 16384, fp32 and bf16 autocast. The variants
of one length and precision alternate call by call (common.alternate), so their ratios come from one run:
  full                    softmax over every earlier token: SDPA's is_causal (a flash kernel on this CPU)
  full, packed documents  the same with 8 packed documents per row (position ids restart), which needs a
                          mask: the pretraining case (twinlm packs documents)
  window 128 (dense mask) the window as a mask over full attention: how twinlm ran windows before blocks
  window 128, window 256  sliding windows in blocks (WindowBlocks: O(n w))
  linear                  attention_scoring="linear" (chunked cumulative sums: O(n d^2))
Memory is counted, not sampled: the unique storages saved for backward (saved_tensors_hooks), for the whole
layer and for its attention sub-layer alone. A variant stops where its next step would pass the time or
memory budget (extrapolated from its last two lengths): the table says where.

Decoding: per-token time of greedy steps (one token at a time through the model's own cache) after contexts
of 256 .. 16384 tokens, 4 layers: full attention's KV cache grows, a window's stays at w - 1 keys, linear
attention's state is constant. Writes long_context.png (time and memory vs n, log-log) and
long_context_decode.png beside the tables.

    python benchmarks/bench_long_context.py [--quick] [--repeats N] [--max-length N] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from common import Section, alternate, median, ratio, repeats, run_single


@dataclass(frozen=True)
class Plan:
    lengths: tuple[int, ...]
    windows: tuple[int, int]
    hidden: int
    heads: int
    ffn: int
    contexts: tuple[int, ...]  # decoding
    decode_layers: int
    decode_steps: int
    max_seconds: float  # per forward + backward: a variant stops before a length predicted to take longer
    max_mib: float  # saved activations of one layer: likewise


FULL = Plan(
    (512, 1024, 2048, 4096, 8192, 16384),
    (128, 256),
    256,
    4,
    1024,
    (256, 1024, 4096, 16384),
    4,
    24,
    12.0,
    6000.0,
)
QUICK = Plan((64, 128, 256), (8, 16), 32, 4, 64, (32, 64, 128), 2, 4, 12.0, 6000.0)
TARGET_LENGTH = 8192  # the targets are stated at 8k tokens


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    documents: int = 1  # packed documents per row
    dense_window: bool = False  # the window as a dense mask over full attention (twinlm before blocks)


def variants(plan: Plan) -> list[Variant]:
    """The attention variants compared, with the plan's two window sizes."""
    small, large = plan.windows
    return [
        Variant("full", {}),
        Variant("full, packed documents", {}, documents=8),
        Variant(f"window {small} (dense mask)", {"sliding_window": small}, dense_window=True),
        Variant(f"window {small}", {"sliding_window": small}),
        Variant(f"window {large}", {"sliding_window": large}),
        Variant("linear", {"attention_scoring": "linear"}),
    ]


def decode_variants(plan: Plan) -> list[Variant]:
    every = variants(plan)
    return [every[0], every[3], every[5]]


def config(plan: Plan, variant: Variant, layers: int, length: int) -> Any:
    import twinlm

    return twinlm.TwinLMConfig(
        vocab_size=512,
        hidden_size=plan.hidden,
        num_hidden_layers=layers,
        num_attention_heads=plan.heads,
        intermediate_size=plan.ffn,
        max_position_embeddings=max(length, 512),
        type_vocab_size=0,
        is_causal=True,
        position_embedding_type="rope",
        norm_type="rmsnorm",
        norm_position="pre",
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        embedding_dropout_prob=0.0,
        attention_bias=False,
        mlp_bias=False,
        **variant.overrides,
    )


@contextlib.contextmanager
def kernel(variant: Variant) -> Iterator[None]:
    """Run a windowed variant as one dense masked attention (the reference) where asked."""
    if not variant.dense_window:
        yield
        return
    from twinlm.model import attention

    with mock.patch.object(attention.WindowBlocks, "applies", staticmethod(lambda *args: False)):
        yield


def position_ids(length: int, documents: int) -> torch.Tensor | None:
    if documents == 1:
        return None
    size = -(-length // documents)
    return (torch.arange(length) % size)[None]


class AttentionClock:
    """Seconds spent in a module's forward and backward (module hooks), one total per step: the attention
    sub-layer's share of a layer's time (the MLP and norms cost the same in every variant)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds: list[float] = []
        self.start = 0.0
        module.register_forward_pre_hook(self.begin)
        module.register_forward_hook(self.end)
        module.register_full_backward_pre_hook(self.begin)
        module.register_full_backward_hook(self.end)

    def begin(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def end(self, *args: Any) -> None:
        self.seconds[-1] += time.perf_counter() - self.start


def train_step(
    model: torch.nn.Module, variant: Variant, length: int, precision: str, clock: AttentionClock | None = None
) -> Callable[[], None]:
    """forward + backward of one fixed input (inputs_embeds: the embedding table is not what is measured)."""
    embeds = torch.randn(1, length, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds.requires_grad_(True)  # (so that the attention's backward hook sees an input gradient)
    positions = position_ids(length, variant.documents)

    def step() -> None:
        if clock is not None:
            clock.seconds.append(0.0)
        with kernel(variant), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        embeds.grad = None

    return step


def saved_memory(model: torch.nn.Module, step: Callable[[], None]) -> tuple[float, float]:
    """MiB saved for backward by one step: (the whole layer, its attention sub-layer alone)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, bool]] = {}
    inside = [False]
    attention = model.layers[0].attention
    hooks = [
        attention.register_forward_pre_hook(lambda *args: inside.__setitem__(0, True)),
        attention.register_forward_hook(lambda *args: inside.__setitem__(0, False)),
    ]

    def pack(t: torch.Tensor) -> torch.Tensor:
        pointer = t.untyped_storage().data_ptr()
        if pointer not in params:
            old = saved.get(pointer, (0, False))
            saved[pointer] = (t.untyped_storage().nbytes(), old[1] or inside[0])
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for hook in hooks:
            hook.remove()
    mib = 2.0**20
    return sum(b for b, _ in saved.values()) / mib, sum(b for b, a in saved.values() if a) / mib


def predicted(history: list[tuple[int, float]], length: int) -> float | None:
    """The next value from the last two (length, value) points, on a power law; None before two points."""
    if len(history) < 2:
        return None
    (n0, v0), (n1, v1) = history[-2:]
    slope = math.log(v1 / v0) / math.log(n1 / n0) if v0 > 0 and v1 > 0 else 1.0
    return v1 * (length / n1) ** max(slope, 1.0)


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(value) against log(length): 1 = linear, 2 = quadratic."""
    points = [(n, v) for n, v in points if v and v > 0]
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(v) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def measure(plan: Plan, n_repeats: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (variant, precision, length, seconds, MiB) and notes on where variants stopped."""
    import twinlm

    torch.manual_seed(0)
    every = variants(plan)
    base = twinlm.TwinLMModel(config(plan, every[0], 1, max(plan.lengths)))
    models, clocks = {}, {}
    for variant in every:  # the same weights in every variant (none adds a parameter)
        models[variant.name] = twinlm.TwinLMModel(config(plan, variant, 1, max(plan.lengths)))
        models[variant.name].load_state_dict(base.state_dict())
        clocks[variant.name] = AttentionClock(models[variant.name].layers[0].attention)
    rows, stopped = [], {}
    history: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for precision in ("fp32", "bf16"):
        for length in plan.lengths:
            sides = {}
            for variant in every:
                key = (variant.name, precision)
                past = history.setdefault(key, {"seconds": [], "mib": []})
                if key in stopped:
                    continue
                guess_s, guess_mib = predicted(past["seconds"], length), predicted(past["mib"], length)
                if (guess_s or 0) > plan.max_seconds or (guess_mib or 0) > plan.max_mib:
                    stopped[key] = (
                        f"{variant.name} ({precision}) stops before {length} tokens: predicted "
                        f"{guess_s:.1f} s and {guess_mib:,.0f} MiB per step (budget {plan.max_seconds:g} s, "
                        f"{plan.max_mib:,.0f} MiB)"
                    )
                    continue
                clocks[variant.name].seconds.clear()
                sides[variant.name] = train_step(
                    models[variant.name], variant, length, precision, clocks[variant.name]
                )
            print(f"[long_context] {precision} n={length}: {', '.join(sides)}", flush=True)
            times = alternate(sides, repeats=n_repeats, warmup=1)
            for variant in every:
                if variant.name not in sides:
                    continue
                attention_s = median(clocks[variant.name].seconds[1:])  # (after the warm-up call)
                layer_mib, attention_mib = saved_memory(models[variant.name], sides[variant.name])
                seconds = median(times[variant.name])
                past = history[(variant.name, precision)]
                past["seconds"].append((length, seconds))
                past["mib"].append((length, layer_mib))
                rows.append(
                    {
                        "variant": variant.name,
                        "precision": "bf16 autocast" if precision == "bf16" else "fp32",
                        "tokens": length,
                        "fwd+bwd s": seconds,
                        "attention fwd+bwd s": attention_s,
                        "layer activations MiB": layer_mib,
                        "attention activations MiB": attention_mib,
                    }
                )
    return rows, list(stopped.values())


def decode_curve(plan: Plan, n_repeats: int) -> list[dict[str, Any]]:
    """Per-token time of greedy decoding steps after a context of each length, per variant (fp32)."""
    import twinlm

    rows = []
    for variant in decode_variants(plan):
        torch.manual_seed(0)
        model = twinlm.TwinLMModel(config(plan, variant, plan.decode_layers, max(plan.contexts) + 64)).eval()
        for context in plan.contexts:
            embeds = torch.randn(
                1, context + plan.decode_steps, plan.hidden, generator=torch.Generator().manual_seed(1)
            )
            per_token = []
            with torch.inference_mode():
                for _ in range(n_repeats):
                    cache = model(inputs_embeds=embeds[:, :context], use_cache=True).cache
                    for i in range(plan.decode_steps):
                        start = time.perf_counter()
                        model(
                            inputs_embeds=embeds[:, context + i : context + i + 1],
                            cache=cache,
                            use_cache=True,
                        )
                        per_token.append(time.perf_counter() - start)
            held = sum(
                t.numel() * t.element_size()
                for layer in cache.layers
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if t is not None
            ) + sum(
                cache.get_recurrent_state(i).numel() * 4 for i, linear in enumerate(cache.is_linear) if linear
            )
            rows.append(
                {
                    "variant": variant.name,
                    "context": context,
                    "ms per token": 1000 * median(per_token),
                    "cache MiB": held / 2**20,
                }
            )
            print(
                f"[long_context] decode {variant.name} context {context}: {rows[-1]['ms per token']:.2f} ms",
                flush=True,
            )
    return rows


def plot(plan: Plan, rows: list[dict[str, Any]], decode: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    metrics = ("fwd+bwd s", "attention fwd+bwd s", "layer activations MiB", "attention activations MiB")
    for ax, metric in zip(axes, metrics, strict=True):
        for index, variant in enumerate(variants(plan)):
            for precision, style in (("fp32", "-"), ("bf16 autocast", "--")):
                points = [
                    (r["tokens"], r[metric])
                    for r in rows
                    if r["variant"] == variant.name and r["precision"] == precision
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), style, marker="o", color=f"C{index}",
                            label=f"{variant.name}" if precision == "fp32" else None)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(metric + " (solid fp32, dashed bf16)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("one twinlm layer (H256, 4 heads, causal, batch 1): forward + backward against length")
    fig.tight_layout()
    fig.savefig(out / "long_context.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in decode_variants(plan):
        points = [(r["context"], r["ms per token"]) for r in decode if r["variant"] == variant.name]
        color = f"C{variants(plan).index(variant)}"  # the variant's colour in the other figure
        ax.plot(*zip(*points, strict=True), marker="o", color=color, label=variant.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per generated token")
    ax.set_title("greedy decoding with the model's own cache", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "long_context_decode.png", dpi=100)
    plt.close(fig)
    return ["long_context.png", "long_context_decode.png"]


def at(rows: list[dict[str, Any]], variant: str, precision: str, length: int, metric: str) -> float | None:
    for row in rows:
        if (row["variant"], row["precision"], row["tokens"]) == (variant, precision, length):
            return row[metric]
    return None


def run(args: argparse.Namespace) -> Section:
    plan = QUICK if args.quick else FULL
    if getattr(args, "max_length", None):
        plan = replace(
            plan,
            lengths=tuple(n for n in plan.lengths if n <= args.max_length),
            contexts=tuple(n for n in plan.contexts if n <= args.max_length),
        )
    small, large = plan.windows
    rows, stops = measure(plan, repeats(args, 3))
    decode = decode_curve(plan, repeats(args, 2))
    files = plot(plan, rows, decode, args.out)
    target = TARGET_LENGTH if TARGET_LENGTH in plan.lengths else plan.lengths[-1]
    slopes = []
    for variant in variants(plan):
        for precision in ("fp32", "bf16 autocast"):
            mine = [r for r in rows if r["variant"] == variant.name and r["precision"] == precision]
            late = [r for r in mine if r["tokens"] >= plan.lengths[min(1, len(plan.lengths) - 1)]]
            slopes.append(
                {
                    "variant": variant.name,
                    "precision": precision,
                    "longest measured": max((r["tokens"] for r in mine), default=None),
                    "time slope": slope([(r["tokens"], r["fwd+bwd s"]) for r in late]),
                    "attention time slope": slope([(r["tokens"], r["attention fwd+bwd s"]) for r in late]),
                    "layer memory slope": slope([(r["tokens"], r["layer activations MiB"]) for r in late]),
                    "attention memory slope": slope(
                        [(r["tokens"], r["attention activations MiB"]) for r in late]
                    ),
                }
            )
    headline = []
    for precision in ("fp32", "bf16 autocast"):
        short = "fp32" if precision == "fp32" else "bf16"
        for metric, what in (("attention fwd+bwd s", "attention sub-layer"), ("fwd+bwd s", "whole layer")):
            full_s = at(rows, "full", precision, target, metric)
            window_s = at(rows, f"window {large}", precision, target, metric)
            headline.append({"benchmark": f"window {large} vs full attention, fwd+bwd time of the {what} @{target} {short}",
                             "twinlm / reference": ratio(full_s, window_s), "target": ">= 4x faster"})  # fmt: skip
        for reference in ("full", "full, packed documents"):
            full_mib = at(rows, reference, precision, target, "attention activations MiB")
            window_mib = at(rows, f"window {large}", precision, target, "attention activations MiB")
            headline.append({"benchmark": f"window {large} vs {reference}, attention activation memory @{target} {short}",
                             "twinlm / reference": ratio(full_mib, window_mib), "target": ">= 8x less"})  # fmt: skip
        linear = next(s for s in slopes if s["variant"] == "linear" and s["precision"] == precision)
        headline.append({"benchmark": f"linear attention: log-log slope of layer activation memory in n ({short})",
                         "twinlm / reference": linear["layer memory slope"], "target": "<= 1.1"})  # fmt: skip
    window_decode = [r for r in decode if r["variant"] == f"window {small}"]
    headline.append({"benchmark": f"window {small} decoding: ms per token at context {window_decode[-1]['context']} / "
                                  f"at {window_decode[0]['context']}",
                     "twinlm / reference": ratio(window_decode[-1]["ms per token"], window_decode[0]["ms per token"]),
                     "target": "~1 (flat past the window)"})  # fmt: skip
    notes = [
        f"one layer: H{plan.hidden}, {plan.heads} heads, FF{plan.ffn}, pre-norm RMSNorm, RoPE, causal, batch 1, "
        "inputs_embeds (no embedding table, no LM head); the same weights in every variant",
        "fwd+bwd s: median of alternating calls after one warm-up call; attention fwd+bwd s: the time inside the "
        "attention sub-layer (projections, RoPE, kernel) in the same calls (forward and backward module hooks); "
        "the rest of a layer (norms, MLP) costs the same in every variant; activations: unique storages saved for "
        "backward in one step, exact bytes; attention = those saved while the attention sub-layer runs (its "
        "projections' inputs included)",
        "full attention without a mask runs PyTorch's CPU flash kernel, which saves O(n) (queries, keys, values, "
        "output, log-sum-exp): its memory is linear already, and only its time is quadratic; with packed "
        "documents (or padding, or attention dropout) it needs an n x n mask, and its memory is quadratic",
        "windows in blocks: each block of min(w, 128) queries against block + w - 1 keys (overlapping views of "
        "one padded copy), a boolean mask per block (SDPA saves it as a float: n x (block + w - 1) x 4 bytes)",
        *stops,
    ]
    tables = {
        "Log-log slopes (1 = linear in n, 2 = quadratic), from the second length on": slopes,
        f"Greedy decoding after a context ({plan.decode_layers} layers, fp32, {plan.decode_steps} steps each)": decode,
    }
    return Section(
        "long_context", "Attention against sequence length", rows, notes, headline, files=files, tables=tables
    )


def main(argv: list[str] | None = None) -> int:
    return run_single(run, __doc__.splitlines()[0], argv, extra=add_arguments)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-length", type=int, default=None, help="measure lengths and contexts up to this only"
    )


if __name__ == "__main__":
    raise SystemExit(main())
