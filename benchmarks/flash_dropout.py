r"""The flash-dropout kernel against XLA's attention, for BERT's recipe (dropout 0.1 on the
attention probabilities).

    python benchmarks/flash_dropout.py [--out benchmarks/results/flash_dropout.json]

1. On this host (CPU), a correctness run, not a speed claim: one attention call, forward and
   backward, at the tiny and BERT-Base shapes (batch 2, length 128), by the kernel in Pallas's
   interpreter and by XLA's attention given the kernel's mask: the largest difference of the
   outputs and gradients, and each one's median time (the interpreter runs the kernel's grid
   as a loop of XLA ops: its time says nothing of the TPU's).
2. The compiled TPU programs (benchmarks/tpu_targets.py, compiled for the slice on this host,
   not run on it): for BERT-Base phase 1 and BERT-Large phase 2 on v5e-8 and v5p-8, the XLA
   row and the flash-dropout row side by side: the planner's choice, per-chip memory and
   FLOPs per token, as ratios kernel / XLA; and the memory of every (remat, micro-batch) that
   both searches compiled, the like-for-like comparison.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bert_jax.models import flash_dropout  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "benchmarks", "results", "tpu")
SHAPES = {"tiny": (2, 64), "base": (12, 64)}  # heads, head size (hidden 128 / 768)
PAIRS = {"BERT-Base phase 1 (128)": "bert_base", "BERT-Large phase 2 (512)": "bert_large_p2"}
RATE = 0.1
FIELDS = ("plan", "memory_gib", "gflop_per_token")


def _xla(q, k, v, ids, keys):
    """Attention written out in XLA ops with the kernel's mask ([B, H, L, D])."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    s = jnp.where(ids[:, None, None, :] > 0, s / np.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
    keep = flash_dropout.keep_mask(keys, q.shape[2], RATE)
    p = jnp.where(keep, jax.nn.softmax(s, axis=-1) / (1 - RATE), 0.0)
    return jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v)


def _kernel(q, k, v, ids, keys):
    return flash_dropout.flash_dropout_attention(
        q, k, v, ids, keys, rate=RATE, packed=False, interpret=jax.default_backend() != "tpu"
    )


def _timed(fn, args, repeats: int) -> tuple[float, list]:
    out = jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def correctness_run(name: str, repeats: int) -> dict:
    heads, head_dim = SHAPES[name]
    rng = np.random.default_rng(0)
    q, k, v, do = (
        jnp.asarray(rng.normal(size=(2, heads, 128, head_dim)), jnp.float32) for _ in range(4)
    )
    ids = jnp.asarray((np.arange(128)[None] < np.array([[128], [77]])).astype(np.int32))
    keys = flash_dropout.head_keys(jax.random.key(0), 2, heads)
    results = {}
    for label, attend in (("kernel (interpreted)", _kernel), ("XLA", _xla)):

        def step(q, k, v, attend=attend):
            out, vjp = jax.vjp(lambda *x: attend(*x, ids, keys), q, k, v)
            return out, vjp(do)

        results[label] = _timed(jax.jit(step), (q, k, v), repeats)
    (t_kernel, ours), (t_xla, ref) = results["kernel (interpreted)"], results["XLA"]
    diff = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True)
    )
    return {
        "shape": f"batch 2, {heads} heads of {head_dim}, length 128, float32",
        "max_abs_difference": diff,
        "kernel_interpreted_ms": 1e3 * t_kernel,
        "xla_ms": 1e3 * t_xla,
    }


def _report(name: str) -> dict | None:
    path = os.path.join(TPU, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _summary(report: dict) -> dict:
    train = report["programs"][0]
    chosen = report["plan"]["chosen"]
    tokens = report["tokens_per_chip"]
    return {
        "plan": f"remat {chosen['remat']}, {chosen['micro_batch']} x {chosen['accum_steps']}",
        "memory_gib": train["required"] / 2**30,
        "gflop_per_token": train["flops"] / tokens / 1e9,
        "kernels": train["kernels"],
        "trials": {
            (t["remat"], t["micro_batch"]): t["required_bytes"] / 2**30
            for t in report["plan"]["trials"]
            if t.get("required_bytes")
        },
    }


def tpu_comparison() -> list[dict]:
    rows = []
    for model, name in PAIRS.items():
        for target in ("v5e-8", "v5p-8"):
            xla, fused = _report(f"{name}@{target}"), _report(f"{name}_fd@{target}")
            if xla is None or fused is None:
                continue
            a, b = _summary(xla), _summary(fused)
            same = sorted(set(a["trials"]) & set(b["trials"]))
            rows.append({
                "model": model,
                "slice": target,
                "xla": {k: a[k] for k in FIELDS},
                "flash_dropout": {k: b[k] for k in (*FIELDS, "kernels")},
                "memory_ratio": b["memory_gib"] / a["memory_gib"],
                "flops_ratio": b["gflop_per_token"] / a["gflop_per_token"],
                "same_candidate_gib": [
                    {"remat": r, "micro_batch": m, "xla": a["trials"][r, m],
                     "flash_dropout": b["trials"][r, m]}
                    for r, m in same
                ],
            })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks/results/flash_dropout.json")
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu = {name: correctness_run(name, args.repeats) for name in SHAPES}
    for name, r in cpu.items():
        print(f"{name}: {r['shape']}: max |kernel - XLA| {r['max_abs_difference']:.2e}; "
              f"interpreted kernel {r['kernel_interpreted_ms']:.1f} ms, XLA {r['xla_ms']:.1f} ms "
              "(a correctness run: the interpreter's time is not the TPU's)")  # fmt: skip
    tpu = tpu_comparison()
    for r in tpu:
        x, f = r["xla"], r["flash_dropout"]
        print(f"{r['model']} on {r['slice']}: XLA {x['plan']}, {x['memory_gib']:.2f} GiB, "
              f"{x['gflop_per_token']:.2f} GFLOP/token | flash-dropout {f['plan']}, "
              f"{f['memory_gib']:.2f} GiB, {f['gflop_per_token']:.2f} GFLOP/token | memory "
              f"x{r['memory_ratio']:.3f}, FLOPs x{r['flops_ratio']:.3f}")  # fmt: skip
        for c in r["same_candidate_gib"]:
            print(f"    remat {c['remat']}, micro-batch {c['micro_batch']}: XLA "
                  f"{c['xla']:.2f} GiB, flash-dropout {c['flash_dropout']:.2f} GiB "
                  f"(x{c['flash_dropout'] / c['xla']:.3f})")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(
            {"host": platform.processor() or platform.machine(), "jax": jax.__version__,
             "cpu_correctness_runs": cpu, "tpu_compiled": tpu},
            f, indent=1,
        )  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
