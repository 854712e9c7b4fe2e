"""NNX building blocks of the BERT encoder: dense, embedding, LayerNorm, attention, one layer.

Layers know shapes, dtypes and logical axis names (`bert_jax.axes`), nothing else. Every
weight is an `nnx.Param` carrying `logical_axes` metadata; the sharding rules that map those
names to a device mesh live outside the model. Parameters are stored in `param_dtype`
(float32) and cast to the compute `dtype` (for example bfloat16) at use; LayerNorm statistics
and attention softmax are always computed in float32.

Randomness is explicit: dropout takes a key, there is no RNG state inside a module.

Dense layers and embedding tables may hold int8 weights (`quantization`, see `QUANTIZATION`):
the int8 values and a float scale per output channel (per row of a table), used through
`qwix`; LayerNorm, softmax and GELU stay in float, as in Q8BERT.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx, struct
from jax.sharding import PartitionSpec

from bert_jax import axes

Dtype = Any
Axes = tuple[str | None, ...]

# How Dense and Embed hold and use their weights: "none" (float, `param_dtype`); "int8"
# (int8 weights with a float scale per output channel, dequantized into the float matmul:
# a quarter of the bytes, float accuracy up to the weights' rounding); "int8-dynamic" (the
# same weights; each matmul's input is also quantized to int8, per row, as it runs, and the
# product is taken in int8 with int32 accumulation); "int8-aware" (float weights, trained
# seeing what "int8-dynamic" computes: weights and matmul inputs rounded as it rounds them in
# the forward pass, gradients passed straight through the rounding; quantization-aware
# training, as Q8BERT). Both int8 modes hold the same parameters; "int8-aware" holds none's.
QUANTIZATION = ("none", "int8", "int8-dynamic", "int8-aware")
# Q8BERT's rule: a channel's largest magnitude at 127 (qwix's absmax calibration puts it at
# 127.5, a tie whose rounding sign then decides; scaled by 127.5 / 127 it lands on 127).
WEIGHT_CALIBRATION = f"absmax,{127.5 / 127}"


def holds_int8(mode: str) -> bool:
    """Whether a quantization mode's weights are int8 values and scales (not float)."""
    return mode in ("int8", "int8-dynamic")


def quantize_weight(w: jax.Array, channelwise_axes: Sequence[int]) -> qwix.QArray:
    """Symmetric int8 with a scale per index of `channelwise_axes` (the output channels)."""
    return qwix.quantize(
        w, jnp.int8, channelwise_axes=tuple(channelwise_axes), calibration_method=WEIGHT_CALIBRATION
    )


def quantize_rows(x: jax.Array, n_features: int) -> qwix.QArray:
    """A matmul input quantized to int8 as it runs: a scale per row (per token) over the
    trailing `n_features` axes it is contracted over."""
    return qwix.quantize(x, jnp.int8, channelwise_axes=tuple(range(x.ndim - n_features)))


def straight_through(x: jax.Array, q: qwix.QArray) -> jax.Array:
    """The values `q` stands for in the forward pass, the identity's gradient backward."""
    return x + jax.lax.stop_gradient(qwix.dequantize(q).astype(x.dtype) - x)


def truncated_normal(stddev: float):
    """The original BERT initializer: a normal cut at two standard deviations, not rescaled."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * stddev).astype(
            dtype
        )

    return init


def param(value: jax.Array, logical_axes: Axes) -> nnx.Param:
    """An `nnx.Param` annotated with one logical axis name (or None) per dimension."""
    if len(logical_axes) != value.ndim:
        raise ValueError(f"{len(logical_axes)} logical axes {logical_axes} for shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(logical_axes))


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, deterministic: bool) -> jax.Array:
    """Inverted dropout; the identity when `deterministic` or `rate == 0`."""
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout needs an rng key when deterministic=False")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """`jax.nn.gelu` whose backward pass keeps one array, the derivative, from the forward.

    Differentiating `jax.nn.gelu` directly keeps every intermediate (the erf or tanh, the
    exponential, the products): four arrays of [tokens, intermediate_size] per layer, written
    in the forward pass and read in the backward. Here the forward computes the derivative in
    the same loop as the value, so the backward reads one array and multiplies.
    """
    return jax.nn.gelu(x, approximate=approximate)


@gelu.defjvp
def _gelu_jvp(approximate: bool, primals, tangents):
    (x,), (t,) = primals, tangents
    if approximate:  # 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3)
        c = math.sqrt(2.0 / math.pi)
        tanh = jnp.tanh(c * (x + 0.044715 * x**3))
        slope = 0.5 * (1.0 + tanh) + 0.5 * x * (1.0 - tanh * tanh) * c * (1.0 + 0.134145 * x * x)
    else:  # x Phi(x): Phi(x) + x phi(x)
        cdf = 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))
        slope = cdf + x * jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return jax.nn.gelu(x, approximate=approximate), t * slope.astype(t.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """`gelu` is the exact erf GELU of the original BERT; `gelu_new` the tanh approximation."""
    if name == "gelu":
        return gelu(x, False)
    if name == "gelu_new":
        return gelu(x, True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}; use 'gelu', 'gelu_new' or 'relu'")


class Dense(nnx.Module):
    """A dense layer over one or more trailing input axes into one or more output axes.

    Attention projections use it with split heads: query kernel [D, H, K], output kernel
    [H, K, D], so that the head axis can be sharded (tensor parallelism).
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        kernel_axes: Axes,
        init_std: float,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        quantization: str = "none",
    ):
        self.in_features = _as_tuple(in_features)
        self.out_features = _as_tuple(out_features)
        self.dtype = dtype
        self.quantization = _check_quantization(quantization)
        shape = self.in_features + self.out_features
        n_in = len(self.in_features)
        if not holds_int8(quantization):
            self.kernel = param(
                truncated_normal(init_std)(rngs.params(), shape, param_dtype), kernel_axes
            )
        else:  # filled by `models.quantize`; a scale per output channel
            self.qkernel = param(jnp.zeros(shape, jnp.int8), kernel_axes)
            scale_shape = (1,) * n_in + self.out_features
            scale_axes = (None,) * n_in + tuple(kernel_axes[n_in:])
            self.kernel_scale = param(jnp.ones(scale_shape, param_dtype), scale_axes)
        if use_bias:
            bias_axes = tuple(kernel_axes[len(self.in_features) :])
            self.bias = param(jnp.zeros(self.out_features, param_dtype), bias_axes)
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., *in_features] -> [..., *out_features] in the compute dtype."""
        n_in = len(self.in_features)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        x = x.astype(self.dtype)
        if not holds_int8(self.quantization):
            kernel = self.kernel[...]
            if self.quantization == "int8-aware":
                out_axes = range(n_in, kernel.ndim)
                kernel = straight_through(kernel, quantize_weight(kernel, out_axes))
                x = straight_through(x, quantize_rows(x, n_in))
            y = jax.lax.dot_general(x, kernel.astype(self.dtype), (contract, ((), ())))
        else:
            kernel = qwix.QArray(
                self.qkernel[...], self.kernel_scale[...].astype(self.dtype), qtype=jnp.int8
            )
            if self.quantization == "int8-dynamic":
                x = quantize_rows(x, n_in)
            y = qwix.dot_general(x, kernel, (contract, ((), ()))).astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """An embedding table [N, D]; `attend` is the tied output projection of the MLM decoder."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        table_axes: Axes,
        init_std: float,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        quantization: str = "none",
    ):
        self.dtype = dtype
        self.quantization = _check_quantization(quantization)
        shape = (num_embeddings, features)
        if not holds_int8(quantization):
            table = truncated_normal(init_std)(rngs.params(), shape, param_dtype)
            self.embedding = param(table, table_axes)
        else:  # filled by `models.quantize`; a scale per row
            self.qembedding = param(jnp.zeros(shape, jnp.int8), table_axes)
            self.embedding_scale = param(
                jnp.ones((num_embeddings, 1), param_dtype), (table_axes[0], None)
            )

    def _float_table(self) -> jax.Array:
        table = self.embedding[...]
        if self.quantization == "int8-aware":
            table = straight_through(table, quantize_weight(table, (0,)))
        return table

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: [...] int32 -> [..., D]."""
        if not holds_int8(self.quantization):
            return jnp.take(self._float_table(), ids, axis=0).astype(self.dtype)
        rows = jnp.take(self.qembedding[...], ids, axis=0).astype(self.dtype)
        return rows * jnp.take(self.embedding_scale[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> logits [..., N] against every row of the table."""
        if not holds_int8(self.quantization):
            table = self._float_table().astype(self.dtype)
        else:
            table = qwix.dequantize(
                qwix.QArray(
                    self.qembedding[...],
                    self.embedding_scale[...].astype(self.dtype),
                    qtype=jnp.int8,
                )
            )
        return jnp.einsum("...d,nd->...n", x.astype(self.dtype), table)


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics whatever the compute dtype (epsilon 1e-12 in BERT)."""

    def __init__(
        self,
        features: int,
        *,
        epsilon: float,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        del rngs  # Deterministic initialisation; the argument keeps the layer API uniform.
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = param(jnp.ones((features,), param_dtype), (axes.EMBED,))
        self.bias = param(jnp.zeros((features,), param_dtype), (axes.EMBED,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


ATTENTION_KERNELS = ("auto", "xla", "splash")


@struct.dataclass
class AttentionMask:
    """Which keys each query attends to, from one id per token.

    ids: [B, L] int32: 0 for padding; 1 for every real token of a row that holds one example
      (the original `input_mask`), or 1, 2, ... per example of a packed row.
    packed: static; False: every query attends to every real key (BERT's key padding mask);
      True: a token attends to the tokens of its own example only.
    """

    ids: jax.Array
    packed: bool = struct.field(pytree_node=False, default=False)

    def dense(self, query_positions: jax.Array | None = None) -> jax.Array:
        """[B, 1, 1, L] or, packed, [B, 1, Q, L] bool over (batch, heads, query, key), for
        the queries at `query_positions` [B, Q] (default: every position)."""
        ids = self.ids
        if not self.packed:
            return (ids > 0)[:, None, None, :]
        query_ids = ids if query_positions is None else gather(ids, query_positions)
        return ((query_ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] > 0))[:, None]


def gather(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, L, ...] at positions [B, Q] -> [B, Q, ...]."""
    index = positions.reshape(*positions.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)


def target_platform() -> str:
    """The platform the traced program is for: that of the active mesh's devices (under
    `jax.set_mesh`; a CPU host may build a program for TPU devices), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def uses_splash(kernel: str, length: int) -> bool:
    """Whether attention without dropout on its probabilities runs the splash kernel:
    always with "splash"; with "auto" on TPU when the length is a multiple of 128."""
    return kernel == "splash" or (
        kernel == "auto" and target_platform() == "tpu" and length % 128 == 0
    )


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array) -> jax.Array:
    """Attention through the Pallas splash kernel (blockwise, the [L, L] scores never in HBM).

    q, k, v: [B, L, H, D]; ids: [B, L] int32 segment ids (a query attends to the keys of its
    own id, so padding, id 0, attends only to padding, whose outputs nothing reads). Compiled
    for the TPU there; elsewhere the same kernel runs in Pallas's interpreter (for tests).
    Under a mesh it runs per shard (`shard_map`) over the batch and head axes of the rules.
    """
    length, head_dim = q.shape[1], q.shape[-1]
    if length % 128:
        raise ValueError(
            f"the splash attention kernel needs a sequence length divisible by 128, got {length}; "
            f"pad the inputs or use attention_kernel='xla'"
        )
    run = functools.partial(_splash_local, length=length, head_dim=head_dim)
    mesh, rules = jax.sharding.get_abstract_mesh(), axes.active_rules()
    if mesh.empty or rules is None:
        return run(q, k, v, ids)
    spec = axes.partition_spec(
        (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV), q.shape, dict(mesh.shape), rules
    )
    if spec[1] is not None or spec[3] is not None:
        raise ValueError(
            f"splash attention shards the batch and the heads only; the rules split the "
            f"sequence or the head size ({spec}); use attention_kernel='xla'"
        )
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(spec, spec, spec, PartitionSpec(spec[0], None)),
        out_specs=spec,
        check_vma=False,
    )(q, k, v, ids)


def _splash_local(q, k, v, ids, *, length: int, head_dim: int):
    """`splash_attention` on one shard's batch and heads, [B, L, H, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = min(512, length)
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([sm.FullMask((length, length)) for _ in range(q.shape[2])]),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sk.BlockSizes(
            block_q=block,
            block_kv=block,
            block_kv_compute=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        ),
        # Compiled by Mosaic for the platform the program is built for (the mesh's devices: a
        # CPU host compiling for a TPU topology emits the TPU kernel); interpreted elsewhere.
        interpret=target_platform() != "tpu",
    )
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s)))(
        *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), ids
    )
    return jnp.swapaxes(out, 1, 2)


class SelfAttention(nnx.Module):
    """Multi-head self-attention under a key padding mask, split-head projections."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        init_std: float,
        rngs: nnx.Rngs,
        head_dim: int | None = None,
        kernel: str = "auto",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        quantization: str = "none",
    ):
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r}; use one of {ATTENTION_KERNELS}")
        # A pruned layer keeps the head size of the model and fewer heads.
        head_dim = head_dim or hidden_size // num_heads
        kw = dict(
            init_std=init_std,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            quantization=quantization,
        )
        qkv_axes = (axes.EMBED, axes.HEADS, axes.KV)
        self.query = Dense(hidden_size, (num_heads, head_dim), kernel_axes=qkv_axes, **kw)
        self.key = Dense(hidden_size, (num_heads, head_dim), kernel_axes=qkv_axes, **kw)
        self.value = Dense(hidden_size, (num_heads, head_dim), kernel_axes=qkv_axes, **kw)
        self.output = Dense(
            (num_heads, head_dim), hidden_size, kernel_axes=(axes.HEADS, axes.KV, axes.EMBED), **kw
        )
        self.dtype = dtype
        self.kernel = kernel

    def __call__(
        self,
        x: jax.Array,
        mask: AttentionMask,
        *,
        probs_dropout: float = 0.0,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        return_probs: bool = False,
        head_mask: jax.Array | None = None,
        query_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Attends every position (or those at `query_positions`) to the unmasked ones.

        Args:
          x: [B, L, D] hidden states.
          mask: which keys each query sees (`AttentionMask`).
          probs_dropout: dropout rate on the attention probabilities (training only).
          rng: key for that dropout.
          deterministic: no dropout when True.
          return_probs: also return the attention probabilities [B, H, L, L] float32.
          head_mask: [H] or [B, H] float, each head's output multiplied by it (0 silences a
            head; the gradient with respect to it scores the head, Michel et al., 2019).
          query_positions: [B, Q] int32: only these positions ask (keys and values come from
            every position); None: all.

        Returns:
          ([B, L or Q, D] output, probabilities or None).
        """
        qkv_axes = (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV)
        queries = x if query_positions is None else gather(x, query_positions)
        q = axes.constrain(self.query(queries), qkv_axes)
        k, v = (axes.constrain(p(x), qkv_axes) for p in (self.key, self.value))
        dense_mask = mask.dense(query_positions)
        use_dropout = not deterministic and probs_dropout > 0.0
        if return_probs or use_dropout:
            # The explicit path: needed to return or drop out the probabilities. The fused
            # kernels below cannot do either.
            scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
            logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
            logits = jnp.where(dense_mask, logits * scale, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1)
            dropped = dropout(probs, probs_dropout, rng, deterministic)
            ctx = jnp.einsum("bhqs,bshk->bqhk", dropped.astype(self.dtype), v)
        elif query_positions is None and uses_splash(self.kernel, q.shape[1]):
            probs = None
            ctx = splash_attention(q, k, v, mask.ids)
        else:
            probs = None
            ctx = jax.nn.dot_product_attention(q, k, v, mask=dense_mask)
        if head_mask is not None:  # [H] or [B, H]
            per_example = head_mask.ndim == 2
            m = head_mask.astype(ctx.dtype)
            ctx = ctx * (m[:, None, :, None] if per_example else m[:, None])
            if probs is not None:
                probs = probs * (
                    head_mask[..., None, None] if per_example else head_mask[:, None, None]
                )
        return self.output(ctx), (probs if return_probs else None)


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
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        quantization: str = "none",
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dense = dict(init_std=init_std, quantization=quantization, **kw)
        self.attention = SelfAttention(
            hidden_size, num_heads, head_dim=head_dim, kernel=attention_kernel, **dense
        )
        self.attention_layer_norm = LayerNorm(hidden_size, epsilon=layer_norm_eps, **kw)
        self.intermediate = Dense(
            hidden_size, intermediate_size, kernel_axes=(axes.EMBED, axes.MLP), **dense
        )
        self.output = Dense(
            intermediate_size, hidden_size, kernel_axes=(axes.MLP, axes.EMBED), **dense
        )
        self.output_layer_norm = LayerNorm(hidden_size, epsilon=layer_norm_eps, **kw)
        self.hidden_act = hidden_act
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout

    def __call__(
        self,
        x: jax.Array,
        mask: AttentionMask,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        return_probs: bool = False,
        head_mask: jax.Array | None = None,
        query_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, L, D], mask: `AttentionMask`, head_mask: [H] or None -> ([B, L, D],
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
            x = gather(x, query_positions)
        x = self.attention_layer_norm(
            x + dropout(attended, self.hidden_dropout, keys[1], deterministic)
        )
        h = axes.constrain(self.intermediate(x), (axes.BATCH, axes.LENGTH, axes.MLP))
        h = self.output(activation(self.hidden_act, h))
        x = self.output_layer_norm(x + dropout(h, self.hidden_dropout, keys[2], deterministic))
        return axes.constrain(x, (axes.BATCH, axes.LENGTH, None)), probs


def _check_quantization(mode: str) -> str:
    if mode not in QUANTIZATION:
        raise ValueError(f"quantization {mode!r}; use one of {QUANTIZATION}")
    return mode


def _as_tuple(n: int | Sequence[int]) -> tuple[int, ...]:
    return (n,) if isinstance(n, int) else tuple(n)
