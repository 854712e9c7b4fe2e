r"""A whole fine-tuning run as a user runs it: `finetune.py` against a plain PyTorch loop.

    python benchmarks/finetune_e2e.py [--pairs=3] [--train=3200] [--out=...]

Both sides are whole processes, timed from launch to exit, alternating (jax, torch, jax,
torch, ...), on the same files: an SST-2 folder (`train.tsv` of `--train` movie-review
sentences, `dev.tsv` 872, `test.tsv` 1,821: SST-2's sizes) and a released-model directory of
a 6-layer x 384 BERT (MiniLM-L6-H384's shape, 30,522 pieces; random weights written by
`transformers`, since nothing can be downloaded here). Each side trains `--epochs` (2) at batch 32
(AdamW at `--lr`, 1e-4 by default, weight decay 0.01, 10% warmup then linear decay, dropout
0.1, length 128),
evaluates dev accuracy, keeps the model, and writes test predictions.

- `bert_jax`: `finetune.py --config.tasks=sst2` (packing on, its default), one learning rate
  and one seed. Its compilation cache is emptied before every run unless `--warm_cache`: a
  user's first run; later runs of the same shapes load their programs from the cache.
- `torch`: the loop a user writes with `transformers` (`BertTokenizerFast`, dynamic padding to
  the batch's longest row as `DataCollatorWithPadding` does, `torch.optim.AdamW`,
  `get_linear_schedule_with_warmup`, `save_pretrained`), fp32, SDPA attention.
- `torch_grouped`: the same loop with length-grouped batches, as `transformers`' Trainer
  makes them with `group_by_length` (mega-batches of 50 batches sorted by length), so that
  padding wastes little: the fair peer of bert_jax's packed rows.

The sentences are generated (a review grammar of real words, lengths like SST-2's sentences:
about 19 words, 4-50), since no dataset can be fetched; their labels follow the words'
polarity, so that a model learns them from random weights (at 1e-4 in two epochs; 2e-5, a
released model's rate, leaves random weights at chance in one): every side's dev accuracy is
reported, and must be far above chance and equal within noise for the times to compare.
Reports wall and CPU seconds per run (medians) and each peer's ratio to bert_jax.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"train": 3200, "dev": 872, "test": 1821}

_SUBJECTS = (
    "the film", "this movie", "the story", "its script", "the cast", "the director",
    "the plot", "the ending", "the dialogue", "the soundtrack", "every scene", "the lead",
    "the camera work", "this picture", "the performances", "the humor", "the pacing",
)  # fmt: skip
_POSITIVE = (
    "charming", "moving", "brilliant", "funny", "gripping", "beautiful", "witty", "tender",
    "smart", "engaging", "warm", "powerful", "delightful", "honest", "fresh", "inventive",
)  # fmt: skip
_NEGATIVE = (
    "dull", "tedious", "clumsy", "predictable", "flat", "lifeless", "silly", "boring",
    "bland", "messy", "shallow", "forced", "stale", "pointless", "awkward", "tiresome",
)  # fmt: skip
_VERBS = ("is", "feels", "seems", "remains", "turns out", "proves", "comes across as")
_ADVERBS = ("very", "quite", "oddly", "truly", "rather", "often", "almost", "always", "so")
_FILLERS = (
    "from start to finish", "for most of its running time", "in the second half",
    "despite a few missteps", "with a sharp eye for detail", "as the credits roll",
    "in a way few films manage", "even on a small budget", "for an audience of adults",
    "and the actors know it", "without ever raising its voice", "like a cold cup of coffee",
)  # fmt: skip


def review(rng: np.random.Generator) -> tuple[str, int]:
    """One sentence and its label (1: positive)."""
    label = int(rng.integers(0, 2))
    words = _POSITIVE if label else _NEGATIVE
    clauses = []
    for _ in range(int(rng.choice([1, 1, 2, 2, 3, 4]))):
        clause = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}"
        if rng.random() < 0.5:
            clause += f" {rng.choice(_ADVERBS)}"
        clause += f" {rng.choice(words)}"
        if rng.random() < 0.6:
            clause += f" {rng.choice(_FILLERS)}"
        clauses.append(clause)
    return " , and ".join(clauses) + " .", label


def write_data(root: str, sizes: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "SST-2"), exist_ok=True)
    for split, n in sizes.items():
        rows = [review(rng) for _ in range(n)]
        with open(os.path.join(root, "SST-2", f"{split}.tsv"), "w") as f:
            if split == "test":
                f.write("index\tsentence\n")
                f.writelines(f"{i}\t{s}\n" for i, (s, _) in enumerate(rows))
            else:
                f.write("sentence\tlabel\n")
                f.writelines(f"{s}\t{y}\n" for s, y in rows)


def write_model(path: str) -> None:
    """A MiniLM-L6-H384-shaped BERT in a released model's layout (config, weights, vocab)."""
    import torch
    import transformers

    words = sorted(
        {w for group in (_SUBJECTS, _POSITIVE, _NEGATIVE, _VERBS, _ADVERBS, _FILLERS)
         for phrase in group for w in phrase.split()} | {",", "."}
    )  # fmt: skip
    vocab = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += words
    vocab += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(vocab))]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.writelines(t + "\n" for t in vocab)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        num_labels=2,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    transformers.BertTokenizerFast(os.path.join(path, "vocab.txt")).save_pretrained(path)


TORCH_LOOP = r"""
import csv, os, sys, torch, transformers
data, model_dir, out, lr, grouped, epochs = sys.argv[1:7]
lr, grouped, epochs = float(lr), grouped == "1", int(epochs)
torch.manual_seed(0)

def read(split):
    with open(os.path.join(data, "SST-2", f"{split}.tsv")) as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))

tok = transformers.BertTokenizerFast.from_pretrained(model_dir)
model = transformers.BertForSequenceClassification.from_pretrained(
    model_dir, attn_implementation="sdpa")
collate = transformers.DataCollatorWithPadding(tok)

def grouped_batches(lengths, batch, generator):
    # transformers' LengthGroupedSampler (Trainer's group_by_length): a random order cut into
    # mega-batches of 50 batches, each sorted by length, longest first, then cut into batches.
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = [order[i:i + 50 * batch] for i in range(0, len(order), 50 * batch)]
    mega = [sorted(m, key=lambda i: -lengths[i]) for m in mega]
    batches = [m[i:i + batch] for m in mega for i in range(0, len(m), batch)]
    return [b for b in batches if len(b) == batch]  # drop_last, as the plain loop does

def loader(rows, batch, shuffle, labels=True, seed=0):
    enc = tok([r["sentence"] for r in rows], truncation=True, max_length=128)
    items = [{"input_ids": i, "token_type_ids": t, "attention_mask": m}
             for i, t, m in zip(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])]
    if labels:
        for item, r in zip(items, rows):
            item["labels"] = int(r["label"])
    if shuffle and grouped:
        lengths = [len(i) for i in enc["input_ids"]]
        sampler = grouped_batches(lengths, batch, torch.Generator().manual_seed(seed))
        return torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=collate)
    return torch.utils.data.DataLoader(items, batch_size=batch, shuffle=shuffle,
                                       collate_fn=collate, drop_last=shuffle)

train = loader(read("train"), 32, True)
steps = epochs * len(train)
no_decay = ("bias", "LayerNorm.weight")
groups = [
    {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
     "weight_decay": 0.01},
    {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
     "weight_decay": 0.0},
]
opt = torch.optim.AdamW(groups, lr=lr)
sched = transformers.get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
model.train()
for epoch in range(epochs):
    if grouped:  # a new grouping each epoch, as the sampler reshuffles
        train = loader(read("train"), 32, True, seed=epoch)
    for batch in train:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)

@torch.no_grad()
def predict(rows, labels):
    model.eval()
    return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
                      for b in loader(rows, 64, False, labels)])

dev = read("dev")
acc = (predict(dev, True) == torch.tensor([int(r["label"]) for r in dev])).float().mean()
model.save_pretrained(os.path.join(out, "best"))
test = read("test")
with open(os.path.join(out, "SST-2.tsv"), "w") as f:
    f.write("index\tprediction\n")
    f.writelines(f"{r['index']}\t{p}\n" for r, p in zip(test, predict(test, False).tolist()))
print(f"dev accuracy {acc:.4f}")
"""


def timed(args: list[str], env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{args[:2]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "output": (proc.stdout + proc.stderr)[-2000:]}


def jax_run(tmp: str, run: int, warm: bool, lr: float, epochs: int) -> dict:
    workdir = os.path.join(tmp, f"jax_{run}")
    cache = os.path.join(tmp, "cache")
    if not warm:
        shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "BERT_JAX_CACHE": cache}
    args = [
        sys.executable,
        os.path.join(ROOT, "finetune.py"),
        f"--config={os.path.join(ROOT, 'configs', 'glue.py')}",
        "--config.tasks=sst2",
        f"--config.init_from=hf:{os.path.join(tmp, 'model')}",
        f"--config.data_dir={os.path.join(tmp, 'data')}",
        f"--config.num_epochs={epochs}",
        "--config.seeds=0",
        f"--config.learning_rates={lr:g}",
        f"--workdir={workdir}",
    ]
    result = timed(args, env)
    with open(os.path.join(workdir, "results.json")) as f:
        result["dev_accuracy"] = _find(json.load(f), "accuracy")
    return result


def _find(tree, key: str):
    """The first value under `key` in a JSON tree (the best run's dev accuracy)."""
    if isinstance(tree, dict):
        if key in tree and isinstance(tree[key], int | float):
            return float(tree[key])
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find(item, key)
            if found is not None:
                return found
    return None


def torch_run(tmp: str, run: int, lr: float, grouped: bool, epochs: int) -> dict:
    out = os.path.join(tmp, f"torch_{run}_{int(grouped)}")
    os.makedirs(out, exist_ok=True)
    script = os.path.join(tmp, "torch_loop.py")
    data, model = os.path.join(tmp, "data"), os.path.join(tmp, "model")
    args = [sys.executable, script, data, model, out, f"{lr:g}", str(int(grouped)), str(epochs)]
    result = timed(args, dict(os.environ))
    result["dev_accuracy"] = float(result["output"].split("dev accuracy ")[-1].split()[0])
    return result


def run_side(side: str, tmp: str, i: int, args) -> dict:
    if side == "jax":
        return jax_run(tmp, i, args.warm_cache, args.lr, args.epochs)
    return torch_run(tmp, i, args.lr, side == "torch_grouped", args.epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--train", type=int, default=SIZES["train"])
    parser.add_argument("--warm_cache", action="store_true", help="keep compiled programs")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of every side")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", default="jax,torch,torch_grouped")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/finetune_e2e"))
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="finetune_e2e_")
    write_data(os.path.join(tmp, "data"), {**SIZES, "train": args.train})
    write_model(os.path.join(tmp, "model"))
    with open(os.path.join(tmp, "torch_loop.py"), "w") as f:
        f.write(TORCH_LOOP)
    sides = args.only.split(",")
    runs = {side: [] for side in sides}
    for i in range(args.pairs):
        for side in sides:
            r = run_side(side, tmp, i, args)
            runs[side].append(r)
            print(
                f"{side} run {i}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, dev "
                f"accuracy {r['dev_accuracy']:.4f}",
                flush=True,
            )
    summary = {
        side: {
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "wall_all": [round(r["wall_s"], 2) for r in rs],
            "dev_accuracy": [r["dev_accuracy"] for r in rs],
        }
        for side, rs in runs.items()
    }
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "args": vars(args),
        "summary": summary,
        "last_output": {side: rs[-1]["output"] for side, rs in runs.items()},
    }
    for peer in ("torch", "torch_grouped"):
        if "jax" in summary and peer in summary:
            for key in ("wall_s", "cpu_s"):
                ratio = summary[peer][key] / summary["jax"][key]
                result[f"{peer} / bert_jax ({key})"] = ratio
                print(f"{peer} / bert_jax {key}: {ratio:.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    shutil.rmtree(tmp, ignore_errors=True)


def markdown(result: dict) -> str:
    args, summary = result["args"], result["summary"]
    lines = [
        f"Hardware: {result['machine']}. SST-2 layout, {args['train']:,} training sentences "
        f"({args['epochs']} epochs, batch 32, learning rate {args['lr']:g}), dev "
        f"{SIZES['dev']:,} and test {SIZES['test']:,} predicted; 6-layer x 384 BERT; whole "
        f"processes, {args['pairs']} rounds alternating; compilation cache "
        f"{'kept' if args['warm_cache'] else 'emptied before each run'}.",
        "",
        "| side | wall (median) | CPU (median) | every run's wall | dev accuracy |",
        "|---|---|---|---|---|",
    ]
    names = {
        "jax": "bert_jax `finetune.py` (packed rows)",
        "torch": "PyTorch loop, batches padded to their longest",
        "torch_grouped": "PyTorch loop, length-grouped batches (`group_by_length`)",
    }
    for side, s in summary.items():
        runs = ", ".join(f"{w:.1f}" for w in s["wall_all"])
        acc = ", ".join(f"{a:.3f}" for a in s["dev_accuracy"])
        lines.append(
            f"| {names[side]} | {s['wall_s']:.1f} s | {s['cpu_s']:.1f} s | {runs} | {acc} |"
        )
    lines.append("")
    for peer in ("torch", "torch_grouped"):
        if f"{peer} / bert_jax (wall_s)" in result:
            lines.append(
                f"- {names[peer]} / bert_jax: **{result[f'{peer} / bert_jax (wall_s)']:.2f}x** "
                f"in wall time, {result[f'{peer} / bert_jax (cpu_s)']:.2f}x in CPU seconds."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
