"""SQuAD: reading the official JSON, windows over long contexts, n-best decoding and the
official evaluation, against torchmetrics' SQuAD metric and hand-computed cases."""

import json

import numpy as np
import pytest
import tiny_training
import torch
from torchmetrics.functional.text import squad as torchmetrics_squad

from bert_jax.data.tokenization import WordPieceTokenizer
from bert_jax.tasks import squad, squad_eval

WORDS = [f"w{i}" for i in range(100)] + ["the", "cat", "sat", "(", ")", ",", ".", "##s"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return WordPieceTokenizer(path)


def _example(qas_id, context, answer=None, question="w1 w2", impossible=False):
    answers = ()
    if answer is not None:
        answers = (squad.Answer(answer, context.index(answer)),)
    return squad.Example(qas_id, question, context, answers, impossible)


def test_evaluation_matches_torchmetrics_squad():
    """Exact match and F1 as the official v1.1 script counts them: case, punctuation,
    articles and whitespace normalised, the best of several gold answers."""
    cases = [
        ("The Cat", ["the cat"]),
        ("cat.", ["a cat", "dog"]),
        ("  big   red dog ", ["big red dog"]),
        ("red dog", ["big red dog", "a red car"]),
        ("an apple pie", ["apple", "pie"]),
        ("1990", ["(1990)", "in 1990"]),
        ("Paris, France", ["paris"]),
        ("nothing alike", ["totally different"]),
        ("the the the", ["the"]),
        ("Ünïcode café", ["ünïcode CAFÉ!"]),
    ]
    examples = [
        squad.Example(str(i), "q", "", tuple(squad.Answer(g, 0) for g in golds))
        for i, (_, golds) in enumerate(cases)
    ]
    predictions = {str(i): p for i, (p, _) in enumerate(cases)}
    ours = squad_eval.evaluate(examples, predictions)
    reference = torchmetrics_squad(
        [{"prediction_text": p, "id": str(i)} for i, (p, _) in enumerate(cases)],
        [
            {"answers": {"answer_start": [0] * len(g), "text": g}, "id": str(i)}
            for i, (_, g) in enumerate(cases)
        ],
    )
    assert ours["total"] == len(cases)
    np.testing.assert_allclose(ours["exact"], float(reference["exact_match"]), rtol=1e-6)
    np.testing.assert_allclose(ours["f1"], float(reference["f1"]), rtol=1e-6)
    # Each question alone as well: the same per-question scores.
    for i, (p, golds) in enumerate(cases):
        one = torchmetrics_squad(
            [{"prediction_text": p, "id": "x"}],
            [{"answers": {"answer_start": [0] * len(golds), "text": golds}, "id": "x"}],
        )
        mine = squad_eval.evaluate([examples[i]], {str(i): p})
        assert torch.isclose(one["f1"], torch.tensor(mine["f1"], dtype=one["f1"].dtype)), p


def test_v2_scores_break_down_by_answerable_and_tune_the_null_threshold():
    """v2.0: an unanswerable question's gold is the empty answer; HasAns/NoAns scores; the
    best threshold on the null odds, as the official v2.0 script searches it (by hand)."""
    examples = [
        squad.Example("q1", "?", "", (squad.Answer("the cat", 0),)),
        squad.Example("q2", "?", "", (squad.Answer("big red dog", 0),)),
        squad.Example("q3", "?", "", (), True),
        squad.Example("q4", "?", "", (), True),
    ]
    scores = squad_eval.evaluate(examples, {"q1": "cat", "q2": "red dog", "q3": "", "q4": "x y"})
    # q1 exact (articles dropped); q2 F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8; q3 right; q4 wrong.
    assert scores["exact"] == pytest.approx(50.0) and scores["f1"] == pytest.approx(70.0)
    assert scores["HasAns_exact"] == pytest.approx(50.0)
    assert scores["HasAns_f1"] == pytest.approx(90.0)
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == pytest.approx(50.0)
    assert scores["HasAns_total"] == scores["NoAns_total"] == 2

    # Best non-null spans and null odds: answering nothing scores the 2 unanswerable ones;
    # from the lowest odds up, q1 (-2) gains 1 -> 3 of 4 (the best), q4 (0.5) loses 1, q2
    # (1.0) gains 0 (exact) or 0.8 (F1), q3 (3.0) loses 1.
    spans = {"q1": "cat", "q2": "red dog", "q3": "w1", "q4": "x y"}
    odds = {"q1": -2.0, "q2": 1.0, "q3": 3.0, "q4": 0.5}
    tuned = squad_eval.evaluate(examples, spans, odds)
    assert tuned["best_exact"] == pytest.approx(75.0) and tuned["best_exact_thresh"] == -2.0
    assert tuned["best_f1"] == pytest.approx(75.0) and tuned["best_f1_thresh"] == -2.0


def test_windows_cover_the_context_and_score_each_piece_once(tokenizer):
    """run_squad.py's windows: 60 context pieces, room for 27 per window (32 - 2 question
    pieces - 3 specials), 8 apart; each piece scored in exactly one window, the one where it
    has the most context; targets only in windows that hold the whole answer."""
    context = " ".join(f"w{i}" for i in range(60))
    example = _example("a", context, answer="w30 w31 w32")
    config = squad.WindowConfig(max_seq_length=32, doc_stride=8, max_query_length=4)
    features = squad.make_features([example], tokenizer, config)
    assert squad.windows(60, 27, 8) == [(0, 27), (8, 27), (16, 27), (24, 27), (32, 27), (40, 20)]
    assert len(features) == 6
    assert (features.input_ids[:, 0] == tokenizer.cls_id).all()
    assert (features.segment_ids[:, :4] == 0).all() and (features.segment_ids[:, 4] == 1).all()
    # Every context word is in some window, and scored in exactly one.
    scored = {}
    for row in range(len(features)):
        for pos in np.flatnonzero(features.max_context[row]):
            start, end = features.offsets[row, pos]
            assert context[start:end] not in scored
            scored[context[start:end]] = row
    assert sorted(scored, key=lambda w: int(w[1:])) == context.split()
    # w30 (piece 30) is in windows 2, 3 and 4 at positions 14, 6 and -: max context in 2
    # (min(14, 12) > min(6, 20)); window 4 starts at piece 32 and splits the answer.
    assert scored["w30"] == 2
    for row, (start, length) in enumerate(squad.windows(60, 27, 8)):
        s, e = features.start_positions[row], features.end_positions[row]
        if start <= 30 and 32 < start + length:
            a, b = features.offsets[row, s][0], features.offsets[row, e][1]
            assert context[a:b] == "w30 w31 w32"
        else:
            assert s == e == 0  # [CLS]: not in this window whole


def test_decoding_follows_max_context_answer_length_and_the_null_threshold(tokenizer):
    context = "the cat sat ( w1990 ) , w7 w8 w9 w10 w11 w12 w13 w14 w15 w16"
    examples = [_example("a", context, "cat sat")]
    config = squad.WindowConfig(max_seq_length=16, doc_stride=4, max_query_length=4)
    features = squad.make_features(examples, tokenizer, config)
    n = len(features)
    assert n > 1
    start = np.full((n, 16), -10.0)
    end = np.full((n, 16), -10.0)
    target = features.start_positions > 0
    row = int(
        np.flatnonzero(target & features.max_context[np.arange(n), features.start_positions])[0]
    )
    start[row, features.start_positions[row]] = 5.0
    end[row, features.end_positions[row]] = 5.0
    # A better-scoring span in another window, whose start piece is not max context there:
    # ignored.
    placed = False
    for other in [r for r in range(n) if r != row]:
        off = np.flatnonzero((features.offsets[other, :, 0] >= 0) & ~features.max_context[other])
        if len(off) and not placed:
            start[other, off[0]] = 9.0
            end[other, off[0]] = 9.0
            placed = True
    assert placed
    got = squad.decode(examples, features, start, end, squad.DecodeConfig(n_best_size=5))
    assert got["a"].text == "cat sat"
    probs = [p for _, p in got["a"].nbest]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)

    # max_answer_length: a 12-piece span is refused, the best short one wins.
    long_start, long_end = np.full((1, 32), -10.0), np.full((1, 32), -10.0)
    wide = squad.WindowConfig(max_seq_length=32, doc_stride=8, max_query_length=4)
    one = squad.make_features(examples, tokenizer, wide)
    first = 4  # [CLS] w1 w2 [SEP]
    long_start[0, first] = 8.0  # "the"
    long_end[0, first + 11] = 8.0  # w8: 12 pieces
    long_end[0, first + 2] = 1.0  # "sat": 3 pieces
    got = squad.decode(
        examples, one, long_start, long_end, squad.DecodeConfig(max_answer_length=10)
    )
    assert got["a"].text == "the cat sat"
    # The answer is the context's own text: "( w1990 )" keeps its characters and spaces.
    paren_start, paren_end = np.full((1, 32), -10.0), np.full((1, 32), -10.0)
    paren_start[0, first + 3], paren_end[0, first + 5] = 3.0, 3.0
    got = squad.decode(examples, one, paren_start, paren_end, squad.DecodeConfig())
    assert got["a"].text == "( w1990 )"

    # v2.0: [CLS]'s score against the best span's, by the threshold.
    null_start, null_end = long_start.copy(), long_end.copy()
    null_start[0, 0], null_end[0, 0] = 9.0, 8.5  # null 17.5 vs best span 8 + 1 = 9
    v2 = squad.DecodeConfig(max_answer_length=10, version_2_with_negative=True)
    got = squad.decode(examples, one, null_start, null_end, v2)["a"]
    assert got.text == "" and got.best_span == "the cat sat"
    assert got.null_odds == pytest.approx(17.5 - 9.0)
    lenient = squad.DecodeConfig(
        max_answer_length=10, version_2_with_negative=True, null_score_diff_threshold=10.0
    )
    assert squad.decode(examples, one, null_start, null_end, lenient)["a"].text == "the cat sat"


def _write(path, data):
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def test_reading_the_official_json_and_its_errors(tmp_path):
    context = "The cat sat on the mat."
    good = {
        "version": "v2.0",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": context,
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Who sat?",
                                "answers": [{"text": "The cat", "answer_start": 0}],
                            },
                            {
                                "id": "q2",
                                "question": "Who stood?",
                                "answers": [],
                                "plausible_answers": [{"text": "cat", "answer_start": 4}],
                                "is_impossible": True,
                            },
                        ],
                    }
                ],
            }
        ],
    }
    examples = squad.read_squad(_write(tmp_path / "good.json", good))
    assert [e.qas_id for e in examples] == ["q1", "q2"]
    assert examples[0].answers == (squad.Answer("The cat", 0),) and examples[1].is_impossible

    bad = tmp_path / "broken.json"
    bad.write_text('{"data": [\n  {"paragraphs": [\n    oops\n]}]}')
    with pytest.raises(ValueError, match=r"broken\.json:3: not valid JSON"):
        squad.read_squad(str(bad))

    shifted = json.loads(json.dumps(good))
    shifted["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 2
    path = _write(tmp_path / "shifted.json", shifted)
    line = next(i for i, t in enumerate(open(path), 1) if '"q1"' in t)
    with pytest.raises(ValueError, match=rf"shifted\.json:{line}: question 'q1'.*'e cat s'"):
        squad.read_squad(path)

    wrong = json.loads(json.dumps(good))
    wrong["data"][0]["paragraphs"][0]["qas"][1]["answers"] = [{"text": "cat", "answer_start": 4}]
    with pytest.raises(ValueError, match="is_impossible but has answers"):
        squad.read_squad(_write(tmp_path / "wrong.json", wrong))


def test_prediction_files_have_the_official_layouts(tmp_path):
    predictions = {
        "q1": squad.Prediction("the cat", "the cat", -3.0, (("the cat", 0.7), ("cat", 0.3))),
        "q2": squad.Prediction("", "mat", 2.5, (("", 0.6), ("mat", 0.4))),
    }
    squad.write_predictions(str(tmp_path), predictions, version_2=True)
    assert json.loads((tmp_path / "predictions.json").read_text()) == {"q1": "the cat", "q2": ""}
    assert json.loads((tmp_path / "null_odds.json").read_text()) == {"q1": -3.0, "q2": 2.5}
    nbest = json.loads((tmp_path / "nbest_predictions.json").read_text())
    assert nbest["q2"] == [{"text": "", "probability": 0.6}, {"text": "mat", "probability": 0.4}]


def _marked_examples(rng, n, prefix):
    """Contexts of random words with the answer between '(' and ')': a task the text decides."""
    out = []
    for i in range(n):
        words = [f"w{j}" for j in rng.integers(3, 100, rng.integers(8, 32))]
        at, size = int(rng.integers(0, len(words))), int(rng.integers(1, 4))
        answer = " ".join(f"w{j}" for j in rng.integers(3, 100, size))
        left, right = " ".join(words[:at]), " ".join(words[at:])
        context = f"{left} ( {answer} ) {right}".strip()
        start = context.index(f"( {answer} )") + 2
        out.append(squad.Example(f"{prefix}{i}", "w1 w2", context, (squad.Answer(answer, start),)))
    return out


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_a_tiny_model_learns_a_marked_span(family, tokenizer):
    """BertForQuestionAnswering trained by the shared train step on windows of 32 (contexts
    longer than a window included) finds held-out answers: >= 90% exact match."""
    from bert_jax import objectives

    rng = np.random.default_rng(0)
    train, held_out = _marked_examples(rng, 512, "t"), _marked_examples(rng, 100, "h")
    windows = squad.WindowConfig(max_seq_length=32, doc_stride=12, max_query_length=4)
    features = squad.make_features(train, tokenizer, windows)
    assert len(features) > len(train)  # some contexts need two windows
    test = squad.make_features(held_out, tokenizer, windows)
    starts, ends = tiny_training.train_and_predict(
        objectives.QUESTION_ANSWERING,
        tiny_training.config(len(WORDS) + 5, 32, family),
        features.inputs(),
        test.inputs(),
        steps=600,
        learning_rate=2e-3,
        warmup=30,
    )
    predictions = squad.decode(held_out, test, starts, ends, squad.DecodeConfig())
    scores = squad_eval.evaluate(held_out, {k: p.text for k, p in predictions.items()})
    assert scores["exact"] >= 90.0, scores


def test_sentencepiece_windows_map_answers_back_to_the_text(tmp_path):
    """ALBERT's tokenizer gives the same pieces word by word as for the whole text, and the
    pieces' spans give back the answer's exact characters (accents and quotes included)."""
    from bert_jax.data import tokenization

    rng = np.random.default_rng(0)
    lines = [
        " ".join(f"tok{i} word{j}" for i, j in rng.integers(0, 50, (8, 2))) for _ in range(300)
    ]
    model = tokenization.train_sentencepiece(
        iter(lines + ["café naïve ``quoted'' 1990, end"] * 5),
        str(tmp_path / "sp.model"),
        vocab_size=120,
    )
    tok = tokenization.SentencePieceTokenizer(model)
    context = "tok3 word17  café tok42, 1990, ``quoted'' naïve word9 tok11"
    ((ids, offsets),) = tok.encode_offsets([context])
    assert ids == tok.encode(context)
    assert all(0 <= a <= b <= len(context) for a, b in offsets)
    for answer in ("word17", "café tok42", "1990", "``quoted'' naïve", "tok11"):
        example = squad.Example(
            "a", "tok1", context, (squad.Answer(answer, context.index(answer)),)
        )
        config = squad.WindowConfig(max_seq_length=64, doc_stride=16, max_query_length=8)
        features = squad.make_features([example], tok, config)
        row = int(np.flatnonzero(features.start_positions > 0)[0])
        s, e = features.start_positions[row], features.end_positions[row]
        got = context[features.offsets[row, s, 0] : features.offsets[row, e, 1]]
        assert got == answer, (answer, got)
