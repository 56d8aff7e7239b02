"""Block-wise learnable clipping (BATQuant), as Flax NNX modules.

For each MX block of 32 values (one token's / one weight row's slice along d), with signed
``max(block)`` and ``min(block)``:

    hi = sigmoid(a_max) * max(block),   lo = sigmoid(a_min) * min(block),   x <- clamp(x, lo, hi)

applied before the MX shared scale is computed. The logits start at ``DEFAULT_CLIP_INIT`` = 8.0
(ratio sigmoid(8) ~ 0.9997; the paper's 4.0, ratio 0.982, clips 1.8% of the values, see
BUILD_NOTES.md) and receive gradients through the clamp. ``granularity="tensor"`` is FlatQuant's
variant: one logit pair for the whole activation tensor (max / min taken per token over all of
d), or one per output row for weights (max / min over the whole row).

A block whose values all share one sign is clipped only on that side: e.g. for an all-negative
block ``hi = sigmoid(a_max) * max`` lies above the block max and is inactive. (If the two
thresholds cross, ``lo > hi``, the clamp returns ``hi``.)

``enabled=False`` (static, fixed at construction) makes the module the identity with no parameters,
for ablations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_GRANULARITIES = ("block", "tensor")
# The clipping logits' start, for the modules, qlayers.quantize_layer and CalibConfig alike.
DEFAULT_CLIP_INIT = 8.0


def clamp_to_ratios(xb: jax.Array, r_max: jax.Array, r_min: jax.Array) -> jax.Array:
    """Clamp each group of ``xb: [..., g, n]`` to ``[r_min * min, r_max * max]`` over its last axis.

    r_max, r_min broadcast against ``[..., g, 1]``; computed in float32 at least, returned in xb's
    dtype. Differentiable in r_max, r_min (and in xb), with the gradients of the plain
    ``minimum(maximum(x, lo), hi)`` composition (``_clamp_reference``; ties split as JAX splits
    them), written out by hand: XLA's derivative of the composition took about 4x the forward's
    time on weight-sized arrays (BUILD_NOTES.md, "One training step").
    """
    dt = jnp.promote_types(xb.dtype, jnp.float32)
    return _clamp(xb.astype(dt), jnp.asarray(r_max, dt), jnp.asarray(r_min, dt)).astype(xb.dtype)


def _clamp_reference(x, r_max, r_min):
    hi = r_max * jnp.max(x, axis=-1, keepdims=True)
    lo = r_min * jnp.min(x, axis=-1, keepdims=True)
    return jnp.minimum(jnp.maximum(x, lo), hi)


@jax.custom_vjp
def _clamp(x, r_max, r_min):
    return _clamp_reference(x, r_max, r_min)


def _clamp_fwd(x, r_max, r_min):
    # _clamp_reference's operations, keeping the group max / min for the backward pass
    mx, mn = jnp.max(x, axis=-1, keepdims=True), jnp.min(x, axis=-1, keepdims=True)
    y = jnp.minimum(jnp.maximum(x, r_min * mn), r_max * mx)
    return y, (x, r_max, r_min, mx, mn)


def _split(a, b):
    """JAX's derivative share of ``a`` in ``max(a, b)`` / ``min(a, b)`` where ``a`` won or tied."""
    return jnp.where(a == b, 0.5, 1.0)


def _unbroadcast(v, shape):
    """Sum v over the axes that broadcasting added to ``shape``."""
    lead = v.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                      if n == 1 and v.shape[lead + i] != 1)
    return jnp.sum(v, axis=axes).reshape(shape) if axes else v


def _clamp_bwd(res, g):
    x, r_max, r_min, mx, mn = res
    hi, lo = r_max * mx, r_min * mn
    m = jnp.maximum(x, lo)
    # y = min(m, hi): hi's share where m >= hi, m's share where m <= hi
    to_hi = jnp.where(m >= hi, g * _split(hi, m), 0.0)
    g_m = g - to_hi
    # m = max(x, lo): lo's share where lo >= x
    to_lo = jnp.where(lo >= x, g_m * _split(lo, x), 0.0)
    g_x = g_m - to_lo
    g_hi = jnp.sum(to_hi, axis=-1, keepdims=True)
    g_lo = jnp.sum(to_lo, axis=-1, keepdims=True)
    # max / min of the group: the derivative is shared equally by the elements that attain it
    at_mx, at_mn = x == mx, x == mn
    d_mx = g_hi * r_max / jnp.sum(at_mx, axis=-1, keepdims=True, dtype=x.dtype)
    d_mn = g_lo * r_min / jnp.sum(at_mn, axis=-1, keepdims=True, dtype=x.dtype)
    g_x = g_x + jnp.where(at_mx, d_mx, 0.0) + jnp.where(at_mn, d_mn, 0.0)
    return g_x, _unbroadcast(g_hi * mx, jnp.shape(r_max)), _unbroadcast(g_lo * mn, jnp.shape(r_min))


_clamp.defvjp(_clamp_fwd, _clamp_bwd)


def _check(granularity: str, d: int, block: int) -> None:
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
    if block <= 0 or d <= 0 or d % block:
        raise ValueError(f"d={d} must be a positive multiple of the block size {block}")


class _Clip(nnx.Module):
    """What ActClip and WeightClip share: the logit pair and its ratios."""

    def _logits(self, shape: tuple, init: float, granularity: str, enabled: bool) -> None:
        self.granularity, self.enabled = granularity, enabled
        if enabled:
            self.a_max = nnx.Param(jnp.full(shape, init, jnp.float32))
            self.a_min = nnx.Param(jnp.full(shape, init, jnp.float32))
        else:
            self.a_max = self.a_min = None

    def ratios(self) -> tuple[jax.Array, jax.Array]:
        """(sigmoid(a_max), sigmoid(a_min)), each of the logits' shape (ActClip: [d / block] or
        []; WeightClip: [out, d / block] or [out])."""
        if not self.enabled:
            raise ValueError("clipping is disabled")
        return jax.nn.sigmoid(self.a_max[...]), jax.nn.sigmoid(self.a_min[...])


class ActClip(_Clip):
    """Learnable activation clipping for x: [..., d], ``d % block == 0``.

    granularity="block": logits a_max, a_min: [d / block], one pair per block position along d,
    shared by all tokens; "tensor": scalar logits, thresholds from each token's max / min over d.
    """

    def __init__(self, d: int, block: int = 32, init: float = DEFAULT_CLIP_INIT,
                 granularity: str = "block", enabled: bool = True):
        _check(granularity, d, block)
        self.d, self.block = d, block
        self._logits((d // block,) if granularity == "block" else (), init, granularity, enabled)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d] -> clamped x, same shape and dtype."""
        if x.shape[-1:] != (self.d,):
            raise ValueError(f"expected x: [..., {self.d}], got {x.shape}")
        if not self.enabled:
            return x
        r_max, r_min = self.ratios()
        if self.granularity == "block":
            xb = x.reshape(*x.shape[:-1], self.d // self.block, self.block)
            return clamp_to_ratios(xb, r_max[:, None], r_min[:, None]).reshape(x.shape)
        return clamp_to_ratios(x[..., None, :], r_max, r_min).reshape(x.shape)


class WeightClip(_Clip):
    """Learnable weight clipping for W: [out, d], ``d % block == 0``.

    granularity="block": logits a_max, a_min: [out, d / block], one pair per (row, block);
    "tensor": [out], one pair per output row with thresholds from the whole row.
    """

    def __init__(self, out: int, d: int, block: int = 32, init: float = DEFAULT_CLIP_INIT,
                 granularity: str = "block", enabled: bool = True):
        _check(granularity, d, block)
        if out <= 0:
            raise ValueError(f"out must be positive, got {out}")
        self.out, self.d, self.block = out, d, block
        self._logits((out, d // block) if granularity == "block" else (out,), init, granularity,
                     enabled)

    def __call__(self, w: jax.Array) -> jax.Array:
        """W: [out, d] -> clamped W, same shape and dtype."""
        if w.shape != (self.out, self.d):
            raise ValueError(f"expected W: [{self.out}, {self.d}], got {w.shape}")
        if not self.enabled:
            return w
        r_max, r_min = self.ratios()
        if self.granularity == "block":
            wb = w.reshape(self.out, self.d // self.block, self.block)
            return clamp_to_ratios(wb, r_max[..., None], r_min[..., None]).reshape(w.shape)
        return clamp_to_ratios(w[:, None, :], r_max[:, None, None], r_min[:, None, None]).reshape(
            w.shape)
