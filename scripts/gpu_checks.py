"""GPU checks that the CPU test suite cannot run: one short script for a lent GPU machine.

    python scripts/gpu_checks.py        # needs CUDA; flash-attn (or the kernels package) for the flash rows
    python scripts/gpu_checks.py --recipes gpu-1h-mlm-small gpu-1h-rtd-base --steps 200 [--set training.batch_size=128]

1. attn_implementation="flash_attention_2" against "sdpa" in bf16 on padded, packed and sliding-window
   batches, and greedy generation with the KV cache (tests/test_flash_attention.py checks the same
   plumbing on the CPU against a reference of the kernel's contract).
2. A few bf16 optimizer steps of each tiny preset on the GPU: the loss must fall.
3. With --recipes: a few hundred steps of GPU recipes (configs/pretrain/gpu-1h-*.yaml; all of them when no
   name is given) as shipped but with a step budget instead of the hour: the loss must fall; prints tokens/s
   and peak GPU memory. From the repository root; without ../shared/data/corpus-modern the embedded corpus
   stands in (and the line says so). Recipes with the same tokenizer settings share the first one's tokenizer.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import twinlm
from twinlm import TwinLMConfig, TwinLMForCausalLM, TwinLMForMaskedLM


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def compare_flash(causal: bool, overrides: dict) -> float:
    torch.manual_seed(0)
    config = TwinLMConfig.from_preset(
        "tiny-modern-decoder" if causal else "tiny-modern-encoder", vocab_size=512, **overrides
    )
    model = (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(config).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(5, 512, (4, 256), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :40] = 0 if causal else 1  # left padding for the decoder
    mask[1, 200:] = 0 if not causal else 1  # right padding for the encoder
    positions = torch.cat([torch.arange(100), torch.arange(156)]).expand(4, -1).cuda()
    worst = 0.0
    for kwargs, real in ((dict(attention_mask=mask), mask.bool()), (dict(position_ids=positions), ids > -1)):
        outs = []
        for implementation in ("sdpa", "flash_attention_2"):
            model.config._attn_implementation = implementation
            with torch.no_grad():
                outs.append(model(ids, **kwargs).logits.float())
        worst = max(worst, (outs[0] - outs[1]).abs()[real].max().item())
    return worst


def generation_agrees(overrides: dict) -> bool:
    torch.manual_seed(0)
    config = TwinLMConfig.from_preset("tiny-modern-decoder", vocab_size=512, **overrides)
    model = TwinLMForCausalLM(config).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(5, 512, (2, 32), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :8] = 0
    results = []
    for implementation in ("sdpa", "flash_attention_2"):
        model.config._attn_implementation = implementation
        results.append(
            model.generate(prompt, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
        )
    return torch.equal(results[0], results[1])


def bf16_training_falls(preset: str) -> tuple[float, float]:
    torch.manual_seed(0)
    config = TwinLMConfig.from_preset(preset, vocab_size=512)
    model = (TwinLMForCausalLM if config.is_causal else TwinLMForMaskedLM)(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(5, 64, (16, 128), device="cuda")  # a small vocabulary: learnable in a few steps
    labels = ids.clone()
    if not config.is_causal:
        labels[torch.rand(labels.shape, device="cuda") > 0.15] = -100
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses[0], losses[-1]


ROOT = Path(__file__).resolve().parents[1]


def recipe_runs(names: list[str], steps: int, extra: list[str] = ()) -> int:
    """Run `steps` steps of each GPU recipe (then the `extra` overrides); one line each; returns the number
    of failures."""
    from twinlm.training import load_run_config, pretrain
    from twinlm.training.tracking import read_metrics

    os.chdir(ROOT)  # the recipes name ../shared/data relative to the repository root
    corpus = (ROOT.parent / "shared" / "data" / "corpus-modern").is_dir()
    failures, tokenizers = 0, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            config = ROOT / "configs" / "pretrain" / f"{name}.yaml"
            cfg = load_run_config(config)
            out = Path(scratch) / name
            overrides = [
                f"output_dir={out}",
                "training.max_minutes=null",
                f"training.max_steps={steps}",
                f"training.warmup_steps={max(1, steps // 10)}",
                "training.eval_every=0",
                "training.save_every=0",
                "training.eval_batches=10",
                f"training.log_every={max(1, min(10, steps // 10))}",
            ]
            if not corpus:
                overrides.append("data.sources=[]")
            overrides += list(extra)
            key = json.dumps(cfg.tokenizer.train.model_dump(mode="json") if cfg.tokenizer.train else None)
            if key in tokenizers:
                overrides += ["tokenizer.train=null", f"tokenizer.path={tokenizers[key]}"]
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            try:
                summary = pretrain(config, overrides)
            except Exception as err:  # one recipe's failure must not hide the others'
                failures += 1
                print(f"FAIL recipe {name}: {type(err).__name__}: {err}")
                continue
            tokenizers.setdefault(key, str(out / "tokenizer"))
            losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if m.get("loss") is not None]
            ok = len(losses) >= 2 and losses[-1] < losses[0]
            failures += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} recipe {name}: {summary['steps']} steps, loss {losses[0]:.3f} -> "
                f"{losses[-1]:.3f}, {summary['tokens_per_s'] or 0:,.0f} tokens/s, MFU {summary['mfu'] or 0:.1%}, "
                f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, {time.perf_counter() - started:.0f} s "
                f"with data preparation{'' if corpus else ' (embedded corpus: corpus-modern not found)'}"
            )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="*", metavar="NAME", help="GPU recipes to run (none named: all)")
    parser.add_argument("--steps", type=int, default=300, help="steps of each recipe (default: %(default)s)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for the recipes"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"twinlm {twinlm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    failures = 0
    if flash_available():
        for causal in (False, True):
            for overrides in ({}, {"sliding_window": 64}):
                diff = compare_flash(causal, overrides)
                ok = diff < 0.1  # bf16 logits of a random model: kernels differ in summation order only
                failures += not ok
                print(
                    f"{'ok  ' if ok else 'FAIL'} flash vs sdpa, causal={causal} {overrides}: max |logit diff| {diff:.4f}"
                )
        for overrides in ({}, {"sliding_window": 16}):
            ok = generation_agrees(overrides)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} flash greedy generation == sdpa {overrides}")
    else:
        print("skip flash checks: flash_attn is not installed")
    for preset in TwinLMConfig.preset_names():
        if preset.startswith("tiny-"):
            first, last = bf16_training_falls(preset)
            ok = last < first
            failures += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} bf16 training on the GPU, {preset}: loss {first:.3f} -> {last:.3f}"
            )
    if args.recipes is not None:
        names = args.recipes or sorted(p.stem for p in (ROOT / "configs" / "pretrain").glob("gpu-1h-*.yaml"))
        failures += recipe_runs(names, args.steps, args.set)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
