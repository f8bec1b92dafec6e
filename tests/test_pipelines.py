"""transformers pipelines on saved twinlm checkpoints, in a fresh process that never imports twinlm:
fill-mask (masked LM), text-generation (causal LM), text-classification and token-classification
(models written by `twinlm finetune`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_finetune import build_checkpoint, seq_config, tok_config, write_entities, write_sentiment

SCRIPT = r"""
import json, sys
from transformers import pipeline

mlm, clm, cls, tag = sys.argv[1:5]
out = {}
fill = pipeline("fill-mask", model=mlm, trust_remote_code=True, top_k=3)
out["fill-mask"] = fill("the cat sees the [MASK] near the river")
gen = pipeline("text-generation", model=clm, trust_remote_code=True)
out["text-generation"] = gen("the dog likes", max_new_tokens=5, do_sample=False)
clf = pipeline("text-classification", model=cls, trust_remote_code=True)
out["text-classification"] = clf(["the red car excellent near the house", "a blue tree terrible with the dog"])
ner = pipeline("token-classification", model=tag, trust_remote_code=True)
out["token-classification"] = ner("john smith walks near paris")
out["twinlm_imported"] = any(name == "twinlm" or name.startswith("twinlm.") for name in sys.modules)
print("RESULT" + json.dumps(out, default=float))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from twinlm.finetune import finetune

    root = tmp_path_factory.mktemp("pipelines")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mlm = build_checkpoint(root / "mlm")
        clm = build_checkpoint(root / "clm", kind="bpe")
        # Long enough to learn the synthetic tasks, so the pipelines' answers can be checked.
        short = {"epochs": 5, "baseline": False, "early_stopping_patience": None}
        finetune(seq_config(mlm, write_sentiment(root / "s", 160, 20), root / "cls", **short))
        finetune(tok_config(mlm, write_entities(root / "e", 160, 20), root / "tag", **short))
    finally:
        torch.set_num_threads(threads)
    return {"mlm": mlm, "clm": clm, "cls": root / "cls" / "best", "tag": root / "tag" / "best"}


def test_four_pipelines_without_importing_twinlm(checkpoints, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *(str(checkpoints[k]) for k in ("mlm", "clm", "cls", "tag"))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["twinlm_imported"] is False  # the checkpoints' own code did the work

    fill = out["fill-mask"]
    assert len(fill) == 3 and all(isinstance(c["token_str"], str) and c["token_str"] for c in fill)
    assert all(0.0 <= c["score"] <= 1.0 for c in fill) and fill[0]["score"] >= fill[-1]["score"]
    assert all("[MASK]" not in c["sequence"] and c["sequence"].startswith("the cat sees the") for c in fill)

    text = out["text-generation"][0]["generated_text"]
    assert text.startswith("the dog likes") and len(text) > len("the dog likes")

    labels = out["text-classification"]
    assert [r["label"] for r in labels] == ["pos", "neg"]  # id2label was saved, the weights were loaded
    assert all(0.5 <= r["score"] <= 1.0 for r in labels)

    sentence = "john smith walks near paris"
    entities = out["token-classification"]  # "O" tokens are left out by the pipeline
    found = {sentence[e["start"] : e["end"]]: e["entity"] for e in entities}
    assert found == {"john": "B-PER", "smith": "I-PER", "paris": "B-LOC"}, entities
    assert all(e["word"] == sentence[e["start"] : e["end"]] and 0 < e["score"] <= 1 for e in entities)
