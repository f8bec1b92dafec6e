"""Training throughput, memory and matmul efficiency: twinlm vs BertForMaskedLM and GPT2LMHeadModel (the classic
twins), and vs ModernBertForMaskedLM and LlamaForCausalLM (the modern ones, at the mini twins' shapes).

Each twinlm model is built from its reference, so both sides hold the same weights and shapes: BERT, GPT-2 and
Llama with `twinlm.convert.from_hf` (exact), ModernBERT with `twin_of_modernbert` here (every weight copied; the
one difference is that ModernBERT's first block has no attention norm, where twinlm's pre-norm block has one: at
init a LayerNorm of the already normalised embeddings, 1e-4 in the logits). The masked-LM twins run with
`sparse_prediction=True` (the LM head, and the last block's queries, only at masked positions), as a user
pretraining them would; ModernBERT runs with its own `sparse_prediction=True` (the head at masked positions).
BERT and GPT-2 keep their dropout (0.1; twinlm draws its CPU masks faster, same distribution); ModernBERT and Llama
have none. Both sides get the same batch, AdamW and precision; one training step (forward, backward, optimizer
step) of each runs in turn, and the medians are compared.

    python benchmarks/bench_training.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import (
    Section,
    alternate,
    matmul_peak,
    median,
    ratio,
    repeats,
    run_single,
    training_memory,
)

from twinlm.training.tracking import model_flops_per_token


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq_len: int
    batch: int
    kv_heads: int | None = None  # grouped-query attention (the decoder of the modern pair)

    def label(self) -> str:
        kv = f" KV{self.kv_heads}" if self.kv_heads else ""
        return (
            f"{self.name} (L{self.layers} H{self.hidden} A{self.heads}{kv} FF{self.ffn} V{self.vocab} "
            f"T{self.seq_len} B{self.batch})"
        )


SHAPES = [
    Shape("small", 4, 256, 4, 1024, 8192, 128, 8),
    Shape("mid", 4, 512, 8, 2048, 8192, 256, 8),
]
QUICK_SHAPES = [Shape("toy", 2, 64, 4, 128, 512, 32, 2)]
# The mini twins (mini-modern-encoder/-decoder: BERT-Mini's L4 H256 A4, a gated MLP of 688 units, RoPE, 2 key/value
# heads for the decoder) against ModernBERT (GeGLU, LayerNorm) and Llama (SwiGLU, RMSNorm) of the same shape.
MODERN_PAIRS = [
    ("modernbert", Shape("mini", 4, 256, 4, 688, 8192, 128, 32)),
    ("llama", Shape("mini", 4, 256, 4, 688, 8192, 128, 32, kv_heads=2)),
]
QUICK_MODERN_PAIRS = [
    ("modernbert", Shape("toy", 2, 64, 4, 96, 512, 32, 2)),
    ("llama", Shape("toy", 2, 64, 4, 96, 512, 32, 2, kv_heads=2)),
]
REFERENCE_NAMES = {
    "bert": "BertForMaskedLM",
    "gpt2": "GPT2LMHeadModel",
    "modernbert": "ModernBertForMaskedLM",
    "llama": "LlamaForCausalLM",
}
MASKED = ("bert", "modernbert")
TARGETS = {"bert": ">= 1.5x", "gpt2": ">= 1.25x", "modernbert": ">= 1.4x", "llama": ">= 1.25x"}
MLM_PROBABILITY = 0.15


def reference_model(kind: str, shape: Shape) -> torch.nn.Module:
    """A randomly initialised BertForMaskedLM ("bert"), GPT2LMHeadModel ("gpt2"), ModernBertForMaskedLM
    ("modernbert": every layer global, as the mini twin; its sparse prediction on) or LlamaForCausalLM ("llama":
    tied embeddings, as the mini twin) of `shape` (SDPA)."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        ModernBertConfig,
        ModernBertForMaskedLM,
    )

    torch.manual_seed(0)
    if kind == "modernbert":
        config = ModernBertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.ffn,
            max_position_embeddings=max(512, shape.seq_len),
            global_attn_every_n_layers=1,
            sparse_prediction=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        )
        return ModernBertForMaskedLM(config).train()
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads or shape.heads,
            intermediate_size=shape.ffn,
            max_position_embeddings=max(512, shape.seq_len),
            tie_word_embeddings=True,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config).train()
    if kind == "bert":
        config = BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.ffn,
            max_position_embeddings=max(512, shape.seq_len),
        )
        model: torch.nn.Module = BertForMaskedLM(config)
    else:
        config = GPT2Config(
            vocab_size=shape.vocab,
            n_embd=shape.hidden,
            n_layer=shape.layers,
            n_head=shape.heads,
            n_inner=shape.ffn,
            n_positions=max(1024, shape.seq_len),
            bos_token_id=shape.vocab - 1,
            eos_token_id=shape.vocab - 1,
        )
        model = GPT2LMHeadModel(config)
    return model.train()


def twin_of(reference: torch.nn.Module) -> torch.nn.Module:
    """The twinlm model converted from `reference` (same weights); masked LM with sparse prediction."""
    from twinlm.convert import from_hf

    if type(reference).__name__ == "ModernBertForMaskedLM":
        return twin_of_modernbert(reference).train()
    twin = from_hf(reference)
    if not twin.config.is_causal:
        twin.config.sparse_prediction = True
    return twin.train()


def twin_of_modernbert(reference: torch.nn.Module) -> torch.nn.Module:
    """A twinlm masked LM holding a ModernBertForMaskedLM's weights (global attention only): pre-norm LayerNorm
    blocks, RoPE with ModernBERT's global base, GeGLU (Wi's first half activated: gate_proj, its second: up_proj),
    the embedding norm, BERT's head; Wqkv split into q, k, v. ModernBERT's norms and head dense have no bias:
    twinlm's are zeros. Its first block has no attention norm: twinlm's stays a LayerNorm at its init (the identity
    on already normalised embeddings up to its epsilon: 1e-4 in the logits at init)."""
    from twinlm import TwinLMConfig, TwinLMForMaskedLM

    hf = reference.config
    if set(hf.layer_types) != {"full_attention"}:
        raise ValueError(
            "twin_of_modernbert copies global-attention ModernBERTs only (global_attn_every_n_layers=1)"
        )
    config = TwinLMConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        type_vocab_size=0,
        is_causal=False,
        position_embedding_type="rope",
        rope_theta=float(hf.rope_parameters["full_attention"]["rope_theta"]),
        norm_type="layernorm",
        norm_position="pre",
        embedding_norm=True,
        hidden_act="geglu",
        hidden_dropout_prob=float(hf.mlp_dropout),
        attention_probs_dropout_prob=float(hf.attention_dropout),
        embedding_dropout_prob=float(hf.embedding_dropout),
        layer_norm_eps=hf.norm_eps,
        attention_bias=hf.attention_bias,
        mlp_bias=hf.mlp_bias,
        tie_word_embeddings=hf.tie_word_embeddings,
        sparse_prediction=True,
        pad_token_id=hf.pad_token_id,
    )
    twin = TwinLMForMaskedLM(config)
    source = reference.state_dict()
    size, inner = hf.hidden_size, hf.intermediate_size
    state = {
        "model.embeddings.word_embeddings.weight": source["model.embeddings.tok_embeddings.weight"],
        "model.embeddings.norm.weight": source["model.embeddings.norm.weight"],
        "model.final_norm.weight": source["model.final_norm.weight"],
        "head_dense.weight": source["head.dense.weight"],
        "head_norm.weight": source["head.norm.weight"],
        "lm_head.weight": source["decoder.weight"],
        "lm_head.bias": source["decoder.bias"],
    }
    for i in range(hf.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        q, k, v = source[f"{src}attn.Wqkv.weight"].split(size)
        gate, up = source[f"{src}mlp.Wi.weight"].split(inner)
        state |= {
            f"{dst}attention.q_proj.weight": q,
            f"{dst}attention.k_proj.weight": k,
            f"{dst}attention.v_proj.weight": v,
            f"{dst}attention.o_proj.weight": source[f"{src}attn.Wo.weight"],
            f"{dst}mlp.gate_proj.weight": gate,
            f"{dst}mlp.up_proj.weight": up,
            f"{dst}mlp.down_proj.weight": source[f"{src}mlp.Wo.weight"],
            f"{dst}mlp_norm.weight": source[f"{src}mlp_norm.weight"],
        }
        if i > 0:
            state[f"{dst}attention_norm.weight"] = source[f"{src}attn_norm.weight"]
    missing = set(twin.state_dict()) - set(state)
    unexplained = sorted(
        k for k in missing if not k.endswith(".bias") and k != "model.layers.0.attention_norm.weight"
    )
    if unexplained:
        raise RuntimeError(f"twin_of_modernbert left weights uncopied: {unexplained}")
    twin.load_state_dict(state, strict=False)
    with torch.no_grad():  # what ModernBERT does not have: zero biases, an identity-initialised first norm
        for name, parameter in twin.named_parameters():
            if name in missing:
                parameter.fill_(1.0 if name.endswith("attention_norm.weight") else 0.0)
    return twin


def make_batch(kind: str, shape: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids; masked LM: 15% of positions masked (labels there, -100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, shape.vocab, (shape.batch, shape.seq_len), generator=g)
    if kind not in MASKED:
        return {"input_ids": ids, "labels": ids.clone()}
    masked = torch.rand(ids.shape, generator=g) < MLM_PROBABILITY
    masked[:, 0] = True  # at least one target per row
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    return {"input_ids": ids.masked_fill(masked, 4), "labels": labels}


def precision_context(precision: str, device: str = "cpu") -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str, device: str = "cpu"
) -> Callable[[], None]:
    """One optimizer step of `model` on `batch` (AdamW, fp32 master weights, optional bf16 autocast)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision_context(precision, device):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def memory_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str) -> dict[str, float]:
    def forward_backward() -> None:
        with precision_context(precision):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return training_memory(model, forward_backward)


def compare(kind: str, shape: Shape, precision: str, n: int, peaks: dict[str, float]) -> dict[str, Any]:
    """One table row: both sides' tokens/s, FLOP/s as a share of the matmul peak, training memory."""
    reference = reference_model(kind, shape)
    twin = twin_of(reference)
    batch = make_batch(kind, shape)
    times = alternate(
        {"ref": train_step(reference, batch, precision), "twin": train_step(twin, batch, precision)},
        repeats=n,
        warmup=1,
    )
    tokens = shape.batch * shape.seq_len
    flops = model_flops_per_token(reference, shape.layers, shape.hidden, shape.seq_len)
    ref_tps, twin_tps = tokens / median(times["ref"]), tokens / median(times["twin"])
    ref_mem, twin_mem = memory_of(reference, batch, precision), memory_of(twin, batch, precision)
    peak = peaks[precision]
    return {
        "shape": shape.label(),
        "reference": REFERENCE_NAMES[kind],
        "precision": "bf16 autocast" if precision == "bf16" else "fp32",
        "reference tok/s": ref_tps,
        "twinlm tok/s": twin_tps,
        "speed-up": ratio(twin_tps, ref_tps),
        "reference % of matmul peak": 100 * ref_tps * flops / peak,
        "twinlm % of matmul peak": 100 * twin_tps * flops / peak,
        "reference memory MiB": ref_mem["total_mib"],
        "twinlm memory MiB": twin_mem["total_mib"],
        "memory ratio": ratio(twin_mem["total_mib"], ref_mem["total_mib"]),
        "reference activations MiB": ref_mem["activations_mib"],
        "twinlm activations MiB": twin_mem["activations_mib"],
    }


def run(args: argparse.Namespace) -> Section:
    shapes = QUICK_SHAPES if args.quick else SHAPES
    size = 256 if args.quick else 2048
    peaks = {
        "fp32": matmul_peak("float32", size, repeats(args, 5)),
        "bf16": matmul_peak("bfloat16", size, repeats(args, 5)),
    }
    rows = []
    plan = [(shape, kind) for shape in shapes for kind in ("bert", "gpt2")]
    plan += [(shape, kind) for kind, shape in (QUICK_MODERN_PAIRS if args.quick else MODERN_PAIRS)]
    for shape, kind in plan:
        n = repeats(args, 7 if shape.name == "mid" else 10)  # medians of fewer swung by 0.1x
        for precision in ("fp32", "bf16"):
            rows.append(compare(kind, shape, precision, n, peaks))
    mid = shapes[-1].label()
    target = {name: TARGETS[kind] for kind, name in REFERENCE_NAMES.items()}
    headline = [
        {
            "benchmark": f"training {r['reference']} {r['precision']} {r['shape'].split(' ')[0]}",
            "twinlm / reference": r["speed-up"],
            "memory ratio": r["memory ratio"],
            "twinlm % of matmul peak": r["twinlm % of matmul peak"] if r["shape"] == mid else None,
            "target": target[r["reference"]]
            + ", memory <= 0.8x"
            + (", >= 50% of peak" if r["shape"] == mid and r["precision"] != "fp32" else ""),
        }
        for r in rows
    ]
    notes = [
        f"matmul peak measured in this run ({size}x{size} torch.matmul): fp32 {peaks['fp32'] / 1e9:.1f} "
        f"GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s",
        "twinlm built from the reference with twinlm.convert.from_hf (equal weights; ModernBERT: "
        "twin_of_modernbert, every weight copied, twinlm's extra first-block norm at its identity init); the "
        "masked-LM twins run with sparse_prediction=True (the LM head and the last block's queries at the 15% "
        "masked positions only), as a user would, ModernBERT with its own sparse_prediction=True (the head at "
        "masked positions); dropout 0.1 on both sides for BERT and GPT-2 (train mode), none for ModernBERT and "
        "Llama (their defaults and the mini twins')",
        "one step = zero_grad, forward (loss), backward, AdamW step; both sides alternate step by step, "
        "median after 1 warm-up step",
        "model FLOPs per token = 6 x multiplying parameters + 12 x layers x hidden x seq_len, the same "
        "(reference's) count for both sides, so the work sparse prediction skips counts as done (the "
        "masked-LM twin's share can pass 100%)",
        "memory = parameters + gradients + 2 AdamW moments (4 x fp32 weights) + the unique tensor storages "
        "saved for backward in one step (torch.autograd.graph.saved_tensors_hooks); exact bytes, not RSS",
    ]
    return Section("training", "Training throughput and memory", rows, notes, headline)


def main(argv: list[str] | None = None) -> int:
    return run_single(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
