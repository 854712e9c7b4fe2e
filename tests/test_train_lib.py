"""The pretraining step: learns, accumulates gradients exactly, runs sharded over 8 devices."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from bert_jax import axes, models, optim, sharding, training

CONFIG = models.BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _batch(batch_size=8, length=16, preds=4, seed=0):
    rng = np.random.default_rng(seed)
    positions = np.stack(
        [np.sort(rng.choice(np.arange(1, length), preds, False)) for _ in range(batch_size)]
    )
    return {
        "input_ids": rng.integers(5, 64, (batch_size, length)).astype(np.int32),
        "input_mask": np.ones((batch_size, length), np.int32),
        "segment_ids": (np.arange(length)[None] >= length // 2)
        .repeat(batch_size, 0)
        .astype(np.int32),
        "masked_lm_positions": positions.astype(np.int32),
        "masked_lm_ids": rng.integers(5, 64, (batch_size, preds)).astype(np.int32),
        "masked_lm_weights": np.ones((batch_size, preds), np.float32),
        "next_sentence_labels": rng.integers(0, 2, (batch_size,)).astype(np.int32),
    }


def _trainer(mesh_config=None, **optim_kw):
    mesh = sharding.make_mesh(mesh_config or sharding.MeshConfig())
    kw = dict(learning_rate=3e-3, warmup_steps=10, total_steps=300) | optim_kw
    return training.create_trainer(CONFIG, optim.OptimConfig(**kw), mesh, axes.DEFAULT_RULES), mesh


def test_overfits_one_batch_to_near_zero_mlm_loss():
    trainer, mesh = _trainer()
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        batch = sharding.global_batch(_batch(), mesh, axes.DEFAULT_RULES)
        first = None
        for _ in range(300):
            # Synchronous steps: XLA:CPU can deadlock when many 8-device programs are queued.
            state, metrics = jax.block_until_ready(trainer.train_step(state, batch))
            if first is None:
                first = float(metrics["mlm_loss_sum"] / metrics["mlm_count"])
        final = trainer.eval_step(state.params, batch)
    assert first > 3.0  # about log(64) at the start
    assert float(final["mlm_loss_sum"] / final["mlm_count"]) < 0.05
    assert float(final["nsp_correct_sum"]) == 8.0
    assert int(state.step) == 300


@pytest.mark.parametrize(
    "mesh_config, batch_size",
    [
        (sharding.MeshConfig(), 8),  # micro-batches of 2 rows over 8 devices: shared
        (sharding.MeshConfig(), 32),  # 8 replicas, each accumulating its own rows
        (sharding.MeshConfig(data=4, fsdp=2), 32),  # 4 replicas of 2 FSDP shards
    ],
)
def test_gradient_accumulation_equals_the_full_batch(mesh_config, batch_size):
    from bert_jax.compile import aot

    batch = _batch(batch_size=batch_size)
    results, all_reduces = [], []
    for k in (1, 4):
        trainer, mesh = _trainer(mesh_config, grad_accum_steps=k)
        with jax.set_mesh(mesh):
            state = trainer.init(0)
            placed = sharding.global_batch(batch, mesh, axes.DEFAULT_RULES)
            text = trainer.train_step.lower(state, placed).compile().as_text()
            state, metrics = trainer.train_step(state, placed)
        all_reduces.append(aot.count_collectives(text).get("all-reduce", aot.Collective(0, 0)))
        results.append((jax.device_get(state.params), float(metrics["grad_norm"])))
    # Every micro-batch has the same number of predictions, so mean of means = full mean.
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][0], results[1][0]
    )
    if batch_size == 32 and mesh_config.fsdp == 1:
        # The gradient crosses the replicas once per step, not once per micro-batch.
        assert all_reduces[1].count <= all_reduces[0].count
        assert all_reduces[1].bytes <= all_reduces[0].bytes


def test_state_is_created_sharded_on_a_2x2x2_mesh():
    trainer, mesh = _trainer(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        kernel = state.params["bert"]["encoder"]["layer"]["intermediate"]["kernel"]  # [N, D, F]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        assert kernel.addressable_shards[0].data.shape == (2, 16, 32)
        mu = state.opt_state[1][0].mu["bert"]["encoder"]["layer"]["intermediate"]["kernel"]
        assert mu.sharding.spec == kernel.sharding.spec  # optimizer state follows the params
        state, metrics = trainer.train_step(
            state, sharding.global_batch(_batch(), mesh, axes.DEFAULT_RULES)
        )
    assert np.isfinite(float(metrics["loss"]))


def test_batch_not_divisible_by_data_parallel_degree_is_rejected():
    _, mesh = _trainer()
    with pytest.raises(ValueError, match="not divisible by the data-parallel degree 8"):
        sharding.global_batch(_batch(batch_size=6), mesh, axes.DEFAULT_RULES)


def test_weight_decay_skips_biases_and_layer_norms():
    params = models.split_params(models.abstract_model(CONFIG))[1]
    mask = optim.decay_mask(params)
    assert mask["bert"]["encoder"]["layer"]["attention"]["query"]["kernel"]
    assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert not mask["bert"]["encoder"]["layer"]["attention"]["query"]["bias"]
    assert not mask["bert"]["embeddings"]["layer_norm"]["scale"]
    assert not mask["transform_layer_norm"]["bias"]
    assert not mask["output_bias"]


def test_schedule_warms_up_then_decays_linearly_to_zero():
    schedule = optim.make_schedule(
        optim.OptimConfig(learning_rate=1.0, warmup_steps=10, total_steps=110)
    )
    np.testing.assert_allclose(
        [schedule(s) for s in (0, 5, 10, 60, 110)], [0, 0.5, 1.0, 0.5, 0.0], atol=1e-6
    )


def test_lamb_scales_updates_by_the_weight_norm():
    params = {"w": np.full((3, 3), 10.0, np.float32)}  # norm 30
    grads = {"w": np.ones((3, 3), np.float32)}
    norms = {}
    for name in ("adamw", "lamb"):
        tx = optim.make_optimizer(optim.OptimConfig(name=name, warmup_steps=0, total_steps=10))
        updates, _ = tx.update(grads, tx.init(params), params)
        norms[name] = float(optax.tree.norm(updates))
    # First Adam step: unit-sign update (+ decay 0.01 * 10); LAMB rescales to lr * ||w||.
    np.testing.assert_allclose(norms["adamw"], 1e-4 * 3 * 1.1, rtol=1e-3)
    np.testing.assert_allclose(norms["lamb"], 1e-4 * 30, rtol=1e-3)
    with pytest.raises(ValueError, match="name='sgd'; use one of"):
        dataclasses.replace(optim.OptimConfig(), name="sgd")


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="name='sgd'; use one of"):
        optim.OptimConfig(name="sgd")


@pytest.mark.parametrize(
    "schedule, decayed",
    [("wsd-linear", [0.75, 0.5, 0.0]), ("wsd-1-sqrt", [0.5, 1 - 0.5**0.5, 0.0])],
)
def test_warmup_stable_decay_schedules(schedule, decayed):
    """Warmup to the peak, the peak until the last `decay_steps`, then down to 0 linearly or
    as 1 - sqrt(progress) (ModernBERT's)."""
    config = optim.OptimConfig(
        learning_rate=1.0, warmup_steps=10, total_steps=110, schedule=schedule, decay_steps=40
    )
    values = [float(optim.make_schedule(config)(s)) for s in (5, 10, 40, 70, 80, 90, 110)]
    progress = {"wsd-linear": lambda p: 1 - p, "wsd-1-sqrt": lambda p: 1 - p**0.5}[schedule]
    np.testing.assert_allclose(values, [0.5, 1, 1, 1, progress(0.25), *decayed[1:]], atol=1e-6)
    with pytest.raises(ValueError, match="needs 0 <= decay_steps"):
        dataclasses.replace(config, decay_steps=101)
    stable = optim.make_schedule(dataclasses.replace(config, decay_steps=0))
    np.testing.assert_allclose([float(stable(s)) for s in (5, 110)], [0.5, 1.0], atol=1e-6)


def test_stable_adamw_equals_optimi():
    """bert_jax's StableAdamW against optimi's (ModernBERT's optimizer, PyTorch): decoupled
    weight decay on the kernel only, per-tensor update clipping (a gradient spike at step 4
    makes its RMS exceed 1), on a warmup-stable-decay schedule, six steps."""
    import optimi
    import torch

    config = optim.OptimConfig(
        name="stable_adamw",
        learning_rate=1e-2,
        warmup_steps=2,
        total_steps=6,
        schedule="wsd-1-sqrt",
        decay_steps=3,
        b2=0.98,
        weight_decay=0.1,
        clip_norm=0.0,
    )
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
        "layer_norm": {"scale": rng.normal(size=(3,)).astype(np.float32)},
    }
    grads = [
        jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        for _ in range(6)
    ]
    grads[3]["dense"]["kernel"] *= 50.0
    tx = optim.make_optimizer(config)
    state, ours = tx.init(params), params
    schedule = optim.make_schedule(config)
    kernel, scale = (
        torch.tensor(params[k][n]) for k, n in (("dense", "kernel"), ("layer_norm", "scale"))
    )
    ref = optimi.StableAdamW(
        [
            {"params": [kernel], "weight_decay": config.weight_decay},
            {"params": [scale], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(config.b1, config.b2),
        eps=config.eps,
        decouple_lr=True,
        max_lr=config.learning_rate,
        foreach=False,
    )
    for step, g in enumerate(grads):
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
        for group in ref.param_groups:
            group["lr"] = float(schedule(step))
        kernel.grad, scale.grad = (
            torch.tensor(g["dense"]["kernel"]),
            torch.tensor(g["layer_norm"]["scale"]),
        )
        ref.step()
        np.testing.assert_allclose(ours["dense"]["kernel"], kernel.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours["layer_norm"]["scale"], scale.numpy(), rtol=1e-5, atol=1e-6)
