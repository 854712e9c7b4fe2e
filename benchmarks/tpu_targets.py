"""Compiles pretraining configs for Cloud TPU slices from this host and tabulates the result.

    python benchmarks/tpu_targets.py                       # every row of the README table
    python benchmarks/tpu_targets.py --only=bert_large_p2@v5e-8

Each row runs `train.py --topology=<slice> [--plan]` in its own process (compiled for the
target, not run on it) and keeps its JSON report in benchmarks/results/tpu/; a row whose
report exists is not compiled again, so the table can be built over several sessions; it
holds every row whose report exists.
`benchmarks/results/tpu_targets.md` is the table: the plan, per-chip memory against the
usable HBM, collective bytes and FLOPs per token, and the compile time on this host.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MODELS = {
    "bert_base": ("BERT-Base, 128, batch 256 (paper), XLA attn.", "bert_base.py:phase1,bf16"),
    "bert_base_fd": ("BERT-Base, 128, batch 256, flash-drop.", "bert_base.py:phase1,bf16"),
    "bert_large_p1": ("BERT-Large phase 1, 128, 64k, XLA attn.", "bert_large.py:phase1,lamb,bf16"),
    "bert_large_p2": ("BERT-Large phase 2, 512, 32k, XLA attn.", "bert_large.py:phase2,lamb,bf16"),
    "bert_large_p2_fd": ("BERT-Large p2, 512, 32k, flash-drop.", "bert_large.py:phase2,lamb,bf16"),
    "albert_base": ("ALBERT-base, 512, batch 4096", "albert_base.py:bf16"),
    "albert_xxlarge": ("ALBERT-xxlarge, 512, batch 4096", "albert_xxlarge.py:bf16"),
    "modernbert_base": ("ModernBERT-base, 1,024, batch 4,608", "modernbert.py:base,bf16"),
    "modernbert_base_8k": ("ModernBERT-base, 8,192, 576", "modernbert.py:base,extend,bf16"),
    "modernbert_large": ("ModernBERT-large, 1,024, batch 4,608", "modernbert.py:large,bf16"),
    "modernbert_large_8k": ("ModernBERT-large, 8,192, 576", "modernbert.py:large,extend,bf16"),
}  # fmt: skip
# BERT's recipe drops out attention probabilities: the rows named "XLA attention" keep the
# attention that ran before the flash-dropout kernel (attention_kernel=xla), the "_fd" rows
# run the kernel (attention_kernel=auto on TPU).
XLA_ROWS = ("bert_base", "bert_large_p1", "bert_large_p2")
# Compiled from the config alone: ModernBERT's tokenizer.json is not needed for the programs
# (the vocabulary size is the model's), and the extension's optimizer state would come from
# phase 1.
EXTRA = {
    name: ["--config.data.tokenizer=wordpiece"]
    + ["--config.init_optimizer=false"] * name.endswith("_8k")
    for name in MODELS
    if name.startswith("modernbert")
} | {name: ["--config.model.attention_kernel=xla"] for name in XLA_ROWS}
SLICES = ("v5e-8", "v4-8", "v5p-8", "v6e-8", "v5e-256")


def run_row(name: str, target: str, extra: list[str]) -> dict:
    path = os.path.join(RESULTS, "tpu", f"{name}@{target}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    args = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        f"--config={os.path.join(ROOT, 'configs', MODELS[name][1])}",
        f"--topology={target}",
        "--plan",
        f"--report={path}",
        *extra,
        *EXTRA.get(name, []),
    ]
    start = time.time()
    log = os.path.join(tempfile.gettempdir(), f"tpu_targets_{name}@{target}.log")
    print(f"{name}@{target}: compiling (the planner's progress: {log})", flush=True)
    with open(log, "w") as out:
        proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, text=True)
    with open(log) as f:
        tail = f.read()[-4000:]
    if proc.returncode != 0:
        print(f"{name}@{target} failed:\n{tail}", flush=True)
        return {}
    print(tail, flush=True)
    with open(path) as f:
        report = json.load(f)
    report["wall_seconds"] = time.time() - start
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return report


def row(name: str, target: str, r: dict) -> str:
    train = r["programs"][0]
    setup, tokens = r["setup"], r["tokens_per_chip"]
    mesh = setup["mesh"]
    plan = r.get("plan", {}).get("chosen", {})
    micro = plan.get("micro_batch", r["global_batch"] // (mesh["data"] * mesh["fsdp"]))
    compile_s = sum(t["compile_seconds"] for t in r.get("plan", {}).get("trials", []))
    compile_s += sum(p["compile_seconds"] for p in r["programs"][1:])
    gib = 2**30
    return (
        f"| {MODELS[name][0]} | {target} | data {mesh['data']} fsdp {mesh['fsdp']} tensor "
        f"{mesh['tensor']}, remat {setup['remat']}, {micro} x {setup['grad_accum_steps']} | "
        f"{train['required'] / gib:.2f} of {r['usable_memory_bytes'] / gib:.2f} GiB | "
        f"{'yes' if train['fits'] else 'no'} | "
        f"{sum(c['bytes'] for c in train['collectives'].values()) / tokens:,.0f} | "
        f"{train['flops'] / tokens / 1e9:.2f} | "
        f"{len(r.get('plan', {}).get('trials', []))} / {compile_s / 60:.1f} min |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="name@slice,... (default: every row)")
    # The table's search: data parallel (a chip holds each model's parameters and optimizer
    # state whole) with no remat or full remat; train.py --plan searches more by default.
    parser.add_argument("--plan_meshes", default="data")
    parser.add_argument("--plan_remats", default="none,full")
    args = parser.parse_args()
    rows = [(n, t) for t in SLICES for n in MODELS]
    if args.only:
        rows = [tuple(x.split("@")) for x in args.only.split(",")]
    extra = [f"--plan_meshes={args.plan_meshes}", f"--plan_remats={args.plan_remats}"]
    lines = [
        "| model | slice | plan (mesh, remat, micro-batch x accumulation) | memory per chip | "
        "fits | collective B/token | GFLOP/token | compiles / time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, target in rows:
        run_row(name, target, extra)
    # The table: every row whose report exists, in the order above, whichever run made it.
    for name, target in [(n, t) for t in SLICES for n in MODELS]:
        path = os.path.join(RESULTS, "tpu", f"{name}@{target}.json")
        if os.path.exists(path):
            with open(path) as f:
                lines.append(row(name, target, json.load(f)))
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(RESULTS, "tpu_targets.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
