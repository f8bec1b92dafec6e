"""Publishing to the Hugging Face Hub: push a saved model folder, or checkpoints in the background.

- `push_folder` uploads one folder (model export + generated model card) with retries on transient errors.
- `BackgroundPusher` pushes checkpoints from a single worker thread while training goes on; failures are
  logged and collected, never raised into the training loop.
- `twinlm push DIR REPO_ID` is the command-line front end.

The token comes from huggingface_hub's usual places (`HF_TOKEN`, `hf auth login`) and is only ever
handed to huggingface_hub: it is never logged, printed or written to a file. `HF_ENDPOINT` points the
whole thing at another Hub (the tests run a local one).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from twinlm.errors import TwinLMError
from twinlm.model_card import CARD_FILE, LOSS_CURVE_FILE, read_config, write_model_card
from twinlm.model_folder import check_weights

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Training state that accelerate / DeepSpeed leave in checkpoint folders: large, and of no use to someone
# loading the model. Pushed only with include_training_state=True.
TRAINING_STATE_PATTERNS = (
    "optimizer*",
    "scheduler*",
    "random_states_*",
    "rng_state*",
    "scaler*",
    "sampler*",
    "custom_checkpoint_*",
    "global_step*",
    "latest",
    "zero_to_fp32.py",
    "pytorch_model_fsdp*",
)
# Never pushed: local caches, experiment-tracker folders, lock files.
ALWAYS_IGNORED = (".cache", "wandb", "__pycache__", "*.lock", "*.tmp", ".git")
RETRY_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
# One layer of retries. huggingface_hub sends preupload, LFS batch/upload/verify and most other calls
# through its own `http_backoff` (5 retries of 408/429/5xx and network errors); retrying those again
# around `upload_folder` multiplied the requests (36 to a dead LFS endpoint). twinlm retries only the
# calls huggingface_hub sends once: repo and branch creation, YAML validation and the commit itself.
_SENT_ONCE_BY_HUB = re.compile(r"/api/repos/create$|/api/validate-yaml$|/api/\w+s/.+/(branch|commit)/")


class HubPushError(TwinLMError):
    """A push to the Hub that failed for good (after the retries, or on a non-transient error)."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx", "requests"):  # whichever HTTP client this huggingface_hub uses
        try:
            module = __import__(name)
        except ImportError:
            continue
        errors.append(module.TransportError if name != "requests" else module.ConnectionError)
    return tuple(errors)


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: HTTP 408/429/5xx and network errors, anywhere in the cause chain."""
    seen: set[int] = set()
    transport = _transport_errors()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int) and status in RETRY_STATUS_CODES:
            return True
        if isinstance(current, transport):
            return True
        current = current.__cause__ or current.__context__
    return False


def _failed_request_path(error: BaseException) -> str | None:
    """The URL path of the HTTP request behind `error` (or its causes), when the error carries it."""
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for holder in (getattr(current, "response", None), current):
            try:
                request = getattr(holder, "request", None)  # httpx raises if a response has none
            except RuntimeError:
                request = None
            url = getattr(request, "url", None)
            if url is not None:
                return getattr(url, "path", None) or str(url)
        current = current.__cause__ or current.__context__
    return None


def retried_by_hub(error: BaseException) -> bool:
    """True when huggingface_hub has already retried the request that failed (so twinlm must not)."""
    path = _failed_request_path(error)
    return path is not None and not _SENT_ONCE_BY_HUB.search(path)


def _describe(error: BaseException, token: str | None) -> str:
    """One line about an error, for logs: its type, HTTP status and first message line, token scrubbed."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    first_line = next((line for line in str(error).splitlines() if line.strip()), "")
    text = (
        f"{type(error).__name__}"
        + (f" (HTTP {status})" if status else "")
        + (f": {first_line}" if first_line else "")
    )
    return text.replace(token, "***") if token else text


def with_retries(
    fn: Callable[[], T], *, what: str, max_retries: int = 5, retry_wait: float = 1.0, token: str | None = None
) -> T:
    """Call `fn`, retrying transient errors with exponential backoff (retry_wait * 2**attempt, at most 60 s);
    raise HubPushError after the last try, on the first non-transient error, or on a transient error of a
    request that huggingface_hub has retried already (`retried_by_hub`)."""
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified right below
            reason = _describe(err, token)
            if not is_transient(err):
                raise HubPushError(f"{what} failed: {reason}") from err
            if retried_by_hub(err):
                raise HubPushError(f"{what} failed after huggingface_hub's retries: {reason}") from err
            if attempt == max_retries:
                raise HubPushError(f"{what} failed after {attempt + 1} attempts: {reason}") from err
            wait = min(retry_wait * 2**attempt, 60.0)
            logger.warning(
                "%s: transient error (%s); retry %d/%d in %.1f s",
                what,
                reason,
                attempt + 1,
                max_retries,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def ignore_patterns(include_training_state: bool = False) -> list[str]:
    """Glob patterns (relative paths, as upload_folder matches them) of files a push leaves out."""
    names = list(ALWAYS_IGNORED) + ([] if include_training_state else list(TRAINING_STATE_PATTERNS))
    patterns: list[str] = []
    for name in names:
        # the name itself or a folder of that name, at the top or in any sub-folder
        patterns += [name, f"{name}/*", f"*/{name}", f"*/{name}/*"]
    return patterns


def _is_ignored(relative: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, p) for p in patterns)


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubPushError(
            "no Hugging Face token found: set HF_TOKEN or run `hf auth login` (a token with write access)"
        )
    return token


def check_can_push(token: str | None = None) -> str:
    """The token to push with; HubPushError when offline mode is on or no token is found. Called before
    anything is written or uploaded, so a push that cannot happen leaves no trace."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubPushError("cannot push while HF_HUB_OFFLINE is set: unset it to reach the Hub")
    return _resolve_token(token)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(source.resolve())
    except OSError:  # no symlinks here (e.g. Windows without developer mode): a hard link, else a copy
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def _stage_with_card(folder: Path, staging: Path, patterns: list[str], card_kwargs: dict[str, Any]) -> None:
    """Fill `staging` with links to the folder's files plus a freshly generated model card, so the card
    goes up in the same commit without touching `folder`. README.md / loss_curve.png are not linked
    before the card is written: writing through a link would overwrite the user's files."""
    generated = {CARD_FILE, LOSS_CURVE_FILE}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative not in generated and not _is_ignored(relative, patterns):
            _link_or_copy(path, staging / relative)
    write_model_card(staging, **card_kwargs)
    if not (staging / LOSS_CURVE_FILE).exists() and (folder / LOSS_CURVE_FILE).is_file():
        _link_or_copy(folder / LOSS_CURVE_FILE, staging / LOSS_CURVE_FILE)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload model with twinlm",
    token: str | None = None,
    max_retries: int = 5,
    retry_wait: float = 1.0,
    include_training_state: bool = False,
    card_kwargs: dict[str, Any] | None = None,
) -> str:
    """Upload a saved model folder to `repo_id` (created if needed; `revision` is a branch, created from
    main if needed) and return the commit URL. A model card is generated into the upload (never into
    `folder`) when the folder has none or `card_kwargs` (write_model_card arguments) are given; otherwise
    the folder's own README.md goes up as it is."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(
            f"cannot push {folder}: no such folder (expected a folder written by save_pretrained)"
        )
    token = check_can_push(token)
    patterns = ignore_patterns(include_training_state)
    api = HfApi(token=token)
    what = f"push of {folder} to {repo_id}" + (f"@{revision}" if revision else "")
    with tempfile.TemporaryDirectory(prefix="twinlm-card-") as tmp:
        upload = folder
        if (card_kwargs is not None or not (folder / CARD_FILE).exists()) and (
            folder / "config.json"
        ).is_file():
            upload = Path(tmp)
            _stage_with_card(folder, upload, patterns, {"repo_id": repo_id, **(card_kwargs or {})})

        def attempt() -> str:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                folder_path=upload,
                repo_id=repo_id,
                revision=revision,
                commit_message=commit_message,
                ignore_patterns=list(patterns),  # upload_folder extends the list it is given
            )
            return str(info.commit_url) if hasattr(info, "commit_url") else str(info)

        url = with_retries(attempt, what=what, max_retries=max_retries, retry_wait=retry_wait, token=token)
    logger.info("pushed %s -> %s", folder, url)
    return url


@dataclass
class PushResult:
    """The outcome of one background push: `url` on success, `error` (one line) on failure."""

    folder: str
    commit_message: str
    url: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _main_process() -> bool:
    """Rank 0 (or no distributed launcher): set by torchrun / accelerate launch as RANK."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@dataclass
class _Job:
    snapshot: Path
    result: PushResult
    card_kwargs: dict[str, Any] | None = field(default=None)


class BackgroundPusher:
    """Pushes checkpoint folders from one worker thread, in submission order, without blocking training.

    `submit` copies the folder (minus training state unless asked) to a temp dir first, so the training
    loop may overwrite or rotate the checkpoint at once. Errors never reach the caller: each is logged as a
    warning and kept in `failures`. `close()` waits for the queue and returns every PushResult.
    Only the main process pushes: on other ranks (RANK != 0, or enabled=False) submit does nothing.
    """

    def __init__(
        self,
        repo_id: str,
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        *,
        include_training_state: bool = False,
        max_retries: int = 5,
        retry_wait: float = 1.0,
        enabled: bool | None = None,
    ) -> None:
        self.repo_id, self.private, self.revision = repo_id, private, revision
        self._token = token  # never shown: excluded from repr and logs
        self.include_training_state = include_training_state
        self.max_retries, self.retry_wait = max_retries, retry_wait
        self.enabled = _main_process() if enabled is None else enabled
        self.results: list[PushResult] = []
        self.failures: list[PushResult] = []
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._tmp = Path(tempfile.mkdtemp(prefix="twinlm-push-")) if self.enabled else None
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._work, name="twinlm-hub-push", daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        return (
            f"BackgroundPusher(repo_id={self.repo_id!r}, revision={self.revision!r}, pending={self.pending})"
        )

    def __enter__(self) -> BackgroundPusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=True)

    @property
    def pending(self) -> int:
        """Pushes submitted but not finished."""
        return self._queue.unfinished_tasks

    def submit(
        self, folder: str | Path, commit_message: str, card_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Snapshot `folder` and queue its push; returns at once (after the local copy)."""
        if not self.enabled:
            return
        result = PushResult(folder=str(folder), commit_message=commit_message)
        with self._lock:
            self.results.append(result)
            if self._closed:
                self._fail(result, "submitted after close()")
                return
        try:
            snapshot = self._snapshot(Path(folder), len(self.results))
        except Exception as err:  # noqa: BLE001 - the training loop must go on
            self._fail(result, f"could not snapshot the folder: {_describe(err, self._token)}")
            return
        self._queue.put(_Job(snapshot=snapshot, result=result, card_kwargs=card_kwargs))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted push has finished (True), or `timeout` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, wait: bool = True) -> list[PushResult]:
        """Stop accepting pushes; with wait=True finish the queued ones first. Returns all results so far."""
        with self._lock:
            already, self._closed = self._closed, True
        if self._thread is not None and not already:
            self._queue.put(None)
        if wait and self._thread is not None:
            self._thread.join()
        if self.failures:
            logger.warning(
                "%d of %d pushes to %s failed; first: %s",
                len(self.failures),
                len(self.results),
                self.repo_id,
                self.failures[0].error,
            )
        return list(self.results)

    # -- worker side --------------------------------------------------------------------------------
    def _snapshot(self, folder: Path, index: int) -> Path:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        assert self._tmp is not None
        target = self._tmp / f"{index:05d}-{folder.name}"
        patterns = ignore_patterns(self.include_training_state)
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if path.is_file() and not _is_ignored(relative, patterns):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / relative)
        target.mkdir(parents=True, exist_ok=True)
        return target

    def _fail(self, result: PushResult, reason: str) -> None:
        result.error = reason
        self.failures.append(result)
        logger.warning(
            "push of %s to %s failed (training continues): %s", result.folder, self.repo_id, reason
        )

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                if self._tmp is not None:
                    shutil.rmtree(self._tmp, ignore_errors=True)
                self._queue.task_done()
                return
            start = time.perf_counter()
            try:
                job.result.url = push_folder(
                    job.snapshot,
                    self.repo_id,
                    private=self.private,
                    revision=self.revision,
                    commit_message=job.result.commit_message,
                    token=self._token,
                    max_retries=self.max_retries,
                    retry_wait=self.retry_wait,
                    include_training_state=self.include_training_state,
                    card_kwargs=job.card_kwargs,
                )
            except Exception as err:  # noqa: BLE001 - never let a push kill the run
                reason = str(err) if isinstance(err, HubPushError) else _describe(err, self._token)
                self._fail(job.result, reason)
            finally:
                job.result.seconds = time.perf_counter() - start
                shutil.rmtree(job.snapshot, ignore_errors=True)
                self._queue.task_done()


# -- command line -----------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `twinlm push DIR REPO_ID`."""
    parser = subparsers.add_parser(
        "push",
        help="upload a saved model or run folder to the Hugging Face Hub",
        description="Upload a folder written by save_pretrained (model, config, tokenizer, code) to the Hub, "
        "or the model of a pretraining run (final/) or fine-tuning run (best/), with a model card generated "
        "into the upload when the folder has none (the folder itself is never written to). The token comes "
        "from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument(
        "dir",
        type=Path,
        help="folder with config.json (a saved model), or a pretraining run (pushes final/) or "
        "fine-tuning run (pushes best/)",
    )
    parser.add_argument("repo_id", help="target repo, e.g. your-name/twinlm-small")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument(
        "--include-training-state",
        action="store_true",
        help="also push optimizer/scheduler/RNG states (needed only to resume training from the Hub)",
    )
    parser.set_defaults(func=run_push)
    return parser


# A pretraining run keeps its model in final/, a fine-tuning run its best model in best/.
RUN_MODEL_FOLDERS = (("final", "pretraining run"), ("best", "fine-tuning run"))


def resolve_model_folder(folder: Path) -> tuple[Path, str | None]:
    """The folder holding the model to push: `folder` itself when it has config.json, else the final/
    model of a pretraining run or the best/ model of a fine-tuning run (with what kind of run it was)."""
    if not folder.is_dir():
        raise TwinLMError(f"{folder} does not exist or is not a folder: expected a saved model folder")
    if (folder / "config.json").exists():
        return folder, None
    for name, kind in RUN_MODEL_FOLDERS:
        if (folder / name / "config.json").is_file():
            return folder / name, kind
    raise TwinLMError(
        f"{folder} has no config.json, nor a final/ or best/ folder with one: expected a folder written by "
        "save_pretrained, a pretraining run (with final/) or a fine-tuning run (with best/)"
    )


def run_push(args: argparse.Namespace) -> int:
    """The `twinlm push` command: validate, push (with a generated card when the folder has none), print
    where it went. Nothing is written into the folder."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder, kind = resolve_model_folder(args.dir)
    read_config(folder)  # raises TwinLMError when config.json is broken
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as err:
        raise TwinLMError(f"invalid repo id {args.repo_id!r}: expected 'namespace/name' ({err})") from err
    check_weights(folder)  # never push a damaged or weightless model
    token = check_can_push()
    if kind is not None:
        print(f"{args.dir} is a {kind}: pushing its model in {folder}")
    files = [p for p in folder.rglob("*") if p.is_file()]
    patterns = ignore_patterns(args.include_training_state)
    pushed = [p for p in files if not _is_ignored(p.relative_to(folder).as_posix(), patterns)]
    size_mb = sum(p.stat().st_size for p in pushed) / 2**20
    card = "its own model card" if (folder / CARD_FILE).exists() else "a generated model card"
    print(
        f"pushing {folder} ({len(pushed)} files, {size_mb:.1f} MB, {card}) to {args.repo_id} ...", flush=True
    )
    start = time.perf_counter()
    url = push_folder(
        folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.message or f"Upload {folder.name} with twinlm",
        token=token,
        include_training_state=args.include_training_state,
    )
    page = f"{constants.ENDPOINT}/{args.repo_id}" + (f"/tree/{args.revision}" if args.revision else "")
    print(f"pushed in {time.perf_counter() - start:.1f} s: {url}\nmodel page: {page}")
    return 0
