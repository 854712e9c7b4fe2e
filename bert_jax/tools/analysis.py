"""Looking inside a trained encoder: what each attention head attends to, how much each head
matters, and pruning the heads that do not.

    python -m bert_jax.tools.analysis attention-stats --model=M --input=lines.txt \
        --output=stats.json
    python -m bert_jax.tools.analysis heatmap --model=M --text="The cat sat." --heads=0:0,11:3 \
        --output=attention.png
    python -m bert_jax.tools.analysis head-importance --model=M --input=lines.txt --output=imp.json
    python -m bert_jax.tools.analysis head-importance --model=FINETUNED --task=rte --data_dir=glue \
        --output=imp.json
    python -m bert_jax.tools.analysis prune --model=M --importance=imp.json --fraction=0.3 \
        --output=DIR

`M` is `hf:DIR`, `tf:DIR` or a bert_jax workdir. Lines are sentences or `A ||| B` pairs.

- Attention statistics per layer and head over a corpus (Clark et al., 2019): the entropy of
  each query's attention, and the attention it pays to [CLS], to [SEP], to the previous and
  the next token and to itself, averaged over the real (unpadded) query tokens.
- Head importance (Michel et al., 2019): the expected absolute gradient of the loss with
  respect to a per-example head mask at 1, also normalized per layer (their l2
  normalization): the loss of a fine-tuned classifier on a GLUE task's dev set (`--task`,
  `--data_dir`, as in the paper), or the masked-LM loss on text lines (15% of each line's
  pieces masked, as in pretraining).
- Pruning removes the weights of the chosen heads (smaller query/key/value/output matrices,
  fewer FLOPs); the pruned model is a bert_jax workdir that `init_from` and `finetune.py` read.
"""

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from bert_jax import axes, cli, convert, files, models, sharding, tools
from bert_jax.data import encoding
from bert_jax.models import BertConfig, Params
from bert_jax.tasks import glue
from bert_jax.tools import extract

STATISTICS = ("entropy", "to_cls", "to_sep", "to_prev", "to_next", "to_self")


def make_attention_stats_step(graphdef, sep_id: int, rules: sharding.Rules):
    """`stats_step(params, batch) -> sums` of each statistic [N, H] over real query tokens,
    and `count` (the number of those tokens)."""

    def stats_step(params, batch):
        model = models.merge_params(graphdef, params)
        with axes.axis_rules(rules):
            probs = model(
                batch["input_ids"],
                batch["input_mask"],
                batch["segment_ids"],
                output_attentions=True,
            ).attentions  # [N, B, H, L, L]
        mask = batch["input_mask"].astype(jnp.float32)  # [B, L]
        length = mask.shape[1]
        entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=-1)
        is_sep = (batch["input_ids"] == sep_id).astype(jnp.float32)
        eye = jnp.eye(length, dtype=jnp.float32)
        per_query = {  # each [N, B, H, L] over queries
            "entropy": entropy,
            "to_cls": probs[..., 0],
            "to_sep": jnp.einsum("nbhqk,bk->nbhq", probs, is_sep),
            "to_prev": jnp.einsum("nbhqk,qk->nbhq", probs, jnp.eye(length, k=-1)),
            "to_next": jnp.einsum("nbhqk,qk->nbhq", probs, jnp.eye(length, k=1)),
            "to_self": jnp.einsum("nbhqk,qk->nbhq", probs, eye),
        }
        sums = {k: jnp.einsum("nbhq,bq->nh", v, mask) for k, v in per_query.items()}
        return {**sums, "count": mask.sum()}

    return stats_step


def attention_stats(
    model: str,
    input_path: str,
    *,
    max_seq_length: int = 128,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.MeshConfig.rules,
    progress: bool = True,
) -> dict:
    """Per-head statistics (each a [layers, heads] list) over every line of `input_path`."""
    loaded, mesh = _load(model, mesh, max_seq_length)
    graphdef, _ = models.split_params(models.abstract_model(loaded.config, models.make_encoder))
    step = jax.jit(make_attention_stats_step(graphdef, loaded.tokenizer.sep_id, rules))
    totals = None
    for batch in _model_batches(input_path, loaded.tokenizer, max_seq_length, batch_size, progress):
        with jax.set_mesh(mesh):
            sums = step(loaded.params, sharding.global_batch(batch, mesh, rules))
        sums = jax.device_get(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if totals is None:
        raise ValueError(f"{input_path} has no line to analyse")
    count = float(totals.pop("count"))
    return {
        "tokens": int(count),
        "layers": loaded.config.num_hidden_layers,
        "heads": loaded.config.num_attention_heads,
        **{k: (v / count).round(6).tolist() for k, v in totals.items()},
    }


def plot_attention(
    model: str, text: str, heads: Sequence[tuple[int, int]], output_path: str, *, mesh=None
) -> str:
    """A PNG of one sentence's (or `A ||| B` pair's) attention for the chosen (layer, head)s,
    one panel each, axes labelled with the word pieces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded, mesh = _load(model, mesh, None)
    config, tok = loaded.config, loaded.tokenizer
    for layer, head in heads:
        if not (0 <= layer < config.num_hidden_layers and 0 <= head < config.num_attention_heads):
            raise ValueError(
                f"head {layer}:{head} does not exist: layers 0..{config.num_hidden_layers - 1}, "
                f"heads 0..{config.num_attention_heads - 1}"
            )
    a, sep, b = text.partition(" ||| ")
    ex = extract.encode(0, a, b if sep else None, tok, config.max_length)
    n = int(ex.input_mask.sum())
    graphdef, _ = models.split_params(models.abstract_model(config, models.make_encoder))
    model_ = models.merge_params(graphdef, jax.device_get(loaded.params))
    probs = model_(
        ex.input_ids[None, :n],
        ex.input_mask[None, :n],
        ex.segment_ids[None, :n],
        output_attentions=True,
    ).attentions[:, 0]  # [N, H, n, n]
    labels = [tok.id_to_token(int(i)) for i in ex.input_ids[:n]]
    cols = min(len(heads), 3)
    rows = math.ceil(len(heads) / cols)
    size = max(4.0, 0.28 * n)
    fig, grid = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in grid.flat[len(heads) :]:
        ax.axis("off")
    for ax, (layer, head) in zip(grid.flat, heads, strict=False):
        image = ax.imshow(np.asarray(probs[layer, head]), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer}, head {head}")
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_xlabel("attended to")
        ax.set_ylabel("query")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with files.atomic_path(output_path, suffix=os.path.splitext(output_path)[1]) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return output_path


def make_importance_step(
    graphdef, config: BertConfig, rules: sharding.Rules, task_loss: bool = False
):
    """`importance_step(params, batch) -> (|dL_b/dm_b| summed over the batch [N, H], loss sum)`
    with a head mask per example, so that one backward pass gives every example's gradient.

    The loss is the masked-LM loss (a `BertForMaskedLM`), or with `task_loss` the loss of a
    `BertForSequenceClassification` on `label` (cross-entropy; squared error for one output).
    """

    def loss(masks, params, batch):
        model = models.merge_params(graphdef, params)
        inputs = (batch["input_ids"], batch["input_mask"], batch["segment_ids"])
        with axes.axis_rules(rules):
            if task_loss:
                logits, _ = model(*inputs, head_mask=masks)
            else:
                logits, _ = model(*inputs, batch["masked_lm_positions"], head_mask=masks)
        if task_loss and logits.shape[-1] == 1:
            per_example = (logits[:, 0] - batch["label"].astype(jnp.float32)) ** 2
        elif task_loss:
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            labels = batch["label"].astype(jnp.int32)
            per_example = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
        else:
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            labels = batch["masked_lm_ids"][..., None]
            nll = -jnp.take_along_axis(log_probs, labels, axis=-1)[..., 0]
            weights = batch["masked_lm_weights"]
            per_example = (nll * weights).sum(-1) / jnp.maximum(weights.sum(-1), 1.0)
        return per_example.sum(), per_example

    def importance_step(params, batch):
        shape = (batch["input_ids"].shape[0], config.num_hidden_layers, config.num_attention_heads)
        grads, per_example = jax.grad(loss, has_aux=True)(jnp.ones(shape), params, batch)
        real = batch["example_weight"]
        return jnp.einsum("bnh,b->nh", jnp.abs(grads), real), (per_example * real).sum()

    return importance_step


def head_importance(
    model: str,
    input_path: str = "",
    *,
    task: str = "",
    data_dir: str = "",
    split: str = "dev",
    max_seq_length: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    mesh=None,
    rules: sharding.Rules = sharding.MeshConfig.rules,
    progress: bool = True,
) -> dict:
    """Michel et al.'s head importance: `importance` [N, H] (mean |gradient| over examples)
    and `normalized` (l2 per layer), on the masked-LM loss over the lines of `input_path`, or
    with `task` (a GLUE task name) on the fine-tuned classifier's loss over `split` of the
    task's TSV files under `data_dir` (their method)."""
    if task:
        glue_task = glue.get_spec(task)
        loaded, mesh = _load(
            model, mesh, max_seq_length, "BertForSequenceClassification", glue_task.num_labels
        )
        model_cls = convert.model_class("BertForSequenceClassification", glue_task.num_labels)
        examples = glue.read_tsv(
            glue_task, glue_task.split(split), os.path.join(data_dir, glue_task.folder)
        )
        batches = _glue_batches(
            encoding.encode(examples, loaded.tokenizer, max_seq_length), batch_size
        )
    else:
        loaded, mesh = _load(model, mesh, max_seq_length, "BertForMaskedLM")
        model_cls = models.BertForMaskedLM
        rng = np.random.default_rng(seed)
        batches = (
            mask_for_mlm(b, loaded.tokenizer, rng)
            for b in _model_batches(
                input_path, loaded.tokenizer, max_seq_length, batch_size, progress
            )
        )
    config = loaded.config
    graphdef, _ = models.split_params(models.abstract_model(config, model_cls))
    step = jax.jit(make_importance_step(graphdef, config, rules, task_loss=bool(task)))
    total, loss, lines = 0.0, 0.0, 0
    for batch in batches:
        with jax.set_mesh(mesh):
            imp, loss_sum = step(loaded.params, sharding.global_batch(batch, mesh, rules))
        total, loss = total + jax.device_get(imp), loss + float(loss_sum)
        lines += int(batch["example_weight"].sum())
    if not lines:
        raise ValueError(f"{input_path or task} has no example to score heads on")
    importance = total / lines
    norms = np.linalg.norm(importance, axis=1, keepdims=True)
    return {
        "lines": lines,
        "loss": loss / lines,
        "objective": f"{task} classifier" if task else "masked LM",
        "importance": importance.round(8).tolist(),
        "normalized": (importance / np.maximum(norms, 1e-20)).round(8).tolist(),
    }


def mask_for_mlm(batch: dict, tokenizer, rng: np.random.Generator, rate: float = 0.15) -> dict:
    """15% of each row's real pieces (at least one) replaced by [MASK], to be predicted."""
    ids = batch["input_ids"].copy()
    special = np.isin(ids, [tokenizer.cls_id, tokenizer.sep_id]) | (batch["input_mask"] == 0)
    preds = max(1, math.ceil(rate * ids.shape[1]))
    positions = np.zeros((ids.shape[0], preds), np.int32)
    labels = np.zeros((ids.shape[0], preds), np.int32)
    weights = np.zeros((ids.shape[0], preds), np.float32)
    for row in range(ids.shape[0]):
        candidates = np.flatnonzero(~special[row])
        if not len(candidates):
            continue
        k = min(preds, max(1, round(rate * len(candidates))))
        chosen = np.sort(rng.choice(candidates, k, replace=False))
        positions[row, :k], labels[row, :k], weights[row, :k] = chosen, ids[row, chosen], 1.0
        ids[row, chosen] = tokenizer.mask_id
    return {
        **batch,
        "input_ids": ids,
        "masked_lm_positions": positions,
        "masked_lm_ids": labels,
        "masked_lm_weights": weights,
    }


def heads_to_prune(
    importance: np.ndarray, fraction: float, keep_per_layer: int = 1
) -> dict[int, list[int]]:
    """The `fraction` of all heads with the lowest (normalized) importance, keeping at least
    `keep_per_layer` heads in every layer; {layer: [heads]}."""
    importance = np.asarray(importance, np.float64)
    layers_, heads = importance.shape
    budget = int(round(fraction * layers_ * heads))
    left = np.full(layers_, heads)
    chosen: dict[int, list[int]] = {}
    for flat in np.argsort(importance, axis=None, kind="stable"):
        if budget == 0:
            break
        layer, head = divmod(int(flat), heads)
        if left[layer] > keep_per_layer:
            chosen.setdefault(layer, []).append(head)
            left[layer] -= 1
            budget -= 1
    return {k: sorted(v) for k, v in sorted(chosen.items())}


def prune_heads(
    params: Params, config: BertConfig, remove: Mapping[int, Iterable[int]]
) -> tuple[BertConfig, Params]:
    """`params` (of any architecture) without the weights of heads `remove` ({layer: heads in
    the original numbering}); returns the pruned config and params (numpy)."""
    if config.share_layers != "none":
        raise ValueError("heads of shared (ALBERT) layers cannot be pruned one layer at a time")
    if models.layers.holds_int8(config.quantization):
        raise ValueError(
            f"the model holds {config.quantization} weights: prune the float model, then "
            f"quantize the pruned one (python -m bert_jax.convert quantize)"
        )
    pruned = [
        set(config.pruned_heads[i]) if config.pruned_heads else set()
        for i in range(config.num_hidden_layers)
    ]
    for layer, heads in remove.items():
        if not 0 <= int(layer) < config.num_hidden_layers:
            raise ValueError(f"layer {layer} does not exist (0..{config.num_hidden_layers - 1})")
        pruned[int(layer)] |= {int(h) for h in heads}
    new_config = dataclasses.replace(config, pruned_heads=tuple(tuple(sorted(p)) for p in pruned))
    params = jax.tree.map(np.asarray, jax.device_get(params))
    bare = "bert" not in params
    encoder = dict((params if bare else params["bert"])["encoder"])
    if config.pruned_heads:
        per_layer = [encoder["layers"][i] for i in range(config.num_hidden_layers)]
    else:
        per_layer = [
            jax.tree.map(lambda w, i=i: w[i], encoder["layer"])
            for i in range(config.num_hidden_layers)
        ]
    layers_out = {}
    for i, layer in enumerate(per_layer):
        before = config.kept_heads(i)
        keep = [before.index(h) for h in new_config.kept_heads(i)]
        attention = dict(layer["attention"])
        for name in ("query", "key", "value"):
            attention[name] = {
                "kernel": attention[name]["kernel"][:, keep],
                "bias": attention[name]["bias"][keep],
            }
        attention["output"] = {
            "kernel": attention["output"]["kernel"][keep],
            "bias": attention["output"]["bias"],
        }
        layers_out[i] = {**layer, "attention": attention}
    encoder.pop("layer", None)
    encoder["layers"] = layers_out
    if bare:
        return new_config, {**params, "encoder": encoder}
    return new_config, {**params, "bert": {**params["bert"], "encoder": encoder}}


def prune(model: str, remove: Mapping[int, Iterable[int]], output: str) -> dict:
    """Writes the pruned `model` as a bert_jax workdir at `output`; returns its sizes."""
    run = convert.read_run(model) if not model.startswith(("hf:", "tf:")) else None
    architecture = run["architecture"] if run else "BertForPreTraining"
    num_labels = run["num_labels"] if run else 2
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
    loaded = convert.load_pretrained(model, architecture, mesh=mesh, num_labels=num_labels)
    if loaded.report.missing:
        architecture = "BertModel"  # e.g. an HF encoder without heads
        loaded = convert.load_pretrained(model, architecture, mesh=mesh)
    config, params = prune_heads(loaded.params, loaded.config, remove)
    convert.write_run(output, config, architecture, num_labels, params, loaded.tokenizer)
    cls = convert.model_class(architecture, num_labels)
    return {
        "output": output,
        "architecture": architecture,
        "pruned_heads": config.pruned_heads,
        "params_before": models.count_params(loaded.config, cls),
        "params_after": models.count_params(config, cls),
    }


def _load(model: str, mesh, max_seq_length, architecture: str = "BertModel", num_labels=2):
    mesh = mesh or sharding.make_mesh(sharding.MeshConfig())
    loaded = convert.load_pretrained(model, architecture, mesh=mesh, num_labels=num_labels)
    if loaded.report.missing:
        raise ValueError(
            f"{model} lacks weights this analysis needs: {', '.join(loaded.report.missing)}"
        )
    if max_seq_length and loaded.config.length_problem(max_seq_length):
        raise ValueError(loaded.config.length_problem(max_seq_length))
    return loaded, mesh


def _model_batches(input_path, tokenizer, max_seq_length, batch_size, progress):
    """The model inputs of `extract`'s batches, with `example_weight` 0 on padding rows."""
    if not files.isfile(input_path):
        raise FileNotFoundError(f"--input={input_path} does not exist")
    lines = extract.read_lines(input_path)
    bar = tqdm.tqdm(unit="line", desc="analyse", disable=not progress)
    for batch in extract.batches(lines, tokenizer, max_seq_length, batch_size):
        n = len(batch.pop("examples"))
        batch.pop("piece_word")
        batch["example_weight"] = (np.arange(batch_size) < n).astype(np.float32)
        bar.update(n)
        yield batch
    bar.close()


def _glue_batches(features: dict[str, np.ndarray], batch_size: int):
    """Batches of encoded GLUE examples, the last padded with weightless rows."""
    n = len(features["input_ids"])
    for start in range(0, n, batch_size):
        rows = {k: v[start : start + batch_size] for k, v in features.items()}
        real = len(rows["input_ids"])
        rows = {
            k: np.concatenate([v, np.zeros((batch_size - real, *v.shape[1:]), v.dtype)])
            for k, v in rows.items()
        }
        rows["example_weight"] = (np.arange(batch_size) < real).astype(np.float32)
        yield rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bert_jax.tools.analysis", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("attention-stats", "heatmap", "head-importance", "prune"):
        p = sub.add_parser(name)
        tools.add_model_flags(p, quantization=False)
        p.add_argument("--output", required=True)
        if name in ("attention-stats", "head-importance"):
            p.add_argument("--input", required=name == "attention-stats", default="")
            p.add_argument("--max_seq_length", type=int, default=128)
            p.add_argument("--batch_size", type=int, default=32)
    importance = sub.choices["head-importance"]
    importance.add_argument("--task", default="", help="GLUE task: its classifier's loss")
    importance.add_argument("--data_dir", default="", help="the GLUE folder (with --task)")
    importance.add_argument("--split", default="dev")
    sub.choices["heatmap"].add_argument("--text", required=True)
    sub.choices["heatmap"].add_argument("--heads", default="0:0", help="layer:head,...")
    sub.choices["prune"].add_argument("--importance", required=True, help="head-importance JSON")
    sub.choices["prune"].add_argument("--fraction", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command == "heatmap":
        heads = [tuple(int(x) for x in h.split(":")) for h in args.heads.split(",")]
        print(f"wrote {plot_attention(args.model, args.text, heads, args.output)}")
        return
    if args.command == "prune":
        with files.open(args.importance) as f:
            scores = json.load(f)["normalized"]
        print(json.dumps(prune(args.model, heads_to_prune(scores, args.fraction), args.output)))
        return
    kw = dict(max_seq_length=args.max_seq_length, batch_size=args.batch_size)
    if args.command == "attention-stats":
        result = attention_stats(args.model, args.input, **kw)
    else:
        if not (args.input or args.task):
            parser.error("head-importance needs --input (masked-LM loss) or --task and --data_dir")
        task_kw = dict(task=args.task, data_dir=args.data_dir, split=args.split)
        result = head_importance(args.model, args.input, **task_kw, **kw)
    with files.open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    cli.run(main)
