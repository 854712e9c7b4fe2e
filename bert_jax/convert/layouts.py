"""The Hugging Face layout of each family: for every bert_jax parameter the tensor name it
has there and how its array is reshaped (PyTorch's [out, in] kernels; bert_jax stacks the
layers and splits the attention heads). `names.py` applies these tables in both directions."""

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from bert_jax.models import BertConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    """bert_jax value from one Hugging Face tensor, and back."""

    to_jax: Callable[[np.ndarray, BertConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, BertConfig], np.ndarray]


# (bert_jax path, Hugging Face name, transform) of every tensor of a family.
Table = tuple[tuple[str, str, Transform], ...]

_SAME = Transform(lambda x, c: x, lambda x, c: x)
_LINEAR = Transform(lambda w, c: w.T, lambda w, c: w.T)
_QKV_KERNEL = Transform(  # [D, D] -> [D, H, K]
    lambda w, c: w.T.reshape(c.hidden_size, c.num_attention_heads, c.head_dim),
    lambda w, c: w.reshape(c.hidden_size, c.hidden_size).T,
)
_QKV_BIAS = Transform(  # [D] -> [H, K]
    lambda b, c: b.reshape(c.num_attention_heads, c.head_dim), lambda b, c: b.reshape(-1)
)
_ATTN_OUT_KERNEL = Transform(  # [D, D] -> [H, K, D]
    lambda w, c: w.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size),
    lambda w, c: w.reshape(c.hidden_size, c.hidden_size).T,
)

_LAYER = "bert.encoder.layer.{i}."
# (bert_jax path, Hugging Face name, transform); `{i}` marks a per-layer tensor stacked on
# axis 0 in bert_jax. Paths are those of the models with an encoder under `bert`.
BERT: Table = (
    *(
        (f"bert/embeddings/{n}/embedding", f"bert.embeddings.{n}.weight", _SAME)
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ),
    ("bert/embeddings/layer_norm/scale", "bert.embeddings.LayerNorm.weight", _SAME),
    ("bert/embeddings/layer_norm/bias", "bert.embeddings.LayerNorm.bias", _SAME),
    *(
        (f"bert/encoder/layer/attention/{n}/kernel", f"{_LAYER}attention.self.{n}.weight", t)
        for n in ("query", "key", "value")
        for t in (_QKV_KERNEL,)
    ),
    *(
        (f"bert/encoder/layer/attention/{n}/bias", f"{_LAYER}attention.self.{n}.bias", _QKV_BIAS)
        for n in ("query", "key", "value")
    ),
    (
        "bert/encoder/layer/attention/output/kernel",
        f"{_LAYER}attention.output.dense.weight",
        _ATTN_OUT_KERNEL,
    ),
    ("bert/encoder/layer/attention/output/bias", f"{_LAYER}attention.output.dense.bias", _SAME),
    *(
        (
            f"bert/encoder/layer/{ours}_layer_norm/{a}",
            f"{_LAYER}{theirs}.LayerNorm.{b}",
            _SAME,
        )
        for ours, theirs in (("attention", "attention.output"), ("output", "output"))
        for a, b in (("scale", "weight"), ("bias", "bias"))
    ),
    ("bert/encoder/layer/intermediate/kernel", f"{_LAYER}intermediate.dense.weight", _LINEAR),
    ("bert/encoder/layer/intermediate/bias", f"{_LAYER}intermediate.dense.bias", _SAME),
    ("bert/encoder/layer/output/kernel", f"{_LAYER}output.dense.weight", _LINEAR),
    ("bert/encoder/layer/output/bias", f"{_LAYER}output.dense.bias", _SAME),
    ("bert/pooler/kernel", "bert.pooler.dense.weight", _LINEAR),
    ("bert/pooler/bias", "bert.pooler.dense.bias", _SAME),
    ("transform/kernel", "cls.predictions.transform.dense.weight", _LINEAR),
    ("transform/bias", "cls.predictions.transform.dense.bias", _SAME),
    ("transform_layer_norm/scale", "cls.predictions.transform.LayerNorm.weight", _SAME),
    ("transform_layer_norm/bias", "cls.predictions.transform.LayerNorm.bias", _SAME),
    ("output_bias", "cls.predictions.bias", _SAME),
    ("seq_relationship/kernel", "cls.seq_relationship.weight", _LINEAR),
    ("seq_relationship/bias", "cls.seq_relationship.bias", _SAME),
    ("classifier/kernel", "classifier.weight", _LINEAR),
    ("classifier/bias", "classifier.bias", _SAME),
    ("qa_outputs/kernel", "qa_outputs.weight", _LINEAR),
    ("qa_outputs/bias", "qa_outputs.bias", _SAME),
)
_ALAYER = "albert.encoder.albert_layer_groups.{g}.albert_layers.{k}."
# ALBERT's names; `{g}.{k}` marks a tensor of weight set g * inner_group_num + k (one set when
# all layers share their weights).
ALBERT: Table = (
    *(
        (f"bert/embeddings/{n}/embedding", f"albert.embeddings.{n}.weight", _SAME)
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ),
    ("bert/embeddings/layer_norm/scale", "albert.embeddings.LayerNorm.weight", _SAME),
    ("bert/embeddings/layer_norm/bias", "albert.embeddings.LayerNorm.bias", _SAME),
    (
        "bert/encoder/embedding_projection/kernel",
        "albert.encoder.embedding_hidden_mapping_in.weight",
        _LINEAR,
    ),
    (
        "bert/encoder/embedding_projection/bias",
        "albert.encoder.embedding_hidden_mapping_in.bias",
        _SAME,
    ),
    *(
        (f"bert/encoder/layer/attention/{n}/kernel", f"{_ALAYER}attention.{n}.weight", _QKV_KERNEL)
        for n in ("query", "key", "value")
    ),
    *(
        (f"bert/encoder/layer/attention/{n}/bias", f"{_ALAYER}attention.{n}.bias", _QKV_BIAS)
        for n in ("query", "key", "value")
    ),
    (
        "bert/encoder/layer/attention/output/kernel",
        f"{_ALAYER}attention.dense.weight",
        _ATTN_OUT_KERNEL,
    ),
    ("bert/encoder/layer/attention/output/bias", f"{_ALAYER}attention.dense.bias", _SAME),
    (
        "bert/encoder/layer/attention_layer_norm/scale",
        f"{_ALAYER}attention.LayerNorm.weight",
        _SAME,
    ),
    ("bert/encoder/layer/attention_layer_norm/bias", f"{_ALAYER}attention.LayerNorm.bias", _SAME),
    ("bert/encoder/layer/intermediate/kernel", f"{_ALAYER}ffn.weight", _LINEAR),
    ("bert/encoder/layer/intermediate/bias", f"{_ALAYER}ffn.bias", _SAME),
    ("bert/encoder/layer/output/kernel", f"{_ALAYER}ffn_output.weight", _LINEAR),
    ("bert/encoder/layer/output/bias", f"{_ALAYER}ffn_output.bias", _SAME),
    ("bert/encoder/layer/output_layer_norm/scale", f"{_ALAYER}full_layer_layer_norm.weight", _SAME),
    ("bert/encoder/layer/output_layer_norm/bias", f"{_ALAYER}full_layer_layer_norm.bias", _SAME),
    ("bert/pooler/kernel", "albert.pooler.weight", _LINEAR),
    ("bert/pooler/bias", "albert.pooler.bias", _SAME),
    ("transform/kernel", "predictions.dense.weight", _LINEAR),
    ("transform/bias", "predictions.dense.bias", _SAME),
    ("transform_layer_norm/scale", "predictions.LayerNorm.weight", _SAME),
    ("transform_layer_norm/bias", "predictions.LayerNorm.bias", _SAME),
    ("output_bias", "predictions.bias", _SAME),
    ("seq_relationship/kernel", "sop_classifier.classifier.weight", _LINEAR),
    ("seq_relationship/bias", "sop_classifier.classifier.bias", _SAME),
    ("classifier/kernel", "classifier.weight", _LINEAR),
    ("classifier/bias", "classifier.bias", _SAME),
    ("qa_outputs/kernel", "qa_outputs.weight", _LINEAR),
    ("qa_outputs/bias", "qa_outputs.bias", _SAME),
)


def _roberta_name(hf_name: str) -> str:
    """BERT's tensor name -> RoBERTa's (XLM-R's too: both keep their encoder under
    `roberta.`); the masked-LM head is `lm_head`."""
    for bert, roberta in (
        ("bert.", "roberta."),
        ("cls.predictions.transform.dense.", "lm_head.dense."),
        ("cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
        ("cls.predictions.bias", "lm_head.bias"),
    ):
        hf_name = hf_name.replace(bert, roberta, 1) if hf_name.startswith(bert) else hf_name
    return hf_name


ROBERTA = tuple(
    (path, _roberta_name(hf_name), t)
    for path, hf_name, t in BERT
    if not path.startswith("seq_relationship/")  # no next-sentence head
)
# RoBERTa's sequence classifier is a head of two layers (dense + tanh, then out_proj) on the
# [CLS] state of an encoder without a pooler: the same computation as BERT's pooler and
# classifier, which hold it here (its dropout comes after the tanh only, as BERT's).
ROBERTA_CLASSIFIER = {
    "classifier.dense.weight": "roberta.pooler.dense.weight",
    "classifier.dense.bias": "roberta.pooler.dense.bias",
    "classifier.out_proj.weight": "classifier.weight",
    "classifier.out_proj.bias": "classifier.bias",
}
# Tensors a Hugging Face checkpoint may hold that are copies of others or buffers.
ALIASES = re.compile(
    r"(bert\.|albert\.|roberta\.)?embeddings\.position_ids"
    r"|(cls\.)?predictions\.decoder\.(weight|bias)|lm_head\.decoder\.(weight|bias)"
)
