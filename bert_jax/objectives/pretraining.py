"""Pretraining's objective: masked LM + next-sentence (or sentence-order) prediction."""

from bert_jax import losses, models
from bert_jax.objectives.base import Objective


def _pretraining_outputs(
    model, batch, rng=None, deterministic=True, only_predicted=True, **outputs
):
    return model(
        batch["input_ids"],
        batch["input_mask"],
        batch["segment_ids"],
        batch["masked_lm_positions"],
        rng=rng,
        deterministic=deterministic,
        only_predicted_positions=only_predicted,
        **outputs,
    )


def _pretraining_loss(model, batch, rng, deterministic):
    out = _pretraining_outputs(model, batch, rng, deterministic)
    return losses.pretraining_loss(out.mlm_logits, out.nsp_logits, batch)


PRETRAINING = Objective(models.BertForPreTraining, _pretraining_loss, summarize=losses.summarize)
