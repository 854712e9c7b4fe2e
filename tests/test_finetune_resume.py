"""finetune.py survives preemption: SIGKILL or SIGTERM mid-run, then the same command, gives
bitwise the parameters and dev metrics of an uninterrupted run; a finished sweep is skipped;
changed settings are refused naming the field."""

import json
import os
import signal
import subprocess
import sys
import time

import glue_data
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_glue import _tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join("sst2", "lr0.001_seed0")


def _args(tmp, workdir, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "finetune.py"),
        f"--workdir={workdir}",
        f"--config.init_from={tmp / 'model'}",
        f"--config.data_dir={tmp / 'glue'}",
        "--config.tasks=sst2",
        "--config.max_seq_length=16",
        "--config.batch_size=8",
        "--config.eval_batch_size=8",
        "--config.num_epochs=6",
        "--config.eval_every_steps=5",
        "--config.checkpoint_every_steps=2",
        "--config.seeds=0",
        "--config.learning_rates=1e-3",
        *extra,
    ]


def _env(tmp):
    return dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
    )


def _finetune(tmp, workdir, *extra, check=True):
    proc = subprocess.run(
        _args(tmp, workdir, *extra), capture_output=True, text=True, timeout=900, env=_env(tmp)
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _interrupted(tmp, workdir, signum):
    """A run stopped by `signum` right after its first resume save."""
    proc = subprocess.Popen(
        _args(tmp, workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp),
    )
    resume = workdir / RUN / "resume"
    deadline = time.time() + 600
    while not (resume.is_dir() and any(p.name.isdigit() for p in resume.iterdir())):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no resume checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    assert not (workdir / RUN / "result.json").exists(), "the run ended before the signal"
    return proc.returncode, out, err


def _best(workdir):
    run = workdir / RUN
    with ocp.CheckpointManager(str(run / "checkpoints"), item_names=("state",)) as manager:
        step = manager.latest_step()
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, jax.device_get(state["state"])


def _results(workdir):
    runs = json.loads((workdir / "results.json").read_text())["tasks"]["sst2"]["runs"]
    return [{k: r[k] for k in ("best_step", "dev", "history", "steps")} for r in runs]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    glue_data.write_glue(tmp / "glue", n=48)
    _tiny_model(tmp)
    workdir = tmp / "whole"
    _finetune(tmp, workdir)
    return tmp, workdir


def _assert_same(workdir, other):
    assert _results(workdir) == _results(other)
    (step, params), (other_step, other_params) = _best(workdir), _best(other)
    assert step == other_step
    jax.tree.map(np.testing.assert_array_equal, params, other_params)


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_is_bitwise_an_uninterrupted_run(uninterrupted):
    tmp, whole = uninterrupted
    workdir = tmp / "killed"
    status, _, _ = _interrupted(tmp, workdir, signal.SIGKILL)
    assert status == -signal.SIGKILL
    resumed = _finetune(tmp, workdir)
    assert "resumed from step" in resumed.stdout + resumed.stderr
    _assert_same(workdir, whole)
    assert not (workdir / RUN / "resume").exists()  # a finished run keeps only its results


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_and_the_rerun_finishes_bitwise(uninterrupted):
    tmp, whole = uninterrupted
    workdir = tmp / "terminated"
    status, out, err = _interrupted(tmp, workdir, signal.SIGTERM)
    assert status == 0, err[-3000:]
    assert "stopped by SIGTERM at step" in out and "run the same command again" in out
    assert not (workdir / "results.json").exists()
    resumed = _finetune(tmp, workdir)
    assert "resumed from step" in resumed.stdout + resumed.stderr
    _assert_same(workdir, whole)


@pytest.mark.slow
def test_a_finished_sweep_trains_nothing_and_changed_settings_are_refused(uninterrupted):
    tmp, whole = uninterrupted
    before = _results(whole)
    again = _finetune(tmp, whole)
    said = again.stdout + again.stderr
    assert "sst2: all 1 run(s) finished earlier; nothing to train" in said
    assert "sst2/lr0.001_seed0: finished earlier" in said
    assert _results(whole) == before
    changed = _finetune(tmp, whole, "--config.batch_size=4", check=False)
    assert changed.returncode == 2
    line = [ln for ln in changed.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and "batch_size: 8 there, 4 now" in line[0], changed.stderr[-2000:]
    assert "Nothing was changed" in line[0]
    assert _results(whole) == before


def test_settings_recorded_before_the_mesh_rules_existed_still_match():
    import dataclasses

    import finetune
    from bert_jax import axes, sharding

    cfg = glue_data.finetune_config()
    assert "rules" not in finetune.run_settings(cfg)["mesh"]  # as runs recorded them before
    rules = tuple((n, None) if n == axes.EMBED else (n, t) for n, t in axes.DEFAULT_RULES)
    other = dataclasses.replace(cfg, mesh=sharding.MeshConfig(rules=rules))
    assert finetune.run_settings(other)["mesh"]["rules"][1] == [axes.EMBED, None]
