"""Head masking, head importance, pruning, attention statistics and heatmaps."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_extract import VOCAB, _hf_model

from bert_jax import axes, convert, models, objectives, optim, sharding, training
from bert_jax.tools import analysis

TINY = dict(
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _batch(rng, rows=4, length=12):
    lengths = np.array([12, 9, 5, 3])[:rows]
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(5, TINY["vocab_size"], (rows, length)) * mask).astype(np.int32)
    segments = ((np.arange(length)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    positions = np.tile(np.array([1, 2], np.int32), (rows, 1))
    return ids, mask, segments, positions


def _model(config, cls=models.BertForPreTraining):
    graphdef, params = models.split_params(models.create_model(config, 0, cls))
    # Non-zero biases everywhere, so that a head's bias cannot hide behind zeros.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    return graphdef, params


def _forward(graphdef, **kw):
    """The model of `graphdef`, jitted: (params, batch, head_mask) -> outputs."""

    @jax.jit
    def run(params, batch, head_mask):
        return models.merge_params(graphdef, params)(*batch, head_mask=head_mask, **kw)

    return run


def test_masking_every_head_of_a_layer_removes_its_attention():
    config = models.BertConfig(**TINY)
    graphdef, params = _model(config)
    batch = _batch(np.random.default_rng(0))
    run = _forward(graphdef)
    head_mask = np.ones((3, 4), np.float32)
    head_mask[1] = 0.0
    masked = run(params, batch, head_mask)
    # The reference: layer 1's attention output projection sees only zeros, so the layer adds
    # just its output bias before the LayerNorm.
    cut = jax.tree.map(lambda x: x, params)
    kernel = cut["bert"]["encoder"]["layer"]["attention"]["output"]["kernel"]
    cut["bert"]["encoder"]["layer"]["attention"]["output"]["kernel"] = kernel.at[1].set(0.0)
    reference = run(cut, batch, np.ones((3, 4), np.float32))
    full = run(params, batch, np.ones((3, 4), np.float32))
    np.testing.assert_allclose(masked.mlm_logits, reference.mlm_logits, atol=1e-5)
    np.testing.assert_allclose(masked.nsp_logits, reference.nsp_logits, atol=1e-5)
    assert np.abs(np.asarray(full.mlm_logits - masked.mlm_logits)).max() > 1e-3


def test_pruned_model_equals_the_masked_model_and_fine_tunes(tmp_path):
    config = models.BertConfig(**TINY)
    graphdef, params = _model(config)
    batch = _batch(np.random.default_rng(1))
    ids, mask, segments, _ = batch
    remove = {0: [1, 3], 2: [0]}
    head_mask = np.ones((3, 4), np.float32)
    for layer, heads in remove.items():
        head_mask[layer, heads] = 0.0
    unpruned = _forward(graphdef, output_attentions=True)
    masked = unpruned(params, batch, head_mask)
    pruned_config, pruned = analysis.prune_heads(params, config, remove)
    assert pruned_config.pruned_heads == ((1, 3), (), (0,))
    pruned_graphdef, _ = models.split_params(models.abstract_model(pruned_config))
    out = _forward(pruned_graphdef, output_attentions=True)(
        jax.tree.map(jnp.asarray, pruned), batch, np.ones((3, 4), np.float32)
    )
    np.testing.assert_allclose(out.mlm_logits, masked.mlm_logits, atol=1e-5)
    np.testing.assert_allclose(out.nsp_logits, masked.nsp_logits, atol=1e-5)
    np.testing.assert_allclose(out.encoder.attentions, masked.encoder.attentions, atol=1e-6)
    # Smaller matrices: 3 of 12 heads gone, each with its query, key and value columns and
    # biases (3 x (32 x 8 + 8)) and its rows of the output projection (8 x 32).
    removed = models.count_params(config) - models.count_params(pruned_config)
    assert removed == 3 * (3 * (32 * 8 + 8) + 8 * 32)
    assert pruned["bert"]["encoder"]["layers"][0]["attention"]["query"]["kernel"].shape == (
        32,
        2,
        8,
    )
    # Pruning again (in the original numbering) composes.
    again_config, again = analysis.prune_heads(pruned, pruned_config, {0: [0], 1: [2]})
    assert again_config.pruned_heads == ((0, 1, 3), (2,), (0,))
    head_mask[0, 0] = head_mask[1, 2] = 0.0
    twice = _forward(models.split_params(models.abstract_model(again_config))[0])(
        jax.tree.map(jnp.asarray, again), batch, np.ones((3, 4), np.float32)
    )
    masked2 = unpruned(params, batch, head_mask)
    np.testing.assert_allclose(twice.mlm_logits, masked2.mlm_logits, atol=1e-5)

    with pytest.raises(ValueError, match="pruned heads"):
        convert.config_to_hf(pruned_config, "BertForPreTraining")
    # Saved as a workdir, it loads and fine-tunes.
    tokenizer = _tokenizer(tmp_path)
    convert.write_run(
        str(tmp_path / "pruned"), pruned_config, "BertForPreTraining", 2, pruned, tokenizer
    )
    mesh = sharding.make_mesh(sharding.MeshConfig())
    loaded = convert.load_pretrained(
        str(tmp_path / "pruned"), "BertForSequenceClassification", mesh=mesh
    )
    assert loaded.config.pruned_heads == pruned_config.pruned_heads
    objective = objectives.classification(2)
    trainer = training.create_trainer(
        loaded.config,
        optim.OptimConfig(warmup_steps=1, total_steps=10),
        mesh,
        axes.DEFAULT_RULES,
        objective,
    )
    batch = {
        "input_ids": np.tile(ids, (2, 1)),
        "input_mask": np.tile(mask, (2, 1)),
        "segment_ids": np.tile(segments, (2, 1)),
        "label": np.arange(8) % 2,
    }
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        state = state.replace(params=convert.overlay(state.params, loaded.params))
        batch = sharding.global_batch(batch, mesh, axes.DEFAULT_RULES)
        losses = []
        for _ in range(5):
            state, metrics = trainer.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]


def _tokenizer(tmp_path):
    from bert_jax.data.tokenization import WordPieceTokenizer

    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB + [f"w{i}" for i in range(40 - len(VOCAB))]) + "\n")
    return WordPieceTokenizer(path)


def test_head_importance_is_the_mean_absolute_per_example_gradient():
    config = models.BertConfig(**TINY)
    graphdef, params = _model(config, models.BertForMaskedLM)
    ids, mask, segments, positions = _batch(np.random.default_rng(2))
    batch = {
        "input_ids": ids,
        "input_mask": mask,
        "segment_ids": segments,
        "masked_lm_positions": positions,
        "masked_lm_ids": np.random.default_rng(3).integers(5, 40, positions.shape).astype(np.int32),
        "masked_lm_weights": np.array([[1, 1], [1, 0], [1, 1], [0, 0]], np.float32),
        "example_weight": np.array([1, 1, 1, 0], np.float32),
    }
    imp, loss = jax.jit(analysis.make_importance_step(graphdef, config, sharding.MeshConfig.rules))(
        params, batch
    )

    def example_loss(head_mask, row):  # one example, one mask: the definition
        model = models.merge_params(graphdef, params)
        take = lambda x: x[row : row + 1]  # noqa: E731
        logits, _ = model(
            take(ids), take(mask), take(segments), take(positions), head_mask=head_mask
        )
        logp = jax.nn.log_softmax(logits[0], -1)
        nll = -logp[np.arange(2), batch["masked_lm_ids"][row]]
        w = batch["masked_lm_weights"][row]
        return (nll * w).sum() / max(w.sum(), 1.0)

    grad = jax.jit(jax.grad(example_loss), static_argnums=1)
    expected = sum(np.abs(grad(jnp.ones((3, 4)), row)) for row in range(3))
    np.testing.assert_allclose(imp, expected, rtol=1e-4, atol=1e-7)
    assert float(loss) == pytest.approx(
        sum(float(jax.jit(example_loss, static_argnums=1)(jnp.ones((3, 4)), r)) for r in range(3)),
        rel=1e-5,
    )
    chosen = analysis.heads_to_prune(np.asarray(expected), 0.5)
    assert sum(map(len, chosen.values())) == 6 and all(len(h) <= 3 for h in chosen.values())


def test_attention_statistics_and_heatmap_from_the_command(tmp_path):
    directory, model = _hf_model(tmp_path)
    lines = ["the cat sat on the mat .", "the dog played ||| a cat sat ."]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    analysis.main(
        [
            "attention-stats",
            f"--model=hf:{directory}",
            f"--input={tmp_path / 'lines.txt'}",
            f"--output={tmp_path / 'stats.json'}",
            "--max_seq_length=16",
            "--batch_size=8",
        ]
    )
    stats = json.loads((tmp_path / "stats.json").read_text())
    # The reference: transformers' attention probabilities, the statistics in numpy.
    tok = transformers.BertTokenizerFast(f"{directory}/vocab.txt")
    sums, count = {k: 0.0 for k in analysis.STATISTICS}, 0
    for line in lines:
        a, _, b = line.partition(" ||| ")
        enc = tok(a, b or None, return_tensors="pt")
        with torch.no_grad():
            att = torch.stack(model(**enc, output_attentions=True).attentions)[:, 0].numpy()
        n = att.shape[-1]
        sep = enc["input_ids"][0].numpy() == tok.sep_token_id
        sums["entropy"] += -(att * np.log(att)).sum(-1).sum(-1)
        sums["to_cls"] += att[..., 0].sum(-1)
        sums["to_sep"] += att[..., sep].sum(-1).sum(-1)
        sums["to_prev"] += sum(att[..., q, q - 1] for q in range(1, n))
        sums["to_next"] += sum(att[..., q, q + 1] for q in range(n - 1))
        sums["to_self"] += sum(att[..., q, q] for q in range(n))
        count += n
    assert stats["tokens"] == count and (stats["layers"], stats["heads"]) == (3, 4)
    for key in analysis.STATISTICS:
        np.testing.assert_allclose(stats[key], sums[key] / count, atol=1e-5, err_msg=key)

    png = tmp_path / "attention.png"
    analysis.main(
        [
            "heatmap",
            f"--model=hf:{directory}",
            "--text=the cat sat ||| on the mat",
            "--heads=0:0,2:3",
            f"--output={png}",
        ]
    )
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[1] > 2 * image.shape[0] / 2
    with pytest.raises(ValueError, match="head 3:0 does not exist"):
        analysis.plot_attention(f"hf:{directory}", "the cat", [(3, 0)], str(png))


def test_head_importance_and_pruning_from_the_command(tmp_path):
    directory, _ = _hf_model(tmp_path, "BertForPreTraining")
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat sat on the mat .\nthe dog played ||| a cat sat .\nplaying a ball\n")
    importance = tmp_path / "importance.json"
    analysis.main(
        [
            "head-importance",
            f"--model=hf:{directory}",
            f"--input={lines}",
            f"--output={importance}",
            "--max_seq_length=16",
            "--batch_size=8",
        ]
    )
    scores = json.loads(importance.read_text())
    assert scores["lines"] == 3 and np.shape(scores["importance"]) == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(scores["normalized"], axis=1), 1.0, rtol=1e-5)
    assert np.min(scores["importance"]) > 0
    analysis.main(
        [
            "prune",
            f"--model=hf:{directory}",
            f"--importance={importance}",
            "--fraction=0.25",
            f"--output={tmp_path / 'pruned'}",
        ]
    )
    saved = convert.read_run(str(tmp_path / "pruned"))
    expected = analysis.heads_to_prune(scores["normalized"], 0.25)
    assert sum(map(len, saved["config"].pruned_heads)) == 3
    assert {i: list(p) for i, p in enumerate(saved["config"].pruned_heads) if p} == expected
    assert saved["architecture"] == "BertForPreTraining"


def test_head_importance_on_a_glue_task(tmp_path):
    import glue_data

    directory, model = _hf_model(tmp_path, "BertForSequenceClassification")
    glue_data.write_glue(tmp_path / "glue", n=12)
    out = tmp_path / "importance.json"
    analysis.main(
        [
            "head-importance",
            f"--model=hf:{directory}",
            "--task=rte",
            f"--data_dir={tmp_path / 'glue'}",
            f"--output={out}",
            "--max_seq_length=16",
            "--batch_size=8",
        ]
    )
    scores = json.loads(out.read_text())
    assert scores["lines"] == 12 and np.shape(scores["importance"]) == (3, 4)
    # The mean loss is the classifier's dev loss, which transformers computes the same way.
    from bert_jax.tasks import glue

    task = glue.get_spec("rte")
    examples = glue.read_tsv(task, task.split("dev"), str(tmp_path / "glue" / "RTE"))
    tok = transformers.BertTokenizerFast(f"{directory}/vocab.txt")
    enc = tok(
        list(examples.text_a),
        list(examples.text_b),
        truncation="longest_first",
        max_length=16,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        loss = model(**enc, labels=torch.as_tensor(examples.labels).long()).loss
    assert scores["loss"] == pytest.approx(float(loss), rel=1e-4)
