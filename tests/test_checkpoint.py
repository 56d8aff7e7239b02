"""Tests for the quantized checkpoint format and the per-layer resume state (in memory, no CLI)."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batquant_jax import checkpoint, mx
from batquant_jax.calibration import quantize_model
from batquant_jax.models import LlamaConfig, LlamaForCausalLM, forward_nll
from batquant_jax.qlayers import quant_linears

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
    meta = checkpoint.save_quantized(out, model, res, metadata={"method": "brq"})
    return out, meta


def test_round_trip_gives_identical_model(quantized, saved):
    model, _ = quantized
    out, _ = saved
    loaded, tokenizer, meta = checkpoint.load_quantized(out)
    assert tokenizer is None and meta["method"] == "brq"
    assert meta["calib_config"] == dataclasses.asdict(quantized[1].config)
    assert meta["format"] == "batquant_jax.quantized/4" and meta["loss"] == "token_mse"
    assert meta["encodings"] == {}  # every weight of this model is float32
    assert sorted(os.listdir(out)) == ["checkpoint", "metadata.json"]
    tokens = jnp.asarray(TOKENS)
    assert bool(jnp.all(forward_nll(model, tokens) == forward_nll(loaded, tokens)))
    for i in range(CONFIG.num_layers):
        for name, q in quant_linears(loaded.layers[i]).items():
            ref = quant_linears(model.layers[i])[name]
            assert q.deployed and isinstance(q.packed_weight, mx.MXArray)
            for leaf in ("codes", "scales"):  # the loaded model holds the packed weight itself
                got, want = getattr(q.packed_weight, leaf), getattr(ref.packed_weight, leaf)
                assert got.dtype == jnp.uint8 and np.array_equal(np.asarray(got), np.asarray(want))
            assert np.array_equal(np.asarray(q.bias[...]) if q.bias is not None else 0,
                                  np.asarray(ref.bias[...]) if ref.bias is not None else 0)


def test_unpacked_load_gives_the_same_outputs_with_float_weights(quantized, saved):
    model, _ = quantized
    out, _ = saved
    loaded, _, _ = checkpoint.load_quantized(out, packed=False)
    tokens = jnp.asarray(TOKENS)
    assert bool(jnp.all(forward_nll(model, tokens) == forward_nll(loaded, tokens)))
    sizes = checkpoint.weight_bytes(loaded)
    assert sizes["model_packed_weight_bytes"] == 0  # every linear weight is float32 now
    assert sizes["model_resident_bytes"] == sizes["model_float32_bytes"]
    with pytest.raises(ValueError, match="holds no packed weight"):
        loaded.layers[0].mlp.up_proj.packed_weight


def test_stored_arrays_are_packed_codes_not_float_weights(quantized, saved):
    model, _ = quantized
    out, meta = saved
    arrays = checkpoint.read_arrays(out)
    assert not [k for k in arrays if k.startswith("params/") and k.endswith("_proj/weight")]
    codes = arrays["qweights/layers/0/mlp/down_proj/codes"]
    scales = arrays["qweights/layers/1/self_attn/q_proj/scales"]
    assert (codes.dtype, codes.shape) == (np.uint8, (64, 64))  # [out, 128 / 2]
    assert (scales.dtype, scales.shape) == (np.uint8, (64, 2))  # [out, 64 / 32]
    assert np.array_equal(codes, np.asarray(model.layers[0].mlp.down_proj.packed_weight.codes))
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
    # the whole model: packed linears + float32 embeddings, lm_head, norms, transforms, clips
    rest = s["model_other_bytes"]
    assert s["model_resident_bytes"] == n * 17 // 32 + rest and rest % 4 == 0
    assert s["model_float32_bytes"] == 4 * n + rest


def test_old_format_is_refused_in_one_line(saved, tmp_path):
    import shutil
    out, meta = saved
    old = tmp_path / "old"
    shutil.copytree(out, old)
    checkpoint.write_json(old / "metadata.json", dict(meta, format="batquant_jax.quantized/1"))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_quantized(old)
    assert str(e.value) == (f"{old} is a checkpoint of format 'batquant_jax.quantized/1'; this "
                            "version reads 'batquant_jax.quantized/4' and 'batquant_jax.quantized/3': quantize the "
                            "model again")


def _as_format_2(out, meta, dest):
    """A copy of checkpoint ``out`` as format /2 wrote it: no metadata digest, no file table."""
    import shutil
    shutil.copytree(out, dest)
    old = {k: v for k, v in meta.items() if k not in ("metadata_sha256", "file_checksums")}
    checkpoint.write_json(dest / "metadata.json", dict(old, format="batquant_jax.quantized/2"))
    return old


def test_format_2_is_upgraded_after_its_arrays_are_verified(quantized, saved, tmp_path):
    model, _ = quantized
    out, meta = saved
    old = tmp_path / "v2"
    _as_format_2(out, meta, old)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_quantized(old)
    assert str(e.value) == (f"{old} is a checkpoint of format 'batquant_jax.quantized/2'; this "
                            "version reads 'batquant_jax.quantized/4' and "
                            "'batquant_jax.quantized/3': upgrade it with "
                            f"`python -m batquant_jax.checkpoint upgrade {old}` (its arrays are "
                            "verified first) or quantize the model again")
    new = checkpoint.upgrade(old)
    assert new["upgraded_from"] == "batquant_jax.quantized/2"
    assert new["file_checksums"] == meta["file_checksums"]
    loaded, _, _ = checkpoint.load_quantized(old)
    tokens = jnp.asarray(TOKENS)
    assert bool(jnp.all(forward_nll(model, tokens) == forward_nll(loaded, tokens)))
    with pytest.raises(checkpoint.CheckpointError, match="which this version reads as it is"):
        checkpoint.upgrade(old)


def test_format_3_is_read_as_it_is(quantized, saved, tmp_path):
    """/3 stored every weight that is not quantized as float32, as /4 does for a float model."""
    import shutil
    model, _ = quantized
    out, meta = saved
    old = tmp_path / "v3"
    shutil.copytree(out, old)
    m3 = {k: v for k, v in meta.items() if k not in ("encodings", "metadata_sha256")}
    m3["format"] = "batquant_jax.quantized/3"
    m3["metadata_sha256"] = checkpoint.meta_digest(m3)
    checkpoint.write_json(old / "metadata.json", m3)
    loaded, _, got = checkpoint.load_quantized(old)
    assert got["format"] == "batquant_jax.quantized/3"
    tokens = jnp.asarray(TOKENS)
    assert bool(jnp.all(forward_nll(model, tokens) == forward_nll(loaded, tokens)))


def test_upgrade_refuses_a_changed_array_and_leaves_the_metadata(saved, tmp_path):
    out, meta = saved
    old = tmp_path / "v2"
    written = _as_format_2(out, meta, old)
    key = "qweights/layers/0/mlp/down_proj/codes"
    written["checksums"] = dict(written["checksums"], **{key: "0" * 64})  # as if the array changed
    checkpoint.write_json(old / "metadata.json", dict(written, format="batquant_jax.quantized/2"))
    before = (old / "metadata.json").read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match=f"stored array {key} does not match"):
        checkpoint.upgrade(old)
    assert (old / "metadata.json").read_bytes() == before


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
    progress = {"flags": {}, "layers_done": 0, "reports": []}
    store.start(progress)
    x0 = np.arange(8 * 32 * 64, dtype=np.float32).reshape(8, 32, 64)
    progress = store.save_layer(0, model.layers[0], x0, progress)
    real_save, calls = checkpoint.save_tree, []

    def failing(path, items):  # the layer item is written, then the disk fills up
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(path, items)

    monkeypatch.setattr(checkpoint, "save_tree", failing)
    with pytest.raises(OSError):
        store.save_layer(1, model.layers[1], x0 + 1, progress)
    monkeypatch.undo()
    assert store.progress()["layers_done"] == 1
    fresh = LlamaForCausalLM(CONFIG, None)
    x = store.restore(fresh, res.config, store.progress())
    assert np.array_equal(x, x0)
    assert np.array_equal(np.asarray(fresh.layers[0].self_attn.q_proj.packed_weight.codes),
                          np.asarray(model.layers[0].self_attn.q_proj.packed_weight.codes))
    h = jnp.asarray(x0[:2] / 1e4)
    assert bool(jnp.all(fresh.layers[0](h) == model.layers[0](h)))
    store.clean(1)
    assert sorted(os.listdir(store.root)) == ["inputs_000", "layer_000", "progress.json"]


def test_save_refuses_what_cannot_load(quantized, tmp_path):
    # Before the fix save_quantized(dir, model, qweights, None, {}) wrote a checkpoint whose
    # load failed with KeyError 'calib_config'; now it takes quantize_model's result and
    # refuses a model that is not all quantized, writing nothing.
    model, res = quantized
    with pytest.raises(ValueError) as e:
        checkpoint.save_quantized(tmp_path / "a", model, {})
    assert str(e.value) == ("save_quantized: result must be the CalibrationResult that "
                            "quantize_model returned, got dict")
    half = nnx.clone(model)
    half.layers[1] = LlamaForCausalLM(CONFIG, nnx.Rngs(1)).layers[1]
    with pytest.raises(ValueError) as e:
        checkpoint.save_quantized(tmp_path / "b", half, res)
    assert str(e.value) == ("save_quantized: 1 layer(s) are not quantized (layers.1); save the "
                            "model that quantize_model returned")
    # a W4A4 brq model with a W4A8 (or batquant) recipe would load as another model
    for wrong in (dataclasses.replace(res.config, setting="W4A8KV16"),
                  dataclasses.replace(res.config, method="batquant")):
        with pytest.raises(ValueError) as e:
            checkpoint.save_quantized(tmp_path / "c", model, dataclasses.replace(res, config=wrong))
        assert str(e.value) == (
            f"save_quantized: result.config (method {wrong.method}, setting {wrong.setting}) does "
            "not describe this model's quantized layers; pass the CalibrationResult that "
            "quantize_model returned with this model")
    with pytest.raises(ValueError) as e:
        checkpoint.save_quantized(tmp_path / "d", model, res, tokenizer="gpt2")
    assert str(e.value) == ("save_quantized: tokenizer must be a Hugging Face tokenizer (with "
                            "save_pretrained) or None, got str")
    assert sorted(os.listdir(tmp_path)) == []


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
