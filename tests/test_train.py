"""End-to-end runs of train.py as a user runs it: checkpoints, TensorBoard, resume, errors."""

import gzip
import json
import os
import socket
import subprocess

import numpy as np
import pytest
from cli import read_summary, run_train, train_args, train_env


@pytest.mark.slow
def test_train_writes_checkpoints_logs_and_resumes_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    profiled = "--config.train.profile_steps=3", "--config.train.profile_start=4"
    whole = run_train(tmp_path, straight, 30, *profiled, devices=8)
    # Steps 5-7 traced into the TensorBoard logdir: the loop's step annotations (dispatch
    # and the next batch), its metric reads, and XLA's executions.
    assert "profiled steps 5-7" in whole.stdout + whole.stderr
    (trace,) = (straight / "tensorboard" / "plugins" / "profile").glob("*/*.trace.json.gz")
    events = [e for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]]
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
    assert steps[:3] == [4, 5, 6] and len(steps) <= 4  # (and the next step's dispatch)
    names = {e.get("name", "") for e in events}
    assert {"next_batch", "read_metrics"} <= names
    assert any(n.startswith("ThunkExecutor::Execute") for n in names)
    first = run_train(tmp_path, split, 20, devices=8)
    assert "held-out mlm_loss" in first.stdout and "nsp_accuracy" in first.stdout
    assert sorted(os.listdir(split / "checkpoints")) == ["10", "20"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(split / "tensorboard"))
    assert json.loads((split / "config.json").read_text())["train"]["num_steps"] == 20

    run_train(tmp_path, split, 30, devices=8)  # the same command, more steps: goes on from 20
    resumed = read_summary(split)
    assert resumed["steps_this_run"] == 10 and resumed["steps"] == 30
    # Resumed = never stopped: same data order, dropout keys and optimizer state.
    for key, value in read_summary(straight)["eval"].items():
        np.testing.assert_allclose(resumed["eval"][key], value, rtol=1e-5, err_msg=key)
    assert (
        read_summary(straight)["eval"]["mlm_loss"]
        < read_summary(straight)["initial_eval"]["mlm_loss"]
    )

    again = run_train(tmp_path, split, 30, devices=8)  # finished: nothing is retrained
    assert read_summary(split)["steps_this_run"] == 0 and "resumed from step 30" in again.stdout


@pytest.mark.slow
def test_train_reports_bad_inputs_clearly(tmp_path):
    missing = run_train(
        tmp_path, tmp_path / "w1", 5, "--config.data.corpus=/no/such/corpus.txt", check=False
    )
    assert missing.returncode != 0 and "matches no file" in missing.stderr
    heads = run_train(
        tmp_path, tmp_path / "w2", 5, "--config.model.num_attention_heads=7", check=False
    )
    assert heads.returncode != 0 and "not divisible by num_attention_heads" in heads.stderr
    small = run_train(tmp_path, tmp_path / "w3", 5, "--config.model.vocab_size=100", check=False)
    assert small.returncode != 0 and "set --config.model.vocab_size=" in small.stderr
    auto = run_train(tmp_path, tmp_path / "w4", 5, "--config.mesh.auto=true", check=False)
    assert auto.returncode == 2 and "cpu devices report none" in auto.stderr
    assert not (tmp_path / "w4" / "checkpoints").exists()


@pytest.mark.slow
def test_preprocess_only_writes_shards_and_stops(tmp_path):
    proc = run_train(tmp_path, tmp_path / "w", 5, "--preprocess_only", own_cache=True)
    assert '"train":' in proc.stdout
    assert list((tmp_path / "cache" / "pairs").glob("*/metadata.json"))
    assert not (tmp_path / "w" / "checkpoints").exists()


def _run_two_processes(tmp_path, workdir, steps, *extra):
    """train.py as two processes of 4 CPU devices each, joined through jax.distributed."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(
            train_args(tmp_path, workdir, steps, *extra)
            + [
                "--distributed",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--distributed_timeout=120",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=train_env(4),
            cwd=tmp_path,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoints_move_between_them(tmp_path, gcs):
    # The two processes share a workdir and preprocessed shards in a bucket, as a pod does;
    # the one process keeps its files on disk.
    bucket = gcs.create_bucket("two-processes")
    one, two = tmp_path / "one_process", f"{bucket}/run"
    shards = f"--config.data.preprocessed_dir={bucket}/shards"
    run_train(tmp_path, one, 4, devices=8)  # 1 process x 8 devices
    outputs = _run_two_processes(tmp_path, two, 4, shards)  # 2 processes x 4 devices
    assert any(n.startswith("shards/train-") for n in gcs.objects("two-processes"))
    assert "2 process(es)" in outputs[0][0] and "eval step" in outputs[0][0]
    assert "eval step" not in outputs[1][0]  # process 0 alone reports
    np.testing.assert_allclose(
        np.array(read_summary(two)["train_loss"]),
        np.array(read_summary(one)["train_loss"]),
        rtol=1e-5,
    )
    # Continue each run in the other layout: the 2-process checkpoint on 1 device, the
    # 1-process checkpoint on 2 processes. Both continue identically.
    run_train(tmp_path, two, 6, shards, devices=1)
    _run_two_processes(tmp_path, one, 6)
    for a, b in zip(read_summary(one)["train_loss"], read_summary(two)["train_loss"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    for key, value in read_summary(one)["eval"].items():
        np.testing.assert_allclose(read_summary(two)["eval"][key], value, rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_a_missing_process_fails_fast_with_a_clear_message(tmp_path):
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    lonely = run_train(
        tmp_path,
        tmp_path / "w",
        5,
        "--distributed",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        "--process_id=0",
        "--distributed_timeout=5",
        devices=4,
        check=False,
    )
    assert lonely.returncode != 0 and "could not bring up the run" in lonely.stderr


@pytest.mark.slow
def test_phase_two_continues_phase_one_optimizer_and_step_at_a_new_length(tmp_path):
    """The two-phase recipe: phase 2, a new workdir at another sequence length, starts from
    phase 1's weights, optimizer moments and step (the paper's single schedule)."""
    import jax
    from test_aot import trainer_of_workdir

    from bert_jax import checkpoint

    phase1, phase2 = tmp_path / "p1", tmp_path / "p2"
    run_train(tmp_path, phase1, 10)
    continued = [
        f"--config.init_from={phase1}",
        "--config.init_optimizer=true",
        "--config.init_step=true",
        "--config.data.max_seq_length=128",
    ]
    proc = run_train(tmp_path, phase2, 14, *continued)
    assert "continuing the optimizer state and step of" in proc.stdout
    summary = read_summary(phase2)
    assert summary["steps"] == 14 and summary["steps_this_run"] == 4

    trainer, _, _ = trainer_of_workdir(phase2, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(str(phase2 / "checkpoints"), max_to_keep=3)
    step, state, _, _ = ckpt.restore_latest(trainer.abstract_state)
    ckpt.close()
    counts = [
        int(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if "count" in jax.tree_util.keystr(path)
    ]
    # Adam's update count went on from phase 1's 10: its moments' bias correction too.
    assert step == 14 and counts and set(counts) == {14}

    wrong = run_train(
        tmp_path, tmp_path / "p3", 14, *continued, "--config.optim.name=lamb", check=False
    )
    assert wrong.returncode != 0 and "phase 2 must use phase 1's optimizer" in wrong.stderr
