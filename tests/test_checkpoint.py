"""Fault tolerance: SIGKILL and SIGTERM mid-run, damaged checkpoints, other topologies."""

import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli import read_summary, run_train, start, train_args, wait_for

from bert_jax import axes, checkpoint, models, optim, sharding, training

LOG_EVERY_STEP = ("--config.train.log_every=1",)


def _params(workdir, step):
    with ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("state",)) as manager:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.device_get(state["state"]["params"])


def _start(tmp_path, workdir, steps):
    return start(train_args(tmp_path, workdir, steps, *LOG_EVERY_STEP), cwd=tmp_path)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(tmp_path, straight, 30, *LOG_EVERY_STEP)
    proc = _start(tmp_path, killed, 30)
    wait_for(killed / "checkpoints" / "10", proc)
    time.sleep(0.3)  # a few steps past the checkpoint, whose work is lost
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed = run_train(tmp_path, killed, 30, *LOG_EVERY_STEP)
    assert "resumed from step" in resumed.stdout
    after = read_summary(killed)["train_loss"]
    before = dict(map(tuple, read_summary(straight)["train_loss"]))
    assert after and all(loss == before[step] for step, loss in after)  # bitwise
    jax.tree.map(np.testing.assert_array_equal, _params(killed, 30), _params(straight, 30))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "w"
    proc = _start(tmp_path, workdir, 30)
    wait_for(workdir / "checkpoints" / "10", proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = read_summary(workdir)
    assert summary["preempted"] and "run the same command again to resume" in out
    assert (workdir / "checkpoints" / str(summary["steps"])).exists()
    again = run_train(tmp_path, workdir, 30)
    assert f"resumed from step {summary['steps']}" in again.stdout


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    workdir = tmp_path / "w"
    run_train(tmp_path, workdir, 20)
    files = [p for p in (workdir / "checkpoints" / "20" / "state").rglob("*") if p.is_file()]
    for path in files:  # truncate every array file of the newest checkpoint
        if path.stat().st_size > 1000:
            path.write_bytes(path.read_bytes()[:100])
    again = run_train(tmp_path, workdir, 20)
    assert "checkpoints/20 is damaged" in again.stderr
    assert "resumed from step 10" in again.stdout
    assert read_summary(workdir)["steps_this_run"] == 10


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused_and_kept(tmp_path):
    workdir = tmp_path / "w"
    run_train(tmp_path, workdir, 10)
    other = run_train(tmp_path, workdir, 10, "--config.model.num_hidden_layers=1", check=False)
    assert other.returncode != 0
    assert "num_hidden_layers: 2 there, 1 here" in other.stderr
    assert (workdir / "checkpoints" / "10").exists()


CONFIG = models.BertConfig.named("L-2_H-128", vocab_size=256, max_position_embeddings=32)
OPTIM = optim.OptimConfig(warmup_steps=1, total_steps=10)


def _trainer(mesh_config, devices=None):
    mesh = sharding.make_mesh(mesh_config, devices=devices)
    return training.create_trainer(CONFIG, OPTIM, mesh, axes.DEFAULT_RULES), mesh


@pytest.mark.parametrize("direction", ["8_to_1", "1_to_8"])
def test_checkpoints_restore_on_another_topology(tmp_path, direction):
    eight = _trainer(sharding.MeshConfig(2, 2, 2))
    one = _trainer(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    (writer, wmesh), (reader, rmesh) = (eight, one) if direction == "8_to_1" else (one, eight)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    with jax.set_mesh(wmesh):
        state = writer.init(3)
        ckpt.save(1, state, {"epoch": 0}, {"note": "topology"})
    ckpt.wait()
    with jax.set_mesh(rmesh):
        restored, data, meta = ckpt.restore(1, reader.abstract_state)
    ckpt.close()
    assert data == {"epoch": 0} and meta == {"note": "topology"}
    leaf = restored.params["bert"]["encoder"]["layer"]["intermediate"]["kernel"]
    assert (
        leaf.sharding
        == reader.state_shardings.params["bert"]["encoder"]["layer"]["intermediate"]["kernel"]
    )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


def test_encoder_of_a_pretraining_checkpoint_loads_alone(tmp_path):
    trainer, mesh = _trainer(sharding.MeshConfig())
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        ckpt.save(5, state, {}, {})
    ckpt.close()
    encoder = models.split_params(models.abstract_model(CONFIG, models.BertModel))[1]
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
        encoder,
    )
    loaded = checkpoint.restore_subtree(str(tmp_path / "ckpt"), 5, ("bert",), abstract)
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(state.params["bert"])
    )


def test_preflight_reports_unwritable_and_full_directories(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot write checkpoints"):
        checkpoint.preflight(str(blocker / "checkpoints"))
    # keep_checkpoints=3 and the one being written: four checkpoints of space.
    with pytest.raises(OSError, match="GiB free but 4 more checkpoint"):
        checkpoint.preflight(str(tmp_path / "ok"), checkpoint_bytes=10**18, saves=4)


def test_non_finite_step_is_not_applied():
    trainer, mesh = _trainer(sharding.MeshConfig())
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(5, 256, (8, 16)).astype(np.int32),
        "input_mask": np.ones((8, 16), np.int32),
        "segment_ids": np.zeros((8, 16), np.int32),
        "masked_lm_positions": np.tile(np.arange(1, 4, dtype=np.int32), (8, 1)),
        "masked_lm_ids": rng.integers(5, 256, (8, 3)).astype(np.int32),
        "masked_lm_weights": np.ones((8, 3), np.float32),
        "next_sentence_labels": np.zeros(8, np.int32),
    }
    poisoned = dict(batch, masked_lm_weights=np.full((8, 3), np.nan, np.float32))
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        before = jax.device_get(state.params)
        state, metrics = trainer.train_step(
            state, sharding.global_batch(poisoned, mesh, axes.DEFAULT_RULES)
        )
        assert not bool(metrics["finite"]) and int(state.step) == 1
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
        state, metrics = trainer.train_step(
            state, sharding.global_batch(batch, mesh, axes.DEFAULT_RULES)
        )
    assert bool(metrics["finite"])
    # The next good step is applied (its learning rate is still 0 at the schedule's first
    # step, since the skipped one did not count: the Adam moments show the update).
    mu = jax.device_get(state.opt_state[1][0].mu)["bert"]["pooler"]["kernel"]
    assert np.abs(mu).sum() > 0
