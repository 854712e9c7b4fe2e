"""BERT-Large (24 layers, hidden 1024, 16 heads), the recipe of the paper: batch 256, 1M steps.

    python train.py --config=configs/bert_large.py --workdir=gs://bucket/bert_large \
        --config.data.corpus='/data/wiki/*.txt' --config.data.vocab_file=/data/vocab.txt

`bert_large.py:bf16` computes in bfloat16; add --config.model.remat=minimal (recompute the
attention scores and elementwise ops) or =full (recompute each layer from its input) when
memory is short.
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.get_config("bert_large")
    if arg == "bf16":
        config.model.dtype = "bfloat16"
    return config
