"""ALBERT-Large: E = 128, 24 layers of 1024 sharing one set of weights,
16 heads, SentencePiece, n-gram masking and sentence-order prediction.

    python train.py --config=configs/albert_large.py --workdir=gs://bucket/albert_large \
        --config.data.corpus='/data/wiki/*.txt' --config.data.vocab_file=/data/spiece.model
    python train.py --config=configs/albert_large.py:tiny    # the same family, CPU-sized

Arguments: `bf16`, `tiny` (comma-separated); see `common.get_albert_config`.
"""

from configs import common


def get_config(arg: str | None = None):
    return common.get_albert_config("albert_large", arg)
