"""What a train step computes: pretraining, the task heads' losses and distillation, each an
`Objective` that the one train step of `bert_jax.training` runs; `contrastive`: the losses of
sentence embeddings and GradCache."""

from bert_jax.objectives.base import OWN_PARAMS, Batch, Distillation, Objective
from bert_jax.objectives.contrastive import Embedding, embedding_objective
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
from bert_jax.objectives.pretraining import MASKED_LM, MLM_ONLY, PRETRAINING
from bert_jax.objectives.pretraining import data_problem as pretraining_data_problem
from bert_jax.objectives.pretraining import for_config as pretraining_objective

__all__ = [
    "MASKED_LM",
    "MLM_ONLY",
    "OWN_PARAMS",
    "PRETRAINING",
    "QUESTION_ANSWERING",
    "Batch",
    "Distillation",
    "Embedding",
    "Objective",
    "classification",
    "embedding_objective",
    "multiple_choice",
    "pretraining_data_problem",
    "pretraining_distillation",
    "pretraining_objective",
    "task_distillation",
    "token_classification",
]
