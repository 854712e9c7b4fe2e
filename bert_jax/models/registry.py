"""The one table of the family's architectures: a Hugging Face architecture name (BERT's or
ALBERT's: `Bert` or `Albert` + a head) to the bert_jax model class that runs it. Every part
that turns a name into a model (loading weights, tasks, tools, exports) asks `model_class`;
a new head or encoder is a class plus a line here."""

import functools
from collections.abc import Callable

from flax import nnx

from bert_jax.models.encoder import BertModel
from bert_jax.models.heads import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)

# Head (the name after the family) -> (class, whether it takes `num_labels`).
HEADS: dict[str, tuple[type[nnx.Module], bool]] = {
    "Model": (BertModel, False),
    "ForPreTraining": (BertForPreTraining, False),
    "ForMaskedLM": (BertForMaskedLM, False),
    "ForSequenceClassification": (BertForSequenceClassification, True),
    "ForTokenClassification": (BertForTokenClassification, True),
    "ForMultipleChoice": (BertForMultipleChoice, False),
    "ForQuestionAnswering": (BertForQuestionAnswering, False),
}
FAMILIES = ("Bert", "Albert")  # one model class each: ALBERT is BERT with sharing
ARCHITECTURES = tuple(f"{family}{head}" for family in FAMILIES for head in HEADS)


def head_of(architecture: str) -> str:
    """The head part of an architecture name ("ForQuestionAnswering"), checked."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture!r} is not supported; use one of {ARCHITECTURES}"
        )
    return architecture.removeprefix("Albert").removeprefix("Bert")


def model_class(architecture: str, num_labels: int = 2) -> Callable[..., nnx.Module]:
    """The bert_jax model for an architecture name, with `num_labels` bound where the head
    takes it."""
    cls, takes_labels = HEADS[head_of(architecture)]
    return functools.partial(cls, num_labels=num_labels) if takes_labels else cls
