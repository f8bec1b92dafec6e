"""`import twinlm` and every `twinlm ... --help` stay light: no torch, transformers or accelerate.

Checked on sys.modules in a fresh interpreter (not on wall time, which depends on the machine), plus the
Auto-class registration that `import twinlm` must still provide without importing torch up front.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from twinlm.cli import COMMANDS

HEAVY = ("torch", "transformers", "accelerate", "datasets", "deepspeed", "wandb")

_HELP_RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from twinlm.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(sys.argv[1:])
            code = 0
        except SystemExit as exit:
            code = exit.code
    heavy = [m for m in {heavy!r} if m in sys.modules]
    print(json.dumps({{"code": code, "heavy": heavy, "help": out.getvalue()}}))
    """
).format(heavy=HEAVY)


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_import_twinlm_imports_no_torch() -> None:
    proc = _python(f"import sys, twinlm; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [["--help"], *[[name, "--help"] for name in COMMANDS], ["tokenizer", "train", "--help"]],
    ids=lambda argv: " ".join(argv),
)
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    proc = _python(_HELP_RUNNER, *argv)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert result["heavy"] == [], f"`twinlm {' '.join(argv)}` imported {result['heavy']}"
    assert "usage: twinlm" in result["help"]


def test_auto_classes_know_twinlm_once_its_model_package_is_imported(tmp_path) -> None:
    code = textwrap.dedent(
        """
        import sys
        import twinlm
        assert "torch" not in sys.modules  # import twinlm is light
        import twinlm.model  # registers with the Auto classes (their public register calls)
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        config = AutoConfig.for_model("twinlm", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, is_causal=True)
        assert type(config) is twinlm.TwinLMConfig, type(config)
        assert type(AutoModel.from_config(config)) is twinlm.TwinLMModel
        twinlm.TwinLMForCausalLM(config).save_pretrained(sys.argv[1])
        """
    )
    proc = _python(code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for copied in tmp_path.glob("*.py"):  # no remote code: the registration must do it
        copied.unlink()
    load = textwrap.dedent(
        """
        import sys
        import twinlm.model
        from transformers import AutoModelForCausalLM
        print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)
        """
    )
    proc = _python(load, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "TwinLMForCausalLM"


def test_training_package_exports_resolve():
    import twinlm.training as training

    for name in training.__all__:
        assert getattr(training, name) is not None, name
    assert not hasattr(training, "Trainer")  # the name transformers.Trainer owns is not reused
