"""Small dense linear algebra in plain XLA ops (no LAPACK custom calls).

Why: on the CPU backend, jaxlib's LAPACK kernels (e.g. the triangular solve behind
``jnp.linalg.solve``) split batched work over XLA's intra-op thread pool and block waiting for
it. When two such kernels run concurrently inside one program on a machine with few cores, both
pool threads block and the program deadlocks (observed here with 2 cores during calibration).
The transforms only ever invert small factors (4x4 ... 64x64), for which Gauss-Jordan
elimination in ordinary XLA ops is cheap, differentiable and safe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def inv(a: jax.Array) -> jax.Array:
    """Inverse of ``a: [..., n, n]`` by Gauss-Jordan elimination with partial pivoting.

    Differentiable; a singular matrix gives non-finite entries (callers check finiteness).
    """
    n = a.shape[-1]
    if a.shape[-2] != n:
        raise ValueError(f"inv expects square matrices [..., n, n], got {a.shape}")
    eye = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)
    aug = jnp.concatenate([a, eye], axis=-1)  # [..., n, 2n]
    rows = jnp.arange(n)

    def step(j, aug):
        col = jnp.where(rows >= j, jnp.abs(aug[..., :, j]), -1.0)
        p = jnp.argmax(col, axis=-1)                      # pivot row, [...]
        is_p = (rows == p[..., None])[..., :, None]       # [..., n, 1]
        is_j = (rows == j)[:, None]                       # [n, 1]
        row_p = jnp.sum(jnp.where(is_p, aug, 0.0), axis=-2)  # [..., 2n]
        row_j = aug[..., j, :]
        swapped = jnp.where(is_j, row_p[..., None, :], jnp.where(is_p, row_j[..., None, :], aug))
        pivot = swapped[..., j, :] / swapped[..., j, j][..., None]
        factor = jnp.where(rows == j, 0.0, swapped[..., :, j])
        out = swapped - factor[..., :, None] * pivot[..., None, :]
        return jnp.where(is_j, pivot[..., None, :], out)

    aug = jax.lax.fori_loop(0, n, step, aug)
    return aug[..., n:]


def solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a^{-1} b`` for small ``a: [..., n, n]`` and ``b: [..., n, m]`` (see ``inv``)."""
    return jnp.matmul(inv(a), b, precision=_HI)
