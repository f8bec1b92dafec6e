"""Pytest fixtures for tests that push to a local Hub (see hub_server.py).

- `local_hub`: a running LocalHub (url, token, failure knobs, stored files); use `hub.subprocess_env(dir)`
  for child processes (`twinlm push`, loading with from_pretrained).
- `hub_env`: the same server, with this process pointed at it: HF_TOKEN/HF_ENDPOINT set, and
  huggingface_hub's import-time constants patched (offline mode off, xet off, endpoint), so in-process
  `push_folder` / `BackgroundPusher` calls reach it.

Use them from a test module with `from conftest_hub import hub_env, local_hub  # noqa: F401`, or from
tests/conftest.py with `pytest_plugins = ["conftest_hub"]`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hub_server import LocalHub, running_hub_server


@pytest.fixture
def local_hub() -> Iterator[LocalHub]:
    with running_hub_server() as hub:
        yield hub


@pytest.fixture
def hub_env(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> LocalHub:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    monkeypatch.setenv("HF_ENDPOINT", local_hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", local_hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # no stray login file from the machine running the tests
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path_factory.mktemp("hf_home") / "token"))
    return local_hub
