"""Features from a trained encoder, streamed: per-word vectors of chosen layers, the pooled
[CLS] vector and the mean-pooled sentence vector, for every line of a text file.

    python -m bert_jax.tools.extract --model=hf:/models/bert-base-cased --input=sentences.txt \
        --output=features.jsonl --layers=-1,-2,-3,-4 --pooling=first

A line is one sentence, or a pair `A ||| B` (as the original `extract_features.py`). Words are
the line's whitespace-separated words: each is split into pieces by the model's tokenizer, and
its vector pools the vectors of its pieces (`first`: the first piece, as BERT's NER recipe;
`mean`; `sum`). A word the vocabulary cannot piece is one [UNK] piece; a word of characters the
tokenizer removes (control characters) has no piece and no vector (`null`). Lines longer than
`max_seq_length` pieces are cut as the original cuts pairs (from the longer segment's end);
the words cut off have no vector and the line is marked `truncated`.

Lines are packed: a batch is `--batch_size` rows of `max_seq_length` positions, each row holding
as many whole lines, one after another, as fit (kept apart by the attention mask, positions
restarting at each line, so a line's vectors equal those of the line alone): no position is
computed for padding but a row's end, and one shape is compiled for the whole input.

Outputs (by the extension of `--output`), both written in line order as the batches come, so
that memory stays flat whatever the input's length:
- `.jsonl`: one JSON object per line: `line_index`, `words` (each with `word`, `pieces`,
  `layers`: [{"index": -1, "values": [...]}, ...]), `cls`, `mean`, `truncated`.
- `.array_record`: one record per line holding `words` [W] str, `features` [len(layers), W, D]
  float32 (NaN rows for words without a vector), `cls` [D], `mean` [D], `line_index`,
  `layers`, `truncated`: named raw arrays behind a JSON header (`encode_arrays`; far cheaper
  per line than an `.npz` archive); read it back with `read_array_record`.
"""

import argparse
import dataclasses
import functools
import gc
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from bert_jax import axes, cli, convert, files, models, sharding, tools
from bert_jax.data.tokenization import Tokenizer, vocabulary
from bert_jax.models import attention
from bert_jax.tools.feature_files import (  # noqa: F401 (the readers, where users found them)
    ArrayRecordWriter,
    JsonlWriter,
    decode_arrays,
    encode_arrays,
    read_array_record,
)

POOLINGS = ("first", "mean", "sum")


@dataclasses.dataclass(frozen=True)
class Example:
    """One input line: its words (segment A, then B) and its model input (as long as the
    line's pieces; `encode`'s padded to `max_seq_length`)."""

    index: int
    words: list[str]
    input_ids: np.ndarray  # [n] int32
    segment_ids: np.ndarray  # [n] int32
    input_mask: np.ndarray  # [n] int32
    piece_word: np.ndarray  # [n] int32: the word of each position, -1 for specials/padding
    truncated: bool

    def pieces(self, vocabulary: Sequence[str]) -> list[list[str]]:
        """Per word, the pieces kept (empty: none, or cut off)."""
        kept: list[list[str]] = [[] for _ in self.words]
        for token, word in zip(self.input_ids.tolist(), self.piece_word.tolist(), strict=True):
            if word >= 0:
                kept[word].append(vocabulary[token])
        return kept


def read_lines(path: str) -> Iterator[tuple[int, str, str | None]]:
    """(index, text A, text B or None) per line of a UTF-8 file, lazily."""
    with files.open(path, encoding="utf-8", errors="replace") as f:
        for index, line in enumerate(f):
            a, sep, b = line.rstrip("\n").partition(" ||| ")
            yield index, a.strip(), (b.strip() if sep else None)


def _layout(tokenizer, encoded, max_seq_length) -> tuple[list[int], list[int], int, bool]:
    """`[CLS] A [SEP] (B [SEP])` as (ids, piece_word, where B starts, truncated) from each
    segment's (ids, word index) pair (B's words counted after A's); cut like the original
    run_classifier/extract_features: one segment at its end, a pair from the longer
    segment's end."""
    budget = (
        max_seq_length - 1 - len(encoded) - (len(tokenizer.pair_middle) - 1) * (len(encoded) - 1)
    )
    lengths = [len(ids) for ids, _ in encoded]
    truncated = sum(lengths) > budget
    if len(lengths) == 1:
        lengths[0] = min(lengths[0], budget)
    else:
        while lengths[0] + lengths[1] > budget:
            lengths[0 if lengths[0] > lengths[1] else 1] -= 1
    ids, words, second = [tokenizer.cls_id], [-1], 0
    for k, ((seg_ids, seg_words), n) in enumerate(zip(encoded, lengths, strict=True)):
        ids += seg_ids[:n]
        words += seg_words[:n]
        closing = [tokenizer.sep_id] if k == len(encoded) - 1 else list(tokenizer.pair_middle)
        ids += closing
        words += [-1] * len(closing)
        second = second or len(ids)
    return ids, words, second, truncated


def _segment_words(text_a: str, text_b: str | None) -> tuple[list[str], int]:
    words_a = text_a.split()
    return (words_a + text_b.split() if text_b is not None else words_a), len(words_a)


def encode(
    index: int, text_a: str, text_b: str | None, tokenizer: Tokenizer, max_seq_length: int
) -> Example:
    """One line's `[CLS] A [SEP] (B [SEP])` with each piece tagged by its word."""
    texts = [text_a] if text_b is None else [text_a, text_b]
    words, n_a = _segment_words(text_a, text_b)
    encoded = _offset_words(tokenizer.encode_word_ids(texts), n_a)
    ids, piece_word, second, truncated = _layout(tokenizer, encoded, max_seq_length)
    row = np.zeros((4, max_seq_length), np.int32)
    row[3] = -1
    row[0, : len(ids)], row[1, second : len(ids)], row[2, : len(ids)] = ids, 1, 1
    row[3, : len(ids)] = piece_word
    return Example(index, words, row[0], row[1], row[2], row[3], truncated)


def _offset_words(encoded, n_a):
    """Segment B's word indices counted after segment A's words."""
    if len(encoded) == 2:
        ids_b, words_b = encoded[1]
        encoded = [encoded[0], (ids_b, [w + n_a for w in words_b])]
    return encoded


def make_extract_step(graphdef, layers: Sequence[int], pooling: str, rules: sharding.Rules):
    """`extract_step(params, batch) -> dict` over packed rows (`packed_batches`): word vectors
    [R, N, S, D] by word slot (`piece_slot`: each row's words with pieces, numbered in the
    row; `first` pooling marks only each word's first piece), and per line slot the pooled
    [CLS] [R, K, D] and the mean-pooled last layer [R, K, D]."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}")

    def extract_step(params, batch):
        model = models.merge_params(graphdef, params)
        packing = models.Packing(
            batch["example_ids"], batch["position_ids"], batch["cls_positions"]
        )
        with axes.axis_rules(rules):
            out = model(
                batch["input_ids"],
                batch["input_mask"],
                batch["segment_ids"],
                output_hidden_states=True,
                packing=packing,
            )
        hidden = jnp.stack([out.hidden_states[i] for i in layers]).astype(jnp.float32)  # [N,R,L,D]
        length = batch["input_ids"].shape[1]
        # [R, L, S]: the word slot of each position (a batched matmul pools every word).
        onehot = (batch["piece_slot"][:, :, None] == jnp.arange(length)).astype(jnp.float32)
        words = jnp.einsum("bls,nbld->bnsd", onehot, hidden)
        if pooling == "mean":
            words = words / jnp.maximum(onehot.sum(axis=1), 1.0)[:, None, :, None]
        slots = jnp.arange(1, packing.cls_positions.shape[1] + 1)
        member = (packing.example_ids[:, :, None] == slots).astype(jnp.float32)  # [R, L, K]
        seq = out.sequence_output.astype(jnp.float32)
        mean = jnp.einsum("blk,bld->bkd", member, seq)
        mean = mean / jnp.maximum(member.sum(axis=1), 1.0)[..., None]
        cls = out.pooled_output
        if cls is None:
            cls = attention.gather(out.sequence_output, packing.cls_positions)
        return {"words": words, "cls": cls.astype(jnp.float32), "mean": mean}

    return extract_step


def extract(
    model: str,
    input_path: str,
    output_path: str,
    *,
    layers: Sequence[int] = (-1, -2, -3, -4),
    pooling: str = "first",
    max_seq_length: int = 128,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.MeshConfig.rules,
    progress: bool = True,
    quantization: str = "",
) -> dict:
    """Writes the features of every line of `input_path` to `output_path`; returns counts.

    Args:
      model: `hf:DIR`, `tf:DIR` or a bert_jax workdir (as `--config.init_from`).
      layers: hidden-state indices: 0 the embeddings, 1..N the layers, negative from the end.
      batch_size: rows of `max_seq_length` positions a step, each holding whole lines.
      quantization: hold the weights as `models.quantize` says ("int8", "int8-dynamic",
        "none"); empty: as the model holds them.
    """
    ext = os.path.splitext(output_path)[1]
    if ext not in (".jsonl", ".array_record"):
        raise ValueError(f"--output={output_path}: use a .jsonl or .array_record file name")
    if not files.isfile(input_path):
        raise FileNotFoundError(f"--input={input_path} does not exist")
    mesh = mesh or sharding.make_mesh(sharding.MeshConfig())
    data_size = sharding.data_parallel_size(mesh, rules)
    if batch_size % data_size:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the data axes ({data_size})"
        )
    pretrained = _load(model, mesh, rules, quantization, max_seq_length, layers)
    config, tokenizer = pretrained.config, pretrained.tokenizer
    graphdef, _ = models.split_params(models.abstract_model(config, models.make_encoder))
    step = jax.jit(make_extract_step(graphdef, tuple(layers), pooling, rules))
    writer = (JsonlWriter if ext == ".jsonl" else ArrayRecordWriter)(
        output_path, layers, vocabulary(tokenizer)
    )
    with files.open(input_path, "rb") as f:
        bar = tqdm.tqdm(total=sum(1 for _ in f), unit="line", desc="extract", disable=not progress)
    # The objects made so far (jax, the model) leave the garbage collector's passes (after one
    # collection of tracing's garbage), which each batch's many small objects would trigger.
    gc.collect()
    gc.freeze()
    try:
        with jax.set_mesh(mesh):
            run = functools.partial(step, pretrained.params)
            lines = read_lines(input_path)
            batched = packed_batches(lines, tokenizer, max_seq_length, batch_size, pooling)
            lines, truncated = _run_and_write(run, batched, mesh, rules, writer, bar)
    except BaseException:
        writer.abort()
        raise
    else:
        writer.close()
    finally:
        gc.unfreeze()
        bar.close()
    return {"lines": lines, "truncated": truncated, "output": output_path}


def _load(model, mesh, rules, quantization, max_seq_length, layers) -> convert.Pretrained:
    """The encoder of `model`, refused when it is shorter than `max_seq_length` or lacks
    one of `layers`."""
    pretrained = convert.load_pretrained(
        model, "BertModel", mesh=mesh, rules=rules, quantization=quantization
    )
    config = pretrained.config
    if config.length_problem(max_seq_length):
        raise ValueError(config.length_problem(max_seq_length))
    n_states = config.num_hidden_layers + 1
    bad = [i for i in layers if not -n_states <= i < n_states]
    if bad:
        raise ValueError(
            f"layers {bad} do not exist: the model has hidden states 0 (embeddings) to "
            f"{n_states - 1} (-1 is the last layer)"
        )
    return pretrained


def _run_and_write(run, batched, mesh, rules, writer, bar) -> tuple[int, int]:
    """Runs `run` on every batch and writes its lines: (lines, lines cut). One step in
    flight: its lines are written, and the next batch laid out, while it runs (a thread
    making the batches was slower, through the GIL, and its peak memory grew with the
    input)."""
    lines, truncated, pending = 0, 0, None
    for batch in batched:
        placed = batch.pop("placed")
        out = run(sharding.global_batch(batch, mesh, rules))
        if pending is not None:
            truncated += _write(writer, *pending)
            lines += len(pending[1])
            bar.update(len(pending[1]))
        pending = (out, placed)
    if pending is not None:
        truncated += _write(writer, *pending)
        lines += len(pending[1])
        bar.update(len(pending[1]))
    return lines, truncated


def _write(writer, out, placed) -> int:
    """Writes a step's lines, in their order; returns how many were cut."""
    out = jax.device_get(out)
    words = out["words"]
    for line in placed:
        ex, r, k = line.example, line.row, line.slot
        features = np.full((words.shape[1], len(ex.words), words.shape[3]), np.nan, np.float32)
        features[:, line.kept] = words[r, :, line.first_slot : line.first_slot + len(line.kept)]
        writer.write(ex, features, out["cls"][r, k], out["mean"][r, k])
    return sum(line.example.truncated for line in placed)


@dataclasses.dataclass(frozen=True)
class Placed:
    """Where a line sits in a packed batch: its row, its slot there (the K axis of `cls` and
    `mean`), and its words with pieces (`kept`, word indices) at word slots `first_slot`,
    `first_slot + 1`, ... of its row."""

    example: Example
    row: int
    slot: int
    first_slot: int
    kept: np.ndarray


class _Packer:
    """Lines placed in `rows` rows of `width` positions as they come (each into the fullest
    row that holds it: best fit, at most `max_per_row` lines a row), and the batch they make.
    A batch ends when the next line fits no row, so that a batch's lines are consecutive."""

    def __init__(self, rows: int, width: int, max_per_row: int, pooling: str):
        self.rows, self.width, self.max_per_row, self.pooling = rows, width, max_per_row, pooling
        self._reset()

    def _reset(self):
        self.used = [0] * self.rows
        self.count = [0] * self.rows
        self.slots = [0] * self.rows
        self.lines: list[tuple[Example, int, int]] = []  # (example, row, start)

    def __len__(self) -> int:
        return len(self.lines)

    def place(self, ex: Example) -> bool:
        """Places `ex`; False (nothing placed) when no row holds it."""
        n, best = len(ex.input_ids), -1
        for r in range(self.rows):
            room = self.used[r] + n <= self.width and self.count[r] < self.max_per_row
            if room and (best < 0 or self.used[r] > self.used[best]):
                best = r
        if best < 0:
            return False
        self.lines.append((ex, best, self.used[best]))
        self.used[best] += n
        self.count[best] += 1
        return True

    def batch(self) -> dict:
        """The arrays of the lines placed (`Placed` of each, in order, under `placed`)."""
        shape = (self.rows, self.width)
        arrays = {
            k: np.zeros(shape, np.int32)
            for k in ("input_ids", "segment_ids", "input_mask", "example_ids", "position_ids")
        }
        arrays["piece_slot"] = np.full(shape, -1, np.int32)
        arrays["cls_positions"] = np.zeros((self.rows, self.max_per_row), np.int32)
        placed, count, slots = [], [0] * self.rows, [0] * self.rows
        for ex, r, start in self.lines:
            k, n = count[r], len(ex.input_ids)
            at = slice(start, start + n)
            arrays["input_ids"][r, at] = ex.input_ids
            arrays["segment_ids"][r, at] = ex.segment_ids
            arrays["input_mask"][r, at] = 1
            arrays["example_ids"][r, at] = k + 1
            arrays["position_ids"][r, at] = np.arange(n)
            arrays["cls_positions"][r, k] = start
            kept, positions, rank, first = _word_pieces(ex.piece_word)
            if self.pooling == "first":
                positions, rank = positions[first], rank[first]
            arrays["piece_slot"][r, start + positions] = slots[r] + rank
            placed.append(Placed(ex, r, k, slots[r], kept))
            count[r] += 1
            slots[r] += len(kept)
        self._reset()
        return {**arrays, "placed": placed}


def _word_pieces(piece_word: np.ndarray) -> tuple[np.ndarray, ...]:
    """(the words with pieces, in order; the positions of their pieces; each piece's word as
    its rank among those words; whether the piece is its word's first). A word's pieces are
    consecutive, the words in order."""
    positions = np.flatnonzero(piece_word >= 0)
    words = piece_word[positions]
    first = np.ones(len(words), bool)
    first[1:] = words[1:] != words[:-1]
    return words[first], positions, np.cumsum(first) - 1, first


def packed_batches(
    lines, tokenizer, max_seq_length: int, rows: int, pooling: str, max_per_row: int = 16
) -> Iterator[dict]:
    """Batches of `rows` rows of `max_seq_length` positions, each row holding whole lines one
    after another (at most `max_per_row`; `models.Packing` keeps them apart, so each line's
    vectors equal those of the line alone): one shape for the whole input, and no position
    computed for padding but the ends of rows. Lines are tokenized `rows` x 16 at a time."""
    packer = _Packer(rows, max_seq_length, max_per_row, pooling)
    for chunk in _chunks(lines, rows * 16):
        for ex in _examples(chunk, tokenizer, max_seq_length):
            if not packer.place(ex):
                yield packer.batch()
                packer.place(ex)
    if len(packer):
        yield packer.batch()


def _chunks(items, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _examples(chunk, tokenizer, max_seq_length) -> Iterator[Example]:
    """The `Example` of each (index, text A, text B) of `chunk`, unpadded, tokenized in one
    call (run in parallel by `tokenizers`)."""
    texts = [t for _, a, b in chunk for t in (a, b) if t is not None]
    per_text = iter(tokenizer.encode_word_ids(texts))
    for index, a, b in chunk:
        words, n_a = _segment_words(a, b)
        encoded = [next(per_text)] if b is None else [next(per_text), next(per_text)]
        ids, piece_word, second, truncated = _layout(
            tokenizer, _offset_words(encoded, n_a), max_seq_length
        )
        n = len(ids)
        segments = np.zeros(n, np.int32)
        segments[second:] = 1
        yield Example(
            index,
            words,
            np.asarray(ids, np.int32),
            segments,
            np.ones(n, np.int32),
            np.asarray(piece_word, np.int32),
            truncated,
        )


def batches(lines, tokenizer, max_seq_length, batch_size) -> Iterator[dict]:
    """Batches of `batch_size` rows of one line each (the last padded with empty rows), each
    as long as the smallest of 16, 32, 64, ... `max_seq_length` that holds its longest line:
    short lines do not pay for the longest possible, and there are a few shapes to compile,
    not one per batch. (For the attention analysis, which reads each line's own row.)"""
    for chunk in _chunks(lines, batch_size):
        yield _batch(list(_examples(chunk, tokenizer, max_seq_length)), max_seq_length, batch_size)


def _batch(examples: list[Example], max_seq_length, batch_size) -> dict:
    longest = max(len(ex.input_ids) for ex in examples)
    length = 16
    while length < longest:
        length *= 2
    length = min(length, max_seq_length)
    ids = np.zeros((batch_size, length), np.int32)
    segments = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    piece_word = np.full((batch_size, length), -1, np.int32)
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[r, :n], segments[r, :n], mask[r, :n] = ex.input_ids, ex.segment_ids, 1
        piece_word[r, :n] = ex.piece_word
    return {
        "examples": examples,
        "input_ids": ids,
        "segment_ids": segments,
        "input_mask": mask,
        "piece_word": piece_word,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bert_jax.tools.extract", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    tools.add_model_flags(parser)
    parser.add_argument("--input", required=True, help="text file: a sentence or A ||| B a line")
    parser.add_argument("--output", required=True, help=".jsonl or .array_record")
    parser.add_argument("--layers", default="-1,-2,-3,-4")
    parser.add_argument("--pooling", default="first", choices=POOLINGS)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument(
        "--batch_size", type=int, default=32, help="rows of max_seq_length a step, lines packed"
    )
    args = parser.parse_args(argv)
    result = extract(
        args.model,
        args.input,
        args.output,
        layers=[int(x) for x in args.layers.split(",")],
        pooling=args.pooling,
        max_seq_length=args.max_seq_length,
        batch_size=args.batch_size,
        quantization=args.quantization,
    )
    print(
        f"wrote the features of {result['lines']} lines to {result['output']} "
        f"({result['truncated']} cut at {args.max_seq_length} pieces)"
    )


if __name__ == "__main__":
    cli.run(main)
