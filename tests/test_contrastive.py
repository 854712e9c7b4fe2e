"""Contrastive losses against sentence-transformers' own, the global batch over 8 devices, and
GradCache against differentiating the whole batch."""

import functools
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from sentence_transformers.sentence_transformer import losses as st_losses

from bert_jax import axes, models, sharding
from bert_jax.compile import aot
from bert_jax.models import pooling
from bert_jax.objectives import contrastive

PAIRS, LENGTH = 28, 16


def _embeddings(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_in_batch_negatives_equals_multiple_negatives_ranking_loss(negatives, symmetric):
    b, d = 12, 24
    anchors, *columns = _embeddings((b, d), *[(b, d)] * (1 + negatives))
    kwargs = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    reference = st_losses.MultipleNegativesRankingLoss(None, **(kwargs if symmetric else {}))
    expected = reference.compute_loss_from_embeddings(
        [torch.tensor(x) for x in (anchors, *columns)], None
    )
    loss, sums = contrastive.in_batch_negatives(
        jnp.asarray(anchors), jnp.concatenate(columns), symmetric=symmetric
    )
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(sums["loss_sum"] / sums["count"]), float(loss), rtol=1e-6)


def test_cosent_equals_sentence_transformers_cosent_with_tied_scores():
    first, second = _embeddings((16, 8), (16, 8), seed=1)
    labels = np.array([0.0, 0.2, 0.2, 1.0, 0.5, 0.5, 0.5, 0.9] * 2, np.float32)
    reference = st_losses.CoSENTLoss(None)
    expected = reference.compute_loss_from_embeddings(
        [torch.tensor(first), torch.tensor(second)], torch.tensor(labels)
    )
    loss, _ = contrastive.cosent(jnp.asarray(first), jnp.asarray(second), jnp.asarray(labels))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)


def test_matryoshka_sums_the_loss_of_each_prefix_with_its_weight():
    anchors, positives = _embeddings((8, 32), (8, 32), seed=2)
    nested = contrastive.matryoshka(contrastive.in_batch_negatives, (32, 16, 4), (1.0, 0.5, 0.25))
    loss, _ = nested(jnp.asarray(anchors), jnp.asarray(positives))
    parts = [
        contrastive.in_batch_negatives(jnp.asarray(anchors[:, :d]), jnp.asarray(positives[:, :d]))[
            0
        ]
        for d in (32, 16, 4)
    ]
    np.testing.assert_allclose(float(loss), float(parts[0] + 0.5 * parts[1] + 0.25 * parts[2]))


@functools.lru_cache(maxsize=1)
def _encoder():
    config = models.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    graphdef, params = models.split_params(models.create_model(config, 0, models.BertModel))
    return graphdef, params


def _pair_inputs(pairs=PAIRS, seed=3, length=LENGTH):
    """Anchors then positives: [2 * pairs, length] token rows of 4 to `length` real tokens."""
    rng = np.random.default_rng(seed)
    n = 2 * pairs
    lengths = rng.integers(4, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(5, 120, (n, length)) * mask).astype(np.int32)
    return {"input_ids": ids, "input_mask": mask, "segment_ids": np.zeros_like(ids)}


def _embed(graphdef, dropout: bool):
    def embed(params, inputs, rng):
        model = models.merge_params(graphdef, params)
        out = model(
            inputs["input_ids"], inputs["input_mask"], inputs["segment_ids"],
            rng=rng, deterministic=not dropout,
        )  # fmt: skip
        return pooling.pool(out.sequence_output, inputs["input_mask"], ("mean",))

    return embed


def _pair_loss(embeddings):
    half = embeddings.shape[0] // 2
    return contrastive.in_batch_negatives(embeddings[:half], embeddings[half:])


def test_the_loss_over_8_devices_is_the_loss_over_the_whole_global_batch():
    """Tokens split over 8 devices (each holds 7 of 56 rows), parameters replicated: loss and
    gradients equal one device's over the whole batch, so every anchor met all 27 other
    positives as negatives, not the 3 of its own device."""
    graphdef, params = _encoder()
    embed = _embed(graphdef, dropout=False)
    inputs = _pair_inputs()

    def value_and_grad(params, inputs):
        return jax.value_and_grad(lambda p: _pair_loss(embed(p, inputs, None)), has_aux=True)(
            params
        )

    (single, _), single_grads = jax.jit(value_and_grad)(params, inputs)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    with jax.set_mesh(mesh), axes.axis_rules(sharding.MeshConfig.rules):
        split = NamedSharding(mesh, PartitionSpec("data"))
        spread = {k: jax.device_put(v, split) for k, v in inputs.items()}  # 7 rows a device
        assert len(spread["input_ids"].sharding.device_set) == 8
        (loss, _), grads = jax.jit(value_and_grad)(params, spread)
    np.testing.assert_allclose(float(loss), float(single), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(single_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_the_loss_over_two_processes_is_the_loss_over_the_whole_global_batch(tmp_path):
    """Two processes of 4 CPU devices, joined through jax.distributed, one holding the
    anchors and the other the positives: every anchor still meets all 27 other positives,
    so loss and gradients equal one device's over the whole batch."""
    graphdef, params = _encoder()
    embed = _embed(graphdef, dropout=False)
    inputs = _pair_inputs()
    (single, _), single_grads = jax.jit(
        jax.value_and_grad(lambda p: _pair_loss(embed(p, inputs, None)), has_aux=True)
    )(params)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "contrastive_process.py")
    out = tmp_path / "two.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(port), str(i), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    two = np.load(out)
    np.testing.assert_allclose(float(two["loss"]), float(single), rtol=1e-6)
    leaves = jax.tree.leaves(single_grads)
    assert len(two.files) == len(leaves) + 1
    for i, want in enumerate(leaves):
        np.testing.assert_allclose(two[f"grad_{i}"], np.asarray(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 7, 2 * PAIRS])
def test_grad_cache_gradients_equal_the_whole_batch_s(chunk_size):
    graphdef, params = _encoder()
    embed = _embed(graphdef, dropout=False)
    inputs = _pair_inputs()
    rng = jax.random.key(0)
    (want, _), want_grads = jax.jit(
        jax.value_and_grad(lambda p: _pair_loss(embed(p, inputs, None)), has_aux=True)
    )(params)
    (got, _), grads = jax.jit(
        lambda p: contrastive.grad_cache(embed, _pair_loss, p, inputs, rng, chunk_size)
    )(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def test_grad_cache_per_replica_on_8_devices_equals_the_whole_batch_s():
    """Each of 8 replicas differentiating its own rows of every chunk (one gradient sum
    across replicas at the end): the whole batch's loss and gradients, and the compiled
    program sums the gradient across devices once, not once per chunk."""
    graphdef, params = _encoder()
    embed = _embed(graphdef, dropout=False)
    inputs = _pair_inputs()
    (want, _), want_grads = jax.jit(
        jax.value_and_grad(lambda p: _pair_loss(embed(p, inputs, None)), has_aux=True)
    )(params)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))

    def step(p, x, replicas):
        return contrastive.grad_cache(
            embed, _pair_loss, p, x, jax.random.key(0), 8, replicas=replicas,
            spmd_axis_name="data" if replicas > 1 else None,
        )  # fmt: skip

    with jax.set_mesh(mesh):
        spread = {
            k: jax.device_put(v, NamedSharding(mesh, PartitionSpec("data")))
            for k, v in inputs.items()
        }
        (got, _), grads = jax.jit(step, static_argnums=2)(params, spread, 8)
        hlo = {r: jax.jit(step, static_argnums=2).lower(params, spread, r).compile().as_text()
               for r in (1, 8)}  # fmt: skip
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)
    # Per step (loops weighted by their trip counts): 7 chunks' gradients summed across the
    # devices in each chunk without replicas, once with them.
    summed = {r: aot.count_collectives(text)["all-reduce"] for r, text in hlo.items()}
    assert summed[8].bytes < summed[1].bytes / 3, summed


def test_grad_cache_with_dropout_uses_each_chunk_s_key_in_both_passes():
    """With dropout, the gradients equal differentiating the whole batch embedded chunk by
    chunk with the keys GradCache gives each chunk (one replica: fold_in(fold_in(rng, c),
    0)): the second pass drew the same masks as the first."""
    graphdef, params = _encoder()
    embed = _embed(graphdef, dropout=True)
    inputs = _pair_inputs()
    rng, chunk = jax.random.key(1), 14

    chunks = 2 * PAIRS // chunk

    def whole(p):  # chunk c: rows c, c + chunks, ...; the rows put back in order
        parts = [
            embed(
                p,
                {k: v[c::chunks] for k, v in inputs.items()},
                jax.random.fold_in(jax.random.fold_in(rng, c), 0),  # replica 0 of chunk c
            )
            for c in range(chunks)
        ]
        return _pair_loss(jnp.stack(parts, axis=1).reshape(2 * PAIRS, -1))

    (want, _), want_grads = jax.jit(jax.value_and_grad(whole, has_aux=True))(params)
    (got, _), grads = jax.jit(
        lambda p: contrastive.grad_cache(embed, _pair_loss, p, inputs, rng, chunk)
    )(params)
    deterministic = _embed(graphdef, dropout=False)
    plain, _ = jax.jit(lambda p: _pair_loss(deterministic(p, inputs, None)))(params)
    assert abs(float(want) - float(plain)) > 1e-4  # dropout was on
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def _temp_bytes(pairs: int, chunk_size: int | None) -> int:
    graphdef, params = _encoder()
    embed = _embed(graphdef, dropout=False)
    inputs = _pair_inputs(pairs, length=64)
    if chunk_size is None:
        step = jax.value_and_grad(lambda p, x: _pair_loss(embed(p, x, None)), has_aux=True)
    else:

        def step(p, x):
            return contrastive.grad_cache(embed, _pair_loss, p, x, jax.random.key(0), chunk_size)

    compiled = jax.jit(step).lower(params, inputs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_grad_cache_memory_stays_flat_as_the_batch_grows_8x_and_grows_without_it():
    """The compiled step's temporary memory (XLA's figure) at 64 and 512 pairs of 64 tokens:
    without GradCache the activations of every row are kept (about 8x); with chunks of 16
    rows only one chunk's are, plus the [N, D] embeddings and the [B, B] scores."""
    plain = _temp_bytes(64, None), _temp_bytes(512, None)
    cached = _temp_bytes(64, 16), _temp_bytes(512, 16)
    assert plain[1] > 6 * plain[0], plain
    assert cached[1] < 2 * cached[0], cached
    assert cached[1] < plain[1] / 4, (cached, plain)
