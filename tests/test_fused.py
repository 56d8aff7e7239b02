"""The fused MXFP4 products (C++ CPU kernel, Pallas kernel) against dequantize-then-dot.

"Within float32 rounding": |fused - reference| <= K * 2^-23 * (|x| @ |W|^T) elementwise, a
bound on the difference of two float32 summations of the same K exact products in different
orders (each product of an MXFP4 weight and a float32 / MXFP4 activation is exact in float32).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batquant_jax import fused, mx
from batquant_jax.qlayers import QuantLinear

KERNEL = fused.available()
needs_kernel = pytest.mark.skipif(
    not KERNEL, reason=f"fused CPU kernel unavailable: {fused.unavailable_reason()}")


def bound(x, w, k):
    """K * 2^-23 * (|x| @ |dequantize(w)|^T): the float32 reordering bound of each output."""
    wd = np.abs(np.asarray(mx.dequantize(w), np.float64))
    return k * 2.0 ** -23 * (np.abs(np.asarray(x, np.float64)) @ wd.T) + 1e-30


def within_rounding(got, want, x, w):
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    return float((err / bound(x, w, x.shape[-1])).max())


def weight(n, k, seed=0, spread=0):
    """An MXFP4 weight [n, k]; with ``spread`` its blocks' magnitudes span 2^-spread..2^spread."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if spread:
        e = rng.integers(-spread, spread + 1, size=(n, k // 32))
        w = w * np.repeat(np.exp2(e), 32, axis=1).astype(np.float32)
    return mx.quantize(jnp.asarray(w))


SHAPES = [(1, 64, 96), (1, 576, 576), (3, 130, 576), (8, 1536, 576), (9, 33, 1536),
          (17, 7, 64), (64, 40, 256)]


@needs_kernel
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_float_activations_equal_dequantize_then_dot(m, n, k):
    w = weight(n, k, seed=n)
    x = jax.random.normal(jax.random.key(m), (m, k))
    got = jax.jit(fused.mxfp4_dot)(x, w)
    assert got.shape == (m, n)
    assert within_rounding(got, fused.reference_dot(x, w), x, w) <= 1.0


@needs_kernel
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_mxfp4_activations_equal_dequantize_then_dot(m, n, k):
    w = weight(n, k, seed=n)
    xq = mx.quantize(jax.random.normal(jax.random.key(m), (m, k)) * 3.0)
    xd = mx.dequantize(xq)
    got = jax.jit(fused.mxfp4_dot_q)(xq, w)
    assert within_rounding(got, fused.reference_dot(xd, w), xd, w) <= 1.0


@needs_kernel
def test_scale_extremes():
    # block scales from 2^-100 to 2^100 in the weight, 2^-20..2^20 in the activations: every
    # block product stays a normal float32, and the two paths still agree
    w = weight(48, 512, seed=5, spread=100)
    assert int(w.scales.min()) <= 127 - 95 and int(w.scales.max()) >= 127 + 95
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 512)) * np.repeat(np.exp2(rng.integers(-20, 21, (4, 16))), 32, 1)
    x = jnp.asarray(x, jnp.float32)
    ref = fused.reference_dot(x, w)
    assert bool(jnp.all(jnp.isfinite(ref)))
    assert within_rounding(fused.mxfp4_dot(x, w), ref, x, w) <= 1.0
    xq = mx.quantize(x)
    xd = mx.dequantize(xq)
    assert within_rounding(fused.mxfp4_dot_q(xq, w), fused.reference_dot(xd, w), xd, w) <= 1.0


@needs_kernel
def test_nan_blocks_give_nan_where_the_reference_does():
    w = weight(16, 128, seed=7)
    scales = np.asarray(w.scales).copy()
    scales[3, 1] = 0xFF  # a NaN block in weight row 3
    w = mx.MXArray(w.codes, jnp.asarray(scales), "mxfp4", -1, 128, 32)
    x = jax.random.normal(jax.random.key(0), (2, 128))
    ref = np.asarray(fused.reference_dot(x, w))
    for got in (fused.mxfp4_dot(x, w), fused.mxfp4_dot_q(mx.quantize(x), w)):
        got = np.asarray(got)
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        assert int(np.isnan(got).sum()) == 2  # column 3 of both rows


@needs_kernel
def test_argument_and_closure_constant_give_the_same_bits():
    w = weight(64, 256, seed=8)
    x = jax.random.normal(jax.random.key(1), (2, 256))
    as_arg = jax.jit(fused.mxfp4_dot)(x, w)
    as_const = jax.jit(lambda: fused.mxfp4_dot(x, w))()
    assert np.array_equal(np.asarray(as_arg), np.asarray(as_const))
    xq = mx.quantize(x)
    assert np.array_equal(np.asarray(jax.jit(fused.mxfp4_dot_q)(xq, w)),
                          np.asarray(jax.jit(lambda: fused.mxfp4_dot_q(xq, w))()))


@needs_kernel
def test_leading_axes_and_vmap():
    w = weight(40, 96, seed=9)
    x = jax.random.normal(jax.random.key(2), (2, 3, 96))
    flat = fused.mxfp4_dot(x.reshape(6, 96), w).reshape(2, 3, 40)
    assert np.array_equal(np.asarray(fused.mxfp4_dot(x, w)), np.asarray(flat))
    assert np.array_equal(np.asarray(jax.vmap(fused.mxfp4_dot, in_axes=(0, None))(x, w)),
                          np.asarray(flat))


def test_pallas_kernel_in_interpret_mode():
    w = weight(256, 192, seed=10)
    x = jax.random.normal(jax.random.key(3), (5, 192))
    got = fused.pallas_dot(x, w.codes, w.scales, interpret=True, block_n=64)
    assert within_rounding(got, fused.reference_dot(x, w), x, w) <= 1.0


def test_bad_operands_are_refused():
    w = weight(8, 64)
    with pytest.raises(ValueError, match="x has 96 features, the weight 64"):
        fused.mxfp4_dot(jnp.ones((1, 96)), w)
    with pytest.raises(ValueError, match="blocked by 32"):
        fused.mxfp4_dot(jnp.ones((1, 64)), mx.quantize(jnp.ones((8, 64)), block_size=16))
    with pytest.raises(ValueError, match="fused mode must be one of auto, on, off"):
        fused.set_mode("fast")


def test_choose_follows_the_mode_and_the_row_count():
    w = weight(8, 64)
    with fused.matmul_mode("off"):
        assert fused.choose(w, 1, "mxfp4") is None
    with fused.matmul_mode("auto"):
        want = "q" if KERNEL else None
        assert fused.choose(w, 1, "mxfp4") == want
        assert fused.choose(w, fused.AUTO_MAX_ROWS, None) == (want and "f32")
        assert fused.choose(w, fused.AUTO_MAX_ROWS + 1, "mxfp4") is None
    with fused.matmul_mode("on"):
        assert fused.choose(w, 10_000, "mxfp8") == (want and "f32")
        assert fused.choose(mx.quantize(jnp.ones((8, 64)), "mxfp8"), 1, None) is None


@needs_kernel
@pytest.mark.parametrize("setting", ["W4A4KV16", "W4A8KV16", "W4A16"])
def test_quant_linear_fused_equals_reference(setting):
    lin = nnx.Linear(192, 96, rngs=nnx.Rngs(0))
    q = QuantLinear.from_linear(lin, method="brq", setting=setting)
    q.deploy(mx.quantize(q.folded_weight()))
    x = jax.random.normal(jax.random.key(4), (1, 3, 192))
    with fused.matmul_mode("off"):
        ref = jax.jit(lambda x: q(x))(x)
    with fused.matmul_mode("on"):
        got = jax.jit(lambda x: q(x))(x)
    xin = np.asarray(q.quantize_input(x)).reshape(3, 192)
    assert within_rounding(np.asarray(got).reshape(3, 96), np.asarray(ref).reshape(3, 96),
                           xin, q.packed_weight) <= 1.0


def test_without_a_compiler_the_reference_path_runs_with_one_message(tmp_path):
    code = ("import jax.numpy as jnp; from batquant_jax import fused, mx\n"
            "w = mx.quantize(jnp.ones((8, 64)))\n"
            "print(fused.choose(w, 1, 'mxfp4'), fused.choose(w, 1, None))\n"
            "print(float(fused.mxfp4_dot(jnp.ones((1, 64)), w)[0, 0]))\n")
    env = dict(os.environ, BATQUANT_CACHE=str(tmp_path), CXX="no-such-compiler")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["None", "None", "64.0"]
    msgs = [ln for ln in res.stderr.splitlines() if "CPU kernels are unavailable" in ln]
    assert msgs == ["batquant_jax: the C++ CPU kernels are unavailable (no C++ compiler "
                    "('no-such-compiler' is not on PATH; set $CXX)); using the dequantize-then-dot "
                    "path and XLA's weight decoders"]


@pytest.fixture(scope="module")
def smollm2_rtn():
    """SmolLM2-135M quantized by RTN at W4A4KV16 in memory (every linear packed)."""
    from batquant_jax.calibration import quantize_model
    from batquant_jax.models import load_model
    loaded = load_model("smollm2-135m")
    model, _ = quantize_model(loaded.model, np.zeros((4, 32), np.int32), "rtn", "W4A4KV16",
                              log=lambda m: None)
    return model, loaded.tokenizer


@pytest.mark.slow
@needs_kernel
def test_every_linear_of_a_real_quantized_model(smollm2_rtn):
    from batquant_jax.qlayers import quant_modules
    model, _ = smollm2_rtn
    linears = quant_modules(model)
    assert len(linears) == 210
    worst = 0.0
    for i, q in enumerate(linears):
        w = q.packed_weight
        x = jax.random.normal(jax.random.key(i), (2, w.length)) * 4.0
        worst = max(worst, within_rounding(fused.mxfp4_dot(x, w), fused.reference_dot(x, w), x, w))
        xq = mx.quantize(x)
        xd = mx.dequantize(xq)
        worst = max(worst, within_rounding(fused.mxfp4_dot_q(xq, w), fused.reference_dot(xd, w),
                                           xd, w))
    assert worst <= 1.0


@pytest.mark.slow
@needs_kernel
def test_greedy_tokens_of_the_fused_decode_equal_the_reference_path(smollm2_rtn):
    from batquant_jax import generate as g
    model, tok = smollm2_rtn
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a small village,"]
    runs = {}
    for mode in ("off", "auto"):
        with fused.matmul_mode(mode):
            runs[mode] = g.generate(model, tok, prompts, max_new_tokens=32, eos_ids=())
    assert runs["auto"].tokens == runs["off"].tokens
    assert [len(t) for t in runs["auto"].tokens] == [32, 32, 32]


PORTABLE = r"""
import jax, jax.numpy as jnp, numpy as np
from batquant_jax import fused, mx
assert fused.available(), fused.unavailable_reason()
worst = 0.0
for m, n, k in [(1, 64, 96), (3, 130, 576), (9, 33, 256)]:
    w = mx.quantize(jax.random.normal(jax.random.key(n), (n, k)))
    x = jax.random.normal(jax.random.key(m), (m, k))
    xq = mx.quantize(x)
    for got, xin in ((fused.mxfp4_dot(x, w), x), (fused.mxfp4_dot_q(xq, w), mx.dequantize(xq))):
        ref = fused.reference_dot(xin, w)
        wd = np.abs(np.asarray(mx.dequantize(w), np.float64))
        bound = k * 2.0 ** -23 * (np.abs(np.asarray(xin, np.float64)) @ wd.T) + 1e-30
        worst = max(worst, float((np.abs(np.asarray(got, np.float64) - np.asarray(ref)) / bound).max()))
print(fused.library_path().name, worst)
"""


@pytest.mark.skipif(not KERNEL or os.uname().machine != "x86_64",
                    reason="needs the C++ compiler and an x86-64 machine")
def test_the_portable_loops_without_simd(tmp_path):
    """The kernel built for plain x86-64 (no AVX2: the loops other CPUs run) in a fresh cache."""
    env = dict(os.environ, BATQUANT_CACHE=str(tmp_path), BATQUANT_KERNEL_ARCH="x86-64")
    res = subprocess.run([sys.executable, "-c", PORTABLE], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    name, worst = res.stdout.split()
    assert name != fused.library_path().name  # a build of its own
    assert float(worst) <= 1.0
