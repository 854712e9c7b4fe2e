"""A model as a `jax.export` (StableHLO) artifact that runs without bert_jax's model code.

    python -m bert_jax.convert export-stablehlo SOURCE OUT_DIR [--architecture ...]

OUT_DIR holds `model.jax_export` (the serialized forward pass, batch and length symbolic: any
batch, any length up to the model's `max_position_embeddings`; multiple choice also any
number of choices; an embedding model's pooling and normalization inside the graph, its
output the sentence vector), `params.npz` (its weights), `meta.json` (architecture, input and output
names, the tokenizer), the tokenizer's vocabulary file, and `run_exported.py`: a loader that
needs jax, numpy and flatbuffers only.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from bert_jax import files, models
from bert_jax.convert.names import model_class
from bert_jax.models import pooling, registry

INPUTS = ("input_ids", "input_mask", "segment_ids")
# Each head's outputs, by name, from the model's return value.
OUTPUTS = {
    "Model": ("sequence_output", "pooled_output"),
    "ForMaskedLM": ("logits",),
    "ForSequenceClassification": ("logits",),
    "ForTokenClassification": ("logits",),
    "ForMultipleChoice": ("logits",),
    "ForQuestionAnswering": ("start_logits", "end_logits"),
}


EMBEDDING_OUTPUTS = ("sentence_embedding",)


@dataclasses.dataclass(frozen=True)
class Pooled:
    """An encoder exported as a sentence-embedding model: its last hidden states pooled with
    `modes` (`models.pooling`, over the tokens `input_mask` marks) and, when `normalize`, of
    unit length: the graph's one output, `sentence_embedding` [batch, len(modes) x D]."""

    modes: tuple[str, ...]
    normalize: bool = False


def output_names(head) -> tuple[str, ...]:
    """The output names of a head (or of a `Pooled` encoder)."""
    return EMBEDDING_OUTPUTS if isinstance(head, Pooled) else OUTPUTS[head]


def _head(architecture: str) -> str:
    head = registry.head_of(architecture)
    if head not in OUTPUTS:
        raise ValueError(
            f"export-stablehlo exports {sorted('Bert' + h for h in OUTPUTS)} (and the other "
            f"families'); "
            f"not {architecture}: export the encoder (BertModel) or the masked-LM head instead"
        )
    return head


def embedding_head(head: str, pooled: Pooled | None):
    """`pooled` in place of a bare encoder's head; refused on a task head."""
    if pooled is None:
        return head
    if head != "Model":
        raise ValueError(
            f"--pooling exports an encoder as a sentence-embedding model; this model has the "
            f"{head} head: export the encoder (--architecture=BertModel)"
        )
    return pooled


def pooled_meta(head) -> dict:
    if not isinstance(head, Pooled):
        return {}
    return {"pooling": list(head.modes), "normalize": head.normalize}


def fresh_output(output: str) -> None:
    """Refuses an output directory that already holds files; creates it otherwise."""
    if files.isdir(output) and files.listdir(output):
        raise FileExistsError(f"{output} exists and is not empty; choose a new output directory")
    problem = files.writable_problem(output, "the export")
    if problem:
        raise OSError(problem)


def _outputs(head, result, input_mask=None) -> tuple[jax.Array, ...]:
    if isinstance(head, Pooled):
        vectors = pooling.pool(result.sequence_output, input_mask, head.modes)
        return (pooling.normalize(vectors) if head.normalize else vectors,)
    if head == "Model":
        pooled = result.pooled_output
        if pooled is None:
            pooled = jnp.zeros(result.sequence_output.shape[::2], result.sequence_output.dtype)
        return result.sequence_output, pooled
    if head == "ForQuestionAnswering":
        return result[0], result[1]
    return (result[0],)


def export_stablehlo(
    params: models.Params,
    config: models.BertConfig,
    architecture: str,
    num_labels: int,
    tokenizer,
    output: str,
    pooled: Pooled | None = None,
) -> dict:
    """Writes the artifact (see the module doc) to `output`; returns its meta.json.
    `pooled`: the encoder (`architecture` a bare model) as a sentence-embedding model."""
    head = embedding_head(_head(architecture), pooled)
    graphdef, _ = models.split_params(
        models.abstract_model(config, model_class(architecture, num_labels))
    )

    def forward(params, input_ids, input_mask, segment_ids):
        model = models.merge_params(graphdef, params)
        return _outputs(head, model(input_ids, input_mask, segment_ids), input_mask)

    limit = f"length <= {config.max_length}"
    dims = "batch, choices, length" if head == "ForMultipleChoice" else "batch, length"
    shape = export.symbolic_shape(dims, constraints=(limit,))
    ids = jax.ShapeDtypeStruct(shape, jnp.int32)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    fresh_output(output)
    exported = export.export(jax.jit(forward))(abstract, ids, ids, ids)
    files.atomic_write(os.path.join(output, "model.jax_export"), bytes(exported.serialize()))
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
        key = "/".join(f"#{k.key}" if isinstance(k.key, int) else str(k.key) for k in path)
        flat[key] = np.asarray(leaf)
    with files.atomic_path(os.path.join(output, "params.npz"), suffix=".npz") as tmp:
        np.savez(tmp, **flat)
    vocab = os.path.basename(tokenizer.vocab_file)
    files.copy(tokenizer.vocab_file, os.path.join(output, vocab))
    meta = {
        "architecture": architecture,
        "num_labels": num_labels,
        "inputs": list(INPUTS),
        "input_shape": dims,
        "max_length": config.max_length,
        "outputs": list(output_names(head)),
        **pooled_meta(head),
        "tokenizer": {"vocab_file": vocab, "do_lower_case": tokenizer.do_lower_case},
        "jax_version": jax.__version__,
    }
    files.atomic_write(
        os.path.join(output, "meta.json"), (json.dumps(meta, indent=2) + "\n").encode()
    )
    files.atomic_write(os.path.join(output, "run_exported.py"), LOADER.encode())
    return meta


LOADER = r'''"""Runs a model exported by `python -m bert_jax.convert export-stablehlo`.

Needs jax, numpy and flatbuffers only (not bert_jax):

    from run_exported import ExportedModel
    model = ExportedModel("exported_dir")
    outputs = model(input_ids, input_mask, segment_ids)   # int32 [batch, length] each
    outputs["logits"]                                      # names in meta.json
"""

import dataclasses
import json
import os

import numpy as np
from jax import export


class ExportedModel:
    def __init__(self, directory: str):
        with open(os.path.join(directory, "meta.json")) as f:
            self.meta = json.load(f)
        with open(os.path.join(directory, "model.jax_export"), "rb") as f:
            self.exported = export.deserialize(bytearray(f.read()))
        self.params = {}
        with np.load(os.path.join(directory, "params.npz")) as flat:
            for key in flat.files:
                node = self.params
                keys = [int(k[1:]) if k.startswith("#") else k for k in key.split("/")]
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = flat[key]

    def __call__(self, input_ids, input_mask, segment_ids) -> dict:
        arrays = [np.asarray(x, np.int32) for x in (input_ids, input_mask, segment_ids)]
        outputs = self.exported.call(self.params, *arrays)
        return {name: np.asarray(x) for name, x in zip(self.meta["outputs"], outputs)}
'''
