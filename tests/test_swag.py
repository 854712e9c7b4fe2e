"""SWAG multiple choice: the CSV layout and its errors, [B, choices, L] features, and a tiny
model that learns a choice the text decides."""

import csv

import numpy as np
import pytest
import tiny_training

from bert_jax.data.tokenization import WordPieceTokenizer
from bert_jax.tasks import swag

HEADER = [
    "video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
    "ending0", "ending1", "ending2", "ending3", "label",
]  # fmt: skip


def _write(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_reading_the_csv_and_its_errors(tmp_path):
    row = [
        "v1",
        "7",
        "A man sits. He",
        "A man sits.",
        "He",
        "gold",
        "eats.",
        "runs.",
        "a",
        "b",
        "0",
    ]
    examples = swag.read_swag(_write(tmp_path / "val.csv", [row, [*row[:-1], ""]]))
    assert examples[0] == swag.Example("7", "A man sits.", "He", ("eats.", "runs.", "a", "b"), 0)
    assert examples[1].label is None  # the test file's rows have no label

    with pytest.raises(ValueError, match=r"lacks\.csv:1: the header lacks the columns \['ending3'"):
        swag.read_swag(_write(tmp_path / "lacks.csv", [row[:-2]], HEADER[:-2] + ["label"]))
    with pytest.raises(ValueError, match=r"short\.csv:3: 10 fields where the header has 11"):
        swag.read_swag(_write(tmp_path / "short.csv", [row, row[:-1]]))
    with pytest.raises(ValueError, match=r"label\.csv:2: label '4' is not the index"):
        swag.read_swag(_write(tmp_path / "label.csv", [[*row[:-1], "4"]]))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = [f"w{i}" for i in range(60)]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return WordPieceTokenizer(path)


def _choices(rng, n):
    """Words fall in three classes (w0-w19, w20-w39, w40-w59); the context's words are of one
    class, the right ending's of the same class, the wrong endings' of the other two."""

    def words(kind, k):
        return " ".join(f"w{20 * kind + j}" for j in rng.integers(0, 20, k))

    out = []
    for i in range(n):
        kind = int(rng.integers(0, 3))
        label = int(rng.integers(0, 4))
        endings = [
            words(kind if c == label else int(rng.choice([x for x in range(3) if x != kind])), 3)
            for c in range(4)
        ]
        context = words(kind, int(rng.integers(3, 8)))
        out.append(swag.Example(str(i), context, "", tuple(endings), label))
    return out


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_a_tiny_model_learns_a_choice_the_text_decides(family, tokenizer):
    """BertForMultipleChoice trained by the shared train step on [B, 4, L] batches: >= 90%
    held-out accuracy."""
    from bert_jax import objectives

    rng = np.random.default_rng(0)
    train, held_out = _choices(rng, 512), _choices(rng, 128)
    features = swag.make_features(train, tokenizer, 16)
    assert features["input_ids"].shape == (512, 4, 16)
    logits = tiny_training.train_and_predict(
        objectives.multiple_choice(),
        tiny_training.config(65, 16, family),
        features,
        swag.make_features(held_out, tokenizer, 16),
        steps=250,
        # ModernBERT's pre-norm layers without biases take a larger step here (its recipe's
        # peak rate is 8x BERT's too): at 2e-3 it reaches 0.83 in these steps, 0.9 in 500.
        learning_rate=2e-3 if family == "bert" else 4e-3,
        warmup=30,
    )
    assert logits.shape == (128, 4)
    assert swag.accuracy(held_out, logits) >= 0.9
