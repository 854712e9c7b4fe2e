"""Ask a model from the command line: JSON lines out, one per input line.

    python -m bert_jax.tools.predict fill-mask --model=hf:/models/bert-base-uncased \
        --text="The capital of France is [MASK]."
    python -m bert_jax.tools.predict fill-mask --model=workdir/tiny --input=lines.txt --top_k=10
    echo "He went home. ||| He slept." | python -m bert_jax.tools.predict next-sentence --model=...

`--model` takes what `--config.init_from` takes: `hf:DIR`, `tf:DIR` or a bert_jax workdir.
Input: `--text` (one line), `--input` (a file, read as a stream) or stdin; lines are batched
(rows as long as the batch's longest line needs, 16, 32, ... up to `--max_seq_length`) and
each batch is split over the devices. Output: stdout or `--output`, written as batches finish.

- `fill-mask`: for each `[MASK]` of the line, the `--top_k` most likely pieces and their
  probabilities (the softmax over the vocabulary at that position), and the line with the
  best pieces filled in. Each `[MASK]` stands for one piece: a word the tokenizer splits in
  two needs `[MASK] [MASK]`-like input with the pieces joined (`##`).
- `next-sentence`: for `A ||| B`, the probability that B follows A (the NSP head; for ALBERT
  models, the sentence-order head: B after A in the right order).
- a fine-tuning task (`task`: the one a `finetune.py` run was trained on; or by name: `sst2`,
  `mnli`, ..., `squad_v1`, `squad_v2`, `conll2003`, `swag`, `classify:<folder>`,
  `tag:<folder>`): lines as the task spells an example (a sentence or `A ||| B`;
  `question ||| context`; words; `context ||| start ||| ending ||| ending ||| ending |||
  ending`), answered by the task's own decoding, as `finetune.py` writes its predictions:
  labels and their probabilities (a score for STS-B); the best span of the context, its
  probability among the n best and `null_odds` (the no-answer score minus the span's, to
  compare with the threshold tuned on dev, `results.json`), decoded over windows with the
  max-context rule; each word's tag and the entities; the best ending and each one's
  probability.
- `embed`: each line's sentence embedding (`{"embedding": [...]}`, or all of them to a `.npy`
  `--output`), pooled and normalized as a sentence-transformers folder says (or
  `--pooling`, `--normalize`), with `--prompt` or `--prompt_name` (E5's "query: ") before
  each line: `bert_jax.tools.embed`.
- `search`: each line's `--top_k` most similar lines of `--corpus` (`{"query", "hits":
  [{"id", "score", "text"}]}`), exact, the corpus's vectors spread over the devices
  (`bert_jax.tools.search`); `--corpus_prompt_name=passage` for E5-like models.
- `classify`, `qa`, `ner`: any sequence classifier, SQuAD model or token classifier (a
  Hugging Face directory, say), as `classify:`, `squad_v2` and `tag:` read them.
Label names come from the model (a `finetune.py` run records them; a Hugging Face directory's
`id2label`); a `classify:`/`tag:` task of a model that records none reads
`<--data_dir>/<folder>/labels.txt`.
"""

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import cli, convert, files, models, sharding, tools
from bert_jax.data import encoding
from bert_jax.models import pooling
from bert_jax.tasks import base, own, registry, squad
from bert_jax.tools import embed, search

MASK = "[MASK]"
PRETRAINING_HEADS = {"fill-mask": "BertForMaskedLM", "next-sentence": "BertForPreTraining"}
# Any model with one of these heads, read as the task named.
ALIASES = {
    "classify": lambda: own.ClassifyTask(""),
    "qa": lambda: squad.SquadTask("2.0"),
    "ner": lambda: own.TagTask(""),
}


def head_labels(model: str) -> tuple[int, list[str] | None]:
    """(number of outputs of a model's head, their label names where the model records
    them: a bert_jax run's `labels`, a Hugging Face config's `id2label`)."""
    kind, path = convert.model_kind(model)
    if kind == "bert_jax":
        run = convert.read_run(path)
        return run["num_labels"], run.get("labels") or None
    if kind == "hf":
        with files.open(f"{path}/config.json") as f:
            hf = json.load(f)
        id2label = hf.get("id2label") or {}
        labels = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
        return len(id2label) or int(hf.get("num_labels", 2)), labels
    return 2, None


def encode_masked(text: str, tokenizer) -> list[int]:
    """The ids of a line in which each literal `[MASK]` is the mask token (the text between
    masks is tokenized as it stands; masks are word boundaries, as in `transformers`)."""
    parts = text.split(MASK)
    encoded = tokenizer.encode_batch(parts)
    ids: list[int] = []
    for i, part in enumerate(encoded):
        if i:
            ids.append(tokenizer.mask_id)
        ids += part
    return ids


def _bucket(n: int, cap: int) -> int:
    size = 16
    while size < n:
        size *= 2
    return min(size, cap)


def _rows(lines: Iterator[str], batch_size: int) -> Iterator[list[tuple[int, str]]]:
    start = 0
    for chunk in embed.chunks(lines, batch_size):
        yield list(enumerate(chunk, start))
        start += len(chunk)


def decoding_settings(model: str, data_dir: str, max_seq_length: int) -> base.Settings:
    """A task's settings for answering lines: those a `finetune.py` run recorded (its SQuAD
    windows and n-best decoding, so that answers are decoded as its prediction files were),
    else windows of half a row over long contexts (at most 128 pieces apart)."""
    kind, path = convert.model_kind(model)
    result = f"{path}/result.json"  # beside a fine-tuned run's best checkpoint
    recorded = {}
    if kind == "bert_jax" and files.exists(result):
        recorded = json.loads(files.read_bytes(result)).get("settings", {})
    fields = ("doc_stride", "max_query_length", "n_best_size", "max_answer_length")
    chosen = {"doc_stride": min(128, max_seq_length // 2)}
    chosen.update({k: recorded[k] for k in fields if k in recorded})
    return base.Settings(data_dir, max_seq_length, **chosen)


def resolve_task(name: str, model: str, settings: base.Settings) -> base.Task:
    """The task `name` stands for (`task`: the one `model` was fine-tuned on), with the label
    names `model` records, or those of the task's data when it records none."""
    kind, path = convert.model_kind(model)
    if name == "task":
        run = convert.read_run(path) if kind == "bert_jax" else {}
        if not run.get("task"):
            raise ValueError(
                f"{model} records no fine-tuning task (it is not a finetune.py run): name one, "
                f"e.g. sst2, squad_v2, conll2003, swag, classify:<folder>, or classify/qa/ner"
            )
        name = run["task"]
    task = ALIASES[name]() if name in ALIASES else registry.get_task(name)
    num_labels, labels = head_labels(model)
    if labels is None and name in ("classify", "ner"):
        labels = [f"LABEL_{i}" for i in range(num_labels)]
    if labels:
        task.restore_labels(labels)
    else:
        task.prepare(settings)  # a user's folder: its labels.txt
    return task


class Predictor:
    """A model loaded once, answering batches of lines: a pretraining head (`fill-mask`,
    `next-sentence`) or any fine-tuning task, through the task's own features and decoding."""

    def __init__(
        self,
        task: str,
        model: str,
        *,
        max_seq_length=128,
        top_k=5,
        mesh=None,
        rules: sharding.Rules = sharding.MeshConfig.rules,
        quantization="",
        data_dir="",
    ):
        self.top_k, self.rules = top_k, rules
        self.mesh = mesh or sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
        self.settings = decoding_settings(model, data_dir, max_seq_length)
        self.head = task if task in PRETRAINING_HEADS else None
        self.task = None if self.head else resolve_task(task, model, self.settings)
        if self.head:
            architecture, num_labels = PRETRAINING_HEADS[task], 2
        else:
            architecture, num_labels = self.task.architecture, self.task.num_labels
        self.pretrained = convert.load_pretrained(
            model,
            architecture,
            mesh=self.mesh,
            rules=rules,
            num_labels=num_labels,
            quantization=quantization,
        )
        if self.pretrained.report.missing:
            raise ValueError(
                f"{task} needs the {architecture} head, which {self.pretrained.description} "
                f"lacks ({', '.join(self.pretrained.report.missing)})"
            )
        self.config, self.tokenizer = self.pretrained.config, self.pretrained.tokenizer
        self.max_seq_length = min(max_seq_length, self.config.max_length)
        self.settings = dataclasses.replace(self.settings, max_seq_length=self.max_seq_length)
        cls = convert.model_class(architecture, num_labels)
        graphdef, _ = models.split_params(models.abstract_model(self.config, cls))
        self.data_size = sharding.data_parallel_size(self.mesh, rules)
        self.step = jax.jit(self._step(graphdef))

    def _step(self, graphdef):
        """The jitted function of (params, batch): the task's prediction, or probabilities
        of a pretraining head."""
        if self.task is not None:
            objective = self.task.objective(None)
            return lambda params, batch: objective.predict(
                models.merge_params(graphdef, params), batch
            )

        def fill(params, batch):
            model = models.merge_params(graphdef, params)
            logits, _ = model(batch["input_ids"], batch["input_mask"], batch["segment_ids"])
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        def nsp(params, batch):
            model = models.merge_params(graphdef, params)
            out = model(
                batch["input_ids"],
                batch["input_mask"],
                batch["segment_ids"],
                jnp.zeros((batch["input_ids"].shape[0], 1), jnp.int32),
            )
            return jax.nn.softmax(out.nsp_logits.astype(jnp.float32), axis=-1)

        return fill if self.head == "fill-mask" else nsp

    def encode(self, line: str) -> tuple[list[int], list[int]]:
        """A pretraining head's input: (ids with [CLS]/[SEP], segment ids) within
        max_seq_length."""
        tok = self.tokenizer
        if self.head == "fill-mask":
            ids = [tok.cls_id, *encode_masked(line, tok)][: self.max_seq_length - 1]
            return ids + [tok.sep_id], [0] * (len(ids) + 1)
        a, b = base.split_line(line, 2, "next-sentence", "`A ||| B`")
        return encoding.pair_tokens(tok.encode(a), tok.encode(b), tok, self.max_seq_length)

    def _outputs(self, features: dict[str, np.ndarray]):
        """The jitted step over rows of features (one example each, padded to
        `max_seq_length`): packed several to a row where the task's model reads packed rows
        (`encoding.pack`, as `finetune.py` predicts: a short line no longer computes a whole
        row; each line's outputs equal those of the line alone), in the rows the examples
        need, cut back."""
        n = len(features["input_ids"])
        if self.task is not None and self.task.packable:
            lengths = features["input_mask"].sum(axis=1)
            needed = len(encoding.pack_rows(lengths, features["input_ids"].shape[1]))
            packed = encoding.pack(features, rows=-(-needed // self.data_size) * self.data_size)
            source = packed.pop("source")
            return encoding.unpack(self._run(packed), source, n)
        return self._run(features)

    def _run(self, features: dict[str, np.ndarray]):
        """The step over `features` in dispatches of at most `_STEP_ROWS` rows a device,
        each padded to a quarter of that (a few shapes, each compiled once)."""
        n = len(features["input_ids"])
        most = _STEP_ROWS * self.data_size
        outs = [
            self._dispatch({k: v[start : start + most] for k, v in features.items()}, most // 4)
            for start in range(0, n, most)
        ]
        return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)

    def _dispatch(self, features: dict[str, np.ndarray], granule: int):
        n = len(features["input_ids"])
        rows = -(-n // granule) * granule
        batch = {
            k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)])
            for k, v in features.items()
            if k in _INPUTS + _PACKING
        }
        with jax.set_mesh(self.mesh):
            out = self.step(
                self.pretrained.params, sharding.global_batch(batch, self.mesh, self.rules)
            )
            return jax.tree.map(lambda x: np.asarray(x)[:n], jax.device_get(out))

    def answer(self, chunk: Sequence[tuple[int, str]]) -> list[dict]:
        """The answers to a batch of (line index, line)."""
        if self.task is None:
            return self._pretraining_answers(chunk)
        split = self.task.from_lines([line for _, line in chunk], self.tokenizer, self.settings)
        answers = self.task.answers(split, self._outputs(split.features))
        return [
            {"line_index": index, "text": line, **a}
            for (index, line), a in zip(chunk, answers, strict=True)
        ]

    def _pretraining_answers(self, chunk) -> list[dict]:
        encoded = [self.encode(line) for _, line in chunk]
        length = _bucket(max(len(ids) for ids, _ in encoded), self.max_seq_length)
        batch = {k: np.zeros((len(chunk), length), np.int32) for k in _INPUTS}
        for i, (ids, segments) in enumerate(encoded):
            batch["input_ids"][i, : len(ids)] = ids
            batch["input_mask"][i, : len(ids)] = 1
            batch["segment_ids"][i, : len(ids)] = segments
        if self.head == "next-sentence":
            pairs = self._outputs(batch)
            return [
                {"line_index": index, "text": line, "is_next": float(pairs[i, 0])}
                for i, (index, line) in enumerate(chunk)
            ]
        top_p, top_i = self._top_k(batch)
        rows = [batch["input_ids"][i, : len(ids)] for i, (ids, _) in enumerate(encoded)]
        return [
            self._filled(index, line, rows[i], top_p[i], top_i[i])
            for i, (index, line) in enumerate(chunk)
        ]

    def _top_k(self, batch):
        """The best k pieces at every position: [rows, L, k] leave the devices, not
        [rows, L, V]."""
        n = len(batch["input_ids"])
        rows = -(-n // self.data_size) * self.data_size
        padded = {k: np.pad(v, ((0, rows - n), (0, 0))) for k, v in batch.items()}
        with jax.set_mesh(self.mesh):
            probs = self.step(
                self.pretrained.params, sharding.global_batch(padded, self.mesh, self.rules)
            )
            top_p, top_i = jax.device_get(jax.lax.top_k(probs, self.top_k))
        return np.asarray(top_p)[:n], np.asarray(top_i)[:n]

    def _filled(self, index, line, ids, top_p, top_i) -> dict:
        ids, masks = list(ids), []
        for pos in np.flatnonzero(np.asarray(ids) == self.tokenizer.mask_id):
            candidates = [
                {"token": self.tokenizer.id_to_token(int(t)), "id": int(t), "score": float(p)}
                for t, p in zip(top_i[pos], top_p[pos], strict=True)
            ]
            masks.append({"position": int(pos), "candidates": candidates})
            ids[pos] = candidates[0]["id"]
        if not masks:
            raise ValueError(f"line {index + 1} has no {MASK}: {line!r}")
        filled = self.tokenizer.decode(ids[1:-1])
        return {"line_index": index, "text": line, "masks": masks, "filled": filled}

    def run(self, lines: Iterator[str], batch_size: int = 256) -> Iterator[dict]:
        for chunk in _rows(lines, batch_size):
            yield from self.answer(chunk)


_INPUTS = ("input_ids", "input_mask", "segment_ids")
_PACKING = ("example_ids", "position_ids", "cls_positions")
# Rows of max_seq_length a device computes in one dispatch: larger matrices than a batch of
# 32 short lines packed (5 or so rows), few enough to keep a CPU's caches warm.
_STEP_ROWS = 32


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError("--top_k and --batch_size must be positive")
    if args.task == "embed":
        embed.check_output(args.output)  # before the model loads
    if args.task == "search" and not (args.corpus and files.isfile(args.corpus)):
        raise FileNotFoundError(f"search needs --corpus, a file of lines: {args.corpus!r}")
    mesh = sharding.make_mesh(sharding.MeshConfig())
    if args.text is not None:
        lines: Iterator[str] = iter([args.text])
    elif args.input:
        lines = files.open(args.input, encoding="utf-8")  # noqa: SIM115 (streamed, closed at exit)
    else:
        lines = sys.stdin
    if args.task in ("embed", "search"):
        _embed_or_search(args, lines, mesh)
        return
    predictor = Predictor(
        args.task,
        args.model,
        max_seq_length=args.max_seq_length or 128,
        top_k=args.top_k,
        mesh=mesh,
        quantization=args.quantization,
        data_dir=args.data_dir,
    )
    out = files.open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for answer in predictor.run(lines, args.batch_size):
            out.write(json.dumps(answer, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()


def _embed_or_search(args, lines: Iterator[str], mesh) -> None:
    """`embed`: every line's vector; `search`: every line's `--top_k` best lines of
    `--corpus` (embedded first, without the queries' prompt unless `--corpus_prompt*`)."""
    embedder = embed.Embedder(
        args.model,
        pooling_modes=args.pooling.split(",") if args.pooling else None,
        normalize={"": None, "true": True, "false": False}[args.normalize],
        max_seq_length=args.max_seq_length,
        mesh=mesh,
    )
    prompts = {"prompt": args.prompt, "prompt_name": args.prompt_name}
    if args.task == "embed":
        embed.write_embeddings(embedder, lines, args.output, batch_size=args.batch_size, **prompts)
        return
    with files.open(args.corpus, encoding="utf-8") as f:
        corpus = [line.rstrip("\n") for line in f]
    vectors = embedder.encode(
        corpus, prompt=args.corpus_prompt, prompt_name=args.corpus_prompt_name
    )
    index = search.Index(vectors, similarity=args.similarity or embedder.spec.similarity, mesh=mesh)
    out = files.open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for chunk in embed.chunks(lines, args.batch_size):
            scores, ids = index.search(embedder.encode(chunk, **prompts), args.top_k)
            for query, row_scores, row_ids in zip(chunk, scores, ids, strict=True):
                hits = [
                    {"id": int(i), "score": round(float(s), 6), "text": corpus[i]}
                    for s, i in zip(row_scores, row_ids, strict=True)
                ]
                out.write(json.dumps({"query": query, "hits": hits}, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bert_jax.tools.predict", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "task",
        help="fill-mask, next-sentence, embed, search, task (a finetune.py run's own), a "
        "task's name (sst2, squad_v2, conll2003, swag, classify:<folder>, tag:<folder>, ...), "
        "classify, qa or ner",
    )
    tools.add_model_flags(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="one line to answer")
    source.add_argument("--input", help="a file of lines (default: stdin)")
    parser.add_argument(
        "--output", help="JSON lines file (default: stdout); for embed also a .npy file"
    )
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument(
        "--max_seq_length",
        type=int,
        default=None,
        help="where lines are cut (default 128; embed: the model folder's length)",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=256,
        help="lines read, answered and written at a time (computed in rows of up to 32 a device)",
    )
    parser.add_argument(
        "--data_dir", default="", help="where a classify:/tag: folder's labels.txt is read from"
    )
    embedding = parser.add_argument_group("embed")
    embedding.add_argument("--prompt", default=None, help='text put before every line ("query: ")')
    embedding.add_argument("--prompt_name", default=None, help="one of the model's prompts")
    modes = ", ".join(pooling.MODES)
    embedding.add_argument(
        "--pooling",
        default="",
        help=f"comma-separated modes of {modes} (default: the sentence-transformers "
        "folder's, else mean)",
    )
    embedding.add_argument(
        "--normalize", default="", choices=("", "true", "false"),
        help="unit-length vectors (default: as the folder says; others: false)",
    )  # fmt: skip
    embedding.add_argument("--corpus", default="", help="search: a file of lines to search")
    embedding.add_argument("--corpus_prompt", default=None, help="search: the corpus's prompt")
    embedding.add_argument("--corpus_prompt_name", default=None, help='search: e.g. "passage"')
    embedding.add_argument(
        "--similarity", default="", choices=("", *search.SIMILARITIES),
        help="search: cosine or dot (default: the model folder's, else cosine)",
    )  # fmt: skip
    return parser


if __name__ == "__main__":
    cli.run(main)
