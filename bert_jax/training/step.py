"""The pure train, evaluation and predict steps of any `Objective`, and the state they map:
gradient accumulation over micro-batches, per-replica accumulation, the non-finite guard."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from bert_jax import axes, models, sharding
from bert_jax.objectives import OWN_PARAMS, PRETRAINING, Batch, Objective, contrastive
from bert_jax.optim import OptimConfig, make_schedule


@struct.dataclass
class TrainState:
    """Everything a step changes: step [] int32, params, optimizer state, base dropout key
    (raw uint32[2], folded with the step so that each step draws fresh, reproducible masks)."""

    step: jax.Array
    params: models.Params
    opt_state: Any
    rng: jax.Array


def model_params(params: models.Params) -> models.Params:
    """The model's parameters of a run's params (without a distillation's own weights)."""
    return {k: v for k, v in params.items() if k != OWN_PARAMS}


def _forward(graphdef, params, batch, rules, objective, *, rng, deterministic):
    """The objective's own loss and metric sums (evaluation's; training's is `train_loss`)."""
    model = models.merge_params(graphdef, model_params(params))
    with axes.axis_rules(rules):  # active while tracing: activations get their shardings
        return objective.loss(model, batch, rng, deterministic)


def bind_frozen(step, frozen):
    """`step(state, batch, frozen)` (jitted or compiled) as `step(state, batch)`."""
    return _WithFrozen(step, frozen)


class _WithFrozen:
    """A jitted `step(state, batch, frozen)` called as `step(state, batch)`: the objective's
    frozen input (a teacher's parameters), placed once and never donated, goes in as an input
    of every call, not as constants of the program."""

    def __init__(self, step, frozen):
        self.step, self.frozen = step, frozen

    def __call__(self, state, batch):
        return self.step(state, batch, self.frozen)

    def _abstract_frozen(self):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.frozen
        )

    def trace(self, state, batch):
        return self.step.trace(state, batch, self._abstract_frozen())

    def lower(self, state, batch):
        return self.step.lower(state, batch, self._abstract_frozen())


@dataclasses.dataclass(frozen=True)
class _Gradients:
    """`(params, frozen, batch, rng) -> (loss, metric sums, gradients)` of the objective's
    train loss on one (micro-)batch, with dropout."""

    graphdef: nnx.GraphDef
    objective: Objective
    rules: sharding.Rules
    replicas: int = 1  # the `data` mesh axis's size when the batch is split over it

    def __call__(self, params, frozen, batch, rng):
        embedding = self.objective.embedding
        if embedding is not None and embedding.chunk_size and frozen is None:
            return self._cached(embedding, params, batch, rng)

        def loss_fn(p):
            model = models.merge_params(self.graphdef, model_params(p))
            with axes.axis_rules(self.rules):
                return self.objective.train_loss(model, p.get(OWN_PARAMS), batch, rng, frozen)

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, sums, grads

    def _cached(self, embedding, params, batch, rng):
        """A sentence-embedding objective's loss and gradients by GradCache: the batch's
        texts embedded `embedding.chunk_size` at a time, the loss over all of them."""
        texts = contrastive.texts_of(batch)
        examples = batch["input_ids"].shape[:2]
        # Per replica (each its own rows of a chunk, one gradient sum after the last chunk)
        # when every replica has rows of each chunk to itself.
        replicas = self.replicas if embedding.chunk_size % self.replicas == 0 else 1
        rules = _without_data(self.rules) if replicas > 1 else self.rules

        def embed(p, chunk, key):
            model = models.merge_params(self.graphdef, model_params(p))
            with axes.axis_rules(rules):
                return embedding.embed(model, chunk, key, False)

        def loss(vectors):
            return embedding.loss(vectors.reshape(*examples, -1), batch)

        (value, sums), grads = contrastive.grad_cache(
            embed,
            loss,
            params,
            texts,
            rng,
            embedding.chunk_size,
            replicas=replicas,
            spmd_axis_name="data" if replicas > 1 else None,
        )
        return value, sums, grads

    def per_replica(self, replicas: int):
        """The same over a batch split between `replicas` along the `data` axis: each
        replica's (loss, sums, grads) [R, ...] of its own rows, within which the batch is
        split over the other batch axes (fsdp) only."""
        inner = dataclasses.replace(self, rules=_without_data(self.rules))

        def grads(params, frozen, batch, rng):
            split = jax.tree.map(lambda x: x.reshape(replicas, -1, *x.shape[1:]), batch)
            return jax.vmap(inner, in_axes=(None, None, 0, 0), spmd_axis_name="data")(
                params, frozen, split, jax.random.split(rng, replicas)
            )

        return grads


def _without_data(rules: sharding.Rules) -> sharding.Rules:
    """`rules` with the batch no longer split over the `data` mesh axis (inside a `vmap`
    over that axis, each replica's rows stay on its devices)."""
    return tuple(
        (name, tuple(a for a in ((t,) if isinstance(t, str) else t or ()) if a != "data"))
        if name == axes.BATCH
        else (name, t)
        for name, t in rules
    )


def _accumulate(gradients: _Gradients, params, frozen, batch, key, k: int, replicas: int):
    """(loss, sums, grads) of the whole batch as the mean of `k` micro-batches' by a scan.

    Over `replicas` > 1 (the `data` mesh axis) each replica accumulates the gradient of its
    own rows, summed across replicas once after the scan: without that, the partitioner sums
    every micro-batch's gradient across the replicas, k all-reduces of the whole gradient per
    step instead of one."""
    if k == 1:
        return gradients(params, frozen, batch, key)
    # Micro-batch j takes rows j, j + k, j + 2k, ...: every device's rows of the batch (a
    # contiguous block of them) split evenly between the micro-batches, so that forming them
    # moves no data between devices.
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch
    )
    # Per replica when every replica has rows of each micro-batch to itself.
    per_replica = replicas > 1 and (batch["input_ids"].shape[0] // k) % replicas == 0
    fn = gradients.per_replica(replicas) if per_replica else gradients

    def body(carry, xs):
        index, mb = xs
        out = fn(params, frozen, mb, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, params, frozen, first, key))
    (loss, sums, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    n = k * (replicas if per_replica else 1)
    if per_replica:  # the one sum across replicas
        loss, sums, grads = jax.tree.map(lambda x: x.sum(0), (loss, sums, grads))
    return loss / n, sums, jax.tree.map(lambda g: g / n, grads)


def _guarded_update(tx, state: TrainState, loss, grads):
    """(params, opt_state, finite, grad_norm) after one optimizer update, or the state's own
    when anything is non-finite.

    A non-finite loss or gradient, or a non-finite state coming in (a NaN restored into the
    Adam moments shows nowhere else, and would reach the parameters through the update),
    leaves parameters and optimizer state as they were; the step counter still moves so that
    the next step draws new dropout masks. The state a step produces is checked by the next
    one, before anything uses it. A `cond`, not a select per array: the update is one pass
    over the parameters and writes them in place (the state is donated)."""
    grad_norm = optax.tree.norm(grads)
    finite = (
        jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((state.params, state.opt_state))
    )

    def update(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(
        finite, update, lambda p, o: (p, o), state.params, state.opt_state
    )
    return params, opt_state, finite, grad_norm


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: OptimConfig,
    rules: sharding.Rules,
    objective: Objective = PRETRAINING,
    replicas: int = 1,
):
    """`train_step(state, batch, frozen=None) -> (state, metrics)`, a pure function to jit.

    `frozen` is the objective's frozen input (a distillation's teacher parameters; None for
    every other objective), which the step hands to `objective.train_loss` untouched. With
    `grad_accum_steps = k` the batch [B, ...] is split into k micro-batches of B / k whose
    gradients are averaged by a scan before one optimizer update, so that memory holds one
    micro-batch of activations; over `replicas` > 1 per replica (see `_accumulate`).
    """
    k = config.grad_accum_steps
    if k > 1 and objective.embedding is not None:
        raise ValueError(
            f"grad_accum_steps={k} would split the batch and shrink each example's in-batch "
            f"negatives; a sentence-embedding objective bounds memory with GradCache instead: "
            f"set its chunk_size (texts embedded at once) and keep grad_accum_steps=1"
        )
    schedule = make_schedule(config)
    gradients = _Gradients(graphdef, objective, rules, replicas)

    def train_step(state: TrainState, batch: Batch, frozen=None) -> tuple[TrainState, dict]:
        if batch["input_ids"].shape[0] % k:
            raise ValueError(
                f"batch size {batch['input_ids'].shape[0]} is not divisible by grad_accum_steps={k}"
            )
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, sums, grads = _accumulate(gradients, state.params, frozen, batch, key, k, replicas)
        params, opt_state, finite, grad_norm = _guarded_update(tx, state, loss, grads)
        metrics = {
            **sums,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "finite": finite,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _all_finite(tree) -> jax.Array:
    """One bool: every floating-point value of `tree` is finite. As the largest magnitude of
    each array (a NaN or an infinity makes it non-finite): one fused read of the array, where
    `isfinite(x).all()` made XLA:CPU write a boolean array of its size and reduce that (a
    tenth of a small model's fine-tuning step)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(
        jnp.stack([jnp.array(True)] + [jnp.isfinite(jnp.max(jnp.abs(x))) for x in leaves if x.size])
    )


def make_eval_step(
    graphdef: nnx.GraphDef,
    rules: sharding.Rules,
    objective: Objective = PRETRAINING,
):
    """`eval_step(params, batch) -> metric sums` without dropout."""

    def eval_step(params: models.Params, batch: Batch) -> dict:
        _, sums = _forward(graphdef, params, batch, rules, objective, rng=None, deterministic=True)
        return sums

    return eval_step


def make_predict_step(
    graphdef: nnx.GraphDef, rules: sharding.Rules, objective: Objective
) -> Callable[[models.Params, Batch], Any]:
    """`predict_step(params, batch) -> outputs` (e.g. logits [B, C]) without dropout."""

    def predict_step(params: models.Params, batch: Batch):
        model = models.merge_params(graphdef, model_params(params))
        with axes.axis_rules(rules):
            return objective.predict(model, batch)

    return predict_step
