"""Multiple choice on SWAG (and any data in its CSV layout): reading, [B, choices, L]
features, accuracy.

SWAG's CSV files (`train.csv`, `val.csv`, `test.csv` of the release) hold per row a context
(`sent1`), the start of the next sentence (`sent2`), four endings (`ending0`..`ending3`) and,
except in the test file, the right one (`label`). Each choice is the pair
`[CLS] sent1 [SEP] sent2 + " " + ending [SEP]`, truncated as BERT's pairs are (one token at a
time from the longer text); the model scores each choice from its [CLS] and the best score
is the answer (BERT's SWAG setup).
"""

import csv
import dataclasses
import functools
import io
import os
from collections.abc import Sequence

import numpy as np

from bert_jax import files, objectives
from bert_jax.data import encoding
from bert_jax.tasks import base, glue

ENDINGS = ("ending0", "ending1", "ending2", "ending3")


@dataclasses.dataclass(frozen=True)
class Example:
    example_id: str
    context: str
    start: str
    endings: tuple[str, ...]
    label: int | None  # None in the unlabelled test file


def read_swag(path: str) -> list[Example]:
    """The rows of a SWAG CSV file.

    Raises:
      ValueError naming the file and line: a missing column, a row with another number of
      fields than the header, a label that is not the index of an ending.
    """
    with files.open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; a SWAG CSV starts with its header line")
        missing = [c for c in ("sent1", "sent2", *ENDINGS) if c not in header]
        if missing:
            raise ValueError(
                f"{path}:1: the header lacks the columns {missing}; SWAG's CSV has sent1, "
                f"sent2, ending0..ending3 and label"
            )
        at = {name: header.index(name) for name in header}
        examples = []
        for row in reader:
            line = reader.line_num
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{line}: {len(row)} fields where the header has {len(header)}"
                )
            label = None
            if "label" in at and row[at["label"]] != "":
                value = row[at["label"]]
                if value not in ("0", "1", "2", "3"):
                    raise ValueError(
                        f"{path}:{line}: label {value!r} is not the index of an ending (0-3)"
                    )
                label = int(value)
            example_id = row[at["fold-ind"]] if "fold-ind" in at else str(len(examples))
            examples.append(
                Example(
                    example_id,
                    row[at["sent1"]],
                    row[at["sent2"]],
                    tuple(row[at[e]] for e in ENDINGS),
                    label,
                )
            )
    return examples


def make_features(
    examples: Sequence[Example], tokenizer, max_seq_length: int
) -> dict[str, np.ndarray]:
    """input_ids, input_mask, segment_ids [N, choices, L] int32 and label [N] int32 (0 when
    unlabelled)."""
    choices = len(examples[0].endings)
    pairs = glue.Examples(
        [e.context for e in examples for _ in e.endings],
        [f"{e.start} {ending}".strip() for e in examples for ending in e.endings],
        None,
        [],
    )
    flat = encoding.encode(pairs, tokenizer, max_seq_length)
    out = {
        k: flat[k].reshape(len(examples), choices, max_seq_length)
        for k in ("input_ids", "input_mask", "segment_ids")
    }
    out["label"] = np.array([e.label or 0 for e in examples], np.int32)
    return out


def accuracy(examples: Sequence[Example], logits: np.ndarray) -> float:
    """The fraction of labelled examples whose best-scored ending is the right one."""
    labels = np.array([e.label for e in examples])
    return float((np.asarray(logits).argmax(-1) == labels).mean())


class SwagTask(base.Task):
    """Multiple choice (`swag`): the best of four endings, accuracy on `val.csv`; the test
    file's predictions as `fold-ind,label` rows."""

    architecture = "BertForMultipleChoice"
    name = "swag"
    folder = "SWAG"
    metrics = ("accuracy",)
    dev_names = ("dev",)
    # BERT-Base (Devlin et al., Table 4).
    published = {"accuracy": 81.6}
    num_labels = 1

    def objective(self, dropout):
        return objectives.multiple_choice(classifier_dropout=dropout)

    def feature_specs(self, settings):
        row = ((len(ENDINGS), settings.max_seq_length), np.dtype(np.int32))
        label = ((), np.dtype(np.int32))
        return {"input_ids": row, "input_mask": row, "segment_ids": row, "label": label}

    def _path(self, settings, name):
        return os.path.join(settings.data_dir, self.folder, name)

    def _splits(self, settings):
        names = {"train": "train.csv", "dev": "val.csv"}
        if files.isfile(self._path(settings, "test.csv")):
            names["test"] = "test.csv"
        return names

    def check(self, settings):
        def read(name, file):
            examples = read_swag(self._path(settings, file))
            if name != "test" and any(e.label is None for e in examples):
                raise ValueError(f"{self._path(settings, file)}: rows without a label")

        return base.problems_of(
            *(functools.partial(read, n, f) for n, f in self._splits(settings).items())
        )

    def load(self, settings, tokenizer):
        splits = {
            name: read_swag(self._path(settings, file))
            for name, file in self._splits(settings).items()
        }
        train = splits.pop("train")
        if settings.max_train_examples:
            train = train[: settings.max_train_examples]

        def split(examples):
            return base.Split(examples, make_features(examples, tokenizer, settings.max_seq_length))

        dev = {"dev": split(splits["dev"])}
        predict = {"test": split(splits["test"])} if "test" in splits else {}
        return base.TaskData(make_features(train, tokenizer, settings.max_seq_length), dev, predict)

    def evaluate(self, name, split, outputs):
        score = accuracy(split.examples, outputs)
        return {"accuracy": score, "score": score}

    def write_predictions(self, directory, name, split, outputs):
        path = os.path.join(directory, "predictions", f"swag_{name}.csv")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["fold-ind", "label"])
        for example, label in zip(split.examples, np.asarray(outputs).argmax(-1), strict=True):
            writer.writerow([example.example_id, int(label)])
        files.atomic_write(path, text.getvalue().encode())
        return path

    line_format = "`context ||| start of the next sentence ||| ending ||| ending ||| ...`"

    def from_lines(self, lines, tokenizer, settings):
        examples = []
        for i, line in enumerate(lines):
            texts = base.split_line(line, 2 + len(ENDINGS), self.name, self.line_format)
            examples.append(Example(str(i), texts[0], texts[1], tuple(texts[2:]), None))
        return base.Split(examples, make_features(examples, tokenizer, settings.max_seq_length))

    def answers(self, split, outputs):
        out = []
        for example, best in zip(split.examples, base.label_answers(outputs, ENDINGS), strict=True):
            choice = ENDINGS.index(best["label"])
            scores = list(best["scores"].values())
            out.append({"choice": choice, "ending": example.endings[choice], "scores": scores})
        return out
