"""The pretraining loop under Accelerate: one readable pass from config to exported model.

setup (accelerator, tokenizer, model, data, optimizer) -> resume -> train steps (accumulate, clip,
step, schedule) with periodic log / eval / checkpoint -> export with `save_pretrained` -> summary.

Exact resume: the train DataLoader is not handed to Accelerate. Each process reads its shard through
a `DistributedSampler` (shuffled from `seed + epoch`), so the data position after N optimizer steps
is a pure function of N and is skipped to on resume without reading the skipped batches; the loader
has its own generator and reads no batch ahead, so the global RNG (dropout, masking), restored by
`load_state`, advances exactly as in the uninterrupted run. The LR scheduler is stepped once per
optimizer step by this loop and saved with the checkpoint.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    set_seed,
)
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from twinlm.errors import TwinLMError, is_out_of_memory
from twinlm.fileio import read_json, write_json_atomic
from twinlm.session import run_folder
from twinlm.stopping import check_stop
from twinlm.training.checkpoint import (
    checkpoint_launch,
    checkpoints_root,
    find_resume_checkpoint,
    holds_state,
    launch_kind,
    load_checkpoint,
    save_checkpoint,
    saved_processes,
)
from twinlm.training.components import Checkpointer, Evaluator, HubPublisher, MetricsLogger, StopSignal
from twinlm.training.config import RunConfig, dump_run_config, load_run_config
from twinlm.training.engine import Engine, EngineSettings, NonFiniteError, TrainState, model_is_finite
from twinlm.training.objectives import objective_for
from twinlm.training.optim import build_optimizer, build_scheduler
from twinlm.training.runtime import (
    _on_cpu,
    _reset_accelerate_state,
    _single_process,
    build_accelerator,
    gather_state_dict,
    save_model_folder,
)
from twinlm.training.tracking import (
    MetricsLog,
    init_tracking,
    parameter_counts,
    peak_flops_per_device,
    plot_training_curves,
    prepare_wandb_mode,
    read_metrics,
)

# ------------------------------------------------------------------------------------------------
# Setup
# ------------------------------------------------------------------------------------------------
# Beside a run's trained tokenizer: the shared_tokenizer_key it was trained for.
TOKENIZER_KEY_FILE = "trained_for.json"
# The settings a resume compares with its checkpoint's (and says which changed).
SCHEDULE_KEYS = ("max_steps", "max_minutes", "warmup_steps", "schedule", "lr", "weight_decay", "betas", "eps")


def build_tokenizer(cfg: RunConfig, accelerator: Accelerator, causal: bool) -> Any:
    """Load the configured tokenizer, or train one on the run's data (main process first, then reuse: the
    tokenizer in OUTPUT_DIR/tokenizer while its tokenizer.train settings and data are the run's, or the run
    resumes; trained again for a new run with other ones)."""
    from twinlm.tokenization import load_tokenizer

    if cfg.tokenizer.path is not None:
        return load_tokenizer(cfg.tokenizer.path)
    if cfg.tokenizer.train is None:  # continued pretraining: the model's own
        from twinlm.training.pretrained import pretrained_tokenizer

        return pretrained_tokenizer(cfg.model)
    out = Path(cfg.output_dir) / "tokenizer"
    key = shared_tokenizer_key(cfg, causal)
    with accelerator.main_process_first():
        if (out / "tokenizer.json").is_file():
            trained_for = read_json(out / TOKENIZER_KEY_FILE).get("key")
            resuming = cfg.training.resume_from_checkpoint is not None and any(
                checkpoints_root(cfg.output_dir).glob("checkpoint-*")
            )
            if trained_for in (None, key) or resuming:  # (None: trained before the key was kept)
                if trained_for not in (None, key) and accelerator.is_main_process:
                    print(
                        f"note: tokenizer.train or the data it is trained on changed since {out} was trained; "
                        "the resumed run keeps the tokenizer its checkpoints were trained with"
                    )
                return load_tokenizer(out)
            if accelerator.is_main_process:
                print(f"{out} was trained with other tokenizer.train settings or data: training it again")
        tokenizer = train_run_tokenizer(cfg, out, causal, show_progress=accelerator.is_main_process)
        if accelerator.is_main_process:
            write_json_atomic(out / TOKENIZER_KEY_FILE, {"key": key}, "the tokenizer's key")
        return tokenizer


def shared_tokenizer_key(cfg: RunConfig, causal: bool) -> str:
    """What the tokenizer `cfg.tokenizer.train` would be trained from (its settings, its kind, the data's
    sources and how documents are cut, the contents of local files): runs with the same key may share one
    tokenizer (ablate and sweep train it once; two trainings of WordPiece may number tied tokens
    differently, which would make runs differ where they should not and defeat the data cache)."""
    from twinlm.fingerprint import files_digest, fingerprint, source_files

    settings = cfg.tokenizer.train
    assert settings is not None
    files = source_files(cfg.data.sources)
    facts = {
        "train": settings.model_dump(mode="json"),
        "kind": settings.type or ("bpe" if causal else "wordpiece"),
        "sources": [src.model_dump(mode="json", exclude={"weight"}) for src in cfg.data.sources],
        "data": cfg.data.model_dump(mode="json", include={"streaming", "text_document_split", "seq_len"}),
        "files": files_digest(files),
    }
    return fingerprint(facts)[:16]


def train_run_tokenizer(cfg: RunConfig, out: Path, causal: bool, show_progress: bool = True) -> Any:
    """Train the tokenizer `cfg.tokenizer.train` describes on the run's documents and save it to `out`
    (what a run does before its first step; ablate trains one per group of runs that share it)."""
    from twinlm.data import load_texts
    from twinlm.tokenization import train_tokenizer

    settings = cfg.tokenizer.train
    assert settings is not None
    kind = settings.type or ("bpe" if causal else "wordpiece")
    docs = load_texts(cfg.data)
    texts = (row["text"] for row in docs) if isinstance(docs, IterableDataset) else docs["text"]
    extra = {} if settings.lowercase is None else {"lowercase": settings.lowercase}
    if show_progress:
        print(f"training a {kind} tokenizer (vocab {settings.vocab_size}) on the run's data -> {out}")
    return train_tokenizer(
        kind,
        texts=texts,
        vocab_size=settings.vocab_size,
        out_dir=out,
        min_frequency=settings.min_frequency,
        model_max_length=settings.model_max_length or cfg.data.seq_len,
        show_progress=show_progress,
        **extra,
    )


def _model_config(cfg: RunConfig, overrides: dict[str, Any]) -> Any:
    """TwinLMConfig of the run's model source (preset, file or pretrained model) with `overrides`."""
    from twinlm import TwinLMConfig
    from twinlm.training.pretrained import pretrained_config

    try:
        if cfg.model.from_pretrained is not None:
            return pretrained_config(cfg.model, overrides)
        return TwinLMConfig.from_preset(cfg.model.source, **overrides)
    except (ValueError, TypeError) as err:
        raise TwinLMError(f"model ({cfg.model.source}): {err}") from None


def build_model_config(cfg: RunConfig, tokenizer: Any) -> Any:
    """TwinLMConfig from preset/file/pretrained model + overrides, sized to the tokenizer (a pretrained model
    keeps its own vocabulary, which must hold the tokenizer's); bad settings raise TwinLMError."""
    overrides = dict(cfg.model.overrides)
    vocab = len(tokenizer)
    if "vocab_size" in overrides and overrides["vocab_size"] < vocab:
        raise TwinLMError(
            f"model.overrides.vocab_size={overrides['vocab_size']} is smaller than the tokenizer's vocabulary "
            f"({vocab} tokens); remove it (the tokenizer's size is used) or set it >= {vocab}"
        )
    if cfg.model.from_pretrained is None:
        overrides.setdefault("vocab_size", vocab)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            overrides.setdefault(name, token_id)
    model_config = _model_config(cfg, overrides)
    if model_config.vocab_size < vocab:
        raise TwinLMError(
            f"model vocab_size={model_config.vocab_size} is smaller than the tokenizer's vocabulary ({vocab})"
        )
    check_sequence_length(cfg, model_config)
    return model_config


def probe_model_config(cfg: RunConfig) -> Any:
    """The run's model config before the tokenizer exists (its special-token ids come later, its vocabulary
    is the one the tokenizer will be trained to): every model setting, the sequence length and the memory
    the model needs are checked before minutes of tokenizer training, not after."""
    config = run_model_config(cfg)
    check_model_memory(config)
    return config


def run_model_config(cfg: RunConfig) -> Any:
    """The run's model config without its tokenizer (special-token ids None, the vocabulary the tokenizer will
    be trained to), settings and sequence length checked; no memory check (`twinlm describe` sizes any model)."""
    probe = dict(cfg.model.overrides)
    if cfg.model.from_pretrained is None:
        probe.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cfg.tokenizer.train is not None and "vocab_size" not in cfg.model.overrides:
        probe["vocab_size"] = cfg.tokenizer.train.vocab_size
    config = _model_config(cfg, probe)
    check_sequence_length(cfg, config)
    return config


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation on this machine (Linux MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_model_memory(model_config: Any) -> int:
    """The model's parameter count (built on the meta device: no memory); a TwinLMError when its fp32
    weights, gradients and AdamW moments (16 bytes a parameter) cannot fit in this machine's memory when
    training on the CPU (on a GPU, an allocation that fails is reported in one line where it happens)."""
    from twinlm import TwinLMForCausalLM, TwinLMForMaskedLM

    with torch.device("meta"):
        model = (TwinLMForCausalLM if model_config.is_causal else TwinLMForMaskedLM)(model_config)
        n_params = parameter_counts(model)[0]
    available = _available_memory() if _on_cpu() else None
    need = 16 * n_params
    if available is not None and need > available:
        raise TwinLMError(
            f"the model has {n_params / 1e6:,.0f}M parameters: training needs about {need / 2**30:,.1f} GiB for "
            f"its weights, gradients and AdamW moments, and this machine has {available / 2**30:,.1f} GiB "
            "available; lower model.overrides (hidden_size, num_hidden_layers, intermediate_size, vocab_size)"
        )
    return n_params


def check_sequence_length(cfg: RunConfig, model_config: Any) -> None:
    """A position scheme with a bound (learned and sinusoidal positions stop at max_position_embeddings: the
    scheme says so, see positions.py) refuses a longer seq_len."""
    limit = model_config.position_encoding.max_positions(model_config)
    if limit is not None and cfg.data.seq_len > limit:
        pretrained = getattr(getattr(cfg, "model", None), "from_pretrained", None)
        fix = (
            "lower data.seq_len (a trained model's position table cannot grow)"
            if pretrained is not None
            else f"lower data.seq_len or set model.overrides.max_position_embeddings >= {cfg.data.seq_len}"
        )
        raise TwinLMError(
            f"data.seq_len={cfg.data.seq_len} is beyond the model's max_position_embeddings="
            f"{limit} ({model_config.position_embedding_type} positions); {fix}"
        )


def _pretrained_models(model: torch.nn.Module) -> list[Any]:
    """The transformers models a training model is made of: itself, or (replaced-token detection) its parts."""
    return [model] if hasattr(model, "config") else [m for m in model.children() if hasattr(m, "config")]


class _SkipSampler(Sampler[int]):
    """The indices of another sampler, less the first `skip` (so skipped batches are never read)."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]


class TrainBatches:
    """This process's micro-batches, epoch after epoch, from any (epoch, batch index) position.

    Map-style data of several sources with `weights` is read through a MixtureSampler (the sources mixed by
    their shares of the tokens); otherwise every block once per epoch, shuffled (DistributedSampler)."""

    def __init__(
        self,
        dataset: Any,
        collator: Any,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        source_sizes: list[int] | None = None,
        weights: list[float] | None = None,
    ) -> None:
        self.dataset, self.collator, self.batch_size = dataset, collator, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.source_sizes, self.weights = source_sizes, weights
        self.iterable = isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__")
        if self.iterable:
            from datasets.distributed import split_dataset_by_node

            self.dataset = (
                split_dataset_by_node(dataset, rank=rank, world_size=world) if world > 1 else dataset
            )
            self.batches_per_epoch = None
        else:
            self.sampler = self._sampler(rank)
            self.batches_per_epoch = len(self.sampler) // batch_size
            if self.batches_per_epoch == 0:
                raise TwinLMError(
                    f"the training set has {len(dataset)} blocks, fewer than training.batch_size={batch_size} "
                    f"per process ({world} processes); add data or lower the batch size"
                )

    def _sampler(self, rank: int) -> Sampler[int]:
        if self.weights is not None:
            from twinlm.data import MixtureSampler

            assert self.source_sizes is not None
            return MixtureSampler(self.source_sizes, self.weights, self.seed, rank, self.world)
        return DistributedSampler(
            self.dataset, num_replicas=self.world, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )

    def blocks_read(self, epoch: int, batch_in_epoch: int) -> list[int] | None:
        """Blocks each source gave all processes up to (epoch, batch index), recomputed from the samplers
        (a pure function of the position: exact after a resume); None for streamed data."""
        if self.iterable or self.source_sizes is None or self.batches_per_epoch is None:
            return None
        from twinlm.data import blocks_per_source

        counts = np.zeros(len(self.source_sizes), dtype=np.int64)
        for e in range(epoch + 1):
            taken = (self.batches_per_epoch if e < epoch else batch_in_epoch) * self.batch_size
            for rank in range(self.world if taken else 0):
                sampler = self._sampler(rank)
                sampler.set_epoch(e)  # type: ignore[attr-defined]
                indices = np.fromiter(itertools.islice(iter(sampler), taken), dtype=np.int64)
                counts += np.asarray(blocks_per_source(indices, self.source_sizes), dtype=np.int64)
        return counts.tolist()

    def iterate(self, epoch: int, batch_in_epoch: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Yield (epoch, index of the batch in its epoch, batch) forever, starting at the given position."""
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)  # the iterator draws no global RNG
            if self.iterable:
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(epoch)
                loader = DataLoader(
                    self.dataset,
                    batch_size=self.batch_size,
                    collate_fn=self.collator,
                    drop_last=True,
                    generator=generator,
                )
                batches: Iterator = iter(loader)
                # A stream cannot seek: read past the batches already trained on, but under a forked
                # RNG, since the restored RNG state is the one from after they were masked.
                with torch.random.fork_rng(devices=[]):
                    for _ in itertools.islice(batches, batch_in_epoch):
                        pass
            else:
                self.sampler.set_epoch(epoch)
                loader = DataLoader(
                    self.dataset,
                    batch_size=self.batch_size,
                    collate_fn=self.collator,
                    sampler=_SkipSampler(self.sampler, batch_in_epoch * self.batch_size),
                    drop_last=True,
                    generator=generator,
                )
                batches = iter(loader)
            produced = False
            for index, batch in enumerate(batches, start=batch_in_epoch):
                produced = True
                yield epoch, index, batch
            if not produced and batch_in_epoch == 0:
                raise TwinLMError("the training data yields no batch; add data or lower training.batch_size")
            epoch, batch_in_epoch = epoch + 1, 0


def _eval_loader(dataset: Any, collator: Any, batch_size: int, rank: int, world: int) -> DataLoader:
    """Equal-sized contiguous shards so every process runs the same number of forwards (ZeRO-3 needs it)."""
    per_rank = len(dataset) // world
    subset = torch.utils.data.Subset(dataset, range(rank * per_rank, (rank + 1) * per_rank))
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(0),
    )


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def pretrain(
    config: RunConfig | dict[str, Any] | str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the summary (also written to OUTPUT_DIR/summary.json).

    Call it in every process (under `accelerate launch`, or plainly for one process).
    """
    cfg = load_run_config(config, overrides)
    try:
        return PretrainingRun(cfg).run()
    finally:
        if _single_process():  # leave no Accelerate state behind for the caller's next Accelerator
            _reset_accelerate_state()


class PretrainingRun:
    """One pretraining run: setup, then the shared Engine with its components, then export and summary."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.hub: HubPublisher | None = None
        self.state = TrainState()  # the engine's; restored by _resume, read by a time budget's schedule

    # -- setup ------------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        """The model config (objective first: it picks the tokenizer), tokenizer, datasets, loaders."""
        cfg, train, acc = self.cfg, self.cfg.training, self.accelerator
        probe_config = probe_model_config(cfg)
        self.objective = objective_for(cfg.objective, bool(probe_config.is_causal))  # picks the tokenizer
        self.tokenizer = build_tokenizer(cfg, acc, self.objective.causal)
        check_stop("the run has not started training; run the same command again to start it")
        self.model_config = build_model_config(cfg, self.tokenizer)
        self.causal = self.objective.causal

        from twinlm.data import build_pretraining_datasets

        with acc.main_process_first():
            data = build_pretraining_datasets(cfg.data, self.tokenizer, causal=self.causal)
        self.sources = data.sources
        # what the order of training blocks follows: a resume with another one is not a continuation
        self.data_identity = None if data.identity is None else f"{data.identity}-seed{train.seed}"
        collator = self.objective.collator(self.tokenizer, cfg)
        self.batches = TrainBatches(
            data.train, collator, train.batch_size, train.seed, acc.process_index, acc.num_processes,
            source_sizes=data.source_sizes() if data.sources else None, weights=cfg.data.weights(),
        )  # fmt: skip
        self.eval_loader = None
        if data.validation is not None and len(data.validation) >= acc.num_processes:
            self.eval_loader = _eval_loader(
                data.validation, collator, train.batch_size, acc.process_index, acc.num_processes
            )

    def _setup_model(self) -> None:
        """Model (same initial weights on every process), optimizer and schedule, prepared by Accelerate."""
        cfg, train, acc = self.cfg, self.cfg.training, self.accelerator
        set_seed(train.seed)
        check_model_memory(self.model_config)
        try:
            model = self.objective.build_model(self.model_config, cfg)
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            raise TwinLMError(
                f"out of memory while building the model ({self.model_config.num_hidden_layers} layers, hidden "
                f"size {self.model_config.hidden_size}, vocabulary {self.model_config.vocab_size}); lower "
                "model.overrides"
            ) from None
        self.sizes = self.objective.sizes(model, cfg.data.seq_len)
        self.n_params, self.flops_per_token = self.sizes["parameters"], self.sizes["flops_per_token"]
        for part in _pretrained_models(model) if train.gradient_checkpointing else ():
            enable = getattr(part, "activation_checkpointing_enable", None)  # transformers >= 5.x name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.compile:
            model.compile()  # in place: parameter names (and checkpoints) stay those of the model
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        offload = deepspeed and acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get(
            "offload_optimizer", {}
        ).get("device", "none") not in ("none", None)
        optimizer = build_optimizer(model, train, cpu_offload=offload and not _on_cpu(), deepspeed=deepspeed)
        # The scheduler drives the torch optimizer's param groups, which DeepSpeed's ZeRO optimizers keep.
        clock = self._budget_progress if train.max_minutes is not None else None
        self.scheduler = build_scheduler(optimizer, train, train.max_steps, progress=clock)
        self.base_optimizer = optimizer
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        set_seed(train.seed, device_specific=True)  # dropout and masking differ between processes

    def _budget_progress(self) -> float:
        """With training.max_minutes, the schedule's clock: the larger of the spent share of the time
        budget and of max_steps (when set), so linear/cosine reach 0 at whichever end comes first."""
        train, state = self.cfg.training, self.state
        assert train.max_minutes is not None
        steps = state.step / train.max_steps if train.max_steps else 0.0
        return min(1.0, max(state.train_seconds / (60.0 * train.max_minutes), steps))

    def _resume(self) -> TrainState:
        """The verified checkpoint's state (model, optimizer, schedule, RNG, counters), or a fresh one."""
        acc, train, state = self.accelerator, self.cfg.training, self.state
        model = acc.unwrap_model(self.model)
        path = find_resume_checkpoint(acc, self.output_dir, train.resume_from_checkpoint, model)
        schedule = {k: getattr(train, k) for k in SCHEDULE_KEYS}
        schedule["betas"] = list(schedule["betas"])  # as the checkpoint's JSON gives it back
        position = {"processes": acc.num_processes, "batch_size": train.batch_size}
        if path is not None:
            saved = saved_processes(path)
            self._check_world(path, saved)
            # this run's optimizer settings, which loading the checkpoint's state replaces with its own
            settings = [
                {k: group[k] for k in ("initial_lr", "weight_decay", "betas", "eps") if k in group}
                for group in self.base_optimizer.param_groups
            ]
            state.load_state_dict(load_checkpoint(acc, path))
            before = state.extra.get("data_position")
            if saved != acc.num_processes or (before and before["batch_size"] != train.batch_size):
                self._move_data_position(state, saved, position)
            _say_schedule_changes(state.extra.get("schedule"), schedule, state.step, acc.is_main_process)
            saved_data = state.extra.get("data_identity")
            if saved_data and self.data_identity and saved_data != self.data_identity and acc.is_main_process:
                print(
                    "note: the training data (its sources, their contents or weights, data.seq_len, the "
                    "tokenizer or the held-out split) or training.seed changed since the checkpoint: the run "
                    f"goes on from step {state.step} and the same place in an epoch of other blocks; keep them "
                    "for an exact continuation"
                )
            self._keep_optimizer_settings(settings)
            if not model_is_finite(model):
                raise TwinLMError(
                    f"{path}: the model holds NaN/inf values; resume from an earlier checkpoint"
                )
            if acc.is_main_process:
                print(f"resumed from {path} at step {state.step}")
        elif train.resume_from_checkpoint == "latest" and acc.is_main_process:
            print(f"no checkpoint in {self.output_dir / 'checkpoints'} yet: starting from step 0")
        if path is None and train.max_steps and train.warmup_steps >= train.max_steps and acc.is_main_process:
            print(
                f"warning: training.warmup_steps={train.warmup_steps} >= training.max_steps={train.max_steps}: "
                "the learning rate never reaches training.lr; lower warmup_steps"
            )
        state.extra["schedule"] = schedule  # saved with every checkpoint: a resume can tell what changed
        state.extra["data_position"] = position  # what batch_in_epoch counts: a resume on other processes
        state.extra["data_identity"] = self.data_identity
        self.resumed = path is not None
        return state

    def _keep_optimizer_settings(self, settings: list[dict[str, Any]]) -> None:
        """After a resume: the optimizer's groups take this run's lr, weight decay, betas and eps again (torch's
        load_state_dict restores the checkpoint's), the schedule this run's base lr, and the learning rate of
        the resumed step is recomputed from them (the same as the checkpoint's when nothing changed)."""
        groups, scheduler = self.base_optimizer.param_groups, self.scheduler
        for group, values in zip(groups, settings, strict=True):
            group.update(values)
        if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: every schedule twinlm builds
            scheduler.base_lrs = [group["initial_lr"] for group in groups]
            lrs = [
                base * f(scheduler.last_epoch)
                for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
            ]
            scheduler._last_lr = lrs
        for group, lr in zip(groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr

    def _check_world(self, path: Path, saved: int) -> None:
        """TwinLMError before loading when a checkpoint of `saved` processes cannot go on with this many."""
        acc = self.accelerator
        written, running = checkpoint_launch(path), launch_kind(acc.distributed_type)
        if written != running:
            raise TwinLMError(
                f"{path} was written under {written} and this run is under {running}: its model and optimizer "
                f"state load only under the kind of launch that wrote them (on any number of processes); resume "
                f"it with a {written} launch config"
            )
        if saved == acc.num_processes:
            return
        where = f"{path} was written by {saved} process(es) and this run has {acc.num_processes}"
        if self.batches.iterable:
            raise TwinLMError(
                f"{where}: streamed data (data.streaming) is split by process, so its position cannot move to "
                f"another count; resume on {saved} process(es)"
            )

    def _move_data_position(self, state: TrainState, saved: int, position: dict[str, int]) -> None:
        """A checkpoint of another number of processes or batch size: every process draws from one shuffled
        order of the epoch's blocks, dealt round-robin, so `batch_in_epoch` micro-batches of B blocks on W
        processes read its first B * W * batch_in_epoch blocks. The same blocks with this run's processes and
        batch size is a whole number of micro-batches, or the data position cannot be kept (TwinLMError). Exact
        up to the end of the epoch it resumes in: what an epoch leaves out (less than one batch of every
        process) depends on the number of processes and the batch size."""
        before = state.extra.get("data_position")
        if before is None:
            raise TwinLMError(
                f"the checkpoint was written by {saved} process(es) before checkpoints recorded their batch size; "
                f"resume it on {saved} process(es)"
            )
        read = state.batch_in_epoch * before["batch_size"] * saved
        per_batch = position["batch_size"] * position["processes"]
        if read % per_batch:
            global_batch = before["batch_size"] * saved
            fix = (
                f"keep the global batch: training.batch_size={global_batch // position['processes']}"
                if global_batch % position["processes"] == 0
                else f"no batch size of {position['processes']} processes keeps its batch of {global_batch} "
                "blocks: resume on a number of processes that divides it"
            )
            raise TwinLMError(
                f"the checkpoint's processes ({saved} x training.batch_size {before['batch_size']}) have read "
                f"{read} blocks of epoch {state.epoch}, which {position['processes']} processes x "
                f"training.batch_size {position['batch_size']} cannot reach in whole batches; {fix}"
            )
        state.batch_in_epoch = read // per_batch
        if self.accelerator.is_main_process:
            print(
                f"resuming {saved} process(es)' checkpoint on {position['processes']}: epoch {state.epoch}, "
                f"{read} blocks read (batch {state.batch_in_epoch} of {position['batch_size']} per process); "
                "random states of the processes start afresh (dropout masks differ from an uninterrupted run)"
            )

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, acc = self.cfg, None
        prepare_wandb_mode(cfg.logging.report_to, int(os.environ.get("RANK", "0")) == 0)
        with run_folder(self.output_dir, "output_dir"):
            self.accelerator = acc = build_accelerator(cfg.training, cfg.logging.report_to, cfg.output_dir)
            acc.wait_for_everyone()
            set_seed(cfg.training.seed)
            self._setup_data()
            self._setup_model()
            engine = self._engine(self._resume())
            try:
                engine.train()
            except Exception:
                if self.hub is not None:  # pushes already queued (good checkpoints) still go out
                    self.hub.finish()
                raise
            return self._finish(engine)

    def _engine(self, state: TrainState) -> Engine:
        cfg, train, acc = self.cfg, self.cfg.training, self.accelerator
        if acc.is_main_process:
            dump_run_config(cfg, self.output_dir / "run_config.yaml")
        metrics = MetricsLog(
            self.output_dir / "metrics.jsonl", acc.is_main_process, state.step if self.resumed else None
        )
        init_tracking(acc, cfg.logging, cfg.model_dump(mode="json"), self.output_dir)
        if cfg.hub.push:
            self.hub = HubPublisher(cfg.hub, enabled=acc.is_main_process)
        peak = peak_flops_per_device(train.peak_flops)
        self.logger = MetricsLogger(
            metrics, train.log_every, train.max_steps, cfg.logging.report_to,
            self.flops_per_token, peak * acc.num_processes if peak else None, desc="pretrain",
        )  # fmt: skip
        evaluator = Evaluator(self._evaluate, train.eval_every, train.eval_on_start, self.logger)
        self.checkpointer = Checkpointer(self._save, train.save_every)
        budget = None if train.max_minutes is None else 60.0 * train.max_minutes
        settings = EngineSettings(
            train.max_steps, train.grad_accum, train.max_grad_norm, train.nonfinite, max_seconds=budget
        )
        return Engine(
            acc, self.model, self.optimizer, self.scheduler,
            lambda s: self.batches.iterate(s.epoch, s.batch_in_epoch), self.objective.count_targets,
            settings, [self.logger, evaluator, StopSignal(), self.checkpointer], state,
        )  # fmt: skip

    def _evaluate(self) -> dict[str, float]:
        if self.eval_loader is None:
            return {}
        train = self.cfg.training
        return self.objective.evaluate(
            self.model, self.eval_loader, self.accelerator, train.eval_batches, train.seed
        )

    def _save(self, engine: Engine) -> Path:
        """A checkpoint of a finite model only (a NaN model never replaces good checkpoints); Hub snapshot."""
        acc, step = self.accelerator, engine.state.step
        if not model_is_finite(self.model):
            raise NonFiniteError(f"the model holds NaN/inf values at step {step}: not checkpointed")
        train_state = engine.state.state_dict()
        existed = holds_state(checkpoints_root(self.output_dir) / f"checkpoint-{step}", train_state)
        estimate = 12 * self.n_params  # float32 weights and two AdamW moments
        path = save_checkpoint(acc, self.output_dir, step, train_state, self.cfg.training.keep_last, estimate)
        if self.hub is not None and self.cfg.hub.push_checkpoints and not existed:
            # The Hub gets a loadable model (not the optimizer state) for each checkpoint, in the background:
            # exported once, into the pusher's own space, and removed there once pushed.
            snapshot = self._export(self.hub.snapshot_folder(f"step-{step}"))
            self.hub.submit(snapshot, f"twinlm pretraining: checkpoint at step {step}", owned=True, step=step)
        return path

    def _export(self, target: Path, everything: bool = False) -> Path:
        """save_pretrained (atomically) of the objective's exported model into `target`: safetensors, config,
        model code, tokenizer; with `everything`, its other exports too (replaced-token detection's
        generator), each into a folder of its name beside `target`, before `target`."""
        acc = self.accelerator
        state_dict = gather_state_dict(acc, self.model, target)
        if state_dict is not None:
            exports = self.objective.exports(acc.unwrap_model(self.model), state_dict)
            for name, (model, own) in exports.items():
                if name == "final" or everything:
                    folder = target if name == "final" else target.with_name(name)
                    save_model_folder(
                        model, own, self.tokenizer, folder, "the exported model (the checkpoints are intact)"
                    )
        acc.wait_for_everyone()
        return target

    def _finish(self, engine: Engine) -> dict[str, Any]:
        """Export (unless stopped), summary.json, model-card info, Hub verdict; returns the summary."""
        acc, state, interrupted = self.accelerator, engine.state, engine.stop_reason
        final_dir = self._export(self.output_dir / "final", everything=True) if interrupted is None else None
        summary = self._summary(state, final_dir, interrupted, engine.ended_by())
        if final_dir is not None and acc.is_main_process:
            # Read by twinlm.model_card when the folder is pushed (now or later with `twinlm push`).
            info = {
                "training_summary": _card_summary(summary),
                "loss_history": [
                    (m["step"], m["loss"])
                    for m in read_metrics(self.logger.metrics.path)
                    if m.get("loss") is not None
                ],
                "datasets": [s.hub for s in self.cfg.data.sources if s.hub],
                "data_sources": summary["data_sources"],
                "metrics": {k: summary[k] for k in ("val_loss", "val_ppl", "val_accuracy") if k in summary},
            }
            write_json_atomic(final_dir / "training_info.json", info, "the model card's training info")
            if summary.get("generator_model"):
                generator_info = {
                    **info,
                    "training_summary": {**info["training_summary"], "role": "generator"},
                }
                write_json_atomic(
                    Path(summary["generator_model"], "training_info.json"),
                    generator_info,
                    "the generator's info",
                )
        if self.hub is not None:
            if final_dir is not None:
                self.hub.submit(final_dir, f"twinlm pretraining: step {state.step}")
            summary.update(self.hub.finish())
            if acc.is_main_process:
                write_json_atomic(self.output_dir / "summary.json", summary, "the run summary")
            self.hub.check(summary, final_dir or Path(summary["checkpoint"]))
        acc.wait_for_everyone()
        acc.end_training()  # also tears down the process group
        return summary

    def _source_report(self, state: TrainState) -> list[dict[str, Any]] | None:
        """Per source: its weight, the tokens it holds and the tokens trained on (None for streamed data)."""
        read = self.batches.blocks_read(state.epoch, state.batch_in_epoch)
        if read is None:
            return None
        seq_len, total = self.cfg.data.seq_len, max(sum(read), 1)
        return [
            {
                "source": source.name,
                "weight": source.weight,
                "documents": source.documents,
                "tokens_available": source.train_blocks * seq_len,
                "tokens_seen": blocks * seq_len,
                "share_seen": blocks / total,
                "passes": blocks / source.train_blocks if source.train_blocks else 0.0,
            }
            for source, blocks in zip(self.sources, read, strict=True)
        ]

    def _summary(
        self, state: TrainState, final_dir: Path | None, interrupted: str | None, ended_by: str | None
    ) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        tps = state.rate_sum / state.rate_count if state.rate_count else state.rate_first
        peak = peak_flops_per_device(cfg.training.peak_flops)
        summary = {
            "output_dir": str(self.output_dir),
            "final_model": str(final_dir) if final_dir else None,
            "checkpoint": str(self.checkpointer.last),
            "objective": self.objective.name,
            "parameters": self.n_params,
            **{k: v for k, v in self.sizes.items() if k not in ("parameters", "flops_per_token")},
            "generator_model": (
                str(self.output_dir / "generator")
                if final_dir is not None and "generator" in self.objective.exported
                else None
            ),
            "data_sources": self._source_report(state),
            "steps": state.step,
            "tokens_seen": state.tokens_seen,
            "train_seconds": state.train_seconds,
            "processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type),
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / (peak * acc.num_processes) if (tps and peak) else None,
            "interrupted_by": interrupted,
            "max_steps": cfg.training.max_steps,
            "max_minutes": cfg.training.max_minutes,
            "ended_by": interrupted or ended_by,
            "skipped_steps": state.skipped_steps,
            **state.last_eval,
            **{f"initial_{k}": v for k, v in state.initial_eval.items()},
        }
        if acc.is_main_process:
            write_json_atomic(self.output_dir / "summary.json", summary, "the run summary")
            plot = plot_training_curves(
                read_metrics(self.logger.metrics.path),
                self.output_dir / "loss_curve.png",
                f"{summary['objective']} ({self.n_params / 1e6:.1f}M parameters)",
            )
            print(_format_summary(summary, plot))
        return summary


def _say_schedule_changes(
    saved: dict[str, Any] | None, current: dict[str, Any], step: int, main: bool
) -> None:
    """A resume with other schedule settings is not a continuation of the same run: say what changed."""
    changed = {
        k: (saved[k], v) for k, v in current.items() if saved is not None and k in saved and saved[k] != v
    }
    if changed and main:
        listed = ", ".join(f"training.{k} {old} -> {new}" for k, (old, new) in changed.items())
        print(
            f"note: {listed} since the checkpoint: from step {step} the learning rate follows the new schedule "
            "(it may jump) and the optimizer the new settings; keep the run's settings for an exact continuation"
        )


def _card_summary(summary: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "objective",
        "steps",
        "tokens_seen",
        "train_seconds",
        "val_loss",
        "val_ppl",
        "val_accuracy",
        "val_gen_loss",
        "val_disc_loss",
        "val_disc_accuracy",
        "generator_parameters",
        "tokens_per_s",
        "processes",
    )
    return {k: summary[k] for k in keys if summary.get(k) is not None}


def _format_summary(summary: dict[str, Any], plot: Path | None) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    status = f"interrupted by {summary['interrupted_by']}" if summary["interrupted_by"] else "finished"
    if summary.get("ended_by") == "max_minutes":
        status += f" on its {summary['max_minutes']:g}-minute budget"
    lines = [
        "",
        f"pretraining {status} at step {summary['steps']} ({summary['objective']}, "
        f"{summary['parameters'] / 1e6:.2f}M parameters, {summary['processes']} process(es))",
        f"  validation loss {fmt(summary.get('val_loss'), '.4f')}"
        + (
            f"  perplexity {fmt(summary.get('val_ppl'), '.2f')}  accuracy {fmt(summary.get('val_accuracy'), '.4f')}"
            if "generator_parameters" not in summary  # replaced-token detection: its own line below
            else " (generator + weight x discriminator)"
        ),
        *(
            [
                f"  replaced-token detection: generator loss {fmt(summary.get('val_gen_loss'), '.4f')}, "
                f"discriminator loss {fmt(summary.get('val_disc_loss'), '.4f')} accuracy "
                f"{fmt(summary.get('val_disc_accuracy'), '.4f')}, {fmt(summary.get('val_replaced_fraction'), '.1%')} "
                f"of the tokens replaced"
            ]
            if "generator_parameters" in summary
            else []
        ),
        *(
            [
                f"  before training: validation loss {summary['initial_val_loss']:.4f}"
                + (f"  perplexity {summary['initial_val_ppl']:.2f}" if "initial_val_ppl" in summary else "")
            ]
            if "initial_val_loss" in summary
            else []
        ),
        *(
            f"  data         {s['source']}: {s['tokens_seen']:,} tokens ({s['share_seen']:.1%}"
            + (f", weight {s['weight']:.3f}" if s["weight"] is not None else "")
            + f", {s['passes']:.2f} passes over its {s['tokens_available']:,})"
            for s in summary.get("data_sources") or []
        ),
        f"  throughput {fmt(summary['tokens_per_s'], ',.0f')} tokens/s  MFU "
        f"{'n/a (unknown peak FLOP/s: set training.peak_flops)' if summary['mfu'] is None else format(summary['mfu'], '.1%')}"
        f"  ({summary['tokens_seen']:,} tokens in {summary['train_seconds']:.1f} s)",
        f"  checkpoint   {summary['checkpoint']}",
    ]
    if summary.get("generator_model"):
        lines.append(f"  generator    {summary['generator_model']}  (AutoModelForMaskedLM)")
    if summary["final_model"]:
        lines.append(
            f"  final model  {summary['final_model']}  (from_pretrained(..., trust_remote_code=True))"
        )
    else:
        lines.append(
            f"  resume with  training.resume_from_checkpoint=latest (output_dir {summary['output_dir']})"
        )
    lines.append(
        f"  metrics      {summary['output_dir']}/metrics.jsonl, summary.json"
        + (f", {plot.name}" if plot else "")
    )
    return "\n".join(lines)


__all__ = [
    "PretrainingRun",
    "pretrain",
    "build_accelerator",
    "build_model_config",
    "TrainBatches",
]
