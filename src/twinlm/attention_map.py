"""`twinlm attention-map CHECKPOINT "a sentence"`: a PNG grid of attention weights, one panel per layer
and head, with the tokens on the axes (eager attention, so the weights are the ones the model used)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from twinlm.errors import TwinLMError


def attention_weights(checkpoint: str, text: str, max_tokens: int = 64) -> tuple[list[str], Any, int]:
    """(tokens, weights of shape (layers, heads, tokens, tokens), tokens of the whole text) for `text`
    under the checkpoint; the map covers the first `max_tokens` tokens."""
    import torch

    import twinlm
    from twinlm.model_folder import check_model_folder, load_error
    from twinlm.tokenization import auto_tokenizer

    check_model_folder(checkpoint, "checkpoint")
    try:
        tokenizer = auto_tokenizer(checkpoint)
    except (OSError, ValueError) as err:
        raise TwinLMError(
            f"{checkpoint!r} has no loadable tokenizer ({err.__class__.__name__}); save the tokenizer next to the "
            "model (tokenizer.save_pretrained(folder)), e.g. use a pretraining run's final/ folder"
        ) from None
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the body of a *ForMaskedLM/CausalLM folder: its head is not needed
    try:
        config = twinlm.TwinLMConfig.from_pretrained(checkpoint, attn_implementation="eager")
        model, info = twinlm.TwinLMModel.from_pretrained(checkpoint, config=config, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        raise load_error(err, checkpoint) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or []) + sorted(k[0] for k in info.get("mismatched_keys") or [])
    if missing:  # a map of randomly initialised weights would be a silent lie
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise TwinLMError(
            f"the weights in {checkpoint!r} do not fit its config.json ({len(missing)} missing or of another "
            f"shape: {shown}); save the model again"
        )
    model.eval()
    limit = min(max_tokens, config.max_position_embeddings)
    whole = len(tokenizer(text, verbose=False)["input_ids"])
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)["input_ids"]
    if ids.shape[1] == 0:
        raise TwinLMError("the sentence has no tokens; give some text")
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    return tokenizer.convert_ids_to_tokens(ids[0]), torch.stack([a[0] for a in attentions]), whole


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


IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def output_path(out: str) -> Path:
    """The image file to write: OUT itself (an image suffix), or OUT/attention_map.png for a folder."""
    from twinlm.fileio import check_writable_file

    path = Path(out)
    if path.is_dir() or out.endswith(("/", "\\")):
        path = path / "attention_map.png"
    elif path.suffix.lower() not in IMAGE_SUFFIXES:
        raise TwinLMError(
            f"--out {out!r}: give an image file ({', '.join(IMAGE_SUFFIXES)}) or an existing folder"
        )
    return check_writable_file(path, "--out")


def run(args: argparse.Namespace) -> int:
    from twinlm.fileio import atomic_file

    if args.max_tokens < 1:
        raise TwinLMError(f"--max-tokens {args.max_tokens} must be at least 1")
    out = output_path(args.out)
    tokens, weights, whole = attention_weights(args.checkpoint, args.text, args.max_tokens)
    if whole > len(tokens):
        print(
            f"note: the text has {whole} tokens; the map shows the first {len(tokens)} "
            "(--max-tokens, up to the model's max_position_embeddings)"
        )
    with atomic_file(out, "the attention map") as tmp:
        plot_attention(tokens, weights, tmp, f"{args.checkpoint}: {args.text[:60]!r}")
    layers, heads = weights.shape[:2]
    print(f"attention map: {layers} layers x {heads} heads over {len(tokens)} tokens -> {out}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "attention-map", help="plot attention weights per layer and head", description=__doc__
    )
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. outputs/tiny-clm/final")
    parser.add_argument("text", help="the sentence to look at")
    parser.add_argument(
        "--out", default="attention_map.png", help="image file or folder (default: %(default)s)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        help="tokens shown (the text is cut after; default: %(default)s)",
    )
    parser.set_defaults(func=run)
    return parser
