"""BERT-Base (12 layers, hidden 768, 12 heads), the recipe of the paper: batch 256, 1M steps.

    python train.py --config=configs/bert_base.py --workdir=gs://bucket/bert_base \
        --config.data.corpus='/data/wiki/*.txt' --config.data.vocab_file=/data/vocab.txt

`bert_base.py:bf16` computes in bfloat16 (parameters and optimizer state stay float32).
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.get_config("bert_base")
    if arg == "bf16":
        config.model.dtype = "bfloat16"
    return config
