"""CoNLL NER: entity-level scores against seqeval on generated tag sequences (IOB1, IOB2,
malformed), the column files and their errors, and a tiny tagger that learns."""

import numpy as np
import pytest
import tiny_training
from seqeval import metrics as seqeval
from seqeval.scheme import IOB2

from bert_jax.data.tokenization import WordPieceTokenizer
from bert_jax.tasks import conll

TYPES = ("PER", "LOC", "ORG")


def _random_tags(rng, n, scheme):
    """Tag sequences of a scheme; 'any' draws every tag freely (malformed sequences:
    stray I-, type changes inside an entity, E-/S- mixed in)."""
    out = []
    for _ in range(n):
        length = int(rng.integers(1, 15))
        if scheme == "any":
            pool = ["O"] + [f"{p}-{t}" for p in "BIES" for t in TYPES]
            out.append([str(rng.choice(pool)) for _ in range(length)])
            continue
        tags, previous = [], "O"
        for _ in range(length):
            if rng.random() < 0.4:
                tag = "O"
            else:
                kind = str(rng.choice(TYPES))
                inside = previous != "O" and previous[2:] == kind and rng.random() < 0.6
                if scheme == "iob2":
                    tag = f"I-{kind}" if inside else f"B-{kind}"
                else:  # IOB1: I- unless a new entity touches one of its type
                    touches = previous != "O" and previous[2:] == kind and not inside
                    tag = f"B-{kind}" if touches else f"I-{kind}"
            tags.append(tag)
            previous = tag
        out.append(tags)
    return out


def _perturb(rng, sequences):
    """Predictions: the gold sequences with some tags replaced at random."""
    pool = ["O"] + [f"{p}-{t}" for p in "BI" for t in TYPES]
    out = []
    for tags in sequences:
        tags = list(tags)
        for i in range(len(tags)):
            if rng.random() < 0.2:
                tags[i] = str(rng.choice(pool))
        out.append(tags)
    return out


@pytest.mark.parametrize("scheme", ["iob1", "iob2", "any"])
def test_entity_scores_equal_seqeval(scheme):
    rng = np.random.default_rng({"iob1": 0, "iob2": 1, "any": 2}[scheme])
    gold = _random_tags(rng, 300, scheme)
    pool = ["O"] + [f"{p}-{t}" for p in "BIES" for t in TYPES]
    if scheme == "any":  # random tags of the same lengths
        predicted = [[str(rng.choice(pool)) for _ in tags] for tags in gold]
    else:
        predicted = _perturb(rng, gold)
    ours = conll.entity_scores(gold, predicted)
    for name, fn in (
        ("precision", seqeval.precision_score),
        ("recall", seqeval.recall_score),
        ("f1", seqeval.f1_score),
    ):
        assert ours[name] == pytest.approx(fn(gold, predicted), abs=1e-12), name
    report = seqeval.classification_report(gold, predicted, output_dict=True, zero_division=0)
    for kind, scores in ours["per_type"].items():
        assert scores["f1"] == pytest.approx(report[kind]["f1-score"], abs=1e-12), kind
        assert scores["support"] == report[kind]["support"]
    # Strict IOB2 (well-formed entities only): seqeval's strict mode on IOB2 sequences.
    if scheme == "iob1":
        gold = [conll.iob1_to_iob2(t) for t in gold]
        predicted = [conll.iob1_to_iob2(t) for t in predicted]
    if scheme == "any":  # malformed IOB2: stray I-, type changes (strict takes no E-/S-)
        iob = ["O"] + [f"{p}-{t}" for p in "BI" for t in TYPES]
        gold = [[str(rng.choice(iob)) for _ in tags] for tags in gold]
        predicted = [[str(rng.choice(iob)) for _ in tags] for tags in gold]
        with pytest.raises(ValueError, match="strict IOB2 scoring takes O, B- and I- tags"):
            conll.entity_scores([["S-PER"]], [["O"]], strict=True)
    strict = conll.entity_scores(gold, predicted, strict=True)
    expected = seqeval.f1_score(gold, predicted, mode="strict", scheme=IOB2)
    assert strict["f1"] == pytest.approx(expected, abs=1e-12)


def test_iob1_converts_to_iob2_with_the_same_entities():
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG"]
    iob2 = conll.iob1_to_iob2(iob1)
    assert iob2 == ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG"]
    assert conll.entities(iob1) == conll.entities(iob2) == conll.entities(iob2, strict=True)


def test_reading_the_column_format_and_its_errors(tmp_path):
    good = tmp_path / "train.txt"
    good.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\n\n"
        "Peter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\n\n"
        "-DOCSTART- -X- -X- O\n\nBRUSSELS NNP B-NP I-LOC\n"
    )
    sentences = conll.read_conll(str(good))
    assert [s.words for s in sentences] == [
        ("EU", "rejects", "German"),
        ("Peter", "Blackburn"),
        ("BRUSSELS",),
    ]
    assert sentences[0].tags == ("I-ORG", "O", "I-MISC")
    assert [s.document for s in sentences] == [0, 0, 1]

    columns = tmp_path / "columns.txt"
    columns.write_text("EU NNP B-NP I-ORG\nrejects B-VP O\n")
    with pytest.raises(ValueError, match=r"columns\.txt:2: 3 columns where line 1 has 4"):
        conll.read_conll(str(columns))
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("EU NNP B-NP I-ORG\n\nParis NNP B-NP I-CITY\n")
    with pytest.raises(ValueError, match=r"unknown\.txt:3: the tag 'I-CITY' is not one of"):
        conll.read_conll(str(unknown), labels=["O", "I-ORG", "B-ORG"])
    wrong_column = tmp_path / "pos.txt"
    wrong_column.write_text("EU NNP B-NP I-ORG\n")
    with pytest.raises(ValueError, match=r"pos\.txt:1: 'NNP' is not a tag.*tag_column=1"):
        conll.read_conll(str(wrong_column), tag_column=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = [f"w{i}" for i in range(60)] + ["##x"]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return WordPieceTokenizer(path)


def _tagged(rng, n):
    """Sentences where w50-w59 are person names and w40-w49 places (runs of 1-3 words, never
    touching another), so the text decides every tag; some words split into two pieces
    (wNx -> wN ##x)."""
    sentences = []
    for _ in range(n):
        words, tags = [], []
        while len(words) < rng.integers(5, 20):
            r = rng.random()
            if r < 0.35 and (not tags or tags[-1] == "O"):  # entities never touch
                kind, base = ("PER", 50) if r < 0.2 else ("LOC", 40)
                for k in range(int(rng.integers(1, 4))):
                    words.append(f"w{base + rng.integers(0, 10)}")
                    tags.append(f"{'B' if k == 0 else 'I'}-{kind}")
            else:
                word = f"w{rng.integers(0, 40)}"
                words.append(word + ("x" if rng.random() < 0.2 else ""))
                tags.append("O")
        sentences.append(conll.Sentence(tuple(words), tuple(tags)))
    return sentences


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_a_tiny_tagger_learns_entities_the_text_decides(family, tokenizer, tmp_path):
    """BertForTokenClassification trained by the shared train step, rows of 16 (long
    sentences continue in the next row), labels on first pieces: >= 95% entity F1 held out;
    the predictions file is conlleval's layout."""
    from bert_jax import objectives

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    rng = np.random.default_rng(0)
    train, held_out = _tagged(rng, 400), _tagged(rng, 100)
    features = conll.make_features(train, tokenizer, labels, 16)
    assert len(features) > len(train)  # long sentences take two rows
    # Only first pieces carry labels: one per word.
    assert features.label_weights.sum() == sum(len(s.words) for s in train)
    test = conll.make_features(held_out, tokenizer, labels, 16)
    logits = tiny_training.train_and_predict(
        objectives.token_classification(len(labels)),
        tiny_training.config(66, 16, family),
        features.inputs(),
        test.inputs(),
        steps=1000,
        learning_rate=3e-3,
        warmup=50,
    )
    predicted = conll.decode(held_out, test, logits, labels)
    scores = conll.entity_scores([list(s.tags) for s in held_out], predicted)
    assert scores["f1"] >= 0.95, scores
    assert scores["f1"] == pytest.approx(
        seqeval.f1_score([list(s.tags) for s in held_out], predicted)
    )
    path = tmp_path / "predictions.txt"
    conll.write_predictions(str(path), held_out, predicted)
    first = path.read_text().split("\n\n")[0].splitlines()
    assert [line.split()[:2] for line in first] == [
        [w, t] for w, t in zip(held_out[0].words, held_out[0].tags, strict=True)
    ]
