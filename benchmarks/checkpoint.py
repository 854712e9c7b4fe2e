r"""The cost of checkpointing BERT-Base train state (parameters + AdamW moments, float32).

    python benchmarks/checkpoint.py [--out benchmarks/results/checkpoint.json]

Measured in one run on this machine's devices:
- save: how long the training loop is blocked by an asynchronous save (the peer: a
  synchronous save of the same state), and how long until it is on disk;
- restore: reading it back into the state's shardings;
- verification: SHA-256 of the checkpoint's files against the checksums its save recorded, in
  GB/s on one core (the peer: reading the same files without hashing);
- step-time overhead: median step time right after starting an asynchronous save vs without
  one, alternating A B A B so that machine drift cancels.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from bert_jax import axes, checkpoint, models, optim, sharding, training  # noqa: E402


def pretraining_batch(batch_size: int, length: int = 128, preds: int = 20) -> dict:
    """A BERT pretraining batch of random ids at BERT-Base vocabulary size."""
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(5, 30000, (batch_size, length)).astype(np.int32),
        "input_mask": np.ones((batch_size, length), np.int32),
        "segment_ids": np.zeros((batch_size, length), np.int32),
        "masked_lm_positions": np.tile(np.arange(1, preds + 1, dtype=np.int32), (batch_size, 1)),
        "masked_lm_ids": rng.integers(5, 30000, (batch_size, preds)).astype(np.int32),
        "masked_lm_weights": np.ones((batch_size, preds), np.float32),
        "next_sentence_labels": np.zeros(batch_size, np.int32),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/checkpoint.json")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    mesh = sharding.make_mesh(sharding.MeshConfig())
    config = models.BertConfig.named("bert_base")
    trainer = training.create_trainer(
        config, optim.OptimConfig(warmup_steps=10, total_steps=100), mesh, axes.DEFAULT_RULES
    )
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0]}"}
    with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as tmp:
        state = jax.block_until_ready(trainer.init(0))
        result["state_bytes"] = sum(x.nbytes for x in jax.tree.leaves(state))
        batch = sharding.global_batch(pretraining_batch(args.batch), mesh, axes.DEFAULT_RULES)
        state, _ = jax.block_until_ready(trainer.train_step(state, batch))  # compile

        ckpt = checkpoint.Checkpointer(os.path.join(tmp, "async"), max_to_keep=2)
        start = time.perf_counter()
        ckpt.save(1, state, {}, {})
        blocked_async = time.perf_counter() - start
        ckpt.wait()
        on_disk_async = time.perf_counter() - start

        step_dir = ckpt.step_dir(1)
        names = [os.path.join(step_dir, f) for f in checkpoint._step_files(step_dir)]
        disk_bytes = sum(os.path.getsize(f) for f in names)
        start = time.perf_counter()
        assert checkpoint.verify_checksums(step_dir) == []
        verify_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for name in names:
            with open(name, "rb") as f:
                while f.read(1 << 23):
                    pass
        read_seconds = time.perf_counter() - start

        sync = ocp.CheckpointManager(
            os.path.join(tmp, "sync"),
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        )
        start = time.perf_counter()
        sync.save(1, args=ocp.args.StandardSave(state))
        blocked_sync = time.perf_counter() - start
        sync.close()

        start = time.perf_counter()
        restored, _, _ = ckpt.restore(1, trainer.abstract_state)
        jax.block_until_ready(restored)
        restore_seconds = time.perf_counter() - start
        del restored

        plain, saving = [], []
        for r in range(args.rounds):  # A B A B
            start = time.perf_counter()
            state, _ = jax.block_until_ready(trainer.train_step(state, batch))
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            ckpt.save(10 + r, state, {}, {})
            state, _ = jax.block_until_ready(trainer.train_step(state, batch))
            saving.append(time.perf_counter() - start)
            ckpt.wait()
        ckpt.close()
    result.update(
        {
            "save_blocking_seconds_async": blocked_async,
            "save_blocking_seconds_sync_peer": blocked_sync,
            "ratio_async_over_sync_blocking": blocked_async / blocked_sync,
            "save_until_on_disk_seconds": on_disk_async,
            "restore_seconds": restore_seconds,
            "checkpoint_disk_bytes": disk_bytes,
            "verify_seconds": verify_seconds,
            "verify_gb_per_second_one_core": disk_bytes / verify_seconds / 1e9,
            "read_seconds_peer": read_seconds,
            "ratio_verify_over_read": verify_seconds / read_seconds,
            "step_seconds": statistics.median(plain),
            "step_with_async_save_seconds": statistics.median(saving),
            "step_overhead_ratio": statistics.median(saving) / statistics.median(plain),
            "batch": [args.batch, 128],
        }
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
