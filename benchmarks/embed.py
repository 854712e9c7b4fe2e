r"""Sentence embeddings: `predict embed` against `SentenceTransformer.encode`, whole processes.

    python benchmarks/embed.py [--shapes=6x384,12x768] [--lines=8000] [--rounds=2]
        [--out=benchmarks/results/embed]

The same sentence-transformers folder on both sides (a released model's shape with random
weights written by `transformers`, mean pooling and normalization, as all-MiniLM-L6-v2 is
built; 30,522-piece vocabulary learnt from the sentences) and the same sentences (the default
corpus's, as `cpu_jobs.py` takes them). Each side is a whole process timed from launch to
exit (start-up, loading, compiling, tokenizing and writing a `.npy` of the vectors), the sides
alternating within each round:
- `bert_jax`: `python -m bert_jax.tools.predict embed --output=vectors.npy` (32 sentences a
  step, batched by length).
- `sentence_transformers`: `SentenceTransformer(folder).encode(lines, batch_size=32)` (which
  also sorts by length), then `np.save`.
Both write the same vectors (the largest difference is reported). Sentences per second and
the ratio (sentence-transformers' time over bert_jax's: above 1, bert_jax is faster).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from cpu_jobs import make_inputs, summarize, write_model  # noqa: E402  (shared with cpu_jobs)
from finetune_e2e import timed  # noqa: E402  (a whole process's wall and CPU seconds)

ST_SCRIPT = r"""
import sys, numpy as np
from sentence_transformers import SentenceTransformer
folder, path, out = sys.argv[1:4]
lines = [l.rstrip("\n") for l in open(path, encoding="utf-8")]
model = SentenceTransformer(folder, device="cpu")
np.save(out, model.encode(lines, batch_size=32, convert_to_numpy=True, show_progress_bar=False))
"""


def write_folder(tmp: str, shape: str, vocab: str) -> str:
    """A sentence-transformers folder of `shape`: transformer, mean pooling, Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    encoder = os.path.join(tmp, f"encoder_{shape}")
    write_model(encoder, shape, vocab)
    hidden = int(shape.split("x")[1])
    folder = os.path.join(tmp, f"st_{shape}")
    parts = [
        modules.Transformer(encoder, max_seq_length=128),
        modules.Pooling(hidden, pooling_mode="mean"),
        modules.Normalize(),
    ]
    SentenceTransformer(modules=parts, device="cpu").save(folder)
    return folder


def run_shape(shape: str, tmp: str, text: str, vocab: str, rounds: int) -> dict:
    folder = write_folder(tmp, shape, vocab)
    script = os.path.join(tmp, "st_encode.py")
    with open(script, "w") as f:
        f.write(ST_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    sides = {
        "bert_jax": lambda out: [
            sys.executable, "-m", "bert_jax.tools.predict", "embed", f"--model={folder}",
            f"--input={text}", f"--output={out}",
        ],
        "sentence_transformers": lambda out: [sys.executable, script, folder, text, out],
    }  # fmt: skip
    runs: dict[str, list] = {side: [] for side in sides}
    outputs = {}
    for r in range(rounds):
        for side, command in sides.items():
            out = os.path.join(tmp, f"{shape}_{side}_{r}.npy")
            result = timed(command(out), env)
            result.pop("output")
            runs[side].append(result)
            outputs[side] = out
            print(f"embed {shape} {side} round {r}: {result['wall_s']:.1f} s", flush=True)
    ours, theirs = (np.load(outputs[s]) for s in sides)
    lines = len(ours)
    summary = summarize(runs)
    for side in summary:
        summary[side]["sentences_per_s"] = lines / summary[side]["wall_s"]
    return {
        "lines": lines,
        "max_abs_difference": float(np.abs(ours - theirs).max()),
        "sides": summary,
        "ratio": summary["sentence_transformers"]["ratio"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="6x384,12x768")
    parser.add_argument("--lines", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/embed"))
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        text, vocab = make_inputs(tmp, args.lines)
        shapes = {s: run_shape(s, tmp, text, vocab, args.rounds) for s in args.shapes.split(",")}
    result = {
        "command": " ".join(sys.argv),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor()}",
        "rounds": args.rounds,
        "shapes": shapes,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    rows = [
        "| shape | lines | bert_jax | sentence-transformers | ratio | max abs difference |",
        "|---|---|---|---|---|---|",
    ]
    for shape, r in shapes.items():
        ours, theirs = r["sides"]["bert_jax"], r["sides"]["sentence_transformers"]
        rows.append(
            f"| {shape} | {r['lines']} | {ours['wall_s']:.1f} s ({ours['sentences_per_s']:.0f}/s) "
            f"| {theirs['wall_s']:.1f} s ({theirs['sentences_per_s']:.0f}/s) "
            f"| **{r['ratio']:.2f}x** | {r['max_abs_difference']:.1e} |"
        )
    text = f"`{result['command']}`, commit {commit}, {result['machine']}\n\n" + "\n".join(rows)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
