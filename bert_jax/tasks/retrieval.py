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
means.

`Index` finds each query's best documents exactly, the corpus spread over the devices. Each
device holds a slice of the corpus rows and scores a block of queries against it with one
matmul, keeps its own k best, and the devices' candidates are gathered and merged into the k
best overall (`shard_map`): no device ever holds the whole corpus or the whole score matrix,
so a corpus that fits the devices together is searched exactly. Ties go to the lower corpus
row, as a stable sort of the scores does. `similarity`: "cosine" (vectors normalized first)
or "dot".
"""

import csv
import functools
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bert_jax import files, sharding
from bert_jax.models import pooling
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


def cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """[N] cosine similarity of each row of `first` with the same row of `second` ([N, D])."""
    first = first / np.maximum(np.linalg.norm(first, axis=1, keepdims=True), 1e-12)
    second = second / np.maximum(np.linalg.norm(second, axis=1, keepdims=True), 1e-12)
    return np.sum(first * second, axis=1)


def sts(first: np.ndarray, second: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlations of each pair's cosine similarity (rows of `first`
    and `second`, [N, D]) with its gold score (STS-B's 0-5, say); 0 where undefined."""
    cosine = cosines(first, second)
    gold = np.asarray(gold, np.float64)
    return {"pearson": glue.pearson(gold, cosine), "spearman": glue.spearman(gold, cosine)}


def search_run(
    queries: np.ndarray,
    query_ids: list[str],
    documents: np.ndarray,
    doc_ids: list[str],
    *,
    similarity: str = "cosine",
    depth: int = 100,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, dict[str, float]]:
    """A run (each query's `depth` best documents and their scores) by exact search of
    `queries` [Q, D] against `documents` [N, D] over the devices. A query's own id among the
    documents is left out of its results, as BEIR's `ignore_identical_ids` does."""
    index = Index(documents, similarity=similarity, mesh=mesh)
    scores, ids = index.search(queries, depth + 1)
    run = {}
    for query, row_scores, row_ids in zip(query_ids, scores, ids, strict=True):
        found = {doc_ids[i]: float(s) for s, i in zip(row_scores, row_ids, strict=True)}
        found.pop(query, None)
        run[query] = dict(list(found.items())[:depth])
    return run


SIMILARITIES = ("cosine", "dot")


class Index:
    """A corpus of vectors placed over a mesh's devices, row-wise, for `search`."""

    def __init__(
        self,
        vectors: np.ndarray,
        *,
        similarity: str = "cosine",
        mesh: jax.sharding.Mesh | None = None,
        query_block: int = 256,
    ):
        """`vectors`: [N, D] float; `query_block`: queries scored a step (bounds the [block,
        N / devices] score matrix each device holds)."""
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}; use one of {SIMILARITIES}")
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or not len(vectors):
            raise ValueError(f"the corpus must be a non-empty [N, D] array, got {vectors.shape}")
        self.mesh = mesh or sharding.make_mesh(sharding.MeshConfig())
        self.similarity, self.query_block, self.size = similarity, query_block, len(vectors)
        self.axes = tuple(self.mesh.axis_names)
        shards = self.mesh.devices.size
        rows = -(-len(vectors) // shards) * shards  # every device the same number of rows
        padded = np.zeros((rows, vectors.shape[1]), np.float32)
        padded[: len(vectors)] = vectors
        valid = np.arange(rows) < len(vectors)
        split = NamedSharding(self.mesh, PartitionSpec(self.axes))
        self.corpus = jax.device_put(padded, split)
        self.valid = jax.device_put(valid, split)
        if similarity == "cosine":
            self.corpus = jax.jit(pooling.normalize)(self.corpus)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best corpus rows of each query: (scores [Q, k] float32, ids [Q, k] int64),
        best first; `k` larger than the corpus is cut to its size."""
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.corpus.shape[1]:
            raise ValueError(
                f"queries must be [Q, {self.corpus.shape[1]}] (the corpus's dimension), got "
                f"{queries.shape}"
            )
        k = min(k, self.size)
        step = _search_step(self.mesh, self.axes, k, self.similarity == "cosine")
        scores, ids = [], []
        for start in range(0, len(queries), self.query_block):
            block = queries[start : start + self.query_block]
            rows = len(block)
            if rows < self.query_block and len(queries) > self.query_block:
                block = np.concatenate([block, np.zeros((self.query_block - rows, block.shape[1]))])
            s, i = jax.device_get(step(jnp.asarray(block, jnp.float32), self.corpus, self.valid))
            scores.append(s[:rows])
            ids.append(i[:rows])
        return np.concatenate(scores), np.concatenate(ids).astype(np.int64)


@functools.lru_cache(maxsize=16)
def _search_step(mesh, axes: tuple[str, ...], k: int, normalize: bool):
    """The jitted search of a query block: per device, scores against its rows and its k best;
    then the devices' candidates merged into the k best."""

    def local(queries, corpus, valid):
        scores = queries @ corpus.T  # [Q, n]: this device's rows
        scores = jnp.where(valid[None], scores, -jnp.inf)
        n = corpus.shape[0]
        best, index = jax.lax.top_k(scores, min(k, n))
        index = index + jax.lax.axis_index(axes) * n  # the corpus row
        # Every device's candidates, in device order (so in row order among equal scores).
        best = jax.lax.all_gather(best, axes, axis=1, tiled=True)
        index = jax.lax.all_gather(index, axes, axis=1, tiled=True)
        merged, where = jax.lax.top_k(best, k)
        return merged, jnp.take_along_axis(index, where, axis=1)

    split = PartitionSpec(axes)
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(axes, None), split),
        out_specs=(PartitionSpec(), PartitionSpec()),
        check_vma=False,
    )

    def search_step(queries, corpus, valid):
        if normalize:
            queries = pooling.normalize(queries)
        return run(queries, corpus, valid)

    return jax.jit(search_step)
