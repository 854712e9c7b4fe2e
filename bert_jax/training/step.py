"""The pure train, evaluation and predict steps of any `Objective`, and the state they map:
gradient accumulation over micro-batches, per-replica accumulation, the non-finite guard."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from bert_jax import axes, models, sharding
from bert_jax.objectives import OWN_PARAMS, PRETRAINING, Batch, Objective, teacher_graphdef
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


def _forward(graphdef, params, batch, rules, objective, *, rng, deterministic, teacher=None):
    """The objective's loss; with `teacher` (graphdef, params), the distillation loss."""
    model = models.merge_params(graphdef, model_params(params))
    with axes.axis_rules(rules):  # active while tracing: activations get their shardings
        if teacher is None:
            return objective.loss(model, batch, rng, deterministic)
        teacher_graphdef, teacher_params = teacher
        frozen = models.merge_params(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
        own = params.get(OWN_PARAMS)
        return objective.distill.loss(model, frozen, batch, rng, deterministic, own)


def bind_teacher(step, teacher_params):
    """`step(state, batch, teacher_params)` (jitted or compiled) as `step(state, batch)`."""
    return _WithTeacher(step, teacher_params)


class _WithTeacher:
    """A jitted `step(state, batch, teacher_params)` called as `step(state, batch)`: the
    teacher's parameters (placed once, never donated) go in as an input of every call, not
    as constants of the program."""

    def __init__(self, step, teacher_params):
        self.step, self.teacher_params = step, teacher_params

    def __call__(self, state, batch):
        return self.step(state, batch, self.teacher_params)

    def _abstract_teacher(self):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            self.teacher_params,
        )

    def trace(self, state, batch):
        return self.step.trace(state, batch, self._abstract_teacher())

    def lower(self, state, batch):
        return self.step.lower(state, batch, self._abstract_teacher())


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: OptimConfig,
    rules: sharding.Rules,
    objective: Objective = PRETRAINING,
    replicas: int = 1,
):
    """`train_step(state, batch) -> (state, metrics)`, a pure function to jit.

    With `grad_accum_steps = k` the batch [B, ...] is split into k micro-batches of B / k
    whose gradients are averaged by a scan before one optimizer update, so that memory holds
    one micro-batch of activations. Over `replicas` > 1 (the `data` mesh axis) each replica
    accumulates the gradient of its own rows, summed across replicas once after the scan:
    without that, the partitioner sums every micro-batch's gradient across the replicas, k
    all-reduces of the whole gradient per step instead of one.
    """
    k = config.grad_accum_steps
    schedule = make_schedule(config)
    # Inside a replica the batch is split over the other batch axes (fsdp) only.
    replica_rules = tuple(
        (name, tuple(a for a in ((t,) if isinstance(t, str) else t or ()) if a != "data"))
        if name == axes.BATCH
        else (name, t)
        for name, t in rules
    )

    frozen_graphdef = teacher_graphdef(objective)

    def micro_grads(params, micro, rng, rules=rules, teacher=None):
        def loss_fn(p):
            return _forward(
                graphdef,
                p,
                micro,
                rules,
                objective,
                rng=rng,
                deterministic=False,
                teacher=None if teacher is None else (frozen_graphdef, teacher),
            )

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, sums, grads

    def replica_grads(params, micro, rng, teacher=None):
        """micro [k-th micro-batch, B / k] -> (loss, sums, grads) per replica [R, ...]."""
        split = jax.tree.map(lambda x: x.reshape(replicas, -1, *x.shape[1:]), micro)
        return jax.vmap(
            functools.partial(micro_grads, rules=replica_rules, teacher=teacher),
            in_axes=(None, 0, 0),
            spmd_axis_name="data",
        )(params, split, jax.random.split(rng, replicas))

    def train_step(
        state: TrainState, batch: Batch, teacher: models.Params | None = None
    ) -> tuple[TrainState, dict]:
        if (teacher is None) != (objective.distill is None):
            raise ValueError("a distillation objective's step takes the teacher's params")
        if batch["input_ids"].shape[0] % k:
            raise ValueError(
                f"batch size {batch['input_ids'].shape[0]} is not divisible by grad_accum_steps={k}"
            )
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if k == 1:
            loss, sums, grads = micro_grads(state.params, batch, step_key, teacher=teacher)
        else:
            # Micro-batch j takes rows j, j + k, j + 2k, ...: every device's rows of the
            # batch (a contiguous block of them) split evenly between the micro-batches, so
            # that forming them moves no data between devices.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch
            )

            # Per replica when every replica has rows of each micro-batch to itself.
            per_replica = replicas > 1 and (batch["input_ids"].shape[0] // k) % replicas == 0
            accumulate = functools.partial(
                replica_grads if per_replica else micro_grads, teacher=teacher
            )

            def body(carry, xs):
                index, mb = xs
                out = accumulate(state.params, mb, jax.random.fold_in(step_key, index))
                return jax.tree.map(jnp.add, carry, out), None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(
                jnp.zeros_like, jax.eval_shape(accumulate, state.params, first, step_key)
            )
            (loss, sums, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
            n = k * (replicas if per_replica else 1)
            if per_replica:  # the one sum across replicas
                loss, sums, grads = jax.tree.map(lambda x: x.sum(0), (loss, sums, grads))
            loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient, or a non-finite state coming in (a NaN restored into
        # the Adam moments shows nowhere else, and would reach the parameters through the
        # update), leaves parameters and optimizer state as they were; the step counter still
        # moves so that the next step draws new dropout masks. The state a step produces is
        # checked by the next one, before anything uses it. A `cond`, not a select per array:
        # the update is one pass over the parameters and writes them in place (the state is
        # donated).
        finite = (
            jnp.isfinite(loss)
            & jnp.isfinite(grad_norm)
            & _all_finite((state.params, state.opt_state))
        )

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(
            finite, update, lambda p, o: (p, o), state.params, state.opt_state
        )

        metrics = {
            **sums,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "finite": finite,
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
        )
        return new_state, metrics

    return train_step


def _all_finite(tree) -> jax.Array:
    """One bool: every floating-point value of `tree` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


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
