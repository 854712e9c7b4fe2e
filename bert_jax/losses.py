"""Pretraining and task losses and on-device metrics (jnp only)."""

import jax
import jax.numpy as jnp


def weighted_cross_entropy(
    logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum of weighted token losses, sum of weighted correct predictions, sum of weights.

    Args:
      logits: [..., V] float32.
      labels: [...] int32.
      weights: [...] float32 (0 for padded predictions).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(correct * weights), jnp.sum(weights)


def pretraining_loss(mlm_logits, nsp_logits, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked-LM loss (mean over real predictions, as the original) + next-sentence loss.

    Args:
      mlm_logits: [B, P, V] float32 at `masked_lm_positions`.
      nsp_logits: [B, 2] float32.
      batch: holds `masked_lm_ids` [B, P] int32, `masked_lm_weights` [B, P] float32 and
        `next_sentence_labels` [B] int32.

    Returns:
      (total loss, metric sums: the `*_sum` entries add over batches, `*_count` normalise them).
    """
    weights = batch["masked_lm_weights"].astype(jnp.float32)
    mlm_sum, mlm_correct, mlm_count = weighted_cross_entropy(
        mlm_logits, batch["masked_lm_ids"], weights
    )
    nsp_weights = jnp.ones(nsp_logits.shape[:1], jnp.float32)
    nsp_sum, nsp_correct, nsp_count = weighted_cross_entropy(
        nsp_logits, batch["next_sentence_labels"], nsp_weights
    )
    # The original divides by (sum of weights + 1e-5) so an all-padding batch gives 0, not NaN.
    loss = mlm_sum / (mlm_count + 1e-5) + nsp_sum / nsp_count
    metrics = {
        "mlm_loss_sum": mlm_sum,
        "mlm_correct_sum": mlm_correct,
        "mlm_count": mlm_count,
        "nsp_loss_sum": nsp_sum,
        "nsp_correct_sum": nsp_correct,
        "nsp_count": nsp_count,
    }
    return loss, metrics


def masked_lm_loss(mlm_logits, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The masked-LM loss alone (RoBERTa's and ModernBERT's pretraining): `pretraining_loss`
    without the sentence-pair term; `next_sentence_labels`, if the batch has them, are unused."""
    weights = batch["masked_lm_weights"].astype(jnp.float32)
    mlm_sum, mlm_correct, mlm_count = weighted_cross_entropy(
        mlm_logits, batch["masked_lm_ids"], weights
    )
    metrics = {"mlm_loss_sum": mlm_sum, "mlm_correct_sum": mlm_correct, "mlm_count": mlm_count}
    return mlm_sum / (mlm_count + 1e-5), metrics


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Metric sums (possibly added over batches) -> losses and accuracies (the sentence-pair
    head's where the objective has one)."""
    out = {}
    for name in ("mlm", "nsp"):
        if f"{name}_count" in sums:
            n = max(float(sums[f"{name}_count"]), 1e-5)
            out[f"{name}_loss"] = float(sums[f"{name}_loss_sum"]) / n
            out[f"{name}_accuracy"] = float(sums[f"{name}_correct_sum"]) / n
    return out


def summarize_task(sums: dict[str, float]) -> dict[str, float]:
    """A task objective's sums -> its mean `loss` and `accuracy` (what `correct_sum` counts:
    classes, both span ends, tagged tokens)."""
    count = max(float(sums["count"]), 1e-5)
    return {
        "loss": float(sums["loss_sum"]) / count,
        "accuracy": float(sums["correct_sum"]) / count,
    }


def classification_loss(logits, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy over classes, or mean squared error when `logits` is [B, 1] (STS-B).

    Args:
      logits: [B, C] float32, or [B, K, C] for K packed examples per row.
      batch: holds `label` [B] or [B, K] (int32 classes or float32 scores) and optionally
        `label_weights` of the same shape, float32 (0 for the padding rows of a last, partial
        batch and the unused slots of packed rows).

    Returns:
      (mean loss over real examples, metric sums `loss_sum`, `correct_sum`, `count`).
    """
    weights = batch.get("label_weights", jnp.ones(logits.shape[:-1], jnp.float32))
    weights = weights.astype(jnp.float32)
    if logits.shape[-1] == 1:
        err = logits[..., 0] - batch["label"].astype(jnp.float32)
        loss_sum, correct = jnp.sum(err**2 * weights), jnp.zeros((), jnp.float32)
        count = jnp.sum(weights)
    else:
        loss_sum, correct, count = weighted_cross_entropy(logits, batch["label"], weights)
    loss = loss_sum / jnp.maximum(count, 1e-5)
    return loss, {"loss_sum": loss_sum, "correct_sum": correct, "count": count}


def span_loss(start_logits, end_logits, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Extractive QA: the mean of the start and end cross-entropies over the window's
    positions (run_squad.py's and `transformers`' loss).

    Args:
      start_logits, end_logits: [B, L] float32.
      batch: holds `start_positions` and `end_positions` [B] int32 (0: [CLS], no answer in
        the window) and optionally `label_weights` [B] float32 (0 for padding rows).

    Returns:
      (mean loss over real rows, metric sums `loss_sum`, `correct_sum` (start and end both
      right), `count`).
    """
    weights = batch.get("label_weights", jnp.ones(start_logits.shape[:1], jnp.float32))
    weights = weights.astype(jnp.float32)
    start_sum, _, count = weighted_cross_entropy(start_logits, batch["start_positions"], weights)
    end_sum, _, _ = weighted_cross_entropy(end_logits, batch["end_positions"], weights)
    both = (jnp.argmax(start_logits, -1) == batch["start_positions"]) & (
        jnp.argmax(end_logits, -1) == batch["end_positions"]
    )
    loss_sum = (start_sum + end_sum) / 2
    correct = jnp.sum(both.astype(jnp.float32) * weights)
    return loss_sum / jnp.maximum(count, 1e-5), {
        "loss_sum": loss_sum,
        "correct_sum": correct,
        "count": count,
    }


def token_loss(logits, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token classification: cross-entropy over the labelled tokens (each word's first
    piece), their mean as the loss (`transformers`' loss with -100 elsewhere).

    Args:
      logits: [B, L, C] float32.
      batch: holds `labels` [B, L] int32 and `label_weights` [B, L] float32 (1 on the tokens
        that carry a label, 0 elsewhere and on padding rows).

    Returns:
      (mean loss, metric sums `loss_sum`, `correct_sum`, `count` over labelled tokens).
    """
    weights = batch["label_weights"].astype(jnp.float32)
    loss_sum, correct, count = weighted_cross_entropy(logits, batch["labels"], weights)
    loss = loss_sum / jnp.maximum(count, 1e-5)
    return loss, {"loss_sum": loss_sum, "correct_sum": correct, "count": count}


def soft_cross_entropy(student, teacher, weights, temperature: float) -> jax.Array:
    """Hinton et al.'s distillation term, summed over weighted positions: T^2 times the
    cross-entropy of the student's distribution at temperature T against the teacher's
    (T^2 keeps its gradients on the scale of the hard loss's). Regression heads (one output)
    take the squared difference instead.

    Args:
      student, teacher: [..., C] logits.
      weights: [...] float32 (0 for padding and unlabelled positions).
    """
    student, teacher = student.astype(jnp.float32), teacher.astype(jnp.float32)
    if student.shape[-1] == 1:
        return jnp.sum((student[..., 0] - teacher[..., 0]) ** 2 * weights)
    targets = jax.nn.softmax(teacher / temperature, axis=-1)
    log_probs = jax.nn.log_softmax(student / temperature, axis=-1)
    per_position = -jnp.sum(targets * log_probs, axis=-1) * temperature**2
    return jnp.sum(per_position * weights)


def task_distillation_loss(
    student, teacher, hard_loss_fn, batch, *, temperature: float, alpha: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(1 - alpha) x the task's own loss + alpha x the mean `soft_cross_entropy` against the
    teacher's outputs, over the positions the task's loss counts (`label_weights`, all rows
    without it). QA's start and end distributions count half each, as in its own loss.

    Args:
      student, teacher: a head's outputs (an array, or QA's (start, end) pair).
      hard_loss_fn: `(outputs, batch) -> (loss, sums)`, the task's loss.

    Returns:
      (loss, the task loss's sums plus `distill_loss_sum`).
    """
    hard, sums = hard_loss_fn(student, batch)
    pairs = (
        list(zip(student, teacher, strict=True))
        if isinstance(student, tuple)
        else [(student, teacher)]
    )
    weights = batch.get("label_weights", jnp.ones(pairs[0][0].shape[:-1], jnp.float32))
    weights = weights.astype(jnp.float32)
    soft_sum = sum(soft_cross_entropy(s, t, weights, temperature) for s, t in pairs) / len(pairs)
    soft = soft_sum / jnp.maximum(jnp.sum(weights), 1e-5)
    loss = (1.0 - alpha) * hard + alpha * soft
    return loss, {**sums, "distill_loss_sum": soft_sum}


def layerwise_distillation_loss(
    student_hidden, teacher_hidden, student_probs, teacher_probs, token_weights, projection=None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """TinyBERT's intermediate-layer loss: the mean squared error between the student's
    hidden states (embeddings first, then each layer's output; mapped into the teacher's
    width by `projection` when given) and the teacher's at the layers they are mapped to, plus
    the mean squared error between their attention probabilities; each a mean over the real
    tokens (query tokens for attention) of one layer, summed over the layers.

    Args:
      student_hidden, teacher_hidden: [M + 1, B, L, d] and [M + 1, B, L, D], already the
        mapped pairs (teacher layer n(m) at index m).
      student_probs, teacher_probs: [M, B, H, L, L], the mapped pairs; the same head count.
      token_weights: [B, L], 1 for real tokens.
      projection: None (d == D), or (kernel [d, D], bias [D]).

    Returns:
      (hidden + attention, {"hidden_mse": hidden, "attention_mse": attention}).
    """
    student_hidden = student_hidden.astype(jnp.float32)
    if projection is not None:
        kernel, bias = projection
        student_hidden = student_hidden @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)
    w = (token_weights > 0).astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(w), 1.0)
    diff = jnp.square(student_hidden - teacher_hidden.astype(jnp.float32))
    hidden = jnp.sum(jnp.sum(diff, axis=-1) * w) / (tokens * student_hidden.shape[-1])
    diff = jnp.square(student_probs.astype(jnp.float32) - teacher_probs.astype(jnp.float32))
    per_query = jnp.sum(diff, axis=-1)  # [M, B, H, L]
    heads, keys = student_probs.shape[2], student_probs.shape[-1]
    attention = jnp.sum(per_query * w[None, :, None, :]) / (tokens * heads * keys)
    return hidden + attention, {"hidden_mse": hidden, "attention_mse": attention}


def cosine_distance(student, teacher, weights) -> jax.Array:
    """Sum over weighted positions of 1 - cos(student, teacher) of their vectors [..., D]
    (DistilBERT's loss aligning the student's hidden states with the teacher's)."""
    student, teacher = student.astype(jnp.float32), teacher.astype(jnp.float32)
    dot = jnp.sum(student * teacher, axis=-1)
    norms = jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1)
    return jnp.sum((1.0 - dot / jnp.maximum(norms, 1e-8)) * weights)


def pretraining_distillation_loss(
    student, teacher, batch, *, temperature: float, alpha_ce: float, alpha_mlm: float,
    alpha_cos: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """DistilBERT's loss: alpha_ce x `soft_cross_entropy` against the teacher's masked-LM
    distribution at the masked positions (mean over them) + alpha_mlm x the pretraining loss
    on the labels (`pretraining_loss`: masked LM and the sentence head) + alpha_cos x the
    mean `cosine_distance` between the last hidden states at the real tokens (at [CLS] and
    the masked positions when the models computed only those, `only_predicted_positions`;
    with alpha_cos 0 the widths may differ, the term then logged as 0).

    Args:
      student, teacher: `PretrainingOutput`s of the same batch (logits at the masked
        positions, `encoder.sequence_output` [B, L, D]).
    """
    hard, sums = pretraining_loss(student.mlm_logits, student.nsp_logits, batch)
    weights = batch["masked_lm_weights"].astype(jnp.float32)
    soft_sum = soft_cross_entropy(student.mlm_logits, teacher.mlm_logits, weights, temperature)
    tokens = batch["input_mask"].astype(jnp.float32)
    if student.encoder.sequence_output.shape[1] != tokens.shape[1]:  # [CLS] and masked only
        tokens = jnp.concatenate([tokens[:, :1], weights], axis=1)
    s_last, t_last = student.encoder.sequence_output, teacher.encoder.sequence_output
    if alpha_cos == 0 and s_last.shape != t_last.shape:  # off, and widths differ: nothing to log
        cos_sum = jnp.zeros((), jnp.float32)
    else:
        cos_sum = cosine_distance(s_last, t_last, tokens)
    token_count = jnp.sum(tokens)
    loss = (
        alpha_ce * soft_sum / (jnp.sum(weights) + 1e-5)
        + alpha_mlm * hard
        + alpha_cos * cos_sum / jnp.maximum(token_count, 1.0)
    )
    return loss, {
        **sums,
        "distill_loss_sum": soft_sum,
        "cosine_loss_sum": cos_sum,
        "token_count": token_count,
    }
