"""The model family: BERT, ALBERT, RoBERTa, XLM-R and ModernBERT encoders and their heads,
used functionally.

`config.py` (BertConfig and the released sizes), `layers.py` (the NNX blocks),
`attention.py` (masks, kernels, rotary positions, the attention layer), `encoder.py`
(embeddings, the stacked, shared or unrolled Transformer layers, the pooler), `modern.py`
(ModernBERT's encoder, `make_encoder` picking a config's) and `heads.py`
(pretraining, masked LM, sequence and token classification, multiple choice, question
answering); this module re-exports them and holds the functional helpers: `split_params`
once, then `merge_params` inside pure jitted functions (see `bert_jax.training`).
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from bert_jax.models import attention, layers
from bert_jax.models.config import RUN_FIELDS, BertConfig, Params
from bert_jax.models.encoder import (
    BertEmbeddings,
    BertEncoder,
    BertModel,
    EncoderOutput,
    Packing,
    check_input_shapes,
)
from bert_jax.models.heads import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    PretrainingOutput,
)
from bert_jax.models.modern import ModernBertModel, make_encoder

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertForMaskedLM",
    "BertForMultipleChoice",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "EncoderOutput",
    "ModernBertModel",
    "Packing",
    "Params",
    "PretrainingOutput",
    "RUN_FIELDS",
    "abstract_model",
    "check_input_shapes",
    "count_params",
    "create_model",
    "attention",
    "layers",
    "make_encoder",
    "merge_params",
    "param_bytes",
    "param_logical_axes",
    "quantize",
    "split_params",
    "take_layers",
]


def create_model(config: BertConfig, seed: int = 0, model_cls=BertForPreTraining) -> nnx.Module:
    """A freshly initialised model (allocates the parameters)."""
    return model_cls(config, rngs=nnx.Rngs(params=seed))


def abstract_model(config: BertConfig, model_cls=BertForPreTraining) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: shapes and metadata, no allocation."""
    return nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(params=0)))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
    """The model's static graph and its parameters as a plain nested dict of arrays."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def merge_params(graphdef: nnx.GraphDef, params: Params) -> nnx.Module:
    """Rebuilds a model from `split_params` output; cheap, used inside jitted steps."""
    return nnx.merge(graphdef, params)


def param_logical_axes(model: nnx.Module) -> Params:
    """Nested dict (same structure as the params) of each weight's logical axis names."""
    _, state = nnx.split(model)
    out: Params = {}
    for path, var in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]:
        node = out
        keys = [k.key for k in path]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = var.get_metadata()["logical_axes"]
    return out


def count_params(config: BertConfig, model_cls=make_encoder) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    _, params = split_params(abstract_model(config, model_cls))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def take_layers(
    params: Params, config: BertConfig, layers: Sequence[int]
) -> tuple[Params, BertConfig]:
    """A shallower model made of some of a model's layers (in the order given), with its
    embeddings, pooler and heads: how DistilBERT initialises its student (every other
    layer of the teacher, `range(0, L, 2)`).

    Raises:
      ValueError: for layers that do not exist, or a model whose layers are not one stack of
        their own weights (ALBERT's shared layers, pruned heads).
    """
    if config.share_layers != "none" or config.pruned_heads:
        raise ValueError(
            "taking layers needs a model with a weight set per layer (BERT, unpruned); "
            f"this one has share_layers={config.share_layers!r}, "
            f"pruned_heads={config.pruned_heads!r}"
        )
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < config.num_hidden_layers]
    if not layers or bad:
        raise ValueError(
            f"layers {layers}: choose some of the model's layers 0..{config.num_hidden_layers - 1}"
        )
    index = np.asarray(layers)

    def take(path, leaf):
        joined = "/".join(str(getattr(k, "key", k)) for k in path)
        return leaf[index] if "encoder/layer/" in joined else leaf

    params = jax.tree_util.tree_map_with_path(take, params)
    return params, dataclasses.replace(config, num_hidden_layers=len(layers))


def quantize(
    params: Params, config: BertConfig, mode: str, model_cls=BertForPreTraining
) -> tuple[Params, BertConfig]:
    """The parameters and config of `model_cls` with its weights held as `mode` says
    (`layers.QUANTIZATION`), from a model held in any mode.

    To int8: every Dense kernel and embedding table becomes int8 values and a float scale,
    symmetric, the largest magnitude of each output channel (each table row) mapped to 127
    (`layers.quantize_weight`: Q8BERT's rule through `qwix.quantize`); biases, LayerNorm and
    everything else stay float. Back to a float mode: the int8 weights multiplied out (the
    values the int8 model computes with). Between the int8 modes ("int8", "int8-dynamic"),
    or the float ones ("none", "int8-aware"), only the config changes: a model trained with
    "int8-aware" becomes the "int8-dynamic" model it was trained to be. `params` may lack
    parts of the model (a fresh task head): those stay absent.
    """
    target = dataclasses.replace(config, quantization=mode)
    if layers.holds_int8(config.quantization) == layers.holds_int8(mode):
        return params, target
    _, shapes = split_params(abstract_model(target, model_cls))

    def walk(node: Params, like: Params) -> Params:
        out = {}
        for key, value in node.items():
            if key in ("kernel", "embedding") and f"q{key}" in like:
                scale_shape = like[f"{key}_scale"].shape
                # Axes where the scale is not broadcast (size 1 in the kernel counts too).
                channels = tuple(i for i, n in enumerate(scale_shape) if n == value.shape[i])
                q = layers.quantize_weight(jnp.asarray(value), channels)
                out[f"q{key}"] = q.qvalue
                out[f"{key}_scale"] = q.scale.astype(value.dtype)
            elif key in ("qkernel", "qembedding"):
                name = key[1:]
                scale = node[f"{name}_scale"]
                out[name] = qwix.dequantize(qwix.QArray(value, scale, qtype=jnp.int8))
            elif key in ("kernel_scale", "embedding_scale"):
                continue
            elif isinstance(value, dict):
                out[key] = walk(value, like[key])
            else:
                out[key] = value
        return out

    return walk(params, shapes), target


def param_bytes(params: Params) -> int:
    """Bytes the parameters take (int8 weights one a value, float32 four); arrays or shapes."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
