"""Corpora -> tokenizer + cached pretraining instances -> resumable fixed-shape host batches.

A corpus is text files in the original BERT format (one sentence per line, a blank line between
documents). With no corpus given, the default corpus is built from the docstrings of the Python
standard library (one document per docstring), which every Python installation carries.
Instances are built once per (corpus, vocabulary, masking config, seed) and cached as `.npz`;
every file is written under a temporary name and renamed, so a crash never leaves a partial one.
"""

import ast
import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator

import numpy as np

from bert_jax import pretraining_data, tokenization
from bert_jax.pretraining_data import MaskingConfig

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes instances.

    corpus: comma-separated paths or globs of text files; empty for the default corpus.
    vocab_file: a WordPiece `vocab.txt`; empty to learn one of `vocab_size` from the corpus.
    eval_fraction: share of the documents held out for evaluation (never trained on).
    cache_dir: where corpora, vocabularies and instances are cached; empty for
      `$BERT_JAX_CACHE` or `~/.cache/bert_jax`.
    """

    corpus: str = ""
    vocab_file: str = ""
    vocab_size: int = 8192
    do_lower_case: bool = True
    masking: MaskingConfig = MaskingConfig()
    eval_fraction: float = 0.05
    cache_dir: str = ""
    seed: int = 12345


@dataclasses.dataclass
class PretrainingDataset:
    tokenizer: tokenization.WordPieceTokenizer
    train: Batch
    eval: Batch


def cache_dir(config: DataConfig) -> str:
    default = os.environ.get(
        "BERT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bert_jax")
    )
    return config.cache_dir or default


def corpus_files(config: DataConfig) -> list[str]:
    """The corpus text files, building the default corpus when none is configured."""
    if not config.corpus:
        return [build_stdlib_corpus(os.path.join(cache_dir(config), "corpora"))]
    files: list[str] = []
    for pattern in (p.strip() for p in config.corpus.split(",") if p.strip()):
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise FileNotFoundError(
                f"corpus path {pattern!r} matches no file; give text files (one sentence per "
                f"line, blank line between documents) or leave data.corpus empty for the default"
            )
        files.extend(m for m in matched if os.path.isfile(m))
    return files


def read_documents(files: list[str]) -> list[list[str]]:
    """Documents (lists of sentences) from text files in the original BERT format."""
    documents: list[list[str]] = [[]]
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line:
                    documents[-1].append(line)
                elif documents[-1]:
                    documents.append([])
        if documents[-1]:
            documents.append([])
    return [d for d in documents if d]


def build_stdlib_corpus(directory: str) -> str:
    """Writes (once) the default corpus: the Python standard library's docstrings.

    The sources are parsed with `ast`, never imported. Each module is one document: the
    sentences of its module, class and function docstrings in source order (docstrings alone
    are mostly one or two sentences, too short for next-sentence pairs). Paragraphs are split
    into sentences at sentence-final punctuation.

    Returns:
      The path of the corpus file.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = os.path.join(directory, f"python{version}_stdlib_docstrings.txt")
    if os.path.exists(path):
        return path
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    documents = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(n for n in names if n.endswith(".py")):
            sentences = _docstring_sentences(os.path.join(folder, name))
            if sentences:
                documents.append(sentences)
    text = "\n\n".join("\n".join(doc) for doc in documents) + "\n"
    _atomic_write(path, text.encode("utf-8"))
    return path


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


def _docstring_sentences(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted(
        (n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0)
    )
    sentences = []
    for node in nodes:
        for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
            sentences.extend(s for s in _SENTENCE_END.split(" ".join(paragraph.split())) if s)
    return sentences


def make_tokenizer(config: DataConfig, files: list[str]) -> tokenization.WordPieceTokenizer:
    """The configured vocabulary, or one learned from the corpus (cached by corpus hash)."""
    if config.vocab_file:
        return tokenization.WordPieceTokenizer(
            config.vocab_file, do_lower_case=config.do_lower_case
        )
    key = _digest([_file_digest(f) for f in files], config.vocab_size, config.do_lower_case)
    vocab = os.path.join(cache_dir(config), "vocab", f"wordpiece_{config.vocab_size}_{key}.txt")
    if not os.path.exists(vocab):
        tokenization.train_wordpiece_vocab(
            files, vocab, vocab_size=config.vocab_size, do_lower_case=config.do_lower_case
        )
    return tokenization.WordPieceTokenizer(vocab, do_lower_case=config.do_lower_case)


def load_pretraining_data(config: DataConfig) -> PretrainingDataset:
    """Tokenizer and train/eval instances for `config`, built once and cached."""
    files = corpus_files(config)
    tokenizer = make_tokenizer(config, files)
    key = _digest(
        [_file_digest(f) for f in files],
        _file_digest(tokenizer.vocab_file),
        dataclasses.asdict(config.masking),
        config.eval_fraction,
        config.seed,
    )
    path = os.path.join(cache_dir(config), "instances", f"{key}.npz")
    if not os.path.exists(path):
        train, eval_ = _build_instances(config, files, tokenizer)
        arrays = {f"train/{k}": v for k, v in train.items()} | {
            f"eval/{k}": v for k, v in eval_.items()
        }
        fd, tmp = tempfile.mkstemp(dir=_makedirs(os.path.dirname(path)), suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    with np.load(path) as data:
        train = {k: data[f"train/{k}"] for k in pretraining_data.FEATURES}
        eval_ = {k: data[f"eval/{k}"] for k in pretraining_data.FEATURES}
    return PretrainingDataset(tokenizer, train, eval_)


def _build_instances(config, files, tokenizer):
    documents = read_documents(files)
    if not any(len(d) >= 2 for d in documents):
        raise ValueError(
            f"corpus {files} has no document with two or more sentences; the format is one "
            f"sentence per line with a blank line between documents"
        )
    flat = tokenizer.encode_batch([s for d in documents for s in d])
    tokenized, start = [], 0
    for d in documents:
        tokenized.append(flat[start : start + len(d)])
        start += len(d)
    order = np.random.default_rng(config.seed).permutation(len(tokenized))
    n_eval = max(1, int(round(len(tokenized) * config.eval_fraction)))
    held_out = [tokenized[i] for i in order[:n_eval]]
    kept = [tokenized[i] for i in order[n_eval:]]
    ids = pretraining_data.SpecialIds(
        cls_id=tokenizer.cls_id,
        sep_id=tokenizer.sep_id,
        mask_id=tokenizer.mask_id,
        vocab_size=tokenizer.vocab_size,
        is_continuation=np.array(tokenizer.is_continuation()),
    )
    train = pretraining_data.create_instances(kept, config.masking, ids, config.seed)
    eval_ = pretraining_data.create_instances(held_out, config.masking, ids, config.seed + 1)
    return train, eval_


class BatchIterator(Iterator[Batch]):
    """Endless shuffled batches over in-memory instances; resumable from `state()`.

    Each epoch is a fresh permutation seeded by (seed, epoch); the remainder is dropped. A
    process yields only its own contiguous share of every global batch.
    """

    def __init__(
        self,
        arrays: Batch,
        global_batch_size: int,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        n = len(next(iter(arrays.values())))
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        if n < global_batch_size:
            raise ValueError(
                f"only {n} instances for a batch of {global_batch_size}; use a larger corpus, "
                f"a larger data.masking.dupe_factor or a smaller batch"
            )
        self.arrays = arrays
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.local = global_batch_size // process_count
        self.offset = process_index * self.local
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        n = len(next(iter(self.arrays.values())))
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def __next__(self) -> Batch:
        if self.position + self.global_batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        start = self.position + self.offset
        rows = np.sort(self._order[start : start + self.local])
        self.position += self.global_batch_size
        return {k: v[rows] for k, v in self.arrays.items()}

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"iterator state was saved with seed {state['seed']}, not {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


def eval_batches(arrays: Batch, global_batch_size: int, max_batches: int) -> list[Batch]:
    """The first `max_batches` full batches of the held-out instances, in a fixed order."""
    n = len(next(iter(arrays.values())))
    count = min(max_batches, n // global_batch_size)
    if count == 0:
        raise ValueError(f"only {n} held-out instances for an eval batch of {global_batch_size}")
    return [
        {k: v[i * global_batch_size : (i + 1) * global_batch_size] for k, v in arrays.items()}
        for i in range(count)
    ]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _makedirs(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    return directory


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=_makedirs(os.path.dirname(path)), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
