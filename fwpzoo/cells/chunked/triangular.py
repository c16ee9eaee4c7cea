"""Unit lower-triangular inverses: T = (I + A)^{-1} for a strictly lower-triangular A [..., C, C],
the UT transform of the chunked delta rules (delta_rules.md section 1, dplr.md, learning_rules.md),
by blocked doubling over forward-substituted leaves; no batched triangular solve.

Always float32 arithmetic (precision.py): A's dtype (float32 from the engine's layout, whatever
the inputs' dtype) and HIGHEST precision on every product, so that no accelerator rounds the
products to bfloat16 passes. The inverse's entries grow with C, and an error in them reaches
every pseudo-value of the chunk; its products are [C, C], small beside the chunk's others.

Dimension letters: C chunk size.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST

# Diagonal blocks up to this size are inverted by forward substitution; larger ones by doubling.
# 8 measured fastest on CPU for chunk 64 (fewer sequential rows than 16, fewer merges than 4).
LEAF_SIZE = 8


def _forward_substitution(a):
    """(I + a)^{-1} for a strictly lower-triangular a [..., C, C], one row at a time."""
    size = a.shape[-1]
    eye = jnp.eye(size, dtype=a.dtype)
    inv = jnp.broadcast_to(eye, a.shape)
    for t in range(1, size):
        # row t of (I + a) inv = I:  inv_t = e_t - sum_{i<t} a_ti inv_i
        earlier = jnp.einsum("...i,...ij->...j", a[..., t, :t], inv[..., :t, :], precision=_HIGHEST)
        row = eye[t] - earlier  # [..., C]
        inv = inv.at[..., t, :].set(row)
    return inv


def unit_lower_inverse(a):
    """(I + a)^{-1} for a strictly lower-triangular a [..., C, C] by blocked doubling.

    [[L11, 0], [L21, L22]]^{-1} = [[T11, 0], [-T22 L21 T11, T22]]: only products of inverses of
    unit-triangular blocks, never a division or a power series, so it stays as well conditioned
    as the inverse itself. Leaf blocks use forward substitution; no batched triangular solve.
    """
    with jax.named_scope("triangular_inverse"):  # named for profiles and the dtype test
        return _doubling(a)


def _doubling(a):
    size = a.shape[-1]
    if size <= LEAF_SIZE:
        return _forward_substitution(a)
    h = size // 2
    a11, a21, a22 = a[..., :h, :h], a[..., h:, :h], a[..., h:, h:]
    if size % 2 == 0:  # both halves in one batched call
        t11, t22 = _doubling(jnp.stack([a11, a22]))
    else:
        t11, t22 = _doubling(a11), _doubling(a22)
    t21 = -jnp.matmul(t22, jnp.matmul(a21, t11, precision=_HIGHEST), precision=_HIGHEST)
    top = jnp.concatenate([t11, jnp.zeros(t11.shape[:-1] + (size - h,), a.dtype)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([t21, t22], axis=-1)], axis=-2)


@jax.custom_vjp
def inverse_with_pullback(a):
    """unit_lower_inverse(a) = (I + a)^{-1} whose backward is dA = -T^T dT T^T (strictly lower),
    instead of autodiff through the blocked doubling (1.4x faster chunk fwd+bwd at T = 2048)."""
    return unit_lower_inverse(a)


def _inverse_fwd(a):
    t = unit_lower_inverse(a)
    return t, t


def _inverse_bwd(t, dt):
    with jax.named_scope("triangular_inverse"):
        t_dt = jnp.matmul(t.mT, dt, precision=_HIGHEST)
        return (jnp.tril(-jnp.matmul(t_dt, t.mT, precision=_HIGHEST), -1),)


inverse_with_pullback.defvjp(_inverse_fwd, _inverse_bwd)
