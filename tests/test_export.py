"""Export to the compressed-tensors MXFP4 format, checked with the consumers' own code
(compressed-tensors' decompressor and activation quantizer, transformers' from_pretrained),
and the import back (``--model=HF_DIR``)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from batquant_jax import export, mx
from batquant_jax.checkpoint import load_quantized
from batquant_jax.models import load_model
from batquant_jax.models.llama import forward_logits
from batquant_jax.qlayers import GROUPS, quant_modules
from conftest import make_tiny

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")


def _calibrate(root, name, **kw):
    from batquant_jax import calibrate
    out = root / name
    calibrate.run_calibration(
        calibrate.CalibrateConfig(model=str(root / "model"), calib_data=str(root / "text.txt"),
                                  output_dir=str(out), nsamples=4, seqlen=32, **kw),
        log=lambda s: None, out=lambda s: None)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    make_tiny(root / "model")
    return {
        "root": root,
        "rtn_w4a4": _calibrate(root, "rtn-w4a4", method="rtn", scale_mode="even"),
        "gptq_w4a16": _calibrate(root, "gptq-w4a16", method="gptq", setting="W4A16"),
        "rtn_floor": _calibrate(root, "rtn-floor", method="rtn"),
        "brq": _calibrate(root, "brq", method="brq", setting="W4A16"),
        "mr_gptq": _calibrate(root, "mr-gptq", method="mr-gptq", scale_mode="even"),
        "quarot": _calibrate(root, "quarot", method="quarot", scale_mode="even"),
        "batquant": _calibrate(root, "batquant", method="batquant", setting="W4A16"),
    }


def _export(tiny, name, **kw):
    out = tiny["root"] / f"hf-{name}-{'w' if kw.get('weights_only') else 'a'}"
    export.export(tiny[name], out, overwrite=True, **kw)
    return out


def _ids(n=2, seqlen=48):
    """Random token ids of the tiny vocabulary, [n, seqlen]."""
    rng = np.random.default_rng(5)
    return rng.integers(2, 60, size=(n, seqlen)).astype(np.int32)


def _nll(logits, ids):
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return float((logz[:, :-1] - picked).mean())


@pytest.mark.parametrize("name,weights_only", [("rtn_w4a4", False), ("rtn_w4a4", True),
                                               ("gptq_w4a16", False)])
def test_the_folder_is_the_format(tiny, name, weights_only):
    from compressed_tensors.quantization import QuantizationConfig
    out = _export(tiny, name, weights_only=weights_only)
    config = json.loads((out / "config.json").read_text())
    q = QuantizationConfig.model_validate(config["quantization_config"])  # the consumer's parser
    assert q.format == "mxfp4-pack-quantized" and q.quant_method == "compressed-tensors"
    group = q.config_groups["group_0"]
    assert (group.weights.num_bits, group.weights.group_size) == (4, 32)
    acts = group.input_activations
    assert (acts is None) == (weights_only or name == "gptq_w4a16")
    from safetensors.numpy import load_file
    tensors = load_file(str(out / "model.safetensors"))
    packed = tensors["model.layers.0.mlp.down_proj.weight_packed"]
    scale = tensors["model.layers.0.mlp.down_proj.weight_scale"]
    assert (packed.dtype, packed.shape, scale.dtype, scale.shape) == (
        np.uint8, (64, 64), np.uint8, (64, 4))
    assert tensors["lm_head.weight"].dtype == np.float32
    assert len([k for k in tensors if k.endswith("weight_packed")]) == 7 * 6
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_the_decompressor_gives_our_dequantized_weights_bit_for_bit(tiny):
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.numpy import load_file
    out = _export(tiny, "gptq_w4a16")
    config = json.loads((out / "config.json").read_text())
    scheme = QuantizationScheme.model_validate(config["quantization_config"]["config_groups"]["group_0"])
    tensors = load_file(str(out / "model.safetensors"))
    model, _, _ = load_quantized(tiny["gptq_w4a16"])
    names = [f"model.layers.{i}.{c}.{n}" for i in range(6) for c, group, _ in GROUPS
             for n in group]
    ours = {}
    for i, layer in enumerate(model.layers):
        for c, group, _ in GROUPS:
            for n in group:
                ours[f"model.layers.{i}.{c}.{n}"] = np.asarray(
                    mx.dequantize(getattr(getattr(layer, c), n).packed_weight))
    assert sorted(ours) == sorted(names)
    for name in names:
        sd = MXFP4PackedCompressor.decompress(
            {"weight_packed": torch.from_numpy(tensors[f"{name}.weight_packed"]),
             "weight_scale": torch.from_numpy(tensors[f"{name}.weight_scale"])}, scheme)
        assert np.array_equal(sd["weight"].float().numpy(), ours[name]), name


def test_the_consumers_activation_quantizer_is_scale_mode_even():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
    import jax.numpy as jnp
    args = QuantizationArgs(**export._mx_args("mxfp4", dynamic=True))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * np.exp2(rng.integers(-20, 20, (64, 1)))).astype(np.float32)
    x[0, :32] = np.float32(1.75) * np.linspace(-1, 1, 32)  # block max with significand 1.75
    x[1, :32] = np.nextafter(np.float32(1.75), np.float32(0)) * np.linspace(-1, 1, 32)
    x[2, :32] = 0.0
    x[3, :32] = np.float32(0.25) * np.arange(32)  # ties of the element grid
    s, zp = compute_dynamic_scales_and_zp(torch.from_numpy(x), args, module=None)
    theirs = fake_quantize(torch.from_numpy(x), s, zp, args).numpy()
    assert np.array_equal(np.asarray(mx.fake_quant(jnp.asarray(x), scale_mode="even")), theirs)
    floor = np.asarray(mx.fake_quant(jnp.asarray(x), scale_mode="floor"))
    assert not np.array_equal(floor, theirs)  # why a floor-scale W4A4 checkpoint is refused


@pytest.mark.parametrize("name,weights_only", [("rtn_w4a4", False), ("gptq_w4a16", False),
                                               ("brq", False), ("mr_gptq", False)])
def test_round_trip_gives_identical_logits(tiny, name, weights_only):
    out = _export(tiny, name, weights_only=weights_only)
    back = load_model(str(out))
    model, _, _ = load_quantized(tiny[name])
    ids = _ids()
    assert np.array_equal(np.asarray(forward_logits(back.model, ids)),
                          np.asarray(forward_logits(model, ids)))
    assert len(quant_modules(back.model)) == 42


@pytest.mark.parametrize("name", ["gptq_w4a16", "rtn_w4a4", "brq", "mr_gptq", "quarot",
                                  "batquant"])
def test_transformers_perplexity_equals_ours_at_w4a16(tiny, name):
    """transformers' from_pretrained (weights dequantized in float32); the input transforms,
    which transformers 5.24 does not apply, by compressed-tensors' apply_transform_config from
    the folder's own transform_config, their matrices then loaded from the folder."""
    import transformers
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors.torch import load_file
    from transformers import CompressedTensorsConfig
    out = _export(tiny, name, weights_only=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    tc = json.loads((out / "config.json").read_text())["quantization_config"].get("transform_config")
    assert (tc is not None) == (name in ("brq", "mr_gptq", "quarot", "batquant"))
    if tc:
        apply_transform_config(ref, TransformConfig.model_validate(tc))
        stored = {k: v for k, v in load_file(str(out / "model.safetensors")).items()
                  if k.endswith("_input.weight")}
        assert len(stored) == 6 * 7
        assert not ref.load_state_dict(stored, strict=False).unexpected_keys
    ids = _ids()
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    ours = np.asarray(forward_logits(load_model(str(out)).model, ids))
    ppl_t, ppl_o = np.exp(_nll(theirs, ids)), np.exp(_nll(ours, ids))
    assert abs(ppl_t / ppl_o - 1) < 1e-3
    assert float(np.abs(theirs - ours).max()) < 1e-3


@pytest.mark.parametrize("kw,message", [
    (dict(name="rtn_floor"), "activations were quantized with scale mode 'floor'"),
])
def test_refusals(tiny, kw, message, tmp_path):
    with pytest.raises(export.ExportError, match=message):
        export.export(tiny[kw["name"]], tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_refuses_a_method_with_transforms_and_a_bad_folder(tiny, tmp_path):
    meta = json.loads((tiny["rtn_w4a4"] / "metadata.json").read_text())
    for method in ("batquant", "flatquant"):
        meta["calib_config"]["method"] = method
        with pytest.raises(export.ExportError, match=f"method '{method}' clips the activations "
                           "with learned bounds"):
            export.check_exportable(meta)
        assert export.check_exportable(meta, weights_only=True).a_fmt is None
    meta["calib_config"].update(method="rtn", setting="W4A8KV8")
    with pytest.raises(export.ExportError, match="a quantized KV cache"):
        export.check_exportable(meta)
    with pytest.raises(export.ExportError, match="is inside the checkpoint"):
        export.export(tiny["rtn_w4a4"], tiny["rtn_w4a4"] / "hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="is not empty; pass --overwrite"):
        export.export(tiny["rtn_w4a4"], tmp_path / "busy")


def test_cli_exports_and_refuses_in_one_line(tiny, tmp_path):
    cmd = [sys.executable, "-m", "batquant_jax.export", f"--checkpoint={tiny['rtn_floor']}"]
    bad = subprocess.run(cmd + [f"--output_dir={tmp_path / 'a'}"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: setting W4A4KV16: activations")
    assert "Traceback" not in bad.stderr
    ok = subprocess.run(cmd + [f"--output_dir={tmp_path / 'b'}", "--weights_only"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["batquant_jax"]["weights_only"]


def test_import_refuses_what_it_does_not_apply(tiny, tmp_path):
    import shutil
    from batquant_jax.models.loading import ModelLoadError
    out = _export(tiny, "gptq_w4a16")
    for change, message in [
        ({"transform_config": {"config_groups": {"u": {"type": "random-matrix", "head_dim": 32}}}},
         "transform 'u' is 'random-matrix' with head_dim 32; this loader applies block "
         "Sylvester Hadamards"),
        ({"transform_config": {"config_groups": {"u": {"type": "hadamard", "head_dim": 32,
                                                       "randomize": True}}}},
         "transform 'u' is randomized"),
        ({"kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme is set"),
        ({"quant_method": "gptq"}, "quantization 'gptq' is not read"),
        ({"format": "nvfp4-pack-quantized"}, "compressed-tensors format 'nvfp4-pack-quantized'"),
    ]:
        folder = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, folder)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"].update(change)
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=message):
            load_model(str(folder))


@pytest.mark.slow
def test_smollm2_perplexity_in_transformers_equals_ours_at_w4a16(tmp_path):
    """SmolLM2-135M by RTN (the consumers' activation rule), exported weights-only: transformers'
    float32 perplexity on 2 x 512 wiki-eval tokens is ours within 0.1%."""
    import transformers
    from transformers import CompressedTensorsConfig

    from batquant_jax import calibrate, data, pipeline
    from batquant_jax.perplexity import cut_windows
    ckpt = tmp_path / "rtn"
    calibrate.run_calibration(
        calibrate.CalibrateConfig(model="smollm2-135m", output_dir=str(ckpt), nsamples=2,
                                  seqlen=64, method="rtn", scale_mode="even"),
        log=lambda s: None, out=lambda s: None)
    out = tmp_path / "hf"
    export.export(ckpt, out, weights_only=True)
    ours = load_model(str(out))
    ids = data.tokenize_corpus(data.load_corpus("wiki-eval"), ours.tokenizer)
    p_ours = pipeline.perplexities(ours.model, {"wiki-eval": ids}, seqlen=512,
                                   max_tokens=1024)["wiki-eval"].perplexity
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    nll = []
    with torch.no_grad():
        for w in cut_windows(ids, 512, 1024):
            t = torch.from_numpy(w[None].astype(np.int64))
            logits = ref(t).logits[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="none"))
    p_ref = float(torch.exp(torch.cat(nll).double().mean()))
    assert abs(p_ref / p_ours - 1) < 1e-3


def test_hadamard_methods_carry_their_transforms_and_shards_load_back(tiny, tmp_path):
    out = tmp_path / "sharded"
    config = export.export(tiny["mr_gptq"], out, max_shard_bytes=20_000)
    groups = config["quantization_config"]["transform_config"]["config_groups"]
    assert {k: v["head_dim"] for k, v in groups.items()} == {"hadamard_64": 64,
                                                             "hadamard_128": 128}
    down = [t for g in groups.values() for a in g["apply"] for t in a["targets"]
            if t.endswith("down_proj")]
    assert down and all(groups["hadamard_128"]["apply"][0]["targets"].count(t) == 1 for t in down)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    ids = _ids()
    model, _, _ = load_quantized(tiny["mr_gptq"])
    assert np.array_equal(np.asarray(forward_logits(load_model(str(out)).model, ids)),
                          np.asarray(forward_logits(model, ids)))


@pytest.mark.parametrize("name", ["quarot", "batquant"])
def test_dense_transforms_hold_each_groups_matrix_and_load_back(tiny, name):
    """quarot (W4A4) and batquant (W4A16, GPK blocks and channel scale): one "random-hadamard"
    scheme per layer and group whose stored matrix over sqrt(n) is the group's transform;
    loading the folder back gives our logits up to float32 reordering (x M for the factored
    product)."""
    from batquant_jax.transforms import DenseTransform
    out = _export(tiny, name)
    config = json.loads((out / "config.json").read_text())
    groups = config["quantization_config"]["transform_config"]["config_groups"]
    assert len(groups) == 6 * 4
    assert {(g["type"], g["head_dim"], g["randomize"]) for g in groups.values()} == {
        ("random-hadamard", None, False)}
    model, _, _ = load_quantized(tiny[name])
    back = load_model(str(out)).model
    from safetensors.numpy import load_file
    stored = load_file(str(out / "model.safetensors"))
    for i in (0, 5):
        for container, names, group in GROUPS:
            t = getattr(getattr(model.layers[i], container), names[0]).transform
            m = np.asarray(t.matrix(), np.float64)
            for n in names:
                s = stored[f"model.layers.{i}.{container}.{n}.dense_{i}_{group}_input.weight"]
                assert s.dtype == np.float32 and s.shape == m.shape
                np.testing.assert_allclose(s / np.sqrt(len(s)), m, rtol=1e-6, atol=1e-7)
            loaded = getattr(getattr(back.layers[i], container), names[0]).transform
            assert isinstance(loaded, DenseTransform)
    assert config["batquant_jax"]["transform_bytes"] == 6 * 4 * (6 * 64 * 64 + 128 * 128)
    ids = _ids()
    ours, theirs = (np.asarray(forward_logits(m, ids)) for m in (model, back))
    assert float(np.abs(ours - theirs).max()) < 1e-4 * float(np.abs(ours).max())
