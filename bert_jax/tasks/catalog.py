"""The tasks `finetune.py` runs: GLUE's nine, SQuAD v1.1 and v2.0, CoNLL-2003, SWAG, and a
user's own classification (`classify:<folder>`) or tagging (`tag:<folder>`) data, each a
`base.Task` over the readers, decoders and metrics of its own module.

Data layout under `--config.data_dir`, one folder per task as the GLUE download has them:
`CoLA/`, `SST-2/`, ... (GLUE's TSV files), `SQuAD/` (`train-v1.1.json`, `dev-v1.1.json`,
`train-v2.0.json`, `dev-v2.0.json`), `CoNLL-2003/` (`train.txt`, `valid.txt`, `test.txt`),
`SWAG/` (`train.csv`, `val.csv`, optionally the unlabelled `test.csv`).

A user's own data, in `<data_dir>/<folder>/` with a `labels.txt` (one label per line):
- `classify:<folder>`: `train`, `dev` and optionally `test` as `.tsv` (a header naming the
  columns `text`, optionally `text_b`, and `label`; `id` optional) or `.jsonl` (objects with
  the same keys); accuracy and macro F1; test predictions as `id<TAB>prediction`.
- `tag:<folder>`: `train.txt`, `dev.txt` and optionally `test.txt` in CoNLL columns (the tag
  last); entity precision, recall and F1 (IOB1 read as IOB2); test predictions in conlleval's
  layout.
"""

import csv
import functools
import io
import json
import os

import numpy as np

from bert_jax import files, objectives
from bert_jax.data import encoding
from bert_jax.tasks import base, conll, glue, squad, swag


class GlueTask(base.Task):
    """A GLUE task: sentence (pair) classification or regression, the official metrics, the
    GLUE server's submission files for the test sets."""

    architecture = "BertForSequenceClassification"
    packable = True

    def __init__(self, task: glue.Task):
        self.glue = task
        self.name = task.name
        self.num_labels = task.num_labels
        self.metrics = task.metrics
        self.dev_names = tuple(s.name for s in task.dev_splits)
        self.label_names = task.labels
        published = dict(glue.PUBLISHED_BERT_BASE.get(task.name, {}))
        if "accuracy_mismatched" in published:
            published["dev_mismatched/accuracy"] = published.pop("accuracy_mismatched")
        self.published = published

    def objective(self, dropout):
        return objectives.classification(self.num_labels, classifier_dropout=dropout)

    def _target_specs(self, settings):
        return {"label": ((), np.dtype(np.float32 if self.glue.is_regression else np.int32))}

    def _read(self, settings: base.Settings, split: glue.Split, folder: str) -> glue.Examples:
        if settings.source == "tfds":
            return glue.read_tfds(self.glue, split, settings.tfds_data_dir or None)
        return glue.read_tsv(self.glue, split, os.path.join(settings.data_dir, folder))

    def test_splits(self, settings: base.Settings) -> list[glue.Split]:
        """The unlabelled splits to predict: those whose file exists (a user's own task
        folder holds train and dev only; without a test file there is no submission)."""
        return [
            split
            for split in self.glue.splits
            if not split.labelled
            and (
                settings.source == "tfds"
                or files.isfile(os.path.join(settings.data_dir, self.glue.folder, split.file))
            )
        ]

    def check(self, settings):
        splits = [s for s in self.glue.splits if s.labelled] + self.test_splits(settings)
        return base.problems_of(
            *(functools.partial(self._read, settings, s, self.glue.folder) for s in splits)
        )

    def load(self, settings, tokenizer):
        def encode(examples):
            return encoding.encode(examples, tokenizer, settings.max_seq_length)

        train = self._read(settings, self.glue.split("train"), self.glue.folder)
        if settings.max_train_examples:
            keep = slice(0, settings.max_train_examples)
            train = glue.Examples(
                train.text_a[keep],
                None if train.text_b is None else train.text_b[keep],
                train.labels[keep],
                train.index[keep],
            )
        dev = {}
        for split in self.glue.dev_splits:
            examples = self._read(settings, split, self.glue.folder)
            dev[split.name] = base.Split(examples, encode(examples))
        predict = {}
        for split in self.test_splits(settings):
            examples = self._read(settings, split, self.glue.folder)
            predict[split.name] = base.Split((split, examples), encode(examples))
        ax_file = os.path.join(settings.data_dir, glue.AX_FOLDER, glue.AX.file)
        if self.name == "mnli" and (settings.source == "tfds" or files.isfile(ax_file)):
            examples = self._read(settings, glue.AX, glue.AX_FOLDER)
            predict["ax"] = base.Split((glue.AX, examples), encode(examples))
        return base.TaskData(encode(train), dev, predict)

    def _labels(self, outputs) -> np.ndarray:
        outputs = np.asarray(outputs)
        return outputs[:, 0] if self.glue.is_regression else outputs.argmax(-1)

    def evaluate(self, name, split, outputs):
        return glue.compute_metrics(self.glue, self._labels(outputs), split.examples.labels)

    def write_predictions(self, directory, name, split, outputs):
        glue_split, examples = split.examples
        path = os.path.join(directory, "predictions", glue_split.submission)
        glue.write_submission(path, self.glue, examples.index, self._labels(outputs))
        return path


class SquadTask(base.Task):
    """Extractive QA (`squad`): spans of the context, the official exact match and F1;
    v2.0's no-answer threshold tuned on dev. The dev predictions are written in the official
    layout (predictions.json, nbest_predictions.json, and null_odds.json for v2.0)."""

    architecture = "BertForQuestionAnswering"
    folder = "SQuAD"
    dev_names = ("dev",)

    def __init__(self, version: str):
        self.version, self.version_2 = version, version == "2.0"
        self.name = "squad_v2" if self.version_2 else "squad_v1"
        self.metrics = ("exact_match", "f1") + (("HasAns_f1", "NoAns_f1") if self.version_2 else ())
        # BERT-Base, single model, SQuAD v1.1 dev (Devlin et al., Table 2); the paper gives
        # v2.0 figures for BERT-Large only.
        self.published = {} if self.version_2 else {"exact_match": 80.8, "f1": 88.5}
        self.files = {s: f"{s}-v{version}.json" for s in ("train", "dev")}

    def objective(self, dropout):
        return objectives.QUESTION_ANSWERING

    def _target_specs(self, settings):
        position = ((), np.dtype(np.int32))
        return {"start_positions": position, "end_positions": position}

    def _path(self, settings, split):
        return os.path.join(settings.data_dir, self.folder, self.files[split])

    def _read(self, settings, split) -> list[squad.Example]:
        """The official JSON file, or with `--config.source=tfds` TFDS `squad/v1.1` or
        `squad/v2.0` (train and validation)."""
        if settings.source != "tfds":
            return squad.read_squad(self._path(settings, split))
        name, tfds_split = f"squad/v{self.version}", {"train": "train", "dev": "validation"}[split]
        source = encoding.tfds_source(
            name,
            tfds_split,
            settings.tfds_data_dir or None,
            f"the official JSON files in --config.data_dir/{self.folder}/ (--config.source=tsv)",
        )
        return squad.examples_from_tfds(source, f"TFDS {name} {tfds_split}")

    def check(self, settings):
        return base.problems_of(*(functools.partial(self._read, settings, s) for s in self.files))

    def _windows(self, settings):
        return squad.WindowConfig(
            settings.max_seq_length, settings.doc_stride, settings.max_query_length
        )

    def load(self, settings, tokenizer):
        train = self._read(settings, "train")
        if settings.max_train_examples:
            train = train[: settings.max_train_examples]
        windows = self._windows(settings)
        examples = self._read(settings, "dev")
        features = squad.make_features(examples, tokenizer, windows)
        decoding = squad.DecodeConfig(
            settings.n_best_size, settings.max_answer_length, 0.0, self.version_2
        )
        dev = base.Split((examples, features, decoding), features.inputs())
        return base.TaskData(
            squad.make_features(train, tokenizer, windows).inputs(), {"dev": dev}, {"dev": dev}
        )

    def _predictions(self, split, outputs):
        """Decoded answers; for v2.0, with the null threshold that scores best on this split."""
        examples, features, decoding = split.examples
        start, end = outputs
        decoded = squad.decode(examples, features, start, end, decoding)
        if not self.version_2:
            return {k: p.text for k, p in decoded.items()}, {}, decoded
        spans = {k: p.best_span for k, p in decoded.items()}
        odds = {k: p.null_odds for k, p in decoded.items()}
        tuned = squad.evaluate(examples, spans, odds)
        threshold = tuned["best_f1_thresh"]
        answers = {k: "" if odds[k] > threshold else spans[k] for k in spans}
        return answers, {"null_score_diff_threshold": threshold}, decoded

    def evaluate(self, name, split, outputs):
        answers, extra, _ = self._predictions(split, outputs)
        scores = squad.evaluate(split.examples[0], answers)
        out = {"exact_match": scores["exact"] / 100, "f1": scores["f1"] / 100}
        if self.version_2:
            out["HasAns_f1"] = scores.get("HasAns_f1", 0.0) / 100
            out["NoAns_f1"] = scores.get("NoAns_f1", 0.0) / 100
        out["score"] = out["f1"]
        return {**out, **extra}

    def write_predictions(self, directory, name, split, outputs):
        answers, _, decoded = self._predictions(split, outputs)
        folder = os.path.join(directory, "predictions")
        files.makedirs(folder)
        final = {
            k: squad.Prediction(answers[k], p.best_span, p.null_odds, p.nbest)
            for k, p in decoded.items()
        }
        return squad.write_predictions(folder, final, self.version_2)[0]


CONLL_TYPES = ("PER", "ORG", "LOC", "MISC")


class Conll2003Task(base.Task):
    """Named entities (`conll2003`): tags per word, entity-level F1 (conlleval's counting) on
    the dev (`valid.txt`) and test (`test.txt`) files, the test predictions in conlleval's
    layout. The files' IOB1 tags are read as IOB2 (the same entities)."""

    architecture = "BertForTokenClassification"
    name = "conll2003"
    folder = "CoNLL-2003"
    metrics = ("f1", "precision", "recall")
    dev_names = ("dev", "test")
    # BERT-Base fine-tuned (Devlin et al., Table 7).
    published = {"dev/f1": 96.4, "test/f1": 92.4}
    files = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}
    labels = ("O", *(f"{p}-{t}" for t in CONLL_TYPES for p in "BI"))

    def __init__(self):
        self.num_labels = len(self.labels)
        self.label_names = self.labels

    def objective(self, dropout):
        return objectives.token_classification(self.num_labels, classifier_dropout=dropout)

    def _target_specs(self, settings):
        length = (settings.max_seq_length,)
        return {
            "labels": (length, np.dtype(np.int32)),
            "label_weights": (length, np.dtype(np.float32)),
        }

    def _read(self, settings, split):
        """The column file, or with `--config.source=tfds` TFDS `conll2003`; IOB1 as IOB2."""
        if settings.source != "tfds":
            return self._read_file(settings, split)
        source = encoding.tfds_source(
            "conll2003",
            split,
            settings.tfds_data_dir or None,
            f"the column files in --config.data_dir/{self.folder}/ (--config.source=tsv)",
        )
        names = source.dataset_info.features["ner"].feature.names
        unknown = sorted(set(names) - set(self.labels))
        if unknown:
            raise ValueError(f"TFDS conll2003: tags {unknown} are not CoNLL-2003's {self.labels}")
        sentences = conll.sentences_from_tfds(source, names)
        return [conll.Sentence(s.words, tuple(conll.iob1_to_iob2(s.tags))) for s in sentences]

    def _read_file(self, settings, split):
        path = os.path.join(settings.data_dir, self.folder, self.files[split])
        sentences = conll.read_conll(path, labels=self.labels)
        return [
            conll.Sentence(s.words, tuple(conll.iob1_to_iob2(s.tags)), s.document)
            for s in sentences
        ]

    def check(self, settings):
        return base.problems_of(
            *(functools.partial(self._read, settings, s) for s in self._splits(settings))
        )

    def _splits(self, settings):
        return list(self.files)

    def load(self, settings, tokenizer):
        return self.load_splits(settings, tokenizer, self._splits(settings))

    def load_splits(self, settings, tokenizer, splits) -> base.TaskData:
        """train, the dev names scored, and `test` (when among `splits`) predicted."""

        def split(name):
            sentences = self._read(settings, name)
            features = conll.make_features(
                sentences, tokenizer, self.labels, settings.max_seq_length
            )
            return base.Split((sentences, features), features.inputs())

        train = self._read(settings, "train")
        if settings.max_train_examples:
            train = train[: settings.max_train_examples]
        features = conll.make_features(train, tokenizer, self.labels, settings.max_seq_length)
        loaded = {name: split(name) for name in splits if name != "train"}
        dev = {name: loaded[name] for name in self.dev_names}
        predict = {"test": loaded["test"]} if "test" in loaded else {}
        return base.TaskData(features.inputs(), dev, predict)

    def _tags(self, split, outputs):
        sentences, features = split.examples
        return conll.decode(sentences, features, np.asarray(outputs), self.labels)

    def evaluate(self, name, split, outputs):
        gold = [list(s.tags) for s in split.examples[0]]
        scores = conll.entity_scores(gold, self._tags(split, outputs))
        return {k: scores[k] for k in self.metrics} | {"score": scores["f1"]}

    def write_predictions(self, directory, name, split, outputs):
        path = os.path.join(directory, "predictions", f"conll2003_{name}.txt")
        files.makedirs(os.path.dirname(path))
        conll.write_predictions(path, split.examples[0], self._tags(split, outputs))
        return path


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
        row = ((len(swag.ENDINGS), settings.max_seq_length), np.dtype(np.int32))
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
            examples = swag.read_swag(self._path(settings, file))
            if name != "test" and any(e.label is None for e in examples):
                raise ValueError(f"{self._path(settings, file)}: rows without a label")

        return base.problems_of(
            *(functools.partial(read, n, f) for n, f in self._splits(settings).items())
        )

    def load(self, settings, tokenizer):
        splits = {
            name: swag.read_swag(self._path(settings, file))
            for name, file in self._splits(settings).items()
        }
        train = splits.pop("train")
        if settings.max_train_examples:
            train = train[: settings.max_train_examples]

        def split(examples):
            return base.Split(
                examples, swag.make_features(examples, tokenizer, settings.max_seq_length)
            )

        dev = {"dev": split(splits["dev"])}
        predict = {"test": split(splits["test"])} if "test" in splits else {}
        return base.TaskData(
            swag.make_features(train, tokenizer, settings.max_seq_length), dev, predict
        )

    def evaluate(self, name, split, outputs):
        accuracy = swag.accuracy(split.examples, outputs)
        return {"accuracy": accuracy, "score": accuracy}

    def write_predictions(self, directory, name, split, outputs):
        path = os.path.join(directory, "predictions", f"swag_{name}.csv")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["fold-ind", "label"])
        for example, label in zip(split.examples, np.asarray(outputs).argmax(-1), strict=True):
            writer.writerow([example.example_id, int(label)])
        files.atomic_write(path, text.getvalue().encode())
        return path


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
    rows: list[tuple[int, dict]] = []
    with files.open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: each line must be a JSON object")
                rows.append((number, row))
        else:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if not header or "text" not in header:
                raise ValueError(
                    f"{path}:1: the header must name a 'text' column (and 'label'; 'text_b', "
                    f"'id' optional), got {header}"
                )
            for row in reader:
                if len(row) != len(header):
                    raise ValueError(
                        f"{path}:{reader.line_num}: {len(row)} columns where the header has "
                        f"{len(header)}"
                    )
                rows.append((reader.line_num, dict(zip(header, row, strict=True))))
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


class TagTask(Conll2003Task):
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


for _name, _task in glue.TASKS.items():
    base.register(_name, lambda task=_task: GlueTask(task))
base.register("squad_v1", lambda: SquadTask("1.1"))
base.register("squad_v2", lambda: SquadTask("2.0"))
base.register("conll2003", Conll2003Task)
base.register("swag", SwagTask)
base.register("classify:", ClassifyTask)
base.register("tag:", TagTask)
