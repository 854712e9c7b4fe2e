r"""The compression report: a teacher and its smaller versions, side by side.

    python benchmarks/compress.py [--out=benchmarks/results/compress]

A classification task bert_jax generates (nothing can be downloaded here): is there more of
one group of words than of another, with labels drawn with that probability (a logistic of the
difference), as annotators disagree on close calls; no model can pass about 0.83 on it. The
teacher (6 layers x 256, 4 heads) is fine-tuned on 4,000 examples; then, each through the
library's own paths:
- `distilled 3 layers`: layers 0, 2, 4 of the teacher (`models.take_layers`), trained with
  the teacher's soft targets (`objectives.task_distillation`, T 2, alpha 0.9);
- `distilled 2 x 128`: a narrower, shallower student (TinyBERT's shape, scaled down) from
  scratch, the same distillation;
- `pruned 40%`: the teacher without its 40% least important heads (gradient of the loss
  with respect to a head mask, Michel et al.; `analysis.heads_to_prune`, `prune_heads`),
  not retrained;
- `distilled 3 layers, pruned 40%`: both;
- `..., int8`: int8 weights, a scale per output channel (`models.quantize`), dequantized into
  float32 matmuls; `teacher, int8-dynamic`: the same weights, and each matmul's input
  quantized to int8 per row as it runs (int8 products, int32 sums; qwix).
For each: parameters, bytes of its float32 weights on disk (`params.npz`), CPU latency at
batch 1 x 128 and throughput at batch 32 x 128 (jitted forward, medians of 5 rounds after a
warm-up) and dev accuracy on 2,048 held-out examples.
"""

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bert_jax import axes, losses, models, objectives, optim, sharding, training  # noqa: E402
from bert_jax.tools import analysis  # noqa: E402

VOCAB, LENGTH = 40, 24


def task(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, VOCAB, (n, LENGTH)).astype(np.int32)
    ids[:, 0] = 2
    more = ((ids >= 8) & (ids < 16)).sum(1) - ((ids >= 16) & (ids < 24)).sum(1)
    label = (rng.random(n) < 1 / (1 + np.exp(-0.8 * more))).astype(np.int32)
    ones = np.ones_like(ids)
    return {"input_ids": ids, "input_mask": ones, "segment_ids": 0 * ones, "label": label}


def config(layers: int, hidden: int, heads: int) -> models.BertConfig:
    return models.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def train(objective, model_config, data, steps, teacher=None, init=None):
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    trainer = training.create_trainer(
        model_config,
        optim.OptimConfig(learning_rate=5e-4, warmup_steps=steps // 10, total_steps=steps),
        mesh,
        axes.DEFAULT_RULES,
        objective,
        teacher_params=teacher,
    )
    n, order = len(data["input_ids"]), np.random.default_rng(0)
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        if init is not None:
            state = state.replace(params=jax.device_put(init, trainer.state_shardings.params))
        for step in range(steps):
            if step % (n // 32) == 0:
                perm = order.permutation(n)
            rows = perm[(step % (n // 32)) * 32 :][:32]
            state, _ = trainer.train_step(
                state, trainer.global_batch({k: v[rows] for k, v in data.items()})
            )
    return jax.device_get(state.params)


def forward_fn(model_config):
    graphdef = models.split_params(
        models.abstract_model(model_config, models.BertForSequenceClassification)
    )[0]
    return jax.jit(
        lambda p, i, m, s, h=None: models.merge_params(graphdef, p)(i, m, s, head_mask=h)[0]
    )


def accuracy(model_config, params, data) -> float:
    forward = forward_fn(model_config)
    inputs = [data[k] for k in ("input_ids", "input_mask", "segment_ids")]
    logits = np.concatenate(
        [
            np.asarray(forward(params, *(x[i : i + 256] for x in inputs)))
            for i in range(0, len(data["label"]), 256)
        ]
    )
    return float((logits.argmax(-1) == data["label"]).mean())


def head_importance(model_config, params, data) -> np.ndarray:
    """|dL/dmask| per head, summed over the data (Michel et al., 2019)."""
    graphdef = models.split_params(
        models.abstract_model(model_config, models.BertForSequenceClassification)
    )[0]

    def loss(mask, batch):
        logits = models.merge_params(graphdef, params)(
            batch["input_ids"], batch["input_mask"], batch["segment_ids"], head_mask=mask
        )[0]
        return losses.classification_loss(logits, batch)[0]

    grad = jax.jit(jax.grad(loss))
    mask = jnp.ones((model_config.num_hidden_layers, model_config.num_attention_heads))
    total = np.zeros(mask.shape)
    for i in range(0, len(data["label"]), 256):
        total += np.abs(np.asarray(grad(mask, {k: v[i : i + 256] for k, v in data.items()})))
    return total / np.linalg.norm(total, axis=1, keepdims=True)


def timing(model_config, params, rounds: int) -> tuple[float, float]:
    """(ms at batch 1 x 128, sequences/s at batch 32 x 128)."""
    forward = forward_fn(model_config)
    out = []
    for batch, calls in ((1, 40), (32, 4)):
        rng = np.random.default_rng(0)
        ids = rng.integers(8, VOCAB, (batch, 128)).astype(np.int32)
        args = (params, ids, np.ones_like(ids), np.zeros_like(ids))
        jax.block_until_ready(forward(*args))
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(forward(*args))
            times.append((time.perf_counter() - start) / calls)
        out.append(statistics.median(times))
    return out[0] * 1e3, 32 / out[1]


def parameters(params) -> int:
    """Weights counted once whatever they are stored in (an int8 matrix's scales not counted)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(np.size(x) for path, x in leaves if not str(path[-1].key).endswith("_scale"))


def disk_bytes(params) -> int:
    flat = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    return buffer.getbuffer().nbytes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/compress")
    args = parser.parse_args()
    train_set, dev = task(4000, 7), task(2048, 1)
    classify = objectives.classification(2)
    teacher_config = config(6, 256, 4)
    teacher = train(classify, teacher_config, train_set, 600)
    distill = objectives.task_distillation(classify, teacher_config, temperature=2.0, alpha=0.9)
    entries = {"teacher (6 x 256)": (teacher_config, teacher)}
    layers, layers_config = models.take_layers(teacher, teacher_config, [0, 2, 4])
    entries["distilled 3 layers"] = (
        layers_config,
        train(distill, layers_config, train_set, 400, teacher, init=layers),
    )
    narrow = config(2, 128, 2)
    entries["distilled 2 x 128"] = (narrow, train(distill, narrow, train_set, 400, teacher))
    for name in ("teacher (6 x 256)", "distilled 3 layers"):
        model_config, params = entries[name]
        importance = head_importance(model_config, params, train_set)
        remove = analysis.heads_to_prune(importance, 0.4)
        pruned_config, pruned = analysis.prune_heads(params, model_config, remove)
        label = "pruned 40%" if name.startswith("teacher") else f"{name}, pruned 40%"
        entries[label] = (pruned_config, pruned)
    cls = models.BertForSequenceClassification
    for name, mode in (
        ("teacher (6 x 256)", "int8"),
        ("teacher (6 x 256)", "int8-dynamic"),
        ("distilled 3 layers", "int8"),
        ("distilled 3 layers, pruned 40%", "int8"),
    ):
        model_config, params = entries[name]
        params, model_config = models.quantize(params, model_config, mode, cls)
        entries[f"{name.removesuffix(' (6 x 256)')}, {mode}"] = (model_config, params)
    rows = []
    for name, (model_config, params) in entries.items():
        latency, throughput = timing(model_config, params, args.rounds)
        rows.append(
            {
                "model": name,
                "parameters": parameters(params),
                "bytes_on_disk": disk_bytes(params),
                "latency_ms_batch1": latency,
                "sequences_per_s_batch32": throughput,
                "dev_accuracy": accuracy(model_config, params, dev),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    lines = [
        "| model | parameters | on disk | batch 1 x 128 | batch 32 x 128 | dev accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['bytes_on_disk'] / 2**20:.2f} MiB "
            f"({r['bytes_on_disk'] / base['bytes_on_disk']:.2f}x) "
            f"| {r['latency_ms_batch1']:.2f} ms "
            f"({base['latency_ms_batch1'] / r['latency_ms_batch1']:.2f}x faster) "
            f"| {r['sequences_per_s_batch32']:,.0f}/s "
            f"({r['sequences_per_s_batch32'] / base['sequences_per_s_batch32']:.2f}x) "
            f"| {r['dev_accuracy']:.4f} |"
        )
    table = "\n".join(lines)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(f"{result['machine']}; medians of {args.rounds} rounds\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
