"""Corpus -> tokenizer -> sharded ArrayRecord pairs -> grain loader of fixed-shape batches.

Preprocessing (`prepare`) tokenizes the documents once, cuts sentence pairs (`pretraining_data`)
and writes them to `num_shards` ArrayRecord files, one process per shard. A shard counts as done
when its stats file exists, written after both of its record files were renamed into place, so
an interrupted run redoes only unfinished shards and never trusts a half-written one.

Loading (`PretrainingData.train_iterator`) is a grain pipeline: each process takes a disjoint
slice of the pairs, shuffles it per epoch from the seed, masks each pair (dynamically: new masks
every epoch, drawn from the seed and the element's position; or statically), batches, and
prefetches in worker processes. The iterator's state is a small dict saved with checkpoints; a
restored iterator yields exactly the batches an uninterrupted one would have.
"""

import dataclasses
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator

import grain
import numpy as np
import tqdm
from absl import flags
from array_record.python import array_record_module

from bert_jax import files
from bert_jax.data import corpus, pretraining_data, tokenization
from bert_jax.data.pretraining_data import MaskingConfig

Batch = dict[str, np.ndarray]
_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches.

    corpus: comma-separated paths or globs of text files; with neither this nor `tfds_name`,
      the default corpus (the Python standard library's docstrings).
    tfds_name / tfds_split / tfds_data_dir / tfds_text_key: a TFDS text corpus prepared as
      ArrayRecord, read without tensorflow.
    tokenizer: "wordpiece" (BERT), "sentencepiece" (ALBERT) or "huggingface" (a released
      `tokenizer.json`: RoBERTa's, XLM-R's, ModernBERT's; given as vocab_file).
    keep_accents: SentencePiece only: keep accents (ALBERT strips them by default).
    vocab_file: a `vocab.txt`, SentencePiece `.model` or `tokenizer.json`; empty to learn one
      of `vocab_size`.
    eval_fraction: share of documents held out for evaluation (never trained on).
    cache_dir: corpora, vocabularies and shards; empty for $BERT_JAX_CACHE or ~/.cache/bert_jax.
    preprocessed_dir: write/read the shards here instead of a cache folder named by a hash.
    num_shards / preprocess_workers: shard files and processes writing them (0: all cores).
    loader_workers: grain worker processes that mask and batch (0: in the training process).
    """

    corpus: str = ""
    tfds_name: str = ""
    tfds_split: str = "train"
    tfds_data_dir: str = ""
    tfds_text_key: str = "text"
    tokenizer: str = "wordpiece"
    vocab_file: str = ""
    vocab_size: int = 8192
    spm_model_type: str = "unigram"
    do_lower_case: bool = True
    keep_accents: bool = False
    masking: MaskingConfig = MaskingConfig()
    eval_fraction: float = 0.05
    cache_dir: str = ""
    preprocessed_dir: str = ""
    seed: int = 12345
    num_shards: int = 8
    preprocess_workers: int = 0
    loader_workers: int = 0

    def __post_init__(self):
        if self.tokenizer not in tokenization.FILE_NAMES:
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r}; use one of {sorted(tokenization.FILE_NAMES)}"
            )
        if self.tokenizer == "huggingface" and not self.vocab_file:
            raise ValueError(
                "data.tokenizer='huggingface' reads a tokenizer.json: set data.vocab_file to it "
                "(bert_jax learns WordPiece and SentencePiece vocabularies only)"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")
        if self.num_shards < 1:
            raise ValueError("data.num_shards must be at least 1")


def cache_dir(config: DataConfig) -> str:
    return config.cache_dir or files.cache_root()


def corpus_files(config: DataConfig) -> list[str]:
    """The corpus text files (none for a TFDS corpus); builds the default corpus if needed."""
    if config.tfds_name:
        return []
    if not config.corpus:
        return [corpus.build_stdlib_corpus(os.path.join(cache_dir(config), "corpora"))]
    found: list[str] = []
    for pattern in (p.strip() for p in config.corpus.split(",") if p.strip()):
        problem = files.backend_problem(pattern)
        if problem:
            raise ValueError(f"data.corpus: {problem}")
        matched = [m for m in files.glob(pattern) if files.isfile(m)]
        if not matched:
            raise FileNotFoundError(
                f"corpus path {pattern!r} matches no file; give text files (one sentence per "
                f"line, blank line between documents) or leave data.corpus empty for the default"
            )
        found.extend(matched)
    return found


def iter_documents(config: DataConfig, stats: corpus.CorpusStats) -> Iterator[list[str]]:
    if config.tfds_name:
        return corpus.iter_tfds_documents(
            config.tfds_name, config.tfds_split, config.tfds_data_dir, config.tfds_text_key, stats
        )
    return corpus.iter_text_documents(corpus_files(config), stats)


def config_tokenizer(config: DataConfig, path: str) -> tokenization.Tokenizer:
    return tokenization.load(config.tokenizer, path, config.do_lower_case, config.keep_accents)


def make_tokenizer(config: DataConfig) -> tokenization.Tokenizer:
    """The configured vocabulary, or one learned from the corpus (cached by corpus identity).

    Learning reads the corpus as the pairs do (`corpus.iter_text_documents`): invalid UTF-8
    is replaced and counted, and the files that had it are named in a warning.
    """
    if config.vocab_file:
        return config_tokenizer(config, config.vocab_file)
    suffix = "model" if config.tokenizer == "sentencepiece" else "txt"
    key = _digest(
        _corpus_identity(config), config.vocab_size, config.do_lower_case, config.keep_accents
    )
    name = f"{config.tokenizer}_{config.spm_model_type}_{config.vocab_size}_{key}.{suffix}"
    path = os.path.join(cache_dir(config), "vocab", name)
    if not files.exists(path):
        stats = corpus.CorpusStats()
        sentences = (s for d in iter_documents(config, stats) for s in d)
        if config.tokenizer == "sentencepiece":
            tokenization.train_sentencepiece(
                sentences,
                path,
                vocab_size=config.vocab_size,
                model_type=config.spm_model_type,
                do_lower_case=config.do_lower_case,
                keep_accents=config.keep_accents,
            )
        else:
            tokenization.train_wordpiece_vocab(
                sentences, path, vocab_size=config.vocab_size, do_lower_case=config.do_lower_case
            )
        for problem in stats.report():
            tqdm.tqdm.write(f"warning: while learning the vocabulary: {problem}")
    return config_tokenizer(config, path)


def special_ids(tokenizer: tokenization.Tokenizer) -> pretraining_data.SpecialIds:
    return pretraining_data.SpecialIds(
        cls_id=tokenizer.cls_id,
        sep_id=tokenizer.sep_id,
        mask_id=tokenizer.mask_id,
        vocab_size=tokenizer.vocab_size,
        is_continuation=np.array(tokenizer.is_continuation()),
    )


@dataclasses.dataclass
class PretrainingData:
    """The tokenizer and the preprocessed pairs of one DataConfig, ready to be loaded."""

    config: DataConfig
    tokenizer: tokenization.Tokenizer
    directory: str
    metadata: dict

    def _source(self, split: str) -> grain.MapDataset:
        paths = [os.path.join(self.directory, s) for s in self.metadata["shards"][split]]
        return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(_Decode())

    def train_iterator(
        self, global_batch_size: int, *, seed: int, process_index: int = 0, process_count: int = 1
    ) -> grain.DatasetIterator:
        """Endless batches of this process's rows: [global_batch_size / process_count, ...].

        The global order (shuffle, masks) depends on the seed alone; process p decodes and
        masks only rows [p * local, (p + 1) * local) of every global batch, so any number of
        processes assembles the same global batches.
        """
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        local = global_batch_size // process_count
        ds = self._source("train")
        if len(ds) < global_batch_size:
            raise ValueError(
                f"only {len(ds)} training pairs for a batch of {global_batch_size}; use a "
                f"larger corpus, a larger data.masking.dupe_factor or a smaller batch"
            )
        masking, ids = self.config.masking, special_ids(self.tokenizer)
        if not masking.dynamic_masking:
            ds = ds.map_with_index(_StaticMask(masking, ids, seed, len(ds)))
        ds = ds.shuffle(seed=seed)
        if masking.dynamic_masking:
            ds = ds.random_map(_DynamicMask(masking, ids), seed=seed)
        rows = _HostRows(ds.repeat(None), global_batch_size, local, process_index * local)
        host = grain.MapDataset.range(2**62).map(rows)
        host = host.batch(local, drop_remainder=True).to_iter_dataset()
        if self.config.loader_workers > 0:
            if not flags.FLAGS.is_parsed():
                # grain's workers read absl flags; outside an absl app (a notebook, a
                # test) take their defaults.
                flags.FLAGS.mark_as_parsed()
            options = grain.MultiprocessingOptions(num_workers=self.config.loader_workers)
            host = host.mp_prefetch(options)
        return iter(host)

    def eval_batches(
        self, global_batch_size: int, max_batches: int, *, process_index=0, process_count=1
    ) -> list[Batch]:
        """The first `max_batches` held-out batches (this process's rows), fixed masks."""
        source = self._source("eval")
        n = len(source)
        count = min(max_batches, n // global_batch_size)
        if count == 0:
            raise ValueError(
                f"only {n} held-out pairs for an eval batch of {global_batch_size}; raise "
                f"data.eval_fraction or lower train.batch_size"
            )
        local = global_batch_size // process_count
        ds = source[: count * global_batch_size]
        ds = ds.map_with_index(
            _StaticMask(self.config.masking, special_ids(self.tokenizer), self.config.seed + 1, n)
        )
        batches = list(ds.batch(global_batch_size))
        return [
            {k: v[process_index * local : (process_index + 1) * local] for k, v in b.items()}
            for b in batches
        ]


class _HostRows(grain.transforms.Map):
    """This process's k-th element -> its row of the global stream (random access)."""

    def __init__(self, stream: grain.MapDataset, global_batch: int, local: int, offset: int):
        self.stream, self.global_batch, self.local, self.offset = (
            stream,
            global_batch,
            local,
            offset,
        )

    def map(self, k: int) -> Batch:
        batch, row = divmod(k, self.local)
        return self.stream[batch * self.global_batch + self.offset + row]


class _Decode(grain.transforms.Map):
    def map(self, record: bytes) -> pretraining_data.Pair:
        return pretraining_data.decode_pair(record)


class _DynamicMask(grain.transforms.RandomMap):
    def __init__(self, masking: MaskingConfig, ids: pretraining_data.SpecialIds):
        self.masking, self.ids = masking, ids

    def random_map(self, pair, rng: np.random.Generator) -> Batch:
        return pretraining_data.make_instance(pair, self.masking, self.ids, rng)


class _StaticMask(grain.transforms.MapWithIndex):
    """Masks drawn from (seed, pair index) alone: the same in every epoch."""

    def __init__(self, masking: MaskingConfig, ids: pretraining_data.SpecialIds, seed: int, n: int):
        self.masking, self.ids, self.seed, self.n = masking, ids, seed, n

    def map_with_index(self, index: int, pair) -> Batch:
        # A repeated grain dataset passes indices past its length (epoch * n + i).
        rng = np.random.default_rng([self.seed, index % self.n])
        return pretraining_data.make_instance(pair, self.masking, self.ids, rng)


def load_pretraining_data(config: DataConfig) -> PretrainingData:
    """Tokenizer and preprocessed shards for `config`, preparing whatever is missing."""
    tokenizer = make_tokenizer(config)
    directory = config.preprocessed_dir or os.path.join(
        cache_dir(config), "pairs", _digest(_shard_settings(config, tokenizer))
    )
    metadata = prepare(config, tokenizer, directory)
    return PretrainingData(config, tokenizer, directory, metadata)


def prepare(config: DataConfig, tokenizer: tokenization.Tokenizer, directory: str) -> dict:
    """Writes the sharded pairs (skipping finished shards) and returns the metadata.

    Raises:
      ValueError when the directory holds shards made with other settings (another tokenizer,
      masking or seed), or when the corpus yields no usable pair.
    """
    settings = _shard_settings(config, tokenizer)
    meta_path = os.path.join(directory, "metadata.json")
    if files.exists(meta_path):
        metadata = json.loads(files.read_bytes(meta_path))
        _check_settings(metadata["settings"], settings, directory)
        return metadata
    files.makedirs(directory)
    for name in files.listdir(directory):
        if name.startswith("stats-"):
            found = json.loads(files.read_bytes(os.path.join(directory, name)))
            _check_settings(found["settings"], settings, directory)
    jobs = [(config, tokenizer.vocab_file, directory, shard) for shard in range(config.num_shards)]
    workers = min(config.preprocess_workers or os.cpu_count() or 1, config.num_shards)
    results = []
    bar = tqdm.tqdm(total=len(jobs), desc="preprocess", unit="shard", dynamic_ncols=True)
    if workers == 1:
        for job in jobs:
            results.append(_write_shard(job))
            bar.update(1)
    else:
        # spawn, not fork: the parent may already run JAX's threads.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap_unordered(_write_shard, jobs):
                results.append(result)
                bar.update(1)
    bar.close()
    return _write_metadata(directory, settings, sorted(results, key=lambda r: r["shard"]))


def _write_metadata(directory: str, settings: dict, results: list[dict]) -> dict:
    totals = {
        k: sum(r[k] for r in results) for k in ("documents", "single_sentence", "train", "eval")
    }
    problems = [p for r in results for p in r["problems"]]
    for problem in sorted(set(problems)):
        tqdm.tqdm.write(f"warning: {problem}")
    if totals["train"] == 0:
        raise ValueError(
            f"the corpus gave no training pair: {totals['documents']} documents, of which "
            f"{totals['single_sentence']} have a single sentence (skipped); documents need two "
            f"or more sentences, one per line, with a blank line between documents"
        )
    metadata = {
        "format_version": _FORMAT_VERSION,
        "settings": settings,
        "counts": totals,
        "shards": {
            split: [r["files"][split] for r in results if r[split] > 0]
            for split in ("train", "eval")
        },
    }
    files.atomic_write(
        os.path.join(directory, "metadata.json"), json.dumps(metadata, indent=1).encode()
    )
    return metadata


def _write_shard(job) -> dict:
    """Worker: tokenizes this shard's documents, cuts pairs, writes train/eval ArrayRecords."""
    config, vocab_file, directory, shard = job
    stats_path = os.path.join(directory, f"stats-{shard:05d}.json")
    if files.exists(stats_path):  # finished by an earlier run
        return json.loads(files.read_bytes(stats_path))
    tokenizer = config_tokenizer(config, vocab_file)
    stats = corpus.CorpusStats()
    docs: dict[str, list[list[str]]] = {"train": [], "eval": []}
    single = 0
    for index, document in enumerate(iter_documents(config, stats)):
        if index % config.num_shards != shard:
            continue
        if len(document) < 2:
            single += 1  # cannot make a next-sentence pair
            continue
        docs["eval" if _held_out(index, config) else "train"].append(document)
    result = {
        "shard": shard,
        "settings": _shard_settings(config, tokenizer),
        "documents": len(docs["train"]) + len(docs["eval"]) + single,
        "single_sentence": single,
        "problems": stats.report(),
        "files": {},
    }
    for split in ("train", "eval"):
        rng = np.random.default_rng([config.seed, shard, split == "eval"])
        tokenized = tokenization.encode_grouped(tokenizer, docs[split])
        pairs = (
            pretraining_data.create_pairs(
                tokenized, config.masking, rng, passes=config.masking.dupe_factor
            )
            if tokenized
            else []
        )
        name = f"{split}-{shard:05d}-of-{config.num_shards:05d}.array_record"
        _write_records(
            os.path.join(directory, name), [pretraining_data.encode_pair(p) for p in pairs]
        )
        result[split], result["files"][split] = len(pairs), name
    files.atomic_write(stats_path, json.dumps(result).encode())
    return result


def _write_records(path: str, records: list[bytes]) -> None:
    with files.atomic_path(path) as tmp:
        writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
        for record in records:
            writer.write(record)
        writer.close()


def _held_out(index: int, config: DataConfig) -> bool:
    # A fixed hash of (seed, document index): the split does not depend on the shard count.
    h = hashlib.blake2b(f"{config.seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < config.eval_fraction


def _corpus_identity(config: DataConfig) -> list:
    if config.tfds_name:
        return [config.tfds_name, config.tfds_split, config.tfds_data_dir, config.tfds_text_key]
    return [file_digest(f) for f in corpus_files(config)]


def _shard_settings(config: DataConfig, tokenizer: tokenization.Tokenizer) -> dict:
    """What the shards depend on; shards made with other settings are refused."""
    masking = dataclasses.asdict(config.masking)
    pairing = {
        k: masking[k] for k in ("max_seq_length", "short_seq_prob", "dupe_factor", "next_sentence")
    }
    return {
        "format_version": _FORMAT_VERSION,
        "corpus": _corpus_identity(config),
        "tokenizer": config.tokenizer,
        "vocab_sha256": file_digest(tokenizer.vocab_file),
        "do_lower_case": config.do_lower_case,
        "keep_accents": config.keep_accents,
        "pairing": pairing,
        "eval_fraction": config.eval_fraction,
        "seed": config.seed,
        "num_shards": config.num_shards,
    }


def _check_settings(found: dict, wanted: dict, directory: str) -> None:
    if found != wanted:
        differing = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        raise ValueError(
            f"the shards in {directory} were written with other settings ({differing} differ, "
            f"e.g. another tokenizer or vocabulary); use another data.preprocessed_dir or delete it"
        )


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with files.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
