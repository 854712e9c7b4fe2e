r"""Checkpoints and the loader in a bucket (gs://) against a local disk, in one run.

    python benchmarks/storage.py [--out benchmarks/results/storage.json]

A Cloud Storage server on this machine (fake-gcs-server, as the tests use, on its file-system
backend in the system's temporary folder) against the local disk, alternating A B A B:
- checkpoint save: a BERT train state (parameters and AdamW moments, float32; 4 layers x 256
  at BERT's 30,522-piece vocabulary) saved by `checkpoint.Checkpointer` until it is stored and
  its checksums recorded, in MB/s;
- checkpoint restore: the same state read back into its shardings, checksums verified
  (`restore_latest`), in MB/s;
- the loader: tokens/s of the grain loader at batch 256 x 128 from the same preprocessed
  ArrayRecord shards, read from the local folder and from the bucket (ArrayRecord reads gs://
  itself).
The server runs on the same 2 cores as the client, so the ratios bound what the protocol and
the clients cost; a real bucket adds network latency and bandwidth limits of its own.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tests' GCS server launcher

import jax  # noqa: E402
from gcs import GcsServer  # noqa: E402

from bert_jax import axes, checkpoint, files, models, optim, sharding, training  # noqa: E402
from bert_jax.data import input_pipeline  # noqa: E402
from bert_jax.data.pretraining_data import MaskingConfig  # noqa: E402


def checkpoints(places: dict[str, str], rounds: int) -> dict:
    mesh = sharding.make_mesh(sharding.MeshConfig())
    config = models.BertConfig(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024,
    )  # fmt: skip
    trainer = training.create_trainer(
        config, optim.OptimConfig(warmup_steps=10, total_steps=100), mesh, axes.DEFAULT_RULES
    )
    times = {f"{kind}_{name}": [] for kind in ("save", "restore") for name in places}
    with jax.set_mesh(mesh):
        state = jax.block_until_ready(trainer.init(0))
        size = checkpoint.tree_bytes(state)
        for r in range(rounds):
            for name, root in places.items():
                ckpt = checkpoint.Checkpointer(f"{root}/ckpt{r}", max_to_keep=1)
                start = time.perf_counter()
                ckpt.save(1, state, {}, {})
                ckpt.wait()
                times[f"save_{name}"].append(time.perf_counter() - start)
                ckpt.close()
                ckpt = checkpoint.Checkpointer(f"{root}/ckpt{r}", max_to_keep=1)
                start = time.perf_counter()
                restored = ckpt.restore_latest(trainer.abstract_state)
                jax.block_until_ready(restored[1])
                times[f"restore_{name}"].append(time.perf_counter() - start)
                ckpt.close()
                del restored
    mb = size / 1e6
    out = {"state_megabytes": mb, "seconds": times}
    for kind in ("save", "restore"):
        rate = {n: mb / statistics.median(times[f"{kind}_{n}"]) for n in places}
        out[f"{kind}_megabytes_per_second"] = rate
        out[f"{kind}_ratio_bucket_over_local"] = rate["bucket"] / rate["local"]
    return out


def loader(shards: dict[str, str], cache: str, batches: int, rounds: int) -> dict:
    rates = {name: [] for name in shards}
    for _ in range(rounds):
        for name, directory in shards.items():
            config = input_pipeline.DataConfig(
                cache_dir=cache,
                preprocessed_dir=directory,
                masking=MaskingConfig(max_seq_length=128, max_predictions_per_seq=20),
            )
            iterator = input_pipeline.load_pretraining_data(config).train_iterator(256, seed=0)
            next(iterator)  # warm-up: the shards opened
            start = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            rates[name].append(batches * 256 * 128 / (time.perf_counter() - start))
    median = {n: statistics.median(v) for n, v in rates.items()}
    return {
        "batch": [256, 128],
        "batches": batches,
        "tokens_per_second": median,
        "ratio_bucket_over_local": median["bucket"] / median["local"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/storage.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    server = GcsServer()
    os.environ.update(server.env())
    bucket = server.create_bucket("bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0]}",
                "checkpoint": checkpoints({"local": tmp, "bucket": bucket}, args.rounds),
            }
            local = os.path.join(tmp, "shards")
            masking = MaskingConfig(max_seq_length=128, max_predictions_per_seq=20)
            input_pipeline.load_pretraining_data(
                input_pipeline.DataConfig(cache_dir=tmp, preprocessed_dir=local, masking=masking)
            )
            files.upload_tree(local, f"{bucket}/shards")
            shards = {"local": local, "bucket": f"{bucket}/shards"}
            result["loader"] = loader(shards, tmp, args.batches, args.rounds)
    finally:
        server.stop()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
