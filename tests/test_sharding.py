"""Data, FSDP and tensor parallelism on 8 simulated devices give the single-device results."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bert_jax import axes, models, optim, sharding, training

TINY = models.BertConfig.named(
    "L-2_H-128",
    vocab_size=512,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
OPTIM = optim.OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10)


def _batch(seed=0, batch_size=8, length=32, preds=5):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, batch_size)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    positions = np.stack([np.sort(rng.choice(np.arange(1, 16), preds, False)) for _ in lengths])
    return {
        "input_ids": (rng.integers(5, 512, (batch_size, length)) * mask).astype(np.int32),
        "input_mask": mask,
        "segment_ids": ((np.arange(length)[None] >= 10) * mask).astype(np.int32),
        "masked_lm_positions": positions.astype(np.int32),
        "masked_lm_ids": rng.integers(5, 512, (batch_size, preds)).astype(np.int32),
        "masked_lm_weights": np.ones((batch_size, preds), np.float32),
        "next_sentence_labels": rng.integers(0, 2, batch_size).astype(np.int32),
    }


def _train(mesh, steps=3):
    trainer = training.create_trainer(TINY, OPTIM, mesh, axes.DEFAULT_RULES)
    losses = []
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        for step in range(steps):
            batch = sharding.global_batch(_batch(step), mesh, axes.DEFAULT_RULES)
            state, metrics = jax.block_until_ready(trainer.train_step(state, batch))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device():
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    return _train(mesh)[:2]


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2)])
def test_every_strategy_matches_a_single_device(single_device, shape):
    losses, params, _ = _train(sharding.make_mesh(sharding.MeshConfig(*shape)))
    np.testing.assert_allclose(losses, single_device[0], atol=1e-5, rtol=0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), params, single_device[1]
    )


# Golden table for the (data, fsdp, tensor) = (2, 2, 2) mesh: hidden dims over fsdp, heads and
# the MLP dimension over tensor (Megatron), the stacked-layer axis never split.
GOLDEN_2x2x2 = {
    "bert/embeddings/word_embeddings/embedding": P("tensor", "fsdp"),
    "bert/embeddings/position_embeddings/embedding": P(None, "fsdp"),
    "bert/embeddings/token_type_embeddings/embedding": P(None, "fsdp"),
    "bert/embeddings/layer_norm/scale": P("fsdp"),
    "bert/embeddings/layer_norm/bias": P("fsdp"),
    "bert/encoder/layer/attention/query/kernel": P(None, "fsdp", "tensor", None),
    "bert/encoder/layer/attention/query/bias": P(None, "tensor", None),
    "bert/encoder/layer/attention/key/kernel": P(None, "fsdp", "tensor", None),
    "bert/encoder/layer/attention/key/bias": P(None, "tensor", None),
    "bert/encoder/layer/attention/value/kernel": P(None, "fsdp", "tensor", None),
    "bert/encoder/layer/attention/value/bias": P(None, "tensor", None),
    "bert/encoder/layer/attention/output/kernel": P(None, "tensor", None, "fsdp"),
    "bert/encoder/layer/attention/output/bias": P(None, "fsdp"),
    "bert/encoder/layer/attention_layer_norm/scale": P(None, "fsdp"),
    "bert/encoder/layer/attention_layer_norm/bias": P(None, "fsdp"),
    "bert/encoder/layer/intermediate/kernel": P(None, "fsdp", "tensor"),
    "bert/encoder/layer/intermediate/bias": P(None, "tensor"),
    "bert/encoder/layer/output/kernel": P(None, "tensor", "fsdp"),
    "bert/encoder/layer/output/bias": P(None, "fsdp"),
    "bert/encoder/layer/output_layer_norm/scale": P(None, "fsdp"),
    "bert/encoder/layer/output_layer_norm/bias": P(None, "fsdp"),
    "bert/pooler/kernel": P("fsdp", "tensor"),
    "bert/pooler/bias": P("tensor"),
    "transform/kernel": P("fsdp", "tensor"),
    "transform/bias": P("tensor"),
    "transform_layer_norm/scale": P("fsdp"),
    "transform_layer_norm/bias": P("fsdp"),
    "output_bias": P("tensor"),
    "seq_relationship/kernel": P("fsdp", None),
    "seq_relationship/bias": P(None),
}


def _flat_specs(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in path): x.sharding.spec for path, x in flat}


def test_partition_specs_follow_the_golden_table():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    trainer = training.create_trainer(TINY, OPTIM, mesh, axes.DEFAULT_RULES)
    with jax.set_mesh(mesh):
        state = trainer.init(0)
    specs = _flat_specs(state.params)
    assert specs == {k: P(*v) for k, v in GOLDEN_2x2x2.items()}
    data_parallel = sharding.make_mesh(sharding.MeshConfig(8, 1, 1))
    trainer = training.create_trainer(TINY, OPTIM, data_parallel, axes.DEFAULT_RULES)
    with jax.set_mesh(data_parallel):
        replicated = _flat_specs(trainer.init(0).params)
    assert all(all(a is None for a in spec) for spec in replicated.values())


def _bytes_on_first_device(tree):
    device = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for x in jax.tree.leaves(tree)
        for shard in x.addressable_shards
        if shard.device == device
    )


def test_fsdp_divides_parameter_and_optimizer_memory():
    sizes = {}
    for name, mesh in (
        ("single", sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])),
        ("fsdp", sharding.make_mesh(sharding.MeshConfig(1, 8, 1))),
    ):
        trainer = training.create_trainer(TINY, OPTIM, mesh, axes.DEFAULT_RULES)
        with jax.set_mesh(mesh):
            state = trainer.init(0)
        sizes[name] = _bytes_on_first_device((state.params, state.opt_state))
    assert sizes["fsdp"] <= sizes["single"] / 6, sizes


def test_bad_meshes_are_rejected_before_compiling():
    with pytest.raises(ValueError, match="needs 6 devices but 8 are present"):
        sharding.make_mesh(sharding.MeshConfig(3, 2, 1))
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 1, 4))
    with pytest.raises(ValueError, match=r"heads dimension \(2\) is not divisible by 4"):
        training.create_trainer(TINY, OPTIM, mesh, axes.DEFAULT_RULES)
    mesh = sharding.make_mesh(sharding.MeshConfig(-1, 1, 1))
    with pytest.raises(ValueError, match="not divisible by the data-parallel degree 8"):
        sharding.global_batch(_batch(batch_size=12), mesh, axes.DEFAULT_RULES)


def test_mesh_rules_travel_with_the_mesh_config():
    # A config file writes lists; the rules become the tuples the sharding code hashes.
    written = [[name, list(t) if isinstance(t, tuple) else t] for name, t in axes.DEFAULT_RULES]
    assert sharding.MeshConfig(rules=written).rules == tuple(axes.DEFAULT_RULES)
    # Weights kept whole on every device (no fsdp on the hidden dimension) when a config says
    # so: the trainer places them by the config's rules, not the defaults.
    rules = tuple((n, None) if n == axes.EMBED else (n, t) for n, t in axes.DEFAULT_RULES)
    cfg = sharding.MeshConfig(data=2, fsdp=4, rules=rules)
    mesh = sharding.make_mesh(cfg)
    config = models.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16,
    )  # fmt: skip
    for rules, fsdp in ((cfg.rules, None), (sharding.MeshConfig.rules, "fsdp")):
        trainer = training.create_trainer(config, optim.OptimConfig(), mesh, rules)
        kernel = trainer.abstract_state.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
        assert kernel.sharding.spec == P(None, fsdp), kernel.sharding.spec
