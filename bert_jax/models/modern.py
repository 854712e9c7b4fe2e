"""ModernBERT (Warner et al., 2024, arXiv 2412.13663): the family's pre-norm encoder.

Token embeddings and a norm (no position table); layers of pre-norm attention with rotary
positions, global in every `global_attn_every_n_layers`-th layer (rotary base 160k) and within
a local window of 128 tokens in the others (base 10k), each followed by a gated GELU
feed-forward (GeGLU: one projection to 2 x F, GELU(first half) x second half); a final norm.
The first layer's attention norm is the identity (its input is the embeddings' norm).

Packed rows keep examples apart as BERT's do: a token attends within its own example and its
rotary position counts from its example's first token, so a packed row computes what each
example computes alone: ModernBERT's unpadded training, on every backend (on TPU the splash
kernel, with a local mask in the local layers).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from bert_jax import axes
from bert_jax.models import attention, layers
from bert_jax.models.config import REMAT_POLICIES, BertConfig
from bert_jax.models.encoder import (
    BertModel,
    EncoderOutput,
    Packing,
    _layer_kwargs,
    _weight_kwargs,
    check_head_mask,
    check_input_shapes,
    stack_layers,
    unroll_layers,
)


def _out_std(config: BertConfig) -> float:
    """ModernBERT's initialisation of the projections back into the residual stream."""
    return config.initializer_range / (2.0 * config.num_hidden_layers) ** 0.5


def _norm(config: BertConfig, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        rngs=rngs,
        use_bias=config.use_bias,
        **_layer_kwargs(config),
    )


class PredictionHead(nnx.Module):
    """Dense, activation, norm: what ModernBERT's classifiers put between the encoder (its
    pooled or per-token output) and their last dense layer."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = layers.Dense(
            config.hidden_size,
            config.hidden_size,
            kernel_axes=(axes.EMBED, axes.MLP),
            init_std=_out_std(config),
            rngs=rngs,
            use_bias=config.use_bias,
            **_weight_kwargs(config),
        )
        self.layer_norm = _norm(config, rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D]."""
        return self.layer_norm(layers.activation(self.hidden_act, self.dense(x)))


class ModernBertLayer(nnx.Module):
    """norm -> attention (rotary, local or global) -> add; norm -> GeGLU -> add."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        dense = dict(
            rngs=rngs, use_bias=config.use_bias, init_std=config.initializer_range
        ) | _weight_kwargs(config)
        self.attention_layer_norm = _norm(config, rngs)
        self.attention = attention.SelfAttention(
            d,
            config.num_attention_heads,
            kernel=config.attention_kernel,
            fused_qkv=True,
            out_init_std=_out_std(config),
            **dense,
        )
        self.mlp_layer_norm = _norm(config, rngs)
        self.intermediate = layers.Dense(
            d, (2, f), kernel_axes=(axes.EMBED, None, axes.MLP), **dense
        )
        self.output = layers.Dense(
            f, d, kernel_axes=(axes.MLP, axes.EMBED), **{**dense, "init_std": _out_std(config)}
        )
        self.hidden_act = config.hidden_act
        self.hidden_dropout = config.hidden_dropout_prob
        self.attention_dropout = config.attention_probs_dropout_prob
        self.window = config.attention_window

    def __call__(
        self,
        x: jax.Array,
        mask: attention.AttentionMask,
        *,
        rotary: tuple[jax.Array, jax.Array],
        is_local: jax.Array | bool,
        is_first: jax.Array | bool,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        return_probs: bool = False,
        head_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, L, D] -> ([B, L, D], probabilities [B, H, L, L] or None); `is_local` and
        `is_first` may be traced (one scanned stack holds every layer)."""
        keys = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        h = jnp.where(is_first, x, self.attention_layer_norm(x).astype(x.dtype))
        attended, probs = self.attention(
            h,
            mask,
            probs_dropout=self.attention_dropout,
            rng=keys[0],
            deterministic=deterministic,
            return_probs=return_probs,
            head_mask=head_mask,
            rotary=rotary,
            window=self.window,
            is_local=is_local,
        )
        x = x + layers.dropout(attended, self.attention_dropout, keys[1], deterministic)
        g = self.intermediate(self.mlp_layer_norm(x))  # [B, L, 2, F]
        g = axes.constrain(g, (axes.BATCH, axes.LENGTH, None, axes.MLP))
        g = layers.activation(self.hidden_act, g[..., 0, :]) * g[..., 1, :]
        x = x + self.output(layers.dropout(g, self.hidden_dropout, keys[2], deterministic))
        return axes.constrain(x, (axes.BATCH, axes.LENGTH, None)), probs


class ModernBertEncoder(nnx.Module):
    """The layers as one stack of weights run by `jax.lax.scan` (each step told whether its
    layer is local and whether it is the first), then the final norm."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        keys = jax.random.split(rngs.params(), config.num_hidden_layers)
        self.layer = stack_layers(lambda k: ModernBertLayer(config, rngs=nnx.Rngs(params=k)), keys)
        self.final_layer_norm = _norm(config, rngs)
        self.local = tuple(not g for g in config.global_layers())
        self.thetas = (config.global_rope_theta, config.local_rope_theta)
        self.head_dim = config.head_dim
        self.remat = config.remat

    def __call__(
        self,
        x: jax.Array,
        mask: attention.AttentionMask,
        positions: jax.Array,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        head_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """x: [B, L, D], positions: [B or 1, L] each token's rotary position -> (the final
        norm's output [B, L, D], every layer's output [N, B, L, D], probabilities
        [N, B, H, L, L])."""
        tables = [attention.rotary_tables(positions, self.head_dim, t) for t in self.thetas]
        graphdef, stacked = nnx.split(self.layer)
        n = len(self.local)
        keys = None if rng is None else jax.random.split(rng, n)
        local = jnp.asarray(self.local)
        first = jnp.arange(n) == 0

        def body(h, xs):
            weights, key, is_local, is_first, heads = xs
            rotary = tuple(jnp.where(is_local, lt, gt) for gt, lt in zip(*tables, strict=True))
            h, probs = nnx.merge(graphdef, weights)(
                h,
                mask,
                rotary=rotary,
                is_local=is_local,
                is_first=is_first,
                rng=key,
                deterministic=deterministic,
                return_probs=output_attentions,
                head_mask=heads,
            )
            return h, (h if output_hidden_states else None, probs)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        xs = (nnx.to_pure_dict(stacked), keys, local, first, head_mask)
        h, (hidden, probs) = jax.lax.scan(body, x, xs, length=n, unroll=unroll_layers(self.remat))
        return self.final_layer_norm(h), hidden, probs


class ModernBertEmbeddings(nnx.Module):
    """Token embeddings, norm, dropout (positions are rotary, in the attention)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.word_embeddings = layers.Embed(
            config.vocab_size,
            config.hidden_size,
            table_axes=(axes.VOCAB, axes.EMBED),
            init_std=config.initializer_range,
            rngs=rngs,
            **_weight_kwargs(config),
        )
        self.layer_norm = _norm(config, rngs)
        self.dropout_rate = config.hidden_dropout_prob

    def __call__(self, input_ids, *, rng=None, deterministic=True) -> jax.Array:
        x = self.layer_norm(self.word_embeddings(input_ids))
        x = layers.dropout(x, self.dropout_rate, rng, deterministic)
        return axes.constrain(x, (axes.BATCH, axes.LENGTH, None))


class ModernBertModel(nnx.Module):
    """The ModernBERT encoder; with `add_pooling_layer` (the sequence classifiers) its pooled
    output is the prediction head on [CLS] or on the mean of the tokens
    (`classifier_pooling`), as `transformers`' ModernBertForSequenceClassification pools."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, add_pooling_layer: bool = False):
        self.config = config
        self.embeddings = ModernBertEmbeddings(config, rngs=rngs)
        self.encoder = ModernBertEncoder(config, rngs=rngs)
        self.pooler = PredictionHead(config, rngs=rngs) if add_pooling_layer else None
        self.pooling = config.classifier_pooling

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
        """Encodes a batch; arguments as `BertModel`'s (`segment_ids` are checked and unused:
        ModernBERT has one token type). `hidden_states` are the embeddings, each layer's
        output and, for the last, the final norm's, as `transformers` (5.x) returns them."""
        if query_positions is not None:
            raise ValueError(
                "query_positions (the last layer at some positions only) is BERT's; a "
                "ModernBERT model computes every position"
            )
        check_input_shapes(self.config, input_ids, input_mask, segment_ids)
        emb_key, enc_key = (None, None) if rng is None else jax.random.split(rng)
        x = self.embeddings(input_ids, rng=emb_key, deterministic=deterministic)
        if packing is None:
            mask = attention.AttentionMask(input_mask.astype(jnp.int32))
            positions = jnp.arange(input_ids.shape[1])[None, :]
        else:
            mask = attention.AttentionMask(packing.example_ids, packed=True)
            positions = packing.position_ids
        seq, hidden, probs = self.encoder(
            x,
            mask,
            positions,
            rng=enc_key,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            head_mask=check_head_mask(self.config, head_mask),
        )
        pooled = None
        if self.pooler is not None:
            pooled = self.pooler(self._pool(seq, input_mask, packing))
        if output_hidden_states:
            hidden = jnp.concatenate([x[None], hidden[:-1], seq[None]], axis=0)
        return EncoderOutput(seq, pooled, hidden, probs)

    def _pool(self, seq: jax.Array, input_mask: jax.Array, packing: Packing | None) -> jax.Array:
        """[B, D] (or [B, K, D], one per packed example): the [CLS] state or the mean."""
        if self.pooling == "cls":
            return seq[:, 0] if packing is None else attention.gather(seq, packing.cls_positions)
        if packing is None:
            member = input_mask[:, None, :]
        else:  # [B, K, L]: token l belongs to the row's k-th example
            k = jnp.arange(1, packing.cls_positions.shape[1] + 1)
            member = packing.example_ids[:, None, :] == k[None, :, None]
        member = member.astype(jnp.float32)
        total = jnp.einsum("bkl,bld->bkd", member, seq.astype(jnp.float32))
        mean = total / jnp.maximum(member.sum(-1, keepdims=True), 1.0)
        return (mean[:, 0] if packing is None else mean).astype(seq.dtype)


def make_encoder(
    config: BertConfig, *, rngs: nnx.Rngs, add_pooling_layer: bool | None = None
) -> nnx.Module:
    """The encoder of a config's family: `ModernBertModel` for ModernBERT (no pooler unless
    asked), `BertModel` for the others (a pooler unless refused)."""
    if config.model_type == "modernbert":
        return ModernBertModel(config, rngs=rngs, add_pooling_layer=bool(add_pooling_layer))
    return BertModel(config, rngs=rngs, add_pooling_layer=add_pooling_layer is not False)
