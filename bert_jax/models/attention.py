"""Self-attention: which keys each query sees (`AttentionMask`), the kernels that compute it
(XLA's fused attention, the Pallas splash kernel, the explicit path that returns or drops out
the probabilities) and the multi-head layer with split-head projections."""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec

from bert_jax import axes
from bert_jax.models import flash_dropout
from bert_jax.models.layers import Dense, Dtype, dropout

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

    def near(self, window: int, query_positions: jax.Array | None = None) -> jax.Array:
        """[1 or B, 1, Q, L] bool: keys at most window // 2 positions from the query (the
        local layers of ModernBERT; both sides, its own token included)."""
        keys = jnp.arange(self.ids.shape[1])
        queries = keys[None] if query_positions is None else query_positions
        return (jnp.abs(queries[:, :, None] - keys[None, None, :]) <= window // 2)[:, None]


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, ...]:
    """(cos, sin) [B or 1, L, K] float32 of rotary position embeddings (Su et al., 2021) at
    `positions` [B or 1, L], the frequencies theta^(-2i/K) repeated over the two halves of a
    head (the rotate-half layout of GPT-NeoX and ModernBERT)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """x [B, L, H, K] rotated by its positions' angles, in float32, back to x's dtype."""
    cos, sin = (t[:, :, None, :] for t in tables)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def gather(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, L, ...] at positions [B, Q] -> [B, Q, ...]."""
    index = positions.reshape(*positions.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)


def target_platform() -> str:
    """The platform the traced program is for: that of the active mesh's devices (under
    `jax.set_mesh`; a CPU host may build a program for TPU devices), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def fused_kernel(
    kernel: str, length: int, dropout: bool, platform: str | None = None, window: int = 0
) -> str:
    """Which kernel runs a layer's attention over all its queries: "splash" (the Pallas splash
    kernel, no dropout on the probabilities, full or local masks), "flash_dropout" (bert_jax's
    Pallas kernel that drops them out, `flash_dropout`; no local window) or "xla". `kernel`
    "splash" asks for the Pallas kernels anywhere (interpreted off TPU); "auto" picks them on
    TPU at lengths divisible by 128."""
    platform = platform or target_platform()
    if kernel == "splash" or (kernel == "auto" and platform == "tpu" and length % 128 == 0):
        if not dropout:
            return "splash"
        return "xla" if window else "flash_dropout"
    return "xla"


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array, window: int = 0
) -> jax.Array:
    """Attention through the Pallas splash kernel (blockwise, the [L, L] scores never in HBM).

    q, k, v: [B, L, H, D]; ids: [B, L] int32 segment ids (a query attends to the keys of its
    own id, so padding, id 0, attends only to padding, whose outputs nothing reads); window:
    0, or a local window (`AttentionMask.near`), whose blocks out of reach are skipped. Compiled
    for the TPU there; elsewhere the same kernel runs in Pallas's interpreter (for tests).
    Under a mesh it runs per shard (`shard_map`) over the batch and head axes of the rules.
    """
    length, head_dim = q.shape[1], q.shape[-1]
    if length % 128:
        raise ValueError(
            f"the splash attention kernel needs a sequence length divisible by 128, got {length}; "
            f"pad the inputs or use attention_kernel='xla'"
        )
    run = functools.partial(_splash_local, length=length, head_dim=head_dim, window=window)
    return _per_shard(run, q, k, v, ids)


def dropout_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, rate: float, rng: jax.Array
) -> jax.Array:
    """Attention with dropout on its probabilities through the Pallas flash-dropout kernel:
    q, k, v [B, L, H, D] -> [B, L, H, D]; the mask is `flash_dropout.keep_mask` of the
    (example, head) words `rng` draws, as the XLA path's. Compiled by Mosaic for the TPU,
    interpreted elsewhere; per shard of the batch and heads under a mesh."""
    keys = flash_dropout.head_keys(rng, q.shape[0], q.shape[2])

    def run(q, k, v, ids, keys):
        out = flash_dropout.flash_dropout_attention(
            *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)),
            ids,
            keys,
            rate=rate,
            packed=mask.packed,
            interpret=target_platform() != "tpu",
        )
        return jnp.swapaxes(out, 1, 2)

    return _per_shard(run, q, k, v, mask.ids, keys)


def _per_shard(run, q, k, v, ids, keys=None) -> jax.Array:
    """`run(q, k, v, ids[, keys])` on each shard's batch and heads under the active mesh and
    rules ([B, L, H, D] inputs, ids [B, L], keys [2, B, H]), or whole without a mesh."""
    args = [q, k, v, ids] + [keys] * (keys is not None)
    mesh, rules = jax.sharding.get_abstract_mesh(), axes.active_rules()
    if mesh.empty or rules is None:
        return run(*args)
    spec = axes.partition_spec(
        (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV), q.shape, dict(mesh.shape), rules
    )
    if spec[1] is not None or spec[3] is not None:
        raise ValueError(
            f"the Pallas attention kernels shard the batch and the heads only; the rules split "
            f"the sequence or the head size ({spec}); use attention_kernel='xla'"
        )
    specs = [spec, spec, spec, PartitionSpec(spec[0], None), PartitionSpec(None, spec[0], spec[2])]
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=tuple(specs[: len(args)]),
        out_specs=spec,
        check_vma=False,
    )(*args)


def _splash_local(q, k, v, ids, *, length: int, head_dim: int, window: int):
    """`splash_attention` on one shard's batch and heads, [B, L, H, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = min(512, length)
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask(
            [
                sm.LocalMask((length, length), (window // 2, window // 2), offset=0)
                if window
                else sm.FullMask((length, length))
                for _ in range(q.shape[2])
            ]
        ),
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


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    *,
    kernel: str = "auto",
    query_positions: jax.Array | None = None,
    window: int = 0,
    is_local: jax.Array | bool = False,
    probs_dropout: float = 0.0,
    rng: jax.Array | None = None,
    deterministic: bool = True,
    return_probs: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """q [B, Q, H, K], k, v [B, L, H, K] -> (context [B, Q, H, K], probabilities [B, H, Q, L]
    float32 or None), by the explicit path (to return or drop out the probabilities), the
    splash kernel or XLA's fused attention; arguments as `SelfAttention`'s."""
    use_dropout = not deterministic and probs_dropout > 0.0
    if use_dropout and rng is None:
        raise ValueError("dropout needs an rng key when deterministic=False")
    fused = fused_kernel(kernel, q.shape[1], use_dropout, window=window)
    # A run whose layers drop out in the flash-dropout kernel draws the kernel's hashed mask
    # where it attends by XLA too (the last layer's masked positions); a run on XLA attention
    # keeps jax.random's masks, as before the kernel (resumed runs train on as they did).
    hashed = fused == "flash_dropout"
    if return_probs or query_positions is not None:
        fused = "xla"  # the kernels attend every query and return no probabilities
    if fused == "flash_dropout":
        ctx = dropout_attention(q, k, v, mask, probs_dropout, rng)
    elif fused == "splash":
        ctx = _splash_layer(q, k, v, mask.ids, window, is_local)
    else:
        dense_mask = mask.dense(query_positions)
        if window:
            far = jnp.logical_not(mask.near(window, query_positions))
            dense_mask = dense_mask & jnp.logical_not(far & jnp.asarray(is_local))
        if not (use_dropout or return_probs):
            return jax.nn.dot_product_attention(q, k, v, mask=dense_mask), None
        # The explicit path: it returns the probabilities, or drops them out.
        scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(dense_mask, logits * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        if use_dropout and hashed:
            keys = flash_dropout.head_keys(rng, q.shape[0], q.shape[2])
            keep = flash_dropout.keep_mask(keys, k.shape[1], probs_dropout, query_positions)
            dropped = jnp.where(keep, probs / (1.0 - probs_dropout), 0.0)
        else:
            dropped = dropout(probs, probs_dropout, rng, deterministic)
        ctx = jnp.einsum("bhqs,bshk->bqhk", dropped.astype(v.dtype), v)
        return ctx, probs if return_probs else None
    return ctx, None


class SelfAttention(nnx.Module):
    """Multi-head self-attention under an `AttentionMask`, split-head projections ([D, H, K]
    query, key and value kernels, or one fused [D, 3, H, K] kernel as ModernBERT's `Wqkv`)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        init_std: float,
        rngs: nnx.Rngs,
        head_dim: int | None = None,
        kernel: str = "auto",
        fused_qkv: bool = False,
        use_bias: bool = True,
        out_init_std: float | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        quantization: str = "none",
    ):
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r}; use one of {ATTENTION_KERNELS}")
        # A pruned layer keeps the head size of the model and fewer heads.
        head_dim = head_dim or hidden_size // num_heads
        kw = dict(
            rngs=rngs,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            quantization=quantization,
        )
        heads = (num_heads, head_dim)
        if fused_qkv:
            self.qkv = Dense(
                hidden_size,
                (3, *heads),
                kernel_axes=(axes.EMBED, None, axes.HEADS, axes.KV),
                init_std=init_std,
                **kw,
            )
        else:
            qkv_axes = (axes.EMBED, axes.HEADS, axes.KV)
            self.query, self.key, self.value = (
                Dense(hidden_size, heads, kernel_axes=qkv_axes, init_std=init_std, **kw)
                for _ in range(3)
            )
        self.output = Dense(
            heads,
            hidden_size,
            kernel_axes=(axes.HEADS, axes.KV, axes.EMBED),
            init_std=out_init_std or init_std,
            **kw,
        )
        self.fused_qkv = fused_qkv
        self.kernel = kernel

    def _project(self, x: jax.Array, queries: jax.Array) -> tuple[jax.Array, ...]:
        if not self.fused_qkv:
            return self.query(queries), self.key(x), self.value(x)
        qkv = self.qkv(x)  # [B, L, 3, H, K]
        q = qkv[:, :, 0] if queries is x else self.qkv(queries)[:, :, 0]
        return q, qkv[:, :, 1], qkv[:, :, 2]

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
        rotary: tuple[jax.Array, jax.Array] | None = None,
        window: int = 0,
        is_local: jax.Array | bool = False,
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
          rotary: (cos, sin) [B or 1, L, K] (`rotary_tables`) rotating queries and keys.
          window, is_local: with `is_local` (a bool, or traced per layer of a scanned stack)
            keys further than window // 2 from the query are masked (`AttentionMask.near`).

        Returns:
          ([B, L or Q, D] output, probabilities or None).
        """
        qkv_axes = (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV)
        queries = x if query_positions is None else gather(x, query_positions)
        q, k, v = (axes.constrain(p, qkv_axes) for p in self._project(x, queries))
        if rotary is not None:
            q_tables = (
                rotary if query_positions is None else [gather(t, query_positions) for t in rotary]
            )
            q, k = rotate(q, q_tables), rotate(k, rotary)
        ctx, probs = attend(
            q,
            k,
            v,
            mask,
            kernel=self.kernel,
            query_positions=query_positions,
            window=window,
            is_local=is_local,
            probs_dropout=probs_dropout,
            rng=rng,
            deterministic=deterministic,
            return_probs=return_probs,
        )
        if head_mask is not None:  # [H] or [B, H]
            per_example = head_mask.ndim == 2
            m = head_mask.astype(ctx.dtype)
            ctx = ctx * (m[:, None, :, None] if per_example else m[:, None])
            if probs is not None:
                probs = probs * (
                    head_mask[..., None, None] if per_example else head_mask[:, None, None]
                )
        return self.output(ctx), (probs if return_probs else None)


def _splash_layer(q, k, v, ids, window: int, is_local) -> jax.Array:
    """Splash attention, local where `is_local` says (static, or traced per layer of a scan:
    both kernels are in the program and the layer's flag picks one)."""
    if not window or is_local is False:
        return splash_attention(q, k, v, ids)
    if is_local is True:
        return splash_attention(q, k, v, ids, window)
    return jax.lax.cond(
        is_local,
        lambda: splash_attention(q, k, v, ids, window),
        lambda: splash_attention(q, k, v, ids),
    )
