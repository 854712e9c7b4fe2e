"""Import and export against `transformers` models built from a config, and TF checkpoints
written by TensorFlow itself (a shipped fixture, and a fresh one where tensorflow is here)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from bert_jax import convert, models, sharding
from bert_jax.convert.tf_checkpoint import TFCheckpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import cli  # noqa: E402
import hf_reference  # noqa: E402
import make_tf_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_FIXTURE = os.path.join(ROOT, "tests", "data", "tf_bert")
SIZES = dict(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=24,
)
WORDS = ["the", "cat", "sat", "on", "mat", "un", "##believ", "##able", "runs", "##ing", "ok"]
ARCHS = (
    "BertModel",
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForMultipleChoice",
    "BertForQuestionAnswering",
)


def _vocab(path, size=SIZES["vocab_size"]):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
    tokens += [f"w{i}" for i in range(size - len(tokens))]
    path.write_text("".join(t + "\n" for t in tokens))
    return str(path)


def _hf_dir(tmp_path, architecture, *, num_labels=3, safe=True, name="hf"):
    """A `transformers` model with random weights and its tokenizer, saved as released ones are."""
    torch.manual_seed(0)
    if architecture.endswith("QuestionAnswering"):
        num_labels = 2  # the start and end scores
    config = transformers.BertConfig(
        **SIZES, hidden_act="gelu", num_labels=num_labels, attn_implementation="eager"
    )
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and biases, so that a swapped tensor shows
        for pname, p in model.named_parameters():
            if "LayerNorm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / name
    model.save_pretrained(out)
    if not safe:  # the older release layout (transformers 5 writes safetensors only)
        os.remove(out / "model.safetensors")
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    tokenizer = transformers.BertTokenizer(_vocab(tmp_path / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(out)  # transformers 5 writes tokenizer.json, no vocab.txt
    return str(out), model


def _mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.mark.parametrize("architecture", ARCHS)
def test_hugging_face_round_trip(tmp_path, architecture):
    hf_dir, hf_model = _hf_dir(tmp_path, architecture)
    reference = hf_reference.torch_outputs(hf_model, architecture, SIZES["vocab_size"])
    mesh = _mesh()
    loaded = convert.load_pretrained(
        f"hf:{hf_dir}", architecture, mesh=mesh, num_labels=3, scratch_dir=str(tmp_path / "s")
    )
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    assert loaded.config.hidden_size == SIZES["hidden_size"]
    # Placed in the mesh's shardings: an FSDP/tensor-split kernel is spread, not whole anywhere.
    enc = loaded.params if architecture == "BertModel" else loaded.params["bert"]
    kernel = enc["encoder"]["layer"]["intermediate"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape
    assert kernel.addressable_shards[0].data.shape != kernel.shape
    hf_reference.assert_same(
        hf_reference.jax_outputs(loaded.config, architecture, loaded.params), reference
    )

    exported = tmp_path / "exported"
    # A multiple-choice head holds a one-label classifier's tensors: it is named.
    named = architecture if architecture.endswith("MultipleChoice") else None
    written = convert.export_hf(
        jax.device_get(loaded.params), loaded.config, loaded.tokenizer, str(exported), 3, named
    )
    assert written == architecture
    reloaded = getattr(transformers, architecture).from_pretrained(
        exported, attn_implementation="eager"
    )
    hf_reference.assert_same(
        hf_reference.torch_outputs(reloaded.eval(), architecture, SIZES["vocab_size"]), reference
    )
    # Export then import is bitwise identical.
    again = convert.load_pretrained(f"hf:{exported}", architecture, mesh=mesh, num_labels=3)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        jax.device_get(loaded.params),
        jax.device_get(again.params),
    )
    # The exported tensors are the original ones, bit for bit.
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, value in load_file(str(exported / "model.safetensors")).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_question_answering_loss_equals_transformers(tmp_path):
    """The span loss of `objectives.QUESTION_ANSWERING` on imported weights is the loss
    `transformers`' BertForQuestionAnswering computes for the same start and end positions."""
    from bert_jax import objectives

    hf_dir, hf_model = _hf_dir(tmp_path, "BertForQuestionAnswering")
    ids, mask, segments, _ = hf_reference.padded_batch(SIZES["vocab_size"])
    starts, ends = np.array([3, 0, 1], np.int32), np.array([5, 0, 2], np.int32)
    with torch.no_grad():
        expected = hf_model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(segments, dtype=torch.long),
            start_positions=torch.tensor(starts, dtype=torch.long),
            end_positions=torch.tensor(ends, dtype=torch.long),
        ).loss.item()
    loaded = convert.load_pretrained(f"hf:{hf_dir}", "BertForQuestionAnswering", mesh=_mesh())
    graphdef, _ = models.split_params(
        models.abstract_model(loaded.config, models.BertForQuestionAnswering)
    )
    model = models.merge_params(graphdef, jax.device_get(loaded.params))
    batch = dict(
        input_ids=ids, input_mask=mask, segment_ids=segments, start_positions=starts,
        end_positions=ends,
    )  # fmt: skip
    loss, sums = objectives.QUESTION_ANSWERING.loss(model, batch, None, True)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(sums["count"]) == 3


def test_pytorch_bin_and_prefix_mismatches(tmp_path):
    bin_dir, _ = _hf_dir(tmp_path, "BertModel", safe=False, name="bin")
    assert os.path.isfile(os.path.join(bin_dir, "pytorch_model.bin"))
    safe_dir, _ = _hf_dir(tmp_path, "BertModel", name="safe")
    mesh = _mesh()
    # A bare encoder (no `bert.` prefix) into a model with heads: the heads are reported.
    from_bin = convert.load_pretrained(f"hf:{bin_dir}", "BertForSequenceClassification", mesh=mesh)
    assert from_bin.report.missing == ["classifier/kernel", "classifier/bias"]
    arch = "BertForSequenceClassification"
    from_safe = convert.load_pretrained(f"hf:{safe_dir}", arch, mesh=mesh)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        from_bin.params,
        from_safe.params,
    )
    # Pretraining heads into a bare encoder: the unused tensors are named.
    pre_dir, _ = _hf_dir(tmp_path, "BertForPreTraining", name="pre")
    bare = convert.load_pretrained(f"hf:{pre_dir}", "BertModel", mesh=mesh)
    assert bare.report.missing == []
    assert "cls.seq_relationship.weight" in bare.report.unexpected
    assert "cls.predictions.transform.dense.weight" in bare.report.unexpected


def test_tokenizer_matches_transformers(tmp_path):
    hf_dir, _ = _hf_dir(tmp_path, "BertModel")
    loaded = convert.load_pretrained(f"hf:{hf_dir}", "BertModel", mesh=_mesh())
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = ["The cat sat on the mat.", "Unbelievable RUNS, running ok", "xyz the, Café cat"]
    for text in texts:
        ref = reference(text)["input_ids"]
        ours = loaded.tokenizer.encode(text)
        assert [loaded.tokenizer.cls_id, *ours, loaded.tokenizer.sep_id] == ref, text


def test_tf_fixture_reads_the_values_tensorflow_wrote():
    ckpt = TFCheckpoint(TF_FIXTURE)
    values = make_tf_checkpoint.fixture_values()
    assert "global_step" in ckpt.names()
    for name, value in values.items():
        read = ckpt.read(name)
        assert read.dtype == np.float32
        np.testing.assert_array_equal(read, value, err_msg=name)


def _tf_reference_model(values, config_dict):
    """A transformers BertForPreTraining holding the TF variables, mapped by google-research's
    naming in this test (kernels are [in, out] in TF, [out, in] in PyTorch)."""
    config = transformers.BertConfig(**config_dict, attn_implementation="eager")
    model = transformers.BertForPreTraining(config).eval()
    state = model.state_dict()
    for name, value in values.items():
        key = (
            name.replace("/", ".")
            .replace("layer_", "layer.")
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias")
            .replace(".kernel", ".weight")
        )
        if key.endswith("_embeddings"):
            key += ".weight"
        key = {
            "cls.seq_relationship.output_weights": "cls.seq_relationship.weight",
            "cls.seq_relationship.output_bias": "cls.seq_relationship.bias",
            "cls.predictions.output_bias": "cls.predictions.bias",
        }.get(key, key)
        tensor = torch.tensor(value.T if name.endswith("kernel") else value)
        assert state[key].shape == tensor.shape, key
        state[key] = tensor
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def _check_tf_import(directory, mesh):
    loaded = convert.load_pretrained(f"tf:{directory}", "BertForPreTraining", mesh=mesh)
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    hf = _tf_reference_model(make_tf_checkpoint.fixture_values(), make_tf_checkpoint.CONFIG)
    ids, mask, segments, positions = hf_reference.padded_batch(SIZES["vocab_size"])
    ids = ids % make_tf_checkpoint.CONFIG["vocab_size"]
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(segments, dtype=torch.long),
        )
    graphdef, _ = models.split_params(models.abstract_model(loaded.config))
    model = models.merge_params(graphdef, jax.tree.map(jnp.asarray, jax.device_get(loaded.params)))
    out = model(ids, mask, segments, positions)
    ref_mlm = np.take_along_axis(ref.prediction_logits.numpy(), positions[..., None], axis=1)
    np.testing.assert_allclose(out.mlm_logits, ref_mlm, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.nsp_logits, ref.seq_relationship_logits.numpy(), atol=1e-5)
    assert loaded.tokenizer.vocab_size == make_tf_checkpoint.CONFIG["vocab_size"]


def test_tf_checkpoint_imports_with_the_same_outputs():
    _check_tf_import(TF_FIXTURE, _mesh())


def test_command_line_import_export(tmp_path):
    hf_dir, hf_model = _hf_dir(tmp_path, "BertForPreTraining")
    work, out = tmp_path / "work", tmp_path / "out"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    for args in (["import-hf", hf_dir, str(work)], ["export-hf", str(work), str(out)]):
        subprocess.run(
            [sys.executable, "-m", "bert_jax.convert", *args], check=True, cwd=ROOT, env=env
        )
    assert os.path.isdir(work / "checkpoints" / "0") and (work / "vocab.txt").is_file()
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    reloaded = transformers.BertForPreTraining.from_pretrained(out, attn_implementation="eager")
    hf_reference.assert_same(
        hf_reference.torch_outputs(reloaded.eval(), "BertForPreTraining", SIZES["vocab_size"]),
        hf_reference.torch_outputs(hf_model, "BertForPreTraining", SIZES["vocab_size"]),
    )
    # A bert_jax workdir fills a classifier's encoder; the new head is reported missing.
    loaded = convert.load_pretrained(str(work), "BertForSequenceClassification", mesh=_mesh())
    assert loaded.report.missing == ["classifier"]
    np.testing.assert_array_equal(
        np.asarray(loaded.params["bert"]["pooler"]["kernel"]),
        original["bert.pooler.dense.weight"].T,
    )


def test_bad_inputs_name_the_problem(tmp_path):
    mesh = _mesh()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.load_pretrained(f"hf:{empty}", "BertModel", mesh=mesh)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_pretrained(f"hf:{tmp_path / 'nowhere'}", "BertModel", mesh=mesh)

    hf_dir, _ = _hf_dir(tmp_path, "BertModel")
    config_file = os.path.join(hf_dir, "config.json")
    original_config = json.load(open(config_file))
    json.dump({**original_config, "model_type": "deberta-v2"}, open(config_file, "w"))
    with pytest.raises(ValueError, match=r"config.json describes a 'deberta-v2' model"):
        convert.load_pretrained(f"hf:{hf_dir}", "BertModel", mesh=mesh)
    json.dump({**original_config, "intermediate_size": 48}, open(config_file, "w"))
    with pytest.raises(ValueError, match=r"tensor .*intermediate.dense.weight has shape"):
        convert.load_pretrained(f"hf:{hf_dir}", "BertModel", mesh=mesh)
    json.dump({**original_config, "vocab_size": 40}, open(config_file, "w"))
    with pytest.raises(ValueError, match="word_embeddings"):
        convert.load_pretrained(f"hf:{hf_dir}", "BertModel", mesh=mesh)
    json.dump(original_config, open(config_file, "w"))
    big = _vocab(tmp_path / "big_vocab.txt", size=SIZES["vocab_size"] + 5)
    os.replace(big, os.path.join(hf_dir, "vocab.txt"))
    with pytest.raises(ValueError, match=r"vocab.txt has 65 tokens but the word embedding"):
        convert.load_pretrained(f"hf:{hf_dir}", "BertModel", mesh=mesh)
    os.remove(os.path.join(hf_dir, "vocab.txt"))

    weights = os.path.join(hf_dir, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors"):
        convert.load_pretrained(f"hf:{hf_dir}", "BertModel", mesh=mesh)

    # A truncated TF data file: the variable and the file are named.
    tf_dir = tmp_path / "tf"
    tf_dir.mkdir()
    for name in os.listdir(TF_FIXTURE):
        blob = open(os.path.join(TF_FIXTURE, name), "rb").read()
        if name.endswith("00001"):
            blob = blob[:1000]
        (tf_dir / name).write_bytes(blob)
    with pytest.raises(ValueError, match=r"data-00000-of-00001 is truncated: variable"):
        convert.load_pretrained(f"tf:{tf_dir}", "BertModel", mesh=mesh)
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint"):
        convert.load_pretrained(f"tf:{empty}", "BertModel", mesh=mesh)


@pytest.mark.slow
def test_train_starts_from_hugging_face_weights(tmp_path):
    """train.py --config.init_from=hf:DIR: the imported weights and vocabulary are used (with a
    vanishing learning rate they come out unchanged through export)."""
    hf_dir, _ = _hf_dir(tmp_path, "BertForPreTraining")
    workdir = tmp_path / "run"
    args = (
        f"--config.init_from=hf:{hf_dir}",
        "--config.optim.learning_rate=1e-30",
        "--config.train.checkpoint_every=2",
        "--config.data.max_seq_length=24",
    )
    cli.run_train(tmp_path, workdir, 2, *args)
    # The same command again resumes (the imported model, not the configured one, is what
    # the checkpoint is compared with).
    assert "resumed from step 2" in cli.run_train(tmp_path, workdir, 2, *args).stdout
    saved = json.load(open(workdir / "config.json"))
    assert saved["model"]["hidden_size"] == SIZES["hidden_size"]
    assert (workdir / "vocab.txt").read_text() == (tmp_path / "vocab.txt").read_text()
    out = tmp_path / "exported"
    subprocess.run(
        [sys.executable, "-m", "bert_jax.convert", "export-hf", str(workdir), str(out)],
        check=True,
        cwd=ROOT,
        env=cli.train_env(1),
    )
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, value in load_file(str(out / "model.safetensors")).items():
        # Two steps of size ~1e-30 move zeros (the [PAD] embedding row) to ~1e-31, nothing more.
        np.testing.assert_allclose(value, original[name], atol=1e-20, rtol=1e-7, err_msg=name)
