"""Flash attention with dropout on the probabilities: a Pallas kernel (forward and backward)
for training with BERT's recipe on TPU, where splash cannot drop out probabilities.

The kernel is blocked over queries and keys as flash attention is (Dao, 2023): the
[L, L] scores, probabilities and dropout mask exist one [block_q, block_k] tile at a time,
in VMEM, and the backward pass recomputes them from the queries, keys and the row's
log-sum-exp instead of reading them from HBM.

The dropout mask is a counter-based hash, not a stored array: the probability of query i on
key j in head h of example b is kept when

    lowbias32(lowbias32(i * L + j + k1[b, h]) ^ k2[b, h]) >>> 1  <  keep * 2**31

with k1, k2 two 32-bit words per (example, head) drawn by `jax.random` from the layer's
dropout key (which folds in the step and the layer), and lowbias32 Chris Wellons' 32-bit
integer hash (two multiplies, three xor-shifts). The forward and both backward kernels
regenerate the same bits tile by tile, and `keep_mask` draws them for the whole [B, H, L, L]
in plain JAX: where a run on the kernel attends by XLA (the last layer's masked positions) it
drops out with that mask, and the tests compare the kernel with XLA's attention given it.

The hash is integer arithmetic in int32 (a multiply wraps as on uint32; logical right
shifts), which Mosaic compiles for the TPU's vector units and Pallas's interpreter runs on
CPU (tests).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # the TPU vector register's lanes: row statistics are kept broadcast over them
SUBLANES = 8
MASK_VALUE = float(np.finfo(np.float32).min)  # as the XLA path masks
_SMEM = dict(memory_space=pltpu.SMEM)
_M1 = np.int32(0x7FEB352D)
_M2 = np.array(0x846CA68B, np.uint32).view(np.int32)[()]
_TRANS_B = (((1,), (1,)), ((), ()))  # x @ y.T
_TRANS_A = (((0,), (0,)), ((), ()))  # x.T @ y


def _lowbias32(x: jax.Array) -> jax.Array:
    """Wellons' lowbias32 on int32 bits (a bijection of the 32-bit words)."""
    shift = jax.lax.shift_right_logical
    x = x ^ shift(x, jnp.int32(16))
    x = x * _M1
    x = x ^ shift(x, jnp.int32(15))
    x = x * _M2
    return x ^ shift(x, jnp.int32(16))


def _keep_bits(counter: jax.Array, k1: jax.Array, k2: jax.Array, threshold: int) -> jax.Array:
    """Whether each position (`counter` = query * L + key) is kept under the keys k1, k2."""
    bits = _lowbias32(_lowbias32(counter + k1) ^ k2)
    return jax.lax.shift_right_logical(bits, jnp.int32(1)) < jnp.int32(threshold)


def _threshold(rate: float) -> int:
    return int(round((1.0 - rate) * 2**31))


def head_keys(rng: jax.Array, batch: int, heads: int) -> jax.Array:
    """[2, B, H] int32: the two words of each (example, head) mask, from a dropout key."""
    bits = jax.random.bits(rng, (2, batch, heads), jnp.uint32)
    return jax.lax.bitcast_convert_type(bits, jnp.int32)


def keep_mask(
    keys: jax.Array, length: int, rate: float, query_positions: jax.Array | None = None
) -> jax.Array:
    """[B, H, Q, L] bool: which probabilities survive dropout at `rate`, in plain JAX, for the
    queries at `query_positions` [B, Q] (default: all L); the kernel draws the same bits tile
    by tile. keys: [2, B, H] (`head_keys`)."""
    if query_positions is None:
        query_positions = jnp.arange(length, dtype=jnp.int32)[None]
    cols = jnp.arange(length, dtype=jnp.int32)
    counter = query_positions.astype(jnp.int32)[:, None, :, None] * length + cols
    k1, k2 = (k[:, :, None, None] for k in keys)
    return _keep_bits(counter, k1, k2, _threshold(rate))


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """A [rows, 128] lane-broadcast statistic as [rows, n]."""
    if n <= LANES:
        return x[:, :n]
    return jnp.tile(x, (1, n // LANES))


def _tile_mask(qid_ref, kid_ref, keys_ref, qi, ki, rate: float, length: int):
    """The (valid, keep) [block_q, block_k] bool of query block `qi` against key block `ki`:
    valid where the query may see the key (same id, the key not padding), keep where dropout
    keeps the probability."""
    h = pl.program_id(1)
    q_ids = qid_ref[...][:, :1]  # [block_q, 1]
    k_ids = kid_ref[...][:1, :]  # [1, block_k]
    valid = (q_ids == k_ids) & (k_ids != 0)
    tile = (q_ids.shape[0], k_ids.shape[1])
    rows = jax.lax.broadcasted_iota(jnp.int32, tile, 0) + qi * tile[0]
    cols = jax.lax.broadcasted_iota(jnp.int32, tile, 1) + ki * tile[1]
    keep = _keep_bits(rows * length + cols, keys_ref[0, h], keys_ref[1, h], _threshold(rate))
    return valid, keep


def _fwd_kernel(keys_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, o_ref, lse_ref, m_sc, l_sc,
                acc_sc, *, scale: float, rate: float, length: int):  # fmt: skip
    qi, ki = pl.program_id(2), pl.program_id(3)
    block_k, head_dim = k_ref.shape[0], q_ref.shape[1]

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = jax.lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32) * scale
    valid, keep = _tile_mask(qid_ref, kid_ref, keys_ref, qi, ki, rate, length)
    s = jnp.where(valid, s, MASK_VALUE)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [block_q, 128]
    p = jnp.exp(s - _lanes(m_next, block_k))
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_next
    dropped = jnp.where(keep, p, 0.0).astype(v.dtype)
    pv = jax.lax.dot(dropped, v, preferred_element_type=jnp.float32)
    acc_sc[...] = acc_sc[...] * _lanes(alpha, head_dim) + pv

    @pl.when(ki == pl.num_programs(3) - 1)
    def _store():
        total = l_sc[...]
        inverse = 1.0 / ((1.0 - rate) * total)
        o_ref[...] = (acc_sc[...] * _lanes(inverse, head_dim)).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(total)


def _probabilities(q, k, lse, valid, scale: float, block_k: int, length: int):
    """The tile's probabilities from the row's log-sum-exp. A row with no key to see (a
    packed row's padding) spreads evenly over every key, as the softmax of masked scores
    does: its forward saw exp(0) = 1 per key, and its lse is MASK_VALUE (log L absorbed)."""
    s = jax.lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(jnp.where(valid, s, MASK_VALUE) - _lanes(lse, block_k))
    return jnp.where(_lanes(lse, block_k) <= 0.5 * MASK_VALUE, 1.0 / length, p)


def _score_grads(p, keep, valid, do, v, di, rate: float, block_k: int):
    """(dropped probabilities, dS) of a tile: dS = P * (dP - D), zero where masked."""
    dp = jax.lax.dot_general(do, v, _TRANS_B, preferred_element_type=jnp.float32)
    dp = jnp.where(keep, dp, 0.0) * (1.0 / (1.0 - rate))
    ds = jnp.where(valid, p * (dp - _lanes(di, block_k)), 0.0)
    return jnp.where(keep, p, 0.0) * (1.0 / (1.0 - rate)), ds


def _dkv_kernel(keys_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, lse_ref, di_ref, do_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, scale: float, rate: float,
                length: int):  # fmt: skip
    ki, qi = pl.program_id(2), pl.program_id(3)
    block_k = k_ref.shape[0]

    @pl.when(qi == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    valid, keep = _tile_mask(qid_ref, kid_ref, keys_ref, qi, ki, rate, length)
    p = _probabilities(q, k, lse_ref[...], valid, scale, block_k, length)
    dropped, ds = _score_grads(p, keep, valid, do, v, di_ref[...], rate, block_k)
    dv_sc[...] += jax.lax.dot_general(
        dropped.astype(do.dtype), do, _TRANS_A, preferred_element_type=jnp.float32
    )
    dk_sc[...] += jax.lax.dot_general(
        ds.astype(q.dtype), q, _TRANS_A, preferred_element_type=jnp.float32
    )

    @pl.when(qi == pl.num_programs(3) - 1)
    def _store():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(keys_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, lse_ref, di_ref, do_ref, dq_ref,
               dq_sc, *, scale: float, rate: float, length: int):  # fmt: skip
    qi, ki = pl.program_id(2), pl.program_id(3)
    block_k = k_ref.shape[0]

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    valid, keep = _tile_mask(qid_ref, kid_ref, keys_ref, qi, ki, rate, length)
    p = _probabilities(q, k, lse_ref[...], valid, scale, block_k, length)
    _, ds = _score_grads(p, keep, valid, do, v, di_ref[...], rate, block_k)
    dq_sc[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(ki == pl.num_programs(3) - 1)
    def _store():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


class _Specs:
    """Block specs over the grid (batch, head, outer block, inner block) of one kernel; `kv_outer`:
    the key blocks are the outer axis (the dK/dV kernel), else the query blocks are."""

    def __init__(self, block_q: int, block_k: int, head_dim: int, heads: int, kv_outer: bool):
        def qmap(b, h, i, j):
            return (b, h, j if kv_outer else i, 0)

        def kmap(b, h, i, j):
            return (b, h, i if kv_outer else j, 0)

        # The example's mask words [2, H] in SMEM, a block per grid step, not the whole
        # [B, 2, H] array prefetched (which overflows SMEM at large batches).
        self.keys = pl.BlockSpec((None, 2, heads), lambda b, h, i, j: (b, 0, 0), **_SMEM)
        self.q = pl.BlockSpec((None, None, block_q, head_dim), qmap)
        self.k = pl.BlockSpec((None, None, block_k, head_dim), kmap)
        self.row = pl.BlockSpec((None, None, block_q, LANES), qmap)  # lse, D
        self.q_ids = pl.BlockSpec(
            (None, block_q, LANES), lambda b, h, i, j: (b, j if kv_outer else i, 0)
        )
        self.k_ids = pl.BlockSpec(
            (None, SUBLANES, block_k), lambda b, h, i, j: (b, 0, i if kv_outer else j)
        )


def _call(name, kernel, grid, in_specs, out_specs, out_shape, scratch, interpret: bool):
    return pl.pallas_call(
        kernel,
        name=name,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )


def _blocks(length: int, block: int) -> int:
    block = min(block, length)
    if length % block or block % LANES:
        raise ValueError(
            f"the flash-dropout kernel needs a sequence length divisible by {LANES}, got "
            f"{length}; pad the inputs or use attention_kernel='xla'"
        )
    return block


def _forward(q, k, v, q_ids, k_ids, keys, *, rate, scale, block, interpret):
    batch, heads, length, head_dim = q.shape
    bq = bk = _blocks(length, block)
    specs = _Specs(bq, bk, head_dim, heads, kv_outer=False)
    kernel = functools.partial(_fwd_kernel, scale=scale, rate=rate, length=length)
    out, lse = _call(
        "flash_dropout_fwd",
        kernel,
        (batch, heads, length // bq, length // bk),
        [specs.keys, specs.q, specs.k, specs.k, specs.q_ids, specs.k_ids],
        [specs.q, specs.row],
        [
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, length, LANES), jnp.float32),
        ],
        [pltpu.VMEM((bq, LANES), jnp.float32)] * 2 + [pltpu.VMEM((bq, head_dim), jnp.float32)],
        interpret,
    )(keys, q, k, v, q_ids, k_ids)
    return out, lse[..., 0]


def _backward(q, k, v, q_ids, k_ids, keys, out, lse, do, *, rate, scale, block, interpret):
    batch, heads, length, head_dim = q.shape
    bq = bk = _blocks(length, block)
    di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    rows = [jnp.broadcast_to(x[..., None], (*x.shape, LANES)) for x in (lse, di)]
    f32 = functools.partial(pltpu.VMEM, dtype=jnp.float32)
    kw = dict(scale=scale, rate=rate, length=length)
    s = _Specs(bq, bk, head_dim, heads, kv_outer=True)
    dk, dv = _call(
        "flash_dropout_dkv",
        functools.partial(_dkv_kernel, **kw),
        (batch, heads, length // bk, length // bq),
        [s.keys, s.q, s.k, s.k, s.q_ids, s.k_ids, s.row, s.row, s.q],
        [s.k, s.k],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [f32((bk, head_dim)), f32((bk, head_dim))],
        interpret,
    )(keys, q, k, v, q_ids, k_ids, *rows, do)
    s = _Specs(bq, bk, head_dim, heads, kv_outer=False)
    dq = _call(
        "flash_dropout_dq",
        functools.partial(_dq_kernel, **kw),
        (batch, heads, length // bq, length // bk),
        [s.keys, s.q, s.k, s.k, s.q_ids, s.k_ids, s.row, s.row, s.q],
        s.q,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        [f32((bq, head_dim))],
        interpret,
    )(keys, q, k, v, q_ids, k_ids, *rows, do)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, k, v, q_ids, k_ids, keys, rate, scale, block, interpret):
    return _forward(
        q, k, v, q_ids, k_ids, keys, rate=rate, scale=scale, block=block, interpret=interpret
    )[0]


def _attention_fwd(q, k, v, q_ids, k_ids, keys, rate, scale, block, interpret):
    out, lse = _forward(
        q, k, v, q_ids, k_ids, keys, rate=rate, scale=scale, block=block, interpret=interpret
    )
    return out, (q, k, v, q_ids, k_ids, keys, out, lse)


def _attention_bwd(rate, scale, block, interpret, residuals, do):
    q, k, v, q_ids, k_ids, keys, out, lse = residuals
    dq, dk, dv = _backward(
        q, k, v, q_ids, k_ids, keys, out, lse, do,
        rate=rate, scale=scale, block=block, interpret=interpret,
    )  # fmt: skip
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_dropout_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ids: jax.Array,
    keys: jax.Array,
    *,
    rate: float,
    packed: bool,
    block: int = 512,
    interpret: bool = False,
) -> jax.Array:
    """softmax(q k^T / sqrt(D), masked) with dropout at `rate`, times v; differentiable.

    q, k, v: [B, H, L, D] (bf16 or float32; float32 accumulation); ids: [B, L] int32, 0 for
    padding (`AttentionMask.ids`); packed: a query sees the keys of its own id only, else every
    real key; keys: [2, B, H] int32 (`head_keys`). L must be a multiple of 128; blocks of
    min(`block`, L) queries and keys. The probabilities are those of
    `keep_mask(keys, L, rate)` scaled by 1 / (1 - rate), as the XLA path drops them out.
    """
    batch, _, length, head_dim = q.shape
    real = (ids != 0).astype(jnp.int32)
    q_ids = ids if packed else jnp.ones_like(ids)
    k_ids = ids if packed else real
    q_ids = jnp.broadcast_to(q_ids[:, :, None], (batch, length, LANES))
    k_ids = jnp.broadcast_to(k_ids[:, None, :], (batch, SUBLANES, length))
    scale = 1.0 / float(np.sqrt(head_dim))
    keys = jnp.moveaxis(keys, 0, 1)  # [B, 2, H]: an example's words per grid step
    return _attention(q, k, v, q_ids, k_ids, keys, rate, scale, block, interpret)
