"""Imported or earlier weights for a run (`--config.init_from`), and bert_jax workdirs as
model files: read the latest checkpoint subtree by subtree, write an imported model as one."""

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax

from bert_jax import checkpoint, files, models, sharding
from bert_jax.convert.names import (
    Report,
    abstract_params,
    get_path,
    is_encoder_path,
    model_class,
    params_from_hf,
    set_path,
)
from bert_jax.convert.sources import check_vocab, read_hf_dir, read_json, read_tf_checkpoint
from bert_jax.data import input_pipeline, tokenization
from bert_jax.data.tokenization import Tokenizer
from bert_jax.models import BertConfig, Params, registry


@dataclasses.dataclass
class Pretrained:
    """Imported weights for a run: the model config, the params found (placed in their
    shardings), the tokenizer, and what did not match."""

    config: BertConfig
    params: Params
    tokenizer: Tokenizer
    report: Report
    description: str


def load_pretrained(
    spec: str,
    architecture: str,
    *,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules = sharding.MeshConfig.rules,
    num_labels: int = 2,
    scratch_dir: str | None = None,
    **overrides: Any,
) -> Pretrained:
    """Weights for `architecture` from a Hugging Face directory, an original TF checkpoint or
    a bert_jax workdir (`hf:`, `tf:`, `bert_jax:` prefixes, or recognised by their files).

    Each array goes straight to its devices in the shardings the rules give on `mesh`.
    Parameters the source lacks (a new task head) are absent from `params`; overlay the result
    on a fresh initialisation with `overlay`. Encoder weights the source lacks, or holds
    beyond the config, are an error (`params_from_hf`).

    Args:
      spec: `hf:PATH`, `tf:PATH`, `bert_jax:PATH` or a bare `PATH` (see `model_kind`).
      architecture: the model to fill (one of `ARCHITECTURES`).
      overrides: BertConfig fields of this run (dtype, param_dtype, remat, dropout), and
        `quantization` to hold the weights another way than the source does (an empty value
        or none given: as the source holds them; see `models.quantize`).
    """
    quantization = overrides.pop("quantization", "") or None
    loaded = _load(spec, architecture, mesh, rules, num_labels, scratch_dir, overrides)
    if quantization is None or quantization == loaded.config.quantization:
        return loaded
    cls = model_class(architecture, num_labels)
    params, config = models.quantize(loaded.params, loaded.config, quantization, cls)
    shardings = _param_shardings(config, architecture, num_labels, mesh, rules)
    placed = jax.tree.map(jax.device_put, params, _prune(shardings, params))
    return dataclasses.replace(
        loaded,
        config=config,
        params=placed,
        description=f"{loaded.description}, quantized to {quantization}",
    )


def _load(spec, architecture, mesh, rules, num_labels, scratch_dir, overrides) -> Pretrained:
    kind, path = model_kind(spec)
    if kind == "bert_jax":
        return load_run(path, architecture, num_labels, mesh, rules, overrides)
    source = (
        read_hf_dir(path, scratch_dir, **overrides)
        if kind == "hf"
        else read_tf_checkpoint(path, **overrides)
    )
    architecture = registry.in_family(source.config.model_type, architecture)
    params, report = params_from_hf(
        source.tensors, source.config, architecture, num_labels, source.description
    )
    tokenizer = tokenization.load(
        tokenization.kind_of_file(source.vocab_file),
        source.vocab_file,
        source.do_lower_case,
        source.keep_accents,
    )
    check_vocab(tokenizer, source.config, source.description)
    shardings = _param_shardings(source.config, architecture, num_labels, mesh, rules)
    placed = sharding.place(params, _prune(shardings, params))
    return Pretrained(source.config, placed, tokenizer, report, source.description)


_KINDS = {
    "hf": "a Hugging Face model directory (config.json and model.safetensors)",
    "tf": "an original TF checkpoint (bert_config.json, vocab.txt and bert_model.ckpt.*)",
    "bert_jax": "a bert_jax workdir (config.json and checkpoints/)",
}


def model_kind(spec: str) -> tuple[str, str]:
    """(kind, path) of a model spec: its `hf:`/`tf:`/`bert_jax:` prefix, or what the files
    at the path are when it has none.

    Raises:
      FileNotFoundError when nothing is at the path; ValueError when its files are no model
      bert_jax reads, or another kind than the prefix says (naming the prefix to use).
    """
    match = re.match(r"^(hf|tf|bert_jax):", spec)
    kind, path = (match.group(1), spec[match.end() :]) if match else ("", spec)
    path = os.path.expanduser(path)
    if not (files.exists(path) or files.exists(path + ".index")):
        raise FileNotFoundError(
            f"model {spec!r}: {path} does not exist; give {_KINDS['hf']}, {_KINDS['tf']} or "
            f"{_KINDS['bert_jax']}"
        )
    found = _detect(path)
    if not kind and found is None:
        raise ValueError(
            f"model {spec!r}: {path} is none of {_KINDS['hf']}; {_KINDS['tf']}; "
            f"{_KINDS['bert_jax']}"
        )
    if kind and found is not None and found != kind:
        raise ValueError(
            f"model {spec!r}: {path} is {_KINDS[found]}, not {_KINDS[kind]}; pass {found}:{path}"
        )
    return kind or found, path


def _detect(path: str) -> str | None:
    if not files.isdir(path):
        return "tf" if files.exists(path + ".index") else None
    names = set(files.listdir(path))
    if "config.json" in names and "checkpoints" in names:
        return "bert_jax"
    if "config.json" in names and names & {
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    }:
        return "hf"
    if "bert_config.json" in names and any(n.endswith(".index") for n in names):
        return "tf"
    return None


def overlay(base: Params, imported: Params) -> Params:
    """`base` with every leaf that `imported` has replaced by the imported one."""
    if not isinstance(imported, Mapping):
        return imported
    return {k: overlay(v, imported[k]) if k in imported else v for k, v in base.items()}


def load_run(path, architecture, num_labels, mesh, rules, overrides, step=None) -> Pretrained:
    """The params of a bert_jax workdir's checkpoint, read subtree by subtree so that a
    pretraining run can fill a classifier's encoder (and a missing pooler is reported)."""
    run = read_run(path, step)
    config = dataclasses.replace(run["config"], **overrides)
    architecture = registry.in_family(config.model_type, architecture)
    shardings = _param_shardings(config, architecture, num_labels, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_params(config, architecture, num_labels),
        shardings,
    )
    src_bare, dst_bare = run["architecture"].endswith("Model"), "bert" not in abstract
    enc_prefix = () if dst_bare else ("bert",)
    encoder = abstract if dst_bare else abstract["bert"]
    # (path in the target, path in the checkpoint or None when the source cannot have it)
    groups = [(enc_prefix + (k,), (() if src_bare else ("bert",)) + (k,)) for k in encoder]
    if not dst_bare:
        groups += [((k,), None if src_bare else (k,)) for k in abstract if k != "bert"]
    params: Params = {}
    report = Report()
    description = f"{path} step {run['step']}"
    for target, src in groups:
        name = "/".join(target)
        try:
            if src is None:
                raise ValueError(f"{run['architecture']} has no {name}")
            value = checkpoint.restore_subtree(
                run["checkpoints"], run["step"], src, get_path(abstract, name)
            )
        except ValueError as e:
            if is_encoder_path(name):  # a pooler or head may start fresh, the encoder not
                raise ValueError(
                    f"the encoder of {description} does not fit its config.json ({e}); the "
                    f"workdir's config.json belongs to another model"
                ) from e
            report.missing.append(name)
            continue
        set_path(params, name, value)
    return Pretrained(config, params, run["tokenizer"], report, description)


def read_optimizer_state(spec: str, abstract_opt_state) -> tuple[Any, int, str]:
    """(the optimizer state of a workdir's newest checkpoint, its step, where it is), for a
    phase that continues another's (`init_optimizer`).

    Raises:
      ValueError when that state is another optimizer's or model's.
    """
    source = read_run(model_kind(spec)[1])
    directory, step = source["checkpoints"], source["step"]
    try:
        opt_state = checkpoint.restore_subtree(
            directory, step, ("opt_state",), abstract_opt_state, root=()
        )
    except ValueError as e:
        raise ValueError(
            f"--config.init_optimizer: the optimizer state of {directory}/{step} does not fit "
            f"this run's (phase 2 must use phase 1's optimizer and model): {e}"
        ) from None
    return opt_state, step, f"{directory}/{step}"


def read_run(path: str, step: int | None = None) -> dict:
    """A bert_jax workdir's model config, architecture, tokenizer and checkpoint step."""
    saved = read_json(
        os.path.join(path, "config.json"),
        missing=f"{path} is not a bert_jax workdir (no config.json); for released weights pass "
        f"hf:<directory> or tf:<directory>",
    )
    config = models.BertConfig(**saved["model"])
    data = saved.get("data", {})
    kind = data.get("tokenizer", "wordpiece")
    vocab_name = tokenization.FILE_NAMES[kind]
    vocab_file = os.path.join(path, vocab_name)
    if not files.isfile(vocab_file):
        raise FileNotFoundError(f"{path} has no {vocab_name}: the run's tokenizer is missing")
    directory = os.path.join(path, "checkpoints")
    steps = (
        sorted(int(d) for d in files.listdir(directory) if d.isdigit())
        if files.isdir(directory)
        else []
    )
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(
            f"{directory} has no checkpoint{'' if step is None else f' of step {step}'} "
            f"(found {steps})"
        )
    step = steps[-1] if step is None else step
    _check_run_files(path, os.path.join(directory, str(step)), config, vocab_file)
    return dict(
        config=config,
        architecture=saved.get("architecture", "BertForPreTraining"),
        num_labels=saved.get("num_labels", 2),
        labels=saved.get("labels"),  # a fine-tuned head's label names, where recorded
        task=saved.get("task"),
        tokenizer=tokenization.load(
            kind, vocab_file, data.get("do_lower_case", True), data.get("keep_accents", False)
        ),
        checkpoints=directory,
        step=step,
    )


def _check_run_files(path: str, step_dir: str, config: BertConfig, vocab_file: str) -> None:
    """A workdir's config.json and vocabulary must be the ones its checkpoint was written
    with, and the checkpoint must pass its checksums."""
    problems = checkpoint.verify_checksums(step_dir)
    if problems:
        raise ValueError(
            f"checkpoint {step_dir} is damaged: {len(problems)} file(s) fail their checksums "
            f"({problems[0]}); use another --step or another copy of the run"
        )
    meta = checkpoint.read_meta(step_dir)
    if meta is None or "model" not in meta.get("config", {}):
        return
    fields = {f.name for f in dataclasses.fields(BertConfig)} - set(models.RUN_FIELDS)
    written = BertConfig(**{k: v for k, v in meta["config"]["model"].items() if k in fields})
    differing = [
        f"{k}: {getattr(written, k)!r} in the checkpoint, {getattr(config, k)!r} in config.json"
        for k in sorted(fields)
        if getattr(written, k) != getattr(config, k)
    ]
    if differing:
        raise ValueError(
            f"{path}/config.json does not describe checkpoint {step_dir} ({'; '.join(differing)})"
            f"; the workdir's files were replaced by another run"
        )
    if meta.get("vocab_sha256") not in (None, input_pipeline.file_digest(vocab_file)):
        raise ValueError(
            f"{vocab_file} is not the vocabulary checkpoint {step_dir} was trained with (another "
            f"sha256); the workdir's files were replaced by another run"
        )


def write_run(
    out: str,
    config: BertConfig,
    architecture: str,
    num_labels: int,
    params: Params,
    tokenizer: Tokenizer,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """A bert_jax workdir holding `params` as the orbax checkpoint of step 0 (`extra`: more
    entries for its config.json, as `describe_run`)."""
    if files.exists(os.path.join(out, "checkpoints")):
        raise FileExistsError(f"{out} already holds checkpoints; choose a new output directory")
    meta = describe_run(out, config, architecture, num_labels, tokenizer, extra=extra)
    ckpt = checkpoint.Checkpointer(os.path.join(out, "checkpoints"))
    ckpt.save(0, {"params": params}, {}, meta)
    ckpt.close()


def describe_run(
    out: str,
    config: BertConfig,
    architecture: str,
    num_labels: int,
    tokenizer: Tokenizer,
    *,
    extra: Mapping[str, Any] | None = None,
    write: bool = True,
) -> dict:
    """Writes what makes `out` a model besides its checkpoints (config.json with the model
    config and architecture, and the vocabulary); returns the checkpoint metadata.

    Args:
      extra: more of the run's settings to record in config.json (a pretraining run's data,
        optimizer and loop sections); the model, tokenizer and architecture entries win.
      write: False to only build the metadata (the processes of a run other than the first).
    """
    extra = dict(extra or {})
    kind = tokenization.kind_of(tokenizer)
    vocab_name = tokenization.FILE_NAMES[kind]
    config_json = {
        **extra,
        "model": dataclasses.asdict(config),
        "data": {
            **extra.get("data", {}),
            "tokenizer": kind,
            "do_lower_case": tokenizer.do_lower_case,
            "keep_accents": getattr(tokenizer, "keep_accents", False),
        },
        "architecture": architecture,
        "num_labels": num_labels,
    }
    if write:
        files.makedirs(out)
        target = os.path.join(out, vocab_name)
        if files.absolute(tokenizer.vocab_file) != files.absolute(target):
            files.copy(tokenizer.vocab_file, target)
        files.atomic_write(
            os.path.join(out, "config.json"), json.dumps(config_json, indent=2).encode("utf-8")
        )
    return {"config": config_json, "vocab_sha256": input_pipeline.file_digest(tokenizer.vocab_file)}


def _param_shardings(config, architecture, num_labels, mesh, rules) -> Params:
    abstract = models.abstract_model(config, model_class(architecture, num_labels))
    _, params = models.split_params(abstract)
    return sharding.tree_shardings(models.param_logical_axes(abstract), params, mesh, rules)


def _prune(tree: Params, like: Params) -> Params:
    """`tree` restricted to the keys of `like`."""
    if not isinstance(like, Mapping):
        return tree
    return {k: _prune(tree[k], v) for k, v in like.items()}
