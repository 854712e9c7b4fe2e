"""Logical axis names for weights and activations, the default rules mapping them to a mesh,
and `constrain`, which layers use to pin an activation's sharding by logical names.

Layers annotate every weight with names from this file and call `constrain` on activations;
only the rules (installed with `axis_rules` by the training code) decide which mesh axis, if
any, a logical axis is split over. Outside `axis_rules` or without a mesh, `constrain` does
nothing, so models run unchanged on one device.
"""

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV = "kv"
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"

# Mesh axes, outermost first. `data` and `fsdp` both split the batch; `fsdp` also splits weights.
MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical -> mesh axis (or tuple of mesh axes, or None for replicated). With the default mesh
# (all devices on `data`, fsdp = tensor = 1) this is plain data parallelism; `fsdp` > 1 splits
# weights and optimizer state along their hidden dimension (ZeRO-3, gathered per layer by XLA);
# `tensor` > 1 splits attention heads and the MLP hidden dimension (Megatron).
DEFAULT_RULES: Rules = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (KV, None),
    (LENGTH, None),
    (LAYERS, None),
)

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Makes `constrain` map logical names with `rules` while the block (and tracing) runs."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def active_rules() -> Rules | None:
    """The rules installed by the innermost `axis_rules`, or None."""
    return _RULES.get()


def partition_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int], rules: Rules
) -> PartitionSpec:
    """The PartitionSpec of one array from its logical axis names.

    A dimension stays replicated when no rule names it, when its mesh axes are already used by
    an earlier dimension, or when their size does not divide it.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape, strict=True):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if mesh_shape.get(a, 1) > 1 and a not in used)
        split = int(np.prod([mesh_shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % split:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names, under the active rules and mesh."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    spec = partition_spec(logical, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)
