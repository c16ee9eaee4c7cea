"""Building a run's model and train state from its config, concretely or as shapes only."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from fwpzoo.config import Config
from fwpzoo.models import build_model
from fwpzoo.train.checkpoint import abstract_with_sharding
from fwpzoo.train.sharding import replicated


def new_model(cfg: Config, vocab_size: int):
    """The model of `cfg`: parameters drawn from train.seed, compute in train.compute_dtype."""
    return build_model(
        cfg.model,
        vocab_size=vocab_size,
        rngs=nnx.Rngs(cfg.train.seed),
        dtype=jnp.dtype(cfg.train.compute_dtype),
    )


def split_model(model) -> tuple[nnx.GraphDef, dict]:
    """model -> (graphdef, {"params": its nnx.Param leaves, "rest": its other variables})."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, {"params": params, "rest": rest}


def abstract_model(cfg: Config, vocab_size: int, mesh: Mesh) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, {"params", "rest"} as replicated shapes) without allocating any parameter.

    Building it runs every name check of the model registries, so this is also how a config's
    model section is validated before anything is written.
    """
    graphdef, model_state = split_model(nnx.eval_shape(lambda: new_model(cfg, vocab_size)))
    return graphdef, abstract_with_sharding(model_state, replicated(mesh))


def init_train_state(cfg: Config, vocab_size: int, optimizer: optax.GradientTransformation, mesh):
    """{"params", "rest", "opt_state"}, created directly on the mesh, replicated."""

    def init():
        _, model_state = split_model(new_model(cfg, vocab_size))
        return {**model_state, "opt_state": optimizer.init(model_state["params"])}

    # waited for, so a model too large for memory fails here, before the run writes anything
    return jax.block_until_ready(jax.jit(init, out_shardings=replicated(mesh))())


def abstract_train_state(cfg: Config, vocab_size: int, optimizer, mesh: Mesh) -> dict:
    """The shapes of init_train_state, replicated on the mesh: the target of a restore."""
    _, model_state = abstract_model(cfg, vocab_size, mesh)
    opt_state = jax.eval_shape(optimizer.init, model_state["params"])
    return {**model_state, "opt_state": abstract_with_sharding(opt_state, replicated(mesh))}
