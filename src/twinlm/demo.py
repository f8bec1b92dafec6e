"""`make demo`: the main job end to end on the embedded default corpus, in a few minutes on a CPU.

Trains a WordPiece and a byte-level BPE tokenizer, pretrains a tiny masked-LM and a tiny causal model
(validation perplexity before and after), then fills a mask and generates text with the saved models
through transformers pipelines.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from twinlm.errors import TwinLMError

REPO = Path(__file__).resolve().parents[2]
RUNS = {"masked-lm": "tiny-mlm.yaml", "causal-lm": "tiny-clm.yaml"}


def run_config(name: str) -> Path:
    path = REPO / "configs" / "pretrain" / name
    if not path.is_file():
        raise TwinLMError(f"{path} not found: run the demo from a twinlm source checkout (make demo)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twinlm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="where runs are written (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=600, help="optimizer steps per model (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    from transformers import pipeline, set_seed

    from twinlm.training import pretrain

    start = time.perf_counter()
    out = Path(args.out)
    summaries = {}
    for objective, config in RUNS.items():
        print(f"\n=== {objective}: train a tokenizer, then pretrain {config} on the embedded corpus ===")
        summaries[objective] = pretrain(
            run_config(config),
            [
                f"output_dir={out / objective}",
                f"training.max_steps={args.steps}",
                "training.eval_on_start=true",
            ],
        )

    mlm_dir, clm_dir = summaries["masked-lm"]["final_model"], summaries["causal-lm"]["final_model"]
    fill = pipeline("fill-mask", model=mlm_dir, trust_remote_code=True)
    masked = f"The function returns a {fill.tokenizer.mask_token} of strings."
    fills = fill(masked, top_k=5)
    generate = pipeline("text-generation", model=clm_dir, trust_remote_code=True)
    prompt = "The module provides"
    set_seed(0)  # sampled (top-k), but the same sample on every run
    sample = generate(prompt, max_new_tokens=40, do_sample=True, top_k=40, temperature=0.8)[0][
        "generated_text"
    ]

    print("\n=== twinlm demo: summary ===")
    for objective, summary in summaries.items():
        print(
            f"{objective:10s} {summary['parameters'] / 1e6:.2f}M parameters, {summary['steps']} steps, "
            f"validation perplexity {summary['initial_val_ppl']:.1f} before -> {summary['val_ppl']:.1f} after "
            f"({summary['tokens_per_s']:,.0f} tokens/s)"
        )
    print(f"fill-mask  {masked!r}")
    print("           " + ", ".join(f"{f['token_str']!r} ({f['score']:.3f})" for f in fills))
    print(f"generate   {sample!r}")
    print(f"written    {mlm_dir} (masked-LM), {clm_dir} (causal LM); tokenizers, checkpoints, metrics and")
    print(f"           loss curves under {out}/")
    print(
        "load with  AutoModelForMaskedLM / AutoModelForCausalLM .from_pretrained(DIR, trust_remote_code=True)"
    )
    print(f"wall time  {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except TwinLMError as err:
        print(f"twinlm demo: error: {err}", file=sys.stderr)
        sys.exit(2)
