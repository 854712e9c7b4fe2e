"""The output files of feature extraction (`extract`): JSON lines, or ArrayRecord records of
named raw arrays (`encode_arrays`), each written aside and published whole."""

import json
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from bert_jax import files


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

    def write(self, example, features: np.ndarray, cls: np.ndarray, mean: np.ndarray):
        words = []
        kept = example.pieces(self.vocabulary)
        values = _rounded(features)  # [N][W][D] Python floats, rounded in one NumPy call
        for w, (word, pieces) in enumerate(zip(example.words, kept, strict=True)):
            layers = (
                [{"index": layer, "values": values[n][w]} for n, layer in enumerate(self.layers)]
                if pieces
                else None
            )
            words.append({"word": word, "pieces": pieces, "layers": layers})
        record = {
            "line_index": example.index,
            "words": words,
            "cls": _rounded(cls),
            "mean": _rounded(mean),
            "truncated": example.truncated,
        }
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self):
        self.f.close()
        super().close()

    def abort(self):
        self.f.close()
        super().abort()


def _rounded(x: np.ndarray) -> list:
    """`x` as nested lists of floats rounded to 6 decimals (NaN where `x` has one)."""
    return np.round(np.asarray(x, np.float64), 6).tolist()


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

    def write(self, example, features: np.ndarray, cls: np.ndarray, mean: np.ndarray):
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
