r"""Feature extraction over long inputs: throughput and peak memory, against a peer.

    python benchmarks/extract.py [--lines=100000] [--out benchmarks/results/extract]

A small BERT (random weights, built from a config with `transformers` and saved as a Hugging
Face directory) and a generated text file of `--lines` lines (8 to 24 words, a tenth of them
`A ||| B` pairs). Each measurement is a fresh process, so its peak resident memory is its own:
- bert_jax: `python -m bert_jax.tools.extract` writing an ArrayRecord file (last layer, first-piece
  word vectors, [CLS] and mean vectors), at `--lines` and at a tenth of them: memory that does
  not grow with the input shows as a ratio near 1;
- the peer: the same model in PyTorch `transformers` (`BertModel`, hidden states of the last
  layer for every line, batched, on the CPU), the usual way features are taken, over the same
  lines, keeping nothing (its lower bound).
Runs alternate A B A B; lines/s are medians. Model compute is a small part here: the benchmark
measures the Python around it (tokenizing, laying out, pooling, writing), where a tool loses.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the a cat dog sat on mat played with ball house river tree green blue ran over under".split()
)

PEER = r"""
import sys, torch, transformers
model_dir, path, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = transformers.BertTokenizerFast(model_dir + "/vocab.txt")
model = transformers.BertModel.from_pretrained(model_dir).eval()
def run(lines):
    split = [l.partition(" ||| ") for l in lines]
    singles = [a for a, s, _ in split if not s]
    pairs = [(a, b) for a, s, b in split if s]
    calls = [(singles,)] if singles else []
    calls += [([a for a, _ in pairs], [b for _, b in pairs])] if pairs else []
    for texts in calls:
        enc = tok(*texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            model(**enc).last_hidden_state.numpy()
with open(path) as f:
    chunk = []
    for line in f:
        chunk.append(line.rstrip("\n"))
        if len(chunk) == batch:
            run(chunk); chunk = []
    if chunk:
        run(chunk)
"""


def make_inputs(directory: str, lines: int) -> tuple[str, str]:
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ed", "."]
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
    )
    model_dir = os.path.join(directory, "model")
    transformers.BertModel(config).save_pretrained(model_dir)
    with open(os.path.join(model_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    rng = np.random.default_rng(0)
    text = os.path.join(directory, f"lines_{lines}.txt")
    with open(text, "w") as f:
        for i in range(lines):
            words = " ".join(rng.choice(WORDS, int(rng.integers(8, 25))))
            f.write(words.replace(" ", " ||| ", 1) + "\n" if i % 10 == 0 else words + "\n")
    return model_dir, text


def measure(command: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{command[:4]} failed ({status})")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/extract")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, big = make_inputs(tmp, args.lines)
        _, small = make_inputs(os.path.join(tmp, "small"), args.lines // 10)
        runs = {"bert_jax": [], "bert_jax_small": [], "torch": []}
        for _ in range(args.rounds):
            for name, path in (("bert_jax", big), ("bert_jax_small", small)):
                out = os.path.join(tmp, f"{name}.array_record")
                seconds, mib = measure(
                    [
                        sys.executable,
                        "-m",
                        "bert_jax.tools.extract",
                        f"--model=hf:{model_dir}",
                        f"--input={path}",
                        f"--output={out}",
                        "--layers=-1",
                        f"--batch_size={args.batch_size}",
                    ]
                )
                lines = args.lines if path == big else args.lines // 10
                runs[name].append(
                    {"seconds": seconds, "lines_per_s": lines / seconds, "peak_mib": mib}
                )
                os.remove(out)
            seconds, mib = measure(
                [sys.executable, "-c", PEER, model_dir, big, str(args.batch_size)]
            )
            runs["torch"].append(
                {"seconds": seconds, "lines_per_s": args.lines / seconds, "peak_mib": mib}
            )
            print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
    summary = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("lines_per_s", "peak_mib")}
        for name, rs in runs.items()
    }
    summary["memory_ratio_10x_lines"] = (
        summary["bert_jax"]["peak_mib"] / summary["bert_jax_small"]["peak_mib"]
    )
    summary["speed_ratio_vs_torch"] = (
        summary["bert_jax"]["lines_per_s"] / summary["torch"]["lines_per_s"]
    )
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "lines": args.lines,
        "model": "BERT 2 x 64, random weights; whole processes (start-up and compile included)",
        "summary": summary,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
