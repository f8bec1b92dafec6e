"""End to end: `twinlm.training.pretrain` vs transformers' `Trainer` with a run_clm / run_mlm-style script.

Both sides get the same text (train/validation files cut from the corpus), the same tokenizer (trained
once by twinlm and saved), the same model shape (twinlm's `gpt2-small` / `bert-base` presets resized;
GPT2LMHeadModel / BertForMaskedLM of the same config on the reference side), batch, sequence length,
AdamW settings, clipping and linear schedule with warm-up. The twinlm masked-LM run sets
`sparse_prediction: true`, as a user would. Runs alternate (twinlm, Trainer, Trainer, twinlm, ...).

Measured: wall seconds of the whole call (data preparation, model, training, saving), training tokens/s
(tokens / training seconds as each side reports them), the last logged training loss, and the
validation loss of both final models on the same validation blocks (and, for masked LM, the same masks).

    python benchmarks/bench_end_to_end.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from common import Section, excerpt_texts, median, ratio, repeats, run_single


@dataclass(frozen=True)
class Plan:
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq_len: int
    batch: int
    steps: int
    warmup: int
    vocab: int
    chars: int
    lr: float = 5e-4


FULL = Plan(4, 256, 4, 1024, 128, 8, 30, 3, 8000, 3_000_000)
QUICK = Plan(2, 64, 4, 128, 32, 4, 4, 1, 1000, 150_000)


def write_split(folder: Path, plan: Plan) -> tuple[Path, Path, str]:
    """train.txt / validation.txt (every 20th paragraph) from an excerpt of the corpus."""
    docs, where = excerpt_texts(plan.chars)
    train, val = folder / "train.txt", folder / "validation.txt"
    train.write_text("\n\n".join(d for i, d in enumerate(docs) if i % 20) + "\n", encoding="utf-8")
    val.write_text("\n\n".join(d for i, d in enumerate(docs) if i % 20 == 0) + "\n", encoding="utf-8")
    return train, val, where


def group_texts(examples: dict[str, list], seq_len: int) -> dict[str, list]:
    """run_clm.py / run_mlm.py: concatenate, cut into blocks of seq_len, drop the remainder."""
    concatenated = {k: list(chain(*examples[k])) for k in examples}
    total = (len(concatenated["input_ids"]) // seq_len) * seq_len
    return {k: [t[i : i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}


def blocks(path: Path, tokenizer: Any, seq_len: int, cache: str) -> Any:
    """The run_clm / run_mlm data pipeline: load_dataset("text"), tokenize, group_texts."""
    from datasets import load_dataset

    raw = load_dataset("text", data_files=str(path), split="train", cache_dir=cache)
    raw = raw.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
    tokenized = raw.map(
        lambda b: tokenizer(b["text"], return_special_tokens_mask=True), batched=True, remove_columns=["text"]
    )
    return tokenized.map(lambda b: group_texts(b, seq_len), batched=True)


def reference_model(objective: str, plan: Plan, vocab: int, tokenizer: Any) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    if objective == "mlm":
        return BertForMaskedLM(
            BertConfig(
                vocab_size=vocab, hidden_size=plan.hidden, num_hidden_layers=plan.layers,
                num_attention_heads=plan.heads, intermediate_size=plan.ffn,
                max_position_embeddings=plan.seq_len, pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab, n_embd=plan.hidden, n_layer=plan.layers, n_head=plan.heads, n_inner=plan.ffn,
            n_positions=plan.seq_len, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip


def run_trainer(objective: str, plan: Plan, tok_dir: Path, train: Path, out: Path) -> dict[str, Any]:
    """transformers' Trainer on the reference model, run_clm / run_mlm style; returns the measurements."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(42)
    model = reference_model(objective, plan, len(tokenizer), tokenizer)
    dataset = blocks(train, tokenizer, plan.seq_len, str(out / "cache"))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=objective == "mlm", mlm_probability=0.15)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=plan.batch, max_steps=plan.steps,
        learning_rate=plan.lr, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, max_grad_norm=1.0,
        lr_scheduler_type="linear", warmup_steps=plan.warmup, logging_steps=max(1, plan.steps // 6),
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=42,
        dataloader_drop_last=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    metrics = trainer.train().metrics
    trainer.save_model(str(out / "final"))
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = plan.steps * plan.batch * plan.seq_len
    return {
        "wall": wall,
        "tokens_per_s": tokens / metrics["train_runtime"],
        "train_loss": losses[-1] if losses else None,
        "model": model.eval(),
    }


def twinlm_config(objective: str, plan: Plan, tok_dir: Path, train: Path, out: Path) -> dict[str, Any]:
    """The run config a user writes for the same run (twinlm.training.pretrain takes it as a dict)."""
    overrides: dict[str, Any] = {
        "num_hidden_layers": plan.layers, "hidden_size": plan.hidden, "num_attention_heads": plan.heads,
        "intermediate_size": plan.ffn, "max_position_embeddings": plan.seq_len,
    }  # fmt: skip
    if objective == "mlm":
        overrides["sparse_prediction"] = True
    return {
        "model": {"preset": "bert-base" if objective == "mlm" else "gpt2-small", "overrides": overrides},
        "tokenizer": {"path": str(tok_dir)},
        "data": {
            "sources": [str(train)], "seq_len": plan.seq_len, "validation_fraction": 0.0, "num_proc": 1,
            "cache_dir": str(out / "cache"), "mlm_probability": 0.15,
        },
        "training": {
            "batch_size": plan.batch, "grad_accum": 1, "lr": plan.lr, "weight_decay": 0.01,
            "betas": [0.9, 0.98], "max_grad_norm": 1.0, "max_steps": plan.steps, "warmup_steps": plan.warmup,
            "schedule": "linear", "mixed_precision": "no", "eval_every": 0, "save_every": 0,
            "log_every": max(1, plan.steps // 6), "seed": 42,
        },
        "output_dir": str(out),
        "logging": {"report_to": "none"},
    }  # fmt: skip


def run_twinlm(objective: str, plan: Plan, tok_dir: Path, train: Path, out: Path) -> dict[str, Any]:
    """twinlm.training.pretrain on the same data; reads its summary.json and metrics.jsonl."""
    import twinlm
    from twinlm.training import pretrain

    start = time.perf_counter()
    summary = pretrain(twinlm_config(objective, plan, tok_dir, train, out))
    wall = time.perf_counter() - start
    written = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    cls = twinlm.TwinLMForMaskedLM if objective == "mlm" else twinlm.TwinLMForCausalLM
    return {
        "wall": wall,
        "tokens_per_s": written["tokens_seen"] / written["train_seconds"],
        "reported_tokens_per_s": summary.get("tokens_per_s"),
        "train_loss": losses[-1] if losses else None,
        "model": cls.from_pretrained(summary["final_model"]).eval(),
    }


def validation_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], causal: bool) -> float:
    """Mean loss over the validation batches, weighted by their target tokens."""
    total = count = 0.0
    with torch.inference_mode():
        for batch in batches:
            labels = batch["labels"][:, 1:] if causal else batch["labels"]
            n = int((labels != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / count


def validation_batches(objective: str, plan: Plan, tok_dir: Path, val: Path, cache: str) -> list[dict]:
    """The same validation blocks (and masks) for both sides, run_mlm / run_clm style."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = blocks(val, tokenizer, plan.seq_len, cache)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=objective == "mlm", mlm_probability=0.15)
    torch.manual_seed(0)
    rows = [data[i] for i in range(min(len(data), 16 * plan.batch))]
    out = []
    for i in range(0, len(rows) - plan.batch + 1, plan.batch):
        batch = collator(rows[i : i + plan.batch])
        out.append({"input_ids": batch["input_ids"], "labels": batch["labels"]})
    if not out:
        raise SystemExit(f"the validation text holds fewer than {plan.batch} blocks of {plan.seq_len} tokens")
    return out


def compare(
    objective: str, plan: Plan, n: int, tmp: Path, train: Path, val: Path, first: int = 0
) -> dict[str, Any]:
    """Alternating runs of both sides (run i starts with side (first + i) % 2); medians of wall time and
    tokens/s; losses of the last run."""
    from twinlm.tokenization import train_tokenizer

    kind = "wordpiece" if objective == "mlm" else "bpe"
    tok_dir = tmp / f"tokenizer-{kind}"
    train_tokenizer(kind, files=[train], vocab_size=plan.vocab, out_dir=tok_dir, show_progress=False)
    val_batches = validation_batches(objective, plan, tok_dir, val, str(tmp / "val-cache"))
    sides = {"twinlm": run_twinlm, "Trainer": run_trainer}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for i in range(n):
        for name in sides if (first + i) % 2 == 0 else reversed(list(sides)):
            out = tmp / f"{objective}-{name}-{i}"
            results[name].append(sides[name](objective, plan, tok_dir, train, out))
    last = {name: runs[-1] for name, runs in results.items()}
    val_loss = {
        name: validation_loss(r["model"], val_batches, objective == "clm") for name, r in last.items()
    }
    wall = {name: median([r["wall"] for r in runs]) for name, runs in results.items()}
    tps = {name: median([r["tokens_per_s"] for r in runs]) for name, runs in results.items()}
    return {
        "objective": "masked LM (BertForMaskedLM)" if objective == "mlm" else "causal LM (GPT2LMHeadModel)",
        "steps": plan.steps,
        "Trainer wall s": wall["Trainer"],
        "twinlm wall s": wall["twinlm"],
        "wall speed-up": ratio(wall["Trainer"], wall["twinlm"]),
        "Trainer train tok/s": tps["Trainer"],
        "twinlm train tok/s": tps["twinlm"],
        "train speed-up": ratio(tps["twinlm"], tps["Trainer"]),
        "Trainer last train loss": last["Trainer"]["train_loss"],
        "twinlm last train loss": last["twinlm"]["train_loss"],
        "Trainer val loss": val_loss["Trainer"],
        "twinlm val loss": val_loss["twinlm"],
    }


def run(args: argparse.Namespace) -> Section:
    plan = QUICK if args.quick else FULL
    n = repeats(args, 1)
    with tempfile.TemporaryDirectory(prefix="twinlm-bench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        train, val, where = write_split(tmp, plan)
        if not args.quick:  # first calls pay imports and lazy set-up: one untimed toy run of each side
            (tmp / "warm-up").mkdir()
            for objective in ("clm", "mlm"):
                compare(objective, QUICK, 1, tmp / "warm-up", train, val)
        rows = [
            compare(objective, plan, n, tmp, train, val, first)
            for first, objective in enumerate(("clm", "mlm"))
        ]
    headline = [
        {
            "benchmark": f"end to end {r['objective']}: pretrain vs Trainer",
            "twinlm / reference": r["wall speed-up"],
            "target": ">= 1.3x",
        }
        for r in rows
    ]
    notes = [
        f"shape L{plan.layers} H{plan.hidden} A{plan.heads} FF{plan.ffn}, vocab {plan.vocab} (tokenizer trained "
        f"once by twinlm, shared), seq {plan.seq_len}, batch {plan.batch}, {plan.steps} steps, AdamW lr "
        f"{plan.lr:g} betas (0.9, 0.98) wd 0.01, clip 1.0, linear schedule, {plan.warmup} warm-up steps, fp32",
        f"text: {where}, {plan.chars / 1e6:.2f} MB excerpt, every 20th paragraph held out for validation",
        "twinlm: twinlm.training.pretrain(config dict) with presets gpt2-small / bert-base resized "
        "(masked LM with sparse_prediction: true); reference: Trainer + run_clm / run_mlm-style data "
        "(load_dataset text, tokenize, group_texts, DataCollatorForLanguageModeling)",
        "wall = the whole call (data preparation, model, training, saving the model; twinlm also writes a "
        "checkpoint with optimizer state); train tok/s = steps x batch x seq / the training seconds each side "
        f"reports; medians over {n} run(s) per side, alternating which side goes first",
        "val loss: both final models on the same validation blocks (masked LM: the same masks)",
    ]
    return Section("end_to_end", "End to end: twinlm pretrain vs transformers Trainer", rows, notes, headline)


def main(argv: list[str] | None = None) -> int:
    return run_single(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
