"""ALBERT: factorized embeddings, cross-layer sharing and SOP, against `transformers`' ALBERT
built from a config, and the parameter counts of the paper."""

import json
import os

import cli
import glue_data
import hf_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from bert_jax import axes, convert, losses, models, optim, sharding, training
from bert_jax.data import pretraining_data, tokenization

SIZES = dict(
    vocab_size=64,
    embedding_size=16,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=24,
)
ARCHS = (
    "AlbertModel",
    "AlbertForPreTraining",
    "AlbertForMaskedLM",
    "AlbertForSequenceClassification",
    "AlbertForTokenClassification",
    "AlbertForMultipleChoice",
    "AlbertForQuestionAnswering",
)


def _spm(tmp_path) -> str:
    words = [f"tok{i} word{i % 7} thing{i % 3}" for i in range(300)]
    path = str(tmp_path / "spiece.model")
    tokenization.train_sentencepiece(words, path, vocab_size=SIZES["vocab_size"])
    return path


def _hf_dir(tmp_path, architecture, groups=(1, 1), **sizes):
    torch.manual_seed(0)
    config = transformers.AlbertConfig(
        **{**SIZES, **sizes},
        num_hidden_groups=groups[0],
        inner_group_num=groups[1],
        hidden_act="gelu_new",
        # HF's SOP head is sized by num_labels too: 2 except for the classifier.
        num_labels=3 if architecture.endswith("Classification") else 2,
        attn_implementation="eager",
    )
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / f"{architecture}_{groups[0]}_{groups[1]}"
    model.save_pretrained(out)
    os.replace(_spm(tmp_path), out / "spiece.model")
    return str(out), model


@pytest.mark.parametrize(
    "architecture, groups",
    [(a, (1, 1)) for a in ARCHS] + [("AlbertForPreTraining", (2, 2))],
)
def test_hugging_face_albert_round_trip(tmp_path, architecture, groups):
    hf_dir, hf_model = _hf_dir(tmp_path, architecture, groups)
    reference = hf_reference.torch_outputs(hf_model, architecture, SIZES["vocab_size"])
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    loaded = convert.load_pretrained(f"hf:{hf_dir}", architecture, mesh=mesh, num_labels=3)
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    assert loaded.config.share_layers == "all" and loaded.config.embed_dim == 16
    assert isinstance(loaded.tokenizer, tokenization.SentencePieceTokenizer)
    hf_reference.assert_same(
        hf_reference.jax_outputs(loaded.config, architecture, loaded.params), reference
    )

    exported = tmp_path / "exported"
    assert (
        convert.export_hf(
            jax.device_get(loaded.params),
            loaded.config,
            loaded.tokenizer,
            str(exported),
            3,
            architecture if architecture.endswith("MultipleChoice") else None,
        )
        == architecture
    )
    reloaded = getattr(transformers, architecture).from_pretrained(
        exported, attn_implementation="eager"
    )
    hf_reference.assert_same(
        hf_reference.torch_outputs(reloaded.eval(), architecture, SIZES["vocab_size"]), reference
    )
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, value in load_file(str(exported / "model.safetensors")).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


@pytest.mark.parametrize(
    "name, published",
    [
        ("albert_base", 12e6),
        ("albert_large", 18e6),
        ("albert_xlarge", 60e6),
        ("albert_xxlarge", 235e6),
    ],
)
def test_parameter_counts_match_the_paper(name, published):
    config = models.BertConfig.named(name)
    counted = models.count_params(config)
    hf_config = transformers.AlbertConfig(
        vocab_size=30000,
        embedding_size=128,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
    )
    with torch.device("meta"):
        reference = transformers.AlbertModel(hf_config)
    assert counted == sum(p.numel() for p in reference.parameters())
    # The paper rounds to the million: base 11.7M -> 12M, large 17.7M -> 18M, xlarge
    # 58.7M -> 60M (within 3.5%). Its xxlarge figure, 235M, is 5.6% above the exact 222.6M
    # that the reference implementation counts too (the released model has 223M), so xxlarge
    # is held to the reference count above and to 6% of the paper.
    tolerance = 0.06 if name == "albert_xxlarge" else 0.035
    assert abs(counted - published) / published < tolerance, counted


def test_sharing_saves_parameters_not_depth():
    base = dict(vocab_size=100, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    all4 = models.count_params(models.BertConfig(num_hidden_layers=4, share_layers="all", **base))
    all8 = models.count_params(models.BertConfig(num_hidden_layers=8, share_layers="all", **base))
    assert all4 == all8
    none4 = models.count_params(models.BertConfig(num_hidden_layers=4, **base))
    attention = 4 * (32 * 32 + 32) + 2 * 32  # q, k, v, output and their LayerNorm
    ffn = 32 * 64 + 64 + 64 * 32 + 32 + 2 * 32
    assert none4 - all4 == 3 * (attention + ffn)
    attn4 = models.count_params(
        models.BertConfig(num_hidden_layers=4, share_layers="attention", **base)
    )
    ffn4 = models.count_params(models.BertConfig(num_hidden_layers=4, share_layers="ffn", **base))
    assert none4 - attn4 == 3 * attention and none4 - ffn4 == 3 * ffn
    # A shared model computes what an unshared one does whose layers hold equal copies.
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 100, (2, 8)), jnp.int32)
    mask, segments, positions = jnp.ones_like(ids), jnp.zeros_like(ids), ids[:, :3] % 8
    plain = models.BertConfig(num_hidden_layers=4, **base)
    graphdef, _ = models.split_params(models.abstract_model(plain))
    for share in ("attention", "ffn", "all"):
        config = models.BertConfig(num_hidden_layers=4, share_layers=share, **base)
        model = models.create_model(config)
        _, params = models.split_params(model)
        copies = jax.tree.map(
            lambda w: jnp.repeat(w, 4, axis=0) if w.shape[0] == 1 else w,
            params["bert"]["encoder"]["layer"],
        )
        unshared = {**params, "bert": {**params["bert"], "encoder": {"layer": copies}}}
        ours = model(ids, mask, segments, positions, output_hidden_states=True)
        ref = models.merge_params(graphdef, unshared)(
            ids, mask, segments, positions, output_hidden_states=True
        )
        np.testing.assert_allclose(ours.mlm_logits, ref.mlm_logits, atol=1e-5, rtol=0)
        assert ours.encoder.hidden_states.shape == (5, 2, 8, 32)


def test_bad_albert_configs_are_refused():
    with pytest.raises(ValueError, match="embedding_size=256 is larger than hidden_size=128"):
        models.BertConfig(hidden_size=128, num_attention_heads=2, embedding_size=256)
    with pytest.raises(ValueError, match="num_hidden_groups=5 must be positive and divide"):
        models.BertConfig(num_hidden_layers=12, num_hidden_groups=5, share_layers="all")
    with pytest.raises(ValueError, match="set share_layers='all'"):
        models.BertConfig(num_hidden_groups=2)
    with pytest.raises(ValueError, match="share_layers='some'"):
        models.BertConfig(share_layers="some")
    partial = models.BertConfig(
        num_hidden_layers=2,
        share_layers="ffn",
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
    )
    with pytest.raises(ValueError, match="has no Hugging Face layout"):
        convert.config_to_hf(partial, "BertModel")


def _ordered_documents(rng, n_docs, pools=24, per_pool=4, sentences=6):
    """Documents whose order is visible in the words: sentence j of a document draws its
    tokens from pool `start + j` (a random start per document), so which segment comes first
    can be told from the two segments' pools, but not from either alone."""
    docs = []
    for _ in range(n_docs):
        start = int(rng.integers(0, pools - sentences))
        docs.append(
            [
                list(
                    5 + (start + j) * per_pool + rng.integers(0, per_pool, int(rng.integers(3, 6)))
                )
                for j in range(sentences)
            ]
        )
    return docs, 5 + pools * per_pool


def test_sop_is_learned_on_held_out_documents():
    """The SOP pairs (A, B consecutive; swapped half the time with label 1), the SOP head and
    loss together learn sentence order, and it carries to documents never trained on."""
    rng = np.random.default_rng(0)
    train_docs, vocab = _ordered_documents(rng, 300)
    held_docs, _ = _ordered_documents(rng, 60)
    masking = pretraining_data.MaskingConfig(
        max_seq_length=32, max_predictions_per_seq=4, next_sentence="sop", dupe_factor=4
    )
    ids = pretraining_data.SpecialIds(cls_id=2, sep_id=3, mask_id=4, vocab_size=vocab)
    train = pretraining_data.create_instances(train_docs, masking, ids, seed=1)
    held = pretraining_data.create_instances(held_docs, masking, ids, seed=2)
    assert 0.4 < train["next_sentence_labels"].mean() < 0.6  # half of the pairs are swapped
    config = models.BertConfig.named(
        "albert_base",
        vocab_size=vocab,
        embedding_size=16,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    steps = 400
    trainer = training.create_trainer(
        config,
        optim.OptimConfig(learning_rate=3e-3, warmup_steps=20, total_steps=steps),
        mesh,
        axes.DEFAULT_RULES,
    )

    def held_out_sop_accuracy(params):
        sums = trainer.eval_step(params, {k: jnp.asarray(v) for k, v in held.items()})
        return losses.summarize(sums)["nsp_accuracy"]

    state = trainer.init(0)
    before = held_out_sop_accuracy(state.params)
    order = np.random.default_rng(3).permutation(np.arange(steps * 32) % len(train["input_ids"]))
    for step in range(steps):
        rows = order[step * 32 : (step + 1) * 32]
        state, _ = trainer.train_step(state, {k: jnp.asarray(v[rows]) for k, v in train.items()})
    after = held_out_sop_accuracy(state.params)
    n = len(held["input_ids"])
    assert abs(before - 0.5) < 0.15, before
    # Chance is 50%; 3 standard deviations of a coin over n pairs is 1.5 / sqrt(n) (< 0.1).
    assert after > 0.85, (before, after, n)


@pytest.mark.slow
def test_train_py_pretrains_albert_with_sop_and_resumes(tmp_path):
    """configs/albert_base.py:tiny: SentencePiece, n-gram masking, SOP, one shared layer."""
    workdir = tmp_path / "albert"
    extra = ("--config.data.vocab_size=200", "--config.model.vocab_size=200")
    cli.run_train(tmp_path, workdir, 20, *extra, config="configs/albert_base.py:tiny")
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["next_sentence"] == "sop" and saved["model"]["share_layers"] == "all"
    assert (workdir / "spm.model").is_file()
    cli.run_train(tmp_path, workdir, 30, *extra, config="configs/albert_base.py:tiny")
    summary = cli.read_summary(workdir)
    assert summary["steps_this_run"] == 10 and summary["steps"] == 30
    assert {"mlm_loss", "nsp_loss", "nsp_accuracy"} <= set(summary["eval"])
    # One set of layer weights in the checkpoint, whatever the depth.
    work = convert.read_run(str(workdir))
    assert work["config"].num_weight_sets == 1 and work["step"] == 30


def test_glue_fine_tuning_with_an_albert_encoder_learns_a_task(tmp_path):
    import finetune  # the entry point: glue_data puts the repository on sys.path

    # Wider than SIZES: at hidden size 32 a random ALBERT learns this too slowly for a test.
    hf_dir, _ = _hf_dir(
        tmp_path, "AlbertModel", hidden_size=64, intermediate_size=128, num_attention_heads=2
    )
    # SST-2 rows whose label is which of two words of the SentencePiece vocabulary they hold.
    rng = np.random.default_rng(1)
    rows = []
    for i in range(600):
        words = [f"tok{j}" for j in rng.integers(0, 300, size=3)]  # within 24 pieces
        words.insert(int(rng.integers(0, 4)), "word" if i % 2 else "thing")
        rows.append([" ".join(words), str(i % 2)])
    glue = tmp_path / "glue" / "SST-2"
    glue_data.write_tsv(glue / "train.tsv", ["sentence", "label"], rows[:480])
    glue_data.write_tsv(glue / "dev.tsv", ["sentence", "label"], rows[480:])
    glue_data.write_tsv(glue / "test.tsv", ["index", "sentence"], [["0", "tok1 word"]])
    cfg = glue_data.finetune_config(
        init_from=f"hf:{hf_dir}",
        data_dir=str(tmp_path / "glue"),
        max_seq_length=24,
        num_epochs=3.0,
        batch_size=16,
        learning_rates=(1e-3,),
    )
    mesh = sharding.make_mesh(cfg.mesh)
    result = finetune.finetune_task(cfg, "sst2", mesh, str(tmp_path / "work"))
    (run,) = result["runs"]
    assert run["dev"]["dev"]["accuracy"] >= 0.95, run["history"]
    saved = convert.read_run(run["directory"])
    assert saved["config"].share_layers == "all"
    assert isinstance(saved["tokenizer"], tokenization.SentencePieceTokenizer)
    assert open(run["predictions"]["test"]).read().splitlines() == ["index\tprediction", "0\t1"]


def test_head_mask_reaches_the_inner_layers_of_albert_groups():
    config = models.BertConfig.named(
        "albert_base", **SIZES, num_hidden_groups=2, inner_group_num=2, share_layers="all"
    )
    graphdef, params = models.split_params(models.create_model(config, 0, models.BertModel))
    ids, mask, segments, _ = hf_reference.padded_batch(SIZES["vocab_size"])
    model = models.merge_params(graphdef, params)
    plain = model(ids, mask, segments).sequence_output
    ones = model(ids, mask, segments, head_mask=np.ones((4, 4), np.float32)).sequence_output
    np.testing.assert_allclose(ones, plain, atol=1e-6)
    last = np.ones((4, 4), np.float32)
    last[3] = 0.0  # the last layer's heads, in both of its inner layers
    masked = model(ids, mask, segments, head_mask=last).sequence_output
    assert np.abs(np.asarray(masked - plain)).max() > 1e-3
