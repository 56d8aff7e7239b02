"""MX-aware GPTQ and round-to-nearest (RTN) weight quantization.

A linear layer computes ``y = x @ W.T`` with ``W: [out, d]``; MX blocks run along ``d`` (the
reduction axis), ``block_size`` consecutive input features per block, one shared E8M0 exponent per
(row, block).

* ``rtn_quantize``: every block scaled from its own absmax and rounded to the element grid.
* ``gptq_quantize``: GPTQ (Frantar et al., 2022) with "static groups": the exponent of every
  (row, block) is fixed from the input weight before the column sweep, then the columns are
  quantized one by one with that fixed scale, ``q = round_to_grid(w / 2^e) * 2^e``, and each
  column's rounding error is spread onto the not yet quantized columns through the upper Cholesky
  factor of ``H^-1``. Columns are processed in groups of ``block_size`` aligned with the MX blocks
  (lazy batch updates: sequential updates inside a group, one matmul to the later columns after it).
* ``hessian_init`` / ``hessian_update``: the layer-input Gram matrix ``H = sum_tokens x^T x``
  (a sum, not a mean, so per-device partial sums can be all-reduced), in float32 at HIGHEST
  precision; ``qlayers.QuantLinear`` records its Hessian with ``hessian_update`` too.

Example::

    H = hessian_init(576)
    for x in batches:                         # x: [batch, seq, 576]
        H = hessian_update(H, x)
    res = gptq_quantize(W, H)                 # W: [out, 576]
    packed = res.to_mxarray()                 # mx.MXArray, dequantizes to res.weight exactly
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from batquant_jax import mx

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Hessian accumulation
# --------------------------------------------------------------------------------------------
def hessian_init(d: int) -> jax.Array:
    """A zero Hessian accumulator, float32 ``[d, d]``."""
    if not isinstance(d, (int, np.integer)) or d <= 0:
        raise ValueError(f"hessian_init: d must be a positive int, got {d!r}")
    return jnp.zeros((int(d), int(d)), jnp.float32)


@jax.jit
def hessian_update(H: jax.Array, x: jax.Array) -> jax.Array:
    """Returns ``H + X^T X`` with ``X = x.reshape(-1, d)`` in float32.

    H: [d, d]; x: [..., d] (any leading shape: tokens, batch x seq, ...).
    """
    d = H.shape[0]
    if H.ndim != 2 or H.shape[1] != d:
        raise ValueError(f"hessian_update: H must be square [d, d], got {H.shape}")
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"hessian_update: x must be [..., {d}], got {x.shape}")
    X = x.reshape(-1, d).astype(jnp.float32)
    return H.astype(jnp.float32) + jnp.matmul(X.T, X, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["weight", "exponents"],
    meta_fields=["fmt", "block_size", "method", "damp", "cholesky_retries"],
)
@dataclasses.dataclass(frozen=True)
class WeightQuantResult:
    """A quantized weight.

    weight:    float32 [out, d], dequantized; every value is ``g * 2^e`` with ``g`` on the element
               grid of ``fmt`` and ``e`` the exponent of its (row, block).
    exponents: int32 [out, d // block_size], unbiased E8M0 exponents in [-127, 127]
               (RTN only: ``mx.NAN_EXPONENT`` = 128 for a block holding NaN/Inf).
    fmt, block_size: the MX format name and block length along d.
    method:    "gptq" or "rtn".
    damp:      relative damping actually used (after Cholesky retries); 0.0 for RTN.
    cholesky_retries: how many times the damping was raised 10x because Cholesky failed.
    """

    weight: jax.Array
    exponents: jax.Array
    fmt: str
    block_size: int
    method: str
    damp: float = 0.0
    cholesky_retries: int = 0

    def to_mxarray(self):
        """The packed ``mx.MXArray`` built from ``weight`` and the fixed ``exponents``.

        ``mx.dequantize(result.to_mxarray())`` equals ``result.weight`` bit for bit.
        """
        return _to_mxarray(self.weight, self.exponents, fmt=self.fmt, block_size=self.block_size)


# --------------------------------------------------------------------------------------------
# Numerics shared by RTN and GPTQ
# --------------------------------------------------------------------------------------------
def _quant_fixed(w: jax.Array, e: jax.Array, fmt: str, rounding: str) -> jax.Array:
    """Quantize ``w`` with fixed exponents ``e`` (broadcastable): ``round_to_grid(w/2^e) * 2^e``.

    Scaling by exact powers of two (``mx.mul_pow2``); values beyond the grid saturate.
    """
    return mx.mul_pow2(mx.round_to_grid(mx.mul_pow2(w, -e), fmt, rounding), e)


def _check_common(W, fmt: str, block_size: int, scale_mode: str, rounding: str) -> None:
    """W must be 2-D [out, d] with d a multiple of block_size; the rest is mx's own check."""
    if jnp.ndim(W) != 2:
        raise ValueError(f"W must be 2-D [out, d], got shape {jnp.shape(W)}")
    if isinstance(block_size, np.integer):
        block_size = int(block_size)
    _, _, d, d_pad = mx.check_blocks(jnp.shape(W), fmt, -1, block_size, scale_mode, rounding, True)
    if d_pad != d:
        raise ValueError(
            f"in_features d={d} is not a multiple of block_size={block_size}; "
            "MX blocks must tile the reduction axis exactly (no silent padding)"
        )


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "scale_mode"))
def _block_exponents(W: jax.Array, *, fmt: str, block_size: int, scale_mode: str) -> jax.Array:
    """int32 [out, d // block_size]: mx.shared_exponent of each (row, block) absmax; W: [out, d]."""
    out, d = W.shape
    amax = jnp.max(jnp.abs(W.reshape(out, d // block_size, block_size)), axis=-1)
    return mx.shared_exponent(amax, fmt, scale_mode).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# RTN
# --------------------------------------------------------------------------------------------
def rtn_quantize(
    W: jax.Array,
    *,
    fmt: str = "mxfp4",
    block_size: int = 32,
    scale_mode: str = "floor",
    rounding: str = "even",
) -> WeightQuantResult:
    """Round-to-nearest MX quantization of W [out, d] (blocks along d, d % block_size == 0).

    ``weight`` is ``mx.fake_quant(W, fmt, axis=-1, ...)``; a block holding NaN/Inf becomes all NaN
    and gets exponent ``mx.NAN_EXPONENT`` (128).
    """
    _check_common(W, fmt, block_size, scale_mode, rounding)
    block_size = int(block_size)
    W = jnp.asarray(W, jnp.float32)
    e = _block_exponents(W, fmt=fmt, block_size=block_size, scale_mode=scale_mode)
    q = mx.fake_quant(
        W, fmt, axis=-1, block_size=block_size, scale_mode=scale_mode, rounding=rounding
    )
    return WeightQuantResult(q, e, fmt, block_size, "rtn")


# --------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------
@jax.jit
def _prepare(W: jax.Array, H: jax.Array, damp: jax.Array):
    """Dead columns, damping and the upper Cholesky factor of H^-1.

    W: [out, d], H: [d, d], damp: scalar (relative to mean(diag(H))).
    Returns (W with dead columns zeroed, U: [d, d] upper with U^T U = (H + lambda I)^-1).
    U contains NaN when a Cholesky factorization failed.
    """
    d = H.shape[0]
    diag = jnp.diag(H)
    dead = diag == 0
    W = jnp.where(dead[None, :], 0.0, W)
    H = H + jnp.diag(jnp.where(dead, 1.0, 0.0))
    lam = damp * jnp.mean(jnp.diag(H))
    H = H + lam * jnp.eye(d, dtype=H.dtype)
    L = jnp.linalg.cholesky(H)
    Hinv = jax.scipy.linalg.cho_solve((L, True), jnp.eye(d, dtype=H.dtype))
    Hinv = 0.5 * (Hinv + Hinv.T)
    U = jnp.linalg.cholesky(Hinv).T
    return W, U


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "rounding"))
def _gptq_sweep(W, U, exponents, *, fmt: str, block_size: int, rounding: str):
    """The GPTQ column sweep with fixed (static-group) exponents.

    W: [out, d] float32; U: [d, d] upper Cholesky factor of H^-1; exponents: int32 [out, d // B].
    Returns Q: [out, d], on the MX grid of ``exponents``.
    """
    out, d = W.shape
    B = block_size
    cols = jnp.arange(d)

    def column_step(W1T, xs):
        # W1T: [B, out], the current block with one row per column of W; u_row: row j of U's
        # diagonal block; e: [out] the block's fixed exponents.
        j, u_row, e = xs
        w = W1T[j]
        q = _quant_fixed(w, e, fmt, rounding)
        err = (w - q) / u_row[j]
        # u_row[k] == 0 for k < j, so only columns j.. change; column j becomes q.
        W1T = W1T - u_row[:, None] * err[None, :]
        return W1T, (q, err)

    def block_step(i, carry):
        W, Q = carry
        start = i * B
        W1T = jax.lax.dynamic_slice(W, (0, start), (out, B)).T
        U_rows = jax.lax.dynamic_slice(U, (start, 0), (B, d))
        U1 = jax.lax.dynamic_slice(U_rows, (0, start), (B, B))
        e = jax.lax.dynamic_index_in_dim(exponents, i, axis=1, keepdims=False)
        e_b = jnp.broadcast_to(e, (B, out))
        _, (Q1T, E1T) = jax.lax.scan(column_step, W1T, (jnp.arange(B), U1, e_b))
        # Lazy batch update: the block's errors reach every later column in one matmul.
        later = (cols >= start + B).astype(U.dtype)
        W = W - jnp.matmul(E1T.T, U_rows * later[None, :], precision=_HIGHEST)
        Q = jax.lax.dynamic_update_slice(Q, Q1T.T, (0, start))
        return W, Q

    _, Q = jax.lax.fori_loop(0, d // B, block_step, (W, jnp.zeros_like(W)))
    return Q


def gptq_quantize(
    W: jax.Array,
    H: jax.Array,
    *,
    fmt: str = "mxfp4",
    block_size: int = 32,
    damp: float = 0.01,
    scale_mode: str = "floor",
    rounding: str = "even",
    exponents: jax.Array | None = None,
    max_retries: int = 4,
) -> WeightQuantResult:
    """MX-aware GPTQ of W [out, d] given the input Hessian H [d, d] (``hessian_update`` sums).

    Damping adds ``damp * mean(diag(H))`` to the diagonal; dead columns (``H[i, i] == 0``) get
    ``H[i, i] = 1`` and a zero weight. The exponent of every (row, block) is fixed before the sweep:
    ``exponents`` [out, d // block_size] if given, else ``mx.shared_exponent`` of the block absmax
    of W (dead columns already zeroed). If Cholesky fails, the damping is raised 10x, up to
    ``max_retries`` times; ``result.damp`` and ``result.cholesky_retries`` record it.
    """
    _check_common(W, fmt, block_size, scale_mode, rounding)
    block_size = int(block_size)
    out, d = jnp.shape(W)
    if jnp.shape(H) != (d, d):
        raise ValueError(f"H must be [{d}, {d}] for W of shape {(out, d)}, got {jnp.shape(H)}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    W = jnp.asarray(W, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(W))) or not bool(jnp.all(jnp.isfinite(H))):
        raise ValueError("gptq_quantize: W and H must be finite (found NaN or Inf)")

    retries, cur = 0, float(damp)
    while True:
        Wd, U = _prepare(W, H, jnp.float32(cur))
        if bool(jnp.all(jnp.isfinite(U))):
            break
        if retries == max_retries:
            raise ValueError(
                f"gptq_quantize: Cholesky of the damped Hessian failed even with damp={cur:g}"
            )
        retries, cur = retries + 1, (cur * 10.0 if cur > 0 else 1e-6)

    nb = d // block_size
    if exponents is None:
        exponents = _block_exponents(Wd, fmt=fmt, block_size=block_size, scale_mode=scale_mode)
    else:
        if jnp.shape(exponents) != (out, nb):
            raise ValueError(f"exponents must be [{out}, {nb}], got {jnp.shape(exponents)}")
        exponents = jnp.asarray(exponents).astype(jnp.int32)
        if bool(jnp.any(jnp.abs(exponents) > 127)):
            raise ValueError("exponents must lie in [-127, 127] (E8M0 range)")
    Q = _gptq_sweep(Wd, U, exponents, fmt=fmt, block_size=block_size, rounding=rounding)
    return WeightQuantResult(Q, exponents, fmt, block_size, "gptq", cur, retries)


# --------------------------------------------------------------------------------------------
# Dispatcher and packing
# --------------------------------------------------------------------------------------------
def quantize_weight(
    W: jax.Array, H: jax.Array | None = None, method: str = "gptq", **kw
) -> WeightQuantResult:
    """``gptq_quantize(W, H, **kw)`` or ``rtn_quantize(W, **kw)``; W: [out, d], H: [d, d]."""
    if method == "gptq":
        if H is None:
            raise ValueError("quantize_weight(method='gptq') needs the Hessian H [d, d]")
        return gptq_quantize(W, H, **kw)
    if method == "rtn":
        return rtn_quantize(W, **kw)
    raise ValueError(f"unknown weight quantization method {method!r}; use 'gptq' or 'rtn'")


def _to_mxarray(weight, exponents, *, fmt: str, block_size: int):
    """mx.MXArray of weight [out, d] with exponents [out, d // block_size]; exact, since weight
    already lies on that grid (rounding never acts)."""
    return mx.quantize_with_exponents(weight, exponents, fmt, axis=-1, block_size=int(block_size))
