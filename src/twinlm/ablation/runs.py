"""The runs of a question: resolved configs, fingerprints, training (resumable) and measurements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twinlm.ablation.config import AblationConfig
from twinlm.ablation.measures import MEASURES, MEASURES_FILE, _metrics
from twinlm.config import flatten_overrides
from twinlm.errors import TwinLMError
from twinlm.fileio import read_json

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
