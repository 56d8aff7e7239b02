"""The Flax NNX decoder on its own: swappable linears, layer-wise use, nll, validation."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batquant_jax.models import DecoderLayer, Linear, LlamaConfig, LlamaForCausalLM, forward_logits, hf_param_names
from batquant_jax.models.llama import rope_inv_freq

CFG = LlamaConfig(arch="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32, attention_bias=True, qk_norm=True)
TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 12)).astype(np.int32)


def _model(config=CFG, dtype=jnp.float32):
    return LlamaForCausalLM(config, nnx.Rngs(0), dtype=dtype)


class Wrapper(nnx.Module):
    """Calls the module it wraps, the way a quantized linear would wrap a float one."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x):
        return self.inner(x)


class Zeros(nnx.Module):
    def __init__(self, out_features):
        self.out_features = out_features

    def __call__(self, x):
        return jnp.zeros(x.shape[:-1] + (self.out_features,), x.dtype)


def test_linear_is_x_times_weight_transposed():
    lin = Linear(64, 32, bias=True, rngs=nnx.Rngs(1))
    lin.bias[...] = jnp.arange(32, dtype=jnp.float32)
    x = np.random.default_rng(1).normal(size=(3, 5, 64)).astype(np.float32)
    w = np.asarray(lin.weight[...])
    assert w.shape == (32, 64)
    np.testing.assert_allclose(np.asarray(lin(x)), x @ w.T + np.arange(32), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last dim 64"):
        lin(np.zeros((2, 63), np.float32))


def test_swapped_linears_keep_or_change_logits():
    model = _model()
    ref = np.asarray(model(TOKENS))
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in model.layers:
        for n in names:
            setattr(layer.self_attn, n, Wrapper(getattr(layer.self_attn, n)))
        for n in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, n, Wrapper(getattr(layer.mlp, n)))
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), ref)
    np.testing.assert_allclose(np.asarray(forward_logits(model, TOKENS)), ref, atol=1e-5)
    model.layers[1].self_attn.q_proj = Zeros(CFG.num_heads * CFG.head_dim)
    changed = np.asarray(forward_logits(model, TOKENS))
    assert np.abs(changed - ref).max() > 1e-2


def test_layers_one_by_one_equal_full_forward():
    model = _model()
    h = model.embed(TOKENS)
    assert h.shape == (2, 12, 64)
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        h = layer(h)
    np.testing.assert_array_equal(np.asarray(model.head(h)), np.asarray(model(TOKENS)))


def test_decoder_layer_positions():
    layer = _model().layers[0]
    h = jax.random.normal(jax.random.key(0), (2, 12, 64))
    base = np.asarray(layer(h))
    np.testing.assert_array_equal(np.asarray(layer(h, jnp.arange(12))), base)
    # RoPE is relative: shifting every position leaves the output unchanged up to rounding.
    np.testing.assert_allclose(np.asarray(layer(h, jnp.arange(12) + 7)), base, atol=1e-4)
    assert np.abs(np.asarray(layer(h, jnp.arange(12)[::-1])) - base).max() > 1e-3
    with pytest.raises(ValueError, match="positions must be"):
        layer(h, jnp.arange(11))
    with pytest.raises(ValueError, match=r"\[B, T, d\]"):
        layer(h[0])


def test_causal():
    model = _model()
    other = TOKENS.copy()
    other[:, -1] = (other[:, -1] + 1) % 128
    a, b = np.asarray(model(TOKENS)), np.asarray(model(other))
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    assert np.abs(a[:, -1] - b[:, -1]).max() > 1e-4


def test_nll_matches_log_softmax_of_logits():
    model = _model(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=1,
                               num_heads=2, num_kv_heads=1, head_dim=32, tie_word_embeddings=True))
    assert model.lm_head is None
    logits = np.asarray(model(TOKENS), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp[:, :-1], TOKENS[:, 1:, None], axis=-1)[..., 0]
    nll = np.asarray(model.nll(TOKENS))
    assert nll.shape == (2, 11) and nll.dtype == np.float32
    np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="T >= 2"):
        model.nll(TOKENS[:, :1])


def test_bfloat16_close_to_float32():
    f32 = _model()
    weights = {k: np.asarray(v[...]) for k, v in hf_param_names(f32).items()}
    bf16 = LlamaForCausalLM.from_weights(CFG, weights, dtype=jnp.bfloat16)
    assert bf16.layers[0].mlp.up_proj.weight[...].dtype == jnp.bfloat16
    a, b = np.asarray(f32(TOKENS)), np.asarray(bf16(TOKENS))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_from_weights_round_trip_and_errors():
    model = _model()
    weights = {k: np.asarray(v[...]) for k, v in hf_param_names(model).items()}
    # embed, norm, lm_head + per layer: 2 norms, 7 weights, 4 biases (qwen3 biases o_proj too), 2 qk norms
    assert len(weights) == 3 + 2 * 15
    assert "model.layers.1.self_attn.k_norm.weight" in weights and "lm_head.weight" in weights
    loaded = LlamaForCausalLM.from_weights(CFG, weights)
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(model(TOKENS)))
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        LlamaForCausalLM.from_weights(CFG, {k: v for k, v in weights.items() if "0.mlp.up" not in k})
    with pytest.raises(ValueError, match="unexpected tensor"):
        LlamaForCausalLM.from_weights(CFG, {**weights, "model.layers.0.mlp.up_proj.bias": np.zeros(128)})
    bad = {**weights, "model.norm.weight": np.ones(63, np.float32)}
    with pytest.raises(ValueError, match=r"shape \(63,\), expected \(64,\)"):
        LlamaForCausalLM.from_weights(CFG, bad)


def test_zero_construction_and_config_checks():
    model = LlamaForCausalLM(CFG)
    assert float(jnp.abs(model.layers[0].self_attn.q_proj.weight[...]).max()) == 0.0
    assert float(model.norm.weight[...].sum()) == 64.0
    with pytest.raises(ValueError, match="unsupported arch 'gpt2'"):
        LlamaConfig(arch="gpt2")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        LlamaConfig(rope_scaling=(("rope_type", "yarn"),))
    with pytest.raises(ValueError, match="integer array"):
        model.embed(np.zeros((2, 3), np.float32))


def test_llama3_rope_frequencies():
    scaled = LlamaConfig(head_dim=16, rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                                    ("low_freq_factor", 1.0),
                                                    ("original_max_position_embeddings", 64),
                                                    ("rope_type", "llama3")))
    base = rope_inv_freq(LlamaConfig(head_dim=16))
    inv = rope_inv_freq(scaled)
    wavelen = 2 * np.pi / base
    np.testing.assert_array_equal(inv[wavelen < 16], base[wavelen < 16])  # high frequencies kept
    np.testing.assert_allclose(inv[wavelen > 64], base[wavelen > 64] / 8.0, rtol=1e-6)  # low ones / factor
    assert inv.dtype == np.float32 and inv.shape == (8,)


def test_forward_from_input_embeddings_and_its_gradient():
    model = LlamaForCausalLM(LlamaConfig(num_layers=2), nnx.Rngs(0))
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    h = model.embed(ids)
    np.testing.assert_array_equal(np.asarray(model.logits_from_embeddings(h)),
                                  np.asarray(model(ids)))
    g = jax.grad(lambda e: model.logits_from_embeddings(e)[0, -1, 7])(h)
    assert g.shape == h.shape and bool(jnp.all(g[1] == 0)) and float(jnp.abs(g[0]).sum()) > 0
    eps, d = 1e-2, jnp.zeros_like(h).at[0, 2, 5].set(1.0)  # central difference along one input
    fd = (model.logits_from_embeddings(h + eps * d)[0, -1, 7]
          - model.logits_from_embeddings(h - eps * d)[0, -1, 7]) / (2 * eps)
    np.testing.assert_allclose(float(fd), float(g[0, 2, 5]), rtol=2e-2, atol=1e-4)


def test_large_vocabulary_nll_runs_over_chunks_and_matches_log_softmax():
    from batquant_jax.models import llama
    cfg = LlamaConfig(vocab_size=70_000, num_layers=1)  # > CHUNKED_VOCAB_ABOVE: chunked path
    assert cfg.vocab_size > llama.CHUNKED_VOCAB_ABOVE
    model = LlamaForCausalLM(cfg, nnx.Rngs(0))
    model.lm_head.weight[...] = model.lm_head.weight[...] * 50.0  # logits far from uniform
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9)).astype(np.int32)
    got = np.asarray(model.nll(ids))
    logp = jax.nn.log_softmax(model(ids)[:, :-1], axis=-1)
    want = -np.take_along_axis(np.asarray(logp), ids[:, 1:, None], axis=-1)[..., 0]
    assert got.shape == (2, 8) and llama._chunk_rows(70_000) == 14_000
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_target_scores_over_chunks_equal_the_one_shot_log_softmax(monkeypatch):
    # what zero-shot scoring reads: log-probability of each target and whether it is the
    # argmax, over vocabulary chunks for a large head; a logit tie across two chunks keeps the
    # first index, as jnp.argmax does
    from batquant_jax.models import llama
    cfg = LlamaConfig(vocab_size=70_000, num_layers=1)
    model = LlamaForCausalLM(cfg, nnx.Rngs(0))
    w = model.lm_head.weight[...] * 50.0
    w = w.at[30_000].set(w[3])  # rows 3 (chunk 0) and 30,000 (chunk 2) give equal logits
    model.lm_head.weight[...] = w
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((2, 5, cfg.hidden_size)), jnp.float32)
    logits = model.head(h)
    top = np.asarray(jnp.argmax(logits, axis=-1))
    targets = rng.integers(0, cfg.vocab_size, size=(2, 5)).astype(np.int32)
    targets[0, :3] = top[0, :3]  # some targets are the greedy token
    lp, greedy = model.target_scores(h, targets)
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, axis=-1)),
                              targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(greedy), top == targets)
    assert int(np.asarray(greedy).sum()) >= 3
    # the tie: make row 3's logit the largest of one slot, then its twin must not win
    h_tie = jnp.asarray(model.lm_head.weight[3])[None, None, :] * 10.0
    _, g3 = model.target_scores(h_tie, np.array([[3]], np.int32))
    _, g30k = model.target_scores(h_tie, np.array([[30_000]], np.int32))
    assert int(jnp.argmax(model.head(h_tie)[0, 0])) in (3, 30_000)
    assert bool(g3[0, 0]) == (int(jnp.argmax(model.head(h_tie)[0, 0])) == 3)
    assert not bool(g30k[0, 0])
    # a small head keeps the one-shot path: the same values bit for bit as before
    monkeypatch.setattr(llama, "CHUNKED_VOCAB_ABOVE", 100_000)
    lp1, greedy1 = model.target_scores(h, targets)
    np.testing.assert_array_equal(np.asarray(lp1), want)
    np.testing.assert_array_equal(np.asarray(greedy1), top == targets)
