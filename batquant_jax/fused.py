"""Fused MXFP4 matrix products: multiply by a packed weight without dequantizing it first.

A deployed ``QuantLinear`` holds its weight as an ``mx.MXArray`` (E2M1 codes + E8M0 scales,
4.25 bits an element). The reference forward dequantizes that weight to float32 and then
multiplies (``reference_dot``). At decode time (a few activation rows) that is slower than the
float32 model itself: the whole float matrix is written and read again for every token. The
fused products read the codes and scales directly:

- ``mxfp4_dot(x, w)``: float activations x `[..., K]` times w `[N, K]` (W4A16, W4A8);
- ``mxfp4_dot_q(xq, w)``: MXFP4 activations (an MXArray `[..., K]`) times w: exact integer
  block dot products, scaled once per block (W4A4);
- ``stored_dot(x, w)``: float activations times a full-precision weight still in its GGUF
  block encoding (``models.stored.StoredWeight``), one weight row decoded at a time (the
  float32 model's decode steps, under the same mode rule, ``choose_stored``).

On the CPU they run a small C++ kernel (``csrc/mxfp4_dot.cc``) registered with XLA's FFI. It is
built, with the GGML block decoders that ``models.stored`` uses (``csrc/ggml_decode.cc``), into
one library by the system C++ compiler (``$CXX`` or g++) on first use, or by
``scripts/setup.sh``, into the cache (``<cache>/kernels``). Without a compiler, one message says
so, the products fall back to ``reference_dot`` and the decoders to their XLA form. On GPU and TPU they dispatch to a Pallas kernel (``pallas_dot``)
or to the reference path (see ``PALLAS``). The results equal the reference path to float32
rounding (only the order of the sums differs).

Which path a linear takes is decided when its forward is traced (``choose``): the mode
(``set_mode`` / ``matmul_mode`` / ``$BATQUANT_FUSED``: "auto", "on" or "off") and the number of
activation rows. "auto" fuses up to ``AUTO_MAX_ROWS`` rows (decode) and keeps the
dequantize-then-dot path for prefill and evaluation, where one dequantization serves many rows
and XLA's dot is faster (``experiments/bench_packed.py`` measures both).

>>> import jax, jax.numpy as jnp
>>> from batquant_jax import mx
>>> w = mx.quantize(jax.random.normal(jax.random.key(0), (64, 96)))
>>> x = jax.random.normal(jax.random.key(1), (3, 96))
>>> bool(jnp.allclose(mxfp4_dot(x, w), reference_dot(x, w), rtol=1e-5, atol=1e-5))
True
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from batquant_jax import mx

__all__ = ["mxfp4_dot", "mxfp4_dot_q", "stored_dot", "choose_stored", "reference_dot", "available",
           "cpu_kernels", "unavailable_reason", "build", "choose", "describe", "set_mode",
           "get_mode", "matmul_mode", "MODES", "AUTO_MAX_ROWS", "library_path"]

CSRC = pathlib.Path(__file__).parent / "csrc"
SOURCES = (CSRC / "mxfp4_dot.cc", CSRC / "ggml_decode.cc")  # compiled into one library
HEADERS = (CSRC / "parallel.h",)
MODES = ("auto", "on", "off")
AUTO_MAX_ROWS = 64  # "auto" fuses products of at most this many activation rows
BLOCK = 32
# $BATQUANT_KERNEL_ARCH replaces "native" (e.g. "x86-64": the portable loops, no AVX2; the tests
# build that variant too)
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC",
            f"-march={os.environ.get('BATQUANT_KERNEL_ARCH', 'native')}", "-fno-math-errno",
            "-ffp-contract=off")  # a * b + c stays two roundings (the decoders equal XLA's bits)
# name -> (XLA custom-call target, the handler's symbol in the library)
_TARGETS = {"q": ("bq_mxfp4_dot_q", "BqMxfp4DotQ"), "f32": ("bq_mxfp4_dot_f32", "BqMxfp4DotF32"),
            "ggml_decode": ("bq_ggml_decode", "BqGgmlDecode"),
            "ggml_dot": ("bq_ggml_dot", "BqGgmlDot")}

_lock = threading.Lock()
_loaded: dict = {}  # "ok": True, or "reason": why the kernel is unavailable
_mode = [os.environ.get("BATQUANT_FUSED", "auto")]


class KernelError(RuntimeError):
    """The C++ kernel could not be built or loaded; the message is one line."""


# ----------------------------------------------------------------------------- building

def _cpu_signature() -> str:
    """What the compiled code depends on besides the source: ISA flags (-march=native)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    import platform
    return f"{platform.machine()} {flags.strip()}"


def library_path() -> pathlib.Path:
    """Where the compiled kernels live: the cache, keyed by the sources, jaxlib's version, the
    compiler flags and the CPU (a changed one is rebuilt, an old one never reused)."""
    from batquant_jax.data import cache_dir
    import jaxlib
    key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in SOURCES + HEADERS),
                                     jaxlib.__version__.encode(), " ".join(CXXFLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_kernels-{key}.so"


def build(force: bool = False) -> pathlib.Path:
    """Compiles the kernels into ``library_path()`` (unless it is there) -> its path.
    KernelError (one line) without a compiler or when compilation fails."""
    out = library_path()
    if out.exists() and not force:
        return out
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise KernelError(f"no C++ compiler ({cxx!r} is not on PATH; set $CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = pathlib.Path(tmp) / out.name
        cmd = [cxx, *CXXFLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o",
               str(tmp_out)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            first = next((line for line in run.stderr.splitlines() if "error" in line),
                         run.stderr.strip()[:200])
            raise KernelError(f"{cxx} failed to compile {CSRC.name}/: {first}")
        os.replace(tmp_out, out)  # atomic: another process never loads half a file
    return out


def _load() -> None:
    path = build()
    lib = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in _TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")


def available() -> bool:
    """True when the CPU kernels are built and registered (built on first call when a compiler is
    present). Otherwise prints once, on stderr, why and that the reference path is used."""
    with _lock:
        if not _loaded:
            try:
                _load()
                _loaded["ok"] = True
            except (KernelError, OSError, AttributeError) as e:
                _loaded["reason"] = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"batquant_jax: the C++ CPU kernels are unavailable "
                      f"({_loaded['reason']}); using the dequantize-then-dot path and XLA's "
                      f"weight decoders", file=sys.stderr)
    return "ok" in _loaded


def cpu_kernels() -> bool:
    """True when the default backend is the CPU and the C++ kernels are available (what the
    fused products and the GGML decoders of ``models.stored`` need)."""
    return jax.default_backend() == "cpu" and available()


def unavailable_reason() -> str | None:
    """Why the CPU kernel is unavailable (None when it is, or before the first ``available``)."""
    return _loaded.get("reason")


# ----------------------------------------------------------------------------- mode

def set_mode(mode: str) -> None:
    """Sets the fused-product mode: "auto" (fuse up to AUTO_MAX_ROWS activation rows), "on"
    (fuse every product that can be), "off" (always dequantize, then dot). Read when a forward
    is traced: call it before jitting (functions compiled earlier keep the old choice)."""
    if mode not in MODES:
        raise ValueError(f"fused mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode[0] = mode


def get_mode() -> str:
    if _mode[0] not in MODES:
        raise ValueError(f"$BATQUANT_FUSED must be one of {', '.join(MODES)}, got {_mode[0]!r}")
    return _mode[0]


@contextlib.contextmanager
def matmul_mode(mode: str):
    """``with matmul_mode("off"): ...`` -- the mode for the forwards traced inside."""
    old = get_mode()
    set_mode(mode)
    try:
        yield
    finally:
        _mode[0] = old


def _fusable(w) -> bool:
    return (isinstance(w, mx.MXArray) and w.fmt == "mxfp4" and w.block_size == BLOCK
            and w.axis == -1 and w.codes.ndim == 2)


def choose(w, rows: int, a_fmt: str | None) -> str | None:
    """The product a linear with packed weight ``w`` uses for ``rows`` activation rows whose
    format is ``a_fmt`` (None = float): "q" (MXFP4 x MXFP4), "f32" (float x MXFP4), or None
    (dequantize, then dot). Decided at trace time from the mode, the backend and the kernel."""
    mode = get_mode()
    if mode == "off" or not _fusable(w) or (mode == "auto" and rows > AUTO_MAX_ROWS):
        return None
    if _kernel()[0] is None:
        return None
    return "q" if a_fmt == "mxfp4" else "f32"


def choose_stored(w, rows: int) -> bool:
    """Whether a linear whose weight ``w`` is kept in a GGML block encoding (a
    ``models.stored.StoredWeight``) multiplies ``rows`` activation rows with ``stored_dot``
    (the mode's rule, as for packed weights; the C++ kernel, so only on the CPU) rather than
    decoding the whole weight first."""
    from batquant_jax.models.stored import KERNEL_KINDS, StoredWeight
    mode = get_mode()
    return (mode != "off" and isinstance(w, StoredWeight) and w.kind in KERNEL_KINDS
            and not (mode == "auto" and rows > AUTO_MAX_ROWS) and cpu_kernels())


def _kernel() -> tuple[str | None, str]:
    """(the fused kernel of this backend, or None; why there is none)."""
    if jax.default_backend() == "cpu":
        if not available():
            return None, f"fused kernel unavailable: {unavailable_reason()}"
        return "the fused C++ MXFP4 kernel", ""
    if PALLAS:
        return "the fused Pallas MXFP4 kernel", ""
    return None, f"no fused kernel for {jax.default_backend()}"


def describe(model) -> str | None:
    """One line on how ``model``'s packed weights are multiplied under the current mode (None
    when it holds no packed weight): what generate prints."""
    from batquant_jax.qlayers import quant_modules
    packed = [q.weight.get_value() for q in quant_modules(model) if q.deployed]
    if not packed:
        return None
    fusable = sum(_fusable(w) for w in packed)
    mode = get_mode()
    if mode == "off":
        return "packed weights: dequantize, then dot (fused mode off)"
    if not fusable:
        return "packed weights: dequantize, then dot (no MXFP4 weight blocked by 32)"
    kernel, why = _kernel()
    if kernel is None:
        return f"packed weights: dequantize, then dot ({why})"
    rows = ("every product" if mode == "on" else f"products of up to {AUTO_MAX_ROWS} rows "
            f"(decode; longer prefills dequantize, then dot)")
    return f"packed weights: {kernel} for {rows}; {fusable} of {len(packed)} linears"


# ----------------------------------------------------------------------------- products

def reference_dot(x, w: mx.MXArray) -> jax.Array:
    """x `[..., K]` @ dequantize(w) `[N, K]`^T -> `[..., N]` float32: the path the fused
    products must equal."""
    return jnp.einsum("...k,nk->...n", jnp.asarray(x, jnp.float32), mx.dequantize(w))


def _check_weight(w, k: int) -> None:
    if not _fusable(w):
        raise ValueError("the fused product takes an MXFP4 weight [N, K] blocked by 32 along K")
    if w.length != k:
        raise ValueError(f"x has {k} features, the weight {w.length}")


def _rows(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def mxfp4_dot(x, w: mx.MXArray) -> jax.Array:
    """Float activations x `[..., K]` times an MXFP4 weight w `[N, K]` -> `[..., N]` float32,
    without dequantizing w (the CPU kernel, or the Pallas kernel off the CPU; ``reference_dot``
    when the CPU kernel is unavailable). Equals ``reference_dot`` to float32 rounding."""
    x = jnp.asarray(x, jnp.float32)
    k = int(x.shape[-1])
    _check_weight(w, k)
    lead, n = x.shape[:-1], int(w.codes.shape[0])
    x2 = x.reshape(_rows(lead), k)
    pad = w.codes.shape[1] * 2 - k
    if pad:
        x2 = jnp.pad(x2, ((0, 0), (0, pad)))
    if jax.default_backend() != "cpu":
        return pallas_dot(x2, w.codes, w.scales).reshape(lead + (n,))
    if not available():
        return reference_dot(x, w)
    y = jax.ffi.ffi_call(_TARGETS["f32"][0], jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                         vmap_method="sequential")(x2, w.codes, w.scales)
    return y.reshape(lead + (n,))


def mxfp4_dot_q(xq: mx.MXArray, w: mx.MXArray) -> jax.Array:
    """MXFP4 activations xq `[..., K]` (an MXArray blocked by 32 along the last axis) times an
    MXFP4 weight w `[N, K]` -> `[..., N]` float32: each block's 32 products summed exactly in
    integers, then scaled by the two E8M0 scales. Equals ``reference_dot(dequantize(xq), w)``
    to float32 rounding."""
    if not (isinstance(xq, mx.MXArray) and xq.fmt == "mxfp4" and xq.block_size == BLOCK
            and xq.axis == -1):
        raise ValueError("mxfp4_dot_q takes MXFP4 activations blocked by 32 along the last axis")
    _check_weight(w, xq.length)
    if xq.codes.shape[-1] != w.codes.shape[1]:
        raise ValueError(f"activation codes {xq.codes.shape} and weight codes {w.codes.shape} "
                         "differ in padded length")
    lead, n = xq.codes.shape[:-1], int(w.codes.shape[0])
    codes = xq.codes.reshape(_rows(lead), xq.codes.shape[-1])
    scales = xq.scales.reshape(_rows(lead), xq.scales.shape[-1])
    if jax.default_backend() != "cpu":
        return pallas_dot(mx.dequantize(mx.MXArray(codes, scales, "mxfp4", -1, codes.shape[1] * 2,
                                                   BLOCK)),
                          w.codes, w.scales).reshape(lead + (n,))
    if not available():
        return reference_dot(mx.dequantize(xq), w)
    y = jax.ffi.ffi_call(_TARGETS["q"][0], jax.ShapeDtypeStruct((codes.shape[0], n), jnp.float32),
                         vmap_method="sequential")(codes, scales, w.codes, w.scales)
    return y.reshape(lead + (n,))


def stored_dot(x, w) -> jax.Array:
    """Float activations x `[..., K]` times a weight w `[N, K]` held in a GGML block encoding
    (a ``models.stored.StoredWeight`` of a block kind) -> `[..., N]` float32, on the CPU kernel:
    each weight row is decoded into a buffer and multiplied there, so a decode step never writes
    the float32 matrix (55 MB for one 8960 x 1536 linear of the 1.5B). Equals
    ``x @ w.dense().T`` to float32 rounding (which it returns off the CPU or without the
    kernel)."""
    from batquant_jax.models.stored import KERNEL_KINDS
    x = jnp.asarray(x, jnp.float32)
    k = int(x.shape[-1])
    if w.shape[-1] != k:
        raise ValueError(f"x has {k} features, the weight {w.shape[-1]}")
    if w.kind not in KERNEL_KINDS or not cpu_kernels():
        return jnp.einsum("...k,nk->...n", x, w.dense())
    lead, n = x.shape[:-1], int(w.shape[0])
    y = jax.ffi.ffi_call(_TARGETS["ggml_dot"][0], jax.ShapeDtypeStruct((_rows(lead), n), jnp.float32),
                         vmap_method="sequential")(x.reshape(_rows(lead), k), w.data,
                                                   kind=np.int32(KERNEL_KINDS[w.kind]))
    return y.reshape(lead + (n,))


# ----------------------------------------------------------------------------- GPU / TPU

PALLAS = False  # set True once the Pallas kernel below is timed on a GPU; until then the
                # non-CPU backends take the dequantize-then-dot path (choose returns None)


def pallas_dot(x, codes, scales, *, interpret: bool = False, block_n: int = 128):
    """x `[M, K]` float32 times the MXFP4 weight (codes `[N, K/2]`, scales `[N, K/32]`) ->
    `[M, N]` float32, as a ``jax.experimental.pallas`` kernel: each program decodes a
    `[block_n, K]` slab of codes with the 16-entry table and the E8M0 scales in registers and
    multiplies it by x; no float weight matrix is written to memory. ``interpret=True`` runs it
    on the CPU (the tests check it against ``reference_dot`` that way)."""
    from jax.experimental import pallas as pl

    m, k = x.shape
    n = codes.shape[0]
    bn = min(block_n, n)
    if n % bn:
        bn = n  # one program per slab needs slabs that tile N
    table = jnp.asarray(mx.E2M1_VALUES)

    def kernel(x_ref, c_ref, s_ref, t_ref, o_ref):
        c = c_ref[...].astype(jnp.int32)  # [bn, K/2]
        lo, hi = c & 0xF, c >> 4
        tab = t_ref[...]
        vals = jnp.stack([jnp.take(tab, lo, mode="clip"), jnp.take(tab, hi, mode="clip")],
                         axis=-1).reshape(bn, k // BLOCK, BLOCK)
        e = s_ref[...].astype(jnp.int32)  # [bn, K/32]
        scale = jnp.where(e == 255, jnp.nan, mx.mul_pow2(jnp.ones(e.shape, jnp.float32), e - 127))
        w = (vals * scale[..., None]).reshape(bn, k)
        o_ref[...] = jnp.dot(x_ref[...], w.T, preferred_element_type=jnp.float32)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
        grid=(n // bn,),
        in_specs=[pl.BlockSpec((m, k), lambda i: (0, 0)),
                  pl.BlockSpec((bn, k // 2), lambda i: (i, 0)),
                  pl.BlockSpec((bn, k // BLOCK), lambda i: (i, 0)),
                  pl.BlockSpec((16,), lambda i: (0,))],
        out_specs=pl.BlockSpec((m, bn), lambda i: (0, i)),
        interpret=interpret,
    )(jnp.asarray(x, jnp.float32), codes, scales, table)


def _main() -> int:
    """``python -m batquant_jax.fused``: builds the CPU kernel (set-up runs it); a missing
    compiler is reported in one line and is not an error (the reference path is used)."""
    if available():
        print(f"C++ CPU kernels (fused MXFP4 products, GGML decoders): {library_path()}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
