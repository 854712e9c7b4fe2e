"""Released weights in and out: Hugging Face directories, original TF checkpoints, bert_jax runs.

- `names`: the one rename table between bert_jax params and Hugging Face tensor names.
- `tf_checkpoint`: TensorFlow checkpoints read with numpy alone.
- `sources`: model directories read lazily; export to a Hugging Face directory.
- `runs`: `load_pretrained` (what `--config.init_from` calls), bert_jax workdirs as models.
- `python -m bert_jax.convert`: the command line (`__main__`).
"""

from bert_jax.convert.names import (
    Report,
    config_from_hf,
    config_to_hf,
    model_class,
    params_from_hf,
    params_to_hf,
)
from bert_jax.convert.runs import (
    Pretrained,
    describe_run,
    load_pretrained,
    load_run,
    model_kind,
    overlay,
    read_optimizer_state,
    read_run,
    write_run,
)
from bert_jax.convert.sources import export_hf, read_hf_dir, read_tf_checkpoint
from bert_jax.models.registry import ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "Pretrained",
    "Report",
    "config_from_hf",
    "config_to_hf",
    "describe_run",
    "export_hf",
    "load_pretrained",
    "load_run",
    "model_class",
    "model_kind",
    "overlay",
    "params_from_hf",
    "params_to_hf",
    "read_hf_dir",
    "read_optimizer_state",
    "read_run",
    "read_tf_checkpoint",
    "write_run",
]
