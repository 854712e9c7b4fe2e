r"""ModernBERT on a CPU: bert_jax against `transformers`' ModernBertModel on one mixed-length
batch, and bert_jax padded against bert_jax packed.

    python benchmarks/modernbert.py [--rounds=3] [--layers=22] [--out=benchmarks/results/modernbert]

The model is ModernBERT-base-shaped (hidden 768, 12 heads, GeGLU 1,152, vocabulary 50,368,
global attention every third layer, a local window of 128; `--layers` of the 22, random
weights: nothing can be downloaded here), the same weights on every side (bert_jax's export,
loaded by `transformers`). The batch: `--sequences` texts whose lengths are drawn like real
text (log-normal, median 180 tokens, clipped to 16..1,024), seeded. Sides:
- `torch padded`: `transformers.ModernBertModel`, eager PyTorch, its default attention on a
  CPU (SDPA), the batch padded to its longest text, `inference_mode` (forward) / a masked-LM
  loss's backward (train step, `ModernBertForMaskedLM`, 30% of the real tokens predicted);
- `bert_jax padded`: the jitted forward / train step (grad of the same loss) on the same
  padded batch;
- `bert_jax packed`: the texts packed into rows of 1,024 (first fit, longest first), each
  row's examples apart (`models.Packing`): the same tokens without padding.
Throughput counts real tokens only. Each figure is the median over `--rounds` rounds, the
sides alternating within a round, after a warm-up call (compilation excluded).
"""

import argparse
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
ROW = 1024


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(np.log(180), 0.8, n), 16, ROW).round()]


def batches(sizes: list[int], vocab: int, seed: int = 1) -> dict:
    """The texts padded (ids, mask) and packed (ids, example ids, positions, [CLS] places), and
    the same 30% of each text's tokens to predict in both layouts (positions, weights)."""
    rng = np.random.default_rng(seed)
    texts = [rng.integers(5, vocab, n).astype(np.int32) for n in sizes]
    chosen = [np.sort(rng.choice(len(t), max(1, int(0.3 * len(t))), replace=False)) for t in texts]
    rows: list[list[int]] = []
    for i in sorted(range(len(texts)), key=lambda i: -len(texts[i])):
        fits = [r for r in rows if sum(len(texts[j]) for j in r) + len(texts[i]) <= ROW]
        fits[0].append(i) if fits else rows.append([i])
    layouts = {"padded": [[i] for i in range(len(texts))], "packed": rows}
    out = {}
    for name, groups in layouts.items():
        width = max(sizes) if name == "padded" else ROW
        preds = max(sum(len(chosen[i]) for i in g) for g in groups)
        a = {
            "ids": np.zeros((len(groups), width), np.int32),
            "example_ids": np.zeros((len(groups), width), np.int32),
            "positions": np.zeros((len(groups), width), np.int32),
            "cls": np.zeros((len(groups), max(len(g) for g in groups)), np.int32),
            "predict": np.zeros((len(groups), preds), np.int32),
            "weights": np.zeros((len(groups), preds), np.float32),
        }
        for r, members in enumerate(groups):
            start, p = 0, 0
            for e, i in enumerate(members):
                n, c = len(texts[i]), chosen[i]
                a["ids"][r, start : start + n] = texts[i]
                a["example_ids"][r, start : start + n] = e + 1
                a["positions"][r, start : start + n] = np.arange(n)
                a["cls"][r, e] = start
                a["predict"][r, p : p + len(c)] = start + c
                a["weights"][r, p : p + len(c)] = 1.0
                start, p = start + n, p + len(c)
        a["mask"] = (a["example_ids"] > 0).astype(np.int32)
        out[name] = a
    return out


def build(layers: int, directory: str, sizes: list[int]):
    """{side: (forward(), train_step())} on the benchmark's batch."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    import transformers

    from bert_jax import convert, models
    from bert_jax.data.tokenization import WordPieceTokenizer

    config = models.BertConfig.named("modernbert_base", num_hidden_layers=layers)
    cls = models.BertForMaskedLM
    graphdef, params = models.split_params(models.create_model(config, 0, cls))
    vocab = os.path.join(directory, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n")
    tokenizer = WordPieceTokenizer(vocab)
    hf_dir = os.path.join(directory, "hf")
    convert.export_hf(jax.device_get(params), config, tokenizer, hf_dir, 2, "ModernBertForMaskedLM")
    torch_model = transformers.ModernBertForMaskedLM.from_pretrained(hf_dir).eval()
    torch_model.sparse_prediction = True  # logits at the predicted tokens only, as bert_jax's
    data = batches(sizes, config.vocab_size)

    def mlm_loss(p, b, pack):
        model = models.merge_params(graphdef, p)
        ids = b["ids"]
        logits, _ = model(ids, b["mask"], jnp.zeros_like(ids), b["predict"], packing=pack)
        labels = jnp.take_along_axis(ids, b["predict"], axis=1)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(loss * b["weights"]) / jnp.sum(b["weights"])

    def encode(p, b, pack):
        model = models.merge_params(graphdef, p)
        return model.bert(b["ids"], b["mask"], jnp.zeros_like(b["ids"]), packing=pack)

    forward = jax.jit(lambda p, b, pack: encode(p, b, pack).sequence_output)
    grad = jax.jit(jax.grad(mlm_loss))
    sides = {}
    for name, b in data.items():
        pack = None
        if name == "packed":
            pack = models.Packing(*(jnp.asarray(b[k]) for k in ("example_ids", "positions", "cls")))
        b = {k: v for k, v in b.items() if k not in ("example_ids", "positions", "cls")}
        sides[f"bert_jax {name}"] = (
            lambda b=b, pack=pack: forward(params, b, pack).block_until_ready(),
            lambda b=b, pack=pack: jax.block_until_ready(grad(params, b, pack)),
        )
    padded = data["padded"]
    labels = np.full(padded["ids"].shape, -100)
    for r in range(len(labels)):
        chosen = padded["predict"][r][padded["weights"][r] > 0]
        labels[r, chosen] = padded["ids"][r, chosen]
    t_ids, t_mask, t_labels = (
        torch.tensor(a, dtype=torch.long) for a in (padded["ids"], padded["mask"], labels)
    )

    def torch_forward():
        with torch.inference_mode():
            torch_model.model(input_ids=t_ids, attention_mask=t_mask)

    def torch_train():
        torch_model.zero_grad()
        torch_model(input_ids=t_ids, attention_mask=t_mask, labels=t_labels).loss.backward()

    sides["torch padded"] = (torch_forward, torch_train)
    return sides


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/modernbert"))
    args = parser.parse_args()
    sizes = lengths(args.sequences)
    with tempfile.TemporaryDirectory() as directory:
        sides = build(args.layers, directory, sizes)
        times = {(s, k): [] for s in sides for k in ("forward", "train step")}
        for fwd, train in sides.values():  # warm-up: compile, first calls
            fwd(), train()
        for _ in range(args.rounds):
            for s, (fwd, train) in sides.items():
                for kind, call in (("forward", fwd), ("train step", train)):
                    start = time.perf_counter()
                    call()
                    times[(s, kind)].append(time.perf_counter() - start)
    tokens = sum(sizes)
    result = {
        "sequences": len(sizes),
        "real_tokens": tokens,
        "padded_tokens": len(sizes) * max(sizes),
        "layers": args.layers,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seconds": {f"{s} {k}": statistics.median(v) for (s, k), v in times.items()},
    }
    lines = [
        f"ModernBERT-base-shaped ({args.layers} layers), {len(sizes)} texts of 16..1,024 tokens "
        f"({tokens:,} real, {len(sizes) * max(sizes):,} padded), median of {args.rounds} rounds",
        "",
        "| side | forward tokens/s | vs torch | train step tokens/s | vs torch |",
        "|---|---|---|---|---|",
    ]
    base = {k: result["seconds"][f"torch padded {k}"] for k in ("forward", "train step")}
    for s in sides:
        cells = []
        for kind in ("forward", "train step"):
            seconds = result["seconds"][f"{s} {kind}"]
            cells += [f"{tokens / seconds:,.0f}", f"{base[kind] / seconds:.2f}x"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
