"""Tests for batquant_jax.gptq: Hessian accumulation, RTN and MX-aware GPTQ (static groups)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batquant_jax import gptq, mx

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _correlated_layer(out=64, d=256, n=2048, seed=0):
    """W [out, d] and strongly correlated inputs x [n, d] (random mixing + outlier channels)."""
    rng = np.random.default_rng(seed)
    W = (0.05 * rng.standard_normal((out, d))).astype(np.float32)
    z = rng.standard_normal((n, d)).astype(np.float32)
    M = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
    x = z @ M + 0.3 * z
    x[:, [3 * d // 64, 17 * d // 64, 35 * d // 64, 50 * d // 64]] *= 20.0  # outlier channels
    return jnp.asarray(W), jnp.asarray(x)


def _hessian(x):
    return gptq.hessian_update(gptq.hessian_init(x.shape[-1]), x)


def _unscaled(res):
    """weight / 2^e per (row, block), exactly (power-of-two division), as numpy float64."""
    e = np.repeat(np.asarray(res.exponents, np.float64), res.block_size, axis=1)
    return np.asarray(res.weight, np.float64) / np.exp2(e)


def _output_error(x, W, Q):
    return float(jnp.sum((x @ (W - Q).T) ** 2))


def test_hessian_is_sum_over_batches():
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(s).astype(np.float32) for s in [(2, 7, 64), (5, 64), (3, 1, 64)]]
    H = gptq.hessian_init(64)
    assert H.shape == (64, 64) and H.dtype == jnp.float32 and float(jnp.abs(H).sum()) == 0.0
    for b in batches:
        H = gptq.hessian_update(H, jnp.asarray(b))
    X = np.concatenate([b.reshape(-1, 64) for b in batches]).astype(np.float64)
    ref = X.T @ X
    assert np.max(np.abs(np.asarray(H) - ref)) / np.max(np.abs(ref)) < 1e-6
    with pytest.raises(ValueError):
        gptq.hessian_update(H, jnp.zeros((4, 32)))


def test_rtn_exponents_and_nan_block():
    W, _ = _correlated_layer(out=16, d=64)
    W = W.at[3, 40].set(jnp.nan)
    res = gptq.rtn_quantize(W)
    amax = jnp.max(jnp.abs(W.reshape(16, 2, 32)), axis=-1)
    assert res.weight.shape == (16, 64) and res.exponents.shape == (16, 2)
    assert bool(jnp.all(res.exponents == mx.shared_exponent(amax, "mxfp4", "floor")))
    assert int(res.exponents[3, 1]) == mx.NAN_EXPONENT
    assert int(jnp.sum(jnp.isnan(res.weight))) == 32  # exactly the NaN block, all of it
    assert bool(jnp.all(jnp.isnan(res.weight[3, 32:])))
    assert np.all(np.isin(np.abs(_unscaled(res))[:, :32], E2M1_GRID))


def test_gptq_with_identity_hessian_equals_rtn_bit_exactly():
    W, _ = _correlated_layer(out=32, d=128)
    g = gptq.gptq_quantize(W, jnp.eye(128, dtype=jnp.float32))
    r = gptq.rtn_quantize(W)
    assert bool(jnp.all(g.exponents == r.exponents))
    assert int(jnp.sum(g.weight != r.weight)) == 0


def test_gptq_beats_rtn_on_correlated_inputs():
    W, x = _correlated_layer()
    H = _hessian(x)
    err_rtn = _output_error(x, W, gptq.rtn_quantize(W).weight)
    res = gptq.gptq_quantize(W, H)
    err_gptq = _output_error(x, W, res.weight)
    print(f"output error ||XW^T - XWq^T||^2: RTN {err_rtn:.2f}, GPTQ {err_gptq:.2f}")
    assert res.cholesky_retries == 0 and res.damp == pytest.approx(0.01)
    assert err_gptq < 0.9 * err_rtn


def test_gptq_static_exponents_and_grid():
    W, x = _correlated_layer(out=32, d=128, n=512)
    res = gptq.gptq_quantize(W, _hessian(x))
    amax = jnp.max(jnp.abs(W.reshape(32, 4, 32)), axis=-1)
    assert res.exponents.dtype == jnp.int32
    assert bool(jnp.all(res.exponents == mx.shared_exponent(amax, "mxfp4", "floor")))
    v = _unscaled(res)
    assert np.all(np.isin(np.abs(v), E2M1_GRID))
    # The sweep changes values (error feedback), not only the RTN rounding.
    assert int(jnp.sum(res.weight != gptq.rtn_quantize(W).weight)) > 0


def test_gptq_explicit_exponents():
    W, x = _correlated_layer(out=16, d=64, n=512)
    e = gptq.rtn_quantize(W).exponents + 1
    res = gptq.gptq_quantize(W, _hessian(x), exponents=e)
    assert bool(jnp.all(res.exponents == e))
    assert np.all(np.isin(np.abs(_unscaled(res)), E2M1_GRID))
    default = gptq.gptq_quantize(W, _hessian(x))
    assert int(jnp.sum(res.weight != default.weight)) > 0
    with pytest.raises(ValueError):
        gptq.gptq_quantize(W, _hessian(x), exponents=e[:, :1])


def test_gptq_mxfp8():
    W, x = _correlated_layer(out=32, d=128, n=1024)
    H = _hessian(x)
    res = gptq.gptq_quantize(W, H, fmt="mxfp8")
    amax = jnp.max(jnp.abs(W.reshape(32, 4, 32)), axis=-1)
    assert bool(jnp.all(res.exponents == mx.shared_exponent(amax, "mxfp8", "floor")))
    v = _unscaled(res).astype(np.float32)
    assert np.array_equal(v.astype(jnp.float8_e4m3fn).astype(np.float32), v)
    assert float(np.max(np.abs(v))) <= 448.0
    err_rtn = _output_error(x, W, gptq.rtn_quantize(W, fmt="mxfp8").weight)
    assert _output_error(x, W, res.weight) < err_rtn


def test_gptq_dead_column():
    W, x = _correlated_layer(out=16, d=64, n=512)
    x = x.at[:, 5].set(0.0)
    W = W.at[:, 5].set(100.0)  # would dominate its block's scale if not zeroed first
    res = gptq.gptq_quantize(W, _hessian(x))
    assert bool(jnp.all(jnp.isfinite(res.weight)))
    assert float(jnp.max(jnp.abs(res.weight[:, 5]))) == 0.0
    amax = jnp.max(jnp.abs(W.at[:, 5].set(0.0)[:, :32]), axis=-1)
    assert bool(jnp.all(res.exponents[:, 0] == mx.shared_exponent(amax, "mxfp4", "floor")))


def test_cholesky_failure_raises_damping():
    W, _ = _correlated_layer(out=16, d=64)
    H = jnp.ones((64, 64), jnp.float32)  # rank 1, no dead column: undamped Cholesky fails
    res = gptq.gptq_quantize(W, H, damp=0.0)
    assert res.cholesky_retries >= 1 and res.damp > 0.0
    assert bool(jnp.all(jnp.isfinite(res.weight)))


def test_no_retrace_on_second_call():
    W1, x1 = _correlated_layer(out=24, d=96, n=256, seed=3)
    W2, x2 = _correlated_layer(out=24, d=96, n=256, seed=4)
    gptq.gptq_quantize(W1, _hessian(x1))
    n_sweep, n_prep = gptq._gptq_sweep._cache_size(), gptq._prepare._cache_size()
    res = gptq.gptq_quantize(W2, _hessian(x2))
    assert gptq._gptq_sweep._cache_size() == n_sweep
    assert gptq._prepare._cache_size() == n_prep
    assert res.weight.shape == (24, 96)


def test_to_mxarray_dequantizes_exactly():
    W, x = _correlated_layer(out=32, d=128, n=1024)
    for res in (gptq.gptq_quantize(W, _hessian(x)), gptq.rtn_quantize(W)):
        packed = res.to_mxarray()
        assert packed.codes.shape == (32, 64) and packed.codes.dtype == jnp.uint8
        assert bool(jnp.all(packed.exponents == res.exponents))
        assert int(jnp.sum(mx.dequantize(packed) != res.weight)) == 0


def test_to_mxarray_keeps_fixed_exponents_where_requantizing_fails():
    # A block whose GPTQ output peaks at 240 * 2^e (E4M3): re-deriving the scale from that absmax
    # gives e - 1, where 240 * 2 = 480 saturates to 448; the fixed exponent keeps it exact.
    W = jnp.zeros((1, 32), jnp.float32).at[0, 0].set(240.0).at[0, 1].set(3.0)
    res = gptq.gptq_quantize(W, jnp.eye(32), fmt="mxfp8", exponents=jnp.zeros((1, 1), jnp.int32))
    assert float(res.weight[0, 0]) == 240.0 and float(res.weight[0, 1]) == 3.0
    assert int(jnp.sum(mx.dequantize(res.to_mxarray()) != res.weight)) == 0
    requant = mx.dequantize(mx.quantize(res.weight, "mxfp8"))
    assert float(requant[0, 0]) == 224.0


def test_quantize_weight_dispatch_and_errors():
    W, x = _correlated_layer(out=16, d=64, n=512)
    H = _hessian(x)
    rtn = gptq.quantize_weight(W, method="rtn")
    assert rtn.method == "rtn" and bool(jnp.all(rtn.weight == gptq.rtn_quantize(W).weight))
    assert bool(jnp.all(gptq.quantize_weight(W, H).weight == gptq.gptq_quantize(W, H).weight))
    with pytest.raises(ValueError):
        gptq.quantize_weight(W, method="gptq")
    with pytest.raises(ValueError):
        gptq.quantize_weight(W, H, method="awq")
    with pytest.raises(ValueError, match="multiple of block_size"):
        gptq.rtn_quantize(jnp.zeros((4, 48)))
    with pytest.raises(ValueError):
        gptq.gptq_quantize(W, H[:32, :32])
    with pytest.raises(ValueError):
        gptq.gptq_quantize(W.at[0, 0].set(jnp.nan), H)
    with pytest.raises(ValueError, match="rounding"):
        gptq.gptq_quantize(W, H, rounding="up")


def test_argument_checks_are_mx_own():
    # Before the fix gptq re-implemented mx's checks: it accepted block_size=1 for MXFP4 (two
    # codes per byte need an even block) and worded its errors differently.
    from batquant_jax import mx
    W = jnp.ones((4, 64), jnp.float32)
    bad = [dict(block_size=1), dict(scale_mode="round"), dict(rounding="up"), dict(fmt="mxfp3")]
    for kw in bad:
        with pytest.raises(ValueError) as want:
            mx.quantize(W, **kw)
        for fn in (gptq.rtn_quantize, lambda w, **k: gptq.gptq_quantize(w, jnp.eye(64), **k)):
            with pytest.raises(ValueError) as got:
                fn(W, **kw)
            assert str(got.value) == str(want.value)
    assert str(want.value) == "unknown MX format 'mxfp3'; valid: " + str(sorted(mx.FORMATS))
    with pytest.raises(ValueError) as e:
        gptq.rtn_quantize(jnp.zeros((4, 48)))
    assert str(e.value) == ("in_features d=48 is not a multiple of block_size=32; MX blocks must "
                            "tile the reduction axis exactly (no silent padding)")
    assert gptq.rtn_quantize(W, block_size=np.int64(32)).block_size == 32


def test_group_statistics_use_hessian_update_on_captured_inputs(monkeypatch):
    # Before the redesign QuantLinear summed X^T X inside its forward; now the group heads only
    # capture their inputs and calibration applies the one Hessian function (hessian_update)
    # to the transformed inputs, outside the linears.
    from flax import nnx

    from batquant_jax import distributed
    from batquant_jax.calibration import CalibConfig, LayerCalibrator
    from batquant_jax.models import LlamaConfig
    from batquant_jax.models.llama import DecoderLayer
    from batquant_jax.qlayers import group_heads, quantize_layer
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    layer = quantize_layer(DecoderLayer(config, nnx.Rngs(0)), "brq", "W4A4KV16")
    h = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 64)), jnp.float32)
    calls, real = [], gptq.hessian_update
    monkeypatch.setattr(gptq, "hessian_update", lambda H, x: calls.append(x.shape) or real(H, x))
    stats = LayerCalibrator(CalibConfig(method="brq", batch_size=2), 2).group_stats(layer, h[None])
    assert calls == [(2, 8, 64), (2, 8, 64), (2, 8, 64), (2, 8, 128)]  # traced once per group
    heads = group_heads(layer)
    qkv_in = layer.input_layernorm(h)
    h1 = h + layer.self_attn(qkv_in)
    ug_in = layer.post_attention_layernorm(h1)
    d_in = jax.nn.silu(layer.mlp.gate_proj(ug_in)) * layer.mlp.up_proj(ug_in)
    for g, x in (("qkv", qkv_in), ("ug", ug_in), ("d", d_in)):
        want = real(gptq.hessian_init(x.shape[-1]), heads[g].transform(x))
        np.testing.assert_allclose(np.asarray(stats[g][0]), np.asarray(want), rtol=1e-5,
                                   atol=1e-4)
        np.testing.assert_allclose(np.asarray(stats[g][1]),
                                   np.asarray(jnp.max(jnp.abs(x).reshape(-1, x.shape[-1]), 0)),
                                   rtol=1e-6)
    assert not hasattr(distributed, "hessian_sum")
