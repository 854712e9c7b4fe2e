"""The BERT encoder: embeddings, the post-LN Transformer layer, its stack (scanned, shared
across layers as ALBERT, or unrolled where heads are pruned) and the pooler."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from bert_jax import axes
from bert_jax.models import attention, layers
from bert_jax.models.config import REMAT_POLICIES, BertConfig

# The TransformerLayer attributes each partial sharing mode shares across layers.
_SHARED_PARTS = {
    "attention": ("attention", "attention_layer_norm"),
    "ffn": ("intermediate", "output", "output_layer_norm"),
}


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
        """The packing of a batch made by `encoding.pack`, or None for a batch of one example per
        row."""
        if "example_ids" not in batch:
            return None
        return cls(batch["example_ids"], batch["position_ids"], batch["cls_positions"])


def _layer_kwargs(config: BertConfig) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def _weight_kwargs(config: BertConfig) -> dict[str, Any]:
    """For the layers that hold matmul weights or tables (Dense, Embed, TransformerLayer)."""
    return dict(quantization=config.quantization, **_layer_kwargs(config))


class TransformerLayer(nnx.Module):
    """One post-LN Transformer layer: attention, add & norm, GELU feed-forward, add & norm."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        *,
        hidden_act: str,
        hidden_dropout: float,
        attention_dropout: float,
        layer_norm_eps: float,
        init_std: float,
        rngs: nnx.Rngs,
        head_dim: int | None = None,
        attention_kernel: str = "auto",
        dtype: layers.Dtype = jnp.float32,
        param_dtype: layers.Dtype = jnp.float32,
        quantization: str = "none",
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dense = dict(init_std=init_std, quantization=quantization, **kw)
        self.attention = attention.SelfAttention(
            hidden_size, num_heads, head_dim=head_dim, kernel=attention_kernel, **dense
        )
        self.attention_layer_norm = layers.LayerNorm(hidden_size, epsilon=layer_norm_eps, **kw)
        self.intermediate = layers.Dense(
            hidden_size, intermediate_size, kernel_axes=(axes.EMBED, axes.MLP), **dense
        )
        self.output = layers.Dense(
            intermediate_size, hidden_size, kernel_axes=(axes.MLP, axes.EMBED), **dense
        )
        self.output_layer_norm = layers.LayerNorm(hidden_size, epsilon=layer_norm_eps, **kw)
        self.hidden_act = hidden_act
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout

    def __call__(
        self,
        x: jax.Array,
        mask: attention.AttentionMask,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        return_probs: bool = False,
        head_mask: jax.Array | None = None,
        query_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, L, D], mask: `attention.AttentionMask`, head_mask: [H] or None -> ([B, L, D],
        probabilities [B, H, L, L] or None). With `query_positions` [B, Q] the layer's output
        is computed at those positions only: [B, Q, D] (the keys still see every position)."""
        keys = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        attended, probs = self.attention(
            x,
            mask,
            probs_dropout=self.attention_dropout,
            rng=keys[0],
            deterministic=deterministic,
            return_probs=return_probs,
            head_mask=head_mask,
            query_positions=query_positions,
        )
        if query_positions is not None:
            x = attention.gather(x, query_positions)
        x = self.attention_layer_norm(
            x + layers.dropout(attended, self.hidden_dropout, keys[1], deterministic)
        )
        h = axes.constrain(self.intermediate(x), (axes.BATCH, axes.LENGTH, axes.MLP))
        h = self.output(layers.activation(self.hidden_act, h))
        h = layers.dropout(h, self.hidden_dropout, keys[2], deterministic)
        x = self.output_layer_norm(x + h)
        return axes.constrain(x, (axes.BATCH, axes.LENGTH, None)), probs


class BertEmbeddings(nnx.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        kw = dict(init_std=config.initializer_range, rngs=rngs, **_weight_kwargs(config))
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
        self.position_offset = config.position_offset
        self.one_type = config.type_vocab_size == 1

    def __call__(
        self,
        input_ids,
        segment_ids,
        position_ids=None,
        *,
        input_mask=None,
        rng=None,
        deterministic=True,
    ) -> jax.Array:
        """position_ids: each token's position within its example (packed rows); None: its
        index in the row, or (with a position offset, as RoBERTa) its index among the row's
        real tokens, padding at row offset - 1 as fairseq places it."""
        if position_ids is None and self.position_offset and input_mask is not None:
            real = input_mask.astype(jnp.int32)
            position_ids = (jnp.cumsum(real, axis=1) - 1) * real - (1 - real)
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        if self.one_type:  # RoBERTa's single token type: segment ids carry no embedding
            segment_ids = jnp.zeros_like(segment_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids + self.position_offset)
            + self.token_type_embeddings(segment_ids)
        )
        x = layers.dropout(self.layer_norm(x), self.dropout_rate, rng, deterministic)
        return axes.constrain(x, (axes.BATCH, axes.LENGTH, None))


def unroll_layers(remat: str) -> bool:
    """Whether a scanned layer stack runs unrolled: for a CPU, where XLA:CPU runs the `scan` as
    a loop that slices each layer's weights out of the stack and, under differentiation, fills
    zeroed stacks of the saved activations and of the weight gradients one layer at a time (a
    fifth of a 6 x 384 model's fine-tuning step, a seventh of BERT-Base's; compiling takes
    about twice as long). Elsewhere the loop stays: compile time and program size flat in
    depth; and so it does under rematerialisation, which saves memory by recomputing layer by
    layer (unrolled, XLA:CPU's schedule kept as much as without it). Decided by the devices
    the program is traced for (`attention.target_platform`), so that a program compiled for a
    TPU topology on a CPU host keeps its loop."""
    return remat == "none" and attention.target_platform() == "cpu"


class BertEncoder(nnx.Module):
    """The Transformer layers with stacked weights, run by `jax.lax.scan`.

    Weights carry a leading axis of the distinct sets: L for BERT; 1 for what ALBERT shares
    (all weights, or attention / feed-forward only), or groups x inner layers for ALBERT's
    layer groups. Shared weights are read from the closure at every step of the scan, so
    compile time and parameter memory do not grow with depth (activations still do).
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        def make_layer(key: jax.Array, heads: int = config.num_attention_heads):
            return TransformerLayer(
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
                **_weight_kwargs(config),
            )

        keys = jax.random.split(rngs.params(), config.num_weight_sets)
        self.kept_heads = None
        if config.pruned_heads:  # layers of different sizes: one module each, no scan
            self.kept_heads = tuple(config.kept_heads(i) for i in range(len(keys)))
            self.layers = nnx.List(
                [make_layer(k, len(h)) for k, h in zip(keys, self.kept_heads, strict=True)]
            )
        self.shared_parts = _SHARED_PARTS.get(config.share_layers, ())
        self.layer = None if self.kept_heads else stack_layers(make_layer, keys, self.shared_parts)
        self.embedding_projection = (
            layers.Dense(
                config.embed_dim,
                config.hidden_size,
                kernel_axes=(None, axes.EMBED),
                init_std=config.initializer_range,
                rngs=rngs,
                **_weight_kwargs(config),
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
        mask: attention.AttentionMask,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        head_mask: jax.Array | None = None,
        query_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array]:
        """x: [B, L, E], head_mask: [N, H] or None -> (last [B, L, D], every layer's
        [N, B, L, D], probs [N, B, H, L, L], the input as projected to D).

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
        run = self._scanned if self.kept_heads is None else self._unrolled
        out = run(
            x,
            mask,
            rng,
            deterministic,
            head_mask,
            output_attentions,
            output_hidden_states,
            query_positions,
        )
        return (*out, x)

    def _scanned(
        self,
        x,
        mask,
        rng,
        deterministic,
        head_mask,
        output_attentions,
        output_hidden_states,
        query_positions,
    ):
        """The layers by one `scan` over their weight sets (ALBERT's shared set read from
        the closure): (last, hidden states, probs) as `__call__` returns them."""
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
            out, (hidden, probs) = jax.lax.scan(
                body, x, xs, length=steps, unroll=unroll_layers(self.remat)
            )
            return out, hidden, probs
        # All layers but the last over every position; the last at the asked positions only.
        h, _ = jax.lax.scan(
            body,
            x,
            jax.tree.map(lambda a: a[:-1], xs),
            length=steps - 1,
            unroll=unroll_layers(self.remat),
        )
        out, _ = apply(h, jax.tree.map(lambda a: a[-1], xs), query_positions)
        return out, None, None

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
                **_weight_kwargs(config),
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
        embed = functools.partial(self.embeddings, rng=emb_key, deterministic=deterministic)
        x = embed(input_ids, segment_ids, positions, input_mask=input_mask)
        seq, hidden, probs, x = self.encoder(
            x,
            attention.AttentionMask(input_mask.astype(jnp.int32))
            if packing is None
            else attention.AttentionMask(packing.example_ids, packed=True),
            rng=enc_key,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            head_mask=check_head_mask(self.config, head_mask),
            query_positions=query_positions,
        )
        if packing is None:
            cls = seq[:, 0]
        else:  # [B, K, D]: each packed example's [CLS]
            cls = attention.gather(seq, packing.cls_positions)
        pooled = None if self.pooler is None else jnp.tanh(self.pooler(cls))
        if output_hidden_states:
            hidden = jnp.concatenate([x[None], hidden], axis=0)
        return EncoderOutput(seq, pooled, hidden, probs)


def check_head_mask(config: BertConfig, head_mask: jax.Array | None) -> jax.Array | None:
    """[N, H] (one mask) or [B, N, H] (one per example) -> [N, H] or [N, B, H]."""
    if head_mask is None:
        return None
    want = (config.num_hidden_layers, config.num_attention_heads)
    if tuple(head_mask.shape[-2:]) != want or head_mask.ndim not in (2, 3):
        raise ValueError(
            f"head_mask has shape {tuple(head_mask.shape)}; it must be [layers, heads] = "
            f"{list(want)}, or [batch, layers, heads]"
        )
    head_mask = jnp.asarray(head_mask, jnp.float32)
    return head_mask if head_mask.ndim == 2 else jnp.swapaxes(head_mask, 0, 1)


def stack_layers(
    make_layer: Callable[[jax.Array], nnx.Module], keys: jax.Array, shared_parts: tuple = ()
) -> nnx.Module:
    """One layer module whose weights carry a leading axis of the weight sets, one per key
    (a single copy of the sublayers named in `shared_parts`, read by every layer)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_layer(keys[0])))
    stacked = jax.vmap(lambda k: nnx.state(make_layer(k)))(keys)
    for name in shared_parts:
        for var in _variables(stacked[name]):
            var.set_value(var.get_value()[:1])
    for var in _variables(stacked):
        var.set_metadata(logical_axes=(axes.LAYERS, *var.get_metadata()["logical_axes"]))
    return nnx.merge(graphdef, stacked)


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
    if input_ids.shape[1] > config.max_length:
        offset = f" less position_offset={config.position_offset}" * bool(config.position_offset)
        raise ValueError(
            f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
            f"{config.max_position_embeddings}{offset}; shorten the inputs or enlarge the config"
        )


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _variables(state: nnx.State) -> list[nnx.Variable]:
    return jax.tree.leaves(state, is_leaf=_is_variable)
