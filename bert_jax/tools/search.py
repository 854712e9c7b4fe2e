"""Exact top-k search of query vectors against an embedded corpus spread over the devices, and
the evaluation of embedding models on BEIR folders and STS pairs.

    index = search.Index(corpus_vectors)                 # [N, D], rows split over the devices
    scores, ids = index.search(query_vectors, k=10)      # [Q, k] each, best first

    python -m bert_jax.tools.search --model=/models/e5-small-v2 --beir=/data/scifact \
        --query_prompt_name=query --corpus_prompt_name=passage   # nDCG@10, MRR@10, Recall@100
    python -m bert_jax.tools.search --model=... --sts=sts-dev.tsv  # sentence1, sentence2, score

Each device holds a slice of the corpus rows and scores a block of queries against it with one
matmul, keeps its own k best, and the devices' candidates are gathered and merged into the k
best overall (`shard_map`): no device ever holds the whole corpus or the whole score matrix,
so a corpus that fits the devices together is searched exactly. Ties go to the lower corpus
row, as a stable sort of the scores does. `similarity`: "cosine" (vectors normalized first)
or "dot".
"""

import argparse
import csv
import functools
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bert_jax import cli, files, sharding
from bert_jax.models import pooling
from bert_jax.tasks import retrieval
from bert_jax.tools import embed

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


def evaluate_beir(
    embedder,
    folder: str,
    split: str = "test",
    *,
    query_prompt_name: str | None = None,
    corpus_prompt_name: str | None = None,
    depth: int = 100,
) -> dict[str, float]:
    """A model on a BEIR folder: the corpus and the queries embedded (`embed.Embedder`), each
    query's `depth` best documents found exactly over the devices, scored as BEIR scores them
    (`tasks.retrieval.evaluate`: nDCG@10, MRR@10, Recall@100). A query's own id among the
    documents is left out of its results, as BEIR's `ignore_identical_ids` does."""
    corpus, queries, qrels = retrieval.read_beir(folder, split)
    doc_ids, query_ids = list(corpus), [q for q in queries if q in qrels]
    vectors = embedder.encode([corpus[d] for d in doc_ids], prompt_name=corpus_prompt_name)
    index = Index(vectors, similarity=embedder.spec.similarity, mesh=embedder.mesh)
    asked = embedder.encode([queries[q] for q in query_ids], prompt_name=query_prompt_name)
    scores, ids = index.search(asked, depth + 1)
    run = {}
    for query, row_scores, row_ids in zip(query_ids, scores, ids, strict=True):
        found = {doc_ids[i]: float(s) for s, i in zip(row_scores, row_ids, strict=True)}
        found.pop(query, None)
        run[query] = dict(list(found.items())[:depth])
    return retrieval.evaluate(qrels, run)


def evaluate_sts(embedder, path: str) -> dict[str, float]:
    """Pearson and Spearman of cosine against gold scores on a .tsv with a header naming
    `sentence1`, `sentence2` and `score` (STS-B's GLUE file; `label` for the score too)."""
    text = files.read_bytes(path).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    key = "score" if rows and "score" in rows[0] else "label"
    if not rows or not {"sentence1", "sentence2", key} <= set(rows[0]):
        raise ValueError(f"{path}: needs a header with sentence1, sentence2 and score columns")
    first = embedder.encode([r["sentence1"] for r in rows])
    second = embedder.encode([r["sentence2"] for r in rows])
    gold = np.array([float(r[key]) for r in rows])
    return {**retrieval.sts(first, second, gold), "pairs": len(rows)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bert_jax.tools.search", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True, help="a sentence-transformers folder, hf:DIR")
    parser.add_argument("--beir", default="", help="a BEIR folder to evaluate retrieval on")
    parser.add_argument("--split", default="test", help="the BEIR qrels split")
    parser.add_argument("--query_prompt_name", default=None)
    parser.add_argument("--corpus_prompt_name", default=None)
    parser.add_argument("--sts", default="", help="a .tsv of sentence1, sentence2, score")
    args = parser.parse_args(argv)
    if bool(args.beir) == bool(args.sts):
        raise ValueError("give one of --beir (a BEIR folder) or --sts (a .tsv of scored pairs)")
    model = embed.Embedder(args.model)
    if args.beir:
        results = evaluate_beir(
            model,
            args.beir,
            args.split,
            query_prompt_name=args.query_prompt_name,
            corpus_prompt_name=args.corpus_prompt_name,
        )
    else:
        results = evaluate_sts(model, args.sts)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    cli.run(main)
