r"""Tokenizer and loader throughput, each against a peer measured in the same run.

    python benchmarks/input_pipeline.py [--out benchmarks/results/input_pipeline.json]

1. Tokenization, tokens/s per core on the default corpus (the stdlib docstrings):
   bert_jax's WordPieceTokenizer vs the reference pure-Python tokenizer of the original rules
   (transformers' BertTokenizerLegacy) vs Hugging Face `tokenizers` called directly.
   Runs alternate A B A B so that machine drift cancels; the median is reported.
2. The grain loader at BERT-Base shapes (batch 256, length 128, 20 predictions, dynamic
   masking) from preprocessed shards, in the training process: delivered tokens per second of
   wall time and per CPU second (= per core), and the loader workers needed to feed a TPU v4
   host (about 1M tokens/s).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # per-core figures for the Rust tokenizers

from bert_jax.data import corpus, input_pipeline  # noqa: E402
from bert_jax.data.pretraining_data import MaskingConfig  # noqa: E402


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def tokenization(sentences: list[str], vocab_file: str, rounds: int) -> dict:
    import tokenizers
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    from bert_jax.data import tokenization as tok

    ours = tok.WordPieceTokenizer(vocab_file)
    direct = tokenizers.BertWordPieceTokenizer(vocab_file, lowercase=True)
    reference = BertTokenizerLegacy(vocab_file, do_lower_case=True)
    n_tokens = sum(len(ids) for ids in ours.encode_batch(sentences))
    ref_sample = sentences[: max(1, len(sentences) // 20)]  # the Python reference is slow
    ref_tokens = sum(len(ids) for ids in ours.encode_batch(ref_sample))
    runs = {"bert_jax": [], "tokenizers": [], "reference": []}
    for _ in range(rounds):  # A B C A B C ...
        runs["bert_jax"] += _time(lambda: ours.encode_batch(sentences), 1)
        runs["tokenizers"] += _time(
            lambda: direct.encode_batch(sentences, add_special_tokens=False), 1
        )
        runs["reference"] += _time(
            lambda: [reference.convert_tokens_to_ids(reference.tokenize(s)) for s in ref_sample], 1
        )
    rate = {
        "bert_jax": n_tokens / statistics.median(runs["bert_jax"]),
        "tokenizers": n_tokens / statistics.median(runs["tokenizers"]),
        "reference": ref_tokens / statistics.median(runs["reference"]),
    }
    return {
        "tokens": n_tokens,
        "tokens_per_second_per_core": rate,
        "ratio_bert_jax_over_reference": rate["bert_jax"] / rate["reference"],
        "ratio_bert_jax_over_tokenizers": rate["bert_jax"] / rate["tokenizers"],
    }


def loader(cache: str, batches: int) -> dict:
    config = input_pipeline.DataConfig(
        cache_dir=cache,
        masking=MaskingConfig(max_seq_length=128, max_predictions_per_seq=20, dupe_factor=5),
    )
    data = input_pipeline.load_pretraining_data(config)
    iterator = data.train_iterator(256, seed=0)
    next(iterator)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = batches * 256 * 128
    per_core = tokens / cpu  # grain reads with threads: CPU seconds, not wall seconds
    return {
        "batch": [256, 128],
        "batches": batches,
        "tokens_per_second": tokens / wall,
        "tokens_per_cpu_second": per_core,
        "workers_for_1M_tokens_per_second": int(-(-1e6 // per_core)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/input_pipeline.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        path = corpus.build_stdlib_corpus(os.path.join(cache, "corpora"))
        documents = list(corpus.iter_text_documents([path], corpus.CorpusStats()))
        sentences = [s for d in documents for s in d]
        vocab = input_pipeline.make_tokenizer(input_pipeline.DataConfig(cache_dir=cache)).vocab_file
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "tokenization": tokenization(sentences, vocab, args.rounds),
            "loader": loader(cache, args.batches),
        }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
