"""Sentence embeddings against sentence-transformers itself: a small BERT built from a config,
saved by `sentence_transformers` with each pooling mode (and normalization, prompts), embeds
through `bert_jax.tools.embed` as `SentenceTransformer.encode` embeds it."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import modules

from bert_jax.convert import sentence_transformers as st
from bert_jax.models import pooling
from bert_jax.tools import predict, search
from bert_jax.tools.embed import Embedder

WORDS = (
    "a man is eating food bread the cat sat on mat un homme mange du pain le chat est assis "
    "ein mann isst brot die katze sitzt auf der matte query passage search for how do i "
    "über café naïve 猫 食 東京 москва кот ест хлеб"
).split()
TEXTS = [
    "A man is eating food.",
    "Un homme mange du pain.",
    "Ein Mann isst Brot, die Katze sitzt auf der Matte.",
    "Кот ест хлеб в Москва",
    "猫 食 東京",
    "the cat",
    "café über naïve the cat sat on the mat and a man is eating bread " * 3,
    "how do i search",
]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A 2-layer BERT (random weights) with a WordPiece vocabulary of the texts' words."""
    path = tmp_path_factory.mktemp("encoder")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ":", "?"]
    vocab += sorted({w.lower() for w in WORDS} | {"##" + w.lower() for w in WORDS[:8]})
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(path)
    transformers.BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(path)
    return path


def _st_model(encoder_dir, mode, normalize, include_prompt=True, max_seq_length=48):
    transformer = modules.Transformer(str(encoder_dir), max_seq_length=max_seq_length)
    parts = [transformer, modules.Pooling(32, pooling_mode=mode, include_prompt=include_prompt)]
    if normalize:
        parts.append(modules.Normalize())
    return SentenceTransformer(
        modules=parts, device="cpu", prompts={"query": "query: ", "passage": "passage: "}
    )


@pytest.mark.parametrize(
    "mode,normalize",
    [("mean", True), ("cls", False), ("max", False), ("mean_sqrt_len_tokens", True),
     ("weightedmean", False), ("lasttoken", True), (("cls", "mean"), False)],
)  # fmt: skip
def test_a_saved_sentence_transformers_folder_embeds_as_sentence_transformers(
    encoder_dir, tmp_path, mode, normalize
):
    reference = _st_model(encoder_dir, mode, normalize)
    reference.save(str(tmp_path / "st"))
    texts = TEXTS * 3  # three batches of 8 (the simulated devices) of different widths
    expected = reference.encode(texts, batch_size=3, convert_to_numpy=True)
    ours = Embedder(str(tmp_path / "st"))
    assert ours.spec.pooling == pooling.check_modes(mode)
    assert ours.spec.normalize == normalize and ours.max_seq_length == 48
    got = ours.encode(texts, batch_size=8)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("include_prompt", [True, False])
@pytest.mark.parametrize("mode", ["mean", "cls", "weightedmean", "max", "lasttoken"])
def test_prompts_embed_as_sentence_transformers_and_can_be_left_out_of_the_pooling(
    encoder_dir, tmp_path, mode, include_prompt
):
    reference = _st_model(encoder_dir, mode, True, include_prompt=include_prompt)
    reference.save(str(tmp_path / "st"))
    ours = Embedder(str(tmp_path / "st"))
    assert ours.spec.prompts["query"] == "query: " and ours.spec.prompts["passage"] == "passage: "
    for kwargs in ({"prompt_name": "query"}, {"prompt": "search for: "}):
        expected = reference.encode(TEXTS, batch_size=8, convert_to_numpy=True, **kwargs)
        got = ours.encode(TEXTS, **kwargs)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    plain = ours.encode(TEXTS)
    assert np.abs(plain - ours.encode(TEXTS, prompt_name="query")).max() > 1e-3


def test_texts_longer_than_the_folder_s_length_are_cut_as_sentence_transformers_cuts_them(
    encoder_dir, tmp_path
):
    reference = _st_model(encoder_dir, "mean", False, max_seq_length=12)
    reference.save(str(tmp_path / "st"))
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    ours = Embedder(str(tmp_path / "st"))
    assert ours.max_seq_length == 12
    np.testing.assert_allclose(ours.encode(TEXTS), expected, atol=1e-5, rtol=0)


def test_a_plain_hugging_face_encoder_is_pooled_as_asked(encoder_dir):
    """No sentence-transformers files: the pooling named (mean by default), compared with
    the mean of `transformers`' last hidden states over the real tokens."""
    tokenizer = transformers.BertTokenizerFast.from_pretrained(encoder_dir)
    model = transformers.BertModel.from_pretrained(encoder_dir).eval()
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state.numpy()
    mask = inputs["attention_mask"].numpy()[..., None]
    expected = (hidden * mask).sum(1) / mask.sum(1)
    got = Embedder(f"hf:{encoder_dir}").encode(TEXTS)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_folders_bert_jax_cannot_run_and_unknown_prompts_are_refused(encoder_dir, tmp_path):
    reference = _st_model(encoder_dir, "mean", False)
    reference.save(str(tmp_path / "st"))
    listed = json.loads((tmp_path / "st" / "modules.json").read_text())
    listed.append({"idx": 9, "name": "9", "path": "9_Dense", "type": "sentence_transformers.Dense"})
    (tmp_path / "st" / "modules.json").write_text(json.dumps(listed))
    with pytest.raises(ValueError, match="'sentence_transformers.Dense' .* is not one bert_jax"):
        st.read_folder(str(tmp_path / "st"))
    spec = st.EmbeddingSpec(model="x", prompts={"query": "query: "})
    with pytest.raises(ValueError, match=r"prompt name 'q' is not one of the model's prompts"):
        spec.prompt(prompt_name="q")
    with pytest.raises(ValueError, match="unknown"):
        pooling.check_modes(["mean", "median"])


def test_predict_embed_streams_json_lines_and_writes_npy_as_sentence_transformers(
    encoder_dir, tmp_path, capsys
):
    reference = _st_model(encoder_dir, "mean", True)
    reference.save(str(tmp_path / "st"))
    expected = reference.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(TEXTS) + "\n")
    common = ["embed", f"--model={tmp_path / 'st'}", f"--input={lines}", "--prompt_name=query"]
    predict.main([*common, "--batch_size=3"])  # JSON lines to stdout, three lines a batch
    printed = [json.loads(x)["embedding"] for x in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose(np.array(printed), expected, atol=1e-5, rtol=0)
    predict.main([*common, f"--output={tmp_path / 'vectors.npy'}"])
    np.testing.assert_allclose(np.load(tmp_path / "vectors.npy"), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"--output=.*\.txt: use a \.jsonl or \.npy file name"):
        predict.main([*common, f"--output={tmp_path / 'vectors.txt'}"])


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_sharded_search_returns_the_brute_force_top_k_on_8_devices(similarity):
    """1,001 rows over 8 devices (not a multiple), exact ties from repeated rows, queries in
    blocks, k above one device's share: the same ids as a stable NumPy sort, in order."""
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(1001, 16)).astype(np.float32)
    corpus[500:510] = corpus[3]  # ties: the lower row comes first
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    queries[5] = corpus[3]
    index = search.Index(corpus, similarity=similarity, query_block=16)
    assert len(index.corpus.sharding.device_set) == 8
    c, q = corpus, queries
    if similarity == "cosine":
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    reference = q.astype(np.float64) @ c.T.astype(np.float64)
    for k in (1, 10, 200):
        scores, ids = index.search(queries, k=k)
        expected = np.argsort(-reference, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(ids, expected)
        np.testing.assert_allclose(
            scores, np.take_along_axis(reference, expected, axis=1), atol=1e-5
        )
    assert list(index.search(queries[5:6], k=11)[1][0]) == [3, *range(500, 510)]
    with pytest.raises(ValueError, match=r"queries must be \[Q, 16\]"):
        index.search(queries[:, :8])


def test_predict_search_finds_what_sentence_transformers_semantic_search_finds(
    encoder_dir, tmp_path, capsys
):
    from sentence_transformers import util

    reference = _st_model(encoder_dir, "mean", False)
    reference.save(str(tmp_path / "st"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    queries = ["a cat on the mat", "Brot und Katze", "東京"]
    expected = util.semantic_search(
        reference.encode(queries, prompt_name="query", convert_to_tensor=True),
        reference.encode(TEXTS, prompt_name="passage", convert_to_tensor=True),
        top_k=3,
    )
    (tmp_path / "queries.txt").write_text("\n".join(queries) + "\n")
    predict.main(
        ["search", f"--model={tmp_path / 'st'}", f"--input={tmp_path / 'queries.txt'}",
         f"--corpus={corpus}", "--top_k=3", "--prompt_name=query",
         "--corpus_prompt_name=passage"]
    )  # fmt: skip
    answers = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [a["query"] for a in answers] == queries
    for answer, hits in zip(answers, expected, strict=True):
        assert [h["id"] for h in answer["hits"]] == [h["corpus_id"] for h in hits]
        assert [h["text"] for h in answer["hits"]] == [TEXTS[h["corpus_id"]] for h in hits]
        np.testing.assert_allclose(
            [h["score"] for h in answer["hits"]], [h["score"] for h in hits], atol=1e-5
        )


@pytest.mark.parametrize("mode,normalize", [("mean", True), (("max", "cls"), False)])
def test_a_model_written_in_the_sentence_transformers_layout_loads_there_with_the_same_vectors(
    encoder_dir, tmp_path, mode, normalize
):
    """bert_jax's weights of an encoder, with a pooling, prompts and a length, written as a
    sentence-transformers folder: `SentenceTransformer` loads it and embeds as bert_jax does
    (an order of modes the old flags cannot say is written as the new `pooling_mode`)."""
    ours = Embedder(f"hf:{encoder_dir}", pooling_modes=mode, normalize=normalize)
    spec = dataclasses.replace(
        ours.spec, prompts={"query": "query: "}, max_seq_length=20, include_prompt=False
    )
    pretrained = ours.pretrained
    st.write_folder(
        pretrained.params, pretrained.config, pretrained.tokenizer, spec, str(tmp_path / "out")
    )
    loaded = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert loaded.max_seq_length == 20
    again = Embedder(str(tmp_path / "out"))
    assert again.spec.pooling == pooling.check_modes(mode) and not again.spec.include_prompt
    for kwargs in ({}, {"prompt_name": "query"}):
        expected = loaded.encode(TEXTS, convert_to_numpy=True, **kwargs)
        np.testing.assert_allclose(again.encode(TEXTS, **kwargs), expected, atol=1e-5, rtol=0)
    with pytest.raises(FileExistsError, match="not empty"):
        st.write_folder(
            pretrained.params, pretrained.config, pretrained.tokenizer, spec, str(tmp_path / "out")
        )


def test_a_bert_jax_workdir_exports_as_a_sentence_transformers_folder_from_the_command_line(
    encoder_dir, tmp_path
):
    """import-hf makes a bert_jax workdir; export-sentence-transformers writes it with a
    pooling and a prompt; sentence-transformers embeds as bert_jax embeds the workdir."""
    from bert_jax.convert import __main__ as convert_cli

    workdir, out = str(tmp_path / "run"), str(tmp_path / "st")
    convert_cli.main(["import-hf", str(encoder_dir), workdir])
    convert_cli.main(
        ["export-sentence-transformers", workdir, out, "--pooling=weightedmean", "--normalize",
         "--max_seq_length=32", '--prompt=query=query: ']
    )  # fmt: skip
    loaded = SentenceTransformer(out, device="cpu")
    ours = Embedder(workdir, pooling_modes=["weightedmean"], normalize=True, max_seq_length=32)
    expected = loaded.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    np.testing.assert_allclose(ours.encode(TEXTS, prompt="query: "), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r'write NAME="TEXT"'):
        convert_cli.main(["export-sentence-transformers", workdir, out + "2", "--prompt=query"])


def test_beir_and_sts_evaluation_equal_sentence_transformers_and_pytrec_eval(
    encoder_dir, tmp_path, capsys
):
    """A BEIR folder (the texts as documents, queries judged on some, one query also a
    document id) scored through bert_jax's embedding and sharded search equals pytrec_eval on
    the run sentence-transformers' own search gives; STS equals its similarity evaluator."""
    import pytrec_eval
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
    )

    reference = _st_model(encoder_dir, "mean", True)
    reference.save(str(tmp_path / "st"))
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = {f"doc{i}": t for i, t in enumerate(TEXTS)}
    asked = {"q0": "a man eating", "q1": "cat on the mat", "q2": "Москва", "doc3": "Brot"}
    qrels = {"q0": {"doc0": 2, "doc1": 1}, "q1": {"doc5": 1, "doc9": 1}, "q2": {"doc3": 1},
             "doc3": {"doc2": 1, "doc3": 1}}  # fmt: skip
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items())
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in asked.items())
    )
    rows = [f"{q}\t{d}\t{r}" for q, judged in qrels.items() for d, r in judged.items()]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows))
    search.main([f"--model={tmp_path / 'st'}", f"--beir={folder}"])
    ours = json.loads(capsys.readouterr().out)
    hits = util.semantic_search(
        reference.encode(list(asked.values()), convert_to_tensor=True),
        reference.encode(list(docs.values()), convert_to_tensor=True),
        top_k=100,
    )
    doc_ids = list(docs)
    run = {
        q: {doc_ids[h["corpus_id"]]: h["score"] for h in found if doc_ids[h["corpus_id"]] != q}
        for q, found in zip(asked, hits, strict=True)
    }
    measures = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    assert ours["queries"] == 4
    for name, theirs in (("ndcg@10", "ndcg_cut_10"), ("recall@100", "recall_100")):
        assert ours[name] == pytest.approx(
            np.mean([m[theirs] for m in measures.values()]), abs=1e-6
        )
    # Every document is found (depth 100 > 8) but doc9 (judged, not in the corpus) and doc3
    # for the query doc3 (its own id, left out): recall (1 + 1/2 + 1 + 1/2) / 4.
    assert ours["recall@100"] == pytest.approx(0.75)

    first, second = TEXTS[:6], TEXTS[2:8]
    gold = np.array([0.5, 4.0, 1.0, 3.2, 2.2, 5.0])
    theirs = EmbeddingSimilarityEvaluator(
        first, second, gold.tolist(), similarity_fn_names=["cosine"]
    )(reference)
    sts_file = tmp_path / "sts.tsv"
    lines = [f"{a}\t{b}\t{g}" for a, b, g in zip(first, second, gold, strict=True)]
    sts_file.write_text("sentence1\tsentence2\tscore\n" + "\n".join(lines) + "\n")
    search.main([f"--model={tmp_path / 'st'}", f"--sts={sts_file}"])
    got = json.loads(capsys.readouterr().out)
    assert got["pairs"] == 6
    pearson = next(v for k, v in theirs.items() if k.endswith("pearson_cosine"))
    spearman = next(v for k, v in theirs.items() if k.endswith("spearman_cosine"))
    assert got["pearson"] == pytest.approx(pearson, abs=1e-5)
    assert got["spearman"] == pytest.approx(spearman, abs=1e-9)


@pytest.mark.parametrize("mode,normalize", [("mean", True), (("cls", "max"), False)])
def test_stablehlo_and_onnx_exports_carry_the_pooling_and_embed_as_sentence_transformers(
    encoder_dir, tmp_path, mode, normalize
):
    """A sentence-transformers folder exported by the command line: both graphs end in its
    pooling (and normalization) and give `SentenceTransformer.encode`'s vectors on padded
    batches of the folder's tokenization."""
    import importlib.util

    import onnxruntime

    from bert_jax.convert import __main__ as convert_cli

    reference = _st_model(encoder_dir, mode, normalize)
    reference.save(str(tmp_path / "st"))
    expected = reference.encode(TEXTS, batch_size=8, convert_to_numpy=True)
    features = reference.tokenize(TEXTS)  # padded to the longest text, as encode's batch
    inputs = [
        features[k].numpy().astype(np.int32)
        for k in ("input_ids", "attention_mask", "token_type_ids")
    ]
    convert_cli.main(["export-stablehlo", str(tmp_path / "st"), str(tmp_path / "hlo")])
    convert_cli.main(["export-onnx", str(tmp_path / "st"), str(tmp_path / "onnx")])
    meta = json.loads((tmp_path / "hlo" / "meta.json").read_text())
    assert meta["outputs"] == ["sentence_embedding"]
    assert meta["pooling"] == list(pooling.check_modes(mode)) and meta["normalize"] == normalize
    spec = importlib.util.spec_from_file_location("run_exported", tmp_path / "hlo/run_exported.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    hlo = loader.ExportedModel(str(tmp_path / "hlo"))(*inputs)["sentence_embedding"]
    np.testing.assert_allclose(hlo, expected, atol=1e-5, rtol=0)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    taken = [i.name for i in session.get_inputs()]
    feed = dict(zip(("input_ids", "input_mask", "segment_ids"), inputs, strict=True))
    (onnx,) = session.run(None, {k: feed[k].astype(np.int64) for k in taken})
    np.testing.assert_allclose(onnx, expected, atol=1e-5, rtol=0)
