"""A model as an ONNX file, through the Hugging Face PyTorch model of the same weights.

    python -m bert_jax.convert export-onnx SOURCE OUT_DIR [--architecture ...]

OUT_DIR holds `model.onnx` (batch and length dynamic; multiple choice also the choices; with
`--int8` also `model.int8.onnx`, ONNX Runtime's dynamic int8 quantization of it),
`meta.json` (architecture, input and output names as in export-stablehlo, the tokenizer) and the
tokenizer's vocabulary file. Any ONNX runtime runs it; `onnxruntime` checks it before anything
is written.

Why through PyTorch: jax2onnx (0.12.5, and 0.17.1, whose metadata also pins an orbax-checkpoint
older than ours) fails on jax 0.10 with symbolic batch and length ('_DynamicDimSentinel' object
has no attribute 'rmax', at the position ids); the `transformers` BERT/ALBERT models hold the
same weights under the names `export-hf` writes and are what the ONNX field exports. The
TorchScript exporter is used: the dynamo exporter of torch 2.13 gave wrong outputs for
transformers' BERT (max error 2.9 on unit-scale outputs). Every export is checked against
bert_jax's own forward pass at two shapes other than the traced one; a mismatch writes nothing.

Needs `pip install -r requirements-export.txt` (torch, transformers, onnx, onnxruntime).
"""

import io
import json
import os
import tempfile

import jax
import numpy as np

from bert_jax import files, models
from bert_jax.convert.names import config_to_hf, family, model_class, params_to_hf
from bert_jax.convert.stablehlo import (
    INPUTS,
    Pooled,
    _head,
    _outputs,
    embedding_head,
    fresh_output,
    output_names,
    pooled_meta,
)
from bert_jax.models import registry

# The export-time check: ONNX Runtime against bert_jax in fp32 (the test asks 1e-5), and the
# int8 file against bert_jax's float outputs: a bound that rounding passes and a broken
# quantization does not (a fraction of the outputs' largest magnitude).
TOLERANCE = 1e-4
INT8_TOLERANCE = 0.1


def _imports():
    try:
        import onnxruntime
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(
            f"export-onnx converts through the Hugging Face PyTorch model and checks the file "
            f"with onnxruntime ({e}); install them: pip install -r requirements-export.txt"
        ) from e
    return torch, transformers, onnxruntime


def _torch_model(torch, transformers, params, config, architecture, num_labels, head):
    """The `transformers` model holding `params`, wrapped to bert_jax's inputs and outputs."""
    hf_config = config_to_hf(config, architecture, num_labels)
    hf_config = transformers.AutoConfig.for_model(**hf_config)
    model = getattr(transformers, architecture)(hf_config)
    state = {k: torch.from_numpy(v) for k, v in params_to_hf(params, config, architecture).items()}
    bare = head == "Model" or isinstance(head, Pooled)
    if bare:  # a bare encoder's names have no prefix; the pooler may be absent
        pooled = "pooler.dense.weight" in state or "pooler.weight" in state
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()  # the MLM decoder is the word embeddings (and the output bias)
    tensors = model.state_dict(keep_vars=True)
    loaded = {tensors[k].data_ptr() for k in state if k in tensors}
    missing = [
        k
        for k in missing
        if tensors[k].data_ptr() not in loaded
        and "position_ids" not in k
        and not k.startswith("pooler")
    ]
    if missing or unexpected:
        raise ValueError(
            f"the {architecture} of transformers {transformers.__version__} does not hold these "
            f"weights (missing {missing[:4]}, unexpected {unexpected[:4]}); export the "
            f"StableHLO artifact instead (export-stablehlo)"
        )
    model.eval()

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, input_mask, segment_ids):
            types = {}
            if config.model_type != "modernbert":  # ModernBERT takes no token types
                # RoBERTa's one token type, as bert_jax reads it.
                one_type = config.type_vocab_size == 1
                types["token_type_ids"] = torch.zeros_like(segment_ids) if one_type else segment_ids
            out = self.model(input_ids=input_ids, attention_mask=input_mask, **types)
            if isinstance(head, Pooled):
                return (_torch_pool(torch, out.last_hidden_state, input_mask, head),)
            if head == "Model":
                sequence = out.last_hidden_state
                if pooled:
                    return sequence, out.pooler_output
                return sequence, torch.zeros_like(sequence[:, 0])
            if head == "ForQuestionAnswering":
                return out.start_logits, out.end_logits
            return (out.logits,)

    return Exported().eval()


def _torch_pool(torch, hidden, mask, pooled: Pooled):
    """`models.pooling.pool` in the exported graph (no prompt: every real token pooled)."""
    weight = mask.unsqueeze(-1).to(hidden.dtype)
    count = weight.sum(1).clamp(min=1e-9)
    vectors = []
    for mode in pooled.modes:
        if mode == "cls":
            vectors.append(hidden[:, 0])
        elif mode == "max":
            vectors.append(hidden.masked_fill(weight == 0, float("-inf")).max(1).values)
        elif mode == "mean":
            vectors.append((hidden * weight).sum(1) / count)
        elif mode == "mean_sqrt_len_tokens":
            vectors.append((hidden * weight).sum(1) / count.sqrt())
        elif mode == "weightedmean":
            positions = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype)
            weights = weight * positions.view(1, -1, 1)
            vectors.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9))
        else:  # lasttoken
            last = (mask.sum(1) - 1).clamp(min=0)
            vectors.append(hidden[torch.arange(hidden.shape[0]), last])
    out = torch.cat(vectors, dim=-1)
    return torch.nn.functional.normalize(out, dim=-1, eps=1e-12) if pooled.normalize else out


def _inputs(shape, vocab_size, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, shape).astype(np.int64)
    mask = np.ones(shape, np.int64)
    mask[..., shape[-1] - shape[-1] // 3 :] = 0  # a padded tail
    segments = (np.arange(shape[-1]) >= shape[-1] // 3).astype(np.int64) * mask
    return ids * mask, mask, segments


def _bert_jax(params, config, architecture, num_labels, head, inputs):
    graphdef, _ = models.split_params(
        models.abstract_model(config, model_class(architecture, num_labels))
    )
    model = models.merge_params(graphdef, params)
    arrays = [np.asarray(x, np.int32) for x in inputs]
    return [np.asarray(x) for x in _outputs(head, model(*arrays), arrays[1])]


def _check(session, params, config, architecture, num_labels, head, shapes, tolerance, fate):
    """The largest difference of the ONNX session's outputs from bert_jax's at `shapes`;
    a ValueError (ending with `fate`) when one exceeds `tolerance` x the outputs' scale."""
    worst = 0.0
    for seed, shape in enumerate(shapes):
        inputs = _inputs(shape, config.vocab_size, seed + 1)
        # Every input the graph takes (a model without token types has no segment_ids).
        taken = {i.name for i in session.get_inputs()}
        feed = {k: v for k, v in zip(INPUTS, inputs, strict=True) if k in taken}
        got = session.run(None, feed)
        want = _bert_jax(params, config, architecture, num_labels, head, inputs)
        for name, g, w in zip(output_names(head), got, want, strict=True):
            error = float(np.max(np.abs(g - w))) if g.shape == w.shape else float("inf")
            if error > tolerance * max(1.0, float(np.max(np.abs(w)))):
                raise ValueError(
                    f"the ONNX {architecture}'s {name} differs from bert_jax's by {error:.2e} "
                    f"at shape {shape} (shapes {g.shape} vs {w.shape}); {fate}. Export the "
                    f"StableHLO artifact instead (export-stablehlo), and report this"
                )
            worst = max(worst, error)
    return worst


def _traced(torch, module, traced, dims, head, opset, vocab_size) -> io.BytesIO:
    """The ONNX program of `module` traced at shape `traced`, every axis in `dims` dynamic."""
    buffer, dynamic = io.BytesIO(), dict(enumerate(dims))
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(x) for x in _inputs(traced, vocab_size, 0)),
            buffer,
            input_names=list(INPUTS),
            output_names=list(output_names(head)),
            dynamic_axes={name: dynamic for name in (*INPUTS, *output_names(head))},
            opset_version=opset,
            dynamo=False,
        )
    return buffer


def _write_int8(onnxruntime, model: bytes, check: tuple, output: str) -> float:
    """Writes `model.int8.onnx`, `model` through ONNX Runtime's dynamic quantization, once
    its outputs are within INT8_TOLERANCE; returns its largest difference."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ONNX Runtime reads and writes local files: quantized in a scratch folder, then
    # published whole to the output (a folder or a bucket).
    with tempfile.TemporaryDirectory() as scratch:
        source, part = os.path.join(scratch, "model.onnx"), os.path.join(scratch, "int8.onnx")
        with open(source, "wb") as f:
            f.write(model)
        quantize_dynamic(source, part, per_channel=True, weight_type=QuantType.QInt8)
        quantized = onnxruntime.InferenceSession(part, providers=["CPUExecutionProvider"])
        error = _check(quantized, *check, INT8_TOLERANCE, "model.int8.onnx was not written")
        files.copy(part, os.path.join(output, "model.int8.onnx"))
    return error


def export_onnx(
    params: models.Params,
    config: models.BertConfig,
    architecture: str,
    num_labels: int,
    tokenizer,
    output: str,
    opset: int = 17,
    int8: bool = False,
    pooled: Pooled | None = None,
) -> dict:
    """Writes `output` (see the module doc) and returns its meta.json, with the check's
    largest difference from bert_jax under "max_abs_error".

    `int8`: also `model.int8.onnx`, the file through ONNX Runtime's dynamic quantization
    (int8 weights per output channel, activations quantized as they run; ONNX Runtime's
    VNNI/AVX-512 int8 kernels), its difference from bert_jax's float outputs under
    "int8_max_abs_error" (refused over INT8_TOLERANCE of the outputs' largest magnitude).
    `pooled`: the encoder as a sentence-embedding model (pooling and normalization in the
    graph, checked against bert_jax's like every output)."""
    architecture = registry.architecture(family(config), _head(architecture))
    head = embedding_head(_head(architecture), pooled)
    fresh_output(output)
    torch, transformers, onnxruntime = _imports()
    params = jax.device_get(params)
    module = _torch_model(torch, transformers, params, config, architecture, num_labels, head)
    choices = head == "ForMultipleChoice"
    dims = ("batch", "choices", "length") if choices else ("batch", "length")
    traced = (2, 2, 8) if choices else (2, 8)
    buffer = _traced(torch, module, traced, dims, head, opset, config.vocab_size)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    limit = config.max_length
    shapes = [(1, 3, limit) if choices else (3, limit), traced[:-1] + (5,)]
    check = (params, config, architecture, num_labels, head, shapes)
    worst = _check(session, *check, TOLERANCE, "nothing was written")
    files.atomic_write(os.path.join(output, "model.onnx"), buffer.getvalue())
    if int8:
        int8_error = _write_int8(onnxruntime, buffer.getvalue(), check, output)
    vocab = os.path.basename(tokenizer.vocab_file)
    files.copy(tokenizer.vocab_file, os.path.join(output, vocab))
    meta = {
        "architecture": architecture,
        "num_labels": num_labels,
        "inputs": [i.name for i in session.get_inputs()],  # no segment_ids: one token type
        "input_shape": ", ".join(dims),
        "input_dtype": "int64",
        "max_length": limit,
        "outputs": list(output_names(head)),
        **pooled_meta(head),
        "opset": opset,
        "tokenizer": {"vocab_file": vocab, "do_lower_case": tokenizer.do_lower_case},
        "max_abs_error": worst,
        **({"int8_file": "model.int8.onnx", "int8_max_abs_error": int8_error} if int8 else {}),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    files.atomic_write(
        os.path.join(output, "meta.json"), (json.dumps(meta, indent=2) + "\n").encode()
    )
    return meta
