"""The encoder against the Hugging Face PyTorch BERT built from the same config, sizes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bert_jax import convert, models
from bert_jax.data import encoding

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=2,
)


def _hf_model(**sizes) -> transformers.BertForPreTraining:
    torch.manual_seed(0)
    config = transformers.BertConfig(**sizes, hidden_act="gelu", attn_implementation="eager")
    model = transformers.BertForPreTraining(config).eval()
    # Non-trivial LayerNorm and bias values so that a swapped or dropped tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _padded_batch(rng: np.random.Generator, vocab: int):
    lengths = np.array([12, 7, 3])
    ids = rng.integers(1, vocab, size=(3, 12))
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * mask
    segments = ((np.arange(12)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    positions = np.array([[1, 4, 9, 11], [1, 2, 5, 0], [1, 2, 0, 0]])
    return ids.astype(np.int32), mask, segments, positions.astype(np.int32)


def test_matches_hugging_face_bert_for_pretraining():
    hf = _hf_model(**TINY)
    config = models.BertConfig(**TINY)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params, report = convert.params_from_hf(state, config)
    assert report.missing == [] and report.unexpected == []
    graphdef, _ = models.split_params(models.abstract_model(config))
    ids, mask, segments, positions = _padded_batch(np.random.default_rng(0), TINY["vocab_size"])

    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(segments, dtype=torch.long),
            output_hidden_states=True,
            output_attentions=True,
        )
        pooled = hf.bert(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(segments, dtype=torch.long),
        ).pooler_output.numpy()
    model = models.merge_params(graphdef, jax.tree.map(jnp.asarray, params))
    out = model(ids, mask, segments, positions, output_hidden_states=True, output_attentions=True)

    real = mask.astype(bool)
    ref_hidden = np.stack([h.numpy() for h in ref.hidden_states])
    assert out.encoder.hidden_states.shape == ref_hidden.shape
    # Padded positions are compared too: HF and bert_jax both compute them from the same inputs.
    np.testing.assert_allclose(out.encoder.hidden_states, ref_hidden, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.encoder.sequence_output, ref_hidden[-1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.encoder.pooled_output, pooled, atol=1e-5, rtol=0)
    ref_probs = np.stack([a.numpy() for a in ref.attentions])
    np.testing.assert_allclose(
        out.encoder.attentions * real[None, :, None, :, None],
        ref_probs * real[None, :, None, :, None],
        atol=1e-5,
        rtol=0,
    )
    ref_mlm = np.take_along_axis(ref.prediction_logits.numpy(), positions[..., None], axis=1)
    np.testing.assert_allclose(out.mlm_logits, ref_mlm, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.nsp_logits, ref.seq_relationship_logits.numpy(), atol=1e-5)


def test_fused_attention_path_matches_explicit_path():
    config = models.BertConfig(**TINY)
    model = models.create_model(config)
    ids, mask, segments, positions = _padded_batch(np.random.default_rng(1), TINY["vocab_size"])
    fused = model(ids, mask, segments, positions)
    explicit = model(ids, mask, segments, positions, output_attentions=True)
    np.testing.assert_allclose(fused.mlm_logits, explicit.mlm_logits, atol=1e-5, rtol=0)


def test_splash_attention_kernel_matches_the_xla_path():
    """The Pallas splash kernel (interpreted on the CPU), padded and packed, one device and
    sharded over 8: the same outputs, loss and update as jax.nn.dot_product_attention."""
    import dataclasses

    from bert_jax import axes, optim, sharding, training

    xla = models.BertConfig(
        **{**TINY, "max_position_embeddings": 128},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attention_kernel="xla",
    )
    splash = dataclasses.replace(xla, attention_kernel="splash")
    rng = np.random.default_rng(2)
    lengths = np.array([128, 50, 9, 77, 128, 3, 64, 100])
    mask = (np.arange(128)[None] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(1, TINY["vocab_size"], (8, 128)) * mask).astype(np.int32)
    segments = ((np.arange(128)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    positions = np.stack([rng.integers(0, n, 5) for n in lengths]).astype(np.int32)
    batch = dict(
        input_ids=ids,
        input_mask=mask,
        segment_ids=segments,
        masked_lm_positions=positions,
        masked_lm_ids=rng.integers(0, TINY["vocab_size"], (8, 5)).astype(np.int32),
        masked_lm_weights=np.ones((8, 5), np.float32),
        next_sentence_labels=rng.integers(0, 2, 8).astype(np.int32),
    )
    # One device: pretraining outputs at the real positions.
    graphdef, params = models.split_params(models.create_model(xla))
    ours = models.merge_params(models.split_params(models.abstract_model(splash))[0], params)(
        ids, mask, segments, positions
    )
    ref = models.merge_params(graphdef, params)(ids, mask, segments, positions)
    np.testing.assert_allclose(ours.mlm_logits, ref.mlm_logits, atol=2e-5, rtol=0)
    np.testing.assert_allclose(ours.nsp_logits, ref.nsp_logits, atol=2e-5, rtol=0)
    # Packed classification rows.
    cls = models.BertForSequenceClassification
    graphdef, params = models.split_params(models.create_model(xla, 0, cls))
    packed = encoding.pack(
        dict(input_ids=ids, input_mask=mask, segment_ids=segments, label=np.zeros(8, np.int32)),
        max_per_row=4,
    )
    assert len(packed["input_ids"]) < 8
    run = dict(packing=models.Packing.from_batch(packed))
    args = (packed["input_ids"], packed["input_mask"], packed["segment_ids"])
    ours, _ = models.merge_params(
        models.split_params(models.abstract_model(splash, cls))[0], params
    )(*args, **run)
    ref, _ = models.merge_params(graphdef, params)(*args, **run)
    real = packed["source"] >= 0
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(ref)[real], atol=2e-5, rtol=0)
    # Eight devices (batch split over `data`): one train step, the same loss and parameters.
    mesh = sharding.make_mesh(sharding.MeshConfig())
    results = []
    for config in (xla, splash):
        trainer = training.create_trainer(
            config, optim.OptimConfig(warmup_steps=0, total_steps=10), mesh, axes.DEFAULT_RULES
        )
        with jax.set_mesh(mesh):
            state = trainer.init(0)
            before = jax.device_get(state.params)
            state, metrics = trainer.train_step(
                state, sharding.global_batch(batch, mesh, axes.DEFAULT_RULES)
            )
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    # The step moved the parameters (no warmup: the first step's rate is the peak's).
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), results[0][1], before)
    assert max(jax.tree.leaves(moved)) > 1e-5
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), *[r[1] for r in results]
    )


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(
            share_layers="all",
            embedding_size=16,
            num_hidden_groups=2,
            inner_group_num=2,
            remat="minimal",
        ),
        dict(pruned_heads=((1,), (), (0, 3))),
    ],
    ids=["bert", "albert_groups_remat", "pruned"],
)
def test_last_layer_at_the_predicted_positions_gives_the_same_logits_and_gradients(variant):
    """`only_predicted_positions` (the train step's path): the last layer computes [CLS] and
    the masked positions only; logits and gradients equal those of the full last layer."""
    sizes = dict(TINY, num_hidden_layers=4) if "num_hidden_groups" in variant else TINY
    config = models.BertConfig(**sizes, **variant)
    graphdef, params = models.split_params(models.create_model(config))
    ids, mask, segments, positions = _padded_batch(np.random.default_rng(3), TINY["vocab_size"])
    weights = (positions > 0).astype(np.float32)

    def run(p, only):
        out = models.merge_params(graphdef, p)(
            ids, mask, segments, positions, only_predicted_positions=only
        )
        loss = jnp.sum(jnp.sin(out.mlm_logits) * weights[..., None]) + jnp.sum(out.nsp_logits**2)
        return loss, out

    step = jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=1)
    (loss_full, full), grads_full = step(params, False)
    (loss_fast, fast), grads_fast = step(params, True)
    assert fast.encoder.sequence_output.shape == (3, 1 + positions.shape[1], 32)
    np.testing.assert_allclose(fast.mlm_logits, full.mlm_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast.nsp_logits, full.nsp_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(loss_fast, loss_full, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads_fast, grads_full
    )
    with pytest.raises(ValueError, match="cannot return every layer"):
        models.merge_params(graphdef, params)(
            ids, mask, segments, positions, only_predicted_positions=True, output_hidden_states=True
        )


@pytest.mark.parametrize(
    "name, hf_sizes",
    [
        ("bert_base", dict()),
        (
            "bert_large",
            dict(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
            ),
        ),
    ],
)
def test_parameter_counts_match_published_sizes(name, hf_sizes):
    counted = models.count_params(models.BertConfig.named(name))
    # The exact figure of the reference implementation, computed from shapes on the meta device.
    with torch.device("meta"):
        reference = transformers.BertModel(transformers.BertConfig(**hf_sizes))
    assert counted == sum(p.numel() for p in reference.parameters())
    # The published sizes: 110M (base, 0.5% above the exact 109.5M) and 340M (large, whose
    # exact count is 335.1M: the paper's figure is 1.4% high, so large gets 1.5%).
    published, tolerance = {"bert_base": (110e6, 0.01), "bert_large": (340e6, 0.015)}[name]
    assert abs(counted - published) / published < tolerance


def test_small_bert_grid_names():
    config = models.BertConfig.named("L-4_H-256")
    assert (config.num_hidden_layers, config.hidden_size) == (4, 256)
    assert (config.num_attention_heads, config.intermediate_size) == (4, 1024)
    assert models.BertConfig.named("uncased_L-12_H-768_A-12") == models.BertConfig.named(
        "bert_base"
    )
    with pytest.raises(ValueError, match="unknown BERT size"):
        models.BertConfig.named("L-3_H-128")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=100, num_attention_heads=12), "not divisible by num_attention_heads"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob must be in"),
        (dict(hidden_act="swish"), "hidden_act"),
        (dict(dtype="float64"), "dtype"),
    ],
)
def test_invalid_config_raises_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        models.BertConfig(**overrides)


def test_batch_shape_mismatch_names_the_feature():
    config = models.BertConfig(**TINY)
    model = models.create_model(config)
    ids = np.ones((2, 8), np.int32)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        model(ids, np.ones((2, 8), np.int32), np.ones((2, 7), np.int32), np.zeros((2, 2), np.int32))
    too_long = np.ones((1, 41), np.int32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(too_long, too_long, too_long, np.zeros((1, 2), np.int32))


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
    fp32 = models.BertConfig(**TINY)
    bf16 = models.BertConfig(**TINY, dtype="bfloat16")
    _, params = models.split_params(models.create_model(fp32))
    ids, mask, segments, positions = _padded_batch(np.random.default_rng(2), TINY["vocab_size"])
    outs = {}
    for name, config in (("fp32", fp32), ("bf16", bf16)):
        graphdef, abstract = models.split_params(models.abstract_model(config))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
        model = models.merge_params(graphdef, params)
        out = model(ids, mask, segments, positions)
        outs[name] = out
    assert outs["bf16"].encoder.sequence_output.dtype == jnp.bfloat16
    assert outs["bf16"].mlm_logits.dtype == jnp.float32
    np.testing.assert_allclose(outs["bf16"].mlm_logits, outs["fp32"].mlm_logits, atol=0.1)


def test_remat_changes_memory_not_results():
    ids, mask, segments, positions = _padded_batch(np.random.default_rng(3), TINY["vocab_size"])
    grads, scratch = [], []
    assert models.BertConfig(**TINY, remat=True).remat == "full"  # earlier runs' spelling
    assert models.BertConfig(**TINY, remat=False).remat == "none"
    for remat in ("none", "minimal", "full"):
        config = models.BertConfig(**TINY, remat=remat)
        graphdef, params = models.split_params(models.create_model(config))

        def loss(p, graphdef=graphdef):
            out = models.merge_params(graphdef, p)(ids, mask, segments, positions)
            return jnp.sum(out.mlm_logits**2) + jnp.sum(out.nsp_logits**2)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        scratch.append(compiled.memory_analysis().temp_size_in_bytes)
        grads.append(compiled(params))
    # XLA's own account of the backward pass's scratch memory: each policy keeps fewer
    # activations for the backward pass than the one before it.
    assert scratch[0] > scratch[1] > scratch[2], scratch

    def close(a, b):
        # Recomputation may fuse and sum in another order: float32 rounding of a sum is relative
        # to its largest terms, so the absolute tolerance scales with the array's largest value.
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)

    for other in grads[1:]:
        jax.tree.map(close, grads[0], other)
