"""ModernBERT: every head against `transformers`' ModernBert* built from a config, imported and
exported, on padded batches longer than the local window; packed rows against each example
alone (in bert_jax and in `transformers`); its tokenizer (a byte-level BPE with [CLS]/[SEP]
templates, as ModernBERT's tokenizer.json) against `transformers`' on multilingual text."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as token_models

from bert_jax import convert, models, sharding
from bert_jax.data import encoding, tokenization

sys.path.insert(0, os.path.dirname(__file__))
import hf_reference  # noqa: E402
from test_families import CORPUS, TEXTS  # noqa: E402

SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForMultipleChoice",
    "ForQuestionAnswering",
)


def _save_tokenizer(texts, root, vocab_size=400):
    """A byte-level BPE learned by `tokenizers` on `texts` with ModernBERT's special tokens and
    its `[CLS] A [SEP] B [SEP]` template, saved by `transformers`' PreTrainedTokenizerFast as
    ModernBERT's tokenizer is."""
    tok = Tokenizer(token_models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{f"{name}_token": f"[{name.upper()}]" for name in ("unk", "cls", "sep", "pad", "mask")},
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(root)
    return fast


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("modernbert_tokenizer")
    _save_tokenizer(CORPUS, root)
    return root


def test_tokenizer_matches_transformers_on_multilingual_text(tokenizer_dir):
    ref = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = tokenization.HFTokenizer(str(tokenizer_dir / "tokenizer.json"))
    assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.mask_id, ours.unk_id) == tuple(
        ref.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")
    )
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    for a, b in zip(TEXTS, TEXTS[1:], strict=False):
        ids, _ = encoding.pair_tokens(ours.encode(a), ours.encode(b), ours, 128)
        assert ids == ref(a, b)["input_ids"], (a, b)
    for (ids, offsets), text in zip(ours.encode_offsets(TEXTS), TEXTS, strict=True):
        want = ref(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == want["input_ids"] and offsets == [tuple(o) for o in want["offset_mapping"]]


def _hf_config(vocab_size: int, pad_id: int, head: str, **kw) -> transformers.ModernBertConfig:
    """Four layers (global, local, local, global) with a window of 4 tokens, so that a row of
    10 has keys beyond the window; rotary bases other than the defaults."""
    return transformers.ModernBertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        local_attention=4,
        global_attn_every_n_layers=3,
        global_rope_theta=1000.0,
        local_rope_theta=50.0,
        pad_token_id=pad_id,
        bos_token_id=pad_id,
        eos_token_id=pad_id,
        cls_token_id=pad_id,
        sep_token_id=pad_id,
        num_labels=2 if head == "ForQuestionAnswering" else 3,
        attn_implementation="eager",
        **kw,
    )


def _hf_dir(tmp_path, head, tokenizer_dir, **kw):
    ref = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = _hf_config(len(ref), ref.pad_token_id, head, **kw)
    architecture = "ModernBert" + head
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped tensor shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / "hf"
    model.save_pretrained(out)
    ref.save_pretrained(out)
    return str(out), model, architecture


@pytest.mark.parametrize(
    "head, kw",
    [(h, {}) for h in HEADS]
    + [
        ("ForSequenceClassification", dict(classifier_pooling="mean")),
        (
            "ForMaskedLM",
            dict(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True),
        ),
    ],
)
def test_import_and_export_match_transformers(tmp_path, head, kw, tokenizer_dir):
    hf_dir, hf_model, architecture = _hf_dir(tmp_path, head, tokenizer_dir, **kw)
    vocab_size = hf_model.config.vocab_size
    reference = hf_reference.torch_outputs(hf_model, architecture, vocab_size)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    loaded = convert.load_pretrained(f"hf:{hf_dir}", architecture, mesh=mesh, num_labels=3)
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    config = loaded.config
    assert (config.model_type, config.local_attention, config.global_layers()) == (
        "modernbert",
        4,
        (True, False, False, True),
    )
    assert isinstance(loaded.tokenizer, tokenization.HFTokenizer)
    hf_reference.assert_same(
        hf_reference.jax_outputs(
            config, architecture, loaded.params, pad_id=loaded.tokenizer.pad_id
        ),
        reference,
    )

    exported = tmp_path / "exported"
    named = architecture if head in ("ForMultipleChoice", "ForQuestionAnswering") else None
    written = convert.export_hf(
        jax.device_get(loaded.params), config, loaded.tokenizer, str(exported), 3, named
    )
    assert written == architecture
    assert json.loads((exported / "config.json").read_text())["model_type"] == "modernbert"
    reloaded = getattr(transformers, architecture).from_pretrained(
        exported, attn_implementation="eager"
    )
    hf_reference.assert_same(
        hf_reference.torch_outputs(reloaded.eval(), architecture, vocab_size), reference
    )
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    saved = load_file(str(exported / "model.safetensors"))
    assert sorted(saved) == sorted(original)
    for name, value in saved.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def _pack(pieces: list[list[int]], width: int, pad_id: int):
    """Examples laid end to end in rows of `width` (two per row here), with the ids, positions
    and [CLS] places of `models.Packing`."""
    rows = [pieces[i : i + 2] for i in range(0, len(pieces), 2)]
    ids = np.full((len(rows), width), pad_id, np.int32)
    example_ids = np.zeros((len(rows), width), np.int32)
    positions = np.zeros((len(rows), width), np.int32)
    cls = np.zeros((len(rows), 2), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for k, piece in enumerate(row):
            end = start + len(piece)
            ids[r, start:end] = piece
            example_ids[r, start:end] = k + 1
            positions[r, start:end] = np.arange(len(piece))
            cls[r, k] = start
            start = end
    return ids, example_ids, positions, cls


def test_packed_rows_equal_each_example_alone(tmp_path, tokenizer_dir):
    """Multilingual examples longer than the local window, packed two to a row: each
    example's hidden states (every layer) and pooled output equal the example run alone,
    by bert_jax and by `transformers`: no token attends across examples, and rotary positions
    restart at each example's first token."""
    hf_dir, hf_model, architecture = _hf_dir(
        tmp_path, "ForSequenceClassification", tokenizer_dir, classifier_pooling="mean"
    )
    mesh = sharding.make_mesh(sharding.MeshConfig())
    loaded = convert.load_pretrained(f"hf:{hf_dir}", architecture, mesh=mesh, num_labels=3)
    tok = loaded.tokenizer
    pieces = [encoding.pair_tokens(tok.encode(t), None, tok, 40)[0] for t in TEXTS[:6]]
    assert min(len(p) for p in pieces) > loaded.config.local_attention
    ids, example_ids, positions, cls = _pack(pieces, 64, tok.pad_id)
    packing = models.Packing(*(jnp.asarray(a) for a in (example_ids, positions, cls)))
    graphdef, _ = models.split_params(
        models.abstract_model(loaded.config, convert.model_class(architecture, 3))
    )
    model = models.merge_params(graphdef, loaded.params)
    mask = (example_ids > 0).astype(np.int32)
    logits, enc = model(ids, mask, np.zeros_like(ids), packing=packing, output_hidden_states=True)
    for i, piece in enumerate(pieces):
        row, k = divmod(i, 2)
        start = cls[row, k]
        alone = torch.tensor([piece])
        with torch.no_grad():
            out = hf_model(alone, output_hidden_states=True)
        want = np.stack([h[0].numpy() for h in out.hidden_states])
        got = np.asarray(enc.hidden_states[:, row, start : start + len(piece)])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"example {i}")
        np.testing.assert_allclose(
            np.asarray(logits[row, k]), out.logits[0].numpy(), atol=1e-5, rtol=0
        )
        single, single_enc = model(
            np.array([piece]), np.ones((1, len(piece)), np.int32), np.zeros((1, len(piece)), int)
        )
        np.testing.assert_allclose(np.asarray(single[0]), np.asarray(logits[row, k]), atol=1e-5)


@pytest.mark.parametrize("name, layers, published", [("base", 22, 149e6), ("large", 28, 395e6)])
def test_released_sizes_have_the_reference_parameter_counts(name, layers, published):
    hf = dict(
        base=dict(), large=dict(hidden_size=1024, intermediate_size=2624, num_attention_heads=16)
    )
    with torch.device("meta"):
        reference = transformers.ModernBertModel(
            transformers.ModernBertConfig(num_hidden_layers=layers, **hf[name])
        )
    config = models.BertConfig.named(f"modernbert_{name}")
    # bert_jax keeps the first layer's identity norm as a row of ones in the stack.
    first_norm = config.hidden_size
    count = sum(p.numel() for p in reference.parameters())
    assert models.count_params(config) - first_norm == count
    assert abs(count - published) / published < 0.01  # Warner et al.: 149M and 395M


def test_a_config_that_disagrees_with_the_weights_is_refused(tmp_path, tokenizer_dir):
    hf_dir, _, architecture = _hf_dir(tmp_path, "Model", tokenizer_dir)
    with pytest.raises(ValueError, match="num_hidden_layers=3 but .* holds 4 layers"):
        convert.load_pretrained(
            f"hf:{hf_dir}",
            architecture,
            mesh=sharding.make_mesh(sharding.MeshConfig()),
            num_hidden_layers=3,
        )


def test_splash_kernel_with_local_masks_equals_xla_attention():
    """The splash kernel (interpreted here; Mosaic's on TPU) with its local mask in the local
    layers and segment ids for packing gives XLA's attention, at length 128 with a window of
    16, padded and packed."""
    config = models.BertConfig(
        model_type="modernbert",
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        type_vocab_size=1,
        local_attention=16,
        global_attn_every_n_layers=2,
        use_bias=False,
    )
    graphdef, params = models.split_params(models.create_model(config, 0, models.ModernBertModel))
    splash = dataclasses.replace(config, attention_kernel="splash")
    splash_graphdef, _ = models.split_params(models.abstract_model(splash, models.ModernBertModel))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, (2, 128)).astype(np.int32)
    mask = (np.arange(128)[None] < np.array([[128], [90]])).astype(np.int32)
    example_ids = np.where(np.arange(128)[None] < 50, 1, 2) * mask
    positions = np.where(np.arange(128)[None] < 50, np.arange(128), np.arange(128) - 50) * mask
    packing = models.Packing(
        jnp.asarray(example_ids), jnp.asarray(positions), jnp.asarray([[0, 50], [0, 50]])
    )
    for pack in (None, packing):
        outputs = [
            models.merge_params(g, params)(ids, mask, np.zeros_like(ids), packing=pack)
            for g in (graphdef, splash_graphdef)
        ]
        want, got = (np.asarray(o.sequence_output) * mask[..., None] for o in outputs)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_a_modernbert_fine_tunes_on_pairs_and_its_run_exports_to_transformers(tmp_path):
    """finetune.py from a released-layout ModernBERT (random weights, its kind of tokenizer):
    a pair task the text decides is learned, and the fine-tuned run exports to a directory
    whose `transformers` ModernBertForSequenceClassification gives the same dev accuracy."""
    rows = hf_reference.write_pair_task(tmp_path)
    model_dir = tmp_path / "modernbert"
    tokenizer = _save_tokenizer([t for r in rows for t in r[3:]], model_dir, vocab_size=300)
    config = _hf_config(len(tokenizer), tokenizer.pad_token_id, "ForSequenceClassification")
    config.update(dict(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_labels=2))
    torch.manual_seed(0)
    transformers.ModernBertModel(config).save_pretrained(model_dir)
    hf_reference.fine_tune_and_compare(
        tmp_path, model_dir, rows, "ModernBertForSequenceClassification"
    )
