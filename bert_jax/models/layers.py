"""NNX building blocks of the encoders: dense, embedding, LayerNorm, dropout, activations
(attention is in `attention.py`, the layers built of them with their encoders).

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
from flax import nnx

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


def _unrolled_threefry_on_cpu() -> None:
    """Has XLA:CPU compute Threefry (the bits of every dropout mask) unrolled, as GPU and TPU
    do: JAX lowers it for the CPU as a loop of five rounds, which XLA:CPU runs as a `while`
    whose every trip copies the counters through memory; unrolled, the whole hash is one
    elementwise fusion, 7x faster on a mask of [7, 12, 128, 128] (the same bits: only the
    program's form changes). Left as JAX has it where a JAX version moves these names."""
    try:
        from jax._src.random import threefry2x32
        from jax.extend.random import threefry2x32_p
        from jax.interpreters import mlir

        rule = threefry2x32._threefry2x32_lowering_rule
    except (ImportError, AttributeError):
        return
    mlir.register_lowering(threefry2x32_p, rule, platform="cpu")


_unrolled_threefry_on_cpu()


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
        use_bias: bool = True,
    ):
        del rngs  # Deterministic initialisation; the argument keeps the layer API uniform.
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = param(jnp.ones((features,), param_dtype), (axes.EMBED,))
        self.bias = param(jnp.zeros((features,), param_dtype), (axes.EMBED,)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _check_quantization(mode: str) -> str:
    if mode not in QUANTIZATION:
        raise ValueError(f"quantization {mode!r}; use one of {QUANTIZATION}")
    return mode


def _as_tuple(n: int | Sequence[int]) -> tuple[int, ...]:
    return (n,) if isinstance(n, int) else tuple(n)
