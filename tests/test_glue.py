"""GLUE: readers of every task's layout, packing, official metrics against scikit-learn/scipy,
a learning test, and finetune.py end to end on all tasks."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import glue_data
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import tensorflow_datasets as tfds
from sklearn import metrics as skm

from bert_jax import convert, models, sharding
from bert_jax.data import encoding
from bert_jax.data.tokenization import WordPieceTokenizer
from bert_jax.tasks import glue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import finetune  # noqa: E402
from configs import glue as glue_config  # noqa: E402


def _tiny_model(tmp_path, hidden=32, layers=2) -> str:
    """A randomly initialised bert_jax encoder saved as a workdir (what init_from reads)."""
    config = models.BertConfig(
        vocab_size=len(glue_data.VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    params = models.split_params(models.create_model(config, 0, models.BertModel))[1]
    tokenizer = WordPieceTokenizer(glue_data.write_vocab(tmp_path / "vocab.txt"))
    out = str(tmp_path / "model")
    convert.write_run(out, config, "BertModel", 2, params, tokenizer)
    return out


def test_every_task_reads_its_layout(tmp_path):
    glue_data.write_glue(tmp_path, n=12)
    for task in glue.TASKS.values():
        folder = tmp_path / task.folder
        for split in task.splits:
            examples = glue.read_tsv(task, split, str(folder))
            assert len(examples) > 0, (task.name, split.name)
            assert (examples.text_b is None) == (task.text_b is None)
            assert all("w" in t for t in examples.text_a)
            if split.labelled:
                # The labels follow the text: "good" (or MNLI's "good"/"yes"/"bad") decides.
                for text, label in zip(examples.text_a, examples.labels, strict=True):
                    if task.is_regression:
                        assert label == (4.5 if "good" in text.split() else 0.5)
                    elif task.name == "mnli":
                        key = next(w for w in ("good", "yes", "bad") if w in text.split())
                        gold = {"good": "entailment", "yes": "neutral", "bad": "contradiction"}
                        assert task.labels[label] == gold[key]
                    else:
                        positive = "good" in text.split()
                        positive_label = {"qnli": "entailment", "rte": "entailment"}.get(
                            task.name, "1"
                        )
                        assert (task.labels[label] == positive_label) == positive
            else:
                assert examples.labels is None
                assert examples.index == [str(i) for i in range(len(examples))]
    # MRPC's second sentence starts with an unbalanced quote: fields are split on tabs only.
    mrpc = glue.read_tsv(glue.TASKS["mrpc"], glue.TASKS["mrpc"].split("dev"), tmp_path / "MRPC")
    assert all(t.startswith('"') for t in mrpc.text_b)
    ax = glue.read_tsv(glue.TASKS["mnli"], glue.AX, str(tmp_path / "diagnostic"))
    assert len(ax) == 4 and ax.text_b is not None


def test_pair_packing_truncates_like_the_original(tmp_path):
    tok = WordPieceTokenizer(glue_data.write_vocab(tmp_path / "vocab.txt"))
    w = {t: i for i, t in enumerate(glue_data.VOCAB)}
    examples = glue.Examples(
        ["w1 w2 w3 w4 w5", "w1 w2 w3 w4", "good"],
        ["w6 w7 w8", "w6 w7 w8 w9", "bad"],
        None,
        ["0", "1", "2"],
    )
    f = encoding.encode(examples, tok, 9)
    cls, sep = tok.cls_id, tok.sep_id
    # Budget 6: (5, 3) -> pop the longer twice -> (3, 3); (4, 4) -> pop b on the tie, then a.
    assert f["input_ids"][0].tolist() == [
        cls,
        w["w1"],
        w["w2"],
        w["w3"],
        sep,
        w["w6"],
        w["w7"],
        w["w8"],
        sep,
    ]
    assert f["input_ids"][1].tolist() == [
        cls,
        w["w1"],
        w["w2"],
        w["w3"],
        sep,
        w["w6"],
        w["w7"],
        w["w8"],
        sep,
    ]
    assert f["segment_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert f["input_ids"][2].tolist()[:5] == [cls, w["good"], sep, w["bad"], sep]
    assert f["input_mask"][2].tolist() == [1] * 5 + [0] * 4
    single = encoding.encode(
        glue.Examples(["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"], None, None, ["0"]), tok, 6
    )
    assert single["input_ids"][0].tolist() == [cls, w["w1"], w["w2"], w["w3"], w["w4"], sep]


def _features(lengths, width, rng):
    """Padded one-example-per-row features of the given real lengths, two segments each."""
    n = len(lengths)
    mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = rng.integers(5, len(glue_data.VOCAB), size=(n, width)).astype(np.int32) * mask
    segments = ((np.arange(width)[None] >= np.asarray(lengths)[:, None] // 2) * mask).astype(
        np.int32
    )
    labels = rng.integers(0, 3, n).astype(np.int32)
    return dict(input_ids=ids, input_mask=mask, segment_ids=segments, label=labels)


def test_pack_places_every_example_once_within_its_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 17, 40)
    features = _features(lengths, 16, rng)
    packed = encoding.pack(features, max_per_row=4, row_multiple=2)
    rows = len(packed["input_ids"])
    assert rows % 2 == 0 and rows >= -(-int(lengths.sum()) // 16)
    assert rows < 40  # fewer rows than examples: the point
    real = packed["source"] >= 0
    assert sorted(packed["source"][real].tolist()) == list(range(40))
    assert (real.sum(1) <= 4).all() and (packed["input_mask"].sum(1) <= 16).all()
    for r, slot in zip(*np.nonzero(real), strict=True):
        i, start = packed["source"][r, slot], packed["cls_positions"][r, slot]
        span = slice(start, start + lengths[i])
        assert (packed["input_ids"][r, span] == features["input_ids"][i, : lengths[i]]).all()
        assert (packed["segment_ids"][r, span] == features["segment_ids"][i, : lengths[i]]).all()
        assert (packed["position_ids"][r, span] == np.arange(lengths[i])).all()
        assert (packed["example_ids"][r, span] == slot + 1).all()
        assert packed["label"][r, slot] == features["label"][i]
    assert ((packed["example_ids"] > 0) == (packed["input_mask"] > 0)).all()
    logits = rng.normal(size=(rows, 4, 3))
    back = encoding.unpack(logits, packed["source"], 40)
    r, slot = np.nonzero(packed["source"] == 7)
    np.testing.assert_array_equal(back[7], logits[r[0], slot[0]])
    with pytest.raises(ValueError, match="max_per_row=0"):
        encoding.pack(features, max_per_row=0)


def test_packing_to_a_fixed_row_count_and_choosing_the_run_shapes():
    # Best fit by decreasing length: pairs that fill a row exactly end up together.
    rows = encoding.pack_rows(np.array([100, 28, 90, 38, 64, 64]), 128)
    assert sorted(sorted(r) for r in rows) == [[0, 1], [2, 3], [4, 5]]
    assert len(encoding.pack_rows(np.full(10, 8), 128, max_per_row=4)) == 3  # 4 + 4 + 2
    rng = np.random.default_rng(2)
    lengths = rng.integers(3, 17, 24)
    features = _features(lengths, 16, rng)
    need = len(encoding.pack_rows(lengths, 16, 4))
    packed = encoding.pack(features, max_per_row=4, row_multiple=2, rows=need + need % 2 + 2)
    assert len(packed["input_ids"]) == need + need % 2 + 2
    assert sorted(packed["source"][packed["source"] >= 0].tolist()) == list(range(24))
    assert (packed["input_mask"][need:].sum() == 0) and (packed["source"][need:] == -1).all()
    with pytest.raises(ValueError, match=f"need {need} rows"):
        encoding.pack(features, max_per_row=4, rows=need - 1)
    # Rows each batch needs -> the run's shapes: a second, smaller shape only where it saves
    # at least a tenth of the rows (hand-computed: 8 for all is 48 rows; 6 and 8 make 40).
    assert encoding.row_counts([5, 6, 6, 6, 7, 8]) == [6, 8]
    assert encoding.row_counts([7, 7, 7, 7, 7, 8]) == [7, 8]  # 43 of 48 rows: 10.4% saved
    assert encoding.row_counts([7, 8, 8, 8, 8, 8]) == [8]  # 47 of 48 rows: not worth a compile
    assert encoding.row_counts([5, 6, 6, 6, 7, 8], row_multiple=4) == [8]


def test_packed_rows_give_each_example_its_own_logits_and_gradients(tmp_path):
    """Logits of packed rows against transformers' BertForSequenceClassification run on each
    example alone; the gradient of a packed batch against the same batch unpacked."""
    import torch
    import transformers

    from bert_jax import objectives

    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=len(glue_data.VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=3,
            attn_implementation="eager",
        )
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    glue_data.write_vocab(tmp_path / "hf" / "vocab.txt")
    mesh = sharding.make_mesh(sharding.MeshConfig())
    loaded = convert.load_pretrained(
        f"hf:{tmp_path / 'hf'}", "BertForSequenceClassification", mesh=mesh, num_labels=3
    )
    rng = np.random.default_rng(1)
    lengths = [9, 3, 16, 5, 7, 4, 12, 6]
    features = _features(lengths, 16, rng)
    packed = encoding.pack(features, max_per_row=4)
    assert len(packed["input_ids"]) == 4  # 62 tokens in 4 rows of 16, not 8
    graphdef, _ = models.split_params(
        models.abstract_model(
            loaded.config, convert.model_class("BertForSequenceClassification", 3)
        )
    )
    params = jax.tree.map(jnp.asarray, jax.device_get(loaded.params))
    model = models.merge_params(graphdef, params)
    logits, _ = model(
        packed["input_ids"],
        packed["input_mask"],
        packed["segment_ids"],
        packing=models.Packing.from_batch(packed),
    )
    ours = encoding.unpack(np.asarray(logits), packed["source"], len(lengths))
    for i, n in enumerate(lengths):
        with torch.no_grad():
            ref = hf(
                input_ids=torch.tensor(features["input_ids"][i : i + 1, :n], dtype=torch.long),
                token_type_ids=torch.tensor(features["segment_ids"][i : i + 1, :n]).long(),
            ).logits.numpy()[0]
        np.testing.assert_allclose(ours[i], ref, atol=1e-5, rtol=0, err_msg=f"example {i}")

    objective = objectives.classification(3)

    def grads(batch):
        def loss(p):
            m = models.merge_params(graphdef, p)
            return objective.loss(m, batch, None, True)[0]

        return jax.grad(loss)(params)

    unpacked = grads({k: jnp.asarray(v) for k, v in features.items()})
    packed_batch = {k: jnp.asarray(v) for k, v in packed.items() if k != "source"}
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4),
        grads(packed_batch),
        unpacked,
    )


def test_metrics_match_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.8, y, 1 - y)
    cola = glue.compute_metrics(glue.TASKS["cola"], p, y)
    assert cola["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)
    # Matthews from its definition on the confusion matrix, independently of scikit-learn.
    tp, tn = np.sum((p == 1) & (y == 1)), np.sum((p == 0) & (y == 0))
    fp, fn = np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert cola["mcc"] == pytest.approx(mcc, abs=1e-12)
    mrpc = glue.compute_metrics(glue.TASKS["mrpc"], p, y)
    assert mrpc["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert mrpc["accuracy"] == pytest.approx(np.mean(p == y), abs=1e-12)
    assert mrpc["score"] == pytest.approx((mrpc["f1"] + mrpc["accuracy"]) / 2)
    scores = rng.uniform(0, 5, 100)
    preds = scores + rng.normal(0, 1, 100)
    stsb = glue.compute_metrics(glue.TASKS["stsb"], preds, scores)
    assert stsb["pearson"] == pytest.approx(scipy.stats.pearsonr(scores, preds)[0], abs=1e-12)
    assert stsb["spearman"] == pytest.approx(scipy.stats.spearmanr(scores, preds)[0], abs=1e-12)
    three = rng.integers(0, 3, 50)
    assert glue.compute_metrics(glue.TASKS["mnli"], three, three)["accuracy"] == 1.0
    # Edge cases: one class only (MCC undefined: 0, as scikit-learn), constant predictions
    # (scipy gives NaN; the GLUE score here is 0 so that model selection still works).
    ones = np.ones(20, int)
    assert glue.compute_metrics(glue.TASKS["cola"], ones, y[:20])["mcc"] == 0.0
    assert skm.matthews_corrcoef(y[:20], ones) == 0.0
    constant = np.full(100, 2.5)
    with pytest.warns(scipy.stats.ConstantInputWarning):
        assert np.isnan(scipy.stats.pearsonr(scores, constant)[0])
    edge = glue.compute_metrics(glue.TASKS["stsb"], constant, scores)
    assert edge["pearson"] == 0.0 and edge["spearman"] == 0.0
    assert glue.compute_metrics(glue.TASKS["mrpc"], np.zeros(10, int), y[:10])["f1"] == 0.0


# TFDS's GLUE records as `tfds.data_source` yields them (features of `glue/<config>`).
_TFDS_RECORDS = {
    "cola": {"sentence": b"w1 good w2", "label": 1, "idx": 7},
    "sst2": {"sentence": b"w1 bad", "label": 0, "idx": 7},
    "mrpc": {"sentence1": b"w1", "sentence2": b"w2", "label": 1, "idx": 7},
    "stsb": {"sentence1": b"w1", "sentence2": b"w2", "label": 3.2, "idx": 7},
    "qqp": {"question1": b"w1", "question2": b"w2", "label": 1, "idx": 7},
    "mnli": {"premise": b"w1", "hypothesis": b"w2", "label": 1, "idx": 7},
    "qnli": {"question": b"w1", "sentence": b"w2", "label": 1, "idx": 7},
    "rte": {"sentence1": b"w1", "sentence2": b"w2", "label": 1, "idx": 7},
    "wnli": {"sentence1": b"w1", "sentence2": b"w2", "label": 1, "idx": 7},
    "ax": {"premise": b"w1", "hypothesis": b"w2", "label": -1, "idx": 7},
}


def test_tfds_records_map_to_examples(monkeypatch):
    calls = []

    def fake_data_source(name, split, data_dir, download):
        calls.append((name, split, download))
        config = name.split("/")[1]
        return [_TFDS_RECORDS[config]] * 3

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    for task in glue.TASKS.values():
        for split in task.splits:
            examples = glue.read_tfds(task, split, None)
            assert len(examples) == 3 and examples.index == ["7"] * 3
            assert (examples.text_b is None) == (task.text_b is None)
            assert examples.text_a[0] == _TFDS_RECORDS[task.tfds_config][task.tfds_text[0]].decode()
            if split.labelled and not task.is_regression:
                # TFDS's class order differs from the TSV label strings: MNLI's 1 is "neutral".
                tfds_name = task.tfds_labels[_TFDS_RECORDS[task.tfds_config]["label"]]
                assert task.labels[examples.labels[0]] == tfds_name
            elif split.labelled:
                assert examples.labels[0] == pytest.approx(3.2)
    assert ("glue/mnli", "validation_mismatched", False) in calls
    assert len(glue.read_tfds(glue.TASKS["mnli"], glue.AX, None)) == 3
    assert (
        glue.TASKS["mnli"].labels[1] == "entailment"
        and glue.TASKS["mnli"].tfds_labels[1] == "neutral"
    )


def test_tfds_missing_data_says_how_to_prepare_it():
    with pytest.raises(FileNotFoundError, match=r"tfds build glue/rte --file_format=array_record"):
        glue.read_tfds(glue.TASKS["rte"], glue.TASKS["rte"].split("train"), "/nonexistent")


def test_fine_tuning_learns_a_task_determined_by_the_text(tmp_path):
    rng = np.random.default_rng(1)
    rows = [[glue_data.sentence(rng, "good" if i % 2 else "bad"), str(i % 2)] for i in range(600)]
    glue_data.write_tsv(tmp_path / "glue/SST-2/train.tsv", ["sentence", "label"], rows[:480])
    glue_data.write_tsv(tmp_path / "glue/SST-2/dev.tsv", ["sentence", "label"], rows[480:])
    glue_data.write_tsv(
        tmp_path / "glue/SST-2/test.tsv",
        ["index", "sentence"],
        [["0", "w1 good w2"], ["1", "w3 bad"]],
    )
    cfg = glue_data.finetune_config(
        init_from=_tiny_model(tmp_path, hidden=64),
        data_dir=str(tmp_path / "glue"),
        num_epochs=3.0,
        batch_size=16,
        learning_rates=(5e-4,),
    )
    mesh = sharding.make_mesh(cfg.mesh)
    result = finetune.finetune_task(cfg, "sst2", mesh, str(tmp_path / "work"))
    (run,) = result["runs"]
    assert run["dev"]["dev"]["accuracy"] >= 0.95, run["history"]
    lines = open(run["predictions"]["test"]).read().splitlines()
    assert lines == ["index\tprediction", "0\t1", "1\t0"]
    # The fine-tuned run teaches a one-layer student made of its first layer
    # (--config.distill.teacher, --config.student_layers).
    with pytest.raises(ValueError, match="distill from a model fine-tuned on sst2"):
        finetune.finetune_task(
            dataclasses.replace(cfg, distill={"teacher": cfg.init_from}),
            "sst2",
            mesh,
            str(tmp_path / "refused"),
        )
    assert not (tmp_path / "refused" / "sst2").exists()
    # With TinyBERT's layer-wise loss too: its layer 0 against the teacher's layer 1.
    distill = {"teacher": run["directory"], "temperature": 2.0, "alpha": 0.5, "layerwise": 1.0}
    cfg = dataclasses.replace(cfg, init_from=run["directory"], student_layers=(0,), distill=distill)
    (student_run,) = finetune.finetune_task(cfg, "sst2", mesh, str(tmp_path / "distilled"))["runs"]
    assert student_run["dev"]["dev"]["accuracy"] >= 0.95, student_run["history"]
    with open(os.path.join(student_run["directory"], "config.json")) as f:
        saved = json.load(f)
    assert saved["distilled_from"] == distill and saved["model"]["num_hidden_layers"] == 1
    _int8_run_evaluates_and_predicts(tmp_path, run, dataclasses.replace(cfg, distill={}), mesh)


def _int8_run_evaluates_and_predicts(tmp_path, run, cfg, mesh):
    """The fine-tuned run quantized by the command line: a quarter of the bytes on disk, and
    finetune.py's evaluation (num_epochs=0) and bert_jax.tools.predict read it like any model."""
    from bert_jax.convert import __main__ as convert_cli
    from bert_jax.tools import predict

    out = tmp_path / "int8"
    convert_cli.main(["quantize", run["directory"], str(out)])

    def step_files(directory):
        """{path: bytes} of the files of the one step checkpoint `directory` holds (the step
        the model loads from; not other folders, such as one orbax is still deleting)."""
        (step,) = [n for n in os.listdir(directory) if n.isdigit()]
        walk = os.walk(os.path.join(directory, step))
        return {
            os.path.join(d, f): os.path.getsize(os.path.join(d, f)) for d, _, fs in walk for f in fs
        }

    # On disk the weights shrink by what they shrink in memory (a tiny model's biases, scales
    # and orbax's metadata weigh more than BERT-Base's: test_quantize checks its quarter).
    float_files = step_files(os.path.join(run["directory"], "checkpoints"))
    int8_files = step_files(out / "checkpoints")
    saved = sum(float_files.values()) - sum(int8_files.values())
    float_params = convert.load_pretrained(
        run["directory"], "BertForSequenceClassification", mesh=mesh
    ).params
    int8_params = convert.load_pretrained(
        str(out), "BertForSequenceClassification", mesh=mesh
    ).params
    shrink = models.param_bytes(float_params) - models.param_bytes(int8_params)
    assert 0.9 * shrink < saved < 1.1 * shrink, (saved, shrink, float_files, int8_files)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        convert_cli.main(["quantize", run["directory"], str(out)])
    with pytest.raises(ValueError, match="int8 weights, which the Hugging Face"):
        convert_cli.main(["export-hf", str(out), str(tmp_path / "hf")])
    evaluate = dataclasses.replace(cfg, init_from=str(out), num_epochs=0.0, student_layers=())
    (int8_run,) = finetune.finetune_task(evaluate, "sst2", mesh, str(tmp_path / "eval"))["runs"]
    accuracy = run["dev"]["dev"]["accuracy"]
    assert abs(int8_run["dev"]["dev"]["accuracy"] - accuracy) <= 0.01, int8_run["dev"]
    assert int8_run["steps"] == 0
    # A float run quantized as it loads (--config.model.quantization), activations too.
    dynamic = dataclasses.replace(
        evaluate,
        init_from=run["directory"],
        numerics={**cfg.numerics, "quantization": "int8-dynamic"},
    )
    (dynamic_run,) = finetune.finetune_task(dynamic, "sst2", mesh, str(tmp_path / "dyn"))["runs"]
    assert abs(dynamic_run["dev"]["dev"]["accuracy"] - accuracy) <= 0.01, dynamic_run["dev"]
    with pytest.raises(ValueError, match="int8 weights .* take no gradient"):
        finetune.finetune_task(
            dataclasses.replace(evaluate, num_epochs=1.0), "sst2", mesh, str(tmp_path / "no")
        )
    lines = ["w1 good w2", "w3 bad", "good w5 w6 w7"]
    float_answers = list(predict.Predictor("classify", run["directory"]).run(iter(lines)))
    int8_answers = list(predict.Predictor("classify", str(out)).run(iter(lines)))
    assert [a["label"] for a in int8_answers] == [a["label"] for a in float_answers]


@pytest.mark.slow
def test_finetune_runs_every_task_and_writes_submissions(tmp_path):
    test_rows = glue_data.write_glue(tmp_path / "glue", n=16)
    model = _tiny_model(tmp_path)
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "finetune.py"),
            f"--workdir={workdir}",
            f"--config.init_from={model}",
            f"--config.data_dir={tmp_path / 'glue'}",
            "--config.max_seq_length=16",
            "--config.batch_size=8",
            "--config.eval_batch_size=8",
            "--config.num_epochs=1",
            "--config.seeds=0,1",
            "--config.learning_rates=1e-3",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
            JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    submission = workdir / "submission"
    assert sorted(os.listdir(submission)) == sorted(test_rows)
    for name, rows in test_rows.items():
        with open(submission / name) as f:
            table = list(csv.reader(f, delimiter="\t"))
        assert table[0] == ["index", "prediction"] and len(table) == rows + 1, name
        assert [r[0] for r in table[1:]] == [str(i) for i in range(rows)]
        values = {r[1] for r in table[1:]}
        if name == "STS-B.tsv":
            assert all(0.0 <= float(v) <= 5.0 for v in values)
        else:
            task = (
                next(t for t in glue.TASKS.values() if name in [s.submission for s in t.splits])
                if name != "AX.tsv"
                else glue.TASKS["mnli"]
            )
            assert values <= set(task.labels), name
    results = json.load(open(workdir / "results.json"))
    assert sorted(results["tasks"]) == sorted(glue.TASKS)
    cola = results["tasks"]["cola"]["by_learning_rate"]["0.001"]["dev/mcc"]
    assert cola["n"] == 2 and len(cola["values"]) == 2
    assert cola["median"] == pytest.approx(np.median(cola["values"]))
    assert cola["std"] == pytest.approx(np.std(cola["values"], ddof=1))
    mnli = results["tasks"]["mnli"]["by_learning_rate"]["0.001"]
    assert "dev_matched/accuracy" in mnli and "dev_mismatched/accuracy" in mnli
    assert "| mnli | accuracy (dev_mismatched) |" in open(workdir / "results.md").read()
    # The best checkpoint of a run is a model: it exports to Hugging Face.
    run_dir = results["tasks"]["rte"]["submission_run"]
    out = tmp_path / "rte_hf"
    subprocess.run(
        [sys.executable, "-m", "bert_jax.convert", "export-hf", run_dir, str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    assert json.load(open(out / "config.json"))["architectures"] == [
        "BertForSequenceClassification"
    ]
    assert os.path.isdir(os.path.join(run_dir, "tensorboard"))


def test_bad_input_gets_clear_errors(tmp_path):
    glue_data.write_glue(tmp_path / "glue", n=6)
    sst2 = glue.TASKS["sst2"]
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
        glue.get_spec("sst3")
    with pytest.raises(FileNotFoundError, match=r"nowhere/SST-2/train.tsv does not exist"):
        glue.read_tsv(sst2, sst2.split("train"), str(tmp_path / "nowhere" / "SST-2"))
    path = tmp_path / "glue/SST-2/train.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [lines[3] + "\textra"] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=r"train.tsv:4: 3 tab-separated columns where the header"):
        glue.read_tsv(sst2, sst2.split("train"), str(tmp_path / "glue/SST-2"))
    rte = glue.TASKS["rte"]
    path = tmp_path / "glue/RTE/dev.tsv"
    path.write_text(path.read_text().replace("not_entailment", "contradiction", 1))
    with pytest.raises(ValueError, match=r"dev.tsv:\d+: unknown label 'contradiction' for rte"):
        glue.read_tsv(rte, rte.split("dev"), str(tmp_path / "glue/RTE"))
    config = glue_config.get_config()
    config.init_from = "hf:/somewhere"
    config.data_dir = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="pass --config.data_dir=<folder"):
        finetune.parse_config(config)
    config.data_dir, config.tasks = str(tmp_path / "glue"), "cola,sts"
    with pytest.raises(ValueError, match="unknown task 'sts': choose a GLUE task"):
        finetune.parse_config(config)
    # Evaluating only: one run, the rates and seeds would all evaluate the same model.
    config.tasks, config.seeds, config.learning_rates = "cola", "0,1,2", "2e-5,3e-5"
    assert len(finetune.parse_config(config).seeds) == 3
    config.num_epochs = 0.0
    parsed = finetune.parse_config(config)
    assert (parsed.seeds, parsed.learning_rates) == ((0,), (2e-5,))
    config.num_epochs = -1.0
    with pytest.raises(ValueError, match="use 0 to evaluate only"):
        finetune.parse_config(config)
    config.init_from = ""
    with pytest.raises(ValueError, match="--config.init_from is required"):
        finetune.parse_config(config)
