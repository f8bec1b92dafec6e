"""Time to quality: modern twinlm blocks vs GPT2LMHeadModel and BertForMaskedLM at equal parameter count.

A `modern-decoder` twin (pre-norm RMSNorm, RoPE, SwiGLU, GQA) trains against GPT2LMHeadModel, and a
`modern-encoder` twin (sparse prediction) against BertForMaskedLM, on the same batches of an excerpt of
../shared/data/corpus, in the same order, with the same AdamW and schedule; steps of the two models
alternate. The twin's feed-forward width is chosen so that both have the same number of parameters.
Measured: the wall time (training steps only) each needs to reach the reference's final validation
loss, and the curves (PNG).

    python benchmarks/bench_quality.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import Section, excerpt_texts, ratio, run_single, unique_parameters


@dataclass(frozen=True)
class Plan:
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq_len: int
    batch: int
    steps: int
    eval_every: int
    vocab: int
    chars: int
    lr: float = 1e-3


FULL = Plan(2, 128, 4, 512, 128, 8, 300, 25, 4096, 2_000_000)
QUICK = Plan(1, 32, 2, 64, 32, 2, 4, 2, 400, 60_000)
EVAL_BATCHES = 8


def token_blocks(objective: str, plan: Plan, docs: list[str]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(tokenizer, train blocks, validation blocks): documents tokenised with separators, concatenated and
    cut into rows of seq_len; every 20th document is held out."""
    from twinlm.tokenization import train_tokenizer

    kind = "wordpiece" if objective == "mlm" else "bpe"
    tokenizer = train_tokenizer(kind, texts=docs, vocab_size=plan.vocab, show_progress=False)
    encoded = tokenizer(docs, add_special_tokens=objective == "mlm")["input_ids"]
    eos = [] if objective == "mlm" else [tokenizer.eos_token_id]

    def cut(ids: list[list[int]]) -> torch.Tensor:
        flat = torch.tensor([t for row in ids for t in row + eos])
        n = len(flat) // plan.seq_len
        return flat[: n * plan.seq_len].view(n, plan.seq_len)

    train = cut([e for i, e in enumerate(encoded) if i % 20])
    val = cut([e for i, e in enumerate(encoded) if i % 20 == 0])
    return tokenizer, train, val


def mask_batch(ids: torch.Tensor, tokenizer: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """BERT masking: 15% of non-special tokens; 80% [MASK], 10% a random token, 10% unchanged."""
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    masked = (torch.rand(ids.shape, generator=generator) < 0.15) & ~special
    choice = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), ids.shape, generator=generator)
    new = torch.where(masked & (choice < 0.8), torch.full_like(ids, tokenizer.mask_token_id), ids)
    new = torch.where(masked & (choice >= 0.8) & (choice < 0.9), random_ids, new)
    return {"input_ids": new, "labels": torch.where(masked, ids, torch.full_like(ids, -100))}


def batch_at(objective: str, blocks: torch.Tensor, step: int, plan: Plan, tokenizer: Any) -> dict:
    """The step's batch (same for both models): rows in a seeded order, masks seeded by the step."""
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(step // max(1, len(blocks))))
    index = [(step * plan.batch + i) % len(blocks) for i in range(plan.batch)]
    ids = blocks[order[index]]
    if objective == "clm":
        return {"input_ids": ids, "labels": ids}
    return mask_batch(ids, tokenizer, torch.Generator().manual_seed(10_000 + step))


def reference(objective: str, plan: Plan, tokenizer: Any) -> torch.nn.Module:
    """GPT2LMHeadModel / BertForMaskedLM of the plan's shape, without dropout (as the modern twins)."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if objective == "clm":
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tokenizer), n_embd=plan.hidden, n_layer=plan.layers, n_head=plan.heads,
                n_inner=plan.ffn, n_positions=plan.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        )  # fmt: skip
    return BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer), hidden_size=plan.hidden, num_hidden_layers=plan.layers,
            num_attention_heads=plan.heads, intermediate_size=plan.ffn, max_position_embeddings=plan.seq_len,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip


def modern_twin(objective: str, plan: Plan, tokenizer: Any, target_params: int) -> torch.nn.Module:
    """The tiny modern preset at the plan's shape, its feed-forward width set to match `target_params`."""
    import twinlm

    preset = "tiny-modern-decoder" if objective == "clm" else "tiny-modern-encoder"
    cls = twinlm.TwinLMForCausalLM if objective == "clm" else twinlm.TwinLMForMaskedLM

    def build(ffn: int) -> torch.nn.Module:
        torch.manual_seed(0)
        config = twinlm.TwinLMConfig.from_preset(
            preset, vocab_size=len(tokenizer), hidden_size=plan.hidden, num_hidden_layers=plan.layers,
            num_attention_heads=plan.heads, num_key_value_heads=plan.heads, intermediate_size=ffn,
            max_position_embeddings=plan.seq_len, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return cls(config)

    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in unique_parameters(model))

    low, high = count(build(8)), count(build(16))  # the count is linear in the width
    per_unit = (high - low) / 8
    ffn = max(8, round(8 + (target_params - low) / per_unit))
    return build(ffn)


def make_step(model: torch.nn.Module, plan: Plan) -> Callable[[dict], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, plan.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / plan.steps))),
    )

    def step(batch: dict) -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()

    return step


def val_loss(model: torch.nn.Module, batches: list[dict]) -> float:
    model.eval()
    with torch.inference_mode():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


def train_pair(
    objective: str, plan: Plan, models: dict[str, torch.nn.Module], data: tuple
) -> dict[str, list]:
    """Train both models on the same batches, steps alternating; curves of (train seconds, step, val loss)."""
    tokenizer, train, val = data
    val_batches = [batch_at(objective, val, i, plan, tokenizer) for i in range(EVAL_BATCHES)]
    steps = {name: make_step(m, plan) for name, m in models.items()}
    clock = dict.fromkeys(models, 0.0)
    curves: dict[str, list] = {name: [(0.0, 0, val_loss(m, val_batches))] for name, m in models.items()}
    names = list(models)
    for s in range(plan.steps):
        batch = batch_at(objective, train, s, plan, tokenizer)
        for name in names if s % 2 == 0 else reversed(names):
            start = time.perf_counter()
            steps[name](batch)
            clock[name] += time.perf_counter() - start
        if (s + 1) % plan.eval_every == 0 or s + 1 == plan.steps:
            for name, m in models.items():
                curves[name].append((clock[name], s + 1, val_loss(m, val_batches)))
    return curves


def time_to(curve: list[tuple[float, int, float]], target: float) -> float | None:
    """Training seconds at the first evaluation whose loss is at or below `target` (None: never)."""
    return next((t for t, _, loss in curve if loss <= target), None)


def plot(curves: dict[str, list], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([t for t, _, _ in curve], [loss for _, _, loss in curve], marker=".", label=name)
    ax.set(xlabel="training seconds", ylabel="validation loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(objective: str, plan: Plan, docs: list[str], out: Path) -> dict[str, Any]:
    data = token_blocks(objective, plan, docs)
    ref = reference(objective, plan, data[0])
    ref_params = sum(p.numel() for p in unique_parameters(ref))
    twin = modern_twin(objective, plan, data[0], ref_params)
    ref_name = "GPT2LMHeadModel" if objective == "clm" else "BertForMaskedLM"
    twin_name = "modern-decoder" if objective == "clm" else "modern-encoder"
    curves = train_pair(objective, plan, {ref_name: ref, twin_name: twin}, data)
    target = curves[ref_name][-1][2]
    ref_time, twin_time = time_to(curves[ref_name], target), time_to(curves[twin_name], target)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"quality_{objective}.png"
    plot(curves, f"{twin_name} vs {ref_name} (equal parameters, same batches)", png)
    return {
        "objective": objective,
        "reference": f"{ref_name} ({ref_params / 1e6:.2f}M params)",
        "twinlm": f"{twin_name} ({sum(p.numel() for p in unique_parameters(twin)) / 1e6:.2f}M params, "
        f"FF {twin.config.intermediate_size})",
        "reference final val loss": target,
        "twinlm final val loss": curves[twin_name][-1][2],
        "reference s to target": ref_time,
        "twinlm s to target": twin_time,
        "time ratio (twinlm / reference)": ratio(twin_time, ref_time),
        "curve": png.name,
    }


def run(args: argparse.Namespace) -> Section:
    plan = QUICK if args.quick else FULL
    docs, where = excerpt_texts(plan.chars)
    rows = [compare(objective, plan, docs, args.out) for objective in ("clm", "mlm")]
    headline = [
        {"benchmark": f"time to quality {r['twinlm'].split(' ')[0]} vs {r['reference'].split(' ')[0]}",
         "twinlm / reference": r["time ratio (twinlm / reference)"], "target": "<= 0.7x (time)"}
        for r in rows
    ]  # fmt: skip
    notes = [
        f"text: {plan.chars / 1e6:.2f} MB excerpt of {where}; tokenizers trained on it (vocab {plan.vocab}); "
        "every 20th document held out",
        f"reference shape L{plan.layers} H{plan.hidden} A{plan.heads} FF{plan.ffn}, seq {plan.seq_len}, batch "
        f"{plan.batch}, {plan.steps} steps, AdamW lr {plan.lr:g} betas (0.9, 0.98) wd 0.01, clip 1.0, "
        "linear warm-up 10% then cosine; no dropout on either side; the twin's FF width matches parameters",
        "time to target = training seconds (evaluation excluded) at the first evaluation (every "
        f"{plan.eval_every} steps, {EVAL_BATCHES} fixed validation batches) at or below the reference's final "
        "validation loss; n/a = not reached",
        "masked LM: the same masks for both (15%, 80/10/10); the modern encoder uses sparse prediction",
    ]
    return Section("quality", "Time to quality at equal parameter count", rows, notes, headline, files=[
        r["curve"] for r in rows
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_single(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
