r"""What CPU users run, as whole jobs, against PyTorch doing the same work in the same run.

    python benchmarks/cpu_jobs.py [--shapes=6x384,12x768] [--lines=8000] [--rounds=2]
        [--jobs=extract,classify,step] [--out=benchmarks/results/cpu_jobs]

Inputs (nothing downloaded): the default corpus's sentences (`corpus.build_stdlib_corpus`: the
Python standard library's docstrings, one sentence a line, in a seeded random order), a
30,522-piece WordPiece vocabulary learnt from them (`train_wordpiece_vocab`, filled up with
`[unusedN]`), and per shape a released model's directory written by `transformers` (random
weights: speed does not depend on them): 6 x 384 with 12 heads (MiniLM-L6-H384's shape) and
12 x 768 (BERT-Base's).

Jobs, each side a whole process timed from launch to exit (start-up, loading, compiling,
tokenizing and writing included), sides alternating within each round:
- `extract`: `python -m bert_jax.tools.extract --layers=-1` writing an ArrayRecord file (the
  first piece's vector of every word, the pooled [CLS] and the mean vector of every line)
  against a PyTorch loop that writes the same vectors: `BertTokenizerFast`, `BertModel` under
  `torch.inference_mode()`, batches of 64 lines padded to their longest (`torch`) or
  length-grouped as the Trainer's `group_by_length` makes them (`torch_grouped`).
- `classify`: `python -m bert_jax.tools.predict classify` writing JSON lines (label and
  probabilities) against the same PyTorch loops over `BertForSequenceClassification`.
- `step`: the fine-tuning step (classification, AdamW, dropout 0.1, fp32) in one process, on
  batches of 32 of the sentences: bert_jax's packed rows (finetune.py's default) against
  PyTorch eager with batches padded to their longest (`torch`) and length-grouped
  (`torch_grouped`, the peer that does as little padding); examples per second over the same
  examples, medians of rounds.
bert_jax packs several lines into a row, so it computes fewer padded positions than the
padded loop: `torch_grouped` is the peer that pads as little, and each figure says which peer
it is against. Reports wall (and CPU) seconds and ratios (peer time / bert_jax time: above 1,
bert_jax is faster).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import finetune_packing  # noqa: E402  (its PyTorch fine-tuning step)
from finetune_e2e import timed  # noqa: E402  (a whole process's wall and CPU seconds)

VOCAB = 30522

TORCH_COMMON = r"""
import json, sys, numpy as np, torch, transformers
model_dir, path, out, grouped = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
tok = transformers.BertTokenizerFast.from_pretrained(model_dir)
lines = [l.rstrip("\n") for l in open(path, encoding="utf-8")]
def batches(batch=64):
    order = list(range(len(lines)))
    if grouped:  # the Trainer's group_by_length: mega-batches of 50 batches sorted by length
        lengths = [len(e) for e in tok(lines, truncation=True, max_length=128)["input_ids"]]
        mega = [order[i:i + 50 * batch] for i in range(0, len(order), 50 * batch)]
        order = [i for m in mega for i in sorted(m, key=lambda i: -lengths[i])]
    return [order[i:i + batch] for i in range(0, len(order), batch)]
"""

TORCH_EXTRACT = (
    TORCH_COMMON
    + r"""
model = transformers.BertModel.from_pretrained(model_dir).eval()
with open(out, "wb") as f, torch.inference_mode():
    for batch in batches():
        words = [lines[i].split() for i in batch]
        enc = tok(words, is_split_into_words=True, padding=True, truncation=True,
                  max_length=128, return_tensors="pt")
        o = model(**enc)
        hidden, pooled = o.last_hidden_state.numpy(), o.pooler_output.numpy()
        mask = enc["attention_mask"].numpy()
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        for r, i in enumerate(batch):
            ids, first, seen = enc.word_ids(r), [], set()
            for pos, w in enumerate(ids):
                if w is not None and w not in seen:
                    seen.add(w); first.append(pos)
            vectors = np.full((len(words[r]), hidden.shape[-1]), np.nan, np.float32)
            vectors[sorted(seen)] = hidden[r, first]
            f.write(np.int64(i).tobytes() + vectors.tobytes() + pooled[r].tobytes()
                    + mean[r].tobytes())
"""
)

TORCH_CLASSIFY = (
    TORCH_COMMON
    + r"""
model = transformers.BertForSequenceClassification.from_pretrained(model_dir).eval()
labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
with open(out, "w") as f, torch.inference_mode():
    for batch in batches():
        enc = tok([lines[i] for i in batch], padding=True, truncation=True, max_length=128,
                  return_tensors="pt")
        probs = model(**enc).logits.softmax(-1).numpy()
        for r, i in enumerate(batch):
            scores = {l: float(p) for l, p in zip(labels, probs[r])}
            f.write(json.dumps({"line_index": i, "text": lines[i],
                                "label": labels[int(probs[r].argmax())], "scores": scores}) + "\n")
"""
)


def make_inputs(tmp: str, lines: int) -> tuple[str, str]:
    """(the text file of `lines` sentences, the vocabulary file)."""
    from bert_jax.data import corpus, tokenization

    path = corpus.build_stdlib_corpus(os.path.join(tmp, "corpus"))
    with open(path, encoding="utf-8") as f:
        sentences = [s.strip() for s in f if s.strip()]
    vocab = os.path.join(tmp, "vocab.txt")
    tokenization.train_wordpiece_vocab(sentences, vocab, vocab_size=VOCAB)
    with open(vocab, encoding="utf-8") as f:
        pieces = [t.rstrip("\n") for t in f]
    pieces += [f"[unused{i}]" for i in range(VOCAB - len(pieces))]
    with open(vocab, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in pieces)
    rng = np.random.default_rng(0)
    chosen = [sentences[i] for i in rng.permutation(len(sentences))[:lines]]
    text = os.path.join(tmp, "lines.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.writelines(s + "\n" for s in chosen)
    return text, vocab


def write_model(path: str, shape: str, vocab: str) -> None:
    """A released model's directory of `shape` (layers x hidden) with a classifier head."""
    import shutil

    import torch
    import transformers

    layers, hidden = map(int, shape.split("x"))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=4 * hidden,
        num_labels=2,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    shutil.copy(vocab, os.path.join(path, "vocab.txt"))
    transformers.BertTokenizerFast(os.path.join(path, "vocab.txt")).save_pretrained(path)


def bert_jax_job(job: str, model: str, text: str, out: str) -> list[str]:
    if job == "extract":
        return [
            sys.executable,
            "-m",
            "bert_jax.tools.extract",
            f"--model=hf:{model}",
            f"--input={text}",
            f"--output={out}.array_record",
            "--layers=-1",
        ]
    return [
        sys.executable,
        "-m",
        "bert_jax.tools.predict",
        "classify",
        f"--model=hf:{model}",
        f"--input={text}",
        f"--output={out}.jsonl",
    ]


def run_process_job(job: str, shape: str, tmp: str, text: str, rounds: int) -> dict:
    model = os.path.join(tmp, f"model_{shape}")
    script = os.path.join(tmp, f"torch_{job}.py")
    with open(script, "w") as f:
        f.write(TORCH_EXTRACT if job == "extract" else TORCH_CLASSIFY)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    sides = {
        "bert_jax": lambda out: bert_jax_job(job, model, text, out),
        "torch": lambda out: [sys.executable, script, model, text, out, "0"],
        "torch_grouped": lambda out: [sys.executable, script, model, text, out, "1"],
    }
    runs: dict[str, list] = {side: [] for side in sides}
    for r in range(rounds):
        for side, command in sides.items():
            out = os.path.join(tmp, f"{job}_{shape}_{side}_{r}")
            result = timed(command(out), env)
            result.pop("output")
            runs[side].append(result)
            print(f"{job} {shape} {side} round {r}: {result['wall_s']:.1f} s", flush=True)
    return summarize(runs)


def summarize(runs: dict) -> dict:
    """Per side: median wall and CPU seconds of its runs, and its ratio to bert_jax's."""
    summary = {
        side: {
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "runs": rs,
        }
        for side, rs in runs.items()
    }
    for side in summary:
        summary[side]["ratio"] = summary[side]["wall_s"] / summary["bert_jax"]["wall_s"]
    return summary


def run_step_job(shape: str, tmp: str, text: str, rounds: int, steps: int) -> dict:
    """The fine-tuning step in this process: bert_jax packed, PyTorch padded and grouped."""
    cmd = [sys.executable, __file__, "--_step", shape, "--_tmp", tmp, "--_text", text]
    cmd += ["--rounds", str(rounds), "--_steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_worker(shape: str, tmp: str, text: str, rounds: int, steps: int) -> dict:
    from bert_jax.data import encoding, tokenization
    from bert_jax.tasks import glue

    model = os.path.join(tmp, f"model_{shape}")
    tok = tokenization.load("wordpiece", os.path.join(model, "vocab.txt"))
    with open(text, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    n = 32 * (steps * rounds + 2)
    lines = (lines * (n // len(lines) + 1))[:n]
    examples = glue.Examples(lines, None, np.arange(n) % 2, [str(i) for i in range(n)])
    features = encoding.encode(examples, tok, 128)
    features["label"] = features["label"].astype(np.int32)
    lengths = features["input_mask"].sum(1)

    def rounds_batches(r: int, grouped: bool) -> list[np.ndarray]:
        """Round r's examples (warm-up: r = -1) in batches of 32: in order, or sorted by
        length (one mega-batch, as `group_by_length` sorts 50 batches at a time)."""
        count = 2 if r < 0 else steps
        start = 0 if r < 0 else 32 * (2 + r * steps)
        chosen = np.arange(start, start + 32 * count)
        if grouped:
            chosen = chosen[np.argsort(-lengths[chosen], kind="stable")]
        return [chosen[i : i + 32] for i in range(0, len(chosen), 32)]

    layers, hidden = map(int, shape.split("x"))
    # finetune.py's row counts: every batch's need known ahead, one or two shapes for the run.
    needs = [len(encoding.pack_rows(lengths[b], 128, 16)) for b in rounds_batches(-1, False)]
    for r in range(rounds):
        needs += [len(encoding.pack_rows(lengths[b], 128, 16)) for b in rounds_batches(r, False)]
    jax_side = _JaxStep(layers, hidden, encoding.row_counts(needs))
    torch_side = _TorchStep(model)
    sides = {"bert_jax": (jax_side, False), "torch": (torch_side, False)}
    sides["torch_grouped"] = (torch_side, True)
    for runner, grouped in sides.values():  # warm-up: compiles, first allocations
        for b in rounds_batches(-1, grouped):
            runner.step({k: v[b] for k, v in features.items()})
    for rows in jax_side.counts:  # every packed shape compiled before the timing
        jax_side.step({k: v[:4] for k, v in features.items()}, rows)
    times = {side: [] for side in sides}
    for r in range(rounds):  # every side steps over the same examples, batched its way
        for side, (runner, grouped) in sides.items():
            start = time.perf_counter()
            for b in rounds_batches(r, grouped):
                runner.step({k: v[b] for k, v in features.items()})
            times[side].append((time.perf_counter() - start) / steps)
    result = {side: {"step_s": statistics.median(t), "step_s_all": t} for side, t in times.items()}
    for side in result:
        result[side]["ratio"] = result[side]["step_s"] / result["bert_jax"]["step_s"]
    result["mean_pieces"] = float(lengths.mean())
    return result


class _TorchStep(finetune_packing.Torch):
    """The PyTorch `transformers` step a user writes (`finetune_packing.Torch.step`: eager,
    SDPA attention, AdamW, each batch cut to its longest row) on a released model's
    directory."""

    def __init__(self, model: str):
        import torch
        import transformers

        torch.manual_seed(0)
        self.torch = torch
        self.model = transformers.BertForSequenceClassification.from_pretrained(
            model, attn_implementation="sdpa"
        ).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-5, weight_decay=0.01)
        self.rows = []


class _JaxStep:
    """bert_jax's fine-tuning step on packed rows, as finetune.py runs it."""

    def __init__(self, layers: int, hidden: int, counts: list[int]):
        import jax

        from bert_jax import axes, models, objectives, optim, sharding, training
        from bert_jax.data import encoding

        self.jax, self.encoding, self.sharding, self.axes = jax, encoding, sharding, axes
        config = models.BertConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=12,
            intermediate_size=4 * hidden,
        )
        self.mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
        self.trainer = training.create_trainer(
            config,
            optim.OptimConfig(learning_rate=2e-5, warmup_steps=10, total_steps=10_000),
            self.mesh,
            axes.DEFAULT_RULES,
            objectives.classification(2),
        )
        self.state = jax.block_until_ready(self.trainer.init(0))
        self.counts = counts

    def step(self, batch: dict, rows: int | None = None) -> None:
        if rows is None:
            need = len(self.encoding.pack_rows(batch["input_mask"].sum(1), 128, 16))
            rows = min(c for c in self.counts if c >= need)
        batch = self.encoding.pack(batch, 16, rows=rows)
        batch.pop("source")
        with self.jax.set_mesh(self.mesh):
            device = self.sharding.global_batch(batch, self.mesh, self.axes.DEFAULT_RULES)
            self.state, metrics = self.trainer.train_step(self.state, device)
        self.jax.block_until_ready(metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="6x384,12x768")
    parser.add_argument("--lines", type=int, default=8000)
    parser.add_argument("--lines_large", type=int, default=2000, help="lines at 12x768")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps a round (step job)")
    parser.add_argument("--jobs", default="extract,classify,step")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/cpu_jobs"))
    parser.add_argument("--_step", help=argparse.SUPPRESS)
    parser.add_argument("--_tmp", help=argparse.SUPPRESS)
    parser.add_argument("--_text", help=argparse.SUPPRESS)
    parser.add_argument("--_steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._step:
        print(json.dumps(step_worker(args._step, args._tmp, args._text, args.rounds, args._steps)))
        return
    tmp = tempfile.mkdtemp(prefix="cpu_jobs_")
    text, vocab = make_inputs(tmp, args.lines)
    results: dict = {}
    for shape in args.shapes.split(","):
        write_model(os.path.join(tmp, f"model_{shape}"), shape, vocab)
        shape_text = text
        if shape != "6x384":
            shape_text = os.path.join(tmp, f"lines_{shape}.txt")
            with open(text, encoding="utf-8") as f, open(shape_text, "w") as g:
                g.writelines(f.readlines()[: args.lines_large])
        for job in args.jobs.split(","):
            if job == "step":
                steps = args.steps if shape == "6x384" else max(2, args.steps // 2)
                results[f"step {shape}"] = run_step_job(shape, tmp, text, args.rounds, steps)
            else:
                results[f"{job} {shape}"] = run_process_job(
                    job, shape, tmp, shape_text, args.rounds
                )
            print(json.dumps({k: _ratios(v) for k, v in results.items()}), flush=True)
    report(results, args, text)


def _ratios(result: dict) -> dict:
    return {side: round(r["ratio"], 3) for side, r in result.items() if isinstance(r, dict)}


def report(results: dict, args, text: str) -> None:
    with open(text, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    words = [len(line.split()) for line in lines]
    import jax
    import torch

    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "lines": args.lines,
        "lines_large": args.lines_large,
        "words_per_line": float(np.mean(words)),
        "rounds": args.rounds,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    rows = [
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}, jax {meta['jax']}, "
        f"torch {meta['torch']}; {args.lines} lines at 6x384, {args.lines_large} at larger "
        f"shapes ({meta['words_per_line']:.1f} words a line); medians of {args.rounds} rounds.",
        "",
        "| job | bert_jax | PyTorch padded | vs padded | PyTorch length-grouped | vs grouped |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        key = "step_s" if name.startswith("step") else "wall_s"
        unit = " a step" if key == "step_s" else ""
        cells = [f"{r[s][key]:.2f} s{unit}" for s in ("bert_jax", "torch", "torch_grouped")]
        rows.append(
            f"| {name} | {cells[0]} | {cells[1]} | **{r['torch']['ratio']:.2f}x** | "
            f"{cells[2]} | **{r['torch_grouped']['ratio']:.2f}x** |"
        )
    rows += ["", "Ratios: the peer's time over bert_jax's (above 1: bert_jax is faster)."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
