"""Named-entity recognition on CoNLL-2003 and any data in its column layout: reading, word-
aligned features, per-word decoding and entity-level precision, recall and F1.

- Files: one token per line, whitespace-separated columns (CoNLL-2003: word, POS, chunk, NER
  tag), the tag in the last column (or `tag_column`); a blank line ends a sentence; a
  `-DOCSTART-` line starts a document.
- Tags: IOB1 as CoNLL-2003 is distributed (I- opens an entity; B- only where two entities of
  one type touch), IOB2 (B- opens every entity), IOBES. `iob1_to_iob2` converts.
- Features: each word's pieces; the word's label on its first piece, the other pieces
  ignored by the loss (weight 0); a sentence longer than a row is cut into overlapping rows
  of whole words, each word labelled and predicted in the row where it has the most context.
- Entities: the default mode counts chunks as `conlleval` (and `seqeval`'s default mode) do,
  whatever the scheme: a chunk starts at B-, at an I- after O or after another type, and ends
  before O, B- or another type. The strict mode (`seqeval` mode="strict" with IOB2) counts
  only well-formed IOB2 entities: B-X followed by I-X; a stray I- is no entity.
"""

import collections
import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np

from bert_jax import files, objectives
from bert_jax.data import encoding
from bert_jax.tasks import base


@dataclasses.dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]
    document: int = 0


DOCSTART = "-DOCSTART-"


def sentences_from_tfds(records, tag_names: Sequence[str]) -> list[Sentence]:
    """The sentences of TFDS `conll2003` records (`tokens` as bytes, `ner` as indices into
    `tag_names`, the builder's class names); TFDS keeps no document boundaries."""
    return [
        Sentence(
            tuple(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in r["tokens"]),
            tuple(tag_names[int(k)] for k in r["ner"]),
        )
        for r in (records[i] for i in range(len(records)))
    ]


def read_conll(path: str, tag_column: int = -1, labels: Sequence[str] | None = None):
    """The sentences of a CoNLL column file.

    Raises:
      ValueError naming the file and line: a line with another number of columns than the
      file's first, a tag not in `labels` (when given), a tag that is not O, B-X, I-X, E-X
      or S-X.
    """
    sentences, words, tags = [], [], []
    document, columns, first, where = 0, None, 0, path
    known = None if labels is None else set(labels)

    def close():
        if words:
            sentences.append(Sentence(tuple(words), tuple(tags), document))
            words.clear()
            tags.clear()

    with files.open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            fields = line.split()
            if not fields:
                close()
                continue
            if fields[0] == DOCSTART:
                close()
                document += 1 if sentences else 0
                continue
            if columns is None:
                columns, first = len(fields), number
            if len(fields) != columns:
                raise ValueError(
                    f"{where}: {len(fields)} columns where line {first} has {columns}: "
                    f"{line.strip()!r}; CoNLL files hold one token per line, columns separated "
                    f"by whitespace, the same columns on every line"
                )
            tag = fields[tag_column]
            if known is not None and tag not in known:
                raise ValueError(
                    f"{where}: the tag {tag!r} is not one of the labels {sorted(known)}; add it "
                    f"to the label list or fix the file"
                )
            if tag != "O" and (len(tag) < 3 or tag[1] != "-" or tag[0] not in "BIES"):
                raise ValueError(
                    f"{where}: {tag!r} is not a tag of the IOB/IOBES schemes (O, B-X, I-X, "
                    f"E-X, S-X); is tag_column={tag_column} the NER column?"
                )
            words.append(fields[0])
            tags.append(tag)
    close()
    if not sentences:
        raise ValueError(f"{path}: no sentence found (an empty file, or only separators)")
    return sentences


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """IOB1 -> IOB2: an I-X that opens an entity (after O or another type) becomes B-X."""
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def entities(tags: Sequence[str], strict: bool = False) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity of a tag sequence (the module's rules)."""
    return _strict_entities(tags) if strict else _chunks(tags)


def _chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    found = []
    start, prefix, kind = None, "O", ""
    for i, tag in enumerate([*tags, "O"]):
        p, t = (tag, "") if tag == "O" else (tag[0], tag[2:])
        ends = start is not None and (
            prefix in "ES" or (prefix in "BI" and p in "BSO") or kind != t
        )
        if ends:
            found.append((kind, start, i - 1))
            start = None
        opens = p in "BS" or (p in "IE" and (prefix in "OES" or kind != t))
        if p != "O" and (opens or start is None):
            start = i
        prefix, kind = p, t
    return found


def _strict_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    bad = [t for t in tags if t != "O" and not t.startswith(("B-", "I-"))]
    if bad:
        raise ValueError(
            f"strict IOB2 scoring takes O, B- and I- tags only, not {bad[0]!r}: score IOBES "
            f"tags in the default mode"
        )
    found, start, kind = [], None, ""
    for i, tag in enumerate([*tags, "O"]):
        if start is not None and tag != f"I-{kind}":
            found.append((kind, start, i - 1))
            start = None
        if tag.startswith("B-"):
            start, kind = i, tag[2:]
    return found


def entity_scores(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], strict: bool = False
) -> dict:
    """Micro precision, recall and F1 over the entities of all sentences, and per type
    (fractions; F1 0 where nothing is predicted or nothing is gold)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    true, pred = set(), set()
    for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        true |= {(i, *e) for e in entities(g, strict)}
        pred |= {(i, *e) for e in entities(p, strict)}
    out = _prf(len(true & pred), len(pred), len(true))
    kinds = sorted({e[1] for e in true | pred})
    out["per_type"] = {
        k: _prf(
            len({e for e in true & pred if e[1] == k}),
            len({e for e in pred if e[1] == k}),
            len({e for e in true if e[1] == k}),
        )
        for k in kinds
    }
    return out


def _prf(correct: int, predicted: int, gold: int) -> dict:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": gold}


@dataclasses.dataclass
class Features:
    """Rows of word pieces with the label of each word on its first piece."""

    input_ids: np.ndarray  # [N, L] int32
    input_mask: np.ndarray
    segment_ids: np.ndarray
    labels: np.ndarray  # [N, L] int32 (0 where ignored)
    label_weights: np.ndarray  # [N, L] float32: 1 on each word's first piece
    words: np.ndarray  # [N, L, 2] int32: (sentence, word) of a first piece; -1 elsewhere

    def __len__(self) -> int:
        return len(self.input_ids)

    def inputs(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "input_mask": self.input_mask,
            "segment_ids": self.segment_ids,
            "labels": self.labels,
            "label_weights": self.label_weights,
        }


def make_features(
    sentences: Sequence[Sentence], tokenizer, labels: Sequence[str], max_seq_length: int
) -> Features:
    """[CLS] pieces [SEP] rows. A sentence whose pieces do not fit one row is cut into
    overlapping rows of whole words, each starting with about half a row of the previous
    one as left context; every word is labelled (and later predicted) in the one row where it
    has the most context on both sides, as SQuAD's windows are scored. A word with no piece
    gets [UNK]."""
    index = {label: i for i, label in enumerate(labels)}
    room = max_seq_length - 2
    rows: dict[str, list] = collections.defaultdict(list)
    pieces = tokenizer.encode_words([" ".join(s.words) for s in sentences])
    for s_index, (sentence, words) in enumerate(zip(sentences, pieces, strict=True)):
        words = [(ids or [tokenizer.unk_id])[:room] for ids in words]
        spans = word_windows([len(w) for w in words], room)
        best = [_best_window(spans, w, [len(x) for x in words]) for w in range(len(words))]
        for span_index, (first, last) in enumerate(spans):
            ids, targets, weights, where = [tokenizer.cls_id], [0], [0.0], [(-1, -1)]
            for w in range(first, last):
                scored = best[w] == span_index
                ids += words[w]
                targets += [index.get(sentence.tags[w], 0)] + [0] * (len(words[w]) - 1)
                weights += [float(scored)] + [0.0] * (len(words[w]) - 1)
                where += [(s_index, w) if scored else (-1, -1)] + [(-1, -1)] * (len(words[w]) - 1)
            ids.append(tokenizer.sep_id)
            pad = max_seq_length - len(ids)
            rows["input_ids"].append(ids + [tokenizer.pad_id] * pad)
            rows["input_mask"].append([1] * len(ids) + [0] * pad)
            rows["labels"].append(targets + [0] * (pad + 1))
            rows["label_weights"].append(weights + [0.0] * (pad + 1))
            rows["words"].append(where + [(-1, -1)] * (pad + 1))
    length = max_seq_length
    return Features(
        input_ids=np.asarray(rows["input_ids"], np.int32).reshape(-1, length),
        input_mask=np.asarray(rows["input_mask"], np.int32).reshape(-1, length),
        segment_ids=np.zeros((len(rows["input_ids"]), length), np.int32),
        labels=np.asarray(rows["labels"], np.int32).reshape(-1, length),
        label_weights=np.asarray(rows["label_weights"], np.float32).reshape(-1, length),
        words=np.asarray(rows["words"], np.int32).reshape(-1, length, 2),
    )


def word_windows(sizes: Sequence[int], room: int) -> list[tuple[int, int]]:
    """[first, last) word ranges of at most `room` pieces (word sizes `sizes`) covering the
    words; each after the first starts at the earliest word that leaves at most half a row
    of the previous range before the previous range's end."""
    spans, first, n = [], 0, len(sizes)
    while True:
        last, used = first, 0
        while last < n and used + sizes[last] <= room:
            used += sizes[last]
            last += 1
        spans.append((first, last))
        if last >= n:
            return spans
        start, context = last, 0
        while start - 1 > first and context + sizes[start - 1] <= room // 2:
            start -= 1
            context += sizes[start]
        first = start


def _best_window(spans, word: int, sizes) -> int:
    """The range where `word` has the most context (pieces on its left and right, the fewer
    of the two, plus 1% of the range's size), the first winning ties."""
    best, best_score = -1, None
    for i, (first, last) in enumerate(spans):
        if not first <= word < last:
            continue
        left, right = sum(sizes[first:word]), sum(sizes[word + 1 : last])
        score = min(left, right) + 0.01 * sum(sizes[first:last])
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best


def decode(
    sentences: Sequence[Sentence], features: Features, logits: np.ndarray, labels: Sequence[str]
) -> list[list[str]]:
    """Per sentence, the tag of each word: the best label at the word's first piece."""
    out = [["O"] * len(s.words) for s in sentences]
    best = np.asarray(logits).argmax(-1)
    rows, positions = np.nonzero(features.words[..., 0] >= 0)
    for row, pos in zip(rows, positions, strict=True):
        s_index, w_index = features.words[row, pos]
        out[s_index][w_index] = labels[best[row, pos]]
    return out


def write_predictions(path: str, sentences: Sequence[Sentence], predicted) -> None:
    """`word gold predicted` per line, a blank line after each sentence: conlleval's input."""
    lines = []
    for sentence, tags in zip(sentences, predicted, strict=True):
        rows = zip(sentence.words, sentence.tags, tags, strict=True)
        lines += [f"{w} {g} {p}" for w, g, p in rows]
        lines.append("")
    files.atomic_write(path, ("\n".join(lines) + "\n").encode())


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
        sentences = sentences_from_tfds(source, names)
        return [Sentence(s.words, tuple(iob1_to_iob2(s.tags))) for s in sentences]

    def _read_file(self, settings, split):
        path = os.path.join(settings.data_dir, self.folder, self.files[split])
        sentences = read_conll(path, labels=self.labels)
        return [Sentence(s.words, tuple(iob1_to_iob2(s.tags)), s.document) for s in sentences]

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
            features = make_features(sentences, tokenizer, self.labels, settings.max_seq_length)
            return base.Split((sentences, features), features.inputs())

        train = self._read(settings, "train")
        if settings.max_train_examples:
            train = train[: settings.max_train_examples]
        features = make_features(train, tokenizer, self.labels, settings.max_seq_length)
        loaded = {name: split(name) for name in splits if name != "train"}
        dev = {name: loaded[name] for name in self.dev_names}
        predict = {"test": loaded["test"]} if "test" in loaded else {}
        return base.TaskData(features.inputs(), dev, predict)

    def _tags(self, split, outputs):
        sentences, features = split.examples
        return decode(sentences, features, np.asarray(outputs), self.labels)

    def evaluate(self, name, split, outputs):
        gold = [list(s.tags) for s in split.examples[0]]
        scores = entity_scores(gold, self._tags(split, outputs))
        return {k: scores[k] for k in self.metrics} | {"score": scores["f1"]}

    def write_predictions(self, directory, name, split, outputs):
        path = os.path.join(directory, "predictions", f"conll2003_{name}.txt")
        files.makedirs(os.path.dirname(path))
        write_predictions(path, split.examples[0], self._tags(split, outputs))
        return path

    line_format = "words separated by spaces"

    def from_lines(self, lines, tokenizer, settings):
        # The tags are unknown: "O" stands in, as an unlabelled test file's would.
        sentences = [Sentence(tuple(line.split()), ("O",) * len(line.split())) for line in lines]
        features = make_features(sentences, tokenizer, self.labels, settings.max_seq_length)
        return base.Split((sentences, features), features.inputs())

    def answers(self, split, outputs):
        out = []
        for sentence, tags in zip(split.examples[0], self._tags(split, outputs), strict=True):
            found = [
                {"type": kind, "text": " ".join(sentence.words[a : b + 1]), "start": a, "end": b}
                for kind, a, b in entities(tags)
            ]
            out.append({"tags": tags, "entities": found})
        return out
