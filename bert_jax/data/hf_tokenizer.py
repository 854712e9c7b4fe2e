"""`HFTokenizer`: any Hugging Face `tokenizer.json` behind `tokenization.Tokenizer`'s protocol,
with the file's own ids, special tokens and pair layout."""

import json
import os
from collections.abc import Iterable, Sequence

import tokenizers

from bert_jax import files


class TokenizersBacked:
    """What every tokenizer over a `tokenizers.Tokenizer` (`_tok`; `_words` for words given
    apart) computes alike: ids, batches, words, offsets, pieces, decoding."""

    _tok: tokenizers.Tokenizer
    _words: tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_word_ids(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """Per text, its pieces' ids and the index of each piece's word among `str.split`'s
        words, from one batched call of the words as given (`is_pretokenized`)."""
        encodings = self._words.encode_batch(
            [t.split() for t in texts], is_pretokenized=True, add_special_tokens=False
        )
        return [(e.ids, e.word_ids) for e in encodings]

    def encode_words(self, texts: Sequence[str]) -> list[list[list[int]]]:
        """Per text, the ids of each whitespace-separated word (`str.split`'s words), from
        one batched call; the same as encoding every word alone."""
        out = []
        for text, (ids, word_ids) in zip(texts, self.encode_word_ids(texts), strict=True):
            words: list[list[int]] = [[] for _ in text.split()]
            for token_id, word in zip(ids, word_ids, strict=True):
                words[word].append(token_id)
            out.append(words)
        return out

    def encode_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple]]]:
        """Per text, its token ids and each token's (start, end) character span in that text
        (as given, before any normalization), from one batched call."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, e.offsets) for e in encodings]

    def tokenize(self, text: str) -> list[str]:
        """The pieces of `text` as strings."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)


class HFTokenizer(TokenizersBacked):
    """Any Hugging Face `tokenizer.json` through `tokenizers`: byte-level BPE (RoBERTa,
    ModernBERT), XLM-R's SentencePiece (converted), WordPiece. Ids, special tokens and the
    pair layout (`<s> A </s></s> B </s>`, `[CLS] A [SEP] B [SEP]`) are the file's own, as
    `transformers` reads them; words given apart (NER, `encode_word_ids`) are encoded as
    `transformers` does with `add_prefix_space=True`, each word as if a space preceded it."""

    def __init__(self, tokenizer_file: str | os.PathLike):
        if not files.isfile(tokenizer_file):
            raise FileNotFoundError(f"tokenizer file {tokenizer_file} does not exist")
        with files.open(tokenizer_file, encoding="utf-8") as f:
            spec = json.load(f)
        self._tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
        self._words = tokenizers.Tokenizer.from_str(json.dumps(_prefix_space(spec)))
        self.vocab_file = os.fspath(tokenizer_file)
        self.do_lower_case, self.keep_accents = False, False  # the file's normalizer decides
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        head, middle, tail = _pair_template(spec, self._tok, tokenizer_file)
        self.cls_id, self.sep_id = head[0], tail[-1]
        self.pair_middle = tuple(middle)
        self.unk_id = self._find(tokenizer_file, spec["model"].get("unk_token"), "<unk>", "[UNK]")
        self.pad_id = self._find(tokenizer_file, "<pad>", "[PAD]")
        self.mask_id = self._find(tokenizer_file, "<mask>", "[MASK]")
        special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
        self._special = special | {self.cls_id, self.sep_id, self.pad_id, self.mask_id}
        self._word_start = _word_start(spec)

    def _find(self, source, *names) -> int:
        for name in names:
            token_id = None if name is None else self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(f"{source} has none of the tokens {[n for n in names if n]}")

    def is_continuation(self) -> list[bool]:
        """Per id, whether the piece continues a word: it lacks the word-start mark of its
        pre-tokenizer (`Ġ` byte-level, `▁` SentencePiece) or has WordPiece's `##`."""
        mark = self._word_start
        table = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i) or ""
            if i in self._special:
                table.append(False)
            elif mark == "##":
                table.append(piece.startswith("##"))
            else:
                table.append(not piece.startswith(mark))
        return table


def _processors(spec: dict) -> list[dict]:
    post = spec.get("post_processor") or {}
    return post.get("processors", [post]) if post.get("type") == "Sequence" else [post]


def _pair_template(spec: dict, tok, source) -> tuple[list[int], list[int], list[int]]:
    """The special ids before A, between A and B, and after B of a pair, from the file's
    post-processor (RobertaProcessing, BertProcessing or TemplateProcessing)."""
    for post in _processors(spec):
        kind = post.get("type")
        if kind in ("RobertaProcessing", "BertProcessing"):
            cls, sep = post["cls"][1], post["sep"][1]
            return [cls], [sep, sep] if kind == "RobertaProcessing" else [sep], [sep]
        if kind == "TemplateProcessing":
            ids = {name: v["ids"] for name, v in post["special_tokens"].items()}
            parts: list[list[int]] = [[], [], []]
            part = 0
            for item in post["pair"]:
                if "Sequence" in item:
                    part += 1
                else:
                    parts[part] += ids[item["SpecialToken"]["id"]]
            if parts[0] and parts[2]:
                return parts[0], parts[1], parts[2]
    raise ValueError(
        f"{source} adds no [CLS]/[SEP]-like tokens around a pair (its post_processor is "
        f"{(spec.get('post_processor') or {}).get('type')}); bert_jax needs an encoder's "
        f"tokenizer (BERT's, RoBERTa's, XLM-R's or ModernBERT's tokenizer.json)"
    )


def _word_start(spec: dict) -> str:
    """How the file's pieces mark where a word starts: "Ġ", "▁", or "##" for continuations."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if spec["model"].get("type") == "WordPiece":
        return "##"
    return "\u2581" if '"Metaspace"' in text else "\u0120"


def _prefix_space(spec: dict) -> dict:
    """The spec with every ByteLevel step adding a space before a word, as `transformers`'
    `add_prefix_space=True` sets it for words given apart."""
    if isinstance(spec, list):
        return [_prefix_space(v) for v in spec]
    if not isinstance(spec, dict):
        return spec
    out = {k: _prefix_space(v) for k, v in spec.items()}
    if out.get("type") in ("ByteLevel", "RobertaProcessing") and "add_prefix_space" in out:
        out["add_prefix_space"] = True
    return out
