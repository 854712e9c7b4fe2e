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
    optim,
    run_files,
    sharding,
    training,
)
from bert_jax.compile import aot, planner  # noqa: E402
from bert_jax.compile import pretraining as compile_run  # noqa: E402
from bert_jax.data import (
    input_pipeline,  # noqa: E402
    tokenization,  # noqa: E402
)
from bert_jax.data.input_pipeline import DataConfig  # noqa: E402
from bert_jax.data.pretraining_data import MaskingConfig  # noqa: E402
from bert_jax.data.tokenization import vocabulary  # noqa: E402
from bert_jax.models import registry  # noqa: E402
from bert_jax.optim import OptimConfig  # noqa: E402
from bert_jax.training import loop as loop_lib  # noqa: E402

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


def parse_config(cfg) -> loop_lib.RunConfig:
    """The ConfigDict as typed, validated dataclasses (the library never sees ml_collections)."""
    data = dict(cfg.data)
    masking = {f.name: data.pop(f.name) for f in dataclasses.fields(MaskingConfig)}
    optim_fields = dict(cfg.optim)
    if optim_fields["total_steps"] == -1:
        optim_fields["total_steps"] = cfg.train.num_steps
    return loop_lib.RunConfig(
        model=models.BertConfig(**cfg.model),
        data=DataConfig(masking=MaskingConfig(**masking), **data),
        optim=OptimConfig(**optim_fields),
        mesh=sharding.MeshConfig(**cfg.mesh),
        train=loop_lib.LoopConfig(**cfg.train),
        init_from=cfg.init_from,
        init_optimizer=cfg.get("init_optimizer", False),
        init_step=cfg.get("init_step", False),
        student_layers=tuple(int(x) for x in str(cfg.get("student_layers", "")).split(",") if x),
        distill=dict(cfg.distill) if cfg.get("distill") and cfg.distill.teacher else {},
        model_changes=tuple(x for x in str(cfg.get("model_changes", "")).split(",") if x),
    )


def load_init(
    run: loop_lib.RunConfig, mesh, workdir: str
) -> tuple[loop_lib.RunConfig, convert.Pretrained | None]:
    """With `init_from`, the imported weights, and the run with their model config (this run
    keeps its numerics, `models.RUN_FIELDS`, and its `model_changes`) and their vocabulary."""
    if not run.init_from:
        return run, None
    kept = (*models.RUN_FIELDS, *run.model_changes)
    numerics = {k: getattr(run.model, k) for k in kept}
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
        tokenizer=tokenization.kind_of(tok),
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


def load_teacher(run: loop_lib.RunConfig, mesh, student: convert.Pretrained | None):
    """The objective and the frozen teacher's params of `--config.distill.teacher`, checked
    against the student (its vocabulary, its width for the hidden-state loss)."""
    if not run.distill:
        return objectives.pretraining_objective(run.model), None
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


def recorded_vocabulary(data: DataConfig, workdir: str) -> DataConfig:
    """A resumed run's learned vocabulary is the copy its workdir recorded, not one learned
    again: on another machine (an empty cache after a preemption) learning picks other pieces
    where counts tie, and the run could not go on."""
    if data.vocab_file:
        return data
    path = files.join(workdir, tokenization.FILE_NAMES[data.tokenizer])
    return dataclasses.replace(data, vocab_file=path) if files.exists(path) else data


def load_data(config: input_pipeline.DataConfig) -> input_pipeline.PretrainingData:
    """Process 0 prepares the shards; the others wait, then read what it wrote."""
    if jax.process_index() == 0:
        data = input_pipeline.load_pretraining_data(config)
    multihost_utils.sync_global_devices("bert_jax: data prepared")
    if jax.process_index() != 0:
        data = input_pipeline.load_pretraining_data(config)
    return data


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
    meta: dict,
    path: str,
    run: loop_lib.RunConfig,
    config_json: dict,
    workdir: str,
    here: dict | None = None,
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


def continue_state(state, run: loop_lib.RunConfig, abstract):
    """Phase 2 of a two-phase recipe: the optimizer state of the `init_from` workdir's newest
    checkpoint (and with `init_step`, its step; without, this phase's schedule from its
    start), placed in this run's shardings."""
    opt_state, step, where = convert.read_optimizer_state(run.init_from, abstract.opt_state)
    if run.init_step:  # one schedule over both phases, read at the continued step
        state = state.replace(step=jax.device_put(np.int32(step), abstract.step.sharding))
    else:
        opt_state = optim.restart_schedule(opt_state)
    _print(f"continuing the optimizer state{' and step' if run.init_step else ''} of {where}")
    return state.replace(opt_state=opt_state)


def preflight(run: loop_lib.RunConfig, workdir: str, mesh) -> list[str]:
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


def model_problems(run: loop_lib.RunConfig, mesh, model_known: bool = True) -> list[str]:
    """What the model config (the configured one, or the imported one) says against the data,
    the batch and the mesh."""
    problems = []
    if models.layers.holds_int8(run.model.quantization):
        problems.append(training.TRAINING_QUANTIZED)
    if model_known and run.model.length_problem(run.data.masking.max_seq_length):
        length = run.data.masking.max_seq_length
        problems.append(f"data.{run.model.length_problem(length)}; lower one or raise the other")
    data_problem = objectives.pretraining_data_problem(run.model, run.data.masking)
    if model_known and data_problem:
        problems.append(data_problem)
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


def train(run: loop_lib.RunConfig, workdir: str, config_json: dict, heartbeat=None) -> dict:
    """Runs (or resumes) pretraining and returns the summary it also writes and prints.

    Everything that can refuse the run does so before the workdir is written: the preflight,
    the settings recorded in the newest checkpoint, then (once the tokenizer is known) its
    vocabulary. Only then are config.json, the vocabulary copy and TensorBoard events written.
    """
    if run.mesh.auto:
        run = compile_run.plan_at_start(run, _HEADROOM.value, _print)
    mesh = sharding.make_mesh(run.mesh)
    _refuse(preflight(run, workdir, mesh))
    directory = os.path.join(workdir, "checkpoints")
    ckpt = checkpoint.Checkpointer(
        directory, max_to_keep=run.train.keep_checkpoints, keep_period=run.train.keep_every or None
    )
    latest = ckpt.latest_meta()
    if latest is not None:  # refuse another run's workdir before hours of preprocessing
        check_compatible(latest[1], ckpt.step_dir(latest[0]), run, config_json, workdir)
        run = dataclasses.replace(run, data=recorded_vocabulary(run.data, workdir))
    run, pretrained = load_init(run, mesh, workdir)
    _refuse(model_problems(run, mesh))
    trainer, compiled = compiled_trainer(run, mesh, pretrained, ckpt)
    data = load_data(run.data)
    if data.tokenizer.vocab_size > run.model.vocab_size:
        raise ValueError(_vocab_problem(data.tokenizer.vocab_size, run.model.vocab_size))
    _print(compile_run.memory_report(trainer, run, compiled))
    meta = record_run(workdir, run, config_json, data.tokenizer, write=False)

    def fresh_state():
        state = trainer.init(run.train.seed)
        if pretrained is not None:
            state = state.replace(params=convert.overlay(state.params, pretrained.params))
        if run.init_optimizer:
            state = continue_state(state, run, trainer.abstract_state)
        return state

    loop = loop_lib.Loop(run, trainer, data, ckpt, meta, fresh_state, heartbeat)
    with jax.set_mesh(mesh):
        state = loop.restore_or_init(
            lambda saved, path: check_compatible(saved, path, run, config_json, workdir, meta)
        )
        record_run(workdir, run, config_json, data.tokenizer, write=jax.process_index() == 0)
        loop.writer = loop_lib.LogWriter(os.path.join(workdir, "tensorboard"))
        summary = loop.run_steps(state)
    ckpt.close()
    loop.writer.close()
    return summary


def compiled_trainer(run: loop_lib.RunConfig, mesh, pretrained, ckpt):
    """(the run's trainer with its train step compiled, the compiled step), after checking
    that the checkpoint directory has room for the state it saves. Compiled before hours of
    preprocessing: a step that does not fit is refused now, and the memory printed is the
    compiler's."""
    objective, teacher = load_teacher(run, mesh, pretrained)
    trainer = training.create_trainer(
        run.model, run.optim, mesh, run.mesh.rules, objective, teacher_params=teacher
    )
    checkpoint.preflight(
        ckpt.directory,
        checkpoint.tree_bytes(trainer.abstract_state),
        saves=max(1, run.train.keep_checkpoints + 1 - len(ckpt.manager.all_steps())),
    )
    train_step, compiled = compile_run.compile_train_step(trainer, run)
    if teacher is not None:  # the compiled step takes the teacher's params at every call
        train_step = training.bind_frozen(train_step, trainer.train_step.frozen)
    return dataclasses.replace(trainer, train_step=train_step), compiled


def record_run(
    workdir: str, run: loop_lib.RunConfig, config_json: dict, tokenizer, write: bool
) -> dict:
    """The checkpoint metadata of this run; with `write`, also the workdir's config.json (the
    model config actually used) and a copy of the vocabulary, which make the workdir a model
    that `convert` exports and `init_from` reads."""
    extra = {**config_json, "data": {**config_json["data"], "vocab_file": tokenizer.vocab_file}}
    architecture = registry.pretraining_architecture(run.model.model_type)
    return convert.describe_run(
        workdir, run.model, architecture, 2, tokenizer, extra=extra, write=write
    )


def _print(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


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


def compile_for_topology(run: loop_lib.RunConfig, config_json: dict) -> dict:
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
        compile_run.make_setup(run),
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
