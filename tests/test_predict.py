"""`python -m bert_jax.tools.predict`: fill-mask against `transformers`' fill-mask pipeline, next
sentence against its NSP head, and the command line on a file, stdin and one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from bert_jax.tools import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "home", "un", "##believ", "##able"]
SIZES = dict(
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _hf_dir(tmp_path, architecture):
    torch.manual_seed(0)
    config = transformers.BertConfig(**SIZES, attn_implementation="eager")
    model = getattr(transformers, architecture)(config).eval()
    out = tmp_path / architecture
    model.save_pretrained(out)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
    tokens += [f"w{i}" for i in range(SIZES["vocab_size"] - len(tokens))]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in tokens))
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(out)
    return str(out), model


LINES = ["the cat sat on the [MASK].", "[MASK] dog ran [MASK] , w3 w4", "un [MASK] able mat"]


def test_fill_mask_equals_the_transformers_pipeline(tmp_path):
    directory, model = _hf_dir(tmp_path, "BertForMaskedLM")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    pipe = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=5)
    predictor = predict.Predictor("fill-mask", f"hf:{directory}", top_k=5)
    answers = list(predictor.run(iter(LINES), batch_size=2))
    assert [a["line_index"] for a in answers] == [0, 1, 2]
    for line, answer in zip(LINES, answers, strict=True):
        expected = pipe(line)
        if line.count("[MASK]") == 1:
            expected = [expected]
        assert len(answer["masks"]) == len(expected)
        for mask, reference in zip(answer["masks"], expected, strict=True):
            assert [c["token"] for c in mask["candidates"]] == [r["token_str"] for r in reference]
            np.testing.assert_allclose(
                [c["score"] for c in mask["candidates"]],
                [r["score"] for r in reference],
                atol=1e-5,
            )


def test_next_sentence_equals_the_nsp_head(tmp_path):
    directory, model = _hf_dir(tmp_path, "BertForPreTraining")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    predictor = predict.Predictor("next-sentence", f"hf:{directory}")
    pairs = ["the cat sat . ||| the dog ran home .", "w1 w2 ||| mat"]
    answers = list(predictor.run(iter(pairs)))
    for pair, answer in zip(pairs, answers, strict=True):
        a, b = (t.strip() for t in pair.split("|||"))
        with torch.no_grad():
            logits = model(**tokenizer(a, b, return_tensors="pt")).seq_relationship_logits
        expected = torch.softmax(logits, -1)[0, 0].item()
        assert answer["is_next"] == pytest.approx(expected, abs=1e-5)


def test_command_line_streams_json_lines(tmp_path):
    directory, _ = _hf_dir(tmp_path, "BertForMaskedLM")
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(LINES) + "\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    base = [sys.executable, "-m", "bert_jax.tools.predict", "fill-mask", f"--model=hf:{directory}"]
    run = subprocess.run(
        [*base, f"--input={lines}", f"--output={tmp_path / 'out.jsonl'}", "--top_k=3"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    written = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [len(w["masks"]) for w in written] == [1, 2, 1]
    assert all(len(m["candidates"]) == 3 for w in written for m in w["masks"])
    piped = subprocess.run(
        base, input=LINES[0] + "\n", capture_output=True, text=True, env=env, cwd=tmp_path
    )
    (mask,) = json.loads(piped.stdout)["masks"]  # the default top 5 begins with the top 3
    assert mask["candidates"][:3] == written[0]["masks"][0]["candidates"]
    bad = subprocess.run(
        [*base, "--text=no mask here"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert bad.returncode != 0 and "has no [MASK]" in bad.stderr


def _head_dir(tmp_path, architecture, num_labels=3):
    torch.manual_seed(1)
    labels = {i: name for i, name in enumerate(["O", "B-PER", "I-PER"][:num_labels])}
    config = transformers.BertConfig(
        **SIZES,
        attn_implementation="eager",
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # scores far enough apart that the best is not a rounding matter
        for name, p in model.named_parameters():
            if name.startswith(("classifier", "qa_outputs")):
                p.mul_(20.0)
    out = tmp_path / architecture
    model.save_pretrained(out)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
    tokens += [f"w{i}" for i in range(SIZES["vocab_size"] - len(tokens))]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in tokens))
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(out)
    return str(out), model, transformers.AutoTokenizer.from_pretrained(out)


def test_classify_equals_the_text_classification_pipeline(tmp_path):
    directory, model, tokenizer = _head_dir(tmp_path, "BertForSequenceClassification")
    pipe = transformers.pipeline(
        "text-classification", model=model, tokenizer=tokenizer, top_k=None
    )
    lines = ["the cat sat on the mat .", "un ##believ w3 w4 , home"]
    answers = list(predict.Predictor("classify", f"hf:{directory}").run(iter(lines)))
    for line, answer in zip(lines, answers, strict=True):
        scored = pipe(line)
        scored = scored[0] if isinstance(scored[0], list) else scored  # one text: one list
        expected = {r["label"]: r["score"] for r in scored}
        assert sorted(answer["scores"]) == sorted(expected) == ["B-PER", "I-PER", "O"]
        for label, score in expected.items():
            assert answer["scores"][label] == pytest.approx(score, abs=1e-5)
        assert answer["label"] == max(expected, key=expected.get)


def test_ner_tags_each_word_by_its_first_piece(tmp_path):
    """Per word, the label transformers' BertForTokenClassification scores best at the
    word's first piece (the tokenizer's word_ids), and the entities of those tags."""
    directory, model, tokenizer = _head_dir(tmp_path, "BertForTokenClassification")
    lines = ["the cat sat on the mat", "unbelievable w3 home w4 w5 dog ran"]
    answers = list(predict.Predictor("ner", f"hf:{directory}").run(iter(lines)))
    for line, answer in zip(lines, answers, strict=True):
        enc = tokenizer(line.split(), is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            best = model(**enc).logits[0].argmax(-1).tolist()
        firsts, seen = {}, set()
        for pos, word in enumerate(enc.word_ids()):
            if word is not None and word not in seen:
                seen.add(word)
                firsts[word] = model.config.id2label[best[pos]]
        assert answer["tags"] == [firsts[w] for w in range(len(line.split()))]
        from bert_jax.tasks import conll

        assert [(e["type"], e["start"], e["end"]) for e in answer["entities"]] == conll.entities(
            answer["tags"]
        )


def test_qa_finds_the_best_span_of_the_context(tmp_path):
    """The best span (start <= end, both context pieces, at most 30 pieces) by the sum of
    transformers' BertForQuestionAnswering start and end scores, searched by brute force."""
    directory, model, tokenizer = _head_dir(tmp_path, "BertForQuestionAnswering", 2)
    question, context = "where did the dog run ?", "the dog ran home , the cat sat on the mat ."
    (answer,) = predict.Predictor("qa", f"hf:{directory}").run(iter([f"{question} ||| {context}"]))
    enc = tokenizer(question, context, return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        out = model(**enc)
    start, end = out.start_logits[0].tolist(), out.end_logits[0].tolist()
    context_pieces = [i for i, s in enumerate(enc.sequence_ids()) if s == 1]
    best = max(
        (
            (start[i] + end[j], i, j)
            for i in context_pieces
            for j in context_pieces
            if i <= j < i + 30
        ),
    )
    _, i, j = best
    assert answer["answer"] == context[offsets[i][0] : offsets[j][1]]
    assert 0.0 < answer["probability"] <= 1.0
