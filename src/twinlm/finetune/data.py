"""Task datasets: read labelled examples from CSV/TSV/JSON/CoNLL files or a Hub dataset, check them, and
turn them into model inputs.

Every problem with the input (a missing file or column, an empty split, a label the train split never
saw, a malformed CoNLL line) is a `TwinLMError` naming the file (or Hub split) and the column or line.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from twinlm.data.textfiles import check_text_files
from twinlm.errors import TwinLMError
from twinlm.finetune.config import SPLITS, TaskSection

csv.field_size_limit(2**31 - 1)


@dataclass
class Split:
    """One split of a task: `texts` (and `pairs`) with `labels` for sequence classification, or `words`
    with `tags` (one list per sentence) for token classification. `source` names it in messages."""

    name: str
    source: str
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    labels: list[str] = field(default_factory=list)
    words: list[list[str]] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels) if self.labels else len(self.tags)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def _format_of(path: Path, given: str | None) -> str:
    if given is not None:
        return given
    suffix = path.suffix.lower()
    formats = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".json": "json",
        ".jsonl": "jsonl",
        ".txt": "conll",
        ".conll": "conll",
    }
    if suffix not in formats:
        raise TwinLMError(
            f"{path}: cannot tell the format from the extension {suffix!r}; set task.format "
            "to csv, tsv, json, jsonl or conll"
        )
    return formats[suffix]


def _read_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV file (with a header line) or a JSON array / JSON-lines file, as dicts."""
    if fmt in ("csv", "tsv"):
        with path.open(newline="", encoding="utf-8") as fh:
            # GLUE's TSVs are unquoted: a stray `"` in a sentence must not swallow the following lines.
            reader = csv.DictReader(
                fh,
                delimiter="\t" if fmt == "tsv" else ",",
                quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
            )
            rows = list(reader)
            if reader.fieldnames is None:
                return []
            return rows
    text = path.read_text(encoding="utf-8")
    try:
        if fmt == "json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise TwinLMError(
            f"{path}: not valid JSON ({err}); give a JSON array or one object per line"
        ) from None
    if not all(isinstance(r, dict) for r in rows):
        raise TwinLMError(f"{path}: every JSON record must be an object with named fields")
    return rows


def read_conll(
    path: Path, word_column: int = 0, tag_column: int = -1
) -> tuple[list[list[str]], list[list[str]]]:
    """Sentences of a CoNLL-style file: whitespace-separated columns, a blank line between sentences,
    `-DOCSTART-` lines skipped. Returns (words, tags), one list per sentence."""
    words: list[list[str]] = []
    tags: list[list[str]] = []
    sent_words: list[str] = []
    sent_tags: list[str] = []
    need = max(word_column, tag_column) + 1 if tag_column >= 0 else max(word_column + 1, -tag_column)
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if sent_words:
                    words.append(sent_words)
                    tags.append(sent_tags)
                    sent_words, sent_tags = [], []
                continue
            if len(cols) < need or len(cols) < 2:
                raise TwinLMError(
                    f"{path}:{number}: expected at least {max(need, 2)} columns (word ... tag), got {len(cols)}: "
                    f"{line.strip()!r}"
                )
            sent_words.append(cols[word_column])
            sent_tags.append(cols[tag_column])
    if sent_words:
        words.append(sent_words)
        tags.append(sent_tags)
    return words, tags


def _column(rows: list[dict[str, Any]], column: str, source: str, what: str) -> list[Any]:
    if column not in rows[0]:
        raise TwinLMError(
            f"{source}: no column {column!r} ({what}); the columns are {', '.join(map(repr, rows[0]))}; "
            f"set task.{what} to one of them"
        )
    values = []
    for i, row in enumerate(rows):
        value = row.get(column)
        if value is None:
            raise TwinLMError(f"{source}: record {i + 1} has no value in column {column!r} ({what})")
        values.append(value)
    return values


def _label_string(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _split_from_rows(
    name: str,
    source: str,
    rows: list[dict[str, Any]],
    task: TaskSection,
    class_names: dict[str, list[str]] | None = None,
) -> Split:
    if not rows:
        raise TwinLMError(
            f"{source}: the {name} split is empty (no records); give a file with labelled examples"
        )
    names = class_names or {}

    def labels_of(column: str, what: str) -> list[Any]:
        values = _column(rows, column, source, what)
        if column not in names:
            return values
        classes = names[column]  # a Hub ClassLabel: ints -> names

        def name_of(v: int) -> str:
            if not 0 <= v < len(classes):  # -1: no gold label (GLUE's test splits), not the last class
                hint = f" (set task.hub.{name}_split to null)" if name in ("dev", "test") else ""
                raise TwinLMError(
                    f"{source}: the {name} split has label id {v} in {column!r}, outside its {len(classes)} "
                    f"classes {classes}: it has no gold labels to train or score on{hint}"
                )
            return classes[v]

        return [
            [name_of(v) for v in value] if isinstance(value, list) else name_of(value) for value in values
        ]

    if task.type == "sequence_classification":
        texts = [str(t) for t in _column(rows, task.text_column, source, "text_column")]
        pairs = None
        if task.text_pair_column:
            pairs = [str(t) for t in _column(rows, task.text_pair_column, source, "text_pair_column")]
        labels = [_label_string(v) for v in labels_of(task.label_column, "label_column")]
        return Split(name, source, texts=texts, pairs=pairs, labels=labels)
    words = _column(rows, task.tokens_column, source, "tokens_column")
    tags = labels_of(task.tags_column, "tags_column")
    for i, (w, t) in enumerate(zip(words, tags, strict=True)):
        if not isinstance(w, list) or not isinstance(t, list) or len(w) != len(t):
            raise TwinLMError(
                f"{source}: record {i + 1}: columns {task.tokens_column!r} and {task.tags_column!r} must be "
                "lists of the same length (one tag per word)"
            )
    keep = [i for i, w in enumerate(words) if w]
    return Split(
        name,
        source,
        words=[[str(x) for x in words[i]] for i in keep],
        tags=[[_label_string(x) for x in tags[i]] for i in keep],
    )


def _read_file_split(name: str, path: Path, task: TaskSection) -> Split:
    fmt = _format_of(path, task.format)
    source = str(path)
    # a binary or non-UTF-8 file: one line naming the file and the byte, before any reader trips on it
    check_text_files([path], where=f"task.{name}")
    if fmt == "conll":
        if task.type != "token_classification":
            raise TwinLMError(
                f"{path}: CoNLL files hold token tags; use task.type token_classification or a CSV/TSV/JSON file"
            )
        words, tags = read_conll(path, task.conll_word_column, task.conll_tag_column)
        if not words:
            raise TwinLMError(
                f"{path}: the {name} split is empty (no sentences); give a CoNLL file with tagged words"
            )
        return Split(name, source, words=words, tags=tags)
    return _split_from_rows(name, source, _read_rows(path, fmt), task)


def _read_hub_splits(task: TaskSection) -> dict[str, Split]:
    import datasets

    hub = task.hub
    assert hub is not None
    wanted = {"train": hub.train_split, "dev": hub.dev_split, "test": hub.test_split}
    out = {}
    for name, split in wanted.items():
        if split is None:
            continue
        source = f"{hub.name}" + (f"/{hub.config}" if hub.config else "") + f" [{split}]"
        source += f" @ {hub.revision}" if hub.revision else ""
        try:
            ds = datasets.load_dataset(hub.name, hub.config, split=split, revision=hub.revision)
        except Exception as err:  # noqa: BLE001 - any loading failure is the user's input
            raise TwinLMError(f"cannot load Hub dataset {source}: {err.__class__.__name__}: {err}") from None
        class_names = {}
        for column, feature in ds.features.items():
            inner = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for tags
            if isinstance(inner, datasets.ClassLabel):
                class_names[column] = list(inner.names)
        out[name] = _split_from_rows(name, source, [dict(r) for r in ds], task, class_names)
    return out


def _check_iob2(split: Split) -> None:
    for i, sentence in enumerate(split.tags):
        for tag in sentence:
            if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
                raise TwinLMError(
                    f"{split.source}: sentence {i + 1} has tag {tag!r}, which is not IOB2 "
                    "(O, B-TYPE or I-TYPE)"
                )


def _sort_labels(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=lambda v: (0, float(v), v))
    except ValueError:
        return sorted(values)


def load_task(task: TaskSection, seed: int = 42) -> tuple[dict[str, Split], list[str]]:
    """Read train/dev/test (whichever are given) and the label list; check labels against it.

    The label list is `task.labels` or the sorted set seen in train (numeric labels sorted as numbers).
    A label in dev/test (or in train, when `task.labels` is given) outside it is an error naming the file.
    """
    if task.hub is not None:
        splits = _read_hub_splits(task)
    else:
        splits = {
            name: _read_file_split(name, getattr(task, name), task)
            for name in SPLITS
            if getattr(task, name) is not None
        }
    if task.type == "token_classification":
        for split in splits.values():
            _check_iob2(split)

    def values(split: Split) -> list[str]:
        return split.labels if task.type == "sequence_classification" else [t for s in split.tags for t in s]

    column = task.label_column if task.type == "sequence_classification" else "tags"
    if task.labels is not None:
        labels = list(task.labels)
        check = list(splits)
        where = "task.labels"
    else:
        labels = _sort_labels(set(values(splits["train"])))
        check = [s for s in splits if s != "train"]
        where = f"the train split ({splits['train'].source})"
    if task.type == "token_classification" and "O" not in labels:
        labels = ["O", *labels]  # always there, even if a tiny train split has no untagged word
    if len(labels) < 2:
        raise TwinLMError(
            f"{splits['train'].source}: column {column!r} has only one label value {labels}; a classifier needs at least two"
        )
    known = set(labels)
    for name in check:
        unknown = sorted(set(values(splits[name])) - known)
        if unknown:
            raise TwinLMError(
                f"{splits[name].source}: column {column!r} has label(s) {', '.join(map(repr, unknown[:5]))} "
                f"not in {where} (known: {', '.join(labels[:10])}); fix the file or list every label in task.labels"
            )
    if task.max_train_examples is not None:
        _subsample(splits["train"], task.max_train_examples, seed)
    if task.max_eval_examples is not None:
        for name in ("dev", "test"):
            if name in splits:
                _truncate(splits[name], task.max_eval_examples)
    return splits, labels


def _select(split: Split, index: Sequence[int]) -> None:
    if split.labels:
        split.texts = [split.texts[i] for i in index]
        split.labels = [split.labels[i] for i in index]
        if split.pairs is not None:
            split.pairs = [split.pairs[i] for i in index]
    else:
        split.words = [split.words[i] for i in index]
        split.tags = [split.tags[i] for i in index]


def _subsample(split: Split, n: int, seed: int) -> None:
    if n < len(split):
        index = list(range(len(split)))
        random.Random(seed).shuffle(index)
        _select(split, sorted(index[:n]))


def _truncate(split: Split, n: int) -> None:
    if n < len(split):
        _select(split, range(n))


# ------------------------------------------------------------------------------------------------
# Model inputs
# ------------------------------------------------------------------------------------------------
class EncodedDataset(torch.utils.data.Dataset):
    """A list of tokenised examples (dicts of int lists), padded per batch by the collator. Token
    classification: `word_index[i]` is, for each labelled position of example i in order, the index of its
    word (a word that gives no sub-token, or that truncation cut, has none)."""

    def __init__(
        self, features: list[dict[str, list[int]]], word_index: list[list[int]] | None = None
    ) -> None:
        self.features = features
        self.word_index = word_index

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.features[i]


def encode_split(
    split: Split, tokenizer: Any, label2id: dict[str, int], max_length: int, task_type: str
) -> EncodedDataset:
    """Tokenise a split. Token classification: each word's label goes to its first sub-token, -100 to
    the other sub-tokens and special tokens (so the loss and the word-level metrics see one label per word)."""
    if task_type == "sequence_classification":
        enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length)
        feats = [
            {k: enc[k][i] for k in enc.keys()} | {"labels": label2id[split.labels[i]]}
            for i in range(len(split))
        ]
        return EncodedDataset(feats)
    # Each word after the first with the space running text has before it: a byte-level BPE tokenizer (no
    # add_prefix_space) would otherwise encode ["the", "cat"] as "thecat", text it never saw in pretraining
    # (its running-text ids are "the", "Ġcat"); WordPiece splits on the space and gives the same ids.
    words = [[w if j == 0 else " " + w for j, w in enumerate(sentence)] for sentence in split.words]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    feats, word_index = [], []
    for i, tags in enumerate(split.tags):
        previous = None
        labels, labelled = [], []
        for word in enc.word_ids(i):
            first = word is not None and word != previous
            labels.append(label2id[tags[word]] if first else -100)
            if first:
                labelled.append(word)
            previous = word
        feats.append({k: enc[k][i] for k in enc.keys()} | {"labels": labels})
        word_index.append(labelled)
    return EncodedDataset(feats, word_index)


def make_collator(tokenizer: Any, task_type: str) -> Any:
    """Dynamic padding to the longest sequence in the batch (labels padded with -100 for tagging)."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if task_type == "sequence_classification":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForTokenClassification(tokenizer)
