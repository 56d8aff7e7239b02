"""What the command lines share: one-line failures and flag parsing without tracebacks."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sys

from absl import flags


def fail(msg: str, code: int = 2) -> None:
    """Print ``error: msg`` on stderr and exit with ``code`` (2: bad input, 1: a failed write)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def sync_cpu_dispatch() -> None:
    """Makes dispatch on the CPU synchronous for the whole process (JAX's
    ``jax_cpu_enable_async_dispatch`` = False); GPU and TPU backends are unaffected.

    XLA's CPU client can deadlock (0% CPU, waiting forever) when several large programs are
    queued by asynchronous dispatch at once (seen here during calibration; a known JAX CPU
    issue). A process-wide option, so only the command-line entry points set it, first thing in
    their main; a library import leaves it alone. Scripts that run long CPU calibrations
    in-process can call it themselves.
    """
    lean_cpu_schedule()
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)


LEAN_SCHEDULE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def lean_cpu_schedule() -> None:
    """Asks XLA:CPU for its memory-minimising scheduler (adds ``LEAN_SCHEDULE_FLAG`` to
    ``XLA_FLAGS`` unless the variable already names the option). Takes effect only before the
    first JAX computation of the process, so the entry points call it first thing.

    The default concurrency-optimised scheduler starts independent work early: a forward whose
    weights are decoded per call (``models.stored``) then holds every layer's float32 weights at
    once (XLA temp 6.2 GB for the 1.5B model instead of 0.9 GB). The results are the same.
    """
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags_now:
        os.environ["XLA_FLAGS"] = f"{flags_now} {LEAN_SCHEDULE_FLAG}".strip()


def quiet_backend_probe() -> None:
    """Drops JAX's INFO line "Unable to initialize backend 'tpu'" (printed by every command on a
    machine without one); warnings and errors of that module still show."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that reports a bad flag in one line instead of a usage dump."""
    quiet_backend_probe()
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return []


def check_output_path(flag: str, path: str, inputs: dict[str, str | None] | None = None,
                      error: type[Exception] = ValueError) -> None:
    """Raises ``error`` (one line) unless ``path`` can become a file: not a folder, under a
    writable folder, and neither one of ``inputs`` ({flag: path}, files or folders the run
    reads) nor inside one."""
    out = pathlib.Path(path).expanduser().absolute()
    if out.is_dir():
        raise error(f"{flag} {path} is a folder; name a file")
    real = out.parent.resolve() / out.name
    for name, src in (inputs or {}).items():
        if not src:
            continue
        src_path = pathlib.Path(src).expanduser()
        if not src_path.exists():
            continue
        src_path = src_path.resolve()
        if real == src_path or src_path in real.parents:
            where = "is" if real == src_path else "lies inside"
            raise error(f"{flag} {path} {where} {name} {src}: writing it would damage an "
                        "input; name a file elsewhere")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{flag} {path} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{flag} {path} cannot be created: {parent} is not writable")


def load_for_command(model: str, checkpoint: str | None, error: type[Exception] = ValueError):
    """The one "model or checkpoint" loader of the commands -> (model, tokenizer, description,
    max positions). A checkpoint loads with its K/V transforms frozen (``load_quantized(...,
    freeze_kv=True)``: evaluation, scoring and generation). Raises the loaders' one-line errors,
    or ``error`` when there is no tokenizer (every command reads or writes text)."""
    if checkpoint is not None:
        from batquant_jax.checkpoint import load_quantized
        net, tokenizer, meta = load_quantized(checkpoint, freeze_kv=True)
        if tokenizer is None:
            raise error(f"checkpoint {checkpoint} holds no tokenizer")
        source = (meta.get("source_model") or {}).get("spec")
        description = (f"checkpoint {checkpoint} ({meta.get('method')} {meta.get('setting')}"
                       + (f" of {source})" if source else ")"))
        return net, tokenizer, description, int(net.config.max_position_embeddings)
    from batquant_jax.models import load_model
    loaded = load_model(model)
    if loaded.tokenizer is None:
        raise error(f"model {model} comes without a tokenizer "
                    f"({loaded.info.get('tokenizer_note', 'none found')})")
    return (loaded.model, loaded.tokenizer, f"{model} ({loaded.source})",
            int(loaded.config.max_position_embeddings))


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# ----------------------------------------------------------------------------- flags from dataclasses

_FLAG_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def help_(text: str) -> dict:
    """A command dataclass field's metadata carrying its flag's help."""
    return {"help": text}


def field_type(field: dataclasses.Field) -> type:
    """The flag type of a command dataclass field (``int | None`` -> int)."""
    if isinstance(field.type, type):
        return field.type
    t = str(field.type).replace(" | None", "").replace("None | ", "")
    return _FLAG_TYPES[t]


def define_flags_from(cls, helps: dict[str, str] | None = None) -> None:
    """One absl flag per field of the command dataclass ``cls``: type and default from the
    field, help from ``field.metadata["help"]`` or ``helps[name]``. Called by each command's
    ``__main__`` only, so importing a command registers nothing."""
    define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
              bool: flags.DEFINE_boolean}
    for field in dataclasses.fields(cls):
        help_ = field.metadata.get("help") or (helps or {})[field.name]
        define[field_type(field)](field.name, field.default, help_)


def config_from(cls, values: flags.FlagValues | None = None, *, all_if_nonpositive=()):
    """The ``cls`` instance of the parsed flags: an empty string is None for an optional
    string field; the int fields named in ``all_if_nonpositive`` are None ("all") at <= 0."""
    values = flags.FLAGS if values is None else values
    out = {}
    for field in dataclasses.fields(cls):
        v = getattr(values, field.name)
        optional = "None" in str(field.type)
        if field_type(field) is str and optional:
            v = v or None
        if field.name in all_if_nonpositive and v is not None and v <= 0:
            v = None
        out[field.name] = v
    return cls(**out)
