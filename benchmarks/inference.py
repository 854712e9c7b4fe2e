r"""Classification forward on CPU: bert_jax against PyTorch (fp32, bf16) and ONNX Runtime.

    python benchmarks/inference.py [--rounds=3] [--out=benchmarks/results/inference]

One model, a 6-layer x 384 BERT sequence classifier (MiniLM-L6-H384's shape, 30,522 pieces,
random weights: nothing can be downloaded here), in each runtime:
- `bert_jax fp32`: the jitted forward pass (`models.BertForSequenceClassification`);
- `bert_jax bf16`: the same with `dtype="bfloat16"` (fp32 weights, bf16 compute);
- `bert_jax int8`: int8 weights (`models.quantize`), dequantized into fp32 matmuls;
  `bert_jax int8-dynamic`: int8 weights and each matmul's input quantized per row as it runs,
  int8 x int8 products with int32 sums (qwix's dot_general);
- `torch fp32` / `torch bf16`: `transformers.BertForSequenceClassification` from the same
  weights (`export-hf`), eager, `inference_mode`, SDPA attention; bf16 as `model.to(bf16)`;
- `onnxruntime fp32`: the file `python -m bert_jax.convert export-onnx` writes, default
  session options (all graph optimizations); `onnxruntime int8`: the `model.int8.onnx` that
  `export-onnx --int8` writes beside it (ONNX Runtime's dynamic quantization: int8 weights
  per output channel, activations quantized as they run).
Shapes: batch 1 x 128 (latency) and batch 32 x 128 (throughput), every token real. Each
measurement is the median over `--rounds` rounds, the runtimes alternating within a round,
after warm-up calls (compilation excluded). Accuracy cost: the largest difference of each
runtime's logits from bert_jax fp32's on the batch of 32.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {"batch 1": (1, 128), "batch 32": (32, 128)}
CALLS = {"batch 1": 40, "batch 32": 4}


def build(directory: str):
    """The runtimes as {name: forward(ids, mask, segments) -> logits (numpy)}."""
    import jax
    import onnxruntime
    import torch
    import transformers

    from bert_jax import models
    from bert_jax.convert import export_hf
    from bert_jax.convert.onnx_export import export_onnx
    from bert_jax.data.tokenization import WordPieceTokenizer

    config = models.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
    )
    params = models.split_params(
        models.create_model(config, 0, models.BertForSequenceClassification)
    )[1]
    vocab = os.path.join(directory, "vocab.txt")
    with open(vocab, "w") as f:
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        f.write("\n".join(special + [f"w{i}" for i in range(30522 - 5)]) + "\n")
    tokenizer = WordPieceTokenizer(vocab)
    hf_dir = os.path.join(directory, "hf")
    export_hf(params, config, tokenizer, hf_dir, 2, "BertForSequenceClassification")
    onnx_dir = os.path.join(directory, "onnx")
    export_onnx(params, config, "BertForSequenceClassification", 2, tokenizer, onnx_dir, int8=True)

    runtimes = {}
    cls = models.BertForSequenceClassification
    for name, dtype, quantization in (
        ("bert_jax fp32", "float32", "none"),
        ("bert_jax bf16", "bfloat16", "none"),
        ("bert_jax int8", "float32", "int8"),
        ("bert_jax int8-dynamic", "float32", "int8-dynamic"),
    ):
        run_params, run_config = models.quantize(
            params, dataclasses.replace(config, dtype=dtype), quantization, cls
        )
        graphdef = models.split_params(models.abstract_model(run_config, cls))[0]
        forward = jax.jit(lambda p, i, m, s, g=graphdef: models.merge_params(g, p)(i, m, s)[0])
        runtimes[name] = lambda i, m, s, f=forward, p=run_params: np.asarray(
            f(p, i, m, s).astype(np.float32)
        )
    torch.set_num_threads(os.cpu_count())
    for name, dtype in (("torch fp32", torch.float32), ("torch bf16", torch.bfloat16)):
        model = transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval()
        model = model.to(dtype)

        def run(i, m, s, model=model):
            with torch.inference_mode():
                out = model(
                    input_ids=torch.from_numpy(i).long(),
                    attention_mask=torch.from_numpy(m).long(),
                    token_type_ids=torch.from_numpy(s).long(),
                ).logits
            return out.float().numpy()

        runtimes[name] = run
    for name, path in (
        ("onnxruntime fp32", os.path.join(onnx_dir, "model.onnx")),
        ("onnxruntime int8", os.path.join(onnx_dir, "model.int8.onnx")),
    ):
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        runtimes[name] = lambda i, m, s, session=session: session.run(
            None,
            {"input_ids": i.astype(np.int64), "input_mask": m.astype(np.int64),
             "segment_ids": s.astype(np.int64)},
        )[0]  # fmt: skip
    return runtimes


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 30522, shape).astype(np.int32)
    ids[:, 0] = 2
    mask = np.ones(shape, np.int32)
    segments = (np.arange(shape[1]) >= shape[1] // 2).astype(np.int32) * mask
    return ids, mask, segments


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/inference")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = build(tmp)
        batches = {label: inputs(shape) for label, shape in SHAPES.items()}
        for forward in runtimes.values():  # warm-up: compiles, allocator pools, caches
            for batch in batches.values():
                for _ in range(2):
                    forward(*batch)
        times = {label: {name: [] for name in runtimes} for label in SHAPES}
        for r in range(args.rounds):
            for label, batch in batches.items():
                for name, forward in runtimes.items():
                    start = time.perf_counter()
                    for _ in range(CALLS[label]):
                        forward(*batch)
                    times[label][name].append((time.perf_counter() - start) / CALLS[label])
            print(f"round {r + 1} of {args.rounds} done", flush=True)
        reference = runtimes["bert_jax fp32"](*batches["batch 32"])
        error = {
            name: float(np.max(np.abs(f(*batches["batch 32"]) - reference)))
            for name, f in runtimes.items()
        }
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": "BERT 6 x 384, 12 heads, 30,522 pieces, sequence classifier; random weights",
        "seconds_per_call": {
            label: {name: statistics.median(ts) for name, ts in by.items()}
            for label, by in times.items()
        },
        "max_abs_logit_difference_from_bert_jax_fp32": error,
        "runs": times,
    }
    torch_fp32 = {label: by["torch fp32"] for label, by in result["seconds_per_call"].items()}
    result["speed_vs_torch_fp32"] = {
        label: {name: torch_fp32[label] / t for name, t in by.items()}
        for label, by in result["seconds_per_call"].items()
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "| runtime | batch 1 x 128: ms | vs torch fp32 | batch 32 x 128: ms | vs torch fp32 "
        "| max logit difference |",
        "|---|---|---|---|---|---|",
    ]
    for name in runtimes:
        s, v = result["seconds_per_call"], result["speed_vs_torch_fp32"]
        lines.append(
            f"| {name} | {s['batch 1'][name] * 1e3:.1f} | {v['batch 1'][name]:.2f}x "
            f"| {s['batch 32'][name] * 1e3:.0f} | {v['batch 32'][name]:.2f}x "
            f"| {error[name]:.1e} |"
        )
    table = "\n".join(lines)
    with open(args.out + ".md", "w") as f:
        f.write(f"{result['model']}; {result['machine']}; medians of {args.rounds} rounds\n\n")
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
