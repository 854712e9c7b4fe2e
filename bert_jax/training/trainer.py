"""A `Trainer`: the jitted init, train, eval and predict steps of an objective, with the
state's shardings from an abstract pass (no state is allocated until `init`)."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from bert_jax import axes, models, sharding
from bert_jax.models import BertConfig
from bert_jax.objectives import OWN_PARAMS, PRETRAINING, Batch, Objective
from bert_jax.optim import OptimConfig, make_optimizer
from bert_jax.training.step import (
    TrainState,
    _WithFrozen,
    make_eval_step,
    make_predict_step,
    make_train_step,
)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled pieces of a run: static graph, optimizer, shardings and jitted steps.

    `abstract_state` is the state's shapes, dtypes and shardings (what a restore targets).
    """

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    mesh: Mesh
    state_shardings: TrainState
    abstract_state: TrainState
    batch_sharding: jax.sharding.NamedSharding
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]
    eval_step: Callable[[models.Params, Batch], dict]
    predict_step: Callable[[models.Params, Batch], Any] | None
    init: Callable[[int], TrainState]
    rules: sharding.Rules
    objective: Objective = PRETRAINING

    def global_batch(self, host: dict) -> Batch:
        """A host batch as global arrays on the trainer's mesh, split by its rules."""
        return sharding.global_batch(host, self.mesh, self.rules)

    @property
    def data_parallel(self) -> int:
        """How many ways the rules split a batch over the mesh (data x fsdp)."""
        return sharding.data_parallel_size(self.mesh, self.rules)


def create_trainer(
    model_config: BertConfig,
    optim_config: OptimConfig,
    mesh: Mesh,
    rules: sharding.Rules,
    objective: Objective = PRETRAINING,
    teacher_params: models.Params | None = None,
) -> Trainer:
    """Builds the jitted init, train, eval (and predict) steps with shardings from an abstract
    pass.

    No state is allocated here; `trainer.init(seed)` creates it directly in its shardings.
    A distillation objective takes `teacher_params`: placed once by the same rules as the
    student's and given to every train step (which never changes them).
    """
    _check(model_config, objective, teacher_params, mesh, rules)
    tx = make_optimizer(optim_config)
    abstract = models.abstract_model(model_config, objective.model_cls)
    graphdef, abstract_params = models.split_params(abstract)
    own_params = None if objective.distill is None else objective.distill.own_params
    init_fn = _make_init(model_config, objective, tx, own_params)
    repl = sharding.replicated(mesh)
    param_shardings = sharding.tree_shardings(
        models.param_logical_axes(abstract), abstract_params, mesh, rules
    )
    if own_params is not None:  # small (a projection): whole on every device
        own = jax.tree.map(lambda _: repl, jax.eval_shape(own_params, jax.random.key(0)))
        param_shardings = {**param_shardings, OWN_PARAMS: own}
    abstract_state = jax.eval_shape(lambda: init_fn(0))
    state_shardings = _state_shardings(tx, abstract_state, param_shardings, repl)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    eval_step, predict_step = _evaluation_steps(
        graphdef, rules, objective, (param_shardings, batch_sharding), repl
    )
    step_fn = make_train_step(
        graphdef, tx, optim_config, rules, objective, replicas=_data_replicas(mesh, rules)
    )
    if models.layers.holds_int8(model_config.quantization):  # evaluation and prediction only
        step_fn = functools.partial(_refuse_training, model_config.quantization)
    train_step = _jit_train_step(
        step_fn, objective.distill, teacher_params, (state_shardings, batch_sharding), mesh, rules
    )
    return Trainer(
        graphdef=graphdef,
        tx=tx,
        mesh=mesh,
        state_shardings=state_shardings,
        abstract_state=jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_state,
            state_shardings,
        ),
        batch_sharding=batch_sharding,
        train_step=train_step,
        eval_step=eval_step,
        predict_step=predict_step,
        init=jax.jit(init_fn, out_shardings=state_shardings, static_argnums=0),
        rules=rules,
        objective=objective,
    )


def _state_shardings(tx, abstract_state, param_shardings, repl) -> TrainState:
    """The state's shardings: the parameters' by the rules, the optimizer's moments like
    their parameters, everything else whole on every device."""
    opt = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_state.opt_state,
        param_shardings,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    return TrainState(step=repl, params=param_shardings, opt_state=opt, rng=repl)


def _evaluation_steps(graphdef, rules, objective, shardings, repl):
    """The jitted eval step, and the predict step where the objective predicts (else None)."""
    eval_step = jax.jit(
        make_eval_step(graphdef, rules, objective), in_shardings=shardings, out_shardings=repl
    )
    if objective.predict is None:
        return eval_step, None
    return eval_step, jax.jit(make_predict_step(graphdef, rules, objective), in_shardings=shardings)


def _check(model_config, objective, teacher_params, mesh, rules) -> None:
    """Refuses a teacher without a distillation objective (or the reverse) and sizes the
    mesh's axes do not divide."""
    if (teacher_params is None) != (objective.distill is None):
        raise ValueError(
            "teacher_params go with a distillation objective (objectives.task_distillation), "
            "and it needs them"
        )
    sharding.check_divisible(
        {
            axes.HEADS: model_config.num_attention_heads,
            axes.MLP: model_config.intermediate_size,
            axes.EMBED: model_config.hidden_size,
        },
        mesh,
        rules,
    )


def _jit_train_step(step_fn, distill, teacher_params, shardings, mesh, rules):
    """The jitted train step (the state donated). With a distillation, `step_fn(state, batch,
    teacher_params)` bound to the teacher's parameters, placed once by the student's rules
    (checked against the teacher's config and head)."""
    state_shardings, batch_sharding = shardings
    repl = sharding.replicated(mesh)
    if distill is None:
        return jax.jit(
            step_fn, in_shardings=shardings, out_shardings=(state_shardings, repl), donate_argnums=0
        )
    teacher_abstract = models.abstract_model(distill.teacher_config, distill.teacher_cls)
    expected = models.split_params(teacher_abstract)[1]
    teacher_shardings = sharding.tree_shardings(
        models.param_logical_axes(teacher_abstract), expected, mesh, rules
    )
    shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), expected)
    try:
        given = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), teacher_params)
    except (TypeError, ValueError):
        given = None
    if given != shapes:
        raise ValueError(
            "the teacher's parameters do not match its config and head (shapes, dtypes "
            "or names differ): load the teacher with the config it was trained with"
        )
    step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding, teacher_shardings),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )
    return _WithFrozen(step, jax.device_put(teacher_params, teacher_shardings))


def _make_init(model_config, objective, tx, own_params):
    """`init(seed) -> TrainState`: the model's weights, an objective's own, the optimizer
    state and the dropout key, all from the seed."""

    def init_fn(seed: int) -> TrainState:
        _, params = models.split_params(
            models.create_model(model_config, seed, objective.model_cls)
        )
        if own_params is not None:
            params[OWN_PARAMS] = own_params(jax.random.fold_in(jax.random.key(seed), 2))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
        )

    return init_fn


TRAINING_QUANTIZED = (
    "the model holds int8 weights (quantization), which take no gradient: train or fine-tune "
    "the float model, then quantize it (python -m bert_jax.convert quantize RUN OUT, or "
    "--config.model.quantization=int8 when evaluating or predicting)"
)


def _refuse_training(mode: str, *args):
    raise ValueError(f"{TRAINING_QUANTIZED} [quantization={mode}]")


def _data_replicas(mesh: Mesh, rules: sharding.Rules) -> int:
    """The size of the `data` mesh axis when the batch is split over it: the replicas that
    hold whole copies of the parameters."""
    target = dict(rules).get(axes.BATCH)
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return mesh.shape["data"] if "data" in names else 1
