"""Sentence embeddings from token vectors: the pooling modes of sentence-transformers.

Each mode reads the encoder's last hidden states of a right-padded batch and its mask, as
sentence-transformers' `Pooling` module does, so that a sentence-transformers model embeds
here as it does there: `cls` (the first pooled position), `max`, `mean`,
`mean_sqrt_len_tokens` (the sum over the square root of the length), `weightedmean` (position
i weighs i + 1) and `lasttoken`. Several modes concatenate in the order given. A prompt's
tokens (after [CLS]) are left out of the pooling when `prompt_length` is given, as the
module's `include_prompt=False` does (its `cls` then reads the first token after the prompt).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """The modes as a tuple, refused (naming the valid ones) when one is unknown or none given."""
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"pooling mode(s) {bad or '(none)'} unknown; use one or more of {MODES}")
    return modes


def pool(
    hidden: jax.Array,
    mask: jax.Array,
    modes: Sequence[str],
    prompt_length: jax.Array | int | None = None,
) -> jax.Array:
    """Sentence vectors of a right-padded batch.

    Args:
      hidden: [B, L, D] the encoder's last hidden states (pooled in float32).
      mask: [B, L] 1 for a real token, 0 for padding.
      modes: names from `MODES`, concatenated in this order.
      prompt_length: the prompt's tokens counting [CLS] (a scalar, the same for the batch),
        left out of the pooling; None keeps every token.

    Returns:
      [B, len(modes) * D] float32.
    """
    hidden = hidden.astype(jnp.float32)
    length = hidden.shape[1]
    position = jnp.arange(length)
    full = mask.astype(jnp.float32)
    pooled = full if prompt_length is None else full * (position >= prompt_length)
    weight = pooled[..., None]
    outputs = []
    for mode in check_modes(modes):
        if mode == "cls":  # the first position still pooled
            first = jnp.argmax(pooled, axis=1)
            outputs.append(jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0])
        elif mode == "max":
            # Padding at -1e9, not sentence-transformers' -inf (the same vector for any text
            # with a token): with -inf, XLA:CPU took minutes to compile a GradCache train
            # step over 8 devices (-1e9: 15 s), and a text with no token pooled is finite.
            outputs.append(jnp.max(jnp.where(weight > 0, hidden, -1e9), axis=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = jnp.einsum("bl,bld->bd", pooled, hidden)
            count = jnp.maximum(pooled.sum(axis=1, keepdims=True), 1e-9)
            outputs.append(total / (count if mode == "mean" else jnp.sqrt(count)))
        elif mode == "weightedmean":
            weights = pooled * (position + 1.0)
            total = jnp.einsum("bl,bld->bd", weights, hidden)
            outputs.append(total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-9))
        else:  # lasttoken: the last real token (a batch is right-padded)
            last = jnp.maximum(full.sum(axis=1).astype(jnp.int32) - 1, 0)
            token = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
            outputs.append(token * jnp.take_along_axis(pooled, last[:, None], axis=1))
    return jnp.concatenate(outputs, axis=-1)


def normalize(x: jax.Array) -> jax.Array:
    """Each vector over its L2 norm (at least 1e-12), as `torch.nn.functional.normalize`."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pool_packed(
    hidden: jax.Array,
    example_ids: jax.Array,
    position_ids: jax.Array,
    cls_positions: jax.Array,
    modes: Sequence[str],
    prompt_length: jax.Array | int = 0,
) -> jax.Array:
    """`pool` for rows that hold several examples (`models.Packing`): each example's vector
    is what `pool` gives for the example alone.

    Args:
      hidden: [R, L, D] the encoder's last hidden states.
      example_ids: [R, L] 1, 2, ... for each row's examples, 0 for padding.
      position_ids: [R, L] each token's position in its example (0 at its [CLS]).
      cls_positions: [R, K] where each example starts.
      prompt_length: the prompt's tokens counting [CLS], left out of the pooling (0: none).

    Returns:
      [R, K, len(modes) * D] float32 (unused slots hold zeros).
    """
    hidden = hidden.astype(jnp.float32)
    rows, length, _ = hidden.shape
    slots = cls_positions.shape[1]
    member = example_ids[:, :, None] == jnp.arange(1, slots + 1)  # [R, L, K]
    pooled = (member & (position_ids >= prompt_length)[:, :, None]).astype(jnp.float32)
    sizes = member.sum(axis=1)  # [R, K] each example's tokens
    outputs = []
    for mode in check_modes(modes):
        if mode == "cls":  # the first position still pooled (the [CLS] without a prompt)
            skip = jnp.where(sizes > prompt_length, prompt_length, 0)
            outputs.append(_gather(hidden, cls_positions + skip))
        elif mode == "max":
            segment = example_ids - 1 + slots * jnp.arange(rows)[:, None]  # row r's slot k
            counted = (example_ids > 0) & (position_ids >= prompt_length)
            segment = jnp.where(counted, segment, rows * slots)  # the rest: one spare segment
            best = jax.ops.segment_max(
                hidden.reshape(rows * length, -1), segment.reshape(-1), rows * slots + 1
            )
            outputs.append(best[: rows * slots].reshape(rows, slots, -1))
        elif mode in ("mean", "mean_sqrt_len_tokens", "weightedmean"):
            weights = pooled
            if mode == "weightedmean":
                weights = pooled * (position_ids + 1.0)[:, :, None]
            total = jnp.einsum("rlk,rld->rkd", weights, hidden)
            count = jnp.maximum(weights.sum(axis=1)[..., None], 1e-9)
            outputs.append(total / (jnp.sqrt(count) if mode == "mean_sqrt_len_tokens" else count))
        else:  # lasttoken
            last = cls_positions + jnp.maximum(sizes - 1, 0)
            kept = (sizes > prompt_length) | (prompt_length == 0)
            outputs.append(_gather(hidden, last) * kept[..., None])
    out = jnp.concatenate(outputs, axis=-1)
    return jnp.where((sizes > 0)[..., None], out, 0.0)


def _gather(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """[R, K, D]: row r's vector at positions[r, k]."""
    return jnp.take_along_axis(hidden, positions[:, :, None], axis=1)
