r"""CoNLL-2003 named entities, fine-tuned as the BERT paper does: batch 32, learning rate 5e-5,
4 epochs, 10% warmup, the first piece of each word tagged.

    python finetune.py --config=configs/conll.py --config.init_from=hf:/models/bert-base-cased \
        --config.data_dir=/data --workdir=/runs/conll   # /data/CoNLL-2003/{train,valid,test}.txt
"""

from configs import glue


def get_config(arg: str | None = None):
    del arg
    config = glue.get_config()
    config.tasks = "conll2003"
    config.max_seq_length = 128
    config.num_epochs = 4.0
    config.learning_rates = "5e-5"
    config.seeds = "0"
    config.pack = False
    return config
