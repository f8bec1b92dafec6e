"""`twinlm attention-map CHECKPOINT "a sentence"`: a PNG grid of attention weights, one panel per layer
and head, with the tokens on the axes (eager attention, so the weights are the ones the model used)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from twinlm.errors import TwinLMError


def attention_weights(checkpoint: str, text: str) -> tuple[list[str], Any]:
    """(tokens, weights of shape (layers, heads, tokens, tokens)) for `text` under the checkpoint."""
    import torch
    from transformers import AutoTokenizer

    import twinlm

    if not (Path(checkpoint) / "config.json").is_file():
        raise TwinLMError(f"{checkpoint!r} has no config.json; give a folder written by save_pretrained")
    config = twinlm.TwinLMConfig.from_pretrained(checkpoint, attn_implementation="eager")
    model = twinlm.TwinLMModel.from_pretrained(checkpoint, config=config).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        raise TwinLMError(
            f"{checkpoint!r} has no loadable tokenizer ({err.__class__.__name__}); save the tokenizer next to the "
            "model (tokenizer.save_pretrained(folder)), e.g. use a pretraining run's final/ folder"
        ) from None
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=64)["input_ids"]
    if ids.shape[1] == 0:
        raise TwinLMError("the sentence has no tokens; give some text")
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    return tokenizer.convert_ids_to_tokens(ids[0]), torch.stack([a[0] for a in attentions])


def plot_attention(tokens: list[str], weights: Any, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = weights.shape[:2]
    size = max(2.0, 0.18 * len(tokens))
    fig, axes = plt.subplots(layers, heads, figsize=(size * heads, size * layers), squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
            ax.set_title(f"layer {layer} head {head}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    tokens, weights = attention_weights(args.checkpoint, args.text)
    out = Path(args.out)
    plot_attention(tokens, weights, out, f"{args.checkpoint}: {args.text[:60]!r}")
    layers, heads = weights.shape[:2]
    print(f"attention map: {layers} layers x {heads} heads over {len(tokens)} tokens -> {out}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "attention-map", help="plot attention weights per layer and head", description=__doc__
    )
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. outputs/tiny-clm/final")
    parser.add_argument("text", help="the sentence to look at")
    parser.add_argument("--out", default="attention_map.png", help="PNG path (default: %(default)s)")
    parser.set_defaults(func=run)
    return parser
