r"""Pretrains BERT with masked LM + next-sentence prediction.

    python train.py                                   # tiny config, default corpus, ./workdir
    python train.py --config=configs/bert_base.py --workdir=/ckpt/base \
        --config.data.corpus='/data/*.txt' --config.data.vocab_file=/data/vocab.txt
    python train.py --config=... --preprocess_only     # only tokenize and write the shards
    python train.py --config.init_from=hf:/models/bert-base-uncased   # continue pretraining
    python train.py --config=configs/bert_large.py:bf16 --topology=v5e-8 [--plan]
        # compile only, for a TPU slice from any host: memory, FLOPs, collectives per chip

Writes to --workdir: orbax checkpoints (rerunning the same command resumes from the latest),
TensorBoard events, the config used and a summary. Nothing here does math: it wires the
library's data, trainer and checkpointer together and runs the loop.
"""

from bert_jax import cli

if __name__ == "__main__":  # not in the processes a worker pool spawns from this file
    cli.stop_on_sigterm()  # before the slow imports: a SIGTERM from here on gets a clear word

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bert_jax import (  # noqa: E402
    checkpoint,
    convert,
    files,
    models,
    objectives,
    run_files,
    sharding,
    training,
)
from bert_jax.compile import aot, planner  # noqa: E402
from bert_jax.data import input_pipeline, pretraining_data  # noqa: E402
from bert_jax.data.input_pipeline import DataConfig  # noqa: E402
from bert_jax.data.pretraining_data import MaskingConfig  # noqa: E402
from bert_jax.data.tokenization import WordPieceTokenizer, vocabulary  # noqa: E402
from bert_jax.optim import OptimConfig  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "tiny.py"), "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Checkpoints, logs and summary go here.")
_PREPROCESS_ONLY = flags.DEFINE_bool(
    "preprocess_only", False, "Prepare the tokenizer and the sharded pairs, then exit."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process run with jax.distributed. Without the three flags below the cluster "
    "is detected from the environment (Cloud TPU pod slices, SLURM, Open MPI).",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process to join."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error.")
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "Compile only, for this TPU slice or topology (v5e-8, v4-8, v5p-128, v5e:2x4, v4:2x2x2), "
    "from any host with libtpu (requirements-tpu.txt): the train and eval steps with the run's "
    "shardings, reported per chip (memory against HBM, FLOPs, collectives). Nothing is "
    "trained, no data is read and no workdir is written.",
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology, joined over DCN.")
_PLAN = flags.DEFINE_bool(
    "plan",
    False,
    "With --topology: search mesh shapes, remat policies and micro-batch sizes (with gradient "
    "accumulation) for the plan that fits with --headroom, and print its command line.",
)
_HEADROOM = flags.DEFINE_float("headroom", 0.1, "Fraction of chip memory a plan leaves free.")
_PLAN_MESHES = flags.DEFINE_list(
    "plan_meshes",
    list(planner.MESH_FAMILIES),
    "Mesh families --plan tries: data (all data parallel), fsdp (FSDP inside each slice), "
    "tensor (FSDP with tensor parallelism of 2 and 4).",
)
_PLAN_REMATS = flags.DEFINE_list(
    "plan_remats", ["none", "minimal", "full"], "Remat policies --plan tries, cheapest first."
)
_REPORT = flags.DEFINE_string(
    "report", "", "JSON file of the --topology report (default: compile_<topology>.json)."
)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    batch_size: int
    num_steps: int
    seed: int
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    checkpoint_minutes: float
    keep_checkpoints: int
    keep_every: int
    max_bad_steps: int
    start_over: bool = False
    profile_steps: int = 0
    profile_start: int = 10


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: models.BertConfig
    data: DataConfig
    optim: OptimConfig
    mesh: sharding.MeshConfig
    train: LoopConfig
    init_from: str = ""
    init_optimizer: bool = False
    init_step: bool = False
    student_layers: tuple[int, ...] = ()
    distill: dict = dataclasses.field(default_factory=dict)


def parse_config(cfg) -> RunConfig:
    """The ConfigDict as typed, validated dataclasses (the library never sees ml_collections)."""
    data = dict(cfg.data)
    masking = {f.name: data.pop(f.name) for f in dataclasses.fields(MaskingConfig)}
    optim = dict(cfg.optim)
    if optim["total_steps"] == -1:
        optim["total_steps"] = cfg.train.num_steps
    return RunConfig(
        model=models.BertConfig(**cfg.model),
        data=DataConfig(masking=MaskingConfig(**masking), **data),
        optim=OptimConfig(**optim),
        mesh=sharding.MeshConfig(**cfg.mesh),
        train=LoopConfig(**cfg.train),
        init_from=cfg.init_from,
        init_optimizer=cfg.get("init_optimizer", False),
        init_step=cfg.get("init_step", False),
        student_layers=tuple(int(x) for x in str(cfg.get("student_layers", "")).split(",") if x),
        distill=dict(cfg.distill) if cfg.get("distill") and cfg.distill.teacher else {},
    )


def load_init(run: RunConfig, mesh, workdir: str) -> tuple[RunConfig, convert.Pretrained | None]:
    """With `init_from`, the imported weights, and the run with their model config (this run
    keeps its numerics, `models.RUN_FIELDS`) and their vocabulary."""
    if not run.init_from:
        return run, None
    numerics = {k: getattr(run.model, k) for k in models.RUN_FIELDS}
    pretrained = convert.load_pretrained(
        run.init_from,
        "BertForPreTraining",
        mesh=mesh,
        rules=run.mesh.rules,
        scratch_dir=workdir,
        **numerics,
    )
    tok = pretrained.tokenizer
    data = dataclasses.replace(
        run.data,
        tokenizer="wordpiece" if isinstance(tok, WordPieceTokenizer) else "sentencepiece",
        vocab_file=tok.vocab_file,
        do_lower_case=tok.do_lower_case,
    )
    _print(f"initialised from {pretrained.description}")
    if pretrained.report.missing or pretrained.report.unexpected:
        _print("warning: " + pretrained.report.describe(pretrained.description))
    if run.student_layers:
        params, config = models.take_layers(
            pretrained.params, pretrained.config, run.student_layers
        )
        pretrained = dataclasses.replace(pretrained, params=params, config=config)
        _print(f"the model is layers {list(run.student_layers)} of it")
    return dataclasses.replace(run, model=pretrained.config, data=data), pretrained


def load_teacher(run: RunConfig, mesh, student: convert.Pretrained | None):
    """The objective and the frozen teacher's params of `--config.distill.teacher`, checked
    against the student (its vocabulary, its width for the hidden-state loss)."""
    if not run.distill:
        return objectives.PRETRAINING, None
    numerics = {k: getattr(run.model, k) for k in models.RUN_FIELDS}
    source = run.distill["teacher"]
    teacher = convert.load_pretrained(
        source, "BertForPreTraining", mesh=mesh, rules=run.mesh.rules, **numerics
    )
    if teacher.report.missing:
        raise ValueError(
            f"the teacher {source} has no weights for {teacher.report.missing[:3]}: distil "
            f"from a pretrained model with its masked-LM and sentence heads"
        )
    if student is None or vocabulary(student.tokenizer) != vocabulary(teacher.tokenizer):
        raise ValueError(
            f"the student must share the teacher's vocabulary: set --config.init_from to the "
            f"teacher ({source}) or a model of its vocabulary, with --config.student_layers"
        )
    if run.distill.get("alpha_cos", 1.0) and teacher.config.hidden_size != run.model.hidden_size:
        raise ValueError(
            f"the hidden-state loss compares vectors of the teacher's width "
            f"{teacher.config.hidden_size} and the student's {run.model.hidden_size}: set "
            f"--config.distill.alpha_cos=0 (--config.distill.layerwise crosses widths through "
            f"a trained projection) or use a student of the teacher's width"
        )
    _print(f"distilling from {teacher.description}")
    weights = {k: v for k, v in run.distill.items() if k != "teacher"}
    objective = objectives.pretraining_distillation(
        teacher.config, student_config=run.model, **weights
    )
    return objective, teacher.params


def load_data(config: input_pipeline.DataConfig) -> input_pipeline.PretrainingData:
    """Process 0 prepares the shards; the others wait, then read what it wrote."""
    if jax.process_index() == 0:
        data = input_pipeline.load_pretraining_data(config)
    multihost_utils.sync_global_devices("bert_jax: data prepared")
    if jax.process_index() != 0:
        data = input_pipeline.load_pretraining_data(config)
    return data


def memory_report(trainer: training.Trainer, run: RunConfig, compiled: aot.ProgramReport) -> str:
    """Per-device bytes of the compiled train step: its arguments (parameters, optimizer state,
    batch), temporaries (activations, gradients) and total; the formula's estimate only where
    the backend gives no memory analysis."""
    mesh = trainer.mesh
    params = sharding.bytes_per_device(trainer.abstract_state.params)
    opt = sharding.bytes_per_device(trainer.abstract_state.opt_state)
    head = (
        f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} "
        f"process(es); per device: parameters {params / 2**20:.1f} MiB, optimizer state "
        f"{opt / 2**20:.1f} MiB"
    )
    if compiled.required:
        of = f" of {compiled.capacity / 2**20:,.0f}" if compiled.capacity else ""
        return (
            f"{head}; the compiled train step: arguments {compiled.arguments / 2**20:.1f} MiB, "
            f"temporaries {compiled.temporaries / 2**20:.1f} MiB, total "
            f"{compiled.required / 2**20:.1f}{of} MiB"
        )
    estimate = training.memory_estimate(
        run.model,
        trainer.abstract_state,
        per_device_batch(run, mesh),
        run.data.masking.max_seq_length,
        run.data.masking.max_predictions_per_seq,
        mesh.shape["tensor"],
    )
    return f"{head}; total ~{estimate / 2**20:.1f} MiB (estimate: no compiled memory analysis)"


def per_device_batch(run: RunConfig, mesh) -> int:
    """Sequences one device computes at once (a micro-batch with accumulation)."""
    replicas = sharding.data_parallel_size(mesh, run.mesh.rules)
    return max(run.train.batch_size // replicas // run.optim.grad_accum_steps, 1)


def compile_train_step(trainer: training.Trainer, run: RunConfig):
    """The train step compiled ahead of time (what the loop then runs) and its report.

    Raises:
      ValueError before any data is read when the step does not fit the devices' memory.
    """
    specs = pretraining_data.feature_specs(run.data.masking)
    batch = aot.batch_structs(trainer, specs, run.train.batch_size)
    report, compiled = aot.compile_program(
        "train_step",
        trainer.train_step,
        (trainer.abstract_state, batch),
        trainer.mesh,
        aot.hbm_bytes(jax.devices()[0]),
        count_flops=False,
    )
    if not report.fits or (report.capacity and report.required > report.capacity):
        raise ValueError(
            f"the train step needs {report.required / 2**30:.2f} GiB per device but "
            f"{report.capacity / 2**30:.2f} GiB are available: lower train.batch_size, raise "
            f"optim.grad_accum_steps, set model.remat=minimal or full, or shard more "
            f"(config.mesh.fsdp); `train.py --topology=... --plan` finds a plan that fits"
        )
    return compiled, report


# What a resumed run may change: the loop's cadence and length, the mesh, worker counts and
# cache folders. Everything else shapes the state or the data order, and must match.
_FREE_TO_CHANGE = {
    "train": {
        "num_steps",
        "log_every",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "checkpoint_minutes",
        "keep_checkpoints",
        "keep_every",
        "max_bad_steps",
        "start_over",
        "profile_steps",
        "profile_start",
    },
    "data": {"cache_dir", "preprocessed_dir", "preprocess_workers", "loader_workers"},
}
# Replaced by the tokenizer actually used (its path, kind, casing): compared once it is known.
_VOCAB_FIELDS = {"vocab_file", "tokenizer", "do_lower_case", "keep_accents"}


def check_compatible(
    meta: dict, path: str, run: RunConfig, config_json: dict, workdir: str, here: dict | None = None
) -> None:
    """Refuses, before any array is read, a checkpoint written with other settings: another
    model, optimizer, data, loop seed or distillation (teacher, weights); with `here` (this
    run's checkpoint metadata, known once the tokenizer is), another tokenizer or vocabulary.

    Raises:
      checkpoint.IncompatibleCheckpoint naming every differing field and the ways forward.
    """
    saved = meta["config"]
    # Models compared as BertConfigs: JSON's lists and earlier runs' spellings (remat
    # true/false, fields added since) mean what this run's values mean.
    fields = {f.name for f in dataclasses.fields(models.BertConfig)}
    saved_model = dataclasses.asdict(
        models.BertConfig(**{k: v for k, v in saved["model"].items() if k in fields})
    )
    pairs = {}
    if here is not None or not run.init_from:  # with init_from, the model is known once read
        pairs = {
            f"model.{k}": (saved_model[k], v) for k, v in dataclasses.asdict(run.model).items()
        }
    for section in ("optim", "data", "train", "distill"):
        for key, value in config_json.get(section, {}).items():
            skip = _FREE_TO_CHANGE.get(section, set())
            if section == "data":
                skip = skip | _VOCAB_FIELDS
            if key not in skip and key in saved.get(section, {}):
                pairs[f"{section}.{key}"] = (saved[section][key], value)
    for key, default in (
        ("init_from", ""),
        ("init_optimizer", False),
        ("init_step", False),
        ("student_layers", ""),
    ):
        pairs[key] = (saved.get(key, default), config_json.get(key, default))
    if here is not None:
        for key in ("tokenizer", "do_lower_case", "keep_accents"):
            if key in saved["data"]:
                pairs[f"data.{key}"] = (saved["data"][key], here["config"]["data"].get(key))
    differing = [
        f"{k}: {a!r} there, {b!r} here" for k, (a, b) in pairs.items() if _norm(a) != _norm(b)
    ]
    if here is not None and meta["vocab_sha256"] != here["vocab_sha256"]:
        differing.append(
            f"vocabulary: sha256 {meta['vocab_sha256'][:12]}... there, "
            f"{here['vocab_sha256'][:12]}... here"
        )
    if differing:
        raise checkpoint.IncompatibleCheckpoint(
            f"checkpoint {path} was written by a run with other settings ({'; '.join(differing)})."
            f" Nothing in {workdir} was changed. To go on with that run, use the settings it was "
            f"written with ({os.path.join(workdir, 'config.json')} has them); for a new run, use "
            f"a new --workdir, with --config.init_from={workdir} to start from its weights"
        )


def _norm(value):
    """JSON turns tuples into lists: compare them alike."""
    return list(value) if isinstance(value, tuple) else value


class Loop:
    """The training loop's moving parts: state, iterator, checkpoints, logs, guards."""

    def __init__(self, run, trainer, data, ckpt, meta, pretrained=None, heartbeat=None):
        self.run, self.cfg, self.trainer, self.ckpt = run, run.train, trainer, ckpt
        self.meta, self.pretrained = meta, pretrained
        self.heartbeat = heartbeat or (lambda: None)
        self.writer: _Writer | None = None  # opened once the run is known to go ahead
        hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
        self.iterator = data.train_iterator(run.train.batch_size, seed=run.train.seed, **hosts)
        # Held-out batches of one micro-batch each: a step that accumulates because the
        # whole batch does not fit would not fit its evaluation either.
        k = run.optim.grad_accum_steps
        self.eval_batches = data.eval_batches(
            run.train.batch_size // k, run.train.eval_batches * k, **hosts
        )
        self.tokens_per_step = run.train.batch_size * run.data.masking.max_seq_length
        self.history: list[list[float]] = []
        self.bad_streak, self.rolled_back, self.skipped = 0, False, 0
        self.last_save = time.time()
        self.sigterm = False
        cli.take_over_sigterm(self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.sigterm = True

    def restore_or_init(self, check_meta):
        """The newest verified checkpoint's state (and iterator position), or a fresh state
        when the workdir has none. A workdir whose checkpoints are all damaged is not
        restarted unless `train.start_over` says so."""
        try:
            found = self.ckpt.restore_latest(
                self.trainer.abstract_state, check_meta, start_over=self.cfg.start_over
            )
        except checkpoint.NoUsableCheckpoint as e:
            raise checkpoint.NoUsableCheckpoint(
                f"{e}. To train from step 0 in this workdir anyway, pass "
                f"--config.train.start_over=true (the damaged ones stay aside); or use a new "
                f"--workdir"
            ) from None
        if found is None:
            state = self.trainer.init(self.cfg.seed)
            if self.pretrained is not None:
                state = state.replace(params=convert.overlay(state.params, self.pretrained.params))
            if self.run.init_optimizer:
                state = continue_state(state, self.run, self.trainer.abstract_state)
            return state
        step, state, data_state, _ = found
        self.iterator.set_state(data_state)
        _print(f"resumed from step {step} in {self.ckpt.directory}")
        return state

    def evaluate(self, params) -> dict[str, float]:
        totals: dict[str, float] = {}
        for batch in self.eval_batches:
            batch = self.trainer.global_batch(batch)
            for key, value in jax.device_get(self.trainer.eval_step(params, batch)).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return self.trainer.objective.summarize(totals)

    def save(self, state, step: int, data_state: dict) -> None:
        """Saves `state` (after `step` steps) with the iterator position `data_state`."""
        self.ckpt.save(step, state, data_state, self.meta)
        self.last_save = time.time()

    def checkpoint_due(self, done: int) -> bool:
        due = done % self.cfg.checkpoint_every == 0 or done == self.cfg.num_steps
        minutes = self.cfg.checkpoint_minutes
        if minutes > 0 and not due:
            due = time.time() - self.last_save > 60 * minutes
            if jax.process_count() > 1:  # every process must take the same decision
                due = bool(multihost_utils.broadcast_one_to_all(np.array(due)))
        return due

    def preempted(self, step: int) -> bool:
        """SIGTERM here or on any process, or JAX's preemption notice (TPU maintenance)."""
        if jax.process_count() == 1:
            return self.sigterm
        anyone = multihost_utils.process_allgather(np.array(self.sigterm)).any()
        return bool(anyone) or multihost_utils.reached_preemption_sync_point(step)

    def guard(self, metrics, step: int):
        """Counts non-finite steps; returns True when the run must roll back."""
        if bool(metrics["finite"]):
            self.bad_streak = 0
            return False
        self.skipped += 1
        self.bad_streak += 1
        _print(f"warning: step {step} had a non-finite loss, gradient or state and was not applied")
        self.writer.add_scalar("train/skipped_steps", self.skipped, step)
        if self.bad_streak < self.cfg.max_bad_steps:
            return False
        if self.rolled_back or self.ckpt.latest_step() is None:
            raise RuntimeError(
                f"{self.bad_streak} consecutive non-finite steps up to step {step}"
                + (" again after rolling back" if self.rolled_back else "")
                + "; the run diverges: lower optim.learning_rate or check the data"
            )
        return True

    def rollback(self):
        self.ckpt.wait()
        step, state, data_state, _ = self.ckpt.restore_latest(self.trainer.abstract_state)
        self.iterator.set_state(data_state)
        self.rolled_back, self.bad_streak = True, 0
        _print(f"rolled back to the checkpoint of step {step} after non-finite steps")
        return state

    def log(self, metrics, done: int, rate: float, bar) -> None:
        summary = self.trainer.objective.summarize(metrics)
        scalars = {
            **{f"train/{k}": v for k, v in summary.items()},
            "train/learning_rate": float(metrics["learning_rate"]),
            "train/grad_norm": float(metrics["grad_norm"]),
            "train/tokens_per_second": rate,
        }
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, done)
        self.history.append([done, float(metrics["loss"])])
        losses_only = {k: f"{v:.3f}" for k, v in summary.items() if k.endswith("loss")}
        bar.set_postfix(**losses_only, tok_s=f"{rate:.0f}")

    def next_batch(self) -> tuple[dict, dict]:
        """The next global batch, placed on the devices, and the iterator's position after it
        (what a checkpoint of the step that consumes it records)."""
        with jax.profiler.TraceAnnotation("next_batch"):
            host = next(self.iterator)
            placed = self.trainer.global_batch(host)
            return placed, self.iterator.get_state()

    def run_steps(self, state) -> dict:
        """Trains to `num_steps`, keeping the devices fed.

        The step count lives on the host; a step's metrics are read once the next step has
        been dispatched (one step behind), and the next batch is placed on the devices while
        the current step runs. At most two steps are in flight: enough to keep an
        accelerator busy, and an unbounded queue of multi-device programs can deadlock
        XLA:CPU's collectives.
        """
        cfg, start = self.cfg, time.time()
        step = first_step = int(state.step)  # the one read of the device's counter
        initial_eval = {} if first_step else self.evaluate(state.params)
        if initial_eval:
            _log_eval(self.writer, 0, initial_eval)
        bar = tqdm.tqdm(
            total=cfg.num_steps,
            initial=first_step,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
            disable=jax.process_index() != 0,
        )
        self.window, self.waited = (time.time(), step), 0.0
        eval_metrics, pending, preempted = {}, None, False
        evaluating = 0.0
        profile = _Profile(cfg, first_step, self.writer.logdir)
        incoming = self.next_batch() if step < cfg.num_steps else None
        try:
            while step < cfg.num_steps:
                batch, data_state = incoming
                profile.before_dispatch(step)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = self.trainer.train_step(state, batch)
                    step += 1
                    incoming = self.next_batch() if step < cfg.num_steps else None
                self.ckpt.check()  # a background save that failed stops the run now
                self.heartbeat()
                if pending is not None and self.settle(pending, bar):
                    state = self.rollback()
                    step, pending = int(state.step), None
                    incoming = self.next_batch()
                    bar.n = step
                    continue
                if pending is not None:
                    profile.after_settle(pending[0])
                pending = (step, metrics)
                if step % cfg.eval_every == 0 or step == cfg.num_steps:
                    began = time.perf_counter()
                    eval_metrics = self.evaluate(state.params)
                    evaluating += time.perf_counter() - began
                    _log_eval(self.writer, step, eval_metrics)
                bar.update(1)
                if self.preempted(step):
                    self.save(state, step, data_state)
                    preempted = True
                    _print(f"preempted: saved step {step}; run the same command again to resume")
                    break
                if self.checkpoint_due(step):
                    self.save(state, step, data_state)
            if pending is not None:  # the last step: nothing left to roll back for
                self.settle(pending, bar)
                profile.after_settle(pending[0])
        finally:  # an error's message then starts on a line of its own
            profile.close()
            bar.close()
        if not eval_metrics:  # Nothing left to train: report the restored model.
            eval_metrics = self.evaluate(state.params)
        elapsed, steps_run = time.time() - start, step - first_step
        training = max(elapsed - evaluating, 1e-9)
        return {
            "steps": step,
            "steps_this_run": steps_run,
            "preempted": preempted,
            "skipped_steps": self.skipped,
            "seconds": elapsed,
            "tokens_per_second": steps_run * self.tokens_per_step / max(elapsed, 1e-9),
            # Of the training time (evaluations aside), the share the host spent not waiting
            # for a step: dispatch, batches, logs. Near 0: the devices are the bottleneck.
            "host_busy_fraction": 1.0 - self.waited / training,
            "seconds_per_step": training / max(steps_run, 1),
            "train_loss": self.history,
            "initial_eval": initial_eval,
            "eval": eval_metrics,
        }

    def settle(self, pending: tuple[int, dict], bar) -> bool:
        """Reads a finished step's metrics: the non-finite guard, then the log when due.
        Returns True when the run must roll back."""
        step, metrics = pending
        waited = time.perf_counter()
        with jax.profiler.TraceAnnotation("read_metrics"):
            metrics = jax.device_get(metrics)  # waits for that step; the next one is queued
        self.waited += time.perf_counter() - waited
        if self.guard(metrics, step):
            return True
        if step % self.cfg.log_every == 0 or step == self.cfg.num_steps:
            now, (since, since_step) = time.time(), self.window
            rate = (step - since_step) * self.tokens_per_step / max(now - since, 1e-9)
            self.log(metrics, step, rate, bar)
            self.window = (now, step)
        return False


def continue_state(state, run: RunConfig, abstract):
    """Phase 2 of a two-phase recipe: the optimizer state of the `init_from` workdir's newest
    checkpoint (and with `init_step`, its step), placed in this run's shardings.

    Raises:
      ValueError when that checkpoint's optimizer state is another optimizer's or model's.
    """
    source = convert.read_run(convert.model_kind(run.init_from)[1])
    directory, step = source["checkpoints"], source["step"]
    try:
        opt_state = checkpoint.restore_subtree(
            directory, step, ("opt_state",), abstract.opt_state, root=()
        )
    except ValueError as e:
        raise ValueError(
            f"--config.init_optimizer: the optimizer state of {directory}/{step} does not fit "
            f"this run's (optim.name={run.optim.name}; phase 2 must use phase 1's optimizer "
            f"and model): {e}"
        ) from None
    state = state.replace(opt_state=opt_state)
    if run.init_step:
        state = state.replace(step=jax.device_put(np.int32(step), abstract.step.sharding))
    _print(
        f"continuing the optimizer state{' and step' if run.init_step else ''} of "
        f"{directory}/{step}"
    )
    return state


def preflight(run: RunConfig, workdir: str, mesh) -> list[str]:
    """Every problem that config, paths and permissions show before any expensive step
    (vocabulary learning, preprocessing, importing weights, compiling), all at once."""
    unwritable = files.writable_problem(workdir, "the run's files") or files.writable_problem(
        os.path.join(workdir, "checkpoints"), "checkpoints"
    )
    problems = [unwritable] if unwritable else []
    # With init_from the model is the imported one: checked again once it is read.
    problems += model_problems(run, mesh, model_known=not run.init_from)
    try:
        input_pipeline.corpus_files(run.data)
    except (OSError, ValueError) as e:
        problems.append(str(e))
    if run.data.vocab_file:
        try:
            tokenizer = input_pipeline.config_tokenizer(run.data, run.data.vocab_file)
        except (OSError, ValueError) as e:
            problems.append(str(e))
        else:
            if not run.init_from and tokenizer.vocab_size > run.model.vocab_size:
                problems.append(_vocab_problem(tokenizer.vocab_size, run.model.vocab_size))
    if run.init_from:
        try:
            kind, _ = convert.model_kind(run.init_from)
        except (OSError, ValueError) as e:
            problems.append(str(e))
        else:
            if (run.init_optimizer or run.init_step) and kind != "bert_jax":
                problems.append(
                    f"config.init_optimizer and init_step continue a bert_jax workdir's "
                    f"checkpoint; {run.init_from} is a released model ({kind}): set both false"
                )
    elif run.init_optimizer or run.init_step:
        problems.append(
            "config.init_optimizer and init_step need config.init_from=<phase 1 workdir>"
        )
    if run.student_layers and not run.init_from:
        problems.append("config.student_layers takes layers of config.init_from: set it too")
    if run.distill:
        try:
            convert.model_kind(run.distill["teacher"])
        except (OSError, ValueError) as e:
            problems.append(f"config.distill.teacher: {e}")
        if not run.init_from:
            problems.append(
                "config.distill.teacher needs a student of its vocabulary: set "
                "config.init_from (the teacher itself, with config.student_layers)"
            )
    return problems


def model_problems(run: RunConfig, mesh, model_known: bool = True) -> list[str]:
    """What the model config (the configured one, or the imported one) says against the data,
    the batch and the mesh."""
    problems = []
    if models.layers.holds_int8(run.model.quantization):
        problems.append(training.TRAINING_QUANTIZED)
    if model_known and run.data.masking.max_seq_length > run.model.max_position_embeddings:
        problems.append(
            f"data.max_seq_length={run.data.masking.max_seq_length} exceeds "
            f"model.max_position_embeddings={run.model.max_position_embeddings}; lower one or "
            f"raise the other"
        )
    replicas = sharding.data_parallel_size(mesh, run.mesh.rules) * run.optim.grad_accum_steps
    if run.train.batch_size % replicas:
        problems.append(
            f"train.batch_size={run.train.batch_size} is not divisible by the data-parallel "
            f"degree x optim.grad_accum_steps = {replicas} (mesh {dict(mesh.shape)}); change "
            f"the batch size, the mesh or the accumulation"
        )
    return problems


def _vocab_problem(tokens: int, rows: int) -> str:
    return (
        f"the tokenizer has {tokens} tokens but model.vocab_size is {rows}; set "
        f"--config.model.vocab_size={tokens}"
    )


def _refuse(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ValueError(f"{problems[0]}; nothing was started")
    if problems:
        raise ValueError(
            f"{len(problems)} problem(s) before anything was started:\n  - "
            + "\n  - ".join(problems)
        )


def train(run: RunConfig, workdir: str, config_json: dict, heartbeat=None) -> dict:
    """Runs (or resumes) pretraining and returns the summary it also writes and prints.

    Everything that can refuse the run does so before the workdir is written: the preflight,
    the settings recorded in the newest checkpoint, then (once the tokenizer is known) its
    vocabulary. Only then are config.json, the vocabulary copy and TensorBoard events written.
    """
    if run.mesh.auto:
        run = plan_at_start(run)
    mesh = sharding.make_mesh(run.mesh)
    _refuse(preflight(run, workdir, mesh))
    directory = os.path.join(workdir, "checkpoints")
    ckpt = checkpoint.Checkpointer(
        directory, max_to_keep=run.train.keep_checkpoints, keep_period=run.train.keep_every or None
    )
    latest = ckpt.latest_meta()
    if latest is not None:  # refuse another run's workdir before hours of preprocessing
        check_compatible(latest[1], ckpt.step_dir(latest[0]), run, config_json, workdir)
    run, pretrained = load_init(run, mesh, workdir)
    _refuse(model_problems(run, mesh))
    objective, teacher = load_teacher(run, mesh, pretrained)
    trainer = training.create_trainer(
        run.model, run.optim, mesh, run.mesh.rules, objective, teacher_params=teacher
    )
    existing = len(ckpt.manager.all_steps())
    checkpoint.preflight(
        directory,
        checkpoint.tree_bytes(trainer.abstract_state),
        saves=max(1, run.train.keep_checkpoints + 1 - existing),
    )
    # Compiled before hours of preprocessing: a step that does not fit is refused now, and
    # the memory printed is the compiler's.
    train_step, compiled = compile_train_step(trainer, run)
    if teacher is not None:  # the compiled step takes the teacher's params at every call
        train_step = training.bind_teacher(train_step, trainer.train_step.teacher_params)
    trainer = dataclasses.replace(trainer, train_step=train_step)
    data = load_data(run.data)
    if data.tokenizer.vocab_size > run.model.vocab_size:
        raise ValueError(_vocab_problem(data.tokenizer.vocab_size, run.model.vocab_size))
    _print(memory_report(trainer, run, compiled))
    meta = record_run(workdir, run, config_json, data.tokenizer, write=False)
    loop = Loop(run, trainer, data, ckpt, meta, pretrained, heartbeat)
    with jax.set_mesh(mesh):
        state = loop.restore_or_init(
            lambda saved, path: check_compatible(saved, path, run, config_json, workdir, meta)
        )
        record_run(workdir, run, config_json, data.tokenizer, write=jax.process_index() == 0)
        loop.writer = _Writer(os.path.join(workdir, "tensorboard"))
        summary = loop.run_steps(state)
    ckpt.close()
    loop.writer.close()
    return summary


def record_run(workdir: str, run: RunConfig, config_json: dict, tokenizer, write: bool) -> dict:
    """The checkpoint metadata of this run; with `write`, also the workdir's config.json (the
    model config actually used) and a copy of the vocabulary, which make the workdir a model
    that `convert` exports and `init_from` reads."""
    extra = {**config_json, "data": {**config_json["data"], "vocab_file": tokenizer.vocab_file}}
    return convert.describe_run(
        workdir, run.model, "BertForPreTraining", 2, tokenizer, extra=extra, write=write
    )


def _log_eval(writer, step: int, metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        writer.add_scalar(f"eval/{key}", value, step)
    _print(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _print(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


class _Profile:
    """`train.profile_steps` steps traced by `jax.profiler` into the TensorBoard logdir:
    from the dispatch of the first until the last one's metrics are read (on every process;
    each writes its own trace)."""

    def __init__(self, cfg: LoopConfig, first_step: int, logdir: str):
        self.start = first_step + cfg.profile_start
        self.last = self.start + cfg.profile_steps  # the step count once the last has run
        self.logdir, self.on = logdir, False
        self.wanted = cfg.profile_steps > 0

    def before_dispatch(self, step: int) -> None:
        if self.wanted and step == self.start:
            # Without Python's function events: the input pipeline's threads would fill the
            # trace's million events within a few steps. The loop's own annotations remain.
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0
            jax.profiler.start_trace(self.logdir, profiler_options=options)
            self.on = True

    def after_settle(self, step: int) -> None:
        if self.on and step >= self.last:
            self.close()
            _print(f"profiled steps {self.start + 1}-{self.last}: {self.logdir}/plugins/profile")

    def close(self) -> None:
        if self.on:
            self.on, self.wanted = False, False
            jax.profiler.stop_trace()


class _Writer:
    """TensorBoard events from process 0 only (every process computes the same metrics)."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._writer = run_files.SummaryWriter(logdir) if jax.process_index() == 0 else None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    # Orbax reports every save at INFO through absl; keep the console for the progress bar.
    logging.set_verbosity(logging.WARNING)
    run = parse_config(_CONFIG.value)  # bad configs fail here, before any device work
    # A resumed run (after preemption, a crash or a changed step count) loads its compiled
    # train and eval steps from the persistent cache instead of compiling them again. Not for
    # --topology: a program compiled for devices this host lacks cannot be loaded back here.
    if not _TOPOLOGY.value:
        sharding.enable_compilation_cache()
    if _DISTRIBUTED.value:
        sharding.initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _TIMEOUT.value
        )
    config_json = json.loads(_CONFIG.value.to_json())
    if _TOPOLOGY.value:
        compile_for_topology(run, config_json)
        return
    if _PLAN.value:
        raise ValueError("--plan searches for a --topology: name one, e.g. --topology=v5e-8")
    if _PREPROCESS_ONLY.value:
        data = load_data(run.data)
        _print(f"{data.directory}: {json.dumps(data.metadata['counts'])}")
        return
    workdir = _WORKDIR.value
    # One run writes a workdir: process 0 holds its lock for the whole run. An unwritable
    # workdir has no lock to take: the preflight reports it with every other problem.
    writable = files.writable_problem(workdir, "the run's files") is None
    lead = jax.process_index() == 0 and writable
    lock = run_files.WorkdirLock(workdir, " ".join(sys.argv)) if lead else None
    try:
        summary = train(run, workdir, config_json, lock.heartbeat if lock else None)
        if jax.process_index() == 0:
            files.atomic_write(
                os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2).encode()
            )
            print(_format_summary(summary))
    finally:
        if lock is not None:
            lock.release()


def plan_at_start(run: RunConfig) -> RunConfig:
    """`mesh.auto`: the run with the mesh, remat and accumulation the planner chooses by
    compiling candidates for this host's devices (the same choice on every process)."""
    devices = jax.devices()
    capacity = aot.hbm_bytes(devices[0])
    if capacity is None:
        raise ValueError(
            f"config.mesh.auto plans for devices whose memory JAX reports (TPU, GPU); "
            f"{devices[0].platform} devices report none: set config.mesh.data/fsdp/tensor, or "
            f"plan for a slice with --topology=... --plan"
        )
    setup = _setup(run)
    best, trials = planner.find_plan(setup, devices, capacity, headroom=_HEADROOM.value, log=_print)
    if best is None:
        raise ValueError(
            f"config.mesh.auto: nothing fits {len(devices)} x {devices[0].device_kind} at a "
            f"batch of {run.train.batch_size} ({len(trials)} candidates compiled)"
        )
    chosen = setup.with_candidate(best.candidate)
    _print(f"mesh.auto chose {best.candidate.describe()}: {chosen.flags()}")
    mesh = dataclasses.replace(chosen.mesh, auto=True)
    return dataclasses.replace(run, model=chosen.model, optim=chosen.optim, mesh=mesh)


def _setup(run: RunConfig) -> planner.Setup:
    return planner.Setup(
        model=run.model,
        optim=run.optim,
        mesh=run.mesh,
        batch_size=run.train.batch_size,
        seq_len=run.data.masking.max_seq_length,
        specs=pretraining_data.feature_specs(run.data.masking),
    )


def compile_for_topology(run: RunConfig, config_json: dict) -> dict:
    """`--topology`: the run's steps compiled for a TPU slice (after the planner's search with
    `--plan`), reported as a table and a JSON file. Reads no data and writes no workdir."""
    devices = aot.topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
    _print(
        f"compiling for {_TOPOLOGY.value} x {_NUM_SLICES.value} slice(s): {len(devices)} x "
        f"{devices[0].device_kind}, {len({d.process_index for d in devices})} host(s)"
    )
    if not _PLAN.value:
        _refuse(model_problems(run, sharding.make_mesh(run.mesh, devices)))
    report, setup = planner.compile_target(
        _setup(run),
        devices,
        search=_PLAN.value,
        headroom=_HEADROOM.value,
        families=_PLAN_MESHES.value,
        remats=_PLAN_REMATS.value,
        log=_print,
    )
    report = {"topology": _TOPOLOGY.value, "num_slices": _NUM_SLICES.value, **report}
    report["config"] = config_json
    lines = [report["table"]]
    lines += [f"attention in {k}: {v}" for k, v in report["attention"].items()]
    if "plan" in report:
        lines.append(f"plan: python train.py ... {report['plan']['flags']}")
    path = _REPORT.value or f"compile_{_TOPOLOGY.value.replace(':', '_')}.json"
    files.atomic_write(path, json.dumps(report, indent=2).encode())
    lines.append(f"report: {path} (compiled for the target on this host, not run on it)")
    print("\n".join(lines))
    return report


def _format_summary(s: dict) -> str:
    e = s["eval"]
    lines = [
        f"steps {s['steps']} ({s['steps_this_run']} this run) in {s['seconds']:.0f} s, "
        f"{s['tokens_per_second']:.0f} tokens/s",
    ]
    if e:
        lines.append("held-out " + ", ".join(f"{k} {v:.3f}" for k, v in e.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    app.run(cli.absl_main(main, lambda: _VERBOSE.value))
