"""GPU checks that the CPU test suite cannot run: one short script for a lent GPU machine.

    python scripts/gpu_checks.py        # needs CUDA; flash-attn (or the kernels package) for the flash rows
    python scripts/gpu_checks.py --recipes gpu-1h-mlm-small gpu-1h-rtd-base --steps 200 [--set training.batch_size=128]
    python scripts/gpu_checks.py --fsdp   # on a machine with 1+ GPUs (2+ for a resume on another count)

1. attn_implementation="flash_attention_2" against "sdpa" in bf16 on padded, packed and sliding-window
   batches, and greedy generation with the KV cache (tests/test_flash_attention.py checks the same
   plumbing on the CPU against a reference of the kernel's contract).
2. A few bf16 optimizer steps of each tiny preset on the GPU: the loss must fall.
3. Long-context paths against the dense masked reference on the GPU: sliding windows in blocks (SDPA's CUDA
   kernels on the blocked layout) in fp32 (outputs and gradients) and bf16, flex_attention (transformers
   compiles it) with windows and a local/global mix, linear attention against its written-out form, and
   generation with windowed and recurrent caches; then forward+backward times of full attention, a 256
   window and linear attention at 8k tokens (printed, not checked).
4. With --recipes: a few hundred steps of GPU recipes (configs/pretrain/gpu-1h-*.yaml; all of them when no
   name is given) as shipped but with a step budget instead of the hour: the loss must fall; prints tokens/s
   and peak GPU memory. From the repository root; without ../shared/data/corpus-modern the embedded corpus
   stands in (and the line says so). Recipes with the same tokenizer settings share the first one's tokenizer.
5. With --fsdp, alone: FSDP2 through accelerate (configs/accelerate/fsdp.yaml) on every GPU of the machine
   against one plain process of the same global batch, and resumed from its middle checkpoint on as many GPUs
   and on fewer (with 2+ GPUs); the CPU suite runs the same on CPU processes over gloo (tests/test_training.py::
   test_fsdp2_on_cpu_processes_trains_resumes_and_moves_to_another_count), this runs it on NCCL.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

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


DEVICE = "cuda"  # the long-context checks run on any device (a CPU smoke run sets "cpu")


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def dense_windows():
    """Windows as one dense masked attention: the reference the blocked layout must reproduce."""
    from twinlm.model import attention

    with mock.patch.object(attention.WindowBlocks, "applies", staticmethod(lambda *args: False)):
        yield


def long_batch(causal: bool, length: int = 1024):
    ids = torch.randint(5, 512, (2, length), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, : length // 8] = 0 if causal else 1
    mask[1, -length // 8 :] = 0 if not causal else 1
    positions = (
        torch.cat([torch.arange(length // 3), torch.arange(length - length // 3)]).expand(2, -1).to(DEVICE)
    )
    return ids, (dict(attention_mask=mask), mask.bool()), (dict(position_ids=positions), ids > -1)


def blocked_window_error(causal: bool, dtype: torch.dtype, overrides: dict) -> tuple[float, float]:
    """Max |difference| of logits and of q_proj gradients, blocked window vs dense masked (padded and packed)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    preset = "tiny-modern-decoder" if causal else "tiny-modern-encoder"
    config = TwinLMConfig.from_preset(preset, vocab_size=512, max_position_embeddings=2048, **overrides)
    model = (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(config).to(DEVICE).to(dtype).train()
    ids, *cases = long_batch(causal)
    worst_logits = worst_grads = 0.0
    for kwargs, real in cases:
        # the encoder trains with sparse prediction (tiny-modern-encoder): its last block runs per masked query
        every_7th = torch.arange(ids.shape[1], device=DEVICE) % 7 == 0
        labels = ids if causal else ids.masked_fill(~(real & every_7th), -100)
        results = []
        for reference in (False, True):
            with dense_windows() if reference else contextlib.nullcontext():
                model.zero_grad()
                out = model(ids, labels=labels, **kwargs)
                out.loss.backward()
            results.append((out.logits.float(), model.model.layers[0].attention.q_proj.weight.grad.float()))
        (a, ga), (b, gb) = results
        difference = (a - b).abs()[real] if causal else (a - b).abs()
        worst_logits = max(worst_logits, difference.max().item())
        worst_grads = max(worst_grads, ((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-12)).item())
    return worst_logits, worst_grads


def flex_error(causal: bool, overrides: dict) -> tuple[float, bool]:
    """flex_attention (compiled by transformers) vs sdpa, bf16: max |logit diff|, and equal greedy tokens."""
    torch.manual_seed(0)
    preset = "tiny-modern-decoder" if causal else "tiny-modern-encoder"
    config = TwinLMConfig.from_preset(preset, vocab_size=512, max_position_embeddings=2048, **overrides)
    model = (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(config).to(DEVICE).to(torch.bfloat16).eval()
    ids, *cases = long_batch(causal)
    worst = 0.0
    with torch.no_grad():
        for kwargs, real in cases:
            outs = []
            for implementation in ("sdpa", "flex_attention"):
                model.config._attn_implementation = implementation
                outs.append(model(ids, **kwargs).logits.float())
            worst = max(worst, (outs[0] - outs[1]).abs()[real].max().item())
    same = True
    if causal:
        tokens = []
        for implementation in ("sdpa", "flex_attention"):
            model.config._attn_implementation = implementation
            tokens.append(model.generate(ids[:, :64], max_new_tokens=32, do_sample=False, pad_token_id=0))
        same = torch.equal(tokens[0], tokens[1])
    return worst, same


def linear_error(causal: bool) -> float:
    """Linear attention, chunked, against its written-out (n x n) form (output_attentions=True), fp32."""
    torch.manual_seed(0)
    preset = "tiny-modern-decoder" if causal else "tiny-modern-encoder"
    config = TwinLMConfig.from_preset(
        preset, vocab_size=512, max_position_embeddings=2048, attention_scoring="linear"
    )
    model = (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(config).to(DEVICE).eval()
    ids, *cases = long_batch(causal)
    worst = 0.0
    with torch.no_grad():
        for kwargs, real in cases:
            chunked = model(ids, use_cache=False, **kwargs).logits
            written = model(ids, use_cache=False, output_attentions=True, **kwargs).logits
            worst = max(worst, (chunked - written).abs()[real].max().item())
    return worst


def cached_generation_agrees(overrides: dict) -> bool:
    torch.manual_seed(0)
    config = TwinLMConfig.from_preset("tiny-modern-decoder", vocab_size=512, **overrides)
    model = TwinLMForCausalLM(config).to(DEVICE).eval()
    prompt = torch.randint(5, 512, (2, 48), device=DEVICE)
    kwargs = dict(max_new_tokens=48, do_sample=False, pad_token_id=0)
    return torch.equal(
        model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs)
    )


def long_context_times(length: int = 8192) -> str:
    """Forward + backward seconds of one layer (H256, 4 heads) per attention variant, bf16, on the GPU."""
    results = []
    for name, overrides in (
        ("full", {}),
        ("window 256", {"sliding_window": 256}),
        ("linear", {"attention_scoring": "linear"}),
    ):
        torch.manual_seed(0)
        config = TwinLMConfig.from_preset(
            "mini-modern-decoder",
            vocab_size=512,
            num_hidden_layers=1,
            max_position_embeddings=length,
            **overrides,
        )
        model = twinlm.TwinLMModel(config).to(DEVICE)
        embeds = torch.randn(1, length, config.hidden_size, device=DEVICE)
        for i in range(4):
            if i == 1:
                synchronize()
                start = time.perf_counter()
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                out = model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            out.float().square().mean().backward()
        synchronize()
        results.append(f"{name} {(time.perf_counter() - start) / 3 * 1000:.1f} ms")
    return ", ".join(results)


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


def fsdp_runs(steps: int = 8, per_process: int = 4) -> int:
    """FSDP2 through accelerate (configs/accelerate/fsdp.yaml) on every GPU of the machine: the loss curve of
    one plain process with the same global batch (the same tokenizer), and a resume from the middle checkpoint
    that continues it; with 2+ GPUs also a resume of that checkpoint on the largest smaller number of GPUs that
    keeps the global batch. One line each; returns the number of failures. (The CPU suite runs the same on CPU
    processes over gloo; this is the NCCL path.)"""
    import shutil
    import socket
    import subprocess

    from twinlm.training.tracking import read_metrics

    gpus = torch.cuda.device_count()
    global_batch, half = per_process * gpus, steps // 2
    settings = [
        "training.max_steps=" + str(steps),
        f"training.save_every={half}",
        "training.eval_every=0",
        "training.eval_on_start=false",
        "training.eval_batches=2",
        "training.log_every=1",
        "training.warmup_steps=1",
        *(
            f"model.overrides.{k}=0.0"
            for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout_prob")
        ),
    ]
    config = str(ROOT / "configs" / "pretrain" / "tiny-clm.yaml")

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def run(out: Path, processes: int, extra: list[str], fsdp: bool = True) -> dict[int, float]:
        launch = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")] if fsdp else []
        batch = f"training.batch_size={global_batch // processes}"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(ROOT / "scripts" / "pretrain.py"), "--config", config,
            f"output_dir={out}", *settings, batch, *extra,
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise RuntimeError("no result in 15 minutes (a hung collective?)") from None
        if proc.returncode:
            lines = proc.stderr.splitlines()
            said = [line for line in lines if "error:" in line] or [line for line in lines if "Error" in line]
            raise RuntimeError((said or lines[-1:] or ["failed"])[-1].strip())
        return {
            m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl") if m.get("loss") is not None
        }

    def cut(source: Path, target: Path) -> Path:
        shutil.copytree(source, target)
        for name in (f"checkpoints/checkpoint-{steps}", "final", "summary.json"):
            path = target / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return target

    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        try:
            sharded = run(root / "fsdp", gpus, [])
            same_tokenizer = [f"tokenizer.path={root / 'fsdp' / 'tokenizer'}", "tokenizer.train=null"]
            plain = run(root / "plain", 1, same_tokenizer, fsdp=False)
        except RuntimeError as err:
            print(f"FAIL fsdp2 on {gpus} GPU(s): {err}")
            return 1
        worst = max(abs(sharded[s] - plain[s]) for s in plain)
        ok = worst < 1e-3
        failures += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} fsdp2 on {gpus} GPU(s) vs one plain process, global batch {global_batch}: "
            f"max |loss diff| {worst:.2e}"
        )
        fewer = [n for n in range(gpus - 1, 0, -1) if global_batch % n == 0][:1]
        for processes in (gpus, *fewer):
            try:
                resumed = run(
                    cut(root / "fsdp", root / f"resume-{processes}"),
                    processes,
                    ["training.resume_from_checkpoint=latest"],
                )
            except RuntimeError as err:
                failures += 1
                print(f"FAIL fsdp2 resume of a {gpus}-GPU checkpoint on {processes}: {err}")
                continue
            worst = max(abs(resumed[s] - sharded[s]) for s in range(half + 1, steps + 1))
            ok = worst < 1e-3
            failures += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} fsdp2 resume of a {gpus}-GPU checkpoint on {processes} GPU(s): max "
                f"|loss diff| after step {half} {worst:.2e}"
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
    parser.add_argument(
        "--fsdp", action="store_true", help="only FSDP2 through accelerate on every GPU, and its resume"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"twinlm {twinlm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    if args.fsdp:  # alone: the other checks take most of a lent machine's minutes
        return 1 if fsdp_runs() else 0
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
    for causal in (False, True):
        for overrides in (
            {"sliding_window": 64},
            {"sliding_window": 64, "global_attention_every_n_layers": 2},
        ):
            for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
                logits, grads = blocked_window_error(causal, dtype, overrides)
                ok = logits < tolerance and grads < (1e-3 if dtype == torch.float32 else 0.1)
                failures += not ok
                print(
                    f"{'ok  ' if ok else 'FAIL'} blocked window vs dense mask, causal={causal} {overrides} "
                    f"{dtype}: max |logit diff| {logits:.2e}, relative q_proj grad diff {grads:.2e}"
                )
        for overrides in (
            {},
            {"sliding_window": 64},
            {"sliding_window": 64, "global_attention_every_n_layers": 2},
        ):
            diff, same = flex_error(causal, overrides)
            ok = diff < 0.1 and same
            failures += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} flex_attention vs sdpa, causal={causal} {overrides}: max |logit diff| "
                f"{diff:.4f}" + (f", greedy tokens equal: {same}" if causal else "")
            )
        diff = linear_error(causal)
        ok = diff < 1e-3
        failures += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} linear attention chunked vs written out, causal={causal}: {diff:.2e}"
        )
    for overrides in (
        {"sliding_window": 16, "global_attention_every_n_layers": 2},
        {"attention_scoring": "linear"},
    ):
        ok = cached_generation_agrees(overrides)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} greedy generation with the model's cache == without {overrides}")
    print(f"info forward+backward at 8192 tokens, one layer, bf16: {long_context_times()}")
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
