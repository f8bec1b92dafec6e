"""Pretraining objectives, one small class each, picked from OBJECTIVES by the run config's `objective`:
masked-LM (BERT), causal LM (GPT) and replaced-token detection (ELECTRA, Clark et al. 2020).

An objective says which model it trains, how a batch is made, how many targets a batch holds (the engine
weighs micro-batches by them), how the model is validated and what is exported. The training loop
(twinlm.training.loop) asks these questions and branches on nothing else.

Replaced-token detection trains two encoders together, as in the paper and google-research/electra:
- the generator, a small twinlm masked-LM (hidden size `rtd.generator_size` of the discriminator's, whole
  heads of the discriminator's head size, the feed-forward width in proportion), reads the masked input
  (15% of the tokens chosen; 85% of those [MASK], 15% kept) and is trained with its masked-LM loss;
- at every chosen position a token is sampled from the generator's softmax (no gradient flows through the
  sample); the discriminator (TwinLMForPreTraining) reads the original text with those samples in place
  and predicts, for every non-padding token, whether it was replaced. A sample equal to the original
  counts as original;
- the two share their token, segment and absolute-position embeddings (and the embedding norm): the
  generator has factorised embeddings (embedding_size = the discriminator's hidden size, projected to its
  own); its LM head is tied to them;
- loss = generator MLM loss (mean over chosen tokens) + `rtd.discriminator_weight` (50) x discriminator
  binary cross-entropy (mean over non-padding tokens), one optimizer over both models.
The discriminator is exported as the run's `final/` (an ordinary twinlm encoder checkpoint: every head of
the Auto classes loads its body), the generator as `generator/` beside it (AutoModelForMaskedLM).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from twinlm.errors import TwinLMError
from twinlm.training.tracking import flops_per_token, parameter_counts

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "labels")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The model inputs of a batch, on `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in MODEL_INPUTS}


# ------------------------------------------------------------------------------------------------
# Replaced-token detection: the joint model
# ------------------------------------------------------------------------------------------------
def generator_config(config: Any, size: float, layers: float = 1.0) -> Any:
    """The generator's TwinLMConfig: the discriminator's, `size` times as wide (whole heads of the
    discriminator's head size, at least one; the feed-forward in proportion), `layers` times as deep, with
    embeddings as wide as the discriminator's (shared) projected to its own width."""
    head_dim = config.head_dim
    heads = max(1, round(config.hidden_size * size / head_dim))
    hidden = heads * head_dim
    kv_heads = max(1, heads * config.num_key_value_heads // config.num_attention_heads)
    depth = max(1, round(config.num_hidden_layers * layers))
    values = {
        **config.to_dict(),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads if heads % kv_heads == 0 else heads,
        "intermediate_size": max(1, round(config.intermediate_size * hidden / config.hidden_size)),
        "num_hidden_layers": depth,
        "embedding_size": config.embedding_size,
        "architectures": ["TwinLMForMaskedLM"],
    }
    if list(config.layer_types) == config._derived_layer_types():  # derived: the generator derives its own
        values.pop("layer_types")
    else:  # a layout given layer by layer: the generator keeps its first layers'
        values["layer_types"] = list(config.layer_types[:depth])
    return type(config).from_dict(values)


def share_embeddings(generator: nn.Module, discriminator: nn.Module) -> None:
    """ELECTRA's tied embeddings: the generator uses the discriminator's embedding module (token and segment
    tables, embedding norm) and absolute-position table, and its LM head is re-tied to them."""
    if generator.config.embedding_size != discriminator.config.embedding_size:
        raise ValueError(
            f"the generator's embedding_size={generator.config.embedding_size} differs from the discriminator's "
            f"({discriminator.config.embedding_size}): the embeddings cannot be shared"
        )
    generator.model.embeddings = discriminator.model.embeddings
    if discriminator.config.position_encoding.bounded:  # an absolute table (learned, sinusoidal)
        generator.model.positions = discriminator.model.positions
    generator.tie_weights()


@dataclasses.dataclass
class ReplacedTokenDetectionOutput:
    """`loss` (generator MLM + weight x discriminator BCE) and `metrics`: detached scalars, each this
    micro-batch's share of its window mean (they add up over micro-batches and processes like the loss)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class ReplacedTokenDetection(nn.Module):
    """ELECTRA's generator and discriminator trained together (see the module docstring)."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, discriminator_weight: float) -> None:
        super().__init__()
        share_embeddings(generator, discriminator)
        self.generator, self.discriminator = generator, discriminator
        self.discriminator_weight = discriminator_weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> ReplacedTokenDetectionOutput:
        """`input_ids` masked and `labels` (the original id where masked, -100 elsewhere) as a masked-LM
        collator makes them. `num_items_in_batch`: (masked tokens, non-padding tokens) of the whole
        accumulation window (default: this batch's), the denominators of the two losses."""
        masked = labels != IGNORE_INDEX
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(masked)
        if num_items_in_batch is None:
            num_items_in_batch = torch.stack([masked.sum(), real.sum()]).float()
        n_masked, n_real = num_items_in_batch[0], num_items_in_batch[1]
        inputs = {
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "token_type_ids": token_type_ids,
        }
        gen = self.generator(input_ids, labels=labels, num_items_in_batch=n_masked, **inputs)
        # sparse prediction gives (masked tokens, vocab) logits in the order of `masked`; else every token's
        logits = gen.logits if gen.logits.dim() == 2 else gen.logits[masked]
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(-1)
            original = torch.where(masked, labels, input_ids)
            corrupted = original.masked_scatter(masked, sampled)
            replaced = (corrupted != original) & real
            disc_labels = replaced.long().masked_fill(~real, IGNORE_INDEX)
        disc = self.discriminator(corrupted, labels=disc_labels, num_items_in_batch=n_real, **inputs)
        loss = gen.loss + self.discriminator_weight * disc.loss
        with torch.no_grad():
            correct = ((disc.logits > 0) == replaced) & real
            metrics = {
                "gen_loss": gen.loss.detach().float(),
                "disc_loss": disc.loss.detach().float(),
                "disc_accuracy": correct.sum() / n_real,
                "replaced_fraction": replaced.sum() / n_real,
                "gen_accuracy": (sampled == labels[masked]).sum() / n_masked,
            }
        return ReplacedTokenDetectionOutput(loss=loss, metrics=metrics)


def split_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, dict[str, torch.Tensor]]:
    """The joint model's state dict as {"generator": ..., "discriminator": ...} with each model's own keys; a
    shared tensor that the state dict holds under one name only goes to both."""
    names: dict[int, list[str]] = {}
    for name, tensor in itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    ):
        names.setdefault(id(tensor), []).append(name)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for part in ("generator", "discriminator"):
        module = getattr(model, part)
        own = {}
        for name, tensor in itertools.chain(
            module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
        ):
            key = f"{part}.{name}"
            found = (
                key if key in state_dict else next((n for n in names[id(tensor)] if n in state_dict), None)
            )
            if found is None:
                raise TwinLMError(f"the state dict of the joint model has no value for {key}")
            own[name] = state_dict[found]
        parts[part] = own
    return parts


# ------------------------------------------------------------------------------------------------
# The objectives
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_language_model(
    model: nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    causal: bool,
    max_batches: int | None,
    seed: int,
) -> dict[str, float]:
    """Token-weighted validation loss, perplexity and (masked-token or next-token) accuracy.

    Runs under a forked RNG seeded with `seed`: masking is the same at every evaluation, and the
    training RNG stream is left untouched (so evaluation does not change the training losses).
    """
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, tokens, correct
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in itertools.islice(loader, max_batches):
            batch = to_device(batch, accelerator.device)
            labels = batch.pop("labels")
            with accelerator.autocast():
                logits = model(**batch, use_cache=False).logits
            if causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
            logits = logits.float().reshape(-1, logits.size(-1))
            labels = labels.reshape(-1)
            mask = labels != IGNORE_INDEX
            totals[0] += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").double()
            totals[1] += mask.sum()
            totals[2] += ((logits.argmax(-1) == labels) & mask).sum()
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    loss_sum, tokens, correct = totals.tolist()
    if tokens == 0:
        return {}
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_accuracy": correct / tokens}


class LanguageModelObjective:
    """Masked-LM (BERT: 15% of the tokens, 80/10/10) or next-token prediction (GPT) with one model."""

    exported = ("final",)

    def __init__(self, name: str, causal: bool) -> None:
        self.name, self.causal = name, causal

    def build_model(self, model_config: Any, cfg: Any) -> nn.Module:
        """A new model, or (model.from_pretrained) the trained one to continue pretraining."""
        from twinlm import TwinLMForCausalLM, TwinLMForMaskedLM

        model_class = TwinLMForCausalLM if self.causal else TwinLMForMaskedLM
        if cfg.model.from_pretrained is not None:
            from twinlm.training.pretrained import load_pretrained

            return load_pretrained(model_class, model_config, cfg.model)
        return model_class(model_config)

    def collator(self, tokenizer: Any, cfg: Any) -> Any:
        from twinlm.data import CausalLMCollator, MaskedLMCollator

        if self.causal:
            return CausalLMCollator(tokenizer)
        return MaskedLMCollator(
            tokenizer,
            mlm_probability=cfg.data.mlm_probability,
            whole_word_masking=cfg.data.whole_word_masking,
        )

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens: labels != -100 (shifted by one for the next-token loss)."""
        labels = batch["labels"][:, 1:] if self.causal else batch["labels"]
        return int((labels != IGNORE_INDEX).sum())

    def evaluate(
        self,
        model: nn.Module,
        loader: DataLoader,
        accelerator: Accelerator,
        max_batches: int | None,
        seed: int,
    ) -> dict[str, float]:
        return evaluate_language_model(model, loader, accelerator, self.causal, max_batches, seed)

    def sizes(self, model: nn.Module, seq_len: int) -> dict[str, Any]:
        """{"parameters": exported model's, "flops_per_token": training FLOPs per token}."""
        total, flop_params = parameter_counts(model)
        config = model.config
        return {
            "parameters": total,
            "flops_per_token": flops_per_token(
                flop_params, config.num_hidden_layers, config.hidden_size, seq_len
            ),
        }

    def exports(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, tuple[nn.Module, dict]]:
        """{folder name: (model to save_pretrained, its state dict)}: the model itself as `final`."""
        return {"final": (model, state_dict)}


class ReplacedTokenDetectionObjective:
    """ELECTRA's replaced-token detection (see the module docstring): the run's `rtd` section sizes the
    generator and weighs the losses."""

    name = "replaced-token-detection"
    causal = False
    exported = ("generator", "final")  # the generator first: a run's final/ means both are there

    def build_model(self, model_config: Any, cfg: Any) -> nn.Module:
        from twinlm import TwinLMForMaskedLM, TwinLMForPreTraining

        discriminator = TwinLMForPreTraining(model_config)
        generator = TwinLMForMaskedLM(
            generator_config(model_config, cfg.rtd.generator_size, cfg.rtd.generator_layers)
        )
        return ReplacedTokenDetection(generator, discriminator, cfg.rtd.discriminator_weight)

    def collator(self, tokenizer: Any, cfg: Any) -> Any:
        """ELECTRA's masking: the chosen tokens are 85% [MASK], 15% kept (never a random token: the
        generator makes the replacements)."""
        from twinlm.data import MaskedLMCollator

        return MaskedLMCollator(
            tokenizer,
            mlm_probability=cfg.data.mlm_probability,
            whole_word_masking=cfg.data.whole_word_masking,
            mask_replace_prob=0.85,
            random_replace_prob=0.0,
        )

    def count_targets(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(masked tokens: the generator's targets, non-padding tokens: the discriminator's)."""
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        return int((batch["labels"] != IGNORE_INDEX).sum()), int(real)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        loader: DataLoader,
        accelerator: Accelerator,
        max_batches: int | None,
        seed: int,
    ) -> dict[str, float]:
        """The generator's masked-LM loss and accuracy of its samples, the discriminator's loss and accuracy,
        the replaced share, and val_loss (the training objective), over the validation batches."""
        model.eval()
        totals = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
        ones = torch.ones(2, device=accelerator.device)  # denominators of 1: the outputs are sums
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for batch in itertools.islice(loader, max_batches):
                masked, real = self.count_targets(batch)
                batch = to_device(batch, accelerator.device)
                with accelerator.autocast():
                    out = model(**batch, num_items_in_batch=ones)
                m = out.metrics
                sums = [m["gen_loss"], masked, m["gen_accuracy"], m["disc_loss"], real, m["disc_accuracy"]]
                totals[:6] += torch.tensor(
                    [float(v) for v in sums], dtype=torch.float64, device=totals.device
                )
                totals[6] += float(m["replaced_fraction"])
        model.train()
        gen_loss, masked, gen_correct, disc_loss, real, disc_correct, replaced = accelerator.reduce(
            totals, reduction="sum"
        ).tolist()
        if masked == 0 or real == 0:
            return {}
        weight = accelerator.unwrap_model(model).discriminator_weight
        return {
            "val_loss": gen_loss / masked + weight * disc_loss / real,
            "val_gen_loss": gen_loss / masked,
            "val_gen_accuracy": gen_correct / masked,
            "val_disc_loss": disc_loss / real,
            "val_disc_accuracy": disc_correct / real,
            "val_replaced_fraction": replaced / real,
        }

    def sizes(self, model: nn.Module, seq_len: int) -> dict[str, Any]:
        """The discriminator's parameters (the exported model), the generator's own (not shared) ones, and
        the FLOPs per token of both forward and backward passes."""
        disc_total, disc_flop = parameter_counts(model.discriminator)
        joint_total, joint_flop = parameter_counts(model)
        d, g = model.discriminator.config, model.generator.config
        return {
            "parameters": disc_total,
            "generator_parameters": joint_total - disc_total,
            "flops_per_token": flops_per_token(disc_flop, d.num_hidden_layers, d.hidden_size, seq_len)
            + flops_per_token(joint_flop - disc_flop, g.num_hidden_layers, g.hidden_size, seq_len),
        }

    def exports(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, tuple[nn.Module, dict]]:
        """The discriminator as `final`, the generator as `generator`."""
        parts = split_state_dict(state_dict, model)
        return {
            "generator": (model.generator, parts["generator"]),
            "final": (model.discriminator, parts["discriminator"]),
        }


OBJECTIVES: dict[str, Any] = {
    "mlm": LanguageModelObjective("masked-lm", causal=False),
    "clm": LanguageModelObjective("causal-lm", causal=True),
    "rtd": ReplacedTokenDetectionObjective(),
}


def objective_for(name: str | None, causal: bool) -> Any:
    """The objective a run trains: `objective` from the config, or the model's own (mlm for an encoder,
    clm for a decoder); TwinLMError when the two do not fit together."""
    chosen = name or ("clm" if causal else "mlm")
    objective = OBJECTIVES[chosen]
    if objective.causal != causal:
        kind = "a causal decoder (is_causal=true)" if causal else "a bidirectional encoder (is_causal=false)"
        fits = "clm" if causal else "mlm or rtd"
        raise TwinLMError(f"objective={chosen!r} does not fit the model, {kind}: use objective={fits}")
    return objective


__all__ = [
    "OBJECTIVES",
    "LanguageModelObjective",
    "ReplacedTokenDetection",
    "ReplacedTokenDetectionObjective",
    "evaluate_language_model",
    "generator_config",
    "objective_for",
    "share_embeddings",
    "split_state_dict",
]
