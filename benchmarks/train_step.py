r"""The pretraining train step of bert_jax against its peers, measured side by side.

    python benchmarks/train_step.py                           # the CPU suite, all peers
    python benchmarks/train_step.py --configs=bert_base:128:8 --peers=torch
    python benchmarks/train_step.py --dtype=bfloat16 --configs=bert_large:512:16   # a GPU

For each configuration (`name:sequence length:batch`): compile time, median step time over
`--rounds` x `--steps_per_round` timed steps after warm-up, tokens/s, achieved FLOP/s and MFU, for
- bert_jax (`bert_jax.training`'s jitted step: MLM gathered at the masked positions + NSP, AdamW
  with clipping and weight decay, dropout 0.1 as in BERT pretraining);
- Hugging Face `FlaxBertForPreTraining` (`FlaxAlbertForPreTraining` for ALBERT; transformers
  4.x, the last line with Flax) with the same loss and optax AdamW, jitted with donated state,
  run by the Python of a separate environment (`--flax_python`; its pins conflict with ours:
  see `benchmarks/requirements-flax-peer.txt`);
- Hugging Face PyTorch `BertForPreTraining` (`AlbertForPreTraining` for ALBERT; SDPA attention,
  torch.optim.AdamW, eager; on CUDA where there is a GPU).
All are built from configs (random weights), on the same random batch, in float32 unless
`--dtype` says otherwise. Each framework runs in a worker process of its own that compiles
once; the driver then asks the workers in turn for `--steps_per_round` steps, A B C A B C,
so that machine drift falls on all alike, and reports the ratio bert_jax / peer in tokens/s.

FLOPs per sequence (training = 3 x forward): 3 [2 N S + 4 L S^2 d + 2 P (d e + e V)], N the
non-embedding matmul parameters (12 L d^2), S the length, L layers, d hidden, e the embedding
size (d for BERT), V vocabulary, P the masked positions (bidirectional attention: not halved).
This counts the useful work only: a peer that computes vocabulary logits at every position does
more arithmetic for the same result. Peak FLOP/s: the published dense peak of a GPU/TPU
(`--peak_tflops` or the table below); on a CPU, measured in the same run by a large float32
matrix product in JAX.

`--compile_pair=bert_base,bert_large` also times the compile of both train steps (fresh jit,
A B A B): scanning the layers keeps the deeper model's compile time near the shallower one's.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Published dense peaks (FLOP/s) by device kind and compute dtype.
PEAKS = {
    ("H100", "bfloat16"): 989e12,
    ("H200", "bfloat16"): 989e12,
    ("A100", "bfloat16"): 312e12,
    ("H100", "float32"): 67e12,
    ("H200", "float32"): 67e12,
    ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
}
SIZES = {  # layers, hidden, heads, intermediate, embedding size, sharing
    "tiny": (2, 128, 2, 512, 128, "none"),
    "bert_base": (12, 768, 12, 3072, 768, "none"),
    "bert_large": (24, 1024, 16, 4096, 1024, "none"),
    "albert_base": (12, 768, 12, 3072, 128, "all"),
}
VOCAB = 30522
DEFAULT_CONFIGS = "tiny:128:8,bert_base:128:8,albert_base:128:8,bert_base:512:2"


def predictions(length: int) -> int:
    """Masked positions per sequence: BERT's 20 at 128 and 80 at 512 (15% rounded up to 4)."""
    return -(-int(0.15 * length) // 4) * 4


def flops_per_sequence(size: str, length: int) -> float:
    layers, d, _, _, e, _ = SIZES[size]
    n = 12 * layers * d * d
    p = predictions(length)
    return 3 * (2 * n * length + 4 * layers * length**2 * d + 2 * p * (d * e + e * VOCAB))


def make_batch(batch_size: int, length: int) -> dict:
    """Random token ids, full-length sequences, P masked positions spread over the sequence."""
    import numpy as np

    rng = np.random.default_rng(0)
    p = predictions(length)
    positions = np.sort(
        np.stack(
            [rng.choice(np.arange(1, length - 1), p, replace=False) for _ in range(batch_size)]
        )
    ).astype(np.int32)
    return {
        "input_ids": rng.integers(5, VOCAB, (batch_size, length)).astype(np.int32),
        "input_mask": np.ones((batch_size, length), np.int32),
        "segment_ids": (np.arange(length)[None, :] >= length // 2)
        .repeat(batch_size, 0)
        .astype(np.int32),
        "masked_lm_positions": positions,
        "masked_lm_ids": rng.integers(5, VOCAB, (batch_size, p)).astype(np.int32),
        "masked_lm_weights": np.ones((batch_size, p), np.float32),
        "next_sentence_labels": rng.integers(0, 2, batch_size).astype(np.int32),
    }


def hf_labels(batch: dict):
    """MLM labels in Hugging Face's layout: the target id at masked positions, -100 elsewhere."""
    import numpy as np

    labels = np.full(batch["input_ids"].shape, -100, np.int64)
    np.put_along_axis(labels, batch["masked_lm_positions"], batch["masked_lm_ids"], axis=1)
    return labels


def hf_model(size: str, prefix: str = ""):
    """(model class, config) of the `transformers` peer: BERT, or ALBERT for shared sizes;
    `prefix` "Flax" for the Flax classes."""
    import transformers

    layers, d, heads, ffn, e, share = SIZES[size]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        hidden_act="gelu",
        max_position_embeddings=512,
    )
    if share == "all":
        config = transformers.AlbertConfig(
            **kwargs, embedding_size=e, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
        )
        return getattr(transformers, prefix + "AlbertForPreTraining"), config
    return getattr(transformers, prefix + "BertForPreTraining"), transformers.BertConfig(**kwargs)


# --- workers: each builds one framework's step, compiles once, then times steps on request ---


class _JaxWorker:
    """A jitted `step(state, batch) -> (state, outputs)`, compiled once, timed step by step."""

    def compile(self, jitted):
        import jax

        self.jax = jax
        start = time.perf_counter()
        self.step = jitted.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.device = jax.devices()[0].device_kind

    def run(self, n):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.state, outputs = self.step(self.state, self.batch)
            self.jax.block_until_ready(outputs)
            times.append(time.perf_counter() - start)
        return times


class BertJaxWorker(_JaxWorker):
    def __init__(self, size, length, batch_size, dtype, remat):
        import dataclasses

        import jax

        from bert_jax import axes, models, optim, sharding, training

        layers, d, heads, ffn, e, share = SIZES[size]
        config = dataclasses.replace(
            models.BertConfig.named("bert_base"),
            vocab_size=VOCAB,
            num_hidden_layers=layers,
            hidden_size=d,
            num_attention_heads=heads,
            intermediate_size=ffn,
            embedding_size=0 if e == d else e,
            share_layers=share,
            dtype=dtype,
            remat=remat,
        )
        mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
        trainer = training.create_trainer(
            config, optim.OptimConfig(warmup_steps=10, total_steps=10_000), mesh, axes.DEFAULT_RULES
        )
        with jax.set_mesh(mesh):
            self.batch = sharding.global_batch(
                make_batch(batch_size, length), mesh, axes.DEFAULT_RULES
            )
        self.state = jax.block_until_ready(trainer.init(0))
        self.compile(trainer.train_step)


class FlaxHFWorker(_JaxWorker):
    """`FlaxBertForPreTraining` trained the way transformers' `run_mlm_flax.py` does: logits at
    every position, cross-entropy weighted to the masked ones, plus NSP; optax AdamW."""

    def __init__(self, size, length, batch_size, dtype, remat):
        import jax
        import jax.numpy as jnp
        import optax

        model_cls, config = hf_model(size, "Flax")
        extra = {"gradient_checkpointing": True} if remat != "none" else {}  # BERT only
        model = model_cls(config, seed=0, dtype=getattr(jnp, dtype), **extra)
        tx = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(optax.linear_schedule(0.0, 1e-4, 10), 0.9, 0.999, 1e-6, weight_decay=0.01),
        )
        b = make_batch(batch_size, length)
        labels = hf_labels(b)
        self.batch = {
            "input_ids": jnp.asarray(b["input_ids"]),
            "attention_mask": jnp.asarray(b["input_mask"]),
            "token_type_ids": jnp.asarray(b["segment_ids"]),
            "labels": jnp.asarray(labels.astype("int32")),
            "order_label": jnp.asarray(b["next_sentence_labels"]),
        }

        def loss_fn(params, batch, rng):
            out = model(
                batch["input_ids"],
                batch["attention_mask"],
                batch["token_type_ids"],
                params=params,
                dropout_rng=rng,
                train=True,
            )
            weights = (batch["labels"] != -100).astype(jnp.float32)
            targets = jnp.maximum(batch["labels"], 0)
            logits = out.prediction_logits.astype(jnp.float32)
            mlm = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            mlm = (mlm * weights).sum() / weights.sum()
            pair_logits = getattr(out, "seq_relationship_logits", None)
            if pair_logits is None:  # ALBERT's SOP head
                pair_logits = out.sop_logits
            nsp = optax.softmax_cross_entropy_with_integer_labels(
                pair_logits.astype(jnp.float32), batch["order_label"]
            ).mean()
            return mlm + nsp

        def train_step(state, batch):
            params, opt_state, rng = state
            rng, sub = jax.random.split(rng)
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, sub)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, rng), loss

        params = model.params
        self.state = (params, tx.init(params), jax.random.PRNGKey(0))
        jitted = jax.jit(train_step, donate_argnums=0)
        self.compile(jitted)


class TorchWorker:
    """PyTorch `BertForPreTraining` (SDPA attention), eager, AdamW with clipping, on CUDA when
    there is a GPU."""

    def __init__(self, size, length, batch_size, dtype, remat):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        device = "cuda" if self.cuda else "cpu"
        torch.manual_seed(0)
        model_cls, config = hf_model(size)
        config._attn_implementation = "sdpa"
        self.model = model_cls(config).to(device).train()
        if remat != "none":
            self.model.gradient_checkpointing_enable()
        self.autocast = dtype == "bfloat16"
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01
        )
        b = make_batch(batch_size, length)
        self.batch = {
            "input_ids": torch.as_tensor(b["input_ids"], dtype=torch.long, device=device),
            "attention_mask": torch.as_tensor(b["input_mask"], dtype=torch.long, device=device),
            "token_type_ids": torch.as_tensor(b["segment_ids"], dtype=torch.long, device=device),
            "labels": torch.as_tensor(hf_labels(b), device=device),
            "sentence_order_label" if SIZES[size][5] == "all" else "next_sentence_label": (
                torch.as_tensor(b["next_sentence_labels"], dtype=torch.long, device=device)
            ),
        }
        self.compile_s = sum(self.run(1))  # eager: the first step stands for "compile"
        self.device = torch.cuda.get_device_name() if self.cuda else platform.processor() or "cpu"

    def run(self, n):
        torch = self.torch
        times = []
        for _ in range(n):
            start = time.perf_counter()
            with torch.autocast("cuda" if self.cuda else "cpu", torch.bfloat16, self.autocast):
                loss = self.model(**self.batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.cuda:
                torch.cuda.synchronize()
            else:
                loss.item()
            times.append(time.perf_counter() - start)
        return times


WORKERS = {"bert_jax": BertJaxWorker, "flax_hf": FlaxHFWorker, "torch": TorchWorker}


def peak_matmul_flops(n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` float32 [n, n] x [n, n] products in JAX."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def worker_main(args) -> None:
    """Serves one framework's step: prints {"compile_s"} once ready, then answers each line
    `run N` on stdin with {"times": [...]}."""
    size, length, batch = args.worker_config.split(":")
    worker = WORKERS[args.worker](size, int(length), int(batch), args.dtype, args.remat)
    print(json.dumps({"compile_s": worker.compile_s, "device": worker.device}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"times": worker.run(int(line.split()[1]))}), flush=True)


class Peer:
    """A worker process, driven over its stdin/stdout."""

    def __init__(self, name, python, config, args):
        env = dict(os.environ, PYTHONPATH=ROOT)
        if name == "torch":
            env.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
        command = [python, os.path.abspath(__file__), "--worker", name, "--worker_config", config]
        command += ["--dtype", args.dtype, "--remat", args.remat]
        self.name = name
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited ({self.proc.wait()}); see above")
        return json.loads(line)

    def run(self, n: int) -> list[float]:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def measure_config(spec: str, peers: dict[str, str], args) -> dict:
    size, length, batch = spec.split(":")
    length, batch = int(length), int(batch)
    workers = {}
    try:
        for name, python in peers.items():
            workers[name] = Peer(name, python, spec, args)
            print(
                f"  {spec} {name}: ready, compile {workers[name].ready['compile_s']:.1f} s",
                flush=True,
            )
        for worker in workers.values():
            worker.run(args.warmup)
        times = {name: [] for name in workers}
        for _ in range(args.rounds):
            for name, worker in workers.items():  # A B C A B C: drift falls on all alike
                times[name] += worker.run(args.steps_per_round)
    finally:
        for worker in workers.values():
            worker.close()
    flops = flops_per_sequence(size, length) * batch
    results = {}
    for name, t in times.items():
        step = statistics.median(t)
        results[name] = {
            "compile_s": workers[name].ready["compile_s"],
            "device": workers[name].ready["device"],
            "step_s": step,
            "step_s_all": t,
            "tokens_per_s": batch * length / step,
            "tflops": flops / step / 1e12,
        }
    return {"size": size, "length": length, "batch": batch, "flops_per_step": flops, **results}


def compile_pair(names: list[str], args) -> dict:
    """Compile seconds of each named train step (fresh process each time), A B A B."""
    out = {n: [] for n in names}
    for _ in range(args.compile_rounds):
        for name in names:
            peer = Peer("bert_jax", sys.executable, f"{name}:128:8", args)
            out[name].append(peer.ready["compile_s"])
            peer.close()
            print(f"  compile {name}: {out[name][-1]:.2f} s", flush=True)
    median = {n: statistics.median(v) for n, v in out.items()}
    return {"compile_s": median, "runs": out, "ratio": median[names[1]] / median[names[0]]}


def markdown(result: dict) -> str:
    peers = [p for p in ("flax_hf", "torch") if any(p in c for c in result["configs"])]
    lines = [
        f"Hardware: {result['machine']}. {result['dtype']}, MFU against "
        f"{result['peak_tflops']:.2f} TFLOP/s ({result['peak_source']}).",
        "",
        "| config | seq | batch | bert_jax tokens/s | step | compile | TFLOP/s | MFU | "
        + " | ".join(f"{p} tokens/s | bert_jax / {p}" for p in peers)
        + " |",
        "|" + "---|" * (8 + 2 * len(peers)),
    ]
    for c in result["configs"]:
        ours = c["bert_jax"]
        row = [
            c["size"],
            str(c["length"]),
            str(c["batch"]),
            f"{ours['tokens_per_s']:,.0f}",
            f"{ours['step_s'] * 1e3:,.0f} ms",
            f"{ours['compile_s']:.1f} s",
            f"{ours['tflops']:.3f}",
            f"{ours['mfu']:.1%}",
        ]
        for p in peers:
            if p in c:
                row += [f"{c[p]['tokens_per_s']:,.0f}", f"**{c['ratio_' + p]:.2f}x**"]
            else:
                row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    if "compile_pair" in result:
        cp = result["compile_pair"]
        (a, ta), (b, tb) = cp["compile_s"].items()
        lines += [
            "",
            f"Train-step compile time: {a} {ta:.2f} s, {b} {tb:.2f} s: "
            f"**{cp['ratio']:.2f}x** (medians of {len(cp['runs'][a])}, fresh processes, A B A B).",
        ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="name:length:batch,...")
    parser.add_argument("--peers", default="flax_hf,torch", help="comma-separated; '' for none")
    parser.add_argument("--flax_python", default=os.path.join(ROOT, ".venv-flax", "bin", "python"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none", choices=["none", "minimal", "full"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps_per_round", type=int, default=3)
    parser.add_argument("--compile_pair", default="bert_base,bert_large")
    parser.add_argument("--compile_rounds", type=int, default=2)
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    parser.add_argument("--out", default="benchmarks/results/train_step")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker_config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)

    import jax

    peers = {"bert_jax": sys.executable}
    for name in filter(None, args.peers.split(",")):
        if name == "flax_hf":
            if not os.path.exists(args.flax_python):
                sys.exit(
                    f"--flax_python={args.flax_python} does not exist: make the peer's "
                    f"environment (python3 -m venv .venv-flax && .venv-flax/bin/pip install -r "
                    f"benchmarks/requirements-flax-peer.txt) or leave flax_hf out of --peers"
                )
            peers[name] = args.flax_python
        elif name == "torch":
            peers[name] = sys.executable
        else:
            sys.exit(f"unknown peer {name!r}; use flax_hf, torch")
    kind = jax.devices()[0].device_kind
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "given"
    elif jax.default_backend() == "cpu":
        peak, source = peak_matmul_flops(), "measured: float32 4096^3 matmul in JAX, this run"
    else:
        match = [v for (k, dt), v in PEAKS.items() if k in kind and dt == args.dtype]
        if not match:
            sys.exit(f"no published peak for {kind!r} in {args.dtype}; pass --peak_tflops")
        peak, source = match[0], f"published dense {args.dtype} peak of {kind}"
    print(f"peak {peak / 1e12:.3f} TFLOP/s ({source})", flush=True)
    configs = []
    for spec in args.configs.split(","):
        c = measure_config(spec, peers, args)
        c["bert_jax"]["mfu"] = c["bert_jax"]["tflops"] * 1e12 / peak
        for name in peers:
            if name != "bert_jax":
                c["ratio_" + name] = c["bert_jax"]["tokens_per_s"] / c[name]["tokens_per_s"]
        configs.append(c)
        print(
            f"{spec}: bert_jax {c['bert_jax']['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {c['bert_jax']['mfu']:.1%}"
            + "".join(f", x{c['ratio_' + n]:.2f} vs {n}" for n in peers if n != "bert_jax"),
            flush=True,
        )
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {kind}",
        "jax": jax.__version__,
        "dtype": args.dtype,
        "remat": args.remat,
        "peak_tflops": peak / 1e12,
        "peak_source": source,
        "configs": configs,
    }
    if args.compile_pair:
        result["compile_pair"] = compile_pair(args.compile_pair.split(","), args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
