"""Batch collators for pretraining: masked-LM masking (optionally whole-word) and causal labels.

Both take rows {"input_ids", "position_ids" (optional)} of equal or unequal length. Rows of unequal
length are right-padded; then, and only then, an `attention_mask` is returned as well. Padding and,
for masked LM, special tokens are never masked and never carry a label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from twinlm.errors import TwinLMError

__all__ = ["CausalLMCollator", "MaskedLMCollator", "word_continuation_table"]

IGNORE_INDEX = -100


def _stack(rows: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors input_ids, position_ids, and `real` (True where not padding)."""
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    ids = [torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]
    pos = [
        torch.as_tensor(r["position_ids"], dtype=torch.long) if "position_ids" in r else torch.arange(len(i))
        for r, i in zip(rows, ids, strict=True)
    ]
    length = max(len(i) for i in ids)
    out_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    out_pos = torch.zeros((len(rows), length), dtype=torch.long)
    real = torch.zeros((len(rows), length), dtype=torch.bool)
    for b, (i, p) in enumerate(zip(ids, pos, strict=True)):
        out_ids[b, : len(i)] = i
        out_pos[b, : len(p)] = p
        real[b, : len(i)] = True
    return {"input_ids": out_ids, "position_ids": out_pos, "real": real}


def _finish(batch: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    real = batch.pop("real")
    batch["labels"] = labels
    if not bool(real.all()):
        batch["attention_mask"] = real.long()
    return batch


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def word_continuation_table(tokenizer: Any) -> torch.Tensor:
    """Bool per vocabulary id: True if the token continues the previous word (not a word start).

    WordPiece: tokens starting with the continuing-subword prefix ("##"). Byte-level BPE: tokens not
    starting with "Ġ" (the encoded space); Metaspace/SentencePiece-style: tokens not starting with "▁".
    Special tokens are never continuations.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    table = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = (
        getattr(model, "continuing_subword_prefix", None) if type(model).__name__ == "WordPiece" else None
    )
    if prefix:
        for token, i in vocab.items():
            table[i] = token.startswith(prefix)
    else:
        marker = next((m for m in ("Ġ", "▁") if any(t.startswith(m) for t in vocab)), None)
        if marker is None:
            raise TwinLMError(
                "whole_word_masking needs a WordPiece tokenizer ('##' pieces) or a BPE tokenizer whose "
                "word-initial tokens start with 'Ġ' or '▁'; this tokenizer has neither"
            )
        for token, i in vocab.items():
            table[i] = not token.startswith(marker)
    table[list(tokenizer.all_special_ids)] = False
    return table


class MaskedLMCollator:
    """Masks `mlm_probability` of the maskable tokens: by default (BERT) 80% -> [MASK], 10% -> random token,
    10% kept; ELECTRA's generator input is 85% [MASK], 15% kept (`mask_replace_prob=0.85,
    random_replace_prob=0`; transformers' DataCollatorForLanguageModeling names).

    Labels hold the original id at masked positions and -100 elsewhere. With `whole_word_masking`,
    words are chosen with `mlm_probability` and all their pieces masked. Special tokens and padding
    are never masked. Randomness comes from `generator`, or torch's global RNG when None (so that a
    resumed run that restores the global RNG state masks exactly as the uninterrupted run).
    """

    def __init__(
        self,
        tokenizer: Any,
        mlm_probability: float = 0.15,
        whole_word_masking: bool = False,
        generator: torch.Generator | None = None,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise TwinLMError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if min(mask_replace_prob, random_replace_prob) < 0 or mask_replace_prob + random_replace_prob > 1:
            raise TwinLMError(
                f"mask_replace_prob={mask_replace_prob} and random_replace_prob={random_replace_prob} must be "
                ">= 0 with a sum <= 1 (the rest of the masked tokens keep their original id)"
            )
        self.mask_replace_prob, self.random_replace_prob = mask_replace_prob, random_replace_prob
        if tokenizer.mask_token_id is None:
            raise TwinLMError("the tokenizer has no mask_token; masked-LM pretraining needs one")
        self.mlm_probability = mlm_probability
        self.whole_word_masking = whole_word_masking
        self.generator = generator
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.pad_token_id = _pad_id(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab_size = len(tokenizer)
        self.random_ids = torch.tensor(
            [i for i in range(vocab_size) if i not in set(self.special_ids.tolist())], dtype=torch.long
        )
        self.continuation = word_continuation_table(tokenizer) if whole_word_masking else None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _stack(rows, self.pad_token_id)
        ids, real = batch["input_ids"], batch["real"]
        maskable = real & ~torch.isin(ids, self.special_ids)
        draw = torch.rand(ids.shape, generator=self.generator) < self.mlm_probability
        if self.continuation is None:
            masked = maskable & draw
        else:
            # A word starts at a maskable token that is not a continuation piece, or whose previous
            # token is not maskable (special, padding, block start); the draw at its start decides.
            prev_maskable = torch.nn.functional.pad(maskable[:, :-1], (1, 0), value=False)
            starts = maskable & (~self.continuation[ids] | ~prev_maskable)
            index = torch.arange(ids.shape[1]).expand_as(ids)
            start_of = torch.cummax(torch.where(starts, index, 0), dim=1).values
            masked = maskable & draw.gather(1, start_of)
        labels = torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))
        choice = torch.rand(ids.shape, generator=self.generator)
        random_tokens = self.random_ids[
            torch.randint(len(self.random_ids), ids.shape, generator=self.generator)
        ]
        to_mask, to_random = self.mask_replace_prob, self.mask_replace_prob + self.random_replace_prob
        new_ids = torch.where(masked & (choice < to_mask), torch.full_like(ids, self.mask_token_id), ids)
        new_ids = torch.where(masked & (choice >= to_mask) & (choice < to_random), random_tokens, new_ids)
        batch["input_ids"] = new_ids
        return _finish(batch, labels)


class CausalLMCollator:
    """Labels are the inputs (the model shifts them), with -100 at padding and at document starts.

    A label at a document's first token (position_ids == 0) would train predicting it from the
    previous document; it is ignored.
    """

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.pad_token_id = _pad_id(tokenizer) if tokenizer is not None else 0

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _stack(rows, self.pad_token_id)
        ignore = ~batch["real"] | (batch["position_ids"] == 0)
        labels = batch["input_ids"].masked_fill(ignore, IGNORE_INDEX)
        return _finish(batch, labels)
