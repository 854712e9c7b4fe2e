"""Tiny BERT (2 layers, hidden 128) on the default corpus: the CPU and test config.

python train.py --config=configs/tiny.py --workdir=workdir/tiny
"""

from configs import common


def get_config(arg: str | None = None):
    del arg
    config = common.get_config("L-2_H-128")
    config.model.vocab_size = 8192
    config.data.vocab_size = 8192
    config.data.dupe_factor = 5
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 80
    config.train.batch_size = 32
    config.train.num_steps = 800
    config.train.log_every = 20
    config.train.eval_every = 200
    config.train.eval_batches = 10
    config.train.checkpoint_every = 200
    return config
