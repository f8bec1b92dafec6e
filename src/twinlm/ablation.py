"""`twinlm ablate QUESTION.yaml`: answer a Transformer design question by experiment.

An ablation config is one base pretraining run (a run config plus overrides: model, data, budget) and
named variants (more overrides), trained with the same data order, seeds and budget, at least two seeds
each. Each run is a normal twinlm run (resumable; finished runs are not rerun, runs whose inputs changed
are). After training, the measurements the config names are taken on each final model (see MEASURES). The
report (report.md, results.json, PNG plots) gives the table and a short answer computed from the numbers:
two variants are compared seed by seed with a paired t-test (twinlm.stats), the difference, its 95%
interval and the p-value are printed, "no measurable difference" where p >= 0.05; each textbook claim is
marked as agreeing or DISAGREEING with the measurement.

    twinlm ablate configs/ablations/02-scaled-attention.yaml --out docs/ablations/02-scaled-attention
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from twinlm.config import Section, build_config, flatten_overrides, format_validation_error
from twinlm.errors import TwinLMError
from twinlm.fileio import read_json
from twinlm.stats import Comparison as StatComparison
from twinlm.stats import compare, summarize

MEASURES_FILE = "measures.json"


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
class BaseRun(Section):
    config: Path = Field(description="a pretraining run config, e.g. configs/pretrain/tiny-clm.yaml")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys: training.max_steps")


class Measure(Section):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Comparison(Section):
    """A textbook claim about two variants: `better` beats `worse` on `metric` (default: the question's)."""

    better: str
    worse: str
    metric: str | None = None
    lower_is_better: bool | None = None


# A variant names a folder under --runs: letters, digits, '-', '_', '.', '+' (no '/', no leading '.').
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class AblationConfig(Section):
    """One question: base run, variants (overrides), seeds, the metric that answers it."""

    question: str
    textbook: str = Field(description="the textbook answer, checked against the numbers")
    expect: str | None = Field(None, description="the variant the textbook says wins on `metric`")
    base: BaseRun
    variants: dict[str, dict[str, Any]] = Field(min_length=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=2)
    metric: str = "val_loss"
    lower_is_better: bool = True
    measures: list[Measure] = Field(default_factory=list)
    compare: list[Comparison] = Field(default_factory=list, description="textbook claims, each checked")

    @model_validator(mode="after")
    def _known(self) -> AblationConfig:
        bad_names = [n for n in self.variants if not _VARIANT_NAME.match(n)]
        if bad_names:
            raise ValueError(
                f"variant name(s) {bad_names} cannot name a run folder; use letters, digits, '-', '_', '.', '+' "
                "(no '/', no leading '.')"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        unknown = [m.name for m in self.measures if m.name not in MEASURES]
        if unknown:
            raise ValueError(f"unknown measure(s) {unknown}; choose from {sorted(MEASURES)}")
        for i, measure in enumerate(self.measures):
            problem = MEASURES[measure.name].problem(measure.params)
            if problem:
                raise ValueError(f"measures[{i}] ({measure.name}): {problem}")
        named = [n for c in self.compare for n in (c.better, c.worse) if n not in self.variants]
        if named:
            raise ValueError(f"compare names {named}, which are not variants ({', '.join(self.variants)})")
        if self.expect is not None and self.expect not in self.variants:
            raise ValueError(f"expect={self.expect!r} is not a variant ({', '.join(self.variants)})")
        return self

    def params(self, measure: Measure) -> dict[str, Any]:
        """A measure's parameters with their defaults filled in (validated when the config was built)."""
        return MEASURES[measure.name].params.model_validate(measure.params).model_dump(mode="json")


def load_ablation(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AblationConfig:
    """Read an ablation YAML (with `key=value` overrides, e.g. seeds=[0,1,2]); a one-line TwinLMError
    naming the key on any problem."""
    example = "configs/ablations/02-scaled-attention.yaml"
    config = build_config(AblationConfig, path, overrides, what="ablation config", example=example)
    if not config.base.config.is_file():
        raise TwinLMError(f"ablation config {path}: base.config {str(config.base.config)!r} does not exist")
    return config


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
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        n_bytes += len(text.encode("utf-8"))
        if len(ids) >= max_tokens:
            break
    return ids, n_bytes


def _stream_loss(model: Any, tokenizer: Any, ids: list[int], seq_len: int, max_blocks: int) -> float | None:
    """Mean loss over contiguous blocks of `seq_len` (positions 0..seq_len-1: no per-document restart)."""
    import torch

    from twinlm.data import CausalLMCollator, MaskedLMCollator

    blocks = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:max_blocks]
    if not blocks:
        return None
    causal = model.config.is_causal
    collate = (
        CausalLMCollator(tokenizer)
        if causal
        else MaskedLMCollator(tokenizer, generator=torch.Generator().manual_seed(0))
    )
    batch = collate([{"input_ids": b} for b in blocks])
    batch.pop("position_ids", None)
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


def measure_cost(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """Step time and activation memory of the variant's architecture against one size (the O(n^2) curve);
    `documents`: packed documents per row (default 1: plain rows)."""
    import twinlm

    base = twinlm.TwinLMConfig.from_pretrained(run_dir / "final")
    field, values = params.get("sweep", "seq_len"), params.get("values", [128, 256, 512])
    out = {}
    for value in values:
        seq = value if field == "seq_len" else params.get("seq_len", 128)
        changes = {} if field == "seq_len" else {field: value}
        if field == "hidden_size":
            changes["intermediate_size"] = 4 * value
        config = base.__class__(
            **{**base.to_dict(), "max_position_embeddings": max(seq, base.max_position_embeddings), **changes}
        )
        seconds, saved = _step_cost(config, params.get("batch", 4), seq, params.get("documents", 1))
        out[f"seconds@{value}"], out[f"activation_MB@{value}"] = seconds, saved / 2**20
    return out


def measure_generation(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """KV-cache size and greedy generation speed (tokens/s) of the trained causal model."""
    import torch

    model, tokenizer = _load_final(run_dir)
    new = params.get("new_tokens", 64)
    prompt = torch.randint(5, model.config.vocab_size, (params.get("batch", 1), 8))
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    cache = out.past_key_values
    cache_bytes = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )
    return {"kv_cache_MB": cache_bytes / 2**20, "generate_tokens_per_s": prompt.shape[0] * new / seconds}


def measure_downstream(run_dir: Path, summary: dict, params: dict) -> dict[str, Any]:
    """The evaluation suite (`twinlm evaluate`) on the final model: suite average of the checkpoint."""
    from twinlm.evaluation import evaluate_checkpoints

    report = evaluate_checkpoints([str(run_dir / "final")], params["suite"], run_dir / "evaluate")
    model = report["models"][0]
    return {"suite_average": model["average"]["mean"], **{k: v["mean"] for k, v in model["tasks"].items()}}


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
# The measures' parameters, validated with the question (before any run trains)
# ------------------------------------------------------------------------------------------------
class NoParams(Section):
    """This measure takes no parameters."""


class LengthParams(Section):
    train_len: PositiveInt | None = Field(None, description="default: the run's data.seq_len")
    factors: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    blocks: PositiveInt = 8


class CostParams(Section):
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


class GenerationParams(Section):
    new_tokens: PositiveInt = 64
    batch: PositiveInt = 1


class DownstreamParams(Section):
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


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A measure: the function run on each finished run, and the schema of its parameters."""

    run: Callable[[Path, dict, dict], dict[str, Any]]
    params: type[Section] = NoParams

    def problem(self, values: dict[str, Any]) -> str | None:
        try:
            self.params.model_validate(values)
        except ValidationError as err:
            return format_validation_error(err, "parameters", self.params).removeprefix(
                "invalid parameters: "
            )
        return None


MEASURES: dict[str, Measurement] = {
    "length": Measurement(measure_length, LengthParams),
    "attention": Measurement(measure_attention),
    "train_eval_gap": Measurement(measure_train_eval_gap),
    "bits_per_byte": Measurement(measure_bits_per_byte),
    "cost": Measurement(measure_cost, CostParams),
    "generation": Measurement(measure_generation, GenerationParams),
    "downstream": Measurement(measure_downstream, DownstreamParams),
    "curve": Measurement(measure_curve),
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


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
RUN_FILE = "ablation_run.json"
RESUME_HINT = "the finished runs are kept: run the same command again to go on"


def _shared_tokenizer(config: AblationConfig, name: str, seed: int, runs: Path) -> dict[str, Any]:
    """Runs that do not change the tokenizer share the one trained by the first such run (same tokens)."""
    plain = [
        v
        for v in config.variants
        if not any(k.startswith("tokenizer") for k, _ in _pairs(config.variants[v]))
    ]
    if name not in plain or (name, seed) == (plain[0], config.seeds[0]):
        return {}
    trained = runs / plain[0] / f"seed{config.seeds[0]}" / "tokenizer"
    return (
        {"tokenizer.path": str(trained), "tokenizer.train": None}
        if (trained / "tokenizer.json").is_file()
        else {}
    )


def _pairs(overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    return flatten_overrides(overrides)


def run_overrides(config: AblationConfig, name: str, seed: int, runs: Path) -> list[tuple[str, Any]]:
    """The overrides of one (variant, seed) run: the base's, the variant's, the shared tokenizer (last: it
    replaces tokenizer settings the base names), seed, output folder, resume. Each sets one field."""
    fixed = {
        "training.seed": seed,
        "output_dir": str(runs / name / f"seed{seed}"),
        "training.resume_from_checkpoint": "latest",
    }
    return [
        *_pairs(config.base.overrides),
        *_pairs(config.variants[name]),
        *_shared_tokenizer(config, name, seed, runs).items(),
        *fixed.items(),
    ]


def run_config(config: AblationConfig, name: str, seed: int, runs: Path) -> Any:
    """The resolved pretraining config of one run; a one-line TwinLMError naming the variant."""
    from twinlm.training.config import load_run_config

    try:
        return load_run_config(config.base.config, run_overrides(config, name, seed, runs))
    except TwinLMError as err:
        raise TwinLMError(f"variant {name!r}: {err}") from None


def check_variants(config: AblationConfig, runs: Path) -> None:
    """Before anything trains: every variant's run config and model config are valid (one line each)."""
    from twinlm.training.loop import probe_model_config

    for name in config.variants:
        cfg = run_config(config, name, config.seeds[0], runs)
        try:
            probe_model_config(cfg)
        except TwinLMError as err:
            raise TwinLMError(f"variant {name!r}: {err}") from None


def _run_fingerprint(cfg: Any) -> str:
    """What a run's result depends on: its resolved config (model, data, budget, seed...), the contents of
    its local data files and of the tokenizer it is given."""
    import glob

    from twinlm.fingerprint import files_digest, fingerprint

    files: list[str] = []
    for source in cfg.data.sources:
        if source.path:
            files += sorted(glob.glob(source.path)) if glob.has_magic(source.path) else [source.path]
    tokenizer = [str(cfg.tokenizer.path)] if cfg.tokenizer.path is not None else []
    return fingerprint(
        {
            "run": cfg.model_dump(mode="json"),
            "data": files_digest(files),
            "tokenizer": files_digest(tokenizer),
        }
    )


def run_variant(config: AblationConfig, name: str, seed: int, runs: Path) -> dict[str, Any]:
    """Train one (variant, seed) run under RUNS (or read it back when it finished with the same inputs) and
    take the measurements (each again when its parameters changed)."""
    import shutil

    from twinlm.fileio import write_json_atomic
    from twinlm.stopping import check_stop, raise_interrupted

    check_stop(RESUME_HINT)
    run_dir = runs / name / f"seed{seed}"
    cfg = run_config(config, name, seed, runs)
    fingerprint = _run_fingerprint(cfg)
    if run_dir.exists() and read_json(run_dir / RUN_FILE).get("fingerprint") != fingerprint:
        print(f"re-running {run_dir}: its settings, data or tokenizer changed since it was trained")
        shutil.rmtree(run_dir)
    summary = read_json(run_dir / "summary.json")
    if not summary.get("final_model"):
        from twinlm.training import pretrain

        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / RUN_FILE, {"fingerprint": fingerprint, "variant": name, "seed": seed})
        summary = pretrain(cfg)
        if summary.get("interrupted_by"):
            raise_interrupted(summary["interrupted_by"], f"{run_dir} saved a checkpoint; {RESUME_HINT}")
    measured_path = run_dir / MEASURES_FILE
    measured = read_json(measured_path)
    for measure in config.measures:
        params = config.params(measure)
        done = measured.get(measure.name)
        if not isinstance(done, dict) or done.get("params") != params or "values" not in done:
            check_stop(RESUME_HINT)
            values = MEASURES[measure.name].run(run_dir, summary, params)
            measured[measure.name] = {"params": params, "values": values}
            write_json_atomic(measured_path, measured, f"the measurements of {run_dir}")
    values = {
        k: summary.get(k) for k in ("val_loss", "val_ppl", "train_seconds", "tokens_per_s", "parameters")
    }
    for measure in config.measures:
        values.update(measured[measure.name]["values"])
    return {
        "variant": name,
        "seed": seed,
        "values": values,
        "curve": [(r["step"], r["loss"]) for r in _metrics(run_dir) if r.get("loss") is not None],
    }


def _aggregate(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> metric -> {mean, std, n, values (one per seed, in the question's seed order)}."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name in variants:
        values = [r["values"] for r in runs if r["variant"] == name]
        keys = [
            k
            for k in values[0]
            if all(isinstance(v.get(k), (int, float)) and not isinstance(v.get(k), bool) for v in values)
        ]
        table[name] = {k: dataclasses.asdict(summarize([v[k] for v in values])) for k in keys}
    return table


def _comparison(table: dict, a: str, b: str, metric: str) -> StatComparison:
    """a - b on `metric`, seed by seed (every variant runs the same seeds: a paired t-test)."""
    return compare(table[a][metric]["values"], table[b][metric]["values"], paired=True)


def answer(config: AblationConfig, table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The best variant on the metric, whether its lead over the runner-up is significant (paired t-test over
    the seeds), and whether that agrees with the textbook's expected winner."""
    metric = config.metric
    scored = {
        name: row[metric]
        for name, row in table.items()
        if metric in row and math.isfinite(row[metric]["mean"])
    }
    if len(scored) < 2:
        return {"text": f"not enough finite {metric} values to compare", "winner": None, "measurable": False}
    order = sorted(scored, key=lambda n: scored[n]["mean"], reverse=not config.lower_is_better)
    best, second = order[0], order[1]
    lead = _comparison(table, best, second, metric)
    measurable = lead.significant
    numbers = f"{scored[best]['mean']:.4f} vs {second} {scored[second]['mean']:.4f}: {lead.describe()}"
    text = (
        f"{best} is best on {metric} ({numbers})"
        if measurable
        else f"no measurable difference on {metric} between {best} and {second} ({numbers})"
    )
    disagrees = None
    if config.expect is not None and config.expect in scored:
        beaten = any(
            (scored[n]["mean"] < scored[config.expect]["mean"]) == config.lower_is_better
            and _comparison(table, n, config.expect, metric).significant
            for n in scored
            if n != config.expect
        )
        disagrees = bool(beaten)
        if disagrees:
            text += f". DISAGREES with the textbook, which expects {config.expect} to win"
        elif measurable and best == config.expect:
            text += ". Agrees with the textbook"
    claims = [check_claim(config, claim, table) for claim in config.compare]
    return {
        "text": text,
        "winner": best if measurable else None,
        "measurable": measurable,
        "test": dataclasses.asdict(lead),
        "disagrees": disagrees or any(c["verdict"] == "disagrees" for c in claims),
        "claims": claims,
    }


def check_claim(config: AblationConfig, claim: Comparison, table: dict) -> dict[str, Any]:
    """Does `better` beat `worse` significantly (agrees), the reverse (disagrees), or neither (no measurable
    difference; untested with too few seeds)? Paired t-test over the seeds."""
    metric = claim.metric or config.metric
    lower = config.lower_is_better if claim.lower_is_better is None else claim.lower_is_better
    a, b = table[claim.better].get(metric), table[claim.worse].get(metric)
    if a is None or b is None:
        return {"text": f"{claim.better} vs {claim.worse}: {metric} not measured for both", "verdict": None}
    test = _comparison(table, claim.better, claim.worse, metric)
    advantage = -test.difference if lower else test.difference
    verdict = (
        ("agrees" if advantage > 0 else "disagrees")
        if test.significant
        else ("no measurable difference" if test.tested else "untested")
    )
    text = (
        f"{claim.better} vs {claim.worse} on {metric}: {a['mean']:.4g} vs {b['mean']:.4g}, {test.describe()}: "
        + {
            "agrees": "agrees with the textbook",
            "disagrees": "DISAGREES with the textbook",
        }.get(verdict, verdict)
    )
    return {
        "better": claim.better,
        "worse": claim.worse,
        "metric": metric,
        "verdict": verdict,
        "test": dataclasses.asdict(test),
        "text": text,
    }


def _folders(path: str | Path, out: str | Path | None, runs_dir: str | Path | None) -> tuple[Path, Path]:
    out = Path(out) if out is not None else Path("outputs/ablations") / Path(path).stem
    return out, Path(runs_dir) if runs_dir is not None else out / "runs"


def prepare_ablation(
    path: str | Path,
    out: str | Path | None = None,
    runs_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> AblationConfig:
    """Everything checked before the first run trains: the question, every variant's run and model config,
    the measures' parameters, the output folders (one-line TwinLMError otherwise)."""
    from twinlm.fileio import ensure_output_dir

    config = load_ablation(path, overrides)
    out, runs = _folders(path, out, runs_dir)
    ensure_output_dir(out, "--out")
    ensure_output_dir(runs, "--runs")
    check_variants(config, runs)
    return config


def run_ablation(
    path: str | Path,
    out: str | Path | None = None,
    runs_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run every (variant, seed) under `runs_dir` (default OUT/runs), measure, and write report.md,
    results.json and plots into `out` (default outputs/ablations/NAME). SIGINT/SIGTERM stop the whole
    question with its finished runs kept (`Interrupted`); the same command goes on from there."""
    from twinlm.session import run_folder
    from twinlm.stopping import check_stop, stop_on_signal

    config = prepare_ablation(path, out, runs_dir, overrides)
    out, where = _folders(path, out, runs_dir)
    with run_folder(out, "--out"):  # one run of a question per folder at a time
        with stop_on_signal():
            runs = [
                run_variant(config, name, seed, where) for name in config.variants for seed in config.seeds
            ]
            check_stop(RESUME_HINT)
        return _report(config, runs, out)


def _report(config: AblationConfig, runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """results.json, report.md and the plots of a question whose runs are all finished."""
    from twinlm.fileio import write_json_atomic, write_text_atomic

    table = _aggregate(runs, list(config.variants))
    result = {
        "question": config.question,
        "textbook": config.textbook,
        "metric": config.metric,
        "seeds": config.seeds,
        "table": table,
        "answer": answer(config, table),
        "runs": [{k: r[k] for k in ("variant", "seed", "values")} for r in runs],
    }
    write_json_atomic(out / "results.json", result, "the results")
    plots = plot_ablation(config, runs, table, out)
    write_text_atomic(out / "report.md", format_report(config, result, plots), "the report")
    print(f"\n{config.question}\n  answer: {result['answer']['text']}\n  report: {out / 'report.md'}")
    return result


# ------------------------------------------------------------------------------------------------
# Report and plots
# ------------------------------------------------------------------------------------------------
def format_report(config: AblationConfig, result: dict[str, Any], plots: list[Path]) -> str:
    table = result["table"]
    # per-layer values stay in results.json; the table shows the headline numbers
    per_layer = re.compile(r"_L\d+$")
    names = {k for row in table.values() for k in row if not per_layer.search(k)}
    columns = [config.metric] + sorted(names - {config.metric})
    lines = [
        f"# {config.question}",
        "",
        f"**Textbook:** {config.textbook}",
        "",
        f"**Measured answer:** {result['answer']['text']}.",
        "",
        *(f"- Textbook claim {c['text']}." for c in result["answer"].get("claims", [])),
        "",
        f"{len(config.seeds)} seeds per variant (mean ± std); differences judged with a paired t-test over the "
        f"seeds (scipy.stats.ttest_rel) at the 0.05 level; base run `{config.base.config}` with "
        f"`{json.dumps(config.base.overrides)}`.",
        "",
        "| variant | overrides | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for name, row in table.items():
        cells = [f"{row[c]['mean']:.4g} ± {row[c]['std']:.2g}" if c in row else "n/a" for c in columns]
        lines.append(f"| {name} | `{json.dumps(config.variants[name])}` | " + " | ".join(cells) + " |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_ablation(config: AblationConfig, runs: list[dict], table: dict, out: Path) -> list[Path]:
    """Training-loss curves (mean over seeds) and a bar chart of the metric with seed error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twinlm.fileio import atomic_file

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name in config.variants:
        per_seed = [dict(r["curve"]) for r in runs if r["variant"] == name and r["curve"]]
        steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
        if steps:
            curves.plot(steps, [statistics.fmean(c[s] for c in per_seed) for s in steps], label=name)
    curves.set_xlabel("step")
    curves.set_ylabel("train loss")
    if curves.lines:
        curves.legend(fontsize=8)
    names = [n for n in config.variants if config.metric in table[n]]
    bars.bar(
        names,
        [table[n][config.metric]["mean"] for n in names],
        yerr=[table[n][config.metric]["std"] for n in names],
        capsize=4,
    )
    bars.set_ylabel(config.metric)
    bars.tick_params(axis="x", rotation=30)
    fig.suptitle(config.question, fontsize=10)
    fig.tight_layout()
    path = out / "results.png"
    with atomic_file(path, "the plot") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return [path]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def write_index(results: dict[str, dict[str, Any]], seconds: dict[str, float], out: Path) -> Path:
    """OUT/README.md: one line per question with its measured answer, textbook verdicts and wall time
    (n/a for a question missing from `seconds`)."""
    lines = [
        "# Ablations: the classic Transformer questions, measured",
        "",
        "Written by `make ablate` (`twinlm ablate configs/ablations/*.yaml`); each link is a full report.",
        "",
        "| question | measured answer | textbook claims (agree / disagree / no measurable difference / untested) "
        "| wall s |",
        "|---|---|---|---|",
    ]
    for name, result in results.items():
        claims = [c.get("verdict") for c in result["answer"].get("claims", [])]
        counts = " / ".join(
            str(claims.count(v)) for v in ("agrees", "disagrees", "no measurable difference", "untested")
        )
        lines.append(
            f"| [{result['question']}]({name}/report.md) | {result['answer']['text']} | {counts} | "
            + (f"{seconds[name]:.0f} |" if name in seconds else "n/a |")
        )
    lines += ["", f"Total wall time: {sum(seconds.values()):.0f} s over {len(seconds)} question(s)."]
    from twinlm.fileio import write_text_atomic

    return write_text_atomic(out / "README.md", "\n".join(lines) + "\n", "the index")


def run(args: argparse.Namespace) -> int:
    many = len(args.configs) > 1

    def folders(path: str) -> tuple[Path | None, Path | None]:
        name = Path(path).stem
        out = None if args.out is None else Path(args.out) / name if many else Path(args.out)
        runs = None if args.runs is None else Path(args.runs) / name if many else Path(args.runs)
        return out, runs

    for path in args.configs:  # every question checked before the first one trains
        prepare_ablation(path, *folders(path), list(args.overrides))
    results, seconds = {}, {}
    for path in args.configs:
        start = time.perf_counter()
        results[Path(path).stem] = run_ablation(path, *folders(path), list(args.overrides))
        seconds[Path(path).stem] = time.perf_counter() - start
    if many and args.out is not None:
        print(f"index: {write_index(results, seconds, Path(args.out))}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ablate",
        help="answer a Transformer design question by experiment (variants x seeds, report, plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "configs", nargs="+", help="ablation YAML(s), e.g. configs/ablations/02-scaled-attention.yaml"
    )
    parser.add_argument("--out", default=None, help="report folder (default: outputs/ablations/NAME)")
    parser.add_argument("--runs", default=None, help="where the training runs go (default: OUT/runs)")
    parser.set_defaults(func=run, overrides=[])  # config overrides: seeds=[0,1,2] ...
    return parser
