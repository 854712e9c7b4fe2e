"""BertConfig, the BERT encoder and its heads: pretraining (masked LM + next sentence),
masked LM alone, sequence classification / regression.

The encoder's layers are stacked: one `TransformerLayer` whose weights carry a leading
`layers` axis, applied with `jax.lax.scan`, so that compile time does not grow with depth.
Models are used functionally: `split_params` once, then `merge_params` inside pure jitted
functions (see `train_lib`).
"""

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from bert_jax import axes
from bert_jax.models import layers

_ACTIVATIONS = ("gelu", "gelu_new", "relu")
_SHARING = ("none", "all", "attention", "ffn")
# The TransformerLayer attributes each partial sharing mode shares across layers.
_SHARED_PARTS = {
    "attention": ("attention", "attention_layer_norm"),
    "ffn": ("intermediate", "output", "output_layer_norm"),
}
_DTYPES = ("float32", "bfloat16", "float16")
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
    # Attention without dropout on its probabilities (evaluation, inference, ALBERT's
    # recipe): "xla" (jax.nn.dot_product_attention), "splash" (the Pallas splash kernel, on
    # TPU; interpreted elsewhere, for tests) or "auto" (splash on TPU, XLA elsewhere).
    attention_kernel: str = "auto"
    # Heads removed from each layer (per layer, in the original numbering, as Hugging Face's
    # `pruned_heads`); a pruned model runs its layers one by one, each of its own size.
    pruned_heads: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if isinstance(self.remat, bool):  # configs and config.json files of earlier runs
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"BertConfig.remat={self.remat!r}; use one of {tuple(REMAT_POLICIES)}")
        if self.attention_kernel not in layers.ATTENTION_KERNELS:
            raise ValueError(
                f"BertConfig.attention_kernel={self.attention_kernel!r}; use one of "
                f"{layers.ATTENTION_KERNELS}"
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
        self._check_albert()
        self._check_pruned_heads()

    def _check_pruned_heads(self) -> None:
        pruned = tuple(tuple(sorted(set(int(h) for h in p))) for p in self.pruned_heads or ())
        object.__setattr__(self, "pruned_heads", pruned if any(pruned) else ())
        if not self.pruned_heads:
            return
        if len(pruned) != self.num_hidden_layers:
            raise ValueError(
                f"BertConfig.pruned_heads has {len(pruned)} entries; it needs one per layer "
                f"({self.num_hidden_layers}), empty for a layer that keeps its heads"
            )
        h = self.num_attention_heads
        for i, p in enumerate(pruned):
            if p and (p[0] < 0 or p[-1] >= h):
                raise ValueError(f"BertConfig.pruned_heads[{i}]={p}: heads are 0..{h - 1}")
            if len(p) == h:
                raise ValueError(
                    f"BertConfig.pruned_heads[{i}] removes all {h} heads of layer {i}; keep at "
                    f"least one (a head mask of zeros silences a whole layer's attention)"
                )
        if self.share_layers != "none":
            raise ValueError("pruned heads need unshared layers (share_layers='none')")

    def kept_heads(self, layer: int) -> tuple[int, ...]:
        """The original indices of the heads layer `layer` keeps."""
        removed = set(self.pruned_heads[layer]) if self.pruned_heads else set()
        return tuple(h for h in range(self.num_attention_heads) if h not in removed)

    def _check_albert(self) -> None:
        if not isinstance(self.embedding_size, int) or self.embedding_size < 0:
            raise ValueError(f"BertConfig.embedding_size must be >= 0, got {self.embedding_size!r}")
        if self.embedding_size > self.hidden_size:
            raise ValueError(
                f"BertConfig.embedding_size={self.embedding_size} is larger than hidden_size="
                f"{self.hidden_size}: factorized embeddings are meant to be smaller (ALBERT uses "
                f"128); use embedding_size <= hidden_size, or 0 for BERT's unfactorized table"
            )
        if self.share_layers not in _SHARING:
            raise ValueError(
                f"BertConfig.share_layers={self.share_layers!r}; use one of {_SHARING}"
            )
        groups, inner = self.num_hidden_groups, self.inner_group_num
        if groups < 1 or inner < 1 or self.num_hidden_layers % groups:
            raise ValueError(
                f"BertConfig.num_hidden_groups={groups} must be positive and divide "
                f"num_hidden_layers={self.num_hidden_layers} (inner_group_num={inner} >= 1)"
            )
        if (groups > 1 or inner > 1) and self.share_layers != "all":
            raise ValueError(
                "layer groups (num_hidden_groups or inner_group_num > 1) are ALBERT's sharing "
                "scheme: set share_layers='all'"
            )

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
        """A released size: `bert_base`, `bert_large`, or the small-BERT grid `L-4_H-256`.

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


@struct.dataclass
class EncoderOutput:
    """sequence_output [B, L, D]; pooled_output [B, D] (None without a pooler);
    hidden_states [1 + layers, B, L, D] (embeddings first) and attentions
    [layers, B, H, L, L] when requested, else None."""

    sequence_output: jax.Array
    pooled_output: jax.Array | None
    hidden_states: jax.Array | None = None
    attentions: jax.Array | None = None


@struct.dataclass
class Packing:
    """Several examples in one row of a batch, kept apart (Krell et al., 2021).

    example_ids: [B, L] int32, 1, 2, ... for the tokens of a row's first, second, ... example
      and 0 for padding; a token attends only to tokens of its own example.
    position_ids: [B, L] int32, each token's position within its example (from 0 at its [CLS]).
    cls_positions: [B, K] int32, where each example's [CLS] is (0 for the unused slots).
    """

    example_ids: jax.Array
    position_ids: jax.Array
    cls_positions: jax.Array

    @classmethod
    def from_batch(cls, batch: dict) -> "Packing | None":
        """The packing of a batch made by `glue.pack`, or None for a batch of one example per
        row."""
        if "example_ids" not in batch:
            return None
        return cls(batch["example_ids"], batch["position_ids"], batch["cls_positions"])


@struct.dataclass
class PretrainingOutput:
    """mlm_logits [B, P, V] float32 at the masked positions; nsp_logits [B, 2] float32."""

    mlm_logits: jax.Array
    nsp_logits: jax.Array
    encoder: EncoderOutput


def _layer_kwargs(config: BertConfig) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


class BertEmbeddings(nnx.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        kw = dict(init_std=config.initializer_range, rngs=rngs, **_layer_kwargs(config))
        d = config.embed_dim
        self.word_embeddings = layers.Embed(
            config.vocab_size, d, table_axes=(axes.VOCAB, axes.EMBED), **kw
        )
        self.position_embeddings = layers.Embed(
            config.max_position_embeddings, d, table_axes=(None, axes.EMBED), **kw
        )
        self.token_type_embeddings = layers.Embed(
            config.type_vocab_size, d, table_axes=(None, axes.EMBED), **kw
        )
        self.layer_norm = layers.LayerNorm(
            d, epsilon=config.layer_norm_eps, rngs=rngs, **_layer_kwargs(config)
        )
        self.dropout_rate = config.hidden_dropout_prob

    def __call__(
        self, input_ids, segment_ids, position_ids=None, *, rng=None, deterministic=True
    ) -> jax.Array:
        positions = (
            jnp.arange(input_ids.shape[1])[None, :] if position_ids is None else position_ids
        )
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(segment_ids)
        )
        x = layers.dropout(self.layer_norm(x), self.dropout_rate, rng, deterministic)
        return axes.constrain(x, (axes.BATCH, axes.LENGTH, None))


class BertEncoder(nnx.Module):
    """The Transformer layers with stacked weights, run by `jax.lax.scan`.

    Weights carry a leading axis of the distinct sets: L for BERT; 1 for what ALBERT shares
    (all weights, or attention / feed-forward only), or groups x inner layers for ALBERT's
    layer groups. Shared weights are read from the closure at every step of the scan, so
    compile time and parameter memory do not grow with depth (activations still do).
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        def make_layer(key: jax.Array, heads: int = config.num_attention_heads):
            return layers.TransformerLayer(
                config.hidden_size,
                heads,
                config.intermediate_size,
                hidden_act=config.hidden_act,
                hidden_dropout=config.hidden_dropout_prob,
                attention_dropout=config.attention_probs_dropout_prob,
                layer_norm_eps=config.layer_norm_eps,
                init_std=config.initializer_range,
                rngs=nnx.Rngs(params=key),
                head_dim=config.head_dim,
                attention_kernel=config.attention_kernel,
                **_layer_kwargs(config),
            )

        keys = jax.random.split(rngs.params(), config.num_weight_sets)
        self.kept_heads = None
        if config.pruned_heads:  # layers of different sizes: one module each, no scan
            self.kept_heads = tuple(config.kept_heads(i) for i in range(len(keys)))
            self.layers = nnx.List(
                [make_layer(k, len(h)) for k, h in zip(keys, self.kept_heads, strict=True)]
            )
        self.shared_parts = _SHARED_PARTS.get(config.share_layers, ())
        self.layer = None if self.kept_heads else self._stacked_layers(make_layer, keys)
        self.embedding_projection = (
            layers.Dense(
                config.embed_dim,
                config.hidden_size,
                kernel_axes=(None, axes.EMBED),
                init_std=config.initializer_range,
                rngs=rngs,
                **_layer_kwargs(config),
            )
            if config.embed_dim != config.hidden_size
            else None
        )
        self.share_all = config.share_layers == "all"
        self._num_heads = config.num_attention_heads
        self.schedule = tuple(config.layer_schedule())
        self.remat = config.remat

    def __call__(
        self,
        x: jax.Array,
        mask: layers.AttentionMask,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        head_mask: jax.Array | None = None,
        query_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """x: [B, L, E], head_mask: [N, H] or None -> (last [B, L, D], every layer's
        [N, B, L, D], probs [N, B, H, L, L]); also returns the input as projected to D.

        With `query_positions` [B, Q] the last layer computes only those positions (its keys
        and values still come from all), and `last` is [B, Q, D].
        """
        if query_positions is not None and (output_hidden_states or output_attentions):
            raise ValueError(
                "query_positions computes the last layer at some positions only; it cannot "
                "return every layer's hidden states or attention probabilities"
            )
        if self.embedding_projection is not None:
            x = self.embedding_projection(x)
        if self.kept_heads is not None:
            return (
                *self._unrolled(
                    x,
                    mask,
                    rng,
                    deterministic,
                    head_mask,
                    output_attentions,
                    output_hidden_states,
                    query_positions,
                ),
                x,
            )
        graphdef, stacked = nnx.split(self.layer)
        weights = nnx.to_pure_dict(stacked)
        steps = len(self.schedule)
        keys = None if rng is None else jax.random.split(rng, steps)
        if self.share_all:  # every set is read from the closure, by index for groups
            scanned, fixed = {}, weights
            index = jnp.asarray(self.schedule, jnp.int32) if max(self.schedule) else None
        else:
            scanned = {k: v for k, v in weights.items() if k not in self.shared_parts}
            fixed = {k: v for k, v in weights.items() if k in self.shared_parts}
            index = None

        def apply(h, xs, positions):
            per_layer, key, i, heads = xs
            own = jax.tree.map(lambda w: w[0] if i is None else w[i], fixed)
            layer = nnx.merge(graphdef, {**per_layer, **own})
            return layer(
                h,
                mask,
                rng=key,
                deterministic=deterministic,
                return_probs=output_attentions,
                head_mask=heads,
                query_positions=positions,
            )

        def body(h, xs):
            h, probs = apply(h, xs, None)
            return h, (h if output_hidden_states else None, probs)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat])
        if head_mask is not None and steps != head_mask.shape[0]:
            # ALBERT's inner group layers: each applied layer's mask for its inner layers.
            head_mask = jnp.repeat(head_mask, steps // head_mask.shape[0], axis=0)
        xs = (scanned, keys, index, head_mask)
        if query_positions is None:
            out, (hidden, probs) = jax.lax.scan(body, x, xs, length=steps)
            return out, hidden, probs, x
        # All layers but the last over every position; the last at the asked positions only.
        h, _ = jax.lax.scan(body, x, jax.tree.map(lambda a: a[:-1], xs), length=steps - 1)
        out, _ = apply(h, jax.tree.map(lambda a: a[-1], xs), query_positions)
        return out, None, None, x

    def _stacked_layers(self, make_layer, keys) -> layers.TransformerLayer:
        """One layer module whose weights carry a leading axis of the weight sets."""
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_layer(keys[0])))
        stacked = jax.vmap(lambda k: nnx.state(make_layer(k)))(keys)
        for name in self.shared_parts:  # one copy of the shared sublayers, for every layer
            for var in _variables(stacked[name]):
                var.set_value(var.get_value()[:1])
        for var in _variables(stacked):
            var.set_metadata(logical_axes=(axes.LAYERS, *var.get_metadata()["logical_axes"]))
        return nnx.merge(graphdef, stacked)

    def _unrolled(
        self,
        h,
        mask,
        rng,
        deterministic,
        head_mask,
        output_attentions,
        output_hidden,
        query_positions=None,
    ):
        """A pruned model's layers, each with its own heads; attention probabilities come back
        in the original head numbering (zeros for removed heads)."""
        keys = [None] * len(self.layers) if rng is None else jax.random.split(rng, len(self.layers))
        hidden, probs = [], []
        for i, (layer, kept) in enumerate(zip(self.layers, self.kept_heads, strict=True)):
            heads = None if head_mask is None else head_mask[i, ..., jnp.asarray(kept)]
            h, p = layer(
                h,
                mask,
                rng=keys[i],
                deterministic=deterministic,
                return_probs=output_attentions,
                head_mask=heads,
                query_positions=query_positions if i == len(self.layers) - 1 else None,
            )
            hidden.append(h)
            if output_attentions:
                full = jnp.zeros((*p.shape[:1], self._num_heads, *p.shape[2:]), p.dtype)
                probs.append(full.at[:, jnp.asarray(kept)].set(p))
        return (
            h,
            jnp.stack(hidden) if output_hidden else None,
            jnp.stack(probs) if output_attentions else None,
        )


class BertModel(nnx.Module):
    """The BERT encoder: embeddings, Transformer layers, pooler (dense + tanh on [CLS])."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, add_pooling_layer: bool = True):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = (
            layers.Dense(
                config.hidden_size,
                config.hidden_size,
                kernel_axes=(axes.EMBED, axes.MLP),
                init_std=config.initializer_range,
                rngs=rngs,
                **_layer_kwargs(config),
            )
            if add_pooling_layer
            else None
        )

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        head_mask: jax.Array | None = None,
        packing: Packing | None = None,
        query_positions: jax.Array | None = None,
    ) -> EncoderOutput:
        """Encodes a batch.

        Args:
          input_ids: [B, L] int32 token ids.
          input_mask: [B, L] int32 or bool, 1 for real tokens and 0 for padding.
          segment_ids: [B, L] int32 token types (0 for sentence A, 1 for sentence B).
          rng: dropout key; required when deterministic=False.
          head_mask: [num_hidden_layers, num_attention_heads] float multiplying each head's
            output (0 silences it), or [B, layers, heads] for a mask per example; None: all 1.
          packing: several examples per row (`Packing`): positions restart at each example,
            attention stays within it, and the pooled output is [B, K, D], one per example.
          query_positions: [B, Q] int32, the positions whose output is wanted, [CLS]'s (0)
            first: the last layer computes only those, `sequence_output` is [B, Q, D] and the
            pooler reads its first row. None: every position.
        """
        if packing is not None and query_positions is not None:
            raise ValueError("packing and query_positions cannot be combined")
        check_input_shapes(self.config, input_ids, input_mask, segment_ids)
        emb_key, enc_key = (None, None) if rng is None else jax.random.split(rng)
        positions = None if packing is None else packing.position_ids
        x = self.embeddings(
            input_ids, segment_ids, positions, rng=emb_key, deterministic=deterministic
        )
        seq, hidden, probs, x = self.encoder(
            x,
            layers.AttentionMask(input_mask.astype(jnp.int32))
            if packing is None
            else layers.AttentionMask(packing.example_ids, packed=True),
            rng=enc_key,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            head_mask=self._check_head_mask(head_mask),
            query_positions=query_positions,
        )
        if packing is None:
            cls = seq[:, 0]
        else:  # [B, K, D]: each packed example's [CLS]
            cls = layers.gather(seq, packing.cls_positions)
        pooled = None if self.pooler is None else jnp.tanh(self.pooler(cls))
        if output_hidden_states:
            hidden = jnp.concatenate([x[None], hidden], axis=0)
        return EncoderOutput(seq, pooled, hidden, probs)

    def _check_head_mask(self, head_mask):
        """[N, H] (one mask) or [B, N, H] (one per example) -> [N, H] or [N, B, H]."""
        if head_mask is None:
            return None
        want = (self.config.num_hidden_layers, self.config.num_attention_heads)
        if tuple(head_mask.shape[-2:]) != want or head_mask.ndim not in (2, 3):
            raise ValueError(
                f"head_mask has shape {tuple(head_mask.shape)}; it must be [layers, heads] = "
                f"{list(want)}, or [batch, layers, heads]"
            )
        head_mask = jnp.asarray(head_mask, jnp.float32)
        return head_mask if head_mask.ndim == 2 else jnp.swapaxes(head_mask, 0, 1)


class _MaskedLMModel(nnx.Module):
    """The encoder plus the masked-LM head (dense + activation + LayerNorm, then the decoder
    tied to the word embeddings and a per-token output bias), shared by the pretraining and
    masked-LM models so that their weights have the same names."""

    def _init_encoder_and_mlm(self, config: BertConfig, rngs: nnx.Rngs, add_pooling_layer: bool):
        kw = dict(init_std=config.initializer_range, rngs=rngs, **_layer_kwargs(config))
        d, e = config.hidden_size, config.embed_dim
        self.bert = BertModel(config, rngs=rngs, add_pooling_layer=add_pooling_layer)
        # ALBERT maps to the factorized size E, where the tied decoder lives.
        out_axis = axes.MLP if e == d else None
        self.transform = layers.Dense(d, e, kernel_axes=(axes.EMBED, out_axis), **kw)
        self.transform_layer_norm = layers.LayerNorm(
            e, epsilon=config.layer_norm_eps, rngs=rngs, **_layer_kwargs(config)
        )
        self.output_bias = layers.param(
            jnp.zeros((config.vocab_size,), jnp.dtype(config.param_dtype)), (axes.VOCAB,)
        )
        self.hidden_act = config.hidden_act

    def mlm_logits(self, sequence_output: jax.Array, positions: jax.Array | None) -> jax.Array:
        """[B, P, V] float32 logits at `positions` ([B, P] int32), or at every position."""
        h = sequence_output
        if positions is not None:
            # Only the P masked positions go through the head: never [B, L, V] logits.
            h = layers.gather(h, positions)
        h = self.transform_layer_norm(layers.activation(self.hidden_act, self.transform(h)))
        logits = self.bert.embeddings.word_embeddings.attend(h).astype(jnp.float32)
        return logits + self.output_bias[...].astype(jnp.float32)


class BertForPreTraining(_MaskedLMModel):
    """BERT with the masked-LM head (tied decoder) and the next-sentence head."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self._init_encoder_and_mlm(config, rngs, add_pooling_layer=True)
        kw = dict(init_std=config.initializer_range, rngs=rngs, **_layer_kwargs(config))
        self.seq_relationship = layers.Dense(
            config.hidden_size, 2, kernel_axes=(axes.EMBED, None), **kw
        )

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        masked_lm_positions: jax.Array,
        *,
        only_predicted_positions: bool = False,
        **kwargs,
    ) -> PretrainingOutput:
        """Runs the encoder, then the MLM head on the masked positions only.

        Args:
          input_ids, input_mask, segment_ids: [B, L] as in `BertModel`.
          masked_lm_positions: [B, P] int32 positions whose tokens are predicted (padded
            entries point anywhere; their loss weight is 0).
          only_predicted_positions: the last layer computes only what the heads read, [CLS]
            and the masked positions (the same logits, a tenth of that layer's work at the
            usual 15% masking); `encoder.sequence_output` is then [B, 1 + P, D].
          kwargs: as in `BertModel` (rng, deterministic, output_*, head_mask).
        """
        if only_predicted_positions:
            cls = jnp.zeros_like(masked_lm_positions[:, :1])
            queries = jnp.concatenate([cls, masked_lm_positions], axis=1)
            enc = self.bert(input_ids, input_mask, segment_ids, query_positions=queries, **kwargs)
            mlm_logits = self.mlm_logits(enc.sequence_output[:, 1:], None)
        else:
            enc = self.bert(input_ids, input_mask, segment_ids, **kwargs)
            mlm_logits = self.mlm_logits(enc.sequence_output, masked_lm_positions)
        nsp_logits = self.seq_relationship(enc.pooled_output).astype(jnp.float32)
        return PretrainingOutput(mlm_logits, nsp_logits, enc)


class BertForMaskedLM(_MaskedLMModel):
    """BERT with the masked-LM head only and no pooler (Hugging Face's `BertForMaskedLM`)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self._init_encoder_and_mlm(config, rngs, add_pooling_layer=False)

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        masked_lm_positions: jax.Array | None = None,
        **kwargs,
    ) -> tuple[jax.Array, EncoderOutput]:
        """(MLM logits [B, P, V] float32 at the positions, or [B, L, V] without them; encoder
        output). Keyword arguments as in `BertModel`."""
        enc = self.bert(input_ids, input_mask, segment_ids, **kwargs)
        return self.mlm_logits(enc.sequence_output, masked_lm_positions), enc


class _DenseHead(nnx.Module):
    """The shared shape of the classifier heads: BERT, dropout, and a dense layer of `outputs`
    scores on the pooled output (`pooled`) or on every token's output."""

    def _init_head(
        self,
        config: BertConfig,
        outputs: int,
        rngs: nnx.Rngs,
        classifier_dropout: float | None,
        pooled: bool,
    ) -> None:
        if not isinstance(outputs, int) or outputs < 1:
            raise ValueError(f"num_labels must be a positive integer, got {outputs!r}")
        self.bert = BertModel(config, rngs=rngs, add_pooling_layer=pooled)
        self.classifier = layers.Dense(
            config.hidden_size,
            outputs,
            kernel_axes=(axes.EMBED, None),
            init_std=config.initializer_range,
            rngs=rngs,
            **_layer_kwargs(config),
        )
        self.dropout_rate = (
            config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        )

    def _scores(
        self, input_ids, input_mask, segment_ids, rng, deterministic, **kwargs
    ) -> tuple[jax.Array, EncoderOutput]:
        """(float32 scores of the pooled output, or of every token's without a pooler;
        encoder output)."""
        enc_key, drop_key = (None, None) if rng is None else jax.random.split(rng)
        enc = self.bert(
            input_ids, input_mask, segment_ids, rng=enc_key, deterministic=deterministic, **kwargs
        )
        hidden = enc.sequence_output if self.bert.pooler is None else enc.pooled_output
        hidden = layers.dropout(hidden, self.dropout_rate, drop_key, deterministic)
        return self.classifier(hidden).astype(jnp.float32), enc


class BertForSequenceClassification(_DenseHead):
    """BERT with dropout and a dense layer on the pooled output: `num_labels` classes, or a
    regression score when `num_labels` is 1 (STS-B)."""

    def __init__(
        self,
        config: BertConfig,
        num_labels: int = 2,
        *,
        rngs: nnx.Rngs,
        classifier_dropout: float | None = None,
    ):
        self.num_labels = num_labels
        self._init_head(config, num_labels, rngs, classifier_dropout, pooled=True)

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        **kwargs,
    ) -> tuple[jax.Array, EncoderOutput]:
        """(logits [B, num_labels] float32, or [B, K, num_labels] with `packing`, encoder
        output); arguments as in `BertModel`."""
        return self._scores(input_ids, input_mask, segment_ids, rng, deterministic, **kwargs)


class BertForTokenClassification(_DenseHead):
    """BERT with dropout and a dense layer on every token's output: `num_labels` scores per
    token (named entities; `transformers`' BertForTokenClassification; no pooler)."""

    def __init__(
        self,
        config: BertConfig,
        num_labels: int = 2,
        *,
        rngs: nnx.Rngs,
        classifier_dropout: float | None = None,
    ):
        self.num_labels = num_labels
        self._init_head(config, num_labels, rngs, classifier_dropout, pooled=False)

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        **kwargs,
    ) -> tuple[jax.Array, EncoderOutput]:
        """(logits [B, L, num_labels] float32, encoder output); arguments as in `BertModel`."""
        return self._scores(input_ids, input_mask, segment_ids, rng, deterministic, **kwargs)


class BertForMultipleChoice(_DenseHead):
    """BERT scoring each of several (context, choice) rows by a dense layer on its pooled
    output (SWAG; `transformers`' BertForMultipleChoice): inputs [B, C, L], logits [B, C]."""

    def __init__(
        self, config: BertConfig, *, rngs: nnx.Rngs, classifier_dropout: float | None = None
    ):
        self._init_head(config, 1, rngs, classifier_dropout, pooled=True)

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        **kwargs,
    ) -> tuple[jax.Array, EncoderOutput]:
        """(logits [B, C] float32, the encoder output over the B * C rows); inputs [B, C, L],
        keyword arguments as in `BertModel`."""
        batch, choices, length = input_ids.shape
        flat = [x.reshape(batch * choices, length) for x in (input_ids, input_mask, segment_ids)]
        logits, enc = self._scores(*flat, rng, deterministic, **kwargs)
        return logits.reshape(batch, choices), enc


class BertForQuestionAnswering(nnx.Module):
    """BERT with a dense layer on every token's output giving a start and an end score
    (extractive QA, as `transformers`' BertForQuestionAnswering; no pooler)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.bert = BertModel(config, rngs=rngs, add_pooling_layer=False)
        self.qa_outputs = layers.Dense(
            config.hidden_size,
            2,
            kernel_axes=(axes.EMBED, None),
            init_std=config.initializer_range,
            rngs=rngs,
            **_layer_kwargs(config),
        )

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        **kwargs,
    ) -> tuple[jax.Array, jax.Array, EncoderOutput]:
        """(start logits [B, L], end logits [B, L], both float32, encoder output); keyword
        arguments as in `BertModel`."""
        enc = self.bert(input_ids, input_mask, segment_ids, **kwargs)
        logits = self.qa_outputs(enc.sequence_output).astype(jnp.float32)
        return logits[..., 0], logits[..., 1], enc


def check_input_shapes(config: BertConfig, input_ids, input_mask, segment_ids) -> None:
    """Raises ValueError naming the offending input when a batch does not fit the config."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    for name, arr in (("input_mask", input_mask), ("segment_ids", segment_ids)):
        if arr.shape != input_ids.shape:
            raise ValueError(
                f"{name} has shape {arr.shape} but input_ids has {input_ids.shape}; every "
                f"[batch, length] feature must have the same shape"
            )
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
            f"{config.max_position_embeddings}; shorten the inputs or enlarge the config"
        )


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
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]:
        node = out
        keys = [k.key for k in path]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = var.get_metadata()["logical_axes"]
    return out


def count_params(config: BertConfig, model_cls=BertModel) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    _, params = split_params(abstract_model(config, model_cls))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _variables(state: nnx.State) -> list[nnx.Variable]:
    return jax.tree.leaves(state, is_leaf=_is_variable)
