r"""What ALBERT's cross-layer sharing saves: parameters and compile time of the train step, not
compute, at depth L and 2L.

    python benchmarks/albert_sharing.py [--out benchmarks/results/albert_sharing.json]

For ALBERT-Base (E = 128, H = 768, all layers sharing one set of weights) and, as the peer,
the same model without sharing (BERT-style, one set per layer), at 12 and 24 layers: the
parameter count, the time to lower and compile the full train step (forward, backward, LAMB
update) for batch 2 x 128, and the median step time. Compiles alternate A B A B with a fresh
jit each time so that machine drift cancels.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.checkpoint import pretraining_batch  # noqa: E402
from bert_jax import axes, models, optim, sharding, training  # noqa: E402


def measure(config: models.BertConfig, mesh, batch) -> dict:
    """Compile seconds (lower + compile of a fresh train step) and median step seconds."""
    trainer = training.create_trainer(
        config,
        optim.OptimConfig(name="lamb", warmup_steps=1, total_steps=100),
        mesh,
        axes.DEFAULT_RULES,
    )
    state = jax.block_until_ready(trainer.init(0))
    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(4):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - start)
    return {
        "params": models.count_params(config),
        "compile_s": compile_s,
        "step_s": statistics.median(times[1:]),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/albert_sharing.json")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    base = models.BertConfig.named("albert_base")
    variants = {
        f"{share}_{layers}": dataclasses.replace(base, num_hidden_layers=layers, share_layers=share)
        for layers in (12, 24)
        for share in ("all", "none")
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(pretraining_batch(2), mesh, axes.DEFAULT_RULES)
        for _ in range(args.rounds):
            for name, config in variants.items():
                runs[name].append(measure(config, mesh, batch))
                print(name, runs[name][-1], flush=True)
    summary = {
        name: {
            "params": r[0]["params"],
            "compile_s": statistics.median(x["compile_s"] for x in r),
            "step_s": statistics.median(x["step_s"] for x in r),
        }
        for name, r in runs.items()
    }
    for share in ("all", "none"):
        summary[f"{share}_24_over_12"] = {
            key: summary[f"{share}_24"][key] / summary[f"{share}_12"][key]
            for key in ("params", "compile_s", "step_s")
        }
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0]}",
        "jax": jax.__version__,
        "batch": "2 x 128, 20 predictions, float32, LAMB",
        "summary": summary,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
