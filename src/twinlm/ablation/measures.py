"""Measurements on a trained run: each takes (run folder, its summary, params) and returns numbers; the
MEASURES table names them, with the schema of their parameters (validated with the question)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt, ValidationError, field_validator

from twinlm.config import Section, format_validation_error
from twinlm.errors import TwinLMError

MEASURES_FILE = "measures.json"


# ------------------------------------------------------------------------------------------------
# Measurements on a trained run: each takes (run folder, its summary, params) and returns numbers.
# ------------------------------------------------------------------------------------------------
def _load_final(run_dir: Path, **kwargs: Any) -> tuple[Any, Any]:
    import twinlm
    from twinlm.model_folder import check_model_folder, load_error
    from twinlm.tokenization import auto_tokenizer

    final = run_dir / "final"
    check_model_folder(final, "the run's final model", tokenizer=True)
    try:
        config = twinlm.TwinLMConfig.from_pretrained(final, **kwargs)
        cls = twinlm.TwinLMForCausalLM if config.is_causal else twinlm.TwinLMForMaskedLM
        return cls.from_pretrained(final, config=config).eval(), auto_tokenizer(final)
    except (OSError, ValueError, RuntimeError) as err:
        raise load_error(err, final) from None


def _validation_stream(run_dir: Path, tokenizer: Any, max_tokens: int) -> tuple[list[int], int]:
    """The run's validation documents as one token stream (and their UTF-8 byte count)."""
    from twinlm.data import load_texts, split_documents
    from twinlm.training.config import load_run_config

    cfg = load_run_config(run_dir / "run_config.yaml")
    _, val_docs = split_documents(load_texts(cfg.data), cfg.data)
    ids: list[int] = []
    n_bytes = 0
    for text in val_docs["text"]:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        n_bytes += len(text.encode("utf-8"))
        if len(ids) >= max_tokens:
            break
    return ids, n_bytes


def _stream_batch(model: Any, tokenizer: Any, ids: list[int], seq_len: int, max_blocks: int) -> dict | None:
    """One batch of contiguous blocks of `seq_len` (positions 0..seq_len-1: no per-document restart); MLM
    masks drawn from a fixed generator. None when `ids` hold less than one block."""
    import torch

    from twinlm.data import CausalLMCollator, MaskedLMCollator

    blocks = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:max_blocks]
    if not blocks:
        return None
    collate = (
        CausalLMCollator(tokenizer)
        if model.config.is_causal
        else MaskedLMCollator(tokenizer, generator=torch.Generator().manual_seed(0))
    )
    batch = collate([{"input_ids": b} for b in blocks])
    batch.pop("position_ids", None)
    return batch


def _stream_loss(model: Any, tokenizer: Any, ids: list[int], seq_len: int, max_blocks: int) -> float | None:
    """Mean loss over contiguous blocks of `seq_len` (see _stream_batch); None without one block."""
    import torch

    batch = _stream_batch(model, tokenizer, ids, seq_len, max_blocks)
    if batch is None:
        return None
    with torch.no_grad():
        return float(model(**batch).loss)


def measure_length(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """Validation perplexity at multiples of the training length (None where positions cannot go)."""
    model, tokenizer = _load_final(run_dir)
    from twinlm.training.config import load_run_config

    train_len = int(params.get("train_len") or load_run_config(run_dir / "run_config.yaml").data.seq_len)
    factors = params.get("factors", [1, 2, 4])
    ids, _ = _validation_stream(run_dir, tokenizer, train_len * max(factors) * params.get("blocks", 8))
    out = {}
    for f in factors:
        length = train_len * f
        try:
            loss = _stream_loss(model, tokenizer, ids, length, params.get("blocks", 8))
        except ValueError as err:  # learned/sinusoidal positions past their table: reported, not a crash
            out[f"ppl@{f}L"] = None
            out[f"note@{f}L"] = str(err).split(";")[0]
            continue
        out[f"ppl@{f}L"] = math.exp(min(loss, 50)) if loss is not None else None
    # The check that the model uses order at all: the same blocks with their tokens shuffled (a model that
    # ignores order loses nothing). Length results of a model that does not use order mean nothing.
    shuffled = _stream_loss(
        model, tokenizer, _shuffled_blocks(ids, train_len), train_len, params.get("blocks", 8)
    )
    if shuffled is not None and out.get("ppl@1L"):
        out["shuffled_ppl@1L"] = math.exp(min(shuffled, 50))
        out["order_nats"] = shuffled - math.log(out["ppl@1L"])
    return out


def _shuffled_blocks(ids: list[int], seq_len: int) -> list[int]:
    """The stream with the tokens of each block of `seq_len` shuffled (seeded): order gone, tokens kept."""
    import random

    rng = random.Random(0)
    out: list[int] = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        block = ids[start : start + seq_len]
        rng.shuffle(block)
        out += block
    return out


def measure_init_gradients(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """The gradient norm of each layer's weights at initialisation (the run's architecture and seed, one
    batch of validation text): Xiong et al. 2020 show post-LN's grow towards the output, pre-LN's do not."""
    import torch

    import twinlm
    from twinlm.training.config import load_run_config

    _, tokenizer = _load_final(run_dir)
    config = twinlm.TwinLMConfig.from_pretrained(run_dir / "final")
    seed = load_run_config(run_dir / "run_config.yaml").training.seed
    torch.manual_seed(seed)
    model = (twinlm.TwinLMForCausalLM if config.is_causal else twinlm.TwinLMForMaskedLM)(config).train()
    seq = min(128, config.max_position_embeddings)
    ids, _ = _validation_stream(run_dir, tokenizer, 8 * seq)
    torch.manual_seed(seed)  # the same dropout and masking for every variant
    with torch.random.fork_rng(devices=[]):
        model(**_stream_batch(model, tokenizer, ids, seq, 8)).loss.backward()
    norms = []
    for layer in model.model.layers:
        grads = [p.grad.float().pow(2).sum() for p in layer.parameters() if p.grad is not None]
        norms.append(float(torch.stack(grads).sum().sqrt()) if grads else 0.0)
    out = {f"init_grad_L{i}": n for i, n in enumerate(norms)}
    out["init_grad_first"], out["init_grad_last"] = norms[0], norms[-1]
    out["init_grad_last_over_first"] = norms[-1] / max(norms[0], 1e-12)
    return out


def measure_attention(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """Per-layer attention entropy (nats) and saturation (share of rows whose top weight > 0.99)."""
    import torch

    model, tokenizer = _load_final(run_dir, attn_implementation="eager")
    ids, _ = _validation_stream(run_dir, tokenizer, 4 * 128)
    seq = min(128, model.config.max_position_embeddings)
    batch = torch.tensor([ids[i : i + seq] for i in range(0, len(ids) - seq + 1, seq)][:4])
    with torch.no_grad():
        attentions = model(input_ids=batch, output_attentions=True).attentions
    out = {}
    for layer, weights in enumerate(attentions):
        if model.config.is_causal:  # the first query sees one key only: always "saturated"
            weights = weights[:, :, 1:]
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
        out[f"entropy_L{layer}"] = float(entropy.mean())
        out[f"saturation_L{layer}"] = float((weights.max(-1).values > 0.99).float().mean())
    out["entropy"] = statistics.fmean(v for k, v in out.items() if k.startswith("entropy_"))
    out["saturation"] = statistics.fmean(v for k, v in out.items() if k.startswith("saturation_"))
    return out


def measure_train_eval_gap(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """Validation loss in train mode vs eval mode (BatchNorm statistics, dropout) on the same batch."""
    import torch

    model, tokenizer = _load_final(run_dir)
    ids, _ = _validation_stream(run_dir, tokenizer, 8 * 128)
    seq = min(128, model.config.max_position_embeddings)
    eval_loss = _stream_loss(model, tokenizer, ids, seq, 8)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        train_loss = _stream_loss(model, tokenizer, ids, seq, 8)
    return {
        "eval_mode_loss": eval_loss,
        "train_mode_loss": train_loss,
        "train_minus_eval": train_loss - eval_loss,
    }


def measure_bits_per_byte(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """Validation loss in bits per UTF-8 byte (comparable across tokenizers), and tokens per byte."""
    _, tokenizer = _load_final(run_dir)
    ids, n_bytes = _validation_stream(run_dir, tokenizer, 10**9)
    loss = summary.get("val_loss")
    tokens_per_byte = len(ids) / max(n_bytes, 1)
    unk = getattr(tokenizer, "unk_token_id", None)
    return {
        "bits_per_byte": loss / math.log(2) * tokens_per_byte if loss is not None else None,
        "tokens_per_byte": tokens_per_byte,
        "unk_rate": sum(1 for i in ids if i == unk) / max(len(ids), 1) if unk is not None else 0.0,
    }


def _step_cost(config: Any, batch: int, seq: int, documents: int = 1, repeats: int = 3) -> tuple[float, int]:
    """Median seconds of a forward+backward and the bytes of activations saved for backward (each storage
    once: views of one tensor, such as a sliding window's overlapping key blocks, share their bytes).
    `documents` > 1 packs that many documents per row (position ids restarting), as pretraining does."""
    import torch

    import twinlm

    cls = twinlm.TwinLMForCausalLM if config.is_causal else twinlm.TwinLMForMaskedLM
    model = cls(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    positions = None if documents <= 1 else (torch.arange(seq) % -(-seq // documents)).expand(batch, -1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    times = []
    for _ in range(repeats + 1):
        saved.clear()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), sum(saved.values())


def sweep_config(base: Any, field: str, value: int, seq_len: int) -> Any:
    """The variant's config at one point of a cost sweep (`field` = value; seq_len: the positions reach it)."""
    seq = value if field == "seq_len" else seq_len
    changes = {} if field == "seq_len" else {field: value}
    if field == "hidden_size":
        changes["intermediate_size"] = 4 * value
        if base.embedding_size == base.hidden_size:  # unfactorised embeddings follow the width
            changes["embedding_size"] = value
    values = {**base.to_dict(), "max_position_embeddings": max(seq, base.max_position_embeddings), **changes}
    if "num_hidden_layers" in changes:  # a layout derived from the depth follows it
        values.pop("layer_types", None)
    return base.__class__(**values)


def measure_cost(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """Step time and activation memory of the variant's architecture against one size (the O(n^2) curve);
    `documents`: packed documents per row (default 1: plain rows)."""
    import twinlm

    base = twinlm.TwinLMConfig.from_pretrained(run_dir / "final")
    field, values = params.get("sweep", "seq_len"), params.get("values", [128, 256, 512])
    out = {}
    for value in values:
        seq = value if field == "seq_len" else params.get("seq_len", 128)
        config = sweep_config(base, field, value, params.get("seq_len", 128))
        seconds, saved = _step_cost(config, params.get("batch", 4), seq, params.get("documents", 1))
        out[f"seconds@{value}"], out[f"activation_MB@{value}"] = seconds, saved / 2**20
    return out


def _tensors(values: Any) -> list[Any]:
    """The tensors among `values` (and in lists or tuples of them)."""
    import torch

    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += _tensors(value)
    return found


GENERATION_PROMPT = 8  # tokens of the random prompt the generation measure starts from


def measure_generation(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """KV-cache size and greedy generation speed (tokens/s) of the trained causal model."""
    import torch

    model, tokenizer = _load_final(run_dir)
    new = params.get("new_tokens", 64)
    prompt = torch.randint(5, model.config.vocab_size, (params.get("batch", 1), GENERATION_PROMPT))
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    cache = out.past_key_values
    # every tensor a cache layer holds: keys and values, a window's, linear attention's state, conv states
    cache_bytes = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in _tensors(vars(layer).values())
    )
    return {"kv_cache_MB": cache_bytes / 2**20, "generate_tokens_per_s": prompt.shape[0] * new / seconds}


def measure_downstream(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """The evaluation suite (`twinlm evaluate`) on the final model: suite average of the checkpoint."""
    from twinlm.evaluation import evaluate_checkpoints

    # the runs of a question share one cache of finished cells: the control of an architecture and
    # tokenizer is fine-tuned once, whatever each run's budget or data
    cells = run_dir.parent / "cells"
    report = evaluate_checkpoints(
        [str(run_dir / "final")], params["suite"], run_dir / "evaluate", cells_cache=cells
    )
    model = report["models"][0]
    out = {"suite_average": model["average"]["mean"], **{k: v["mean"] for k, v in model["tasks"].items()}}
    gain = next(iter(report["gains"].values()), None)  # with a suite that runs the control
    if gain is not None:
        out["gain"] = gain["mean"]
        out["control_average"] = report["models"][1]["average"]["mean"]
    for name, curve in (model.get("noise") or {}).items():  # with a suite that perturbs its test inputs
        out.update({f"{name}@{key}": value for key, value in curve.items()})
        for control in report["models"][1:2]:
            out.update({f"control_{name}@{key}": value for key, value in control["noise"][name].items()})
    return out


def measure_curve(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """From metrics.jsonl: largest gradient norm, whether the loss diverged, the last train loss."""
    rows = _metrics(run_dir)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    norms = [r["grad_norm"] for r in rows if r.get("grad_norm") is not None]
    return {
        "max_grad_norm": max(norms) if norms else None,
        "final_train_loss": losses[-1] if losses else None,
        "diverged": bool(losses) and (not math.isfinite(losses[-1]) or losses[-1] > losses[0]),
    }


# ------------------------------------------------------------------------------------------------
# The measures' parameters, validated with the question (before any run trains): each schema also says
# which numbers its measure produces (`outputs`: a question's metric and claims must name one) and checks
# what depends on the model (`check`).
# ------------------------------------------------------------------------------------------------
class NoParams(Section):
    """This measure takes no parameters."""

    def check(self, model_config: Any) -> str | None:
        return None


class LengthParams(NoParams):
    train_len: PositiveInt | None = Field(None, description="default: the run's data.seq_len")
    factors: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    blocks: PositiveInt = 8

    def outputs(self) -> list[str]:
        return [f"ppl@{f}L" for f in self.factors] + ["shuffled_ppl@1L", "order_nats"]


class CostParams(NoParams):
    sweep: str = Field("seq_len", description="seq_len, or an integer TwinLMConfig field (hidden_size)")
    values: list[PositiveInt] = Field(default_factory=lambda: [128, 256, 512], min_length=1)
    batch: PositiveInt = 4
    seq_len: PositiveInt = 128
    documents: PositiveInt = Field(1, description="documents packed in each row (position ids restart)")

    @field_validator("sweep")
    @classmethod
    def _a_size(cls, value: str) -> str:
        from twinlm.model.configuration_twinlm import TwinLMConfig

        sizes = [k for k, f in TwinLMConfig.__dataclass_fields__.items() if f.type in (int, "int")]
        if value != "seq_len" and value not in sizes:
            raise ValueError(
                f"sweep={value!r} is not seq_len or an integer TwinLMConfig field ({', '.join(sizes)})"
            )
        return value

    def outputs(self) -> list[str]:
        return [f"{what}@{v}" for v in self.values for what in ("seconds", "activation_MB")]

    def check(self, model_config: Any) -> str | None:
        """Every model the sweep builds is a valid config (e.g. heads that divide the width)."""
        for value in self.values:
            try:
                sweep_config(model_config, self.sweep, value, self.seq_len)
            except ValueError as err:
                return f"{self.sweep}={value}: {err}"
        return None


class GenerationParams(NoParams):
    new_tokens: PositiveInt = 64
    batch: PositiveInt = 1

    def outputs(self) -> list[str]:
        return ["kv_cache_MB", "generate_tokens_per_s"]

    def check(self, model_config: Any) -> str | None:
        if not model_config.is_causal:
            return "generation needs a causal model (is_causal: true); this variant is a masked-LM encoder"
        if model_config.position_embedding_type in ("learned", "sinusoidal"):
            if GENERATION_PROMPT + self.new_tokens > model_config.max_position_embeddings:
                return (
                    f"new_tokens={self.new_tokens} after a {GENERATION_PROMPT}-token prompt goes past "
                    f"max_position_embeddings={model_config.max_position_embeddings}"
                )
        return None


class DownstreamParams(NoParams):
    suite: Path = Field(description="an evaluation suite, e.g. configs/evaluate/quick.yaml")

    @field_validator("suite")
    @classmethod
    def _a_suite(cls, value: Path) -> Path:
        from twinlm.evaluation import load_suite

        try:
            load_suite(value)
        except TwinLMError as err:
            raise ValueError(str(err)) from None
        return value

    def outputs(self) -> list[str]:
        from twinlm.evaluation import load_suite

        suite = load_suite(self.suite)
        names = ["suite_average", *suite.tasks]
        if suite.control:
            names += ["gain", "control_average"]
        for task in suite.tasks if suite.noise else ():
            names += [f"{task}@{key}" for key in suite.noise.keys()]
            names += [f"control_{task}@{key}" for key in suite.noise.keys()] if suite.control else []
        return names

    def check(self, model_config: Any) -> str | None:
        """The suite as evaluate checks it before its first fine-tuning run (task configs with their
        overrides, splits, data), once per file version."""
        try:
            _check_suite_once(str(self.suite), self.suite.stat().st_mtime_ns)
        except TwinLMError as err:
            return str(err)
        return None


@functools.lru_cache(maxsize=16)
def _check_suite_once(path: str, mtime_ns: int) -> None:
    from twinlm.evaluation import check_suite

    check_suite(path)


class FixedOutputs(NoParams):
    """A measure without parameters whose numbers are named in OUTPUTS (per-layer ones too, by pattern)."""

    def outputs(self) -> list[str]:
        return list(FIXED_OUTPUTS[type(self)])


class AttentionParams(FixedOutputs):
    pass


class InitGradientParams(FixedOutputs):
    pass


class TrainEvalGapParams(FixedOutputs):
    pass


class BitsPerByteParams(FixedOutputs):
    pass


class CurveParams(FixedOutputs):
    pass


FIXED_OUTPUTS: dict[type, tuple[str, ...]] = {
    AttentionParams: ("entropy", "saturation"),
    TrainEvalGapParams: ("eval_mode_loss", "train_mode_loss", "train_minus_eval"),
    BitsPerByteParams: ("bits_per_byte", "tokens_per_byte", "unk_rate"),
    CurveParams: ("max_grad_norm", "final_train_loss", "diverged"),
    InitGradientParams: ("init_grad_first", "init_grad_last", "init_grad_last_over_first"),
}
# What every run reports, whatever its measures (a run summary's numbers; val_* differ by objective).
RUN_OUTPUTS = ("val_loss", "val_ppl", "train_seconds", "tokens_per_s", "parameters")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A measure: the function run on each finished run, the schema of its parameters, and whether its
    result may be read back (a measure whose inputs are files of their own, such as a suite, is not: it
    asks the command it runs, which keeps its own finished work)."""

    run: Callable[[Path, dict, dict], dict[str, Any]]
    params: type[NoParams]
    cached: bool = True

    def problem(self, values: dict[str, Any]) -> str | None:
        try:
            self.params.model_validate(values)
        except ValidationError as err:
            return format_validation_error(err, "parameters", self.params).removeprefix(
                "invalid parameters: "
            )
        return None

    def settings(self, values: dict[str, Any]) -> NoParams:
        return self.params.model_validate(values)


MEASURES: dict[str, Measurement] = {
    "length": Measurement(measure_length, LengthParams),
    "attention": Measurement(measure_attention, AttentionParams),
    "train_eval_gap": Measurement(measure_train_eval_gap, TrainEvalGapParams),
    "bits_per_byte": Measurement(measure_bits_per_byte, BitsPerByteParams),
    "cost": Measurement(measure_cost, CostParams),
    "generation": Measurement(measure_generation, GenerationParams),
    "downstream": Measurement(measure_downstream, DownstreamParams, cached=False),
    "curve": Measurement(measure_curve, CurveParams),
    "init_gradients": Measurement(measure_init_gradients, InitGradientParams),
}


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line of an interrupted run
                continue
    return rows
