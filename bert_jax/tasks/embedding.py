"""Sentence embeddings trained on a user's folder (`embed:<folder>`): pairs, triplets with
hard negatives, or scored pairs, trained contrastively over the whole global batch;
evaluated on STS pairs and BEIR retrieval during training.

In `<data_dir>/<folder>/`:
- `train.jsonl` or `train.tsv` (a header naming the columns), one example a line:
  `anchor`, `positive` and any number of hard negatives (`negative`, or `negative_1`,
  `negative_2`, ...; in JSON also `negatives`: a list), the same number on every line:
  in-batch negatives (MultipleNegativesRankingLoss), each anchor against every positive and
  negative of the global batch; or `sentence1`, `sentence2`, `score`: CoSENT.
- Evaluated after each epoch (at least one; the first present selects the best checkpoint):
  `dev.jsonl`/`dev.tsv` with `sentence1`, `sentence2`, `score` (STS: Spearman and Pearson of
  the cosines); `corpus.jsonl`, `queries.jsonl` and `qrels/dev.tsv` (BEIR: nDCG@10, MRR@10,
  Recall@100 by exact search over the devices).
- Predicted from the best checkpoint when present: `test.jsonl`/`test.tsv` scored pairs (each
  pair's cosine) and `qrels/test.tsv` (each query's 100 best documents, as a TREC run file).

The model is the encoder without a head; the run's checkpoint exports as a
sentence-transformers folder (`python -m bert_jax.convert export-sentence-transformers`).
"""

import dataclasses
import functools
import os

import numpy as np

from bert_jax import files, objectives
from bert_jax.data import encoding
from bert_jax.tasks import base, glue, retrieval

SCORED = ("sentence1", "sentence2", "score")


@dataclasses.dataclass(frozen=True)
class Examples:
    """A file's examples: `texts[i]` the example's texts (T of them, the same for all) and
    `scores` [N] float32 (scored pairs) or None (anchor, positive, negatives...)."""

    texts: list[tuple[str, ...]]
    scores: np.ndarray | None


def _negatives(row: dict) -> list:
    if isinstance(row.get("negatives"), list):
        return list(row["negatives"])
    numbered = sorted(
        (k for k in row if k.startswith("negative_") and k[9:].isdigit()), key=lambda k: int(k[9:])
    )
    return ([row["negative"]] if "negative" in row else []) + [row[k] for k in numbered]


def read_examples(path: str) -> Examples:
    """The examples of a `.jsonl` or `.tsv` file (see the module's docstring).

    Raises:
      ValueError naming the file and line: neither layout's columns, a text that is not text,
      a score that is not a number, a line with another number of negatives than the first.
    """
    rows = base.read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no examples")
    scored = all(k in rows[0][1] for k in SCORED)
    if not scored and not {"anchor", "positive"} <= set(rows[0][1]):
        raise ValueError(
            f"{path}:{rows[0][0]}: name the columns anchor, positive (and negative, "
            f"negative_1, ...) for pairs and triplets, or sentence1, sentence2, score for "
            f"scored pairs; got {sorted(rows[0][1])}"
        )
    texts, scores = [], []
    for number, row in rows:
        if scored:
            example = (row.get("sentence1"), row.get("sentence2"))
            try:
                scores.append(float(row.get("score")))
            except (TypeError, ValueError):
                score = row.get("score")
                raise ValueError(f"{path}:{number}: score {score!r} is not a number") from None
        else:
            example = (row.get("anchor"), row.get("positive"), *_negatives(row))
        if not all(isinstance(t, str) for t in example):
            raise ValueError(f"{path}:{number}: every text must be a string, got {example}")
        if texts and len(example) != len(texts[0]):
            raise ValueError(
                f"{path}:{number}: {len(example) - 2} hard negatives where line {rows[0][0]} has "
                f"{len(texts[0]) - 2}: give every anchor the same number (a batch is one shape)"
            )
        texts.append(example)
    return Examples(texts, np.array(scores, np.float32) if scored else None)


def text_features(texts: list[tuple[str, ...]], tokenizer, max_seq_length: int) -> dict:
    """input_ids, input_mask, segment_ids [N, T, L] int32: each text as `[CLS] text [SEP]`."""
    n, t = len(texts), len(texts[0]) if texts else 1
    flat = glue.Examples([x for example in texts for x in example], None, None, [])
    features = encoding.encode(flat, tokenizer, max_seq_length)
    return {k: features[k].reshape(n, t, max_seq_length) for k in objectives.contrastive.TEXT_KEYS}


def _first(folder: str, name: str) -> str | None:
    for extension in (".jsonl", ".tsv"):
        if files.isfile(os.path.join(folder, name + extension)):
            return os.path.join(folder, name + extension)
    return None


@dataclasses.dataclass(frozen=True)
class Beir:
    """A BEIR split's texts in one list (queries, then the documents) and its judgements."""

    query_ids: list[str]
    doc_ids: list[str]
    qrels: dict


class EmbeddingTask(base.Task):
    """`embed:<folder>`: a sentence-embedding model trained on the folder's examples."""

    architecture = "BertModel"
    num_labels = 0
    packable = False
    line_format = "a text"

    def __init__(self, folder: str):
        self.folder = folder
        self.name = f"embed:{folder}"
        self.spec = objectives.Embedding()
        # Until `prepare` reads the folder: what it holds decides these.
        self.dev_names, self.metrics = ("sts",), ("spearman", "pearson")
        self.texts_per_example = 2

    # -- what the harness reads before the data ------------------------------------------

    def prepare(self, settings):
        folder = self._folder(settings)
        train = _first(folder, "train")
        # Read once here: the loss and every batch's shape follow from its layout (without
        # data, as when only compiling: pairs).
        examples = read_examples(train) if train else Examples([("", "")], None)
        kind = "scored" if examples.scores is not None else "ranking"
        self.texts_per_example = len(examples.texts[0])
        self.spec = objectives.Embedding(kind=kind, **dict(settings.embedding))
        self.dev_names = tuple(n for n, _ in self._evaluations(settings, "dev"))
        self.metrics = ("spearman", "pearson") if self.dev_names[:1] == ("sts",) else ()
        if self.dev_names[:1] == ("retrieval",):
            self.metrics = ("ndcg@10", "mrr@10", "recall@100")

    def objective(self, dropout):
        del dropout  # the encoder's own dropout: there is no head
        return objectives.embedding_objective(self.spec)

    def run_record(self):
        return {"pooling": list(self.spec.modes)}

    def feature_specs(self, settings):
        row = ((self.texts_per_example, settings.max_seq_length), np.dtype(np.int32))
        specs = {"input_ids": row, "input_mask": row, "segment_ids": row}
        if self.spec.kind == "scored":
            specs["label"] = ((), np.dtype(np.float32))
        return specs

    # -- reading -------------------------------------------------------------------------

    def _folder(self, settings) -> str:
        return os.path.join(settings.data_dir, self.folder)

    def _evaluations(self, settings, split: str) -> list[tuple[str, object]]:
        """The evaluations of `split` ("dev", "test") the folder holds: ("sts", path),
        ("retrieval", split)."""
        folder, found = self._folder(settings), []
        pairs = _first(folder, split)
        if pairs:
            found.append(("sts", pairs))
        if files.isfile(os.path.join(folder, "qrels", f"{split}.tsv")):
            found.append(("retrieval", split))
        return found

    def check(self, settings):
        folder = self._folder(settings)
        if not files.isdir(folder):
            return [f"{folder} does not exist: embed:<folder> reads <data_dir>/<folder>/"]
        train = _first(folder, "train")
        if train is None:
            return [f"{folder} holds no train.jsonl or train.tsv (the training examples)"]
        reads = [functools.partial(read_examples, train)]
        for split in ("dev", "test"):
            for kind, what in self._evaluations(settings, split):
                if kind == "sts":
                    reads.append(functools.partial(self._scored, what))
                else:
                    reads.append(functools.partial(retrieval.read_beir, folder, what))
        problems = base.problems_of(*reads)
        if not self._evaluations(settings, "dev"):
            problems.append(
                f"{folder} holds nothing to evaluate on: add dev.jsonl/dev.tsv (sentence1, "
                f"sentence2, score) or a BEIR dev split (corpus.jsonl, queries.jsonl, "
                f"qrels/dev.tsv)"
            )
        return problems

    @staticmethod
    def _scored(path: str) -> Examples:
        examples = read_examples(path)
        if examples.scores is None:
            raise ValueError(f"{path}: evaluation pairs need sentence1, sentence2 and score")
        return examples

    def load(self, settings, tokenizer):
        length = settings.max_seq_length
        train = read_examples(_first(self._folder(settings), "train"))
        texts = train.texts[: settings.max_train_examples or None]
        features = text_features(texts, tokenizer, length)
        if train.scores is not None:
            features["label"] = train.scores[: len(texts)]
        splits = {}
        for split in ("dev", "test"):
            splits[split] = {
                name: self._split(settings, kind, what, tokenizer)
                for kind, what in self._evaluations(settings, split)
                for name in [kind if split == "dev" else f"{kind}_test"]
            }
        return base.TaskData(features, splits["dev"], splits["test"])

    def _split(self, settings, kind, what, tokenizer) -> base.Split:
        length = settings.max_seq_length
        if kind == "sts":
            examples = self._scored(what)
            return base.Split(examples, text_features(examples.texts, tokenizer, length))
        corpus, queries, qrels = retrieval.read_beir(self._folder(settings), what)
        query_ids = [q for q in queries if q in qrels]
        texts = [(queries[q],) for q in query_ids] + [(corpus[d],) for d in corpus]
        beir = Beir(query_ids, list(corpus), qrels)
        return base.Split(beir, text_features(texts, tokenizer, length))

    # -- scoring and writing -------------------------------------------------------------

    def evaluate(self, name, split, outputs):
        vectors = np.asarray(outputs, np.float32)
        if isinstance(split.examples, Beir):
            metrics = retrieval.evaluate(split.examples.qrels, self._run(split.examples, vectors))
            return {**metrics, "score": metrics["ndcg@10"]}
        metrics = retrieval.sts(vectors[:, 0], vectors[:, 1], split.examples.scores)
        return {**metrics, "score": metrics["spearman"]}

    @staticmethod
    def _run(beir: Beir, vectors: np.ndarray, depth: int = 100) -> dict:
        """Each query's `depth` best documents by exact search over the devices."""
        n = len(beir.query_ids)
        return retrieval.search_run(
            vectors[:n, 0], beir.query_ids, vectors[n:, 0], beir.doc_ids, depth=depth
        )

    def write_predictions(self, directory, name, split, outputs):
        vectors = np.asarray(outputs, np.float32)
        if isinstance(split.examples, Beir):
            path = os.path.join(directory, "predictions", f"{name}.trec")
            run = self._run(split.examples, vectors)
            lines = [
                f"{q} Q0 {doc} {rank} {score:.6f} bert_jax"
                for q, scores in run.items()
                for rank, (doc, score) in enumerate(scores.items(), 1)
            ]
        else:
            path = os.path.join(directory, "predictions", f"{name}.tsv")
            cosine = retrieval.cosines(vectors[:, 0], vectors[:, 1])
            lines = ["sentence1\tsentence2\tcosine"] + [
                f"{a}\t{b}\t{c:.6f}" for (a, b), c in zip(split.examples.texts, cosine, strict=True)
            ]
        files.atomic_write(path, ("\n".join(lines) + "\n").encode())
        return path

    def from_lines(self, lines, tokenizer, settings):
        texts = [(line,) for line in lines]
        return base.Split(
            Examples(texts, None), text_features(texts, tokenizer, settings.max_seq_length)
        )

    def answers(self, split, outputs):
        return [{"embedding": [float(x) for x in v[0]]} for v in np.asarray(outputs)]
