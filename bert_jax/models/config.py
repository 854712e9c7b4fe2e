"""BertConfig: the sizes, variants (BERT, ALBERT sharing, pruned heads) and numerics of
a model of the family, with the released sizes by name."""

import dataclasses
import re
from typing import Any

import jax

from bert_jax.models import attention, layers

_ACTIVATIONS = ("gelu", "gelu_new", "relu")
_SHARING = ("none", "all", "attention", "ffn")
_DTYPES = ("float32", "bfloat16", "float16")
# The Hugging Face layouts a config's weights follow. ALBERT is BERT with its layers shared;
# RoBERTa and XLM-RoBERTa are BERT's layers with positions counted after the padding index
# (`position_offset`), one token type and their own tensor names and tokenizers.
# ModernBERT (Warner et al., 2024) is the family's pre-norm encoder: rotary positions, local
# and global attention layers, a gated GELU feed-forward (see `modern.py`).
MODEL_TYPES = ("bert", "albert", "roberta", "xlm-roberta", "modernbert")
_POOLING = ("cls", "mean")
# What the backward pass recomputes instead of keeping: nothing; the attention scores,
# probabilities and every elementwise result (the matmul outputs are kept: Korthikanti et
# al.'s selective recomputation); or the whole layer from its input.
# Fields of a run's numerics, not of the model: a released config.json does not set them, an
# import keeps the run's values, and the Hugging Face export leaves them out.
RUN_FIELDS = ("dtype", "param_dtype", "remat", "attention_kernel")

REMAT_POLICIES = {
    "none": None,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}

Params = dict[str, Any]


def _check_model_type(config: "BertConfig") -> None:
    if not config.model_type:
        shared = config.share_layers == "all"
        object.__setattr__(config, "model_type", "albert" if shared else "bert")
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"BertConfig.model_type={config.model_type!r}; use one of {MODEL_TYPES}")
    if not isinstance(config.position_offset, int) or config.position_offset < 0:
        raise ValueError(f"BertConfig.position_offset must be >= 0, got {config.position_offset!r}")
    if config.position_offset >= config.max_position_embeddings:
        raise ValueError(
            f"BertConfig.position_offset={config.position_offset} leaves no position of "
            f"max_position_embeddings={config.max_position_embeddings}"
        )


def _check_albert(config: "BertConfig") -> None:
    if not isinstance(config.embedding_size, int) or config.embedding_size < 0:
        raise ValueError(f"BertConfig.embedding_size must be >= 0, got {config.embedding_size!r}")
    if config.embedding_size > config.hidden_size:
        raise ValueError(
            f"BertConfig.embedding_size={config.embedding_size} is larger than hidden_size="
            f"{config.hidden_size}: factorized embeddings are meant to be smaller (ALBERT uses "
            f"128); use embedding_size <= hidden_size, or 0 for BERT's unfactorized table"
        )
    if config.share_layers not in _SHARING:
        raise ValueError(f"BertConfig.share_layers={config.share_layers!r}; use one of {_SHARING}")
    groups, inner = config.num_hidden_groups, config.inner_group_num
    if groups < 1 or inner < 1 or config.num_hidden_layers % groups:
        raise ValueError(
            f"BertConfig.num_hidden_groups={groups} must be positive and divide "
            f"num_hidden_layers={config.num_hidden_layers} (inner_group_num={inner} >= 1)"
        )
    if (groups > 1 or inner > 1) and config.share_layers != "all":
        raise ValueError(
            "layer groups (num_hidden_groups or inner_group_num > 1) are ALBERT's sharing "
            "scheme: set share_layers='all'"
        )


def _check_modernbert(config: "BertConfig") -> None:
    if config.share_layers != "none" or config.embedding_size not in (0, config.hidden_size):
        raise ValueError("ModernBERT has neither shared layers nor factorized embeddings")
    if config.pruned_heads or config.position_offset:
        raise ValueError("ModernBERT takes neither pruned heads nor a position offset")
    if config.head_dim % 2:
        raise ValueError(f"rotary positions need an even head size, got {config.head_dim}")
    if config.local_attention < 2 or config.local_attention % 2:
        raise ValueError(
            f"BertConfig.local_attention={config.local_attention}: the local window is an even "
            f"number of tokens (ModernBERT: 128), half of it on each side of a token"
        )
    if config.global_attn_every_n_layers < 1:
        raise ValueError("BertConfig.global_attn_every_n_layers must be >= 1")
    if min(config.global_rope_theta, config.local_rope_theta) <= 0:
        raise ValueError("BertConfig.global_rope_theta and local_rope_theta must be positive")
    if config.classifier_pooling not in _POOLING:
        raise ValueError(
            f"BertConfig.classifier_pooling={config.classifier_pooling!r}; use one of {_POOLING}"
        )


def _check_pruned_heads(config: "BertConfig") -> None:
    pruned = tuple(tuple(sorted(set(int(h) for h in p))) for p in config.pruned_heads or ())
    object.__setattr__(config, "pruned_heads", pruned if any(pruned) else ())
    if not config.pruned_heads:
        return
    if len(pruned) != config.num_hidden_layers:
        raise ValueError(
            f"BertConfig.pruned_heads has {len(pruned)} entries; it needs one per layer "
            f"({config.num_hidden_layers}), empty for a layer that keeps its heads"
        )
    h = config.num_attention_heads
    for i, p in enumerate(pruned):
        if p and (p[0] < 0 or p[-1] >= h):
            raise ValueError(f"BertConfig.pruned_heads[{i}]={p}: heads are 0..{h - 1}")
        if len(p) == h:
            raise ValueError(
                f"BertConfig.pruned_heads[{i}] removes all {h} heads of layer {i}; keep at "
                f"least one (a head mask of zeros silences a whole layer's attention)"
            )
    if config.share_layers != "none":
        raise ValueError("pruned heads need unshared layers (share_layers='none')")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes and numerics of a BERT encoder; field names follow the original `bert_config.json`.

    Defaults are BERT-Base. `dtype` is the compute dtype, `param_dtype` the storage dtype.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # ALBERT: factorized embeddings of size E (0: the hidden size, as BERT) and cross-layer
    # sharing of all weights, attention only or feed-forward only; with "all", released
    # checkpoints' layer groups (layer i uses group i * groups // layers, and each group
    # applies `inner_group_num` layers of its own).
    embedding_size: int = 0
    share_layers: str = "none"
    num_hidden_groups: int = 1
    inner_group_num: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # "minimal" or "full" (see REMAT_POLICIES); True / False: full / none.
    # Which attention runs: "xla" (XLA's attention; jax.random's dropout masks), "splash"
    # (the Pallas kernels: splash without dropout on the probabilities, bert_jax's
    # flash-dropout kernel with it; compiled by Mosaic on TPU, interpreted elsewhere, for
    # tests) or "auto" (the Pallas kernels on TPU at lengths divisible by 128, XLA elsewhere).
    attention_kernel: str = "auto"
    # Heads removed from each layer (per layer, in the original numbering, as Hugging Face's
    # `pruned_heads`); a pruned model runs its layers one by one, each of its own size.
    pruned_heads: tuple[tuple[int, ...], ...] = ()
    # How dense layers and embedding tables hold their weights: "none" (float), "int8" or
    # "int8-dynamic" (see layers.QUANTIZATION; made from a float model by `models.quantize`,
    # for inference: int8 weights are not trained).
    quantization: str = "none"
    # Which released family the weights follow (MODEL_TYPES); "" (configs and workdirs of
    # earlier code): "albert" when every layer is shared, else "bert".
    model_type: str = ""
    # RoBERTa, XLM-R: a token's position embedding is row position_offset + its position
    # (fairseq counts positions after the padding index: pad_token_id + 1 = 2), so inputs hold
    # at most max_position_embeddings - position_offset tokens; padding takes row offset - 1.
    position_offset: int = 0
    # ModernBERT only: no position table (max_position_embeddings bounds the length) but
    # rotary positions of base `global_rope_theta` in the global layers (every
    # `global_attn_every_n_layers`-th, from the first) and `local_rope_theta` in the others,
    # which attend within `local_attention` tokens (a key at most half of it away);
    # `use_bias` False leaves biases out of the layers, norms and the heads' dense layer (not
    # the classifier or the decoder); the sequence classifier pools "cls" or "mean".
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    use_bias: bool = True
    classifier_pooling: str = "cls"

    def __post_init__(self):
        if isinstance(self.remat, bool):  # configs and config.json files of earlier runs
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"BertConfig.remat={self.remat!r}; use one of {tuple(REMAT_POLICIES)}")
        if self.attention_kernel not in attention.ATTENTION_KERNELS:
            raise ValueError(
                f"BertConfig.attention_kernel={self.attention_kernel!r}; use one of "
                f"{attention.ATTENTION_KERNELS}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; choose heads that divide the "
                f"hidden size (BERT uses hidden_size / 64 heads)"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BertConfig.hidden_act={self.hidden_act!r}; use one of {_ACTIVATIONS}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"BertConfig.{name}={getattr(self, name)!r}; use one of {_DTYPES}")
        if self.initializer_range <= 0 or self.layer_norm_eps <= 0:
            raise ValueError("BertConfig.initializer_range and layer_norm_eps must be positive")
        if self.quantization not in layers.QUANTIZATION:
            raise ValueError(
                f"BertConfig.quantization={self.quantization!r}; use one of {layers.QUANTIZATION}"
            )
        _check_albert(self)
        _check_pruned_heads(self)
        _check_model_type(self)
        if self.model_type == "modernbert":
            _check_modernbert(self)

    @property
    def max_length(self) -> int:
        """The longest input the position table allows."""
        return self.max_position_embeddings - self.position_offset

    def length_problem(self, length: int, what: str = "max_seq_length") -> str:
        """Why inputs of `length` do not fit the position table ("" when they do)."""
        if length <= self.max_length:
            return ""
        offset = f" less model.position_offset={self.position_offset}" * bool(self.position_offset)
        return (
            f"{what}={length} exceeds model.max_position_embeddings="
            f"{self.max_position_embeddings}{offset}"
        )

    @property
    def attention_window(self) -> int:
        """The local layers' window when some layer attends locally (ModernBERT), else 0."""
        return self.local_attention if not all(self.global_layers()) else 0

    def global_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends globally (ModernBERT; every layer of the others)."""
        n = self.global_attn_every_n_layers if self.model_type == "modernbert" else 1
        return tuple(i % n == 0 for i in range(self.num_hidden_layers))

    def kept_heads(self, layer: int) -> tuple[int, ...]:
        """The original indices of the heads layer `layer` keeps."""
        removed = set(self.pruned_heads[layer]) if self.pruned_heads else set()
        return tuple(h for h in range(self.num_attention_heads) if h not in removed)

    @property
    def embed_dim(self) -> int:
        """E: the width of the embedding tables (the hidden size unless factorized)."""
        return self.embedding_size or self.hidden_size

    @property
    def num_weight_sets(self) -> int:
        """Distinct sets of layer weights: L for BERT, groups x inner layers for ALBERT."""
        if self.share_layers == "all":
            return self.num_hidden_groups * self.inner_group_num
        return self.num_hidden_layers

    def layer_schedule(self) -> list[int]:
        """The weight set each applied layer uses, in order (L x inner_group_num entries)."""
        if self.share_layers != "all":
            return list(range(self.num_hidden_layers))
        g, k, n = self.num_hidden_groups, self.inner_group_num, self.num_hidden_layers
        return [(i * g // n) * k + j for i in range(n) for j in range(k)]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def named(cls, name: str, **overrides: Any) -> "BertConfig":
        """A released size: `bert_base`, `bert_large`, `albert_*`, `roberta_base`/`_large`,
        `xlm_roberta_base`/`_large`, `modernbert_base`/`_large`, or the small-BERT grid `L-4_H-256`.

        The small BERTs (Turc et al., 2019) have heads = H / 64 and intermediate size 4 H.
        """
        if name in _NAMED:
            return dataclasses.replace(_NAMED[name], **overrides)
        match = re.fullmatch(r"(?:bert_)?(?:uncased_)?L-(\d+)_H-(\d+)(?:_A-\d+)?", name)
        if match:
            n_layers, hidden = int(match[1]), int(match[2])
            if n_layers in _SMALL_LAYERS and hidden in _SMALL_HIDDEN:
                sizes = dict(
                    num_hidden_layers=n_layers,
                    hidden_size=hidden,
                    num_attention_heads=hidden // 64,
                    intermediate_size=4 * hidden,
                )
                return cls(**{**sizes, **overrides})
        raise ValueError(
            f"unknown BERT size {name!r}; use one of {sorted(_NAMED)} or L-<layers>_H-<hidden> "
            f"with layers in {_SMALL_LAYERS} and hidden in {_SMALL_HIDDEN}"
        )


_NAMED = {
    "bert_base": BertConfig(),
    "bert_large": BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}
_ALBERT = dict(
    vocab_size=30000,
    embedding_size=128,
    share_layers="all",
    hidden_act="gelu_new",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
for _name, (_layers, _hidden) in {
    "albert_base": (12, 768),
    "albert_large": (24, 1024),
    "albert_xlarge": (24, 2048),
    "albert_xxlarge": (12, 4096),
}.items():
    _NAMED[_name] = BertConfig(
        num_hidden_layers=_layers,
        hidden_size=_hidden,
        num_attention_heads=_hidden // 64,
        intermediate_size=4 * _hidden,
        **_ALBERT,
    )
_SMALL_LAYERS = (2, 4, 6, 8, 10, 12)
_SMALL_HIDDEN = (128, 256, 512, 768)
_ROBERTA = dict(
    max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, position_offset=2
)
for _name, _type, _vocab in (
    ("roberta", "roberta", 50265),
    ("xlm_roberta", "xlm-roberta", 250002),
):
    _NAMED[f"{_name}_base"] = BertConfig(vocab_size=_vocab, model_type=_type, **_ROBERTA)
    _NAMED[f"{_name}_large"] = dataclasses.replace(
        _NAMED["bert_large"], vocab_size=_vocab, model_type=_type, **_ROBERTA
    )
_MODERNBERT = dict(
    vocab_size=50368,
    max_position_embeddings=8192,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    model_type="modernbert",
    use_bias=False,
)
_NAMED["modernbert_base"] = BertConfig(intermediate_size=1152, num_hidden_layers=22, **_MODERNBERT)
_NAMED["modernbert_large"] = BertConfig(
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    intermediate_size=2624,
    **_MODERNBERT,
)
