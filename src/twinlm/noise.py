"""Noisy test inputs: how a fine-tuned model's score falls as its inputs get typos or wrong words.

A weakness the textbooks list for Transformers is sensitivity to input noise. `twinlm evaluate` with a
suite's `noise` section scores every fine-tuned model again on its test split perturbed at rising rates:
- `char`: each word, with probability `rate`, gets one typo (two neighbouring characters swapped, one
  deleted, one inserted or one replaced by a random letter; words of one character get replaced);
- `token`: each word, with probability `rate`, is replaced by a word drawn from the task's training text.
Labels never change; tagging keeps one tag per word (words are perturbed in place, never split or merged).
Seeded: the same rate perturbs the same words for every model (checkpoint and control compare on one text).
"""

from __future__ import annotations

import dataclasses
import random
import string
from typing import Literal

NoiseKind = Literal["char", "token"]


def typo(word: str, rng: random.Random) -> str:
    """One random edit of `word` (swap, delete, insert, replace)."""
    letters = string.ascii_lowercase
    if len(word) < 2:
        return rng.choice(letters)
    i = rng.randrange(len(word) - 1)
    edit = rng.randrange(4)
    if edit == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if edit == 1:
        return word[:i] + word[i + 1 :]
    if edit == 2:
        return word[:i] + rng.choice(letters) + word[i:]
    return word[:i] + rng.choice(letters) + word[i + 1 :]


def perturb_words(
    words: list[str], kind: NoiseKind, rate: float, rng: random.Random, vocabulary: list[str]
) -> list[str]:
    """The same number of words, each perturbed with probability `rate`."""
    out = []
    for word in words:
        if rng.random() >= rate:
            out.append(word)
        elif kind == "char":
            out.append(typo(word, rng))
        else:
            out.append(rng.choice(vocabulary) if vocabulary else word)
    return out


def perturb_split(split: object, kind: NoiseKind, rate: float, seed: int, vocabulary: list[str]) -> object:
    """A copy of a fine-tuning Split (twinlm.finetune.data) with its inputs perturbed and its labels kept."""
    rng = random.Random(f"{seed}-{kind}-{rate}")
    if getattr(split, "words", None):
        words = [perturb_words(w, kind, rate, rng, vocabulary) for w in split.words]
        return dataclasses.replace(split, words=words, name=f"{split.name} ({kind} noise {rate:g})")
    texts = [" ".join(perturb_words(t.split(), kind, rate, rng, vocabulary)) for t in split.texts]
    pairs = (
        [" ".join(perturb_words(t.split(), kind, rate, rng, vocabulary)) for t in split.pairs]
        if split.pairs
        else split.pairs
    )
    return dataclasses.replace(split, texts=texts, pairs=pairs, name=f"{split.name} ({kind} noise {rate:g})")


def training_vocabulary(split: object, limit: int = 50_000) -> list[str]:
    """The distinct words of a training split (sorted, so draws are reproducible), at most `limit`."""
    words: set[str] = set()
    for sentence in getattr(split, "words", None) or (t.split() for t in split.texts):
        words.update(sentence)
        if len(words) >= limit:
            break
    return sorted(words)


__all__ = ["NoiseKind", "perturb_split", "perturb_words", "training_vocabulary", "typo"]
