"""Tests for batquant_jax.transforms: fold identity, structure, gradients, conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batquant_jax import transforms as T

DIMS = (32, 64, 576, 1536)
KINDS = ("gpk", "gpk_scale", "block_affine", "kronecker", "block_hadamard", "random_hadamard",
         "identity")


def _perturb(t: T.Transform, scale: float, seed: int) -> T.Transform:
    """Adds N(0, scale^2) noise to every learnable parameter (numpy, no compilation)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(t, nnx.Param)
    nnx.update(t, jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), jnp.float32),
        state))
    return t


def _make(kind: str, d: int) -> T.Transform:
    """A transform with parameters perturbed away from its init (random, invertible)."""
    if kind == "gpk":
        return _perturb(T.GPKTransform(d), 0.2, d)
    if kind == "gpk_scale":
        return _perturb(T.GPKTransform(d, init="identity", channel_scale=True), 0.2, d)
    if kind == "block_affine":
        return _perturb(T.BlockAffine(d), 0.05, d)
    if kind == "kronecker":
        return _perturb(T.KroneckerTransform(d), 0.1, d)
    if kind == "block_hadamard":
        return T.BlockHadamard(d, 128)
    if kind == "random_hadamard":
        return T.RandomHadamard(d, seed=3)
    return T.IdentityTransform(d)


def _normal(shape, seed) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_fold_identity_and_fold_f64(kind, d):
    x, w = _normal((16, d), d), _normal((24, d), d + 1)
    t = _make(kind, d)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    y, fw = nnx.jit(lambda m: (m(x), m.fold(w)))(t)
    assert _rel(np.asarray(y, np.float64) @ np.asarray(fw, np.float64).T, ref) <= 1e-5
    assert _rel(fw, t.fold_f64(np.asarray(w))) <= 1e-5
    assert _rel(y, x) >= (0.05 if kind != "identity" else 0.0)  # the transform does act


def test_kron_vec_identity():
    rng = np.random.default_rng(0)
    b, a, xm = rng.normal(size=(4, 4)), rng.normal(size=(8, 8)), rng.normal(size=(4, 8))
    lhs = xm.reshape(-1) @ np.kron(b, a)
    rhs = (b.T @ xm @ a).reshape(-1)
    np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", (64, 576))
def test_gpk_hadamard_init_is_block_hadamard_32(d):
    gpk = T.GPKTransform(d)
    bh = T.BlockHadamard(d, 32)
    m = np.asarray(gpk.matrix())
    assert np.abs(m - np.asarray(bh.matrix())).max() <= 1e-6
    assert np.abs(m[:32, :32] - T.sylvester_hadamard(32)).max() <= 1e-6
    assert np.abs(m[:32, 32:64]).max() == 0.0
    assert abs(float(gpk.condition_number()) - 1.0) <= 1e-5


def test_gpk_matrix_is_block_diagonal_kron():
    t = _perturb(T.GPKTransform(96), 0.3, 1)
    a, b = np.asarray(t.A[...]), np.asarray(t.B[...])
    expected = np.zeros((96, 96))
    for i in range(3):
        expected[32 * i:32 * i + 32, 32 * i:32 * i + 32] = np.kron(b[i], a)
    assert np.abs(np.asarray(t.matrix()) - expected).max() <= 1e-6


def test_gpk_other_factorization_and_errors():
    t = _perturb(T.GPKTransform(64, g1=4, g2=8), 0.1, 0)
    x = _normal((5, 64), 0)
    w = _normal((6, 64), 1)
    assert _rel(t(x) @ t.fold(w).T, x @ w.T) <= 1e-5
    with pytest.raises(ValueError, match="g1 \\* g2"):
        T.GPKTransform(64, g1=8, g2=8)
    with pytest.raises(ValueError, match="multiple of the block"):
        T.GPKTransform(48)
    with pytest.raises(ValueError, match="expected x"):
        T.GPKTransform(64)(jnp.ones((3, 32)))
    with pytest.raises(ValueError, match="expected W"):
        T.GPKTransform(64).fold(jnp.ones((3, 32)))
    with pytest.raises(ValueError, match="init"):
        T.BlockAffine(64, init="random")


def test_init_noise_uses_rngs():
    a1 = np.asarray(T.GPKTransform(32, init_noise=0.1, rngs=nnx.Rngs(0)).A[...])
    a2 = np.asarray(T.GPKTransform(32, init_noise=0.1, rngs=nnx.Rngs(0)).A[...])
    assert np.array_equal(a1, a2)
    assert np.abs(a1 - T.sylvester_hadamard(8)).max() > 0.05
    with pytest.raises(ValueError, match="needs rngs"):
        T.GPKTransform(32, init_noise=0.1)


def test_num_params():
    assert T.GPKTransform(4096).num_params == 8 * 8 + 128 * 4 * 4 == 2112
    assert T.GPKTransform(4096, channel_scale=True).num_params == 2112 + 4096
    assert T.BlockAffine(4096).num_params == 128 * 32 * 32
    assert T.KroneckerTransform(576).num_params == 24 * 24 * 2 + 576
    assert T.KroneckerTransform(576, channel_scale=False).num_params == 24 * 24 * 2
    for t in (T.BlockHadamard(576, 128), T.RandomHadamard(576), T.IdentityTransform(576)):
        assert t.num_params == 0
    rh = T.RandomHadamard(576)
    assert len(jax.tree.leaves(nnx.state(rh, nnx.Param))) == 0
    assert len(jax.tree.leaves(nnx.state(rh, T.Constant))) == 3


def test_kron_factors():
    assert T.kron_factors(576) == (24, 24)
    assert T.kron_factors(1536) == (32, 48)
    assert T.kron_factors(4096) == (64, 64)
    assert T.kron_factors(32) == (4, 8)


def test_gradients_reach_gpk_parameters():
    d = 64
    t = _perturb(T.GPKTransform(d, channel_scale=True), 0.1, 0)
    x = _normal((8, d), 0)
    w = _normal((16, d), 1)
    graphdef, params, rest = nnx.split(t, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        xq = jnp.round(m(x) * 4) / 4  # stand-in for a quantizer: breaks exact invertibility
        xq = m(x) + jax.lax.stop_gradient(xq - m(x))
        return jnp.mean((xq @ m.fold(w).T - x @ w.T) ** 2) + jnp.mean(m(x) ** 4)

    g = jax.jit(jax.grad(loss))(params)
    norms = {k: float(jnp.linalg.norm(v)) for k, v in nnx.to_flat_state(g)}
    assert set(norms) == {("A",), ("B",), ("log_scale",)}
    assert all(n > 1e-6 for n in norms.values())
    # directional derivative of a smooth loss vs central finite difference
    @jax.jit
    def smooth(p):
        m = nnx.merge(graphdef, p, rest)
        return jnp.mean(m(x) ** 4) + jnp.mean(m.fold(w) ** 2)

    g = jax.jit(jax.grad(smooth))(params)
    direction = jax.tree.map(lambda v: _normal(v.shape, 5), params)
    dd = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
    eps = 1e-3
    shift = lambda s: jax.tree.map(lambda p, u: np.asarray(p) + s * np.asarray(u), params, direction)
    fd = (float(smooth(shift(eps))) - float(smooth(shift(-eps)))) / (2 * eps)
    assert abs(fd - dd) <= 1e-2 * abs(dd)
    # nnx.grad sees only the Param leaves, never constants
    g2 = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(T.RandomHadamard(d))
    assert len(jax.tree.leaves(g2)) == 0


@pytest.mark.parametrize("d", (64, 576, 1536))
def test_random_hadamard_orthogonal_and_deterministic(d):
    p = np.asarray(T.RandomHadamard(d, seed=1).matrix(), np.float64)
    assert np.abs(p @ p.T - np.eye(d)).max() <= 1e-5
    assert np.array_equal(p, np.asarray(T.RandomHadamard(d, seed=1).matrix(), np.float64))
    assert np.abs(p - np.asarray(T.RandomHadamard(d, seed=2).matrix())).max() > 0.01


def test_block_hadamard_size_fallback():
    assert T.BlockHadamard(576, 128).size == 64
    assert T.BlockHadamard(1536, 128).size == 128
    assert T.BlockHadamard(4096, 128).size == 128
    assert T.BlockHadamard(96, 100).size == 32
    m = np.asarray(T.BlockHadamard(576, 128).matrix())
    assert np.abs(m[64:128, 64:128] - T.sylvester_hadamard(64)).max() <= 1e-7
    assert np.abs(m[:64, 64:]).max() == 0.0


def test_condition_number_detects_singular_factor():
    t = T.GPKTransform(64)
    assert T.transform_is_healthy(t)
    b = t.B[...]
    t.B[...] = b.at[1, 3].set(b[1, 2])  # two equal rows: singular
    assert float(t.condition_number()) > 1e6
    assert not T.transform_is_healthy(t)
    t2 = T.KroneckerTransform(64)
    t2.P2[...] = t2.P2[...].at[0, 0].set(jnp.nan)
    assert not T.transform_is_healthy(t2)
    t3 = T.BlockAffine(64, init="identity")
    t3.P[...] = t3.P[...].at[0].multiply(jnp.diag(jnp.array([1.0] * 31 + [1e-5])))
    assert float(t3.condition_number()) == pytest.approx(1e5, rel=1e-3)
    assert T.transform_is_healthy(t3, max_cond=1e6) and not T.transform_is_healthy(t3)
    assert float(T.RandomHadamard(64).condition_number()) == 1.0


def test_smooth_init_and_scale():
    s = T.smooth_init(jnp.array([4.0, 1.0, 1e9]), jnp.array([1.0, 4.0, 1e-9]))
    np.testing.assert_allclose(np.asarray(s), [2.0, 0.5, 1e3], rtol=1e-6)
    t = T.GPKTransform(32, channel_scale=True)
    t.set_scale(jnp.arange(1.0, 33.0))
    np.testing.assert_allclose(np.asarray(t.scale()), np.arange(1.0, 33.0), rtol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        t.set_scale(-jnp.ones(32))
    with pytest.raises(ValueError, match="without channel_scale"):
        T.GPKTransform(32).set_scale(jnp.ones(32))


def test_jit_and_dtype():
    t = _perturb(T.GPKTransform(576, channel_scale=True), 0.1, 0)
    x = _normal((2, 3, 576), 0)
    y = nnx.jit(lambda m, v: m(v))(t, x)
    assert y.shape == (2, 3, 576)
    assert float(jnp.abs(y - t(x)).max()) <= 1e-6
    graphdef, state = nnx.split(t)
    yj = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x)
    assert float(jnp.abs(yj - t(x)).max()) <= 1e-6
    assert t(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert t.fold(jnp.ones((4, 576), jnp.bfloat16)).dtype == jnp.bfloat16


def test_block_matmul_vjp_equals_autodiff():
    w, t, g = _normal((12, 3, 8), 0), _normal((3, 8, 8), 1), _normal((12, 3, 8), 2)
    plain = lambda w, t: jnp.einsum("okc,kcC->okC", w, t, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(T.block_matmul(w, t), plain(w, t), rtol=1e-6, atol=1e-6)
    for got, want in zip(jax.vjp(T.block_matmul, w, t)[1](g), jax.vjp(plain, w, t)[1](g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gpk_fold_by_blocks_equals_the_factor_solves():
    # the fold runs as one block product with the channel scale inside the blocks; its value
    # and its gradients equal the factor-wise solves on the scaled weight
    d, o = 64, 16
    t = _perturb(T.GPKTransform(d, channel_scale=True), 0.1, 0)
    t.set_scale(np.exp(np.random.default_rng(3).normal(0, 0.3, d)))
    w, c = _normal((o, d), 1), _normal((o, d), 2)
    graphdef, params, rest = nnx.split(t, nnx.Param, ...)

    def by_solves(m, w):
        v = (w * m.scale()).reshape(o, m.k, m.g2, m.g1)
        return T._kron_fold(v, m.B[...], m.A[...]).reshape(w.shape)

    def loss(fold):
        return lambda p: jnp.sum(fold(nnx.merge(graphdef, p, rest), w) * c)

    m = nnx.merge(graphdef, params, rest)
    assert _rel(m.fold(w), by_solves(m, w)) <= 1e-6
    assert _rel(m.fold(w), m.fold_f64(np.asarray(w))) <= 1e-6
    got = jax.jit(jax.grad(loss(lambda m, w: m.fold(w))))(params)
    want = jax.jit(jax.grad(loss(by_solves)))(params)
    for (path, a), (_, b) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want)):
        assert _rel(a, b) <= 1e-5, path
