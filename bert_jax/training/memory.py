"""Memory of a train step by formula, where no compiled figure exists (the planner's first
cut, a user's sizing)."""

import jax.numpy as jnp

from bert_jax import sharding
from bert_jax.models import BertConfig, attention
from bert_jax.training.step import TrainState


def memory_estimate(
    config: BertConfig,
    abstract_state: TrainState,
    batch_per_device: int,
    seq_len: int,
    predictions: int,
    tensor_degree: int = 1,
) -> int:
    """Per-device bytes of a pretraining step by formula, where no compiled figure exists: the
    parameters, their gradients and the optimizer state as the state is sharded, and the
    activations (`activation_bytes_estimate`, with the attention the step runs on the
    target platform). Within 25% of XLA's compiled figure on CPU for the tiny and BERT-Base
    shapes (tests/test_aot.py)."""
    params = sharding.bytes_per_device(abstract_state.params)
    opt = sharding.bytes_per_device(abstract_state.opt_state)
    dropout = config.attention_probs_dropout_prob > 0
    window = config.attention_window
    fused = attention.fused_kernel(config.attention_kernel, seq_len, dropout, None, window) != "xla"
    activations = activation_bytes_estimate(
        config, batch_per_device, seq_len, predictions, tensor_degree, fused
    )
    return 2 * params + opt + activations


def activation_bytes_estimate(
    config: BertConfig,
    batch_per_device: int,
    seq_len: int,
    predictions: int = 0,
    tensor_degree: int = 1,
    fused_attention: bool = False,
) -> int:
    """Activation memory per device of a train step, estimated.

    The encoder: Korthikanti et al. (2022), eq. 2 and 4: per layer s*b*h*(10 + 24/t +
    5*a*s/(h*t)) bytes at 16 bits, scaled to the compute dtype; with remat "minimal" the
    attention scores are recomputed (their eq. 6, selective recomputation); with "full" each
    layer keeps its input, and the layer being recomputed holds its whole set at once. With
    `fused_attention` (the splash or flash-dropout kernel) no layer holds the 5*a*s*s*b
    bytes of scores, probabilities and dropout mask: the kernel keeps a float32 log-sum-exp
    per head and query (4*a*s*b bytes) and recomputes the rest tile by tile. The MLM head:
    float32 logits over the vocabulary at the `predictions` masked positions, their softmax
    and its gradient.
    """
    s, b, h, a, t = (
        seq_len,
        batch_per_device,
        config.hidden_size,
        config.num_attention_heads,
        tensor_degree,
    )
    scale = jnp.dtype(config.dtype).itemsize / 2
    rest = s * b * h * (10 + 24 / t) * scale
    scores = 4 * a * s * b / t if fused_attention else 5 * a * s * s * b / t * scale
    layers = config.num_hidden_layers
    if config.remat == "full":
        encoder = 2 * s * b * h * layers * scale + rest + scores
    elif config.remat == "minimal":
        encoder = rest * layers
    else:
        encoder = (rest + scores) * layers
    head = 3 * 4 * b * predictions * config.vocab_size / t
    return int(encoder + head)
