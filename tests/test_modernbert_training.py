"""ModernBERT's recipe through train.py as a user runs it (`configs/modernbert.py`): a tiny
model pretrains with masked LM alone at 30% masking, StableAdamW and a warmup-stable-decay
schedule, its held-out loss falling; it resumes bitwise after SIGKILL; and it extends its
context to 8,192 from the phase-1 workdir with the global rotary base raised."""

import json
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli import read_summary, run_train, start, train_args, wait_for

PHASE1 = "configs/modernbert.py:tiny"
EXTEND = "configs/modernbert.py:tiny,extend"
# Smaller than the config's tiny model: 2 layers of 32 (one global, one local with a window
# of 16 tokens), so that the 8,192-token extension fits a test (attention on a CPU holds the
# [8,192 x 8,192] scores).
SMALL = (
    "--config.model.hidden_size=32",
    "--config.model.num_hidden_layers=2",
    "--config.model.num_attention_heads=1",
    "--config.model.intermediate_size=48",
    "--config.model.local_attention=16",
    "--config.model.global_attn_every_n_layers=2",
    "--config.train.log_every=1",
    "--config.optim.learning_rate=3e-3",
)


def _params(workdir, step):
    with ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("state",)) as manager:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.device_get(state["state"]["params"])


@pytest.mark.slow
def test_pretrains_resumes_bitwise_after_sigkill_and_extends_its_context(tmp_path):
    straight, killed, extended = tmp_path / "straight", tmp_path / "killed", tmp_path / "ext"
    run_train(tmp_path, straight, 30, *SMALL, config=PHASE1)
    summary = read_summary(straight)
    assert set(summary["eval"]) == {"mlm_loss", "mlm_accuracy"}  # no sentence-pair head
    assert summary["eval"]["mlm_loss"] < summary["initial_eval"]["mlm_loss"] - 1.0, summary
    config = json.loads((straight / "config.json").read_text())
    assert config["model"]["model_type"] == "modernbert"
    assert (config["optim"]["name"], config["data"]["masked_lm_prob"]) == ("stable_adamw", 0.3)

    proc = start(train_args(tmp_path, killed, 30, *SMALL, config=PHASE1), cwd=tmp_path)
    wait_for(killed / "checkpoints" / "10", proc)
    time.sleep(0.3)  # a few steps past the checkpoint, whose work is lost
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed = run_train(tmp_path, killed, 30, *SMALL, config=PHASE1)
    assert "resumed from step" in resumed.stdout
    after = read_summary(killed)["train_loss"]
    before = dict(map(tuple, summary["train_loss"]))
    assert after and all(loss == before[step] for step, loss in after)  # bitwise
    jax.tree.map(np.testing.assert_array_equal, _params(killed, 30), _params(straight, 30))

    length = 8192
    proc = run_train(
        tmp_path,
        extended,
        2,
        f"--config.init_from={straight}",
        f"--config.data.max_seq_length={length}",
        f"--config.data.max_predictions_per_seq={int(0.3 * length) + 1}",
        "--config.train.batch_size=1",
        "--config.optim.total_steps=2",
        "--config.optim.warmup_steps=0",
        "--config.optim.decay_steps=1",
        "--config.train.eval_batches=1",
        "--config.train.checkpoint_every=2",
        config=EXTEND,
    )
    assert f"initialised from {straight} step 30" in proc.stdout
    assert "continuing the optimizer state of" in proc.stdout
    config = json.loads((extended / "config.json").read_text())
    assert config["model"]["global_rope_theta"] == 160_000.0  # phase 1: 10,000
    assert config["model"]["num_hidden_layers"] == 2 and config["data"]["max_seq_length"] == length
    # The extension trains (its own schedule, not phase 1's spent one): the weights move.
    moved = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), _params(extended, 2), _params(straight, 30)
    )
    assert max(jax.tree.leaves(moved)) > 0


# Run in a process of its own: train.py defines absl flags that finetune.py (imported by
# other tests of the session) defines too.
_RECIPES = """
import dataclasses, importlib, json, sys
sys.path.insert(0, sys.argv[1])
import train
from bert_jax import objectives
out = {}
for name, arg in [("modernbert", "base"), ("modernbert", "large,extend"),
                  ("roberta", "base"), ("roberta", "xlmr")]:
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    config.data.vocab_file = "tokenizer.json"  # theirs, which bert_jax reads, not learns
    run = train.parse_config(config)
    out[f"{name}:{arg}"] = dict(
        masked_lm_only=objectives.pretraining_objective(run.model) is objectives.MASKED_LM,
        problem=objectives.pretraining_data_problem(run.model, run.data.masking),
        theta=run.model.global_rope_theta, length=run.data.masking.max_seq_length,
        optimizer=run.optim.name, masking=run.data.masking.masked_lm_prob,
    )
bert = train.parse_config(importlib.import_module("configs.bert_base").get_config())
masking = dataclasses.replace(bert.data.masking, next_sentence="none")
out["bert:none"] = objectives.pretraining_data_problem(bert.model, masking)
print(json.dumps(out))
"""


def test_mlm_only_recipes_parse_and_fit_their_objective():
    """configs/modernbert.py and configs/roberta.py give runs whose data (masked LM alone)
    fits their family's objective; a BERT config asked for no sentence pairs is refused."""
    import subprocess
    import sys

    from cli import ROOT

    proc = subprocess.run(
        [sys.executable, "-c", _RECIPES, ROOT], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "set --config.data.next_sentence=nsp" in out.pop("bert:none")
    for key, run in out.items():
        assert run["masked_lm_only"] and run["problem"] == "", key
    for key, theta, length in [("base", 10_000.0, 1024), ("large,extend", 160_000.0, 8192)]:
        run = out[f"modernbert:{key}"]
        assert (run["theta"], run["length"]) == (theta, length)
        assert (run["optimizer"], run["masking"]) == ("stable_adamw", 0.3)
