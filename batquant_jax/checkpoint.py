"""Quantized checkpoints on disk (Orbax) and the per-layer state a calibration run resumes from.

A quantized model is one NNX state: every QuantLinear holds its weight as a packed
``mx.MXArray`` (uint8 E2M1 codes, two per byte, and uint8 E8M0 scales). A checkpoint is that
state saved with Orbax, restored into a skeleton built from the recipe (``recipe.CalibConfig``)
and the model config. A finished output directory DIR holds:

  DIR/checkpoint/       Orbax composite checkpoint with two items
      qweights/         the packed weights by module path:
                        layers/{i}/{self_attn|mlp}/{linear}/{codes, scales}
      params/           the rest of the state by module path: embeddings, norms, lm_head, and of
                        each QuantLinear its online side (transform parameters and constants,
                        clipping logits) and bias -- never a float copy of a quantized weight;
                        a weight the model held in its source encoding (``StoredWeight``) is
                        stored as those bytes, its encoding in the metadata's "encodings"
  DIR/metadata.json     "format" (FORMAT), the model config and recipe the skeleton is built
                        from, how the run was made, "checksums": the sha256 of every stored
                        array ("qweights/layers/0/self_attn/q_proj/codes": hex),
                        "file_checksums": the sha256 of every tokenizer file, and
                        "metadata_sha256": the sha256 of all the other keys as canonical JSON;
                        all verified on every load (a missing table is an error)
  DIR/tokenizer/        ``tokenizer.save_pretrained``

While a run is calibrating, DIR/resume/ holds progress.json (the commit point, replaced
atomically), layer_{i:03d}/ (Orbax: layer i's state, the same two items) and inputs_{i:03d}/
(the inputs of layer i + 1); progress.json records the sha256 of their arrays, verified on
resume. Orbax writes every checkpoint into a temporary folder and renames it, so a run killed at
any moment leaves the last committed state readable. A stored array whose bytes changed after
they were written fails to load with a one-line CheckpointError naming it.

    model, result = quantize_model(model, windows, "batquant")
    save_quantized("/tmp/smollm2-batquant", model, result, tokenizer)
    model, tokenizer, meta = load_quantized("/tmp/smollm2-batquant")
    nll = forward_nll(model, tokens)            # tokens: int32 [B, T] -> [B, T-1]
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from batquant_jax.errors import UserError
from batquant_jax import mx
from batquant_jax.calibration import CalibrationResult
from batquant_jax.layout import LLAMA, quantized_skeleton
from batquant_jax.data import atomic_write
from batquant_jax.distributed import host_value
from batquant_jax.kvquant import freeze_all
from batquant_jax.models.llama import DecoderLayer, LlamaConfig, LlamaForCausalLM
from batquant_jax.models.stored import StoredWeight
from batquant_jax.qlayers import (PackedWeight, QuantLinear, build_quantized_layer, packed_weights,
                                  quant_linears, quant_modules)
from batquant_jax.recipe import CalibConfig

# /1 kept the packed weights apart from the model state and rebuilt float copies at load;
# /2 did not protect metadata.json itself nor the tokenizer files
# /3 stored every weight that is not quantized as float32 (/4 keeps those the model held in
# their source encoding as that encoding: ENCODINGS); a /3 folder is read as it is
FORMAT = "batquant_jax.quantized/4"
READABLE = (FORMAT, "batquant_jax.quantized/3")
CHECKPOINT_DIR, METADATA_FILE, TOKENIZER_DIR = "checkpoint", "metadata.json", "tokenizer"
RESUME_DIR, PROGRESS_FILE = "resume", "progress.json"
ARTIFACT = (CHECKPOINT_DIR, METADATA_FILE, TOKENIZER_DIR)
CHECKSUMS = "checksums"  # metadata / progress key: {"item/path/to/array": sha256 hex}
ENCODINGS = "encodings"  # metadata key: {"params/embed_tokens/weight": {"kind", "shape"}}
FILE_CHECKSUMS = "file_checksums"  # metadata key: {"tokenizer/tokenizer.json": sha256 hex}
META_DIGEST = "metadata_sha256"  # metadata key: sha256 of the canonical JSON of all other keys

Flat = dict[tuple[str, ...], np.ndarray]


class CheckpointError(UserError):
    """A directory that does not hold a readable checkpoint; the message is one line."""


# ----------------------------------------------------------------------------- files

def _primary() -> bool:
    """True in process 0 (the only one that writes files besides Orbax's own multi-host saves)."""
    return jax.process_index() == 0


def _sync(name: str) -> None:
    """Waits for every process of a multi-process run (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def write_json(path, obj: Any) -> None:
    """Writes ``obj`` as JSON atomically (``data.atomic_write``); only the primary process writes."""
    if _primary():
        atomic_write(pathlib.Path(path), (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def read_json(path) -> dict:
    """The JSON object in ``path``; CheckpointError (one line) if unreadable or not an object."""
    try:
        obj = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {_one_line(e, 200)})"
                              ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"cannot read {path} (a JSON {type(obj).__name__}, not an object)")
    return obj


def remove(path) -> None:
    """Removes a file or folder if it exists."""
    if not _primary():
        return
    path = pathlib.Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def dir_bytes(path) -> int:
    """Bytes of the regular files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def quiet_orbax_logs() -> None:
    """Keeps Orbax's per-save INFO lines out of the absl log (warnings and errors still show).

    Also drops Orbax's ERROR record, with traceback, of an exception in one of its worker
    threads: the same exception is raised again to the caller (``save_tree``), which reports it.
    """
    import logging

    from absl import logging as absl_logging

    class _Filter(logging.Filter):
        def filter(self, record):
            if "/orbax/" not in record.pathname:
                return True
            if record.pathname.endswith("future.py") and record.exc_info is not None:
                return False
            return record.levelno >= logging.WARNING

    absl_logging.get_absl_handler().addFilter(_Filter())


def _ocp():
    import orbax.checkpoint as ocp  # imported on use: the command line checks flags first
    _drain_orbax_loops()
    return ocp


def _drain_orbax_loops() -> None:
    """Makes Orbax finish the tasks still running in its event loop before closing the loop.

    When one array of a restore (or save) fails, Orbax closes its per-call event loop while the
    reads of the other arrays are in flight; each then completes into the closed loop and
    tensorstore prints a "RuntimeError: Event loop is closed" traceback from C++ (dozens after the
    one real error). Waiting for the leftover tasks first, as ``asyncio.run`` does, removes them.
    Applied once; a no-op if this Orbax version lacks the function.
    """
    from orbax.checkpoint._src import asyncio_utils
    if getattr(asyncio_utils, "_drains_pending", False) or \
            not hasattr(asyncio_utils, "_run_sync_via_new_loop"):
        return

    def run(coro):
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(coro)
        finally:
            try:
                pending = asyncio.all_tasks(loop)
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    asyncio_utils._run_sync_via_new_loop = run
    asyncio_utils._drains_pending = True


def array_digest(a) -> str:
    """sha256 (hex) of an array's bytes in C order (shape and dtype are checked separately)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).data).hexdigest()


def tree_digests(items: Mapping[str, dict]) -> dict[str, str]:
    """{"item/a/b": sha256} of every array of ``save_tree``'s items."""
    return {"/".join((item,) + k): array_digest(v)
            for item, tree in items.items() for k, v in _flatten(tree).items()}


def meta_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of ``meta`` without its META_DIGEST key, as canonical JSON (sorted keys)."""
    body = {k: v for k, v in meta.items() if k != META_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


def file_digests(out: pathlib.Path, folder: str) -> dict[str, str]:
    """{"folder/relative/path": sha256} of every file under ``out/folder``."""
    root = out / folder
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.is_dir() else {}


def verify_metadata(out: pathlib.Path, meta: Mapping[str, Any]) -> None:
    """CheckpointError (one line) unless metadata.json is as written (its own digest matches,
    the array checksum table is present) and every file it lists has its recorded digest."""
    where = out / METADATA_FILE
    if meta.get(META_DIGEST) != meta_digest(meta):
        raise CheckpointError(f"{where} was changed after it was written (its {META_DIGEST} "
                              "does not match its contents); quantize the model again or restore "
                              "the file")
    sums = meta.get(CHECKSUMS)
    if not isinstance(sums, dict) or not sums:
        raise CheckpointError(f"{where} has no {CHECKSUMS!r} table; the arrays cannot be verified")
    files = meta.get(FILE_CHECKSUMS)
    if not isinstance(files, dict):
        raise CheckpointError(f"{where} has no {FILE_CHECKSUMS!r} table")
    try:
        now = file_digests(out, TOKENIZER_DIR)
    except OSError as e:
        raise CheckpointError(f"cannot read {out / TOKENIZER_DIR} ({e.strerror or e}: "
                              f"{e.filename})") from None
    for name in sorted(set(files) | set(now)):
        if name not in now:
            raise CheckpointError(f"{out / name} is missing (listed in {METADATA_FILE})")
        if name not in files:
            raise CheckpointError(f"{out / name} was not written with this checkpoint")
        if now[name] != files[name]:
            raise CheckpointError(f"{out / name} was changed after it was written (sha256 "
                                  f"{now[name][:12]}, recorded {files[name][:12]})")


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    return msg if len(msg) <= limit else msg[:limit] + "..."


def save_tree(path, items: Mapping[str, dict]) -> None:
    """Saves nested dicts of arrays as one Orbax composite checkpoint (one item per key).

    Synchronous and atomic: Orbax writes a temporary folder and renames it to ``path``; an
    existing ``path`` is replaced (``tree_digests(items)`` is what ``load_tree`` verifies).
    Raises OSError (disk full, permissions; Orbax's own ValueError for a failed write is turned
    into the OSError it reports) with a one-line message.
    """
    ocp = _ocp()
    args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
    try:
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
            pathlib.Path(path).absolute(), args=args, force=True)
    except OSError:
        raise
    except Exception as e:  # tensorstore write errors arrive as ValueError("... [os_error_code='28']")
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        raise OSError(errno.EIO, f"the write failed ({type(e).__name__}: {_one_line(e)})",
                      str(path)) from None


def load_tree(path, targets: Mapping[str, dict], digests: Mapping[str, str] | None = None,
              ) -> dict[str, dict]:
    """Restores the items of ``save_tree`` as numpy arrays; targets: nested ShapeDtypeStructs.

    digests: ``tree_digests`` of the saved items; every restored array is checked against it. Raises
    CheckpointError (one line, naming the array) for a missing, unreadable or changed array.
    """
    ocp = _ocp()
    # read as numpy whatever the arrays were saved as (save_quantized hands Orbax JAX arrays):
    # host memory without a device copy, and a damaged file's error names its array
    as_numpy = lambda tree: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),  # noqa: E731
                                         tree)
    args = ocp.args.Composite(**{k: ocp.args.PyTreeRestore(v, restore_args=as_numpy(v))
                                 for k, v in targets.items()})
    try:
        out = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
            pathlib.Path(path).absolute(), args=args)
    except Exception as e:  # orbax raises several types for a missing or damaged checkpoint
        name = re.search(r'Error (?:reading|writing) "([^"]+)"', str(e))
        what = f"array {name.group(1).rsplit('/', 1)[0]} is unreadable: " if name else ""
        raise CheckpointError(f"cannot restore {path}: {what}{type(e).__name__}: "
                              f"{_one_line(e, 200)}") from None
    trees = {k: jax.tree.map(np.asarray, out[k]) for k in targets}
    if digests is not None:
        for key, digest in tree_digests(trees).items():
            if digests.get(key) != digest:
                why = "has no recorded checksum" if key not in digests else \
                    "does not match the sha256 recorded when it was written"
                raise CheckpointError(f"{path}: stored array {key} {why}: the file is damaged or "
                                      "was changed after it was written")
    return trees


# ----------------------------------------------------------------------------- pytrees

def _nest(flat: Flat) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value
    return tree


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> Flat:
    out: Flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _lookup(module, path):
    for p in path:
        module = module[p] if isinstance(p, int) else getattr(module, p)
    return module


def _state_vars(module) -> dict[tuple[str, ...], tuple[str, Any]]:
    """{str path: (item, variable)} of ``module``'s state; item "qweights" for packed weights
    (their path without the trailing "weight"), "params" for the rest."""
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(module)):
        var = _lookup(module, path)
        key = tuple(str(p) for p in path)
        if isinstance(var, PackedWeight):
            out[key[:-1]] = ("qweights", var)
        else:
            out[key] = ("params", var)
    return out


def _leaves(var) -> dict[tuple[str, ...], Any]:
    """The stored leaves of one variable: {(): array} or {("codes",): .., ("scales",): ..}."""
    value = var.get_value()
    if isinstance(value, mx.MXArray):
        return {("codes",): value.codes, ("scales",): value.scales}
    if isinstance(value, StoredWeight):  # kept in its source encoding: stored as its bytes,
        return {(): value.data}          # the encoding recorded in the metadata (ENCODINGS)
    return {(): value}


def stored_encodings(module) -> dict[str, dict]:
    """{"params/embed_tokens/weight": {"kind": "Q4_K", "shape": [rows, cols]}} for every state
    variable of ``module`` that holds a ``StoredWeight`` (its array is the encoded bytes)."""
    return {"/".join((item,) + key): {"kind": var.get_value().kind,
                                      "shape": list(var.get_value().shape)}
            for key, (item, var) in _state_vars(module).items()
            if isinstance(var.get_value(), StoredWeight)}


def apply_encodings(module, encodings: Mapping[str, Any], where: str) -> None:
    """Makes each variable ``encodings`` names (``stored_encodings``' table) of the (abstract)
    ``module`` a StoredWeight restore target of that encoding; CheckpointError, one line, for
    a name, kind or shape the module cannot take."""
    if not isinstance(encodings, Mapping):
        raise CheckpointError(f"{where}: {ENCODINGS!r} is not a table")
    found = {"/".join((item,) + key): var for key, (item, var) in _state_vars(module).items()}
    for name, enc in encodings.items():
        var = found.get(name)
        if var is None:
            raise CheckpointError(f"{where}: {ENCODINGS!r} names {name!r}, which the model "
                                  "does not have")
        try:
            target = StoredWeight.abstract(enc["kind"], enc["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {ENCODINGS!r} entry {name!r} is unreadable "
                                  f"({_one_line(e, 100)})") from None
        if tuple(var.get_value().shape) != target.shape:
            raise CheckpointError(f"{where}: {name} is {list(target.shape)} in {ENCODINGS!r}, "
                                  f"the model's is {list(var.get_value().shape)}")
        var.set_value(target)


def state_arrays(module, *, device: bool = False) -> dict[str, dict]:
    """{"qweights": nested packed leaves, "params": nested rest} of ``module``'s state (numpy).

    device: keep each JAX array this process holds whole as it is (what ``save_tree`` is given:
    Orbax copies numpy inputs before writing them, a second copy of the model at save time)."""
    flat: dict[str, Flat] = {"qweights": {}, "params": {}}
    for key, (item, var) in _state_vars(module).items():
        for leaf, value in _leaves(var).items():
            keep = device and isinstance(value, jax.Array) and value.is_fully_addressable
            flat[item][key + leaf] = value if keep else host_value(value)
    return {item: _nest(f) for item, f in flat.items()}


def abstract_state(module) -> dict[str, dict]:
    """``state_arrays``' layout with a ShapeDtypeStruct per leaf (works on an abstract module)."""
    flat: dict[str, Flat] = {"qweights": {}, "params": {}}
    for key, (item, var) in _state_vars(module).items():
        for leaf, value in _leaves(var).items():
            flat[item][key + leaf] = jax.ShapeDtypeStruct(tuple(value.shape), value.dtype)
    return {item: _nest(f) for item, f in flat.items()}


def set_state_arrays(module, items: dict[str, dict], where: str) -> None:
    """Sets every state variable of ``module`` (concrete or abstract) from ``items``
    (``state_arrays``' layout), checking names, shapes and dtypes (CheckpointError, one line).
    Consumes ``items``: each restored array is dropped once it is set (one copy at a time)."""
    got = {(item,) + k: v for item, tree in items.items() for k, v in _flatten(tree).items()}
    items.clear()
    wanted = {(item,) + key + leaf: (var, leaf, value)
              for key, (item, var) in _state_vars(module).items()
              for leaf, value in _leaves(var).items()}
    missing, extra = sorted(set(wanted) - set(got)), sorted(set(got) - set(wanted))
    if missing or extra:
        bad = "/".join((missing or extra)[0])
        raise CheckpointError(f"{where}: {'missing' if missing else 'unexpected'} array {bad!r} "
                              f"({len(missing)} missing, {len(extra)} unexpected)")
    for key, (_, _, want) in wanted.items():
        value = got[key]
        if tuple(value.shape) != tuple(want.shape) or np.dtype(value.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"{where}: {'/'.join(key)} is {value.dtype}{list(value.shape)}, "
                                  f"expected {np.dtype(want.dtype)}{list(want.shape)}")
    packed: dict[int, dict] = {}
    for key, (var, leaf, _) in wanted.items():
        if leaf:
            packed.setdefault(id(var), {"var": var})[leaf[0]] = jnp.asarray(got.pop(key))
        elif isinstance(var.get_value(), StoredWeight):
            var.set_value(dataclasses.replace(var.get_value(), data=jnp.asarray(got.pop(key))))
        else:
            var.set_value(jnp.asarray(got.pop(key)))
    for entry in packed.values():
        old = entry["var"].get_value()
        entry["var"].set_value(dataclasses.replace(old, codes=entry["codes"],
                                                   scales=entry["scales"]))


def weight_sizes(qweights: Mapping[str, mx.MXArray]) -> dict:
    """Storage of the quantized linear weights vs the same weights in float32 / bfloat16."""
    n = sum(int(np.prod(q.shape)) for q in qweights.values())
    packed = sum(q.nbytes for q in qweights.values())
    return {"linears": len(qweights), "elements": n, "mx_bytes": packed,
            "bits_per_element": 8.0 * packed / max(n, 1), "float32_bytes": 4 * n,
            "bfloat16_bytes": 2 * n, "ratio_vs_float32": packed / max(4 * n, 1),
            "ratio_vs_bfloat16": packed / max(2 * n, 1)}


# ----------------------------------------------------------------------------- skeletons

def calib_config_from(fields: Mapping[str, Any]) -> CalibConfig:
    """CalibConfig from recorded fields (fields this version lacks are ignored)."""
    return CalibConfig.from_fields(dict(fields))


def llama_config_from(fields: Mapping[str, Any]) -> LlamaConfig:
    f = dict(fields)
    if f.get("rope_scaling") is not None:
        f["rope_scaling"] = tuple(tuple(kv) for kv in f["rope_scaling"])
    try:
        return LlamaConfig(**f)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"recorded model config is invalid ({e})") from None


def quantized_layer(config: LlamaConfig, cfg: CalibConfig, index: int) -> DecoderLayer:
    """A deployed DecoderLayer skeleton of ``cfg``'s method: zero weights, zero packed codes
    and scales, built as calibration builds it (the target a stored state restores into)."""
    layer = build_quantized_layer(DecoderLayer(config, None), cfg, index)
    for q in quant_modules(layer):
        q.deploy_placeholder()
    return layer


def skeleton(config: LlamaConfig, cfg: CalibConfig) -> LlamaForCausalLM:
    """The quantized model skeleton of a checkpoint: ``quantized_layer`` for every layer."""
    return quantized_skeleton(LlamaForCausalLM(config, None), cfg, LLAMA)


def weight_bytes(model) -> dict:
    """Resident bytes of a model's state arrays (the sum of their nbytes), the packed weights
    apart, against the same model with every array in float32 and in bfloat16."""
    weights = packed_weights(model).values()
    packed = sum(w.nbytes for w in weights)
    n_packed = sum(int(np.prod(w.shape)) for w in weights)
    rest = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))
            if not isinstance(v.get_value(), mx.MXArray)]
    # a StoredWeight counts its encoded bytes and its logical elements
    rest_bytes = sum(int(v.nbytes if hasattr(v, "nbytes") else np.asarray(v).nbytes)
                     for v in rest)
    n_rest = sum(int(np.size(v)) for v in rest)
    n = n_packed + n_rest
    return {"model_resident_bytes": packed + rest_bytes, "model_packed_weight_bytes": packed,
            "model_other_bytes": rest_bytes, "model_float32_bytes": 4 * n,
            "model_bfloat16_bytes": 2 * n,
            "model_ratio_vs_float32": (packed + rest_bytes) / max(4 * n, 1)}


# ----------------------------------------------------------------------------- final artifact

def _check_saveable(model: LlamaForCausalLM, result, tokenizer=None) -> None:
    """ValueError (one line) unless ``load_quantized`` can rebuild what save_quantized writes."""
    if not isinstance(result, CalibrationResult):
        raise ValueError(f"save_quantized: result must be the CalibrationResult that "
                         f"quantize_model returned, got {type(result).__name__}")
    linears = [{n: q for n, q in quant_linears(layer).items() if isinstance(q, QuantLinear)}
               for layer in model.layers]
    plain = [f"layers.{i}" for i, qs in enumerate(linears) if not qs]
    undeployed = [f"layers.{i}.{n}" for i, qs in enumerate(linears)
                  for n, q in qs.items() if not q.deployed]
    if plain or undeployed:
        what = plain or undeployed
        problem = "layer(s) are not quantized" if plain else "linear(s) are not deployed"
        raise ValueError(f"save_quantized: {len(what)} {problem} ({', '.join(what[:4])}"
                         f"{', ...' if len(what) > 4 else ''}); save the model that "
                         "quantize_model returned")
    # the checkpoint is rebuilt from (model.config, result.config): that skeleton must be this
    # model, or it would load as another one (a W4A4 model saved with a W4A8 recipe)
    try:
        like = nnx.eval_shape(lambda: skeleton(model.config, result.config))
        same = nnx.graphdef(like) == nnx.graphdef(model)
    except (ValueError, TypeError, KeyError):
        same = False
    if not same:
        c = result.config
        raise ValueError(f"save_quantized: result.config (method {c.method}, setting {c.setting}) "
                         "does not describe this model's quantized layers; pass the "
                         "CalibrationResult that quantize_model returned with this model")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ValueError(f"save_quantized: tokenizer must be a Hugging Face tokenizer (with "
                         f"save_pretrained) or None, got {type(tokenizer).__name__}")


def save_quantized(out_dir, model: LlamaForCausalLM, result, tokenizer=None, *,
                   metadata: Mapping[str, Any] | None = None) -> dict:
    """Writes the deployable checkpoint of ``quantize_model``'s (model, result) into ``out_dir``;
    returns the metadata as written.

    tokenizer: saved beside it when given. metadata: extra JSON fields (how the run was made);
    "format", "model_config", "calib_config", "layers", "sizes" and "checksums" are filled in
    here. metadata.json is written last: it marks the checkpoint complete. Raises ValueError,
    before anything is written, when ``result`` is not a CalibrationResult, does not describe
    the model (its recipe rebuilds another skeleton), the model holds a linear that is not
    quantized and deployed, or ``tokenizer`` cannot be saved.
    """
    _check_saveable(model, result, tokenizer)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove(out / METADATA_FILE)  # from here on the folder holds no complete checkpoint
    items = state_arrays(model, device=True)
    save_tree(out / CHECKPOINT_DIR, items)
    tok_dir = out / TOKENIZER_DIR
    remove(tok_dir)
    if tokenizer is not None and _primary():
        tmp = out / f".{TOKENIZER_DIR}.tmp"
        remove(tmp)
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, tok_dir)
    sizes = weight_sizes(packed_weights(model))
    sizes.update(weight_bytes(model))
    sizes["qweights_on_disk_bytes"] = dir_bytes(out / CHECKPOINT_DIR / "qweights")
    sizes["checkpoint_on_disk_bytes"] = dir_bytes(out / CHECKPOINT_DIR)
    meta = dict(metadata or {})
    meta.setdefault("layers", [dataclasses.asdict(r) for r in result.layers])
    meta.update(format=FORMAT, model_config=dataclasses.asdict(model.config),
                calib_config=dataclasses.asdict(result.config), loss=result.loss_name,
                sizes=sizes, tokenizer=tokenizer is not None, **{CHECKSUMS: tree_digests(items)},
                **{ENCODINGS: stored_encodings(model)})
    meta[FILE_CHECKSUMS] = file_digests(out, TOKENIZER_DIR)
    meta[META_DIGEST] = meta_digest(meta)
    write_json(out / METADATA_FILE, meta)
    _sync("save_quantized")
    return meta


def _read(out_dir) -> tuple[LlamaForCausalLM, dict, dict]:
    """(skeleton model, {"qweights", "params"} trees, metadata) of a finished checkpoint."""
    out = pathlib.Path(out_dir)
    if not out.exists():
        raise CheckpointError(f"checkpoint folder {out} does not exist")
    if not out.is_dir():
        raise CheckpointError(f"{out} is not a folder (a checkpoint is the --output_dir folder "
                              "of batquant_jax.calibrate)")
    if not (out / METADATA_FILE).is_file():
        if (out / RESUME_DIR / PROGRESS_FILE).is_file():
            raise CheckpointError(f"{out} holds an unfinished calibration run (no "
                                  f"{METADATA_FILE} yet); rerun its calibrate command to finish it")
        raise CheckpointError(f"{out} holds no finished quantized checkpoint (no {METADATA_FILE})")
    meta = read_json(out / METADATA_FILE)
    if meta.get("format") not in READABLE:
        how = (f"upgrade it with `python -m batquant_jax.checkpoint upgrade {out}` (its arrays are "
               "verified first) or quantize the model again" if meta.get("format") in UPGRADABLE
               else "quantize the model again")
        raise CheckpointError(f"{out} is a checkpoint of format {meta.get('format')!r}; this "
                              f"version reads {' and '.join(map(repr, READABLE))}: {how}")
    verify_metadata(out, meta)
    model, trees = _restore_verified(out, meta)
    return model, trees, meta


def _restore_verified(out: pathlib.Path, meta: Mapping[str, Any]):
    """(skeleton, stored trees) of the checkpoint ``meta`` describes, every array checked
    against meta's checksum table."""
    try:
        config = llama_config_from(meta["model_config"])
        cfg = calib_config_from(meta["calib_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{out / METADATA_FILE} is incomplete or damaged "
                              f"({type(e).__name__}: {_one_line(e, 100)})") from None
    # the skeleton is built abstractly: no zero copy of the model is ever allocated, the
    # restored arrays become its values (1.5B: 2.6 GB less at load)
    model = nnx.eval_shape(lambda: skeleton(config, cfg))
    apply_encodings(model, meta.get(ENCODINGS, {}), str(out / METADATA_FILE))
    return model, load_tree(out / CHECKPOINT_DIR, abstract_state(model), meta[CHECKSUMS])


UPGRADABLE = ("batquant_jax.quantized/2",)  # formats whose arrays FORMAT stores unchanged


def upgrade(out_dir) -> dict:
    """Rewrites the metadata of a format /2 checkpoint as ``FORMAT`` -> the new metadata (its
    weights are all float: no encodings).

    Format /2 stored the same arrays with a sha256 table but did not protect metadata.json or
    the tokenizer files. Every array is first verified against that table (CheckpointError,
    one line, if one differs); then the tokenizer files are recorded as they are now and the
    metadata gets its digest (``upgraded_from`` says where it came from). Atomic: an
    interrupted upgrade leaves the /2 checkpoint as it was.
    """
    out = pathlib.Path(out_dir)
    if not (out / METADATA_FILE).is_file():
        raise CheckpointError(f"{out} holds no finished quantized checkpoint (no {METADATA_FILE})")
    meta = read_json(out / METADATA_FILE)
    old = meta.get("format")
    if old in READABLE:
        raise CheckpointError(f"{out} is of format {old!r}, which this version reads as it is")
    if old not in UPGRADABLE:
        raise CheckpointError(f"{out} is of format {old!r}; only {', '.join(UPGRADABLE)} can be "
                              "upgraded: quantize the model again")
    if not isinstance(meta.get(CHECKSUMS), dict) or not meta[CHECKSUMS]:
        raise CheckpointError(f"{out / METADATA_FILE} has no {CHECKSUMS!r} table; the arrays "
                              "cannot be verified, so the checkpoint is not upgraded")
    _restore_verified(out, meta)
    meta.update(format=FORMAT, upgraded_from=old)
    meta[FILE_CHECKSUMS] = file_digests(out, TOKENIZER_DIR)
    meta.pop(META_DIGEST, None)
    meta[META_DIGEST] = meta_digest(meta)
    write_json(out / METADATA_FILE, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    """``python -m batquant_jax.checkpoint upgrade DIR``: see ``upgrade``."""
    import sys
    from batquant_jax import cli
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "upgrade":
        cli.fail("usage: python -m batquant_jax.checkpoint upgrade CHECKPOINT_DIR")
    cli.sync_cpu_dispatch()
    quiet_orbax_logs()
    try:
        upgrade(args[1])
    except CheckpointError as e:
        cli.fail(str(e))
    print(f"checkpoint: {args[1]} upgraded to {FORMAT} (every array verified)", file=sys.stderr)
    return 0


def read_arrays(out_dir) -> dict[str, np.ndarray]:
    """Every stored array of a finished checkpoint, keyed "qweights/layers/0/self_attn/q_proj/
    codes", "params/layers/0/self_attn/k_proj/transform/A", ... (inspection, comparisons)."""
    _, trees, _ = _read(out_dir)
    return flat_arrays(trees)


def flat_arrays(trees: Mapping[str, dict]) -> dict[str, np.ndarray]:
    """Restored item trees -> {"item/a/b": array} (``read_arrays``' keys)."""
    return {"/".join((item,) + k): v for item, tree in trees.items()
            for k, v in _flatten(tree).items()}


def load_quantized(out_dir, *, packed: bool = True,
                   freeze_kv: bool = False) -> tuple[LlamaForCausalLM, Any, dict]:
    """Rebuilds a quantized model from ``out_dir`` alone -> (model, tokenizer or None, metadata).

    The skeleton (``skeleton``: the recorded model config, every layer quantized with the
    recorded recipe) is filled with the stored state; each QuantLinear keeps its packed
    MXArray, dequantized inside the jitted forward. ``packed=False`` dequantizes every weight
    once at load instead (float32; the same outputs, 7.5x the weight memory).
    ``freeze_kv=True`` fixes learned or Hadamard K/V transforms as their matrices
    (`kvquant.freeze_all`: the same outputs to float rounding, no per-call solves); for
    evaluation and generation, since the frozen model no longer fits the skeleton.
    """
    out = pathlib.Path(out_dir)
    model, trees, meta = _read(out)
    set_state_arrays(model, trees, str(out))
    if not packed:
        for q in quant_modules(model):
            q.unpack()
    if freeze_kv:
        freeze_all(model)
    tokenizer = None
    if (out / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(out / TOKENIZER_DIR),
                                                      local_files_only=True)
        except Exception as e:  # unreadable or damaged files (their digests matched: a
            # permission problem, or a tokenizer this transformers version cannot read)
            raise CheckpointError(f"{out / TOKENIZER_DIR}: the tokenizer cannot be loaded "
                                  f"({type(e).__name__}: {_one_line(e, 150)})") from None
    return model, tokenizer, meta


# ----------------------------------------------------------------------------- resume state

class ResumeStore:
    """Per-layer state of an unfinished run under ``out_dir/resume``.

    progress.json is the commit point: {"flags", "layers_done", "reports", "checksums"
    ({"layer_000": {array: sha256}, ..., "inputs_{n-1}": ...}), "elapsed_s", ...}. A layer counts as done only once progress.json says so.
    """

    def __init__(self, out_dir):
        self.root = pathlib.Path(out_dir) / RESUME_DIR

    def progress(self) -> dict | None:
        path = self.root / PROGRESS_FILE
        return read_json(path) if path.is_file() else None

    def start(self, progress: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / PROGRESS_FILE, progress)

    def _layer(self, i: int) -> pathlib.Path:
        return self.root / f"layer_{i:03d}"

    def _inputs(self, i: int) -> pathlib.Path:
        return self.root / f"inputs_{i:03d}"

    def save_layer(self, i: int, layer: DecoderLayer, next_inputs, progress: dict) -> dict:
        """Saves layer i (done, deployed) and the next layer's inputs, then commits ``progress``
        with layers_done = i + 1. On an OSError the previous commit stays valid."""
        layer_items = state_arrays(layer, device=True)
        save_tree(self._layer(i), layer_items)
        x = host_value(next_inputs)
        input_items = {"inputs": {"x": x}}
        save_tree(self._inputs(i), input_items)
        sums = {k: v for k, v in progress.get(CHECKSUMS, {}).items() if k.startswith("layer_")}
        sums.update({self._layer(i).name: tree_digests(layer_items),
                     self._inputs(i).name: tree_digests(input_items)})
        progress = dict(progress, layers_done=i + 1, inputs=[list(x.shape), str(x.dtype)],
                        **{CHECKSUMS: sums})
        write_json(self.root / PROGRESS_FILE, progress)
        self.clean(i + 1)
        _sync(f"layer_{i}")
        return progress

    def clean(self, layers_done: int) -> None:
        """Removes what the commit does not reference (older inputs, interrupted writes)."""
        keep = {PROGRESS_FILE} | {self._layer(j).name for j in range(layers_done)}
        if layers_done:
            keep.add(self._inputs(layers_done - 1).name)
        for p in self.root.iterdir() if self.root.is_dir() else ():
            if p.name not in keep:
                remove(p)

    def restore(self, model: LlamaForCausalLM, cfg: CalibConfig, progress: dict
                ) -> np.ndarray | None:
        """Puts the finished layers into ``model`` -> the inputs of the next layer (None when
        no layer is done). Every array is checked against the sha256 in progress.json."""
        try:
            n = int(progress["layers_done"])
            shape, dtype = progress["inputs"] if n else ((), "float32")
            target_x = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.root / PROGRESS_FILE} is incomplete or damaged "
                                  f"({type(e).__name__}: {_one_line(e, 100)})") from None
        sums = progress.get(CHECKSUMS)
        digests = (lambda p: None) if sums is None else (lambda p: sums.get(p.name, {}))
        for i in range(n):
            layer = quantized_layer(model.config, cfg, i)
            tree = load_tree(self._layer(i), abstract_state(layer), digests(self._layer(i)))
            set_state_arrays(layer, tree, str(self._layer(i)))
            model.layers[i] = layer
        if n == 0:
            return None
        x = load_tree(self._inputs(n - 1), {"inputs": {"x": target_x}},
                      digests(self._inputs(n - 1)))
        return x["inputs"]["x"]


if __name__ == "__main__":
    raise SystemExit(main())
