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

Outputs (by the extension of `--output`), both written as the batches come so that memory stays
flat whatever the input's length (batches are as long as their longest line needs: 16, 32, ...
up to `max_seq_length`):
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
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from bert_jax import axes, cli, convert, files, models, sharding, tools
from bert_jax.data.tokenization import Tokenizer, vocabulary

POOLINGS = ("first", "mean", "sum")


@dataclasses.dataclass(frozen=True)
class Example:
    """One input line: its words (segment A, then B) and its model input (views of a batch's
    rows when it came from `batches`)."""

    index: int
    words: list[str]
    input_ids: np.ndarray  # [L] int32
    segment_ids: np.ndarray  # [L] int32
    input_mask: np.ndarray  # [L] int32
    piece_word: np.ndarray  # [L] int32: the word of each position, -1 for specials/padding
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
    """`extract_step(params, batch) -> dict` of word vectors [B, N, W, D] (W = L: word slots;
    NaN for a word without pieces), pooled [CLS] [B, D] and mean-pooled last layer [B, D]."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}")

    def extract_step(params, batch):
        model = models.merge_params(graphdef, params)
        with axes.axis_rules(rules):
            out = model(
                batch["input_ids"],
                batch["input_mask"],
                batch["segment_ids"],
                output_hidden_states=True,
            )
        hidden = jnp.stack([out.hidden_states[i] for i in layers]).astype(jnp.float32)  # [N,B,L,D]
        length = batch["input_ids"].shape[1]
        piece_word = batch["piece_word"]
        # [B, L, W]: which word each position belongs to; `first` keeps each word's first piece.
        onehot = (piece_word[:, :, None] == jnp.arange(length)[None, None, :]).astype(jnp.float32)
        pieces = onehot.sum(axis=1)  # [B, W]
        pick = onehot * (jnp.cumsum(onehot, axis=1) == 1) if pooling == "first" else onehot
        words = jnp.einsum("blw,nbld->bnwd", pick, hidden)
        if pooling == "mean":
            words = words / jnp.maximum(pieces, 1.0)[:, None, :, None]
        mask = batch["input_mask"].astype(jnp.float32)
        mean = jnp.einsum("bl,bld->bd", mask, out.sequence_output.astype(jnp.float32))
        mean = mean / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        cls = out.pooled_output if out.pooled_output is not None else out.sequence_output[:, 0]
        words = jnp.where(pieces[:, None, :, None] > 0, words, jnp.nan)  # no piece: no vector
        return {"words": words, "cls": cls.astype(jnp.float32), "mean": mean}

    return extract_step


class _Output:
    """An output file written aside and published whole by `close()` (renamed into place,
    or uploaded to a bucket); `abort()` drops it, so a failed run leaves no partial file."""

    def __init__(self, path: str):
        self._stage = files.atomic_path(path)
        self.local = self._stage.__enter__()

    def close(self):
        self._stage.__exit__(None, None, None)

    def abort(self):
        self._stage.__exit__(RuntimeError, RuntimeError("aborted"), None)


class JsonlWriter(_Output):
    """The JSON-lines output (values rounded to 6 digits, as the original)."""

    def __init__(self, path: str, layers: Sequence[int], vocabulary: Sequence[str]):
        super().__init__(path)
        self.f = open(self.local, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.layers = list(layers)
        self.vocabulary = vocabulary

    def write(self, example: Example, features: np.ndarray, cls: np.ndarray, mean: np.ndarray):
        words = []
        kept = example.pieces(self.vocabulary)
        for w, (word, pieces) in enumerate(zip(example.words, kept, strict=True)):
            layers = (
                [
                    {"index": layer, "values": [round(float(x), 6) for x in features[n, w]]}
                    for n, layer in enumerate(self.layers)
                ]
                if pieces
                else None
            )
            words.append({"word": word, "pieces": pieces, "layers": layers})
        record = {
            "line_index": example.index,
            "words": words,
            "cls": [round(float(x), 6) for x in cls],
            "mean": [round(float(x), 6) for x in mean],
            "truncated": example.truncated,
        }
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self):
        self.f.close()
        super().close()

    def abort(self):
        self.f.close()
        super().abort()


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as one record: a length-prefixed JSON header (name, dtype, shape, offset),
    then the raw bytes; a tenth of the cost of an `.npz` archive per line."""
    header, blobs, offset = [], [], 0
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        header.append([name, value.dtype.str, list(value.shape), offset])
        blobs.append(value.tobytes())
        offset += len(blobs[-1])
    head = json.dumps(header).encode()
    return len(head).to_bytes(4, "little") + head + b"".join(blobs)


def decode_arrays(record: bytes) -> dict[str, np.ndarray]:
    """The arrays of an `encode_arrays` record."""
    n = int.from_bytes(record[:4], "little")
    body = memoryview(record)[4 + n :]
    out = {}
    for name, dtype, shape, offset in json.loads(record[4 : 4 + n]):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        out[name] = np.frombuffer(body[offset : offset + size], dtype).reshape(shape)
    return out


class ArrayRecordWriter(_Output):
    """One record per line in an ArrayRecord file (`encode_arrays`)."""

    def __init__(self, path: str, layers: Sequence[int], vocabulary: Sequence[str]):
        from array_record.python import array_record_module

        super().__init__(path)
        self.writer = array_record_module.ArrayRecordWriter(self.local, "group_size:1,uncompressed")
        self.layers = np.asarray(layers, np.int32)

    def write(self, example: Example, features: np.ndarray, cls: np.ndarray, mean: np.ndarray):
        record = encode_arrays(
            {
                "line_index": np.int64(example.index),
                "words": np.asarray(example.words, dtype=str),
                "features": features.astype(np.float32),
                "cls": cls,
                "mean": mean,
                "layers": self.layers,
                "truncated": np.bool_(example.truncated),
            }
        )
        self.writer.write(record)

    def close(self):
        self.writer.close()
        super().close()

    def abort(self):
        self.writer.close()
        super().abort()


def read_array_record(path: str) -> Iterator[dict[str, np.ndarray]]:
    """The records of an `.array_record` output, in line order."""
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(path)
    try:
        for i in range(reader.num_records()):
            yield decode_arrays(reader.read([i])[0])
    finally:
        reader.close()


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
            batched = batches(read_lines(input_path), tokenizer, max_seq_length, batch_size)
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
        examples = batch.pop("examples")
        out = run(sharding.global_batch(batch, mesh, rules))
        if pending is not None:
            truncated += _write(writer, *pending)
            lines += len(pending[1])
            bar.update(len(pending[1]))
        pending = (out, examples)
    if pending is not None:
        truncated += _write(writer, *pending)
        lines += len(pending[1])
        bar.update(len(pending[1]))
    return lines, truncated


def _write(writer, out, examples) -> int:
    """Writes a step's lines; returns how many were cut."""
    out = jax.device_get(out)
    for i, ex in enumerate(examples):
        writer.write(ex, out["words"][i, :, : len(ex.words)], out["cls"][i], out["mean"][i])
    return sum(ex.truncated for ex in examples)


def batches(lines, tokenizer, max_seq_length, batch_size) -> Iterator[dict]:
    """Batches of `batch_size` rows (the last padded with empty rows), each as long as the
    smallest of 16, 32, 64, ... `max_seq_length` that holds its longest line: short lines do
    not pay for the longest possible, and there are a few shapes to compile, not one per batch."""
    chunk: list[tuple[int, str, str | None]] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == batch_size:
            yield _batch(chunk, tokenizer, max_seq_length, batch_size)
            chunk = []
    if chunk:
        yield _batch(chunk, tokenizer, max_seq_length, batch_size)


def _batch(chunk, tokenizer, max_seq_length, batch_size) -> dict:
    # One tokenizer call for every segment of the batch (run in parallel by `tokenizers`).
    texts = [t for _, a, b in chunk for t in (a, b) if t is not None]
    per_text = iter(tokenizer.encode_word_ids(texts))
    rows = []
    for index, a, b in chunk:
        words, n_a = _segment_words(a, b)
        encoded = [next(per_text)] if b is None else [next(per_text), next(per_text)]
        rows.append((index, words, _layout(tokenizer, _offset_words(encoded, n_a), max_seq_length)))
    longest = max(len(ids) for _, _, (ids, _, _, _) in rows)
    length = 16
    while length < longest:
        length *= 2
    length = min(length, max_seq_length)
    ids = np.zeros((batch_size, length), np.int32)
    segments = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    piece_word = np.full((batch_size, length), -1, np.int32)
    examples = []
    for r, (index, words, (row_ids, row_words, second, truncated)) in enumerate(rows):
        n = len(row_ids)
        ids[r, :n], piece_word[r, :n], segments[r, second:n], mask[r, :n] = row_ids, row_words, 1, 1
        examples.append(
            Example(index, words, ids[r], segments[r], mask[r], piece_word[r], truncated)
        )
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
    parser.add_argument("--batch_size", type=int, default=32)
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
