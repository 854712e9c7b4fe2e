"""DistilBERT (Sanh et al., 2019): a 6-layer student pretrained against BERT-Base.

    python train.py --config=configs/distilbert.py --workdir=/runs/distilbert \
        --config.init_from=hf:/models/bert-base-uncased \
        --config.distill.teacher=hf:/models/bert-base-uncased \
        --config.data.corpus='/data/wiki/*.txt'

The student is every other layer of the teacher (`student_layers`), and learns 5 x the soft
cross-entropy against the teacher's masked-LM distribution at temperature 2, 2 x the masked-LM
loss on the labels, and 1 x (1 - cosine) between the last hidden states, with dynamic masking,
batches of about 4K sequences and learning rate 5e-4 (the paper's settings). Unlike the paper,
the student keeps the next-sentence head and token-type embeddings (its loss counts the NSP
term inside the 2 x pretraining loss), so that it stays a BERT every bert_jax tool reads.
Arguments as configs/bert_base.py (e.g. `bf16`).
"""

from configs import bert_base


def get_config(arg: str | None = None):
    config = bert_base.get_config(arg)
    config.student_layers = "0,2,4,6,8,10"
    config.distill.temperature = 2.0
    config.distill.alpha_ce = 5.0
    config.distill.alpha_mlm = 2.0
    config.distill.alpha_cos = 1.0
    config.train.batch_size = 4096
    config.optim.learning_rate = 5e-4
    config.optim.grad_accum_steps = 16
    return config
