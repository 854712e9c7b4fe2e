r"""GLUE fine-tuning with the BERT paper's recipe: batch 32, 3 epochs, 10% warmup then linear
decay, dropout 0.1, AdamW with weight decay 0.01; several seeds per task, reported as median,
mean and standard deviation.

    python finetune.py --config=configs/glue.py --config.init_from=hf:/models/bert-base-uncased \
        --config.data_dir=/data/glue_data --workdir=/runs/glue
    python finetune.py --config=configs/glue.py --config.init_from=./workdir \
        --config.tasks=mrpc,rte --config.seeds=1,2,3,4,5 --config.learning_rates=2e-5,3e-5,5e-5
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    # The encoder: hf:<dir>, tf:<dir> (original release) or a bert_jax pretraining workdir.
    config.init_from = ""
    # Comma-separated: cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte,wnli (or all), squad_v1, squad_v2,
    # conll2003, swag (configs/squad.py, conll.py and swag.py hold their recipes).
    config.tasks = "all"
    # "tsv": the official files under data_dir; "tfds": TFDS glue/<task>, squad/v1.1,
    # squad/v2.0 and conll2003 prepared as ArrayRecord (SWAG and your own data: files).
    config.source = "tsv"
    # Holds CoLA/, SST-2/, ..., diagnostic/ as the GLUE download does, and SQuAD/,
    # CoNLL-2003/, SWAG/ (see bert_jax/tasks/registry.py).
    config.data_dir = ""
    config.tfds_data_dir = ""  # Empty: ~/tensorflow_datasets.
    config.max_seq_length = 128
    config.max_train_examples = 0  # 0: all; fewer for quick runs.

    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 3.0
    config.learning_rates = "2e-5"  # A grid: "2e-5,3e-5,5e-5" (the paper picks on dev).
    config.seeds = "0,1,2"  # One run per seed and learning rate.
    config.warmup_fraction = 0.1
    config.weight_decay = 0.01
    config.classifier_dropout = -1.0  # -1: the encoder's hidden dropout (0.1).
    config.eval_every_steps = 0  # 0: evaluate after every epoch only.
    config.early_stopping_patience = 0  # Evaluations without improvement; 0: never stop.
    config.log_every = 50
    # Each run saves its whole state (weights, optimizer, step, best so far) this often, and
    # on SIGTERM; rerunning the same command resumes unfinished runs and skips finished ones.
    config.checkpoint_every_steps = 500
    config.checkpoint_minutes = 10.0
    # Several short examples share a row of max_seq_length, kept apart by the attention mask
    # and their own positions: the same logits and gradients as one example per row, and
    # (SST-2, about 25 tokens an example) a fraction of the compute. False: one per row.
    config.pack = True
    config.pack_max_examples = 16  # Examples in one row at most.
    # Question answering (squad_v1, squad_v2; run_squad.py's names and defaults).
    config.doc_stride = 128  # Context pieces between the starts of two windows.
    config.max_query_length = 64  # Question pieces kept.
    config.n_best_size = 20  # Starts and ends considered per window.
    config.max_answer_length = 30  # Pieces in an answer at most.

    # Task distillation: a model fine-tuned on the same task (a finetune.py run directory, or
    # hf:/tf: with its head) as a frozen teacher in the train step; the student (init_from)
    # learns (1 - alpha) x the labels' loss + alpha x T^2 x cross-entropy against the
    # teacher's outputs at temperature T. Empty: no teacher.
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher = ""
    config.distill.temperature = 2.0
    config.distill.alpha = 0.5
    # TinyBERT's intermediate-layer loss, this weight x (the mean squared error of hidden
    # states, through a trained projection when the student is narrower, + that of attention
    # probabilities; the student's layer m against the teacher's m x N / M): 0 is off.
    # prediction=False drops the head-output terms (TinyBERT's first task stage).
    config.distill.layerwise = 0.0
    config.distill.prediction = True
    # Comma-separated layers of init_from that make the student, e.g. "0,2,4,6,8,10": a
    # 6-layer student from every other layer of BERT-Base (DistilBERT's initialisation).
    # Empty: all of init_from's layers.
    config.student_layers = ""

    # Sentence-embedding tasks (embed:<folder>; configs/embed.py): the pooling of the
    # encoder's last hidden states (cls, mean, max, ... comma-separated), the similarity's
    # scale (1 / temperature), whether the in-batch loss also finds each positive's anchor,
    # Matryoshka prefixes ("384,256,128,64": the loss on each, summed), and GradCache's
    # chunk: texts embedded at once (a divisor of batch_size x texts per example; 0: all).
    config.embedding = ml_collections.ConfigDict()
    config.embedding.pooling = "mean"
    config.embedding.scale = 20.0
    config.embedding.symmetric = False
    config.embedding.matryoshka_dims = ""
    config.embedding.chunk_size = 0

    # Numerics of this run (the encoder's sizes come from init_from).
    config.model = ml_collections.ConfigDict()
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.remat = "none"
    config.model.attention_kernel = "auto"  # Or "xla", "splash" (see BertConfig).
    # With num_epochs=0 (evaluate init_from as it is): "int8" or "int8-dynamic" evaluates it
    # with int8 weights (quantized as it loads), "none" with float ones; "": as it is stored.
    # "int8-aware" fine-tunes seeing int8-dynamic's rounding (quantization-aware training);
    # `python -m bert_jax.convert quantize RUN OUT --mode=int8-dynamic` then makes the model.
    config.model.quantization = ""

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    return config
