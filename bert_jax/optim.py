"""optax chains for the family's recipes: BERT's (warmup + linear decay, AdamW or LAMB) and
ModernBERT's (StableAdamW, warmup-stable-decay); no weight decay on norms and biases."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

_OPTIMIZERS = ("adamw", "lamb", "stable_adamw")
_SCHEDULES = ("linear", "wsd-linear", "wsd-1-sqrt")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The original BERT optimizer: AdamW(0.9, 0.999, eps 1e-6), weight decay 0.01 except
    LayerNorm parameters and biases, global-norm clipping at 1.0, linear warmup then linear
    decay to zero at `total_steps`. `lamb` is the large-batch alternative (You et al., 2019).
    `grad_accum_steps` splits every batch into that many micro-batches (see `bert_jax.training`).

    ModernBERT's recipe: `stable_adamw` (Wortsman et al., 2023: AdamW whose step of each
    tensor is divided by max(1, RMS(g^2 / v)), update clipping in place of gradient clipping
    (`clip_norm` 0 turns the latter off), with weight decay decoupled from the learning rate:
    `weight_decay` x (rate / peak rate) of each weight per step, as optimi's StableAdamW) and
    a warmup-stable-decay schedule (`wsd-linear`, `wsd-1-sqrt`: warmup, the peak rate, then
    the last `decay_steps` down to zero, linearly or as 1 - sqrt(progress); none when 0)."""

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
    schedule: str = "linear"
    decay_steps: int = 0

    def __post_init__(self):
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r}; use one of {_OPTIMIZERS}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; use one of {_SCHEDULES}")
        if self.clip_norm < 0:
            raise ValueError(f"optim.clip_norm must be >= 0 (0: no clipping), got {self.clip_norm}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps})"
            )
        wsd = self.schedule != "linear"
        if wsd and not 0 <= self.decay_steps <= self.total_steps - self.warmup_steps:
            raise ValueError(
                f"optim.schedule={self.schedule!r} needs 0 <= decay_steps ({self.decay_steps}) "
                f"<= total_steps - warmup_steps ({self.total_steps - self.warmup_steps})"
            )
        if self.learning_rate <= 0 or self.grad_accum_steps < 1:
            raise ValueError("learning_rate must be positive and grad_accum_steps at least 1")


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak rate, then linear decay to 0 at `total_steps`; or
    (warmup-stable-decay) the peak rate until the last `decay_steps`, then down to 0."""
    peak = config.learning_rate
    warmup = optax.linear_schedule(0.0, peak, max(config.warmup_steps, 1))
    if config.schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, max(config.total_steps - config.warmup_steps, 1))
        return optax.join_schedules([warmup, decay], [config.warmup_steps])
    n = config.decay_steps
    if not n:  # warmup, then the peak rate to the end (a phase that another one decays)
        return optax.join_schedules([warmup, optax.constant_schedule(peak)], [config.warmup_steps])

    def decay(step):
        progress = jnp.clip(step / n, 0.0, 1.0)
        shape = progress if config.schedule == "wsd-linear" else jnp.sqrt(progress)
        return peak * (1.0 - shape)

    stable_until = config.total_steps - n
    return optax.join_schedules(
        [warmup, optax.constant_schedule(peak), decay], [config.warmup_steps, stable_until]
    )


def decay_mask(params):
    """True for weights that get weight decay: all but biases and LayerNorm parameters.

    The original excludes any name containing `bias`, `LayerNorm` or `layer_norm`.
    """

    def decays(path, _) -> bool:
        keys = [str(getattr(k, "key", k)) for k in path]
        return "bias" not in keys[-1] and not any("layer_norm" in k for k in keys)

    return jax.tree_util.tree_map_with_path(decays, params)


class StableAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_stable_adam(
    b1: float, b2: float, eps: float, weight_decay: float, mask
) -> optax.GradientTransformation:
    """StableAdamW's direction before the learning rate: Adam's bias-corrected step plus
    `weight_decay` x the weight (where `mask` says), each tensor's divided by
    max(1, RMS(g^2 / max(v, eps^2))), the update clipping of Wortsman et al. (2023)."""

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return StableAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update(updates, state, params):
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        t = count.astype(jnp.float32)
        c1, c2 = 1 - b1**t, 1 - b2**t

        def step(g, m, v, p, decays):
            v_hat = v / c2
            rms = jnp.sqrt(jnp.mean(g * g / jnp.maximum(v_hat, eps * eps)))
            direction = (m / c1) / (jnp.sqrt(v_hat) + eps)
            if decays:
                direction = direction + weight_decay * p
            return (direction / jnp.maximum(1.0, rms)).astype(g.dtype)

        out = jax.tree.map(step, updates, mu, nu, params, mask(params))
        return out, StableAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Clipping (unless `clip_norm` is 0), then AdamW, LAMB or StableAdamW on the schedule,
    with the no-decay mask."""
    schedule = make_schedule(config)
    clip = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    if config.name == "stable_adamw":
        direction = scale_by_stable_adam(
            config.b1, config.b2, config.eps, config.weight_decay / config.learning_rate, decay_mask
        )
        return optax.chain(*clip, direction, optax.scale_by_learning_rate(schedule))
    kwargs = dict(
        learning_rate=schedule,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    opt = optax.adamw(**kwargs) if config.name == "adamw" else optax.lamb(**kwargs)
    return optax.chain(*clip, opt)


def restart_schedule(opt_state):
    """The optimizer state with its learning-rate schedule back at its first step and the
    moments kept: a phase that continues another's optimizer state (`init_optimizer`) but
    runs a schedule of its own (LAMB's phase 2, ModernBERT's context extension) must not
    read it at the previous phase's step count, past its end, where the rate is 0."""
    if isinstance(opt_state, optax.ScaleByScheduleState):
        return opt_state._replace(count=opt_state.count * 0)
    if isinstance(opt_state, tuple) and hasattr(opt_state, "_fields"):
        return type(opt_state)(*(restart_schedule(x) for x in opt_state))
    if isinstance(opt_state, (tuple, list)):
        return type(opt_state)(restart_schedule(x) for x in opt_state)
    return opt_state
