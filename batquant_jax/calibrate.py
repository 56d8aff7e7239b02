"""Calibrate a model and write a deployable MXFP4 checkpoint: ``python -m batquant_jax.calibrate``.

    python -m batquant_jax.calibrate --model=smollm2-135m --method=batquant \\
        --output_dir=/tmp/smollm2-batquant --eval_data=wiki-eval
    python -m batquant_jax.evaluate --checkpoint=/tmp/smollm2-batquant --eval_data=wiki-eval

Progress goes to stderr (loading, tokenizing, one line per layer with elapsed time and ETA);
results to stdout (per-layer loss table, weight storage, perplexities). The output directory
ends up holding only the checkpoint (see ``checkpoint.py``). After every layer the run commits
its state there, so the same command, rerun after a crash or kill, continues from the last
finished layer and writes the same checkpoint as an uninterrupted run; a rerun whose sampled
calibration tokens differ from the ones the kept layers saw is refused. Every stored array is
checksummed (see ``checkpoint.py``). While it runs, the command holds an exclusive lock on the
output directory (``lockfile.py``): a second run there fails at once, naming the holder.

Bad flags or inputs print one line and exit with 2 before any work; a failed write (disk full,
permissions) exits with 1 and keeps the last committed state; Ctrl-C exits with 130 and says
which layers are kept. The flags only fill a ``CalibrateConfig``; ``run_calibration(cfg)`` does
the work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import platform
import re
import sys
import time
from typing import Callable

import numpy as np
from absl import app, flags

from batquant_jax.errors import RunError, UserError
from batquant_jax import checkpoint, cli, data, lockfile, perplexity
from batquant_jax.recipe import METHODS, CalibConfig, RecipeError


class ConfigError(UserError):
    """A setting that cannot work; the message is one line."""


class SaveError(RunError):
    """Writing the checkpoint failed; the last committed state is intact. One-line message."""


class Interrupted(RuntimeError):
    """Ctrl-C (KeyboardInterrupt); the message says which layers are kept. One line."""


MAX_LR = 1.0  # a learning rate above this only diverges (AdamW steps of that size per element)


class _CalibrateConfigMethods:
    """The methods of CalibrateConfig (its fields are generated below)."""

    # the fields that decide the checkpoint: a rerun must repeat them to resume
    # (every CalibConfig field is one; test_calibrate_cli checks that each is a field here)
    RUN_FIELDS = ("model", "calib_data", "nsamples", "seqlen") + tuple(
        f.name for f in dataclasses.fields(CalibConfig))

    def run_flags(self) -> dict:
        return {k: getattr(self, k) for k in self.RUN_FIELDS}

    def trains(self) -> bool:
        """True if the method trains (a learned transform or clipping, and --epochs > 0)."""
        method = METHODS.get(self.method)
        return bool(method is not None and method.train and self.epochs > 0)

    def calib_config(self) -> CalibConfig:
        """The library's CalibConfig: every field this command shares with it, by name.

        A method that does not train only batches its forward passes: there the batch is cut
        to --nsamples, so any --batch_size works.
        """
        shared = {f.name for f in dataclasses.fields(CalibConfig)} & set(self.RUN_FIELDS)
        fields = {name: getattr(self, name) for name in shared}
        if not self.trains():
            fields["batch_size"] = max(1, min(self.batch_size, self.nsamples))
        return CalibConfig(**fields)

    def validate(self) -> CalibConfig:
        """Checks that need no model or data; returns the CalibConfig. The method's
        hyper-parameters are checked by CalibConfig itself (errors worded as flags here)."""
        if self.batch_size < 1:  # checked before calib_config() fits it to a method that does not train
            raise ConfigError(f"--batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr", "clip_lr"):  # the library takes any positive rate (divergence tests)
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_LR):
                raise ConfigError(f"--{name} must be a finite number in (0, {MAX_LR:g}], got "
                                  f"{value}")
        try:
            calib = self.calib_config()
        except RecipeError as e:
            raise ConfigError(e.flag_message()) from None
        if not self.output_dir.strip():
            raise ConfigError("--output_dir is required")
        if self.nsamples < 1:
            raise ConfigError(f"--nsamples must be >= 1, got {self.nsamples}")
        sources = data.calib_sources(self.calib_data)
        if len(sources) > self.nsamples:
            raise ConfigError(f"--nsamples {self.nsamples} is fewer than the {len(sources)} "
                              "--calib_data sources; each needs a window")
        if self.nsamples < self.batch_size and self.trains():
            raise ConfigError(f"--nsamples ({self.nsamples}) must be >= --batch_size "
                              f"({self.batch_size}) for a method that trains")
        if self.seqlen < 2 or self.eval_seqlen < 2:
            raise ConfigError(f"--seqlen and --eval_seqlen must be >= 2, got {self.seqlen} and "
                              f"{self.eval_seqlen}")
        if self.eval_max_tokens is not None and self.eval_max_tokens < self.eval_seqlen:
            raise ConfigError(f"--eval_max_tokens {self.eval_max_tokens} is less than one window of"
                              f" --eval_seqlen {self.eval_seqlen}")
        return calib


# One calibration run: where and on what (model, data, output, evaluation, devices), then every
# CalibConfig field with the library's default -- written once, in recipe.py -- except the CPU
# budget of this command (epochs 2: the library's 5, the paper's, trains 2.5x as many steps).
_RUN_BEFORE = [("model", "str", "smollm2-135m"), ("output_dir", "str", ""),
               ("calib_data", "str", "wiki-calib"), ("nsamples", "int", 32),
               ("seqlen", "int", 256)]
_RUN_AFTER = [("eval_data", "str | None", None), ("eval_seqlen", "int", 512),
              ("eval_max_tokens", "int | None", 65536),  # None: the whole corpus
              ("overwrite", "bool", False),
              # devices: "data:4", "data:2,model:2"; None: every device on the data axis
              ("mesh", "str | None", None),
              ("coordinator_address", "str | None", None),  # multi-process: jax.distributed
              ("num_processes", "int | None", None), ("process_id", "int | None", None)]
_BUDGET = {"epochs": 2}
CalibrateConfig = dataclasses.make_dataclass(
    "CalibrateConfig",
    [(n, t, dataclasses.field(default=d)) for n, t, d in _RUN_BEFORE]
    + [(f.name, f.type, dataclasses.field(default=_BUDGET.get(f.name, f.default),
                                          metadata=f.metadata))
       for f in dataclasses.fields(CalibConfig)]
    + [(n, t, dataclasses.field(default=d)) for n, t, d in _RUN_AFTER],
    bases=(_CalibrateConfigMethods,), frozen=True)
CalibrateConfig.__module__ = __name__
CalibrateConfig.__doc__ = ("One calibration run: model, data, output folder, evaluation and "
                           "devices, then every CalibConfig field (library defaults; epochs 2).")


def _log(msg: str) -> None:
    print(f"calibrate: {msg}", file=sys.stderr, flush=True)


def _compute(first_layer: int) -> dict:
    """Where a calibration session runs: the backend, its devices and the CPU threads this
    process may use. Float reductions are split by thread count, so GPTQ's rounding can flip on
    a few codes between machines of different sizes; the record says which ran which layers."""
    import jax
    devices = jax.devices()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"from_layer": first_layer, "backend": jax.default_backend(), "devices": len(devices),
            "device_kind": devices[0].device_kind, "cpu_threads": threads}


def _versions() -> dict:
    import flax
    import jax
    import jaxlib
    import orbax.checkpoint

    import batquant_jax
    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "orbax_checkpoint": orbax.checkpoint.__version__,
            "batquant_jax": batquant_jax.__version__}


# Exactly the names this command writes into --output_dir, and their temporaries: Orbax's
# "<dir>.orbax-checkpoint-tmp[-<n>]", atomic_write's "<file>.<8 random chars>.tmp", the tokenizer's
# ".tokenizer.tmp" and the lock's ".lock.<host>.<pid>.tmp". Anything else is the user's.
_OWNED_NAMES = checkpoint.ARTIFACT + (checkpoint.RESUME_DIR, lockfile.LOCK_FILE)
_OWNED_TEMP = re.compile(
    rf"^(?:(?:{checkpoint.CHECKPOINT_DIR}|{checkpoint.RESUME_DIR})\.orbax-checkpoint-tmp(?:-\d+)?"
    rf"|{re.escape(checkpoint.METADATA_FILE)}\.[a-z0-9_]{{8}}\.tmp"
    rf"|\.{checkpoint.TOKENIZER_DIR}\.tmp|{re.escape(lockfile.LOCK_FILE)}\.[^/]+\.\d+\.tmp)$")


def _owned(name: str) -> bool:
    return name in _OWNED_NAMES or bool(_OWNED_TEMP.match(name))


def inspect_output_dir(cfg: CalibrateConfig) -> tuple[str, dict | None]:
    """("new" | "resume" | "done", recorded progress or metadata). Reads only.

    Refuses (ConfigError) a folder holding foreign files, or a run made with other flags
    (unless --overwrite, which returns "new": the caller clears the folder).
    """
    out = pathlib.Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} exists and is not a folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in names if not _owned(n)]
    if foreign:
        raise ConfigError(f"--output_dir {out} holds files this command did not write "
                          f"({', '.join(foreign[:3])}); pass an empty or new folder")
    if cfg.overwrite:  # whatever is there, readable or not, is discarded
        return "new", None
    try:
        if (out / checkpoint.METADATA_FILE).is_file():
            kind, record = "done", checkpoint.read_json(out / checkpoint.METADATA_FILE)
        else:
            record = checkpoint.ResumeStore(out).progress()
            kind = "resume"
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"{e}; pass --overwrite to start over") from None
    if record is None:
        return "new", None
    before, now = record.get("flags", {}), cfg.run_flags()
    # a flag newer than the run is absent from its record: the run had its default
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    before = {k: before.get(k, defaults[k]) for k in now}
    diff = [f"--{k}={before[k]} (now {now[k]})" for k in now if before[k] != now[k]]
    if diff:
        raise ConfigError(f"--output_dir {out} holds a run with different flags: "
                          f"{', '.join(diff)}; rerun with the same flags to resume, pass "
                          "--overwrite to start over, or choose another --output_dir")
    return kind, record


def _summary(reports: list[dict], loss_name: str = "loss") -> str:
    rows = [f"{'layer':>5}  {loss_name + ' rtn':>10}  {'init':>10}  {'trained':>10}  {'final':>10}  "
            f"{'steps':>5}  {'seconds':>7}"]
    for r in reports:
        rows.append(f"{r['index'] + 1:>5}  {r['loss_rtn']:>10.4g}  {r['loss_init']:>10.4g}  "
                    f"{r['loss_trained']:>10.4g}  {r['loss_final']:>10.4g}  {r['steps']:>5}  "
                    f"{r['seconds']:>7.1f}{'  fell back' if r.get('fell_back') else ''}")
    return "\n".join(rows)


def _sizes_line(s: dict) -> str:
    return (f"quantized linear weights: {s['linears']} linears, {s['elements']:,} elements: "
            f"{s['mx_bytes']:,} bytes as MXFP4 ({s['bits_per_element']:.2f} bits/element; "
            f"{s['qweights_on_disk_bytes']:,} bytes on disk) vs {s['float32_bytes']:,} float32 "
            f"({s['ratio_vs_float32']:.1%}) and {s['bfloat16_bytes']:,} bfloat16 "
            f"({s['ratio_vs_bfloat16']:.1%})")


def _text_digest(texts: list[str]) -> str:
    """SHA-256 of the calibration text; of several sources, of their digests joined by ","."""
    digests = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
    return digests[0] if len(digests) == 1 else hashlib.sha256(
        ",".join(digests).encode("ascii")).hexdigest()


def _perplexity(model, ids, cfg: CalibrateConfig, mesh=None) -> float:
    from batquant_jax import pipeline
    res = pipeline.perplexities(model, {"eval": ids}, seqlen=cfg.eval_seqlen,
                                max_tokens=cfg.eval_max_tokens, mesh=mesh,
                                progress=perplexity.progress_printer())
    return res["eval"].perplexity


def _mesh(cfg: CalibrateConfig):
    """The device mesh of ``cfg.mesh``; None on a single device (the plain one-device path)."""
    import jax

    from batquant_jax import distributed
    try:
        mesh = distributed.make_mesh(cfg.mesh)
        if mesh.size > 1:
            distributed.DataParallel(mesh).check_batch(cfg.calib_config().batch_size)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return None if mesh.size == 1 and jax.process_count() == 1 else mesh


def run_calibration(cfg: CalibrateConfig, log: Callable[[str], None] = _log,
                    out: Callable[[str], None] = print) -> dict:
    """Calibrates ``cfg.model`` and writes the checkpoint to ``cfg.output_dir``; returns its metadata.

    Resumes an unfinished run of the same flags in that folder, holding its lock throughout.
    Raises ConfigError, data.DataError, ModelLoadError, lockfile.LockError or CheckpointError
    (one-line messages) before any work on bad input, SaveError when a write fails, and
    Interrupted on Ctrl-C (the committed layers are kept).
    """
    t_session = time.perf_counter()
    calib_cfg = cfg.validate()
    out_dir = pathlib.Path(cfg.output_dir).expanduser()
    primary = (cfg.num_processes or 1) == 1 or checkpoint._primary()
    lock = lockfile.FolderLock(out_dir, "--output_dir", log) if primary else None
    n_layers: list[int] = []  # filled once the model is loaded
    try:
        if lock is not None:
            lock.acquire()
        return _calibrate(cfg, calib_cfg, out_dir, t_session, n_layers, log, out)
    except KeyboardInterrupt:
        raise Interrupted(_kept(out_dir, n_layers)) from None
    finally:
        if lock is not None:
            lock.release()


def _check_memory(cfg: CalibrateConfig, hidden: int) -> None:
    """ConfigError when the calibration activations (inputs, targets and the next layer's
    inputs: 3 x nsamples x seqlen x hidden float32) cannot fit in the available memory."""
    need = 3 * cfg.nsamples * cfg.seqlen * hidden * 4
    have = cli.available_memory()
    if have is not None and need > have:
        raise ConfigError(f"--nsamples {cfg.nsamples} x --seqlen {cfg.seqlen} needs about "
                          f"{need / 2**30:.1f} GiB of calibration activations (hidden size "
                          f"{hidden}); {have / 2**30:.1f} GiB are available: lower --nsamples "
                          "or --seqlen")


def _kept(out_dir: pathlib.Path, n_layers: list[int]) -> str:
    """What an interrupted run leaves behind, in one line."""
    if (out_dir / checkpoint.METADATA_FILE).is_file():
        return f"interrupted; {out_dir} holds the finished checkpoint"
    store = checkpoint.ResumeStore(out_dir)
    try:
        progress = store.progress()
    except checkpoint.CheckpointError:
        progress = None
    done = int(progress.get("layers_done", 0)) if progress else 0
    total = f" of {n_layers[0]}" if n_layers else ""
    if done and n_layers and done >= n_layers[0]:
        return (f"interrupted; layers 1-{done}{total} are kept in {store.root}: rerun the same "
                "command to evaluate and write the checkpoint")
    if done:
        return (f"interrupted; layers 1-{done}{total} are kept in {store.root}: rerun the same "
                "command to resume from layer " + str(done + 1))
    return "interrupted before any layer was finished; nothing is kept"


def _calibrate(cfg: CalibrateConfig, calib_cfg: CalibConfig, out_dir: pathlib.Path,
               t_session: float, n_layers_out: list[int], log: Callable[[str], None],
               out: Callable[[str], None]) -> dict:
    """``run_calibration`` once the output folder is locked."""
    kind, record = inspect_output_dir(cfg)
    if (cfg.num_processes or 1) > 1:
        checkpoint._sync("inspect_output_dir")  # every process has read it before anyone writes
    if kind == "done":
        checkpoint.remove(out_dir / checkpoint.RESUME_DIR)  # a run killed after its last commit
        log(f"{out_dir} already holds the finished checkpoint of these flags; nothing to do "
            "(pass --overwrite to redo it)")
        return record
    mesh = _mesh(cfg)
    log(f"reading {cfg.calib_data}")
    texts = [data.load_corpus(name) for name in data.calib_sources(cfg.calib_data)]
    eval_text = data.load_corpus(cfg.eval_data) if cfg.eval_data else None
    log(f"loading model {cfg.model}")
    from batquant_jax.calibration import CalibrationResult, LayerReport, quantize_model
    from batquant_jax.models import load_model
    loaded = load_model(cfg.model)
    spec = calib_cfg.spec
    if spec.kv_fmt is not None and loaded.config.head_dim % spec.block_size:
        raise ConfigError(f"--setting {cfg.setting} quantizes keys and values in blocks of "
                          f"{spec.block_size} along head_dim, but {cfg.model} has head_dim "
                          f"{loaded.config.head_dim}")
    max_pos = int(loaded.config.max_position_embeddings)
    for name in ("seqlen",) + (("eval_seqlen",) if eval_text is not None else ()):
        if getattr(cfg, name) > max_pos:
            raise ConfigError(f"--{name} {getattr(cfg, name)} exceeds the model's context of "
                              f"{max_pos} positions")
    if loaded.tokenizer is None:
        raise ConfigError(f"model {cfg.model} has no tokenizer "
                          f"({loaded.info.get('tokenizer_note', 'none found')})")
    _check_memory(cfg, loaded.config.hidden_size)
    log(f"tokenizing {sum(map(len, texts)):,} characters")
    token_ids = [data.tokenize_corpus(text, loaded.tokenizer) for text in texts]
    n_tokens = sum(int(ids.size) for ids in token_ids)
    windows = data.sample_mixed(token_ids, cfg.nsamples, cfg.seqlen, cfg.seed)
    tokens_sha = checkpoint.array_digest(np.asarray(windows, np.int32))
    if kind == "resume" and int(record.get("layers_done", 0)) > 0:
        before, done = record.get("calib_tokens_sha256"), int(record["layers_done"])
        if before is None:
            log(f"the calibration tokens of layers 1-{done} were not recorded (an older run); "
                "resuming unchecked")
        elif before != tokens_sha:
            raise ConfigError(
                f"--calib_data {cfg.calib_data} changed since layers 1-{done} in {out_dir} were "
                f"calibrated: the sampled calibration tokens differ (sha256 {before[:12]} then, "
                f"{tokens_sha[:12]} now); restore that text to resume, or pass --overwrite to "
                "start over")
    eval_ids = None
    if eval_text is not None:
        eval_ids = data.tokenize_corpus(eval_text, loaded.tokenizer)
        if eval_ids.size < cfg.eval_seqlen:
            raise data.DataError(f"{cfg.eval_data} has {eval_ids.size} tokens; one window of "
                                 f"--eval_seqlen {cfg.eval_seqlen} needs more")
    log(f"{n_tokens:,} tokens; {cfg.nsamples} windows of {cfg.seqlen} tokens (seed {cfg.seed})")

    model, n_layers = loaded.model, loaded.config.num_layers
    n_layers_out.append(n_layers)
    fp_model = None
    if eval_ids is not None:
        from flax import nnx
        fp_model = nnx.clone(model)
    store = checkpoint.ResumeStore(out_dir)
    try:
        if kind == "new":
            for name in sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else ():
                if not name.startswith(lockfile.LOCK_FILE):  # only our own leftovers are present
                    checkpoint.remove(out_dir / name)
            record = {"flags": cfg.run_flags(), "layers_done": 0, "reports": [],
                      "elapsed_s": 0.0, "sessions": 0}
        record = dict(record, sessions=int(record.get("sessions", 0)) + 1,
                      calib_tokens_sha256=tokens_sha,
                      compute=record.get("compute", []) + [_compute(record["layers_done"])])
        store.start(record)
        start = int(record["layers_done"])
        store.clean(start)
        try:
            start_inputs = store.restore(model, calib_cfg, record)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"{e}; pass --overwrite to start over") from None
        if start:
            log(f"resuming: layers 1-{start} of {n_layers} restored from {store.root}")
        progress = record

        def on_layer_done(i, layer, next_inputs, report):
            nonlocal progress
            t0 = time.perf_counter()
            progress = dict(progress, reports=progress["reports"] + [dataclasses.asdict(report)],
                            elapsed_s=record["elapsed_s"] + time.perf_counter() - t_session)
            progress = store.save_layer(i, layer, next_inputs, progress)
            log(f"layer {i + 1}/{n_layers} committed to {store.root} "
                f"({time.perf_counter() - t0:.1f}s)")

        loss_name = calib_cfg.loss
        if start < n_layers:
            log(f"calibrating layers {start + 1}-{n_layers} with {cfg.method} at {cfg.setting}")
            _, res = quantize_model(model, windows, calib_cfg, log=log,
                                    on_layer_done=on_layer_done, start_layer=start,
                                    start_inputs=start_inputs, mesh=mesh)
            loss_name = res.loss_name
        del start_inputs
        result = CalibrationResult(calib_cfg, [LayerReport(**r) for r in progress["reports"]],
                                   progress["elapsed_s"], loss_name)
        metadata = {
            "method": cfg.method, "setting": cfg.setting, "flags": cfg.run_flags(),
            "all_flags": dataclasses.asdict(cfg),
            "versions": _versions(), "seed": cfg.seed,
            "source_model": {"spec": cfg.model, "path": loaded.source,
                             "format": loaded.info.get("format"),
                             "num_params": loaded.info.get("num_params")},
            "calib_data": {"name": cfg.calib_data, "chars": sum(map(len, texts)),
                           "tokens": n_tokens, "sha256": _text_digest(texts),
                           "tokens_sha256": tokens_sha,
                           "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed},
            "layers": progress["reports"], "sessions": progress["sessions"],
            "compute": progress.get("compute", [])}
        eval_result = None
        if eval_ids is not None:
            log(f"evaluating perplexity on {cfg.eval_data}: full precision")
            ppl_fp = _perplexity(fp_model, eval_ids, cfg, mesh)
            log("evaluating perplexity: quantized")
            ppl_q = _perplexity(model, eval_ids, cfg, mesh)
            eval_result = {"eval_data": cfg.eval_data, "seqlen": cfg.eval_seqlen,
                           "max_tokens": cfg.eval_max_tokens, "perplexity_fp": ppl_fp,
                           "perplexity_quantized": ppl_q, "gap": ppl_q / ppl_fp - 1.0}
        metadata["eval"] = eval_result
        metadata["wall_time_s"] = round(record["elapsed_s"] + time.perf_counter() - t_session, 3)
        log(f"writing the checkpoint to {out_dir}")
        meta = checkpoint.save_quantized(out_dir, model, result, loaded.tokenizer,
                                         metadata=metadata)
        checkpoint.remove(store.root)
    except OSError as e:
        reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise SaveError(f"cannot write the checkpoint in {out_dir}: {reason}{where}; the last "
                        "committed layer is kept: fix the cause and rerun the same command to "
                        "resume") from None

    out(_summary(meta["layers"], meta.get("loss", "loss")))
    out(_sizes_line(meta["sizes"]))
    if eval_result is not None:
        out(f"perplexity fp: {eval_result['perplexity_fp']:.4f}")
        out(f"perplexity quantized: {eval_result['perplexity_quantized']:.4f} "
            f"(gap {eval_result['gap']:+.2%})")
    out(f"checkpoint: {out_dir} ({meta['sizes']['checkpoint_on_disk_bytes']:,} bytes, "
        f"{meta['wall_time_s']:.0f}s)")
    return meta


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


# help of the flags that are not CalibConfig fields (those carry their own help)
_RUN_HELP = {
    "model": "model alias (smollm2-135m, qwen2.5-coder-1.5b), Hugging Face folder or GGUF file",
    "output_dir": "folder for the checkpoint (created; reruns resume)",
    "calib_data": "wiki-calib, or a UTF-8 text file or folder; several joined by ',' share "
                  "the windows evenly (e.g. wiki-calib,/path/to/code)",
    "nsamples": "calibration windows",
    "seqlen": "tokens per calibration window",
    "eval_data": "if set, report FP and quantized perplexity on this text",
    "eval_seqlen": "tokens per evaluation window",
    "eval_max_tokens": "evaluate the first eval_max_tokens // eval_seqlen windows; 0 = all",
    "overwrite": "discard a previous run in --output_dir",
    "mesh": "device mesh, e.g. data:4 or data:2,model:2 (default: every device on the data "
            "axis; --batch_size must divide by data)",
    "coordinator_address": "multi-process run: host:port of process 0",
    "num_processes": "multi-process run: number of processes",
    "process_id": "multi-process run: this process, 0..num_processes-1",
}
def define_flags() -> None:
    """Defines one flag per CalibrateConfig field (only when run as a program, so importing
    registers nothing): type and default from the field, help from CalibConfig's field metadata
    or _RUN_HELP."""
    cli.define_flags_from(CalibrateConfig, _RUN_HELP)


def config_from_flags(f: flags.FlagValues = FLAGS) -> CalibrateConfig:
    """The CalibrateConfig of the parsed flags ("" is None for optional strings; an
    --eval_max_tokens of 0 is None: the whole text)."""
    return cli.config_from(CalibrateConfig, f, all_if_nonpositive=("eval_max_tokens",))


def main(argv: list[str]) -> None:
    cli.sync_cpu_dispatch()  # before any computation
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; all settings are --flags")
    from batquant_jax.models import ModelLoadError
    checkpoint.quiet_orbax_logs()
    cfg = config_from_flags()
    try:  # before anything touches a device
        from batquant_jax import distributed
        distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    except ValueError as e:
        cli.fail(str(e).splitlines()[0])
    try:
        run_calibration(cfg)
    except (ConfigError, data.DataError, ModelLoadError, checkpoint.CheckpointError,
            lockfile.LockError) as e:
        cli.fail(str(e).splitlines()[0])
    except SaveError as e:
        cli.fail(str(e), 1)
    except Interrupted as e:
        cli.fail(str(e), 130)
    except KeyboardInterrupt:
        cli.fail("interrupted", 130)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
