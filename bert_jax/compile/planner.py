"""The memory and mesh planner: which mesh, remat policy and micro-batch a run should use on
a device target, decided by compiling the candidates (`bert_jax.compile.aot`), not by a formula.

`compile_target` is what `train.py --topology=... [--plan]` and `finetune.py --topology=...`
run: the steps of a run compiled for a target, optionally after the search, as one report.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax

from bert_jax import objectives, sharding
from bert_jax.compile import aot
from bert_jax.models import BertConfig
from bert_jax.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run a step: mesh sizes (data, fsdp, tensor), remat policy and the
    micro-batch each data-parallel replica computes at once (the step's batch is then
    accumulated over `accum_steps` micro-batches)."""

    data: int
    fsdp: int
    tensor: int
    remat: str
    micro_batch: int
    accum_steps: int

    def describe(self) -> str:
        return (
            f"mesh data={self.data} fsdp={self.fsdp} tensor={self.tensor}, remat {self.remat}, "
            f"{self.micro_batch} per replica x {self.accum_steps} accumulation steps"
        )


@dataclasses.dataclass(frozen=True)
class Trial:
    candidate: Candidate
    report: aot.ProgramReport
    tokens_per_chip: float  # per optimizer step

    @property
    def collective_bytes_per_token(self) -> float:
        return self.report.collective_bytes / self.tokens_per_chip

    @property
    def flops_per_token(self) -> float:
        return self.report.flops / self.tokens_per_chip


_REMAT_ORDER = ("none", "minimal", "full")


MESH_FAMILIES = ("data", "fsdp", "tensor")


def mesh_candidates(
    chips: int,
    heads: int,
    intermediate: int,
    slices: int = 1,
    families: Sequence[str] = MESH_FAMILIES,
) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) shapes worth compiling for `chips` devices in `slices` slices, of
    the `families` asked: `data` (all data parallel), `fsdp` (FSDP inside each slice) and
    `tensor` (FSDP with tensor parallelism of 2 or 4 where the heads and the MLP divide);
    data parallel across slices in every case."""
    unknown = set(families) - set(MESH_FAMILIES)
    if unknown:
        raise ValueError(
            f"unknown mesh families {sorted(unknown)}: choose from {', '.join(MESH_FAMILIES)}"
        )
    per_slice = chips // slices
    shapes = {"data": [(chips, 1, 1)], "fsdp": [], "tensor": []}
    if per_slice > 1:
        shapes["fsdp"].append((slices, per_slice, 1))
    for t in (2, 4):
        if per_slice % t == 0 and per_slice > t and heads % t == 0 and intermediate % t == 0:
            shapes["tensor"].append((slices, per_slice // t, t))
    return [shape for family in MESH_FAMILIES if family in families for shape in shapes[family]]


def plan(
    compile_candidate: Callable[[Candidate], aot.ProgramReport],
    *,
    chips: int,
    global_batch: int,
    seq_len: int,
    meshes: Sequence[tuple[int, int, int]],
    remats: Sequence[str] = _REMAT_ORDER,
    headroom: float = 0.1,
    log: Callable[[str], None] = print,
) -> tuple[Trial | None, list[Trial]]:
    """Searches for the best way to run a step of `global_batch` sequences on `chips`.

    For each mesh, remat policies from the cheapest: the largest micro-batch (a power of two
    dividing the replica's share of the batch) that compiles with at least `headroom` of the
    chip free, found by bisection over those sizes. A policy that recomputes more is tried
    only when the cheaper one could not run the whole replica batch at once.

    The winner: the largest micro-batch per chip; then the fewest FLOPs per token (less
    recomputation); then the fewest collective bytes per token.

    Returns:
      (the winning trial or None when nothing fits, every trial in the order compiled).
    """
    trials: list[Trial] = []
    attempt = functools.partial(
        _attempt, compile_candidate, trials, global_batch, seq_len, chips, headroom, log
    )
    best: Trial | None = None
    for shape in meshes:
        replicas = shape[0] * shape[1]
        if global_batch % replicas:
            continue
        per_replica = global_batch // replicas
        sizes = _powers_of_two(per_replica)
        for remat in remats:
            found = _largest_fitting(sizes, functools.partial(attempt, shape, remat), headroom)
            if found is not None and (best is None or _better(found, best)):
                best = found
            if found is not None:
                if found.candidate.micro_batch == per_replica:
                    break  # more recomputation cannot run a larger micro-batch
                # More recomputation only pays with a larger micro-batch than this one.
                sizes = [m for m in sizes if m > found.candidate.micro_batch]
    return best, trials


def _attempt(
    compile_candidate, trials, global_batch, seq_len, chips, headroom, log, shape, remat, micro
) -> tuple[Trial | None, aot.ProgramReport]:
    """Compiles one candidate and records it in `trials`: (the trial when it fits with
    `headroom` free, else None; its report)."""
    data, fsdp, tensor = shape
    replicas = data * fsdp
    candidate = Candidate(data, fsdp, tensor, remat, micro, global_batch // replicas // micro)
    report = compile_candidate(candidate)
    if report.fits and report.headroom is not None and report.headroom < headroom:
        report = dataclasses.replace(
            report,
            error=f"fits with {report.headroom:.0%} free, under the {headroom:.0%} asked",
        )
    trial = Trial(candidate, report, global_batch * seq_len / chips)
    ok = report.fits and (report.headroom is None or report.headroom >= headroom)
    log(
        f"  {'fits ' if ok else 'no   '} {candidate.describe()}: "
        f"{report.required / aot.GIB:.2f} GiB of "
        f"{(report.capacity or 0) / aot.GIB:.2f}, collectives "
        f"{trial.collective_bytes_per_token:,.0f} B/token, {report.compile_seconds:.0f} s"
    )
    trials.append(trial)
    return trial if ok else None, report


def _powers_of_two(n: int) -> list[int]:
    """Powers of two dividing n, and n itself, ascending."""
    sizes = {1 << i for i in range(n.bit_length()) if n % (1 << i) == 0}
    return sorted(sizes | {n})


def _largest_fitting(
    sizes: list[int],
    attempt: Callable[[int], tuple[Trial | None, aot.ProgramReport]],
    headroom: float,
) -> Trial | None:
    """The largest size whose attempt fits (fitting is monotone in the size).

    The largest size first: a batch that fits whole needs one compile. When it does not,
    the compiler's figure for it guesses the size that would fit (memory scales at most in
    proportion to the micro-batch, so the guess errs low), then bisection between what is
    known to fit and what is known not to: two or three compiles where the guess is good.
    """
    trial, report = attempt(sizes[-1])
    if trial is not None:
        return trial
    known_fit, known_fail, found = -1, len(sizes) - 1, None
    if report.capacity and report.required:
        target = sizes[-1] * report.capacity * (1 - headroom) / report.required
        guess = max([i for i, size in enumerate(sizes[:-1]) if size <= target] or [0])
        trial, _ = attempt(sizes[guess])
        if trial is None:
            known_fail = guess
        else:
            known_fit, found = guess, trial
            # Memory is close to linear in the micro-batch: the line through the fitting
            # guess and the failing whole batch points at the largest size that fits.
            budget = report.capacity * (1 - headroom)
            slope = (report.required - trial.report.required) / (sizes[-1] - sizes[guess])
            if slope > 0:
                reach = sizes[guess] + (budget - trial.report.required) / slope
                better = max([i for i, s in enumerate(sizes) if s <= reach] or [guess])
                if guess < better < known_fail:
                    trial, _ = attempt(sizes[better])
                    if trial is None:
                        known_fail = better
                    else:
                        known_fit, found = better, trial
    while known_fail - known_fit > 1:
        mid = (known_fit + known_fail) // 2
        trial, _ = attempt(sizes[mid])
        if trial is None:
            known_fail = mid
        else:
            known_fit, found = mid, trial
    return found


def _better(a: Trial, b: Trial) -> bool:
    """The planner's order: larger micro-batch per chip, fewer FLOPs and collective bytes."""

    def key(t: Trial):
        c = t.candidate
        per_chip = c.micro_batch / c.tensor
        return (-per_chip, round(t.flops_per_token), t.collective_bytes_per_token)

    return key(a) < key(b)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What compiling a run's steps needs: model, optimizer, mesh, global batch, one
    example's features, the objective and the programs to compile."""

    model: BertConfig
    optim: OptimConfig
    mesh: sharding.MeshConfig
    batch_size: int
    seq_len: int
    specs: aot.Specs
    objective: objectives.Objective = objectives.PRETRAINING
    programs: tuple[str, ...] = ("train_step", "eval_step")
    eval_batch_size: int | None = None  # the eval and predict steps' batch (None: a micro-batch)

    def with_candidate(self, c: Candidate) -> "Setup":
        return dataclasses.replace(
            self,
            model=dataclasses.replace(self.model, remat=c.remat),
            optim=dataclasses.replace(self.optim, grad_accum_steps=c.accum_steps),
            mesh=sharding.MeshConfig(c.data, c.fsdp, c.tensor, self.mesh.auto),
        )

    def flags(self) -> str:
        """The command-line overrides that select this setup's mesh, remat and accumulation."""
        return (
            f"--config.mesh.data={self.mesh.data} --config.mesh.fsdp={self.mesh.fsdp} "
            f"--config.mesh.tensor={self.mesh.tensor} --config.model.remat={self.model.remat} "
            f"--config.optim.grad_accum_steps={self.optim.grad_accum_steps}"
        )

    def compile(self, devices: Sequence[jax.Device], capacity: int | None, programs=None):
        mesh = sharding.make_mesh(self.mesh, devices)
        k = self.optim.grad_accum_steps
        return aot.compile_steps(
            self.model,
            self.optim,
            mesh,
            self.batch_size,
            self.specs,
            objective=self.objective,
            programs=programs or self.programs,
            capacity=capacity,
            eval_batch_size=self.eval_batch_size or self.batch_size // k,
        )


def find_plan(
    setup: Setup,
    devices: Sequence[jax.Device],
    capacity: int | None,
    *,
    families: Sequence[str] = MESH_FAMILIES,
    remats: Sequence[str] = _REMAT_ORDER,
    headroom: float = 0.1,
    log: Callable[[str], None] = print,
) -> tuple[Trial | None, list[Trial]]:
    """`plan` for `setup`'s train step on `devices`: the meshes of `families` that the
    model divides, each candidate compiled for those devices."""
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    meshes = mesh_candidates(
        len(devices),
        setup.model.num_attention_heads,
        setup.model.intermediate_size,
        slices,
        families,
    )
    return plan(
        lambda c: setup.with_candidate(c).compile(devices, capacity, ("train_step",))[0],
        chips=len(devices),
        global_batch=setup.batch_size,
        seq_len=setup.seq_len,
        meshes=meshes,
        remats=remats,
        headroom=headroom,
        log=log,
    )


def compile_target(
    setup: Setup,
    devices: Sequence[jax.Device],
    *,
    search: bool = False,
    headroom: float = 0.1,
    families: Sequence[str] = MESH_FAMILIES,
    remats: Sequence[str] = _REMAT_ORDER,
    log: Callable[[str], None] = print,
) -> tuple[dict, Setup]:
    """Compiles `setup`'s programs for `devices`; with `search`, first plans the mesh, remat
    and micro-batch (`find_plan` over the mesh `families` and `remats`) and compiles the
    winner.

    Returns:
      (the report as JSON-ready dict, the setup compiled).

    Raises:
      ValueError when the search finds nothing that fits, naming what was tried.
    """
    capacity = aot.hbm_bytes(devices[0])
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    tokens_per_chip = setup.batch_size * setup.seq_len / len(devices)
    report: dict = {
        "chips": len(devices),
        "slices": slices,
        "hosts": len({d.process_index for d in devices}),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "usable_memory_bytes": capacity,
        "global_batch": setup.batch_size,
        "seq_len": setup.seq_len,
    }
    if search:
        log(f"planning: {len(devices)} x {devices[0].device_kind}, batch {setup.batch_size}")
        setup, report["plan"], programs = _planned(
            setup, devices, capacity, families, remats, headroom, log
        )
    else:
        programs = setup.compile(devices, capacity)
    report["setup"] = {
        "mesh": dataclasses.asdict(setup.mesh),
        "remat": setup.model.remat,
        "grad_accum_steps": setup.optim.grad_accum_steps,
        "dtype": setup.model.dtype,
    }
    report["attention"] = {
        name: aot.attention_path(
            setup.model, devices[0].platform, setup.seq_len, name == "train_step"
        )
        for name in setup.programs
    }
    report["tokens_per_chip"] = tokens_per_chip
    report["programs"] = [p.to_json() for p in programs]
    report["table"] = aot.format_table([(p.name, p) for p in programs], tokens_per_chip)
    return report, setup


def _planned(setup: Setup, devices, capacity, families, remats, headroom, log):
    """(the winning setup, the plan's report, its compiled programs) of `find_plan`."""
    best, trials = find_plan(
        setup, devices, capacity, families=families, remats=remats, headroom=headroom, log=log
    )
    plan_report = {
        "headroom": headroom,
        "trials": [
            {
                **dataclasses.asdict(t.candidate),
                "fits": t.report.fits,
                "required_bytes": t.report.required,
                "collective_bytes_per_token": t.collective_bytes_per_token,
                "compile_seconds": t.report.compile_seconds,
                "note": t.report.error,
            }
            for t in trials
        ],
    }
    if best is None:
        raise ValueError(
            f"no plan fits {len(devices)} x {devices[0].device_kind} with {headroom:.0%} "
            f"free at a global batch of {setup.batch_size} (tried {len(trials)} "
            f"candidates, smallest micro-batch 1 per replica): use a larger slice, a "
            f"smaller model or shorter sequences"
        )
    setup = setup.with_candidate(best.candidate)
    plan_report["chosen"] = dataclasses.asdict(best.candidate)
    plan_report["flags"] = setup.flags()
    # The winner's train step is compiled already; the other programs are not.
    others = [p for p in setup.programs if p != "train_step"]
    compiled = {"train_step": best.report}
    if others:
        compiled.update((p.name, p) for p in setup.compile(devices, capacity, others))
    return setup, plan_report, [compiled[p] for p in setup.programs]
