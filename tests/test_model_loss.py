"""twinlm's chunked language-model losses equal transformers' ForCausalLMLoss / ForMaskedLMLoss (loss and
gradient) in float32 and bfloat16, with ignore_index, num_items_in_batch and shift_labels."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss

from twinlm.model import loss as twin_loss

VOCAB = 37


def _loss_and_grad(fn, logits, labels, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, labels, vocab_size=VOCAB, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


CASES = {
    "causal-mean": ("causal", {}),
    "causal-num_items": ("causal", {"num_items_in_batch": torch.tensor(11)}),
    "causal-ignore_index": ("causal", {"ignore_index": 3}),
    "causal-shift_labels": ("causal", {"shift_labels": True}),
    "masked-mean": ("masked", {}),
    "masked-num_items": ("masked", {"num_items_in_batch": 11}),
    "masked-ignore_index": ("masked", {"ignore_index": 3}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_loss_equals_transformers(monkeypatch, dtype, case):
    objective, kwargs = CASES[case]
    # 8 rows per chunk: 3 chunks and a remainder for the 2 x 13 tokens below
    monkeypatch.setattr(twin_loss, "CPU_CHUNK_ELEMENTS", 8 * VOCAB)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 13, VOCAB, generator=g) * 4).to(dtype)
    labels = torch.randint(0, VOCAB, (2, 13), generator=g)
    labels[0, :4] = kwargs.get("ignore_index", -100)
    kwargs = dict(kwargs)
    if kwargs.get("shift_labels"):
        kwargs["shift_labels"] = torch.roll(labels, 1, dims=1)
    ours, reference = {
        "causal": (twin_loss.causal_lm_loss, ForCausalLMLoss),
        "masked": (twin_loss.masked_lm_loss, ForMaskedLMLoss),
    }[objective]
    loss, grad = _loss_and_grad(ours, logits, labels, **kwargs)
    expected_loss, expected_grad = _loss_and_grad(reference, logits, labels, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    tolerance = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of the gradient
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=tolerance, atol=tolerance)
    assert grad.abs().sum() > 0


def test_models_use_the_chunked_loss_and_accept_another():
    from conftest import tiny_config

    from twinlm import TwinLMForCausalLM, TwinLMForMaskedLM

    causal = TwinLMForCausalLM(tiny_config(is_causal=True))
    assert causal.loss_function is twin_loss.causal_lm_loss
    assert TwinLMForMaskedLM(tiny_config()).loss_function is twin_loss.masked_lm_loss
    causal.loss_function = ForCausalLMLoss  # a user's replacement wins (transformers' setter)
    ids = torch.randint(0, causal.config.vocab_size, (2, 9))
    expected = causal(ids, labels=ids).loss
    causal.loss_function = twin_loss.causal_lm_loss
    torch.testing.assert_close(causal(ids, labels=ids).loss, expected)
