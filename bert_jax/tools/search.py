"""The evaluation of embedding models on BEIR folders and STS pairs, by exact top-k search of
the query vectors against the embedded corpus spread over the devices (`tasks.retrieval.Index`).

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
import io
import json

import numpy as np

from bert_jax import cli, files
from bert_jax.tasks import retrieval
from bert_jax.tasks.retrieval import SIMILARITIES, Index
from bert_jax.tools import embed

__all__ = ["SIMILARITIES", "Index", "evaluate_beir", "evaluate_sts", "main"]


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
    asked = embedder.encode([queries[q] for q in query_ids], prompt_name=query_prompt_name)
    run = retrieval.search_run(
        asked,
        query_ids,
        vectors,
        doc_ids,
        similarity=embedder.spec.similarity,
        depth=depth,
        mesh=embedder.mesh,
    )
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
