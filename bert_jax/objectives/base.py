"""What a step computes: an `Objective` (the model class, its loss, prediction and the
summary of its metric sums), and a `Distillation`'s frozen teacher beside it."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from bert_jax import losses, models
from bert_jax.models import BertConfig

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
    """The model a run trains and what its steps compute from a batch.

    `loss(model, batch, rng, deterministic) -> (loss, metric sums)`;
    `predict(model, batch) -> outputs` for inference;
    `summarize(metric sums, possibly added over batches) -> named metrics`, what logs and
    progress bars report (a task's `loss` and `accuracy` unless the objective says more).
    """

    model_cls: Callable[..., nnx.Module]
    loss: Callable[..., tuple[jax.Array, dict]]
    predict: Callable[..., Any] | None = None
    summarize: Callable[[dict], dict[str, float]] = losses.summarize_task
    # A task head's loss from its outputs, `(outputs, batch) -> (loss, sums)`.
    head_loss: Callable[..., tuple[jax.Array, dict]] | None = None
    # Set: the train step also takes a frozen teacher's parameters and trains with this loss;
    # evaluation and prediction stay the student's own (`loss`, `predict`).
    distill: "Distillation | None" = None
    # Set (`contrastive.Embedding`): a sentence-embedding objective, whose train step embeds
    # the whole batch in chunks (GradCache) rather than accumulating micro-batches, so that
    # every example meets the whole batch's negatives.
    embedding: Any = None

    def train_loss(self, model, own, batch, rng, frozen=None):
        """The loss the train step differentiates, with dropout: `loss`, or a distillation's
        given `frozen`, the teacher's parameters (no gradient reaches them), and `own`, the
        objective's own trained weights (`OWN_PARAMS`; None without)."""
        if (frozen is None) != (self.distill is None):
            raise ValueError("a distillation objective's train step takes the teacher's params")
        if self.distill is None:
            return self.loss(model, batch, rng, False)
        teacher = models.merge_params(self.distill.graphdef(), jax.lax.stop_gradient(frozen))
        return self.distill.loss(model, teacher, batch, rng, False, own)


# The key under which a distillation objective keeps weights of its own (TinyBERT's
# projection into the teacher's width) in the train state's params, beside the model's.
OWN_PARAMS = "distill"


@dataclasses.dataclass(frozen=True)
class Distillation:
    """A frozen teacher in the train step: its model class and config, and
    `loss(student, teacher, batch, rng, deterministic, own) -> (loss, sums)` (models both;
    the teacher runs without dropout and its parameters get no gradient). `own_params(key)`:
    trainable weights of the objective itself (None: none), trained with the student's and
    kept in its params under `OWN_PARAMS`, which the model, evaluation and prediction ignore
    (a checkpoint of the run still loads as the student alone)."""

    teacher_cls: Callable[..., nnx.Module]
    teacher_config: BertConfig
    loss: Callable[..., tuple[jax.Array, dict]]
    own_params: Callable[[jax.Array], models.Params] | None = None

    def graphdef(self) -> nnx.GraphDef:
        """The teacher's static graph, its parameters merged into it by `train_loss`."""
        return models.split_params(models.abstract_model(self.teacher_config, self.teacher_cls))[0]
