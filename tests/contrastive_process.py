"""One of two processes (4 CPU devices each) computing the in-batch-negatives loss and its
gradients over a global batch split between them: tests/test_contrastive.py runs it twice
and compares with one device's figures over the whole batch.

    python tests/contrastive_process.py PORT PROCESS_ID OUT.npz
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(port: str, process_id: str, out: str) -> None:
    from bert_jax import sharding

    sharding.initialize_distributed(f"localhost:{port}", 2, int(process_id), timeout_s=120)
    import jax
    import numpy as np
    import test_contrastive as tc

    from bert_jax import axes

    graphdef, params = tc._encoder()
    embed = tc._embed(graphdef, dropout=False)
    inputs = tc._pair_inputs()  # anchors, then positives: this process holds half the rows
    half = len(inputs["input_ids"]) // 2
    local = {k: v[int(process_id) * half : (int(process_id) + 1) * half] for k, v in inputs.items()}
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    rules = sharding.MeshConfig.rules

    def value_and_grad(params, batch):
        return jax.value_and_grad(lambda p: tc._pair_loss(embed(p, batch, None)), has_aux=True)(
            params
        )

    with jax.set_mesh(mesh), axes.axis_rules(rules):
        batch = sharding.global_batch(local, mesh, rules)
        assert len(batch["input_ids"].sharding.device_set) == 8 and jax.process_count() == 2
        (loss, _), grads = jax.jit(value_and_grad)(params, batch)
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(grads)]
    if int(process_id) == 0:
        named = {f"grad_{i}": x for i, x in enumerate(leaves)}
        np.savez(out, loss=np.asarray(loss.addressable_data(0)), **named)


if __name__ == "__main__":
    main(*sys.argv[1:])
