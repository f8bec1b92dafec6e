"""The flash-attention path (attn_implementation="flash_attention_2"), checked on the CPU.

No flash kernel runs on a CPU, so transformers' entry in ALL_ATTENTION_FUNCTIONS is replaced by a plain
torch reference with the same contract as its flash integration: (b, h, s, d) in, (b, s, h, d) out, a 2D
padding mask (un-padding), documents from position ids restarting at 0 in a single row (its variable
length path), `sliding_window` as a band of (w - 1) keys on each side, causal masks aligned bottom
right. The model's own flash plumbing (no bias, flattened packed batches, window mapping, mask slicing
with a cache) must then reproduce SDPA exactly. scripts/gpu_checks.py runs the same comparison with
the real kernel on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from twinlm import TwinLMForCausalLM, TwinLMForMaskedLM


def reference_flash(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    is_causal=None,
    position_ids=None,
    **kwargs,
):
    b, h, q_len, d = query.shape
    k_len = key.shape[2]
    key = key.repeat_interleave(h // key.shape[1], dim=1)  # flash takes grouped-query attention natively
    value = value.repeat_interleave(h // value.shape[1], dim=1)
    q_idx = torch.arange(k_len - q_len, k_len)[:, None]
    k_idx = torch.arange(k_len)[None, :]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool)
    if is_causal:
        allowed &= k_idx <= q_idx
    if sliding_window is not None and k_len > sliding_window:
        allowed &= (q_idx - k_idx).abs() <= sliding_window - 1
    allowed = allowed.expand(b, 1, q_len, k_len).clone()
    if position_ids is not None and attention_mask is None and b == 1:
        document = (position_ids[0] == 0).cumsum(0)
        allowed &= (document[:, None] == document[None, :])[None, None]
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, None, :]
    empty = ~allowed.any(-1, keepdim=True)  # padding queries: flash returns zeros for them
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed | empty, scale=scaling)
    return out.masked_fill(empty, 0.0).transpose(1, 2), None


@pytest.fixture
def flash(monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", reference_flash)

    def use(model, implementation):
        model.config._attn_implementation = implementation
        return model

    return use


CASES = [
    dict(),
    dict(position_embedding_type="learned", num_key_value_heads=2),
    dict(sliding_window=3),
    dict(sliding_window=3, global_attention_every_n_layers=2),  # a full and a windowed layer
    dict(share_qk=True, position_embedding_type="sinusoidal"),
    dict(position_embedding_type="none", attention_scoring="dot"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
@pytest.mark.parametrize(
    "overrides", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "rope" for c in CASES]
)
def test_flash_path_matches_sdpa(flash, causal, overrides):
    torch.manual_seed(0)
    overrides = {"position_embedding_type": "rope", **overrides}
    cls = TwinLMForCausalLM if causal else TwinLMForMaskedLM
    model = cls(tiny_config(is_causal=causal, **overrides)).eval()
    ids = torch.randint(5, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0 if causal else 1
    mask[1, 9:] = 0 if not causal else 1
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    for kwargs, real in (
        (dict(attention_mask=mask), mask.bool()),  # padding
        (dict(position_ids=positions), torch.ones_like(ids).bool()),  # packed documents
        (dict(), torch.ones_like(ids).bool()),  # neither
    ):
        expected = flash(model, "sdpa")(ids, **kwargs).logits
        got = flash(model, "flash_attention_2")(ids, **kwargs).logits
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=3), dict(num_key_value_heads=1)])
def test_flash_generation_with_cache_matches_sdpa(flash, overrides):
    torch.manual_seed(0)
    model = TwinLMForCausalLM(tiny_config(is_causal=True, position_embedding_type="rope", **overrides)).eval()
    prompt = torch.randint(5, 97, (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = flash(model, "sdpa").generate(prompt, **kwargs)
    assert torch.equal(flash(model, "flash_attention_2").generate(prompt, **kwargs), expected)


@pytest.mark.parametrize(
    "overrides,named",
    [
        (dict(attention_scoring="additive"), "attention_scoring='additive'"),
        (dict(position_embedding_type="alibi"), "position_embedding_type='alibi'"),
        (dict(position_embedding_type="relative"), "position_embedding_type='relative'"),
    ],
)
def test_flash_refuses_what_it_cannot_compute(flash, overrides, named):
    model = flash(TwinLMForCausalLM(tiny_config(is_causal=True, **overrides)), "flash_attention_2")
    with pytest.raises(ValueError, match=f"cannot compute {named}.*use attn_implementation='sdpa'"):
        model(torch.randint(5, 97, (1, 5)))
    rope = flash(
        TwinLMForCausalLM(tiny_config(is_causal=True, position_embedding_type="rope")), "flash_attention_2"
    )
    with pytest.raises(ValueError, match="output_attentions"):
        rope(torch.randint(5, 97, (1, 5)), output_attentions=True)


def test_flash_with_a_static_cache_is_a_clear_error(flash):
    model = flash(
        TwinLMForCausalLM(tiny_config(is_causal=True, position_embedding_type="rope")).eval(),
        "flash_attention_2",
    )
    with pytest.raises(ValueError, match="static cache is not supported.*cache_implementation='dynamic'"):
        model.generate(
            torch.randint(5, 97, (1, 5)), max_new_tokens=3, cache_implementation="static", pad_token_id=0
        )
