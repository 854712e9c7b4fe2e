"""Documents of tokenized sentences -> masked-LM + next-sentence pretraining instances.

Reproduces the semantics of the original `create_pretraining_data.py`: segments fill a
target length (shorter with probability `short_seq_prob`), sentence A is a random prefix of the
chunk, sentence B its true continuation or (50%, or always for a one-segment chunk) a span of
another document, the pair is truncated from the longer side at a random end, and 15% of the
tokens (at most `max_predictions_per_seq`) are predicted: 80% replaced by [MASK], 10% by a
random token, 10% kept. Randomness is one seeded `numpy.random.Generator`.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

Document = Sequence[Sequence[int]]  # sentences of token ids

FEATURES = (
    "input_ids",
    "input_mask",
    "segment_ids",
    "masked_lm_positions",
    "masked_lm_ids",
    "masked_lm_weights",
    "next_sentence_labels",
)


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """How instances are cut and masked (the original flags of create_pretraining_data)."""

    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 10
    whole_word_mask: bool = False

    def __post_init__(self):
        if self.max_seq_length < 5:
            raise ValueError(
                f"max_seq_length={self.max_seq_length} leaves no room for two segments"
            )
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"masked_lm_prob={self.masked_lm_prob} must be in (0, 1)")
        if self.max_predictions_per_seq < 1 or self.dupe_factor < 1:
            raise ValueError("max_predictions_per_seq and dupe_factor must be at least 1")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids the instance builder needs from the tokenizer."""

    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int
    is_continuation: np.ndarray | None = None  # [V] bool, for whole-word masking


def create_instances(
    documents: Sequence[Document], config: MaskingConfig, ids: SpecialIds, seed: int
) -> dict[str, np.ndarray]:
    """All instances of `dupe_factor` passes over the documents, as fixed-shape arrays.

    Args:
      documents: each a list of sentences, each a list of token ids (no special tokens).
      config: lengths and masking probabilities.
      ids: special token ids and the vocabulary size.
      seed: seed of the generator; the same inputs and seed give the same instances.

    Returns:
      Dict of the `FEATURES`: [N, max_seq_length] int32 input_ids/input_mask/segment_ids,
      [N, max_predictions_per_seq] masked_lm_positions/ids (int32) and weights (float32),
      [N] int32 next_sentence_labels (1 when segment B is random).
    """
    documents = [d for d in documents if any(len(s) for s in d)]
    if not any(len(d) >= 2 for d in documents):
        raise ValueError(
            "no document has two or more sentences: the corpus format is one sentence per line "
            "with a blank line between documents"
        )
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(config.dupe_factor):
        for index in range(len(documents)):
            rows.extend(_document_instances(documents, index, config, ids, rng))
    order = rng.permutation(len(rows))
    return _to_arrays([rows[i] for i in order], config)


def _document_instances(documents, index, config, ids, rng):
    document = documents[index]
    max_tokens = config.max_seq_length - 3  # [CLS] A [SEP] B [SEP]
    target = max_tokens
    if rng.random() < config.short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    instances = []
    chunk: list[Sequence[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            if chunk:
                a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                tokens_a = [t for s in chunk[:a_end] for t in s]
                tokens_b: list[int] = []
                is_random_next = len(chunk) == 1 or rng.random() < 0.5
                if is_random_next and len(documents) > 1:
                    tokens_b = _random_continuation(documents, index, target - len(tokens_a), rng)
                    i -= len(chunk) - a_end  # the unused segments go back into the stream
                else:
                    is_random_next = False
                    tokens_b = [t for s in chunk[a_end:] for t in s]
                _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
                if tokens_a and tokens_b:
                    instances.append(
                        _masked_instance(tokens_a, tokens_b, is_random_next, config, ids, rng)
                    )
            chunk, length = [], 0
        i += 1
    return instances


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


def _masked_instance(tokens_a, tokens_b, is_random_next, config, ids, rng):
    tokens = np.array([ids.cls_id, *tokens_a, ids.sep_id, *tokens_b, ids.sep_id], np.int32)
    segments = np.zeros(len(tokens), np.int32)
    segments[len(tokens_a) + 2 :] = 1
    positions, labels, tokens = mask_tokens(tokens, config, ids, rng)
    return tokens, segments, positions, labels, int(is_random_next)


def mask_tokens(tokens: np.ndarray, config: MaskingConfig, ids: SpecialIds, rng):
    """Chooses and corrupts the predicted positions of one instance.

    Args:
      tokens: [n] int32 ids including [CLS] and [SEP].

    Returns:
      (sorted positions, their original ids, the corrupted tokens).
    """
    candidates: list[list[int]] = []
    for i, t in enumerate(tokens):
        if t in (ids.cls_id, ids.sep_id):
            continue
        if config.whole_word_mask and candidates and ids.is_continuation is not None:
            if ids.is_continuation[t] and candidates[-1][-1] == i - 1:
                candidates[-1].append(i)
                continue
        candidates.append([i])
    rng.shuffle(candidates)
    n_predict = min(
        config.max_predictions_per_seq, max(1, int(round(len(tokens) * config.masked_lm_prob)))
    )
    chosen: list[int] = []
    for group in candidates:
        if len(chosen) >= n_predict:
            break
        if len(chosen) + len(group) > n_predict:
            continue
        chosen.extend(group)
    chosen.sort()
    positions = np.array(chosen, np.int32)
    labels = tokens[positions].copy()
    corrupted = tokens.copy()
    for p in positions:
        u = rng.random()
        if u < 0.8:
            corrupted[p] = ids.mask_id
        elif rng.random() >= 0.5:
            corrupted[p] = int(rng.integers(0, ids.vocab_size))
    return positions, labels, corrupted


def _to_arrays(rows, config: MaskingConfig) -> dict[str, np.ndarray]:
    n, length, preds = len(rows), config.max_seq_length, config.max_predictions_per_seq
    out = {
        "input_ids": np.zeros((n, length), np.int32),
        "input_mask": np.zeros((n, length), np.int32),
        "segment_ids": np.zeros((n, length), np.int32),
        "masked_lm_positions": np.zeros((n, preds), np.int32),
        "masked_lm_ids": np.zeros((n, preds), np.int32),
        "masked_lm_weights": np.zeros((n, preds), np.float32),
        "next_sentence_labels": np.zeros((n,), np.int32),
    }
    for r, (tokens, segments, positions, labels, is_random) in enumerate(rows):
        out["input_ids"][r, : len(tokens)] = tokens
        out["input_mask"][r, : len(tokens)] = 1
        out["segment_ids"][r, : len(tokens)] = segments
        out["masked_lm_positions"][r, : len(positions)] = positions
        out["masked_lm_ids"][r, : len(positions)] = labels
        out["masked_lm_weights"][r, : len(positions)] = 1.0
        out["next_sentence_labels"][r] = is_random
    return out
