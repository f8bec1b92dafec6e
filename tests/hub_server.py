"""A small Hugging Face Hub-compatible HTTP server for tests (no internet needed).

It implements the endpoints that `huggingface_hub` 2.x calls to push and pull a model repo (with
`HF_HUB_DISABLE_XET=1`): whoami, repo creation, YAML validation, preupload, the LFS batch API with
single-part PUT uploads, NDJSON commits, branches, refs, model info, tree listing and file resolution.
State lives in memory; every commit is a full snapshot, so revisions and branches behave like git refs.

Failure injection: `hub.fail("commit", times=2, status=503)` makes the next two commit requests fail;
`times=None` fails every one until `hub.clear_failures()`. `hub.requests` records (method, kind, status).

Usage from any test:

    from hub_server import running_hub_server
    with running_hub_server() as hub:
        env = hub.subprocess_env(hf_home=tmp_path / "hf")   # for a `twinlm push` / loading subprocess
        ...
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Files stored as LFS objects (the Hub's default .gitattributes patterns, shortened), or anything > 10 MB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".png", ".ckpt", ".h5", ".msgpack", ".npy")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """sha256 for LFS files (what the client compares), git sha1 for regular ones."""
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    oid: str
    message: str
    parent: str | None
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if len(revision) >= 7:
            matches = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None


class HubError(Exception):
    """Raised inside a handler to answer with an HTTP error (and the Hub's X-Error-Code header)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class LocalHub:
    """The server's state plus its address; thread-safe (one lock around every request)."""

    def __init__(self, user: str = "tester", token: str | None = None) -> None:
        self.user = user
        self.token = token or "hf_test_" + secrets.token_hex(16)
        self.url = ""  # set once the server is listening
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._failures: dict[str, list] = {}  # kind -> [remaining (None = forever), status]
        self.lock = threading.RLock()

    # -- test knobs -------------------------------------------------------------------------------
    def fail(self, kind: str, times: int | None = 1, status: int = 503) -> None:
        """Answer the next `times` requests of `kind` (e.g. "commit", "preupload", "create", "lfs_put",
        "lfs_batch", "resolve", or "*" for all) with `status`; `times=None` fails until cleared."""
        with self.lock:
            self._failures[kind] = [times, status]

    def clear_failures(self) -> None:
        with self.lock:
            self._failures.clear()

    def count(self, kind: str, status: int | None = None) -> int:
        """How many requests of `kind` were answered (with `status`, if given)."""
        with self.lock:
            return sum(1 for _, k, s in self.requests if k == kind and (status is None or s == status))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision, as {path: content}."""
        with self.lock:
            commit = self.repos[repo_id].resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return {path: f.content for path, f in commit.files.items()}

    def history(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit messages of a branch, oldest first (the repo-creation commit included)."""
        with self.lock:
            repo = self.repos[repo_id]
            messages, commit = [], repo.resolve(revision)
            while commit is not None:
                messages.append(commit.message)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return messages[::-1]

    def all_stored_bytes(self) -> Iterator[tuple[str, bytes]]:
        """Every blob the server holds (all repos, commits, LFS objects): for leak checks."""
        with self.lock:
            for repo in self.repos.values():
                for commit in repo.commits.values():
                    yield f"{repo.repo_id}@{commit.oid[:8]}: commit message", commit.message.encode()
                    for path, f in commit.files.items():
                        yield f"{repo.repo_id}@{commit.oid[:8]}:{path}", f.content
            for oid, data in self.lfs_objects.items():
                yield f"lfs:{oid}", data

    def subprocess_env(self, hf_home: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a child process that talks to this server (offline mode off, xet off,
        a fresh HF cache)."""
        import os

        env = dict(os.environ if base is None else base)
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_TOKEN=self.token,
            HF_HUB_DISABLE_XET="1",
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        return env

    # -- internals --------------------------------------------------------------------------------
    def _take_failure(self, kind: str) -> int | None:
        with self.lock:
            for key in (kind, "*"):
                entry = self._failures.get(key)
                if entry is None:
                    continue
                remaining, status = entry
                if remaining is None:
                    return status
                if remaining > 0:
                    entry[0] -= 1
                    return status
            return None

    def _new_commit(self, repo: Repo, branch: str, message: str, files: dict[str, StoredFile]) -> Commit:
        parent = repo.branches.get(branch)
        oid = hashlib.sha1(
            f"{repo.repo_id}{branch}{message}{time.time_ns()}{secrets.token_hex(4)}".encode()
        ).hexdigest()
        commit = Commit(oid=oid, message=message, parent=parent, files=files)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(r"/api/repos/create"), "create"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)"), "branch"),
    ("GET", re.compile(rf"/api/models/{_REPO}/refs"), "refs"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "model_info"),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("PUT", re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})"), "lfs_put"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub  # set on the subclass built by `running_hub_server`

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - silence the default stderr log
        return

    # every method goes through one dispatcher
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        body = self._read_body() if method in ("POST", "PUT") else b""
        kind = "unknown"
        try:
            for route_method, pattern, route_kind in _ROUTES:
                match = pattern.fullmatch(split.path)
                if route_method == method and match:
                    kind = route_kind
                    break
            else:
                raise HubError(404, f"no route for {method} {split.path}")
            failure = hub._take_failure(kind)
            if failure is not None:
                raise HubError(failure, f"injected failure ({kind})")
            params = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            with hub.lock:
                status, headers, payload = getattr(self, f"_h_{kind}")(params, query, body, method)
        except HubError as err:
            status, payload = err.status, json.dumps({"error": err.message}).encode()
            headers = {"Content-Type": "application/json"}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.status == 401:
                headers["X-Error-Message"] = "Invalid credentials in Authorization header"
        with hub.lock:
            hub.requests.append((method, kind, status))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    # -- helpers ----------------------------------------------------------------------------------
    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        if write:
            self._require_auth()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, rev: str | None) -> Commit:
        commit = repo.resolve(rev or "main")
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    @staticmethod
    def _json(data, status: int = 200) -> tuple[int, dict, bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    # -- endpoints --------------------------------------------------------------------------------
    def _h_whoami(self, p, q, body, method):
        self._require_auth()
        return self._json(
            {
                "type": "user",
                "name": self.hub.user,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            }
        )

    def _h_create(self, p, q, body, method):
        self._require_auth()
        data = json.loads(body or b"{}")
        if data.get("type", "model") != "model":
            raise HubError(400, "this test server only hosts model repos")
        repo_id = f"{data.get('organization') or self.hub.user}/{data['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json({"error": "You already created this model repo", "url": url}, status=409)
        repo = Repo(repo_id=repo_id, private=data.get("visibility") == "private" or bool(data.get("private")))
        self.hub.repos[repo_id] = repo
        self.hub._new_commit(
            repo, "main", "initial commit", {".gitattributes": StoredFile(GITATTRIBUTES, False)}
        )
        return self._json({"url": url, "name": repo_id})

    def _h_validate_yaml(self, p, q, body, method):
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
        errors = []
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as err:
                errors.append({"message": f"invalid YAML: {err}"})
        if errors:
            return self._json({"errors": errors, "warnings": []}, status=400)
        return self._json({"errors": [], "warnings": []})

    def _h_preupload(self, p, q, body, method):
        repo = self._repo(p["repo"], write=True)
        commit = self._commit(repo, p["rev"])
        files = []
        for entry in json.loads(body)["files"]:
            path, size = entry["path"], entry["size"]
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
            existing = commit.files.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing is not None and existing.lfs == lfs else None,
                }
            )
        return self._json({"files": files, "commitOid": commit.oid})

    def _h_lfs_batch(self, p, q, body, method):
        self._repo(p["repo"], write=True)
        data = json.loads(body)
        if data.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        objects = []
        for obj in data["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        return (
            200,
            {"Content-Type": "application/vnd.git-lfs+json"},
            json.dumps({"objects": objects}).encode(),
        )

    def _h_lfs_put(self, p, q, body, method):
        if hashlib.sha256(body).hexdigest() != p["oid"]:
            raise HubError(400, "uploaded content does not match its sha256")
        self.hub.lfs_objects[p["oid"]] = body
        return 200, {}, b""

    def _h_commit(self, p, q, body, method):
        repo = self._repo(p["repo"], write=True)
        branch = p["rev"]
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[branch]].files)
        header = None
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent and not repo.branches[branch].startswith(parent):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = self.hub.lfs_objects.get(value["oid"])
                if content is None:
                    raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = StoredFile(content, lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [x for x in files if x.startswith(prefix)]:
                    del files[path]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        if header is None or not header.get("summary"):
            raise HubError(400, "the commit needs a header with a summary")
        commit = self.hub._new_commit(repo, branch, header["summary"], files)
        return self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            }
        )

    def _h_branch(self, p, q, body, method):
        repo = self._repo(p["repo"], write=True)
        if p["rev"] in repo.branches:
            raise HubError(409, f"Reference refs/heads/{p['rev']} already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[p["rev"]] = self._commit(repo, start).oid
        return self._json({})

    def _h_refs(self, p, q, body, method):
        repo = self._repo(p["repo"])
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()
        ]
        return self._json({"branches": branches, "converts": [], "tags": []})

    def _h_model_info(self, p, q, body, method):
        repo = self._repo(p["repo"])
        commit = self._commit(repo, p.get("rev"))
        return self._json(
            {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _h_tree(self, p, q, body, method):
        repo = self._repo(p["repo"])
        commit = self._commit(repo, p["rev"])
        base = (p.get("path") or "").strip("/")
        prefix = base + "/" if base else ""
        recursive = q.get("recursive", "false").lower() in ("1", "true")
        entries, dirs = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                f = commit.files[path]
                entry = {
                    "type": "file",
                    "path": path,
                    "size": len(f.content),
                    "oid": git_blob_sha1(f.content),
                }
                if f.lfs:
                    entry["lfs"] = {"oid": f.oid, "size": len(f.content), "pointerSize": 134}
                entries.append(entry)
        if base and not entries and not dirs:
            raise HubError(404, f"{base} does not exist on {p['rev']}", "EntryNotFound")
        entries += [
            {"type": "directory", "path": d, "size": 0, "oid": git_blob_sha1(d.encode())}
            for d in sorted(dirs)
        ]
        return self._json(entries)

    def _h_resolve(self, p, q, body, method):
        repo = self._repo(p["repo"])
        commit = self._commit(repo, p["rev"])
        f = commit.files.get(p["path"])
        if f is None:
            raise HubError(404, f"{p['path']} does not exist on {p['rev']}", "EntryNotFound")
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{f.oid}"',
            "Content-Length": str(len(f.content)),
            "Accept-Ranges": "bytes",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.oid}"'
            headers["X-Linked-Size"] = str(len(f.content))
        content = f.content
        range_header = self.headers.get("Range")
        if range_header and method == "GET":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(content) - 1
                content = content[start : end + 1]
                headers["Content-Length"] = str(len(content))
                headers["Content-Range"] = f"bytes {start}-{end}/{len(f.content)}"
                return 206, headers, content
        return 200, headers, content


@contextlib.contextmanager
def running_hub_server(user: str = "tester", token: str | None = None) -> Iterator[LocalHub]:
    """Start a local Hub on 127.0.0.1 (a free port) in a background thread; stop it on exit."""
    hub = LocalHub(user=user, token=token)
    handler = type("HubHandler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="local-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
