"""What users run on a trained model: prediction (`python -m bert_jax.tools.predict`), feature
extraction, attention analysis and head pruning."""

import argparse

from bert_jax import models


def add_model_flags(parser: argparse.ArgumentParser, quantization: bool = True) -> None:
    """The flags every tool takes to load a model: `--model`, and `--quantization`."""
    parser.add_argument("--model", required=True, help="hf:DIR, tf:DIR or a bert_jax workdir")
    if quantization:
        parser.add_argument(
            "--quantization",
            default="",
            choices=("", *models.layers.QUANTIZATION),
            help="int8 or int8-dynamic: quantize the model's weights as it loads "
            "(models.quantize); none: float weights; default: as the model holds them",
        )
