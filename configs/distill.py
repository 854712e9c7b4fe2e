r"""Task distillation of a fine-tuned BERT-Base into a smaller student, on any finetune.py task.

    # DistilBERT's shape: a 6-layer student made of every other layer of BERT-Base
    python finetune.py --config=configs/distill.py:bert6 --config.tasks=sst2 \
        --config.init_from=hf:/models/bert-base-uncased \
        --config.distill.teacher=/runs/glue/sst2/lr2e-05_seed0 --config.data_dir=/data/glue
    # TinyBERT: the general-distilled 4-layer x 312 model as the student, in TinyBERT's two
    # task stages: intermediate layers (hidden states through a trained projection, and
    # attention), then predictions, from the first stage's run
    python finetune.py --config=configs/distill.py:tinybert4_layers --config.tasks=sst2 \
        --config.init_from=hf:/models/TinyBERT_General_4L_312D --workdir=/runs/tiny1 \
        --config.distill.teacher=/runs/glue/sst2/lr2e-05_seed0 --config.data_dir=/data/glue
    python finetune.py --config=configs/distill.py:tinybert4 --config.tasks=sst2 \
        --config.init_from=/runs/tiny1/sst2/lr5e-05_seed0 --workdir=/runs/tiny2 \
        --config.distill.teacher=/runs/glue/sst2/lr2e-05_seed0 --config.data_dir=/data/glue

The teacher is a model fine-tuned on the same task (a finetune.py run directory, or hf:/tf:
with its head) and of the student's vocabulary (checked before training). The student learns
(1 - alpha) x the labels' loss + alpha x T^2 x cross-entropy against the teacher's outputs at
temperature T (unless prediction=False), + layerwise x TinyBERT's intermediate-layer loss,
in the one train step (bert_jax.objectives.task_distillation).
"""

from configs import glue

STUDENTS = {
    # Every other layer of the 12 (init_from is BERT-Base, or the teacher itself): DistilBERT's
    # initialisation; its learning rate and epochs as the GLUE recipe.
    "bert6": dict(student_layers="0,2,4,6,8,10", learning_rates="5e-5", alpha=0.5),
    # init_from is TinyBERT's general-distilled 4 x 312 model, all of its layers; TinyBERT's
    # task stage (prediction-layer distillation) trains longer at a higher rate.
    "tinybert4": dict(student_layers="", learning_rates="1e-4", alpha=1.0, num_epochs=10.0),
    # TinyBERT's first task stage: the intermediate layers only (layer-wise loss, no
    # prediction terms), 10 epochs at 5e-5; then tinybert4 from its run.
    "tinybert4_layers": dict(
        student_layers="",
        learning_rates="5e-5",
        alpha=1.0,
        num_epochs=10.0,
        layerwise=1.0,
        prediction=False,
    ),
}


def get_config(arg: str | None = None):
    student = arg or "bert6"
    if student not in STUDENTS:
        raise ValueError(f"configs/distill.py:{student}: choose one of {sorted(STUDENTS)}")
    settings = STUDENTS[student]
    config = glue.get_config()
    config.student_layers = settings["student_layers"]
    config.learning_rates = settings["learning_rates"]
    config.num_epochs = settings.get("num_epochs", config.num_epochs)
    config.distill.alpha = settings["alpha"]
    config.distill.temperature = 2.0
    config.distill.layerwise = settings.get("layerwise", 0.0)
    config.distill.prediction = settings.get("prediction", True)
    return config
