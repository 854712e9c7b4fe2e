"""What earlier code wrote keeps working: tests/data/v0 holds a pretraining workdir, a GLUE
fine-tuning workdir and its int8, head-pruned and distilled models, written by bert_jax at
commit 0ee08a3 (before the package was restructured), with the parameters and answers that code
produced. Today's code resumes the workdir bitwise and answers as the old code did."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli import ROOT, train_env

FIXTURE = os.path.join(ROOT, "tests", "data", "v0")
# The command the fixture's pretraining workdir was written with (relative paths: run in a copy).
PRETRAIN = [
    "--config.data.corpus=corpus.txt",
    "--config.data.cache_dir=cache",
    "--config.data.vocab_size=300",
    "--config.model.vocab_size=300",
    "--config.data.max_seq_length=64",
    "--config.data.dupe_factor=4",
    "--config.data.eval_fraction=0.2",
    "--config.train.batch_size=16",
    "--config.train.log_every=2",
    "--config.train.eval_every=2",
    "--config.train.eval_batches=1",
    "--config.train.checkpoint_every=2",
    "--config.optim.warmup_steps=2",
    "--config.optim.total_steps=4",
    "--config.model.hidden_size=32",
    "--config.model.num_hidden_layers=2",
    "--config.model.num_attention_heads=2",
    "--config.model.intermediate_size=64",
    "--config.model.max_position_embeddings=64",
]
FINETUNE = [
    "--config.init_from=pretrained_model",
    "--config.tasks=sst2",
    "--config.data_dir=glue",
    "--config.max_seq_length=32",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.num_epochs=1",
    "--config.seeds=0",
    "--config.learning_rates=1e-3",
]


def _copy(tmp_path, name: str = "v0"):
    work = tmp_path / name
    shutil.copytree(FIXTURE, work)
    return work


def _run(work, script: str, *args: str) -> subprocess.CompletedProcess:
    """`script` (train.py or finetune.py) run in the copy `work`; it must succeed."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        capture_output=True,
        text=True,
        env=train_env(1),
        timeout=600,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _resume(tmp_path, name: str, *num_steps: int) -> dict[str, np.ndarray]:
    """The fixture's pretraining workdir (at step 2) trained on to each of `num_steps` in
    turn, in a copy; its parameters at the last step."""
    work = _copy(tmp_path, name)
    for steps in num_steps:
        proc = _run(
            work, "train.py", "--workdir=pretrain", *PRETRAIN, f"--config.train.num_steps={steps}"
        )
        assert "resumed from step" in proc.stdout
    import jax

    with ocp.CheckpointManager(str(work / "pretrain/checkpoints"), item_names=("state",)) as m:
        step = num_steps[-1]
        state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state["state"]["params"]))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


@pytest.mark.slow
def test_a_pretraining_workdir_written_before_resumes_exactly(tmp_path):
    """Resumed by today's code, the old workdir trains on exactly (preempted at step 3 and
    resumed, bitwise the run that went straight on), and as the old code trained it: its
    parameters at step 4 equal those the old code wrote within float32 rounding. Not bitwise:
    the fixture was computed on another CPU, and XLA:CPU's kernels (their vector width and
    summation order) differ between CPU models; on an AVX-512 Xeon the old code itself
    (commit 8480b17) ends 1 to 2 units in the last place from the fixture."""
    straight = _resume(tmp_path, "straight", 4)
    preempted = _resume(tmp_path, "preempted", 3, 4)
    expected = np.load(os.path.join(FIXTURE, "pretrain_params_step4.npz"))
    assert sorted(straight) == sorted(preempted) == sorted(expected.files)
    for key, value in straight.items():
        np.testing.assert_array_equal(value, preempted[key], err_msg=key)
        # atol 1e-8: far below one step's update (Adam moves a weight by about the learning
        # rate), above the rounding noise of the key bias (zero gradient in exact arithmetic).
        np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-8, err_msg=key)


@pytest.mark.parametrize(
    "model, answers",
    [
        ("ft/sst2/lr0.001_seed0", "answers_lr0.001_seed0.jsonl"),
        ("int8_model", "answers_int8_model.jsonl"),
        ("pruned_model", "answers_pruned_model.jsonl"),
        ("distilled/sst2/lr0.001_seed0", "answers_distilled.jsonl"),
    ],
)
def test_models_written_before_answer_as_they_did(model, answers):
    from bert_jax.tools import predict

    lines = open(os.path.join(FIXTURE, "lines.txt")).read().splitlines()
    before = [json.loads(line) for line in open(os.path.join(FIXTURE, answers))]
    predictor = predict.Predictor("classify", os.path.join(FIXTURE, model), max_seq_length=32)
    now = list(predictor.run(iter(lines)))
    assert [a["label"] for a in now] == [a["label"] for a in before]
    for a, b in zip(now, before, strict=True):
        np.testing.assert_allclose(list(a["scores"].values()), list(b["scores"].values()), 1e-6)


@pytest.mark.slow
def test_a_finetuning_workdir_written_before_is_found_finished(tmp_path):
    work = _copy(tmp_path)
    before = (work / "ft/results.json").read_text()
    proc = _run(work, "finetune.py", "--workdir=ft", *FINETUNE)
    assert "finished earlier" in proc.stdout + proc.stderr
    assert json.loads((work / "ft/results.json").read_text()) == json.loads(before)
