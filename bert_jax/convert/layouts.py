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
    r"|decoder\.weight"
)

_WQKV_KERNEL = Transform(  # [3 D, D] -> [D, 3, H, K]
    lambda w, c: w.T.reshape(c.hidden_size, 3, c.num_attention_heads, c.head_dim),
    lambda w, c: w.reshape(c.hidden_size, 3 * c.hidden_size).T,
)
_WQKV_BIAS = Transform(  # [3 D] -> [3, H, K]
    lambda b, c: b.reshape(3, c.num_attention_heads, c.head_dim), lambda b, c: b.reshape(-1)
)
_WI_KERNEL = Transform(  # [2 F, D] -> [D, 2, F]: GELU's input, then the gate
    lambda w, c: w.T.reshape(c.hidden_size, 2, c.intermediate_size),
    lambda w, c: w.reshape(c.hidden_size, 2 * c.intermediate_size).T,
)
_WI_BIAS = Transform(lambda b, c: b.reshape(2, c.intermediate_size), lambda b, c: b.reshape(-1))
_MLAYER = "model.layers.{i}."
# `{j}`: a per-layer tensor that the first layer lacks (ModernBERT's first attention norm is
# the identity: its stacked row holds ones and zeros and is not exported).
_MFIRST = "model.layers.{j}."


def _norm_names(ours: str, theirs: str) -> Table:
    return ((f"{ours}/scale", f"{theirs}.weight", _SAME), (f"{ours}/bias", f"{theirs}.bias", _SAME))


def _linear_names(ours: str, theirs: str) -> Table:
    return (
        (f"{ours}/kernel", f"{theirs}.weight", _LINEAR),
        (f"{ours}/bias", f"{theirs}.bias", _SAME),
    )


MODERNBERT: Table = (
    ("bert/embeddings/word_embeddings/embedding", "model.embeddings.tok_embeddings.weight", _SAME),
    *_norm_names("bert/embeddings/layer_norm", "model.embeddings.norm"),
    *_norm_names("bert/encoder/layer/attention_layer_norm", f"{_MFIRST}attn_norm"),
    ("bert/encoder/layer/attention/qkv/kernel", f"{_MLAYER}attn.Wqkv.weight", _WQKV_KERNEL),
    ("bert/encoder/layer/attention/qkv/bias", f"{_MLAYER}attn.Wqkv.bias", _WQKV_BIAS),
    ("bert/encoder/layer/attention/output/kernel", f"{_MLAYER}attn.Wo.weight", _ATTN_OUT_KERNEL),
    ("bert/encoder/layer/attention/output/bias", f"{_MLAYER}attn.Wo.bias", _SAME),
    *_norm_names("bert/encoder/layer/mlp_layer_norm", f"{_MLAYER}mlp_norm"),
    ("bert/encoder/layer/intermediate/kernel", f"{_MLAYER}mlp.Wi.weight", _WI_KERNEL),
    ("bert/encoder/layer/intermediate/bias", f"{_MLAYER}mlp.Wi.bias", _WI_BIAS),
    *_linear_names("bert/encoder/layer/output", f"{_MLAYER}mlp.Wo"),
    *_norm_names("bert/encoder/final_layer_norm", "model.final_norm"),
    # The prediction head is `head.` in every model of `transformers`; here it is the MLM
    # transform, the pooled classifiers' pooler or the token classifiers' token head, whose
    # names `MODERNBERT_HEADS` gives it per architecture.
    *_linear_names("transform", "head.dense"),
    *_norm_names("transform_layer_norm", "head.norm"),
    ("output_bias", "decoder.bias", _SAME),
    *_linear_names("bert/pooler/dense", "pooled_head.dense"),
    *_norm_names("bert/pooler/layer_norm", "pooled_head.norm"),
    *_linear_names("token_head/dense", "token_head.dense"),
    *_norm_names("token_head/layer_norm", "token_head.norm"),
    *_linear_names("classifier", "classifier"),
    *_linear_names("qa_outputs", "qa_outputs"),
)


def modernbert_heads(architecture: str) -> dict[str, str]:
    """ModernBERT's Hugging Face names of a head -> the table's names, where they differ."""
    if architecture.endswith(("ForSequenceClassification", "ForMultipleChoice")):
        place = "pooled_head"
    elif architecture.endswith(("ForTokenClassification", "ForQuestionAnswering")):
        place = "token_head"
    else:
        return {}
    out = {
        f"head.{p}.{w}": f"{place}.{p}.{w}" for p in ("dense", "norm") for w in ("weight", "bias")
    }
    if architecture.endswith("ForQuestionAnswering"):  # `transformers` names it `classifier`
        out.update({f"classifier.{w}": f"qa_outputs.{w}" for w in ("weight", "bias")})
    return out


def modernbert_fields(hf: dict) -> dict:
    """BertConfig fields from a `transformers` ModernBertConfig's `config.json` (the rotary
    bases and the layer pattern as 5.x writes them, `rope_parameters` and `layer_types`, or
    as earlier releases did).

    Raises:
      ValueError: for what bert_jax's ModernBERT does not compute (biases on in some parts
        and off in others, no decoder bias, a layer pattern that is not every n-th global).
    """
    biases = {k: bool(hf.get(k, False)) for k in _BIASES}
    if len(set(biases.values())) > 1 or not hf.get("decoder_bias", True):
        raise ValueError(
            f"biases {biases} (decoder_bias={hf.get('decoder_bias', True)}): bert_jax's "
            f"ModernBERT has biases in every part or in none, and a decoder bias"
        )
    if hf.get("embedding_dropout", 0.0) != hf.get("mlp_dropout", 0.0):
        raise ValueError("embedding_dropout and mlp_dropout differ; bert_jax has one rate for both")
    if hf.get("classifier_activation", "gelu") != hf.get("hidden_activation", "gelu"):
        raise ValueError("classifier_activation differs from hidden_activation; bert_jax has one")
    n = hf.get("global_attn_every_n_layers", 3)
    if hf.get("layer_types"):
        types = hf["layer_types"]
        n = next((i for i, t in enumerate(types) if i and t == "full_attention"), len(types))
        if types != [
            ("full_attention" if i % n == 0 else "sliding_attention") for i in range(len(types))
        ]:
            raise ValueError(
                f"layer_types {types}: bert_jax's ModernBERT needs every n-th layer global"
            )
    rope = hf.get("rope_parameters") or {}
    thetas = {
        kind: (rope.get(layer) or {}).get("rope_theta", hf.get(f"{kind}_rope_theta", default))
        for kind, layer, default in (
            ("global", "full_attention", 160000.0),
            ("local", "sliding_attention", 10000.0),
        )
    }
    return dict(
        model_type="modernbert",
        type_vocab_size=1,
        hidden_act=hf.get("hidden_activation", "gelu"),
        layer_norm_eps=hf.get("norm_eps", 1e-5),
        use_bias=biases["norm_bias"],
        hidden_dropout_prob=hf.get("mlp_dropout", 0.0),
        attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
        global_rope_theta=float(thetas["global"]),
        local_rope_theta=float(thetas["local"]),
        global_attn_every_n_layers=n,
        **{k: hf[k] for k in _MODERNBERT_SAME if k in hf},
    )


_BIASES = ("norm_bias", "attention_bias", "mlp_bias", "classifier_bias")
_MODERNBERT_SAME = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "initializer_range",
    "local_attention",
    "classifier_pooling",
)


def modernbert_config(config: BertConfig) -> dict:
    """The `config.json` fields of `transformers`' ModernBertConfig for a config (both the
    5.x rotary and layer fields and the earlier ones, which agree)."""
    layer_types = ["full_attention" if g else "sliding_attention" for g in config.global_layers()]
    released = config.vocab_size == 50368  # its tokenizer's special ids; else the tokenizer's
    return dict(
        **{k: getattr(config, k) for k in _MODERNBERT_SAME},
        **{k: config.use_bias for k in _BIASES},
        model_type="modernbert",
        hidden_activation=config.hidden_act,
        classifier_activation=config.hidden_act,
        norm_eps=config.layer_norm_eps,
        decoder_bias=True,
        embedding_dropout=config.hidden_dropout_prob,
        mlp_dropout=config.hidden_dropout_prob,
        classifier_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob,
        global_attn_every_n_layers=config.global_attn_every_n_layers,
        global_rope_theta=config.global_rope_theta,
        local_rope_theta=config.local_rope_theta,
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta},
        },
        initializer_cutoff_factor=2.0,
        tie_word_embeddings=True,
        pad_token_id=50283 if released else None,
        bos_token_id=50281 if released else None,
        eos_token_id=50282 if released else None,
        cls_token_id=50281 if released else None,
        sep_token_id=50282 if released else None,
    )
