"""Every path may be gs://: the file layer, training, resume, damage, the lock and the faults
of a remote store, against a real GCS server (fake-gcs-server, `conftest.gcs`).

The end-to-end tests share one 30-step run on a bucket (`base`) and one on a local disk;
their checkpoints must be bitwise equal, and every other run is compared against them.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import glue_data
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli import ROOT, one_error_line, start, train_args, train_env
from gcs import FaultyProxy
from tensorboardX.proto import event_pb2
from test_glue import _tiny_model

from bert_jax import files, run_files

STEPS = 30


def _train(tmp, workdir, steps=STEPS, *extra, env=None, check=True, own_cache=False):
    proc = subprocess.run(
        train_args(tmp, workdir, steps, *extra, own_cache=own_cache),
        capture_output=True,
        text=True,
        env={**train_env(1), **(env or {})},
        timeout=600,
        cwd=tmp,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _params(workdir, step):
    with ocp.CheckpointManager(f"{workdir}/checkpoints", item_names=("state",)) as manager:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.device_get(state["state"]["params"])


def _assert_bitwise(workdir, other, step=STEPS):
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, step), _params(other, step))


def _copy_prefix(source, target):
    for relpath in files.walk_files(source):
        files.copy(f"{source}/{relpath}", f"{target}/{relpath}")


@pytest.fixture(scope="module")
def base(gcs, tmp_path_factory):
    """A finished 30-step run in a bucket (checkpoints 10, 20, 30), and the same run on disk."""
    tmp = tmp_path_factory.mktemp("storage")
    bucket = gcs.create_bucket("runs")
    proc = _train(tmp, f"{bucket}/base")
    _train(tmp, tmp / "local")
    return tmp, bucket, proc


def test_files_in_a_bucket_behave_as_on_disk(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = gcs.create_bucket("unit")
    files.atomic_write(f"{root}/a/b.txt", b"one")
    files.atomic_write(f"{root}/a/c/d.bin", b"two")
    assert files.read_bytes(f"{root}/a/b.txt") == b"one"
    assert files.isfile(f"{root}/a/b.txt") and not files.isfile(f"{root}/a/c")
    assert files.isdir(f"{root}/a/c") and not files.exists(f"{root}/nothing")
    assert files.listdir(f"{root}/a") == ["b.txt", "c"] and files.listdir(f"{root}/no") == []
    assert files.glob(f"{root}/a/*.txt") == [f"{root}/a/b.txt"]
    assert files.walk_files(f"{root}/a") == ["b.txt", "c/d.bin"]
    with files.open(f"{root}/a/b.txt", encoding="utf-8") as f:
        assert f.read() == "one"
    # Create-if-absent is the store's precondition: the second create is refused.
    assert files.create_exclusive(f"{root}/x", b"1")
    assert not files.create_exclusive(f"{root}/x", b"2")
    assert files.read_bytes(f"{root}/x") == b"1"
    files.rename(f"{root}/a", f"{root}/moved")
    assert (
        not files.exists(f"{root}/a/b.txt") and files.read_bytes(f"{root}/moved/c/d.bin") == b"two"
    )
    local = files.local_copy(f"{root}/moved/b.txt")
    assert open(local, "rb").read() == b"one" and not files.is_url(local)
    with files.atomic_path(f"{root}/staged.bin") as tmp:
        open(tmp, "wb").write(b"whole")
    assert files.read_bytes(f"{root}/staged.bin") == b"whole"
    files.rmtree(f"{root}/moved")
    assert files.listdir(root) == ["staged.bin", "x"]
    assert gcs.objects("unit") == {"staged.bin": 5, "x": 1}  # the server's own listing
    assert files.absolute(f"{root}/y") == f"{root}/y"
    assert os.listdir(tmp_path) == []  # no local folder named after a URL


def test_the_workdir_lock_in_a_bucket(gcs):
    workdir = f"{gcs.create_bucket('locks')}/run"
    with run_files.WorkdirLock(workdir, "first"):
        with pytest.raises(run_files.WorkdirInUseError, match=f"PID {os.getpid()}"):
            run_files.WorkdirLock(workdir, "second")
    assert not files.exists(f"{workdir}/.lock")
    # Another host's lock is stale once nobody touched it for the heartbeat timeout.
    record = dict(host="elsewhere", pid=1, started=0.0, command="x")
    files.atomic_write(f"{workdir}/.lock", json.dumps(record).encode())
    with pytest.raises(run_files.WorkdirInUseError, match="on elsewhere"):
        run_files.WorkdirLock(workdir, "third")
    with pytest.warns(UserWarning, match="stale"):
        run_files.WorkdirLock(workdir, "fourth", stale_seconds=0.0).release()


def test_a_scheme_without_backend_is_refused_naming_the_package():
    assert "pip install s3fs" in files.backend_problem("s3://bucket/run")
    assert files.backend_problem("/local/path") is None
    with pytest.raises(files.StorageError, match="pip install s3fs"):
        files.exists("s3://bucket/run")


def _events(gcs, bucket, prefix):
    """The scalar events of the TensorBoard files under `prefix`: (tag, step) pairs."""
    out = set()
    for name in gcs.objects(bucket, prefix):
        data = files.read_bytes(f"gs://{bucket}/{name}")
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            out |= {(v.tag, event.step) for v in event.summary.value}
            i += 12 + length + 4
    return out


@pytest.mark.slow
def test_training_on_a_bucket_writes_only_there_and_equals_a_local_run(gcs, base):
    tmp, bucket, proc = base
    objects = gcs.objects("runs", "base/")
    for name in ("config.json", "summary.json", "vocab.txt"):
        assert f"base/{name}" in objects
    for step in (10, 20, 30):
        assert f"base/checkpoints/{step}/checksums/process_0.json" in objects
    assert not any(n.startswith("gs:") for n in os.listdir(tmp))
    assert json.loads(files.read_bytes(f"{bucket}/base/summary.json"))["steps"] == STEPS
    events = _events(gcs, "runs", "base/tensorboard/")
    assert {("train/mlm_loss", 5), ("train/mlm_loss", 30), ("eval/mlm_loss", 30)} <= events
    _assert_bitwise(f"{bucket}/base", tmp / "local")


@pytest.mark.slow
def test_sigkill_on_a_bucket_resumes_bitwise(gcs, base):
    tmp, bucket, _ = base
    workdir = f"{bucket}/killed"
    proc = start(train_args(tmp, workdir, STEPS), cwd=tmp)
    deadline = time.time() + 300
    while "killed/checkpoints/10/checksums/process_0.json" not in gcs.objects("runs", "killed/"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = _train(tmp, workdir)
    assert "resumed from step" in resumed.stdout
    _assert_bitwise(workdir, f"{bucket}/base")


@pytest.mark.slow
def test_a_second_launch_on_a_bucket_workdir_is_refused(gcs, base):
    tmp, bucket, _ = base
    workdir = f"{bucket}/locked"
    with run_files.WorkdirLock(workdir, "the first run"):  # a live holder: this process
        second = _train(tmp, workdir, check=False)
    assert second.returncode == 1
    line = one_error_line(second.stderr)
    assert "is in use by another run" in line and f"PID {os.getpid()}" in line
    assert set(gcs.objects("runs", "locked/")) == set()  # the refused run wrote nothing


@pytest.mark.slow
def test_flipped_bytes_in_a_checkpoint_object_are_detected_and_the_run_falls_back(gcs, base):
    tmp, bucket, _ = base
    workdir = f"{bucket}/flipped"
    _copy_prefix(f"{bucket}/base", workdir)
    files.rmtree(f"{workdir}/checkpoints/30")
    state = gcs.objects("runs", "flipped/checkpoints/20/state/")
    biggest = max(state, key=state.get)
    data = bytearray(files.read_bytes(f"gs://runs/{biggest}"))
    middle = len(data) // 3
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    files.atomic_write(f"gs://runs/{biggest}", bytes(data))
    resumed = _train(tmp, workdir)
    assert "checkpoints/20 is damaged: 1 file(s) fail their checksums" in resumed.stderr
    assert "resumed from step 10" in resumed.stdout
    assert any(".damaged-" in n for n in files.listdir(f"{workdir}/checkpoints"))
    _assert_bitwise(workdir, f"{bucket}/base")


@pytest.mark.slow
def test_transient_faults_are_retried_and_the_run_is_bitwise_undisturbed(gcs, base):
    tmp, bucket, _ = base
    proxy = FaultyProxy(gcs.port, fail_share=0.05, seed=1)
    try:
        # 10 steps of the base run (the same schedule): a save, an evaluation, the logs.
        disturbed = _train(tmp, f"{bucket}/faulty", 10, env=gcs.env(proxy.url))
    finally:
        proxy.close()
    assert proxy.failed["503"] > 0 and proxy.failed["dropped"] > 0, proxy.failed
    assert "storage request retried" in disturbed.stderr
    _assert_bitwise(f"{bucket}/faulty", f"{bucket}/base", step=10)


@pytest.mark.slow
def test_a_missing_bucket_is_one_line_and_nothing_is_written(gcs, tmp_path):
    proc = _train(tmp_path, "gs://no-such-bucket/run", check=False, own_cache=True)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "the bucket gs://no-such-bucket does not exist" in line
    assert "gcloud storage buckets create" in line
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]  # not even the data cache


def _tool(args, cwd):
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd,
        env={**train_env(1), "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_finetune_and_the_tools_read_and_write_a_bucket(gcs, tmp_path):
    bucket = gcs.create_bucket("finetune")
    glue_data.write_glue(tmp_path / "glue", n=16)
    files.upload_tree(str(tmp_path / "glue"), f"{bucket}/glue")
    files.upload_tree(_tiny_model(tmp_path), f"{bucket}/model")
    work = tmp_path / "cwd"
    work.mkdir()
    _tool(
        [
            os.path.join(ROOT, "finetune.py"),
            f"--workdir={bucket}/work",
            f"--config.init_from={bucket}/model",
            f"--config.data_dir={bucket}/glue",
            "--config.tasks=sst2",
            "--config.max_seq_length=16",
            "--config.batch_size=8",
            "--config.num_epochs=1",
            "--config.seeds=0",
            "--config.learning_rates=1e-3",
        ],
        work,
    )
    run = f"{bucket}/work/sst2/lr0.001_seed0"
    results = json.loads(files.read_bytes(f"{bucket}/work/results.json"))
    assert results["tasks"]["sst2"]["submission_run"] == run
    assert files.isfile(f"{bucket}/work/submission/SST-2.tsv")
    assert files.isfile(f"{run}/result.json") and files.listdir(f"{run}/tensorboard")
    # The run, read from the bucket, answers as its copy on disk does.
    local_run = tmp_path / "run"
    for relpath in files.walk_files(run):
        files.copy(f"{run}/{relpath}", str(local_run / relpath))
    files.atomic_write(f"{bucket}/lines.txt", b"w1 good w2\nw3 bad\ngood w5 w6 w7\n")
    (tmp_path / "lines.txt").write_bytes(files.read_bytes(f"{bucket}/lines.txt"))
    predict = ["-m", "bert_jax.tools.predict", "classify"]
    _tool([*predict, f"--model={run}", f"--input={bucket}/lines.txt",
           f"--output={bucket}/answers.jsonl"], work)  # fmt: skip
    _tool([*predict, f"--model={local_run}", f"--input={tmp_path / 'lines.txt'}",
           f"--output={tmp_path / 'answers.jsonl'}"], work)  # fmt: skip
    answers = files.read_bytes(f"{bucket}/answers.jsonl")
    assert answers == (tmp_path / "answers.jsonl").read_bytes() and answers.count(b"\n") == 3
    extract = ["-m", "bert_jax.tools.extract", "--layers=-1", "--max_seq_length=16"]
    _tool([*extract, f"--model={run}", f"--input={bucket}/lines.txt",
           f"--output={bucket}/features.jsonl"], work)  # fmt: skip
    assert files.read_bytes(f"{bucket}/features.jsonl").count(b"\n") == 3
    for command, made in (("export-hf", "model.safetensors"), ("export-stablehlo", "params.npz")):
        _tool(["-m", "bert_jax.convert", command, run, f"{bucket}/{command}"], work)
        assert made in files.listdir(f"{bucket}/{command}")
    # The exported Hugging Face folder, read from the bucket, answers as the run does.
    _tool([*predict, f"--model=hf:{bucket}/export-hf", f"--input={bucket}/lines.txt",
           f"--output={bucket}/hf_answers.jsonl"], work)  # fmt: skip
    hf_answers = [json.loads(x) for x in files.read_text(f"{bucket}/hf_answers.jsonl").splitlines()]
    for ours, theirs in zip(map(json.loads, answers.splitlines()), hf_answers, strict=True):
        expected = list(ours["scores"].values())
        assert list(theirs["scores"].values()) == pytest.approx(expected, abs=1e-5)
    assert os.listdir(work) == []  # everything went to the bucket


def test_refused_permission_and_absent_credentials_are_one_line_naming_the_fix(gcs):
    # The emulator checks no credentials: the two errors gcsfs and google-auth raise for them.
    from google.auth.exceptions import DefaultCredentialsError

    bucket = gcs.create_bucket("problems")
    forbidden = OSError(f"Forbidden: {bucket}/run\nuser lacks storage.objects.create")
    line = files.remote_problem(forbidden, f"{bucket}/run", "write checkpoints to")
    assert "permission refused" in line and f"roles/storage.objectAdmin on {bucket}" in line
    absent = DefaultCredentialsError("Your default credentials were not found.")
    line = files.remote_problem(absent, f"{bucket}/run", "write checkpoints to")
    assert "no usable Google Cloud credentials" in line
    assert "gcloud auth application-default login" in line and "\n" not in line
    missing = files.writable_problem("gs://no-such-bucket/run", "the run's files")
    assert "the bucket gs://no-such-bucket does not exist" in missing
    # A status is read from the error's code or a number standing alone, never from a URL's
    # port: CI's emulator once listened on :40xxx and a missing bucket read as "no credentials".
    from gcsfs.retry import HttpError

    for port in (40123, 34010, 40301):
        url = f"http://127.0.0.1:{port}/upload/storage/v1/b/no-such-bucket/o?name=run/x"
        line = files.remote_problem(FileNotFoundError(url), "gs://no-such-bucket/run", "write to")
        assert "the bucket gs://no-such-bucket does not exist" in line, line
    expired = HttpError({"code": 401, "message": "Invalid Credentials"})
    assert "no usable Google Cloud credentials" in files.remote_problem(expired, bucket, "read")
    refused = HttpError({"code": 403, "message": "caller does not have storage.objects.get"})
    assert "permission refused" in files.remote_problem(refused, bucket, "read")
