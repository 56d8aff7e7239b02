"""Packed MX codes decode to the same numbers whether a jitted function takes them as an argument
or closes over them (compile-time constants that XLA may fold).

XLA:CPU (jaxlib 0.10.2) folds ``bitcast_convert_type(uint8 -> float4_e2m1fn)`` of a constant
wrongly; every decode path here goes through integer nibble ops and a 16-entry table instead.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batquant_jax import gptq, mx
from batquant_jax.calibration import quantize_model
from batquant_jax.kvquant import set_kv_quant
from batquant_jax.models import LlamaConfig, LlamaForCausalLM
from batquant_jax.models.llama import KVCache, Linear
from batquant_jax.qlayers import QuantLinear

ALL_CODES = jnp.asarray(np.arange(256, dtype=np.uint8).reshape(8, 32))  # every byte: 16 x 16 pairs


def test_e2m1_table_equals_ml_dtypes_decoding_of_every_code():
    import ml_dtypes
    ref = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(mx.E2M1_VALUES, ref)
    np.testing.assert_array_equal(np.signbit(mx.E2M1_VALUES), np.arange(16) >= 8)


def test_dequantize_argument_and_closure_constant_agree_on_every_code():
    q = mx.MXArray(ALL_CODES, jnp.asarray(np.arange(120, 128, dtype=np.uint8)[:, None]
                                          .repeat(2, 1)), "mxfp4", -1, 64, 32)
    eager = np.asarray(mx.dequantize(q))
    closed = np.asarray(jax.jit(lambda: mx.dequantize(q))())
    as_arg = np.asarray(jax.jit(mx.dequantize)(q))
    np.testing.assert_array_equal(closed, eager)
    np.testing.assert_array_equal(as_arg, eager)
    # byte b holds codes (b & 15, b >> 4); row r has scale 2^(120 + r - 127)
    codes = np.stack([np.arange(256) & 15, np.arange(256) >> 4], -1).reshape(8, 64)
    want = mx.E2M1_VALUES[codes] * (2.0 ** (np.arange(120, 128) - 127))[:, None]
    np.testing.assert_array_equal(eager, want.astype(np.float32))


def test_quantlinear_forward_closed_over_equals_argument():
    lin = Linear(64, 32, rngs=nnx.Rngs(2))
    q = QuantLinear.from_linear(lin, method="rtn", setting="W4A16")
    q.deploy(gptq.rtn_quantize(q.folded_weight()).to_mxarray())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64)), jnp.float32)
    as_arg = nnx.jit(lambda m, x: m(x))(q, x)
    closed = jax.jit(lambda x: q(x))(x)
    np.testing.assert_array_equal(np.asarray(closed), np.asarray(as_arg))
    w = mx.dequantize(q.packed_weight)
    np.testing.assert_allclose(np.asarray(as_arg), np.asarray(x @ w.T), rtol=1e-5, atol=1e-5)


CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=64)
TOKENS = np.random.default_rng(1).integers(0, 64, size=(4, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def packed_model():
    model, _ = quantize_model(LlamaForCausalLM(CFG, nnx.Rngs(0)), TOKENS, "rtn", "W4A4KV16",
                              batch_size=4, log=lambda s: None)
    return model


def test_model_forward_closed_over_equals_argument(packed_model):
    ids = jnp.asarray(TOKENS[:2])
    as_arg = nnx.jit(lambda m, t: m(t))(packed_model, ids)
    closed = jax.jit(lambda t: packed_model(t))(ids)
    np.testing.assert_array_equal(np.asarray(closed), np.asarray(as_arg))


def test_packed_kv_cache_read_closed_over_equals_argument():
    model = LlamaForCausalLM(CFG, nnx.Rngs(0))
    spec = set_kv_quant(model, "KV4")[0].spec
    cache = KVCache.empty(CFG, 1, 8, jnp.float32, spec)
    k = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 2, 32)) * 3, jnp.float32)
    q = mx.quantize(k, spec.k_fmt)
    cache = cache._replace(k=q, v=q)
    eager_k, _ = cache.values()
    closed_k, _ = jax.jit(lambda: cache.values())()
    as_arg_k, _ = jax.jit(lambda c: c.values())(cache)
    np.testing.assert_array_equal(np.asarray(closed_k), np.asarray(eager_k))
    np.testing.assert_array_equal(np.asarray(as_arg_k), np.asarray(eager_k))
    np.testing.assert_array_equal(np.asarray(eager_k), np.asarray(mx.fake_quant(k, spec.k_fmt)))
