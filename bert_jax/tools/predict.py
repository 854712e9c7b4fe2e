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
- `classify` (a sequence classifier, e.g. a `finetune.py` GLUE run): for a line or `A ||| B`,
  each label's probability and the best label.
- `qa` (a SQuAD model): for `question ||| context`, the best answer span of the context and
  its probability among the n best, decoded as `finetune.py` decodes SQuAD (windows over long
  contexts, the max-context rule), and `null_odds`, the no-answer score minus the span's: a
  SQuAD 2.0 model answers nothing where it exceeds the threshold tuned on dev (`results.json`).
- `ner` (a token classifier, e.g. a CoNLL-2003 run): for a line of words, each word's tag and
  the entities (type, words, first and last word index).
Label names come from the model (a `finetune.py` run records them; a Hugging Face directory's
`id2label`).
"""

import argparse
import json
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import cli, convert, files, models, objectives, sharding
from bert_jax.tasks import conll, squad

MASK = "[MASK]"
TASKS = ("fill-mask", "next-sentence", "classify", "qa", "ner")
_ARCHITECTURES = {
    "fill-mask": "BertForMaskedLM",
    "next-sentence": "BertForPreTraining",
    "classify": "BertForSequenceClassification",
    "qa": "BertForQuestionAnswering",
    "ner": "BertForTokenClassification",
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
    chunk = []
    for index, line in enumerate(lines):
        chunk.append((index, line.rstrip("\n")))
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Predictor:
    """A model loaded once, answering batches of lines for one task."""

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
    ):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
        self.task, self.top_k, self.rules = task, top_k, rules
        self.mesh = mesh or sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
        architecture = _ARCHITECTURES[task]
        num_labels, labels = head_labels(model) if task in ("classify", "ner") else (2, None)
        self.labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
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
        self.max_seq_length = min(max_seq_length, self.config.max_position_embeddings)
        cls = convert.model_class(architecture, num_labels)
        graphdef, _ = models.split_params(models.abstract_model(self.config, cls))
        self.data_size = sharding.data_parallel_size(self.mesh, rules)
        objective = {
            "classify": objectives.classification(num_labels),
            "qa": objectives.QUESTION_ANSWERING,
            "ner": objectives.token_classification(num_labels),
        }.get(task)

        def head(params, batch):
            return objective.predict(models.merge_params(graphdef, params), batch)

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

        self.step = jax.jit({"fill-mask": fill, "next-sentence": nsp}.get(task, head))

    def encode(self, line: str) -> tuple[list[int], list[int]]:
        """(ids with [CLS]/[SEP], segment ids), cut to max_seq_length."""
        tok = self.tokenizer
        if self.task == "fill-mask":
            ids = [tok.cls_id, *encode_masked(line, tok)][: self.max_seq_length - 1]
            return ids + [tok.sep_id], [0] * (len(ids) + 1)
        if "|||" not in line:
            raise ValueError(f"next-sentence takes 'A ||| B' lines, not {line!r}")
        a, b = (tok.encode(t.strip()) for t in line.split("|||", 1))
        while len(a) + len(b) > self.max_seq_length - 3:
            (a if len(a) > len(b) else b).pop()
        ids = [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
        return ids, [0] * (len(a) + 2) + [1] * (len(b) + 1)

    def _outputs(self, features: dict[str, np.ndarray]):
        """The jitted head over rows of features, padded to the devices, cut back."""
        n = len(features["input_ids"])
        rows = -(-n // self.data_size) * self.data_size
        batch = {
            k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)])
            for k, v in features.items()
            if k in ("input_ids", "input_mask", "segment_ids")
        }
        with jax.set_mesh(self.mesh):
            out = self.step(
                self.pretrained.params, sharding.global_batch(batch, self.mesh, self.rules)
            )
            return jax.tree.map(lambda x: np.asarray(x)[:n], jax.device_get(out))

    def _classify(self, chunk) -> list[dict]:
        tok, out = self.tokenizer, []
        rows = np.zeros((len(chunk), self.max_seq_length), np.int32)
        mask, segments = np.zeros_like(rows), np.zeros_like(rows)
        for i, (_, line) in enumerate(chunk):
            a, _, b = line.partition("|||")
            ids_a = tok.encode(a.strip())
            ids_b = tok.encode(b.strip()) if b else None
            room = self.max_seq_length - (3 if ids_b is not None else 2)
            while len(ids_a) + len(ids_b or []) > room:
                (ids_a if ids_b is None or len(ids_a) > len(ids_b) else ids_b).pop()
            ids = [tok.cls_id, *ids_a, tok.sep_id]
            seg = [0] * len(ids)
            if ids_b is not None:
                ids += [*ids_b, tok.sep_id]
                seg += [1] * (len(ids_b) + 1)
            rows[i, : len(ids)], mask[i, : len(ids)], segments[i, : len(ids)] = ids, 1, seg
        logits = self._outputs({"input_ids": rows, "input_mask": mask, "segment_ids": segments})
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for (index, line), p in zip(chunk, probs, strict=True):
            scores = {name: float(x) for name, x in zip(self.labels, p, strict=True)}
            best = self.labels[int(p.argmax())]
            out.append({"line_index": index, "text": line, "label": best, "scores": scores})
        return out

    def _qa(self, chunk) -> list[dict]:
        examples = []
        for index, line in chunk:
            question, sep, context = line.partition("|||")
            if not sep:
                raise ValueError(f"qa takes 'question ||| context' lines, not {line!r}")
            examples.append(squad.Example(str(index), question.strip(), context.strip(), ()))
        windows = squad.WindowConfig(self.max_seq_length, min(128, self.max_seq_length // 2))
        features = squad.make_features(examples, self.tokenizer, windows)
        start, end = self._outputs(features.inputs())
        v2 = squad.DecodeConfig(version_2_with_negative=True)
        decoded = squad.decode(examples, features, start, end, v2)
        out = []
        for (index, line), example in zip(chunk, examples, strict=True):
            p = decoded[example.qas_id]
            probability = dict(p.nbest).get(p.best_span, 0.0)
            answer = {"answer": p.best_span, "probability": probability, "null_odds": p.null_odds}
            out.append({"line_index": index, "text": line, **answer})
        return out

    def _ner(self, chunk) -> list[dict]:
        sentences = [
            conll.Sentence(tuple(line.split()), ("O",) * len(line.split())) for _, line in chunk
        ]
        features = conll.make_features(sentences, self.tokenizer, self.labels, self.max_seq_length)
        tags = conll.decode(sentences, features, self._outputs(features.inputs()), self.labels)
        out = []
        for (index, line), sentence, t in zip(chunk, sentences, tags, strict=True):
            entities = [
                {"type": kind, "text": " ".join(sentence.words[a : b + 1]), "start": a, "end": b}
                for kind, a, b in conll.entities(t)
            ]
            out.append({"line_index": index, "text": line, "tags": t, "entities": entities})
        return out

    def answer(self, chunk: Sequence[tuple[int, str]]) -> list[dict]:
        handler = {"classify": self._classify, "qa": self._qa, "ner": self._ner}.get(self.task)
        if handler is not None:
            return handler(chunk)
        encoded = [self.encode(line) for _, line in chunk]
        rows = -(-len(chunk) // self.data_size) * self.data_size
        length = _bucket(max(len(ids) for ids, _ in encoded), self.max_seq_length)
        batch = {k: np.zeros((rows, length), np.int32) for k in ("input_ids", "input_mask")}
        batch["segment_ids"] = np.zeros((rows, length), np.int32)
        for i, (ids, segments) in enumerate(encoded):
            batch["input_ids"][i, : len(ids)] = ids
            batch["input_mask"][i, : len(ids)] = 1
            batch["segment_ids"][i, : len(ids)] = segments
        with jax.set_mesh(self.mesh):
            probs = self.step(
                self.pretrained.params, sharding.global_batch(batch, self.mesh, self.rules)
            )
            if self.task == "fill-mask":
                masked = batch["input_ids"] == self.tokenizer.mask_id
                # The best k at every position leave the devices, not [rows, L, V].
                top_p, top_i = jax.device_get(jax.lax.top_k(probs, self.top_k))
            else:
                pairs = np.asarray(jax.device_get(probs))
        out = []
        for i, (index, line) in enumerate(chunk):
            if self.task == "next-sentence":
                out.append({"line_index": index, "text": line, "is_next": float(pairs[i, 0])})
                continue
            ids = list(batch["input_ids"][i, : len(encoded[i][0])])
            masks = []
            for pos in np.flatnonzero(masked[i]):
                candidates = [
                    {
                        "token": self.tokenizer.id_to_token(int(t)),
                        "id": int(t),
                        "score": float(p),
                    }
                    for t, p in zip(top_i[i, pos], top_p[i, pos], strict=True)
                ]
                masks.append({"position": int(pos), "candidates": candidates})
                ids[pos] = candidates[0]["id"]
            if not masks:
                raise ValueError(f"line {index + 1} has no {MASK}: {line!r}")
            filled = self.tokenizer.decode(ids[1:-1])
            out.append({"line_index": index, "text": line, "masks": masks, "filled": filled})
        return out

    def run(self, lines: Iterator[str], batch_size: int = 32) -> Iterator[dict]:
        for chunk in _rows(lines, batch_size):
            yield from self.answer(chunk)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bert_jax.tools.predict", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--model", required=True, help="hf:DIR, tf:DIR or a bert_jax workdir")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="one line to answer")
    source.add_argument("--input", help="a file of lines (default: stdin)")
    parser.add_argument("--output", help="JSON lines file (default: stdout)")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--quantization",
        default="",
        choices=("", *models.layers.QUANTIZATION),
        help="int8 or int8-dynamic: quantize the model's weights as it loads (models.quantize); "
        "none: float weights; default: as the model holds them",
    )
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError("--top_k and --batch_size must be positive")
    mesh = sharding.make_mesh(sharding.MeshConfig())
    predictor = Predictor(
        args.task,
        args.model,
        max_seq_length=args.max_seq_length,
        top_k=args.top_k,
        mesh=mesh,
        quantization=args.quantization,
    )
    if args.text is not None:
        lines: Iterator[str] = iter([args.text])
    elif args.input:
        lines = files.open(args.input, encoding="utf-8")  # noqa: SIM115 (streamed, closed at exit)
    else:
        lines = sys.stdin
    out = files.open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for answer in predictor.run(lines, args.batch_size):
            out.write(json.dumps(answer, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":
    cli.run(main)
