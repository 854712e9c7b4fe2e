"""The tasks `finetune.py` runs: GLUE's nine, SQuAD v1.1 and v2.0, CoNLL-2003 and SWAG, each
a `base.Task` over the readers, decoders and metrics of its own module.

Data layout under `--config.data_dir`, one folder per task as the GLUE download has them:
`CoLA/`, `SST-2/`, ... (GLUE's TSV files), `SQuAD/` (`train-v1.1.json`, `dev-v1.1.json`,
`train-v2.0.json`, `dev-v2.0.json`), `CoNLL-2003/` (`train.txt`, `valid.txt`, `test.txt`),
`SWAG/` (`train.csv`, `val.csv`, optionally the unlabelled `test.csv`).
"""

import csv
import io
import os

import numpy as np

from bert_jax import files, glue, train_lib
from bert_jax.tasks import base, conll, squad, swag


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
        return train_lib.classification(self.num_labels, classifier_dropout=dropout)

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
                or os.path.isfile(os.path.join(settings.data_dir, self.glue.folder, split.file))
            )
        ]

    def check(self, settings):
        problems = []
        for split in [s for s in self.glue.splits if s.labelled] + self.test_splits(settings):
            try:
                self._read(settings, split, self.glue.folder)
            except (OSError, ValueError) as e:
                problems.append(str(e))
        return problems

    def load(self, settings, tokenizer):
        def encode(examples):
            return glue.encode(examples, tokenizer, settings.max_seq_length)

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
        if self.name == "mnli" and (settings.source == "tfds" or os.path.isfile(ax_file)):
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
        self.version_2 = version == "2.0"
        self.name = "squad_v2" if self.version_2 else "squad_v1"
        self.metrics = ("exact_match", "f1") + (("HasAns_f1", "NoAns_f1") if self.version_2 else ())
        # BERT-Base, single model, SQuAD v1.1 dev (Devlin et al., Table 2); the paper gives
        # v2.0 figures for BERT-Large only.
        self.published = {} if self.version_2 else {"exact_match": 80.8, "f1": 88.5}
        self.files = {s: f"{s}-v{version}.json" for s in ("train", "dev")}

    def objective(self, dropout):
        return train_lib.QUESTION_ANSWERING

    def _path(self, settings, split):
        return os.path.join(settings.data_dir, self.folder, self.files[split])

    def check(self, settings):
        problems = []
        for split in self.files:
            try:
                squad.read_squad(self._path(settings, split))
            except (OSError, ValueError) as e:
                problems.append(str(e))
        return problems

    def _windows(self, settings):
        return squad.WindowConfig(
            settings.max_seq_length, settings.doc_stride, settings.max_query_length
        )

    def load(self, settings, tokenizer):
        train = squad.read_squad(self._path(settings, "train"))
        if settings.max_train_examples:
            train = train[: settings.max_train_examples]
        windows = self._windows(settings)
        examples = squad.read_squad(self._path(settings, "dev"))
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
        os.makedirs(folder, exist_ok=True)
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
        return train_lib.token_classification(self.num_labels, classifier_dropout=dropout)

    def _read(self, settings, split):
        path = os.path.join(settings.data_dir, self.folder, self.files[split])
        sentences = conll.read_conll(path, labels=self.labels)
        return [
            conll.Sentence(s.words, tuple(conll.iob1_to_iob2(s.tags)), s.document)
            for s in sentences
        ]

    def check(self, settings):
        problems = []
        for split in self.files:
            try:
                self._read(settings, split)
            except (OSError, ValueError) as e:
                problems.append(str(e))
        return problems

    def load(self, settings, tokenizer):
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
        dev = {"dev": split("dev"), "test": split("test")}
        return base.TaskData(features.inputs(), dev, {"test": dev["test"]})

    def _tags(self, split, outputs):
        sentences, features = split.examples
        return conll.decode(sentences, features, np.asarray(outputs), self.labels)

    def evaluate(self, name, split, outputs):
        gold = [list(s.tags) for s in split.examples[0]]
        scores = conll.entity_scores(gold, self._tags(split, outputs))
        return {k: scores[k] for k in self.metrics} | {"score": scores["f1"]}

    def write_predictions(self, directory, name, split, outputs):
        path = os.path.join(directory, "predictions", f"conll2003_{name}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
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
        return train_lib.multiple_choice(classifier_dropout=dropout)

    def _path(self, settings, name):
        return os.path.join(settings.data_dir, self.folder, name)

    def _splits(self, settings):
        names = {"train": "train.csv", "dev": "val.csv"}
        if os.path.isfile(self._path(settings, "test.csv")):
            names["test"] = "test.csv"
        return names

    def check(self, settings):
        problems = []
        for name, file in self._splits(settings).items():
            try:
                examples = swag.read_swag(self._path(settings, file))
                if name != "test" and any(e.label is None for e in examples):
                    problems.append(f"{self._path(settings, file)}: rows without a label")
            except (OSError, ValueError) as e:
                problems.append(str(e))
        return problems

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


for _name, _task in glue.TASKS.items():
    base.register(_name, lambda task=_task: GlueTask(task))
base.register("squad_v1", lambda: SquadTask("1.1"))
base.register("squad_v2", lambda: SquadTask("2.0"))
base.register("conll2003", Conll2003Task)
base.register("swag", SwagTask)
