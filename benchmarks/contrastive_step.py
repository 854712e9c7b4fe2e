r"""The contrastive train step against sentence-transformers' training step, in one process.

    python benchmarks/contrastive_step.py [--shape=6x384] [--pairs=32] [--length=64]
        [--chunk=16] [--steps=5] [--rounds=2] [--out=benchmarks/results/contrastive_step]

The same sentence-transformers folder on both sides (a released model's shape with random
weights written by `transformers`, mean pooling, as all-MiniLM-L6-v2 is built) and the same
batch: `pairs` (anchor, positive) pairs of `length` tokens each (no padding, so neither side
can skip any), dropout on. One step: embed the anchors and positives, in-batch negatives
(MultipleNegativesRankingLoss, scale 20), the gradient, one AdamW update.
- `bert_jax`: finetune.py's compiled train step for `embed:` tasks (`objectives.Embedding`),
  whole batch; and with GradCache in chunks of `chunk` texts.
- `sentence_transformers`: `MultipleNegativesRankingLoss` forward and backward and
  `torch.optim.AdamW.step`; and `CachedMultipleNegativesRankingLoss(mini_batch_size=chunk)`,
  its GradCache.
Each side runs `steps` steps after a warm-up step (bert_jax's compile is in the warm-up),
the sides alternating within each round; the median step time, and the ratio
(sentence-transformers' time over bert_jax's: above 1, bert_jax is faster).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from cpu_jobs import VOCAB, make_inputs  # noqa: E402  (the shared vocabulary and corpus)
from embed import write_folder  # noqa: E402  (the sentence-transformers folder)


def _batch(pairs: int, length: int) -> np.ndarray:
    """[pairs, 2, length] token ids: [CLS] pieces [SEP], no padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, VOCAB, (pairs, 2, length)).astype(np.int32)
    ids[..., 0], ids[..., -1] = 2, 3  # [CLS], [SEP] of write_model's vocabulary
    return ids


def bert_jax_steps(folder: str, ids: np.ndarray, chunk: int):
    """A function running one compiled bert_jax train step (whole batch when `chunk` is 0)."""
    import jax

    from bert_jax import convert, objectives, sharding, training
    from bert_jax.convert import sentence_transformers as st
    from bert_jax.optim import OptimConfig

    mesh = sharding.make_mesh(sharding.MeshConfig())
    pretrained = convert.load_pretrained(st.embedding_spec(folder).model, "BertModel", mesh=mesh)
    objective = objectives.embedding_objective(objectives.Embedding(chunk_size=chunk))
    trainer = training.create_trainer(
        pretrained.config,
        OptimConfig(learning_rate=2e-5, warmup_steps=0),
        mesh,
        sharding.MeshConfig.rules,
        objective,
    )
    ones = np.ones_like(ids)
    host = {"input_ids": ids, "input_mask": ones, "segment_ids": np.zeros_like(ids)}
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        state = state.replace(params=convert.overlay(state.params, pretrained.params))
        batch = trainer.global_batch(host)
    holder = {"state": state}

    def step() -> float:
        with jax.set_mesh(mesh):
            holder["state"], metrics = trainer.train_step(holder["state"], batch)
            return float(metrics["loss"])

    return step


def st_steps(folder: str, ids: np.ndarray, chunk: int):
    """One sentence-transformers training step (whole batch when `chunk` is 0)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    model = SentenceTransformer(folder, device="cpu")
    model.train()
    if chunk:
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=chunk)
    else:
        loss = losses.MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    tensor = torch.from_numpy(ids.astype(np.int64))
    features = [
        {
            "input_ids": tensor[:, i],
            "attention_mask": torch.ones_like(tensor[:, i]),
            "token_type_ids": torch.zeros_like(tensor[:, i]),
        }
        for i in range(2)
    ]

    def step() -> float:
        optimizer.zero_grad()
        value = loss(features, None)
        value.backward()
        optimizer.step()
        return float(value)

    return step


def measure(sides: dict, steps: int, rounds: int) -> dict:
    """Per side: the median seconds of a step over `rounds` x `steps`, sides alternating."""
    times: dict[str, list[float]] = {side: [] for side in sides}
    losses: dict[str, float] = {}
    for step in sides.values():
        step()  # warm-up: compiling, allocators, thread pools
    for r in range(rounds):
        for side, step in sides.items():
            for _ in range(steps):
                start = time.perf_counter()
                losses[side] = step()
                times[side].append(time.perf_counter() - start)
            print(f"{side} round {r}: {statistics.median(times[side][-steps:]):.3f} s a step")
    return {
        side: {"step_s": statistics.median(t), "steps": t, "last_loss": losses[side]}
        for side, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="6x384")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/contrastive_step"))
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    ids = _batch(args.pairs, args.length)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, vocab = make_inputs(tmp, 200)
        folder = write_folder(tmp, args.shape, vocab)
        for name, chunk in (("whole batch", 0), (f"GradCache, chunks of {args.chunk}", args.chunk)):
            sides = {
                "bert_jax": bert_jax_steps(folder, ids, chunk),
                "sentence_transformers": st_steps(folder, ids, chunk),
            }
            timing = measure(sides, args.steps, args.rounds)
            ratio = timing["sentence_transformers"]["step_s"] / timing["bert_jax"]["step_s"]
            results[name] = {"sides": timing, "ratio": ratio}
    result = {
        "command": " ".join(sys.argv),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor()}",
        **{k: getattr(args, k) for k in ("shape", "pairs", "length", "chunk", "steps", "rounds")},
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    rows = ["| step | bert_jax | sentence-transformers | ratio |", "|---|---|---|---|"]
    for name, r in results.items():
        ours, theirs = r["sides"]["bert_jax"], r["sides"]["sentence_transformers"]
        rows.append(
            f"| {name} | {ours['step_s']:.3f} s | {theirs['step_s']:.3f} s | "
            f"**{r['ratio']:.2f}x** |"
        )
    header = (
        f"`{result['command']}`, commit {commit}, {result['machine']}; {args.shape}, "
        f"{args.pairs} pairs of {args.length} tokens"
    )
    text = header + "\n\n" + "\n".join(rows)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
