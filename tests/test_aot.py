"""Ahead-of-time compilation for TPU targets from this CPU host (libtpu, no TPU), the planner,
and the memory figures train.py prints."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from cli import ROOT

from bert_jax import axes, models, sharding, training
from bert_jax.compile import aot, planner
from bert_jax.data import pretraining_data
from bert_jax.optim import OptimConfig

# A hand-written optimized HLO module: a loop of 12 trips (its condition compares a counter
# with 12) holding an asynchronous all-gather and a synchronous reduce-scatter, a second
# loop with XLA's known trip count of 3 around an all-reduce of a tuple, and one
# collective-permute in the entry.
HLO = """HloModule jit_step, is_scheduled=true

%cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %constant.1 = s32[] constant(12)
  %gte = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%gte, %constant.1), direction=LT
}

%body (p.1: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p.1 = (s32[], f32[8,128]{1,0}) parameter(0)
  %x = f32[8,128]{1,0} get-tuple-element(%p.1), index=1
  %ag = (f32[8,128]{1,0}, f32[32,128]{1,0}) all-gather-start(%x), dimensions={0}
  %agd = f32[32,128]{1,0} all-gather-done(%ag)
  %rs = bf16[2,128]{1,0} reduce-scatter(%x), dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%gte.2, %x)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cond.2 (q: (s32[], f32[4])) -> pred[] {
  %q = (s32[], f32[4]{0}) parameter(0)
  ROOT %r = pred[] constant(true)
}

%body.2 (q.1: (s32[], f32[4])) -> (s32[], f32[4]) {
  %q.1 = (s32[], f32[4]{0}) parameter(0)
  %ar = (f32[4]{0}, bf16[16,16]{1,0}) all-reduce(%y, %z), to_apply=%add
  ROOT %t.2 = (s32[], f32[4]{0}) tuple(%i, %y)
}

ENTRY %main (arg: f32[8,128]) -> f32[8,128] {
  %arg = f32[8,128]{1,0} parameter(0)
  %w = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body
  %w2 = (s32[], f32[4]{0}) while(%init2), condition=%cond.2, body=%body.2, """ + (
    """backend_config={"known_trip_count":{"n":"3"}}
  %cp = (f32[8,128]{1,0}, f32[8,128]{1,0}, u32[], u32[]) collective-permute-start(%arg), """
    """source_target_pairs={{0,1}}
  ROOT %cpd = f32[8,128]{1,0} collective-permute-done(%cp)
}
"""
)


def test_collectives_are_counted_per_step_with_loop_trip_counts():
    found = aot.count_collectives(HLO)
    assert found == {
        "all-gather": aot.Collective(12, 12 * 32 * 128 * 4),  # the start's result, not operand
        "reduce-scatter": aot.Collective(12, 12 * 2 * 128 * 2),
        "all-reduce": aot.Collective(3, 3 * (4 * 4 + 16 * 16 * 2)),
        "collective-permute": aot.Collective(1, 8 * 128 * 4),
    }


def test_slice_names_map_to_libtpu_topologies():
    assert aot.topology_name("v5e-8") == "v5e:2x4"
    assert aot.topology_name("v6e-256") == "v6e:16x16"
    assert aot.topology_name("v4-8") == "v4:2x2x1"  # v4 and v5p count cores, 2 per chip
    assert aot.topology_name("v5p-128") == "v5p:4x4x4"
    assert aot.topology_name("v5e:2x2") == "v5e:2x2"
    with pytest.raises(ValueError, match="unknown slice size"):
        aot.topology_name("v5e-6")
    with pytest.raises(ValueError, match="libtpu cannot describe"):
        aot.topology_devices("v9:2x2")


def test_mesh_candidates_follow_the_families_and_the_model():
    """Every family on 8 chips of one slice; tensor parallelism only where the heads and the
    MLP divide; data parallel across slices; an unknown family is an error naming them."""
    assert planner.mesh_candidates(8, 12, 3072) == [(8, 1, 1), (1, 8, 1), (1, 4, 2), (1, 2, 4)]
    assert planner.mesh_candidates(8, 6, 3072) == [(8, 1, 1), (1, 8, 1), (1, 4, 2)]
    assert planner.mesh_candidates(16, 12, 3072, slices=2, families=("fsdp", "tensor")) == [
        (2, 8, 1),
        (2, 4, 2),
        (2, 2, 4),
    ]
    assert planner.mesh_candidates(4, 12, 3072, families=("data",)) == [(4, 1, 1)]
    with pytest.raises(ValueError, match="unknown mesh families.*choose from data, fsdp"):
        planner.mesh_candidates(8, 12, 3072, families=("pipeline",))


def test_attention_path_names_the_kernel_and_why():
    config = models.BertConfig()
    assert aot.attention_path(config, "tpu", 128, training=True) == (
        "flash_dropout (Mosaic kernel, attention dropout in the kernel); the last layer's "
        "masked positions: XLA"
    )
    assert aot.attention_path(config, "tpu", 128, training=False) == "splash (Mosaic kernel)"
    xla = models.BertConfig(attention_kernel="xla")
    assert aot.attention_path(xla, "tpu", 128, training=True) == "XLA (attention_kernel=xla)"
    modern = models.BertConfig(
        model_type="modernbert", global_attn_every_n_layers=3, attention_probs_dropout_prob=0.1
    )
    assert aot.attention_path(modern, "tpu", 512, training=True) == (
        "XLA (attention dropout with local windows: the flash-dropout kernel has none)"
    )
    assert aot.attention_path(modern, "tpu", 512, training=False).startswith("splash")
    no_dropout = models.BertConfig(attention_probs_dropout_prob=0.0)
    assert aot.attention_path(no_dropout, "tpu", 128, training=True).startswith("splash")
    assert "not a multiple of 128" in aot.attention_path(no_dropout, "tpu", 96, training=False)
    assert "not a TPU" in aot.attention_path(no_dropout, "cpu", 128, training=False)


@pytest.mark.slow
def test_tiny_config_compiles_for_a_tpu_slice_with_the_splash_kernel(tmp_path):
    """`train.py --topology` as a user runs it: the tiny config (without attention dropout,
    as ALBERT's recipe) for a v5e 2x2 slice, 4 chips on a CPU host, planned by `--plan`."""
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--topology=v5e:2x2",
            "--config.model.attention_probs_dropout_prob=0",
            "--plan",
            "--plan_meshes=data",
            "--plan_remats=none",
            f"--report={report_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_step" in proc.stdout and "splash (Mosaic kernel)" in proc.stdout
    report = json.loads(report_path.read_text())
    assert report["chips"] == 4 and report["device_kind"] == "TPU v5 lite"
    # The whole batch of 8 per chip fits: the first candidate wins, without accumulation.
    assert [t["micro_batch"] for t in report["plan"]["trials"]] == [8]
    assert report["plan"]["chosen"]["accum_steps"] == 1
    assert "--config.mesh.data=4 " in proc.stdout and "grad_accum_steps=1" in proc.stdout
    train_step, eval_step = report["programs"]
    assert train_step["fits"] and 0.9 < train_step["headroom"] <= 1.0
    # v5e chips have 16 GiB; the compiler keeps some for itself.
    assert 14 * aot.GIB < train_step["capacity"] <= 16 * aot.GIB
    kernels = set(train_step["kernels"])
    assert {k.split("_segmented")[0] for k in kernels} == {
        "splash_mha_fwd",
        "splash_mha_dkv",
        "splash_mha_dq",
    }
    assert {k.split("_segmented")[0] for k in eval_step["kernels"]} == {"splash_mha_fwd"}

    config = models.BertConfig.named("L-2_H-128", vocab_size=8192)
    # Data parallel over 4 chips: every gradient is summed across them once per step.
    gradient_bytes = 4 * models.count_params(config, models.BertForPreTraining)
    all_reduce = train_step["collectives"]["all-reduce"]
    assert all_reduce["count"] >= 1 and all_reduce["bytes"] >= gradient_bytes
    # FLOPs against the usual count: 6 per parameter and token in the layers and the MLM
    # head at the masked positions, plus attention (2 * 2 L^2 D per layer, forward, x3).
    tokens = 32 * 128 / 4
    per_token = 6 * 2 * 12 * 128**2 + 3 * 2 * 2 * 2 * 128 * 128
    mlm = 6 * (20 / 128) * (128 * 128 + 128 * 8192)
    expected = tokens * (per_token + mlm)
    assert 0.6 < train_step["flops"] / expected < 1.2, train_step["flops"] / expected


def test_modernbert_compiles_for_a_tpu_slice_with_splash_in_every_layer(tmp_path):
    """configs/modernbert.py:tiny for a v5e 2x2 slice: global and local layers (a traced flag
    picks the local mask's kernel in one scanned stack) lower to Mosaic's splash kernels."""
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            f"--config={os.path.join(ROOT, 'configs/modernbert.py')}:tiny",
            "--topology=v5e:2x2",
            "--config.model.num_hidden_layers=3",
            f"--report={report_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "splash (Mosaic kernel; local layers: a 32-token window)" in proc.stdout
    train_step, eval_step = json.loads(report_path.read_text())["programs"]
    assert {k.split("_segmented")[0] for k in train_step["kernels"]} == {
        "splash_mha_fwd",
        "splash_mha_dkv",
        "splash_mha_dq",
    }
    assert {k.split("_segmented")[0] for k in eval_step["kernels"]} == {"splash_mha_fwd"}
    assert train_step["fits"]


def test_modernbert_local_layers_call_a_splash_kernel_of_their_own():
    """A ModernBERT with local layers holds two splash kernels per layer step (the global and
    the local mask's, one per branch of the layer's choice) where the same model with every
    layer global holds one: the local kernel is compiled into the TPU program."""
    from bert_jax import objectives

    devices = aot.topology_devices("v5e:2x2")
    sites = {}
    for every in (1, 2):  # every layer global; every other layer local
        model = models.BertConfig(
            model_type="modernbert", vocab_size=512, hidden_size=128, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=192, type_vocab_size=1,
            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, local_attention=32,
            global_attn_every_n_layers=every,
        )  # fmt: skip
        setup = dataclasses.replace(
            _tiny_setup(16, programs=("eval_step",)),
            model=model,
            objective=objectives.MASKED_LM,
        )
        (report,) = setup.compile(devices, aot.hbm_bytes(devices[0]))
        assert report.fits, report.error
        sites[every] = sum(n for k, n in report.kernel_sites.items() if "splash_mha_fwd" in k)
    assert sites[1] >= 1 and sites[2] == 2 * sites[1], sites


def test_a_step_too_large_for_the_chip_is_reported_not_raised():
    """16,384 sequences per chip of the tiny model in float32: the compiler's own verdict."""
    devices = aot.topology_devices("v5e:2x2")
    setup = _tiny_setup(4 * 16384, programs=("train_step",))
    report = setup.compile(devices, aot.hbm_bytes(devices[0]))[0]
    assert not report.fits and report.required > report.capacity > 14 * aot.GIB
    assert "exceeds available HBM" in report.error and report.verdict().startswith("does not fit")


@pytest.mark.slow
def test_planner_turns_an_oversized_batch_into_one_that_fits():
    """A step whose whole per-chip batch does not fit (here: under a memory limit 1 MiB below
    what the compiler says the batch needs, to keep CI's compiles small) becomes the largest
    micro-batch that does, with gradient accumulation over the rest, found by compiling."""
    devices = aot.topology_devices("v5e:2x2")
    setup = _tiny_setup(4 * 16, programs=("train_step",))
    compiled = {}

    def compile_candidate(candidate):
        if candidate not in compiled:
            with_it = setup.with_candidate(candidate)
            compiled[candidate] = with_it.compile(devices, aot.hbm_bytes(devices[0]))[0]
        return compiled[candidate]

    whole = compile_candidate(planner.Candidate(4, 1, 1, "none", 16, 1))
    assert whole.fits
    limit = whole.required - 2**20
    lines = []
    best, trials = planner.plan(
        compile_candidate,
        chips=4,
        global_batch=64,
        seq_len=128,
        meshes=[(4, 1, 1)],
        remats=("none",),
        headroom=1 - limit / whole.capacity,
        log=lines.append,
    )
    assert trials[0].candidate.micro_batch == 16 and trials[0].report.required > limit
    assert best is not None and len(lines) == len(trials)
    assert best.report.fits and best.report.required <= limit
    assert best.candidate.micro_batch * best.candidate.accum_steps == 16
    assert best.candidate.micro_batch < 16
    # The largest that fits: twice its micro-batch was tried and did not.
    larger = [t for t in trials if t.candidate.micro_batch == 2 * best.candidate.micro_batch]
    assert larger and all(t.report.required > limit for t in larger)
    assert best.collective_bytes_per_token > 0 and best.flops_per_token > 0
    flags = setup.with_candidate(best.candidate).flags()
    assert f"--config.optim.grad_accum_steps={best.candidate.accum_steps}" in flags


def _tiny_setup(batch_size: int, **kw) -> planner.Setup:
    return planner.Setup(
        model=models.BertConfig.named(
            "L-2_H-128", vocab_size=8192, attention_probs_dropout_prob=0.0
        ),
        optim=OptimConfig(name="adamw", learning_rate=1e-4, warmup_steps=10, total_steps=100),
        mesh=sharding.MeshConfig(data=4),
        batch_size=batch_size,
        seq_len=128,
        specs=pretraining_data.feature_specs(
            pretraining_data.MaskingConfig(max_seq_length=128, max_predictions_per_seq=20)
        ),
        **kw,
    )


def _cpu_total(size: str, batch: int, length: int, predictions: int, remat: str = "none"):
    config = models.BertConfig.named(size, remat=remat)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
    trainer = training.create_trainer(
        config,
        OptimConfig(name="adamw", learning_rate=1e-4, warmup_steps=1, total_steps=10),
        mesh,
        axes.DEFAULT_RULES,
    )
    masking = pretraining_data.MaskingConfig(
        max_seq_length=length, max_predictions_per_seq=predictions
    )
    batch_structs = aot.batch_structs(trainer, pretraining_data.feature_specs(masking), batch)
    report, _ = aot.compile_program(
        "train_step", trainer.train_step, (trainer.abstract_state, batch_structs), mesh, None
    )
    estimate = training.memory_estimate(config, trainer.abstract_state, batch, length, predictions)
    return report, estimate


@pytest.mark.parametrize(
    "size,batch,length,predictions", [("L-2_H-128", 32, 128, 20), ("bert_base", 8, 128, 20)]
)
def test_memory_formula_agrees_with_the_compiled_figure(size, batch, length, predictions):
    report, estimate = _cpu_total(size, batch, length, predictions)
    params = models.count_params(models.BertConfig.named(size), models.BertForPreTraining)
    # Arguments: parameters and two Adam moments in float32, the batch, step and key.
    assert 12 * params <= report.arguments < 12 * params * 1.01 + 2**20
    assert report.flops > 0
    assert 0.75 < estimate / report.required < 1.25, (estimate, report.required)


def trainer_of_workdir(workdir, devices):
    """A trainer for the model, optimizer and mesh a train.py workdir's config.json records,
    built here from the file (not by train.py's code), and its pretraining features."""
    config = json.loads((workdir / "config.json").read_text())
    optim = dict(config["optim"])
    if optim["total_steps"] == -1:
        optim["total_steps"] = config["train"]["num_steps"]
    mesh = sharding.make_mesh(sharding.MeshConfig(**config["mesh"]), devices)
    trainer = training.create_trainer(
        models.BertConfig(**config["model"]), OptimConfig(**optim), mesh, axes.DEFAULT_RULES
    )
    masking = pretraining_data.MaskingConfig(
        max_seq_length=config["data"]["max_seq_length"],
        max_predictions_per_seq=config["data"]["max_predictions_per_seq"],
    )
    return trainer, pretraining_data.feature_specs(masking), config["train"]["batch_size"]


@pytest.mark.slow
def test_printed_memory_is_the_compiled_figure(tmp_path):
    """The start-up line of train.py gives the compiled step's total, as an independent
    compile of the same config on the same devices does."""
    from cli import run_train

    proc = run_train(tmp_path, tmp_path / "w", 2, devices=8)
    line = next(x for x in proc.stdout.splitlines() if "the compiled train step" in x)
    printed = float(line.split("total ")[1].split(" MiB")[0])
    trainer, specs, batch_size = trainer_of_workdir(tmp_path / "w", jax.devices())
    batch = aot.batch_structs(trainer, specs, batch_size)
    report, _ = aot.compile_program(
        "train_step", trainer.train_step, (trainer.abstract_state, batch), trainer.mesh, None
    )
    assert math.isclose(printed, round(report.required / 2**20, 1), abs_tol=0.05)
    assert np.isfinite(printed) and printed > 0


@pytest.mark.slow
def test_finetune_compiles_each_task_for_a_tpu_slice(tmp_path):
    """`finetune.py --topology` reads the model's config (its weights stay on disk; no task
    data is needed) and compiles the fine-tuning and prediction steps of each task's head."""
    import transformers

    hf = tmp_path / "hf"
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(hf)
    (hf / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "finetune.py"),
            f"--config.init_from=hf:{hf}",
            "--config.tasks=mrpc,squad_v1",
            "--config.max_seq_length=128",
            "--topology=v5e:2x2",
            f"--report={report_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(report_path.read_text())
    assert sorted(reports) == [
        "BertForQuestionAnswering, 2 label(s)",
        "BertForSequenceClassification, 2 label(s)",
    ]
    squad = reports["BertForQuestionAnswering, 2 label(s)"]["programs"]
    assert all(p["fits"] and p["flops"] > 0 for p in squad)
    report = reports["BertForSequenceClassification, 2 label(s)"]
    train_step, predict_step = report["programs"]
    assert train_step["name"] == "train_step" and predict_step["name"] == "predict_step"
    assert train_step["fits"] and predict_step["fits"] and train_step["flops"] > 0
    assert train_step["collectives"]["all-reduce"]["bytes"] > 0
    # Fine-tuning keeps BERT's attention dropout: the flash-dropout kernels in training
    # (forward, and both backward kernels), splash after.
    assert report["attention"]["train_step"].startswith("flash_dropout (Mosaic kernel")
    assert {k for k in train_step["kernels"] if k.startswith("flash_dropout")} == {
        "flash_dropout_fwd",
        "flash_dropout_dkv",
        "flash_dropout_dq",
    }
    assert {k.split("_segmented")[0] for k in predict_step["kernels"]} == {"splash_mha_fwd"}
