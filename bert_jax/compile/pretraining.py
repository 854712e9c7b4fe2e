"""A pretraining run's train step compiled ahead of time before any data is read (refused
when it does not fit), its memory in one line, and `mesh.auto`'s plan for this host's devices."""

import dataclasses
from collections.abc import Callable

import jax

from bert_jax import objectives, sharding, training
from bert_jax.compile import aot, planner
from bert_jax.data import pretraining_data
from bert_jax.training.loop import RunConfig


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


def plan_at_start(run: RunConfig, headroom: float, log: Callable[[str], None]) -> RunConfig:
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
    setup = make_setup(run)
    best, trials = planner.find_plan(setup, devices, capacity, headroom=headroom, log=log)
    if best is None:
        raise ValueError(
            f"config.mesh.auto: nothing fits {len(devices)} x {devices[0].device_kind} at a "
            f"batch of {run.train.batch_size} ({len(trials)} candidates compiled)"
        )
    chosen = setup.with_candidate(best.candidate)
    log(f"mesh.auto chose {best.candidate.describe()}: {chosen.flags()}")
    mesh = dataclasses.replace(chosen.mesh, auto=True)
    return dataclasses.replace(run, model=chosen.model, optim=chosen.optim, mesh=mesh)


def make_setup(run: RunConfig) -> planner.Setup:
    """What the planner compiles for a pretraining run: its model, optimizer, mesh and batch."""
    return planner.Setup(
        model=run.model,
        optim=run.optim,
        mesh=run.mesh,
        batch_size=run.train.batch_size,
        seq_len=run.data.masking.max_seq_length,
        specs=pretraining_data.feature_specs(run.data.masking),
        objective=objectives.pretraining_objective(run.model),
    )
