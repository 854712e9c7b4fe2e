"""BERT-Base (12 layers, hidden 768, 12 heads), the recipe of the paper: batch 256, 1M steps.

    python train.py --config=configs/bert_base.py --workdir=gs://bucket/bert_base \
        --config.data.corpus='/data/wiki/*.txt' --config.data.vocab_file=/data/vocab.txt


Arguments (comma-separated): `bf16` computes in bfloat16 (parameters and optimizer state stay
float32); `phase1` / `phase2` with `adam` (the paper's, default) or `lamb` (You et al., batch
64k/32k): the two-phase recipe of `common.RECIPES`, e.g.

    python train.py --config=configs/bert_base.py:phase1,lamb,bf16 --workdir=gs://b/p1 ...
    python train.py --config=configs/bert_base.py:phase2,lamb,bf16 --workdir=gs://b/p2 \
        --config.init_from=gs://b/p1 ...

Find the mesh, remat and gradient accumulation for a slice first:
`python train.py --config=configs/bert_base.py:phase1,lamb,bf16 --topology=v5e-8 --plan`.
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.get_config("bert_base")
    common.apply_recipe(config, set((arg or "").split(",")) - {""})
    return config
