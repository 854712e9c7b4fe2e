"""optax chains for BERT: warmup + linear decay, AdamW or LAMB, no decay on LayerNorm/bias."""

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The original BERT optimizer: AdamW(0.9, 0.999, eps 1e-6), weight decay 0.01 except
    LayerNorm parameters and biases, global-norm clipping at 1.0, linear warmup then linear
    decay to zero at `total_steps`. `lamb` is the large-batch alternative (You et al., 2019).
    `grad_accum_steps` splits every batch into that many micro-batches (see `bert_jax.training`)."""

    name: str = "adamw"
    learning_rate: float = 1e-4
    warmup_steps: int = 10000
    total_steps: int = 1000000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.name not in ("adamw", "lamb"):
            raise ValueError(f"optim.name={self.name!r}; use 'adamw' or 'lamb'")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps})"
            )
        if self.learning_rate <= 0 or self.grad_accum_steps < 1:
            raise ValueError("learning_rate must be positive and grad_accum_steps at least 1")


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak rate, then linear decay to 0 at `total_steps`."""
    warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
    decay = optax.linear_schedule(
        config.learning_rate, 0.0, max(config.total_steps - config.warmup_steps, 1)
    )
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def decay_mask(params):
    """True for weights that get weight decay: all but biases and LayerNorm parameters.

    The original excludes any name containing `bias`, `LayerNorm` or `layer_norm`.
    """

    def decays(path, _) -> bool:
        keys = [str(getattr(k, "key", k)) for k in path]
        return "bias" not in keys[-1] and not any("layer_norm" in k for k in keys)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Clipping, then AdamW or LAMB on the schedule, with the no-decay mask."""
    schedule = make_schedule(config)
    kwargs = dict(
        learning_rate=schedule,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    opt = optax.adamw(**kwargs) if config.name == "adamw" else optax.lamb(**kwargs)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
