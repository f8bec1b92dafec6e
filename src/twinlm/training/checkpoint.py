"""Checkpoints that prove themselves: written atomically, verified before they are trusted.

Every rank writes into `checkpoint-N.tmp`; the main process then adds `train_state.json` (the engine's
counters) and `manifest.json` (each file's size and SHA-256, written last), and one rename makes
`checkpoint-N`. A crash leaves at most a `.tmp` directory, which is ignored and removed by the next
save; a disk that fills up ends the run with a one-line error, the `.tmp` removed.

Resuming from `latest` verifies the newest checkpoint against its manifest and falls back to the next
intact one, saying what it skipped and why; an explicit checkpoint that fails verification, a missing RNG
file or a model of another shape is a one-line TwinLMError naming the file. Rotation (`keep_last`) never
deletes the newest intact checkpoint.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from twinlm.errors import TwinLMError, resource_problem

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "train_state.json"
MANIFEST = "manifest.json"


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (renamed from .tmp, with a train_state.json), oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: Path, value: str | None) -> Path | None:
    """'latest' -> the newest complete checkpoint (None when the run has none yet), a path -> itself."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise TwinLMError(
            f"training.resume_from_checkpoint: {value!r} is not a complete checkpoint (no {STATE_FILE}); "
            "give 'latest' or a checkpoint-N directory"
        )
    return path


# ------------------------------------------------------------------------------------------------
# Manifest and verification
# ------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: every file's size and SHA-256 (the last file written into a checkpoint)."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    _write_synced(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path, process_index: int = 0, checksums: bool = True) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it, naming the file."""
    manifest_path = path / MANIFEST
    try:
        files = json.loads(manifest_path.read_text())["files"] if manifest_path.exists() else None
    except (ValueError, KeyError, OSError):
        return f"{manifest_path} is damaged (not a readable manifest)"
    for name, entry in (files or {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{file} has {size} bytes, the manifest says {entry['size']} (truncated or damaged)"
        if checksums and _sha256(file) != entry["sha256"]:
            return f"{file} does not match its checksum in {MANIFEST} (damaged)"
    try:
        json.loads((path / STATE_FILE).read_text())
    except (ValueError, OSError):
        return f"{path / STATE_FILE} is missing or not valid JSON"
    rng = path / f"random_states_{process_index}.pkl"
    if not rng.is_file() and (process_index == 0 or process_index < saved_processes(path)):
        return f"{rng} is missing (without it the resumed run would not be exact)"
    return None  # (a process beyond the checkpoint's: resuming on more processes, its RNG starts afresh)


def saved_processes(path: Path) -> int:
    """How many processes wrote the checkpoint: one RNG state each (the manifest vouches for them)."""
    return len(list(path.glob("random_states_*.pkl")))


def checkpoint_launch(path: Path) -> str:
    """Which kind of launch wrote the checkpoint, from its layout: "DeepSpeed" (the engine's folder), "FSDP"
    (accelerate's sharded model folders, torch DCP), or "plain/DDP" (whole state files: one process or DDP)."""
    if (path / MODEL_STATES).is_dir():
        return "DeepSpeed"
    if any(path.glob(f"{FSDP_MODEL_STATES}*")):
        return "FSDP"
    return "plain/DDP"


def launch_kind(distributed_type: Any) -> str:
    """The kind of launch (as `checkpoint_launch` names it) of an accelerate distributed type."""
    from accelerate.utils import DistributedType

    return {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.FSDP: "FSDP"}.get(
        distributed_type, "plain/DDP"
    )


def check_model_shapes(path: Path, model: torch.nn.Module) -> None:
    """TwinLMError naming the file when the checkpoint holds a model of another shape than this run's."""
    file = path / "model.safetensors"
    if not file.is_file():  # DeepSpeed layouts: its loader checks shapes itself
        return
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open objects are not iterable
                shape = tuple(fh.get_slice(key).get_shape())
                if key in expected and expected[key] != shape:
                    raise TwinLMError(
                        f"{file} holds a model of another shape ({key}: {shape} in the checkpoint, "
                        f"{expected[key]} in this run's model); resume with the config it was trained with, "
                        "or start a new output_dir"
                    )
    except (OSError, RuntimeError, ValueError) as err:  # safetensors raises SafetensorError(Exception)
        raise TwinLMError(f"{file} is not a readable safetensors file ({err})") from None


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------
def find_resume_checkpoint(
    accelerator: Accelerator, output_dir: Path, value: str | None, model: torch.nn.Module
) -> Path | None:
    """The checkpoint to resume from, verified: 'latest' skips damaged ones (saying why), a path must be intact."""
    if value is None:
        return None
    rank, main = accelerator.process_index, accelerator.is_main_process
    if value != "latest":
        path = resolve_checkpoint(output_dir, value)
        assert path is not None
        problem = verify_checkpoint(path, rank)
        if problem:
            raise TwinLMError(f"training.resume_from_checkpoint: {problem}")
        check_model_shapes(path, model)
        return path
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path, rank)
        if problem is None:
            check_model_shapes(path, model)
            return path
        skipped.append(f"{path.name}: {problem}")
        if main:
            print(f"skipping {path.name}: {problem}; trying an older checkpoint")
    if skipped:
        raise TwinLMError(
            f"no intact checkpoint to resume from in {checkpoints_root(output_dir)} ({'; '.join(skipped)}); "
            "restore one, or start afresh in another output_dir"
        )
    return None


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, RNG states from a checkpoint; return the engine's counters. A
    DeepSpeed ZeRO checkpoint of another number of processes loads through DeepSpeed's universal checkpoint
    (`universal_view`), which re-shards the optimizer state."""
    engine = _deepspeed_engine(accelerator)
    universal = engine is not None and saved_processes(path) != accelerator.num_processes
    source = universal_view(accelerator, path) if universal else path
    groups = _group_settings(engine) if universal else None
    try:
        if universal:
            engine._config.load_universal_checkpoint = True
        accelerator.load_state(str(source))
        if groups is not None:
            _repair_universal_zero3(engine, groups)
    except (RuntimeError, OSError, ValueError, EOFError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TwinLMError(f"cannot load checkpoint {path}: {first}") from None
    finally:
        if universal:
            engine._config.load_universal_checkpoint = False
    return json.loads((Path(path) / STATE_FILE).read_text())


UNIVERSAL = "universal"  # checkpoint-N/universal: the checkpoint as DeepSpeed's universal checkpoint


def _deepspeed_engine(accelerator: Accelerator) -> Any:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return next((m for m in accelerator._models if hasattr(m, "load_universal_checkpoint")), None)


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _group_settings(engine: Any) -> list[dict[str, Any]]:
    """Each parameter group's settings other than its parameters and learning rate."""
    skip = ("params", "lr", "initial_lr")
    return [{k: v for k, v in g.items() if k not in skip} for g in _inner_optimizer(engine).param_groups]


def _repair_universal_zero3(engine: Any, groups: list[dict[str, Any]]) -> None:
    """Two slips of ZeRO-3's universal loader (DeepSpeed 0.19, stage3.load_hp_checkpoint_state_from_checkpoint_
    dir_stage3), undone: it gives every parameter group the first group's settings (the no-decay group would
    decay), and one `step` tensor to every group's state, which AdamW increments in place once per group (the
    bias correction would run ahead). Each group gets back its own settings and its own step."""
    optimizer = _inner_optimizer(engine)
    for group, settings in zip(optimizer.param_groups, groups, strict=True):
        group.update(settings)
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def universal_view(accelerator: Accelerator, path: Path) -> Path:
    """checkpoint-N/universal: the ZeRO shards of `path` converted by DeepSpeed's ds_to_universal (one file
    per parameter and optimizer state, for any number of processes) beside links to the checkpoint's other
    files (RNG states, the engine's counters). Built once by the main process, atomically; reused later."""
    view = Path(path) / UNIVERSAL
    problem = None
    if accelerator.is_main_process and not (view / MODEL_STATES).is_dir():
        tmp = view.with_name(
            f"{UNIVERSAL}.tmp-{os.getpid()}"
        )  # (another run may convert the same checkpoint)
        try:
            _to_universal(Path(path) / MODEL_STATES, tmp / MODEL_STATES)
            for item in Path(path).iterdir():
                if item.name != MANIFEST and not item.name.startswith((MODEL_STATES, UNIVERSAL)):
                    (tmp / item.name).symlink_to(Path("..") / item.name)
            os.replace(tmp, view)
        except Exception as err:
            problem = err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if problem is not None and (view / MODEL_STATES).is_dir():
            problem = None  # another run's conversion of the same checkpoint got there first
    failed = _any_process(accelerator, problem is not None)  # the others must not wait for a view forever
    if failed:
        raise TwinLMError(
            f"cannot convert the DeepSpeed checkpoint {path} to a universal checkpoint (to resume on "
            f"{accelerator.num_processes} process(es) a checkpoint of {saved_processes(path)})"
            + (f": {problem}" if problem is not None else "; the main process says why")
        )
    return view


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective: every process calls it)."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import reduce

    return bool(reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())


MODEL_STATES = "pytorch_model"  # accelerate's folder (DeepSpeed tag) for the engine's files
FSDP_MODEL_STATES = "pytorch_model_fsdp_"  # accelerate's folders of FSDP's sharded model state (torch DCP)


def _to_universal(source: Path, target: Path) -> None:
    """deepspeed.checkpoint.ds_to_universal in this process (its command-line `main`), quietly."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # (twinlm's model declares no Megatron-style parallel layout: nothing to add)
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(args)


# ------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------
def holds_state(checkpoint: Path, train_state: dict[str, Any]) -> bool:
    """Whether `checkpoint` was saved from this very training state (step, counters, clock, RNG, settings):
    not a checkpoint of the same step left by another run in the folder, or by this run's own future, before
    a resume from an earlier checkpoint (both are replaced, not kept as this run's)."""
    try:
        saved = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return saved == json.loads(json.dumps(train_state))


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    train_state: dict[str, Any],
    keep_last: int,
    estimated_bytes: int = 0,
) -> Path:
    """Save the full training state as `checkpoints/checkpoint-{step}` atomically; keep the newest `keep_last`.

    Must be called on every process (DeepSpeed writes one shard per rank). `estimated_bytes` (the size of
    a checkpoint, when none exists yet to measure) goes into the message should the disk fill up.
    """
    root = checkpoints_root(output_dir)
    final, tmp = root / f"checkpoint-{step}", root / f"checkpoint-{step}.tmp"
    main = accelerator.is_main_process
    if holds_state(final, train_state) and verify_checkpoint(final, accelerator.process_index) is None:
        return final  # this very state is there (the checkpoint resumed from, at the end of a run that did no step)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in (tmp, final):  # a damaged checkpoint-N is replaced by this exact recomputation
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with _quiet_about_tied_weights(accelerator):
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # all ranks' files are written before the manifest and the rename
        if main:
            _write_synced(tmp / STATE_FILE, json.dumps(train_state, indent=2))
            write_manifest(tmp)
            os.replace(tmp, final)
            _fsync_dir(root)
    except Exception as err:  # torch's writer raises RuntimeError on a full disk, not OSError
        shutil.rmtree(tmp, ignore_errors=True)
        problem = resource_problem(err)
        if problem is None:
            raise
        raise TwinLMError(_save_failure(err, problem, root, tmp, output_dir, estimated_bytes)) from None
    if main:
        rotate_checkpoints(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


class _TiedWeightsNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving. This should be OK, but check ..." when every
    name it removed is an alias of one of the models' parameters (a tied LM head, RTD's shared embeddings): the
    model is built tied again before `load_state` fills it, so nothing is lost. Any other shared storage still
    warns."""

    PATTERN = re.compile(r"Removed shared tensor (\{.*\}) while saving")

    def __init__(self, aliases: set[str]) -> None:
        super().__init__()
        self.aliases = aliases

    def filter(self, record: logging.LogRecord) -> bool:
        found = self.PATTERN.search(record.getMessage())  # after "[RANK n] "
        if found is None:
            return True
        try:
            removed = ast.literal_eval(found.group(1))
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(removed, set) and removed <= self.aliases)


@contextlib.contextmanager
def _quiet_about_tied_weights(accelerator: Accelerator):
    """`save_state` with `_TiedWeightsNotice` on accelerate's logger (the aliases: every parameter name that
    shares its Parameter with another name, in each prepared model)."""
    aliases: set[str] = set()
    for model in accelerator._models:
        names: dict[int, list[str]] = {}
        for name, parameter in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
            names.setdefault(id(parameter), []).append(name)
        aliases.update(name for group in names.values() if len(group) > 1 for name in group)
    notice, logger = _TiedWeightsNotice(aliases), logging.getLogger("accelerate.utils.other")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def rotate_checkpoints(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, never the newest intact one; drop stale .tmp."""
    found = list_checkpoints(output_dir)
    keep = set(found[-keep_last:])
    for path in reversed(found):
        if verify_checkpoint(path, checksums=False) is None:
            keep.add(path)
            break
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints_root(output_dir).glob("checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _save_failure(
    err: Exception, cause: str, root: Path, tmp: Path, output_dir: Path, estimated_bytes: int
) -> str:
    """One line: what failed, the space a checkpoint needs and the space left, what is intact."""
    found = list_checkpoints(output_dir)
    need = sum(p.stat().st_size for p in found[-1].rglob("*") if p.is_file()) if found else estimated_bytes
    free = shutil.disk_usage(root if root.exists() else output_dir).free
    intact = ", ".join(p.name for p in found) or "none yet"
    return (
        f"saving {tmp.name.removesuffix('.tmp')} failed: {cause} ({getattr(err, 'filename', None) or tmp}); a checkpoint needs "
        f"about {need / 1e6:,.1f} MB, {free / 1e6:,.1f} MB are free on {root}; the unfinished {tmp.name} was "
        f"removed, earlier checkpoints are intact ({intact}): free space and run the same command again "
        "(`twinlm pretrain` with training.resume_from_checkpoint=latest)"
    )


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
