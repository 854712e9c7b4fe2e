"""One fine-tuning run of a task (a learning rate and a seed): the epochs of packed or padded
batches, evaluation on the task's dev sets, the best checkpoint, predictions from it, and the
whole state saved on a cadence and on SIGTERM so that the same command resumes it bitwise.
`finetune.py` builds the sweep of runs; the task (`tasks.base.Task`) reads, decodes and scores.
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np
import tqdm

from bert_jax import checkpoint, convert, files, run_files, training
from bert_jax.data import encoding

RESULT = "result.json"  # a finished run's results; a rerun skips the run
SETTINGS = "finetune_settings.json"  # what every run of the workdir was trained with


class Preempted(Exception):
    """SIGTERM (a TPU maintenance event, a spot preemption): the run saved and stops."""


STOP = run_files.StopFlag()


def finished_run(directory: str) -> dict | None:
    """The results of a run that finished in an earlier invocation, or None."""
    path = os.path.join(directory, RESULT)
    return json.loads(files.read_bytes(path)) if files.exists(path) else None


class Run:
    """One fine-tuning run (task, learning rate, seed): train, evaluate, keep the best."""

    def __init__(self, cfg, task, data, trainer, pretrained, lr, seed, directory, settings):
        """`cfg`: finetune.py's FinetuneConfig; `task`: a `tasks.base.Task` and `data` its
        loaded splits; `settings`: what the results depend on, recorded with them."""
        self.cfg, self.task, self.data, self.trainer = cfg, task, data, trainer
        self.settings = settings
        self.pretrained, self.lr, self.seed, self.directory = pretrained, lr, seed, directory
        self.data_parallel = trainer.data_parallel
        self.main_dev = task.dev_names[0]
        self.pack = cfg.pack and task.packable
        self.writer = run_files.SummaryWriter(os.path.join(directory, "tensorboard"))
        meta = convert.describe_run(
            directory,
            pretrained.config,
            task.architecture,
            task.num_labels,
            pretrained.tokenizer,
            extra={
                "task": task.name,
                "labels": list(task.label_names),
                **task.run_record(),
                **({"distilled_from": dict(cfg.distill)} if cfg.distill else {}),
            },
        )
        self.meta = {**meta, "task": task.name, "learning_rate": lr, "seed": seed}
        self.predictor = SplitPredictor(trainer, cfg, self.pack)
        # checkpoints/: the best weights (the run as a model); resume/: the whole state of the
        # newest save, which a rerun of the same command continues from.
        self.ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"), max_to_keep=1)
        self.resume = checkpoint.Checkpointer(os.path.join(directory, "resume"), max_to_keep=1)
        self.last_save = time.time()

    def start(self) -> tuple[int, training.TrainState, dict]:
        """(step, train state, loop state) to go on from: the newest save of an earlier
        attempt at this run (its weights, optimizer, step, dropout key and best so far), or
        the imported weights at step 0."""
        fresh = _Best().loop_state()
        restored = self.resume.restore_latest(self.trainer.abstract_state, start_over=True)
        if restored is None:
            state = self.trainer.init(self.seed)
            # Copies: the step donates the state, and the imported weights serve every seed.
            imported = jax.tree.map(lambda x: x.copy(), self.pretrained.params)
            return 0, state.replace(params=convert.overlay(state.params, imported)), fresh
        step, state, loop, _ = restored
        # A best checkpoint newer than the save was made after it: it is made again.
        for saved in self.ckpt.manager.all_steps():
            if saved != loop["best_step"]:
                self.ckpt.manager.delete(saved)
        tqdm.tqdm.write(f"{self.directory}: resumed from step {step}")
        return step, state, loop

    def save_due(self, step: int) -> bool:
        every, minutes = self.cfg.checkpoint_every_steps, self.cfg.checkpoint_minutes
        return (
            STOP.requested
            or (every > 0 and step % every == 0)
            or (minutes > 0 and time.time() - self.last_save > 60 * minutes)
        )

    def save(self, step: int, state, loop: dict) -> None:
        """Saves everything the run needs to go on from `step`; on SIGTERM waits for it to be
        written and stops (`Preempted`)."""
        self.resume.save(step, state, loop, self.meta)
        self.last_save = time.time()
        if STOP.requested:
            self.resume.wait()
            self.ckpt.wait()
            self.writer.close()
            raise Preempted(
                f"stopped by SIGTERM at step {step} of {self.directory}, saved: run the same "
                f"command again to resume"
            )

    def finish(self, result: dict) -> None:
        """Records the finished run (a rerun skips it) and drops its resume state."""
        result = {**result, "settings": self.settings}
        files.atomic_write(
            os.path.join(self.directory, RESULT), json.dumps(result, indent=2).encode()
        )
        self.resume.close()
        files.rmtree(os.path.join(self.directory, "resume"))

    def evaluate(self, params, step: int) -> dict[str, dict[str, float]]:
        results = {}
        for name, split in self.data.dev.items():
            metrics = self.task.evaluate(name, split, self.predictor(params, split.features))
            results[name] = metrics
            for key, value in metrics.items():
                self.writer.add_scalar(f"{name}/{key}", value, step)
        return results

    def train(self) -> dict:
        cfg, train = self.cfg, self.data.train
        n = len(train["input_ids"])
        steps_per_epoch, total = run_length(cfg, self.task, n)
        if total == 0:  # num_epochs=0: the model as it was loaded, evaluated and kept
            results = self.evaluate(self.pretrained.params, 0)
            self.ckpt.save(0, {"params": self.pretrained.params}, {}, self.meta)
            self.ckpt.wait()
            return {"best_step": 0, "dev": results, "history": [{"step": 0, **results}], "steps": 0}
        batches, row_counts = train_batches(
            cfg, train, self.seed, total, self.pack, self.data_parallel
        )
        step, state, loop = self.start()
        best = _Best(**loop)
        bar = tqdm.tqdm(
            total=total,
            initial=step,
            desc=f"{self.task.name} lr={self.lr:g} seed={self.seed}",
            unit="step",
            dynamic_ncols=True,
        )
        in_flight = _InFlight(bar)
        while step < total:
            host = {k: v[batches[step]] for k, v in train.items()}
            if self.pack:
                host = encoding.pack(
                    host, cfg.pack_max_examples, self.data_parallel, rows=row_counts[step]
                )
                del host["source"]
            state, metrics = self.trainer.train_step(state, self.trainer.global_batch(host))
            step += 1
            in_flight.dispatched(metrics["loss_sum"])
            if step % cfg.log_every == 0:
                self._log(jax.device_get(metrics), step, bar)
            due = step % steps_per_epoch == 0 or step == total
            if cfg.eval_every_steps:
                due = due or step % cfg.eval_every_steps == 0
            stop = due and self._evaluate_and_keep(state, step, best, in_flight)
            if not stop and step < total and self.save_due(step):
                self.save(step, state, best.loop_state())
            if stop:
                break
        in_flight.settle()
        bar.close()
        self.ckpt.wait()
        return {
            "best_step": best.best_step,
            "dev": best.best,
            "history": best.history,
            "steps": step,
        }

    def _log(self, metrics: dict, step: int, bar) -> None:
        summary = self.trainer.objective.summarize(metrics)
        for key, value in summary.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.add_scalar("train/learning_rate", float(metrics["learning_rate"]), step)
        bar.set_postfix(loss=f"{summary['loss']:.4f}")

    def _evaluate_and_keep(self, state, step: int, best: "_Best", in_flight: "_InFlight") -> bool:
        """Evaluates at `step`, keeps the weights when they are the best so far; whether
        early stopping ends the run."""
        in_flight.settle()  # the bar shows this step done before evaluating
        results = self.evaluate(state.params, step)
        score = results[self.main_dev]["score"]
        best.history.append({"step": step, **results})
        in_flight.bar.set_postfix(dev=f"{score:.4f}")
        if best.best is None or score > best.best[self.main_dev]["score"]:
            best.best, best.best_step, best.evals_since_best = results, step, 0
            self.ckpt.save(step, {"params": state.params}, {}, self.meta)
            return False
        best.evals_since_best += 1
        patience = self.cfg.early_stopping_patience
        if patience and best.evals_since_best >= patience:
            tqdm.tqdm.write(
                f"early stop at step {step}: no gain in {best.evals_since_best} evaluations"
            )
            return True
        return False

    def predict_tests(self, best_step: int) -> dict[str, str]:
        """Restores the best checkpoint; writes the task's predictions beside it."""
        abstract = {"params": self.trainer.abstract_state.params}
        restored, _, _ = self.ckpt.restore(best_step, abstract)
        params = restored["params"]
        written = {}
        for name, split in self.data.predict.items():
            outputs = self.predictor(params, split.features)
            written[name] = self.task.write_predictions(self.directory, name, split, outputs)
        self.ckpt.close()
        self.writer.close()
        return written


@dataclasses.dataclass
class _Best:
    """The best evaluation so far (`results` per dev set, at `step`), how many evaluations
    have passed without a gain, and every evaluation's results: the loop state a save keeps
    (under the names of its JSON)."""

    best: dict | None = None
    best_step: int = 0
    evals_since_best: int = 0
    history: list = dataclasses.field(default_factory=list)

    def loop_state(self) -> dict:
        return dataclasses.asdict(self)


class _InFlight:
    """One step in flight: the bar counts the steps that have run (it raced ahead of a queue
    of dispatched steps and then stalled at each log), and the next batch is prepared while
    a step runs."""

    def __init__(self, bar):
        self.bar, self.previous = bar, None

    def dispatched(self, output) -> None:
        self.settle()
        self.previous = output

    def settle(self) -> None:
        if self.previous is not None:
            jax.block_until_ready(self.previous)
            self.bar.update(1)
            self.previous = None


class SplitPredictor:
    """A run's predictions for whole splits, in order: padded batches of `eval_batch_size`,
    or packed rows (`encoding.pack`) with one shape for the run, each split packed once."""

    def __init__(self, trainer, cfg, pack: bool):
        self.trainer, self.cfg, self.pack = trainer, cfg, pack
        self.packed_splits: dict[int, tuple] = {}
        self.rows = 0  # rows per packed prediction batch, the same for every split

    def __call__(self, params, features):
        """The model's outputs (an array, or a tuple of arrays: QA's start and end scores)
        for every row of `features`, in order."""
        n = len(features["input_ids"])
        step, batch = self.trainer.predict_step, self.trainer.global_batch
        if self.pack:
            packed, source, per = self.packed_split(features)
            outputs = [
                jax.device_get(step(params, batch({k: v[i : i + per] for k, v in packed.items()})))
                for i in range(0, len(source), per)
            ]
            return encoding.unpack(np.concatenate(outputs), source, n)
        outputs, b = [], self.cfg.eval_batch_size
        for start in range(0, n, b):
            real = min(b, n - start)
            host = {k: pad_rows(v[start : start + real], b) for k, v in features.items()}
            out = jax.device_get(step(params, batch(host)))
            outputs.append(jax.tree.map(lambda x, real=real: np.asarray(x)[:real], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)

    def packed_split(self, features: dict[str, np.ndarray]) -> tuple[dict, np.ndarray, int]:
        """A prediction split packed whole (rows filled across what would be batches), as
        (packed arrays, their slots' sources, rows per prediction batch): one shape for the
        run (the first split sets it: about `eval_batch_size` examples a batch). Kept for the
        run's evaluations."""
        key, parallel = id(features), self.trainer.data_parallel
        if key not in self.packed_splits:
            n, width = features["input_ids"].shape
            lengths = features["input_mask"].sum(axis=1)
            needed = len(encoding.pack_rows(lengths, width, self.cfg.pack_max_examples))
            if not self.rows:
                per = -(-needed * self.cfg.eval_batch_size // n)
                self.rows = -(-per // parallel) * parallel
            per = self.rows
            rows = -(-needed // per) * per
            packed = encoding.pack(features, self.cfg.pack_max_examples, parallel, rows=rows)
            source = packed.pop("source")
            self.packed_splits[key] = (features, packed, source, per)
        _, packed, source, per = self.packed_splits[key]
        return packed, source, per


def train_batches(cfg, features, seed, total, pack, data_parallel):
    """The examples of each of a run's `total` steps (a new shuffle each epoch, the last
    partial batch dropped, as the original does), and for packed batches the row count of
    each: every batch's need is known before the first step, so that the run compiles one or
    two shapes (`encoding.row_counts`) that fit every batch."""
    n, size = len(features["input_ids"]), cfg.batch_size
    rng, order, batches = np.random.default_rng(seed), np.empty(0, np.int64), []
    while len(batches) < total:
        if len(order) < size:
            order = rng.permutation(n)
        batches.append(order[:size])
        order = order[size:]
    if not pack:
        return batches, [None] * total
    lengths = features["input_mask"].sum(axis=1)
    width = features["input_ids"].shape[1]
    needs = [len(encoding.pack_rows(lengths[b], width, cfg.pack_max_examples)) for b in batches]
    counts = encoding.row_counts(needs, data_parallel)
    return batches, [min(c for c in counts if c >= need) for need in needs]


def run_length(cfg, task, n: int) -> tuple[int, int]:
    """(steps per epoch, total steps) for `n` training examples; each epoch drops the last
    partial batch, as the original does."""
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{task.name}: {n} training examples are fewer than one batch of "
            f"{cfg.batch_size}; lower --config.batch_size"
        )
    if not cfg.num_epochs:  # evaluation only
        return steps_per_epoch, 0
    return steps_per_epoch, max(1, int(round(cfg.num_epochs * steps_per_epoch)))


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """`x` with zero rows appended up to `size` rows."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])
