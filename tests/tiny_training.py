"""A tiny model trained through the shared train step on a synthetic task, and its predictions
over the held-out rows: what the SQuAD, CoNLL, SWAG, distillation and quantization learning
tests share (with `noisy_counting`, a task whose labels carry annotator-like noise)."""

import jax
import numpy as np

from bert_jax import axes, models, objectives, optim, sharding, training

# ModernBERT at the same size: a global and a local layer (a window of 8 tokens, shorter than
# every task's rows), no biases, as released.
MODERNBERT = dict(
    model_type="modernbert",
    type_vocab_size=1,
    use_bias=False,
    layer_norm_eps=1e-5,
    local_attention=8,
    global_attn_every_n_layers=2,
)


def config(vocab_size: int, max_len: int, family: str = "bert") -> models.BertConfig:
    """Two layers of 64, no dropout: learns a synthetic task in a few hundred steps; `family`
    "modernbert" for ModernBERT's layers at that size."""
    return models.BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=max_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **(MODERNBERT if family == "modernbert" else {}),
    )


def noisy_counting(n: int, seed: int) -> dict[str, np.ndarray]:
    """Is there more of the words 8-15 than of 16-23? Labels drawn with that probability
    (a logistic of the difference), as annotators disagree on close calls: a model can learn
    how sure to be (which a teacher's soft targets carry and hard labels do not); no model
    passes about 0.83, so a change in the model shows in its accuracy."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, 40, (n, 24)).astype(np.int32)
    ids[:, 0] = 2
    more = ((ids >= 8) & (ids < 16)).sum(1) - ((ids >= 16) & (ids < 24)).sum(1)
    label = (rng.random(n) < 1 / (1 + np.exp(-0.8 * more))).astype(np.int32)
    ones = np.ones_like(ids)
    return {"input_ids": ids, "input_mask": ones, "segment_ids": 0 * ones, "label": label}


def train_and_predict(
    objective: objectives.Objective,
    model_config: models.BertConfig,
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    *,
    steps: int,
    learning_rate: float,
    warmup: int,
    batch: int = 32,
    eval_batch: int = 64,
    with_params: bool = False,
):
    """Trains on `train` (epochs of shuffled batches, the remainder dropped) and returns the
    predict step's outputs (an array, or a tuple of arrays) for every row of `test`, in order;
    the last test batch is padded to `eval_batch` rows with repeated rows. One device: the
    sharded steps are tested elsewhere, and steps queue without blocking here (on a 2-core
    host, many queued steps over 8 simulated devices can starve a collective's rendezvous).
    `with_params`: also the trained parameters (on the host)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    trainer = training.create_trainer(
        model_config,
        optim.OptimConfig(learning_rate=learning_rate, warmup_steps=warmup, total_steps=steps),
        mesh,
        axes.DEFAULT_RULES,
        objective,
    )
    n = len(train["input_ids"])
    per_epoch, order = n // batch, np.random.default_rng(1)
    outputs = []
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        for step in range(steps):
            if step % per_epoch == 0:
                perm = order.permutation(n)
            rows = perm[(step % per_epoch) * batch :][:batch]
            host = {k: v[rows] for k, v in train.items()}
            state, _ = trainer.train_step(state, trainer.global_batch(host))
        total = len(test["input_ids"])
        for start in range(0, total, eval_batch):
            real = min(eval_batch, total - start)
            rows = {
                k: np.resize(v[start : start + real], (eval_batch, *v.shape[1:]))
                for k, v in test.items()
            }
            out = jax.device_get(trainer.predict_step(state.params, rows))
            outputs.append(jax.tree.map(lambda x, real=real: np.asarray(x)[:real], out))
    outputs = jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
    return (outputs, jax.device_get(state.params)) if with_params else outputs
