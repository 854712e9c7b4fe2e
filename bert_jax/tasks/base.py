"""What a fine-tuning task is to the harness (`finetune.py`); `tasks.registry` names them.

A task reads its data (every file checked before anything is compiled), turns it into
fixed-shape features, names the model head and the objective that trains it, decodes the
model's outputs back to its own answers, scores them with its official metric and writes
its prediction files. The loop (epochs, evaluation, best checkpoint, seeds and learning
rates, results tables) is the harness's, the same for every task.
"""

import abc
import csv
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bert_jax import files, objectives


@dataclasses.dataclass
class Split:
    """A split's examples as the task reads them (what decoding needs), and its features:
    arrays with one row per model input row."""

    examples: Any
    features: dict[str, np.ndarray]


@dataclasses.dataclass
class TaskData:
    train: dict[str, np.ndarray]
    dev: dict[str, Split]  # scored after each epoch; the first selects the best checkpoint
    predict: dict[str, Split]  # written as prediction files from the best checkpoint


@dataclasses.dataclass(frozen=True)
class Settings:
    """The harness's settings a task reads."""

    data_dir: str
    max_seq_length: int
    max_train_examples: int = 0
    source: str = "tsv"
    tfds_data_dir: str = ""
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    # Sentence-embedding tasks: `objectives.Embedding`'s options (modes, scale, symmetric,
    # matryoshka_dims, chunk_size) as (name, value) pairs.
    embedding: tuple = ()


class Task(abc.ABC):
    name: str
    architecture: str  # the Hugging Face head: what init_from is loaded as
    num_labels: int = 2
    metrics: tuple[str, ...]  # the dev metrics reported (fractions), "score" selects
    dev_names: tuple[str, ...]
    packable: bool = False  # several examples per row (`encoding.pack`)
    label_names: tuple[str, ...] = ()  # the head's outputs, where they are labels
    # BERT-Base figures from the papers, in percent: "metric" (the first dev split) or
    # "dev name/metric".
    published: dict[str, float] = {}

    def published_figure(self, dev_name: str, metric: str) -> float | None:
        if f"{dev_name}/{metric}" in self.published:
            return self.published[f"{dev_name}/{metric}"]
        return self.published.get(metric) if dev_name == self.dev_names[0] else None

    def prepare(self, settings: Settings) -> None:  # noqa: B027 (most tasks need nothing)
        """Reads what the head's size depends on (a user's label list), before the model is
        loaded."""

    @abc.abstractmethod
    def objective(self, dropout: float | None) -> objectives.Objective: ...

    def feature_specs(self, settings: Settings) -> dict[str, tuple[tuple[int, ...], Any]]:
        """One example's features as (shape, dtype): what compiling the task's steps for a
        device target needs, without its data. Rows of `max_seq_length` tokens and a label
        by default."""
        row = ((settings.max_seq_length,), np.dtype(np.int32))
        return {
            "input_ids": row,
            "input_mask": row,
            "segment_ids": row,
            **self._target_specs(settings),
        }

    def _target_specs(self, settings: Settings) -> dict:
        return {"label": ((), np.dtype(np.int32))}

    @abc.abstractmethod
    def check(self, settings: Settings) -> list[str]:
        """Reads every file the task needs; the problems found (file and line), or []."""

    @abc.abstractmethod
    def load(self, settings: Settings, tokenizer) -> TaskData: ...

    @abc.abstractmethod
    def evaluate(self, name: str, split: Split, outputs) -> dict[str, float]:
        """The metrics (and `score`) of the model's outputs for every row of `split`."""

    @abc.abstractmethod
    def write_predictions(self, directory: str, name: str, split: Split, outputs) -> str:
        """Writes the predictions of `split` in the task's official layout; returns the path."""

    def run_record(self) -> dict:
        """What a run's `config.json` records of the task besides its name and labels (an
        embedding model's pooling)."""
        return {}

    # What `tools.predict` reads: how one input line spells an example of the task.
    line_format: str = "a text, or `A ||| B` for a pair"

    def restore_labels(self, labels: Sequence[str]) -> None:  # noqa: B027 (fixed labels)
        """Takes the label names a fine-tuned model recorded instead of reading them from
        the task's data (a user's folder); tasks whose labels are fixed keep theirs."""

    @abc.abstractmethod
    def from_lines(self, lines: Sequence[str], tokenizer, settings: Settings) -> Split:
        """Unlabelled examples parsed from input lines (`line_format`), with their features.

        Raises:
          ValueError naming the line and the format when a line does not parse.
        """

    @abc.abstractmethod
    def answers(self, split: Split, outputs) -> list[dict]:
        """The task's own decoding of the model's outputs for `split`: a JSON object per
        example, in order."""


def split_line(line: str, parts: int, task: str, spelled: str) -> list[str]:
    """`line` split at `|||` into exactly `parts` stripped texts.

    Raises:
      ValueError naming the line and how the task spells one.
    """
    texts = [t.strip() for t in line.split("|||")]
    if len(texts) != parts:
        raise ValueError(f"{task} takes lines of the form {spelled}, not {line!r}")
    return texts


def label_answers(logits: np.ndarray, names: Sequence[str]) -> list[dict]:
    """Each row's best label and every label's probability (the softmax of its logits)."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [
        {
            "label": names[int(p.argmax())],
            "scores": {n: float(x) for n, x in zip(names, p, strict=True)},
        }
        for p in probs
    ]


def problems_of(*reads: Callable[[], Any]) -> list[str]:
    """Runs every read of a task's `check`; the messages of those that fail (OSError or
    ValueError, naming the file and line), so that every problem is reported at once."""
    problems = []
    for read in reads:
        try:
            read()
        except (OSError, ValueError) as e:
            problems.append(str(e))
    return problems


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) of each example of a user's `.jsonl` (a JSON object a line) or
    `.tsv` file (a header naming the columns, tab-separated, no quoting).

    Raises:
      ValueError naming the file and line: invalid JSON, a line that is not an object, a TSV
      row with another number of columns than its header, an empty TSV file.
    """
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
            return rows
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}:1: empty; a .tsv file starts with a header of its columns")
        for row in reader:
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: {len(row)} columns where the header has "
                    f"{len(header)}"
                )
            rows.append((reader.line_num, dict(zip(header, row, strict=True))))
    return rows
