"""TrainState, its sharded creation, and the pure jitted train, evaluation and predict steps.

What a step computes is an `Objective`: the model class and its loss. `PRETRAINING` (MLM +
NSP/SOP), `classification(num_labels)` (GLUE), `token_classification(num_labels)` (NER),
`multiple_choice()` (SWAG) and `QUESTION_ANSWERING` (SQuAD) share the same step, optimizer and
sharding. `task_distillation(objective, ...)` and `pretraining_distillation(...)` add a frozen
teacher to that step: its parameters are a second input (`create_trainer(teacher_params=)`).
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from bert_jax import axes, losses, models, sharding
from bert_jax.models import BertConfig
from bert_jax.optim import OptimConfig, make_optimizer, make_schedule

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
    own_params, outputs = None, {}
    if layerwise:
        if student_config is None:
            raise ValueError("layer-wise distillation needs the student's config")
        own_params, mapping = _layer_map(student_config, teacher_config)
        outputs = dict(output_hidden_states=True, output_attentions=True)

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


def _pretraining_outputs(
    model, batch, rng=None, deterministic=True, only_predicted=True, **outputs
):
    return model(
        batch["input_ids"],
        batch["input_mask"],
        batch["segment_ids"],
        batch["masked_lm_positions"],
        rng=rng,
        deterministic=deterministic,
        only_predicted_positions=only_predicted,
        **outputs,
    )


def _pretraining_loss(model, batch, rng, deterministic):
    out = _pretraining_outputs(model, batch, rng, deterministic)
    return losses.pretraining_loss(out.mlm_logits, out.nsp_logits, batch)


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
    packed batch, `glue.pack`), token logits [B, L, C], choice logits [B, C], or QA's
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


PRETRAINING = Objective(models.BertForPreTraining, _pretraining_loss, summarize=losses.summarize)


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
    own_params, mapping, outputs = None, None, {}
    if layerwise:
        if student_config is None:
            raise ValueError("layer-wise distillation needs the student's config")
        own_params, mapping = _layer_map(student_config, teacher_config)
        outputs = dict(output_hidden_states=True, output_attentions=True)
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


@struct.dataclass
class TrainState:
    """Everything a step changes: step [] int32, params, optimizer state, base dropout key
    (raw uint32[2], folded with the step so that each step draws fresh, reproducible masks)."""

    step: jax.Array
    params: models.Params
    opt_state: Any
    rng: jax.Array


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
    if (teacher_params is None) != (objective.distill is None):
        raise ValueError(
            "teacher_params go with a distillation objective (train_lib.task_distillation), "
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
    tx = make_optimizer(optim_config)
    abstract = models.abstract_model(model_config, objective.model_cls)
    graphdef, abstract_params = models.split_params(abstract)
    param_shardings = sharding.tree_shardings(
        models.param_logical_axes(abstract), abstract_params, mesh, rules
    )
    repl = sharding.replicated(mesh)
    own_params = None if objective.distill is None else objective.distill.own_params
    if own_params is not None:  # small (a projection): whole on every device
        own_shapes = jax.eval_shape(own_params, jax.random.key(0))
        param_shardings = {**param_shardings, OWN_PARAMS: jax.tree.map(lambda _: repl, own_shapes)}

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

    abstract_state = jax.eval_shape(lambda: init_fn(0))
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_state.opt_state,
        param_shardings,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    state_shardings = TrainState(
        step=repl, params=param_shardings, opt_state=opt_shardings, rng=repl
    )
    batch_sharding = sharding.batch_sharding(mesh, rules)
    step_fn = make_train_step(
        graphdef, tx, optim_config, rules, objective, replicas=_data_replicas(mesh, rules)
    )
    if models.layers.holds_int8(model_config.quantization):  # evaluation and prediction only
        step_fn = functools.partial(_refuse_training, model_config.quantization)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )
    if objective.distill is not None:
        d = objective.distill
        teacher_abstract = models.abstract_model(d.teacher_config, d.teacher_cls)
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
        train_step = _WithTeacher(
            jax.jit(
                step_fn,
                in_shardings=(state_shardings, batch_sharding, teacher_shardings),
                out_shardings=(state_shardings, repl),
                donate_argnums=0,
            ),
            jax.device_put(teacher_params, teacher_shardings),
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
        eval_step=jax.jit(
            make_eval_step(graphdef, rules, objective),
            in_shardings=(param_shardings, batch_sharding),
            out_shardings=repl,
        ),
        predict_step=None
        if objective.predict is None
        else jax.jit(
            make_predict_step(graphdef, rules, objective),
            in_shardings=(param_shardings, batch_sharding),
        ),
        init=jax.jit(init_fn, out_shardings=state_shardings, static_argnums=0),
        rules=rules,
        objective=objective,
    )


TRAINING_QUANTIZED = (
    "the model holds int8 weights (quantization), which take no gradient: train or fine-tune "
    "the float model, then quantize it (python -m bert_jax.convert quantize RUN OUT, or "
    "--config.model.quantization=int8 when evaluating or predicting)"
)


def _refuse_training(mode: str, *args):
    raise ValueError(f"{TRAINING_QUANTIZED} [quantization={mode}]")


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


def teacher_graphdef(objective: Objective) -> nnx.GraphDef | None:
    if objective.distill is None:
        return None
    d = objective.distill
    return models.split_params(models.abstract_model(d.teacher_config, d.teacher_cls))[0]


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


def _data_replicas(mesh: Mesh, rules: sharding.Rules) -> int:
    """The size of the `data` mesh axis when the batch is split over it: the replicas that
    hold whole copies of the parameters."""
    target = dict(rules).get(axes.BATCH)
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return mesh.shape["data"] if "data" in names else 1


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: OptimConfig,
    rules: sharding.Rules = axes.DEFAULT_RULES,
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
    rules: sharding.Rules = axes.DEFAULT_RULES,
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


def memory_estimate(
    config: BertConfig,
    abstract_state: TrainState,
    batch_per_device: int,
    seq_len: int,
    predictions: int,
    tensor_degree: int = 1,
) -> int:
    """Per-device bytes of a pretraining step by formula, where no compiled figure exists: the
    parameters, their gradients and the optimizer state as the state is sharded, and the
    activations (`activation_bytes_estimate`). Within 25% of XLA's compiled figure on CPU for
    the tiny and BERT-Base shapes (tests/test_aot.py)."""
    params = sharding.bytes_per_device(abstract_state.params)
    opt = sharding.bytes_per_device(abstract_state.opt_state)
    activations = activation_bytes_estimate(
        config, batch_per_device, seq_len, predictions, tensor_degree
    )
    return 2 * params + opt + activations


def activation_bytes_estimate(
    config: BertConfig,
    batch_per_device: int,
    seq_len: int,
    predictions: int = 0,
    tensor_degree: int = 1,
) -> int:
    """Activation memory per device of a train step, estimated.

    The encoder: Korthikanti et al. (2022), eq. 2 and 4: per layer s*b*h*(10 + 24/t +
    5*a*s/(h*t)) bytes at 16 bits, scaled to the compute dtype; with remat "minimal" the
    attention scores are recomputed (their eq. 6, selective recomputation); with "full" each
    layer keeps its input, and the layer being recomputed holds its whole set at once. The
    MLM head: float32 logits over the vocabulary at the `predictions` masked positions, their
    softmax and its gradient.
    """
    s, b, h, a, t = (
        seq_len,
        batch_per_device,
        config.hidden_size,
        config.num_attention_heads,
        tensor_degree,
    )
    scale = jnp.dtype(config.dtype).itemsize / 2
    whole = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    if config.remat == "full":
        encoder = 2 * s * b * h * config.num_hidden_layers + whole
    elif config.remat == "minimal":
        encoder = s * b * h * (10 + 24 / t) * config.num_hidden_layers
    else:
        encoder = whole * config.num_hidden_layers
    head = 3 * 4 * b * predictions * config.vocab_size / t
    return int(encoder * scale + head)
