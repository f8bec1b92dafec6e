"""`make demo` end to end, with a handful of steps: both tokenizers, both pretraining runs, the
fill-mask and text-generation pipelines and the summary."""

from __future__ import annotations

import json

from twinlm.demo import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["--steps", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "=== twinlm demo: summary ===" in out
    for objective in ("masked-lm", "causal-lm"):
        summary = json.loads((tmp_path / objective / "summary.json").read_text())
        assert summary["steps"] == 4
        assert summary["initial_val_ppl"] > summary["val_ppl"] > 1  # four steps already help
        assert (tmp_path / objective / "final" / "model.safetensors").is_file()
        assert f"{objective:10s}" in out
    assert "fill-mask  'The function returns a [MASK] of strings.'" in out
    assert "generate   " in out and "The module provides" in out.split("generate   ")[1]
