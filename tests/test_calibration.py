"""Quantized layers and layer-wise calibration, on tiny random models."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from batquant_jax import mx
from batquant_jax.calibration import CalibConfig, quantize_model
from batquant_jax.models.llama import LlamaConfig, LlamaForCausalLM
from batquant_jax.qlayers import (METHODS, SETTINGS, QuantLinear, num_trainable, quant_linears,
                                  quantize_layer)

CFG = LlamaConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, rope_theta=10000.0,
                  rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  attention_bias=False, qk_norm=False, max_position_embeddings=64)


def _model(seed=0):
    """A tiny random model with a few outlier hidden channels (as real LLMs have)."""
    model = LlamaForCausalLM(CFG, nnx.Rngs(seed))
    emb = model.embed_tokens.weight[...]
    boost = jnp.ones((CFG.hidden_size,)).at[jnp.array([3, 40])].set(25.0)
    model.embed_tokens.weight[...] = emb * 20.0 * boost
    return model


def _tokens(n=8, t=32, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, t)).astype(np.int32)


def test_quant_linear_equals_its_formula():
    model = _model()
    spec = SETTINGS["W4A4KV16"]
    layer = quantize_layer(model.layers[0], "batquant", spec)
    q = layer.self_attn.k_proj
    # perturb the learnable parameters away from their init
    t = q.transform
    t.A[...] = t.A[...] + 0.05 * jax.random.normal(jax.random.key(1), t.A.shape)
    t.log_scale[...] = 0.3 * jax.random.normal(jax.random.key(2), t.log_scale.shape)
    q.act_clip.a_max[...] = q.act_clip.a_max[...] - 2.0
    x = jax.random.normal(jax.random.key(3), (2, 5, CFG.hidden_size))
    xq = mx.fake_quant(q.act_clip(t(x)), "mxfp4")
    wq = mx.fake_quant(q.weight_clip(t.fold(q.weight[...])), "mxfp4")
    np.testing.assert_array_equal(np.asarray(q(x)), np.asarray(jnp.einsum("bti,oi->bto", xq, wq)))
    # q, k, v share one transform and one activation clip; each has its own weight clip
    assert layer.self_attn.q_proj.transform is t and layer.self_attn.v_proj.act_clip is q.act_clip
    assert layer.self_attn.q_proj.weight_clip is not q.weight_clip


def test_trainable_parameter_count_of_batquant_layer():
    layer = quantize_layer(_model().layers[0], "batquant", SETTINGS["W4A4KV16"])
    d, f = CFG.hidden_size, CFG.intermediate_size
    gpk = lambda n: 8 * 8 + (n // 32) * 4 * 4 + n          # A, B_i, channel scale
    act = lambda n: 2 * (n // 32)                            # a_max, a_min per block
    wclip = lambda o, n: 2 * o * (n // 32)
    outs = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": d, "gate_proj": f,
            "up_proj": f, "down_proj": d}
    ins = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": 64, "gate_proj": d, "up_proj": d,
           "down_proj": f}
    expected = (gpk(d) * 2 + gpk(64) + gpk(f) + act(d) * 2 + act(64) + act(f)
                + sum(wclip(outs[n], ins[n]) for n in outs))
    assert num_trainable(layer) == expected


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"g1 \* g2 \(the transform block\) "
                                         r"must be one of 16, 32, 64, 128, got 4 \* 2 = 8"):
        CalibConfig(g1=4, g2=2).validate()
    with pytest.raises(ValueError, match="unknown clip 'half'"):
        CalibConfig(clip="half").validate()
    with pytest.raises(ValueError, match="unknown method 'spinquant'"):
        CalibConfig(method="spinquant").validate()
    with pytest.raises(ValueError, match="unknown setting"):
        CalibConfig(setting="W2A2").validate()


@pytest.fixture(scope="module")
def calibrated():
    """rtn, gptq and batquant on the same tiny model and windows (compiled once per method),
    batquant with the library's defaults (5 epochs: at 3, the SmoothQuant-started layer 0 of
    this tiny model does not improve on its start)."""
    toks = _tokens()
    out = {}
    for method in ("rtn", "gptq", "batquant"):
        model, res = quantize_model(_model(), toks, method, epochs=5, batch_size=4,
                                    log=lambda s: None)
        out[method] = (model, res)
    return toks, out


def test_gptq_layers_beat_rtn(calibrated):
    _, out = calibrated
    for rep in out["gptq"][1].layers:
        assert rep.loss_final < rep.loss_rtn
    rtn_losses = [r.loss_final for r in out["rtn"][1].layers]
    np.testing.assert_allclose(rtn_losses, [r.loss_rtn for r in out["rtn"][1].layers], rtol=1e-6)


def test_batquant_training_lowers_the_layer_loss(calibrated):
    _, out = calibrated
    for rep in out["batquant"][1].layers:
        assert rep.steps == 5 * 2
        assert rep.loss_trained < rep.loss_init
        assert rep.loss_final < rep.loss_rtn
        assert not rep.fell_back


def test_deployed_weights_are_the_packed_mx_weights(calibrated):
    _, out = calibrated
    model, res = out["batquant"]
    for i, layer in enumerate(model.layers):
        for name, q in quant_linears(layer).items():
            assert isinstance(q, QuantLinear) and q.deployed
            packed = q.packed_weight
            assert packed.codes.dtype == jnp.uint8 and packed.codes.shape[-1] == q.in_features // 2
            assert packed.scales.shape == (q.out_features, q.in_features // 32)
            np.testing.assert_array_equal(np.asarray(mx.dequantize(packed)),
                                          np.asarray(q.effective_weight()))
            assert not any(isinstance(v, jax.Array) and v.dtype == jnp.float32 and
                           v.shape == (q.out_features, q.in_features)
                           for v in jax.tree.leaves(nnx.state(q)))  # no float copy kept


def test_quantized_model_is_close_to_full_precision(calibrated):
    toks, out = calibrated
    fp = float(jnp.mean(_model().nll(jnp.asarray(toks))))
    gaps = {m: float(jnp.mean(out[m][0].nll(jnp.asarray(toks)))) - fp for m in out}
    assert all(np.isfinite(list(gaps.values())))
    assert abs(gaps["batquant"]) < abs(gaps["rtn"])


def test_divergent_training_falls_back_to_finite_parameters():
    model, res = quantize_model(_model(), _tokens(), "batquant", epochs=2, batch_size=4, lr=1e6,
                                clip_lr=1e6, log=lambda s: None)
    for layer in model.layers:
        for q in quant_linears(layer).values():
            leaves = jax.tree.leaves(nnx.state(q))
            assert all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
    assert all(np.isfinite(r.loss_final) for r in res.layers)


def test_clip_and_transform_overrides_change_the_layer_structure():
    spec = SETTINGS["W4A4KV16"]
    for clip, act_on, w_on in (("none", False, False), ("weights", False, True),
                               ("activations", True, False), ("both", True, True)):
        cfg = CalibConfig(clip=clip)
        layer = quantize_layer(_model().layers[0], cfg.method_spec, spec)
        q = layer.mlp.down_proj
        assert (q.act_clip.enabled, q.weight_clip.enabled) == (act_on, w_on)
    cfg = CalibConfig(transform="block_affine", g1=8, g2=8)
    q = quantize_layer(_model().layers[0], cfg.method_spec, spec, g1=8, g2=8).mlp.up_proj
    assert type(q.transform).__name__ == "BlockAffine" and q.transform.P.shape == (1, 64, 64)


def test_method_table_matches_the_paper_table():
    assert METHODS["brq"].transform == "block_hadamard" and METHODS["brq"].hadamard_size == 32
    assert METHODS["mr-gptq"].hadamard_size == 128 and METHODS["quarot"].transform == "random_hadamard"
    assert METHODS["batquant"].clip == "block" and METHODS["flatquant"].clip == "tensor"
    assert [m for m, s in METHODS.items() if s.weights == "rtn"] == ["rtn"]


def test_auto_init_starts_from_the_better_of_hadamard_and_identity():
    toks = _tokens()
    init_losses = {}
    for init in ("hadamard", "identity", "auto"):
        _, res = quantize_model(_model(), toks, "batquant", epochs=0, init=init, log=lambda s: None)
        init_losses[init] = [r.loss_init for r in res.layers]
    expected = np.minimum(init_losses["hadamard"], init_losses["identity"])
    np.testing.assert_allclose(init_losses["auto"], expected, rtol=1e-6)


def test_transform_block_that_does_not_divide_d_shrinks_its_private_factor():
    from batquant_jax.qlayers import fit_block

    assert fit_block(576, 16, 8) == (16, 4)       # SmolLM2 hidden: 128 -> 64, like MR-GPTQ
    assert fit_block(1536, 16, 8) == (16, 8)      # intermediate: 128 divides
    assert fit_block(576, 8, 4) == (8, 4)
    assert fit_block(48, 16, 8) == (16, 1)        # g2 first, down to 1
    assert fit_block(24, 16, 8) == (8, 1)         # then g1
    layer = quantize_layer(_model().layers[0], METHODS["batquant"], SETTINGS["W4A4KV16"],
                           g1=16, g2=8)
    got = {n: (q.transform.g1, q.transform.g2, q.transform.block)
           for n, q in quant_linears(layer).items()}
    assert got["q_proj"] == got["up_proj"] == (16, 4, 64)   # hidden 64
    assert got["down_proj"] == (16, 8, 128)                 # intermediate 128


def test_token_mse_weighs_every_token_the_same():
    from batquant_jax.calibration import mse_loss, token_mse_loss
    y = jnp.ones((1, 4, 8)).at[0, 0].set(100.0)  # a massive first token
    err = jnp.zeros_like(y).at[0, 0].set(1.0).at[0, 1].set(0.1)
    # raw MSE: the first token's error (energy 8 on a token of energy 8e4) dominates
    assert float(mse_loss(y + err, y)) == pytest.approx((8 * 1.0 + 8 * 0.01) / 32, rel=1e-6)
    # per-token relative error: token 0 gives 8 / 8e4, token 1 0.08 / 8, tokens 2-3 nothing
    want = (8 / (8e4 + 8e-6) + 0.08 / (8 + 8e-6)) / 4
    assert float(token_mse_loss(y + err, y)) == pytest.approx(want, rel=1e-5)


def test_smooth_scale_init_follows_smoothquant_formula():
    from batquant_jax.calibration import LayerCalibrator, build_quantized_layer
    from batquant_jax.qlayers import group_heads
    model = _model()
    cfg = CalibConfig(method="batquant", scale_init="smooth", smooth_alpha=0.5, batch_size=4)
    cal = LayerCalibrator(cfg, 8)
    xs = model.embed(jnp.asarray(_tokens()))
    layer = build_quantized_layer(nnx.clone(model.layers[0]), cfg, 0)
    cal.smooth_scales(layer, cal.place.batches(xs, 4), 0.5)
    q = group_heads(layer)["qkv"]
    x = model.layers[0].input_layernorm(xs)
    a = jnp.max(jnp.abs(x.reshape(-1, CFG.hidden_size)), axis=0)
    w = jnp.max(jnp.abs(jnp.concatenate([layer.self_attn.q_proj.weight[...],
                                         layer.self_attn.k_proj.weight[...],
                                         layer.self_attn.v_proj.weight[...]])), axis=0)
    np.testing.assert_allclose(np.asarray(q.transform.scale()), np.asarray(a**0.5 / w**0.5),
                               rtol=1e-4)
    # the outlier channels (25x) get the largest scales
    assert set(np.argsort(np.asarray(q.transform.scale()))[-2:]) == {3, 40}


def test_flatquant_starts_from_random_orthogonal_factors():
    from batquant_jax.qlayers import make_transform
    t = make_transform(METHODS["flatquant"], 96, seed=3)
    for p in (t.P1[...], t.P2[...]):
        np.testing.assert_allclose(np.asarray(p @ p.T), np.eye(p.shape[0]), atol=1e-5)
        assert float(jnp.max(jnp.abs(p - jnp.eye(p.shape[0])))) > 0.1  # not the identity


def test_a_custom_objective_is_named_and_recorded_as_such():
    import functools

    def huber(out, y, delta=1.0):
        return jnp.mean(optax.huber_loss(out, y, delta=delta))

    lines = []
    model = LlamaForCausalLM(LlamaConfig(num_layers=1), nnx.Rngs(0))
    tokens = np.arange(4 * 32).reshape(4, 32) % 256
    _, res = quantize_model(model, tokens, "batquant", epochs=1,
                            loss_fn=functools.partial(huber, delta=0.5), log=lines.append)
    assert (res.loss_name, res.config.loss) == ("partial(huber)", "custom")
    assert lines[0] == "layer objective: partial(huber)"
    assert lines[-1].startswith("layer 1/1: partial(huber) rtn ")
    with pytest.raises(ValueError, match="loss 'custom' names an objective passed as loss_fn"):
        quantize_model(LlamaForCausalLM(LlamaConfig(num_layers=1), nnx.Rngs(0)), tokens,
                       "batquant", loss="custom", log=lambda s: None)


def test_quantize_model_takes_a_whole_calib_config():
    tokens = np.arange(4 * 32).reshape(4, 32) % 256
    cfg = CalibConfig(method="brq", setting="W4A8KV16", batch_size=2)
    a, ra = quantize_model(LlamaForCausalLM(LlamaConfig(num_layers=1), nnx.Rngs(0)), tokens, cfg,
                           log=lambda s: None)
    b, rb = quantize_model(LlamaForCausalLM(LlamaConfig(num_layers=1), nnx.Rngs(0)), tokens,
                           "brq", "W4A8KV16", batch_size=2, log=lambda s: None)
    assert ra.config == rb.config == cfg
    np.testing.assert_array_equal(np.asarray(a(tokens)), np.asarray(b(tokens)))
    with pytest.raises(ValueError, match="with a CalibConfig, pass no setting or other fields "
                                         r"\(got setting, epochs\)"):
        quantize_model(a, tokens, cfg, "W4A4KV16", epochs=1)


class _Block(nnx.Module):
    """A non-Llama block: x + W2 gelu(W1 x) with flax.nnx.Linear (or any module under .up)."""

    def __init__(self, d, hidden, rngs, up=None):
        self.up = up if up is not None else nnx.Linear(d, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class _Net(nnx.Module):
    def __init__(self, blocks):
        self.blocks = nnx.List(blocks)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x



def _mlp_layout():
    from batquant_jax.layout import Group, Layout
    return Layout(groups=(Group("", ("up",), "up"), Group("", ("down",), "down")), blocks="blocks")


def test_a_layout_quantizes_a_non_llama_net_and_refuses_widths_32_does_not_divide():
    """64 -> 96 -> 64 with flax.nnx.Linear, W4A4 gptq: packed weights of the right layout and
    outputs close to the float net's; an input of 48 features is refused in one line."""
    rngs = nnx.Rngs(3)
    net = _Net([_Block(64, 96, rngs) for _ in range(2)])
    x = jax.random.normal(jax.random.key(0), (8, 16, 64))
    ref = net(x)
    net, res = quantize_model(net, x, "gptq", layout=_mlp_layout(), log=lambda m: None)
    up = net.blocks[0].up.weight.get_value()
    assert isinstance(up, mx.MXArray) and up.codes.shape == (96, 32) and up.scales.shape == (96, 2)
    assert net.blocks[1].down.weight.get_value().codes.shape == (64, 48)
    rel = float(jnp.linalg.norm(net(x) - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.2, rel
    assert [r.index for r in res.layers] == [0, 1]
    odd = _Net([_Block(48, 64, rngs)])
    with pytest.raises(ValueError, match=r"^up reads 48 input features, not a multiple of the "
                       r"MX block size 32; pad the input"):
        quantize_model(odd, jnp.ones((4, 8, 48)), "gptq", layout=_mlp_layout(), log=lambda m: None)


def test_a_layout_naming_an_einsum_is_refused_in_one_line():
    rngs = nnx.Rngs(0)
    net = _Net([_Block(64, 64, rngs, up=nnx.Einsum("btd,df->btf", (64, 64), rngs=rngs))])
    with pytest.raises(TypeError, match=r"^up is a Einsum; the groups of a layout name "
                       r"flax.nnx.Linear or batquant_jax Linear modules"):
        quantize_model(net, jnp.ones((4, 8, 64)), "rtn", layout=_mlp_layout(), log=lambda m: None)


def test_decay_to_start_adds_the_pull_towards_the_initial_parameters():
    from batquant_jax.calibration import decay_to_start
    start = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
    tx = decay_to_start(0.5)
    state = tx.init(start)
    params = {"a": jnp.array([2.0, -2.0]), "b": jnp.array(1.0)}
    updates = {"a": jnp.array([0.25, 0.0]), "b": jnp.array(-1.0)}
    got, _ = tx.update(updates, state, params)
    assert [float(v) for v in got["a"]] == [0.75, 0.0] and float(got["b"]) == -2.0


def test_anchor_keeps_the_trained_transforms_near_their_start():
    from batquant_jax.calibration import is_transform_param
    toks = _tokens()

    def transforms(**kw):
        model, _ = quantize_model(_model(), toks, "batquant", batch_size=4, log=lambda s: None,
                                  **kw)
        return jax.tree.leaves(nnx.state(model, is_transform_param))

    start = transforms(epochs=0)
    dist = {a: sum(float(jnp.sum(jnp.square(p - s))) for p, s in zip(transforms(epochs=2,
                                                                                 anchor=a), start))
            for a in (0.0, 100.0)}
    assert dist[0.0] > 0 and dist[100.0] < 0.5 * dist[0.0]
    with pytest.raises(ValueError, match="anchor must be a finite number >= 0, got -1"):
        CalibConfig(anchor=-1.0)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_heap_returns_freed_pages():
    import ctypes

    from batquant_jax.calibration import release_free_heap
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024  # below glibc's mmap threshold: freed, these stay in its heap
    blocks = [libc.malloc(size) for _ in range(4096)]  # 256 MiB
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks[:-1]:  # the last one pins the heap's top: free alone cannot shrink it
        libc.free(b)
    before = _rss_mib()
    assert release_free_heap() is True
    assert before - _rss_mib() >= 200
    libc.free(blocks[-1])
