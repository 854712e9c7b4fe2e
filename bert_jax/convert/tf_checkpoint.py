"""Reads TensorFlow checkpoints (the TensorBundle format of `tf.train.Saver`) without TensorFlow.

A checkpoint `model.ckpt` is `model.ckpt.index`, an SSTable (LevelDB table format) that maps
each variable name to a `BundleEntryProto` (dtype, shape, shard, offset, size), and
`model.ckpt.data-0000i-of-0000n`, the raw little-endian bytes. Both are small, stable formats,
so the released google-research/bert checkpoints load with numpy alone; tensorflow stays an
optional dependency. The few protobuf fields needed are decoded by hand.
"""

import os
import re
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from bert_jax import files

_MAGIC = 0xDB4775248B80FB57
_FOOTER_BYTES = 48
_BLOCK_TRAILER_BYTES = 5
# tensorflow/core/framework/types.proto
_DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    9: np.int64,
    10: np.bool_,
    14: ml_dtypes.bfloat16,
    19: np.float16,
}


class TFCheckpoint:
    """The variables of one TensorFlow checkpoint, read on demand.

    Args:
      path: the checkpoint prefix (`.../bert_model.ckpt`), its `.index` file, or a directory
        holding one checkpoint (or a `checkpoint` file naming the latest).

    Raises:
      FileNotFoundError when no checkpoint is there; ValueError when the index is damaged.
    """

    def __init__(self, path: str | os.PathLike):
        self.prefix = find_prefix(os.fspath(path))
        index_file = self.prefix + ".index"
        with files.open(index_file, "rb") as f:
            data = f.read()
        try:
            entries = dict(_read_table(data))
        except (IndexError, struct.error, ValueError) as e:
            raise ValueError(
                f"{index_file} is not a readable TensorFlow checkpoint index ({e}); the file is "
                f"damaged or truncated: copy the checkpoint again"
            ) from e
        header = _fields(entries.pop(b"", b""))
        self.num_shards = int(header.get(1, [1])[0])
        self._entries = {k.decode("utf-8"): _parse_entry(v) for k, v in entries.items()}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)["shape"]

    def read(self, name: str) -> np.ndarray:
        """The value of variable `name` as a numpy array of its stored dtype."""
        entry = self._entry(name)
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"variable {name} has TensorFlow dtype {entry['dtype']}, not numeric")
        if entry["slices"]:
            raise ValueError(f"variable {name} is stored in partitioned slices (not supported)")
        data_file = f"{self.prefix}.data-{entry['shard']:05d}-of-{self.num_shards:05d}"
        with files.open(data_file, "rb") as f:
            f.seek(entry["offset"])
            raw = f.read(entry["size"])
        if len(raw) != entry["size"]:
            raise ValueError(
                f"{data_file} is truncated: variable {name} needs bytes {entry['offset']} to "
                f"{entry['offset'] + entry['size']}; copy the checkpoint again"
            )
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(entry["shape"])

    def _entry(self, name: str) -> dict:
        if name not in self._entries:
            raise KeyError(f"TensorFlow checkpoint {self.prefix} has no variable {name!r}")
        return self._entries[name]


def find_prefix(path: str) -> str:
    """The checkpoint prefix that `path` (prefix, index file or directory) designates."""
    if path.endswith(".index") and files.isfile(path):
        return path[: -len(".index")]
    if files.isfile(path + ".index"):
        return path
    if files.isdir(path):
        pointer = os.path.join(path, "checkpoint")
        if files.isfile(pointer):
            with files.open(pointer, encoding="utf-8") as f:
                match = re.search(r'^model_checkpoint_path:\s*"(.*)"', f.read(), re.M)
            if match:  # the named path may be absolute and stale after the folder moved
                named = os.path.join(path, match[1])
                if not files.isfile(named + ".index"):
                    named = os.path.join(path, os.path.basename(match[1]))
                return find_prefix(named)
        indexes = sorted(files.glob(os.path.join(path, "*.index")))
        if len(indexes) == 1:
            return indexes[0][: -len(".index")]
        if len(indexes) > 1:
            raise ValueError(
                f"{path} holds several checkpoints ({[os.path.basename(i) for i in indexes]}); "
                f"pass the prefix of one, e.g. {indexes[-1][: -len('.index')]}"
            )
    raise FileNotFoundError(
        f"no TensorFlow checkpoint at {path}: expected <prefix>.index and <prefix>.data-* files "
        f"(e.g. bert_model.ckpt.index) or a directory holding them"
    )


def _read_table(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every entry of an SSTable held in `data`."""
    if len(data) < _FOOTER_BYTES:
        raise ValueError(f"{len(data)} bytes is shorter than the table footer")
    footer = data[-_FOOTER_BYTES:]
    if struct.unpack("<Q", footer[-8:])[0] != _MAGIC:
        raise ValueError("the table magic number is missing")
    pos = 0
    _, pos = _varint(footer, pos)  # metaindex offset
    _, pos = _varint(footer, pos)  # metaindex size
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    for _, handle in _read_block(data, index_offset, index_size):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        yield from _read_block(data, offset, size)


def _read_block(data: bytes, offset: int, size: int) -> Iterator[tuple[bytes, bytes]]:
    if offset + size + _BLOCK_TRAILER_BYTES > len(data):
        raise ValueError(f"block at {offset} runs past the end of the file")
    if data[offset + size] != 0:
        raise ValueError(f"block at {offset} is compressed (type {data[offset + size]})")
    block = data[offset : offset + size]
    num_restarts = struct.unpack("<I", block[-4:])[0]
    end = len(block) - 4 * (num_restarts + 1)
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(message: bytes) -> dict[int, list]:
    """Field number -> values of a protobuf message (varints as int, the rest as bytes)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(message):
        tag, pos = _varint(message, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire == 1:
            value, pos = message[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(message, pos)
            value, pos = message[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = message[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _parse_entry(value: bytes) -> dict:
    """A `BundleEntryProto`: dtype=1, shape=2, shard_id=3, offset=4, size=5, slices=7."""
    fields = _fields(value)
    shape_fields = _fields(fields[2][0]) if 2 in fields else {}
    dims = tuple(int(_fields(d).get(1, [0])[0]) for d in shape_fields.get(2, []))
    return {
        "dtype": fields.get(1, [0])[0],
        "shape": dims,
        "shard": fields.get(3, [0])[0],
        "offset": fields.get(4, [0])[0],
        "size": fields.get(5, [0])[0],
        "slices": fields.get(7, []),
    }
