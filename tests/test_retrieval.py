"""Retrieval metrics against pytrec_eval (trec_eval, which BEIR calls) on hand-made runs with
ties, missing and zero judgements; BEIR folders read."""

import json

import numpy as np
import pytest
import pytrec_eval

from bert_jax.tasks import retrieval


def _runs(seed=0):
    """25 queries x 30 documents, scores on a coarse grid (many ties) but all above the
    11th-best distinct (so the top 10 is the same set in any tie order); judgements for a
    random half of the documents (0, 1 or 2), some queries with only zeros, one query run but
    not judged and one judged but not run."""
    rng = np.random.default_rng(seed)
    qrels, run = {}, {}
    for q in range(25):
        docs = [f"d{d}" for d in rng.choice(200, 30, replace=False)]
        top = np.round(rng.uniform(0.5, 1.0, 10), 1)
        rest = np.round(rng.uniform(0.0, 0.4, 20), 1)
        run[f"q{q}"] = {d: float(s) for d, s in zip(docs, np.concatenate([top, rest]), strict=True)}
        judged = rng.choice(docs + [f"d{d}" for d in range(200, 210)], 20, replace=False)
        levels = [0, 0, 0] if q % 7 == 3 else [0, 1, 2]
        qrels[f"q{q}"] = {str(d): int(rng.choice(levels)) for d in judged}
    run["unjudged"] = {"d1": 1.0}
    qrels["not_run"] = {"d1": 1}
    return qrels, run


@pytest.mark.parametrize("cut", [10, 5])
def test_ndcg_mrr_and_recall_equal_pytrec_eval(cut):
    qrels, run = _runs()
    ours = retrieval.evaluate(qrels, run, ndcg_at=cut, mrr_at=10, recall_at=cut)
    measures = {f"ndcg_cut.{cut}", f"recall.{cut}", "recip_rank"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    assert ours["queries"] == len(per_query) == 25
    for ours_name, theirs in (
        (f"ndcg@{cut}", f"ndcg_cut_{cut}"),
        (f"recall@{cut}", f"recall_{cut}"),
    ):
        want = np.mean([m[theirs] for m in per_query.values()])
        assert ours[ours_name] == pytest.approx(want, abs=1e-12), ours_name
    # MRR@10 is trec_eval's reciprocal rank of the run cut to its 10 best (every top-10 score
    # is above every other, so the cut is the same set whatever the tie order).
    top10 = {q: {d: s for d, s in docs.items() if s >= 0.5} for q, docs in run.items()}
    cut_run = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    want = np.mean([m["recip_rank"] for m in cut_run.values()])
    assert ours["mrr@10"] == pytest.approx(want, abs=1e-12)


def test_ties_are_ranked_by_document_id_in_reverse_as_trec_eval_ranks_them():
    qrels = {"q": {"d1": 1}}
    run = {"q": {"d1": 0.5, "d2": 0.5, "d10": 0.5, "d0": 0.9}}
    assert retrieval.ranked(run["q"]) == ["d0", "d2", "d10", "d1"]
    want = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)["q"]["recip_rank"]
    assert retrieval.evaluate(qrels, run)["mrr@10"] == want == 0.25


def test_a_beir_folder_is_read_with_titles_and_its_qrels_header(tmp_path):
    folder = tmp_path / "scifact"
    (folder / "qrels").mkdir(parents=True)
    corpus = [{"_id": "d1", "title": "Cats", "text": "sit on mats."}, {"_id": 2, "text": "Dogs."}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "where?"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t2\t0\n")
    docs, queries, qrels = retrieval.read_beir(str(folder))
    assert docs == {"d1": "Cats sit on mats.", "2": "Dogs."}
    assert queries == {"q1": "where?"} and qrels == {"q1": {"d1": 1, "2": 0}}
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv: a BEIR folder needs qrels there"):
        retrieval.read_beir(str(folder), "dev")
