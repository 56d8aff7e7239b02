"""QuantLinear: wrapping any linear, fake quantization before deploy, the packed weight after."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batquant_jax import gptq, mx
from batquant_jax.models.llama import Linear
from batquant_jax.qlayers import QuantLinear
from batquant_jax.recipe import SETTINGS

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 64)), jnp.float32)


def test_from_flax_linear_is_x_times_fake_quantized_kernel():
    lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    lin.bias[...] = jnp.arange(32, dtype=jnp.float32) / 10
    q = QuantLinear.from_linear(lin, method="gptq", setting="W4A16")  # identity, no act. quant
    w = mx.fake_quant(jnp.asarray(lin.kernel[...]).T)  # [out, in]
    want = jnp.einsum("...i,oi->...o", X, w) + lin.bias[...]
    assert (q.in_features, q.out_features) == (64, 32)
    assert bool(jnp.all(q(X) == want))


def test_from_our_linear_with_transform_and_activation_quant():
    lin = Linear(64, 32, rngs=nnx.Rngs(1))
    q = QuantLinear.from_linear(lin, method="brq", setting="W4A4KV16")
    xt = q.transform(X)
    want = jnp.einsum("...i,oi->...o", mx.fake_quant(xt),
                      mx.fake_quant(q.transform.fold(lin.weight[...])))
    np.testing.assert_array_equal(np.asarray(q(X)), np.asarray(want))
    with pytest.raises(TypeError, match="from_linear takes flax.nnx.Linear or batquant_jax "
                                        "Linear, got Embed"):
        QuantLinear.from_linear(nnx.Embed(4, 8, rngs=nnx.Rngs(0)))


def test_deploy_keeps_the_packed_weight_and_jit_forward_dequantizes_it():
    lin = Linear(64, 32, rngs=nnx.Rngs(2))
    q = QuantLinear.from_linear(lin, method="rtn", setting="W4A8KV16")
    before = q(X)  # RTN fake quant of the weight in the forward
    packed = gptq.rtn_quantize(q.folded_weight()).to_mxarray()
    q.deploy(packed)
    leaves = jax.tree.leaves(nnx.state(q))
    assert sorted((str(v.dtype), v.shape) for v in leaves) == [
        ("uint8", (32, 2)), ("uint8", (32, 32))]  # scales [out, 64/32], codes [out, 64/2]
    after = nnx.jit(lambda m, x: m(x))(q, X)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    assert q.packed_weight is packed or bool(jnp.all(q.packed_weight.codes == packed.codes))
    with pytest.raises(ValueError, match=r"qweight shape \(32, 32\) \(axis -1\) != \(32, 64\)"):
        q.deploy(mx.quantize(jnp.zeros((32, 32))))
    with pytest.raises(ValueError, match="the layer is deployed"):
        q.folded_weight()


def test_mx_array_converts_to_jax_mx_operands_exactly():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 96)) * 3, jnp.float32)
    for fmt in ("mxfp4", "mxfp8", "mxfp8_e5m2"):
        q = mx.quantize(x, fmt)
        el, sc = q.to_jax()
        assert (el.shape, sc.shape, str(sc.dtype)) == ((4, 96), (4, 3), "float8_e8m0fnu")
        assert el.dtype == q.dtype
        values = el.astype(jnp.float32).reshape(4, 3, 32) * sc.astype(jnp.float32)[..., None]
        np.testing.assert_array_equal(np.asarray(values.reshape(4, 96)),
                                      np.asarray(mx.dequantize(q)))
        back = mx.MXArray.from_jax(el, sc)
        assert bool(jnp.all(back.codes == q.codes)) and bool(jnp.all(back.scales == q.scales))
    assert str(SETTINGS["W4A4KV16"].w_fmt) == "mxfp4"
