"""Parameter kinds by role: what a trained parameter is for, which training reads without
knowing any layer (weight decay, fwpzoo.train.optim).

    nnx.Param   a weight: a projection's kernel, the embedding, a slow-weight matrix or tensor
    GateParam   a gate's or decay's parameter, or another per-head (per-key, per-channel) scalar,
                bias or static value: A_log and dt_bias, a gate's bias, a static gate (mesa's lam),
                plasticity coefficients, a skip scale D, an SSM's eigenvalues
    ScaleParam  a norm's scale

Weight decay pulls weights towards zero and leaves the other two alone, whatever their rank.
Zero is no neutral point for them: pulling A_log and dt_bias to zero pulls a decay towards
exp(-softplus(0)) = 0.5 per token, a gate's bias towards an even gate, a norm's scale towards a
silent layer. Deciding by rank instead decayed a per-key decay ([H, K]) but not a scalar one
([H]), so the two trained under different regularisation.

Checkpoints hold arrays by path alone (the kind is not saved), so a checkpoint written when every
parameter was a plain nnx.Param restores into these kinds unchanged.
"""

from flax import nnx


class GateParam(nnx.Param):
    """A gate, decay or other per-head scalar or bias: sets how the state is written and
    forgotten rather than mapping features; never weight-decayed."""


class ScaleParam(nnx.Param):
    """A norm's scale; never weight-decayed."""
