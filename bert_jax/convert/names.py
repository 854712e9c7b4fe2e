"""bert_jax parameters and configs to and from Hugging Face's, through the one table of each
family (`layouts.py`), which serves both directions, strictly: a config that disagrees with
the weights is refused. Original TF checkpoint variables come in through their Hugging Face
names (`tf_to_hf_name`).
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from bert_jax import models
from bert_jax.convert import layouts
from bert_jax.models import RUN_FIELDS, BertConfig, Params
from bert_jax.models.registry import FAMILIES, model_class


def family(config: BertConfig) -> str:
    """Which Hugging Face layout holds a config: its `model_type` ("albert" when all layers
    share weights), checked against its sharing."""
    albert = config.share_layers == "all"
    unshared = config.share_layers == "none" and config.embedding_size in (0, config.hidden_size)
    if (config.model_type == "albert" and albert) or (config.model_type != "albert" and unshared):
        return config.model_type
    raise ValueError(
        f"model_type={config.model_type!r} with share_layers={config.share_layers!r} and "
        f"embedding_size={config.embedding_size} has no Hugging Face layout (ALBERT: "
        f"share_layers='all'; the others: no sharing, no factorized embeddings)"
    )


def _table(config: BertConfig) -> tuple[layouts.Table, str]:
    kind = family(config)
    if kind == "albert":
        return layouts.ALBERT, "albert."
    if kind in ("roberta", "xlm-roberta"):
        return layouts.ROBERTA, "roberta."
    if kind == "modernbert":
        return layouts.MODERNBERT, "model."
    return layouts.BERT, "bert."


def _head_names(config: BertConfig, architecture: str) -> dict[str, str]:
    """A head's own Hugging Face names -> the table's names, where they differ."""
    if family(config) in ("roberta", "xlm-roberta") and architecture.endswith(
        "ForSequenceClassification"
    ):
        return layouts.ROBERTA_CLASSIFIER
    if family(config) == "modernbert":
        return layouts.modernbert_heads(architecture)
    return {}


@dataclasses.dataclass
class Report:
    """What an import did not match: bert_jax paths without a source tensor (left as
    initialised) and source tensors the target model has no place for."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)

    def describe(self, source: str) -> str:
        parts = []
        if self.missing:
            parts.append(f"freshly initialised (not in {source}): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"in {source} but not used by this model: {', '.join(self.unexpected)}")
        return "; ".join(parts)


def params_from_hf(
    state_dict: Mapping[str, Any],
    config: BertConfig,
    architecture: str = "BertForPreTraining",
    num_labels: int = 2,
    source: str = "the weights",
) -> tuple[Params, Report]:
    """Converts a Hugging Face BERT state dict into (numpy) bert_jax params.

    Strict about the encoder: the config and the weights must agree in depth and layer
    grouping, every tensor of the encoder must be found, and no encoder tensor of the source
    may be left over. Task heads are lenient (a fresh head, a pooler the source lacks, heads
    of another task are reported, not refused).

    Args:
      state_dict: tensor name -> array-like; names with or without the `bert.` prefix,
        `LayerNorm.gamma/beta` as in old checkpoints.
      config: the bert_jax config the weights were made for.
      architecture: the target bert_jax model (one of `ARCHITECTURES`).
      source: how errors name the weights (their directory).

    Returns:
      (params holding every tensor found, report of what is missing or left over).

    Raises:
      ValueError naming both sides when a tensor's shape does not fit the config, when the
      config says another depth or grouping than the weights hold, or when an encoder tensor
      is missing or left over.
    """
    (table, prefix), heads = _table(config), _head_names(config, architecture)
    names = {heads.get(k, _normalize_hf_name(k, prefix)): k for k in state_dict}
    _check_depth(names, config, source)
    expected = abstract_params(config, architecture, num_labels)
    bare = "bert" not in expected  # BertModel's own params have no `bert/` level
    params: Params = {}
    report, used = Report(), set()
    for path, hf_name, transform in table:
        ours = path.removeprefix("bert/") if bare else path
        want = get_path(expected, ours)
        if want is None:
            continue
        hf_names = _expand(hf_name, config)
        if not all(n in names for n in hf_names):
            report.missing.append(ours)
            continue
        tensors = [state_dict[names[n]] for n in hf_names]
        value = _converted(tensors, hf_name, transform, config, ours)
        if value.shape != tuple(want.shape):
            raise ValueError(
                f"tensor {names[hf_names[0]]} has shape {np.shape(tensors[0])}, which gives "
                f"{value.shape} for {ours}, but the config needs {tuple(want.shape)}; the "
                f"weights were made for another config (check config.json)"
            )
        set_path(params, ours, value)
        used.update(hf_names)
    report.unexpected = sorted(
        names[n] for n in names if n not in used and not layouts.ALIASES.fullmatch(n)
    )
    _check_encoder_complete(report, source)
    return params, report


def _converted(tensors, hf_name: str, transform, config, path: str) -> np.ndarray:
    """One bert_jax array from its Hugging Face tensors (one per layer when stacked; the first
    layer's identity norm prepended where the first layer has none)."""
    values = [transform.to_jax(np.asarray(t, np.float32), config) for t in tensors]
    if "{j}" in hf_name:
        identity = np.ones_like if path.endswith("/scale") else np.zeros_like
        values.insert(0, identity(values[0]))
    return np.stack(values) if _stacked(hf_name) else values[0]


def _check_encoder_complete(report: Report, source: str) -> None:
    """Refuses an encoder tensor the config needs that the weights lack, or the reverse."""
    missing_encoder = [p for p in report.missing if is_encoder_path(p)]
    unused_encoder = [n for n in report.unexpected if _ENCODER_NAME.search(n)]
    if not (missing_encoder or unused_encoder):
        return
    parts = []
    if missing_encoder:
        parts.append(f"the config needs {', '.join(missing_encoder[:6])}, not in {source}")
    if unused_encoder:
        parts.append(f"{source} holds {', '.join(unused_encoder[:6])}, which it has no place for")
    raise ValueError(
        f"the config and the weights of {source} disagree: {'; '.join(parts)}; an encoder "
        f"weight would be left at its random initialisation or dropped. The config belongs "
        f"to another model: fix config.json or use the model's own"
    )


_ENCODER_NAME = re.compile(r"(^|\.)(embeddings|encoder|layers|final_norm)\.")
_BERT_LAYER = re.compile(
    r"^(?:bert\.encoder\.layer|roberta\.encoder\.layer|model\.layers)\.(\d+)\."
)
_ALBERT_LAYER = re.compile(r"^albert\.encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.")


def is_encoder_path(path: str) -> bool:
    """Whether a bert_jax parameter path belongs to the encoder proper (embeddings and
    layers), which an import must fill; the pooler and the heads may start fresh."""
    return path.removeprefix("bert/").split("/")[0] in ("embeddings", "encoder")


def _check_depth(names: Mapping[str, str], config: BertConfig, source: str) -> None:
    """The depth (BERT) or the layer groups (ALBERT) the weights hold against the config's."""
    if family(config) != "albert":
        layers = {int(m.group(1)) for n in names if (m := _BERT_LAYER.match(n))}
        if layers and len(layers) != config.num_hidden_layers:
            raise ValueError(
                f"the config says num_hidden_layers={config.num_hidden_layers} but {source} "
                f"holds {len(layers)} layers (encoder.layer.{min(layers)}-{max(layers)}); the "
                f"config belongs to another model: fix config.json or use the model's own"
            )
        return
    groups = {(int(m.group(1)), int(m.group(2))) for n in names if (m := _ALBERT_LAYER.match(n))}
    if not groups:
        return
    held = (len({g for g, _ in groups}), len({k for _, k in groups}))
    wanted = (config.num_weight_sets // config.inner_group_num, config.inner_group_num)
    if held != wanted:
        raise ValueError(
            f"the config says num_hidden_groups={wanted[0]}, inner_group_num={wanted[1]} but "
            f"{source} holds {held[0]} layer group(s) of {held[1]} layer(s); the config belongs "
            f"to another model: fix config.json or use the model's own"
        )


def params_to_hf(
    params: Params, config: BertConfig, architecture: str | None = None
) -> dict[str, np.ndarray]:
    """bert_jax params (any architecture) -> Hugging Face state dict of float32 numpy arrays.

    A bare encoder (`BertModel`) gets names without the `bert.` prefix, as `save_pretrained`
    writes them. `architecture` (default: what the params show) names a head whose tensors
    its family names apart (RoBERTa's sequence classifier).
    """
    _check_float(config)
    table, prefix = _table(config)
    architecture = architecture or architecture_of(params, config)
    heads = {v: k for k, v in _head_names(config, architecture).items()}
    bare = "bert" not in params
    out = {}
    for path, hf_name, transform in table:
        value = get_path(params, path.removeprefix("bert/") if bare else path)
        if value is None:
            continue
        value = np.asarray(jax.device_get(value), np.float32)
        hf_names = _expand(hf_name, config)
        parts = list(value)[("{j}" in hf_name) :] if _stacked(hf_name) else [value]
        for name, part in zip(hf_names, parts, strict=True):
            key = name.removeprefix(prefix) if bare else heads.get(name, name)
            out[key] = np.ascontiguousarray(transform.to_hf(part, config))
    return out


def config_from_hf(hf: Mapping[str, Any], source: str, **overrides: Any) -> BertConfig:
    """A BertConfig from a Hugging Face `config.json` or an original `bert_config.json`.

    Raises:
      ValueError naming `source` for another model type or an unsupported BERT variant.
    """
    model_type = hf.get("model_type", "bert")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source} describes a {model_type!r} model; bert_jax imports the model types "
            f"{sorted(FAMILIES)}"
        )
    if model_type == "modernbert":
        try:
            return BertConfig(**{**layouts.modernbert_fields(dict(hf)), **overrides})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e
    if model_type == "albert":
        overrides = {"share_layers": "all", **overrides}
    if model_type in ("roberta", "xlm-roberta"):  # positions counted after the padding index
        overrides = {"position_offset": int(hf.get("pad_token_id", 1)) + 1, **overrides}
    if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("is_decoder"):
        raise ValueError(
            f"{source}: only the original BERT encoder (absolute positions, not a decoder) is "
            f"supported"
        )
    act = {"gelu_python": "gelu", "gelu_pytorch_tanh": "gelu_new"}.get(
        hf.get("hidden_act", "gelu"), hf.get("hidden_act", "gelu")
    )
    if hf.get("pruned_heads"):
        raise ValueError(
            f"{source} describes a model with pruned heads ({hf['pruned_heads']}); import the "
            f"unpruned model and prune it with `python -m bert_jax.tools.analysis prune`"
        )
    fields = {f.name for f in dataclasses.fields(BertConfig)} - {
        *RUN_FIELDS,
        "share_layers",
        "pruned_heads",
        "quantization",
        "position_offset",
    }
    values = {k: hf[k] for k in fields if k in hf}
    try:
        return BertConfig(**{**values, "hidden_act": act, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def _check_float(config: BertConfig) -> None:
    if config.quantization != "none":
        raise ValueError(
            f"this model computes with {config.quantization} weights, which the Hugging Face "
            f"layout (and the ONNX export made through it) does not describe; export it with "
            f"export-stablehlo, or export the float weights it computes with: "
            f"`python -m bert_jax.convert quantize MODEL OUT --mode=none`"
        )


def config_to_hf(config: BertConfig, architecture: str, num_labels: int = 2) -> dict:
    """The `config.json` that `transformers` reads for `architecture`."""
    _check_float(config)
    kind = family(config)
    if config.pruned_heads:
        raise ValueError(
            "a model with pruned heads has layers of different sizes, which the Hugging Face "
            "export does not write; export the model before pruning, or use it as a bert_jax "
            "workdir (init_from, finetune.py, bert_jax.tools.extract)"
        )
    if kind == "modernbert":
        hf = layouts.modernbert_config(config) | {"architectures": [architecture]}
    else:
        hf = _bert_config(config, kind) | {"architectures": [architecture]}
    if config.position_offset:  # fairseq's dictionary: <s> 0, <pad> 1, </s> 2
        hf.update(bos_token_id=0, eos_token_id=2)
    if architecture.endswith(("ForSequenceClassification", "ForTokenClassification")):
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        if num_labels == 1 and architecture.endswith("ForSequenceClassification"):
            hf["problem_type"] = "regression"
    return hf


_MODERNBERT_FIELDS = (
    "global_rope_theta",
    "local_rope_theta",
    "local_attention",
    "global_attn_every_n_layers",
    "use_bias",
    "classifier_pooling",
)


def _bert_config(config: BertConfig, kind: str) -> dict:
    """The `config.json` fields of BERT, ALBERT, RoBERTa and XLM-R."""
    skip = (*RUN_FIELDS, *_MODERNBERT_FIELDS, "share_layers", "pruned_heads", "quantization")
    skip += ("position_offset",)
    if kind != "albert":
        skip += ("embedding_size", "num_hidden_groups", "inner_group_num")
    hf = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    if kind == "albert":
        hf["embedding_size"] = config.embed_dim
    hf.update(
        model_type=kind,
        position_embedding_type="absolute",
        pad_token_id=max(config.position_offset - 1, 0),
        tie_word_embeddings=True,
    )
    return hf


def infer_architecture(tensors: Mapping[str, Any], model_type: str = "") -> str:
    """The architecture whose heads a checkpoint's tensor names show, in the family of
    `model_type` (default: the one the names show; RoBERTa's names are XLM-R's too)."""
    names = set(tensors)
    if not model_type:
        albert = any(n.startswith(("albert.", "predictions.", "sop_classifier.")) for n in names)
        roberta = any(n.startswith(("roberta.", "lm_head.")) for n in names)
        modern = any(n.startswith(("model.layers.", "layers.")) for n in names)
        model_type = "albert" if albert else "roberta" if roberta else "bert"
        model_type = "modernbert" if modern else model_type
    prefix = FAMILIES[model_type]
    if model_type == "modernbert":  # its classifiers' names are alike: config.json tells
        if "decoder.bias" in names:
            return prefix + "ForMaskedLM"
        return prefix + ("ForSequenceClassification" if "classifier.weight" in names else "Model")
    if {"cls.seq_relationship.weight", "sop_classifier.classifier.weight"} & names:
        return prefix + "ForPreTraining"
    if {"cls.predictions.bias", "predictions.bias", "lm_head.bias"} & names:
        return prefix + "ForMaskedLM"
    if "classifier.out_proj.weight" in names:
        return prefix + "ForSequenceClassification"
    if "classifier.weight" in names:  # a token classifier has no pooler
        pooled = {"bert.pooler.dense.weight", "albert.pooler.weight"} & names
        if "roberta.pooler.dense.weight" in names:  # RoBERTa pools for multiple choice only
            return prefix + "ForMultipleChoice"
        return prefix + ("ForSequenceClassification" if pooled else "ForTokenClassification")
    if "qa_outputs.weight" in names:
        return prefix + "ForQuestionAnswering"
    return prefix + "Model"


def tf_to_hf_name(name: str) -> str | None:
    """`bert/encoder/layer_3/attention/self/query/kernel` -> `bert.encoder.layer.3...weight`."""
    if re.search(r"(adam_[mv]|Momentum|global_step|bad_steps|loss_scale)", name):
        return None
    special = {
        "cls/seq_relationship/output_weights": "cls.seq_relationship.weight",
        "cls/seq_relationship/output_bias": "cls.seq_relationship.bias",
        "cls/predictions/output_bias": "cls.predictions.bias",
        "output_weights": "classifier.weight",  # run_classifier.py's head
        "output_bias": "classifier.bias",
    }
    if name in special:
        return special[name]
    name = re.sub(r"layer_(\d+)", r"layer.\1", name)
    name = re.sub(r"(word|position|token_type)_embeddings$", r"\1_embeddings/weight", name)
    name = re.sub(r"/(kernel|gamma)$", "/weight", name)
    name = re.sub(r"/beta$", "/bias", name)
    return name.replace("/", ".")


def architecture_of(params: Params, config: BertConfig) -> str:
    prefix = FAMILIES[family(config)]
    if "bert" not in params:
        return prefix + "Model"
    if "classifier" in params:
        pooled = "pooler" in params["bert"]
        return prefix + ("ForSequenceClassification" if pooled else "ForTokenClassification")
    if "qa_outputs" in params:
        return prefix + "ForQuestionAnswering"
    if "seq_relationship" in params:
        return prefix + "ForPreTraining"
    return prefix + "ForMaskedLM"


def abstract_params(config: BertConfig, architecture: str, num_labels: int) -> Params:
    return models.split_params(
        models.abstract_model(config, model_class(architecture, num_labels))
    )[1]


def _normalize_hf_name(name: str, prefix: str = "bert.") -> str:
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    if name.startswith(("embeddings.", "encoder.", "pooler.", "layers.", "final_norm.")):
        name = prefix + name
    return name


def _stacked(hf_name: str) -> bool:
    return any(mark in hf_name for mark in ("{i}", "{g}", "{j}"))


def _expand(hf_name: str, config: BertConfig) -> list[str]:
    """The Hugging Face names of one bert_jax tensor: one per weight set when stacked."""
    if not _stacked(hf_name):
        return [hf_name]
    k, first = config.inner_group_num, int("{j}" in hf_name)
    return [
        hf_name.format(i=s, j=s, g=s // k, k=s % k) for s in range(first, config.num_weight_sets)
    ]


def get_path(tree: Params, path: str):
    for key in path.split("/"):
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def set_path(tree: Params, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value
