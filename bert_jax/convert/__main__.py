"""python -m bert_jax.convert: whole models between formats.

python -m bert_jax.convert import-hf  HF_DIR   OUT_WORKDIR
python -m bert_jax.convert import-tf  TF_DIR   OUT_WORKDIR
python -m bert_jax.convert export-hf  WORKDIR  OUT_HF_DIR [--step N]
python -m bert_jax.convert export-stablehlo  SOURCE  OUT_DIR [--architecture A --num_labels N]
    [--pooling mean --normalize]
python -m bert_jax.convert export-onnx  SOURCE  OUT_DIR [--architecture A --num_labels N]
    [--int8] [--pooling mean --normalize]
python -m bert_jax.convert export-sentence-transformers  SOURCE  OUT_DIR [--pooling mean
    --normalize --max_seq_length N --prompt query="query: "]
python -m bert_jax.convert quantize  SOURCE  OUT_WORKDIR [--mode int8|int8-dynamic|none]
    [--architecture A --num_labels N]
    (SOURCE: a bert_jax run, or hf:/tf: released weights; see bert_jax/convert/stablehlo.py
    and bert_jax/convert/onnx_export.py)

Errors print one line (exit 2 for bad input, 1 otherwise); add --verbose for the traceback.
"""

import argparse
import dataclasses
import functools
import os
import warnings

import jax

from bert_jax import cli, files, models, sharding
from bert_jax.convert import sentence_transformers as st
from bert_jax.convert.names import model_class
from bert_jax.convert.onnx_export import export_onnx
from bert_jax.convert.runs import (
    load_pretrained,
    load_run,
    model_kind,
    overlay,
    read_run,
    write_run,
)
from bert_jax.convert.sources import export_hf, read_hf_dir, read_json, read_tf_checkpoint
from bert_jax.convert.stablehlo import Pooled, export_stablehlo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bert_jax.convert", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("source")
        p.add_argument("output")
        if name == "export-hf":
            p.add_argument("--step", type=int, default=None, help="default: the latest")
        if name == "quantize":
            p.add_argument(
                "--mode",
                default="int8",
                choices=models.layers.QUANTIZATION,
                help="int8: int8 weights, float matmuls; int8-dynamic: int8 matmuls too; "
                "none: the float weights an int8 model computes with",
            )
        if name == "export-onnx":
            p.add_argument(
                "--int8",
                action="store_true",
                help="also model.int8.onnx: ONNX Runtime's dynamic int8 quantization of it",
            )
        if name == "export-sentence-transformers":
            _sentence_transformers_flags(p)
        if name in ("export-stablehlo", "export-onnx", "quantize"):
            p.add_argument(
                "--architecture", default="", help="default: a run's own; BertModel otherwise"
            )
            p.add_argument("--num_labels", type=int, default=0, help="default: a run's own")
        if name in ("export-stablehlo", "export-onnx"):
            p.add_argument("--pooling", default="", help="comma-separated modes: the encoder "
                           "as a sentence-embedding model (a sentence-transformers folder or "
                           "an embed: run: its own)")  # fmt: skip
            p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    return parser


def _sentence_transformers_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pooling", default="", help="comma-separated modes (default: the "
                   "source folder's, else mean)")  # fmt: skip
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max_seq_length", type=int, default=0, help="default: the source's")
    p.add_argument("--prompt", action="append", default=[], help='a named prompt, query="query: "')


def export_sentence_transformers(args, mesh, mesh_config) -> None:
    """A model (a sentence-transformers folder, hf:, a bert_jax workdir) with its pooling as
    a sentence-transformers folder."""
    del mesh_config
    modes = args.pooling.split(",") if args.pooling else None
    spec = st.embedding_spec(args.source, modes, args.normalize)
    prompts = dict(spec.prompts)
    for item in args.prompt:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f'--prompt={item!r}: write NAME="TEXT", e.g. query="query: "')
        prompts[name] = text
    spec = dataclasses.replace(spec, prompts=prompts)
    if args.max_seq_length:
        spec = dataclasses.replace(spec, max_seq_length=args.max_seq_length)
    loaded = load_pretrained(spec.model, "BertModel", mesh=mesh)
    if loaded.config.length_problem(spec.max_seq_length or 0):
        raise ValueError(loaded.config.length_problem(spec.max_seq_length))
    params = jax.device_get(loaded.params)
    st.write_folder(params, loaded.config, loaded.tokenizer, spec, args.output)
    print(
        f"wrote {loaded.description} to {args.output} as a sentence-transformers model "
        f"({'+'.join(spec.pooling)} pooling{', normalized' * spec.normalize})"
    )


def _load_model(args, mesh, **mode):
    """(the model a source holds with its head, the source's run record or {}, architecture,
    num_labels) for the exports and quantize."""
    kind, path = model_kind(args.source)
    run = read_run(path) if kind == "bert_jax" else {}
    architecture = args.architecture or run.get("architecture", "BertModel")
    num_labels = args.num_labels or run.get("num_labels", 2)
    loaded = load_pretrained(args.source, architecture, mesh=mesh, num_labels=num_labels, **mode)
    if loaded.report.missing:
        raise ValueError(
            f"{args.source} has no weights for {architecture}'s {loaded.report.missing[:4]}: "
            f"export the architecture it holds (--architecture; a run records its own)"
        )
    return loaded, path if run else None, architecture, num_labels


def quantize(args, mesh, mesh_config) -> None:
    del mesh_config
    if files.exists(os.path.join(args.output, "checkpoints")):
        raise FileExistsError(
            f"{args.output} already holds checkpoints; choose a new output directory"
        )
    loaded, run_path, architecture, num_labels = _load_model(args, mesh, quantization=args.mode)
    params = jax.device_get(loaded.params)
    # A fine-tuned run's task and label names go with it (tools.predict reads them).
    extra = read_json(os.path.join(run_path, "config.json")) if run_path else {}
    extra["quantized_from"] = args.source
    write_run(
        args.output, loaded.config, architecture, num_labels, params, loaded.tokenizer, extra=extra
    )
    print(
        f"wrote {architecture} of {loaded.description} to {args.output}: weights "
        f"{models.param_bytes(params) / 2**20:.1f} MiB ({args.mode})"
    )


def _pooled(args) -> tuple[str, object]:
    """(the source to load, the `Pooled` output or None): a sentence-transformers folder and
    an `embed:` run export as embedding models with their pooling; --pooling makes any
    encoder one."""
    kind, path = model_kind(args.source)
    recorded = kind == "bert_jax" and read_run(path).get("pooling")
    if not (args.pooling or args.normalize or st.is_folder(path) or recorded):
        return args.source, None
    spec = st.embedding_spec(args.source, args.pooling.split(",") if args.pooling else None,
                             args.normalize)  # fmt: skip
    if not spec.include_prompt:
        raise ValueError(
            f"{args.source} leaves its prompt out of the pooling (include_prompt=false): the "
            f"exported graph pools every token it is given; export it with the prompt pooled "
            f"(export-sentence-transformers to change the folder) or embed with bert_jax"
        )
    return spec.model, Pooled(spec.pooling, spec.normalize)


def export_program(args, mesh, mesh_config) -> None:
    """export-stablehlo and export-onnx."""
    del mesh_config
    source, pooled = _pooled(args)
    loaded, _, architecture, num_labels = _load_model(
        argparse.Namespace(**{**vars(args), "source": source}), mesh
    )
    onnx = args.command == "export-onnx"
    export = functools.partial(export_onnx, int8=args.int8) if onnx else export_stablehlo
    meta = export(
        jax.device_get(loaded.params),
        loaded.config,
        architecture,
        num_labels,
        loaded.tokenizer,
        args.output,
        pooled=pooled,
    )
    how = (
        f"{args.output}/model.onnx in any ONNX runtime (checked with onnxruntime: at most "
        f"{meta['max_abs_error']:.1e} from bert_jax)"
        if onnx
        else f"{args.output}/run_exported.py (jax, numpy and flatbuffers only)"
    )
    if "int8_file" in meta:
        how += (
            f"; int8: {args.output}/model.int8.onnx (at most "
            f"{meta['int8_max_abs_error']:.1e} from bert_jax's float outputs)"
        )
    print(
        f"wrote {meta['architecture']} of {loaded.description} to {args.output} as "
        f"[{meta['input_shape']}] -> {', '.join(meta['outputs'])}; run it with {how}"
    )


def export_hugging_face(args, mesh, mesh_config) -> None:
    run = read_run(args.source, args.step)
    loaded = load_run(
        args.source,
        run["architecture"],
        run["num_labels"],
        mesh,
        mesh_config.rules,
        {},
        args.step,
    )
    architecture = export_hf(
        jax.device_get(loaded.params),
        loaded.config,
        loaded.tokenizer,
        args.output,
        run["num_labels"],
        run["architecture"],
    )
    print(f"wrote {architecture} of {loaded.description} to {args.output}")


def import_released(args, mesh, mesh_config) -> None:
    """import-hf and import-tf: released weights as a bert_jax workdir."""
    del mesh_config
    prefix = "hf" if args.command == "import-hf" else "tf"
    source = (
        read_hf_dir(args.source, args.output) if prefix == "hf" else read_tf_checkpoint(args.source)
    )
    loaded = load_pretrained(
        f"{prefix}:{args.source}",
        source.architecture,
        mesh=mesh,
        num_labels=source.num_labels,
        scratch_dir=args.output,
    )
    if loaded.report.missing:
        warnings.warn(loaded.report.describe(args.source), stacklevel=1)
        full = models.split_params(
            models.create_model(
                loaded.config, 0, model_class(source.architecture, source.num_labels)
            )
        )[1]
        loaded.params = overlay(full, loaded.params)
    write_run(
        args.output,
        loaded.config,
        source.architecture,
        source.num_labels,
        jax.device_get(loaded.params),
        loaded.tokenizer,
    )
    print(f"wrote {source.architecture} from {source.description} to {args.output}")


# Subcommand -> (help, the function that does it).
COMMANDS = {
    "import-hf": ("Hugging Face model directory -> bert_jax workdir", import_released),
    "import-tf": ("original TF checkpoint directory -> bert_jax workdir", import_released),
    "export-hf": ("bert_jax workdir -> Hugging Face model directory", export_hugging_face),
    "export-stablehlo": (
        "a model -> jax.export (StableHLO) artifact and a loader",
        export_program,
    ),
    "export-onnx": (
        "a model -> ONNX file (through the transformers PyTorch model)",
        export_program,
    ),
    "export-sentence-transformers": (
        "a model and a pooling -> sentence-transformers folder",
        export_sentence_transformers,
    ),
    "quantize": ("a model -> bert_jax workdir with int8 (or float) weights", quantize),
}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    mesh_config = sharding.MeshConfig(data=1)
    mesh = sharding.make_mesh(mesh_config, jax.devices()[:1])
    COMMANDS[args.command][1](args, mesh, mesh_config)


if __name__ == "__main__":
    cli.run(main)
