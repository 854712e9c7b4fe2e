"""Distillation objectives: a frozen teacher's outputs as targets, for a task head
(`task_distillation`) or for pretraining (`pretraining_distillation`, DistilBERT's), with
TinyBERT's layer-wise loss as an option. The teacher's parameters are an input of the train
step, never trained."""

import dataclasses

import jax.numpy as jnp

from bert_jax import losses, models
from bert_jax.models import BertConfig
from bert_jax.objectives.base import Distillation, Objective
from bert_jax.objectives.heads import _run
from bert_jax.objectives.pretraining import PRETRAINING, _pretraining_outputs


def task_distillation(
    objective: Objective,
    teacher_config: BertConfig,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    layerwise: float = 0.0,
    prediction: bool = True,
    student_config: BertConfig | None = None,
) -> Objective:
    """`objective` (a fine-tuning task's) trained against a fine-tuned teacher of the same
    head, in the step: `prediction`, `losses.task_distillation_loss` on both models' head
    outputs; plus `layerwise` x TinyBERT's intermediate-layer loss
    (`losses.layerwise_distillation_loss`: hidden states and attention probabilities, the
    student's layer m against the teacher's layer m x N / M, its embeddings against the
    teacher's; through a trained projection when `student_config` is narrower). TinyBERT's
    two task stages: `layerwise=1, prediction=False`, then `layerwise=0` with alpha 1."""
    if objective.head_loss is None:
        raise ValueError("task distillation needs a fine-tuning task's head (not pretraining)")
    if temperature <= 0 or not 0.0 <= alpha <= 1.0 or layerwise < 0:
        raise ValueError(
            f"distillation temperature={temperature} must be > 0, alpha={alpha} in [0, 1] and "
            f"layerwise={layerwise} >= 0"
        )
    if not prediction and not layerwise:
        raise ValueError("distillation with prediction=False needs a layerwise weight > 0")
    own_params, mapping, outputs = _layerwise_setup(layerwise, student_config, teacher_config)

    def loss(student, teacher, batch, rng, deterministic, own=None):
        *s_heads, s_enc = _run(student, batch, rng, deterministic, **outputs)
        *t_heads, t_enc = _run(teacher, batch, **outputs)
        s_logits = s_heads[0] if len(s_heads) == 1 else tuple(s_heads)
        t_logits = t_heads[0] if len(t_heads) == 1 else tuple(t_heads)
        if prediction:
            total, sums = losses.task_distillation_loss(
                s_logits,
                t_logits,
                objective.head_loss,
                batch,
                temperature=temperature,
                alpha=alpha,
            )
        else:
            total, sums = 0.0, objective.head_loss(s_logits, batch)[1]
        if layerwise:
            total, sums = _add_layerwise(total, sums, layerwise, mapping, s_enc, t_enc, batch, own)
        return total, sums

    def summarize(sums):
        count = max(float(sums["count"]), 1e-5)
        out = {**objective.summarize(sums), **_layerwise_summary(sums)}
        if "distill_loss_sum" in sums:
            out["distill_loss"] = float(sums["distill_loss_sum"]) / count
        return out

    return dataclasses.replace(
        objective,
        distill=Distillation(objective.model_cls, teacher_config, loss, own_params),
        summarize=summarize,
    )


def _layerwise_setup(layerwise: float, student_config, teacher_config):
    """(the projection's initialiser or None, the layer map, the model outputs to ask for)
    of a distillation with `layerwise` weight (None, None, {} without)."""
    if not layerwise:
        return None, None, {}
    if student_config is None:
        raise ValueError("layer-wise distillation needs the student's config")
    own_params, mapping = _layer_map(student_config, teacher_config)
    return own_params, mapping, dict(output_hidden_states=True, output_attentions=True)


def _add_layerwise(total, sums, weight, mapping, s_enc, t_enc, batch, own):
    """`total` + weight x `losses.layerwise_distillation_loss` of the mapped layers, and the
    sums with its parts (per batch, weighted by its sequences, to average over batches)."""
    hidden, probs = mapping
    layer_loss, parts = losses.layerwise_distillation_loss(
        s_enc.hidden_states,
        t_enc.hidden_states[jnp.asarray(hidden)],
        s_enc.attentions,
        t_enc.attentions[jnp.asarray(probs)],
        batch["input_mask"],
        None if own is None else (own["kernel"], own["bias"]),
    )
    rows = jnp.float32(batch["input_ids"].shape[0])
    added = {f"{k}_sum": v * rows for k, v in parts.items()}
    return total + weight * layer_loss, {**sums, **added, "layerwise_count": rows}


def _layerwise_summary(sums) -> dict[str, float]:
    if "layerwise_count" not in sums:
        return {}
    rows = max(float(sums["layerwise_count"]), 1.0)
    return {k: float(sums[f"{k}_sum"]) / rows for k in ("hidden_mse", "attention_mse")}


def _layer_map(student: BertConfig, teacher: BertConfig):
    """TinyBERT's uniform map (student layer m to teacher layer m x N / M, embeddings to
    embeddings) as indices into the teacher's hidden states and attention probabilities, and
    the projection's initialiser when the widths differ (None when they are equal)."""
    m, n = student.num_hidden_layers * student.inner_group_num, teacher.num_hidden_layers
    n *= teacher.inner_group_num
    if n % m:
        raise ValueError(
            f"layer-wise distillation maps the student's {m} layers onto the teacher's {n} "
            f"uniformly: choose a student depth that divides {n}"
        )
    if student.num_attention_heads != teacher.num_attention_heads:
        raise ValueError(
            f"layer-wise distillation compares attention head by head: the student has "
            f"{student.num_attention_heads} heads, the teacher {teacher.num_attention_heads}; "
            f"give the student the teacher's head count (TinyBERT 4 x 312 has 12)"
        )
    step = n // m
    hidden = [i * step for i in range(m + 1)]
    probs = [(i + 1) * step - 1 for i in range(m)]
    d, big = student.hidden_size, teacher.hidden_size
    if d == big:
        return None, (hidden, probs)

    def init(key):
        return {
            "kernel": models.layers.truncated_normal(student.initializer_range)(key, (d, big)),
            "bias": jnp.zeros((big,), jnp.float32),
        }

    return init, (hidden, probs)


def pretraining_distillation(
    teacher_config: BertConfig,
    *,
    temperature: float = 2.0,
    alpha_ce: float = 5.0,
    alpha_mlm: float = 2.0,
    alpha_cos: float = 1.0,
    layerwise: float = 0.0,
    student_config: BertConfig | None = None,
) -> Objective:
    """Pretraining against a frozen pretrained teacher (DistilBERT's objective and weights,
    `losses.pretraining_distillation_loss`; its hidden-state term needs the teacher's width),
    plus `layerwise` x TinyBERT's intermediate-layer loss (its general distillation; see
    `task_distillation`), through a trained projection when `student_config` is narrower."""
    if temperature <= 0 or min(alpha_ce, alpha_mlm, alpha_cos, layerwise) < 0:
        raise ValueError(
            f"distillation temperature={temperature} must be > 0 and its weights "
            f"(alpha_ce={alpha_ce}, alpha_mlm={alpha_mlm}, alpha_cos={alpha_cos}, "
            f"layerwise={layerwise}) >= 0"
        )
    own_params, mapping, outputs = _layerwise_setup(layerwise, student_config, teacher_config)
    # The hidden-state losses read every token's states, not only the predicted positions'.
    only_predicted = alpha_cos == 0 and not layerwise

    def loss(student, teacher, batch, rng, deterministic, own=None):
        s = _pretraining_outputs(student, batch, rng, deterministic, only_predicted, **outputs)
        t = _pretraining_outputs(teacher, batch, only_predicted=only_predicted, **outputs)
        total, sums = losses.pretraining_distillation_loss(
            s,
            t,
            batch,
            temperature=temperature,
            alpha_ce=alpha_ce,
            alpha_mlm=alpha_mlm,
            alpha_cos=alpha_cos,
        )
        if layerwise:
            total, sums = _add_layerwise(
                total, sums, layerwise, mapping, s.encoder, t.encoder, batch, own
            )
        return total, sums

    def summarize(sums):
        out = {**losses.summarize(sums), **_layerwise_summary(sums)}
        if "distill_loss_sum" in sums:
            out["distill_loss"] = float(sums["distill_loss_sum"]) / max(
                float(sums["mlm_count"]), 1e-5
            )
            out["cosine_loss"] = float(sums["cosine_loss_sum"]) / max(
                float(sums["token_count"]), 1.0
            )
        return out

    return dataclasses.replace(
        PRETRAINING,
        distill=Distillation(models.BertForPreTraining, teacher_config, loss, own_params),
        summarize=summarize,
    )
