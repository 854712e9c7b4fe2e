"""Corpus reading, the default corpus, cached instances and the resumable batch iterator."""

import dataclasses

import numpy as np
import pytest

from bert_jax import input_pipeline as ip
from bert_jax.pretraining_data import MaskingConfig

SENTENCES = [
    "The cat sat on the mat.",
    "It was a sunny day in the garden.",
    "Birds were singing in the old oak tree.",
    "A dog barked somewhere far away.",
    "The children played football after school.",
    "Their mother called them in for dinner.",
]


def _write_corpus(path, n_docs=30):
    docs = ["\n".join(SENTENCES[i % 3 :] + SENTENCES[: i % 3]) for i in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _config(tmp_path, **overrides):
    config = ip.DataConfig(
        corpus=str(_write_corpus(tmp_path / "corpus.txt")),
        vocab_size=200,
        masking=MaskingConfig(max_seq_length=32, max_predictions_per_seq=5, dupe_factor=3),
        eval_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    return dataclasses.replace(config, **overrides)


def test_read_documents_splits_on_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a b.\nc d.\n\n\n e f.\n  \ng h.\ni j.\n")
    assert ip.read_documents([str(path)]) == [["a b.", "c d."], ["e f."], ["g h.", "i j."]]


def test_builds_and_caches_instances(tmp_path):
    config = _config(tmp_path)
    first = ip.load_pretraining_data(config)
    assert first.train["input_ids"].shape[1] == 32 and len(first.eval["input_ids"]) > 0
    tokens = set(first.tokenizer.tokenize(" ".join(SENTENCES)))
    assert "[UNK]" not in tokens and {"cat", "garden"} <= tokens  # vocabulary learned from it
    cached = list((tmp_path / "cache" / "instances").iterdir())
    assert len(cached) == 1
    second = ip.load_pretraining_data(config)  # from the cache: identical arrays
    np.testing.assert_array_equal(first.train["input_ids"], second.train["input_ids"])


def test_missing_corpus_and_single_sentence_corpus_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        ip.load_pretraining_data(_config(tmp_path, corpus=str(tmp_path / "nope*.txt")))
    flat = tmp_path / "flat.txt"
    flat.write_text("one sentence.\n\nanother document.\n\nand a third.\n")
    with pytest.raises(ValueError, match="no document with two or more sentences"):
        ip.load_pretraining_data(_config(tmp_path, corpus=str(flat)))
    assert not (tmp_path / "cache" / "instances").exists()  # nothing half-written


def test_stdlib_corpus_is_built_from_docstrings(tmp_path):
    path = ip.build_stdlib_corpus(str(tmp_path))
    documents = ip.read_documents([path])
    assert len(documents) > 300
    assert sum(len(d) >= 2 for d in documents) > 200
    text = open(path, encoding="utf-8").read()
    assert "Return" in text and "def " not in text.split("\n")[0]


def test_iterator_resumes_exactly_and_splits_by_process():
    arrays = {"x": np.arange(50)}
    it = ip.BatchIterator(arrays, 8, seed=1)
    for _ in range(7):  # crosses an epoch boundary (6 batches per epoch)
        next(it)
    saved = it.state()
    expected = [next(it)["x"] for _ in range(5)]
    resumed = ip.BatchIterator(arrays, 8, seed=1)
    resumed.restore(saved)
    np.testing.assert_array_equal([next(resumed)["x"] for _ in range(5)], expected)
    halves = [ip.BatchIterator(arrays, 8, seed=1, process_index=p, process_count=2) for p in (0, 1)]
    whole = ip.BatchIterator(arrays, 8, seed=1)
    for _ in range(3):
        joined = np.concatenate([next(h)["x"] for h in halves])
        assert sorted(joined) == sorted(next(whole)["x"])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        ip.BatchIterator(arrays, 8, seed=1, process_count=3)
