"""Tests for batquant_jax.clipping: thresholds, gradients through the clamp, granularities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batquant_jax import qlayers
from batquant_jax.calibration import CalibConfig
from batquant_jax.clipping import DEFAULT_CLIP_INIT, ActClip, WeightClip

# The tests below start the logits at the paper's 4.0, passed explicitly: the modules' default
# was 4.0 while CalibConfig's was 8.0; both are DEFAULT_CLIP_INIT (8.0) now.
INIT = 4.0
R4 = 1.0 / (1.0 + np.exp(-4.0))  # sigmoid(4) ~ 0.98201379


def _normal(shape, seed) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_act_clip_thresholds_at_init():
    x = np.asarray(_normal((3, 64), 0))
    y = np.asarray(ActClip(64, init=INIT)(jnp.asarray(x)))
    assert ActClip(64, init=INIT).a_max[...].shape == (2,)
    r = float(jax.nn.sigmoid(ActClip(64, init=INIT).a_min[...])[0])
    assert r == pytest.approx(0.98201379, abs=1e-7)
    xb, yb = x.reshape(3, 2, 32), y.reshape(3, 2, 32)
    np.testing.assert_allclose(yb.max(-1), R4 * xb.max(-1), rtol=1e-6)
    np.testing.assert_allclose(yb.min(-1), R4 * xb.min(-1), rtol=1e-6)
    inside = (xb < R4 * xb.max(-1, keepdims=True)) & (xb > R4 * xb.min(-1, keepdims=True))
    assert np.array_equal(yb[inside], xb[inside])
    assert int((~inside).sum()) >= 12  # at least the max and min of each block are clipped


def test_act_clip_block_logits_are_per_block_position():
    clip = ActClip(64, init=INIT)
    clip.a_max[...] = jnp.array([4.0, 0.0])  # block 1: hi = max / 2
    x = jnp.asarray(np.concatenate([np.full(32, 2.0), np.full(32, 2.0)])[None].repeat(2, 0))
    x = x.at[:, 5].set(-1.0).at[:, 40].set(-1.0)
    y = np.asarray(clip(x))
    assert y[0, 0] == pytest.approx(2.0 * R4, rel=1e-6)
    assert y[1, 33] == pytest.approx(1.0, rel=1e-6)
    assert y[0, 5] == pytest.approx(-R4, rel=1e-6)


def test_act_clip_tensor_uses_per_token_range():
    clip = ActClip(64, granularity="tensor", init=INIT)
    assert clip.a_max[...].shape == ()
    x = np.asarray(_normal((4, 64), 1))
    y = np.asarray(clip(jnp.asarray(x)))
    np.testing.assert_allclose(y.max(-1), R4 * x.max(-1), rtol=1e-6)
    np.testing.assert_allclose(y.min(-1), R4 * x.min(-1), rtol=1e-6)
    # block 1's own max is below the token max: it is untouched unless it holds the token extreme
    xb = x.reshape(4, 2, 32)
    untouched = np.abs(xb).max(-1) < R4 * np.minimum(x.max(-1), -x.min(-1))[:, None]
    assert untouched.any()
    assert np.array_equal(y.reshape(4, 2, 32)[untouched], xb[untouched])


def _act_loss(a_max, x):
    clip = ActClip(64, init=INIT)
    clip.a_max[...] = a_max
    return jnp.sum(clip(x) ** 2)


def test_act_clip_gradient_matches_analytic_and_finite_difference():
    x = _normal((5, 64), 2).at[:, 3].set(10.0)  # a clipped outlier in block 0 of every token
    a = jnp.full((2,), 4.0, jnp.float32)
    g = np.asarray(jax.jit(jax.grad(_act_loss))(a, x))
    # d/da sum(clip^2) = sum over elements clamped to hi of 2 hi * sigmoid'(a) * max(block)
    xb = np.asarray(x, np.float64).reshape(5, 2, 32)
    mx = xb.max(-1)
    hi = R4 * mx
    n_hi = (xb >= hi[..., None]).sum(-1)
    expected = (n_hi * 2 * hi * R4 * (1 - R4) * mx).sum(0)
    np.testing.assert_allclose(g, expected, rtol=1e-4)
    assert g[0] > 1.0
    eps = 1e-2
    loss = jax.jit(_act_loss)
    fd = (float(loss(a.at[0].add(eps), x)) - float(loss(a.at[0].add(-eps), x))) / (2 * eps)
    assert fd == pytest.approx(float(g[0]), rel=1e-2)


def test_weight_clip_block_and_tensor():
    w = np.asarray(_normal((3, 64), 3))
    clip = WeightClip(3, 64, init=INIT)
    assert clip.a_max[...].shape == (3, 2)
    clip.a_min[...] = clip.a_min[...].at[1, 1].set(-20.0)  # lo ~ 0: row 1, block 1 -> max(x, ~0)
    y = np.asarray(clip(jnp.asarray(w))).reshape(3, 2, 32)
    wb = w.reshape(3, 2, 32)
    np.testing.assert_allclose(y.max(-1), R4 * wb.max(-1), rtol=1e-6)
    assert y[1, 1].min() == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(y[0, 1].min(), R4 * wb[0, 1].min(), rtol=1e-6)
    tclip = WeightClip(3, 64, granularity="tensor", init=INIT)
    assert tclip.a_max[...].shape == (3,)
    yt = np.asarray(tclip(jnp.asarray(w)))
    np.testing.assert_allclose(yt.max(-1), R4 * w.max(-1), rtol=1e-6)


def _weight_loss(a_min, w):
    clip = WeightClip(4, 64, init=INIT)
    clip.a_min[...] = a_min
    return jnp.sum(clip(w) ** 3)


def test_weight_clip_gradient_finite_difference():
    w = _normal((4, 64), 4)
    g_nnx = nnx.grad(lambda m: jnp.sum(m(w) ** 3))(WeightClip(4, 64, init=INIT))
    a = jnp.full((4, 2), 4.0, jnp.float32)
    g = np.asarray(jax.jit(jax.grad(_weight_loss))(a, w))
    assert np.array_equal(np.asarray(g_nnx["a_min"][...]), g)
    assert float(np.abs(g).min()) > 0  # every block's min is clipped
    eps = 1e-2
    loss = jax.jit(_weight_loss)
    fd = (float(loss(a.at[2, 1].add(eps), w)) - float(loss(a.at[2, 1].add(-eps), w))) / (2 * eps)
    assert fd == pytest.approx(float(g[2, 1]), rel=1e-2)


def test_disabled_is_identity_without_params():
    x = _normal((2, 64), 5)
    clip = ActClip(64, enabled=False)
    assert np.array_equal(np.asarray(clip(x)), np.asarray(x))
    assert len(jax.tree.leaves(nnx.state(clip, nnx.Param))) == 0
    wclip = WeightClip(2, 64, enabled=False)
    assert np.array_equal(np.asarray(wclip(x)), np.asarray(x))


def test_jit_dtype_and_errors():
    clip = ActClip(64, init=INIT)
    x = _normal((2, 3, 64), 6)
    y = nnx.jit(lambda m, v: m(v))(clip, x)
    assert y.shape == (2, 3, 64)
    assert float(jnp.abs(y - clip(x)).max()) == 0.0
    assert clip(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="multiple of the block"):
        ActClip(48)
    with pytest.raises(ValueError, match="granularity"):
        WeightClip(2, 64, granularity="row")
    with pytest.raises(ValueError, match="expected W"):
        WeightClip(2, 64, init=INIT)(jnp.ones((3, 64)))
    with pytest.raises(ValueError, match="expected x"):
        clip(jnp.ones((2, 32)))


def test_one_clip_init_default_everywhere():
    # Before the fix the modules and quantize_layer started at 4.0, CalibConfig (and the CLI) at 8.0.
    import inspect
    assert DEFAULT_CLIP_INIT == 8.0 and CalibConfig().clip_init == DEFAULT_CLIP_INIT
    assert inspect.signature(qlayers.quantize_layer).parameters["clip_init"].default == 8.0
    assert float(ActClip(64).a_max[...][0]) == float(WeightClip(2, 64).a_min[...][1, 1]) == 8.0


def _tricky_blocks(key, shape):
    """Random blocks with a tie at the max, an all-negative block, a constant block and
    repeated values (weights dequantized from a 4-bit source tie often)."""
    x = jax.random.normal(key, shape)
    x = x.at[0, 0, 3].set(x[0, 0].max())
    x = x.at[1, 2].set(-jnp.abs(x[1, 2]))
    x = x.at[2, 2].set(1.0)
    return x.at[3].set(jnp.round(x[3] * 2) / 2)


@pytest.mark.parametrize("r_shape", [(6, 1), (5, 6, 1), ()])
def test_hand_written_clamp_gradient_equals_autodiff(r_shape):
    # activation (ratios shared by the leading axes), weight (one pair per block) and tensor
    # granularity; ratios of exactly 1 make the thresholds tie with the block max / min
    from batquant_jax.clipping import _clamp, _clamp_reference
    k = jax.random.split(jax.random.key(1), 4)
    x = _tricky_blocks(k[0], (5, 6, 32))
    r_max = jax.nn.sigmoid(jax.random.normal(k[1], r_shape) + 1.0)
    r_min = jax.nn.sigmoid(jax.random.normal(k[2], r_shape) + 1.0)
    if r_shape:
        r_max = r_max.at[..., 0, :].set(1.0)
    c = jax.random.normal(k[3], x.shape)
    grads = [jax.jit(jax.grad(lambda x, a, b, f=f: jnp.sum(f(x, a, b) * c), argnums=(0, 1, 2)))(
        x, r_max, r_min) for f in (_clamp, _clamp_reference)]
    for got, want in zip(*grads):
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(_clamp(x, r_max, r_min)),
                                  np.asarray(_clamp_reference(x, r_max, r_min)))
