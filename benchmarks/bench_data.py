"""Data: tokenising + packing MB/s, and tokenizer training time, twinlm vs the libraries called directly.

- Packing: `twinlm.data.build_pretraining_datasets` (load, tokenise, pack into blocks) vs a run_clm-style
  pipeline (`datasets.load_dataset("text")`, `map(tokenizer)`, `map(group_texts)`), same text file, same
  tokenizer, same block size, one process each, a fresh datasets cache for every run (no cache hits).
- Tokenizer training: `twinlm.tokenization.train_tokenizer` vs `tokenizers` called directly with the same
  normaliser, pre-tokenizer, trainer settings and files.

    python benchmarks/bench_data.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

from common import Section, alternate, excerpt_texts, median, ratio, repeats, run_single

SEQ_LEN = 128


def write_excerpt(folder: Path, max_chars: int) -> tuple[Path, str]:
    """An excerpt of the corpus as one UTF-8 text file (paragraphs separated by blank lines)."""
    docs, where = excerpt_texts(max_chars)
    path = folder / "excerpt.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path, where


def twinlm_packing(path: Path, tokenizer: Any, scratch: Path) -> Callable[[], int]:
    from twinlm.data import DataConfig, build_pretraining_datasets

    def run() -> int:
        cache = tempfile.mkdtemp(dir=scratch)
        cfg = DataConfig(
            sources=[str(path)], seq_len=SEQ_LEN, validation_fraction=0.0, num_proc=1, cache_dir=cache
        )
        return len(build_pretraining_datasets(cfg, tokenizer, causal=True).train)

    return run


def run_clm_packing(path: Path, tokenizer: Any, scratch: Path) -> Callable[[], int]:
    """transformers' examples/pytorch/language-modeling/run_clm.py, its data part."""
    from datasets import load_dataset

    def group_texts(examples: dict[str, list]) -> dict[str, list]:
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // SEQ_LEN) * SEQ_LEN
        return {k: [t[i : i + SEQ_LEN] for i in range(0, total, SEQ_LEN)] for k, t in concatenated.items()}

    def run() -> int:
        cache = tempfile.mkdtemp(dir=scratch)
        raw = load_dataset("text", data_files=str(path), split="train", cache_dir=cache)
        tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
        return len(tokenized.map(group_texts, batched=True))

    return run


def direct_tokenizer(kind: str, files: list[str], vocab_size: int) -> Any:
    """The same tokenizer as twinlm's, built and trained with the `tokenizers` library alone."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            limit_alphabet=1000,
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=["<|endoftext|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    tok.train(files, trainer)
    return tok


def tokenizer_rows(path: Path, vocab_size: int, n: int) -> list[dict[str, Any]]:
    from twinlm.tokenization import train_tokenizer

    rows = []
    for kind in ("wordpiece", "bpe"):
        made: dict[str, Any] = {}

        def twin(kind: str = kind, made: dict = made) -> None:
            made["twin"] = train_tokenizer(kind, files=[path], vocab_size=vocab_size, show_progress=False)

        def direct(kind: str = kind, made: dict = made) -> None:
            made["direct"] = direct_tokenizer(kind, [str(path)], vocab_size)

        times = alternate({"direct": direct, "twin": twin}, repeats=n, warmup=0)
        # WordPiece breaks ties between equally frequent pairs in no fixed order: the last few tokens of two
        # trainings (even of the same library twice) may differ, so the share of tokens in common is reported
        twin_set, direct_set = set(made["twin"].get_vocab()), set(made["direct"].get_vocab())
        shared = len(twin_set & direct_set) / len(twin_set | direct_set)
        rows.append(
            {
                "what": f"train {kind} tokenizer, vocab {vocab_size}",
                "reference": f"{median(times['direct']):.2f} s (tokenizers directly)",
                "twinlm": f"{median(times['twin']):.2f} s",
                "twinlm / reference (speed)": ratio(median(times["direct"]), median(times["twin"])),
                "tokens in common": round(shared, 4),
            }
        )
    return rows


def run(args: argparse.Namespace) -> Section:
    from twinlm.tokenization import train_tokenizer

    n = repeats(args, 3)
    max_chars = 200_000 if args.quick else 5_000_000
    vocab_size = 1000 if args.quick else 8000
    with tempfile.TemporaryDirectory(prefix="twinlm-bench-data-") as tmp:
        scratch = Path(tmp)
        path, where = write_excerpt(scratch, max_chars)
        megabytes = path.stat().st_size / 1e6
        tokenizer = train_tokenizer("bpe", files=[path], vocab_size=vocab_size, show_progress=False)
        times = alternate(
            {
                "ref": run_clm_packing(path, tokenizer, scratch),
                "twin": twinlm_packing(path, tokenizer, scratch),
            },
            repeats=n,
            warmup=1,
        )
        ref_mbs, twin_mbs = megabytes / median(times["ref"]), megabytes / median(times["twin"])
        rows = [
            {
                "what": f"tokenise + pack {megabytes:.1f} MB into blocks of {SEQ_LEN} (BPE)",
                "reference": f"{ref_mbs:.2f} MB/s (run_clm-style datasets.map)",
                "twinlm": f"{twin_mbs:.2f} MB/s (build_pretraining_datasets)",
                "twinlm / reference (speed)": ratio(twin_mbs, ref_mbs),
                "tokens in common": None,
            }
        ]
        rows += tokenizer_rows(path, vocab_size, n)
    headline = [{"benchmark": r["what"], "twinlm / reference": r["twinlm / reference (speed)"]} for r in rows]
    notes = [
        f"text: {megabytes:.1f} MB excerpt of {where}",
        "packing: one process on both sides, a fresh datasets cache directory for every run (load + tokenise "
        "+ pack, nothing reused); twinlm also restarts position ids at document starts",
        "tokenizer training: both sides read the same file; tokens in common = the share of the two vocabularies' tokens they hold both (WordPiece orders tied pairs in no fixed way: its last tokens may differ between any two trainings)",
    ]
    return Section("data", "Data pipeline and tokenizer training", rows, notes, headline)


def main(argv: list[str] | None = None) -> int:
    return run_single(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
