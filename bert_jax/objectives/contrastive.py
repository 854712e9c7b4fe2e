"""Contrastive losses of sentence embeddings, and GradCache to train them at large batches.

The losses take embeddings, not models, as sentence-transformers' `compute_loss_from_embeddings`
does, and match it (tests/test_contrastive.py):

- `in_batch_negatives`: MultipleNegativesRankingLoss (InfoNCE): each anchor's positive among
  every candidate of the batch (all positives, then any hard negatives), cosine x `scale`;
  `symmetric` adds each positive finding its anchor (`directions=("query_to_doc",
  "doc_to_query")`, `partition_mode="per_direction"`).
- `cosent`: CoSENT for scored pairs: every pair of pairs ordered by their gold scores.
- `matryoshka`: a loss applied to nested prefixes of the vectors and summed, weighted.

Computed on global arrays, the loss of a batch split over devices and hosts is the loss over
the whole global batch: the similarity matrix of sharded embeddings makes the compiler gather
the embeddings (a [B, D] array, not the tokens), so every anchor meets global batch - 1
negatives. `grad_cache` computes the same loss and gradients while holding the activations
of one chunk of the batch at a time (Gao et al., 2021).

In `grad_cache`, chunk c holds rows c, c + C, c + 2C, ... of the N rows (C = N / chunk_size
chunks), as gradient accumulation's micro-batches do: every device's rows of a batch split
over the devices are spread evenly over the chunks, so forming them moves no data and each
chunk keeps every device busy. Each of `replicas` (the batch split over the `spmd_axis_name`
mesh axis of that size; 1: the whole chunk at once) embeds and differentiates its own rows
of a chunk (`vmap` over the axis) and keeps its own gradient, summed across replicas once
after the last chunk: otherwise the partitioner sums every chunk's gradient across the
replicas, an all-reduce of the whole gradient per chunk. `embed` sees one replica's rows
(its sharding rules must not split them over that axis). Replica r of chunk c draws its
dropout from `fold_in(fold_in(rng, c), r)` in both passes, so the two embeddings of a chunk
are the same: the result equals differentiating `loss(embed(...))` of the whole batch with
those dropout keys, up to float rounding.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from bert_jax import models
from bert_jax.models import pooling
from bert_jax.objectives.base import Batch, Objective

TEXT_KEYS = ("input_ids", "input_mask", "segment_ids")
KINDS = ("ranking", "scored")


def cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
    """[A, B] cosine similarities of [A, D] and [B, D] (vectors of norm 0 score 0)."""
    a, b = pooling.normalize(a.astype(jnp.float32)), pooling.normalize(b.astype(jnp.float32))
    return a @ b.T


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def in_batch_negatives(
    anchors: jax.Array,
    candidates: jax.Array,
    scale: float = 20.0,
    symmetric: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MultipleNegativesRankingLoss of a batch.

    Args:
      anchors: [B, D] the anchors' embeddings (queries).
      candidates: [(1 + n) * B, D]: the B positives (row i is anchor i's), then n blocks of B
        hard negatives (block j row i: anchor i's j-th negative).
      scale: the cosine similarities' multiplier (1 / temperature).
      symmetric: also each positive's cross-entropy of finding its anchor among the anchors.

    Returns:
      (the mean loss, {"loss_sum", "correct_sum", "count"}: sums for the logs; correct counts
      anchors whose positive scores highest).
    """
    batch = anchors.shape[0]
    if candidates.shape[0] % batch:
        raise ValueError(
            f"candidates ({candidates.shape[0]}) must be the {batch} positives followed by "
            f"whole blocks of {batch} negatives"
        )
    scores = cosine_matrix(anchors, candidates) * scale  # [B, (1 + n) B]
    labels = jnp.arange(batch)
    per_anchor = _cross_entropy(scores, labels)
    if symmetric:
        backward = _cross_entropy(scores[:, :batch].T, labels)
        per_anchor = (per_anchor + backward) / 2
    correct = (jnp.argmax(scores, axis=-1) == labels).sum()
    loss = per_anchor.mean()
    sums = {"loss_sum": per_anchor.sum(), "correct_sum": correct, "count": jnp.float32(batch)}
    return loss, sums


def cosent(
    first: jax.Array, second: jax.Array, labels: jax.Array, scale: float = 20.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CoSENT of scored pairs: log(1 + sum over pairs (i, j) with label_i < label_j of
    exp(scale * (cos_i - cos_j))). `first`, `second`: [B, D]; `labels`: [B] gold scores."""
    scores = (
        jnp.sum(
            pooling.normalize(first.astype(jnp.float32))
            * pooling.normalize(second.astype(jnp.float32)),
            axis=-1,
        )
        * scale
    )
    differences = scores[:, None] - scores[None, :]
    ordered = labels[:, None] < labels[None, :]
    differences = jnp.where(ordered, differences, -jnp.inf)
    loss = jax.nn.logsumexp(jnp.concatenate([jnp.zeros(1), differences.reshape(-1)]))
    batch = jnp.float32(first.shape[0])
    return loss, {"loss_sum": loss * batch, "count": batch}


def matryoshka(
    loss: Callable[..., tuple[jax.Array, dict]],
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
) -> Callable[..., tuple[jax.Array, dict]]:
    """`loss(*embeddings, *rest)` applied to the first `d` dimensions of every embedding for
    each `d` of `dims`, summed with `weights` (1 each by default), as MatryoshkaLoss: the
    vectors stay good when cut to any of `dims`. `n_embeddings` leading arguments are cut."""
    weights = tuple(weights) if weights is not None else (1.0,) * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} weights for {len(dims)} matryoshka dims")

    def nested(*args, n_embeddings: int = 2, **kwargs):
        """The weighted sum of the losses, with the sums (for the logs) of the first of `dims`."""
        results = [
            loss(*[x[..., :dim] for x in args[:n_embeddings]], *args[n_embeddings:], **kwargs)
            for dim in dims
        ]
        total = sum(weight * value for weight, (value, _) in zip(weights, results, strict=True))
        return total, results[0][1]

    return nested


def _strided(x: jax.Array, chunks: int) -> jax.Array:
    """[N, ...] -> [chunks, N / chunks, ...]: chunk c holds rows c, c + chunks, ..."""
    return x.reshape(-1, chunks, *x.shape[1:]).swapaxes(0, 1)


def _per_replica(fn, chunk_inputs, key, *rest, replicas: int, axis: str | None):
    """`fn(replica's rows, replica's key, *rest's rows)` over the replicas: [R, ...]."""
    rows = functools.partial(jax.tree.map, lambda x: x.reshape(replicas, -1, *x.shape[1:]))
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(replicas))
    return jax.vmap(fn, spmd_axis_name=axis)(rows(chunk_inputs), keys, *rows(rest))


def grad_cache(
    embed: Callable[[object, dict, jax.Array], jax.Array],
    loss: Callable[[jax.Array], tuple[jax.Array, dict]],
    params,
    inputs: dict,
    rng: jax.Array,
    chunk_size: int,
    *,
    replicas: int = 1,
    spmd_axis_name: str | None = None,
) -> tuple[tuple[jax.Array, dict], object]:
    """The loss of a whole batch and its gradient with respect to `params`, computed with the
    activations of one chunk at a time (GradCache).

    1. Every chunk is embedded without keeping activations (its embeddings only).
    2. The loss of all the embeddings and its gradient with respect to each embedding.
    3. Each chunk is embedded again, now differentiated, and its embeddings' cached gradients
       are pulled back to the parameters (`jax.vjp`) and added up.
    The chunks' layout, the replicas and the dropout keys: see the module's docstring.

    Args:
      embed: `(params, chunk inputs, rng) -> [chunk, D]` embeddings.
      loss: `(embeddings [N, D]) -> (loss, sums)` over the whole batch's embeddings, in the
        order of the rows.
      inputs: arrays with a leading dimension N, a multiple of `chunk_size`, whose chunks
        are multiples of `replicas`.

    Returns:
      ((loss, sums), gradients like `params`).
    """
    n = jax.tree.leaves(inputs)[0].shape[0]
    if n % chunk_size or chunk_size % replicas:
        raise ValueError(
            f"the batch ({n} rows) must be a multiple of chunk_size={chunk_size}, itself a "
            f"multiple of the {replicas} replicas"
        )
    chunks = n // chunk_size
    split = functools.partial(_strided, chunks=chunks)
    per_replica = functools.partial(_per_replica, replicas=replicas, axis=spmd_axis_name)
    pieces = jax.tree.map(split, inputs)
    keys = jax.vmap(lambda c: jax.random.fold_in(rng, c))(jnp.arange(chunks))
    frozen = jax.lax.stop_gradient(params)
    embeddings = jax.lax.map(
        lambda c: per_replica(functools.partial(embed, frozen), *c).reshape(chunk_size, -1),
        (pieces, keys),
    )
    flat = embeddings.swapaxes(0, 1).reshape(n, *embeddings.shape[2:])
    (value, sums), cached = jax.value_and_grad(loss, has_aux=True)(flat)

    def pull_back(chunk_inputs, key, gradient):
        return jax.vjp(lambda p: embed(p, chunk_inputs, key), params)[1](gradient)[0]

    def add_chunk(total, chunk):
        return jax.tree.map(jnp.add, total, per_replica(pull_back, *chunk)), None

    zeros = jax.tree.map(lambda x: jnp.zeros((replicas, *x.shape), x.dtype), params)
    cached = split(cached).astype(embeddings.dtype)
    grads, _ = jax.lax.scan(add_chunk, zeros, (pieces, keys, cached))
    return (value, sums), jax.tree.map(lambda g: g.sum(0), grads)  # the one sum of replicas


@dataclasses.dataclass(frozen=True)
class Embedding:
    """How a sentence-embedding model trains: its texts' vectors (the encoder's last hidden
    states pooled with `modes`) and the loss of a batch's vectors.

    A batch holds T texts per example: `input_ids`, `input_mask`, `segment_ids` [B, T, L]
    (and `label` [B] float32 scores for "scored"). `kind` "ranking": (anchor, positive,
    hard negatives...) with `in_batch_negatives`; "scored": (first, second) with `cosent`
    against `label`. `matryoshka_dims`: the loss also on these prefixes of the vectors,
    summed. `chunk_size`: texts embedded at once by the train step's GradCache (a divisor of
    B x T); 0 embeds the whole batch at once, keeping every text's activations."""

    kind: str = "ranking"
    modes: tuple[str, ...] = ("mean",)
    scale: float = 20.0
    symmetric: bool = False
    matryoshka_dims: tuple[int, ...] = ()
    chunk_size: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"embedding loss kind {self.kind!r}; use one of {KINDS}")
        pooling.check_modes(self.modes)

    def embed(self, model, texts: Batch, rng, deterministic: bool) -> jax.Array:
        """[N, D] float32 vectors of N texts (`TEXT_KEYS` arrays [N, L])."""
        out = model(
            texts["input_ids"],
            texts["input_mask"],
            texts["segment_ids"],
            rng=rng,
            deterministic=deterministic,
        )
        return pooling.pool(out.sequence_output, texts["input_mask"], self.modes)

    def loss(self, vectors: jax.Array, batch: Batch) -> tuple[jax.Array, dict]:
        """The loss of [B, T, D] vectors, with its sums for the logs."""
        if self.kind == "ranking":
            anchors = vectors[:, 0]
            # The positives, then each block of the examples' j-th hard negatives.
            candidates = vectors[:, 1:].swapaxes(0, 1).reshape(-1, vectors.shape[-1])
            args, fn = (anchors, candidates), in_batch_negatives
            options = {"scale": self.scale, "symmetric": self.symmetric}
        else:
            args, fn = (vectors[:, 0], vectors[:, 1], batch["label"]), cosent
            options = {"scale": self.scale}
        if self.matryoshka_dims:
            return matryoshka(fn, self.matryoshka_dims)(*args, **options)
        return fn(*args, **options)


def texts_of(batch: Batch) -> Batch:
    """A batch's texts as rows: `TEXT_KEYS` [B, T, L] -> [B x T, L] (example-major, so rows
    stay on the device that held their example)."""
    return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in TEXT_KEYS}


def summarize(sums: dict) -> dict[str, float]:
    """The mean loss, and for ranking the fraction of anchors whose positive scored best."""
    count = max(float(sums["count"]), 1e-5)
    out = {"loss": float(sums["loss_sum"]) / count}
    if "correct_sum" in sums:
        out["accuracy"] = float(sums["correct_sum"]) / count
    return out


def embedding_objective(spec: Embedding) -> Objective:
    """The objective of a sentence-embedding model (the encoder without a head): `loss` over
    the whole batch (its train step uses GradCache when `spec.chunk_size` is set), `predict`
    the texts' vectors [B, T, D]."""

    def loss(model, batch, rng, deterministic):
        vectors = spec.embed(model, texts_of(batch), rng, deterministic)
        return spec.loss(vectors.reshape(*batch["input_ids"].shape[:2], -1), batch)

    def predict(model, batch):
        vectors = spec.embed(model, texts_of(batch), None, True)
        return vectors.reshape(*batch["input_ids"].shape[:2], -1)

    return Objective(models.make_encoder, loss, predict, summarize=summarize, embedding=spec)
