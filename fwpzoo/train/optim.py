"""The optimizer: AdamW on a warmup-cosine schedule after global-norm clipping."""

import jax
import optax
from flax import nnx

from fwpzoo.config import TrainConfig
from fwpzoo.layers.params import GateParam, ScaleParam


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to cfg.learning_rate, then cosine decay to its end ratio at cfg.steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_learning_rate_ratio,
    )


def decayed(param) -> bool:
    """Whether weight decay applies to one parameter, by its role (fwpzoo.layers.params): to
    weights (plain nnx.Param: kernels, the embedding, slow-weight matrices), not to gates, decays
    and per-head scalars (GateParam) nor norms' scales (ScaleParam), whatever their rank."""
    return isinstance(param, nnx.Param) and not isinstance(param, (GateParam, ScaleParam))


def decay_mask(params):
    """params (an nnx.State of parameters) -> the same tree with each array replaced by
    decayed(its parameter)."""
    return jax.tree.map(
        lambda param: jax.tree.map(lambda _: decayed(param), param),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
