"""Pretraining's objectives: masked LM + next-sentence (or sentence-order) prediction, as
BERT and ALBERT; masked LM alone, as RoBERTa, XLM-R and ModernBERT (`for_config` picks)."""

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


def _masked_lm_loss(model, batch, rng, deterministic):
    logits, _ = model(
        batch["input_ids"],
        batch["input_mask"],
        batch["segment_ids"],
        batch["masked_lm_positions"],
        rng=rng,
        deterministic=deterministic,
    )
    return losses.masked_lm_loss(logits, batch)


MASKED_LM = Objective(models.BertForMaskedLM, _masked_lm_loss, summarize=losses.summarize)
# The families whose released models pretrain without a sentence-pair head.
MLM_ONLY = ("roberta", "xlm-roberta", "modernbert")


def for_config(config: models.BertConfig) -> Objective:
    """The pretraining objective of a config's family."""
    return MASKED_LM if config.model_type in MLM_ONLY else PRETRAINING


def data_problem(config: models.BertConfig, masking) -> str:
    """Why pretraining instances made as `masking` (a `MaskingConfig`) do not suit the
    objective of `config`'s family ("" when they do)."""
    mlm_only = config.model_type in MLM_ONLY
    if mlm_only == (masking.next_sentence == "none"):
        return ""
    if mlm_only:
        return (
            f"a {config.model_type} model pretrains with masked LM alone: set "
            f"--config.data.next_sentence=none"
        )
    return (
        f"a {config.model_type} model pretrains with a sentence-pair head: set "
        f"--config.data.next_sentence=nsp (or sop)"
    )
