"""The Cholesky factor of a batch of symmetric positive definite matrices, and its inverse, from
matmuls and elementwise operations only.

Why not jnp.linalg.cholesky: on CPU it calls LAPACK's potrf, and jaxlib (0.10.2 at least) spreads a
batched potrf over the same thread pool that runs the CPU devices. With one device per core, a
device inside a compiled loop waits for pool threads that are themselves waiting on the other
devices, and the process deadlocks at 0% CPU, deaf to SIGINT and SIGTERM. Written with matmuls,
the factorisation runs like any other op on every backend, and accelerators get it as batched
matmuls instead of a sequential LAPACK-style kernel.

The recursion, for A = [[A11, A21^T], [A21, A22]] (Golub & Van Loan, section 4.2):

    L11 = chol(A11)              M11 = L11^{-1}
    L21 = A21 M11^T
    L22 = chol(A22 - L21 L21^T)  M22 = L22^{-1}
    M21 = -M22 L21 M11           so that [[M11, 0], [M21, M22]] = L^{-1}

Blocks of at most LEAF rows are factored column by column (the outer-product form). A solve
A^{-1} q is then M^T (M q): two triangular matrix-vector products, no triangular solve primitive
either (LAPACK's trsm has the same batched path).

Every product is float32 at HIGHEST precision on every platform (inside the chunk engine too,
whatever its matmul policy, cells/chunked/precision.py): an error in the factor reaches the
solution amplified by the matrix's condition number, so no accelerator may round it to
bfloat16 passes.
"""

import jax
import jax.numpy as jnp

LEAF = 8  # largest block factored column by column; above it, halves and matmuls
_HIGHEST = jax.lax.Precision.HIGHEST


def cholesky_and_inverse(a):
    """(L, L^{-1}) for symmetric positive definite a [..., N, N]: L lower triangular with a = L L^T.

    a is read as (a + a^T) / 2, as jnp.linalg.cholesky reads it, so the gradient w.r.t. a is
    symmetric."""
    with jax.named_scope("cholesky"):  # named for profiles and the dtype test
        return _factor((a + a.mT) / 2)


def spd_solve(a, q):
    """a^{-1} q for symmetric positive definite a [..., N, N] and q [..., N]."""
    _, inverse = cholesky_and_inverse(a)
    return inverse_solve(inverse, q)


def inverse_solve(inverse, q):
    """a^{-1} q = M^T (M q) from M = L^{-1} [..., N, N] of a = L L^T, q [..., N]."""
    with jax.named_scope("cholesky"):
        y = jnp.einsum("...ij,...j->...i", inverse, q, precision=_HIGHEST)  # [..., N]
        return jnp.einsum("...ji,...j->...i", inverse, y, precision=_HIGHEST)


def _factor(a):
    n = a.shape[-1]
    if n <= LEAF:
        return _leaf(a)
    h = n // 2
    l11, m11 = _factor(a[..., :h, :h])
    l21 = _mm(a[..., h:, :h], m11.mT)  # [..., N - h, h]
    l22, m22 = _factor(a[..., h:, h:] - _mm(l21, l21.mT))
    m21 = -_mm(_mm(m22, l21), m11)
    top = jnp.zeros(a.shape[:-2] + (h, n - h), a.dtype)
    lower = jnp.concatenate([jnp.concatenate([l11, top], -1), jnp.concatenate([l21, l22], -1)], -2)
    inverse = jnp.concatenate(
        [jnp.concatenate([m11, top], -1), jnp.concatenate([m21, m22], -1)], -2
    )
    return lower, inverse


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _leaf(a):
    """Column by column (n <= LEAF, unrolled): column j of L is (a_j - L L_j^T) / sqrt of its
    diagonal entry, below the diagonal; then L^{-1} by forward substitution, row by row."""
    n = a.shape[-1]
    rows = jnp.arange(n)
    lower = jnp.zeros_like(a)
    for j in range(n):
        residual = a[..., :, j] - jnp.einsum(
            "...ik,...k->...i", lower, lower[..., j, :], precision=_HIGHEST
        )
        pivot = jnp.sqrt(residual[..., j : j + 1])
        lower = lower.at[..., :, j].set(jnp.where(rows >= j, residual / pivot, 0.0))
    eye = jnp.eye(n, dtype=a.dtype)
    inverse = jnp.zeros_like(a)
    for i in range(n):  # row i of M: (e_i - L_i,<i M_<i) / L_ii
        row = eye[i] - jnp.einsum("...k,...kj->...j", lower[..., i, :], inverse, precision=_HIGHEST)
        inverse = inverse.at[..., i, :].set(row / lower[..., i, i : i + 1])
    return lower, inverse
