"""The runs of a question: planned before anything trains, shared, resumable, measured.

- A run's folder under --runs is named by what it computes: the fingerprint of its resolved settings (the
  model config the preset and overrides give, data, budget, seed, the contents of its data files and of its
  tokenizer). Questions whose variants come to the same run share it, trained once (the default variant
  of most questions is the same run at a given scale); a run whose inputs changed is a new run.
- Runs with the same tokenizer settings and data share one tokenizer, trained once into
  --runs/tokenizers/KEY before the first run trains (as `twinlm pretrain` would train it).
- The learning gate's reference: the unigram cross-entropy of the validation tokens under the training
  tokens' counts (nats per token), the loss of a model that ignores context, computed once per tokenizer
  and data split from the packed blocks the runs train on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from twinlm.ablation.config import AblationConfig
from twinlm.ablation.measures import MEASURES, MEASURES_FILE, RUN_OUTPUTS, _metrics
from twinlm.config import flatten_overrides
from twinlm.errors import TwinLMError
from twinlm.fileio import read_json

RUN_FILE = "ablation_run.json"
UNIGRAM_FILE = "unigram.json"
RESUME_HINT = "the finished runs are kept: run the same command again to go on"


@dataclasses.dataclass
class TokenizerGroup:
    """The runs that share one tokenizer: trained once into `folder` (or a folder the variants name)."""

    key: str
    folder: Path
    cfg: Any  # a member's run config: the tokenizer is trained as that run would train it
    causal: bool
    given: bool = False


@dataclasses.dataclass
class PlannedRun:
    variant: str
    seed: int
    cfg: Any  # the resolved run config, but for the tokenizer and the output folder (see `settings`)
    run_dir: Path
    fingerprint: str
    group: TokenizerGroup

    @property
    def extra(self) -> list[tuple[str, Any]]:
        """What the plan adds to the variant's overrides: the group's tokenizer and the run's folder."""
        return [
            ("tokenizer.path", str(self.group.folder)),
            ("tokenizer.train", None),
            ("output_dir", str(self.run_dir)),
        ]


def run_overrides(config: AblationConfig, name: str, seed: int) -> list[tuple[str, Any]]:
    """The overrides of one (variant, seed) run: the base's (with the scale's), the variant's, seed, resume.
    Each sets one field."""
    fixed = {"training.seed": seed, "training.resume_from_checkpoint": "latest"}
    return [
        *flatten_overrides(config.base.overrides),
        *flatten_overrides(config.variants[name]),
        *fixed.items(),
    ]


def run_config(config: AblationConfig, name: str, seed: int, extra: list[tuple[str, Any]] = ()) -> Any:
    """The resolved pretraining config of one run; a one-line TwinLMError naming the variant."""
    from twinlm.training.config import load_run_config

    try:
        return load_run_config(config.base.config, [*run_overrides(config, name, seed), *extra])
    except TwinLMError as err:
        raise TwinLMError(f"variant {name!r}: {err}") from None


def _local_files(cfg: Any) -> list[str]:
    from twinlm.fingerprint import source_files

    return source_files(cfg.data.sources)


def _model_identity(model_config: Any) -> dict[str, Any]:
    """What the model computes, whatever spelled it (a preset, a file, overrides equal to the defaults)."""
    values = model_config.to_dict()
    for key in ("transformers_version", "architectures", "auto_map", "torch_dtype", "dtype"):
        values.pop(key, None)
    return {k: v for k, v in values.items() if not k.startswith("_")}


def _tokenizer_group(cfg: Any, model_config: Any, root: Path) -> TokenizerGroup:
    from twinlm.fingerprint import files_digest, fingerprint
    from twinlm.training.loop import shared_tokenizer_key

    causal = bool(model_config.is_causal)
    if cfg.tokenizer.path is not None:
        given = Path(cfg.tokenizer.path)
        return TokenizerGroup(fingerprint(files_digest([given]))[:16], given, cfg, causal, given=True)
    if cfg.tokenizer.train is None:
        raise TwinLMError(
            "ablate: a run from model.from_pretrained needs tokenizer.path (its folder, for the model's own "
            "tokenizer): runs are named by their tokenizer's files"
        )
    key = shared_tokenizer_key(cfg, causal)
    return TokenizerGroup(key, root / "tokenizers" / key, cfg, causal)


def _pretrained_weights(cfg: Any) -> dict[str, str]:
    """What a run from model.from_pretrained starts from: the digests of the folder's model files (a Hub repo,
    whose branch may move, is refused: download it first)."""
    from twinlm.fingerprint import model_folder_digest
    from twinlm.training.pretrained import local_folder

    folder = local_folder(cfg.model)
    if folder is None:
        raise TwinLMError(
            f"ablate: model.from_pretrained={cfg.model.from_pretrained!r} is a Hub repo, whose revision may move: "
            "download it (hf download REPO --local-dir DIR) and continue from the folder"
        )
    return model_folder_digest(folder)


def plan_runs(config: AblationConfig, root: Path) -> list[PlannedRun]:
    """Every (variant, seed) run, resolved and checked (run config, model config, measures' parameters
    against the model) before anything trains; one-line TwinLMError naming the variant otherwise."""
    from twinlm.fingerprint import computed_settings, files_digest, fingerprint
    from twinlm.training.loop import probe_model_config

    planned = []
    for name in config.variants:
        first = run_config(config, name, config.seeds[0])
        try:
            weights = _pretrained_weights(first) if first.model.from_pretrained else None
            model_config = probe_model_config(first)
        except TwinLMError as err:
            raise TwinLMError(f"variant {name!r}: {err}") from None
        for measure in config.measures:
            problem = MEASURES[measure.name].settings(measure.params).check(model_config)
            if problem:
                raise TwinLMError(f"variant {name!r}: measure {measure.name}: {problem}")
        group = _tokenizer_group(first, model_config, root)
        for seed in config.seeds:
            cfg = run_config(config, name, seed)
            run = computed_settings(cfg, {"model": True, "tokenizer": True})
            digest = fingerprint(
                {
                    "run": run,
                    "model": _model_identity(model_config),
                    "data": files_digest(_local_files(cfg)),
                    "tokenizer": group.key,
                    **({"weights": weights} if weights is not None else {}),
                }
            )
            planned.append(PlannedRun(name, seed, cfg, root / digest[:16], digest, group))
    return planned


def prepare_tokenizers(planned: list[PlannedRun]) -> None:
    """Before the first run trains: every variant's data read (and its validation split held out), and every
    group's tokenizer trained when it is not there yet (atomically, as the run would train it)."""
    from twinlm.data import load_texts
    from twinlm.data.packing import split_documents
    from twinlm.fingerprint import fingerprint
    from twinlm.stopping import check_stop
    from twinlm.training.loop import train_run_tokenizer

    checked: set[str] = set()
    for run in planned:  # every variant's data reads and holds its validation split, before any run trains
        key = fingerprint(run.cfg.data.model_dump(mode="json"))
        if key in checked:
            continue
        checked.add(key)
        try:
            split_documents(load_texts(run.cfg.data), run.cfg.data)
        except TwinLMError as err:
            raise TwinLMError(f"variant {run.variant!r}: {err}") from None
    done: set[str] = set()
    for run in planned:
        group = run.group
        if group.key in done:
            continue
        done.add(group.key)
        if not group.given and not (group.folder / "tokenizer.json").is_file():
            check_stop(RESUME_HINT)
            try:
                train_run_tokenizer(group.cfg, group.folder, group.causal)
            except TwinLMError as err:
                raise TwinLMError(f"variant {run.variant!r}: {err}") from None
        elif group.given and not (group.folder / "tokenizer.json").is_file():
            raise TwinLMError(
                f"variant {run.variant!r}: tokenizer.path {str(group.folder)!r} holds no tokenizer.json"
            )


def unigram_entropy(run: PlannedRun) -> float | None:
    """Nats per token of the validation targets under the training tokens' unigram counts (add-one), from
    the packed blocks this run trains on (cached with the tokenizer, per data settings and file contents)."""
    import numpy as np

    from twinlm.data import build_pretraining_datasets
    from twinlm.fileio import write_json_atomic
    from twinlm.fingerprint import files_digest, fingerprint
    from twinlm.tokenization import load_tokenizer

    data = run.cfg.data
    split = fingerprint(  # the data settings and the files' contents (a given tokenizer's key holds neither)
        {
            "data": data.model_dump(
                mode="json", exclude={"mlm_probability", "whole_word_masking", "num_proc"}
            ),
            "files": files_digest(_local_files(run.cfg)),
        }
    )
    cache = run.run_dir.parent / "tokenizers" / f"{run.group.key}-{split[:12]}-{UNIGRAM_FILE}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    known = read_json(cache)
    if "entropy" in known:
        return known["entropy"]
    tokenizer = load_tokenizer(run.group.folder)
    if data.streaming:  # a stream has no training split to count
        return None
    blocks = build_pretraining_datasets(data, tokenizer, causal=run.group.causal)
    if blocks.validation is None:
        return None
    size = len(tokenizer)
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)

    def token_ids(dataset: Any, targets: bool) -> np.ndarray:
        ids = np.asarray(dataset.with_format("numpy")["input_ids"]).reshape(len(dataset), -1)
        if targets and run.group.causal:
            ids = ids[:, 1:]  # next-token targets: every token after the first
        ids = ids.reshape(-1)
        return ids if run.group.causal else ids[~np.isin(ids, special)]  # masked-LM never targets specials

    counts = np.bincount(token_ids(blocks.train, False), minlength=size).astype(np.float64)
    probabilities = (counts + 1.0) / (counts.sum() + size)
    entropy = float(-np.log(probabilities[token_ids(blocks.validation, True)]).mean())
    write_json_atomic(
        cache, {"entropy": entropy, "tokenizer": str(run.group.folder)}, "the unigram reference"
    )
    return entropy


def run_variant(config: AblationConfig, run: PlannedRun) -> dict[str, Any]:
    """Train one planned run (or read it back when finished) and take the measurements (each again when its
    parameters changed; a measure that is not cached asks its own command every time)."""
    from twinlm.fileio import write_json_atomic
    from twinlm.stopping import check_stop, raise_interrupted

    check_stop(RESUME_HINT)
    run_dir = run.run_dir
    summary = read_json(run_dir / "summary.json")
    if not summary.get("final_model"):
        from twinlm.training import pretrain

        run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "fingerprint": run.fingerprint,
            "variant": run.variant,
            "seed": run.seed,
            "question": config.question,
        }
        write_json_atomic(run_dir / RUN_FILE, record, f"the record of {run_dir}")
        summary = pretrain(run_config(config, run.variant, run.seed, run.extra))
        if summary.get("interrupted_by"):
            raise_interrupted(summary["interrupted_by"], f"{run_dir} saved a checkpoint; {RESUME_HINT}")
    measured_path = run_dir / MEASURES_FILE
    measured = read_json(measured_path)
    values = {k: summary.get(k) for k in RUN_OUTPUTS}
    values.update({k: v for k, v in summary.items() if k.startswith("val_") and isinstance(v, (int, float))})
    values["unigram_entropy"] = unigram_entropy(run)
    for measure in config.measures:
        params = config.params(measure)
        # one entry per parameter set: a run shared by two questions that measure it differently (07's
        # costs at 64-256 tokens, 08's at 256-4096) keeps both instead of remeasuring in turn
        done = measured.get(measure.name, [])
        entries = [e for e in (done if isinstance(done, list) else [done]) if isinstance(e, dict)]
        fresh = next((e for e in entries if e.get("params") == params and "values" in e), None)
        if fresh is None or not MEASURES[measure.name].cached:
            check_stop(RESUME_HINT)
            fresh = {"params": params, "values": MEASURES[measure.name].run(run_dir, summary, params)}
            measured[measure.name] = [e for e in entries if e.get("params") != params] + [fresh]
            write_json_atomic(measured_path, measured, f"the measurements of {run_dir}")
        values.update(fresh["values"])
    return {
        "variant": run.variant,
        "seed": run.seed,
        "run_dir": str(run_dir),
        "values": values,
        "curve": [(r["step"], r["loss"]) for r in _metrics(run_dir) if r.get("loss") is not None],
    }
