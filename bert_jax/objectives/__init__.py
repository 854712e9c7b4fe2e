"""What a train step computes: pretraining, the task heads' losses and distillation, each an
`Objective` that the one train step of `bert_jax.training` runs."""

from bert_jax.objectives.base import OWN_PARAMS, Batch, Distillation, Objective
from bert_jax.objectives.distillation import (
    pretraining_distillation,
    task_distillation,
)
from bert_jax.objectives.heads import (
    QUESTION_ANSWERING,
    classification,
    multiple_choice,
    token_classification,
)
from bert_jax.objectives.pretraining import PRETRAINING

__all__ = [
    "OWN_PARAMS",
    "PRETRAINING",
    "QUESTION_ANSWERING",
    "Batch",
    "Distillation",
    "Objective",
    "classification",
    "multiple_choice",
    "pretraining_distillation",
    "task_distillation",
    "token_classification",
]
