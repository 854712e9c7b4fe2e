"""Device mesh, logical axis names -> NamedShardings, and host batches -> global arrays.

The sharding policy lives here and in the rules of `axes.py`, never inside the model: weights
carry logical names, and these functions turn them into `PartitionSpec`s for a given mesh.
"""

import dataclasses
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bert_jax import axes, files

Rules = axes.Rules


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take the devices the others leave. `auto`:
    the entry point chooses the sizes (with remat and accumulation) by compiling candidates
    for the devices at start (`bert_jax.compile.planner`)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    auto: bool = False
    # Logical axis -> mesh axes (`axes.DEFAULT_RULES`: data and FSDP on the batch, FSDP on the
    # hidden dimension, tensor on heads and MLP). A config may set its own; a list of pairs
    # (as a config file writes it) is taken as the tuple of pairs.
    rules: Rules = axes.DEFAULT_RULES

    def __post_init__(self):
        rules = tuple((str(n), tuple(t) if isinstance(t, list) else t) for n, t in self.rules)
        object.__setattr__(self, "rules", rules)


def enable_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache, under the bert_jax cache directory.

    Programs that compiled once (a resumed run's train step, each fine-tuning run of a sweep)
    are then read back instead of compiled again. An explicit $JAX_COMPILATION_CACHE_DIR or
    `jax_compilation_cache_dir` setting is left as it is.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(files.cache_root(), "jax"))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> None:
    """Joins a multi-process run through `jax.distributed` (before any device is touched).

    With no arguments the cluster is detected from the environment (Cloud TPU pods, SLURM,
    Open MPI). CPU processes exchange collectives through gloo.

    Raises:
      RuntimeError naming the coordinator when not every process joined within `timeout_s`.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator = coordinator_address or "auto-detected"
    message = (
        f"jax.distributed could not bring up the run (coordinator {coordinator}, "
        f"{num_processes or '?'} processes) within {timeout_s} s. Start every process with the "
        f"same --coordinator_address and --num_processes and a distinct --process_id, or "
        f"raise --distributed_timeout"
    )
    # JAX's own timeout aborts the process from C++ with a terse log line; this watchdog
    # fires first and exits with a message that says what to do.
    joined = threading.Event()

    def watchdog() -> None:
        if not joined.wait(timeout_s):
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
            os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s + 60,
        )
    except Exception as e:  # jax raises several types here, all fatal for the run
        raise RuntimeError(f"{message}: {e}") from e
    finally:
        joined.set()


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes over `devices` (default: all devices);
    devices of several TPU slices get a hybrid mesh, `data` split across the slices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {config}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split as {config}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        shape = dict(zip(axes.MESH_AXES, sizes, strict=True))
        raise ValueError(
            f"mesh {shape} needs {int(np.prod(sizes))} devices but {len(devices)} are present; "
            f"make the product of the mesh sizes equal the device count"
        )
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(
            tuple(sizes), axes.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
        )
    # Several slices (TPU multi-slice): data parallelism across them over DCN, every other
    # axis inside a slice over ICI, where the bandwidth is.
    if sizes[0] % slices:
        raise ValueError(
            f"{slices} slices need mesh.data to be a multiple of {slices} (data parallelism "
            f"runs across slices), got mesh {dict(zip(axes.MESH_AXES, sizes, strict=True))}"
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        (sizes[0] // slices, sizes[1], sizes[2]), (slices, 1, 1), devices
    )
    return Mesh(grid, axes.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """The PartitionSpec of one array on `mesh` (see `axes.partition_spec`)."""
    return axes.partition_spec(logical, shape, dict(mesh.shape), rules)


def tree_shardings(logical_tree, abstract_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree of arrays, given the same tree of logical axis tuples."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)),
        logical_tree,
        abstract_tree,
        is_leaf=lambda n: isinstance(n, tuple),
    )


def check_divisible(sizes: Mapping[str, int], mesh: Mesh, rules: Rules) -> None:
    """Raises a clear error when a named dimension cannot be split as the rules ask.

    Args:
      sizes: logical axis name -> size in the model, e.g. {"heads": 12, "mlp": 3072}.
    """
    table = dict(rules)
    for name, size in sizes.items():
        target = table.get(name)
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        degree = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if size % degree:
            raise ValueError(
                f"the model's {name} dimension ({size}) is not divisible by {degree}, the size "
                f"of mesh axes {mesh_axes} it is split over (mesh {dict(mesh.shape)}); change "
                f"the mesh (--config.mesh.*) or the model size"
            )


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Leading (batch) dimension split over the mesh axes the `batch` rule names."""
    target = dict(rules).get(axes.BATCH)
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    return NamedSharding(mesh, PartitionSpec(mesh_axes or None))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    spec = batch_sharding(mesh, rules).spec[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in names]))


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict:
    """Assembles global arrays from each process's slice of the batch.

    Raises:
      ValueError when the global batch is not divisible by the data-parallel degree.
    """
    sharding = batch_sharding(mesh, rules)
    dp = data_parallel_size(mesh, rules)
    out = {}
    for key, local in host_batch.items():
        global_size = local.shape[0] * jax.process_count()
        if global_size % dp:
            raise ValueError(
                f"global batch size {global_size} is not divisible by the data-parallel degree "
                f"{dp} (mesh {dict(mesh.shape)}); change the batch size or the mesh"
            )
        global_shape = (global_size, *local.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def place(host_tree: Any, shardings: Any) -> Any:
    """Host (numpy) arrays as global arrays in `shardings`; each device receives only its own
    slice, so a model sharded over the mesh never sits whole on one device."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
        host_tree,
        shardings,
    )
