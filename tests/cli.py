"""Helpers to run train.py as a user does, on a small corpus written in the test."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CACHE = "BERT_JAX_TEST_DATA_CACHE"  # set by conftest for the session
SENTENCES = [
    "The cat sat on the mat and looked at the birds.",
    "It was a sunny day in the garden behind the house.",
    "Birds were singing in the old oak tree all morning.",
    "A dog barked somewhere far away across the fields.",
    "The children played football after school on Friday.",
    "Their mother called them in for dinner at six.",
    "After dinner they read books until it was dark.",
]


def write_corpus(tmp_path):
    docs = [
        "\n".join(f"{s[:-1]} in story {i}." for s in SENTENCES[i % 7 :] + SENTENCES[: i % 7])
        for i in range(40)
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def train_args(tmp_path, workdir, steps, *extra, config=None, own_cache=False):
    """A train.py command line. The learned vocabulary and the shards go to the session's
    data cache (`SHARED_CACHE`, keyed by corpus content and settings, as a user's cache is),
    so that each corpus is preprocessed once per session; `own_cache`: to tmp_path/cache."""
    cache = tmp_path / "cache" if own_cache else os.environ.get(SHARED_CACHE, tmp_path / "cache")
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *([f"--config={os.path.join(ROOT, config)}"] if config else []),
        f"--workdir={workdir}",
        f"--config.data.corpus={write_corpus(tmp_path)}",
        f"--config.data.cache_dir={cache}",
        "--config.data.vocab_size=300",
        "--config.model.vocab_size=300",
        "--config.data.max_seq_length=64",
        "--config.data.dupe_factor=4",
        "--config.data.eval_fraction=0.2",
        "--config.train.batch_size=16",
        f"--config.train.num_steps={steps}",
        "--config.train.log_every=5",
        "--config.train.eval_every=10",
        "--config.train.eval_batches=2",
        "--config.train.checkpoint_every=10",
        "--config.optim.warmup_steps=5",
        "--config.optim.total_steps=30",
        *extra,
    ]


def train_env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run_train(
    tmp_path, workdir, steps, *extra, devices=1, check=True, config=None, own_cache=False
):
    proc = subprocess.run(
        train_args(tmp_path, workdir, steps, *extra, config=config, own_cache=own_cache),
        capture_output=True,
        text=True,
        env=train_env(devices),
        timeout=600,
        cwd=tmp_path,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_summary(workdir):
    from bert_jax import files  # the workdir may be in a bucket

    return json.loads(files.read_bytes(os.path.join(str(workdir), "summary.json")))


def start(args, cwd, devices=1):
    """A train.py run (its argument list) in the background, output captured."""
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=train_env(devices),
        cwd=cwd,
    )


def wait_for(path, proc, timeout=300):
    """Waits until `path` exists, failing if the run ends or the time runs out first."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def one_error_line(stderr):
    """A CLI error is one plain line, no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]
