"""Quantized KV cache building blocks: KVSpec, KVQuant, the attention hook, packed storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batquant_jax import mx
from batquant_jax.kvquant import (KV_FORMATS, KVQuant, KVSpec, bytes_per_vector, freeze_all,
                                  is_kv_param, kv_cache_bytes, kv_spec, pack_kv, set_kv_quant,
                                  transform_matrices, unpack_kv)
from batquant_jax.models import LlamaConfig, LlamaForCausalLM, forward_logits

CFG = LlamaConfig(arch="llama", vocab_size=128, hidden_size=128, intermediate_size=256,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)
TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 24)).astype(np.int32)
H, KV, HD = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim


def _model():
    model = LlamaForCausalLM(CFG, nnx.Rngs(0))
    # larger weights than the 0.02 default, so that attention is far from uniform
    for layer in model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(layer.self_attn, name)
            lin.weight[...] = lin.weight[...] * 10.0
    return model


def _qkv(seed=0, t=6, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = r.standard_normal((2, t, H, HD)).astype(np.float32)
    k = r.standard_normal((2, t, KV, HD)).astype(np.float32)
    v = r.standard_normal((2, t, KV, HD)).astype(np.float32)
    k[..., 5] *= 30.0  # an outlier channel, as RoPE'd keys have
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _noisy_learned(model_or_kvq, seed=1):
    """Moves every learned parameter off its Hadamard start (non-orthogonal, scaled channels)."""
    state = nnx.state(model_or_kvq, is_kv_param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(kk, x.shape) for x, kk in zip(leaves, keys)]
    nnx.update(model_or_kvq, jax.tree.unflatten(tree, leaves))


def test_spec_validation_and_names():
    assert KV_FORMATS["KV4"] == KVSpec("mxfp4", "mxfp4")
    assert kv_spec("W4A8KV4") == KV_FORMATS["KV4"]
    assert kv_spec("W4A4KV8") == KV_FORMATS["KV8"]
    assert kv_spec("W4A16") == kv_spec(None) == KV_FORMATS["KV16"]
    assert not KV_FORMATS["KV16"].quantized and KV_FORMATS["KV8"].quantized
    with pytest.raises(ValueError, match="not an MX format"):
        KVSpec("mxfp5", None)
    with pytest.raises(ValueError, match="scale_mode"):
        KVSpec("mxfp4", "mxfp4", scale_mode="up")
    with pytest.raises(ValueError, match="block_size"):
        KVSpec("mxfp4", "mxfp4", block_size=0)
    with pytest.raises(ValueError, match="unknown KV format"):
        kv_spec("W4A4KV3")
    with pytest.raises(ValueError, match="no KV format"):
        kv_spec("fp8")
    with pytest.raises(ValueError, match="multiple of the KV block"):
        KVQuant("KV4", 4, 2, 48)
    with pytest.raises(ValueError, match="unknown KV transform"):
        KVQuant("KV4", 4, 2, 64, transform="rotate")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        KVQuant("KV4", 4, 3, 64)


def test_kv16_and_removal_are_bit_identical():
    model = _model()
    ref = np.asarray(model(TOKENS))
    ref_jit = np.asarray(forward_logits(model, TOKENS))
    set_kv_quant(model, "KV16")
    assert all(layer.self_attn.kv_quant is not None for layer in model.layers)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), ref)
    np.testing.assert_array_equal(np.asarray(forward_logits(model, TOKENS)), ref_jit)
    set_kv_quant(model, "KV4")
    q4 = np.asarray(model(TOKENS))
    assert np.abs(q4 - ref).max() > 1e-3  # KV4 is active
    set_kv_quant(model, None)
    assert all(layer.self_attn.kv_quant is None for layer in model.layers)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), ref)


@pytest.mark.parametrize("transform,per_head,channel_scale", [
    ("block_hadamard", True, False), ("learned", True, True), ("learned", False, False)])
def test_transform_without_quantization_keeps_logits(transform, per_head, channel_scale):
    model = _model()
    ref = np.asarray(forward_logits(model, TOKENS))
    mods = set_kv_quant(model, "KV16", transform, per_head=per_head, channel_scale=channel_scale)
    if transform == "learned":
        _noisy_learned(model)
        n = (KV if per_head else 1) * 2 * (8 * 8 + 2 * 4 * 4 + (HD if channel_scale else 0))
        assert mods[0].num_params == n
    out = np.asarray(forward_logits(model, TOKENS))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    # the transforms really act: K' and V' differ from K and V
    q, k, v = _qkv()
    q2, k2, v2 = nnx.jit(lambda m, *a: m.rotate(*a))(mods[0], q, k, v)
    assert float(jnp.abs(k2 - k).max()) > 0.1 and float(jnp.abs(v2 - v).max()) > 0.1
    assert float(jnp.abs(q2 - q).max()) > 0.1
    # Q' K'^T = Q K^T per query head, and the inverse undoes V's transform
    qg = q.reshape(2, 6, KV, H // KV, HD)
    q2g = q2.reshape(2, 6, KV, H // KV, HD)
    s_ref = jnp.einsum("btkgd,bskd->bkgts", qg, k)
    s_new = jnp.einsum("btkgd,bskd->bkgts", q2g, k2)
    np.testing.assert_allclose(np.asarray(s_new), np.asarray(s_ref),
                               atol=1e-4 * float(jnp.abs(s_ref).max()))
    v_back = nnx.jit(lambda m, o: m.attend_out(o))(mods[0], jnp.repeat(v2, H // KV, axis=2))
    np.testing.assert_allclose(np.asarray(v_back), np.asarray(jnp.repeat(v, H // KV, axis=2)),
                               atol=1e-5)


@pytest.mark.parametrize("name", ["KV4", "KV8"])
def test_fake_quant_is_mx_per_token_along_head_dim(name):
    spec = KV_FORMATS[name]
    q, k, v = _qkv()
    kvq = KVQuant(spec, H, KV, HD)
    q2, k2, v2 = kvq(q, k, v)
    np.testing.assert_array_equal(np.asarray(q2), np.asarray(q))
    # reference: every 32-element block of one head of one token on its own
    for x, y in ((k, k2), (v, v2)):
        ref = mx.fake_quant(x.reshape(-1, 32), spec.k_fmt).reshape(x.shape)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
        assert float(jnp.abs(y - x).max()) > 0  # not a no-op
    # per token: the first 3 tokens quantize the same alone (a cache filled token by token)
    _, k3, v3 = kvq(q[:, :3], k[:, :3], v[:, :3])
    np.testing.assert_array_equal(np.asarray(k3), np.asarray(k2[:, :3]))
    np.testing.assert_array_equal(np.asarray(v3), np.asarray(v2[:, :3]))
    # with a transform: quantization of K M exactly, Q' left unquantized
    kvh = KVQuant(spec, H, KV, HD, transform="block_hadamard")
    qr, kr, vr = kvh.rotate(q, k, v)
    qh, kh, vh = kvh(q, k, v)
    np.testing.assert_array_equal(np.asarray(qh), np.asarray(qr))
    np.testing.assert_array_equal(np.asarray(kh), np.asarray(mx.fake_quant(kr, spec.k_fmt)))
    np.testing.assert_array_equal(np.asarray(vh), np.asarray(mx.fake_quant(vr, spec.v_fmt)))


def test_mixed_spec_quantizes_one_side():
    q, k, v = _qkv()
    _, k2, v2 = KVQuant(KVSpec("mxfp4", None), H, KV, HD)(q, k, v)
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v))
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(mx.fake_quant(k, "mxfp4")))


def test_gradients_reach_learned_transform():
    model = _model()
    ref = model(TOKENS)
    set_kv_quant(model, "KV4", "learned", channel_scale=True)

    def loss(m):
        return jnp.mean((m(TOKENS) - ref) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, is_kv_param)))(model)
    leaves = nnx.to_flat_state(grads)
    assert len(leaves) == CFG.num_layers * 2 * KV * 3  # A, B, log_scale per K/V transform per head
    for path, g in leaves:
        assert path[-1] in ("A", "B", "log_scale") and ("k_transform" in path or "v_transform" in path)
        g = g[...] if hasattr(g, "get_value") else g
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.abs(g).max()) > 0, path


@pytest.mark.parametrize("name,dtype", [("KV4", jnp.float32), ("KV8", jnp.float32),
                                        ("KV4", jnp.bfloat16)])
def test_packed_storage_round_trip_and_bytes(name, dtype):
    spec = KV_FORMATS[name]
    q, k, v = _qkv(seed=3, t=10, dtype=dtype)
    kvq = KVQuant(spec, H, KV, HD, transform="block_hadamard")
    _, kf, vf = kvq(q, k, v)
    _, kr, vr = kvq.rotate(q, k, v)
    kp, vp = kvq.pack(kr, vr)
    assert isinstance(kp, mx.MXArray) and kp.codes.dtype == jnp.uint8
    width = HD // 2 if name == "KV4" else HD
    assert kp.codes.shape == (2, 10, KV, width) and kp.scales.shape == (2, 10, KV, HD // 32)
    ku, vu = kvq.unpack(kp, vp, dtype)
    assert ku.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ku, np.float32), np.asarray(kf, np.float32))
    np.testing.assert_array_equal(np.asarray(vu, np.float32), np.asarray(vf, np.float32))
    per = HD // 2 + HD // 32 if name == "KV4" else HD + HD // 32
    assert per == (34 if name == "KV4" else 66)
    assert bytes_per_vector(spec.k_fmt, HD) == per
    total = kv_cache_bytes(spec, batch=2, seq_len=10, num_kv_heads=KV, head_dim=HD)
    assert total == kp.nbytes + vp.nbytes == 2 * 10 * KV * 2 * per
    kv16 = kv_cache_bytes("KV16", batch=2, seq_len=10, num_kv_heads=KV, head_dim=HD)
    assert kv16 == 2 * 10 * KV * 2 * HD * 2  # bfloat16


def test_pack_unquantized_side_passes_through():
    x = jnp.ones((1, 2, KV, HD))
    assert pack_kv(x, None) is x
    np.testing.assert_array_equal(np.asarray(unpack_kv(x, jnp.bfloat16), np.float32), np.ones(x.shape))


def test_freeze_keeps_outputs_and_drops_parameters():
    q, k, v = _qkv(seed=5)
    kvq = KVQuant("KV4", H, KV, HD, transform="learned", channel_scale=True)
    _noisy_learned(kvq, seed=2)
    mats = transform_matrices(kvq)
    m, minv = mats[0]
    assert m.shape == minv.shape == (KV, HD, HD)
    np.testing.assert_allclose(np.asarray(m @ minv), np.broadcast_to(np.eye(HD), (KV, HD, HD)),
                               atol=1e-5)
    assert float(jnp.abs(m[0] - m[1]).max()) > 1e-2  # one transform per KV head
    assert kvq.num_params > 0
    kvq.freeze()
    assert kvq.num_params == 0 and kvq.k_transform is None and kvq.v_transform is None
    for w, (a, b) in zip(("k", "v"), mats):
        np.testing.assert_array_equal(np.asarray(kvq.matrices(w)[0]), np.asarray(a))
        np.testing.assert_array_equal(np.asarray(kvq.matrices(w)[1]), np.asarray(b))
    q2, k2, v2 = kvq.rotate(q, k, v)  # the fixed matrices are what rotate uses
    hi = jax.lax.Precision.HIGHEST
    np.testing.assert_array_equal(np.asarray(k2),
                                  np.asarray(jnp.einsum("btkd,kde->btke", k, m, precision=hi)))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(
        jnp.einsum("btkd,kde->btke", v, mats[1][0], precision=hi)))
    q_ref = jnp.einsum("btkgd,ked->btkge", q.reshape(2, 6, KV, H // KV, HD), minv, precision=hi)
    np.testing.assert_array_equal(np.asarray(q2), np.asarray(q_ref.reshape(q.shape)))


def test_kv_setting_trains_the_kv_transform_and_round_trips(tmp_path):
    """W4A8KV4 with a learned K/V transform: the layer built from the recipe holds a KVQuant
    whose transform parameters are transform parameters for the optimizer and get gradients
    from the layer objective; quantize_model + a checkpoint restore the model exactly (the
    skeleton rebuilds the KVQuant from the recipe)."""
    from batquant_jax import checkpoint
    from batquant_jax.calibration import is_transform_param, quantize_model
    from batquant_jax.models import LlamaConfig, LlamaForCausalLM, forward_nll
    from batquant_jax.qlayers import build_quantized_layer
    from batquant_jax.recipe import CalibConfig, token_mse_loss
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=32, max_position_embeddings=64)
    fp = LlamaForCausalLM(cfg, nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 64, (4, 32)).astype(np.int32)
    x = fp.embed(jnp.asarray(tokens))
    y = fp.layers[0](x)
    layer = build_quantized_layer(nnx.clone(fp.layers[0]),
                                  CalibConfig(setting="W4A8KV4", kv_transform="learned"), 0)
    kvq = layer.self_attn.kv_quant
    assert isinstance(kvq, KVQuant) and (kvq.spec.k_fmt, kvq.spec.v_fmt) == ("mxfp4", "mxfp4")
    g, tp, rest = nnx.split(layer, is_transform_param, ...)
    grads = jax.grad(lambda tp: token_mse_loss(nnx.merge(g, tp, rest)(x), y))(tp)
    kv = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)
          if "k_transform" in map(str, p) or "v_transform" in map(str, p)}
    assert sorted(kv) == ["self_attn/kv_quant/k_transform/0/A", "self_attn/kv_quant/k_transform/0/B",
                          "self_attn/kv_quant/v_transform/0/A", "self_attn/kv_quant/v_transform/0/B"]
    assert all(float(jnp.max(jnp.abs(v[...]))) > 0 for v in kv.values())
    model, res = quantize_model(fp, tokens, "batquant", "W4A8KV4", kv_transform="learned",
                                epochs=1, log=lambda m: None)
    checkpoint.save_quantized(tmp_path / "ck", model, res)
    loaded, _, meta = checkpoint.load_quantized(tmp_path / "ck")
    assert (meta["calib_config"]["setting"], meta["calib_config"]["kv_transform"]) == (
        "W4A8KV4", "learned")
    assert isinstance(loaded.layers[0].self_attn.kv_quant, KVQuant)
    t = jnp.asarray(tokens[:2])
    assert bool(jnp.all(forward_nll(model, t) == forward_nll(loaded, t)))
    frozen, _, _ = checkpoint.load_quantized(tmp_path / "ck", freeze_kv=True)
    fkv = frozen.layers[0].self_attn.kv_quant
    assert (fkv.num_params, fkv.k_transform, fkv.v_transform) == (0, None, None)
    np.testing.assert_allclose(np.asarray(forward_nll(frozen, t)), np.asarray(forward_nll(model, t)),
                               rtol=1e-5)
    assert freeze_all(frozen) == 0 and freeze_all(loaded) == 1
