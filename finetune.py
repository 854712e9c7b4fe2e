r"""Fine-tunes a pretrained BERT on GLUE, SQuAD, CoNLL-2003 or SWAG and reports honest numbers.

    python finetune.py --config=configs/glue.py --config.init_from=hf:/models/bert-base-uncased \
        --config.data_dir=/data/glue_data --workdir=/runs/glue
    python finetune.py --config=configs/squad.py --config.init_from=... --config.data_dir=/data
    python finetune.py --config.init_from=... --topology=v5e-8   # compile only, for a TPU slice

`--config.tasks` names the tasks (`bert_jax.tasks`): GLUE's (`mrpc`, `glue:mrpc`, `all`),
`squad_v1`, `squad_v2`, `conll2003`, `swag`. For every task, learning rate and seed: train,
evaluate on dev after each epoch (and every `eval_every_steps`), keep the best checkpoint by
the task's score (GLUE's score, SQuAD's F1, entity F1, accuracy), then write the task's
predictions from it. Writes to --workdir:

    <task>/lr<lr>_seed<seed>/    the best checkpoint as a model (exportable with
                                  `python -m bert_jax.convert export-hf`), TensorBoard events,
                                  predictions/ in each task's official layout (GLUE test
                                  submissions, SQuAD predictions.json, CoNLL files, ...)
    submission/                   those prediction files (GLUE: one server file per test set,
                                  CoLA.tsv, MNLI-m.tsv, AX.tsv, ...) from the best dev run of
                                  the chosen learning rate
    results.json, results.md      every run, and per task the median, mean and standard
                                  deviation over seeds; published BERT-Base dev figures beside
                                  them when the model is BERT-Base
"""

import dataclasses
import inspect
import json
import os
import sys

import jax
import numpy as np
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from bert_jax import (
    cli,
    convert,
    files,
    models,
    objectives,
    run_files,
    sharding,
    training,
)
from bert_jax.compile import aot, planner
from bert_jax.data.tokenization import vocabulary
from bert_jax.optim import OptimConfig
from bert_jax.tasks import base, registry
from bert_jax.training import finetuning

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "glue.py"), "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "glue_workdir", "Results and checkpoints go here.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error.")
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "Compile only, for this TPU slice or topology (v5e-8, v5e:2x4, ...): each task's "
    "fine-tuning and prediction steps, reported per chip; reads the model's config, not its "
    "weights or the data.",
)
_REPORT = flags.DEFINE_string(
    "report", "", "JSON file of the --topology report (default: compile_<topology>.json)."
)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    init_from: str
    tasks: tuple[str, ...]
    source: str
    data_dir: str
    tfds_data_dir: str
    max_seq_length: int
    max_train_examples: int
    batch_size: int
    eval_batch_size: int
    num_epochs: float
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    warmup_fraction: float
    weight_decay: float
    classifier_dropout: float
    eval_every_steps: int
    early_stopping_patience: int
    log_every: int
    pack: bool
    pack_max_examples: int
    numerics: dict
    mesh: sharding.MeshConfig
    distill: dict = dataclasses.field(default_factory=dict)
    student_layers: tuple[int, ...] = ()
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    checkpoint_every_steps: int = 500
    checkpoint_minutes: float = 10.0
    embedding: tuple = ()

    def settings(self) -> base.Settings:
        return base.Settings(
            data_dir=self.data_dir,
            max_seq_length=self.max_seq_length,
            max_train_examples=self.max_train_examples,
            source=self.source,
            tfds_data_dir=self.tfds_data_dir,
            doc_stride=self.doc_stride,
            max_query_length=self.max_query_length,
            n_best_size=self.n_best_size,
            max_answer_length=self.max_answer_length,
            embedding=self.embedding,
        )


def parse_config(cfg, need_data: bool = True) -> FinetuneConfig:
    """The ConfigDict as a typed, validated dataclass; bad values fail here, before any work.
    `need_data` False (compiling only) leaves the data folder unchecked."""
    if not cfg.init_from:
        raise ValueError(
            "--config.init_from is required: hf:<Hugging Face directory>, tf:<original TF "
            "checkpoint directory> or a bert_jax pretraining workdir"
        )
    names = tuple(registry.task_names(cfg.tasks))
    _check_values(cfg, need_data)
    qa = {k: cfg.get(k, d) for k, d in _QA_DEFAULTS.items()}
    distill = dict(cfg.get("distill") or {})
    if distill.get("teacher"):
        _check_distill(cfg, distill)
    # Evaluating only (num_epochs 0), every learning rate and seed is the same model: one run.
    runs = None if cfg.num_epochs else 1
    return FinetuneConfig(
        init_from=cfg.init_from,
        tasks=names,
        source=cfg.source,
        data_dir=cfg.data_dir,
        tfds_data_dir=cfg.tfds_data_dir,
        max_seq_length=cfg.max_seq_length,
        max_train_examples=cfg.max_train_examples,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        num_epochs=cfg.num_epochs,
        learning_rates=tuple(float(x) for x in str(cfg.learning_rates).split(","))[:runs],
        seeds=tuple(int(x) for x in str(cfg.seeds).split(","))[:runs],
        warmup_fraction=cfg.warmup_fraction,
        weight_decay=cfg.weight_decay,
        classifier_dropout=cfg.classifier_dropout,
        eval_every_steps=cfg.eval_every_steps,
        early_stopping_patience=cfg.early_stopping_patience,
        log_every=cfg.log_every,
        pack=cfg.pack,
        pack_max_examples=cfg.pack_max_examples,
        numerics={k: v for k, v in cfg.model.items() if v or k != "quantization"},
        mesh=sharding.MeshConfig(**cfg.mesh),
        distill=distill if distill.get("teacher") else {},
        student_layers=_layer_list(cfg.get("student_layers", "")),
        checkpoint_every_steps=cfg.get("checkpoint_every_steps", 500),
        checkpoint_minutes=cfg.get("checkpoint_minutes", 10.0),
        embedding=_embedding_options(cfg.get("embedding") or {}),
        **qa,
    )


def _embedding_options(embedding) -> tuple:
    """`objectives.Embedding`'s options from --config.embedding, checked here (a bad pooling
    mode or loss option fails before any work)."""
    if not embedding:
        return ()
    options = {
        "modes": tuple(m.strip() for m in str(embedding.get("pooling", "mean")).split(",")),
        "scale": float(embedding.get("scale", 20.0)),
        "symmetric": bool(embedding.get("symmetric", False)),
        "matryoshka_dims": tuple(
            int(d) for d in str(embedding.get("matryoshka_dims", "")).split(",") if d.strip()
        ),
        "chunk_size": int(embedding.get("chunk_size", 0)),
    }
    chosen = objectives.Embedding(**options)  # raises naming a bad mode
    if options["chunk_size"] < 0:
        raise ValueError(f"--config.embedding.chunk_size={options['chunk_size']}; use 0 or more")
    if chosen == objectives.Embedding():  # recorded only when set
        return ()
    return tuple(options.items())


def _check_values(cfg, need_data: bool) -> None:
    """Refuses a bad data source or folder and out-of-range sizes, naming the flag."""
    if cfg.source not in ("tsv", "tfds"):
        raise ValueError(f"--config.source={cfg.source!r}; use 'tsv' or 'tfds'")
    if need_data and cfg.source == "tsv" and not files.isdir(cfg.data_dir or ""):
        raise FileNotFoundError(
            f"data folder {cfg.data_dir!r} does not exist: pass --config.data_dir=<folder "
            f"with CoLA/, SST-2/, MNLI/, ... (the GLUE download), SQuAD/, CoNLL-2003/, SWAG/>, "
            f"or for GLUE, SQuAD and CoNLL-2003 --config.source=tfds with the data prepared "
            f"by `tfds build <glue/task, squad/v1.1, conll2003> --file_format=array_record`"
        )
    for name in ("batch_size", "eval_batch_size", "max_seq_length", "pack_max_examples"):
        if cfg[name] < 1:
            raise ValueError(f"--config.{name} must be positive, got {cfg[name]}")
    if cfg.num_epochs < 0:
        raise ValueError(f"--config.num_epochs={cfg.num_epochs}; use 0 to evaluate only")
    if models.layers.holds_int8(cfg.model.get("quantization", "")) and cfg.num_epochs:
        raise ValueError(f"--config.model.quantization: {training.TRAINING_QUANTIZED}")


# The options of --config.distill besides the teacher, with their defaults: those of
# objectives.task_distillation, the one place they are written.
_DISTILL_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(objectives.task_distillation).parameters.items()
    if name in ("temperature", "alpha", "layerwise", "prediction")
}


def distill_options(distill: dict) -> dict:
    """`objectives.task_distillation`'s options from a --config.distill dict (as given: the
    recorded settings keep only what the user set)."""
    return {k: distill.get(k, default) for k, default in _DISTILL_OPTIONS.items()}


def _check_distill(cfg, distill: dict) -> None:
    """Refuses a teacher without training, a path that cannot be a model and bad options."""
    if not cfg.num_epochs:
        raise ValueError("--config.distill.teacher trains; it needs --config.num_epochs > 0")
    convert.model_kind(distill["teacher"])  # names what is wrong with the path now
    options = distill_options(distill)
    if not options["prediction"] and not options["layerwise"]:
        raise ValueError(
            "--config.distill.prediction=False leaves only the layer-wise loss: set "
            "--config.distill.layerwise > 0 (TinyBERT's first task stage: 1.0)"
        )
    if options["temperature"] <= 0 or not 0 <= options["alpha"] <= 1:
        raise ValueError(
            f"--config.distill.temperature={options['temperature']} must be > 0 and "
            f"--config.distill.alpha={options['alpha']} in [0, 1]"
        )


def _layer_list(text) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(
            f"--config.student_layers={text!r}: comma-separated layer numbers, e.g. 0,2,4"
        ) from None


_QA_DEFAULTS = {
    "doc_stride": 128,
    "max_query_length": 64,
    "n_best_size": 20,
    "max_answer_length": 30,
}


def check_data(cfg: FinetuneConfig) -> None:
    """Reads every file of every task before anything is compiled, and reports every
    problem at once (a header-only dev file fails now, not after a training epoch)."""
    problems = []
    for name in cfg.tasks:
        problems += registry.get_task(name).check(cfg.settings())
    if problems:
        raise ValueError(
            f"{len(problems)} problem(s) in the task data:\n  - " + "\n  - ".join(problems)
        )


# The sweep itself (tasks, learning rates, seeds) may grow between reruns; logging and how
# often a run saves do not change its results.
_SWEEP_FIELDS = ("tasks", "learning_rates", "seeds", "log_every", "checkpoint_every_steps",
                 "checkpoint_minutes")  # fmt: skip


def run_settings(cfg: FinetuneConfig) -> dict:
    """The settings a run's results depend on (JSON types), for the rerun check."""
    settings = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if cfg.mesh.rules == sharding.MeshConfig.rules:  # as recorded before rules were a setting
        del settings["mesh"]["rules"]
    if not cfg.embedding:  # as recorded before embedding tasks
        del settings["embedding"]
    return {k: v for k, v in settings.items() if k not in _SWEEP_FIELDS}


def run_directory(workdir: str, task_name: str, lr: float, seed: int) -> str:
    return os.path.join(workdir, task_name, f"lr{lr:g}_seed{seed}")


def finetune_task(cfg: FinetuneConfig, name: str, mesh, workdir: str) -> dict:
    """Every run (learning rate x seed) of task `name` that has not finished before, and the
    task's summary over them."""
    task = registry.get_task(name)
    done = {
        (lr, seed): finetuning.finished_run(run_directory(workdir, task.name, lr, seed))
        for lr in cfg.learning_rates
        for seed in cfg.seeds
    }
    if all(done.values()):  # nothing to train: not even the model is loaded
        tqdm.tqdm.write(f"{task.name}: all {len(done)} run(s) finished earlier; nothing to train")
        task.prepare(cfg.settings())
        runs = [_finished(workdir, task.name, lr, seed, r) for (lr, seed), r in done.items()]
        return {**summarize_task(task, runs), "test_predicted": sorted(runs[0]["predictions"])}
    task.prepare(cfg.settings())
    pretrained = _student(cfg, task, mesh, workdir)
    teacher = _teacher(cfg, task, pretrained, mesh) if cfg.distill else None
    dropout = None if cfg.classifier_dropout < 0 else cfg.classifier_dropout
    objective = task.objective(dropout)
    if teacher is not None:  # its settings checked against both models before the data
        objective = objectives.task_distillation(
            objective,
            teacher.config,
            **distill_options(cfg.distill),
            student_config=pretrained.config,
        )
    data = task.load(cfg.settings(), pretrained.tokenizer)
    runs = []
    _, steps = finetuning.run_length(cfg, task, len(data.train["input_ids"]))
    for lr in cfg.learning_rates:
        if all(done[(lr, seed)] for seed in cfg.seeds):
            runs += [
                _finished(workdir, task.name, lr, seed, done[(lr, seed)]) for seed in cfg.seeds
            ]
            continue
        optim = OptimConfig(
            learning_rate=lr,
            warmup_steps=int(cfg.warmup_fraction * steps),
            total_steps=max(steps, 1),
            weight_decay=cfg.weight_decay,
        )
        teacher_params = None if teacher is None else teacher.params
        trainer = training.create_trainer(
            pretrained.config, optim, mesh, cfg.mesh.rules, objective, teacher_params
        )
        for seed in cfg.seeds:
            if done[(lr, seed)]:
                runs.append(_finished(workdir, task.name, lr, seed, done[(lr, seed)]))
                continue
            directory = run_directory(workdir, task.name, lr, seed)
            run = finetuning.Run(
                cfg, task, data, trainer, pretrained, lr, seed, directory, run_settings(cfg)
            )
            with jax.set_mesh(mesh):
                result = run.train()
                result["predictions"] = run.predict_tests(result["best_step"])
            run.finish(result)
            runs.append({"learning_rate": lr, "seed": seed, "directory": directory, **result})
    return {**summarize_task(task, runs), "test_predicted": sorted(data.predict)}


def _student(cfg: FinetuneConfig, task: base.Task, mesh, workdir: str) -> convert.Pretrained:
    """The model to fine-tune (`init_from`, with `student_layers` only), checked against the
    run: weights for evaluation-only runs, no int8 training, positions for the length."""
    pretrained = convert.load_pretrained(
        cfg.init_from,
        task.architecture,
        mesh=mesh,
        rules=cfg.mesh.rules,
        num_labels=task.num_labels,
        scratch_dir=os.path.join(workdir, "vocab"),
        **cfg.numerics,
    )
    if cfg.student_layers:
        params, config = models.take_layers(
            pretrained.params, pretrained.config, cfg.student_layers
        )
        pretrained = dataclasses.replace(pretrained, params=params, config=config)
    if not cfg.num_epochs and pretrained.report.missing:
        raise ValueError(
            f"--config.num_epochs=0 evaluates {cfg.init_from} as it is, but it has no weights "
            f"for {pretrained.report.missing[:3]}: give a model fine-tuned on {task.name} (a "
            f"finetune.py run directory, or hf: with its head)"
        )
    if models.layers.holds_int8(pretrained.config.quantization) and cfg.num_epochs:
        raise ValueError(f"{cfg.init_from}: {training.TRAINING_QUANTIZED}")
    # A fresh task head is expected; anything else missing or left over is worth a word.
    unexpected_missing = [p for p in pretrained.report.missing if p.startswith("bert")]
    if pretrained.report.unexpected or unexpected_missing:
        tqdm.tqdm.write("note: " + pretrained.report.describe(pretrained.description))
    if pretrained.config.length_problem(cfg.max_seq_length):
        raise ValueError(pretrained.config.length_problem(cfg.max_seq_length))
    return pretrained


def _finished(workdir: str, task_name: str, lr: float, seed: int, result: dict) -> dict:
    directory = run_directory(workdir, task_name, lr, seed)
    tqdm.tqdm.write(f"{directory}: finished earlier (best step {result['best_step']}), skipped")
    result = {k: v for k, v in result.items() if k != "settings"}
    return {"learning_rate": lr, "seed": seed, "directory": directory, **result}


def _teacher(cfg: FinetuneConfig, task: base.Task, student, mesh) -> convert.Pretrained:
    """The fine-tuned teacher of `--config.distill.teacher`, checked against the student
    before any training: its task head, its vocabulary (it reads the student's input ids)
    and its positions."""
    source = cfg.distill["teacher"]
    teacher = convert.load_pretrained(
        source,
        task.architecture,
        mesh=mesh,
        rules=cfg.mesh.rules,
        num_labels=task.num_labels,
        **cfg.numerics,
    )
    if teacher.report.missing:
        raise ValueError(
            f"the teacher {source} has no weights for {task.name}'s {task.architecture} "
            f"({teacher.report.missing[:3]}): distill from a model fine-tuned on {task.name}, "
            f"e.g. a finetune.py run directory"
        )
    if vocabulary(teacher.tokenizer) != vocabulary(student.tokenizer):
        raise ValueError(
            f"the teacher {source} and the student {cfg.init_from} have different vocabularies;"
            f" the teacher reads the student's token ids: use models of one vocabulary"
        )
    if teacher.config.length_problem(cfg.max_seq_length):
        raise ValueError("teacher: " + teacher.config.length_problem(cfg.max_seq_length))
    tqdm.tqdm.write(f"distilling from {teacher.description}")
    return teacher


def summarize_task(task: base.Task, runs: list[dict]) -> dict:
    """Per learning rate: median, mean and sample standard deviation over seeds of every dev
    metric; the chosen learning rate is the one with the best median GLUE score."""
    by_lr = {}
    for lr in sorted({r["learning_rate"] for r in runs}):
        group = [r for r in runs if r["learning_rate"] == lr]
        stats = {}
        for split in task.dev_names:
            for metric in (*task.metrics, "score"):
                values = np.array([r["dev"][split][metric] for r in group])
                stats[f"{split}/{metric}"] = {
                    "median": float(np.median(values)),
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "n": len(values),
                    "values": values.tolist(),
                }
        by_lr[f"{lr:g}"] = stats
    main = f"{task.dev_names[0]}/score"
    chosen = max(by_lr, key=lambda lr: by_lr[lr][main]["median"])
    group = [r for r in runs if f"{r['learning_rate']:g}" == chosen]
    submitted = max(group, key=lambda r: r["dev"][task.dev_names[0]]["score"])
    return {
        "runs": runs,
        "by_learning_rate": by_lr,
        "chosen_learning_rate": chosen,
        "submission_run": submitted["directory"],
    }


def results_table(results: dict, bert_base: bool) -> str:
    """Markdown: per task and metric, median (mean ± std, n seeds) at the chosen rate."""
    lines = [
        "| task | metric | lr | median | mean ± std | seeds |"
        + (" BERT-Base published |" if bert_base else ""),
        "|---|---|---|---|---|---|" + ("---|" if bert_base else ""),
    ]
    for name, res in results.items():
        task = registry.get_task(name)
        stats = res["by_learning_rate"][res["chosen_learning_rate"]]
        # What the summary holds (a task's dev sets and metrics can depend on its data).
        named = [key.split("/", 1) for key in stats if not key.endswith("/score")]
        named = named or [key.split("/", 1) for key in stats]
        splits = {split for split, _ in named}
        for split, metric in named:
            s = stats[f"{split}/{metric}"]
            label = metric if len(splits) == 1 else f"{metric} ({split})"
            row = (
                f"| {name} | {label} | {res['chosen_learning_rate']} | "
                f"{100 * s['median']:.2f} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | "
                f"{s['n']} |"
            )
            if bert_base:
                published = task.published_figure(split, metric)
                row += f" {published:.2f} |" if published is not None else " |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    cfg = parse_config(_CONFIG.value, need_data=not _TOPOLOGY.value)
    if _TOPOLOGY.value:
        compile_for_topology(cfg)
        return
    # Every learning rate, and the tasks of the same label count, compile the same programs:
    # the persistent compilation cache turns all but the first into a lookup.
    sharding.enable_compilation_cache()
    workdir = _WORKDIR.value
    problem = files.writable_problem(workdir, "the fine-tuning runs")
    if problem:
        raise PermissionError(problem)
    check_data(cfg)
    convert.model_kind(cfg.init_from)
    mesh = sharding.make_mesh(cfg.mesh)
    with run_files.WorkdirLock(workdir, " ".join(sys.argv)):
        run_files.check_settings(workdir, finetuning.SETTINGS, run_settings(cfg))
        finetuning.STOP.install()
        try:
            finetune_all(cfg, mesh, workdir)
        except finetuning.Preempted as e:
            print(e)


def compile_for_topology(cfg: FinetuneConfig) -> None:
    """`--topology`: every task's fine-tuning step (a full batch of one example per row, the
    largest a packed batch can be) and prediction step (a batch of `eval_batch_size`, as
    evaluation runs it), compiled for a TPU slice."""
    devices = aot.topology_devices(_TOPOLOGY.value)
    kind, path = convert.model_kind(cfg.init_from)
    if kind == "bert_jax":
        model = convert.read_run(path)["config"]
    elif kind == "hf":  # its config.json alone: no weights are needed to compile
        config_file = os.path.join(path, "config.json")
        if not files.exists(config_file):
            raise FileNotFoundError(f"{path} has no config.json (a Hugging Face model's sizes)")
        model = convert.config_from_hf(json.loads(files.read_bytes(config_file)), config_file)
    else:
        model = convert.read_tf_checkpoint(path).config
    model = dataclasses.replace(model, **cfg.numerics)
    settings = cfg.settings()
    groups: dict[tuple, list[str]] = {}  # tasks that compile the same programs
    for name in cfg.tasks:
        task = registry.get_task(name)
        task.prepare(settings)
        specs = task.feature_specs(settings)
        key = (task.architecture, task.num_labels, tuple(sorted(specs.items())))
        groups.setdefault(key, []).append(name)
    reports, tables = {}, []
    for (architecture, labels, specs), names in groups.items():
        task = registry.get_task(names[0])
        task.prepare(settings)
        setup = planner.Setup(
            model=model,
            optim=OptimConfig(learning_rate=cfg.learning_rates[0], weight_decay=cfg.weight_decay),
            mesh=cfg.mesh,
            batch_size=cfg.batch_size,
            seq_len=cfg.max_seq_length,
            specs=dict(specs),
            objective=task.objective(None),
            programs=("train_step", "predict_step"),
            eval_batch_size=cfg.eval_batch_size,
        )
        report, _ = planner.compile_target(setup, devices)
        label = f"{architecture}, {labels} label(s)"
        reports[label] = report
        tables.append(f"{label}: {', '.join(names)}\n{report['table']}")
    path = _REPORT.value or f"compile_{_TOPOLOGY.value.replace(':', '_')}.json"
    files.atomic_write(path, json.dumps(reports, indent=2).encode())
    print("\n\n".join(tables) + f"\nreport: {path} (compiled for the target, not run on it)")


def finetune_all(cfg: FinetuneConfig, mesh, workdir: str) -> None:
    """Every task, then the submission folder and the results tables."""
    results = {name: finetune_task(cfg, name, mesh, workdir) for name in cfg.tasks}
    submission = os.path.join(workdir, "submission")
    for res in results.values():
        chosen = next(r for r in res["runs"] if r["directory"] == res["submission_run"])
        for path in chosen["predictions"].values():
            files.makedirs(submission)
            files.copy(path, os.path.join(submission, os.path.basename(path)))
    model = json.load(
        files.open(os.path.join(next(iter(results.values()))["submission_run"], "config.json"))
    )["model"]
    # BERT-Base sizes without ALBERT's sharing: the published figures are comparable.
    bert_base = (
        model["hidden_size"],
        model["num_hidden_layers"],
        model["num_attention_heads"],
        model.get("share_layers", "none"),
    ) == (768, 12, 12, "none")
    table = results_table(results, bert_base)
    missing = [name for name, res in results.items() if not res["test_predicted"]]
    if missing:
        table += f"\nNo test files for {', '.join(missing)}: no submission for them.\n"
    results_json = json.dumps({"model": model, "tasks": results}, indent=2)
    files.atomic_write(os.path.join(workdir, "results.json"), results_json.encode("utf-8"))
    files.atomic_write(os.path.join(workdir, "results.md"), table.encode("utf-8"))
    print(table)


if __name__ == "__main__":
    app.run(cli.absl_main(main, lambda: _VERBOSE.value))
