"""A user's own data as tasks: `classify:<folder>` (sentence or pair classification from
`.tsv` or `.jsonl`) and `tag:<folder>` (CoNLL columns).

A user's own data, in `<data_dir>/<folder>/` with a `labels.txt` (one label per line):
- `classify:<folder>`: `train`, `dev` and optionally `test` as `.tsv` (a header naming the
  columns `text`, optionally `text_b`, and `label`; `id` optional) or `.jsonl` (objects with
  the same keys); accuracy and macro F1; test predictions as `id<TAB>prediction`.
- `tag:<folder>`: `train.txt`, `dev.txt` and optionally `test.txt` in CoNLL columns (the tag
  last); entity precision, recall and F1 (IOB1 read as IOB2); test predictions in conlleval's
  layout.
"""

import functools
import os

import numpy as np

from bert_jax import files, objectives
from bert_jax.data import encoding
from bert_jax.tasks import base, conll, glue


def read_labels(folder: str) -> tuple[str, ...]:
    path = os.path.join(folder, "labels.txt")
    if not files.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: a task on your own data lists its labels there, one per line"
        )
    with files.open(path, encoding="utf-8") as f:
        labels = tuple(line.strip() for line in f if line.strip())
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"{path}: needs two or more distinct labels, one per line; got {labels}")
    return labels


def read_classification(path: str, labels: tuple[str, ...]) -> glue.Examples:
    """A `.tsv` (header with text, optional text_b, label, optional id) or `.jsonl` file."""
    rows = base.read_rows(path)
    if rows and "text" not in rows[0][1]:
        raise ValueError(
            f"{path}:{rows[0][0]}: the columns must include 'text' (and 'label'; 'text_b', "
            f"'id' optional), got {sorted(rows[0][1])}"
        )
    if not rows:
        raise ValueError(f"{path}: no examples")
    text_a, text_b, label_ids, index = [], [], [], []
    pairs = "text_b" in rows[0][1]
    for number, row in rows:
        fields = ("text", "text_b") if pairs else ("text",)
        if not all(isinstance(row.get(k), str) for k in fields):
            raise ValueError(f"{path}:{number}: {' and '.join(fields)} must be text")
        label = row.get("label")
        if label is not None and str(label) not in labels:
            raise ValueError(
                f"{path}:{number}: unknown label {label!r}; labels.txt lists {list(labels)}"
            )
        text_a.append(row["text"])
        text_b.append(row.get("text_b", ""))
        label_ids.append(labels.index(str(label)) if label is not None else -1)
        index.append(str(row.get("id", len(index))))
    return glue.Examples(text_a, text_b if pairs else None, np.array(label_ids), index)


class ClassifyTask(base.Task):
    """Your own sentence (pair) classification data (`classify:<folder>`)."""

    architecture = "BertForSequenceClassification"
    metrics = ("accuracy", "macro_f1")
    dev_names = ("dev",)
    packable = True

    def __init__(self, folder: str):
        self.folder, self.name = folder, f"classify:{folder}"
        self.published = {}

    def _dir(self, settings):
        return os.path.join(settings.data_dir, self.folder)

    def _file(self, settings, split) -> str | None:
        for ext in (".tsv", ".jsonl"):
            path = os.path.join(self._dir(settings), split + ext)
            if files.isfile(path):
                return path
        return None

    def _labels(self, settings):
        self.label_names = read_labels(self._dir(settings))
        self.num_labels = len(self.label_names)
        return self.label_names

    def prepare(self, settings):
        self._labels(settings)

    def check(self, settings):
        try:
            labels = self._labels(settings)
        except (OSError, ValueError) as e:
            return [str(e)]

        def read(split):
            path = self._file(settings, split)
            if path is None:
                if split != "test":
                    raise ValueError(f"{self._dir(settings)} has no {split}.tsv or {split}.jsonl")
                return
            examples = read_classification(path, labels)
            if split != "test" and (examples.labels < 0).any():
                raise ValueError(f"{path}: rows without a label")

        return base.problems_of(*(functools.partial(read, s) for s in ("train", "dev", "test")))

    def objective(self, dropout):
        return objectives.classification(self.num_labels, classifier_dropout=dropout)

    def load(self, settings, tokenizer):
        labels = self._labels(settings)

        def read(split):
            examples = read_classification(self._file(settings, split), labels)
            features = encoding.encode(examples, tokenizer, settings.max_seq_length)
            features["label"] = np.maximum(features["label"], 0).astype(np.int32)
            return examples, features

        train = read("train")[1]
        if settings.max_train_examples:
            train = {k: v[: settings.max_train_examples] for k, v in train.items()}
        dev = base.Split(*read("dev"))
        predict = {"test": base.Split(*read("test"))} if self._file(settings, "test") else {}
        return base.TaskData(train, {"dev": dev}, predict)

    def evaluate(self, name, split, outputs):
        import sklearn.metrics as skm

        predicted, gold = np.asarray(outputs).argmax(-1), split.examples.labels
        accuracy = float(skm.accuracy_score(gold, predicted))
        macro = float(skm.f1_score(gold, predicted, average="macro", zero_division=0.0))
        return {"accuracy": accuracy, "macro_f1": macro, "score": accuracy}

    def write_predictions(self, directory, name, split, outputs):
        path = os.path.join(directory, "predictions", f"{self.folder}_{name}.tsv")
        rows = ["id\tprediction"] + [
            f"{i}\t{self.label_names[int(p)]}"
            for i, p in zip(split.examples.index, np.asarray(outputs).argmax(-1), strict=True)
        ]
        files.atomic_write(path, ("\n".join(rows) + "\n").encode("utf-8"))
        return path

    def restore_labels(self, labels):
        self.label_names, self.num_labels = tuple(labels), len(labels)

    line_format = "a text, or `A ||| B` for a pair"

    def from_lines(self, lines, tokenizer, settings):
        texts = [[t.strip() for t in line.split("|||", 1)] for line in lines]
        examples = glue.Examples(
            [t[0] for t in texts],
            [t[1] if len(t) == 2 else None for t in texts],
            None,
            [str(i) for i in range(len(lines))],
        )
        return base.Split(examples, encoding.encode(examples, tokenizer, settings.max_seq_length))

    def answers(self, split, outputs):
        return base.label_answers(outputs, self.label_names)


class TagTask(conll.Conll2003Task):
    """Your own tagging data in CoNLL columns (`tag:<folder>`)."""

    dev_names = ("dev",)
    published: dict[str, float] = {}
    files = {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"}

    def __init__(self, folder: str):
        self.folder, self.name = folder, f"tag:{folder}"
        self.labels = ()

    def _read(self, settings, split):
        if not self.labels:
            self.prepare(settings)
        return self._read_file(settings, split)  # a user's files, whatever config.source

    def prepare(self, settings):
        self.labels = read_labels(os.path.join(settings.data_dir, self.folder))
        self.num_labels, self.label_names = len(self.labels), self.labels

    def _splits(self, settings):
        present = files.isfile(os.path.join(settings.data_dir, self.folder, "test.txt"))
        return [s for s in self.files if s != "test" or present]

    def check(self, settings):
        try:
            self.prepare(settings)
        except (OSError, ValueError) as e:
            return [str(e)]
        return super().check(settings)

    def restore_labels(self, labels):
        self.labels = self.label_names = tuple(labels)
        self.num_labels = len(labels)
