"""ModernBERT (Warner et al., 2024) and its recipe: masked LM alone at 30% masking on
contiguous text, StableAdamW (betas 0.9 / 0.98, eps 1e-6, weight decay 1e-5 decoupled from
the rate, update clipping instead of gradient clipping), a warmup-stable-decay schedule; phase 1
at length 1,024 with rotary base 10k in every layer, then a context extension to 8,192 with the
global layers' base raised to 160k, started from phase 1's workdir and decayed (1 - sqrt).

    python train.py --config=configs/modernbert.py:base,bf16 --workdir=gs://b/mb_p1 \
        --config.data.corpus='gs://b/text/*.txt' --config.data.vocab_file=/data/tokenizer.json
    python train.py --config=configs/modernbert.py:base,extend,bf16 --workdir=gs://b/mb_p2 \
        --config.init_from=gs://b/mb_p1 ...

Arguments (comma-separated): `base` (default) or `large`; `extend` (phase 2); `bf16`; `tiny`:
the same family shrunk for a CPU (4 layers of 128, a window of 32 tokens, a vocabulary learned
from the default corpus, length 128 then 1,024). Plan a slice first:
`python train.py --config=configs/modernbert.py:base,bf16 --topology=v5p-8 --plan`.

Left out of the paper's recipe: its batch-size warmup (768 to 4,608 sequences over the first
50B tokens), which needs a program per batch size.
"""

from configs import common

# Per size: peak rate, sequences per batch at 1,024 (the paper's 4,608; 8x fewer at 8,192,
# the same tokens per step), phase 1 steps (1.7T tokens) and warmup (3B / 2B tokens).
SIZES = {
    "base": dict(lr=8e-4, batch=4608, steps=360_000, warmup=640),
    "large": dict(lr=5e-4, batch=4608, steps=360_000, warmup=425),
}


def get_config(arg: str | None = None):
    args = set((arg or "").split(",")) - {""}
    unknown = args - {"base", "large", "extend", "bf16", "tiny"}
    if unknown or {"base", "large"} <= args:
        raise ValueError(f"arguments {sorted(args)}; use base or large, extend, bf16, tiny")
    size = "large" if "large" in args else "base"
    recipe = SIZES[size]
    config = common.get_config(f"modernbert_{size}")
    config.model.global_rope_theta = 10_000.0  # phase 1: 10k in every layer
    config.data.tokenizer = "huggingface"
    config.data.next_sentence = "none"
    config.data.masked_lm_prob = 0.3
    config.data.max_seq_length = 1024
    config.data.max_predictions_per_seq = 308
    config.data.short_seq_prob = 0.0
    config.optim.update(
        name="stable_adamw",
        learning_rate=recipe["lr"],
        warmup_steps=recipe["warmup"],
        b2=0.98,
        eps=1e-6,
        weight_decay=1e-5,
        clip_norm=0.0,
        schedule="wsd-1-sqrt",
        decay_steps=0,  # phase 1 stays at the peak rate; the extension decays
    )
    config.train.batch_size = recipe["batch"]
    config.train.num_steps = recipe["steps"]
    if "tiny" in args:
        _tiny(config)
    if "extend" in args:
        _extend(config, steps=100 if "tiny" in args else 63_600)
    if "bf16" in args:
        config.model.dtype = "bfloat16"
    return config


def _extend(config, steps: int) -> None:
    """Phase 2: 8x the length (8x fewer sequences), the global layers' rotary base at 160k
    (`model_changes` keeps it over phase 1's), phase 1's optimizer state, 3e-4 held for five
    sixths of the steps, then 1 - sqrt decay (the paper's 250B + 50B tokens)."""
    length = config.data.max_seq_length * 8
    config.model.global_rope_theta = 160_000.0
    config.model_changes = "global_rope_theta"
    config.init_optimizer = True
    config.data.max_seq_length = length
    config.data.max_predictions_per_seq = int(0.3 * length) + 1
    config.train.batch_size //= 8
    config.train.num_steps = steps
    config.optim.update(
        learning_rate=3e-4, warmup_steps=0, total_steps=steps, decay_steps=steps // 6
    )


def _tiny(config) -> None:
    """A CPU's ModernBERT on the default corpus, with a WordPiece vocabulary learned there
    (phase 1 at length 128, the extension at 1,024)."""
    config.model.update(
        vocab_size=4096,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=192,
        local_attention=32,
    )
    config.data.update(
        tokenizer="wordpiece",
        vocab_size=4096,
        max_seq_length=128,
        max_predictions_per_seq=40,
        dupe_factor=5,
    )
    config.optim.update(learning_rate=2e-3, warmup_steps=40)
    config.train.update(
        batch_size=32,
        num_steps=400,
        log_every=20,
        eval_every=100,
        eval_batches=10,
        checkpoint_every=100,
    )
