"""WordPiece against the pure-Python reference of the original BERT rules (transformers'
`BertTokenizerLegacy`, a port of google-research/bert tokenization.py)."""

import pytest
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from bert_jax.data import tokenization

TEXT = [
    "Hello, World! The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé Ångström façade",
    "Straße und Größe: Übermäßig schöne Äpfel",
    "北京大学的学生在学习自然语言处理",
    "東京は日本の首都です。ひらがなとカタカナ",
    "emoji 😀🎉 mixed with text👍",
    "control\x00chars\x07 and\ttabs\r\nnewlines\u200b zero width",
    "see https://example.com/path?q=1&x=2 or mail me@example.org",
    "supercalifragilisticexpialidocious" * 4 + " short",
    "don't can't won't it's 3.14 1,000,000 $5 #hash @user",
]


def _write_vocab(tmp_path, name, lower):
    words = " ".join(TEXT).split()
    return tokenization.train_wordpiece_vocab(
        TEXT * 3 + words,
        tmp_path / f"{name}_vocab.txt",
        vocab_size=400,
        do_lower_case=lower,
        min_frequency=1,
    )


@pytest.mark.parametrize("lower", [True, False], ids=["uncased", "cased"])
def test_matches_reference_tokenizer(tmp_path, lower):
    vocab = _write_vocab(tmp_path, "uncased" if lower else "cased", lower)
    ours = tokenization.WordPieceTokenizer(vocab, do_lower_case=lower)
    ref = BertTokenizerLegacy(vocab, do_lower_case=lower)
    probes = TEXT + ["UNSEEN Wörds 漢字 xyzzyq", "A" * 101, "ÀÉÎÕÜ àéîõü"]
    for text in probes:
        assert ours.tokenize(text) == ref.tokenize(text), text
        assert ours.encode(text) == ref.convert_tokens_to_ids(ref.tokenize(text)), text
    assert ours.encode_batch(probes) == [ours.encode(t) for t in probes]
    # Pieces by word from one call, as if every whitespace-separated word were encoded alone.
    assert ours.encode_words(probes) == [[ours.encode(w) for w in t.split()] for t in probes]


def test_special_ids_and_long_words(tmp_path):
    vocab = _write_vocab(tmp_path, "uncased", True)
    tok = tokenization.WordPieceTokenizer(vocab)
    ids = [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id]
    assert [tok.id_to_token(i) for i in ids] == list(tokenization.SPECIAL_TOKENS)
    assert tok.encode("a" * 101) == [tok.unk_id]  # over 100 characters: one [UNK]


def test_vocab_without_special_tokens_is_rejected(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="lacks the special tokens"):
        tokenization.WordPieceTokenizer(vocab)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenization.WordPieceTokenizer(tmp_path / "missing.txt")


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_trains_encodes_and_decodes(tmp_path, model_type):
    import sentencepiece as spm

    sentences = [s for t in TEXT for s in (t, t.upper(), t.lower())] * 20
    path = tokenization.train_sentencepiece(
        iter(sentences), tmp_path / "sp.model", vocab_size=300, model_type=model_type
    )
    tok = tokenization.SentencePieceTokenizer(path)
    ids = [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id]
    assert ids == [0, 1, 2, 3, 4]
    assert [tok.id_to_token(i) for i in ids] == list(tokenization.SPECIAL_TOKENS)
    # The SentencePiece library itself, after ALBERT's preprocessing, is the reference.
    ref = spm.SentencePieceProcessor(model_file=str(path))
    for text in TEXT[:6]:
        expected = tokenization.albert_preprocess(text, True)
        assert tok.encode(text) == ref.encode(expected)
        assert tok.decode(tok.encode(text)) == expected
    assert tok.encode_batch(TEXT) == [tok.encode(t) for t in TEXT]
    assert tok.encode_words(TEXT) == [[tok.encode(w) for w in t.split()] for t in TEXT]
    continuation = tok.is_continuation()
    pieces = tok.tokenize("supercalifragilistic")
    assert pieces[0].startswith("\u2581") and all(
        continuation[i] for i in tok.encode("supercalifragilistic")[1:]
    )


def test_albert_preprocessing_matches_the_original_rules():
    assert tokenization.albert_preprocess("  Café\t``Naïve''  ", True) == 'cafe "naive"'
    # ALBERT strips accents whether or not it lower-cases, unless told to keep them.
    assert tokenization.albert_preprocess("Café  X", False) == "Cafe X"
    assert tokenization.albert_preprocess("Café  X", False, keep_accents=True) == "Café X"


def test_sentencepiece_model_without_special_symbols_gets_them_as_extra_ids(tmp_path):
    import sentencepiece as spm

    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 20),
        model_prefix=str(prefix),
        vocab_size=100,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    ref = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    tok = tokenization.SentencePieceTokenizer(f"{prefix}.model")
    n = ref.get_piece_size()
    # No pad piece, no [CLS]/[SEP]/[MASK]: four ids after the model's own, as Hugging Face
    # adds special tokens to a released tokenizer.
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (n, n + 1, n + 2, n + 3)
    assert tok.vocab_size == n + 4 and tok.unk_id == ref.unk_id()
    assert [tok.id_to_token(i) for i in range(n, n + 4)] == ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    text = "the cat sat on the mat"
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode([tok.cls_id, *tok.encode(text), tok.sep_id]) == f"[CLS] {text} [SEP]"
    assert len(tok.is_continuation()) == tok.vocab_size
