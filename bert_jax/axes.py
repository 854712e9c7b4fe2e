"""Logical axis names for weights and activations, and the default rules mapping them to a mesh.

Layers annotate every weight with names from this file; only the rules below (or a config's
override of them) decide which mesh axis, if any, a logical axis is split over.
"""

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

# Logical -> mesh axis (or tuple of mesh axes, or None for replicated). With the default mesh
# (all devices on `data`, fsdp = tensor = 1) this is plain data parallelism.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (KV, None),
    (LENGTH, None),
    (LAYERS, None),
)
