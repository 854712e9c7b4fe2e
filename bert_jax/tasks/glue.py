"""GLUE: one task table, readers for the GLUE TSV folders and TFDS `glue/*`, sentence-pair
packing, the official metrics (scikit-learn / scipy) and the submission files. No flax.

The TSV readers follow the layout of the original GLUE download (`download_glue_data.py`):
each task's own columns and header rows (CoLA's train/dev have none), MNLI's
`dev_matched`/`dev_mismatched`, quoting left as is (fields are split on tabs only).
"""

import dataclasses
import os
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.stats
from sklearn import metrics as skm

from bert_jax import files
from bert_jax.data.tokenization import Tokenizer


@dataclasses.dataclass(frozen=True)
class Split:
    """One file of a task: `name` (train, dev, dev_mismatched, test, ...), the TSV file in the
    task folder, the TFDS split, and for test splits the submission file name."""

    name: str
    file: str
    tfds_split: str
    labelled: bool = True
    submission: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
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
    splits: tuple[Split, ...]
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

    def split(self, name: str) -> Split:
        for s in self.splits:
            if s.name == name:
                return s
        raise ValueError(f"task {self.name} has no split {name!r}")

    @property
    def dev_splits(self) -> tuple[Split, ...]:
        return tuple(s for s in self.splits if s.labelled and s.name != "train")


def _std_splits(submission: str) -> tuple[Split, ...]:
    return (
        Split("train", "train.tsv", "train"),
        Split("dev", "dev.tsv", "validation"),
        Split("test", "test.tsv", "test", labelled=False, submission=submission),
    )


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
# fmt: off
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "cola", "CoLA", "sentence", None, "label", _BINARY, ("mcc",), _std_splits("CoLA.tsv"),
            "cola", ("sentence",), ("0", "1"),
            columns=("source", "label", "original_label", "sentence"),
        ),
        Task(
            "sst2", "SST-2", "sentence", None, "label", _BINARY, ("accuracy",),
            _std_splits("SST-2.tsv"), "sst2", ("sentence",), ("0", "1"),
        ),
        Task(
            "mrpc", "MRPC", "#1 String", "#2 String", "Quality", _BINARY, ("f1", "accuracy"),
            _std_splits("MRPC.tsv"), "mrpc", ("sentence1", "sentence2"), ("0", "1"),
        ),
        Task(
            "stsb", "STS-B", "sentence1", "sentence2", "score", (), ("pearson", "spearman"),
            _std_splits("STS-B.tsv"), "stsb", ("sentence1", "sentence2"),
        ),
        Task(
            "qqp", "QQP", "question1", "question2", "is_duplicate", _BINARY, ("f1", "accuracy"),
            _std_splits("QQP.tsv"), "qqp", ("question1", "question2"), ("0", "1"),
        ),
        Task(
            "mnli", "MNLI", "sentence1", "sentence2", "gold_label",
            ("contradiction", "entailment", "neutral"), ("accuracy",),
            (
                Split("train", "train.tsv", "train"),
                Split("dev_matched", "dev_matched.tsv", "validation_matched"),
                Split("dev_mismatched", "dev_mismatched.tsv", "validation_mismatched"),
                Split("test_matched", "test_matched.tsv", "test_matched", False, "MNLI-m.tsv"),
                Split(
                    "test_mismatched", "test_mismatched.tsv", "test_mismatched", False,
                    "MNLI-mm.tsv",
                ),
            ),
            "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
        ),
        Task(
            "qnli", "QNLI", "question", "sentence", "label", _NLI2, ("accuracy",),
            _std_splits("QNLI.tsv"), "qnli", ("question", "sentence"), _NLI2,
        ),
        Task(
            "rte", "RTE", "sentence1", "sentence2", "label", _NLI2, ("accuracy",),
            _std_splits("RTE.tsv"), "rte", ("sentence1", "sentence2"), _NLI2,
        ),
        Task(
            "wnli", "WNLI", "sentence1", "sentence2", "label", _BINARY, ("accuracy",),
            _std_splits("WNLI.tsv"), "wnli", ("sentence1", "sentence2"), ("0", "1"),
        ),
    )
}
# fmt: on
# The diagnostic set: MNLI's model predicts it; test only, in GLUE's `diagnostic` folder.
AX = Split("ax", "diagnostic.tsv", "test", labelled=False, submission="AX.tsv")
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


def get_task(name: str) -> Task:
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


def read_tsv(task: Task, split: Split, folder: str) -> Examples:
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


def tfds_source(name: str, split: str, data_dir: str | None, instead: str):
    """TFDS `name`'s `split` prepared as ArrayRecord, as a data source (no tensorflow).

    Raises:
      FileNotFoundError saying how to prepare it, or `instead` what else to read.
    """
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        raise FileNotFoundError(
            f"TFDS {name} split {split} is not prepared in "
            f"{data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: {str(e)[:200]}); "
            f"prepare it with `tfds build {name} --file_format=array_record` (then pass "
            f"--config.tfds_data_dir), or use {instead}"
        ) from e


def read_tfds(task: Task, split: Split, data_dir: str | None) -> Examples:
    """One split of `task` from TFDS `glue/<config>` prepared as ArrayRecord (no tensorflow).

    Raises:
      FileNotFoundError saying how to prepare the data when it is not there.
    """
    config = "ax" if split is AX else task.tfds_config
    source = tfds_source(
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


def encode(examples: Examples, tokenizer: Tokenizer, max_seq_length: int) -> dict[str, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` features, padded to `max_seq_length`; the pair is truncated as
    the original `run_classifier.py` does (one token at a time from the longer text).

    Returns:
      input_ids, input_mask, segment_ids: [N, L] int32; label: [N] (int32 or float32; zeros
      when unlabelled).
    """
    if max_seq_length < 3:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for [CLS] and [SEP]")
    ids_a = tokenizer.encode_batch(examples.text_a)
    ids_b = tokenizer.encode_batch(examples.text_b) if examples.text_b is not None else None
    n = len(ids_a)
    input_ids = np.zeros((n, max_seq_length), np.int32)
    segment_ids = np.zeros((n, max_seq_length), np.int32)
    input_mask = np.zeros((n, max_seq_length), np.int32)
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    for i in range(n):
        a = list(ids_a[i])
        b = list(ids_b[i]) if ids_b is not None else None
        if b is None:
            a = a[: max_seq_length - 2]
            tokens, segments = [cls, *a, sep], [0] * (len(a) + 2)
        else:
            while len(a) + len(b) > max_seq_length - 3:
                (a if len(a) > len(b) else b).pop()
            tokens = [cls, *a, sep, *b, sep]
            segments = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        input_ids[i, : len(tokens)] = tokens
        segment_ids[i, : len(tokens)] = segments
        input_mask[i, : len(tokens)] = 1
    label = examples.labels if examples.labels is not None else np.zeros((n,), np.int32)
    return dict(input_ids=input_ids, input_mask=input_mask, segment_ids=segment_ids, label=label)


def pack_rows(lengths: np.ndarray, width: int, max_per_row: int = 16) -> list[list[int]]:
    """Places examples of `lengths` tokens into rows of `width`: best fit by decreasing
    length (each example goes to the fullest row it fits in), at most `max_per_row` to a row.
    Returns the examples of each row. O(examples x width), so that a whole split packs at once.
    """
    if max_per_row < 1:
        raise ValueError(f"max_per_row={max_per_row} must be at least 1")
    rows: list[list[int]] = []
    room: list[int] = []
    # by_room[c]: the rows with c tokens free and room for another example.
    by_room: list[list[int]] = [[] for _ in range(width + 1)]
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        r = next((by_room[c].pop() for c in range(n, width + 1) if by_room[c]), None)
        if r is None:
            r = len(rows)
            rows.append([])
            room.append(width)
        rows[r].append(int(i))
        room[r] -= n
        if len(rows[r]) < max_per_row:
            by_room[room[r]].append(r)
    return rows


def row_counts(needs: Sequence[int], row_multiple: int = 1, min_saving: float = 0.1) -> list[int]:
    """The packed batch shapes of a run: given the rows each batch needs, one row count (the
    largest need), or two when a smaller second one saves at least `min_saving` of the rows
    (each shape compiles once). Counts are multiples of `row_multiple`."""
    needs = [-(-n // row_multiple) * row_multiple for n in needs]
    top = max(needs)
    best, best_total = [top], top * len(needs)
    for low in sorted(set(needs) - {top}):
        total = sum(low if n <= low else top for n in needs)
        if total <= (1 - min_saving) * top * len(needs) and total < best_total:
            best, best_total = [low, top], total
    return best


def pack(
    features: dict[str, np.ndarray],
    max_per_row: int = 16,
    row_multiple: int = 1,
    rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Packs one-example-per-row features (`encode`) into fewer rows of several examples.

    Short examples waste most of a padded row (an SST-2 sentence is about 25 of 128 tokens).
    Here the examples are placed by `pack_rows` into rows of the same length; `models.Packing`
    keeps them apart in the encoder, so each example's logits equal those of the example
    alone. `rows` fixes the number of rows (empty rows pad; an error when the examples need
    more); without it the count is rounded up to a multiple of an eighth of the unpacked count
    (and of `row_multiple`, the data-parallel degree), so that packed batches take a few
    distinct shapes only (each shape compiles once).

    Returns:
      input_ids, input_mask, segment_ids, example_ids (1, 2, ... per example, 0 for padding),
      position_ids (from 0 at each example's [CLS]): [R, L] int32; cls_positions, label,
      label_weights (1 for a real example) and source (the example's row in `features`, -1
      for an unused slot): [R, max_per_row].
    """
    ids = features["input_ids"]
    n, width = ids.shape
    lengths = features["input_mask"].sum(axis=1).astype(np.int64)
    placed = pack_rows(lengths, width, max_per_row)
    if rows is None:
        cap = -(-n // row_multiple) * row_multiple
        step = row_multiple * max(1, -(-cap // (8 * row_multiple)))
        count = min(cap, -(-len(placed) // step) * step)
    elif rows < len(placed) or rows % row_multiple:
        raise ValueError(
            f"rows={rows}: the examples need {len(placed)} rows, and the count must be a "
            f"multiple of {row_multiple}"
        )
    else:
        count = rows
    label = features["label"]
    out = {
        name: np.zeros((count, width), np.int32)
        for name in ("input_ids", "input_mask", "segment_ids", "example_ids", "position_ids")
    }
    out["cls_positions"] = np.zeros((count, max_per_row), np.int32)
    out["label"] = np.zeros((count, max_per_row), label.dtype)
    out["label_weights"] = np.zeros((count, max_per_row), np.float32)
    out["source"] = np.full((count, max_per_row), -1, np.int32)
    for r, members in enumerate(placed):
        start = 0
        for slot, i in enumerate(members):
            end = start + int(lengths[i])
            out["input_ids"][r, start:end] = ids[i, : end - start]
            out["segment_ids"][r, start:end] = features["segment_ids"][i, : end - start]
            out["input_mask"][r, start:end] = 1
            out["example_ids"][r, start:end] = slot + 1
            out["position_ids"][r, start:end] = np.arange(end - start)
            out["cls_positions"][r, slot] = start
            out["label"][r, slot] = label[i]
            out["label_weights"][r, slot] = 1.0
            out["source"][r, slot] = i
            start = end
    return out


def unpack(outputs: np.ndarray, source: np.ndarray, n: int) -> np.ndarray:
    """Per-slot outputs [R, K, ...] of packed rows -> [n, ...] in the original order."""
    real = source >= 0
    result = np.zeros((n, *outputs.shape[2:]), outputs.dtype)
    result[source[real]] = outputs[real]
    if np.bincount(source[real], minlength=n).min(initial=1) != 1:
        raise ValueError("every example must sit in exactly one packed slot")
    return result


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
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


def write_submission(path: str, task: Task, index: Sequence[str], predictions: np.ndarray) -> None:
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


def _parse_label(task: Task, value: str, where: str) -> float | int:
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
