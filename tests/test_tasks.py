"""finetune.py end to end on SQuAD v2.0, CoNLL-2003 and SWAG files in their official
layouts (written here, small), and their bad inputs refused before anything is compiled."""

import csv
import json
import os
import subprocess
import sys
import time
import types

import glue_data
import numpy as np
import pytest
from cli import ROOT
from seqeval import metrics as seqeval
from torchmetrics.functional.text import squad as torchmetrics_squad

from bert_jax import convert, models
from bert_jax.data.tokenization import WordPieceTokenizer

W = glue_data.FILLER


def _model(tmp_path) -> str:
    config = models.BertConfig(
        vocab_size=len(glue_data.VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    params = models.split_params(models.create_model(config, 0, models.BertModel))[1]
    tokenizer = WordPieceTokenizer(glue_data.write_vocab(tmp_path / "vocab.txt"))
    out = str(tmp_path / "model")
    convert.write_run(out, config, "BertModel", 2, params, tokenizer)
    return out


def _squad(path, rng, n, version_2):
    paragraphs = []
    for i in range(n):
        words = [str(w) for w in rng.choice(W, 30)]
        context = " ".join(words)
        at = int(rng.integers(0, 28))
        answer = " ".join(words[at : at + 2])
        start = len(" ".join(words[:at])) + (1 if at else 0)
        qa = {"id": f"q{i}", "question": f"{words[at]} w1", "answers": []}
        if version_2 and i % 3 == 0:
            qa["is_impossible"] = True
        else:
            qa["answers"] = [{"text": answer, "answer_start": start}]
        paragraphs.append({"context": context, "qas": [qa]})
    data = {
        "version": "v2.0" if version_2 else "1.1",
        "data": [{"title": "t", "paragraphs": paragraphs}],
    }
    path.write_text(json.dumps(data, indent=1))


def _conll(path, rng, n):
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(n):
        for _ in range(int(rng.integers(3, 12))):
            word = str(rng.choice(W))
            tag = "I-PER" if word in ("w1", "w2") else "I-LOC" if word == "w3" else "O"
            lines.append(f"{word} NNP B-NP {tag}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _swag(path, rng, n, labelled=True):
    header = ["video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source"]
    header += [f"ending{k}" for k in range(4)] + ["label"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(n):
            sent1 = " ".join(rng.choice(W, 5))
            endings = [" ".join(rng.choice(W, 3)) for _ in range(4)]
            label = str(rng.integers(0, 4)) if labelled else ""
            writer.writerow(["v", str(i), sent1, sent1, "w0", "gold", *endings, label])


def _data(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for folder in ("SQuAD", "CoNLL-2003", "SWAG"):
        (root / folder).mkdir(parents=True)
    _squad(root / "SQuAD/train-v2.0.json", rng, 24, True)
    _squad(root / "SQuAD/dev-v2.0.json", rng, 9, True)
    for name, n in (("train", 24), ("valid", 8), ("test", 8)):
        _conll(root / f"CoNLL-2003/{name}.txt", rng, n)
    _swag(root / "SWAG/train.csv", rng, 16)
    _swag(root / "SWAG/val.csv", rng, 8)
    _swag(root / "SWAG/test.csv", rng, 8, labelled=False)
    # A user's own data: classification in JSON lines, tagging in CoNLL columns (IOB2).
    (root / "reviews").mkdir()
    (root / "reviews/labels.txt").write_text("neg\npos\n")
    for split, n in (("train", 16), ("dev", 8), ("test", 4)):
        with open(root / f"reviews/{split}.jsonl", "w") as f:
            for i in range(n):
                row = {"id": f"r{i}", "text": " ".join(rng.choice(W, 4))}
                if split != "test":
                    row["label"] = "pos" if "w1" in row["text"] else "neg"
                f.write(json.dumps(row) + "\n")
    (root / "ents").mkdir()
    (root / "ents/labels.txt").write_text("O\nB-THING\nI-THING\n")
    for split, n in (("train", 16), ("dev", 8)):
        lines = []
        for _ in range(n):
            for _ in range(4):
                word = str(rng.choice(W))
                lines.append(f"{word} {'B-THING' if word == 'w2' else 'O'}")
            lines.append("")
        (root / f"ents/{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _finetune(tmp_path, data, *extra):
    return subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "finetune.py"),
            f"--workdir={tmp_path / 'work'}",
            f"--config.init_from={_model(tmp_path)}",
            f"--config.data_dir={data}",
            "--config.tasks=squad_v2,conll2003,swag,classify:reviews,tag:ents",
            "--config.max_seq_length=32",
            "--config.doc_stride=8",
            "--config.max_query_length=4",
            "--config.batch_size=8",
            "--config.eval_batch_size=8",
            "--config.num_epochs=1",
            "--config.seeds=0",
            "--config.learning_rates=1e-3",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
            JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        ),
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_finetune_runs_squad_conll_and_swag_and_writes_official_files(tmp_path):
    data = _data(tmp_path)
    proc = _finetune(tmp_path, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "work"
    results = json.loads((work / "results.json").read_text())["tasks"]
    assert sorted(results) == ["classify:reviews", "conll2003", "squad_v2", "swag", "tag:ents"]
    (squad_run,) = results["squad_v2"]["runs"]
    dev = squad_run["dev"]["dev"]
    assert {"exact_match", "f1", "HasAns_f1", "NoAns_f1", "null_score_diff_threshold"} <= set(dev)
    # SQuAD's official layouts: {id: answer} and, for v2.0, {id: null odds}.
    folder = os.path.dirname(squad_run["predictions"]["dev"])
    answers = json.loads(open(os.path.join(folder, "predictions.json")).read())
    odds = json.loads(open(os.path.join(folder, "null_odds.json")).read())
    assert sorted(answers) == sorted(odds) == sorted(f"q{i}" for i in range(9))
    assert all(isinstance(a, str) for a in answers.values())
    # The scores reported are the official rules applied to the file written: torchmetrics'
    # SQuAD F1 on the answerable questions, an empty answer on the others.
    (article,) = json.loads((data / "SQuAD/dev-v2.0.json").read_text())["data"]
    golds = {
        q["id"]: [a["text"] for a in q["answers"]] for p in article["paragraphs"] for q in p["qas"]
    }
    has = [i for i in golds if golds[i]]
    reference = torchmetrics_squad(
        [{"prediction_text": answers[i], "id": i} for i in has],
        [
            {"answers": {"answer_start": [0] * len(golds[i]), "text": golds[i]}, "id": i}
            for i in has
        ],
    )
    no_answer = [answers[i] == "" for i in golds if not golds[i]]
    assert dev["HasAns_f1"] == pytest.approx(float(reference["f1"]) / 100, abs=1e-6)
    assert dev["NoAns_f1"] == pytest.approx(np.mean(no_answer), abs=1e-9)
    total = len(has) * dev["HasAns_f1"] + len(no_answer) * dev["NoAns_f1"]
    assert dev["f1"] == pytest.approx(total / len(golds), abs=1e-6)
    (conll_run,) = results["conll2003"]["runs"]
    assert {"dev", "test"} <= set(conll_run["dev"])
    sentences = open(conll_run["predictions"]["test"]).read().strip().split("\n\n")
    rows = [[line.split() for line in s.splitlines()] for s in sentences]
    assert all(len(row) == 3 for sentence in rows for row in sentence)  # word gold predicted
    gold_tags = [[row[1] for row in sentence] for sentence in rows]
    predicted = [[row[2] for row in sentence] for sentence in rows]
    expected = seqeval.f1_score(gold_tags, predicted)  # conlleval's rules (IOB1 as written)
    assert conll_run["dev"]["test"]["f1"] == pytest.approx(expected, abs=1e-6)
    (swag_run,) = results["swag"]["runs"]
    rows = list(csv.reader(open(swag_run["predictions"]["test"])))
    assert rows[0] == ["fold-ind", "label"] and len(rows) == 9
    assert {r[1] for r in rows[1:]} <= {"0", "1", "2", "3"}
    (reviews,) = results["classify:reviews"]["runs"]
    assert {"accuracy", "macro_f1"} <= set(reviews["dev"]["dev"])
    rows = open(reviews["predictions"]["test"]).read().splitlines()
    assert rows[0] == "id\tprediction" and [r.split("\t")[0] for r in rows[1:]] == [
        f"r{i}" for i in range(4)
    ]
    assert {r.split("\t")[1] for r in rows[1:]} <= {"neg", "pos"}
    (ents,) = results["tag:ents"]["runs"]
    assert "f1" in ents["dev"]["dev"] and ents["predictions"] == {}  # no test.txt: none
    saved = convert.read_run(reviews["directory"])
    assert saved["labels"] == ["neg", "pos"] and saved["task"] == "classify:reviews"
    table = (work / "results.md").read_text()
    assert "| squad_v2 | f1" in table and "| conll2003 | f1 (test)" in table
    _every_run_answers_through_predict_as_its_files_say(data, results)


def _every_run_answers_through_predict_as_its_files_say(data, results):
    """`tools.predict` on each fine-tuned run (`task`: the run's own) answers lines as the
    task's prediction files written by finetune.py say, through the same decoding."""
    from bert_jax.tasks import swag
    from bert_jax.tools import predict

    def ask(task_name, lines):
        (run,) = results[task_name]["runs"]
        return list(predict.Predictor("task", run["directory"], max_seq_length=32).run(lines))

    (run,) = results["swag"]["runs"]
    written = [int(r[1]) for r in list(csv.reader(open(run["predictions"]["test"])))[1:]]
    examples = swag.read_swag(str(data / "SWAG/test.csv"))
    lines = [" ||| ".join([e.context, e.start, *e.endings]) for e in examples]
    assert [a["choice"] for a in ask("swag", lines)] == written

    (run,) = results["classify:reviews"]["runs"]
    written = [r.split("\t")[1] for r in open(run["predictions"]["test"]).read().splitlines()[1:]]
    texts = [json.loads(r)["text"] for r in open(data / "reviews/test.jsonl")]
    answers = ask("classify:reviews", texts)
    assert [a["label"] for a in answers] == written
    assert all(set(a["scores"]) == {"neg", "pos"} for a in answers)

    (run,) = results["conll2003"]["runs"]
    sentences = open(run["predictions"]["test"]).read().strip().split("\n\n")
    rows = [[line.split() for line in s.splitlines()] for s in sentences]
    answers = ask("conll2003", [" ".join(r[0] for r in sentence) for sentence in rows])
    assert [a["tags"] for a in answers] == [[r[2] for r in sentence] for sentence in rows]

    (run,) = results["squad_v2"]["runs"]
    folder = os.path.dirname(run["predictions"]["dev"])
    odds = json.loads(open(os.path.join(folder, "null_odds.json")).read())
    written = json.loads(open(os.path.join(folder, "predictions.json")).read())
    (article,) = json.loads((data / "SQuAD/dev-v2.0.json").read_text())["data"]
    questions = {
        q["id"]: (q["question"], p["context"]) for p in article["paragraphs"] for q in p["qas"]
    }
    ids = sorted(questions)
    answers = ask("squad_v2", [f"{questions[i][0]} ||| {questions[i][1]}" for i in ids])
    for qas_id, answer in zip(ids, answers, strict=True):
        assert answer["null_odds"] == pytest.approx(odds[qas_id], abs=1e-4)
        assert written[qas_id] in ("", answer["answer"])  # "" where the tuned threshold says

    (ents,) = results["tag:ents"]["runs"]
    (answer,) = predict.Predictor("task", ents["directory"], max_seq_length=32).run(["w2 w5 w2"])
    assert len(answer["tags"]) == 3 and set(answer["tags"]) <= {"O", "B-THING", "I-THING"}


def test_bad_task_files_are_refused_before_compiling(tmp_path):
    data = _data(tmp_path)
    squad = data / "SQuAD/dev-v2.0.json"
    text = squad.read_text().splitlines()
    squad.write_text("\n".join(text[:5] + ["  oops,"] + text[5:]))
    conll = data / "CoNLL-2003/valid.txt"
    lines = conll.read_text().splitlines()
    lines[3] = lines[3].replace(" B-NP ", " ")  # line 4: a column short
    conll.write_text("\n".join(lines) + "\n")
    swag = data / "SWAG/val.csv"
    swag.write_text(swag.read_text().replace(",gold,", ",gold,w1,", 1))
    reviews = data / "reviews/dev.jsonl"
    reviews.write_text(reviews.read_text().replace('"neg"', '"negative"', 1))
    start = time.time()
    proc = _finetune(tmp_path, data)
    assert proc.returncode != 0
    assert "4 problem(s) in the task data" in proc.stderr
    assert "dev-v2.0.json:6: not valid JSON" in proc.stderr
    assert "valid.txt:4: 3 columns where line 3 has 4" in proc.stderr
    assert "val.csv:2: 12 fields where the header has 11" in proc.stderr
    assert "dev.jsonl:" in proc.stderr and "unknown label 'negative'" in proc.stderr
    assert time.time() - start < 60  # refused before any compilation
    assert not (tmp_path / "work" / "squad_v2").exists()


class _FakeSource(list):
    """A TFDS ArrayRecord data source as the readers use it: len, indexing, dataset_info."""

    def __init__(self, records, ner_names=()):
        super().__init__(records)
        feature = types.SimpleNamespace(names=list(ner_names))
        self.dataset_info = types.SimpleNamespace(
            features={"ner": types.SimpleNamespace(feature=feature)}
        )


def test_squad_and_conll_read_from_tfds_records(monkeypatch):
    """`--config.source=tfds`: TFDS squad/v2.0 and conll2003 records (text as bytes, tags as
    class indices) become the same examples the official files give, with the same checks."""
    import tensorflow_datasets as tfds

    from bert_jax.tasks import base, registry

    context = "The cat sat on the mat."
    squad_records = [
        {
            "id": b"q1",
            "question": b"Where did the cat sit?",
            "context": context.encode(),
            "answers": {"text": [b"the mat", b"mat"], "answer_start": [15, 19]},
            "is_impossible": False,
        },
        {
            "id": b"q2",
            "question": b"Who?",
            "context": context.encode(),
            "answers": {"text": [], "answer_start": []},
            "is_impossible": True,
        },
    ]
    ner_names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    # IOB1 as distributed: "I-PER I-PER" opens an entity; "B-LOC" follows an I-LOC entity.
    conll_records = [
        {"tokens": [b"John", b"Smith", b"visits", b"Paris"], "ner": [2, 2, 0, 6]},
        {"tokens": [b"Bonn", b"Berlin"], "ner": [6, 5]},
    ]
    calls = []

    def fake_data_source(name, split, data_dir, download):
        calls.append((name, split, download))
        if name.startswith("squad"):
            return _FakeSource(squad_records)
        return _FakeSource(conll_records, ner_names)

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    settings = base.Settings(
        data_dir="",
        max_seq_length=64,
        max_train_examples=0,
        source="tfds",
        tfds_data_dir="",
        doc_stride=32,
        max_query_length=16,
        n_best_size=20,
        max_answer_length=30,
    )
    squad_task = registry.get_task("squad_v2")
    assert squad_task.check(settings) == []
    first, second = squad_task._read(settings, "dev")
    assert (first.qas_id, first.question) == ("q1", "Where did the cat sit?")
    assert first.context == context
    assert [(a.text, a.start) for a in first.answers] == [("the mat", 15), ("mat", 19)]
    assert second.is_impossible and second.answers == ()
    assert ("squad/v2.0", "validation", False) in calls and ("squad/v2.0", "train", False) in calls
    conll_task = registry.get_task("conll2003")
    sentences = conll_task._read(settings, "test")
    assert [s.words for s in sentences] == [
        ("John", "Smith", "visits", "Paris"),
        ("Bonn", "Berlin"),
    ]
    assert [s.tags for s in sentences] == [("B-PER", "I-PER", "O", "B-LOC"), ("B-LOC", "B-LOC")]
    assert ("conll2003", "test", False) in calls
    # A record whose answer is not the context's text at its offset: named, as in the JSON.
    squad_records[0]["answers"]["answer_start"][0] = 3
    train_problem, dev_problem = squad_task.check(settings)
    assert train_problem.startswith("TFDS squad/v2.0 train record 0: question 'q1'")
    assert dev_problem.startswith("TFDS squad/v2.0 validation record 0")
    assert "offset 3" in dev_problem


def test_tfds_data_not_prepared_says_how(tmp_path):
    from bert_jax.tasks import base, registry

    settings = base.Settings(
        data_dir="",
        max_seq_length=64,
        max_train_examples=0,
        source="tfds",
        tfds_data_dir=str(tmp_path),
        doc_stride=32,
        max_query_length=16,
        n_best_size=20,
        max_answer_length=30,
    )
    (problem, *_) = registry.get_task("conll2003").check(settings)
    assert "tfds build conll2003 --file_format=array_record" in problem
    assert "column files" in problem
