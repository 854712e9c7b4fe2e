"""The flash-dropout Pallas kernel (interpreted on the CPU) against attention written out in
plain JAX given the same dropout mask; the mask against its documented hash, written here in
NumPy; its keep rate and independence; a model and its training with the kernel against XLA's
attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_training

from bert_jax import axes, models, objectives, optim, sharding, training
from bert_jax.models import attention, flash_dropout

RATE = 0.1


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """Wellons' lowbias32 on uint32 words (https://nullprogram.com/blog/2018/07/31/)."""
    x, word = x.astype(np.uint64), np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & word
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & word
    return x ^ (x >> np.uint64(16))


def _numpy_mask(keys: np.ndarray, length: int, rate: float) -> np.ndarray:
    """The module docstring's rule: query i, key j of head h in example b is kept when
    lowbias32(lowbias32(i * L + j + k1) ^ k2) >> 1 < (1 - rate) * 2**31."""
    words = keys.view(np.uint32).astype(np.uint64)
    k1, k2 = words[0][:, :, None, None], words[1][:, :, None, None]
    positions = np.arange(length, dtype=np.uint64)
    counter = positions[:, None] * np.uint64(length) + positions
    bits = _lowbias32(_lowbias32((counter + k1) & np.uint64(0xFFFFFFFF)) ^ k2)
    return (bits >> np.uint64(1)) < np.uint64(round((1 - rate) * 2**31))


def _reference(q, k, v, ids, packed, keep, rate):
    """Attention in float32 with BERT's masks and dropout on the probabilities by `keep`:
    q, k, v [B, H, L, D] -> [B, H, L, D] float32."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    real = ids[:, None, None, :] > 0
    valid = real & (ids[:, None, :, None] == ids[:, None, None, :]) if packed else real
    p = jax.nn.softmax(jnp.where(valid, s, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", jnp.where(keep, p / (1 - rate), 0.0), v)


def _ids(length: int, packed: bool) -> np.ndarray:
    """Two rows: padded (one full, one a third real) or packed (three examples and padding,
    and two examples filling the row)."""
    if not packed:
        return (np.arange(length)[None] < np.array([[length], [length // 3]])).astype(np.int32)
    a, b, c = length // 4, length // 3, length // 5
    first = [1] * a + [2] * b + [3] * c + [0] * (length - a - b - c)
    return np.array([first, [1] * (length // 2) + [2] * (length - length // 2)], np.int32)


# (length, packed, dtype, block, tolerance of outputs, of gradients): float32 to rounding;
# bf16 inputs give the kernel bf16 probabilities into its P V and dS Q, dS K matmuls (float32
# accumulation) against the reference's float32 throughout, on outputs and gradients of
# magnitude about 1.
CASES = [
    (128, False, jnp.float32, 512, 1e-5, 1e-5),
    (128, True, jnp.bfloat16, 512, 2e-2, 4e-2),
    (512, True, jnp.float32, 128, 1e-5, 1e-5),
    (512, False, jnp.bfloat16, 256, 2e-2, 4e-2),
]


@pytest.mark.parametrize(("length", "packed", "dtype", "block", "out_tol", "grad_tol"), CASES)
def test_kernel_equals_attention_with_the_same_mask(
    length, packed, dtype, block, out_tol, grad_tol
):
    """Outputs and the gradients of q, k and v, padded and packed, one tile per row and
    several (`block` under the length: the online softmax across key tiles)."""
    rng = np.random.default_rng(length + packed)
    q, k, v, do = (
        jnp.asarray(rng.normal(size=(2, 2, length, 64)), jnp.float32).astype(dtype)
        for _ in range(4)
    )
    ids = jnp.asarray(_ids(length, packed))
    keys = flash_dropout.head_keys(jax.random.key(3), 2, 2)
    keep = _numpy_mask(np.asarray(keys), length, RATE)

    def kernel(q, k, v):
        return flash_dropout.flash_dropout_attention(
            q, k, v, ids, keys, rate=RATE, packed=packed, block=block, interpret=True
        )

    out, vjp = jax.vjp(kernel, q, k, v)
    ref, ref_vjp = jax.vjp(lambda *x: _reference(*x, ids, packed, keep, RATE), q, k, v)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.float32(out), ref, atol=out_tol, rtol=0)
    for got, want in zip(vjp(do), ref_vjp(do.astype(jnp.float32)), strict=True):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.float32(got), want, atol=grad_tol, rtol=0)


def test_the_kernel_drops_out_exactly_the_documented_mask():
    """Uniform probabilities (q = 0) over one-hot values read each query's kept keys out of
    the kernel, tile by tile: they are the NumPy hash's, and `keep_mask`'s."""
    length = 256
    keys = flash_dropout.head_keys(jax.random.key(7), 1, 2)
    q = jnp.zeros((1, 2, length, length), jnp.float32)
    v = jnp.broadcast_to(jnp.eye(length), q.shape)
    out = flash_dropout.flash_dropout_attention(
        q, q, v, jnp.ones((1, length), jnp.int32), keys, rate=RATE, packed=False, block=128,
        interpret=True,
    )  # fmt: skip
    kept = np.asarray(out) * length * (1 - RATE)
    want = _numpy_mask(np.asarray(keys), length, RATE)
    np.testing.assert_allclose(kept, want.astype(np.float32), atol=1e-4)
    np.testing.assert_array_equal(flash_dropout.keep_mask(keys, length, RATE), want)
    # The masked positions of the last layer: the same bits at those queries.
    positions = jnp.asarray([[0, 5, 255]], jnp.int32)
    np.testing.assert_array_equal(
        flash_dropout.keep_mask(keys, length, RATE, positions), want[:, :, [0, 5, 255]]
    )


def test_keep_rate_and_independence():
    """Keep rate 1 - 0.1 within four standard errors over 2**24 draws; the masks of two heads,
    of neighbouring keys, and of each layer at two steps of a model uncorrelated (|r| under
    four standard errors of a correlation, 4 / sqrt(n))."""
    keys = flash_dropout.head_keys(jax.random.key(0), 4, 16)
    mask = np.asarray(flash_dropout.keep_mask(keys, 512, RATE))
    n = mask.size
    assert abs(mask.mean() - 0.9) < 4 * np.sqrt(0.9 * 0.1 / n), mask.mean()

    def corr(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    assert abs(corr(mask[:, 0], mask[:, 1])) < 4 / np.sqrt(mask[:, 0].size)
    assert abs(corr(mask[..., :-1], mask[..., 1:])) < 4 / np.sqrt(n)
    # Every layer's head keys at steps 0 and 1, as the train step derives them.
    config = models.BertConfig(
        **{**_TINY, "num_hidden_layers": 3}, attention_kernel="splash", hidden_dropout_prob=0.0
    )
    model = models.create_model(config)
    drawn = []
    real = flash_dropout.head_keys

    def spy(rng, batch, heads):
        keys = real(rng, batch, heads)
        jax.debug.callback(lambda k: drawn.append(np.asarray(k)), keys)
        return keys

    ids = np.ones((2, 128), np.int32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flash_dropout, "head_keys", spy)
        for step in range(2):
            rng = jax.random.fold_in(jax.random.key(0), step)
            model(ids, ids, 0 * ids, 0 * ids[:, :3], deterministic=False, rng=rng)
    assert len(drawn) == 6  # three layers, two steps
    masks = [np.asarray(flash_dropout.keep_mask(jnp.asarray(k), 128, RATE)) for k in drawn]
    for i in range(6):
        for j in range(i):
            assert abs(corr(masks[i], masks[j])) < 4 / np.sqrt(masks[i].size), (i, j)


_TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    type_vocab_size=2,
)


def _pretraining_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    lengths = np.array([128, 50, 9, 77, 128, 3, 64, 100])
    mask = (np.arange(128)[None] < lengths[:, None]).astype(np.int32)
    return dict(
        input_ids=(rng.integers(1, 97, (8, 128)) * mask).astype(np.int32),
        input_mask=mask,
        segment_ids=((np.arange(128)[None] >= lengths[:, None] // 2) * mask).astype(np.int32),
        masked_lm_positions=np.stack([rng.integers(0, n, 5) for n in lengths]).astype(np.int32),
        masked_lm_ids=rng.integers(0, 97, (8, 5)).astype(np.int32),
        masked_lm_weights=np.ones((8, 5), np.float32),
        next_sentence_labels=rng.integers(0, 2, 8).astype(np.int32),
    )


def _xla_dropout_attention(q, k, v, mask, rate, rng):
    """`attention.dropout_attention` written out in plain JAX with `keep_mask`'s mask."""
    keys = flash_dropout.head_keys(rng, q.shape[0], q.shape[2])
    keep = flash_dropout.keep_mask(keys, q.shape[1], rate)
    heads_first = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
    out = _reference(*heads_first, mask.ids, mask.packed, keep, rate)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def test_model_with_the_kernel_equals_the_model_with_xla_attention_and_its_mask():
    """BERT's recipe (dropout 0.1 on hidden states and probabilities), padded rows, the
    kernel interpreted (attention_kernel "splash") against the same model with the kernel's
    call replaced by plain JAX given the same mask: the outputs and every parameter's
    gradient agree on one device, and one train step over eight devices gives the same loss,
    gradient norm and parameters."""
    fused = models.BertConfig(**_TINY, attention_kernel="splash")
    assert fused.attention_probs_dropout_prob == RATE
    batch = _pretraining_batch(np.random.default_rng(4))
    inputs = [batch[k] for k in ("input_ids", "input_mask", "segment_ids", "masked_lm_positions")]
    c = np.random.default_rng(5).normal(size=(8, 5, 97)).astype(np.float32)
    params = models.split_params(models.create_model(fused))[1]

    def grads(config):
        graph = models.split_params(models.abstract_model(config))[0]

        def f(params):
            out = models.merge_params(graph, params)(
                *inputs, deterministic=False, rng=jax.random.key(5)
            )
            return jnp.sum(out.mlm_logits * c) + jnp.sum(out.nsp_logits), out.mlm_logits

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, ours), our_grads = grads(fused)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "dropout_attention", _xla_dropout_attention)
        (_, ref), ref_grads = grads(fused)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # Float rounding only: gradients up to ~100 here agree to 1e-5 relative.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), our_grads, ref_grads
    )
    # Not vacuous: without attention dropout the gradients move by 0.17% of their norm (the
    # output embedding's dominate it at initialization), a hundred times the rounding.
    _, undropped = grads(dataclasses.replace(fused, attention_probs_dropout_prob=0.0))
    change = optax.tree.norm(jax.tree.map(jnp.subtract, undropped, ref_grads))
    assert change > 1e-3 * optax.tree.norm(ref_grads)
    # Eight devices (batch split over `data`), the kernel per shard.
    mesh = sharding.make_mesh(sharding.MeshConfig())
    results = []
    for reference in (False, True):
        trainer = training.create_trainer(
            fused, optim.OptimConfig(warmup_steps=0, total_steps=10), mesh, axes.DEFAULT_RULES
        )
        with pytest.MonkeyPatch.context() as patch, jax.set_mesh(mesh):
            if reference:
                patch.setattr(attention, "dropout_attention", _xla_dropout_attention)
            state = trainer.init(0)
            before = jax.device_get(state.params)
            state, metrics = trainer.train_step(
                state, sharding.global_batch(batch, mesh, axes.DEFAULT_RULES)
            )
            results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m_ours, p_ours), (m_ref, p_ref) = results
    assert float(m_ours["loss"]) == pytest.approx(float(m_ref["loss"]), abs=1e-5)
    assert float(m_ours["grad_norm"]) == pytest.approx(float(m_ref["grad_norm"]), rel=1e-5)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), p_ref, before)
    assert max(jax.tree.leaves(moved)) > 1e-5  # the step updated the parameters
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), p_ours, p_ref)


def _counting(n: int, seed: int) -> dict[str, np.ndarray]:
    """`tiny_training.noisy_counting`'s 24-token rows padded to 128, the kernel's unit."""
    data = tiny_training.noisy_counting(n, seed)
    pad = ((0, 0), (0, 104))
    return {k: np.pad(v, pad) if v.ndim == 2 else v for k, v in data.items()}


@pytest.mark.slow
def test_training_with_the_kernel_reaches_the_held_out_loss_of_xla_attention():
    """The counting task learned with attention dropout 0.1 by the kernel (its hashed masks)
    and by XLA's attention (jax.random's masks) over four orders of the same data, whose
    spread is the noise of a run: the kernel's held-out loss lies within three of its
    standard deviations of XLA's mean (measured: XLA 0.4505, 0.4545, 0.4626, 0.4675; the
    kernel 0.4459)."""
    train, test = _counting(1024, 0), _counting(512, 1)
    base = dataclasses.replace(
        tiny_training.config(40, 128),
        num_attention_heads=2,
        attention_probs_dropout_prob=RATE,
        attention_kernel="xla",
    )

    def held_out_loss(config, order):
        logits = tiny_training.train_and_predict(
            objectives.classification(2), config, {k: v[order] for k, v in train.items()},
            test, steps=300, learning_rate=2e-3, warmup=30, batch=16, eval_batch=256,
        )  # fmt: skip
        logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
        return -float(jnp.mean(logp[jnp.arange(len(logits)), test["label"]]))

    n = len(train["label"])
    orders = [np.arange(n), np.arange(n)[::-1]]
    orders += [np.random.default_rng(seed).permutation(n) for seed in (9, 10)]
    xla = np.array([held_out_loss(base, order) for order in orders])
    fused = held_out_loss(dataclasses.replace(base, attention_kernel="splash"), orders[0])
    print(f"held-out loss: XLA {np.round(xla, 4)}, kernel {fused:.4f}")
    assert xla.max() < 0.55 and fused < 0.55  # learned: ln 2 = 0.69; the labels' noise ~0.4
    assert abs(fused - xla.mean()) <= 3 * xla.std(ddof=1)


def test_auto_picks_the_kernel_for_training_with_dropout_on_tpu():
    assert attention.fused_kernel("auto", 512, dropout=True, platform="tpu") == "flash_dropout"
    assert attention.fused_kernel("auto", 512, dropout=False, platform="tpu") == "splash"
    assert attention.fused_kernel("auto", 500, dropout=True, platform="tpu") == "xla"
    assert attention.fused_kernel("auto", 512, dropout=True, platform="cpu") == "xla"
    assert attention.fused_kernel("xla", 512, dropout=True, platform="tpu") == "xla"
    assert attention.fused_kernel("splash", 128, dropout=True, platform="cpu") == "flash_dropout"
    # ModernBERT's local windows: splash has them, the flash-dropout kernel does not.
    assert attention.fused_kernel("auto", 512, False, "tpu", window=128) == "splash"
    assert attention.fused_kernel("auto", 512, True, "tpu", window=128) == "xla"
    with pytest.raises(ValueError, match="length divisible by 128, got 96.*attention_kernel='xla'"):
        q = jnp.zeros((1, 1, 96, 64))
        flash_dropout.flash_dropout_attention(
            q, q, q, jnp.ones((1, 96), jnp.int32), flash_dropout.head_keys(jax.random.key(0), 1, 1),
            rate=RATE, packed=False, interpret=True,
        )  # fmt: skip
