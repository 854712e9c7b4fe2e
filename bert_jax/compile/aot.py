"""Ahead-of-time compilation for a device target, and what the compiler says of the program.

A jitted step is lowered with its real shardings on a mesh of the target's devices and
compiled; `analyze` reads the compiled program: per-chip memory (arguments, temporaries,
outputs, generated code) against the chip's HBM, FLOPs, the collectives it executes per
step (loops counted by their trip counts) and the custom kernels it calls. The target is any
device list: the local devices, or a named TPU topology that `libtpu` describes on any host
(`topology_devices("v5e:2x4")`), so a run is proven to fit a pod slice before it is rented.

`plan` searches mesh shapes, remat policies and micro-batch sizes for the largest per-chip
micro-batch that fits with headroom, compiling each candidate it tries.
"""

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from bert_jax import objectives, sharding, training
from bert_jax.models import BertConfig, attention
from bert_jax.optim import OptimConfig

GIB = 2**30
# HBM per chip by device kind, used where the compiler did not state the usable amount.
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,
    "TPU v5": 95 * GIB,
    "TPU v5p": 95 * GIB,
    "TPU v6 lite": 32 * GIB,
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_OOM = re.compile(
    r"total memory required for [^(]*\(([\d.]+)([KMGT]?)\)[^(]*"
    r"exceeds available HBM \(([\d.]+)([KMGT]?)\)"
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


# Cloud TPU slice names (cores for v4 and v5p, chips for v5e and v6e) -> chip topologies.
_SLICE_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_SLICE_3D = {
    4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
    512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
}  # fmt: skip


def topology_name(name: str) -> str:
    """A Cloud TPU slice name (`v5e-8`, `v4-8`, `v5p-128`, `v6e-256`) as libtpu's topology
    (`v5e:2x4`, `v4:2x2x1`, ...); a topology name is returned as it is."""
    match = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod)-(\d+)", name)
    if match is None:
        return name
    version, n = match[1].replace("v5litepod", "v5e"), int(match[2])
    table, chips = (_SLICE_3D, n // 2) if version in ("v4", "v5p") else (_SLICE_2D, n)
    if chips not in table:
        raise ValueError(f"unknown slice size {name!r}; use one of {version}-{sorted(table)}")
    return f"{version}:{table[chips]}"


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
    """The devices of a TPU topology (`v5e:2x4`, `v4:2x2x2`, or a slice name as `v5e-8`;
    several slices with `num_slices`), described by libtpu on any host, for compiling only.
    v4 chips are one device each (megacore), as JAX runs them.

    Raises:
      ValueError naming the fix when libtpu is missing or rejects the name.
    """
    from jax.experimental import topologies

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no Cloud TPU metadata server here
    # Compiling holds no chip: let other processes (a running job, a test) load libtpu too.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError(
            "compiling for a TPU topology needs libtpu: pip install -r requirements-tpu.txt"
        ) from None
    name = topology_name(topology)
    extra = {"chip_config_name": "megacore"} if name.startswith("v4:") else {}
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=name, num_slices=num_slices, **extra
        )
    except Exception as e:  # libtpu raises XlaRuntimeError for names it does not know
        raise ValueError(
            f"libtpu cannot describe the TPU topology {topology!r} ({num_slices} slice(s)): "
            f"{str(e).splitlines()[0]}; use a slice name (v5e-8, v4-8, v5p-8, v6e-256) or a "
            f"topology (v5e:2x4, v4:2x2x2)"
        ) from None
    return list(desc.devices)


_USABLE: dict[str, int] = {}


def hbm_bytes(device: jax.Device) -> int | None:
    """Memory one program may use on `device`: the runtime's limit for a live accelerator;
    for a TPU topology's device, the usable HBM its compiler states (probed once per chip
    kind with a program too large for any chip); else the chip kind's nominal HBM."""
    try:
        stats = device.memory_stats()
    except Exception:  # topology devices and some backends have none
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform != "tpu":
        return None
    if device.device_kind not in _USABLE:
        mesh = jax.sharding.Mesh(np.array([device]), ("x",))
        too_big = jax.ShapeDtypeStruct(
            (2**30, 1024), np.int8, sharding=jax.sharding.NamedSharding(mesh, PartitionSpec())
        )
        probe = jax.jit(lambda x: x + 1)
        report, _ = compile_program("probe", probe, (too_big,), mesh, None, count_flops=False)
        _USABLE[device.device_kind] = report.capacity or HBM_BYTES.get(device.device_kind)
    return _USABLE[device.device_kind]


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective in a compiled program: executions per step, and the bytes of
    their results on one chip (what each chip receives or produces)."""

    count: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """What the compiler says of one program for one chip of the target.

    Memory in bytes. `fits` is the compiler's verdict; `required` is its total (arguments,
    outputs not aliased to them, temporaries and code), which a program that does not fit
    takes from the compiler's error. `kernels` lists the custom kernels (Mosaic calls) by name,
    `kernel_sites` how many places of the program call each (ModernBERT's scanned layers call
    two splash kernels, the global and the local mask's, one per branch of the layer's
    choice; kernels of one name differ by their masks).
    """

    name: str
    fits: bool
    capacity: int | None
    required: int
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    code: int = 0
    flops: float = 0.0
    collectives: dict[str, Collective] = dataclasses.field(default_factory=dict)
    kernels: tuple[str, ...] = ()
    kernel_sites: dict[str, int] = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0
    error: str = ""

    @property
    def headroom(self) -> float | None:
        """Unused fraction of the chip's memory (negative: short by that much)."""
        return None if not self.capacity else 1.0 - self.required / self.capacity

    @property
    def collective_bytes(self) -> int:
        return sum(c.bytes for c in self.collectives.values())

    def verdict(self) -> str:
        if self.capacity is None:
            return "compiled" if self.fits else f"does not compile: {self.error}"
        gib = (self.capacity - self.required) / GIB
        if self.fits and gib >= 0:
            return f"fits, {gib:.2f} GiB ({self.headroom:.0%}) free"
        # A program the compiler accepts whose arguments, temporaries, outputs and code add
        # up to more than the chip holds is reported as not fitting: the stricter reading.
        accepted = " (the compiler accepted it)" if self.fits else ""
        return f"does not fit: {-gib:.2f} GiB over{accepted}"

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["collectives"] = {k: dataclasses.asdict(v) for k, v in self.collectives.items()}
        out["headroom"] = self.headroom
        out["verdict"] = self.verdict()
        return out


def compile_program(
    name: str,
    jitted,
    args: Sequence[Any],
    mesh: jax.sharding.Mesh,
    capacity: int | None,
    count_flops: bool = True,
) -> tuple[ProgramReport, Any]:
    """Traces, lowers and compiles `jitted(*args)` (ShapeDtypeStructs with shardings) under
    `mesh`; with `count_flops`, counts the traced program's FLOPs (`step_flops`).

    Returns the report and the compiled program (None when it did not fit).

    A program too large for the chip is a report (`fits=False`, the compiler's required
    total), not an error; other compiler errors propagate.
    """
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # the kernel choice follows the mesh's devices
        traced = jitted.trace(*args)  # traced once: for the FLOPs and for the compiler
        flops = step_flops(traced.jaxpr.jaxpr, mesh.size) if count_flops else 0.0
        lowered = traced.lower()
        try:
            compiled = lowered.compile()
        except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED
            match = _OOM.search(str(e))
            if match is None:
                raise
            required = float(match[1]) * _UNITS[match[2]]
            available = float(match[3]) * _UNITS[match[4]]
            report = ProgramReport(
                name,
                fits=False,
                capacity=int(available),
                required=int(required),
                flops=flops,
                compile_seconds=time.perf_counter() - start,
                error=match[0],
            )
            return report, None
    seconds = time.perf_counter() - start
    return analyze(name, compiled, capacity, flops, seconds), compiled


def analyze(
    name: str, compiled, capacity: int | None, flops: float = 0.0, seconds: float = 0.0
) -> ProgramReport:
    """The report of a compiled program (`jax.stages.Compiled`); `flops` per chip as
    `step_flops` counts them."""
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    arguments = memory.argument_size_in_bytes
    outputs, aliased = memory.output_size_in_bytes, memory.alias_size_in_bytes
    temporaries, code = memory.temp_size_in_bytes, memory.generated_code_size_in_bytes
    return ProgramReport(
        name,
        fits=True,
        capacity=capacity,
        required=arguments + outputs - aliased + temporaries + code,
        arguments=arguments,
        outputs=outputs,
        aliased=aliased,
        temporaries=temporaries,
        code=code,
        flops=flops,
        collectives=count_collectives(text),
        kernels=custom_kernels(text),
        kernel_sites=kernel_sites(text),
        compile_seconds=seconds,
    )


# Multiply-adds per query-key pair and head dimension in the splash kernels: the forward
# (QK', PV), the backward's dK/dV kernel (QK', dO V', P' dO, dS' Q) and its dQ kernel.
# bert_jax's flash-dropout kernels do the same matmuls.
_SPLASH_FLOPS = {"fwd": 4, "dkv": 8, "dq": 6}
_KERNEL_FAMILIES = ("splash_mha", "flash_attention", "flash_dropout")


def step_flops(jaxpr, chips: int) -> float:
    """FLOPs of one execution of a traced program (`jaxpr`) per chip: its matmuls
    (every `dot_general`, loops times their length, recomputation included, the splash
    kernels by their shapes), divided over `chips`.

    The compiler's own cost analysis counts a loop body once whatever its trip count, so
    that with layers under `scan` it would miss most of the step.
    """
    from jax.extend import core

    def walk(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name, params = eqn.primitive.name, eqn.params
            if name == "dot_general":
                (contract, _), _ = params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                k = math.prod(lhs[i] for i in contract)
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
            elif name == "pallas_call":
                total += _pallas_flops(eqn)
            subs = [
                x.jaxpr if isinstance(x, core.ClosedJaxpr) else x
                for v in params.values()
                for x in (v if isinstance(v, list | tuple) else [v])
                if isinstance(x, core.ClosedJaxpr | core.Jaxpr)
            ]
            if not subs:
                continue
            inner = [walk(j) for j in subs]
            if name == "cond":  # one branch runs: the costlier
                total += max(inner)
            elif name == "scan":
                total += params["length"] * sum(inner)
            elif name == "shard_map":  # the body's shapes are one shard's
                total += params["mesh"].size * sum(inner)
            else:
                total += sum(inner)
        return total

    return walk(jaxpr) / chips


def _pallas_flops(eqn) -> float:
    """FLOPs of an attention kernel call (splash, flash dropout) from its query and key
    shapes ([..., L, K])."""
    label = str(eqn.params.get("name", "")) + str(eqn.params.get("name_and_src_info", ""))
    for kind, per_pair in _SPLASH_FLOPS.items():
        if any(f"{family}_{kind}" in label for family in _KERNEL_FAMILIES):
            # Operands: the mask's block tables first, then q, k, v ([B,] H, L, K).
            shapes = [getattr(v.aval, "shape", ()) for v in eqn.invars]
            rank = max(len(s) for s in shapes)
            q, k = [s for s in shapes if len(s) == rank][:2]
            return per_pair * math.prod(q) * k[-2]
    return 0.0


def kernel_sites(hlo_text: str) -> dict[str, int]:
    """How many instructions of a compiled TPU program call each Mosaic kernel (by name)."""
    names = re.findall(r"%([\w.\-]+) = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo_text)
    sites: dict[str, int] = {}
    for name in names:
        base = re.sub(r"(\.\d+)+$", "", name)
        sites[base] = sites.get(base, 0) + 1
    return dict(sorted(sites.items()))


def custom_kernels(hlo_text: str) -> tuple[str, ...]:
    """Names of the Mosaic (Pallas) kernels a compiled TPU program calls, e.g. the splash
    attention kernel's `splash_mha_fwd_segmented_residuals`."""
    names = re.findall(r"%([\w.\-]+) = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo_text)
    return tuple(sorted({re.sub(r"(\.\d+)+$", "", n) for n in names}))


def count_collectives(hlo_text: str) -> dict[str, Collective]:
    """Collectives per execution of the HLO module `hlo_text` (`Compiled.as_text()`).

    Every computation is weighted by how often one execution of the entry runs it: a while
    loop's body by its trip count (the layer `scan`, gradient accumulation: the known trip
    count XLA records, or the bound its condition compares a counter from 0 with), the
    computations it calls by one. Asynchronous pairs count once, at their `-start`; an
    asynchronous start's bytes are those of its results, not of its operands.
    """
    computations = _computations(hlo_text)
    weight: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        weight[name] = weight.get(name, 0) + times
        for callee, trips, condition in computations[name]["calls"]:
            if trips is None:  # a while body: its condition's bound
                trips = computations.get(condition, {}).get("bound") or 1
            if callee in computations:
                visit(callee, times * trips)

    entry = next((n for n, c in computations.items() if c["entry"]), None)
    if entry is None:
        return {}
    visit(entry, 1)
    totals: dict[str, list[int]] = {}
    for name, times in weight.items():
        for op, nbytes in computations[name]["collectives"]:
            count_bytes = totals.setdefault(op, [0, 0])
            count_bytes[0] += times
            count_bytes[1] += times * nbytes
    return {op: Collective(c, b) for op, (c, b) in sorted(totals.items())}


def _computations(hlo_text: str) -> dict[str, dict]:
    """Per computation of an HLO module: whether it is the entry, the computations it calls
    (with a trip count, or None and the condition for a while body without a known one),
    its collectives with their result bytes, and the bound of a loop condition (the integer
    constant its `compare(..., direction=LT)` root tests against)."""
    out: dict[str, dict] = {}
    current = None
    header = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
    for line in hlo_text.splitlines():
        match = header.match(line)
        if match:
            current = {"entry": bool(match[1]), "calls": [], "collectives": [], "constants": []}
            out[match[2]] = current
            continue
        if current is None or " = " not in line:
            continue
        instruction = _instruction(line)
        if instruction is None:
            continue
        shape, opcode, rest = instruction
        if opcode == "constant" and re.match(r"[su](32|64)\[\]", shape):
            current["constants"].append(int(re.match(r"(-?\d+)\)", rest)[1]))
        if opcode == "compare" and line.lstrip().startswith("ROOT") and "direction=LT" in rest:
            current["bound"] = current["constants"][-1] if len(current["constants"]) == 1 else None
        trips, condition = 1, None
        if opcode == "while":
            known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
            trips = int(known[1]) if known else None
            condition = re.search(r"condition=%([\w.\-]+)", rest)[1]
        for attr, callees in re.findall(
            r"\b(body|calls|to_apply|branch_computations|called_computations)="
            r"(\{[^}]*\}|%[\w.\-]+)",
            rest,
        ):
            for callee in re.findall(r"%([\w.\-]+)", callees):
                current["calls"].append(
                    (callee, trips, condition) if attr == "body" else (callee, 1, None)
                )
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES and not opcode.endswith("-done"):
            current["collectives"].append((base, _result_bytes(shape, opcode.endswith("-start"))))
    return out


def _instruction(line: str) -> tuple[str, str, str] | None:
    """(result shape, opcode, the rest) of one HLO instruction line."""
    rhs = line.split(" = ", 1)[1]
    if rhs.startswith("("):  # a tuple shape: up to its closing parenthesis
        end = _tuple_elements_end(rhs)
        shape, rest = rhs[:end], rhs[end:].lstrip()
    else:
        shape, _, rest = rhs.partition(" ")
    match = re.match(r"([\w\-]+)\(", rest)
    return None if match is None else (shape, match[1], rest[match.end() :])


def _result_bytes(shape: str, async_start: bool) -> int:
    """Bytes of a collective's results. An asynchronous start returns (operands, results,
    ...): its results are the second element of the tuple."""
    if async_start and shape.startswith("(("):
        shape = _tuple_elements(shape)[1]
    elif async_start and shape.startswith("("):
        elements = _tuple_elements(shape)
        shape = elements[1] if len(elements) > 1 and "[" in elements[1] else shape
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _tuple_elements_end(text: str) -> int:
    """Index after the parenthesis that closes the one `text` starts with."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i + 1
    return len(text)


def _tuple_elements(shape: str) -> list[str]:
    """Top-level elements of a tuple shape `(a, (b, c), d)`."""
    elements, depth, start = [], 0, 1
    for i, ch in enumerate(shape):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if (ch == "," and depth == 1) or (depth == 0 and i == len(shape) - 1):
            elements.append(shape[start:i].strip())
            start = i + 1
    return elements


Specs = dict[str, tuple[tuple[int, ...], np.dtype]]


def batch_structs(trainer: training.Trainer, specs: Specs, batch_size: int) -> dict:
    """The global batch of `batch_size` examples as ShapeDtypeStructs in the trainer's batch
    sharding; `specs` gives one example's shape and dtype per feature."""
    return {
        key: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=trainer.batch_sharding)
        for key, (shape, dtype) in specs.items()
    }


def attention_path(config: BertConfig, platform: str, seq_len: int, training: bool) -> str:
    """Which attention runs in a step, and why."""
    dropout = training and config.attention_probs_dropout_prob > 0
    kernel = attention.fused_kernel(
        config.attention_kernel, seq_len, dropout, platform, config.attention_window
    )
    compiled = "Mosaic kernel" if platform == "tpu" else "Pallas interpreter"
    tail = "; the last layer's masked positions: XLA" * training
    if kernel == "flash_dropout":
        return f"flash_dropout ({compiled}, attention dropout in the kernel){tail}"
    if kernel == "splash":
        if config.model_type == "modernbert":  # every layer, the local ones with a local mask
            return f"splash ({compiled}; local layers: a {config.local_attention}-token window)"
        return f"splash ({compiled}){tail}"
    if config.attention_kernel == "xla":
        reason = "attention_kernel=xla"
    elif attention.fused_kernel(config.attention_kernel, seq_len, False, platform) != "xla":
        reason = "attention dropout with local windows: the flash-dropout kernel has none"
    elif platform != "tpu":
        reason = "not a TPU"
    else:
        reason = f"length {seq_len} not a multiple of 128"
    return f"XLA ({reason})"


def compile_steps(
    model_config: BertConfig,
    optim_config: OptimConfig,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    specs: Specs,
    *,
    objective: objectives.Objective = objectives.PRETRAINING,
    rules: sharding.Rules = sharding.MeshConfig.rules,
    programs: Sequence[str] = ("train_step", "eval_step"),
    capacity: int | None = None,
    eval_batch_size: int | None = None,
) -> list[ProgramReport]:
    """Compiles a run's steps on `mesh` (any devices: local, or a TPU topology's) with the
    run's state and batch shardings, and reports each. No array is allocated. The eval step
    takes `eval_batch_size` examples (default: the train batch)."""
    trainer = training.create_trainer(model_config, optim_config, mesh, rules, objective)
    state = trainer.abstract_state
    eval_batch = batch_structs(trainer, specs, eval_batch_size or batch_size)
    args = {
        "train_step": (trainer.train_step, (state, batch_structs(trainer, specs, batch_size))),
        "eval_step": (trainer.eval_step, (state.params, eval_batch)),
        "predict_step": (trainer.predict_step, (state.params, eval_batch)),
    }
    reports = []
    for name in programs:
        jitted, arguments = args[name]
        reports.append(compile_program(name, jitted, arguments, mesh, capacity)[0])
    return reports


def format_table(rows: Sequence[tuple[str, ProgramReport]], tokens_per_chip: float) -> str:
    """A terminal table: one row per (label, report), memory per chip in GiB."""
    header = (
        f"{'program':<24}{'args':>8}{'temps':>8}{'outputs':>9}{'code':>7}{'total':>8}"
        f"{'HBM':>7}  {'verdict':<30}{'GFLOP/chip':>11}{'coll. MiB':>10}{'compile':>9}"
    )
    lines = [header, "-" * len(header)]
    for label, r in rows:
        gib = (lambda b: f"{b / GIB:.2f}") if r.fits else (lambda b: "-")
        lines.append(
            f"{label:<24}{gib(r.arguments):>8}{gib(r.temporaries):>8}"
            f"{gib(r.outputs - r.aliased):>9}{gib(r.code):>7}{r.required / GIB:>8.2f}"
            f"{(r.capacity or 0) / GIB:>7.2f}  {r.verdict():<30}{r.flops / 1e9:>11.1f}"
            f"{r.collective_bytes / 2**20:>10.1f}{r.compile_seconds:>8.0f}s"
        )
        for op, c in r.collectives.items():
            lines.append(
                f"{'':<26}{op}: {c.count} per step, {c.bytes / 2**20:.1f} MiB "
                f"({c.bytes / tokens_per_chip:,.0f} B/token)"
            )
        if r.kernels:
            named = [f"{k} x{r.kernel_sites[k]}" if k in r.kernel_sites else k for k in r.kernels]
            lines.append(f"{'':<26}kernels (call sites): {', '.join(named)}")
    return "\n".join(lines)
