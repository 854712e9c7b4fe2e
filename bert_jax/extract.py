"""Features from a trained encoder, streamed: per-word vectors of chosen layers, the pooled
[CLS] vector and the mean-pooled sentence vector, for every line of a text file.

    python -m bert_jax.extract --model=hf:/models/bert-base-cased --input=sentences.txt \
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
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from bert_jax import axes, cli, convert, models, sharding
from bert_jax.data.tokenization import Tokenizer

POOLINGS = ("first", "mean", "sum")


@dataclasses.dataclass(frozen=True)
class Example:
    """One input line: its words (segment A, then B), their pieces, and the model input."""

    index: int
    words: list[str]
    pieces: list[list[str]]  # per word, the pieces kept (empty: none, or cut off)
    input_ids: np.ndarray  # [L] int32
    segment_ids: np.ndarray  # [L] int32
    input_mask: np.ndarray  # [L] int32
    piece_word: np.ndarray  # [L] int32: the word of each position, -1 for specials/padding
    truncated: bool


def read_lines(path: str) -> Iterator[tuple[int, str, str | None]]:
    """(index, text A, text B or None) per line of a UTF-8 file, lazily."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for index, line in enumerate(f):
            a, sep, b = line.rstrip("\n").partition(" ||| ")
            yield index, a.strip(), (b.strip() if sep else None)


def encode(
    index: int,
    text_a: str,
    text_b: str | None,
    tokenizer: Tokenizer,
    max_seq_length: int,
    ids: list[list[int]] | None = None,
    pieces: Sequence[str] | None = None,
) -> Example:
    """`[CLS] A [SEP] (B [SEP])` with each piece tagged by its word.

    Args:
      ids: the pieces of each word, when the caller tokenized many lines' words at once.
      pieces: the vocabulary as strings (`vocabulary(tokenizer)`), to name pieces fast.
    """
    segments = [text_a.split()] + ([text_b.split()] if text_b is not None else [])
    words = [w for seg in segments for w in seg]
    if ids is None:
        ids = [w for seg in segments for w in tokenizer.encode_words([" ".join(seg)])[0]]
    # Pieces of each segment, as (word index, id); cut like run_classifier/extract_features.
    tagged, start = [], 0
    for seg in segments:
        tagged.append([(start + i, t) for i, w in enumerate(seg) for t in ids[start + i]])
        start += len(seg)
    budget = max_seq_length - 1 - len(tagged)
    truncated = sum(map(len, tagged)) > budget
    if len(tagged) == 1:
        tagged[0] = tagged[0][:budget]
    else:
        while len(tagged[0]) + len(tagged[1]) > budget:
            (tagged[0] if len(tagged[0]) > len(tagged[1]) else tagged[1]).pop()
    input_ids = np.zeros(max_seq_length, np.int32)
    segment_ids = np.zeros(max_seq_length, np.int32)
    piece_word = np.full(max_seq_length, -1, np.int32)
    pos = 0
    input_ids[pos] = tokenizer.cls_id
    pos += 1
    kept: list[list[str]] = [[] for _ in words]
    for s, seg in enumerate(tagged):
        for word, token in seg:
            input_ids[pos], segment_ids[pos], piece_word[pos] = token, s, word
            kept[word].append(pieces[token] if pieces else tokenizer.id_to_token(token))
            pos += 1
        input_ids[pos], segment_ids[pos] = tokenizer.sep_id, s
        pos += 1
    input_mask = (np.arange(max_seq_length) < pos).astype(np.int32)
    return Example(index, words, kept, input_ids, segment_ids, input_mask, piece_word, truncated)


def vocabulary(tokenizer: Tokenizer) -> list[str]:
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


def make_extract_step(graphdef, layers: Sequence[int], pooling: str, rules=axes.DEFAULT_RULES):
    """`extract_step(params, batch) -> dict` of word vectors [B, N, W, D] (W = L: word slots),
    pieces per word [B, W], pooled [CLS] [B, D] and mean-pooled last layer [B, D]."""
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
        return {"words": words, "pieces": pieces, "cls": cls.astype(jnp.float32), "mean": mean}

    return extract_step


class JsonlWriter:
    """The JSON-lines output (values rounded to 6 digits, as the original)."""

    def __init__(self, path: str, layers: Sequence[int]):
        self.f = open(path, "w", encoding="utf-8")
        self.layers = list(layers)

    def write(self, example: Example, features: np.ndarray, cls: np.ndarray, mean: np.ndarray):
        words = []
        for w, (word, pieces) in enumerate(zip(example.words, example.pieces, strict=True)):
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


class ArrayRecordWriter:
    """One record per line in an ArrayRecord file (`encode_arrays`)."""

    def __init__(self, path: str, layers: Sequence[int]):
        from array_record.python import array_record_module

        self.writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
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
    progress: bool = True,
) -> dict:
    """Writes the features of every line of `input_path` to `output_path`; returns counts.

    Args:
      model: `hf:DIR`, `tf:DIR` or a bert_jax workdir (as `--config.init_from`).
      layers: hidden-state indices: 0 the embeddings, 1..N the layers, negative from the end.
    """
    ext = os.path.splitext(output_path)[1]
    if ext not in (".jsonl", ".array_record"):
        raise ValueError(f"--output={output_path}: use a .jsonl or .array_record file name")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input={input_path} does not exist")
    mesh = mesh or sharding.make_mesh(sharding.MeshConfig())
    data_size = sharding.data_parallel_size(mesh, axes.DEFAULT_RULES)
    if batch_size % data_size:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the data axes ({data_size})"
        )
    pretrained = convert.load_pretrained(model, "BertModel", mesh=mesh)
    config, tokenizer = pretrained.config, pretrained.tokenizer
    if max_seq_length > config.max_position_embeddings:
        raise ValueError(
            f"max_seq_length={max_seq_length} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    n_states = config.num_hidden_layers + 1
    bad = [i for i in layers if not -n_states <= i < n_states]
    if bad:
        raise ValueError(
            f"layers {bad} do not exist: the model has hidden states 0 (embeddings) to "
            f"{n_states - 1} (-1 is the last layer)"
        )
    graphdef, _ = models.split_params(models.abstract_model(config, models.BertModel))
    step = jax.jit(make_extract_step(graphdef, tuple(layers), pooling))
    writer = (JsonlWriter if ext == ".jsonl" else ArrayRecordWriter)(output_path, layers)
    with open(input_path, "rb") as f:
        total = sum(1 for _ in f)
    lines, truncated = 0, 0
    bar = tqdm.tqdm(total=total, unit="line", desc="extract", disable=not progress)
    try:
        with jax.set_mesh(mesh):
            for batch in batches(read_lines(input_path), tokenizer, max_seq_length, batch_size):
                examples = batch.pop("examples")
                out = jax.device_get(
                    step(pretrained.params, sharding.global_batch(batch, mesh, axes.DEFAULT_RULES))
                )
                for i, ex in enumerate(examples):
                    features = out["words"][i, :, : len(ex.words)]
                    features = np.where(
                        out["pieces"][i, None, : len(ex.words), None] > 0, features, np.nan
                    )
                    writer.write(ex, features, out["cls"][i], out["mean"][i])
                    truncated += ex.truncated
                lines += len(examples)
                bar.update(len(examples))
    finally:
        bar.close()
        writer.close()
    return {"lines": lines, "truncated": truncated, "output": output_path}


def batches(lines, tokenizer, max_seq_length, batch_size) -> Iterator[dict]:
    """Batches of `batch_size` rows (the last padded with empty rows), each as long as the
    smallest of 16, 32, 64, ... `max_seq_length` that holds its longest line: short lines do
    not pay for the longest possible, and there are a few shapes to compile, not one per batch."""
    pieces = vocabulary(tokenizer)
    chunk: list[tuple[int, str, str | None]] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == batch_size:
            yield _batch(chunk, tokenizer, pieces, max_seq_length, batch_size)
            chunk = []
    if chunk:
        yield _batch(chunk, tokenizer, pieces, max_seq_length, batch_size)


def _batch(chunk, tokenizer, pieces, max_seq_length, batch_size) -> dict:
    # One tokenizer call for every segment of the batch (run in parallel by `tokenizers`).
    texts = [t for _, a, b in chunk for t in (a, b) if t is not None]
    per_text = iter(tokenizer.encode_words(texts))
    examples = []
    for index, a, b in chunk:
        ids = [w for t in (a, b) if t is not None for w in next(per_text)]
        examples.append(encode(index, a, b, tokenizer, max_seq_length, ids, pieces))
    longest = max(int(e.input_mask.sum()) for e in examples)
    length = 16
    while length < longest:
        length *= 2
    length = min(length, max_seq_length)
    pad = batch_size - len(examples)
    batch = {"examples": examples}
    for key in ("input_ids", "segment_ids", "input_mask", "piece_word"):
        rows = np.stack([getattr(e, key)[:length] for e in examples])
        fill = np.full((pad, length), -1 if key == "piece_word" else 0, np.int32)
        batch[key] = np.concatenate([rows, fill]).astype(np.int32)
    return batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bert_jax.extract", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True, help="hf:DIR, tf:DIR or a bert_jax workdir")
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
    )
    print(
        f"wrote the features of {result['lines']} lines to {result['output']} "
        f"({result['truncated']} cut at {args.max_seq_length} pieces)"
    )


if __name__ == "__main__":
    cli.run(main)
