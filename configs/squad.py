r"""SQuAD with the BERT paper's recipe (run_squad.py): windows of 384 pieces 128 apart, batch
32, learning rate 3e-5, 2 epochs, 10% warmup.

    python finetune.py --config=configs/squad.py --config.init_from=hf:/models/bert-base-uncased \
        --config.data_dir=/data --workdir=/runs/squad          # /data/SQuAD/*-v1.1.json
    python finetune.py --config=configs/squad.py:v2 ...          # SQuAD 2.0 (*-v2.0.json)
"""

from configs import glue


def get_config(arg: str | None = None):
    config = glue.get_config()
    config.tasks = "squad_v2" if arg == "v2" else "squad_v1"
    config.max_seq_length = 384
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 2.0
    config.learning_rates = "3e-5"
    config.seeds = "0"
    config.pack = False
    return config
