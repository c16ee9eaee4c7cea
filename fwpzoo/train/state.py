"""Building a run's model and train state from its config, concretely or as shapes only."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from fwpzoo.config import Config
from fwpzoo.models import build_model
from fwpzoo.train.sharding import state_shardings


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


def placed(abstract, shardings):
    """ShapeDtypeStructs of `abstract` on `shardings` (a tree of the same structure)."""
    return jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        abstract,
        shardings,
    )


def abstract_model(cfg: Config, vocab_size: int, mesh: Mesh) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, {"params", "rest"} as shapes on their shardings) without allocating any
    parameter.

    Building it runs every name check of the model registries, so this is also how a config's
    model section is validated before anything is written.
    """
    graphdef, model_state = split_model(nnx.eval_shape(lambda: new_model(cfg, vocab_size)))
    return graphdef, placed(model_state, state_shardings(model_state, mesh))


def train_state_fn(cfg: Config, vocab_size: int, optimizer: optax.GradientTransformation):
    """() -> {"params", "rest", "opt_state"}: the fresh train state of `cfg`."""

    def init():
        _, model_state = split_model(new_model(cfg, vocab_size))
        return {**model_state, "opt_state": optimizer.init(model_state["params"])}

    return init


def abstract_train_state(cfg: Config, vocab_size: int, optimizer, mesh: Mesh) -> dict:
    """The shapes of init_train_state on their shardings (parameters by the rules table, the
    optimizer state like its parameters): the target of a restore, onto any mesh."""
    abstract = jax.eval_shape(train_state_fn(cfg, vocab_size, optimizer))
    return placed(abstract, state_shardings(abstract, mesh))


def init_train_state(cfg: Config, vocab_size: int, optimizer: optax.GradientTransformation, mesh):
    """{"params", "rest", "opt_state"}, created directly on the mesh, each array on its shards."""
    init = train_state_fn(cfg, vocab_size, optimizer)
    shardings = state_shardings(jax.eval_shape(init), mesh)
    # waited for, so a model too large for memory fails here, before the run writes anything
    return jax.block_until_ready(jax.jit(init, out_shardings=shardings)())
