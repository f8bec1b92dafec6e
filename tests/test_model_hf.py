"""twinlm behaves like an in-tree transformers model: Trainer's gradient accumulation, return_dict=False,
static-cache generation, padding-free packing, tolerant loading of saved configs, empty inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from transformers import DataCollatorWithFlattening, StaticCache, Trainer, TrainingArguments

from twinlm import (
    TwinLMConfig,
    TwinLMForCausalLM,
    TwinLMForMaskedLM,
    TwinLMForSequenceClassification,
    TwinLMForTokenClassification,
    TwinLMModel,
)
from twinlm.model.configuration_twinlm import CHOICES

POSITIONS = CHOICES["position_embedding_type"]

# ---------------------------------------------------------------------------------------------------
# Trainer: batch 2 x 4 accumulation steps == batch 8


def _rows(head: str, problem_type: str | None = None) -> list[dict[str, torch.Tensor]]:
    """8 right-padded rows with very different numbers of targets, so that a mean of per-micro-batch means
    differs from the mean over all targets."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        length = 3 + (i * 5) % 10
        ids = torch.zeros(12, dtype=torch.long)
        ids[:length] = torch.randint(5, 97, (length,), generator=generator)
        mask = (ids != 0).long()
        row = {"input_ids": ids, "attention_mask": mask}
        if head == "clm":
            row["labels"] = ids.masked_fill(mask == 0, -100)
        elif head == "mlm":
            chosen = (torch.rand(12, generator=generator) < 0.4) & (mask == 1)
            chosen[0] = True
            row["labels"] = ids.masked_fill(~chosen, -100)
        elif problem_type == "regression":
            row["labels"] = torch.randn((), generator=generator)
        elif problem_type == "multi_label_classification":
            row["labels"] = (torch.rand(3, generator=generator) > 0.5).float()
        else:
            row["labels"] = torch.tensor(i % 3)
        rows.append(row)
    return rows


def _model(head: str, problem_type: str | None = None):
    torch.manual_seed(0)
    if head == "clm":
        return TwinLMForCausalLM(tiny_config(is_causal=True))
    if head == "mlm":
        return TwinLMForMaskedLM(tiny_config(sparse_prediction=True))
    num_labels = 1 if problem_type == "regression" else 3
    return TwinLMForSequenceClassification(tiny_config(num_labels=num_labels, problem_type=problem_type))


def _train_one_step(tmp_path, model, rows, batch_size: int, accumulation: int) -> float:
    args = TrainingArguments(
        output_dir=str(tmp_path / f"out-{batch_size}x{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",  # Adam's first step is ~sign(gradient): it would hide a gradient scaled 4x
        learning_rate=0.5,
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: it would hide a scaled gradient too
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return next(log["loss"] for log in trainer.state.log_history if "loss" in log)


HEADS = [
    ("clm", None),
    ("mlm", None),
    ("seq", "single_label_classification"),
    ("seq", "regression"),
    ("seq", "multi_label_classification"),
]


@pytest.mark.parametrize("head,problem_type", HEADS, ids=[h if p is None else p for h, p in HEADS])
def test_trainer_gradient_accumulation_equals_the_full_batch(tmp_path, head, problem_type):
    rows = _rows(head, problem_type)
    full = _model(head, problem_type)
    accumulated = _model(head, problem_type)
    loss_full = _train_one_step(tmp_path, full, rows, batch_size=8, accumulation=1)
    loss_accumulated = _train_one_step(tmp_path, accumulated, rows, batch_size=2, accumulation=4)
    parameter_difference = max(
        (a - b).abs().max().item() for a, b in zip(full.parameters(), accumulated.parameters(), strict=True)
    )
    print(
        f"{head}/{problem_type}: loss {loss_full:.6f} vs {loss_accumulated:.6f}, max param diff {parameter_difference:.2e}"
    )
    assert loss_accumulated == pytest.approx(loss_full, abs=1e-5)
    assert parameter_difference < 1e-5
    # and the step moved the parameters (a test that trains nothing would pass trivially)
    assert (
        max(
            (a - b).abs().max().item()
            for a, b in zip(full.parameters(), _model(head, problem_type).parameters(), strict=True)
        )
        > 1e-3
    )


def test_loss_kwargs_reach_transformers_loss_functions():
    """num_items_in_batch normalises the summed loss; shift_labels replaces the shifted labels;
    ignore_index is honoured (the three kwargs Trainer and context parallelism send)."""
    model = _model("clm").eval()
    ids = torch.randint(5, 97, (2, 7))
    logits = model(ids).logits.float()
    targets = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
    summed = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    loss = model(ids, labels=ids, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(loss, summed / 40)
    shift = torch.randint(5, 97, (2, 7))
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift.flatten())
    torch.testing.assert_close(model(ids, labels=ids, shift_labels=shift).loss, expected)
    ignored = ids.clone()
    ignored[:, 3:] = 7  # ignore_index=7 drops these targets
    masked = torch.nn.functional.pad(ignored, (0, 1), value=7)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), masked.flatten(), ignore_index=7)
    torch.testing.assert_close(model(ids, labels=ignored, ignore_index=7).loss, expected)


# ---------------------------------------------------------------------------------------------------
# return_dict=False


TUPLE_HEADS = {
    "mlm": (TwinLMForMaskedLM, False, ("loss", "logits", "hidden_states", "attentions")),
    "clm": (TwinLMForCausalLM, True, ("loss", "logits", "cache", "hidden_states", "attentions")),
    "seq": (TwinLMForSequenceClassification, False, ("loss", "logits", "hidden_states", "attentions")),
    "tok": (TwinLMForTokenClassification, False, ("loss", "logits", "hidden_states", "attentions")),
    "base": (TwinLMModel, False, ("last_hidden_state", "hidden_states", "attentions")),
}


@pytest.mark.parametrize("via_config", [False, True], ids=["argument", "config"])
@pytest.mark.parametrize("head", list(TUPLE_HEADS))
def test_return_dict_false_returns_tuples_in_transformers_order(head, via_config):
    cls, causal, names = TUPLE_HEADS[head]
    torch.manual_seed(0)
    model = cls(tiny_config(is_causal=causal, num_labels=3)).eval()
    ids = torch.randint(5, 97, (2, 6))
    inputs = dict(input_ids=ids, output_hidden_states=True, output_attentions=True)
    if head != "base":
        inputs["labels"] = torch.tensor([0, 2]) if head == "seq" else torch.randint(0, 3, (2, 6))
        if head in ("mlm", "clm"):
            inputs["labels"] = ids
    reference = model(**inputs)
    if via_config:
        model.config.return_dict = False
        out = model(**inputs)
    else:
        out = model(**inputs, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(names)
    for value, name in zip(out, names, strict=True):
        expected = reference[name]
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(value, expected)
        elif isinstance(expected, tuple):
            assert len(value) == len(expected) and all(
                torch.equal(a, b) for a, b in zip(value, expected, strict=True)
            )
    if head != "base":  # the unpacking of the issue: it yielded the strings 'loss', 'logits'
        loss, logits = model(
            **{**inputs, "output_hidden_states": False, "output_attentions": False}, return_dict=False
        )[:2]
        torch.testing.assert_close(loss, reference.loss)
        torch.testing.assert_close(logits, reference.logits)


def test_hidden_states_and_attentions_are_recorded_per_layer():
    torch.manual_seed(0)
    model = TwinLMForCausalLM(tiny_config(is_causal=True, num_hidden_layers=3)).eval()
    ids = torch.randint(5, 97, (2, 5))
    out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    torch.testing.assert_close(
        out.hidden_states[-1], model.model(ids).last_hidden_state
    )  # after the final norm
    torch.testing.assert_close(
        out.hidden_states[0],
        model.model.embeddings(ids, None, None, model.model.positions.absolute(torch.arange(5)[None]), None),
    )
    assert all(a.shape == (2, 4, 5, 5) for a in out.attentions)
    assert torch.allclose(out.attentions[0].triu(1), torch.zeros(()))  # causal weights


# ---------------------------------------------------------------------------------------------------
# Static cache


STATIC_CASES = [dict(position_embedding_type=p) for p in POSITIONS] + [
    dict(sliding_window=3),
    dict(sliding_window=3, global_attention_every_n_layers=2),
    dict(attention_scoring="linear"),
    dict(num_key_value_heads=2),
    dict(attention_scoring="additive"),
    dict(conv_kernel_size=4),
    dict(conv_kernel_size=3, sliding_window=3, global_attention_every_n_layers=2),
    dict(conv_kernel_size=2, attention_scoring="linear"),
]


@pytest.mark.parametrize(
    "overrides", STATIC_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in STATIC_CASES]
)
def test_static_cache_generates_the_dynamic_cache_tokens(overrides):
    torch.manual_seed(0)
    model = TwinLMForCausalLM(tiny_config(is_causal=True, **overrides)).eval()
    prompt = torch.randint(5, 97, (2, 5))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # a left-padded row
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    dynamic = model.generate(prompt, **kwargs)
    static = model.generate(prompt, cache_implementation="static", return_dict_in_generate=True, **kwargs)
    assert isinstance(static.cache, StaticCache)
    assert torch.equal(static.sequences, dynamic)


def test_forward_with_a_static_cache_matches_full_forward():
    """A prompt then a chunk of 3 tokens through a StaticCache (keys = all its slots) equals one pass."""
    torch.manual_seed(0)
    config = tiny_config(is_causal=True, position_embedding_type="alibi")
    model = TwinLMForCausalLM(config).eval()
    ids = torch.randint(5, 97, (2, 9))
    cache = StaticCache(config=config, max_cache_len=16)
    model(ids[:, :6], cache=cache, use_cache=True)
    rest = model(ids[:, 6:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(rest, model(ids).logits[:, 6:], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Padding-free packing


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("causal", [False, True], ids=["mlm", "clm"])
def test_flattened_batches_equal_documents_one_by_one(causal, position):
    """DataCollatorWithFlattening's row (documents back to back, position ids restarting at 0, no mask) is
    accepted even when longer than max_position_embeddings, and gives each document's own logits."""
    torch.manual_seed(0)
    model = (TwinLMForCausalLM if causal else TwinLMForMaskedLM)(
        tiny_config(is_causal=causal, position_embedding_type=position, max_position_embeddings=16)
    ).eval()
    documents = [torch.randint(5, 97, (n,)).tolist() for n in (12, 16, 9)]  # 37 tokens > 16 positions
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in documents])
    assert batch["input_ids"].shape == (1, 37) and "attention_mask" not in batch
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    start, worst = 0, 0.0
    for document in documents:
        alone = model(torch.tensor([document])).logits[0]
        worst = max(worst, (packed[start : start + len(document)] - alone).abs().max().item())
        start += len(document)
    print(f"padding-free {position} {'clm' if causal else 'mlm'}: max |logit difference| {worst:.2e}")
    assert worst < 1e-4


def test_packed_loss_with_flattening_collator_labels():
    """The collator's labels (-100 at each document start) give the mean of the documents' token losses."""
    torch.manual_seed(0)
    model = TwinLMForCausalLM(tiny_config(is_causal=True, max_position_embeddings=16)).eval()
    documents = [torch.randint(5, 97, (n,)).tolist() for n in (10, 14)]
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in documents])
    packed = model(**batch).loss
    losses = [
        model(torch.tensor([d]), labels=torch.tensor([d]), num_items_in_batch=torch.tensor(22)).loss
        for d in documents
    ]
    torch.testing.assert_close(packed, sum(losses), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_position_ids_past_the_table_are_a_clear_error(position):
    model = TwinLMForMaskedLM(
        tiny_config(position_embedding_type=position, max_position_embeddings=16)
    ).eval()
    with pytest.raises(ValueError, match="position id 19 is past max_position_embeddings=16"):
        model(torch.randint(5, 97, (1, 20)))


# ---------------------------------------------------------------------------------------------------
# Loading saved configs; validation


def test_saved_config_with_extra_keys_loads(tmp_path):
    """Tools write keys of their own (layer_norm_epsilon is close to layer_norm_eps): kept, not refused."""
    torch.manual_seed(0)
    model = TwinLMForCausalLM(tiny_config(is_causal=True)).eval()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    values = json.loads(config_file.read_text())
    values.update(layer_norm_epsilon=1e-5, hiden_size=3, some_tool_metadata={"a": 1})
    config_file.write_text(json.dumps(values))
    config = TwinLMConfig.from_pretrained(tmp_path)
    assert config.layer_norm_epsilon == 1e-5 and config.some_tool_metadata == {"a": 1}
    assert config.layer_norm_eps == model.config.layer_norm_eps and config.hidden_size == 32
    again = TwinLMForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 97, (1, 6))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    # configs people write stay strict
    with pytest.raises(ValueError, match="did you mean 'layer_norm_eps'"):
        tiny_config(layer_norm_epsilon=1e-5)
    with pytest.raises(ValueError, match="did you mean 'layer_norm_eps'"):
        TwinLMConfig.from_preset("tiny-gpt2-small", layer_norm_epsilon=1e-5)


def test_pad_token_id_must_be_in_the_vocabulary():
    with pytest.raises(ValueError, match=r"pad_token_id=97 is outside the vocabulary \(vocab_size=97\)"):
        tiny_config(pad_token_id=97)
    assert tiny_config(pad_token_id=None).pad_token_id is None


@pytest.mark.parametrize("cls", [TwinLMModel, TwinLMForMaskedLM, TwinLMForSequenceClassification])
def test_empty_input_is_a_clear_error(cls):
    model = cls(tiny_config(num_labels=2)).eval()
    with pytest.raises(ValueError, match=r"no tokens \(shape \(3, 0\)\)"):
        model(torch.zeros(3, 0, dtype=torch.long))


def test_switch_errors_name_field_value_allowed_values_and_a_guess():
    with pytest.raises(ValueError) as info:
        tiny_config(norm_type="rmsnrom")
    message = str(info.value)
    assert "norm_type='rmsnrom'" in message and "layernorm, rmsnorm, batchnorm" in message
    assert "did you mean 'rmsnorm'" in message
    config = tiny_config()
    with pytest.raises(ValueError, match="position_embedding_type='rotary'"):
        config.position_embedding_type = "rotary"  # assignment is checked too
    assert tiny_config(classifier_pooling=None).classifier_pooling == "cls"
