"""Publishing to the Hugging Face Hub: push a saved model folder, or checkpoints in the background.

- `push_folder` uploads one folder (model export + generated model card) with retries on transient errors.
- `BackgroundPusher` pushes checkpoints on huggingface_hub's own background queue (`HfApi.run_as_future`)
  while training goes on; failures are logged and collected, never raised into the training loop.
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
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    """A hard link (no copy, and it outlives the source's deletion: a rotated checkpoint), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or no hard links here
        shutil.copy2(source, target)


def stage(folder: Path, staging: Path, patterns: list[str], card_kwargs: dict[str, Any] | None) -> Path:
    """What one push uploads: the folder's files (hard links, never copies where links work) minus the
    ignored ones, plus a freshly generated model card when the folder has none or `card_kwargs` are given
    (README.md / loss_curve.png are not linked before the card is written: writing through a link would
    overwrite the user's files). `folder` itself is never written to. Returns `staging`."""
    generated = {CARD_FILE, LOSS_CURVE_FILE}
    own_card = (folder / CARD_FILE).exists() and card_kwargs is None
    staging.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or _is_ignored(relative, patterns) or (relative in generated and not own_card):
            continue
        _link_or_copy(path, staging / relative)
    if not own_card and (folder / "config.json").is_file():
        write_model_card(staging, **(card_kwargs or {}))
        if not (staging / LOSS_CURVE_FILE).exists() and (folder / LOSS_CURVE_FILE).is_file():
            _link_or_copy(folder / LOSS_CURVE_FILE, staging / LOSS_CURVE_FILE)
    return staging


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
    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(
            f"cannot push {folder}: no such folder (expected a folder written by save_pretrained)"
        )
    token = check_can_push(token)
    with tempfile.TemporaryDirectory(prefix="twinlm-push-") as tmp:
        patterns = ignore_patterns(include_training_state)
        staged = stage(folder, Path(tmp) / "upload", patterns, _card(repo_id, card_kwargs, folder))
        return upload(
            staged, repo_id, private=private, revision=revision, commit_message=commit_message,
            token=token, max_retries=max_retries, retry_wait=retry_wait,
        )  # fmt: skip


def _card(repo_id: str, card_kwargs: dict[str, Any] | None, folder: Path) -> dict[str, Any] | None:
    """The card's arguments (with the repo id) when one is generated; None keeps the folder's own card."""
    if card_kwargs is None and (folder / CARD_FILE).exists():
        return None
    return {"repo_id": repo_id, **(card_kwargs or {})}


def upload(
    staged: Path,
    repo_id: str,
    *,
    private: bool,
    revision: str | None,
    commit_message: str,
    token: str,
    max_retries: int = 5,
    retry_wait: float = 1.0,
) -> str:
    """One commit of a staged folder (repo and branch created if needed), with twinlm's one layer of retries
    for the calls huggingface_hub sends once; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    what = f"push of {staged.name} to {repo_id}" + (f"@{revision}" if revision else "")

    def attempt() -> str:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=staged, repo_id=repo_id, revision=revision, commit_message=commit_message
        )
        return str(info.commit_url) if hasattr(info, "commit_url") else str(info)

    url = with_retries(attempt, what=what, max_retries=max_retries, retry_wait=retry_wait, token=token)
    logger.info("pushed %s -> %s", staged, url)
    return url


@dataclass
class PushResult:
    """The outcome of one background push: `url` on success, `error` (one line) on failure."""

    folder: str
    commit_message: str
    revision: str | None = None  # the branch it went to (None: the pusher's)
    url: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _main_process() -> bool:
    """Rank 0 (or no distributed launcher): set by torchrun / accelerate launch as RANK."""
    return int(os.environ.get("RANK", "0") or 0) == 0


class BackgroundPusher:
    """Pushes on huggingface_hub's own background queue (`HfApi.run_as_future`: one worker, in submission
    order; what transformers' Trainer uses for every-save pushes), without blocking training.

    Each push is one snapshot: the folder's files hard-linked into a staging folder (so the training loop
    may rotate a checkpoint at once), or, for a folder written only for this push (`owned=True`, e.g. an
    export into `snapshot_folder()`), that folder itself. Errors never reach the caller: each is logged as
    a warning and kept in its PushResult; `close()` waits for the futures and returns every result.
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
        self.patterns = ignore_patterns(include_training_state)
        self.max_retries, self.retry_wait = max_retries, retry_wait
        self.enabled = _main_process() if enabled is None else enabled
        self.results: list[PushResult] = []
        self._futures: list[Any] = []
        self._api: Any = None
        self._tmp = Path(tempfile.mkdtemp(prefix="twinlm-push-")) if self.enabled else None

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
        return sum(not f.done() for f in self._futures)

    @property
    def failures(self) -> list[PushResult]:
        return [r for r in self.results if r.error is not None]

    def snapshot_folder(self, name: str) -> Path:
        """A fresh path in the pusher's own space to export a model into and submit with owned=True."""
        if self._tmp is None:
            return (
                Path(tempfile.gettempdir()) / f"twinlm-unused-{name}"
            )  # never written: not the main process
        return self._tmp / f"{len(self.results):05d}-{name}"

    def submit(
        self,
        folder: str | Path,
        commit_message: str,
        card_kwargs: dict[str, Any] | None = None,
        owned: bool = False,
        revision: str | None = None,
    ) -> None:
        """Stage `folder` (links, or the folder itself when `owned`) and queue its push, to `revision` (a
        branch, created from main if needed) or else the pusher's revision; returns at once."""
        if not self.enabled:
            return
        assert self._tmp is not None
        folder = Path(folder)
        result = PushResult(
            folder=str(folder), commit_message=commit_message, revision=revision or self.revision
        )
        self.results.append(result)
        try:
            token = check_can_push(self._token)
            card = _card(self.repo_id, card_kwargs, folder)
            staging = folder if owned else self._tmp / f"{len(self.results):05d}-{folder.name}"
            if owned:
                if card is not None:
                    write_model_card(folder, **card)
            else:
                stage(folder, staging, self.patterns, card)
        except Exception as err:  # noqa: BLE001 - the training loop must go on
            self._fail(result, f"could not stage the folder: {_describe(err, self._token)}")
            return
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(token=token)
        self._futures.append(self._api.run_as_future(self._push, staging, result, token))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted push has finished (True), or `timeout` seconds passed (False)."""
        from concurrent.futures import wait

        return not wait(self._futures, timeout=timeout).not_done

    def close(self, wait: bool = True) -> list[PushResult]:
        """With wait=True, wait for every queued push; remove the staging space. Returns all results."""
        if wait:
            self.wait()
        if self._tmp is not None and not self.pending:
            shutil.rmtree(self._tmp, ignore_errors=True)
        if self.failures:
            logger.warning(
                "%d of %d pushes to %s failed; first: %s",
                len(self.failures),
                len(self.results),
                self.repo_id,
                self.failures[0].error,
            )
        return list(self.results)

    def _fail(self, result: PushResult, reason: str) -> None:
        result.error = reason
        logger.warning(
            "push of %s to %s failed (training continues): %s", result.folder, self.repo_id, reason
        )

    def _push(self, staging: Path, result: PushResult, token: str) -> None:
        """On huggingface_hub's worker: one commit; the outcome goes into `result`, never raised."""
        start = time.perf_counter()
        try:
            result.url = upload(
                staging, self.repo_id, private=self.private, revision=result.revision,
                commit_message=result.commit_message, token=token, max_retries=self.max_retries,
                retry_wait=self.retry_wait,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - never let a push kill the run
            self._fail(result, str(err) if isinstance(err, HubPushError) else _describe(err, self._token))
        finally:
            result.seconds = time.perf_counter() - start
            shutil.rmtree(staging, ignore_errors=True)


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
