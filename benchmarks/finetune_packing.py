r"""Fine-tuning on short examples: packed rows against padded rows, and against PyTorch.

    python benchmarks/finetune_packing.py [--model=L-4_H-512] [--batch=32] [--max_len=128]
        [--min_tokens=8 --max_tokens=64] [--out=benchmarks/results/finetune_packing]

A GLUE-style classification fine-tuning step (forward, backward, AdamW; dropout 0.1; fp32) on
batches of `--batch` examples whose lengths in pieces, [CLS] and [SEP] included, are drawn
uniformly from [min_tokens, max_tokens] (8-64: sentences and sentence pairs of SST-2 / MNLI
size), in three ways, one after the other on the same batches, A B C A B C:
- `padded`: bert_jax, one example per row of `--max_len`, as `run_classifier.py` does;
- `packed`: bert_jax, `encoding.pack` (finetune.py's default): several examples to a row, kept
  apart by the attention mask, positions restarting at each example;
- `torch`: `transformers` `BertForSequenceClassification` (PyTorch, SDPA attention) with each
  batch padded to its longest example (`DataCollatorWithPadding`, the Trainer's default).
The model has random weights, built from a config. Reports examples/s (medians) and ratios.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VOCAB = 30522


def make_examples(n: int, max_len: int, lo: int, hi: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, n)
    mask = (np.arange(max_len)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1000, VOCAB, (n, max_len)).astype(np.int32) * mask
    ids[:, 0] = 101
    ids[np.arange(n), lengths - 1] = 102
    segments = ((np.arange(max_len)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    labels = rng.integers(0, 3, n).astype(np.int32)
    return dict(input_ids=ids, input_mask=mask, segment_ids=segments, label=labels)


class BertJax:
    def __init__(self, model: str, packed: bool, max_per_row: int):
        import jax

        from bert_jax import axes, models, objectives, optim, sharding, training
        from bert_jax.tasks import glue

        self.jax, self.glue, self.sharding, self.axes = jax, glue, sharding, axes
        config = models.BertConfig.named(model)
        self.mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
        self.trainer = training.create_trainer(
            config,
            optim.OptimConfig(learning_rate=2e-5, warmup_steps=10, total_steps=10_000),
            self.mesh,
            axes.DEFAULT_RULES,
            objectives.classification(3),
        )
        self.state = jax.block_until_ready(self.trainer.init(0))
        self.packed, self.max_per_row = packed, max_per_row
        self.rows = []

    def step(self, batch: dict) -> None:
        if self.packed:
            batch = self.encoding.pack(batch, self.max_per_row)
            batch.pop("source")
        self.rows.append(len(batch["input_ids"]))
        with self.jax.set_mesh(self.mesh):
            device = self.sharding.global_batch(batch, self.mesh, self.axes.DEFAULT_RULES)
            self.state, metrics = self.trainer.train_step(self.state, device)
        self.jax.block_until_ready(metrics)


class Torch:
    def __init__(self, model: str):
        import torch
        import transformers

        from bert_jax import models

        c = models.BertConfig.named(model)
        torch.manual_seed(0)
        self.torch = torch
        self.model = transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=VOCAB,
                hidden_size=c.hidden_size,
                num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads,
                intermediate_size=c.intermediate_size,
                num_labels=3,
                attn_implementation="sdpa",
            )
        ).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-5, weight_decay=0.01)
        self.rows = []

    def step(self, batch: dict) -> None:
        torch = self.torch
        longest = int(batch["input_mask"].sum(1).max())
        self.rows.append(len(batch["input_ids"]))
        out = self.model(
            input_ids=torch.from_numpy(batch["input_ids"][:, :longest]).long(),
            attention_mask=torch.from_numpy(batch["input_mask"][:, :longest]).long(),
            token_type_ids=torch.from_numpy(batch["segment_ids"][:, :longest]).long(),
            labels=torch.from_numpy(batch["label"]).long(),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="L-4_H-512", help="a BertConfig.named size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max_len", type=int, default=128)
    parser.add_argument("--min_tokens", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--max_per_row", type=int, default=16)
    parser.add_argument("--warmup_batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps_per_round", type=int, default=3)
    parser.add_argument("--peers", default="torch", help="'' to skip PyTorch")
    parser.add_argument("--out", default="benchmarks/results/finetune_packing")
    args = parser.parse_args()

    n_batches = args.warmup_batches + args.rounds * args.steps_per_round
    data = make_examples(n_batches * args.batch, args.max_len, args.min_tokens, args.max_tokens)
    batches = [
        {k: v[i * args.batch : (i + 1) * args.batch] for k, v in data.items()}
        for i in range(n_batches)
    ]
    runners = {
        "padded": BertJax(args.model, False, args.max_per_row),
        "packed": BertJax(args.model, True, args.max_per_row),
    }
    if "torch" in args.peers.split(","):
        runners["torch"] = Torch(args.model)
    for name, runner in runners.items():  # warm-up: compiles every packed shape it meets
        start = time.perf_counter()
        for batch in batches[: args.warmup_batches]:
            runner.step(batch)
        print(f"{name}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    times = {name: [] for name in runners}
    timed = batches[args.warmup_batches :]
    for r in range(args.rounds):
        chunk = timed[r * args.steps_per_round : (r + 1) * args.steps_per_round]
        for name, runner in runners.items():
            for batch in chunk:
                start = time.perf_counter()
                runner.step(batch)
                times[name].append(time.perf_counter() - start)
    tokens = data["input_mask"][args.warmup_batches * args.batch :].sum()
    results = {}
    for name, t in times.items():
        step = statistics.median(t)
        rows = runners[name].rows[args.warmup_batches :]
        results[name] = {
            "step_s": step,
            "step_s_all": t,
            "examples_per_s": args.batch / step,
            "mean_rows": float(np.mean(rows)),
        }
        print(f"{name}: {step * 1e3:.0f} ms/step, {args.batch / step:.1f} examples/s", flush=True)
    ratios = {
        f"packed / {p}": results[p]["step_s"] / results["packed"]["step_s"]
        for p in results
        if p != "packed"
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x", flush=True)
    real_fraction = tokens / (len(timed) * args.batch * args.max_len)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "args": vars(args),
        "real_token_fraction": float(real_fraction),
        "results": results,
        "ratios": ratios,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"Hardware: {result['machine']}. Model {args.model}, batch {args.batch} examples of "
        f"{args.min_tokens}-{args.max_tokens} pieces (mean fill {real_fraction:.0%} of "
        f"{args.max_len}), fp32.",
        "",
        "| method | rows per step | step | examples/s | packed speed-up |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        speedup = "-" if name == "packed" else f"**{ratios[f'packed / {name}']:.2f}x**"
        lines.append(
            f"| {name} | {r['mean_rows']:.1f} | {r['step_s'] * 1e3:,.0f} ms | "
            f"{r['examples_per_s']:.1f} | {speedup} |"
        )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
