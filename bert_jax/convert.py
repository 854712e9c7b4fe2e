"""Weights between bert_jax and the Hugging Face BERT layout, through one rename table.

A Hugging Face state dict (`bert.encoder.layer.3.attention.self.query.weight`, PyTorch's
[out, in] kernels) maps to bert_jax params (stacked layers, [in, out] kernels, split heads).
The table `_RENAMES` is the single source of truth for both directions.
"""

from collections.abc import Callable, Mapping

import numpy as np

from bert_jax import models
from bert_jax.models import BertConfig, Params

Transform = Callable[[np.ndarray, BertConfig], np.ndarray]


def _linear(w: np.ndarray, c: BertConfig) -> np.ndarray:
    return w.T


def _qkv_kernel(w: np.ndarray, c: BertConfig) -> np.ndarray:
    return w.T.reshape(c.hidden_size, c.num_attention_heads, c.head_dim)


def _qkv_bias(b: np.ndarray, c: BertConfig) -> np.ndarray:
    return b.reshape(c.num_attention_heads, c.head_dim)


def _attn_out_kernel(w: np.ndarray, c: BertConfig) -> np.ndarray:
    return w.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size)


def _same(x: np.ndarray, c: BertConfig) -> np.ndarray:
    return x


# (bert_jax path, Hugging Face name; `{i}` marks a per-layer tensor stacked on axis 0, transform)
_ENCODER_RENAMES: tuple[tuple[str, str, Transform], ...] = (
    ("bert/embeddings/word_embeddings/embedding", "bert.embeddings.word_embeddings.weight", _same),
    (
        "bert/embeddings/position_embeddings/embedding",
        "bert.embeddings.position_embeddings.weight",
        _same,
    ),
    (
        "bert/embeddings/token_type_embeddings/embedding",
        "bert.embeddings.token_type_embeddings.weight",
        _same,
    ),
    ("bert/embeddings/layer_norm/scale", "bert.embeddings.LayerNorm.weight", _same),
    ("bert/embeddings/layer_norm/bias", "bert.embeddings.LayerNorm.bias", _same),
    *(
        (
            f"bert/encoder/layer/attention/{name}/kernel",
            f"bert.encoder.layer.{{i}}.attention.self.{name}.weight",
            _qkv_kernel,
        )
        for name in ("query", "key", "value")
    ),
    *(
        (
            f"bert/encoder/layer/attention/{name}/bias",
            f"bert.encoder.layer.{{i}}.attention.self.{name}.bias",
            _qkv_bias,
        )
        for name in ("query", "key", "value")
    ),
    (
        "bert/encoder/layer/attention/output/kernel",
        "bert.encoder.layer.{i}.attention.output.dense.weight",
        _attn_out_kernel,
    ),
    (
        "bert/encoder/layer/attention/output/bias",
        "bert.encoder.layer.{i}.attention.output.dense.bias",
        _same,
    ),
    (
        "bert/encoder/layer/attention_layer_norm/scale",
        "bert.encoder.layer.{i}.attention.output.LayerNorm.weight",
        _same,
    ),
    (
        "bert/encoder/layer/attention_layer_norm/bias",
        "bert.encoder.layer.{i}.attention.output.LayerNorm.bias",
        _same,
    ),
    (
        "bert/encoder/layer/intermediate/kernel",
        "bert.encoder.layer.{i}.intermediate.dense.weight",
        _linear,
    ),
    (
        "bert/encoder/layer/intermediate/bias",
        "bert.encoder.layer.{i}.intermediate.dense.bias",
        _same,
    ),
    ("bert/encoder/layer/output/kernel", "bert.encoder.layer.{i}.output.dense.weight", _linear),
    ("bert/encoder/layer/output/bias", "bert.encoder.layer.{i}.output.dense.bias", _same),
    (
        "bert/encoder/layer/output_layer_norm/scale",
        "bert.encoder.layer.{i}.output.LayerNorm.weight",
        _same,
    ),
    (
        "bert/encoder/layer/output_layer_norm/bias",
        "bert.encoder.layer.{i}.output.LayerNorm.bias",
        _same,
    ),
    ("bert/pooler/kernel", "bert.pooler.dense.weight", _linear),
    ("bert/pooler/bias", "bert.pooler.dense.bias", _same),
)

_PRETRAINING_RENAMES: tuple[tuple[str, str, Transform], ...] = (
    ("transform/kernel", "cls.predictions.transform.dense.weight", _linear),
    ("transform/bias", "cls.predictions.transform.dense.bias", _same),
    ("transform_layer_norm/scale", "cls.predictions.transform.LayerNorm.weight", _same),
    ("transform_layer_norm/bias", "cls.predictions.transform.LayerNorm.bias", _same),
    ("output_bias", "cls.predictions.bias", _same),
    ("seq_relationship/kernel", "cls.seq_relationship.weight", _linear),
    ("seq_relationship/bias", "cls.seq_relationship.bias", _same),
)


def params_from_hf(state_dict: Mapping[str, np.ndarray], config: BertConfig) -> Params:
    """Converts a Hugging Face `BertForPreTraining` state dict into bert_jax params.

    Args:
      state_dict: tensor name -> numpy array (e.g. `{k: v.numpy() for k, v in sd.items()}`).
      config: the bert_jax config the weights were made for.

    Returns:
      Params for `models.BertForPreTraining`.

    Raises:
      KeyError naming every missing tensor; ValueError naming a tensor of the wrong shape.
    """
    _, expected = models.split_params(models.abstract_model(config))
    params: Params = {}
    missing = []
    for path, hf_name, transform in _ENCODER_RENAMES + _PRETRAINING_RENAMES:
        names = (
            [hf_name.format(i=i) for i in range(config.num_hidden_layers)]
            if "{i}" in hf_name
            else [hf_name]
        )
        absent = [n for n in names if n not in state_dict]
        if absent:
            missing.extend(absent)
            continue
        values = [transform(np.asarray(state_dict[n], np.float32), config) for n in names]
        value = np.stack(values) if "{i}" in hf_name else values[0]
        want = _get(expected, path).shape
        if value.shape != tuple(want):
            raise ValueError(
                f"tensor {names[0]} converts to shape {value.shape} but {path} of the config "
                f"needs {tuple(want)}; the checkpoint was made for another config"
            )
        _set(params, path, value)
    if missing:
        raise KeyError(f"Hugging Face checkpoint lacks {len(missing)} tensors: {missing[:8]}")
    return params


def _get(tree: Params, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: Params, path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value
