"""Extractive question answering on SQuAD v1.1 and v2.0: the official JSON, windows over long
contexts, n-best span decoding and the official evaluation.

The rules are those of google-research/bert's `run_squad.py` and of the official evaluation
script (`evaluate-v2.0.py`, which scores v1.1 data as the v1.1 script does):

- features: [CLS] question [SEP] context window [SEP]; the question cut to `max_query_length`
  pieces; windows of the context `doc_stride` pieces apart, as many as cover it; a context
  piece seen by several windows is scored only in the one where it has the most context
  (the smaller of its left and right context, plus 1% of the window's length);
- targets: the first and last piece of the gold answer in each window that holds it whole,
  otherwise [CLS] (position 0), which is also the target of an unanswerable question;
- decoding: the `n_best_size` best starts and ends among each window's context pieces, spans
  of at most `max_answer_length` pieces that start on a max-context piece, best total score
  first;
  v2.0's null answer scores [CLS]'s start + end (the lowest over the windows) and wins when
  it beats the best span by more than `null_score_diff_threshold` (tuned on dev with
  `best_thresholds`);
- answers are the context's own characters from the first predicted piece's start to the
  last one's end (pieces keep their character offsets in the context);
- evaluation: answers normalised (lower case, punctuation and the articles a/an/the removed,
  whitespace collapsed), exact match and token F1 against each gold answer, the best of them
  counted; an unanswerable question's gold is the empty answer.
"""

import collections
import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from bert_jax import files, objectives
from bert_jax.data import encoding
from bert_jax.tasks import base, squad_eval


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset in the context


@dataclasses.dataclass(frozen=True)
class Example:
    qas_id: str
    question: str
    context: str
    answers: tuple[Answer, ...]  # the first is the training target
    is_impossible: bool = False


def read_squad(path: str) -> list[Example]:
    """The examples of an official SQuAD JSON file (v1.1 or v2.0).

    Raises:
      ValueError naming the file and line of the first problem: malformed JSON, a field
      missing or of the wrong type, an answer whose text is not the context's at its
      offset, an unanswerable question that has answers.
    """
    with files.open(path, encoding="utf-8") as f:
        raw = f.read()
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None

    def where(qas_id: str | None = None) -> str:
        if qas_id is None:
            return path
        at = raw.find(json.dumps(qas_id))
        return f"{path}:{raw.count(chr(10), 0, at) + 1 if at >= 0 else '?'}"

    def need(value, kind, what: str, qas_id: str | None = None):
        if not isinstance(value, kind):
            raise ValueError(
                f"{where(qas_id)}: {what} must be a {kind.__name__}, not {type(value).__name__} "
                f"(the official SQuAD layout: data[].paragraphs[].context and qas[] with id, "
                f"question, answers[].text/answer_start)"
            )
        return value

    examples = []
    articles = need(need(document, dict, "the file's top level").get("data"), list, "'data'")
    for article in articles:
        paragraphs = need(need(article, dict, "an article").get("paragraphs"), list, "'paragraphs'")
        for paragraph in paragraphs:
            context = need(paragraph.get("context"), str, "a paragraph's 'context'")
            for qa in need(paragraph.get("qas"), list, "a paragraph's 'qas'"):
                qas_id = need(qa.get("id"), str, "a question's 'id'")
                question = need(qa.get("question"), str, "'question'", qas_id)
                impossible = bool(qa.get("is_impossible", False))
                answers = []
                for a in need(qa.get("answers", []), list, "'answers'", qas_id):
                    text = need(a.get("text"), str, "an answer's 'text'", qas_id)
                    start = need(a.get("answer_start"), int, "'answer_start'", qas_id)
                    answers.append(Answer(text, start))
                examples.append(
                    _checked(Example(qas_id, question, context, tuple(answers), impossible), where)
                )
    return examples


def _checked(example: Example, where) -> Example:
    """`example`, after checking its answers against its context (`where(qas_id)` names the
    file and line, or the TFDS record, of a problem)."""
    for answer in example.answers:
        found = example.context[answer.start : answer.start + len(answer.text)]
        if found != answer.text:
            raise ValueError(
                f"{where(example.qas_id)}: question {example.qas_id!r}: the answer "
                f"{answer.text!r} is not the context's text at offset {answer.start}, which "
                f"reads {found!r}; fix answer_start (the character offset of the answer in the "
                f"context)"
            )
    if example.is_impossible and example.answers:
        raise ValueError(
            f"{where(example.qas_id)}: question {example.qas_id!r} is marked is_impossible but "
            f"has answers; SQuAD v2.0 keeps those under 'plausible_answers'"
        )
    return example


def examples_from_tfds(records, name: str) -> list[Example]:
    """The examples of TFDS `squad/v1.1` or `squad/v2.0` records (a data source: `len` and
    indexing; text as bytes), checked as the JSON reader checks them."""

    def text(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    examples = []
    for i in range(len(records)):
        record = records[i]
        answers = record["answers"]
        examples.append(
            _checked(
                Example(
                    text(record["id"]),
                    text(record["question"]),
                    text(record["context"]),
                    tuple(
                        Answer(text(t), int(a))
                        for t, a in zip(answers["text"], answers["answer_start"], strict=True)
                    ),
                    bool(record.get("is_impossible", False)),
                ),
                lambda qas_id, i=i: f"{name} record {i}",
            )
        )
    return examples


@dataclasses.dataclass(frozen=True)
class WindowConfig:
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64


@dataclasses.dataclass
class Features:
    """One row per window: model inputs, targets, and what decoding needs."""

    input_ids: np.ndarray  # [N, L] int32
    input_mask: np.ndarray  # [N, L]
    segment_ids: np.ndarray  # [N, L]
    start_positions: np.ndarray  # [N] (0: [CLS], no answer in this window)
    end_positions: np.ndarray  # [N]
    example_index: np.ndarray  # [N] into the examples
    offsets: np.ndarray  # [N, L, 2] a context piece's characters in its context; -1 elsewhere
    max_context: np.ndarray  # [N, L] bool: the window where that context piece is scored

    def __len__(self) -> int:
        return len(self.input_ids)

    def inputs(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "input_mask": self.input_mask,
            "segment_ids": self.segment_ids,
            "start_positions": self.start_positions,
            "end_positions": self.end_positions,
        }


def windows(n: int, room: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of the windows over `n` context pieces, `room` pieces at most each,
    starting `stride` apart until one reaches the end (run_squad.py's doc spans)."""
    spans, start = [], 0
    while True:
        length = min(n - start, room)
        spans.append((start, length))
        if start + length >= n:
            return spans
        start += min(length, stride)


def max_context(spans: Sequence[tuple[int, int]], index: int, position: int) -> bool:
    """Whether window `index` is the one where context piece `position` has the most context:
    min(left, right) + 0.01 * window length, the first window winning ties."""
    best, best_score = None, None
    for i, (start, length) in enumerate(spans):
        end = start + length - 1
        if not start <= position <= end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best == index


def make_features(examples: Sequence[Example], tokenizer, config: WindowConfig) -> Features:
    """The windows of every example (see the module's rules), as fixed-length arrays.

    `tokenizer` must give character offsets (`encode_offsets`): WordPiece and SentencePiece
    do.
    """
    if not hasattr(tokenizer, "encode_offsets"):
        raise ValueError(
            f"SQuAD needs the character offsets of the context's pieces, which "
            f"{type(tokenizer).__name__} does not give; use a WordPiece (BERT) model"
        )
    length = config.max_seq_length
    questions = tokenizer.encode_batch([e.question for e in examples])
    contexts = tokenizer.encode_offsets([e.context for e in examples])
    rows: dict[str, list] = collections.defaultdict(list)
    for index, (example, question, (ids, offsets)) in enumerate(
        zip(examples, questions, contexts, strict=True)
    ):
        question = question[: config.max_query_length]
        room = length - len(question) - 2 - len(tokenizer.pair_middle)
        if room < 1:
            raise ValueError(
                f"max_seq_length {length} leaves no room for the context after a question of "
                f"{len(question)} pieces: raise max_seq_length or lower max_query_length"
            )
        target = _answer_pieces(example, offsets)
        spans = windows(len(ids), room, config.doc_stride)
        for span_index, (start, size) in enumerate(spans):
            tokens = [tokenizer.cls_id, *question, *tokenizer.pair_middle]
            first = len(tokens)
            tokens += ids[start : start + size] + [tokenizer.sep_id]
            pad = length - len(tokens)
            segments = [0] * first + [1] * (size + 1)
            span_offsets = np.full((length, 2), -1, np.int32)
            span_offsets[first : first + size] = offsets[start : start + size]
            is_max = np.zeros(length, bool)
            for j in range(size):
                is_max[first + j] = max_context(spans, span_index, start + j)
            s = e = 0
            if target is not None and start <= target[0] and target[1] < start + size:
                s, e = target[0] - start + first, target[1] - start + first
            rows["input_ids"].append(tokens + [tokenizer.pad_id] * pad)
            rows["input_mask"].append([1] * len(tokens) + [0] * pad)
            rows["segment_ids"].append(segments + [0] * pad)
            rows["start_positions"].append(s)
            rows["end_positions"].append(e)
            rows["example_index"].append(index)
            rows["offsets"].append(span_offsets)
            rows["max_context"].append(is_max)
    return Features(
        **{k: np.asarray(rows[k], np.int32) for k in ("input_ids", "input_mask", "segment_ids")},
        start_positions=np.asarray(rows["start_positions"], np.int32),
        end_positions=np.asarray(rows["end_positions"], np.int32),
        example_index=np.asarray(rows["example_index"], np.int32),
        offsets=np.asarray(rows["offsets"], np.int32).reshape(-1, length, 2),
        max_context=np.asarray(rows["max_context"], bool).reshape(-1, length),
    )


def _answer_pieces(example: Example, offsets) -> tuple[int, int] | None:
    """The first and last context piece of the first gold answer (None: unanswerable, or an
    answer of whitespace only)."""
    if example.is_impossible or not example.answers:
        return None
    answer = example.answers[0]
    begin, end = answer.start, answer.start + len(answer.text)
    inside = [i for i, (s, e) in enumerate(offsets) if s < end and e > begin]
    return (inside[0], inside[-1]) if inside else None


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    version_2_with_negative: bool = False


@dataclasses.dataclass(frozen=True)
class Prediction:
    text: str  # "" for no answer
    best_span: str  # the best non-null span (v2.0's threshold tuning needs it)
    null_odds: float  # null score minus the best span's (v2.0; 0.0 for v1.1)
    nbest: tuple[tuple[str, float], ...]  # (text, probability), best first


def decode(
    examples: Sequence[Example],
    features: Features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    config: DecodeConfig,
) -> dict[str, Prediction]:
    """Per question id, the answer its windows' logits [N, L] point at (the module's rules)."""
    by_example = collections.defaultdict(list)
    for row, index in enumerate(features.example_index):
        by_example[int(index)].append(row)
    predictions = {}
    for index, example in enumerate(examples):
        candidates = []  # (start logit + end logit, text)
        null_score = math.inf
        for row in by_example[index]:
            if config.version_2_with_negative:
                null_score = min(null_score, float(start_logits[row][0] + end_logits[row][0]))
            candidates += _spans(example, features, row, start_logits[row], end_logits[row], config)
        if config.version_2_with_negative:
            candidates.append((null_score, ""))
        predictions[example.qas_id] = _prediction(candidates, null_score, config)
    return predictions


def _spans(example, features, row, s_logits, e_logits, config) -> list[tuple[float, str]]:
    """(start logit + end logit, text) of every valid span of window `row` among the n best
    starts and ends."""
    offsets, is_max = features.offsets[row], features.max_context[row]
    # The n best among the context's pieces (run_squad.py takes the n best of all positions
    # and drops the others after: question and padding could crowd out every context piece).
    context = offsets[:, 0] >= 0
    starts = np.argsort(-np.where(context, s_logits, -np.inf), kind="stable")
    ends = np.argsort(-np.where(context, e_logits, -np.inf), kind="stable")
    starts = starts[: min(config.n_best_size, int(context.sum()))]
    ends = ends[: min(config.n_best_size, int(context.sum()))]
    spans = []
    for s in starts:
        if offsets[s, 0] < 0 or not is_max[s]:
            continue
        for e in ends:
            if offsets[e, 0] < 0 or e < s or e - s + 1 > config.max_answer_length:
                continue
            text = example.context[offsets[s, 0] : offsets[e, 1]]
            spans.append((float(s_logits[s] + e_logits[e]), text))
    return spans


def _prediction(candidates, null_score: float, config: DecodeConfig) -> Prediction:
    """The answer among an example's (score, text) candidates: the n best distinct texts
    with their probabilities, and for v2.0 the null answer against the threshold."""
    candidates = sorted(candidates, key=lambda c: -c[0])
    nbest, seen = [], set()
    for score, text in candidates:
        if len(nbest) >= config.n_best_size:
            break
        if text in seen:
            continue
        seen.add(text)
        nbest.append((text, score))
    if config.version_2_with_negative and "" not in seen:  # the null answer always
        nbest.append(("", null_score))
    spans = [(t, s) for t, s in nbest if t]
    if not spans:  # nothing decodable: run_squad.py's "empty" answer
        spans = [("", 0.0)]
        if not nbest:
            nbest = [("", 0.0)]
    scores = np.array([s for _, s in nbest])
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    best_text, best_score = spans[0]
    if config.version_2_with_negative:
        odds = null_score - best_score
        text = "" if odds > config.null_score_diff_threshold else best_text
    else:
        odds, text = 0.0, nbest[0][0]
    return Prediction(
        text,
        best_text,
        odds,
        tuple((t, float(p)) for (t, _), p in zip(nbest, probs, strict=True)),
    )


# The official evaluation.


def write_predictions(
    directory: str, predictions: Mapping[str, Prediction], version_2: bool
) -> list[str]:
    """predictions.json ({id: answer}), nbest_predictions.json and, for v2.0, null_odds.json
    ({id: null odds}) in the official layouts. Returns the paths written."""
    written = {
        "predictions.json": {k: p.text for k, p in predictions.items()},
        "nbest_predictions.json": {
            k: [{"text": t, "probability": prob} for t, prob in p.nbest]
            for k, p in predictions.items()
        },
    }
    if version_2:
        written["null_odds.json"] = {k: p.null_odds for k, p in predictions.items()}
    paths = []
    for name, content in written.items():
        path = os.path.join(directory, name)
        files.atomic_write(path, json.dumps(content, indent=2, ensure_ascii=False).encode())
        paths.append(path)
    return paths


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

    def _read(self, settings, split) -> list[Example]:
        """The official JSON file, or with `--config.source=tfds` TFDS `squad/v1.1` or
        `squad/v2.0` (train and validation)."""
        if settings.source != "tfds":
            return read_squad(self._path(settings, split))
        name, tfds_split = f"squad/v{self.version}", {"train": "train", "dev": "validation"}[split]
        source = encoding.tfds_source(
            name,
            tfds_split,
            settings.tfds_data_dir or None,
            f"the official JSON files in --config.data_dir/{self.folder}/ (--config.source=tsv)",
        )
        return examples_from_tfds(source, f"TFDS {name} {tfds_split}")

    def check(self, settings):
        return base.problems_of(*(functools.partial(self._read, settings, s) for s in self.files))

    def _windows(self, settings):
        return WindowConfig(settings.max_seq_length, settings.doc_stride, settings.max_query_length)

    def load(self, settings, tokenizer):
        train = self._read(settings, "train")
        if settings.max_train_examples:
            train = train[: settings.max_train_examples]
        windows = self._windows(settings)
        examples = self._read(settings, "dev")
        features = make_features(examples, tokenizer, windows)
        decoding = DecodeConfig(
            settings.n_best_size, settings.max_answer_length, 0.0, self.version_2
        )
        dev = base.Split((examples, features, decoding), features.inputs())
        return base.TaskData(
            make_features(train, tokenizer, windows).inputs(), {"dev": dev}, {"dev": dev}
        )

    def _predictions(self, split, outputs):
        """Decoded answers; for v2.0, with the null threshold that scores best on this split."""
        examples, features, decoding = split.examples
        start, end = outputs
        decoded = decode(examples, features, start, end, decoding)
        if not self.version_2:
            return {k: p.text for k, p in decoded.items()}, {}, decoded
        spans = {k: p.best_span for k, p in decoded.items()}
        odds = {k: p.null_odds for k, p in decoded.items()}
        tuned = squad_eval.evaluate(examples, spans, odds)
        threshold = tuned["best_f1_thresh"]
        answers = {k: "" if odds[k] > threshold else spans[k] for k in spans}
        return answers, {"null_score_diff_threshold": threshold}, decoded

    def evaluate(self, name, split, outputs):
        answers, extra, _ = self._predictions(split, outputs)
        scores = squad_eval.evaluate(split.examples[0], answers)
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
            k: Prediction(answers[k], p.best_span, p.null_odds, p.nbest) for k, p in decoded.items()
        }
        return write_predictions(folder, final, self.version_2)[0]

    line_format = "`question ||| context`"

    def from_lines(self, lines, tokenizer, settings):
        examples = []
        for i, line in enumerate(lines):
            question, context = base.split_line(line, 2, self.name, self.line_format)
            examples.append(Example(str(i), question, context, ()))
        features = make_features(examples, tokenizer, self._windows(settings))
        decoding = DecodeConfig(
            settings.n_best_size, settings.max_answer_length, 0.0, self.version_2
        )
        return base.Split((examples, features, decoding), features.inputs())

    def answers(self, split, outputs):
        """The best span, its probability among the n best, and (v2.0) the null odds: the
        no-answer score minus the span's, to compare with the threshold tuned on dev."""
        examples, features, decoding = split.examples
        start, end = outputs
        decoded = decode(examples, features, np.asarray(start), np.asarray(end), decoding)
        out = []
        for example in examples:
            p = decoded[example.qas_id]
            probability = dict(p.nbest).get(p.best_span, 0.0)
            out.append(
                {"answer": p.best_span, "probability": probability, "null_odds": p.null_odds}
            )
        return out
