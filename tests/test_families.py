"""RoBERTa and XLM-RoBERTa: every head against `transformers` built from a config, import and
export; their tokenizers (byte-level BPE, XLM-R's SentencePiece) against `transformers`' and
`sentencepiece`'s own, on multilingual text."""

import io
import json
import os
import sys

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import ByteLevelBPETokenizer

from bert_jax import convert, sharding
from bert_jax.data import encoding, tokenization

sys.path.insert(0, os.path.dirname(__file__))
import hf_reference  # noqa: E402

TEXTS = [
    "The cat sat on the mat, didn't it?",
    "Der Hund läuft schnell über die Straße.",
    "Le café est très chaud ce matin.",
    "Кошка спит на диване весь день.",
    "我喜欢在公园里散步。",
    "القطة تنام على الأريكة",
    "Naïve résumé: 42 emoji 🙂 and ñ in São Paulo",
    "  leading   spaces and\ttabs  ",
]
CORPUS = TEXTS * 20 + ["hello world " * 3, "running runs ran the quick brown fox"] * 10
SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForMultipleChoice",
    "ForQuestionAnswering",
)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE learned by `tokenizers`, saved as `transformers`' RobertaTokenizer
    saves a released one (tokenizer.json), with the vocab.json + merges.txt it came from."""
    root = tmp_path_factory.mktemp("bpe")
    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=specials)
    bpe.save_model(str(root))
    transformers.RobertaTokenizer.from_pretrained(str(root)).save_pretrained(root / "hf")
    return root


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A SentencePiece model as XLM-R's (`sentencepiece.bpe.model`), and `transformers`'
    XLMRobertaTokenizer of it saved (tokenizer.json, fairseq's ids)."""
    root = tmp_path_factory.mktemp("spm")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=150,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    (root / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    transformers.XLMRobertaTokenizer.from_pretrained(str(root)).save_pretrained(root / "hf")
    return root


def _reference_tokenizer(kind, bpe_dir, spm_dir, **kw):
    if kind == "roberta":
        return transformers.RobertaTokenizer.from_pretrained(str(bpe_dir), **kw)
    return transformers.XLMRobertaTokenizer.from_pretrained(str(spm_dir), **kw)


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta"])
def test_tokenizers_match_transformers_on_multilingual_text(kind, bpe_dir, spm_dir):
    ref = _reference_tokenizer(kind, bpe_dir, spm_dir)
    ours = tokenization.HFTokenizer(
        str((bpe_dir if kind == "roberta" else spm_dir) / "hf/tokenizer.json")
    )
    assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.mask_id, ours.unk_id) == tuple(
        ref.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<mask>", "<unk>")
    )
    assert ours.vocab_size == len(ref)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    # Pairs: the ids and layout transformers gives (<s> A </s></s> B </s>), through the one
    # function every task uses.
    for a, b in zip(TEXTS, TEXTS[1:], strict=False):
        ids, segments = encoding.pair_tokens(ours.encode(a), ours.encode(b), ours, 128)
        assert ids == ref(a, b)["input_ids"], (a, b)
        single, _ = encoding.pair_tokens(ours.encode(a), None, ours, 128)
        assert single == ref(a)["input_ids"]
    # Offsets (SQuAD's answer spans) as transformers reports them.
    for (ids, offsets), text in zip(ours.encode_offsets(TEXTS), TEXTS, strict=True):
        want = ref(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == want["input_ids"] and offsets == [tuple(o) for o in want["offset_mapping"]]
    # Words given apart (NER): transformers with add_prefix_space=True, is_split_into_words.
    words_ref = _reference_tokenizer(kind, bpe_dir, spm_dir, add_prefix_space=True)
    for (ids, word_ids), text in zip(ours.encode_word_ids(TEXTS), TEXTS, strict=True):
        want = words_ref(text.split(), is_split_into_words=True, add_special_tokens=False)
        assert ids == want["input_ids"] and word_ids == want.word_ids(), text


def test_xlm_r_ids_are_sentencepiece_pieces_after_fairseq_specials(spm_dir):
    """XLM-R's rule, from sentencepiece itself: <s> 0, <pad> 1, </s> 2, <unk> 3, then each
    piece at its SentencePiece id + 1 (SentencePiece's own <unk> becomes 3)."""
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "sentencepiece.bpe.model"))
    ours = tokenization.HFTokenizer(str(spm_dir / "hf/tokenizer.json"))
    for text in TEXTS:
        want = [3 if i == sp.unk_id() else i + 1 for i in sp.encode(text)]
        assert ours.encode(text) == want, text
    continuation = ours.is_continuation()
    for i in range(3, sp.get_piece_size()):
        assert continuation[i + 1] == (not sp.id_to_piece(i).startswith("\u2581"))


def _hf_dir(tmp_path, kind, head, tokenizer_dir, vocab_size):
    torch.manual_seed(0)
    cls = transformers.RobertaConfig if kind == "roberta" else transformers.XLMRobertaConfig
    config = cls(
        vocab_size=vocab_size,
        max_position_embeddings=24,
        num_labels=2 if head == "ForQuestionAnswering" else 3,
        attn_implementation="eager",
        **SIZES,
    )
    architecture = ("Roberta" if kind == "roberta" else "XLMRoberta") + head
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped tensor shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / "hf"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / "hf" / name).read_bytes())
    return str(out), model, architecture


@pytest.mark.parametrize(
    "kind, head",
    [("roberta", h) for h in HEADS] + [("xlm-roberta", "Model"), ("xlm-roberta", "ForMaskedLM")],
)
def test_import_and_export_match_transformers(tmp_path, kind, head, bpe_dir, spm_dir):
    tokenizer_dir = bpe_dir if kind == "roberta" else spm_dir
    vocab_size = len(_reference_tokenizer(kind, bpe_dir, spm_dir))
    hf_dir, hf_model, architecture = _hf_dir(tmp_path, kind, head, tokenizer_dir, vocab_size)
    reference = hf_reference.torch_outputs(hf_model, architecture, vocab_size)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    loaded = convert.load_pretrained(f"hf:{hf_dir}", architecture, mesh=mesh, num_labels=3)
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    assert loaded.config.model_type == kind and loaded.config.position_offset == 2
    assert isinstance(loaded.tokenizer, tokenization.HFTokenizer)
    hf_reference.assert_same(
        hf_reference.jax_outputs(loaded.config, architecture, loaded.params), reference
    )

    exported = tmp_path / "exported"
    named = architecture if head == "ForMultipleChoice" else None
    written = convert.export_hf(
        jax.device_get(loaded.params), loaded.config, loaded.tokenizer, str(exported), 3, named
    )
    assert written == architecture
    assert json.loads((exported / "config.json").read_text())["model_type"] == kind
    reloaded = getattr(transformers, architecture).from_pretrained(
        exported, attn_implementation="eager"
    )
    hf_reference.assert_same(
        hf_reference.torch_outputs(reloaded.eval(), architecture, vocab_size), reference
    )
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, value in load_file(str(exported / "model.safetensors")).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    # The exported tokenizer is the one transformers reads, with the same ids.
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    ref = _reference_tokenizer(kind, bpe_dir, spm_dir)
    assert tok(TEXTS[1], TEXTS[3])["input_ids"] == ref(TEXTS[1], TEXTS[3])["input_ids"]
    assert tok.mask_token_id == ref.mask_token_id and tok.pad_token_id == ref.pad_token_id


def test_a_roberta_fine_tunes_on_pairs_and_its_run_exports_to_transformers(tmp_path):
    """finetune.py from a released-layout RoBERTa (random weights, byte-level BPE): a pair
    task the text decides is learned, and the fine-tuned run exports to a directory whose
    `transformers` model gives the same dev accuracy."""
    rows = hf_reference.write_pair_task(tmp_path)
    bpe = ByteLevelBPETokenizer()
    texts = [t for r in rows for t in r[3:]]
    bpe.train_from_iterator(
        texts, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(tmp_path))
    tokenizer = transformers.RobertaTokenizer.from_pretrained(str(tmp_path))
    config = transformers.RobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=66,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    )
    torch.manual_seed(0)
    transformers.RobertaModel(config).save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    hf_reference.fine_tune_and_compare(
        tmp_path, tmp_path / "roberta", rows, "RobertaForSequenceClassification"
    )


@pytest.mark.parametrize(
    "name, reference",
    [
        (  # roberta-base's released config.json (RobertaConfig's defaults are BERT's)
            "roberta_base",
            lambda: transformers.RobertaModel(
                transformers.RobertaConfig(
                    vocab_size=50265, max_position_embeddings=514, type_vocab_size=1
                )
            ),
        ),
        (
            "xlm_roberta_large",
            lambda: transformers.XLMRobertaModel(
                transformers.XLMRobertaConfig(
                    vocab_size=250002,
                    max_position_embeddings=514,
                    type_vocab_size=1,
                    hidden_size=1024,
                    num_hidden_layers=24,
                    num_attention_heads=16,
                    intermediate_size=4096,
                )
            ),
        ),
    ],
)
def test_released_sizes_have_the_reference_parameter_counts(name, reference):
    from bert_jax import models

    with torch.device("meta"):
        model = reference()
    config = models.BertConfig.named(name)
    assert models.count_params(config) == sum(p.numel() for p in model.parameters())
    # RoBERTa-base's 125M and XLM-R large's 560M (Conneau et al., 2020), as published.
    published = {"roberta_base": 125e6, "xlm_roberta_large": 560e6}[name]
    assert abs(models.count_params(config) - published) / published < 0.005


def test_packed_roberta_rows_equal_each_example_alone(tmp_path, bpe_dir):
    """RoBERTa's positions in packed rows count from each example's first token after the
    padding index: two multilingual examples a row give each one's hidden states (every
    layer) as `transformers` gives them for the example alone."""
    from bert_jax import models

    vocab_size = len(_reference_tokenizer("roberta", bpe_dir, None))
    hf_dir, hf_model, architecture = _hf_dir(tmp_path, "roberta", "Model", bpe_dir, vocab_size)
    mesh = sharding.make_mesh(sharding.MeshConfig())
    loaded = convert.load_pretrained(f"hf:{hf_dir}", architecture, mesh=mesh)
    tok = loaded.tokenizer
    width = loaded.config.max_length  # 22 positions: two examples of at most 11 a row
    pieces = [encoding.pair_tokens(tok.encode(t), None, tok, 11)[0] for t in TEXTS[:4]]
    ids = np.full((2, width), tok.pad_id, np.int32)
    example_ids, positions = np.zeros_like(ids), np.zeros_like(ids)
    cls = np.zeros((2, 2), np.int32)
    starts = []
    for i, piece in enumerate(pieces):
        row, k = divmod(i, 2)
        start = 0 if k == 0 else len(pieces[i - 1])
        ids[row, start : start + len(piece)] = piece
        example_ids[row, start : start + len(piece)] = k + 1
        positions[row, start : start + len(piece)] = np.arange(len(piece))
        cls[row, k] = start
        starts.append((row, start))
    packing = models.Packing(*(jax.numpy.asarray(a) for a in (example_ids, positions, cls)))
    graphdef, _ = models.split_params(models.abstract_model(loaded.config, models.make_encoder))
    model = models.merge_params(graphdef, loaded.params)
    enc = model(ids, (example_ids > 0).astype(np.int32), np.zeros_like(ids), packing=packing,
                output_hidden_states=True)  # fmt: skip
    for piece, (row, start) in zip(pieces, starts, strict=True):
        with torch.no_grad():
            want = hf_model(torch.tensor([piece]), output_hidden_states=True).hidden_states
        got = np.asarray(enc.hidden_states[:, row, start : start + len(piece)])
        np.testing.assert_allclose(got, np.stack([h[0].numpy() for h in want]), atol=1e-5, rtol=0)


def test_vocab_json_and_merges_read_as_transformers_reads_them(bpe_dir, tmp_path):
    """A byte-level BPE given as vocab.json + merges.txt only (RoBERTa's earlier releases)
    tokenizes as `transformers`' RobertaTokenizer of the same files: ids, special tokens,
    pairs and offsets."""
    from bert_jax.convert import sources

    assert not (bpe_dir / "tokenizer.json").exists()
    path, _, _ = sources._hf_vocab(str(bpe_dir), str(tmp_path))
    ours = tokenization.HFTokenizer(path)
    ref = _reference_tokenizer("roberta", bpe_dir, None)
    assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.mask_id) == tuple(
        ref.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<mask>")
    )
    for a, b in zip(TEXTS, TEXTS[1:], strict=False):
        assert ours.encode(a) == ref(a, add_special_tokens=False)["input_ids"], a
        ids, _ = encoding.pair_tokens(ours.encode(a), ours.encode(b), ours, 128)
        assert ids == ref(a, b)["input_ids"], (a, b)
    for (ids, offsets), text in zip(ours.encode_offsets(TEXTS), TEXTS, strict=True):
        want = ref(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == want["input_ids"] and offsets == [tuple(o) for o in want["offset_mapping"]]
    masked = "The cat <mask> on the mat"
    assert ours.encode(masked) == ref(masked, add_special_tokens=False)["input_ids"]
