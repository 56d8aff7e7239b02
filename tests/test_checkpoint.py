"""Tests for the quantized checkpoint format and the per-layer resume state (in memory, no CLI)."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batquant_jax import checkpoint
from batquant_jax.calibration import quantize_model
from batquant_jax.models import LlamaConfig, LlamaForCausalLM, forward_nll
from batquant_jax.qlayers import METHODS, quant_linears

CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True,
                     max_position_embeddings=128)
TOKENS = np.random.default_rng(0).integers(0, 64, size=(8, 32)).astype(np.int32)


@pytest.fixture(scope="module")
def quantized():
    """A 2-layer model quantized with block Hadamard + GPTQ (brq): (model, CalibrationResult)."""
    model = LlamaForCausalLM(CONFIG, nnx.Rngs(0))
    return quantize_model(model, TOKENS, "brq", "W4A4KV16", batch_size=4, log=lambda s: None)


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    model, res = quantized
    out = tmp_path_factory.mktemp("ckpt")
    meta = checkpoint.save_quantized(out, model, res.qweights, None,
                                     {"method": "brq", "setting": "W4A4KV16",
                                      "calib_config": dataclasses.asdict(res.config)})
    return out, meta


def test_round_trip_gives_identical_model(quantized, saved):
    model, _ = quantized
    out, _ = saved
    loaded, tokenizer, meta = checkpoint.load_quantized(out)
    assert tokenizer is None and meta["method"] == "brq"
    assert sorted(os.listdir(out)) == ["checkpoint", "metadata.json"]
    tokens = jnp.asarray(TOKENS)
    assert bool(jnp.all(forward_nll(model, tokens) == forward_nll(loaded, tokens)))
    for i in range(CONFIG.num_layers):
        for name, q in quant_linears(loaded.layers[i]).items():
            ref = quant_linears(model.layers[i])[name]
            assert q.deployed and q.hessian is None
            assert np.array_equal(np.asarray(q.weight[...]), np.asarray(ref.weight[...]))
            assert np.array_equal(np.asarray(q.bias[...]) if q.bias is not None else 0,
                                  np.asarray(ref.bias[...]) if ref.bias is not None else 0)


def test_stored_arrays_are_packed_codes_not_float_weights(quantized, saved):
    _, res = quantized
    out, meta = saved
    arrays = checkpoint.read_arrays(out)
    assert not [k for k in arrays if k.startswith("params/") and k.endswith("_proj/weight")]
    codes = arrays["qweights/layers/0/down_proj/codes"]
    scales = arrays["qweights/layers/1/q_proj/scales"]
    assert (codes.dtype, codes.shape) == (np.uint8, (64, 64))  # [out, 128 / 2]
    assert (scales.dtype, scales.shape) == (np.uint8, (64, 2))  # [out, 64 / 32]
    assert np.array_equal(codes, np.asarray(res.qweights["layers.0.down_proj"].codes))
    assert arrays["params/embed_tokens/weight"].shape == (64, 64)
    assert arrays["params/lm_head/weight"].dtype == np.float32
    assert len([k for k in arrays if k.startswith("qweights/")]) == 2 * 7 * CONFIG.num_layers


def test_sizes_are_4_25_bits_per_element(saved):
    _, meta = saved
    s = meta["sizes"]
    n = CONFIG.num_layers * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    assert (s["linears"], s["elements"]) == (14, n)
    assert s["bits_per_element"] == 4.25
    assert (s["mx_bytes"], s["float32_bytes"], s["bfloat16_bytes"]) == (n * 17 // 32, 4 * n, 2 * n)
    assert s["ratio_vs_float32"] == 4.25 / 32


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_quantized(tmp_path)
    assert str(e.value) == f"{tmp_path} holds no finished quantized checkpoint (no metadata.json)"


def test_write_json_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    checkpoint.write_json(path, {"layers_done": 1})

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        checkpoint.write_json(path, {"layers_done": 2})
    assert json.loads(path.read_text()) == {"layers_done": 1}
    assert os.listdir(tmp_path) == ["progress.json"]


def test_resume_store_keeps_last_commit_when_a_save_fails(quantized, tmp_path, monkeypatch):
    model, res = quantized
    store = checkpoint.ResumeStore(tmp_path)
    progress = {"flags": {}, "layers_done": 0, "reports": [], "qweights": {}}
    store.start(progress)
    per_layer = [{k.split(".")[-1]: v for k, v in res.qweights.items() if k.startswith(f"layers.{i}.")}
                 for i in range(2)]
    x0 = np.arange(8 * 32 * 64, dtype=np.float32).reshape(8, 32, 64)
    progress = store.save_layer(0, model.layers[0], per_layer[0], x0, progress)
    real_save, calls = checkpoint.save_tree, []

    def failing(path, items):  # the layer item is written, then the disk fills up
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(path, items)

    monkeypatch.setattr(checkpoint, "save_tree", failing)
    with pytest.raises(OSError):
        store.save_layer(1, model.layers[1], per_layer[1], x0 + 1, progress)
    monkeypatch.undo()
    assert store.progress()["layers_done"] == 1
    fresh = LlamaForCausalLM(CONFIG, None)
    qweights, x = store.restore(fresh, res.config, store.progress())
    assert np.array_equal(x, x0) and sorted(qweights) == sorted(f"layers.0.{n}" for n in per_layer[0])
    assert np.array_equal(np.asarray(qweights["layers.0.q_proj"].codes),
                          np.asarray(per_layer[0]["q_proj"].codes))
    h = jnp.asarray(x0[:2] / 1e4)
    assert bool(jnp.all(fresh.layers[0](h) == model.layers[0](h)))
    store.clean(1)
    assert sorted(os.listdir(store.root)) == ["inputs_000", "layer_000", "progress.json"]


def test_save_refuses_metadata_that_cannot_load(quantized, tmp_path):
    # Before the fix save_quantized(dir, model, qweights, None, {}) wrote a checkpoint whose
    # load failed with KeyError 'calib_config'; now the save refuses and writes nothing.
    model, res = quantized
    with pytest.raises(ValueError) as e:
        checkpoint.save_quantized(tmp_path / "a", model, res.qweights, None, {})
    assert str(e.value) == ("save_quantized: metadata lacks 'calib_config' (the CalibConfig "
                            "fields, e.g. dataclasses.asdict(result.config)), which loading needs")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError) as e:
        checkpoint.save_quantized(tmp_path / "b", model, res.qweights, None,
                                  {"calib_config": {"method": "nope"}})
    assert str(e.value) == ("save_quantized: metadata['calib_config'] is invalid: unknown method "
                            "'nope'; valid: " + ", ".join(METHODS))
    partial = {k: v for k, v in res.qweights.items() if k not in ("layers.1.o_proj", "layers.0.up_proj")}
    with pytest.raises(ValueError) as e:
        checkpoint.save_quantized(tmp_path / "c", model, partial, None,
                                  {"calib_config": dataclasses.asdict(res.config)})
    assert str(e.value) == ("save_quantized: qweights lacks 2 of the model's quantized linears: "
                            "layers.0.up_proj, layers.1.o_proj")
    assert sorted(os.listdir(tmp_path)) == []


def test_mx_meta_round_trip_and_old_positive_axis():
    from batquant_jax import mx
    x = np.linspace(-3, 3, 40 * 8, dtype=np.float32).reshape(40, 8)
    q = mx.quantize(x, axis=0, pad=True)
    m = checkpoint.mx_meta(q)
    assert (m["axis"], m["shape"], m["codes"], m["scales"]) == (-2, [40, 8], [8, 32], [8, 2])
    back = checkpoint._mxarray(q.codes, q.scales, m)
    old = checkpoint._mxarray(q.codes, q.scales, dict(m, axis=0))  # metadata written before the
    for r in (back, old):                                          # axis counted from the end
        assert (r.axis, r.length, r.shape) == (-2, 40, (40, 8))
        np.testing.assert_array_equal(np.asarray(mx.dequantize(r)), np.asarray(mx.dequantize(q)))


def test_write_json_uses_the_one_atomic_write(tmp_path, monkeypatch):
    # Before the fix checkpoint.write_json and data._atomic_write were two copies of the
    # temporary-file-fsync-rename helper.
    from batquant_jax import data
    assert not hasattr(data, "_atomic_write")
    calls = []
    monkeypatch.setattr(checkpoint, "atomic_write", lambda p, b: calls.append((p, b)))
    checkpoint.write_json(tmp_path / "m.json", {"a": [1, 2]})
    assert calls == [(tmp_path / "m.json", b'{\n "a": [\n  1,\n  2\n ]\n}\n')]
    monkeypatch.undo()
    checkpoint.write_json(tmp_path / "m.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2]}
    assert os.listdir(tmp_path) == ["m.json"]
