"""Evaluation of embeddings: retrieval as BEIR does it (its folders; nDCG@k, MRR@k, Recall@k
with trec_eval's conventions, those of `pytrec_eval`, which BEIR calls), and semantic textual
similarity (`sts`: Pearson and Spearman of the pairs' cosines against gold scores).

A BEIR folder holds `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`)
and `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header line). A run maps each
query id to the scores of the documents retrieved for it. The conventions, as trec_eval's:
documents are ranked by score, ties by document id in reverse string order; a document
without a judgement is not relevant, nor is one judged 0 or less; nDCG's gain is the
judgement itself (not 2^rel - 1) with the log2(rank + 1) discount, against the ideal order
of the judgements; only queries both judged and run are scored, and the figures are their
means. No flax, no jax: the metric of a task.
"""

import csv
import io
import json
import math

import numpy as np

from bert_jax import files
from bert_jax.tasks import glue


def read_beir(folder: str, split: str = "test") -> tuple[dict, dict, dict]:
    """(corpus {id: "title text"}, queries {id: text}, qrels {query: {doc: relevance}}).

    Raises:
      FileNotFoundError naming the missing file of the folder.
    """
    paths = {
        "corpus": files.join(folder, "corpus.jsonl"),
        "queries": files.join(folder, "queries.jsonl"),
        "qrels": files.join(folder, "qrels", f"{split}.tsv"),
    }
    for name, path in paths.items():
        if not files.exists(path):
            raise FileNotFoundError(f"{path}: a BEIR folder needs {name} there")
    corpus = {}
    for record in _jsonl(paths["corpus"]):
        title, text = record.get("title") or "", record.get("text") or ""
        corpus[str(record["_id"])] = f"{title} {text}".strip() if title else text
    queries = {str(r["_id"]): r["text"] for r in _jsonl(paths["queries"])}
    qrels: dict[str, dict[str, int]] = {}
    text = files.read_bytes(paths["qrels"]).decode("utf-8")
    rows = csv.reader(io.StringIO(text), delimiter="\t")
    next(rows, None)  # the header
    for row in rows:
        if row:
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return corpus, queries, qrels


def _jsonl(path: str):
    for line in files.read_bytes(path).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def ranked(scores: dict[str, float]) -> list[str]:
    """Document ids by score, ties by id in reverse string order (trec_eval's order)."""
    by_id = sorted(scores, reverse=True)
    return sorted(by_id, key=lambda doc: -scores[doc])


def evaluate(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    ndcg_at: int = 10,
    mrr_at: int = 10,
    recall_at: int = 100,
) -> dict[str, float]:
    """Mean nDCG@ndcg_at, MRR@mrr_at and Recall@recall_at over the queries judged and run
    (names `ndcg@10`, `mrr@10`, `recall@100` for the defaults), and `queries`: how many."""
    per_query = [_query(qrels[q], run[q], ndcg_at, mrr_at, recall_at) for q in run if q in qrels]
    names = (f"ndcg@{ndcg_at}", f"mrr@{mrr_at}", f"recall@{recall_at}")
    if not per_query:
        raise ValueError("no query of the run is in the judgements (qrels): nothing to score")
    means = {name: sum(p[i] for p in per_query) / len(per_query) for i, name in enumerate(names)}
    return {**means, "queries": len(per_query)}


def _query(judged: dict[str, int], scores: dict[str, float], ndcg_at, mrr_at, recall_at):
    order = ranked(scores)
    gains = [max(judged.get(doc, 0), 0) for doc in order]
    dcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(gains[:ndcg_at]))
    ideal = sorted((r for r in judged.values() if r > 0), reverse=True)[:ndcg_at]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    first = next((rank for rank, g in enumerate(gains[:mrr_at]) if g > 0), None)
    relevant = sum(1 for r in judged.values() if r > 0)
    found = sum(1 for g in gains[:recall_at] if g > 0)
    return (
        dcg / idcg if idcg else 0.0,
        1.0 / (first + 1) if first is not None else 0.0,
        found / relevant if relevant else 0.0,
    )


def sts(first: np.ndarray, second: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlations of each pair's cosine similarity (rows of `first`
    and `second`, [N, D]) with its gold score (STS-B's 0-5, say); 0 where undefined."""
    first = first / np.maximum(np.linalg.norm(first, axis=1, keepdims=True), 1e-12)
    second = second / np.maximum(np.linalg.norm(second, axis=1, keepdims=True), 1e-12)
    cosine = np.sum(first * second, axis=1)
    gold = np.asarray(gold, np.float64)
    return {"pearson": glue.pearson(gold, cosine), "spearman": glue.spearman(gold, cosine)}
