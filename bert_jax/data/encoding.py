"""Model inputs from token ids, shared by every task and tool: `[CLS] A [SEP] B [SEP]` pairs
truncated as the original BERT does, packing several short examples into one row (and back),
and the TFDS opener."""

from collections.abc import Sequence

import numpy as np

from bert_jax.data.tokenization import Tokenizer


def truncate_pair(a: list[int], b: list[int], room: int) -> None:
    """Shortens `a` and `b` in place to `room` tokens together, one token at a time from the
    longer (the original `run_classifier.py`'s `_truncate_seq_pair`)."""
    while len(a) + len(b) > room:
        (a if len(a) > len(b) else b).pop()


def pair_tokens(
    ids_a: Sequence[int], ids_b: Sequence[int] | None, tokenizer: Tokenizer, max_seq_length: int
) -> tuple[list[int], list[int]]:
    """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` ids (RoBERTa's `<s> A </s></s> B </s>`: the
    tokenizer's `pair_middle`) and their segment ids, within `max_seq_length` (a single text
    is cut at its end; a pair by `truncate_pair`)."""
    cls, sep, middle = tokenizer.cls_id, tokenizer.sep_id, list(tokenizer.pair_middle)
    a = list(ids_a)
    if ids_b is None:
        a = a[: max_seq_length - 2]
        return [cls, *a, sep], [0] * (len(a) + 2)
    b = list(ids_b)
    truncate_pair(a, b, max_seq_length - 2 - len(middle))
    first = len(a) + 2
    return [cls, *a, *middle, *b, sep], [0] * first + [1] * (len(b) + len(middle))


def encode(examples, tokenizer: Tokenizer, max_seq_length: int) -> dict[str, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` features of `examples` (`text_a`, `text_b` or None, `labels` or
    None: `tasks.glue.Examples`; a None in `text_b` makes that example a single text), padded
    to `max_seq_length`; pairs truncated by `pair_tokens`.

    Returns:
      input_ids, input_mask, segment_ids: [N, L] int32; label: [N] (int32 or float32; zeros
      when unlabelled).
    """
    if max_seq_length < 2 + len(tokenizer.pair_middle):
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for [CLS] and [SEP]")
    ids_a = tokenizer.encode_batch(examples.text_a)
    texts_b = examples.text_b
    ids_b = tokenizer.encode_batch([t or "" for t in texts_b]) if texts_b is not None else None
    n = len(ids_a)
    input_ids = np.zeros((n, max_seq_length), np.int32)
    segment_ids = np.zeros((n, max_seq_length), np.int32)
    input_mask = np.zeros((n, max_seq_length), np.int32)
    for i in range(n):
        single = ids_b is None or texts_b[i] is None
        tokens, segments = pair_tokens(
            ids_a[i], None if single else ids_b[i], tokenizer, max_seq_length
        )
        input_ids[i, : len(tokens)] = tokens
        segment_ids[i, : len(tokens)] = segments
        input_mask[i, : len(tokens)] = 1
    label = examples.labels if examples.labels is not None else np.zeros((n,), np.int32)
    return dict(input_ids=input_ids, input_mask=input_mask, segment_ids=segment_ids, label=label)


def pack_rows(lengths: np.ndarray, width: int, max_per_row: int = 16) -> list[list[int]]:
    """Places examples of `lengths` tokens into rows of `width`: best fit by decreasing
    length (each example goes to the fullest row it fits in), at most `max_per_row` to a row.
    Returns the examples of each row. O(examples x width), so that a whole split packs at once.
    """
    if max_per_row < 1:
        raise ValueError(f"max_per_row={max_per_row} must be at least 1")
    rows: list[list[int]] = []
    room: list[int] = []
    # by_room[c]: the rows with c tokens free and room for another example.
    by_room: list[list[int]] = [[] for _ in range(width + 1)]
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        r = next((by_room[c].pop() for c in range(n, width + 1) if by_room[c]), None)
        if r is None:
            r = len(rows)
            rows.append([])
            room.append(width)
        rows[r].append(int(i))
        room[r] -= n
        if len(rows[r]) < max_per_row:
            by_room[room[r]].append(r)
    return rows


def row_counts(needs: Sequence[int], row_multiple: int = 1, min_saving: float = 0.1) -> list[int]:
    """The packed batch shapes of a run: given the rows each batch needs, one row count (the
    largest need), or two when a smaller second one saves at least `min_saving` of the rows
    (each shape compiles once). Counts are multiples of `row_multiple`."""
    needs = [-(-n // row_multiple) * row_multiple for n in needs]
    top = max(needs)
    best, best_total = [top], top * len(needs)
    for low in sorted(set(needs) - {top}):
        total = sum(low if n <= low else top for n in needs)
        if total <= (1 - min_saving) * top * len(needs) and total < best_total:
            best, best_total = [low, top], total
    return best


def pack(
    features: dict[str, np.ndarray],
    max_per_row: int = 16,
    row_multiple: int = 1,
    rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Packs one-example-per-row features (`encode`) into fewer rows of several examples.

    Short examples waste most of a padded row (an SST-2 sentence is about 25 of 128 tokens).
    Here the examples are placed by `pack_rows` into rows of the same length; `models.Packing`
    keeps them apart in the encoder, so each example's logits equal those of the example
    alone. `rows` fixes the number of rows (empty rows pad; an error when the examples need
    more); without it the count is rounded up to a multiple of an eighth of the unpacked count
    (and of `row_multiple`, the data-parallel degree), so that packed batches take a few
    distinct shapes only (each shape compiles once).

    Returns:
      input_ids, input_mask, segment_ids, example_ids (1, 2, ... per example, 0 for padding),
      position_ids (from 0 at each example's [CLS]): [R, L] int32; cls_positions, label,
      label_weights (1 for a real example) and source (the example's row in `features`, -1
      for an unused slot): [R, max_per_row].
    """
    ids = features["input_ids"]
    n, width = ids.shape
    lengths = features["input_mask"].sum(axis=1).astype(np.int64)
    placed = pack_rows(lengths, width, max_per_row)
    count = _packed_rows(n, len(placed), row_multiple, rows)
    label = features["label"]
    out = {
        name: np.zeros((count, width), np.int32)
        for name in ("input_ids", "input_mask", "segment_ids", "example_ids", "position_ids")
    }
    out["cls_positions"] = np.zeros((count, max_per_row), np.int32)
    out["label"] = np.zeros((count, max_per_row), label.dtype)
    out["label_weights"] = np.zeros((count, max_per_row), np.float32)
    out["source"] = np.full((count, max_per_row), -1, np.int32)
    for r, members in enumerate(placed):
        start = 0
        for slot, i in enumerate(members):
            end = start + int(lengths[i])
            out["input_ids"][r, start:end] = ids[i, : end - start]
            out["segment_ids"][r, start:end] = features["segment_ids"][i, : end - start]
            out["input_mask"][r, start:end] = 1
            out["example_ids"][r, start:end] = slot + 1
            out["position_ids"][r, start:end] = np.arange(end - start)
            out["cls_positions"][r, slot] = start
            out["label"][r, slot] = label[i]
            out["label_weights"][r, slot] = 1.0
            out["source"][r, slot] = i
            start = end
    return out


def _packed_rows(n: int, needed: int, row_multiple: int, rows: int | None) -> int:
    """`pack`'s row count for `n` examples that need `needed` rows."""
    if rows is None:
        cap = -(-n // row_multiple) * row_multiple
        step = row_multiple * max(1, -(-cap // (8 * row_multiple)))
        return min(cap, -(-needed // step) * step)
    if rows < needed or rows % row_multiple:
        raise ValueError(
            f"rows={rows}: the examples need {needed} rows, and the count must be a "
            f"multiple of {row_multiple}"
        )
    return rows


def unpack(outputs: np.ndarray, source: np.ndarray, n: int) -> np.ndarray:
    """Per-slot outputs [R, K, ...] of packed rows -> [n, ...] in the original order."""
    real = source >= 0
    result = np.zeros((n, *outputs.shape[2:]), outputs.dtype)
    result[source[real]] = outputs[real]
    if np.bincount(source[real], minlength=n).min(initial=1) != 1:
        raise ValueError("every example must sit in exactly one packed slot")
    return result


def tfds_source(name: str, split: str, data_dir: str | None, instead: str):
    """TFDS `name`'s `split` prepared as ArrayRecord, as a data source (no tensorflow).

    Raises:
      FileNotFoundError saying how to prepare it, or `instead` what else to read.
    """
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        raise FileNotFoundError(
            f"TFDS {name} split {split} is not prepared in "
            f"{data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: {str(e)[:200]}); "
            f"prepare it with `tfds build {name} --file_format=array_record` (then pass "
            f"--config.tfds_data_dir), or use {instead}"
        ) from e
