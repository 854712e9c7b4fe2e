"""ALBERT-Xxlarge: E = 128, 12 layers of 4096 sharing one set of weights,
64 heads, SentencePiece, n-gram masking and sentence-order prediction.

    python train.py --config=configs/albert_xxlarge.py --workdir=gs://bucket/albert_xxlarge \
        --config.data.corpus='/data/wiki/*.txt' --config.data.vocab_file=/data/spiece.model
    python train.py --config=configs/albert_xxlarge.py:tiny    # the same family, CPU-sized

Arguments: `bf16`, `tiny` (comma-separated); see `common.get_albert_config`.
"""

from configs import common


def get_config(arg: str | None = None):
    return common.get_albert_config("albert_xxlarge", arg)
