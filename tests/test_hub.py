"""Hub publishing against a local Hub-compatible server (tests/hub_server.py): push, load back, retries,
failures that must not stop training, the model card, and the `twinlm push` command."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest_hub import hub_env, local_hub  # noqa: F401 - fixtures
from huggingface_hub import ModelCard

from twinlm.cli import main as cli_main
from twinlm.errors import TwinLMError
from twinlm.hub import BackgroundPusher, HubPushError, push_folder
from twinlm.model_card import LOSS_CURVE_FILE, write_model_card

# huggingface_hub's own LFS PUT passes a file object as `data=`, which httpx2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
LOSS_HISTORY = [(step, 5.0 / (1 + 0.1 * step)) for step in range(0, 200, 10)]

# Runs in a fresh interpreter that never imports twinlm: the model class must come from the pushed code.
LOAD_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
repo_id, ids_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=torch.load(ids_path)).logits
torch.save(logits, out_path)
assert not any(name == "twinlm" or name.startswith("twinlm.") for name in sys.modules), "twinlm was imported"
print("CLASS", type(model).__module__, type(model).__name__)
"""

# Loads revision step-2 and main of a repo: {revision: the word-embedding matrix}.
REVISION_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
repo_id, out_path = sys.argv[1:3]
weights = {}
for revision in ("step-2", "main"):
    model = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, trust_remote_code=True)
    weights[revision] = model.get_input_embeddings().weight.detach().clone()
torch.save(weights, out_path)
"""


def _save_tiny_model(folder: Path):
    """A tiny twinlm causal LM saved with its code (auto_map), plus fixed inputs and its logits."""
    import torch

    from twinlm import TwinLMConfig, TwinLMForCausalLM

    torch.manual_seed(0)
    config = TwinLMConfig.from_preset("tiny-modern-decoder", vocab_size=128)
    model = TwinLMForCausalLM(config).eval()
    model.save_pretrained(folder)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return ids, logits


def _write_checkpoint(folder: Path, step: int) -> None:
    """A small fake checkpoint: model export files plus training state that must not be pushed."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["TwinLMForCausalLM"], "model_type": "twinlm", "is_causal": True, "step": step}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(_tiny_safetensors(step))
    (folder / "optimizer.bin").write_bytes(b"optimizer state %d" % step)
    (folder / "random_states_0.pkl").write_bytes(b"rng %d" % step)


def _tiny_safetensors(step: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    import struct

    return struct.pack("<Q", len(header)) + header + struct.pack("<2f", float(step), 1.0)


def _assert_token_absent(token: str, *, folders=(), texts=(), blobs=()) -> None:
    needle = token.encode()
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes(), f"token leaked into {path}"
    for text in texts:
        assert token not in text, "token leaked into output"
    for name, data in blobs:
        assert needle not in data, f"token leaked into the pushed {name}"


def test_push_cli_then_load_by_repo_id_in_fresh_process(local_hub, tmp_path):  # noqa: F811
    import torch

    model_dir = tmp_path / "run" / "final"
    ids, logits = _save_tiny_model(model_dir)
    torch.save(ids, tmp_path / "ids.pt")
    (model_dir / "training_info.json").write_text(
        json.dumps({"training_summary": {"steps": 190, "tokens": 12345}, "loss_history": LOSS_HISTORY})
    )
    (model_dir / "optimizer.bin").write_bytes(b"not for users")
    env = local_hub.subprocess_env(tmp_path / "hf_push")
    repo_id = f"{local_hub.user}/tiny-twin"

    start = time.perf_counter()
    push = subprocess.run(
        [sys.executable, "-m", "twinlm", "push", str(model_dir), repo_id, "--message", "first model"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    push_seconds = time.perf_counter() - start
    assert push.returncode == 0, push.stderr[-3000:]
    assert f"{local_hub.url}/{repo_id}/commit/" in push.stdout

    files = local_hub.files(repo_id)
    assert {"config.json", "model.safetensors", "README.md", LOSS_CURVE_FILE} <= set(files)
    assert "optimizer.bin" not in files  # training state stays local by default
    assert any(name.endswith(".py") for name in files), "the model code must ship for trust_remote_code"
    assert files[LOSS_CURVE_FILE].startswith(b"\x89PNG")
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert f"]({LOSS_CURVE_FILE})" in card.text

    start = time.perf_counter()
    load = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, repo_id, str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        env=local_hub.subprocess_env(tmp_path / "hf_load"),  # empty cache: everything comes from the server
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    load_seconds = time.perf_counter() - start
    assert load.returncode == 0, load.stderr[-3000:]
    assert "CLASS transformers_modules" in load.stdout  # the class came from the pushed remote code
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, rtol=1e-5, atol=1e-5)
    print(f"push {push_seconds:.1f} s, load {load_seconds:.1f} s")

    _assert_token_absent(
        local_hub.token,
        folders=[tmp_path],
        texts=[push.stdout, push.stderr, load.stdout, load.stderr],
        blobs=local_hub.all_stored_bytes(),
    )


def test_model_card_metadata_and_loss_curve(tmp_path):
    config = {
        "architectures": ["TwinLMForMaskedLM"],
        "model_type": "twinlm",
        "auto_map": {"AutoModelForMaskedLM": "modeling_twinlm.TwinLMForMaskedLM"},
        "is_causal": False,
        "position_embedding_type": "rope",
        "norm_type": "rmsnorm",
        "norm_position": "pre",
        "hidden_act": "swiglu",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "vocab_size": 512,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(_tiny_safetensors(3))
    path = write_model_card(
        tmp_path,
        training_summary={"steps": 190, "learning_rate": 3e-4},
        loss_history=LOSS_HISTORY,
        datasets=["wikitext"],
        metrics={"perplexity": 12.5},
        repo_id="tester/tiny-bert",
    )
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "fill-mask"
    assert {"twinlm", "masked-lm", "custom_code"} <= set(data["tags"])
    assert data["datasets"] == ["wikitext"]
    assert data["metrics"] == ["perplexity"]
    result = data["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "perplexity", "value": 12.5}
    for needle in ("| position_embedding_type | `rope` |", "| norm_type | `rmsnorm` |", "| parameters | 2 |"):
        assert needle in card.text
    assert "AutoModelForMaskedLM.from_pretrained" in card.text and "trust_remote_code=True" in card.text
    assert "Final training loss 0.2500 at step 190" in card.text
    png = tmp_path / LOSS_CURVE_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # classification heads map to their pipeline tags
    config["architectures"] = ["TwinLMForTokenClassification"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelCard.load(write_model_card(tmp_path)).data.pipeline_tag == "token-classification"


def test_transient_errors_are_retried_and_revisions_are_branches(hub_env, tmp_path):  # noqa: F811
    hub = hub_env
    folder = tmp_path / "ckpt"
    _write_checkpoint(folder, step=1)
    hub.fail("commit", times=2, status=503)
    url = push_folder(folder, "tester/retry", commit_message="step 1", retry_wait=0.01)
    assert url.startswith(f"{hub.url}/tester/retry/commit/")
    assert hub.count("commit", 503) == 2 and hub.count("commit", 200) == 1
    assert json.loads(hub.files("tester/retry")["config.json"])["step"] == 1

    _write_checkpoint(folder, step=2)
    push_folder(folder, "tester/retry", revision="step-2", retry_wait=0.01, include_training_state=True)
    branch, main = hub.files("tester/retry", "step-2"), hub.files("tester/retry", "main")
    assert json.loads(branch["config.json"])["step"] == 2 and json.loads(main["config.json"])["step"] == 1
    assert "optimizer.bin" in branch and "optimizer.bin" not in main  # training state only when asked

    hub.fail("commit", times=None, status=502)
    with pytest.raises(HubPushError, match=r"after 3 attempts.*HTTP 502"):
        push_folder(folder, "tester/retry", max_retries=2, retry_wait=0.01)
    assert hub.count("commit", 502) == 3  # the first try and two retries


def test_bad_token_and_missing_token_fail_clearly(hub_env, tmp_path, monkeypatch):  # noqa: F811
    folder = tmp_path / "ckpt"
    _write_checkpoint(folder, step=1)
    with pytest.raises(HubPushError, match="HTTP 401") as err:
        push_folder(folder, "tester/auth", token="hf_wrong_token_value", retry_wait=0.01)
    assert "hf_wrong_token_value" not in str(err.value)
    assert hub_env.count("create", 401) == 1  # not retried: not transient
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        push_folder(folder, "tester/auth")


def test_background_push_failing_part_way_does_not_stop_training(hub_env, tmp_path, caplog, capsys):  # noqa: F811
    hub = hub_env
    ckpt = tmp_path / "output" / "checkpoint"
    caplog.set_level(logging.INFO)
    pusher = BackgroundPusher("tester/bg", retry_wait=0.01, max_retries=2)
    for step in range(1, 5):
        if step == 3:  # the Hub goes down for good after two successful pushes
            assert pusher.wait(timeout=60)
            hub.fail("commit", times=None, status=500)
        _write_checkpoint(ckpt, step)
        start = time.perf_counter()
        pusher.submit(ckpt, f"step {step}")
        assert time.perf_counter() - start < 1.0, "submit must not wait for the upload"
        # the training loop rotates the checkpoint right away: the push must use the submitted snapshot
        for path in ckpt.iterdir():
            path.unlink()
    results = pusher.close()

    assert [r.ok for r in results] == [True, True, False, False]
    assert pusher.failures == results[2:]
    assert all("HTTP 500" in r.error for r in pusher.failures)
    files = hub.files("tester/bg")
    assert json.loads(files["config.json"])["step"] == 2  # the last push that went through
    assert files["model.safetensors"] == _tiny_safetensors(2)
    assert "optimizer.bin" not in files and "random_states_0.pkl" not in files
    assert "README.md" in files  # each push carries a model card
    assert any("failed (training continues)" in rec.getMessage() for rec in caplog.records)
    captured = capsys.readouterr()
    _assert_token_absent(
        hub.token,
        folders=[tmp_path],
        texts=[caplog.text, captured.out, captured.err, repr(pusher), *(str(r) for r in results)],
        blobs=hub.all_stored_bytes(),
    )


def test_background_pusher_is_silent_on_other_ranks(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    pusher = BackgroundPusher("tester/never")
    pusher.submit(tmp_path, "ignored")
    assert not pusher.enabled and pusher.close() == []


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "has no config.json"),
        (lambda p: (p / "final").mkdir() or p, "nor a final/ or best/ folder with one"),
    ],
)
def test_push_cli_rejects_bad_folders(tmp_path, capsys, make, expected):
    code = cli_main(["push", str(make(tmp_path)), "tester/x"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("twinlm push: error:") and expected in err


def test_push_cli_rejects_bad_repo_id(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert cli_main(["push", str(tmp_path), "not a/valid/repo"]) == 2
    assert "invalid repo id" in capsys.readouterr().err


# -- pushing as training goes, and `twinlm push` of run folders ------------------------------------
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


@pytest.fixture(scope="module")
def tiny_run_assets(tmp_path_factory) -> dict[str, Path]:
    """An excerpt of the shared corpus and a 384-token BPE tokenizer trained on it (about a second)."""
    if not (CORPUS / "tinyshakespeare.txt").is_file():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    from twinlm.tokenization import train_tokenizer

    base = tmp_path_factory.mktemp("hub_run")
    excerpt = base / "excerpt.txt"
    excerpt.write_text((CORPUS / "tinyshakespeare.txt").read_text(encoding="utf-8")[:40_000])
    train_tokenizer(
        "bpe", files=[excerpt], vocab_size=384, out_dir=base / "bpe", model_max_length=64, show_progress=False
    )
    return {"excerpt": excerpt, "tokenizer": base / "bpe", "cache": base / "cache"}


def _tiny_run(assets: dict[str, Path], out: Path) -> dict:
    return {
        "model": {
            "preset": "tiny-gpt2-small",
            "overrides": {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            },
        },
        "tokenizer": {"path": str(assets["tokenizer"])},
        "data": {
            "sources": [str(assets["excerpt"])],
            "seq_len": 32,
            "validation_size": 8,
            "cache_dir": str(assets["cache"]),
            "num_proc": 1,
        },
        "training": {"batch_size": 4, "max_steps": 4, "save_every": 2, "eval_every": 0, "log_every": 1},
        "output_dir": str(out),
    }


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_pretraining_pushes_checkpoints_as_it_goes_then_the_final_model(
    hub_env,  # noqa: F811
    tiny_run_assets,
    tmp_path,
    capsys,
):
    from twinlm.training import pretrain

    hub, repo_id = hub_env, "tester/tiny-run"
    run_dir = tmp_path / "run"
    summary = pretrain(_tiny_run(tiny_run_assets, run_dir), ["hub.push=true", f"hub.repo_id={repo_id}"])

    # push: true alone pushes each checkpoint (steps 2 and 4) in the background, then the final model
    assert summary["hub_pushes"] == summary["hub_pushes_ok"] == 3
    messages = hub.history(repo_id)[1:]  # after the repo-creation commit
    assert messages == [
        "twinlm pretraining: checkpoint at step 2",
        "twinlm pretraining: checkpoint at step 4",
        "twinlm pretraining: step 4",
    ]
    files = hub.files(repo_id)
    final = run_dir / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert files[name] == (final / name).read_bytes(), f"{name} on the Hub differs from final/"
    assert any(name.endswith(".py") for name in files), "the model code must ship for trust_remote_code"
    assert not any(name.startswith(("optimizer", "random_states")) for name in files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "text-generation" and repo_id in card.text
    assert "at step 4" in card.text  # the card carries the final training summary
    assert "hub          3 of 3 pushes" in capsys.readouterr().out
    assert not (run_dir / "hub-snapshot").exists(), "no second copy of the model is left in the run"

    # `twinlm push RUN_DIR` finds the run's final/ model; the run folder is left exactly as it was
    before = _tree(run_dir)
    assert cli_main(["push", str(run_dir), "tester/from-run-dir", "--message", "from the run dir"]) == 0
    out = capsys.readouterr().out
    assert "is a pretraining run: pushing its model in" in out and str(final) in out
    assert hub.history("tester/from-run-dir")[-1] == "from the run dir"
    pushed = hub.files("tester/from-run-dir")
    assert pushed["model.safetensors"] == (final / "model.safetensors").read_bytes()
    assert "README.md" in pushed and LOSS_CURVE_FILE in pushed  # generated into the upload only
    assert _tree(run_dir) == before, "twinlm push must not write into the user's folder"
    assert not (final / "README.md").exists()


def test_checkpoints_as_hub_revisions_load_with_from_pretrained_revision(
    hub_env,  # noqa: F811
    tiny_run_assets,
    tmp_path,
    capsys,
):
    """hub.checkpoint_revision='step-{step}': each checkpoint on its own branch (what Pythia and OLMo
    publish), loadable with from_pretrained(repo, revision='step-2'); the final model on main."""
    import torch
    from safetensors.torch import load_file

    from twinlm.training import pretrain

    hub, repo_id = hub_env, "tester/revisions"
    overrides = ["hub.push=true", f"hub.repo_id={repo_id}", "hub.checkpoint_revision=step-{step}"]
    run_dir = tmp_path / "run"
    summary = pretrain(_tiny_run(tiny_run_assets, run_dir), [*overrides, "training.keep_last=2"])
    assert summary["hub_revisions"] == ["step-2", "step-4", "main"]
    assert "(checkpoints as revisions step-2, step-4)" in capsys.readouterr().out
    assert hub.history(repo_id, "step-2")[-1] == "twinlm pretraining: checkpoint at step 2"
    assert hub.history(repo_id, "step-4")[-1] == "twinlm pretraining: checkpoint at step 4"
    assert hub.history(repo_id)[1:] == ["twinlm pretraining: step 4"], "main holds the final model only"

    # The checkpoint of step 2 on the Hub is the model of the local checkpoint-2 (not the final one), loaded
    # by a fresh process with an empty cache: everything comes from the server
    load = subprocess.run(
        [sys.executable, "-c", REVISION_SCRIPT, repo_id, str(tmp_path / "loaded.pt")],
        env=hub.subprocess_env(tmp_path / "hf_load"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert load.returncode == 0, load.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    name = "model.embeddings.word_embeddings.weight"
    local = load_file(run_dir / "checkpoints" / "checkpoint-2" / "model.safetensors")[name].float()
    torch.testing.assert_close(loaded["step-2"], local)
    assert not torch.equal(loaded["step-2"], loaded["main"]), "revision step-2 loaded the final model"

    # Continued pretraining from that revision with the shipped config (its tokenizer comes along), by a fresh
    # process reaching the Hub server
    root = Path(__file__).resolve().parents[1]
    cont = tmp_path / "continued"
    run = subprocess.run(
        [
            sys.executable, "-m", "twinlm", "pretrain", "-c", str(root / "configs/pretrain/continue-clm.yaml"),
            f"model.from_pretrained={repo_id}", "model.revision=step-2",
            f"data.sources=[{tiny_run_assets['excerpt']}]", "data.seq_len=32", "data.validation_fraction=0.1",
            "training.max_steps=2", "training.batch_size=4", "training.eval_every=0", "training.save_every=0",
            "training.eval_on_start=false", f"output_dir={cont}",
        ],
        env=hub.subprocess_env(tmp_path / "hf_continue"), capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((cont / "summary.json").read_text())["steps"] == 2
    pushed_tokenizer = hub.files(repo_id, "step-2")["tokenizer.json"]
    assert (cont / "final" / "tokenizer.json").read_bytes() == pushed_tokenizer

    # A template that cannot name one branch per checkpoint is refused before anything trains
    for template, expected in (
        ("ckpt", "has no {step}"),
        ("step {step}", "not a branch name"),
        ("epoch-{epoch}", "only {step}"),
        ("step-{step[0]}", "only {step}"),
        ("a//{step}", "not a branch name"),
        ("step-{step}.", "not a branch name"),
        ("x/.{step}", "not a branch name"),
        ("a.lock/{step}", "not a branch name"),
        ("refs/pr/{step}", "not a branch name"),
    ):
        with pytest.raises(TwinLMError, match=re.escape(expected)):
            pretrain(
                _tiny_run(tiny_run_assets, tmp_path / "bad"),
                [*overrides[:2], f"hub.checkpoint_revision={template}"],
            )
    with pytest.raises(TwinLMError, match="push_checkpoints is false: no checkpoint is pushed"):
        pretrain(_tiny_run(tiny_run_assets, tmp_path / "bad"), [*overrides, "hub.push_checkpoints=false"])
    assert not (tmp_path / "bad").exists()


def test_push_checkpoints_false_pushes_only_the_final_model(hub_env, tiny_run_assets, tmp_path):  # noqa: F811
    from twinlm.training import pretrain

    overrides = ["hub.push=true", "hub.repo_id=tester/final-only", "hub.push_checkpoints=false"]
    summary = pretrain(_tiny_run(tiny_run_assets, tmp_path / "run"), overrides)
    assert summary["hub_pushes"] == 1
    assert hub_env.history("tester/final-only")[1:] == ["twinlm pretraining: step 4"]


def test_push_cli_offline_or_without_token_writes_nothing(local_hub, tmp_path, capsys, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    model_dir = tmp_path / "model"
    _write_checkpoint(model_dir, step=1)
    before = _tree(model_dir)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    assert cli_main(["push", str(model_dir), "tester/offline"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", local_hub.url)
    monkeypatch.delenv("HF_TOKEN")
    assert cli_main(["push", str(model_dir), "tester/no-token"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert _tree(model_dir) == before, "a push that cannot happen must leave the folder untouched"
    assert local_hub.repos == {}


def test_push_keeps_your_own_card_and_finds_fine_tuning_best(hub_env, tmp_path, capsys):  # noqa: F811
    # a README.md of your own goes up as it is
    own = tmp_path / "own"
    _write_checkpoint(own, step=3)
    (own / "README.md").write_text("# my own card\n")
    push_folder(own, "tester/own-card")
    assert hub_env.files("tester/own-card")["README.md"] == b"# my own card\n"
    assert (own / "README.md").read_text() == "# my own card\n"

    # a fine-tuning output folder: its best/ model is pushed, with a card generated into the upload
    ft = tmp_path / "ft"
    _write_checkpoint(ft / "best", step=7)
    (ft / "metrics.json").write_text("{}")
    before = _tree(ft)
    assert cli_main(["push", str(ft), "tester/ft"]) == 0
    assert "is a fine-tuning run: pushing its model in" in capsys.readouterr().out
    files = hub_env.files("tester/ft")
    assert json.loads(files["config.json"])["step"] == 7 and "README.md" in files
    assert "metrics.json" not in files and "optimizer.bin" not in files
    assert _tree(ft) == before


@pytest.fixture
def fast_hub_backoff(monkeypatch):
    """huggingface_hub's own retry loop (`http_backoff`: 5 retries, waits 1..8 s) with millisecond waits.

    Its waits are keyword defaults, not constants or environment settings, so they are patched there.
    """
    from huggingface_hub.utils import _http

    for fn in (_http.http_backoff, _http._http_backoff_base):
        monkeypatch.setitem(fn.__kwdefaults__, "base_wait_time", 0.001)
        monkeypatch.setitem(fn.__kwdefaults__, "max_wait_time", 0.002)
    return _http.http_backoff.__kwdefaults__["max_retries"]


@pytest.mark.parametrize("kind", ["lfs_batch", "lfs_put", "preupload"])
def test_one_layer_of_retries_against_a_dead_endpoint(hub_env, tmp_path, fast_hub_backoff, kind):  # noqa: F811
    """Calls huggingface_hub retries itself are not retried again by twinlm (it was 36 requests)."""
    folder = tmp_path / "ckpt"
    _write_checkpoint(folder, step=1)
    hub_env.fail(kind, times=None, status=502)
    with pytest.raises(HubPushError, match="failed after huggingface_hub's retries"):
        push_folder(folder, "tester/dead", retry_wait=0.001)
    assert hub_env.count(kind, 502) == 1 + fast_hub_backoff  # huggingface_hub's tries only: 6
    hub_env.fail("create", times=None, status=503)  # sent once by huggingface_hub: twinlm retries it
    with pytest.raises(HubPushError, match="after 3 attempts"):
        push_folder(folder, "tester/dead", max_retries=2, retry_wait=0.001)
    assert hub_env.count("create", 503) == 3
