"""ALBERT-Xlarge: E = 128, 24 layers of 2048 sharing one set of weights,
32 heads, SentencePiece, n-gram masking and sentence-order prediction.

    python train.py --config=configs/albert_xlarge.py --workdir=gs://bucket/albert_xlarge \
        --config.data.corpus='/data/wiki/*.txt' --config.data.vocab_file=/data/spiece.model
    python train.py --config=configs/albert_xlarge.py:tiny    # the same family, CPU-sized

Arguments: `bf16`, `tiny` (comma-separated); see `common.get_albert_config`.
"""

from configs import common


def get_config(arg: str | None = None):
    return common.get_albert_config("albert_xlarge", arg)
