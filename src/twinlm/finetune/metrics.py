"""Scores: accuracy and macro-F1 for classification (scikit-learn), entity-level F1 for tagging (seqeval)."""

from __future__ import annotations

from collections.abc import Sequence


def classification_scores(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (every label weighs the same, so a majority-class guess scores low)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
    }


def tagging_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision / recall / F1 (CoNLL convention: an entity counts only if its span and
    type are both right) and word-level tag accuracy, on IOB2 tag sequences."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    gold, predicted = [list(s) for s in gold], [list(s) for s in predicted]
    return {
        "f1": float(f1_score(gold, predicted, zero_division=0)),
        "precision": float(precision_score(gold, predicted, zero_division=0)),
        "recall": float(recall_score(gold, predicted, zero_division=0)),
        "accuracy": float(accuracy_score(gold, predicted)),
    }
