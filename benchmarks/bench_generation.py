"""Greedy generation: twinlm (converted from GPT2LMHeadModel) vs GPT-2, batch 1 and 8, dynamic and static cache.

Both sides get the same prompt and generate exactly `new_tokens` tokens greedily (min_new_tokens pins the
length). A side that raises (e.g. a static cache it cannot run) is recorded in the table with its error.

    python benchmarks/bench_generation.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from bench_training import SHAPES, Shape, reference_model, twin_of
from common import Section, alternate, median, ratio, repeats, run_single

PROMPT = 16
QUICK_SHAPE = Shape("toy", 2, 64, 4, 128, 512, 32, 1)


def generate_fn(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, cache: str
) -> Callable[[], Any]:
    kwargs: dict[str, Any] = {"cache_implementation": "static"} if cache == "static" else {}

    def generate() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=model.config.eos_token_id,
                **kwargs,
            )

    return generate


def first_error(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """(result, None), or (None, "ErrorType: first line of the message")."""
    try:
        return fn(), None
    except Exception as err:  # recorded in the table, not raised: a benchmark reports what fails
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]


def compare(
    reference: torch.nn.Module, twin: torch.nn.Module, batch: int, cache: str, new_tokens: int, n: int
) -> dict[str, Any]:
    vocab = reference.config.vocab_size
    prompt = torch.randint(0, vocab - 1, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    sides = {
        "ref": generate_fn(reference, prompt, new_tokens, cache),
        "twin": generate_fn(twin, prompt, new_tokens, cache),
    }
    outputs, errors = {}, {}
    for name, fn in sides.items():
        outputs[name], errors[name] = first_error(fn)  # also the warm-up
    working = {name: fn for name, fn in sides.items() if errors[name] is None}
    times = alternate(working, repeats=n, warmup=0) if working else {}
    tps = {name: batch * new_tokens / median(t) for name, t in times.items()}
    same = None
    if not errors["ref"] and not errors["twin"]:
        same = bool(torch.equal(outputs["ref"], outputs["twin"]))
    return {
        "batch": batch,
        "cache": cache,
        "GPT-2 tok/s": tps.get("ref"),
        "twinlm tok/s": tps.get("twin"),
        "speed-up": ratio(tps.get("twin"), tps.get("ref")),
        "same tokens": same,
        "error": "; ".join(f"{'GPT-2' if k == 'ref' else 'twinlm'}: {v}" for k, v in errors.items() if v)
        or None,
    }


def run(args: argparse.Namespace) -> Section:
    shape = QUICK_SHAPE if args.quick else SHAPES[0]
    new_tokens = 8 if args.quick else 64
    reference = reference_model("gpt2", shape).eval()
    twin = twin_of(reference).eval()
    n = repeats(args, 3)
    rows = [
        compare(reference, twin, batch, cache, new_tokens, n)
        for batch in (1, 8)
        for cache in ("dynamic", "static")
    ]
    headline = [
        {
            "benchmark": f"generate() batch {r['batch']} {r['cache']} cache",
            "twinlm / reference": r["speed-up"],
            "target": ">= 1.3x",
        }
        for r in rows
    ]
    notes = [
        f"model: GPT2LMHeadModel L{shape.layers} H{shape.hidden} A{shape.heads} FF{shape.ffn} V{shape.vocab}, "
        "random weights; twinlm converted from it (twinlm.convert.from_hf)",
        f"greedy, prompt {PROMPT} tokens, exactly {new_tokens} new tokens per row (min_new_tokens), "
        "tokens/s = batch x new tokens / seconds; median of alternating calls after one warm-up call",
        "same tokens: the two sides' greedy outputs are identical (a check of the conversion, fp32)",
    ]
    return Section("generation", "Greedy generation", rows, notes, headline)


def main(argv: list[str] | None = None) -> int:
    return run_single(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
