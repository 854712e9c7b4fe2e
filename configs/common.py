"""Defaults shared by every pretraining config: a named model size, data, optimizer, mesh, loop.

Every leaf can be overridden on the command line, e.g. `--config.optim.learning_rate=5e-5`.
"""

import dataclasses

import ml_collections

from bert_jax import models


def get_config(size: str = "bert_base") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Every field of models.BertConfig (bert_config.json names); `size` picks the released one.
    config.model = dataclasses.asdict(models.BertConfig.named(size))
    # Start from released or earlier weights: "hf:<dir>" (Hugging Face), "tf:<dir>" (original
    # TF checkpoint) or a bert_jax workdir. Their config.json and vocabulary then replace
    # config.model (except dtype, param_dtype, remat, attention_kernel) and config.data.vocab_file.
    config.init_from = ""
    # With init_from a bert_jax workdir (phase 2 of a two-phase recipe): also continue its
    # optimizer state (Adam or LAMB moments), and with init_step its step count (the
    # learning-rate schedule goes on where it stopped, the BERT paper's single schedule).
    config.init_optimizer = False
    config.init_step = False
    # Comma-separated model fields whose values here replace init_from's, e.g.
    # "global_rope_theta" for ModernBERT's context extension.
    config.model_changes = ""
    # Comma-separated layers of init_from that make the model, e.g. "0,2,4,6,8,10": a 6-layer
    # student from every other layer of BERT-Base (DistilBERT's initialisation).
    config.student_layers = ""
    # Pretraining distillation (DistilBERT): a pretrained teacher of the same width (hf:, tf:
    # or a workdir) frozen in the train step; the loss is alpha_ce x T^2 x cross-entropy
    # against its masked-LM distribution + alpha_mlm x the labels' pretraining loss +
    # alpha_cos x (1 - cosine) between the last hidden states. Empty teacher: none.
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher = ""
    config.distill.temperature = 2.0
    config.distill.alpha_ce = 5.0
    config.distill.alpha_mlm = 2.0
    config.distill.alpha_cos = 1.0
    # TinyBERT's general distillation: + layerwise x the mean squared error of hidden states
    # (through a trained projection when the student is narrower) and attention probabilities,
    # the student's layer m against the teacher's m x N / M. 0: off.
    config.distill.layerwise = 0.0

    config.data = ml_collections.ConfigDict()
    config.data.corpus = ""  # Comma-separated text files/globs; empty: the stdlib docstrings.
    config.data.tfds_name = ""  # Or a TFDS text corpus prepared as ArrayRecord.
    config.data.tfds_split = "train"
    config.data.tfds_data_dir = ""
    config.data.tfds_text_key = "text"
    config.data.tokenizer = "wordpiece"  # Or "sentencepiece".
    config.data.vocab_file = ""  # vocab.txt / .model; empty: learn one from the corpus.
    config.data.vocab_size = config.model.vocab_size
    config.data.spm_model_type = "unigram"
    config.data.do_lower_case = True
    config.data.keep_accents = False  # SentencePiece: ALBERT strips accents unless this is set.
    config.data.max_seq_length = 128
    config.data.max_predictions_per_seq = 20
    config.data.masked_lm_prob = 0.15
    config.data.short_seq_prob = 0.1
    config.data.dupe_factor = 10
    config.data.whole_word_mask = False
    config.data.ngram_max = 1  # 3: ALBERT's n-gram masking.
    # Or "sop" (sentence-order prediction), or "none": masked LM alone on contiguous text
    # (RoBERTa, XLM-R, ModernBERT).
    config.data.next_sentence = "nsp"
    config.data.dynamic_masking = True  # False: masks fixed at preprocessing, as the original.
    config.data.eval_fraction = 0.05
    config.data.cache_dir = ""  # Empty: $BERT_JAX_CACHE or ~/.cache/bert_jax.
    config.data.preprocessed_dir = ""  # Empty: a folder of the cache named by the settings.
    config.data.seed = 12345
    config.data.num_shards = 8
    config.data.preprocess_workers = 0  # 0: one per core.
    config.data.loader_workers = 0  # grain worker processes; 0: mask in the training process.

    # The BERT paper: Adam 1e-4, 10k warmup steps, 1M steps at batch 256, decay 0.01.
    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 10_000
    config.optim.total_steps = -1  # -1: train.num_steps.
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-6
    config.optim.weight_decay = 0.01
    config.optim.clip_norm = 1.0
    config.optim.grad_accum_steps = 1
    # "linear" (BERT: warmup, then down to 0 at total_steps) or warmup-stable-decay
    # ("wsd-linear", "wsd-1-sqrt": the peak rate until the last decay_steps; ModernBERT's).
    config.optim.schedule = "linear"
    config.optim.decay_steps = 0

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices the other axes leave.
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    # True: at start, compile candidate meshes, remat policies and micro-batches for the
    # devices (TPU/GPU, whose memory JAX reports) and run the best that fits (`--plan`).
    config.mesh.auto = False

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 256  # Global, over all devices and hosts.
    config.train.num_steps = 1_000_000
    config.train.seed = 0
    config.train.log_every = 100
    config.train.eval_every = 10_000
    config.train.eval_batches = 20
    config.train.checkpoint_every = 10_000
    config.train.checkpoint_minutes = 30.0  # Also save this often (0: only by steps).
    config.train.keep_checkpoints = 3
    config.train.keep_every = 100_000  # Keep these steps for good (0: none).
    config.train.max_bad_steps = 10  # Consecutive non-finite steps before rolling back.
    # A workdir whose checkpoints are all damaged is never silently restarted: set this to
    # train from step 0 there (the damaged ones stay aside, renamed <step>.damaged-*).
    config.train.start_over = False
    # Steps of this run traced by jax.profiler into the TensorBoard logdir (its Profile tab;
    # 0: none), from `profile_start` steps after the run's first, once compilation is done.
    config.train.profile_steps = 0
    config.train.profile_start = 10
    return config


def get_albert_config(size: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """ALBERT's recipe (Lan et al., 2019): SentencePiece, n-gram masking up to 3, sentence-order
    prediction, LAMB at 0.00176 for batch 4096 and 125k steps, no dropout.

    `arg` is a comma-separated list of: `bf16` (bfloat16 compute) and `tiny`: the same model
    family shrunk for a CPU (4 shared layers of 128, E = 64, vocabulary 8192, dropout 0.1,
    1,000 steps at batch 64 x 64 on the default corpus).
    """
    args = set((arg or "").split(","))
    config = get_config(size)
    config.data.tokenizer = "sentencepiece"
    config.data.vocab_size = config.model.vocab_size
    config.data.ngram_max = 3
    config.data.next_sentence = "sop"
    config.data.max_seq_length = 512
    config.optim.name = "lamb"
    config.optim.learning_rate = 0.00176
    config.optim.warmup_steps = 3125
    config.train.batch_size = 4096
    config.train.num_steps = 125_000
    if "bf16" in args:
        config.model.dtype = "bfloat16"
    if "tiny" in args:
        config.model.update(
            vocab_size=8192,
            embedding_size=64,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=512,
            # A tiny model memorises the order of the default corpus's few pairs: dropout and
            # more cuts per document keep held-out SOP above chance (README, "Results").
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
        )
        config.data.vocab_size = 8192
        config.data.max_seq_length = 64
        config.data.dupe_factor = 10
        config.optim.name = "adamw"
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 100
        config.train.update(
            batch_size=64,
            num_steps=1000,
            log_every=20,
            eval_every=250,
            eval_batches=20,
            checkpoint_every=250,
        )
    return config


# Two-phase pretraining (Devlin et al., 2019, appendix A.2): 90% of the steps at length 128,
# then 10% at 512, where phase 2 starts from phase 1's checkpoint. "adam": the paper's 1M steps
# at batch 256, one learning-rate schedule over both phases. "lamb": You et al. (2019) in
# NVIDIA's layout, batch 64k then 32k, 7,038 + 1,563 steps, each phase its own warmup.
RECIPES = {
    "adam": {
        "phase1": dict(batch=256, steps=900_000, lr=1e-4, warmup=10_000, total=1_000_000),
        "phase2": dict(batch=256, steps=1_000_000, lr=1e-4, warmup=10_000, total=1_000_000),
    },
    "lamb": {
        "phase1": dict(batch=65_536, steps=7_038, lr=6e-3, warmup=2_000, total=7_038),
        "phase2": dict(batch=32_768, steps=1_563, lr=4e-3, warmup=200, total=1_563),
    },
}


def apply_recipe(config: ml_collections.ConfigDict, args: set[str]) -> None:
    """`phase1` or `phase2` of the `adam` (default) or `lamb` recipe, and `bf16`.

    Phase 2 is a new run started from phase 1's workdir:
    `--config.init_from=<phase 1 workdir>`, which brings its weights (the 512 position
    embeddings were trained from the start, as in the paper) and, as set here, its optimizer
    state; the Adam recipe also continues phase 1's step and schedule.
    """
    unknown = args - {"bf16", "phase1", "phase2", "adam", "lamb"}
    if unknown:
        raise ValueError(
            f"unknown config arguments {sorted(unknown)}; use bf16, phase1, phase2, adam, lamb"
        )
    if "bf16" in args:
        config.model.dtype = "bfloat16"
    phases = args & {"phase1", "phase2"}
    if not phases:
        return
    if len(phases) > 1:
        raise ValueError("choose one of phase1 and phase2")
    phase = phases.pop()
    optimizer = "lamb" if "lamb" in args else "adam"
    recipe = RECIPES[optimizer][phase]
    length, predictions = (128, 20) if phase == "phase1" else (512, 80)
    config.data.max_seq_length = length
    config.data.max_predictions_per_seq = predictions
    config.train.batch_size = recipe["batch"]
    config.train.num_steps = recipe["steps"]
    config.optim.name = "lamb" if optimizer == "lamb" else "adamw"
    config.optim.learning_rate = recipe["lr"]
    config.optim.warmup_steps = recipe["warmup"]
    config.optim.total_steps = recipe["total"]
    if phase == "phase2":
        config.init_optimizer = True
        config.init_step = optimizer == "adam"
