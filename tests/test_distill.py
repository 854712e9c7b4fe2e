"""Task distillation: the losses against hand-computed values, a frozen teacher that no step
changes, and a half-depth student that learns more from the teacher than from the labels."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_training

from bert_jax import axes, losses, models, objectives, optim, sharding, training


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_distillation_losses_equal_hand_computed_values():
    student = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0], [9.0, 9.0, 9.0]], np.float32)
    teacher = np.array([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 2.0, 3.0]], np.float32)
    weights = np.array([1.0, 1.0, 0.0], np.float32)  # the last row is padding
    # By hand at T = 2: p = softmax(t / 2), q = softmax(s / 2), T^2 * -sum p log q per row.
    p0, q0 = _softmax(teacher[0] / 2), _softmax(student[0] / 2)
    p1, q1 = _softmax(teacher[1] / 2), _softmax(student[1] / 2)
    want = 4 * (-(p0 * np.log(q0)).sum()) + 4 * (-(p1 * np.log(q1)).sum())
    got = losses.soft_cross_entropy(student, teacher, weights, 2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Row 0 by its numbers: q0 = softmax([1, 0, -0.5]), p0 = softmax([0.5, 0.5, 0]).
    e = np.exp([1.0, 0.0, -0.5])
    ep = np.exp([0.5, 0.5, 0.0])
    row0 = -4 * sum(ep[i] / ep.sum() * np.log(e[i] / e.sum()) for i in range(3))
    np.testing.assert_allclose(losses.soft_cross_entropy(student[:1], teacher[:1], 1.0, 2.0), row0)
    # A regression head (one output): the squared difference, weighted.
    np.testing.assert_allclose(
        losses.soft_cross_entropy(student[:, :1], teacher[:, :1], weights, 2.0), 1.0 + 0.25
    )
    # The whole loss: (1 - alpha) x the task's cross-entropy + alpha x the mean soft term.
    batch = {"label": np.array([0, 2, 1], np.int32), "label_weights": weights}
    loss, sums = losses.task_distillation_loss(
        student, teacher, losses.classification_loss, batch, temperature=2.0, alpha=0.25
    )
    hard = (-np.log(_softmax(student[0])[0]) - np.log(_softmax(student[1])[2])) / 2
    np.testing.assert_allclose(loss, 0.75 * hard + 0.25 * want / 2, rtol=1e-6)
    np.testing.assert_allclose(sums["distill_loss_sum"], want, rtol=1e-6)
    np.testing.assert_allclose(sums["loss_sum"], hard * 2, rtol=1e-6)
    # QA: the start and end distributions count half each.
    qa_batch = {
        "start_positions": np.array([0, 1], np.int32),
        "end_positions": np.array([2, 2], np.int32),
        "label_weights": np.ones(2, np.float32),
    }
    _, qa = losses.task_distillation_loss(
        (student[:2], teacher[:2]),
        (teacher[:2], student[:2]),
        lambda out, b: losses.span_loss(*out, b),
        qa_batch,
        temperature=1.0,
        alpha=1.0,
    )
    start = -(_softmax(teacher[:2]) * np.log(_softmax(student[:2]))).sum()
    end = -(_softmax(student[:2]) * np.log(_softmax(teacher[:2]))).sum()
    np.testing.assert_allclose(qa["distill_loss_sum"], (start + end) / 2, rtol=1e-6)


def _tiny(layers: int) -> models.BertConfig:
    return dataclasses.replace(tiny_training.config(40, 24), num_hidden_layers=layers)


def _train(objective, config, data, steps, teacher=None):
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    trainer = training.create_trainer(
        config,
        optim.OptimConfig(learning_rate=1e-3, warmup_steps=steps // 10, total_steps=steps),
        mesh,
        axes.DEFAULT_RULES,
        objective,
        teacher_params=teacher,
    )
    n, order = len(data["input_ids"]), np.random.default_rng(0)
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        for step in range(steps):
            if step % (n // 32) == 0:
                perm = order.permutation(n)
            rows = perm[(step % (n // 32)) * 32 :][:32]
            state, metrics = trainer.train_step(
                state, trainer.global_batch({k: v[rows] for k, v in data.items()})
            )
    return trainer, state, metrics


def _accuracy(trainer, params, data) -> float:
    logits = [
        np.asarray(trainer.predict_step(params, {k: v[i : i + 256] for k, v in data.items()}))
        for i in range(0, len(data["label"]), 256)
    ]
    return float((np.concatenate(logits).argmax(-1) == data["label"]).mean())


def test_teacher_stays_bitwise_frozen_and_gets_no_gradient():
    data = tiny_training.noisy_counting(64, 3)
    teacher = models.split_params(
        models.create_model(_tiny(2), 5, models.BertForSequenceClassification)
    )[1]
    teacher = jax.tree.map(np.asarray, teacher)
    before = jax.tree.map(np.copy, teacher)
    objective = objectives.task_distillation(objectives.classification(2), _tiny(2), alpha=0.7)
    trainer, state, metrics = _train(objective, _tiny(1), data, 4, teacher)
    assert np.isfinite(float(metrics["distill_loss_sum"])) and float(metrics["finite"])
    placed = jax.device_get(trainer.train_step.frozen)
    for leaf, a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(teacher), jax.tree.leaves(placed), strict=True
    ):
        assert np.array_equal(leaf, a) and np.array_equal(leaf, b)
    # The loss the step differentiates, as a function of the teacher: no gradient reaches it.
    graphdef = models.split_params(
        models.abstract_model(_tiny(1), models.BertForSequenceClassification)
    )[0]
    batch = {k: jnp.asarray(v[:8]) for k, v in data.items()}

    gradients = training.step._Gradients(graphdef, objective, axes.DEFAULT_RULES)

    def loss_of_teacher(t):
        return gradients(state.params, t, batch, jax.random.key(0))[0]

    grads = jax.grad(loss_of_teacher)(jax.tree.map(jnp.asarray, teacher))
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_a_teacher_of_another_shape_is_refused_before_training():
    objective = objectives.task_distillation(objectives.classification(2), _tiny(2))
    wrong = models.split_params(
        models.create_model(_tiny(3), 0, models.BertForSequenceClassification)
    )[1]
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    with pytest.raises(ValueError, match="do not match its config"):
        training.create_trainer(
            _tiny(1), optim.OptimConfig(), mesh, axes.DEFAULT_RULES, objective, wrong
        )
    with pytest.raises(ValueError, match="teacher_params go with a distillation objective"):
        training.create_trainer(_tiny(1), optim.OptimConfig(), mesh, axes.DEFAULT_RULES, objective)


def test_half_depth_student_learns_more_from_the_teacher_than_from_labels():
    """The teacher was fine-tuned on 4,000 labelled examples; the student has 200 of its own
    (the common case: a released fine-tuned model, a small labelled set). Alone it learns
    those 200 labels' noise; distilled it learns how sure to be from the teacher."""
    dev = tiny_training.noisy_counting(2048, 1)
    classify = objectives.classification(2)
    teacher_trainer, teacher_state, _ = _train(
        classify, _tiny(4), tiny_training.noisy_counting(4000, 7), 400
    )
    teacher_accuracy = _accuracy(teacher_trainer, teacher_state.params, dev)
    teacher = jax.device_get(teacher_state.params)
    train = tiny_training.noisy_counting(200, 0)
    alone_trainer, alone, _ = _train(classify, _tiny(2), train, 300)
    distilled = objectives.task_distillation(classify, _tiny(4), temperature=2.0, alpha=0.9)
    student_trainer, student, _ = _train(distilled, _tiny(2), train, 300, teacher)
    alone_accuracy = _accuracy(alone_trainer, alone.params, dev)
    student_accuracy = _accuracy(student_trainer, student.params, dev)
    print(
        f"teacher {teacher_accuracy:.4f} student {student_accuracy:.4f} alone {alone_accuracy:.4f}"
    )
    assert teacher_accuracy > 0.8  # the labels' own noise caps any model at about 0.83
    assert student_accuracy >= 0.95 * teacher_accuracy
    assert student_accuracy > alone_accuracy + 0.02


def test_a_student_of_every_other_layer_equals_transformers_with_those_layers(tmp_path):
    import hf_reference
    import torch
    import transformers

    from bert_jax import convert

    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=3,
        )
    ).eval()
    config = convert.config_from_hf(hf.config.to_dict(), "the test model")
    params, _ = convert.params_from_hf(
        {k: v.numpy() for k, v in hf.state_dict().items()},
        config,
        "BertForSequenceClassification",
        3,
    )
    student, student_config = models.take_layers(params, config, range(0, 4, 2))
    assert student_config.num_hidden_layers == 2
    # The reference: transformers' own model with layers 1 and 3 removed.
    hf.bert.encoder.layer = torch.nn.ModuleList([hf.bert.encoder.layer[i] for i in (0, 2)])
    hf.config.num_hidden_layers = 2
    reference = hf_reference.torch_outputs(hf, "BertForSequenceClassification", 50)
    ours = hf_reference.jax_outputs(student_config, "BertForSequenceClassification", student)
    hf_reference.assert_same(ours, reference)
    with pytest.raises(ValueError, match=r"layers \[4\]: choose some of the model's layers 0..3"):
        models.take_layers(params, config, [4])


def test_distillation_configs_parse_and_refuse_bad_settings(tmp_path):
    import finetune
    from configs import distill

    (tmp_path / "glue").mkdir()
    (tmp_path / "teacher").mkdir()
    for name in ("config.json", "model.safetensors"):  # what a Hugging Face directory holds
        (tmp_path / "teacher" / name).write_text("{}")
    for student, layers in (
        ("bert6", (0, 2, 4, 6, 8, 10)),
        ("tinybert4", ()),
        ("tinybert4_layers", ()),
    ):
        config = distill.get_config(student)
        config.init_from, config.data_dir = "hf:/models/bert", str(tmp_path / "glue")
        config.distill.teacher, config.tasks = str(tmp_path / "teacher"), "sst2"
        parsed = finetune.parse_config(config)
        assert parsed.student_layers == layers and parsed.distill["teacher"]
    assert parsed.distill["layerwise"] == 1.0 and parsed.distill["prediction"] is False
    config.distill.layerwise = 0.0
    with pytest.raises(ValueError, match="leaves only the layer-wise loss"):
        finetune.parse_config(config)
    config.distill.prediction = True
    config.distill.alpha = 1.5
    with pytest.raises(ValueError, match=r"--config.distill.alpha=1.5 in \[0, 1\]"):
        finetune.parse_config(config)
    config.distill.alpha, config.student_layers = 0.5, "0,two"
    with pytest.raises(ValueError, match="--config.student_layers='0,two': comma-separated"):
        finetune.parse_config(config)
    config.student_layers, config.distill.teacher = "", str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        finetune.parse_config(config)
    with pytest.raises(ValueError, match="choose one of"):
        distill.get_config("bert3")
    from configs import distilbert  # train.py's parsing of these fields: the test below

    pretraining = distilbert.get_config("bf16")
    assert pretraining.student_layers == "0,2,4,6,8,10" and pretraining.model.dtype == "bfloat16"
    assert (pretraining.distill.alpha_ce, pretraining.distill.alpha_mlm) == (5.0, 2.0)


def test_pretraining_distillation_loss_equals_hand_computed_values():
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    s_mlm, t_mlm = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    s_nsp = rng.normal(size=(2, 2))
    s_hidden, t_hidden = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6))
    batch = {
        "masked_lm_ids": np.array([[1, 2, 0], [4, 0, 0]], np.int32),
        "masked_lm_weights": np.array([[1, 1, 0], [1, 0, 0]], np.float32),
        "next_sentence_labels": np.array([0, 1], np.int32),
        "input_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32),
    }

    def output(mlm, nsp, hidden):
        encoder = SimpleNamespace(sequence_output=jnp.asarray(hidden, jnp.float32))
        return SimpleNamespace(
            mlm_logits=jnp.asarray(mlm, jnp.float32),
            nsp_logits=jnp.asarray(nsp, jnp.float32),
            encoder=encoder,
        )

    loss, sums = losses.pretraining_distillation_loss(
        output(s_mlm, s_nsp, s_hidden),
        output(t_mlm, s_nsp, t_hidden),
        batch,
        temperature=2.0,
        alpha_ce=5.0,
        alpha_mlm=2.0,
        alpha_cos=1.0,
    )
    masked = [(0, 0), (0, 1), (1, 0)]
    soft = [
        -4 * (_softmax(t_mlm[b, p] / 2) * np.log(_softmax(s_mlm[b, p] / 2))).sum()
        for b, p in masked
    ]
    mlm = [-np.log(_softmax(s_mlm[b, p])[batch["masked_lm_ids"][b, p]]) for b, p in masked]
    nsp = [-np.log(_softmax(s_nsp[b])[batch["next_sentence_labels"][b]]) for b in range(2)]
    real = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    cos = [
        1
        - s_hidden[b, i]
        @ t_hidden[b, i]
        / (np.linalg.norm(s_hidden[b, i]) * np.linalg.norm(t_hidden[b, i]))
        for b, i in real
    ]
    want = 5 * np.mean(soft) + 2 * (np.mean(mlm) + np.mean(nsp)) + np.mean(cos)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(sums["distill_loss_sum"], np.sum(soft), rtol=1e-5)
    np.testing.assert_allclose(sums["cosine_loss_sum"], np.sum(cos), rtol=1e-5)


def test_train_py_distils_a_student_resumes_exactly_and_leaves_the_teacher(tmp_path):
    import hashlib
    import json
    import os

    from cli import read_summary, run_train

    teacher = tmp_path / "teacher"
    run_train(tmp_path, teacher, 10)

    def digests():
        return {
            os.path.relpath(os.path.join(d, f), teacher): hashlib.sha256(
                open(os.path.join(d, f), "rb").read()
            ).hexdigest()
            for d, _, names in os.walk(teacher / "checkpoints")
            for f in names
        }

    before = digests()
    student = (
        f"--config.init_from={teacher}",
        "--config.student_layers=0",
        f"--config.distill.teacher={teacher}",
        "--config.distill.layerwise=1.0",  # with TinyBERT's layer-wise loss too
    )
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = run_train(tmp_path, straight, 20, *student)
    assert "distilling from" in proc.stdout
    run_train(tmp_path, split, 10, *student)
    run_train(tmp_path, split, 20, *student)  # goes on from step 10
    resumed = read_summary(split)
    assert resumed["steps_this_run"] == 10 and resumed["steps"] == 20
    # Resumed = never stopped, the teacher read again at the start.
    for key, value in read_summary(straight)["eval"].items():
        np.testing.assert_allclose(resumed["eval"][key], value, rtol=1e-5, err_msg=key)
    assert digests() == before  # the teacher's checkpoint, byte for byte
    with open(split / "config.json") as f:
        assert json.load(f)["model"]["num_hidden_layers"] == 1
    changed = run_train(tmp_path, split, 30, *student, "--config.distill.alpha_ce=1.0", check=False)
    assert changed.returncode != 0 and "distill.alpha_ce: 5.0 there, 1.0 here" in changed.stderr
    refused = run_train(
        tmp_path,
        tmp_path / "refused",
        6,
        f"--config.distill.teacher={tmp_path / 'nowhere'}",
        check=False,
    )
    assert refused.returncode != 0 and "config.distill.teacher" in refused.stderr
    assert "set config.init_from" in refused.stderr


def test_layerwise_loss_equals_hand_computed_values():
    """TinyBERT's intermediate-layer loss written out: per layer, the squared error summed
    over the real tokens' features (through the projection), divided by their count x width;
    attention the same over real query rows x heads x keys; summed over layers."""
    rng = np.random.default_rng(0)
    s_hidden, t_hidden = rng.normal(size=(3, 2, 4, 3)), rng.normal(size=(3, 2, 4, 5))
    s_probs, t_probs = rng.random((2, 2, 2, 4, 4)), rng.random((2, 2, 2, 4, 4))
    kernel, bias = rng.normal(size=(3, 5)), rng.normal(size=5)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss, parts = losses.layerwise_distillation_loss(
        s_hidden, t_hidden, s_probs, t_probs, mask, (kernel, bias)
    )
    hidden = attention = 0.0
    for layer in range(3):
        total = 0.0
        for b in range(2):
            for i in range(4):
                if mask[b, i]:
                    projected = s_hidden[layer, b, i] @ kernel + bias
                    total += ((projected - t_hidden[layer, b, i]) ** 2).sum()
        hidden += total / (5 * 5)  # 5 real tokens x 5 features
    for layer in range(2):
        total = 0.0
        for b in range(2):
            for i in range(4):
                if mask[b, i]:
                    total += ((s_probs[layer, b, :, i] - t_probs[layer, b, :, i]) ** 2).sum()
        attention += total / (5 * 2 * 4)  # 5 real queries x 2 heads x 4 keys
    np.testing.assert_allclose(parts["hidden_mse"], hidden, rtol=1e-5)
    np.testing.assert_allclose(parts["attention_mse"], attention, rtol=1e-5)
    np.testing.assert_allclose(loss, hidden + attention, rtol=1e-5)


def _layerwise_run(objective, student_config, data, steps, teacher):
    """Trains a student with a layer-wise objective on `data` in order; returns the trainer,
    the state, the projection at the start, each step's layer-wise error and the last batch."""
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    trainer = training.create_trainer(
        student_config,
        optim.OptimConfig(learning_rate=3e-3, warmup_steps=10, total_steps=steps),
        mesh,
        axes.DEFAULT_RULES,
        objective,
        teacher_params=teacher,
    )
    n, errors = len(data["input_ids"]), []
    with jax.set_mesh(mesh):
        state = trainer.init(0)
        start = jax.device_get(state.params[objectives.OWN_PARAMS])
        for step in range(steps):
            rows = np.arange(step * 32, step * 32 + 32) % n
            batch = trainer.global_batch({k: v[rows] for k, v in data.items()})
            state, metrics = trainer.train_step(state, batch)
            summary = objective.summarize(jax.device_get(metrics))
            errors.append(summary["hidden_mse"] + summary["attention_mse"])
    return trainer, state, start, errors, batch


def test_tinybert_layers_stage_trains_the_projection_and_pulls_the_student_to_the_teacher():
    """A 2 x 32 student of a fine-tuned 4 x 64 teacher (the same heads): its layer m learns
    the teacher's layer 2m through a projection trained in the same step (kept in the run's
    params beside the model's, which the model and prediction ignore); the layer-wise error
    falls to a fraction of its start."""
    data = tiny_training.noisy_counting(1024, 3)
    teacher_config = _tiny(4)
    _, teacher_state, _ = _train(objectives.classification(2), teacher_config, data, 100)
    teacher = jax.device_get(teacher_state.params)
    student_config = dataclasses.replace(
        teacher_config, num_hidden_layers=2, hidden_size=32, intermediate_size=64
    )
    objective = objectives.task_distillation(
        objectives.classification(2),
        teacher_config,
        layerwise=1.0,
        prediction=False,
        student_config=student_config,
    )
    trainer, state, start, errors, batch = _layerwise_run(
        objective, student_config, data, 200, teacher
    )
    assert start["kernel"].shape == (32, 64)
    with jax.set_mesh(trainer.mesh):  # the student alone predicts (the projection is no part)
        logits = trainer.predict_step(state.params, batch)
    assert logits.shape == (32, 2)
    trained = jax.device_get(state.params[objectives.OWN_PARAMS])
    assert not np.allclose(trained["kernel"], start["kernel"])
    print(f"layer-wise error {errors[0]:.4f} -> {errors[-1]:.4f}")
    assert errors[-1] < 0.5 * errors[0]
    with pytest.raises(ValueError, match="choose a student depth that divides 4"):
        objectives.task_distillation(
            objectives.classification(2),
            teacher_config,
            layerwise=1.0,
            student_config=dataclasses.replace(student_config, num_hidden_layers=3),
        )
    with pytest.raises(ValueError, match="give the student the teacher's head count"):
        objectives.task_distillation(
            objectives.classification(2),
            teacher_config,
            layerwise=1.0,
            student_config=dataclasses.replace(student_config, num_attention_heads=2),
        )


def test_general_layerwise_distillation_trains_a_narrower_student():
    """TinyBERT's general stage in the pretraining objective: a 1 x 32 student of a 2 x 64
    teacher, masked LM and sentence labels plus the layer-wise loss through its projection
    (DistilBERT's cosine term off: it needs the teacher's width); the layer-wise error falls
    and the projection trains, kept beside the model's params."""
    teacher_config = models.BertConfig(
        vocab_size=40,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=24,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    student_config = dataclasses.replace(
        teacher_config, num_hidden_layers=1, hidden_size=32, intermediate_size=64
    )
    teacher = jax.device_get(models.split_params(models.create_model(teacher_config, 1))[1])
    objective = objectives.pretraining_distillation(
        teacher_config, alpha_cos=0.0, layerwise=1.0, student_config=student_config
    )
    rng = np.random.default_rng(0)
    n = 512
    data = {
        "input_ids": rng.integers(5, 40, (n, 24)).astype(np.int32),
        "input_mask": np.ones((n, 24), np.int32),
        "segment_ids": (np.arange(24) >= 12).astype(np.int32)[None].repeat(n, 0),
        "masked_lm_positions": rng.integers(1, 24, (n, 3)).astype(np.int32),
        "masked_lm_ids": rng.integers(5, 40, (n, 3)).astype(np.int32),
        "masked_lm_weights": np.ones((n, 3), np.float32),
        "next_sentence_labels": rng.integers(0, 2, n).astype(np.int32),
    }
    trainer, state, start, errors, batch = _layerwise_run(
        objective, student_config, data, 150, teacher
    )
    with jax.set_mesh(trainer.mesh):
        eval_sums = trainer.eval_step(state.params, batch)  # the student's own loss
    assert np.isfinite(float(eval_sums["mlm_loss_sum"]))
    assert start["kernel"].shape == (32, 64)
    trained = jax.device_get(state.params[objectives.OWN_PARAMS])
    assert not np.allclose(trained["kernel"], start["kernel"])
    print(f"layer-wise error {errors[0]:.4f} -> {errors[-1]:.4f}")
    assert errors[-1] < 0.5 * errors[0]
