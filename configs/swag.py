r"""SWAG multiple choice with the BERT paper's recipe: batch 16, learning rate 2e-5, 3 epochs.

    python finetune.py --config=configs/swag.py --config.init_from=hf:/models/bert-base-uncased \
        --config.data_dir=/data --workdir=/runs/swag          # /data/SWAG/{train,val,test}.csv
"""

from configs import glue


def get_config(arg: str | None = None):
    del arg
    config = glue.get_config()
    config.tasks = "swag"
    config.max_seq_length = 128
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_epochs = 3.0
    config.learning_rates = "2e-5"
    config.seeds = "0"
    config.pack = False
    return config
