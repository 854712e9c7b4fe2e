"""Instances follow the original create_pretraining_data rules, checked from their contents."""

import numpy as np
import pytest

from bert_jax.data import pretraining_data as pd

IDS = pd.SpecialIds(cls_id=2, sep_id=3, mask_id=4, vocab_size=5000)


def _corpus(n_docs=60, n_sents=12, seed=0):
    """Token t = 1000 + 50 * doc + sentence, so every token tells where it came from."""
    rng = np.random.default_rng(seed)
    return [
        [[1000 + 50 * d + s] * int(rng.integers(3, 12)) for s in range(n_sents)]
        for d in range(n_docs)
    ]


def _origin(tokens):
    return [((t - 1000) // 50, (t - 1000) % 50) for t in tokens]


def _split(row, inst):
    n = int(inst["input_mask"][row].sum())
    ids = inst["input_ids"][row, :n].copy()
    k = int(inst["masked_lm_weights"][row].sum())
    pos = inst["masked_lm_positions"][row, :k]
    ids[pos] = inst["masked_lm_ids"][row, :k]  # undo the masking
    seps = np.flatnonzero(ids == IDS.sep_id)
    return ids, seps, n


def test_layout_segments_and_next_sentence_semantics():
    config = pd.MaskingConfig(max_seq_length=64, dupe_factor=2)
    inst = pd.create_instances(_corpus(), config, IDS, seed=1)
    labels = inst["next_sentence_labels"]
    assert 0.4 < labels.mean() < 0.6
    for row in range(len(labels)):
        ids, seps, n = _split(row, inst)
        assert n <= 64 and ids[0] == IDS.cls_id and len(seps) == 2 and seps[1] == n - 1
        segments = inst["segment_ids"][row, :n]
        assert (segments[: seps[0] + 1] == 0).all() and (segments[seps[0] + 1 :] == 1).all()
        assert (inst["input_ids"][row, n:] == 0).all() and (inst["segment_ids"][row, n:] == 0).all()
        a, b = _origin(ids[1 : seps[0]]), _origin(ids[seps[0] + 1 : n - 1])
        assert len({d for d, _ in a}) == 1
        if labels[row] == 0:  # B is the true continuation of A in the same document
            assert {d for d, _ in b} == {a[0][0]}
            assert min(s for _, s in b) >= max(s for _, s in a)
        else:
            assert a[0][0] not in {d for d, _ in b}


def test_masking_rates():
    config = pd.MaskingConfig(max_seq_length=128, max_predictions_per_seq=80, dupe_factor=4)
    inst = pd.create_instances(_corpus(n_docs=80), config, IDS, seed=2)
    weights = inst["masked_lm_weights"]
    n_tokens = inst["input_mask"].sum(1)
    n_masked = weights.sum(1)
    expected = np.maximum(1, np.round(n_tokens * 0.15))
    np.testing.assert_array_equal(n_masked, expected)
    real = weights > 0
    pos = inst["masked_lm_positions"][real]
    rows = np.nonzero(real)[0]
    shown = inst["input_ids"][rows, pos]
    original = inst["masked_lm_ids"][real]
    masked = (shown == IDS.mask_id).mean()
    kept = (shown == original).mean()
    assert abs(masked - 0.8) < 0.02
    assert abs(kept - 0.1) < 0.015
    assert abs(1 - masked - kept - 0.1) < 0.015
    assert not np.isin(original, [IDS.cls_id, IDS.sep_id]).any()
    assert (inst["input_mask"][rows, pos] == 1).all()  # never a padding position
    for r in range(len(weights)):  # positions are sorted and distinct, as in the original
        p = inst["masked_lm_positions"][r, : int(n_masked[r])]
        assert (np.diff(p) > 0).all()


def test_whole_word_masking_masks_all_pieces_of_a_word():
    is_cont = np.zeros(IDS.vocab_size, bool)
    is_cont[3000:] = True
    ids = pd.SpecialIds(2, 3, 4, IDS.vocab_size, is_continuation=is_cont)
    word = [1500, 3001, 3002]  # one word of three pieces
    docs = [[word * 3, word * 2, word * 4, word * 3] for _ in range(20)]
    config = pd.MaskingConfig(max_seq_length=64, whole_word_mask=True, dupe_factor=2)
    inst = pd.create_instances(docs, config, ids, seed=3)
    for r in range(len(inst["input_ids"])):
        k = int(inst["masked_lm_weights"][r].sum())
        chosen = set(inst["masked_lm_positions"][r, :k].tolist())
        ids_row, _, n = _split(r, inst)
        words, current = [], None
        for i in range(1, n):  # group each word's pieces, as the row actually holds them
            if is_cont[ids_row[i]] and current is not None:
                current.add(i)
            else:
                current = {i} if ids_row[i] == 1500 else None
                if current is not None:
                    words.append(current)
        assert words
        for group in words:
            assert not (group & chosen) or group <= chosen


def test_deterministic_for_a_seed():
    config = pd.MaskingConfig(max_seq_length=32, dupe_factor=1)
    a = pd.create_instances(_corpus(10), config, IDS, seed=5)
    b = pd.create_instances(_corpus(10), config, IDS, seed=5)
    c = pd.create_instances(_corpus(10), config, IDS, seed=6)
    for key in pd.FEATURES:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["input_ids"], c["input_ids"])


def test_corpus_without_multi_sentence_documents_is_rejected():
    with pytest.raises(ValueError, match="no document has two or more sentences"):
        pd.create_instances([[[5, 6, 7]], [[8, 9]]], pd.MaskingConfig(), IDS, seed=0)


def test_sentence_order_prediction_swaps_consecutive_segments():
    config = pd.MaskingConfig(max_seq_length=64, dupe_factor=2, next_sentence="sop")
    inst = pd.create_instances(_corpus(), config, IDS, seed=7)
    labels = inst["next_sentence_labels"]
    assert 0.4 < labels.mean() < 0.6
    for row in range(len(labels)):
        ids, seps, n = _split(row, inst)
        a, b = _origin(ids[1 : seps[0]]), _origin(ids[seps[0] + 1 : n - 1])
        assert {d for d, _ in a} == {d for d, _ in b}  # never another document
        if labels[row] == 0:
            assert max(s for _, s in a) <= min(s for _, s in b)
        else:
            assert max(s for _, s in b) <= min(s for _, s in a)


def _neighbour_masked_rate(ngram_max):
    config = pd.MaskingConfig(max_seq_length=128, dupe_factor=3, ngram_max=ngram_max)
    inst = pd.create_instances(_corpus(n_docs=40), config, IDS, seed=8)
    masked = np.zeros(inst["input_ids"].shape, bool)
    rows, cols = np.nonzero(inst["masked_lm_weights"] > 0)
    masked[rows, inst["masked_lm_positions"][rows, cols]] = True
    expected = np.minimum(20, np.maximum(1, np.round(inst["input_mask"].sum(1) * 0.15)))
    np.testing.assert_array_equal(masked.sum(1), expected)  # the budget holds for spans too
    return (masked[:, :-1] & masked[:, 1:]).sum() / masked[:, :-1].sum()


def test_ngram_masking_masks_spans():
    single, spans = _neighbour_masked_rate(1), _neighbour_masked_rate(3)
    assert single < 0.25  # about the masking rate when positions are drawn independently
    # p(n) = 6/11, 3/11, 2/11 for n = 1, 2, 3: 18/11 tokens and 7/11 adjacent pairs per span,
    # so 7/18 = 0.39 of the masked tokens are followed by one of their span (less at the
    # budget's edge, where spans are shortened).
    assert spans > 0.33
