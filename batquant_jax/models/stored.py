"""Full-precision weights kept in their source encoding and decoded inside the jitted forward.

A 1.5B model in float32 takes 7.1 GB; the same weights as the GGUF's Q4_K / Q6_K blocks take
1.1 GB, as bfloat16 safetensors 3.1 GB. `StoredWeight` holds a weight the way its file stores
it and `dense()` turns it into float32 with exactly the values a float32 copy would have held
(the GGML block formats decode with the same float32 operations, in the same order, as the
`gguf` package's numpy dequantizer; bfloat16 and float16 widen exactly). The forward decodes
per call, so memory holds the compact form and one layer's float32 weights at a time.

On the CPU the block formats decode in one pass of a C++ kernel (``csrc/ggml_decode.cc``, built
with the fused MXFP4 products, see ``batquant_jax.fused``) that gives the same bits as the XLA
decoders below; those serve the other backends, a machine without a compiler, and
``xla_decoders()`` (a context for comparing the two).

    w = StoredWeight.from_ggml(blocks_uint8, "Q4_K", (rows, cols))   # [rows, row_bytes]
    dense = w.dense()                                                # float32 [rows, cols]

Supported encodings: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

QK_K = 256
# name -> (elements per block, bytes per block)
BLOCK_TYPES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q8_0": (32, 34),
               "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}
FLOAT_TYPES = {"F16": jnp.float16, "BF16": jnp.bfloat16}
KINDS = tuple(BLOCK_TYPES) + tuple(FLOAT_TYPES)
# the C++ decoder's number for each block kind (csrc/ggml_decode.cc's Kind)
KERNEL_KINDS = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q8_0": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}
_use_kernel = [True]


@dataclasses.dataclass(frozen=True)
class StoredWeight:
    """A weight of logical shape ``shape`` (float32 when dense) stored as ``kind``.

    data: uint8 ``[rows, row_bytes]`` for a GGML block kind, or the ``[rows, cols]`` array itself
    for F16 / BF16. A pytree whose one leaf is ``data``.
    """

    data: jax.Array
    kind: str
    shape: tuple

    @classmethod
    def from_ggml(cls, blocks, kind: str, shape) -> "StoredWeight":
        """blocks: uint8 [rows, row_bytes] (row-major GGML rows) of a 2-D weight [rows, cols]."""
        target = cls.abstract(kind, shape)  # checks kind and shape
        raw = np.asarray(blocks) if kind in FLOAT_TYPES else np.asarray(blocks, np.uint8)
        arr = raw.view(target.data.dtype).reshape(target.data.shape)
        return cls(jnp.asarray(arr), kind, target.shape)

    @classmethod
    def abstract(cls, kind: str, shape) -> "StoredWeight":
        """The StoredWeight of ``kind`` and logical ``shape`` with a ShapeDtypeStruct as its
        data (a restore target). ValueError for an unknown kind or a shape it cannot hold."""
        rows, cols = (int(s) for s in shape)
        if kind in FLOAT_TYPES:
            return cls(jax.ShapeDtypeStruct((rows, cols), jnp.dtype(FLOAT_TYPES[kind])), kind,
                       (rows, cols))
        if kind not in BLOCK_TYPES:
            raise ValueError(f"unsupported weight encoding {kind!r}; supported: {', '.join(KINDS)}")
        per, size = BLOCK_TYPES[kind]
        if cols % per:
            raise ValueError(f"{kind} rows of {cols} elements are not whole blocks of {per}")
        return cls(jax.ShapeDtypeStruct((rows, cols // per * size), jnp.dtype(jnp.uint8)), kind,
                   (rows, cols))

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return int(self.data.size * self.data.dtype.itemsize)

    def dense(self, dtype=jnp.float32) -> jax.Array:
        """The weight as ``dtype`` [rows, cols] (decoded in float32, then cast)."""
        return decode_rows(self.data, self.kind, self.shape[-1]).astype(dtype)

    def dense_by_rows(self, rows_per_step: int = 2048) -> jax.Array:
        """``dense()`` (float32, the same bits) decoded ``rows_per_step`` rows at a time into the
        output: the decode's temporaries are one step's, not the whole weight's (three times
        the float32 weight for a 151,936 x 1,536 Q4_K embedding)."""
        return _dense_by_rows(self.data, self.kind, self.shape[-1], max(1, int(rows_per_step)))

    def take_rows(self, idx, dtype=jnp.float32) -> jax.Array:
        """Rows ``idx`` (any int shape) decoded: ``[*idx.shape, cols]`` (an embedding lookup
        that decodes only the rows it reads)."""
        return decode_rows(jnp.take(self.data, idx, axis=0), self.kind, self.shape[-1]).astype(dtype)


jax.tree_util.register_dataclass(StoredWeight, data_fields=["data"], meta_fields=["kind", "shape"])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _dense_by_rows(data: jax.Array, kind: str, cols: int, step: int) -> jax.Array:
    rows = data.shape[0]
    n = rows // step
    out = jnp.zeros((rows, cols), jnp.float32)

    def body(i, out):
        part = jax.lax.dynamic_slice_in_dim(data, i * step, step, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(out, decode_rows(part, kind, cols), i * step, 0)

    if n:
        out = jax.lax.fori_loop(0, n, body, out)
    if n * step < rows:
        out = out.at[n * step:].set(decode_rows(data[n * step:], kind, cols))
    return out


def dense(value, dtype=None):
    """A weight value as an array: a StoredWeight decoded, anything else unchanged."""
    if isinstance(value, StoredWeight):
        return value.dense(jnp.float32 if dtype is None else dtype)
    return value


def dense_after(x: jax.Array, value, dtype) -> tuple[jax.Array, jax.Array]:
    """(x, the weight value as a dtype array) for a layer that multiplies x by it. A
    StoredWeight's decode is tied to x with an optimization barrier: otherwise XLA may hoist
    every layer's decode to the start of the program and hold all the float32 weights at once
    (10 GB for the 1.5B)."""
    if isinstance(value, StoredWeight):
        x, value = jax.lax.optimization_barrier((x, value))
    return x, dense(value, dtype)


# ------------------------------------------------------------------------------------ decoders


def decode_rows(data: jax.Array, kind: str, cols: int) -> jax.Array:
    """data: [..., row_bytes] of ``kind`` -> float32 [..., cols]."""
    if kind in FLOAT_TYPES:
        return data.astype(jnp.float32)
    per, size = BLOCK_TYPES[kind]
    lead = data.shape[:-1]
    blocks = data.reshape(-1, size)
    if _kernel_ready():
        out = jax.ffi.ffi_call("bq_ggml_decode", jax.ShapeDtypeStruct((blocks.shape[0], per),
                                                                      jnp.float32),
                               vmap_method="broadcast_all")(blocks, kind=np.int32(KERNEL_KINDS[kind]))
    else:
        out = _DECODERS[kind](blocks)
    return out.reshape(lead + (cols,))


def _kernel_ready() -> bool:
    """Whether decodes traced now use the C++ kernel (CPU backend, kernel built)."""
    from batquant_jax import fused  # the library that holds the decoder
    return _use_kernel[0] and fused.cpu_kernels()


@contextlib.contextmanager
def xla_decoders():
    """``with xla_decoders(): ...``: decodes traced inside use the XLA decoders even where the
    C++ kernel is available (jitted functions compiled earlier keep their choice)."""
    old = _use_kernel[0]
    _use_kernel[0] = False
    try:
        yield
    finally:
        _use_kernel[0] = old


def _f16(b: jax.Array) -> jax.Array:
    """uint8 [..., 2] (little-endian) -> float32 [..., 1] of the float16 they hold. Built with
    integer ops and a same-width bitcast, exact under constant folding."""
    bits = b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)[..., None]


def _nibbles(qs: jax.Array, group: int) -> jax.Array:
    """qs [n, g * group] -> [n, g * 2 * group]: each group's low nibbles, then its high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group)
    q = jnp.concatenate([q & 0x0F, q >> 4], axis=2)
    return q.reshape(n, -1)


def _q4_0(b):
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:], 16).astype(jnp.int8) - jnp.int8(8)
    return d * q.astype(jnp.float32)


def _q4_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).astype(jnp.float32)
    return (d * q) + m


def _q5_0(b):
    d = _f16(b[:, 0:2])
    qh = (b[:, 2].astype(jnp.uint32) | (b[:, 3].astype(jnp.uint32) << 8)
          | (b[:, 4].astype(jnp.uint32) << 16) | (b[:, 5].astype(jnp.uint32) << 24))
    hbits = ((qh[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & 1).astype(jnp.uint8)
    ql = _nibbles(b[:, 6:], 16)
    q = (ql | (hbits << 4)).astype(jnp.int8) - jnp.int8(16)
    return d * q.astype(jnp.float32)


def _q8_0(b):
    d = _f16(b[:, 0:2])
    x = jax.lax.bitcast_convert_type(b[:, 2:], jnp.int8).astype(jnp.float32)
    return x * d


def _k_scale_min(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 12 packed scale bytes of a Q4_K / Q5_K super-block -> (scales, mins) uint8 [n, 8]."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_scales(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.astype(jnp.float32)).reshape(n, -1, 1)
    dm = (dmin * mn.astype(jnp.float32)).reshape(n, -1, 1)
    return dl, dm


def _q4_k(b):
    n = b.shape[0]
    dl, dm = _k_scales(b)
    q = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).astype(jnp.float32)
    return (dl * q - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    dl, dm = _k_scales(b)
    qh = b[:, 16:48].reshape(n, 1, 1, 32) >> jnp.arange(8, dtype=jnp.uint8).reshape(1, 1, 8, 1)
    qh = (qh & 1).reshape(n, -1, 32)
    ql = _nibbles(b[:, 48:], 32).reshape(n, -1, 32)
    q = (ql | (qh << 4)).astype(jnp.float32)
    return (dl * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = jax.lax.bitcast_convert_type(b[:, 192:208], jnp.int8).astype(jnp.float32)
    d = _f16(b[:, 208:210])
    d = (d * scales).reshape(n, QK_K // 16, 1)
    ql = _nibbles(ql, 64).reshape(n, -1, 32)
    qh = qh.reshape(n, -1, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 3).reshape(n, -1, 32)
    q = (ql | (qh << 4)).astype(jnp.int8) - jnp.int8(32)
    q = q.reshape(n, QK_K // 16, -1).astype(jnp.float32)
    return (d * q).reshape(n, QK_K)


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q8_0": _q8_0,
             "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
