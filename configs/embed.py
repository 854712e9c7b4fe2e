r"""Sentence embeddings trained contrastively (`embed:<folder>`): in-batch negatives over the
whole global batch (scale 20, as MultipleNegativesRankingLoss), mean pooling, AdamW at 2e-5
with 10% warmup, one epoch, GradCache so the batch is bounded by the loss, not by memory.

    python finetune.py --config=configs/embed.py --config.init_from=hf:/models/MiniLM-L12-H384 \
        --config.tasks=embed:nli --config.data_dir=/data --workdir=/runs/embed
        # /data/nli/train.jsonl (anchor, positive[, negative]) and dev.tsv (sentence1,
        # sentence2, score) or a BEIR dev split (corpus.jsonl, queries.jsonl, qrels/dev.tsv)
    python -m bert_jax.convert export-sentence-transformers /runs/embed/embed:nli/lr2e-05_seed0 \
        /models/my-embedder                        # loads in SentenceTransformer(...)
    python finetune.py --config=configs/embed.py --config.init_from=hf:/models/MiniLM-L12-H384 \
        --config.tasks=embed:nli --config.batch_size=32768 --topology=v5e-8  # memory per chip
"""

from configs import glue


def get_config(arg: str | None = None):
    del arg
    config = glue.get_config()
    config.tasks = "embed:data"
    config.max_seq_length = 128
    config.batch_size = 1024  # examples; every anchor meets the other 1,023 positives
    config.eval_batch_size = 256
    config.num_epochs = 1.0
    config.learning_rates = "2e-5"
    config.seeds = "0"
    config.pack = False  # texts of a batch are embedded row by row, padded to max_seq_length
    config.log_every = 20
    config.embedding.pooling = "mean"
    config.embedding.scale = 20.0
    # Texts embedded at once (a divisor of batch_size x texts per example, and a multiple of
    # the data-parallel devices): 512 holds one chunk's activations at any batch size.
    config.embedding.chunk_size = 512
    return config
