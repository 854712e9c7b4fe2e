"""Training any objective: the `Trainer` (sharded state, jitted steps), the pure steps
(accumulation, the non-finite guard) and memory estimates."""

from bert_jax.training.memory import activation_bytes_estimate, memory_estimate
from bert_jax.training.step import (
    TrainState,
    bind_frozen,
    make_eval_step,
    make_predict_step,
    make_train_step,
    model_params,
)
from bert_jax.training.trainer import TRAINING_QUANTIZED, Trainer, create_trainer

__all__ = [
    "TRAINING_QUANTIZED",
    "TrainState",
    "Trainer",
    "activation_bytes_estimate",
    "bind_frozen",
    "create_trainer",
    "make_eval_step",
    "make_predict_step",
    "make_train_step",
    "memory_estimate",
    "model_params",
]
