"""GPU checks that the CPU test suite cannot run: one short script for a lent GPU machine.

    python scripts/gpu_checks.py        # needs CUDA; flash-attn (or the kernels package) for the flash rows

1. attn_implementation="flash_attention_2" against "sdpa" in bf16 on padded, packed and sliding-window
   batches, and greedy generation with the KV cache (tests/test_flash_attention.py checks the same
   plumbing on the CPU against a reference of the kernel's contract).
2. A few bf16 optimizer steps of each tiny preset on the GPU: the loss must fall.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import sys

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


def main() -> int:
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
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
