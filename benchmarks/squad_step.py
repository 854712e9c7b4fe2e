r"""The SQuAD fine-tuning step of bert_jax against PyTorch `BertForQuestionAnswering`.

    python benchmarks/squad_step.py                     # BERT-Base sizes, length 384, batch 8
    python benchmarks/squad_step.py --size=tiny --rounds=2

Both models are built from the same config (random weights) and train on the same random
batch of question-answering windows: bert_jax's `QUESTION_ANSWERING` objective through
`bert_jax.training`'s jitted step (AdamW, clipping, dropout 0.1) and `transformers`'
`BertForQuestionAnswering` (SDPA attention, `torch.optim.AdamW`, eager), both float32. Each
runs in a worker process of its own that compiles or warms up once; the driver then asks
them in turn for `--steps` steps, A B A B, so that machine drift falls on both alike, and
reports the median step time of each and the ratio (PyTorch time / bert_jax time: above 1,
bert_jax is faster). Results: benchmarks/results/squad_step.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {  # layers, hidden, heads, intermediate
    "tiny": (2, 128, 2, 512),
    "bert_base": (12, 768, 12, 3072),
}
VOCAB = 30522


def make_batch(batch: int, length: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, VOCAB, (batch, length)).astype(np.int32)
    segments = np.zeros((batch, length), np.int32)
    segments[:, 64:] = 1  # a 64-piece question, then the context window
    starts = rng.integers(65, length - 20, batch).astype(np.int32)
    return {
        "input_ids": ids,
        "input_mask": np.ones((batch, length), np.int32),
        "segment_ids": segments,
        "start_positions": starts,
        "end_positions": (starts + rng.integers(0, 10, batch)).astype(np.int32),
    }


def jax_worker(size: str, batch: dict):
    import jax

    from bert_jax import axes, models, objectives, optim, sharding, training

    layers, hidden, heads, inter = SIZES[size]
    config = models.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=512,
    )
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
    trainer = training.create_trainer(
        config,
        optim.OptimConfig(learning_rate=3e-5, warmup_steps=10, total_steps=1000),
        mesh,
        axes.DEFAULT_RULES,
        objectives.QUESTION_ANSWERING,
    )
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        placed = sharding.global_batch(batch, mesh, axes.DEFAULT_RULES)
    holder = {"state": state}

    def step():
        with jax.set_mesh(mesh):
            holder["state"], metrics = trainer.train_step(holder["state"], placed)
            jax.block_until_ready(metrics)

    return step


def torch_worker(size: str, batch: dict):
    import torch
    import transformers

    layers, hidden, heads, inter = SIZES[size]
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    model = transformers.BertForQuestionAnswering(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01)
    inputs = {
        "input_ids": torch.tensor(batch["input_ids"], dtype=torch.long),
        "attention_mask": torch.tensor(batch["input_mask"]),
        "token_type_ids": torch.tensor(batch["segment_ids"], dtype=torch.long),
        "start_positions": torch.tensor(batch["start_positions"], dtype=torch.long),
        "end_positions": torch.tensor(batch["end_positions"], dtype=torch.long),
    }

    def step():
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker_main(args) -> None:
    batch = make_batch(args.batch, args.length)
    started = time.perf_counter()
    step = (jax_worker if args.worker == "bert_jax" else torch_worker)(args.size, batch)
    step()  # compile (JAX) or warm up (PyTorch)
    step()
    print(json.dumps({"ready": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        print(json.dumps({"times": times}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="bert_base", choices=sorted(SIZES))
    parser.add_argument("--length", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--worker", choices=["bert_jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    common = [f"--size={args.size}", f"--length={args.length}", f"--batch={args.batch}"]
    workers, ready = {}, {}
    for name in ("bert_jax", "torch"):
        workers[name] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={name}", *common],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        ready[name] = json.loads(workers[name].stdout.readline())["ready"]
    times = {name: [] for name in workers}
    for _ in range(args.rounds):
        for name, proc in workers.items():
            proc.stdin.write(f"{args.steps}\n")
            proc.stdin.flush()
            times[name] += json.loads(proc.stdout.readline())["times"]
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["torch"] / median["bert_jax"]
    lines = [
        f"SQuAD fine-tuning step, {args.size} sizes, length {args.length}, batch {args.batch}, "
        f"float32, {os.cpu_count()} CPU cores, {args.rounds} rounds x {args.steps} steps "
        f"alternating (`python benchmarks/squad_step.py`).",
        "",
        "| | median step | sequences/s | start-up (compile or warm-up) |",
        "|---|---|---|---|",
    ]
    for name in workers:
        label = "bert_jax" if name == "bert_jax" else "PyTorch `BertForQuestionAnswering`"
        lines.append(
            f"| {label} | {median[name]:.3f} s | {args.batch / median[name]:.2f} | "
            f"{ready[name]:.1f} s |"
        )
    lines += ["", f"bert_jax is {ratio:.2f}x PyTorch's speed (step time ratio)."]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "squad_step.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
