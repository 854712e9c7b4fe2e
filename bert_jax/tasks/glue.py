"""GLUE: one task table, readers for the GLUE TSV folders and TFDS `glue/*`, sentence-pair
packing, the official metrics (scikit-learn / scipy) and the submission files. No flax.

The TSV readers follow the layout of the original GLUE download (`download_glue_data.py`):
each task's own columns and header rows (CoLA's train/dev have none), MNLI's
`dev_matched`/`dev_mismatched`, quoting left as is (fields are split on tabs only).
"""

import dataclasses
import functools
import os
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.stats
from sklearn import metrics as skm

from bert_jax import files, objectives
from bert_jax.data import encoding
from bert_jax.tasks import base


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """One file of a task: `name` (train, dev, dev_mismatched, test, ...), the TSV file in the
    task folder, the TFDS split, and for test splits the submission file name."""

    name: str
    file: str
    tfds_split: str
    labelled: bool = True
    submission: str = ""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A GLUE task. `labels` are the label strings of the TSV files (empty for regression);
    `tfds_labels` the class names of TFDS's integer labels; `columns` names the columns of
    header-less files (CoLA)."""

    name: str
    folder: str
    text_a: str
    text_b: str | None
    label: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    splits: tuple[SplitSpec, ...]
    tfds_config: str
    tfds_text: tuple[str, ...]
    tfds_labels: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def is_regression(self) -> bool:
        return not self.labels

    def split(self, name: str) -> SplitSpec:
        for s in self.splits:
            if s.name == name:
                return s
        raise ValueError(f"task {self.name} has no split {name!r}")

    @property
    def dev_splits(self) -> tuple[SplitSpec, ...]:
        return tuple(s for s in self.splits if s.labelled and s.name != "train")


def _std_splits(submission: str) -> tuple[SplitSpec, ...]:
    return (
        SplitSpec("train", "train.tsv", "train"),
        SplitSpec("dev", "dev.tsv", "validation"),
        SplitSpec("test", "test.tsv", "test", labelled=False, submission=submission),
    )


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
# fmt: off
TASKS: dict[str, Spec] = {
    t.name: t
    for t in (
        Spec(
            "cola", "CoLA", "sentence", None, "label", _BINARY, ("mcc",), _std_splits("CoLA.tsv"),
            "cola", ("sentence",), ("0", "1"),
            columns=("source", "label", "original_label", "sentence"),
        ),
        Spec(
            "sst2", "SST-2", "sentence", None, "label", _BINARY, ("accuracy",),
            _std_splits("SST-2.tsv"), "sst2", ("sentence",), ("0", "1"),
        ),
        Spec(
            "mrpc", "MRPC", "#1 String", "#2 String", "Quality", _BINARY, ("f1", "accuracy"),
            _std_splits("MRPC.tsv"), "mrpc", ("sentence1", "sentence2"), ("0", "1"),
        ),
        Spec(
            "stsb", "STS-B", "sentence1", "sentence2", "score", (), ("pearson", "spearman"),
            _std_splits("STS-B.tsv"), "stsb", ("sentence1", "sentence2"),
        ),
        Spec(
            "qqp", "QQP", "question1", "question2", "is_duplicate", _BINARY, ("f1", "accuracy"),
            _std_splits("QQP.tsv"), "qqp", ("question1", "question2"), ("0", "1"),
        ),
        Spec(
            "mnli", "MNLI", "sentence1", "sentence2", "gold_label",
            ("contradiction", "entailment", "neutral"), ("accuracy",),
            (
                SplitSpec("train", "train.tsv", "train"),
                SplitSpec("dev_matched", "dev_matched.tsv", "validation_matched"),
                SplitSpec("dev_mismatched", "dev_mismatched.tsv", "validation_mismatched"),
                SplitSpec("test_matched", "test_matched.tsv", "test_matched", False, "MNLI-m.tsv"),
                SplitSpec(
                    "test_mismatched", "test_mismatched.tsv", "test_mismatched", False,
                    "MNLI-mm.tsv",
                ),
            ),
            "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
        ),
        Spec(
            "qnli", "QNLI", "question", "sentence", "label", _NLI2, ("accuracy",),
            _std_splits("QNLI.tsv"), "qnli", ("question", "sentence"), _NLI2,
        ),
        Spec(
            "rte", "RTE", "sentence1", "sentence2", "label", _NLI2, ("accuracy",),
            _std_splits("RTE.tsv"), "rte", ("sentence1", "sentence2"), _NLI2,
        ),
        Spec(
            "wnli", "WNLI", "sentence1", "sentence2", "label", _BINARY, ("accuracy",),
            _std_splits("WNLI.tsv"), "wnli", ("sentence1", "sentence2"), ("0", "1"),
        ),
    )
}
# fmt: on
# The diagnostic set: MNLI's model predicts it; test only, in GLUE's `diagnostic` folder.
AX = SplitSpec("ax", "diagnostic.tsv", "test", labelled=False, submission="AX.tsv")
AX_FOLDER = "diagnostic"

# Hugging Face's BERT-Base (cased) dev results with the paper's recipe (transformers'
# text-classification README): the published figures shown beside ours for BERT-Base.
PUBLISHED_BERT_BASE = {
    "cola": {"mcc": 56.53},
    "sst2": {"accuracy": 92.32},
    "mrpc": {"f1": 88.85, "accuracy": 84.07},
    "stsb": {"pearson": 88.64, "spearman": 88.48},
    "qqp": {"accuracy": 90.71, "f1": 87.49},
    "mnli": {"accuracy": 83.91, "accuracy_mismatched": 84.10},
    "qnli": {"accuracy": 90.66},
    "rte": {"accuracy": 65.70},
    "wnli": {"accuracy": 56.34},
}


def get_spec(name: str) -> Spec:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; use one of {', '.join(TASKS)} or 'all'")
    return TASKS[key]


@dataclasses.dataclass
class Examples:
    """A split's examples: texts, labels (class index, float score, or None when unlabelled)
    and the GLUE `index` of each row (what a submission file refers to)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray | None
    index: list[str]

    def __len__(self) -> int:
        return len(self.text_a)


def read_tsv(task: Spec, split: SplitSpec, folder: str) -> Examples:
    """One split of `task` from its GLUE folder (e.g. `glue_data/MNLI`).

    Raises:
      FileNotFoundError naming the expected file; ValueError naming the file and line of a row
      with the wrong number of columns or an unknown label.
    """
    path = os.path.join(folder, split.file)
    if not files.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: --config.data_dir must be the GLUE folder holding "
            f"{task.folder}/ (the layout of the GLUE download), or use --config.source=tfds"
        )
    with files.open(path, encoding="utf-8", newline="") as f:
        lines = [line.rstrip("\r\n") for line in f]
    headerless = task.columns and split.labelled
    if not any(lines[0 if headerless else 1 :]):
        what = "is empty" if not lines else "has a header but no examples"
        raise ValueError(
            f"{path} {what}: {task.folder}'s {split.file} needs "
            f"{'rows' if headerless else 'a header line and one example per line'}"
        )
    header = list(task.columns) if headerless else lines[0].split("\t")
    rows = lines if headerless else lines[1:]
    first_line = 1 if headerless else 2
    text_b_col = None if task.text_b is None else _column(header, task.text_b, path)
    text_a_col = _column(header, task.text_a, path)
    label_col = _column(header, task.label, path) if split.labelled else None
    # MNLI's dev files carry five annotator labels; gold_label is the last column.
    if label_col is not None and task.label == "gold_label":
        label_col = len(header) - 1
    index_col = next((header.index(c) for c in ("index", "id") if c in header), None)
    out = Examples([], [] if text_b_col is not None else None, None, [])
    labels = []
    for offset, line in enumerate(rows):
        if not line:
            continue
        fields = line.split("\t")
        lineno = first_line + offset
        if len(fields) != len(header):
            raise ValueError(
                f"{path}:{lineno}: {len(fields)} tab-separated columns where the "
                f"{'task layout' if headerless else 'header'} has {len(header)}; the file is "
                f"damaged or not {task.folder}'s {split.file}"
            )
        out.text_a.append(fields[text_a_col])
        if text_b_col is not None:
            out.text_b.append(fields[text_b_col])
        out.index.append(fields[index_col] if index_col is not None else str(len(out.index)))
        if label_col is not None:
            labels.append(_parse_label(task, fields[label_col], f"{path}:{lineno}"))
    if label_col is not None:
        out.labels = np.asarray(labels, np.float32 if task.is_regression else np.int32)
    return out


def read_tfds(task: Spec, split: SplitSpec, data_dir: str | None) -> Examples:
    """One split of `task` from TFDS `glue/<config>` prepared as ArrayRecord (no tensorflow).

    Raises:
      FileNotFoundError saying how to prepare the data when it is not there.
    """
    config = "ax" if split is AX else task.tfds_config
    source = encoding.tfds_source(
        f"glue/{config}",
        split.tfds_split,
        data_dir,
        "the GLUE TSV folders (--config.data_dir)",
    )
    text_keys = AX_TEXT if split is AX else task.tfds_text
    out = Examples([], [] if len(text_keys) > 1 else None, None, [])
    labels = []
    for i in range(len(source)):
        record = source[i]
        out.text_a.append(_text(record[text_keys[0]]))
        if len(text_keys) > 1:
            out.text_b.append(_text(record[text_keys[1]]))
        out.index.append(str(int(record.get("idx", i))))
        if split.labelled:
            value = record["label"]
            if task.is_regression:
                labels.append(float(value))
            else:
                labels.append(task.labels.index(task.tfds_labels[int(value)]))
    if split.labelled:
        out.labels = np.asarray(labels, np.float32 if task.is_regression else np.int32)
    return out


AX_TEXT = ("premise", "hypothesis")


def compute_metrics(task: Spec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The official GLUE metrics of `task`, plus `score`: the GLUE score of the task (the mean
    of its two metrics for MRPC, QQP and STS-B), which model selection uses.

    Args:
      predictions: [N] class indices, or scores for STS-B.
      labels: [N] the same.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be [N]")
    out = {}
    for name in task.metrics:
        out[name] = _METRICS[name](labels, predictions)
    out["score"] = float(np.mean([out[m] for m in task.metrics]))
    return out


def matthews(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Matthews correlation; 0 when undefined (one class only), as scikit-learn defines it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skm.matthews_corrcoef(labels, predictions))


def pearson(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Pearson correlation; 0 when undefined (constant predictions or labels), where scipy
    returns NaN, so that such a run ranks as uncorrelated rather than breaking selection."""
    if np.ptp(labels) == 0 or np.ptp(predictions) == 0:
        return 0.0
    return float(scipy.stats.pearsonr(labels, predictions)[0])


def spearman(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Spearman rank correlation; 0 when undefined, like `pearson`."""
    if np.ptp(labels) == 0 or np.ptp(predictions) == 0:
        return 0.0
    return float(scipy.stats.spearmanr(labels, predictions)[0])


_METRICS = {
    "mcc": matthews,
    "accuracy": lambda y, p: float(skm.accuracy_score(y, p)),
    "f1": lambda y, p: float(skm.f1_score(y, p, pos_label=1, zero_division=0.0)),
    "pearson": pearson,
    "spearman": spearman,
}


def write_submission(path: str, task: Spec, index: Sequence[str], predictions: np.ndarray) -> None:
    """A GLUE server file: header `index<TAB>prediction`, one row per test example, labels as
    the task's strings (scores for STS-B, clipped to the 0-5 scale). Written atomically."""
    rows = ["index\tprediction"]
    for i, p in zip(index, predictions, strict=True):
        value = f"{float(np.clip(p, 0.0, 5.0)):.3f}" if task.is_regression else task.labels[int(p)]
        rows.append(f"{i}\t{value}")
    files.atomic_write(path, ("\n".join(rows) + "\n").encode("utf-8"))


def _column(header: list[str], name: str, path: str) -> int:
    if name not in header:
        raise ValueError(f"{path} has no column {name!r} (its header: {header})")
    return header.index(name)


def _parse_label(task: Spec, value: str, where: str) -> float | int:
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: score {value!r} is not a number") from None
    if value not in task.labels:
        raise ValueError(
            f"{where}: unknown label {value!r} for {task.name}; expected one of {list(task.labels)}"
        )
    return task.labels.index(value)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class GlueTask(base.Task):
    """A GLUE task: sentence (pair) classification or regression, the official metrics, the
    GLUE server's submission files for the test sets."""

    architecture = "BertForSequenceClassification"
    packable = True

    def __init__(self, task: Spec):
        self.glue = task
        self.name = task.name
        self.num_labels = task.num_labels
        self.metrics = task.metrics
        self.dev_names = tuple(s.name for s in task.dev_splits)
        self.label_names = task.labels
        published = dict(PUBLISHED_BERT_BASE.get(task.name, {}))
        if "accuracy_mismatched" in published:
            published["dev_mismatched/accuracy"] = published.pop("accuracy_mismatched")
        self.published = published

    def objective(self, dropout):
        return objectives.classification(self.num_labels, classifier_dropout=dropout)

    def _target_specs(self, settings):
        return {"label": ((), np.dtype(np.float32 if self.glue.is_regression else np.int32))}

    def _read(self, settings: base.Settings, split: SplitSpec, folder: str) -> Examples:
        if settings.source == "tfds":
            return read_tfds(self.glue, split, settings.tfds_data_dir or None)
        return read_tsv(self.glue, split, os.path.join(settings.data_dir, folder))

    def test_splits(self, settings: base.Settings) -> list[SplitSpec]:
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
            train = Examples(
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
        ax_file = os.path.join(settings.data_dir, AX_FOLDER, AX.file)
        if self.name == "mnli" and (settings.source == "tfds" or files.isfile(ax_file)):
            examples = self._read(settings, AX, AX_FOLDER)
            predict["ax"] = base.Split((AX, examples), encode(examples))
        return base.TaskData(encode(train), dev, predict)

    def _labels(self, outputs) -> np.ndarray:
        outputs = np.asarray(outputs)
        return outputs[:, 0] if self.glue.is_regression else outputs.argmax(-1)

    def evaluate(self, name, split, outputs):
        return compute_metrics(self.glue, self._labels(outputs), split.examples.labels)

    def write_predictions(self, directory, name, split, outputs):
        glue_split, examples = split.examples
        path = os.path.join(directory, "predictions", glue_split.submission)
        write_submission(path, self.glue, examples.index, self._labels(outputs))
        return path

    @property
    def line_format(self) -> str:
        return "`A ||| B`" if self.glue.text_b is not None else "a sentence"

    def from_lines(self, lines, tokenizer, settings):
        parts = 2 if self.glue.text_b is not None else 1
        texts = [base.split_line(line, parts, self.name, self.line_format) for line in lines]
        examples = Examples(
            [t[0] for t in texts],
            [t[1] for t in texts] if parts == 2 else None,
            None,
            [str(i) for i in range(len(lines))],
        )
        return base.Split(examples, encoding.encode(examples, tokenizer, settings.max_seq_length))

    def answers(self, split, outputs):
        if self.glue.is_regression:
            return [{"score": float(x)} for x in np.asarray(outputs)[:, 0]]
        return base.label_answers(outputs, self.label_names)
