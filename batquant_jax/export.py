"""Export a quantized checkpoint as a Hugging Face folder in the compressed-tensors MXFP4 format.

    python -m batquant_jax.export --checkpoint=out/smollm2-gptq --output_dir=out/smollm2-gptq-hf

The folder is what transformers (with the compressed-tensors package) and vLLM load:

- ``config.json``: the model's Hugging Face config plus ``quantization_config``
  (``quant_method: compressed-tensors``, ``format: mxfp4-pack-quantized``, one config group for
  the seven linears of every layer: MXFP4 weights, and MXFP4 input activations at W4A4);
- ``model.safetensors`` (or shards of at most ``--max_shard_gb`` and an index): per linear
  ``weight_packed`` (uint8 [out, in/2], element 2i in the low nibble: the checkpoint's codes as
  they are) and ``weight_scale`` (uint8 E8M0 [out, in/32]); embeddings, norms, lm_head and
  biases in float32, the dtype the model ran in;
- the tokenizer files and ``generation_config.json``.

Only what the format expresses exactly is written: the methods without an online input
transform (rtn, gptq); those whose transform is a block Sylvester Hadamard (brq, mr-gptq:
a ``transform_config`` of "hadamard" schemes, which vLLM applies; transformers 5.24 does not);
and those with any other input transform (quarot, flatquant, batquant: each group's whole
transform, channel scale included, as one dense ``[n, n]`` matrix, see ``dense_transforms``):
at W4A16, and at W4A4 when the activations were quantized
with the consumers' rule for the shared scale (``--scale_mode=even``: the block maximum is
rounded, so a significand >= 1.75 takes the next power of two); ``--weights_only`` exports the
weights of any such checkpoint as the W4A16 model. Anything else is refused in one line that
says what does not fit (see ``check_exportable``). A folder exported here loads back with ``--model=HF_DIR``
(``models.loading``): the same packed weights, the same logits.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from batquant_jax import cli
from batquant_jax.errors import UserError

__all__ = ["export", "check_exportable", "hf_config", "quantization_config", "ExportError",
           "FORMAT"]

FORMAT = "mxfp4-pack-quantized"
HADAMARD_METHODS = ("brq", "mr-gptq")  # block Sylvester Hadamard input transforms
DENSE_METHODS = ("quarot", "flatquant", "batquant")  # any other input transform: dense matrices
EXPORTABLE_METHODS = ("rtn", "gptq") + HADAMARD_METHODS + DENSE_METHODS
_OWNED = ("config.json", "generation_config.json", "model.safetensors",
          "model.safetensors.index.json")


class ExportError(UserError):
    """A checkpoint the format cannot hold exactly, or a bad output folder; one-line message."""


# ----------------------------------------------------------------------------- config

def hf_config(config) -> dict:
    """The Hugging Face config.json fields of a ``LlamaConfig`` (transformers 5.x names)."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[config.arch]
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if config.rope_scaling:
        rope.update(dict(config.rope_scaling))
    out = {
        "architectures": [arch], "model_type": config.arch, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "rope_theta": float(config.rope_theta),
        "rope_parameters": rope, "dtype": "float32",
    }
    if config.arch == "llama":
        out.update(attention_bias=config.attention_bias, mlp_bias=False)
    elif config.arch == "qwen3":
        out.update(attention_bias=config.attention_bias)
    if config.arch != "llama":
        out.update(use_sliding_window=False, max_window_layers=config.num_layers)
    return out


def _mx_args(fmt: str, *, dynamic: bool) -> dict:
    bits = {"mxfp4": 4}[fmt]
    return {"num_bits": bits, "type": "float", "strategy": "group", "group_size": 32,
            "symmetric": True, "dynamic": dynamic, "scale_dtype": "torch.uint8",
            "zp_dtype": "torch.uint8", "actorder": None, "block_structure": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


def quantization_config(spec) -> dict:
    """``quantization_config`` of a QuantSpec: one group targeting every Linear but lm_head."""
    scheme = {"targets": ["Linear"], "weights": _mx_args(spec.w_fmt, dynamic=False),
              "input_activations": (None if spec.a_fmt is None
                                    else _mx_args(spec.a_fmt, dynamic=True)),
              "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT,
            "quantization_status": "compressed", "config_groups": {"group_0": scheme},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


def check_exportable(meta: Mapping[str, Any], *, weights_only: bool = False):
    """The QuantSpec the export writes for the checkpoint described by ``meta`` (its
    metadata.json); ExportError (one line, what does not fit) unless the compressed-tensors
    MXFP4 format expresses it exactly. ``weights_only`` exports the weights alone (the W4A16
    model of the same weights: an explicit choice, never a silent one)."""
    from batquant_jax.checkpoint import calib_config_from
    cfg = calib_config_from(meta["calib_config"])
    spec = cfg.spec
    if cfg.method not in EXPORTABLE_METHODS:
        raise ExportError(f"method {cfg.method!r} is not one this export knows how to write "
                          f"(exported: {', '.join(EXPORTABLE_METHODS)})")
    if spec.w_fmt != "mxfp4" or spec.block_size != 32:
        raise ExportError(f"setting {cfg.setting}: the format stores MXFP4 weights in blocks of "
                          f"32 only (this checkpoint: {spec.w_fmt}, blocks of {spec.block_size})")
    if spec.kv_fmt is not None:
        raise ExportError(f"setting {cfg.setting}: a quantized KV cache ({spec.kv_fmt} per token "
                          "along head_dim) has no equivalent in the format's kv_cache_scheme")
    if weights_only:
        return dataclasses.replace(spec, a_fmt=None)
    if spec.a_fmt not in (None, "mxfp4"):
        raise ExportError(f"setting {cfg.setting}: {spec.a_fmt} activations are not exported "
                          "(W4A16 and W4A4 are; --weights_only exports the weights alone)")
    if spec.a_fmt is not None and cfg.method_spec.clip and cfg.method_spec.act_clip:
        raise ExportError(f"method {cfg.method!r} clips the activations with learned bounds "
                          "before quantizing them; the format's dynamic activation quantizer has "
                          "no clipping: pass --weights_only to export the W4A16 model")
    if spec.a_fmt is not None and (spec.scale_mode, spec.rounding) != ("even", "even"):
        raise ExportError(f"setting {cfg.setting}: activations were quantized with scale mode "
                          f"{spec.scale_mode!r}; the format's consumers round the block maximum "
                          "(scale mode 'even'): calibrate with --scale_mode=even to export W4A4, "
                          "or pass --weights_only")
    return spec


# ----------------------------------------------------------------------------- tensors

def hf_name(key: str) -> str | None:
    """The Hugging Face tensor name of one stored array key ("qweights/layers/0/mlp/up_proj/
    codes" -> "model.layers.0.mlp.up_proj.weight_packed"); None for arrays the format has no
    place for."""
    item, *path = key.split("/")
    if item == "qweights":
        leaf = {"codes": "weight_packed", "scales": "weight_scale"}[path[-1]]
        return "model." + ".".join(path[:-1] + [leaf])
    if path[0] == "lm_head":
        return "lm_head." + ".".join(path[1:])
    if path[-1] in ("weight", "bias") and not any(p in ("transform", "act_clip", "weight_clip",
                                                        "kv_quant") for p in path):
        return "model." + ".".join(path)
    return None


def _is_sylvester(value: np.ndarray) -> bool:
    from batquant_jax.transforms import sylvester_hadamard
    n = value.shape[0]
    return (value.ndim == 2 and value.shape == (n, n) and n & (n - 1) == 0
            and np.array_equal(value, sylvester_hadamard(n).astype(np.float32)))


def _tensors(arrays: Mapping[str, np.ndarray], method: str, activations: bool,
             ) -> dict[str, np.ndarray]:
    out, dropped = {}, []
    for key, value in arrays.items():
        name = hf_name(key)
        if method in HADAMARD_METHODS and key.endswith("/transform/H") and _is_sylvester(value):
            continue  # described by transform_config (the consumers build it themselves)
        if method in DENSE_METHODS and "/transform/" in key:
            continue  # written out by dense_transforms
        if "/weight_clip/" in key or (not activations and "/act_clip/" in key):
            continue  # applied in the packed codes / not used without activation quantization
        if name is None:
            dropped.append(key)
        else:
            out[name] = np.ascontiguousarray(value)
    if dropped:  # an exportable method has none; a left-over would be a silent approximation
        raise ExportError(f"stored array {dropped[0]} has no place in the format")
    return out


def hadamard_transforms(model) -> tuple[dict, dict[str, np.ndarray]]:
    """(transform_config, tensors) of a model whose groups use block Sylvester Hadamard input
    transforms (brq, mr-gptq): one "hadamard" scheme per block size, applied online at the
    input of the linears of the groups with that size (``head_dim`` = the block size, so the
    matrix is block diagonal), and each linear's ``<scheme>_input.weight``: the unnormalized
    +-1 Sylvester matrix, as compressed-tensors saves it (both consumers divide by sqrt(n))."""
    from batquant_jax.qlayers import GROUPS
    from batquant_jax.transforms import BlockHadamard, sylvester_signs
    targets: dict[int, list[str]] = {}
    for i, layer in enumerate(model.layers):
        for container, names, group in GROUPS:
            t = getattr(getattr(layer, container), names[0]).transform
            if not isinstance(t, BlockHadamard):
                raise ExportError(f"layer {i} group {group}: the input transform is "
                                  f"{type(t).__name__}, not a block Hadamard")
            targets.setdefault(t.size, []).extend(
                f"model.layers.{i}.{container}.{n}" for n in names)
    config, tensors = {"config_groups": {}}, {}
    for size, names in sorted(targets.items()):
        scheme = f"hadamard_{size}"
        config["config_groups"][scheme] = {
            "type": "hadamard", "apply": [{"targets": names, "location": "input",
                                           "inverse": False, "ignore": []}],
            "randomize": False, "requires_grad": False, "head_dim": size,
            "precision": "torch.float32"}
        h = sylvester_signs(size).astype(np.float32)
        tensors.update({f"{n}.{scheme}_input.weight": h.copy() for n in names})
    return config, tensors


def dense_bytes(model) -> tuple[int, int]:
    """(bytes held in memory, bytes written) of ``dense_transforms``' float32 matrices."""
    from batquant_jax.qlayers import GROUPS
    from batquant_jax.transforms import IdentityTransform
    held = written = 0
    for layer in model.layers:
        for container, names, _ in GROUPS:
            t = getattr(getattr(layer, container), names[0]).transform
            if not isinstance(t, IdentityTransform):
                held += 4 * t.d * t.d
                written += 4 * t.d * t.d * len(names)
    return held, written


def _stored_transform(t, arrays: Mapping[str, np.ndarray], i: int, container: str, names):
    """The group's transform module ``t`` (of a skeleton: abstract values) with its stored
    arrays set: the state of a shared transform is listed under one of the group's linears."""
    from flax import nnx
    state = nnx.state(t)
    for path, var in nnx.to_flat_state(state):
        leaf = "/".join(str(p) for p in path)
        keys = [f"params/layers/{i}/{container}/{n}/transform/{leaf}" for n in names]
        hit = [k for k in keys if k in arrays]
        if not hit:
            raise ExportError(f"stored array {keys[0]} is missing")
        var.set_value(jnp.asarray(arrays[hit[0]]))
    nnx.update(t, state)
    return t


def dense_transforms(model, arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """(transform_config, tensors) of a model with any input transforms (quarot, flatquant,
    batquant): one scheme per layer and group, applied online at the input of the group's
    linears, holding the group's whole transform ``diag(1/s) P`` (channel scale included) as one
    dense matrix M.

    The scheme type is "random-hadamard", the one dense type both consumers apply alike: each
    reads the stored matrix S and computes ``x S / sqrt(n)`` (compressed-tensors'
    HadamardTransform; vLLM divides every loaded transform by sqrt(n) and runs a dense matmul
    for this type). So S = sqrt(n) M, in float32, one copy per linear under
    ``<linear>.<scheme>_input.weight`` as compressed-tensors names it. ("random-matrix" would
    read as ``x S`` in compressed-tensors but ``x S / sqrt(n)`` in vLLM.) Nothing of a
    group's transform is folded elsewhere: the channel scale could move into the preceding
    RMSNorm for q/k/v and gate/up, but the private blocks leave M dense anyway.
    Identity groups get no scheme."""
    from batquant_jax.qlayers import GROUPS
    from batquant_jax.transforms import IdentityTransform
    config, tensors = {"config_groups": {}}, {}
    for i, layer in enumerate(model.layers):
        for container, names, group in GROUPS:
            t = getattr(getattr(layer, container), names[0]).transform
            if isinstance(t, IdentityTransform):
                continue
            t = _stored_transform(t, arrays, i, container, names)
            m = np.asarray(t.matrix(), np.float64)
            scheme = f"dense_{i}_{group}"
            targets = [f"model.layers.{i}.{container}.{n}" for n in names]
            config["config_groups"][scheme] = {
                "type": "random-hadamard", "apply": [{"targets": targets, "location": "input",
                                                      "inverse": False, "ignore": []}],
                "randomize": False, "requires_grad": False, "head_dim": None,
                "precision": "torch.float32"}
            stored = (m * np.sqrt(m.shape[0])).astype(np.float32)  # one array, one copy per name
            tensors.update({f"{n}.{scheme}_input.weight": stored for n in targets})
    return config, tensors


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, size = [{}], 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def _check_output(out: pathlib.Path, checkpoint: pathlib.Path, overwrite: bool) -> None:
    if out.resolve() == checkpoint.resolve() or checkpoint.resolve() in out.resolve().parents:
        raise ExportError(f"--output_dir {out} is inside the checkpoint {checkpoint}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--output_dir {out} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--output_dir {out} is not empty; pass --overwrite to replace the "
                          "files an export writes there")


def export(checkpoint_dir, output_dir, *, overwrite: bool = False, weights_only: bool = False,
           max_shard_bytes: int = 2 * 2**30) -> dict:
    """Writes the Hugging Face folder of a quantized checkpoint -> its config.json as a dict.

    Raises ExportError (one line) for a checkpoint the format cannot hold exactly, and the
    checkpoint loader's errors for a damaged or unfinished one (every array is verified)."""
    from safetensors.numpy import save_file

    from batquant_jax import checkpoint
    from batquant_jax.models.stored import StoredWeight
    ckpt, out = pathlib.Path(checkpoint_dir), pathlib.Path(output_dir)
    _check_output(out, ckpt, overwrite)
    model, trees, meta = checkpoint._read(ckpt)  # verifies metadata, tokenizer files, arrays
    spec = check_exportable(meta, weights_only=weights_only)
    arrays = checkpoint.flat_arrays(trees)
    for key, enc in meta.get(checkpoint.ENCODINGS, {}).items():  # kept in the source encoding:
        arrays[key] = np.asarray(StoredWeight(jnp.asarray(arrays[key]), enc["kind"],  # float32
                                              tuple(enc["shape"])).dense_by_rows())
    method = meta["calib_config"]["method"]
    tensors = _tensors(arrays, method, activations=spec.a_fmt is not None)
    config = hf_config(model.config)
    config["quantization_config"] = quantization_config(spec)
    dense_written = 0
    if method in DENSE_METHODS:
        held, dense_written = dense_bytes(model)
        free = cli.available_memory()
        if free is not None and held > free // 2:
            raise ExportError(f"the dense transforms of {method} take {held / 2**30:.1f} GiB in "
                              f"memory ({dense_written / 2**30:.1f} GiB written), over half of "
                              f"the {free / 2**30:.1f} GiB available")
    if method in HADAMARD_METHODS + DENSE_METHODS:
        transform_config, extra = hadamard_transforms(model) if method in HADAMARD_METHODS \
            else dense_transforms(model, arrays)
        config["quantization_config"]["transform_config"] = transform_config
        tensors.update(extra)
    out.mkdir(parents=True, exist_ok=True)
    for name in _OWNED:
        checkpoint.remove(out / name)
    for stale in out.glob("model-*-of-*.safetensors"):
        stale.unlink()
    shards = _shards(tensors, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(files, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                 "weight_map": {k: f for f, s in zip(files, shards) for k in s}}
        checkpoint.write_json(out / "model.safetensors.index.json", index)
    tok_dir = ckpt / checkpoint.TOKENIZER_DIR
    gen = {"do_sample": False}
    if tok_dir.is_dir():
        for f in sorted(tok_dir.iterdir()):
            if f.is_file():
                shutil.copyfile(f, out / f.name)
        gen.update(_special_ids(out))
    checkpoint.write_json(out / "generation_config.json", gen)
    config.update({k: v for k, v in gen.items() if k.endswith("_token_id")})
    config["batquant_jax"] = {"exported_from": str(ckpt.resolve()), "method": method,
                              "setting": meta["calib_config"]["setting"],
                              "weights_only": weights_only,
                              "format": meta["format"],
                              "transform_bytes": dense_written,
                              "weight_bytes": int(sum(v.nbytes for k, v in tensors.items()
                                                      if k.endswith(("weight_packed",
                                                                     "weight_scale"))))}
    checkpoint.write_json(out / "config.json", config)  # last: marks the folder complete
    return config


def _special_ids(folder: pathlib.Path) -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


# ----------------------------------------------------------------------------- command

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "a quantized checkpoint folder (from calibrate)")
    flags.DEFINE_string("output_dir", None, "the Hugging Face folder to write")
    flags.DEFINE_bool("overwrite", False, "replace the files of an earlier export in --output_dir")
    flags.DEFINE_bool("weights_only", False, "export the packed weights alone, activations "
                      "unquantized (the W4A16 model of a W4A4 checkpoint's weights)")
    flags.DEFINE_float("max_shard_gb", 2.0, "largest safetensors file, GiB (larger models are "
                       "written in shards with an index)")


def main(argv: list[str]) -> None:
    cli.sync_cpu_dispatch()
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; all settings are --flags")
    if not FLAGS.checkpoint or not FLAGS.output_dir:
        cli.fail("--checkpoint and --output_dir are required")
    if not FLAGS.max_shard_gb > 0:
        cli.fail(f"--max_shard_gb must be > 0, got {FLAGS.max_shard_gb}")
    from batquant_jax.checkpoint import quiet_orbax_logs
    quiet_orbax_logs()
    try:
        config = export(FLAGS.checkpoint, FLAGS.output_dir, overwrite=FLAGS.overwrite,
                        weights_only=FLAGS.weights_only, max_shard_bytes=int(FLAGS.max_shard_gb * 2**30))
    except UserError as e:
        cli.fail(str(e).splitlines()[0])
    except OSError as e:
        cli.fail(f"cannot write {FLAGS.output_dir}: {e.strerror or e}", 1)
    q = config["quantization_config"]["config_groups"]["group_0"]
    acts = "MXFP4 activations" if q["input_activations"] else "activations unquantized"
    ours = config["batquant_jax"]
    dense = (f"; dense input transforms {ours['transform_bytes'] / 2**20:.1f} MiB beside "
             f"{ours['weight_bytes'] / 2**20:.1f} MiB of packed weights"
             if ours["transform_bytes"] else "")
    print(f"export: {FLAGS.output_dir} ({FORMAT}: MXFP4 weights, {acts}; "
          f"{json.dumps(ours['method'])} {ours['setting']}{dense})", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
