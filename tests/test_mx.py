"""MX numerics against an independent reference (plain numpy and Python floats).

The reference takes each block's exponent with math.frexp (and a search for rceil), rounds by
looking up the two nearest points of an explicit grid table with explicit tie handling, and
scales with float64 ldexp; none of it shares code or method with batquant_jax.mx.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from batquant_jax import mx

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
REF = {  # name: (dtype whose bit patterns give the grid, emax_elem, mbits)
    "mxfp4": (None, 2, 1),
    "mxfp6": (ml_dtypes.float6_e2m3fn, 2, 3),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4, 2),
    "mxfp8": (ml_dtypes.float8_e4m3fn, 8, 3),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 15, 2),
}


def ref_grid(fmt):
    """Non-negative finite element values, indexed by magnitude code."""
    dtype, _, _ = REF[fmt]
    if dtype is None:
        return E2M1_GRID
    bits = mx.FORMATS[fmt].bits
    vals = np.arange(2 ** (bits - 1), dtype=np.uint8).view(dtype).astype(np.float64)
    return vals[np.isfinite(vals)]


def ref_exponent(amax, fmt, mode, dtype_emax=127):
    """Shared exponent of one block from its absmax (Python float); 128 for NaN/Inf.

    Clamped to [-127, dtype_emax - emax]: no mode may pick a scale above the floor rule's
    largest, where grid values would overflow the input's float type (dtype_emax 127: float32).
    """
    _, emax, mbits = REF[fmt]
    if not math.isfinite(amax):
        return 128
    if amax == 0.0:
        return -127
    m, ex = math.frexp(amax)  # amax = m * 2^ex, 0.5 <= m < 1
    fl = ex - 1
    if mode == "floor":
        e = fl - emax
    elif mode == "ceil":
        e = fl - emax + (m != 0.5)
    elif mode == "even":
        sig = math.floor(2 * m * 2**mbits + 0.5) / 2**mbits  # significand rounded half up
        e = fl - emax + (sig >= 2.0)
    else:  # rceil: the smallest e with amax <= max_value * 2^e
        vmax = ref_grid(fmt)[-1]
        e = fl - emax - 2
        while amax > math.ldexp(vmax, e):
            e += 1
    return min(max(e, -127), dtype_emax - emax)


def ref_nearest(v, grid, rounding):
    """Index of the grid point nearest to each magnitude v >= 0 (float64), saturating."""
    lo = np.clip(np.searchsorted(grid, v, side="right") - 1, 0, len(grid) - 2)
    d_lo, d_hi = v - grid[lo], grid[lo + 1] - v
    if rounding == "even":
        take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (lo % 2 == 1))
    else:
        take_hi = d_hi <= d_lo
    return np.where(v >= grid[-1], len(grid) - 1, lo + take_hi)


def ref_quantize(x, fmt, mode, rounding, block_size=32):
    """x: float32 [rows, n] -> (magnitude+sign codes int [rows, n], scale bytes int [rows, n/bs])."""
    grid = ref_grid(fmt)
    bits = mx.FORMATS[fmt].bits
    xb = x.astype(np.float64).reshape(x.shape[0], -1, block_size)
    e = np.array([[ref_exponent(float(np.max(np.abs(b))), fmt, mode) for b in row] for row in xb])
    finite = e != 128
    v = np.abs(np.ldexp(np.where(finite[..., None], xb, 0.0), np.where(finite, -e, 0)[..., None]))
    idx = ref_nearest(v, grid, rounding)
    codes = idx | (np.signbit(xb).astype(np.int64) << (bits - 1))
    codes = np.where(finite[..., None], codes, 0)
    return codes.reshape(x.shape), e + 127


def codes_of(q):
    c = mx.unpack_nibbles(q.codes) if mx.FORMATS[q.fmt].packed else q.codes
    return np.asarray(c).astype(np.int64)


def hard_data(seed=0, rows=24, n=1024):
    """Blocks at magnitudes 1e-30..1e30, heavy tails, zero blocks, every E2M1 tie, maxima in
    (6, 8) x 2^e, exact powers of two."""
    rng = np.random.default_rng(seed)
    nb = rows * n // 32
    mag = 10.0 ** rng.uniform(-30, 30, size=(nb, 1))
    kind = rng.integers(0, 3, size=(nb, 1))
    base = np.where(kind == 0, rng.standard_normal((nb, 32)),
                    np.where(kind == 1, rng.standard_t(2, (nb, 32)), rng.standard_cauchy((nb, 32))))
    x = base * mag
    e = rng.integers(-100, 100, size=nb)
    for i in range(0, nb, 7):  # ties: block max 6 x 2^e, then +-t x 2^e
        ties = np.array([0.25, 1.25, 2.5, 5.0, 0.75, 1.75, 3.5])
        x[i] = 0.0
        x[i, 0] = 6.0
        x[i, 1 : 1 + 2 * len(ties)] = np.concatenate([ties, -ties])
        x[i] *= 2.0 ** e[i]
    for i in range(3, nb, 7):  # block max in (6, 8) x 2^e
        x[i, rng.integers(32)] = rng.uniform(6.0, 8.0) * 2.0 ** e[i] * rng.choice([-1, 1])
    for i in range(5, nb, 7):  # exact powers of two, and just below them
        x[i, :8] = 2.0 ** rng.integers(-60, 60, size=8)
        x[i, 8:16] = np.nextafter(x[i, :8].astype(np.float32), np.float32(0))
    x[2::11] = 0.0
    return x.astype(np.float32).reshape(rows, n)


DATA = hard_data()


@pytest.mark.parametrize("mode", mx.SCALE_MODES)
@pytest.mark.parametrize("rounding", mx.ROUNDINGS)
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_codes_and_scales_bit_exact(fmt, mode, rounding):
    q = mx.quantize(DATA, fmt, scale_mode=mode, rounding=rounding)
    want_codes, want_scales = ref_quantize(DATA, fmt, mode, rounding)
    np.testing.assert_array_equal(np.asarray(q.scales), want_scales)
    np.testing.assert_array_equal(codes_of(q), want_codes)


@pytest.mark.parametrize("fmt", ["mxfp6", "mxfp6_e3m2", "mxfp8_e5m2"])
def test_extra_formats_bit_exact(fmt):
    for mode, rounding in [("floor", "even"), ("rceil", "away")]:
        q = mx.quantize(DATA[:8], fmt, scale_mode=mode, rounding=rounding)
        want_codes, want_scales = ref_quantize(DATA[:8], fmt, mode, rounding)
        np.testing.assert_array_equal(np.asarray(q.scales), want_scales)
        np.testing.assert_array_equal(codes_of(q), want_codes)


def test_mxfp8_codes_are_float8_e4m3fn_bits():
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32) * 30
    q = mx.quantize(x, "mxfp8")
    scaled = np.ldexp(x.astype(np.float64), -np.repeat(np.asarray(q.exponents), 32, axis=1))
    saturated = np.clip(scaled, -448, 448)  # the ml_dtypes cast gives NaN above 464, not 448
    want = saturated.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(q.codes), want)


def test_worked_examples():
    amax = jnp.array([3.0, 4.0, 7.99, 8.0, 0.0, np.nextafter(np.float32(8), np.float32(0))])
    np.testing.assert_array_equal(np.asarray(mx.shared_exponent(amax)), [-1, 0, 0, 1, -127, 0])
    assert int(mx.scale_bytes(mx.shared_exponent(jnp.array(0.0)))) == 0
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [7.0, 2.5, 5.0, -0.2, 1.25, 0.25]
    q = mx.quantize(x)
    assert int(q.scales[0, 0]) == 127  # e = 0
    np.testing.assert_array_equal(codes_of(q)[0, :6], [7, 4, 6, 0x8, 2, 0])
    np.testing.assert_array_equal(np.asarray(mx.dequantize(q))[0, :6], [6.0, 2.0, 4.0, -0.0, 1.0, 0.0])
    qa = mx.quantize(x, rounding="away")
    np.testing.assert_array_equal(np.asarray(mx.dequantize(qa))[0, :6], [6.0, 3.0, 6.0, -0.0, 1.5, 0.5])


def test_exponent_modes_reference_and_nonfinite():
    rng = np.random.default_rng(2)
    amax = np.concatenate([10.0 ** rng.uniform(-38, 38, 2000), 2.0 ** np.arange(-126, 128),
                           [0.0, 1.75, 1.9375, 6.0, 6.0000005, 448.0, 449.0]]).astype(np.float32)
    for fmt in ["mxfp4", "mxfp8"]:
        for mode in mx.SCALE_MODES:
            want = [ref_exponent(float(a), fmt, mode) for a in amax]
            np.testing.assert_array_equal(np.asarray(mx.shared_exponent(amax, fmt, mode)), want)
    e = mx.shared_exponent(jnp.array([np.nan, np.inf, -np.inf]))
    np.testing.assert_array_equal(np.asarray(mx.scale_bytes(e)), [255, 255, 255])


def test_scale_modes_saturate_near_the_float_maximum():
    """ceil / even / rceil would pick e = 126 for amax near float32 max (and 14 on float16),
    where 4 x 2^126 overflows; the capped scale keeps every finite value finite."""
    f32max = float(np.finfo(np.float32).max)
    x = np.full((1, 32), f32max, np.float32)
    x[0, 1:4] = [-f32max, 2.9e38, 1.0]
    for mode in mx.SCALE_MODES:
        e = mx.shared_exponent(jnp.float32(f32max), "mxfp4", mode)
        assert int(e) == 125
        fq = np.asarray(mx.fake_quant(x, scale_mode=mode))
        dq = np.asarray(mx.dequantize(mx.quantize(x, scale_mode=mode)))
        np.testing.assert_array_equal(fq[0, :4], [6.0 * 2.0**125, -6.0 * 2.0**125, 6.0 * 2.0**125, 0.0])
        np.testing.assert_array_equal(fq.view(np.uint32), dq.view(np.uint32))
        e8 = int(mx.shared_exponent(jnp.float32(f32max), "mxfp8", mode))
        assert e8 == 119 and np.isfinite(np.asarray(mx.fake_quant(x, "mxfp8", scale_mode=mode))).all()
    h = np.full((1, 32), 65000.0, np.float16)
    for mode in mx.SCALE_MODES:
        assert int(mx.shared_exponent(jnp.float16(65000.0), "mxfp4", mode)) == 13
        fq16 = np.asarray(mx.fake_quant(h, scale_mode=mode))
        assert fq16.dtype == np.float16 and float(fq16.max()) == 6.0 * 2.0**13
    assert int(mx.shared_exponent(jnp.float32(65000.0), "mxfp4", "ceil")) == 14  # float32: no cap


def test_empty_arrays_give_empty_results():
    for shape, axis in [((0, 64), -1), ((3, 0), -1), ((0, 32, 5), 1)]:
        x = np.zeros(shape, np.float32)
        fq = mx.fake_quant(x, axis=axis)
        assert (fq.shape, fq.dtype) == (shape, jnp.float32)
        q = mx.quantize(x, axis=axis)
        assert q.codes.size == 0 and q.scales.size == 0 and q.shape == shape
        assert mx.dequantize(q).shape == shape
    q = mx.quantize(np.zeros((0, 64), np.float32))
    assert (q.codes.shape, q.scales.shape) == ((0, 32), (0, 2))
    q = mx.quantize_with_exponents(np.zeros((0, 64), np.float32), np.zeros((0, 2), np.int32))
    assert (q.codes.shape, q.scales.shape) == ((0, 32), (0, 2))


def test_fake_quant_equals_dequantize_quantize():
    for mode in mx.SCALE_MODES:
        for rounding in mx.ROUNDINGS:
            fq = np.asarray(mx.fake_quant(DATA, scale_mode=mode, rounding=rounding))
            dq = np.asarray(mx.dequantize(mx.quantize(DATA, scale_mode=mode, rounding=rounding)))
            np.testing.assert_array_equal(fq.view(np.uint32), dq.view(np.uint32))
    cols = DATA.reshape(-1, 32 * 8)  # blocks along axis 0
    fq8 = np.asarray(mx.fake_quant(cols, "mxfp8", axis=0))
    dq8 = np.asarray(mx.dequantize(mx.quantize(cols, "mxfp8", axis=0)))
    np.testing.assert_array_equal(fq8.view(np.uint32), dq8.view(np.uint32))


def test_round_to_grid_matches_table():
    rng = np.random.default_rng(3)
    special = [E2M1_GRID + 0.25, -E2M1_GRID - 0.25, 2.0 ** np.arange(-30, 4)]
    v = np.concatenate([rng.uniform(-9, 9, 5000)] + special)
    for fmt, gain in [("mxfp4", 1.0), ("mxfp8", 60.0)]:
        vv, grid = (v * gain).astype(np.float32), ref_grid(fmt)
        for rounding in mx.ROUNDINGS:
            idx = ref_nearest(np.abs(vv.astype(np.float64)), grid, rounding)
            want = np.where(np.signbit(vv), -1.0, 1.0) * grid[idx]
            got = np.asarray(mx.round_to_grid(vv, fmt, rounding))
            np.testing.assert_array_equal(got, want)
    ties = np.array([0.25, 1.25, 2.5, 5.0, -0.25, -1.25, -2.5, -5.0], np.float32)
    np.testing.assert_array_equal(np.asarray(mx.round_to_grid(ties)), [0, 1, 2, 4, -0, -1, -2, -4])
    away = np.asarray(mx.round_to_grid(ties, rounding="away"))
    np.testing.assert_array_equal(away, [0.5, 1.5, 3, 6, -0.5, -1.5, -3, -6])
    out = np.asarray(mx.round_to_grid(jnp.array([np.inf, -np.inf, np.nan, 7.0, -100.0])))
    np.testing.assert_array_equal(out[[0, 1, 3, 4]], [6, -6, 6, -6])
    assert np.isnan(out[2])


def test_straight_through_gradient():
    x = jnp.asarray(DATA[:4, :64])
    w = jnp.asarray(np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32))
    g = jax.jit(jax.grad(lambda x: jnp.sum(w * mx.fake_quant(x))))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    gb = jax.grad(lambda x: jnp.sum(mx.fake_quant(x, axis=0).astype(jnp.float32)))(x.T.astype(jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16 and float(jnp.sum(gb)) == 256.0


def test_jit_vmap_bfloat16_axis0():
    x = DATA[:8, :128]
    ref = np.asarray(mx.fake_quant(x))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: mx.fake_quant(a))(x)), ref)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda r: mx.fake_quant(r))(x)), ref)
    np.testing.assert_array_equal(np.asarray(mx.fake_quant(x.T, axis=0)), ref.T)
    q0, q1 = mx.quantize(x.T, axis=0), mx.quantize(x)
    np.testing.assert_array_equal(np.asarray(q0.codes), np.asarray(q1.codes))
    np.testing.assert_array_equal(np.asarray(mx.dequantize(q0)), ref.T)
    xb = jnp.asarray(x * 1e-3, jnp.bfloat16)
    yb = mx.fake_quant(xb)
    assert yb.dtype == jnp.bfloat16
    want = np.asarray(mx.fake_quant(xb.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(yb, np.float32), want)


def test_padding():
    x = DATA[:3, :40]
    with pytest.raises(ValueError, match="axis 1 has length 40"):
        mx.fake_quant(x)
    y = np.asarray(mx.fake_quant(x, pad=True))
    full = np.asarray(mx.fake_quant(np.pad(x, ((0, 0), (0, 24)))))
    np.testing.assert_array_equal(y, full[:, :40])
    q = mx.quantize(x, pad=True)
    assert q.codes.shape == (3, 32) and q.scales.shape == (3, 2) and q.shape == (3, 40)
    np.testing.assert_array_equal(np.asarray(mx.dequantize(q)), y)
    np.testing.assert_array_equal(np.asarray(mx.fake_quant(x.T, axis=0, pad=True)), y.T)


def test_errors_name_the_valid_choices():
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="mxfp4"):
        mx.fake_quant(x, "fp4")
    with pytest.raises(ValueError, match="rceil"):
        mx.quantize(x, scale_mode="nearest")
    with pytest.raises(ValueError, match="away"):
        mx.round_to_grid(x, rounding="stochastic")
    with pytest.raises(ValueError, match="block_size must be even"):
        mx.quantize(x, block_size=33, pad=True)
    with pytest.raises(ValueError, match="out of range"):
        mx.fake_quant(x, axis=2)
    with pytest.raises(ValueError, match="float"):
        mx.fake_quant(np.ones((2, 32), np.int32))


def test_nonfinite_blocks_become_nan_never_zero():
    x = np.tile(np.linspace(-3, 3, 96, dtype=np.float32), (3, 1))
    x[0, 5], x[1, 70], x[2, 40] = np.nan, np.inf, -np.inf
    q = mx.quantize(x)
    np.testing.assert_array_equal(np.asarray(q.scales) == 255, [[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    for y in (np.asarray(mx.dequantize(q)), np.asarray(mx.fake_quant(x))):
        blocks = np.isnan(y.reshape(3, 3, 32))
        np.testing.assert_array_equal(blocks.all(axis=2), np.asarray(q.scales) == 255)
        assert blocks.sum() == 3 * 32
    y8 = np.asarray(mx.fake_quant(x, "mxfp8"))
    assert np.isnan(y8).sum() == 3 * 32


def test_subnormal_inputs_exact_codes():
    x = np.zeros((1, 64), np.float32)
    x[0, :32] = np.linspace(-1.1e-38, 1.1e-38, 32, dtype=np.float32)  # amax subnormal: e = -127
    x[0, 32:40] = [2.0**-125, 1.2e-38, 3e-39, -6e-39, 1e-45, 0, 0, 0]
    for fmt in ["mxfp4", "mxfp8"]:
        q = mx.quantize(x, fmt)
        want_codes, want_scales = ref_quantize(x, fmt, "floor", "even")
        np.testing.assert_array_equal(np.asarray(q.scales), want_scales)
        np.testing.assert_array_equal(codes_of(q), want_codes)
        assert np.count_nonzero(want_codes[0, :32] & 0x7) > 10  # not flushed to zero


def test_nbytes_and_nibble_order():
    q = mx.quantize(jnp.zeros((4096, 4096), jnp.float32))
    assert q.nbytes == 4096 * 4096 // 2 + 4096 * 128
    assert q.codes.dtype == jnp.uint8 and q.scales.dtype == jnp.uint8
    packed = mx.pack_nibbles(jnp.array([[1, 2, 15, 0, 7, 9]], jnp.uint8))
    np.testing.assert_array_equal(np.asarray(packed), [[0x21, 0x0F, 0x97]])
    codes = np.random.default_rng(5).integers(0, 16, (3, 64)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(mx.unpack_nibbles(mx.pack_nibbles(codes))), codes)
    x = np.zeros((1, 32), np.float32)
    x[0, :2] = [0.5, -6.0]  # codes 1 and 0xF -> byte 0xF1
    assert int(mx.quantize(x).codes[0, 0]) == 0xF1


def test_mxarray_pytree_and_fixed_exponents():
    x = DATA[:4, :256]
    q = mx.quantize(x, scale_mode="even")
    assert len(jax.tree_util.tree_leaves(q)) == 2
    q2 = jax.jit(lambda m: m)(q)
    # the axis counts from the end (-1, was 1) so that a vmap batch axis cannot shift it
    assert (q2.fmt, q2.axis, q2.shape, q2.block_size) == ("mxfp4", -1, (4, 256), 32)
    again = mx.quantize_with_exponents(x, q.exponents)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(again.scales), np.asarray(q.scales))
    big = np.full((1, 32), 2.0**127, np.float32)
    qb = mx.quantize_with_exponents(big, jnp.full((1, 1), 127))
    np.testing.assert_array_equal(codes_of(qb), np.full((1, 32), 2))  # 2^127 / 2^127 = 1.0
    np.testing.assert_array_equal(np.asarray(mx.dequantize(qb)), big)
    with pytest.raises(ValueError, match="exponents must have shape"):
        mx.quantize_with_exponents(x, q.exponents[:, :3])
    assert float(mx.mul_pow2(jnp.float32(3.0), -127)) == 3.0 * 2.0**-127
    assert float(mx.mul_pow2(jnp.float32(2.0**-100), 200)) == 2.0**100


def test_mxarray_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    q = mx.quantize(DATA[:4, :128], pad=False)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "q", q)
        ckpt.wait_until_finished()
        r = ckpt.restore(tmp_path / "q", q)
    assert isinstance(r, mx.MXArray) and (r.fmt, r.shape) == ("mxfp4", (4, 128))
    np.testing.assert_array_equal(np.asarray(mx.dequantize(r)), np.asarray(mx.dequantize(q)))


def test_vmap_quantize_dequantize_keeps_the_batched_shape():
    # Before the fix the MXArray stored its unbatched shape and a positive axis as static
    # metadata: dequantize(vmap(quantize)(x)) returned shape (3, 64, 4) and vmap(dequantize) raised.
    x = jnp.asarray(DATA[:12, :64].reshape(3, 4, 64))
    ref = np.asarray(mx.fake_quant(x))
    q = jax.vmap(mx.quantize)(x)
    assert q.shape == (3, 4, 64) and q.axis == -1
    np.testing.assert_array_equal(np.asarray(mx.dequantize(q)), ref)
    np.testing.assert_array_equal(np.asarray(jax.vmap(mx.dequantize)(mx.quantize(x))), ref)
    np.testing.assert_array_equal(np.asarray(jax.vmap(mx.dequantize)(q)), ref)
    # blocks along the first axis of each example, padded: the axis counts from the end
    xt = jnp.swapaxes(x[..., :40], 1, 2)  # [3, 40, 4], blocks along 40 (padded to 64)
    qt = jax.vmap(lambda a: mx.quantize(a, axis=0, pad=True))(xt)
    assert qt.shape == (3, 40, 4) and qt.axis == -2
    assert qt.codes.shape == (3, 4, 32) and qt.scales.shape == (3, 4, 2)
    want = np.asarray(mx.fake_quant(xt, axis=1, pad=True))
    np.testing.assert_array_equal(np.asarray(mx.dequantize(qt)), want)
    np.testing.assert_array_equal(np.asarray(jax.vmap(mx.dequantize)(qt)), want)
    np.testing.assert_array_equal(np.asarray(mx.dequantize(mx.quantize(xt, axis=1, pad=True))), want)


def test_fake_quant_forward_mode_is_straight_through():
    # Before the fix fake_quant was a custom_vjp, so jax.jvp and jax.jacfwd raised.
    x = jnp.asarray(DATA[:2, :32])
    t = jnp.asarray(np.random.default_rng(7).standard_normal((2, 32)).astype(np.float32))
    y, ty = jax.jvp(mx.fake_quant, (x,), (t,))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(mx.fake_quant(x)))
    np.testing.assert_array_equal(np.asarray(ty), np.asarray(t))
    jf = jax.jacfwd(lambda a: mx.fake_quant(a))(x[0:1])
    jr = jax.jacrev(lambda a: mx.fake_quant(a))(x[0:1])
    np.testing.assert_array_equal(np.asarray(jf), np.eye(32, dtype=np.float32).reshape(1, 32, 1, 32))
    np.testing.assert_array_equal(np.asarray(jr), np.asarray(jf))
    yb, tb = jax.jvp(lambda a: mx.fake_quant(a, axis=0), (x.T.astype(jnp.bfloat16),),
                     (t.T.astype(jnp.bfloat16),))
    assert yb.dtype == tb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(tb), np.asarray(t.T.astype(jnp.bfloat16)))
