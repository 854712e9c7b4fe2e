"""Sentence-embedding training in finetune.py's harness (`embed:<folder>`): the readers and
their errors, the train step's GradCache against the whole-batch step, and tiny models that
learn a synthetic retrieval task and a synthetic STS task to held-out figures well above the
untrained model's, scored as BEIR and STS-B score them (references: test_retrieval)."""

import dataclasses
import json
import os

import glue_data
import jax
import numpy as np
import pytest

import finetune  # noqa: E402  (glue_data puts the checkout on the path)
from bert_jax import convert, models, objectives, sharding, training
from bert_jax.data.tokenization import WordPieceTokenizer
from bert_jax.optim import OptimConfig
from bert_jax.tasks import base, embedding, registry

FILLER = [f"f{i}" for i in range(12)]
TOPICS = [f"t{i}" for i in range(48)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *TOPICS]


def _text(rng, topics, n_filler: int) -> str:
    """`topics` among `n_filler` filler words, at random places."""
    words = list(rng.choice(FILLER, size=n_filler))
    for topic in topics:
        words.insert(int(rng.integers(0, len(words) + 1)), topic)
    return " ".join(words)


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def _write_retrieval(folder, seed: int = 0):
    """Queries whose relevant document is the one sharing their (rare) topic word, amid
    many filler words both share with every other text. Training triplets: (query, its
    document, a document of another topic); dev: a BEIR folder of new texts."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(640):
        topic, other = rng.choice(len(TOPICS), 2, replace=False)
        rows.append(
            {
                "anchor": _text(rng, [TOPICS[topic]], 4),
                "positive": _text(rng, [TOPICS[topic]], 6),
                "negative": _text(rng, [TOPICS[other]], 6),
            }
        )
    _jsonl(folder / "train.jsonl", rows)
    corpus = [
        {"_id": f"d{i}", "title": "", "text": _text(rng, [t], 6)} for i, t in enumerate(TOPICS)
    ]
    queries = [{"_id": f"q{i}", "text": _text(rng, [t], 4)} for i, t in enumerate(TOPICS)]
    _jsonl(folder / "corpus.jsonl", corpus)
    _jsonl(folder / "queries.jsonl", queries)
    qrels = [["query-id", "corpus-id", "score"]] + [[f"q{i}", f"d{i}", "1"] for i in range(48)]
    glue_data.write_tsv(folder / "qrels" / "dev.tsv", None, qrels)


def _write_sts(folder, seed: int = 1):
    """Scored pairs: each sentence holds two topic words; the score is how many of them
    the two sentences share (0, 1, 2), the rest is filler."""
    rng = np.random.default_rng(seed)

    def pairs(n):
        rows = []
        for _ in range(n):
            a = list(rng.choice(TOPICS, 2, replace=False))
            shared = int(rng.integers(0, 3))
            others = [t for t in TOPICS if t not in a]
            b = a[:shared] + list(rng.choice(others, 2 - shared, replace=False))
            rows.append([_text(rng, a, 4), _text(rng, b, 4), str(float(shared))])
        return rows

    header = ["sentence1", "sentence2", "score"]
    glue_data.write_tsv(folder / "train.tsv", header, pairs(640))
    glue_data.write_tsv(folder / "dev.tsv", header, pairs(200))
    glue_data.write_tsv(folder / "test.tsv", header, pairs(8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A randomly initialised tiny encoder saved as a workdir, with the tests' vocabulary."""
    tmp = tmp_path_factory.mktemp("embed_model")
    vocab = tmp / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in VOCAB))
    config = models.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    params = models.split_params(models.create_model(config, 0, models.BertModel))[1]
    out = str(tmp / "model")
    convert.write_run(out, config, "BertModel", 2, params, WordPieceTokenizer(str(vocab)))
    return out


def _config(model_dir, data_dir, **kw):
    return glue_data.finetune_config(
        init_from=model_dir,
        data_dir=str(data_dir),
        max_seq_length=16,
        batch_size=32,
        eval_batch_size=64,
        pack=False,
        **kw,
    )


def _untrained(cfg, name, mesh, workdir) -> dict:
    cfg = dataclasses.replace(cfg, num_epochs=0.0)
    (run,) = finetune.finetune_task(cfg, name, mesh, str(workdir))["runs"]
    return run["dev"]


@pytest.mark.slow
def test_a_tiny_model_learns_retrieval_with_hard_negatives_and_grad_cache(tmp_path, model_dir):
    """Triplets (in-batch negatives over all 8 devices' examples plus one hard negative
    each), GradCache chunks of 16 texts: held-out nDCG@10 far above the untrained model's.
    Exported as a sentence-transformers folder, the run embeds with the pooling it was
    trained with (CLS and mean, concatenated) in sentence-transformers as here."""
    _write_retrieval(tmp_path / "data" / "retrieval")
    options = (("modes", ("cls", "mean")), ("scale", 20.0), ("symmetric", False))
    options += (("matryoshka_dims", ()), ("chunk_size", 16))
    cfg = _config(
        model_dir, tmp_path / "data", num_epochs=5.0, learning_rates=(5e-3,), embedding=options
    )
    mesh = sharding.make_mesh(cfg.mesh)
    before = _untrained(cfg, "embed:retrieval", mesh, tmp_path / "untrained")["retrieval"]
    result = finetune.finetune_task(cfg, "embed:retrieval", mesh, str(tmp_path / "work"))
    (run,) = result["runs"]
    after = run["dev"]["retrieval"]
    assert before["ndcg@10"] < 0.5, before
    assert after["ndcg@10"] > before["ndcg@10"] + 0.3, (before, after, run["history"])
    assert after["queries"] == len(TOPICS)
    print("retrieval nDCG@10 untrained, trained:", before["ndcg@10"], after["ndcg@10"])
    # The run is a sentence-transformers model.
    from sentence_transformers import SentenceTransformer

    from bert_jax.convert import __main__ as convert_cli
    from bert_jax.tools import embed

    out = tmp_path / "st"
    convert_cli.main(["export-sentence-transformers", run["directory"], str(out)])
    texts = [_text(np.random.default_rng(5), [t], 6) for t in TOPICS[:4]]
    want = SentenceTransformer(str(out), device="cpu").encode(texts)
    got = embed.Embedder(str(out), mesh=mesh).encode(texts)
    assert want.shape == (4, 2 * 32)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_a_tiny_model_learns_sts_from_scored_pairs(tmp_path, model_dir):
    """Scored pairs with CoSENT: held-out Spearman far above the untrained model's; the test
    pairs' cosines written from the best checkpoint."""
    _write_sts(tmp_path / "data" / "sts")
    cfg = _config(model_dir, tmp_path / "data", num_epochs=5.0, learning_rates=(5e-3,))
    mesh = sharding.make_mesh(cfg.mesh)
    before = _untrained(cfg, "embed:sts", mesh, tmp_path / "untrained")["sts"]
    (run,) = finetune.finetune_task(cfg, "embed:sts", mesh, str(tmp_path / "work"))["runs"]
    after = run["dev"]["sts"]
    assert after["spearman"] > before["spearman"] + 0.3, (before, after, run["history"])
    assert after["spearman"] > 0.8, after
    print("STS Spearman untrained, trained:", before["spearman"], after["spearman"])
    lines = open(run["predictions"]["sts_test"]).read().splitlines()
    assert lines[0] == "sentence1\tsentence2\tcosine" and len(lines) == 9


def test_the_grad_cache_step_equals_the_whole_batch_step_on_8_devices(model_dir, tmp_path):
    """finetune.py's train step for triplets without dropout: embedding the batch 24 texts
    at a time (GradCache, each of 8 replicas its 3 rows of a chunk) gives the loss and
    gradient norm of embedding it whole."""
    _write_retrieval(tmp_path / "retrieval")
    settings = base.Settings(data_dir=str(tmp_path), max_seq_length=16)
    task = registry.get_task("embed:retrieval")
    task.prepare(settings)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    pretrained = convert.load_pretrained(model_dir, "BertModel", mesh=mesh)
    config = dataclasses.replace(
        pretrained.config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    data = task.load(settings, pretrained.tokenizer)
    batch = {k: v[:32] for k, v in data.train.items()}
    results = []
    for chunk in (0, 24):
        # Mean and max pooling: max pooling's padding at -inf made this compile take minutes.
        spec = dataclasses.replace(task.spec, chunk_size=chunk, modes=("mean", "max"))
        objective = objectives.embedding_objective(spec)
        trainer = training.create_trainer(
            config, OptimConfig(learning_rate=1e-3), mesh, sharding.MeshConfig.rules, objective
        )
        with jax.set_mesh(mesh):
            state = trainer.init(0)
            imported = jax.tree.map(lambda x: x.copy(), pretrained.params)  # the step donates
            state = state.replace(params=convert.overlay(state.params, imported))
            _, metrics = trainer.train_step(state, trainer.global_batch(batch))
        results.append(jax.device_get(metrics))
    whole, cached = results
    assert whole["correct_sum"] == cached["correct_sum"]
    np.testing.assert_allclose(cached["loss"], whole["loss"], rtol=1e-5)
    np.testing.assert_allclose(cached["grad_norm"], whole["grad_norm"], rtol=1e-5)


def test_readers_take_pairs_triplets_and_scored_pairs_and_name_bad_lines(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"anchor": "x", "positive": "y", "negatives": ["z", "w"]}])
    assert embedding.read_examples(str(tmp_path / "a.jsonl")).texts == [("x", "y", "z", "w")]
    glue_data.write_tsv(tmp_path / "b.tsv", ["anchor", "positive"], [["x", "y"], ["u", "v"]])
    examples = embedding.read_examples(str(tmp_path / "b.tsv"))
    assert examples.texts == [("x", "y"), ("u", "v")] and examples.scores is None
    glue_data.write_tsv(
        tmp_path / "c.tsv", ["sentence1", "sentence2", "score"], [["x", "y", "4.5"]]
    )
    examples = embedding.read_examples(str(tmp_path / "c.tsv"))
    np.testing.assert_array_equal(examples.scores, [4.5])
    rows = [{"anchor": "a", "positive": "b", "negative": "c"}, {"anchor": "a", "positive": "b"}]
    _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"d\.jsonl:2: 0 hard negatives where line 1 has 1"):
        embedding.read_examples(str(tmp_path / "d.jsonl"))
    glue_data.write_tsv(tmp_path / "e.tsv", ["text", "label"], [["x", "1"]])
    with pytest.raises(ValueError, match=r"e\.tsv:2: name the columns anchor, positive"):
        embedding.read_examples(str(tmp_path / "e.tsv"))
    glue_data.write_tsv(tmp_path / "f.tsv", ["sentence1", "sentence2", "score"], [["x", "y", "hi"]])
    with pytest.raises(ValueError, match=r"f\.tsv:2: score 'hi' is not a number"):
        embedding.read_examples(str(tmp_path / "f.tsv"))
    # A folder with nothing to evaluate on is refused before any work, naming what to add.
    glue_data.write_tsv(tmp_path / "g" / "train.tsv", ["anchor", "positive"], [["x", "y"]])
    settings = base.Settings(data_dir=str(tmp_path), max_seq_length=16)
    (problem,) = registry.get_task("embed:g").check(settings)
    assert "nothing to evaluate on: add dev.jsonl/dev.tsv" in problem


def test_grad_accumulation_is_refused_for_embeddings():
    config = models.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)  # fmt: skip
    objective = objectives.embedding_objective(objectives.Embedding())
    with pytest.raises(ValueError, match="shrink each example's in-batch negatives"):
        training.make_train_step(
            models.split_params(models.abstract_model(config, models.make_encoder))[0],
            None,
            OptimConfig(learning_rate=1e-3, grad_accum_steps=2),
            sharding.MeshConfig.rules,
            objective,
        )
