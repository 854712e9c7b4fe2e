"""The exports, each head at batch sizes and lengths other than any seen before:
`export-stablehlo`'s artifact, reloaded in a fresh process that never imports bert_jax, and
`export-onnx`'s file, run in onnxruntime, give bert_jax's outputs."""

import json
import os
import subprocess
import sys

import glue_data
import jax
import numpy as np
import pytest
from cli import ROOT

from bert_jax import convert, models
from bert_jax.convert.onnx_export import export_onnx
from bert_jax.convert.stablehlo import INPUTS, export_stablehlo
from bert_jax.data.tokenization import WordPieceTokenizer

HEADS = {
    "BertModel": 2,
    "BertForMaskedLM": 2,
    "BertForSequenceClassification": 3,
    "BertForTokenClassification": 5,
    "BertForMultipleChoice": 2,
    "BertForQuestionAnswering": 2,
}

# Runs in the exported directory's parent, with only the loader on its path.
RELOAD = r"""
import importlib.util, json, sys
import numpy as np
root, cases = sys.argv[1], json.loads(sys.argv[2])
results = {}
for name, shape in cases.items():
    spec = importlib.util.spec_from_file_location("run_exported", f"{root}/{name}/run_exported.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    model = loader.ExportedModel(f"{root}/{name}")
    rng = np.random.default_rng(len(shape))
    ids = rng.integers(5, 39, shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    mask[..., shape[-1] - 3 :] = 0  # padding at the end of each row
    segments = (np.arange(shape[-1]) >= shape[-1] // 2).astype(np.int32) * mask
    for key, value in model(ids * mask, mask, segments).items():
        results[f"{name}/{key}"] = value
assert not any(m == "bert_jax" or m.startswith("bert_jax.") for m in sys.modules), "imported"
np.savez(f"{root}/reloaded.npz", **results)
"""


def _bert_jax_outputs(config, architecture, num_labels, params, shape) -> dict:
    """bert_jax's outputs as it serves them (compiled: XLA's fusions round as the exported
    program's do, where an op-by-op run can move an int8 model's activation across a rounding
    boundary)."""
    rng = np.random.default_rng(len(shape))
    ids = rng.integers(5, 39, shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    mask[..., shape[-1] - 3 :] = 0
    segments = (np.arange(shape[-1]) >= shape[-1] // 2).astype(np.int32) * mask
    graphdef, _ = models.split_params(
        models.abstract_model(config, convert.model_class(architecture, num_labels))
    )

    names = {
        "BertModel": ("sequence_output", "pooled_output"),
        "BertForQuestionAnswering": ("start_logits", "end_logits"),
    }.get(architecture, ("logits",))

    @jax.jit
    def forward(params, ids, mask, segments):
        out = models.merge_params(graphdef, params)(ids, mask, segments)
        if architecture == "BertModel":
            return out.sequence_output, out.pooled_output
        return tuple(out[: len(names)])

    out = forward(jax.tree.map(np.asarray, params), ids * mask, mask, segments)
    return dict(zip(names, out, strict=True))


def _config(layers: int = 2, **kw) -> models.BertConfig:
    return models.BertConfig(
        vocab_size=len(glue_data.VOCAB),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        **kw,
    )


def _export_run(
    command: str, config, architecture, num_labels, params, tokenizer, tmp_path, out, *flags
):
    """`python -m bert_jax.convert COMMAND RUN OUT [FLAGS]` on a run written from `params`."""
    run = tmp_path / "run"
    convert.write_run(str(run), config, architecture, num_labels, params, tokenizer)
    proc = subprocess.run(
        [sys.executable, "-m", "bert_jax.convert", command, str(run), str(out), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_every_head_reloads_without_bert_jax_and_matches(tmp_path):
    config = _config()
    tokenizer = WordPieceTokenizer(glue_data.write_vocab(tmp_path / "vocab.txt"))
    cases, expected, params_of = {}, {}, []
    for i, (architecture, num_labels) in enumerate(HEADS.items()):
        params = models.split_params(
            models.create_model(config, i, convert.model_class(architecture, num_labels))
        )[1]
        params_of.append(params)
        out = tmp_path / "exported" / architecture
        if architecture == "BertForSequenceClassification":  # the command line, from a run
            stdout = _export_run(
                "export-stablehlo", config, architecture, num_labels, params, tokenizer,
                tmp_path, out,
            )  # fmt: skip
            assert "[batch, length] -> logits" in stdout
        else:
            export_stablehlo(params, config, architecture, num_labels, tokenizer, str(out))
        meta = json.loads((out / "meta.json").read_text())
        assert meta["architecture"] == architecture and (out / "vocab.txt").exists()
        # Shapes the export never saw: batch 3 (or 2 x 3 choices), lengths 11 and 29.
        shape = (2, 3, 11) if architecture == "BertForMultipleChoice" else (3, 29 - 2 * i)
        cases[architecture] = shape
        for key, value in _bert_jax_outputs(
            config, architecture, num_labels, params, shape
        ).items():
            expected[f"{architecture}/{key}"] = np.asarray(value)
    # An int8 classifier (int8 weights and int8 matmuls) serves the same way.
    cls = convert.model_class("BertForSequenceClassification", 3)
    params, int8 = models.quantize(params_of[2], config, "int8-dynamic", cls)
    export_stablehlo(
        params, int8, "BertForSequenceClassification", 3, tokenizer, str(tmp_path / "exported/q")
    )
    cases["q"] = (3, 19)
    for key, value in _bert_jax_outputs(int8, *list(HEADS.items())[2], params, (3, 19)).items():
        expected[f"q/{key}"] = np.asarray(value)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "exported"), json.dumps(cases)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = np.load(tmp_path / "exported" / "reloaded.npz")
    assert sorted(reloaded.files) == sorted(expected)
    for key, value in expected.items():
        assert reloaded[key].shape == value.shape, key
        np.testing.assert_allclose(reloaded[key], value, atol=1e-5, rtol=0, err_msg=key)


def test_exporting_a_head_the_source_lacks_is_refused(tmp_path):
    config = _config(layers=1)
    tokenizer = WordPieceTokenizer(glue_data.write_vocab(tmp_path / "vocab.txt"))
    params = models.split_params(models.create_model(config, 0, models.BertModel))[1]
    convert.write_run(str(tmp_path / "run"), config, "BertModel", 2, params, tokenizer)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bert_jax.convert",
            "export-stablehlo",
            str(tmp_path / "run"),
            str(tmp_path / "out"),
            "--architecture=BertForQuestionAnswering",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "has no weights for BertForQuestionAnswering" in proc.stderr
    assert not (tmp_path / "out" / "model.jax_export").exists()


@pytest.mark.parametrize("architecture", ["BertForPreTraining"])
def test_heads_without_an_export_name_the_alternatives(architecture, tmp_path):
    with pytest.raises(ValueError, match="export the encoder"):
        export_stablehlo({}, models.BertConfig(), architecture, 2, None, str(tmp_path))


ONNX_HEADS = {
    **HEADS,
    "AlbertForSequenceClassification": 3,
    "ModernBertForSequenceClassification": 3,  # through transformers' eager/SDPA attention
}
# ModernBERT with a local window shorter than the rows, so that both kinds of layer matter.
MODERNBERT = dict(
    model_type="modernbert", type_vocab_size=1, use_bias=False, local_attention=4,
    global_attn_every_n_layers=2,
)  # fmt: skip


def test_every_head_runs_in_onnxruntime_and_matches(tmp_path):
    import onnxruntime

    tokenizer = WordPieceTokenizer(glue_data.write_vocab(tmp_path / "vocab.txt"))
    for i, (architecture, num_labels) in enumerate(ONNX_HEADS.items()):
        albert, modern = architecture.startswith("Albert"), architecture.startswith("Modern")
        config = _config(**({"share_layers": "all", "embedding_size": 16} if albert else {}))
        config = _config(**MODERNBERT) if modern else config
        bert_name = "Bert" + architecture.removeprefix("Albert").removeprefix("Bert")
        bert_name = architecture if modern else bert_name
        params = models.split_params(
            models.create_model(config, i, convert.model_class(bert_name, num_labels))
        )[1]
        out = tmp_path / architecture
        if architecture == "BertForTokenClassification":  # the command line, from a run
            stdout = _export_run(
                "export-onnx", config, bert_name, num_labels, params, tokenizer, tmp_path, out,
                "--int8",
            )  # fmt: skip
            assert "[batch, length] -> logits" in stdout and "model.int8.onnx" in stdout
        else:
            export_onnx(params, config, bert_name, num_labels, tokenizer, str(out))
        meta = json.loads((out / "meta.json").read_text())
        assert meta["architecture"] == architecture and (out / "vocab.txt").exists()
        session = onnxruntime.InferenceSession(str(out / "model.onnx"))
        assert [x.name for x in session.get_inputs()] == meta["inputs"]
        # Shapes other than the traced (2, 8) and the export's own checks.
        shape = (3, 2, 13) if architecture == "BertForMultipleChoice" else (4, 27 - i)
        expected = _bert_jax_outputs(config, bert_name, num_labels, params, shape)
        rng = np.random.default_rng(len(shape))
        ids = rng.integers(5, 39, shape)
        mask = np.ones(shape, np.int64)
        mask[..., shape[-1] - 3 :] = 0
        segments = (np.arange(shape[-1]) >= shape[-1] // 2).astype(np.int64) * mask
        feed = {
            k: v
            for k, v in zip(INPUTS, (ids * mask, mask, segments), strict=True)
            if k in meta["inputs"]
        }
        assert len(feed) == (2 if modern else 3)  # ModernBERT's graph takes no segment ids
        got = session.run(None, feed)
        assert meta["outputs"] == list(expected)
        for name, value in zip(meta["outputs"], got, strict=True):
            assert value.shape == np.shape(expected[name]), (architecture, name)
            np.testing.assert_allclose(
                value, expected[name], atol=1e-5, rtol=0, err_msg=f"{architecture}/{name}"
            )
        if (out / "model.int8.onnx").exists():  # ONNX Runtime's int8 of the same model
            int8 = onnxruntime.InferenceSession(str(out / "model.int8.onnx"))
            (value,) = int8.run(None, feed)
            error = float(np.max(np.abs(value - expected["logits"])))
            assert 0 < error <= 0.1 * float(np.max(np.abs(expected["logits"]))), error
            assert meta["int8_max_abs_error"] > 0
            import onnx

            ops = {node.op_type for node in onnx.load(out / "model.int8.onnx").graph.node}
            assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops


def test_an_export_never_writes_into_a_directory_with_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.onnx").write_bytes(b"someone's model")
    with pytest.raises(FileExistsError, match="choose a new output directory"):
        export_onnx({}, models.BertConfig(), "BertModel", 2, None, str(tmp_path / "out"))
    with pytest.raises(FileExistsError, match="choose a new output directory"):
        export_stablehlo({}, models.BertConfig(), "BertModel", 2, None, str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"someone's model"
