"""MX (OCP Microscaling v1.0) numerics in pure JAX: exact scales, element rounding, packing.

A block is `block_size` (default 32) consecutive elements along one axis. It stores one shared
E8M0 exponent `e` (byte `e + 127`, 0xFF = NaN) and elements `q = round(x / 2^e)` on the element
grid (E2M1 for MXFP4: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6), saturating at +-max. The rules are
those of the repository's docs/MXFP4.md (scale modes floor | ceil | even | rceil, ties to even or away).

Everything is computed from float32 bit patterns (no log2, no gathers), with exact power-of-two
scaling, so results are bit-exact on every backend. Public surface:

  FORMATS, MXFormat, SCALE_MODES, ROUNDINGS
  shared_exponent(amax, fmt, scale_mode) -> int32 e      scale_bytes(e) -> uint8
  round_to_grid(v, fmt, rounding)                        mul_pow2(x, e) -> x * 2^e exactly
  fake_quant(x, fmt, *, axis, block_size, ...)           (straight-through derivative)
  quantize(x, fmt, ...) -> MXArray,  quantize_with_exponents(x, e, ...) -> MXArray
  dequantize(mx, dtype) -> array                         pack_nibbles / unpack_nibbles
  MXArray.to_jax() / MXArray.from_jax(...)               jnp.float4_e2m1fn + float8_e8m0fnu
  check_blocks(shape, fmt, axis, block_size, ...)        the argument checks, for reuse

Example:
  >>> x = jnp.array([[7.0, 2.5, -0.2] + [0.0] * 29])   # [1, 32]: one block, amax 7 -> e = 0
  >>> q = quantize(x)         # codes 7 (6, saturated), 4 (2, tie to even), 0x8 (-0)
  >>> dequantize(q)[0, :3].tolist()
  [6.0, 2.0, -0.0]

Saturation: the shared exponent never exceeds `emax(dtype) - emax_elem` (125 for MXFP4 on
float32 / bfloat16 input, 13 on float16), the largest that the floor rule can give. ceil, even and
rceil could otherwise pick a scale whose grid values overflow the input's float type near its
maximum; capped, finite inputs always quantize to finite values (they saturate at the grid max).
An empty input gives an empty result.

Note: XLA on CPU flushes float32 subnormals (|x| < 2^-126) in arithmetic. Codes and scale bytes
stay exact for subnormal inputs (they are read from the bits); dequantized values that are
themselves subnormal become 0 there, identically in `fake_quant` and `dequantize`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class MXFormat:
    """An MX element format: sign + `ebits` exponent + `mbits` mantissa bits (no inf/NaN codes).

    `emax_elem` / `emin_elem` are the unbiased exponents of the largest / smallest normal
    element; `max_value` the largest magnitude; `bits` the code width (4-bit codes are packed).
    """

    name: str
    ebits: int
    mbits: int
    emax_elem: int
    emin_elem: int
    max_value: float
    bits: int

    @property
    def max_code(self) -> int:
        """Magnitude code of `max_value` (E2M1: 7, E4M3: 0x7E)."""
        m, ex = np.frexp(self.max_value)
        frac = int(round((2.0 * m - 1.0) * 2**self.mbits))
        return ((int(ex) - 1 - self.emin_elem + 1) << self.mbits) + frac

    @property
    def packed(self) -> bool:
        """True when two codes share one byte (4-bit formats)."""
        return self.bits == 4


FORMATS: dict[str, MXFormat] = {
    "mxfp4": MXFormat("mxfp4", 2, 1, 2, 0, 6.0, 4),  # E2M1
    "mxfp6": MXFormat("mxfp6", 2, 3, 2, 0, 7.5, 6),  # E2M3 (codes stored one per byte)
    "mxfp6_e3m2": MXFormat("mxfp6_e3m2", 3, 2, 4, -2, 28.0, 6),
    "mxfp8": MXFormat("mxfp8", 4, 3, 8, -6, 448.0, 8),  # E4M3 (float8_e4m3fn bit patterns)
    "mxfp8_e5m2": MXFormat("mxfp8_e5m2", 5, 2, 15, -14, 57344.0, 8),
}
SCALE_MODES = ("floor", "ceil", "even", "rceil")
# JAX's element types of the formats that have one (MXArray.to_jax / from_jax)
_JAX_ELEMENTS = {"mxfp4": jnp.float4_e2m1fn, "mxfp8": jnp.float8_e4m3fn,
                 "mxfp8_e5m2": jnp.float8_e5m2}
ROUNDINGS = ("even", "away")
NAN_EXPONENT = 128  # shared_exponent's value for a non-finite block; scale_bytes maps it to 0xFF

_ABS = np.uint32(0x7FFFFFFF)
_SIGN = np.uint32(0x80000000)
_EXP_INF = np.uint32(0x7F800000)
_MANT = np.uint32(0x007FFFFF)


def _format(fmt: str) -> MXFormat:
    if fmt not in FORMATS:
        raise ValueError(f"unknown MX format {fmt!r}; valid: {sorted(FORMATS)}")
    return FORMATS[fmt]


def _choice(value: str, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {list(valid)}")
    return value


def _bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, jnp.uint32)


def _pow2(k: jax.Array) -> jax.Array:
    """2^k as float32 built from bits; k: int32, valid for -126 <= k <= 127."""
    return lax.bitcast_convert_type((k + 127).astype(jnp.uint32) << 23, jnp.float32)


def mul_pow2(x: jax.Array, e: jax.Array) -> jax.Array:
    """x * 2^e exactly (unless the result is outside float32), for int e in [-252, 254].

    The exponent is split in two halves so that no factor is a subnormal or overflows.
    x: float32 [...]; e: int, broadcastable to x.
    """
    e = jnp.asarray(e, jnp.int32)
    half = e >> 1
    return (x * _pow2(half)) * _pow2(e - half)


def _dtype_emax(dtype) -> int:
    """Unbiased exponent of the largest finite value of a float dtype (float32: 127)."""
    return 15 if jnp.dtype(dtype) == jnp.dtype(jnp.float16) else 127


def _exponent_from_bits(abits: jax.Array, f: MXFormat, scale_mode: str,
                        dtype_emax: int = 127) -> jax.Array:
    """Unbiased E8M0 exponent from the bits of |amax| (uint32); NAN_EXPONENT if non-finite.

    Capped at dtype_emax - emax_elem (the floor rule's largest) so that grid values times the
    scale stay finite in a float type whose largest exponent is dtype_emax.
    """
    biased = (abits >> 23).astype(jnp.int32)
    mant = abits & _MANT
    e = biased - 127 - f.emax_elem  # floor(log2 amax) - emax_elem; zero/subnormal clamp below
    if scale_mode == "ceil":
        e = e + (mant != 0)
    elif scale_mode == "even":  # significand rounded to mbits carries into the exponent
        e = e + (mant >= np.uint32(((2 << f.mbits) - 1) << (22 - f.mbits)))
    elif scale_mode == "rceil":  # ceil(log2(amax / max_value)): up one iff significand > max's
        max_mant = np.float32(f.max_value).view(np.uint32) & _MANT
        e = e + (mant > max_mant)
    e = jnp.clip(e, -127, min(127, dtype_emax - f.emax_elem))
    return jnp.where(abits >= _EXP_INF, NAN_EXPONENT, e)


def shared_exponent(amax: jax.Array, fmt: str = "mxfp4", scale_mode: str = "floor") -> jax.Array:
    """Unbiased shared exponent e per block from the block absmax (read from the float's bits).

    amax: float [...] (sign ignored). Returns int32 [...] in [-127, emax(amax.dtype) - emax_elem]
    (125 for MXFP4 on float32: see "Saturation" above); amax == 0 (or subnormal) gives -127;
    NaN/Inf amax gives NAN_EXPONENT (128), which `scale_bytes` maps to 0xFF and every consumer
    in this module treats as a NaN block.
    """
    f = _format(fmt)
    _choice(scale_mode, SCALE_MODES, "scale_mode")
    a = jnp.asarray(amax)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"amax must be a float array, got {a.dtype}")
    return _exponent_from_bits(_bits(a.astype(jnp.float32)) & _ABS, f, scale_mode,
                               _dtype_emax(a.dtype))


def scale_bytes(e: jax.Array) -> jax.Array:
    """E8M0 bytes (bias 127) from unbiased exponents e in [-127, 128]; 128 -> 0xFF (NaN)."""
    return (jnp.asarray(e, jnp.int32) + 127).astype(jnp.uint8)


def _round_parts(a: jax.Array, f: MXFormat, rounding: str):
    """Round magnitudes a >= 0 (float32) to the element grid, before saturation.

    Returns (ev, r, step): the element exponent (clamped to [emin, emax + 1]), the rounded
    integer significand r (float, 0 <= r <= 2^(mbits+1) for in-range a) and step = 2^(ev - mbits),
    so the grid value is r * step. Subnormal elements use ev = emin.
    """
    ev = jnp.clip((_bits(a) >> 23).astype(jnp.int32) - 127, f.emin_elem, f.emax_elem + 1)
    y = a * _pow2(f.mbits - ev)  # exact power-of-two rescale to [0, 2^(mbits+1))
    method = lax.RoundingMethod.TO_NEAREST_EVEN if rounding == "even" else lax.RoundingMethod.AWAY_FROM_ZERO
    return ev, lax.round(y, method), _pow2(ev - f.mbits)


def round_to_grid(v: jax.Array, fmt: str = "mxfp4", rounding: str = "even") -> jax.Array:
    """Round already-scaled values to the element grid, saturating at +-max_value.

    v: float [...]. Returns the same shape and dtype (computed in float32). Handles the element
    format's subnormals; +-Inf saturates to +-max, NaN stays NaN, the sign of zero is kept.
    """
    f = _format(fmt)
    _choice(rounding, ROUNDINGS, "rounding")
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        raise ValueError(f"v must be a float array, got {v.dtype}")
    v32 = v.astype(jnp.float32)
    _, r, step = _round_parts(jnp.abs(v32), f, rounding)
    return jnp.copysign(jnp.minimum(r * step, f.max_value), v32).astype(v.dtype)


# ----------------------------------------------------------------------------- blocks


def check_blocks(shape, fmt, axis, block_size, scale_mode, rounding, pad):
    """Validates the arguments of quantize / fake_quant for an array of `shape` (ValueError
    naming the valid choices); returns (format, axis >= 0, length along axis, padded length)."""
    f = _format(fmt)
    _choice(scale_mode, SCALE_MODES, "scale_mode")
    _choice(rounding, ROUNDINGS, "rounding")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if f.packed and block_size % 2:
        raise ValueError(f"{fmt} packs two codes per byte: block_size must be even, got {block_size}")
    ndim = len(shape)
    if not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis!r} is out of range for an array of shape {tuple(shape)}")
    axis %= ndim
    n = shape[axis]
    n_pad = -(-n // block_size) * block_size
    if n_pad != n and not pad:
        raise ValueError(
            f"axis {axis} has length {n}, not a multiple of block_size {block_size}; "
            "pass pad=True to zero-pad the last block"
        )
    return f, axis, n, n_pad


def _to_blocks(x: jax.Array, axis: int, block_size: int, n_pad: int) -> jax.Array:
    """x: [*pre, n, *post] (n on `axis`) -> float32 [*pre, n_pad / block_size, block_size, *post].

    A reshape (plus zero padding), never a transpose; the elements of a block lie on axis + 1.
    """
    x = x.astype(jnp.float32)
    if n_pad != x.shape[axis]:
        x = jnp.pad(x, [(0, n_pad - x.shape[axis]) if i == axis else (0, 0) for i in range(x.ndim)])
    return x.reshape(x.shape[:axis] + (n_pad // block_size, block_size) + x.shape[axis + 1 :])


def _from_blocks(y: jax.Array, axis: int, n: int) -> jax.Array:
    """Inverse of `_to_blocks`: [*pre, nb, bs, *post] -> [*pre, n, *post], padding removed."""
    y = y.reshape(y.shape[:axis] + (-1,) + y.shape[axis + 2 :])
    return lax.slice_in_dim(y, 0, n, axis=axis) if y.shape[axis] != n else y


def _block_exponents(xbits: jax.Array, f: MXFormat, scale_mode: str, axis: int,
                     dtype_emax: int) -> jax.Array:
    """Shared exponents of blocks: xbits uint32 [*pre, nb, bs, *post] -> int32 [*pre, nb, 1, *post]."""
    return _exponent_from_bits(jnp.max(xbits & _ABS, axis=axis + 1, keepdims=True), f, scale_mode,
                               dtype_emax)


def _scaled_magnitudes(xbits: jax.Array, e: jax.Array) -> jax.Array:
    """|x| * 2^-e per element, exact also for subnormal x (which XLA CPU would flush).

    xbits: uint32 bits of x; e: int32 in [-127, 126], broadcastable to xbits (finite blocks).
    """
    a = lax.bitcast_convert_type(xbits & _ABS, jnp.float32) * _pow2(-e)
    # subnormal x = mant * 2^-149; the factor 2^(-149 - e) underflows to 0 when e > -23,
    # where such values round to zero anyway.
    k = -149 - e
    sub = (xbits & _MANT).astype(jnp.float32) * jnp.where(k >= -126, _pow2(jnp.maximum(k, -126)), 0.0)
    return jnp.where((xbits & _EXP_INF) == 0, sub, a)


def _block_scale(e: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Factors (s1, s2) with s1 * s2 = 2^e, both normal floats; NaN for NAN_EXPONENT."""
    s1 = jnp.where(e < -126, np.float32(0.5), np.float32(1.0))
    s2 = jnp.where(e == NAN_EXPONENT, np.float32(np.nan), _pow2(jnp.clip(e, -126, 127)))
    return s1, s2


def _fq_blocks(xb: jax.Array, f: MXFormat, scale_mode: str, rounding: str, axis: int,
               dtype_emax: int) -> jax.Array:
    """Fake-quantize float32 blocks [*pre, nb, bs, *post] (see `_to_blocks`); same shape out."""
    xbits = _bits(xb)
    e = _block_exponents(xbits, f, scale_mode, axis, dtype_emax)
    a = _scaled_magnitudes(xbits, jnp.minimum(e, 126))
    _, r, step = _round_parts(a, f, rounding)
    s1, s2 = _block_scale(e)
    q = (jnp.minimum(r * step, f.max_value) * s1) * s2
    return lax.bitcast_convert_type(_bits(q) | (xbits & _SIGN), jnp.float32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5, 6, 7))
def _fake_quant(x, fmt, axis, block_size, scale_mode, rounding, n, n_pad):
    xb = _to_blocks(x, axis, block_size, n_pad)
    y = _fq_blocks(xb, FORMATS[fmt], scale_mode, rounding, axis, _dtype_emax(x.dtype))
    return _from_blocks(y, axis, n).astype(x.dtype)


@_fake_quant.defjvp
def _fake_quant_jvp(*args):
    # straight-through: d fake_quant(x) / dx = identity. A linear tangent rule, so forward mode
    # (jvp, jacfwd) and reverse mode (grad, the transpose of this rule) both work.
    *static, (x,), (x_dot,) = args
    return _fake_quant(x, *static), x_dot


_fake_quant_jit = jax.jit(_fake_quant, static_argnums=(1, 2, 3, 4, 5, 6, 7))


def _float_input(x, what="x") -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what} must be a float array (float32/bfloat16/float16), got {x.dtype}")
    return x


def fake_quant(
    x, fmt="mxfp4", *, axis=-1, block_size=32, scale_mode="floor", rounding="even", pad=False
) -> jax.Array:
    """Quantize-dequantize x in MX blocks along `axis`, with a straight-through gradient.

    x: float [..., n, ...] (float32, bfloat16 or float16; computed in float32), n on `axis`,
    n % block_size == 0 unless pad=True (zero padding, removed after). Returns the same shape
    and dtype, equal to dequantize(quantize(x, ...)) bit for bit; a block holding a NaN or Inf
    becomes all NaN. The derivative w.r.t. x is the identity (straight-through), in reverse
    and forward mode. Works under jit, vmap, grad, jvp and jacfwd.
    """
    x = _float_input(x)
    _, axis, n, n_pad = check_blocks(x.shape, fmt, axis, block_size, scale_mode, rounding, pad)
    if x.size == 0:
        return x
    return _fake_quant_jit(x, fmt, axis, block_size, scale_mode, rounding, n, n_pad)


# ----------------------------------------------------------------------------- storage


@dataclasses.dataclass(frozen=True)
class MXArray:
    """A quantized array: packed element codes and E8M0 scale bytes, block axis last.

    codes: uint8 [..., n_pad / 2] for 4-bit formats (element 2j in the low nibble, 2j+1 in the
    high one) or [..., n_pad] otherwise; scales: uint8 [..., n_pad / block_size] (bias 127,
    0xFF = NaN). `...` are the other axes of the logical `shape` in order; `axis` (negative,
    counted from the end) is where the blocked axis sits in `shape`; `length` is its logical
    length and n_pad that rounded up to block_size (zero padding).

    A pytree (codes, scales are leaves), so it passes through jit, vmap and checkpointing. The
    static metadata holds nothing that a batch axis changes: `shape` is derived from the leaves,
    so vmap (leading batch axis, the default in_axes / out_axes 0) maps over MXArrays:
    `dequantize(jax.vmap(quantize)(x))` has x's shape, and `jax.vmap(dequantize)` works.
    """

    codes: jax.Array
    scales: jax.Array
    fmt: str
    axis: int
    length: int
    block_size: int

    def __post_init__(self):
        if not isinstance(self.axis, int) or self.axis >= 0:
            raise ValueError(f"MXArray.axis counts from the end (negative), got {self.axis!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape: the leaves' leading axes with `length` inserted at `axis`."""
        rest = tuple(self.scales.shape[:-1])
        pos = len(rest) + 1 + self.axis
        return rest[:pos] + (self.length,) + rest[pos:]

    @property
    def ndim(self) -> int:
        return len(self.scales.shape)

    @property
    def dtype(self) -> np.dtype:
        """The element type as JAX names it (float4_e2m1fn for mxfp4, float8_e4m3fn for mxfp8,
        float8_e5m2 for mxfp8_e5m2; uint8 for the 6-bit formats, which JAX lacks)."""
        return np.dtype(_JAX_ELEMENTS.get(self.fmt, jnp.uint8))

    def to_jax(self) -> tuple[jax.Array, jax.Array]:
        """(elements, scales) as JAX's own MX operand types, blocked axis last: elements
        [..., n_pad] of ``self.dtype`` (jnp.float4_e2m1fn for mxfp4), scales [..., n_pad /
        block_size] jnp.float8_e8m0fnu -- the layout ``jax.nn.scaled_matmul`` takes. Exact:
        the same bits, unpacked to one element per array entry.

        >>> q = quantize(jnp.linspace(-6.0, 6.0, 64).reshape(2, 32))
        >>> e, s = q.to_jax()
        >>> (e.dtype, e.shape, s.dtype, s.shape)
        (dtype(float4_e2m1fn), (2, 32), dtype(float8_e8m0fnu), (2, 1))
        >>> bool(jnp.all(MXArray.from_jax(e, s).codes == q.codes))
        True
        """
        if self.fmt not in _JAX_ELEMENTS:
            raise ValueError(f"JAX has no element type for {self.fmt!r}; "
                             f"valid: {', '.join(_JAX_ELEMENTS)}")
        el = lax.bitcast_convert_type(self.codes, _JAX_ELEMENTS[self.fmt])
        per_byte = 2 if FORMATS[self.fmt].packed else 1  # an explicit size: a 0-row array too
        el = el.reshape(self.codes.shape[:-1] + (self.codes.shape[-1] * per_byte,))
        return el, lax.bitcast_convert_type(self.scales, jnp.float8_e8m0fnu)

    @classmethod
    def from_jax(cls, elements: jax.Array, scales: jax.Array, *, axis: int = -1,
                 length: int | None = None) -> "MXArray":
        """The MXArray of JAX MX operands (the inverse of ``to_jax``): elements [..., n_pad]
        float4_e2m1fn / float8_e4m3fn / float8_e5m2, scales [..., n_pad / block] float8_e8m0fnu,
        blocked axis last; ``axis`` (negative) places it in the logical shape, ``length`` is
        its logical length (default n_pad)."""
        fmt = {np.dtype(v): k for k, v in _JAX_ELEMENTS.items()}.get(np.dtype(elements.dtype))
        if fmt is None or np.dtype(scales.dtype) != np.dtype(jnp.float8_e8m0fnu):
            raise ValueError(f"from_jax takes elements of {', '.join(map(str, _JAX_ELEMENTS.values()))}"
                             f" and float8_e8m0fnu scales, got {elements.dtype} and {scales.dtype}")
        n_pad, nb = int(elements.shape[-1]), int(scales.shape[-1])
        if nb < 1 or n_pad % nb or tuple(elements.shape[:-1]) != tuple(scales.shape[:-1]):
            raise ValueError(f"elements {tuple(elements.shape)} and scales {tuple(scales.shape)} "
                             "do not form whole blocks along the last axis")
        if FORMATS[fmt].packed:
            codes = lax.bitcast_convert_type(
                elements.reshape(elements.shape[:-1] + (n_pad // 2, 2)), jnp.uint8)
        else:
            codes = lax.bitcast_convert_type(elements, jnp.uint8)
        return cls(codes, lax.bitcast_convert_type(scales, jnp.uint8), fmt, axis,
                   n_pad if length is None else int(length), n_pad // nb)

    @property
    def nbytes(self) -> int:
        """Bytes of the leaves (4096 x 4096 MXFP4: 4096*4096/2 + 4096*128)."""
        return int(self.codes.size * self.codes.itemsize + self.scales.size * self.scales.itemsize)

    @property
    def exponents(self) -> jax.Array:
        """Unbiased shared exponents, int32 [..., n_pad / block_size] (128 = NaN block)."""
        return self.scales.astype(jnp.int32) - 127


jax.tree_util.register_dataclass(
    MXArray, data_fields=["codes", "scales"], meta_fields=["fmt", "axis", "length", "block_size"]
)


# The 16 E2M1 values by code (sign bit 3): decoding through this table with integer nibble ops is
# exact under every compilation; XLA:CPU (jaxlib 0.10.2) constant-folds a bitcast of uint8 to
# float4_e2m1fn wrongly when the codes are a compile-time constant (a closed-over model).
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """uint8 codes [..., n] (values < 16, n even) -> uint8 [..., n/2]; element 2j in the low nibble."""
    codes = jnp.asarray(codes)
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {codes.shape}")
    pairs = codes.astype(jnp.uint32).reshape(codes.shape[:-1] + (-1, 2))  # 32-bit ops vectorize best
    return ((pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)).astype(jnp.uint8)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """uint8 [..., m] -> uint8 codes [..., 2m] (inverse of `pack_nibbles`)."""
    packed = jnp.asarray(packed, jnp.uint8)
    return jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))


def _encode_blocks(xb: jax.Array, e: jax.Array, f: MXFormat, rounding: str, from_amax: bool) -> jax.Array:
    """Element codes (int32, same shape as xb, sign at bit `bits - 1`) of float32 blocks xb.

    e: int32 shared exponents broadcastable to xb; from_amax: e came from the blocks' absmax,
    so finite e lie in [-127, 126]. NaN blocks (e == NAN_EXPONENT) get code 0.
    """
    xbits = _bits(xb)
    finite = e != NAN_EXPONENT
    ec = jnp.where(finite, e, 0)
    a = _scaled_magnitudes(xbits, jnp.minimum(ec, 126))
    if not from_amax:  # e = 127 needs 2^-127, a subnormal factor: split the scaling
        a = jnp.where(ec > 126, mul_pow2(lax.bitcast_convert_type(xbits & _ABS, jnp.float32), -ec), a)
    ev, r, _ = _round_parts(a, f, rounding)
    r = jnp.minimum(r, np.float32(2 << f.mbits)).astype(jnp.int32)
    mag = jnp.minimum(((ev - f.emin_elem) << f.mbits) + r, f.max_code)
    sign = (xbits >> 31).astype(jnp.int32) << (f.bits - 1)
    return jnp.where(finite, mag | sign, 0)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _quantize_jit(x, e, fmt, axis, block_size, scale_mode, rounding, n, n_pad):
    f = FORMATS[fmt]
    xb = _to_blocks(x, axis, block_size, n_pad)
    from_amax = e is None
    if from_amax:
        e = _block_exponents(_bits(xb), f, scale_mode, axis, _dtype_emax(x.dtype))
    else:  # block-last layout [*pre, *post, nb] -> [*pre, nb, 1, *post]
        e = jnp.expand_dims(jnp.moveaxis(e, -1, axis), axis + 1)
    codes = _encode_blocks(xb, e, f, rounding, from_amax)
    codes = jnp.moveaxis(codes, (axis, axis + 1), (-2, -1))  # no-op for the last axis
    scales = scale_bytes(jnp.moveaxis(jnp.squeeze(e, axis + 1), axis, -1))
    return _code_bytes(codes, 4 if f.packed else 8), scales


def _code_bytes(codes: jax.Array, width: int) -> jax.Array:
    """int32 codes [..., nb, bs] -> uint8 [..., nb * bs * width / 8], `width`-bit codes packed
    little-endian (4-bit: element 2j in the low nibble of byte j).

    Codes are summed into uint32 words, then split into bytes (JAX backends are little-endian);
    written as element-wise shifts and a reshape, XLA CPU fuses the packing into a scalar loop
    about 7x slower.
    """
    per_word = 32 // width
    if codes.shape[-1] % per_word:
        packed = pack_nibbles(codes) if width == 4 else codes.astype(jnp.uint8)
        return packed.reshape(packed.shape[:-2] + (-1,))
    c = codes.astype(jnp.uint32).reshape(codes.shape[:-1] + (-1, per_word))
    shifts = (width * np.arange(per_word)).astype(np.uint32)
    words = jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32)  # disjoint bits: sum == or
    return lax.bitcast_convert_type(words, jnp.uint8).reshape(codes.shape[:-2] + (-1,))


def _empty(shape, f: MXFormat, axis: int, n_pad: int, block_size: int) -> MXArray:
    """The MXArray of an array with no elements (its leaves have the layout's zero-size shapes)."""
    rest = tuple(s for i, s in enumerate(shape) if i != axis)
    codes = jnp.zeros(rest + (n_pad // 2 if f.packed else n_pad,), jnp.uint8)
    scales = jnp.zeros(rest + (n_pad // block_size,), jnp.uint8)
    return MXArray(codes, scales, f.name, axis - len(shape), shape[axis], block_size)


def quantize(
    x, fmt="mxfp4", *, axis=-1, block_size=32, scale_mode="floor", rounding="even", pad=False
) -> MXArray:
    """Quantize x to an MXArray (blocks of `block_size` along `axis`).

    x: float [..., n, ...], n % block_size == 0 unless pad=True. Element codes: E2M1 = sign bit 3
    + magnitude index 0..7 (the sign of the input element, so -0.2 -> 0x8); 8-bit formats use
    the float8 bit patterns. A block holding NaN/Inf gets scale byte 0xFF and zero codes.
    """
    x = _float_input(x)
    f, axis, n, n_pad = check_blocks(x.shape, fmt, axis, block_size, scale_mode, rounding, pad)
    if x.size == 0:
        return _empty(x.shape, f, axis, n_pad, block_size)
    codes, scales = _quantize_jit(x, None, fmt, axis, block_size, scale_mode, rounding, n, n_pad)
    return MXArray(codes, scales, fmt, axis - x.ndim, n, block_size)


def quantize_with_exponents(
    x, exponents, fmt="mxfp4", *, axis=-1, block_size=32, rounding="even", pad=False
) -> MXArray:
    """Quantize x with given shared exponents (e.g. fixed before GPTQ) instead of its absmax.

    x: float [..., n, ...]; exponents: int [..., n_pad / block_size] in block-last layout (the
    `MXArray.exponents` layout), values in [-127, 127] or 128 (NaN block). Elements saturate.
    """
    x = _float_input(x)
    _, axis, n, n_pad = check_blocks(x.shape, fmt, axis, block_size, "floor", rounding, pad)
    want = tuple(s for i, s in enumerate(x.shape) if i != axis) + (n_pad // block_size,)
    e = jnp.asarray(exponents)
    if tuple(e.shape) != want:
        raise ValueError(
            f"exponents must have shape {want} for x {tuple(x.shape)} on axis {axis}, got {tuple(e.shape)}"
        )
    if x.size == 0:
        return _empty(x.shape, FORMATS[fmt], axis, n_pad, block_size)
    e = e.astype(jnp.int32)
    codes, scales = _quantize_jit(x, e, fmt, axis, block_size, "floor", rounding, n, n_pad)
    return MXArray(codes, scales, fmt, axis - x.ndim, n, block_size)


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize_jit(mx: MXArray, dtype) -> jax.Array:
    f = FORMATS[mx.fmt]
    if mx.fmt in _JAX_ELEMENTS:  # a table (E2M1) or JAX's float8 types decode the codes exactly
        if f.packed:  # never bitcast uint8 -> float4_e2m1fn: XLA:CPU constant-folds it wrongly
            el = jnp.take(E2M1_VALUES, unpack_nibbles(mx.codes).astype(jnp.int32), mode="clip")
        else:
            el = lax.bitcast_convert_type(mx.codes, _JAX_ELEMENTS[mx.fmt]).astype(jnp.float32)
        el = el.reshape(mx.codes.shape[:-1] + (-1, mx.block_size))
        s1, s2 = _block_scale(mx.scales.astype(jnp.int32)[..., None] - 127)
        y = ((el * s1) * s2).reshape(el.shape[:-2] + (-1,))[..., : mx.length]
        return jnp.moveaxis(y, -1, mx.axis).astype(dtype)
    codes = unpack_nibbles(mx.codes) if f.packed else mx.codes
    codes = codes.reshape(codes.shape[:-1] + (-1, mx.block_size)).astype(jnp.int32)
    mag = codes & ((1 << (f.bits - 1)) - 1)
    eb = mag >> f.mbits  # 0 for element subnormals
    frac = mag & ((1 << f.mbits) - 1)
    t = jnp.where(eb == 0, frac, frac + (1 << f.mbits)).astype(jnp.float32)
    q = t * _pow2(jnp.maximum(eb, 1) - 1 + f.emin_elem - f.mbits)
    if f.max_code < (1 << (f.bits - 1)) - 1:  # float8 codes above max are NaN (or Inf)
        q = jnp.where(mag > f.max_code, np.float32(np.nan), q)
    s1, s2 = _block_scale(mx.scales.astype(jnp.int32)[..., None] - 127)
    sign = (codes >> (f.bits - 1)).astype(jnp.uint32) << 31
    y = lax.bitcast_convert_type(_bits((q * s1) * s2) | sign, jnp.float32)
    y = y.reshape(y.shape[:-2] + (-1,))[..., : mx.length]
    return jnp.moveaxis(y, -1, mx.axis).astype(dtype)


def dequantize(mx: MXArray, dtype=jnp.float32) -> jax.Array:
    """Values of an MXArray in its logical shape, as `dtype` (NaN blocks are all NaN)."""
    if not isinstance(mx, MXArray):
        raise ValueError(f"dequantize expects an MXArray, got {type(mx).__name__}")
    if int(np.prod(mx.shape)) == 0:
        return jnp.zeros(mx.shape, dtype)
    return _dequantize_jit(mx, jnp.dtype(dtype))
