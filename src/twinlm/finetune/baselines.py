"""Simple baselines trained on the same split as the model, so a report shows what fine-tuning adds:
TF-IDF + logistic regression for sequence classification, the most frequent tag per word for tagging."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from twinlm.finetune.data import Split
from twinlm.finetune.metrics import classification_scores, tagging_scores


def _joined(split: Split) -> list[str]:
    if split.pairs is None:
        return split.texts
    return [f"{a} [SEP] {b}" for a, b in zip(split.texts, split.pairs, strict=True)]


def tfidf_logreg(splits: dict[str, Split], seed: int = 42) -> dict[str, dict[str, float]]:
    """Word 1-2-gram TF-IDF features and a logistic regression, fitted on train; scores on dev/test."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=4.0, random_state=seed),
    )
    model.fit(_joined(splits["train"]), splits["train"].labels)
    return {
        name: classification_scores(split.labels, list(model.predict(_joined(split))))
        for name, split in splits.items()
        if name != "train"
    }


def most_frequent_tag(splits: dict[str, Split]) -> dict[str, dict[str, float]]:
    """Each word gets the tag it had most often in train; unseen words the most frequent tag overall."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    overall: Counter[str] = Counter()
    for words, tags in zip(splits["train"].words, splits["train"].tags, strict=True):
        for word, tag in zip(words, tags, strict=True):
            counts[word][tag] += 1
            overall[tag] += 1
    best = {word: c.most_common(1)[0][0] for word, c in counts.items()}
    fallback = overall.most_common(1)[0][0]
    return {
        name: tagging_scores(split.tags, [[best.get(w, fallback) for w in words] for words in split.words])
        for name, split in splits.items()
        if name != "train"
    }


def run_baseline(task_type: str, splits: dict[str, Split], seed: int = 42) -> dict[str, Any]:
    """The task's baseline: {'name': ..., 'dev': scores, 'test': scores}."""
    if task_type == "sequence_classification":
        return {"name": "tfidf+logistic_regression", **tfidf_logreg(splits, seed)}
    return {"name": "most_frequent_tag", **most_frequent_tag(splits)}
