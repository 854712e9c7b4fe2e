"""Documents of tokenized sentences -> sentence pairs -> masked-LM + NSP/SOP instances.

Reproduces the original `create_pretraining_data.py` in two stages, so that masking can be
static (drawn once, as the original) or dynamic (drawn when a batch is made):

1. `create_pairs`: segments fill a target length (shorter with probability `short_seq_prob`);
   sentence A is a random prefix of the chunk; for NSP, B is the true continuation or (50%, or
   always for a one-segment chunk) a span of another document, the unused segments going back;
   for SOP (ALBERT) B is the true continuation and the two are swapped half the time (a chunk
   of one sentence is cut in two, so that SOP pairs never mix documents; ALBERT's script took
   a random document there). The pair is truncated from the longer side at a random end.
2. `make_instance`: [CLS] A [SEP] B [SEP], then 15% of the tokens (at most
   `max_predictions_per_seq`) are predicted: 80% become [MASK], 10% a random token, 10% stay.
   Whole-word masking keeps a word's pieces together; n-gram masking (ALBERT) masks spans of up
   to `ngram_max` words with probability proportional to 1/n.

Randomness is a `numpy.random.Generator` passed in; nothing here has hidden state.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

Document = Sequence[Sequence[int]]  # sentences of token ids
Pair = tuple[np.ndarray, np.ndarray, int]  # tokens A, tokens B, label (1: random / swapped)

FEATURES = (
    "input_ids",
    "input_mask",
    "segment_ids",
    "masked_lm_positions",
    "masked_lm_ids",
    "masked_lm_weights",
    "next_sentence_labels",
)


NEXT_SENTENCE = ("nsp", "sop", "none")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """How pairs are cut and masked (the flags of the original create_pretraining_data).

    dupe_factor: passes over the corpus when cutting pairs (each pass cuts differently; with
      static masking each copy also gets its own masks, as the original).
    next_sentence: "nsp" (BERT, B random half the time), "sop" (ALBERT, A and B swapped) or
      "none" (RoBERTa, ModernBERT: masked LM alone, contiguous text of one document).
    ngram_max: 1 masks single words (tokens); 3 is ALBERT's n-gram masking.
    dynamic_masking: draw masks per epoch when batches are made; False fixes them per pair,
      with `dupe_factor` differently masked copies, as the original.
    """

    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 10
    whole_word_mask: bool = False
    ngram_max: int = 1
    next_sentence: str = "nsp"
    dynamic_masking: bool = True

    def __post_init__(self):
        if self.max_seq_length < 5:
            raise ValueError(
                f"max_seq_length={self.max_seq_length} leaves no room for two segments"
            )
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"masked_lm_prob={self.masked_lm_prob} must be in (0, 1)")
        if self.max_predictions_per_seq < 1 or self.dupe_factor < 1 or self.ngram_max < 1:
            raise ValueError("max_predictions_per_seq, dupe_factor and ngram_max must be >= 1")
        if self.next_sentence not in NEXT_SENTENCE:
            raise ValueError(f"next_sentence={self.next_sentence!r}; use one of {NEXT_SENTENCE}")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids the instance builder needs from the tokenizer."""

    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int
    is_continuation: np.ndarray | None = None  # [V] bool: the piece continues a word


def create_pairs(
    documents: Sequence[Document], config: MaskingConfig, rng: np.random.Generator, passes: int = 1
) -> list[Pair]:
    """Sentence pairs from `passes` passes over the documents, in document order.

    Raises:
      ValueError when no document has two sentences (no pair could be a true continuation).
    """
    documents = [d for d in documents if any(len(s) for s in d)]
    if config.next_sentence == "none":
        return [
            p for _ in range(passes) for d in documents for p in _document_windows(d, config, rng)
        ]
    if not any(len(d) >= 2 for d in documents):
        raise ValueError(
            "no document has two or more sentences: the corpus format is one sentence per line "
            "with a blank line between documents"
        )
    pairs: list[Pair] = []
    for _ in range(passes):
        for index in range(len(documents)):
            pairs.extend(_document_pairs(documents, index, config, rng))
    return pairs


def _document_pairs(documents, index, config, rng) -> list[Pair]:
    document = documents[index]
    max_tokens = config.max_seq_length - 3  # [CLS] A [SEP] B [SEP]
    target = max_tokens
    if rng.random() < config.short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    pairs = []
    chunk: list[Sequence[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            if config.next_sentence == "sop" and len(chunk) == 1 and len(chunk[0]) >= 2:
                # SOP needs two segments of one document: cut the lone sentence in two.
                cut = int(rng.integers(1, len(chunk[0])))
                chunk = [chunk[0][:cut], chunk[0][cut:]]
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            tokens_a = [t for s in chunk[:a_end] for t in s]
            label = 0
            random_next = len(chunk) == 1 or (config.next_sentence == "nsp" and rng.random() < 0.5)
            if random_next and len(documents) > 1:
                label = 1
                tokens_b = _random_continuation(documents, index, target - len(tokens_a), rng)
                i -= len(chunk) - a_end  # the unused segments go back into the stream
            else:
                tokens_b = [t for s in chunk[a_end:] for t in s]
                if config.next_sentence == "sop" and rng.random() < 0.5:
                    tokens_a, tokens_b, label = tokens_b, tokens_a, 1
            _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
            if tokens_a and tokens_b:
                pairs.append((np.array(tokens_a, np.int32), np.array(tokens_b, np.int32), label))
            chunk, length = [], 0
        i += 1
    return pairs


def _document_windows(document, config: "MaskingConfig", rng) -> list[Pair]:
    """A document's tokens cut into contiguous windows that fill [CLS] x [SEP] (all but
    `short_seq_prob` of them, which take a random shorter length): the masked-LM-only
    instances of RoBERTa's DOC-SENTENCES and ModernBERT, no second segment."""
    tokens = np.concatenate([np.asarray(s, np.int32) for s in document])
    max_tokens = config.max_seq_length - 2
    windows, start = [], 0
    while start < len(tokens):
        size = max_tokens
        if rng.random() < config.short_seq_prob:
            size = int(rng.integers(2, max_tokens + 1))
        windows.append((tokens[start : start + size], np.zeros(0, np.int32), 0))
        start += size
    return windows


def _random_continuation(documents, index, target_length, rng) -> list[int]:
    # The original tries ten times to draw a document other than the current one.
    other = index
    for _ in range(10):
        other = int(rng.integers(0, len(documents)))
        if other != index:
            break
    document = documents[other]
    start = int(rng.integers(0, len(document)))
    tokens: list[int] = []
    for sentence in document[start:]:
        tokens.extend(sentence)
        if len(tokens) >= target_length:
            break
    return tokens


def _truncate_pair(tokens_a: list[int], tokens_b: list[int], max_tokens: int, rng) -> None:
    while len(tokens_a) + len(tokens_b) > max_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        # Truncating at a random end avoids a bias toward sentence starts or ends.
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def feature_specs(config: "MaskingConfig") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each of the `FEATURES` of one instance (as `make_instance` makes)."""
    length, preds = (config.max_seq_length,), (config.max_predictions_per_seq,)
    return {
        "input_ids": (length, np.dtype(np.int32)),
        "input_mask": (length, np.dtype(np.int32)),
        "segment_ids": (length, np.dtype(np.int32)),
        "masked_lm_positions": (preds, np.dtype(np.int32)),
        "masked_lm_ids": (preds, np.dtype(np.int32)),
        "masked_lm_weights": (preds, np.dtype(np.float32)),
        "next_sentence_labels": ((), np.dtype(np.int32)),
    }


def make_instance(
    pair: Pair, config: MaskingConfig, ids: SpecialIds, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One masked, padded instance: the `FEATURES` of one example (no batch dimension)."""
    tokens_a, tokens_b, label = pair
    second = [tokens_b, [ids.sep_id]] if len(tokens_b) else []  # none for masked LM alone
    tokens = np.concatenate([[ids.cls_id], tokens_a, [ids.sep_id], *second])
    n = len(tokens)
    if n > config.max_seq_length:
        raise ValueError(f"pair of {n} tokens exceeds max_seq_length={config.max_seq_length}")
    positions, labels, corrupted = mask_tokens(tokens.astype(np.int32), config, ids, rng)
    length, preds = config.max_seq_length, config.max_predictions_per_seq
    out = {
        "input_ids": np.zeros(length, np.int32),
        "input_mask": np.zeros(length, np.int32),
        "segment_ids": np.zeros(length, np.int32),
        "masked_lm_positions": np.zeros(preds, np.int32),
        "masked_lm_ids": np.zeros(preds, np.int32),
        "masked_lm_weights": np.zeros(preds, np.float32),
        "next_sentence_labels": np.array(label, np.int32),
    }
    out["input_ids"][:n] = corrupted
    out["input_mask"][:n] = 1
    out["segment_ids"][len(tokens_a) + 2 : n] = 1
    out["masked_lm_positions"][: len(positions)] = positions
    out["masked_lm_ids"][: len(positions)] = labels
    out["masked_lm_weights"][: len(positions)] = 1.0
    return out


def mask_tokens(tokens: np.ndarray, config: MaskingConfig, ids: SpecialIds, rng):
    """Chooses and corrupts the predicted positions of one instance.

    Args:
      tokens: [n] int32 ids including [CLS] and [SEP].

    Returns:
      (sorted positions [k] int32, their original ids [k], the corrupted tokens [n]).
    """
    groups = _maskable_groups(tokens, config, ids)
    n_predict = min(
        config.max_predictions_per_seq, max(1, int(round(len(tokens) * config.masked_lm_prob)))
    )
    ngrams = np.arange(1, config.ngram_max + 1)
    weights = 1.0 / ngrams
    chosen: list[int] = []
    covered: set[int] = set()
    for start in rng.permutation(len(groups)):
        if len(chosen) >= n_predict:
            break
        span = groups[start : start + config.ngram_max]
        n = 1
        if config.ngram_max > 1:
            p = weights[: len(span)] / weights[: len(span)].sum()
            n = int(rng.choice(ngrams[: len(span)], p=p))
        # Shorten the span until it fits the budget (ALBERT), else skip it (BERT).
        while n > 1 and len(chosen) + sum(len(g) for g in span[:n]) > n_predict:
            n -= 1
        index_set = [i for g in span[:n] for i in g]
        if len(chosen) + len(index_set) > n_predict or covered.intersection(index_set):
            continue
        chosen.extend(index_set)
        covered.update(index_set)
    positions = np.array(sorted(chosen), np.int32)
    labels = tokens[positions].copy()
    corrupted = tokens.copy()
    for p in positions:
        if rng.random() < 0.8:
            corrupted[p] = ids.mask_id
        elif rng.random() >= 0.5:
            corrupted[p] = int(rng.integers(0, ids.vocab_size))
    return positions, labels, corrupted


def _maskable_groups(tokens: np.ndarray, config: MaskingConfig, ids: SpecialIds) -> list[list[int]]:
    """Positions that may be predicted, grouped into words when whole-word masking is on."""
    groups: list[list[int]] = []
    whole_word = config.whole_word_mask and ids.is_continuation is not None
    for i, t in enumerate(tokens.tolist()):
        if t in (ids.cls_id, ids.sep_id):
            continue
        if whole_word and groups and ids.is_continuation[t] and groups[-1][-1] == i - 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def create_instances(
    documents: Sequence[Document], config: MaskingConfig, ids: SpecialIds, seed: int
) -> dict[str, np.ndarray]:
    """All instances of `dupe_factor` statically masked passes, shuffled, as stacked arrays.

    This is the original create_pretraining_data in memory; the input pipeline instead stores
    the pairs and masks them as batches are made.

    Returns:
      The `FEATURES` with a leading [N] dimension.
    """
    rng = np.random.default_rng(seed)
    pairs = create_pairs(documents, config, rng, passes=config.dupe_factor)
    rows = [make_instance(pairs[i], config, ids, rng) for i in rng.permutation(len(pairs))]
    return {k: np.stack([r[k] for r in rows]) for k in FEATURES}


def encode_pair(pair: Pair) -> bytes:
    """Serialises a pair for a record file: [label, len(A)] + A + B as little-endian int32."""
    tokens_a, tokens_b, label = pair
    header = np.array([label, len(tokens_a)], "<i4")
    return np.concatenate([header, tokens_a.astype("<i4"), tokens_b.astype("<i4")]).tobytes()


def decode_pair(record: bytes) -> Pair:
    values = np.frombuffer(record, "<i4")
    label, len_a = int(values[0]), int(values[1])
    return values[2 : 2 + len_a].astype(np.int32), values[2 + len_a :].astype(np.int32), label
