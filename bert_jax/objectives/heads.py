"""Fine-tuning objectives: a task head's outputs and its loss (classification or regression,
token classification, multiple choice, span QA), sharing one train step."""

import functools

from bert_jax import losses, models
from bert_jax.objectives.base import Objective


def _run(model, batch, rng=None, deterministic=True, **outputs):
    """A task model on a batch: (its head's outputs..., the encoder's output)."""
    return model(
        batch["input_ids"],
        batch["input_mask"],
        batch["segment_ids"],
        rng=rng,
        deterministic=deterministic,
        packing=models.Packing.from_batch(batch),
        **outputs,
    )


def _head_logits(model, batch, rng=None, deterministic=True):
    """A task head's outputs without the encoder's: class logits [B, C] (or [B, K, C] for a
    packed batch, `encoding.pack`), token logits [B, L, C], choice logits [B, C], or QA's
    (start [B, L], end [B, L])."""
    *logits, _ = _run(model, batch, rng, deterministic)
    return logits[0] if len(logits) == 1 else tuple(logits)


def _head_objective(model_cls, loss_fn) -> Objective:
    """A fine-tuning objective: `loss_fn(head outputs, batch)` on `model_cls`'s head."""
    return Objective(
        model_cls,
        lambda model, batch, rng, deterministic: loss_fn(
            _head_logits(model, batch, rng, deterministic), batch
        ),
        _head_logits,
        head_loss=loss_fn,
    )


QUESTION_ANSWERING = _head_objective(
    models.BertForQuestionAnswering, lambda logits, batch: losses.span_loss(*logits, batch)
)


def classification(num_labels: int, classifier_dropout: float | None = None) -> Objective:
    """Sequence classification with `num_labels` classes, or regression when it is 1.
    `classifier_dropout` None: the encoder's hidden dropout."""
    return _head_objective(
        functools.partial(
            models.BertForSequenceClassification,
            num_labels=num_labels,
            classifier_dropout=classifier_dropout,
        ),
        losses.classification_loss,
    )


def token_classification(num_labels: int, classifier_dropout: float | None = None) -> Objective:
    """A label per token (named entities): the loss on each word's first piece."""
    return _head_objective(
        functools.partial(
            models.BertForTokenClassification,
            num_labels=num_labels,
            classifier_dropout=classifier_dropout,
        ),
        losses.token_loss,
    )


def multiple_choice(classifier_dropout: float | None = None) -> Objective:
    """One score per choice from each (context, choice) row's pooled output; cross-entropy
    over the choices (SWAG). Batches hold [B, C, L] inputs and a `label` [B]."""
    return _head_objective(
        functools.partial(models.BertForMultipleChoice, classifier_dropout=classifier_dropout),
        losses.classification_loss,
    )
