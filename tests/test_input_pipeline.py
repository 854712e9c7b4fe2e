"""Corpus reading, sharded preprocessing, and the grain loader's determinism and resume."""

import dataclasses
import os

import numpy as np
import pytest

from bert_jax.data import corpus
from bert_jax.data import input_pipeline as ip
from bert_jax.data.pretraining_data import MaskingConfig

SENTENCES = [
    "The cat sat on the mat.",
    "It was a sunny day in the garden.",
    "Birds were singing in the old oak tree.",
    "A dog barked somewhere far away.",
    "The children played football after school.",
    "Their mother called them in for dinner.",
]


def _write_corpus(path, n_docs=40):
    # Every sentence carries its document's number, so that no two pairs are alike.
    docs = [
        "\n".join(f"{s[:-1]} in story {i}." for s in SENTENCES[i % 3 :] + SENTENCES[: i % 3])
        for i in range(n_docs)
    ]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _config(tmp_path, **overrides):
    config = ip.DataConfig(
        corpus=str(_write_corpus(tmp_path / "corpus.txt")),
        vocab_size=200,
        masking=MaskingConfig(max_seq_length=32, max_predictions_per_seq=5, dupe_factor=3),
        eval_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
        num_shards=3,
        preprocess_workers=1,
    )
    return dataclasses.replace(config, **overrides)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_text_documents_and_bad_input_are_counted(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes(b"a b.\nc d.\n\n\n e f.\n  \ng h.\n\xff\xfe broken.\n" + b"x" * 30000 + b"\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    stats = corpus.CorpusStats()
    docs = list(corpus.iter_text_documents([str(good), str(empty)], stats))
    assert docs == [["a b.", "c d."], ["e f."], ["g h.", "\ufffd\ufffd broken."]]
    assert stats.invalid_utf8 == {str(good): 1} and stats.long_lines == {str(good): 1}
    report = "\n".join(stats.report())
    assert "empty.txt" in report and "invalid UTF-8" in report and "20000 characters" in report


def test_sentence_splitter():
    text = "First one. Second (with parens)! Third?\nNew paragraph e.g. here"
    assert corpus.split_sentences(text) == [
        "First one.",
        "Second (with parens)!",
        "Third?",
        "New paragraph e.g. here",
    ]


def test_prepares_shards_once_and_skips_finished_ones(tmp_path, capsys):
    config = _config(tmp_path)
    data = ip.load_pretraining_data(config)
    counts = data.metadata["counts"]
    assert counts["train"] > 0 and counts["eval"] > 0 and counts["documents"] == 40
    shards = sorted(os.listdir(data.directory))
    assert sum(n.startswith("train-") for n in shards) == 3
    # An interrupted run: metadata and one shard's stats gone, a stray temporary file left.
    os.remove(os.path.join(data.directory, "metadata.json"))
    os.remove(os.path.join(data.directory, "stats-00001.json"))
    (tmp_path / "stray.tmp").write_text("half")
    kept = os.path.getmtime(os.path.join(data.directory, "train-00000-of-00003.array_record"))
    again = ip.load_pretraining_data(config)
    assert again.metadata == data.metadata
    assert (
        os.path.getmtime(os.path.join(data.directory, "train-00000-of-00003.array_record")) == kept
    )


def test_shards_of_another_tokenizer_are_refused(tmp_path):
    shared = str(tmp_path / "pairs")
    ip.load_pretraining_data(_config(tmp_path, preprocessed_dir=shared))
    with pytest.raises(ValueError, match="vocab_sha256"):
        ip.load_pretraining_data(_config(tmp_path, preprocessed_dir=shared, vocab_size=150))


def test_unusable_corpora_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        ip.load_pretraining_data(_config(tmp_path, corpus=str(tmp_path / "nope*.txt")))
    flat = tmp_path / "flat.txt"
    flat.write_text("".join(f"sentence number {i} stands alone.\n\n" for i in range(30)))
    with pytest.raises(ValueError, match="30 documents, of which 30 have a single sentence"):
        ip.load_pretraining_data(_config(tmp_path, corpus=str(flat)))


def test_resumed_iterator_yields_exactly_the_uninterrupted_batches(tmp_path):
    data = ip.load_pretraining_data(_config(tmp_path))
    straight = _take(data.train_iterator(8, seed=3), 40)  # several epochs
    first = data.train_iterator(8, seed=3)
    _take(first, 17)
    state = first.get_state()
    resumed = data.train_iterator(8, seed=3)
    resumed.set_state(state)
    for a, b in zip(straight[17:], _take(resumed, 23), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_dynamic_masks_change_per_epoch_static_ones_do_not(tmp_path):
    for dynamic in (True, False):
        masking = MaskingConfig(
            max_seq_length=32, max_predictions_per_seq=5, dupe_factor=1, dynamic_masking=dynamic
        )
        data = ip.load_pretraining_data(_config(tmp_path, masking=masking))
        n = len(data._source("train"))
        epochs = _take(data.train_iterator(n, seed=0), 2)  # one batch = one epoch

        def by_pair(batch):
            labels = batch["masked_lm_ids"] * (batch["masked_lm_weights"] > 0)
            original = batch["input_ids"].copy()
            rows = np.arange(len(original))[:, None]
            original[rows, batch["masked_lm_positions"]] = np.where(
                batch["masked_lm_weights"] > 0, labels, original[rows, batch["masked_lm_positions"]]
            )
            order = np.lexsort(original.T[::-1])
            return original[order], batch["masked_lm_positions"][order]

        (orig0, pos0), (orig1, pos1) = by_pair(epochs[0]), by_pair(epochs[1])
        np.testing.assert_array_equal(orig0, orig1)  # the same pairs each epoch
        assert np.array_equal(pos0, pos1) != dynamic


def test_processes_split_each_global_batch(tmp_path):
    data = ip.load_pretraining_data(_config(tmp_path))
    whole = _take(data.train_iterator(8, seed=1), 5)
    halves = [
        _take(data.train_iterator(8, seed=1, process_index=p, process_count=2), 5) for p in (0, 1)
    ]
    for step in range(5):  # process 0 has the first 4 rows, process 1 the last 4
        for key in whole[step]:
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.train_iterator(8, seed=1, process_count=3)


def test_eval_batches_are_fixed(tmp_path):
    data = ip.load_pretraining_data(_config(tmp_path))
    a, b = data.eval_batches(4, 2), data.eval_batches(4, 2)
    assert len(a) == 2 and a[0]["input_ids"].shape == (4, 32)
    np.testing.assert_array_equal(a[1]["masked_lm_positions"], b[1]["masked_lm_positions"])


def test_stdlib_corpus_is_built_from_docstrings(tmp_path):
    path = corpus.build_stdlib_corpus(str(tmp_path))
    documents = list(corpus.iter_text_documents([path], corpus.CorpusStats()))
    assert len(documents) > 300
    assert sum(len(d) >= 2 for d in documents) > 200
    assert "Return" in open(path, encoding="utf-8").read()


def test_tfds_corpus_round_trip(tmp_path):
    text = _write_corpus(tmp_path / "corpus.txt")
    builder = corpus.make_text_corpus_builder([str(text)], str(tmp_path / "tfds"))
    builder.download_and_prepare()
    config = _config(
        tmp_path,
        corpus="",
        tfds_name="bert_text_corpus",
        tfds_data_dir=str(tmp_path / "tfds"),
        tokenizer="sentencepiece",
        vocab_size=120,
    )
    data = ip.load_pretraining_data(config)
    assert data.metadata["counts"]["documents"] == 40
    (batch,) = _take(data.train_iterator(4, seed=0), 1)
    assert (batch["input_ids"][:, 0] == data.tokenizer.cls_id).all()


def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
    in_process = ip.load_pretraining_data(_config(tmp_path))
    workers = ip.load_pretraining_data(_config(tmp_path, loader_workers=2))
    expected = _take(in_process.train_iterator(8, seed=5), 12)
    iterator = workers.train_iterator(8, seed=5)
    got = _take(iterator, 6)
    state = iterator.get_state()
    resumed = workers.train_iterator(8, seed=5)
    resumed.set_state(state)
    got += _take(resumed, 6)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["masked_lm_positions"], b["masked_lm_positions"])
