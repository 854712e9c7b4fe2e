"""The one table of the family's architectures: a Hugging Face architecture name (a family's
prefix, `Bert`, `Albert`, `Roberta`, `XLMRoberta` or `ModernBert`, + a head) to the bert_jax
model class that runs it. Every part that turns a name into a model (loading weights, tasks,
tools, exports) asks `model_class`; a new head or encoder is a class plus a line here."""

import functools
from collections.abc import Callable

from flax import nnx

from bert_jax.models.heads import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from bert_jax.models.modern import make_encoder

# Head (the name after the family) -> (class, whether it takes `num_labels`); each head
# builds the encoder of its config's family (`make_encoder`).
HEADS: dict[str, tuple[Callable[..., nnx.Module], bool]] = {
    "Model": (make_encoder, False),
    "ForPreTraining": (BertForPreTraining, False),
    "ForMaskedLM": (BertForMaskedLM, False),
    "ForSequenceClassification": (BertForSequenceClassification, True),
    "ForTokenClassification": (BertForTokenClassification, True),
    "ForMultipleChoice": (BertForMultipleChoice, False),
    "ForQuestionAnswering": (BertForQuestionAnswering, False),
}
# `BertConfig.model_type` -> the prefix of its architecture names. One model class each:
# ALBERT is BERT with sharing; RoBERTa and XLM-R are BERT with offset positions.
FAMILIES = {
    "bert": "Bert",
    "albert": "Albert",
    "roberta": "Roberta",
    "xlm-roberta": "XLMRoberta",
    "modernbert": "ModernBert",
}
# Heads a family's Hugging Face release does not have (RoBERTa, ModernBERT pretrain without
# a sentence-pair head).
_ABSENT = {p: ("ForPreTraining",) for p in ("Roberta", "XLMRoberta", "ModernBert")}
ARCHITECTURES = tuple(
    f"{prefix}{head}"
    for prefix in FAMILIES.values()
    for head in HEADS
    if head not in _ABSENT.get(prefix, ())
)


def head_of(architecture: str) -> str:
    """The head part of an architecture name ("ForQuestionAnswering"), checked."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture!r} is not supported; use one of {ARCHITECTURES}"
        )
    return next(
        architecture.removeprefix(prefix)
        for prefix in FAMILIES.values()
        if architecture.removeprefix(prefix) in HEADS
    )


def architecture(model_type: str, head: str) -> str:
    """The architecture name of `head` ("ForMaskedLM", or any architecture name, whose head
    is taken) in the family of `model_type`."""
    if head not in HEADS:
        head = head_of(head)
    name = FAMILIES[model_type] + head
    if name not in ARCHITECTURES:
        raise ValueError(
            f"{model_type} models have no {head} head in their Hugging Face release; use one of "
            f"{[a for a in ARCHITECTURES if a.startswith(FAMILIES[model_type])]}"
        )
    return name


def pretraining_architecture(model_type: str) -> str:
    """The model a family pretrains: masked LM and the sentence-pair head (BERT, ALBERT), or
    masked LM alone where its release has no such head (RoBERTa, XLM-R, ModernBERT)."""
    prefix = FAMILIES[model_type]
    head = "ForMaskedLM" if "ForPreTraining" in _ABSENT.get(prefix, ()) else "ForPreTraining"
    return prefix + head


def in_family(model_type: str, name: str) -> str:
    """The head of architecture `name` in the family of `model_type`; the pretraining model
    (`ForPreTraining`) asked of a family without one is its masked-LM model."""
    if head_of(name) == "ForPreTraining":
        return pretraining_architecture(model_type)
    return architecture(model_type, name)


def model_class(architecture: str, num_labels: int = 2) -> Callable[..., nnx.Module]:
    """The bert_jax model for an architecture name, with `num_labels` bound where the head
    takes it."""
    cls, takes_labels = HEADS[head_of(architecture)]
    return functools.partial(cls, num_labels=num_labels) if takes_labels else cls
