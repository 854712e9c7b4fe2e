"""A pretraining run's typed config and its loop: the state, the data iterator, checkpoints
(every N steps or minutes, on SIGTERM or a preemption notice, on any process), evaluation, logs
to TensorBoard, the non-finite guard with its rollback, and the profile of chosen steps.
`train.py` builds the pieces and runs it."""

import dataclasses
import time

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from bert_jax import checkpoint, cli, models, run_files, sharding
from bert_jax.data.input_pipeline import DataConfig
from bert_jax.optim import OptimConfig


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
    # Model fields this run sets over init_from's (a context extension's global_rope_theta).
    model_changes: tuple[str, ...] = ()

    def __post_init__(self):
        fields = {f.name for f in dataclasses.fields(models.BertConfig)}
        unknown = sorted(set(self.model_changes) - fields)
        if unknown:
            raise ValueError(f"model_changes names {unknown}, which are not model fields")


class Loop:
    """The training loop's moving parts: state, iterator, checkpoints, logs, guards."""

    def __init__(self, run, trainer, data, ckpt, meta, fresh_state, heartbeat=None):
        """`run`: the RunConfig; `fresh_state()`: the state a workdir without checkpoints
        starts from (initialised, and overlaid with pretrained weights where the run
        says)."""
        self.run, self.cfg, self.trainer, self.ckpt = run, run.train, trainer, ckpt
        self.meta, self.fresh_state = meta, fresh_state
        self.heartbeat = heartbeat or (lambda: None)
        self.writer: LogWriter | None = None  # opened once the run is known to go ahead
        hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
        self.iterator = data.train_iterator(run.train.batch_size, seed=run.train.seed, **hosts)
        self.held_out = HeldOut(run, data, trainer, hosts)
        self.tokens_per_step = run.train.batch_size * run.data.masking.max_seq_length
        self.history: list[list[float]] = []
        self.guard = NonFiniteGuard(run.train.max_bad_steps)
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
            return self.fresh_state()
        step, state, data_state, _ = found
        self.iterator.set_state(data_state)
        say(f"resumed from step {step} in {self.ckpt.directory}")
        return state

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

    def rollback(self):
        self.ckpt.wait()
        step, state, data_state, _ = self.ckpt.restore_latest(self.trainer.abstract_state)
        self.iterator.set_state(data_state)
        self.guard.rolled_back()
        say(f"rolled back to the checkpoint of step {step} after non-finite steps")
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
        initial_eval = {} if first_step else self.held_out(state.params)
        self.held_out.last = {}  # the summary's "eval" is of the trained model
        if initial_eval:
            log_eval(self.writer, 0, initial_eval)
        bar = tqdm.tqdm(
            total=cfg.num_steps,
            initial=first_step,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
            disable=jax.process_index() != 0,
        )
        self.window, self.waited, pending, preempted = (time.time(), step), 0.0, None, False
        profile = Profile(cfg, first_step, self.writer.logdir)
        incoming = self.next_batch() if step < cfg.num_steps else None
        try:
            while step < cfg.num_steps and not preempted:
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
                preempted = self._after_step(state, step, data_state, bar)
            if pending is not None:  # the last step: nothing left to roll back for
                self.settle(pending, bar)
                profile.after_settle(pending[0])
        finally:  # an error's message then starts on a line of its own
            profile.close()
            bar.close()
        if not self.held_out.last:  # Nothing left to train: report the restored model.
            self.held_out(state.params)
        return self._summary(step - first_step, step, time.time() - start, preempted, initial_eval)

    def _after_step(self, state, step: int, data_state: dict, bar) -> bool:
        """Evaluates and saves when due; on preemption saves and returns True."""
        if step % self.cfg.eval_every == 0 or step == self.cfg.num_steps:
            log_eval(self.writer, step, self.held_out(state.params))
        bar.update(1)
        if self.preempted(step):
            self.save(state, step, data_state)
            say(f"preempted: saved step {step}; run the same command again to resume")
            return True
        if self.checkpoint_due(step):
            self.save(state, step, data_state)
        return False

    def _summary(self, steps_run, step, elapsed, preempted, initial_eval) -> dict:
        training = max(elapsed - self.held_out.seconds, 1e-9)
        return {
            "steps": step,
            "steps_this_run": steps_run,
            "preempted": preempted,
            "skipped_steps": self.guard.skipped,
            "seconds": elapsed,
            "tokens_per_second": steps_run * self.tokens_per_step / max(elapsed, 1e-9),
            # Of the training time (evaluations aside), the share the host spent not waiting
            # for a step: dispatch, batches, logs. Near 0: the devices are the bottleneck.
            "host_busy_fraction": 1.0 - self.waited / training,
            "seconds_per_step": training / max(steps_run, 1),
            "train_loss": self.history,
            "initial_eval": initial_eval,
            "eval": self.held_out.last,
        }

    def settle(self, pending: tuple[int, dict], bar) -> bool:
        """Reads a finished step's metrics: the non-finite guard, then the log when due.
        Returns True when the run must roll back."""
        step, metrics = pending
        waited = time.perf_counter()
        with jax.profiler.TraceAnnotation("read_metrics"):
            metrics = jax.device_get(metrics)  # waits for that step; the next one is queued
        self.waited += time.perf_counter() - waited
        if self.guard(metrics, step, self.writer, self.ckpt.latest_step() is not None):
            return True
        if step % self.cfg.log_every == 0 or step == self.cfg.num_steps:
            now, (since, since_step) = time.time(), self.window
            rate = (step - since_step) * self.tokens_per_step / max(now - since, 1e-9)
            self.log(metrics, step, rate, bar)
            self.window = (now, step)
        return False


class HeldOut:
    """The run's held-out batches, evaluated without dropout: `held_out(params)` -> named
    metrics, kept as `last`; `seconds` spent evaluating (what the rate figures leave out)."""

    def __init__(self, run, data, trainer, hosts: dict):
        # Batches of one micro-batch each: a step that accumulates because the whole batch
        # does not fit would not fit its evaluation either.
        k = run.optim.grad_accum_steps
        self.batches = data.eval_batches(
            run.train.batch_size // k, run.train.eval_batches * k, **hosts
        )
        self.trainer, self.last, self.seconds = trainer, {}, 0.0

    def __call__(self, params) -> dict[str, float]:
        began, totals = time.perf_counter(), {}
        for batch in self.batches:
            batch = self.trainer.global_batch(batch)
            for key, value in jax.device_get(self.trainer.eval_step(params, batch)).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        self.last = self.trainer.objective.summarize(totals)
        self.seconds += time.perf_counter() - began
        return self.last


class NonFiniteGuard:
    """Counts the steps the train step did not apply (a non-finite loss, gradient or state);
    `max_bad` of them in a row ask for a rollback to the last checkpoint, once: a run that
    diverges again, or has no checkpoint, stops with an error."""

    def __init__(self, max_bad: int):
        self.max_bad, self.bad_streak, self.rolled_back_once, self.skipped = max_bad, 0, False, 0

    def __call__(self, metrics, step: int, writer, can_roll_back: bool) -> bool:
        """Whether the run must roll back after `step`, whose metrics say if it was applied."""
        if bool(metrics["finite"]):
            self.bad_streak = 0
            return False
        self.skipped += 1
        self.bad_streak += 1
        say(f"warning: step {step} had a non-finite loss, gradient or state and was not applied")
        writer.add_scalar("train/skipped_steps", self.skipped, step)
        if self.bad_streak < self.max_bad:
            return False
        if self.rolled_back_once or not can_roll_back:
            raise RuntimeError(
                f"{self.bad_streak} consecutive non-finite steps up to step {step}"
                + (" again after rolling back" if self.rolled_back_once else "")
                + "; the run diverges: lower optim.learning_rate or check the data"
            )
        return True

    def rolled_back(self) -> None:
        self.rolled_back_once, self.bad_streak = True, 0


def log_eval(writer, step: int, metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        writer.add_scalar(f"eval/{key}", value, step)
    say(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def say(message: str) -> None:
    """A line between the progress bar's updates, from process 0 only."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


class Profile:
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
            say(f"profiled steps {self.start + 1}-{self.last}: {self.logdir}/plugins/profile")

    def close(self) -> None:
        if self.on:
            self.on, self.wanted = False, False
            jax.profiler.stop_trace()


class LogWriter:
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
