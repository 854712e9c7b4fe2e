"""RoBERTa (Liu et al., 2019) and XLM-R's recipe: masked LM alone on contiguous text of one
document (DOC-SENTENCES, no next-sentence prediction), masks drawn anew for every batch,
length 512 throughout, large batches: 8,192 sequences, 500k steps, Adam (0.9, 0.98, eps 1e-6)
at 6e-4 after 24k warmup steps, linear decay, weight decay 0.01, dropout 0.1.

    python train.py --config=configs/roberta.py:base,bf16 --workdir=gs://b/roberta \
        --config.data.corpus='gs://b/text/*.txt' --config.data.vocab_file=./tokenizer.json

Arguments (comma-separated): `base` (default) or `large` (4e-4, 30k warmup); `xlmr` for
XLM-R's sizes (its 250,002-piece SentencePiece vocabulary, as tokenizer.json); `bf16`.
Plan a slice first: `python train.py --config=configs/roberta.py:base,bf16 --topology=v5p-8
--plan`.
"""

from configs import common


def get_config(arg: str | None = None):
    args = set((arg or "").split(",")) - {""}
    unknown = args - {"base", "large", "xlmr", "bf16"}
    if unknown or {"base", "large"} <= args:
        raise ValueError(f"arguments {sorted(args)}; use base or large, xlmr, bf16")
    size = "large" if "large" in args else "base"
    config = common.get_config(f"{'xlm_roberta' if 'xlmr' in args else 'roberta'}_{size}")
    config.data.update(
        tokenizer="huggingface",
        vocab_size=config.model.vocab_size,
        next_sentence="none",
        dynamic_masking=True,
        max_seq_length=512,
        max_predictions_per_seq=77,
        short_seq_prob=0.0,
    )
    config.optim.update(
        name="adamw",
        learning_rate=4e-4 if size == "large" else 6e-4,
        warmup_steps=30_000 if size == "large" else 24_000,
        b2=0.98,
        eps=1e-6,
        weight_decay=0.01,
        clip_norm=0.0,
    )
    config.train.batch_size = 8192
    config.train.num_steps = 500_000
    if "bf16" in args:
        config.model.dtype = "bfloat16"
    return config
