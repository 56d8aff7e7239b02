"""The small-matrix inverse (linalg.inv): values and gradients against LAPACK."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batquant_jax import linalg


@pytest.mark.parametrize("n", [4, 8, 24, 48])
def test_inverse_matches_lapack(n):
    a = jax.random.normal(jax.random.key(n), (3, n, n)) + 2.0 * jnp.eye(n)
    got = jax.jit(linalg.inv)(a)
    err = jnp.max(jnp.abs(got @ a - jnp.eye(n)))
    assert float(err) < 1e-4
    # gradients agree with LAPACK's inverse (taken eagerly, outside any jitted program)
    f = lambda inv: lambda m: jnp.sum(jnp.sin(inv(m)))
    g_ours, g_ref = jax.grad(f(linalg.inv))(a), jax.grad(f(jnp.linalg.inv))(a)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), rtol=1e-3, atol=1e-3)


def test_inverse_of_singular_matrix_is_not_finite():
    a = jnp.ones((4, 4))
    assert not bool(jnp.all(jnp.isfinite(linalg.inv(a))))
