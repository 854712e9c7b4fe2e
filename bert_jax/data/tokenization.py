"""Tokenizers behind one small protocol: WordPiece (BERT), SentencePiece (ALBERT) and any
Hugging Face `tokenizer.json` (RoBERTa's byte-level BPE, XLM-R's, ModernBERT's).

`WordPieceTokenizer` reads a released `vocab.txt` and applies the original BERT tokenization
(text cleaning, CJK characters split, optional lower-casing with accent stripping, punctuation
split, greedy longest-match-first word pieces, words over 100 characters to [UNK]) through the
Hugging Face `tokenizers` library, which implements exactly these rules in Rust and batch-encodes
fast. `train_wordpiece_vocab` builds a `vocab.txt` from a corpus for pretraining from scratch.
`SentencePieceTokenizer` loads a SentencePiece `.model` (ALBERT's tokenizer) and
`train_sentencepiece` learns one (unigram or BPE) with the special symbols reserved.
"""

import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, trainers

from bert_jax import files
from bert_jax.data.hf_tokenizer import HFTokenizer, TokenizersBacked

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer(Protocol):
    """What the data pipeline and the model need of a tokenizer."""

    vocab_size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    # The special ids between the two texts of a pair: ([SEP],) for BERT, (</s>, </s>) for
    # RoBERTa; [CLS] starts and [SEP] ends every input.
    pair_middle: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def id_to_token(self, token_id: int) -> str: ...

    def is_continuation(self) -> list[bool]: ...

    def encode_words(self, texts: Sequence[str]) -> list[list[list[int]]]: ...

    def encode_word_ids(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]: ...


# A tokenizer's kind (`data.tokenizer`) -> the name a workdir keeps its file under.
FILE_NAMES = {
    "wordpiece": "vocab.txt",
    "sentencepiece": "spm.model",
    "huggingface": "tokenizer.json",
}


def kind_of_file(path: str) -> str:
    """The kind of tokenizer a file holds, by its name: `.model` SentencePiece, `.json` a
    Hugging Face tokenizer, anything else a WordPiece vocabulary."""
    if path.endswith(".model"):
        return "sentencepiece"
    return "huggingface" if path.endswith(".json") else "wordpiece"


def kind_of(tokenizer: Tokenizer) -> str:
    return kind_of_file(tokenizer.vocab_file)


def load(kind: str, path: str, do_lower_case: bool = True, keep_accents: bool = False) -> Tokenizer:
    """The tokenizer of `kind` (FILE_NAMES) in `path`."""
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, do_lower_case=do_lower_case, keep_accents=keep_accents)
    if kind == "huggingface":
        return HFTokenizer(path)
    if kind != "wordpiece":
        raise ValueError(f"tokenizer kind {kind!r}; use one of {sorted(FILE_NAMES)}")
    return WordPieceTokenizer(path, do_lower_case=do_lower_case)


def vocabulary(tokenizer: Tokenizer) -> list[str]:
    """Every piece of the vocabulary, by id."""
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


def encode_grouped(tokenizer: Tokenizer, groups: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """The ids of every text of every group (documents' sentences, a line's words), from one
    batched call, grouped as given."""
    flat = tokenizer.encode_batch([t for group in groups for t in group])
    out, start = [], 0
    for group in groups:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


_WORD = re.compile(r"\S+")  # the words of str.split(): the same notion of whitespace


class WordPieceTokenizer(TokenizersBacked):
    """The original BERT WordPiece tokenizer for a `vocab.txt` (one token per line)."""

    def __init__(self, vocab_file: str | os.PathLike, *, do_lower_case: bool = True):
        if not files.isfile(vocab_file):
            raise FileNotFoundError(f"WordPiece vocabulary {vocab_file} does not exist")
        vocab = tokenizers.models.WordPiece.read_file(files.local_copy(os.fspath(vocab_file)))
        _check_unique(vocab_file, len(vocab))
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(
                f"vocabulary {vocab_file} lacks the special tokens {missing}; a BERT vocab.txt "
                f"must contain {list(SPECIAL_TOKENS)}"
            )
        model = tokenizers.models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)
        tok = _bert_tokenizer(model, do_lower_case)
        tok.decoder = decoders.WordPiece(prefix="##")
        # Words given apart are pieced by the same tokenizer: every word alone, so that
        # separators BERT's text cleaning deletes (\x0b, \x1c-\x1f, \x85) never glue two.
        self._tok = self._words = tok
        self._vocab = vocab
        self.vocab_file = os.fspath(vocab_file)
        self.do_lower_case = do_lower_case
        self.vocab_size = len(vocab)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            vocab[t] for t in SPECIAL_TOKENS
        )
        self.pair_middle = (self.sep_id,)

    def is_continuation(self) -> list[bool]:
        """Per id, whether the piece continues a word (`##...`); whole-word masking needs it."""
        table = [False] * self.vocab_size
        for token, i in self._vocab.items():
            table[i] = token.startswith("##")
        return table


def train_wordpiece_vocab(
    texts: Iterable[str],
    output_file: str | os.PathLike,
    *,
    vocab_size: int,
    do_lower_case: bool = True,
    min_frequency: int = 2,
) -> str:
    """Learns a WordPiece vocabulary from texts (sentences, lines) and writes it as `vocab.txt`.

    The texts are Python strings, so bad bytes of the files they came from were already
    replaced and counted by the corpus reader (`corpus.iter_text_documents`). The special
    tokens take ids 0-4 in the order of `SPECIAL_TOKENS`. The file is written to a temporary
    name and renamed, so an interrupted run never leaves a truncated vocabulary.

    Returns:
      The path of the written vocabulary.
    """
    if vocab_size <= len(SPECIAL_TOKENS) + 100:
        raise ValueError(f"vocab_size={vocab_size} is too small for a WordPiece vocabulary")
    tok = _bert_tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"), do_lower_case)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    output_file = os.fspath(output_file)
    files.atomic_write(output_file, "".join(token + "\n" for token, _ in vocab).encode("utf-8"))
    return output_file


def _check_unique(vocab_file: str | os.PathLike, distinct: int) -> None:
    """A vocabulary that lists a token twice has fewer ids than lines: name the repeats."""
    with files.open(vocab_file, encoding="utf-8", errors="replace") as f:
        lines = [line.rstrip("\n") for line in f]
    if len(lines) == distinct:
        return
    first: dict[str, int] = {}
    repeats = []
    for number, token in enumerate(lines, 1):
        if token in first:
            repeats.append(f"{token!r} on lines {first[token]} and {number}")
        first.setdefault(token, number)
    raise ValueError(
        f"vocabulary {vocab_file} lists {len(repeats)} token(s) more than once "
        f"({'; '.join(repeats[:5])}); each line must hold a distinct token: remove the "
        f"repeated lines (ids are line numbers, so a released vocab.txt never repeats one)"
    )


def _bert_tokenizer(model: tokenizers.models.Model, do_lower_case: bool) -> tokenizers.Tokenizer:
    """The original BERT BasicTokenizer steps in front of `model`: clean the text, split CJK
    characters, optionally lower-case and strip accents, split on whitespace and punctuation."""
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=True,
        strip_accents=do_lower_case,
        lowercase=do_lower_case,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


class SentencePieceTokenizer:
    """A SentencePiece model with ALBERT's text preprocessing and piece rules.

    As ALBERT's `tokenization.py` (and Hugging Face's `AlbertTokenizer`): whitespace collapsed,
    `` and '' made ", accents stripped unless `keep_accents` (NFKD, combining marks dropped),
    lower-cased when `do_lower_case`; a piece that ends in a digit and a comma ("9,") is split
    into the digits' own pieces and ",". Special symbols the model lacks ([CLS], [SEP], [MASK],
    [PAD] where it has no pad piece) get ids after its pieces, as Hugging Face adds them to a
    released ALBERT tokenizer; they are never produced from text.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        *,
        do_lower_case: bool = True,
        keep_accents: bool = False,
    ):
        import sentencepiece as spm

        if not files.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model {model_file} does not exist")
        try:
            self._sp = spm.SentencePieceProcessor(
                model_file=files.local_copy(os.fspath(model_file))
            )
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{model_file} is not a SentencePiece model ({e}); give the .model file that "
                f"SentencePiece training writes (ALBERT's spiece.model)"
            ) from e
        self.vocab_file = os.fspath(model_file)
        self.do_lower_case = do_lower_case
        self.keep_accents = keep_accents
        pieces = self._sp.get_piece_size()
        self._added: list[str] = []  # special symbols after the model's pieces

        def special(token: str, own_id: int = -1) -> int:
            if own_id >= 0:
                return own_id
            token_id = self._sp.piece_to_id(token)
            if token_id != self._sp.unk_id():
                return token_id
            self._added.append(token)
            return pieces + len(self._added) - 1

        self.unk_id = self._sp.unk_id()
        self.pad_id = special("[PAD]", self._sp.pad_id())
        self.cls_id, self.sep_id, self.mask_id = (special(t) for t in SPECIAL_TOKENS[2:])
        self.vocab_size = pieces + len(self._added)
        self.pair_middle = (self.sep_id,)
        self._digit_comma = {
            i: None for i in range(pieces) if _ends_in_digit_comma(self._sp.id_to_piece(i))
        }

    def preprocess(self, text: str) -> str:
        return albert_preprocess(text, self.do_lower_case, self.keep_accents)

    def encode(self, text: str) -> list[int]:
        return self._split_digit_commas(self._sp.encode(self.preprocess(text)))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self._sp.encode([self.preprocess(t) for t in texts], num_threads=os.cpu_count())
        return [self._split_digit_commas(ids) for ids in encoded]

    def _split_digit_commas(self, ids: list[int]) -> list[int]:
        """ALBERT's `encode_pieces` rule: "▁1990," becomes "▁1990" + ","."""
        if not any(i in self._digit_comma for i in ids):
            return ids
        out = []
        for i in ids:
            if i not in self._digit_comma:
                out.append(i)
                continue
            if self._digit_comma[i] is None:
                piece = self._sp.id_to_piece(i)
                parts = self._sp.encode(piece[:-1].replace("\u2581", ""), out_type=str)
                if not piece.startswith("\u2581") and parts and parts[0].startswith("\u2581"):
                    parts = parts[1:] if len(parts[0]) == 1 else [parts[0][1:], *parts[1:]]
                self._digit_comma[i] = [self._sp.piece_to_id(p) for p in [*parts, ","]]
            out.extend(self._digit_comma[i])
        return out

    def tokenize(self, text: str) -> list[str]:
        return [self.id_to_token(i) for i in self.encode(text)]

    def encode_words(self, texts: Sequence[str]) -> list[list[list[int]]]:
        """Per text, the ids of each whitespace-separated word, each word encoded alone."""
        return encode_grouped(self, [t.split() for t in texts])

    def encode_word_ids(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """Per text, its pieces' ids and each piece's word (as `WordPieceTokenizer`'s)."""
        return [
            ([i for w in words for i in w], [k for k, w in enumerate(words) for _ in w])
            for words in self.encode_words(texts)
        ]

    def encode_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple]]]:
        """Per text, its token ids and each token's (start, end) character span in that text.

        Pieces never cross a space, so each word is encoded alone (the same pieces as the
        whole text) and keeps its exact span; inside a word, pieces take the characters their
        text covers, exactly where preprocessing keeps the word's length (no accent or quote
        rewritten), in proportion otherwise, the last piece ending with the word.
        """
        out = []
        for text in texts:
            spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
            encoded = self.encode_batch([text[a:b] for a, b in spans])
            ids: list[int] = []
            offsets: list[tuple[int, int]] = []
            for (a, b), word in zip(spans, encoded, strict=True):
                sizes = [
                    1 if i == self.unk_id else len(self.id_to_token(i).replace("\u2581", ""))
                    for i in word
                ]
                scale = (b - a) / max(len(self.preprocess(text[a:b])), 1)
                position = 0.0
                for k, (i, size) in enumerate(zip(word, sizes, strict=True)):
                    start = a + min(round(position * scale), b - a)
                    position += size
                    end = b if k == len(word) - 1 else a + min(round(position * scale), b - a)
                    ids.append(i)
                    offsets.append((start, max(start, end)))
            out.append((ids, offsets))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the added special symbols appear as themselves."""
        parts, run = [], []
        for i in ids:
            if i < self._sp.get_piece_size():
                run.append(i)
                continue
            if run:
                parts.append(self._sp.decode(run))
                run = []
            parts.append(self.id_to_token(i))
        if run:
            parts.append(self._sp.decode(run))
        return " ".join(parts)

    def id_to_token(self, token_id: int) -> str:
        pieces = self._sp.get_piece_size()
        return (
            self._added[token_id - pieces] if token_id >= pieces else self._sp.id_to_piece(token_id)
        )

    def is_continuation(self) -> list[bool]:
        """A piece continues a word unless it starts one (the `▁` prefix) or is special."""
        special = {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id}
        return [
            i not in special and not self.id_to_token(i).startswith("\u2581")
            for i in range(self.vocab_size)
        ]


def _ends_in_digit_comma(piece: str) -> bool:
    return len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit()


def albert_preprocess(text: str, do_lower_case: bool, keep_accents: bool = False) -> str:
    """ALBERT's `preprocess_text`: collapse whitespace, `` and '' to ", strip accents (unless
    `keep_accents`), lower-case (when `do_lower_case`)."""
    text = " ".join(text.split()).replace("``", '"').replace("''", '"')
    if not keep_accents:
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
    if do_lower_case:
        text = text.lower()
    return text


def train_sentencepiece(
    sentences: Iterator[str],
    model_file: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    do_lower_case: bool = True,
    keep_accents: bool = False,
) -> str:
    """Learns a SentencePiece model (unigram or BPE) from sentences and writes `model_file`.

    [PAD] = 0, [UNK] = 1, [CLS] = 2, [SEP] = 3, [MASK] = 4 (ALBERT's layout); the text gets
    the same `albert_preprocess` as at encoding time. Written under a temporary name first.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type={model_type!r}; use 'unigram' or 'bpe'")
    model_file = os.fspath(model_file)
    with files.atomic_path(model_file, suffix=".model.tmp") as tmp, files.open(tmp, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(
                albert_preprocess(s, do_lower_case, keep_accents) for s in sentences
            ),
            model_writer=f,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_piece="[PAD]",
            unk_piece="[UNK]",
            user_defined_symbols=list(SPECIAL_TOKENS[2:]),
            normalization_rule_name="identity",
            hard_vocab_limit=False,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    return model_file
