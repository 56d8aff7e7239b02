"""Invertible input transforms for linear layers, as Flax NNX modules.

Every transform maps a row vector ``x: [..., d]`` to ``x P`` and folds ``P^{-T}`` into a weight
``W: [out, d]`` (torch layout, ``y = x W^T``), so that, up to rounding,

    transform(x) @ transform.fold(W).T == x @ W.T

Transforms:
  GPKTransform        P = diag(B_1 (x) A, ..., B_k (x) A): BATQuant's GPK blocks.
  BlockAffine         P = diag(P_1, ..., P_k), full block x block matrices (the "no GPK" ablation).
  KroneckerTransform  P = P1 (x) P2 over all of d (FlatQuant).
  BlockHadamard       fixed normalized Sylvester Hadamard blocks (BRQ, MR-GPTQ).
  RandomHadamard      fixed global orthogonal transform with random signs (QuaRot).
  IdentityTransform   P = I.

Learnable transforms may carry a per-channel scale ``s: [d]`` (FlatQuant / SmoothQuant style),
applied before P: ``x -> (x / s) P`` and ``W -> (W * s) P^{-T}``. It is stored as ``log_scale``
(``s = exp(log_scale)``) so it stays positive under any gradient step.

Learnable parameters are ``nnx.Param`` (float32); fixed matrices are ``Constant`` variables, which
optimizers built on ``nnx.Param`` never see. A Kronecker factor pair is applied to a block viewed as
an ``m x n`` matrix ``X`` (row r = elements n*r .. n*r+n-1): ``x (L (x) R) = vec(L^T X R)``, so no
d x d matrix is ever built on the hot path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from batquant_jax import linalg

_HI = jax.lax.Precision.HIGHEST
_INITS = ("hadamard", "identity")


class Constant(nnx.Variable):
    """A fixed, non-trainable array held by a transform (never an ``nnx.Param``)."""


def sylvester_signs(n: int) -> np.ndarray:
    """The +-1 Sylvester Hadamard ``H_n``: ``[n, n]`` float64, n a power of 2 (the matrix
    compressed-tensors stores for a "hadamard" transform)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def sylvester_hadamard(n: int) -> np.ndarray:
    """Normalized Sylvester Hadamard ``H_n / sqrt(n)``: ``[n, n]`` float64, n a power of 2."""
    return sylvester_signs(n) / math.sqrt(n)


def _pow2_part(n: int) -> int:
    """Largest power of two dividing n."""
    return n & -n


def _pow2_init(n: int) -> np.ndarray:
    """Orthogonal ``[n, n]`` init ``H_{2^a}/sqrt(2^a) (x) I_m`` for ``n = 2^a * m`` (m odd)."""
    p = _pow2_part(n)
    return np.kron(sylvester_hadamard(p), np.eye(n // p))


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal ``[n, n]`` matrix: Q of the QR of a Gaussian, signs fixed by R's diagonal."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def _check_d(d: int, block: int = 1) -> None:
    if d <= 0 or d % block:
        raise ValueError(f"d={d} must be a positive multiple of the block size {block}")


def _check_init(init: str) -> None:
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")


def _kron_apply(x, left, right):
    """``vec(L_i^T X_i R)`` per block. x: [..., k, m, n]; left: [k, m, m]; right: [n, n].

    R is applied as one matmul over the last axis. A small L (m <= 8, GPK's private factor) is
    applied as m broadcast multiply-adds, which XLA fuses into one elementwise pass; this measured
    about 2x faster on CPU than a batched matmul over k (experiments/bench_transforms.py).
    """
    z = jnp.einsum("...krc,cC->...krC", x, right, precision=_HI)
    m = left.shape[-1]
    if m > 8:
        return jnp.einsum("...krC,krR->...kRC", z, left, precision=_HI)
    return sum(z[..., r, None, :] * left[:, r, :, None] for r in range(m))


@jax.custom_vjp
def block_matmul(w: jax.Array, t: jax.Array) -> jax.Array:
    """``w'[o, k, :] = w[o, k, :] @ t[k]`` for w: [o, k, b], t: [k, b, b].

    The weight fold of a block-diagonal transform. Its VJP computes t's cotangent as one
    batched product ``w_k^T g_k`` per block; differentiating the factor-wise fold instead
    reduced the weight-sized arrays once per factor entry (BUILD_NOTES.md, "One training step").
    """
    return jnp.einsum("okc,kcC->okC", w, t, precision=_HI)


def _block_matmul_fwd(w, t):
    return block_matmul(w, t), (w, t)


def _block_matmul_bwd(res, g):
    w, t = res
    return (jnp.einsum("okC,kcC->okc", g, t, precision=_HI),
            jnp.einsum("okc,okC->kcC", w, g, precision=_HI))


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def _fold_by_blocks(w: jax.Array, t: jax.Array) -> jax.Array:
    """W: [out, d] -> W with block i of its input dimension multiplied by t[i] ([k, b, b])."""
    return block_matmul(w.reshape(w.shape[0], t.shape[0], t.shape[1]), t).reshape(w.shape)


def _solve(xp, a, b):
    """``a^{-1} b``: LAPACK in numpy (float64 export), Gauss-Jordan in JAX (see ``linalg``)."""
    return np.linalg.solve(a, b) if xp is np else linalg.solve(a, b)


def _kron_fold(w, left, right, xp=jnp):
    """``L_i^{-1} W_i R^{-T}`` per block, with solves only. w: [o, k, m, n]; left: [k, m, m].

    ``xp`` is ``jnp`` (differentiable) or ``np`` (float64 export).
    """
    o, k, m, n = w.shape
    z = xp.transpose(w, (1, 2, 0, 3)).reshape(k, m, o * n)
    z = _solve(xp, left, z).reshape(k, m, o, n)  # L_i^{-1} W_i
    z = xp.transpose(z, (3, 2, 0, 1)).reshape(n, o * k * m)
    z = _solve(xp, right, z).reshape(n, o, k, m)  # (R^{-1} Z^T)^T = Z R^{-T}
    return xp.transpose(z, (1, 2, 3, 0))


def _cond(mats) -> jax.Array:
    """Largest 2-norm condition number among ``mats: [..., n, n]`` (inf when singular)."""
    s = jnp.linalg.svd(mats.astype(jnp.float32), compute_uv=False)
    smax, smin = s.max(axis=-1), s.min(axis=-1)
    return jnp.max(jnp.where(smin > 0, smax / jnp.where(smin > 0, smin, 1.0), jnp.inf))


def _noisy(init: np.ndarray, noise: float, rngs: nnx.Rngs | None) -> jax.Array:
    """float32 ``init`` plus ``noise * N(0, 1)`` drawn from ``rngs.params()`` when noise > 0."""
    out = jnp.asarray(init, jnp.float32)
    if noise > 0:
        if rngs is None:
            raise ValueError("init_noise > 0 needs rngs")
        out = out + noise * jax.random.normal(rngs.params(), out.shape)
    return out


def _f64(v) -> np.ndarray:
    return np.asarray(jax.device_get(v[...]), dtype=np.float64)


def smooth_init(act_absmax, w_absmax, alpha: float = 0.5, lo: float = 1e-3, hi: float = 1e3):
    """SmoothQuant-style per-channel scale ``s = act^alpha / w^(1 - alpha)``, clamped to [lo, hi].

    act_absmax: [d] max |x| per input channel; w_absmax: [d] max |W| per input column.
    Returns s: [d] float32, ready for ``Transform.set_scale``.
    """
    a = jnp.maximum(jnp.asarray(act_absmax, jnp.float32), 1e-5)
    w = jnp.maximum(jnp.asarray(w_absmax, jnp.float32), 1e-5)
    if a.shape != w.shape or a.ndim != 1:
        raise ValueError(f"act_absmax {a.shape} and w_absmax {w.shape} must both be [d]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return jnp.clip(a**alpha / w ** (1.0 - alpha), lo, hi)


class Transform(nnx.Module):
    """Base class: ``x -> (x / s) P`` and ``W -> (W * s) P^{-T}`` (s only when channel_scale).

    A new kind subclasses it: set ``self.d`` (and ``self._init_scale(channel_scale)`` for a
    channel scale), keep learnable parts as ``nnx.Param`` and fixed ones as ``Constant``, and
    implement the three P hooks below (the base applies the scale and checks shapes); a
    learnable kind also reports ``condition_number()``. ``register(name, builder)`` then makes it
    a kind that methods name (``recipe.register_method``):

    >>> class Negate(Transform):               # P = -I
    ...     def __init__(self, d: int):
    ...         self.d = d
    ...     def apply_p(self, x):
    ...         return -x
    ...     def fold_p(self, w):
    ...         return -w
    ...     def fold_p_f64(self, w):
    ...         return -w
    >>> register("negate", lambda d, **_: Negate(d))
    >>> t = build("negate", 64)
    >>> x, w = jnp.ones((2, 64)), jnp.full((3, 64), 0.5)
    >>> bool(jnp.allclose(t(x) @ t.fold(w).T, x @ w.T))
    True
    >>> del REGISTRY["negate"]
    """

    d: int
    log_scale: nnx.Param | None = None

    def _init_scale(self, channel_scale: bool) -> None:
        self.log_scale = nnx.Param(jnp.zeros((self.d,), jnp.float32)) if channel_scale else None

    # subclasses implement the P part on float32-or-wider arrays
    def apply_p(self, x):  # x: [..., d] -> x P
        raise NotImplementedError

    def fold_p(self, w):  # w: [out, d] -> w P^{-T}
        t = self.fold_blocks()
        if t is None:  # a transform that is not block-diagonal implements its own
            raise NotImplementedError
        return _fold_by_blocks(w, t)

    def fold_p_f64(self, w: np.ndarray) -> np.ndarray:  # float64 twin of _fold
        raise NotImplementedError

    def fold_blocks(self) -> jax.Array | None:
        """``[k, b, b]`` when P is block-diagonal and ``fold_p(w)[:, i] = w[:, i] @ blocks[i]``
        (blocks of the input dimension), else None. ``fold`` then runs as one ``block_matmul``."""
        return None

    def condition_number(self) -> jax.Array:
        """Largest condition number over P's factors (1.0 for fixed orthogonal transforms)."""
        return jnp.asarray(1.0, jnp.float32)

    # public interface
    def scale(self) -> jax.Array | None:
        """The per-channel scale s: [d] (positive), or None without channel scale."""
        return None if self.log_scale is None else jnp.exp(self.log_scale[...])

    def set_scale(self, s) -> None:
        """Assign the per-channel scale s: [d] (> 0), e.g. from ``smooth_init``."""
        if self.log_scale is None:
            raise ValueError("this transform was built without channel_scale")
        s = np.asarray(jax.device_get(s), np.float64)
        if s.shape != (self.d,) or not np.all(s > 0):
            raise ValueError(f"scale must be positive with shape ({self.d},), got {s.shape}")
        self.log_scale[...] = jnp.asarray(np.log(s), jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d] -> (x / s) P, same shape and dtype."""
        if x.shape[-1:] != (self.d,):
            raise ValueError(f"expected x: [..., {self.d}], got {x.shape}")
        y = x
        if self.log_scale is not None:
            y = y * jnp.exp(-self.log_scale[...])
        return self.apply_p(y).astype(x.dtype)

    def fold(self, w: jax.Array) -> jax.Array:
        """W: [out, d] -> (W * s) P^{-T}, same dtype; differentiable w.r.t. the parameters."""
        if w.ndim != 2 or w.shape[1] != self.d:
            raise ValueError(f"expected W: [out, {self.d}], got {w.shape}")
        t = self.fold_blocks()
        if t is not None:  # block-diagonal: the scale goes into the blocks, one product
            if self.log_scale is not None:
                t = t * jnp.exp(self.log_scale[...]).reshape(t.shape[0], t.shape[1], 1)
            return _fold_by_blocks(w, t).astype(w.dtype)
        v = w
        if self.log_scale is not None:
            v = v * jnp.exp(self.log_scale[...])
        return self.fold_p(v).astype(w.dtype)

    def fold_f64(self, w) -> np.ndarray:
        """NumPy float64 ``(W * s) P^{-T}`` for export. W: [out, d]."""
        w = np.asarray(w, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != self.d:
            raise ValueError(f"expected W: [out, {self.d}], got {w.shape}")
        if self.log_scale is not None:
            w = w * np.exp(_f64(self.log_scale))
        return self.fold_p_f64(w)

    def matrix(self) -> jax.Array:
        """Dense ``diag(1/s) P: [d, d]`` (testing / small d only)."""
        return self(jnp.eye(self.d, dtype=jnp.float32))

    @property
    def num_params(self) -> int:
        """Number of learnable scalars (``nnx.Param`` leaves)."""
        return int(sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param))))


def transform_is_healthy(t: Transform, max_cond: float = 1e4) -> bool:
    """True when all of t's parameters are finite and t.condition_number() < max_cond."""
    leaves = jax.tree.leaves(nnx.state(t, nnx.Param))
    if not all(bool(jnp.all(jnp.isfinite(p))) for p in leaves):
        return False
    c = float(t.condition_number())
    return math.isfinite(c) and c < max_cond


class GPKTransform(Transform):
    """BATQuant GPK: ``P = diag(B_1 (x) A, ..., B_k (x) A)``, ``k = d / block``.

    A: [g1, g1] shared by all blocks ("global"); B: [k, g2, g2], one per block ("private");
    ``g1 * g2 == block`` (default 8 * 4 = 32). Block i of x is viewed as ``X_i: [g2, g1]`` and
    mapped to ``vec(B_i^T X_i A)``; the fold uses only g1 x g1 and g2 x g2 solves.
    init="hadamard": A = H_g1/sqrt(g1), B_i = H_g2/sqrt(g2) (every block is then
    H_block/sqrt(block));
    init="identity": identity factors. ``init_noise > 0`` adds Gaussian noise (needs rngs).
    Parameters: ``g1^2 + k g2^2`` (+ d with channel_scale).
    """

    def __init__(self, d: int, g1: int = 8, g2: int = 4, *, block: int = 32,
                 init: str = "hadamard", channel_scale: bool = False,
                 init_noise: float = 0.0, rngs: nnx.Rngs | None = None):
        if g1 * g2 != block:
            raise ValueError(f"g1 * g2 must equal the block size: {g1} * {g2} != {block}")
        _check_d(d, block)
        _check_init(init)
        self.d, self.g1, self.g2, self.block, self.k = d, g1, g2, block, d // block
        if init == "hadamard":
            a, b = sylvester_hadamard(g1), sylvester_hadamard(g2)
        else:
            a, b = np.eye(g1), np.eye(g2)
        self.A = nnx.Param(_noisy(a, init_noise, rngs))
        self.B = nnx.Param(_noisy(np.tile(b[None], (self.k, 1, 1)), init_noise, rngs))
        self._init_scale(channel_scale)

    def apply_p(self, x):
        xb = x.reshape(*x.shape[:-1], self.k, self.g2, self.g1)
        return _kron_apply(xb, self.B[...], self.A[...]).reshape(x.shape)

    def fold_blocks(self) -> jax.Array:
        """``[k, block, block]``: block i of the fold, ``B_i^{-1} (x) A^{-1}`` transposed, so that
        ``fold_p(w)[:, i] = w[:, i] @ fold_blocks()[i]``."""
        binv, ainv = linalg.inv(self.B[...]), linalg.inv(self.A[...])
        t = jnp.einsum("kRr,Cc->krcRC", binv, ainv, precision=_HI)
        return t.reshape(self.k, self.block, self.block)

    def fold_p_f64(self, w):
        wb = w.reshape(w.shape[0], self.k, self.g2, self.g1)
        return _kron_fold(wb, _f64(self.B), _f64(self.A), np).reshape(w.shape)

    def condition_number(self):
        return jnp.maximum(_cond(self.A[...]), _cond(self.B[...]))


class BlockAffine(Transform):
    """Full block-affine ``P = diag(P_1, ..., P_k)``; P: [k, block, block] (the "no GPK" ablation).

    init="hadamard": every P_i = H_block/sqrt(block); "identity": P_i = I.
    """

    def __init__(self, d: int, block: int = 32, *, init: str = "hadamard",
                 channel_scale: bool = False, init_noise: float = 0.0,
                 rngs: nnx.Rngs | None = None):
        _check_d(d, block)
        _check_init(init)
        self.d, self.block, self.k = d, block, d // block
        p0 = sylvester_hadamard(block) if init == "hadamard" else np.eye(block)
        self.P = nnx.Param(_noisy(np.tile(p0[None], (self.k, 1, 1)), init_noise, rngs))
        self._init_scale(channel_scale)

    def apply_p(self, x):
        # batched matmul with the block index leading ([k, tokens, b] @ [k, b, b]): about 2x
        # faster on CPU than the direct einsum (experiments/bench_transforms.py)
        xb = jnp.moveaxis(x.reshape(-1, self.k, self.block), 1, 0)
        y = jnp.matmul(xb, self.P[...], precision=_HI)
        return jnp.moveaxis(y, 0, 1).reshape(x.shape)

    def fold_p(self, w, p=None, xp=jnp):
        p = self.P[...] if p is None else p
        z = xp.transpose(w.reshape(w.shape[0], self.k, self.block), (1, 2, 0))  # [k, b, o]
        z = _solve(xp, p, z)  # P_i^{-1} W_i^T
        return xp.transpose(z, (2, 0, 1)).reshape(w.shape)

    def fold_p_f64(self, w):
        return self.fold_p(w, _f64(self.P), np)

    def condition_number(self):
        return _cond(self.P[...])


def kron_factors(d: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1 * n2 == d`` and n1 the largest divisor of d not above sqrt(d)."""
    n1 = max(i for i in range(1, math.isqrt(d) + 1) if d % i == 0)
    return n1, d // n1


class KroneckerTransform(Transform):
    """FlatQuant's ``P = P1 (x) P2`` over all of d, P1: [n1, n1], P2: [n2, n2] (``kron_factors``).

    x is reshaped to [..., n1, n2] and mapped to ``P1^T X P2`` (two small matmuls).
    init="identity", "hadamard" (for ``n = 2^a m``, m odd: ``H_{2^a}/sqrt(2^a) (x) I_m``) or
    "random_orthogonal" (FlatQuant's own: each factor the Q of a seeded Gaussian's QR).
    """

    def __init__(self, d: int, *, channel_scale: bool = True, init: str = "identity",
                 init_noise: float = 0.0, rngs: nnx.Rngs | None = None, seed: int = 0):
        _check_d(d)
        if init not in _INITS + ("random_orthogonal",):
            raise ValueError(f"init must be one of {_INITS + ('random_orthogonal',)}, got {init!r}")
        self.d = d
        self.n1, self.n2 = kron_factors(d)
        rng = np.random.default_rng(seed)
        make = {"hadamard": _pow2_init, "identity": np.eye,
                "random_orthogonal": lambda n: random_orthogonal(n, rng)}[init]
        self.P1 = nnx.Param(_noisy(make(self.n1), init_noise, rngs))
        self.P2 = nnx.Param(_noisy(make(self.n2), init_noise, rngs))
        self._init_scale(channel_scale)

    def apply_p(self, x):
        xb = x.reshape(*x.shape[:-1], 1, self.n1, self.n2)
        return _kron_apply(xb, self.P1[...][None], self.P2[...]).reshape(x.shape)

    def fold_p(self, w):
        wb = w.reshape(w.shape[0], 1, self.n1, self.n2)
        return _kron_fold(wb, self.P1[...][None], self.P2[...]).reshape(w.shape)

    def fold_p_f64(self, w):
        wb = w.reshape(w.shape[0], 1, self.n1, self.n2)
        return _kron_fold(wb, _f64(self.P1)[None], _f64(self.P2), np).reshape(w.shape)

    def condition_number(self):
        return jnp.maximum(_cond(self.P1[...]), _cond(self.P2[...]))


def block_hadamard_size(d: int, size: int) -> int:
    """Largest power of two <= size that divides d."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    s = 1 << (size.bit_length() - 1)
    return min(s, _pow2_part(d))


class BlockHadamard(Transform):
    """Fixed ``P = diag(H, ..., H)``, H the normalized Sylvester Hadamard of ``self.size``.

    ``self.size`` is the requested size, or the largest power of two below it dividing d
    (d=576, size=128 -> 64). Orthogonal and symmetric, so ``fold(W) = W P``.
    """

    def __init__(self, d: int, size: int = 32):
        _check_d(d)
        self.d, self.requested_size = d, size
        self.size = block_hadamard_size(d, size)
        self.H = Constant(jnp.asarray(sylvester_hadamard(self.size), jnp.float32))

    def apply_p(self, x):
        xb = x.reshape(*x.shape[:-1], self.d // self.size, self.size)
        return jnp.matmul(xb, self.H[...], precision=_HI).reshape(x.shape)

    def fold_p(self, w):
        return self.apply_p(w)

    def fold_p_f64(self, w):
        h = sylvester_hadamard(self.size)
        return (w.reshape(w.shape[0], -1, self.size) @ h).reshape(w.shape)


def _random_hadamard_np(d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signs: [d], H: [p, p], Q: [m, m]) float64 with d = p * m, p the power-of-two part of d."""
    p = _pow2_part(d)
    m = d // p
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=d)
    q, r = np.linalg.qr(rng.standard_normal((m, m)))
    q = q * np.sign(np.diag(r))[None, :]  # Haar-distributed orthogonal
    return signs, sylvester_hadamard(p), q


class RandomHadamard(Transform):
    """Fixed global orthogonal ``P = diag(signs) (H_p (x) Q_m)``, ``d = p * m``, p = 2^a maximal.

    H_p is the normalized Sylvester Hadamard, Q_m a random orthogonal matrix (QR of a seeded
    Gaussian), signs random +-1; all deterministic in ``seed``. Applied as a reshape to
    [..., p, m] and two matmuls. Orthogonal, so ``fold(W) = W P``.
    """

    def __init__(self, d: int, seed: int = 0):
        _check_d(d)
        self.d, self.seed = d, seed
        signs, h, q = _random_hadamard_np(d, seed)
        self.p, self.m = h.shape[0], q.shape[0]
        self.signs = Constant(jnp.asarray(signs, jnp.float32))
        self.H = Constant(jnp.asarray(h, jnp.float32))
        self.Q = Constant(jnp.asarray(q, jnp.float32))

    def apply_p(self, x):
        xb = (x * self.signs[...]).reshape(*x.shape[:-1], 1, self.p, self.m)
        return _kron_apply(xb, self.H[...][None], self.Q[...]).reshape(x.shape)

    def fold_p(self, w):
        return self.apply_p(w)

    def fold_p_f64(self, w):
        signs, h, q = _random_hadamard_np(self.d, self.seed)
        wb = (w * signs).reshape(w.shape[0], self.p, self.m)
        # two BLAS matmuls: an unoptimized 3-operand einsum is a 5-deep loop (1.3 s per weight)
        return np.matmul(np.matmul(h.T, wb), q).reshape(w.shape)


class DenseTransform(Transform):
    """Fixed dense ``P: [d, d]`` (a ``Constant``): any input transform written out as one matrix,
    e.g. the ``diag(1/s) P`` of another transform (``matrix()``), as an exported folder stores
    it. Built as the identity; set ``P`` (or pass ``matrix``)."""

    def __init__(self, d: int, matrix=None):
        _check_d(d)
        self.d = d
        m = np.eye(d) if matrix is None else np.asarray(matrix)
        if m.shape != (d, d):
            raise ValueError(f"expected a [{d}, {d}] matrix, got {m.shape}")
        self.P = Constant(jnp.asarray(m, jnp.float32))

    def apply_p(self, x):
        return jnp.matmul(x, self.P[...], precision=_HI)

    def fold_p(self, w, p=None, xp=jnp):  # W P^{-T} = (P^{-1} W^T)^T
        p = self.P[...] if p is None else p
        return _solve(xp, p, w.T).T

    def fold_p_f64(self, w):
        return self.fold_p(w, _f64(self.P), np)


class IdentityTransform(Transform):
    """``P = I`` (no transform)."""

    def __init__(self, d: int):
        _check_d(d)
        self.d = d

    def apply_p(self, x):
        return x

    def fold_p(self, w):
        return w

    def fold_p_f64(self, w):
        return w.copy()


# ----------------------------------------------------------------------------- registry

def fit_block(d: int, g1: int, g2: int) -> tuple[int, int]:
    """(g1, g2) of the GPK / block-affine transform block used on an input of size d: the
    requested g1 * g2 when it divides d, else the largest block that does, found by halving the
    private factor g2 first, then g1 (the rule of block Hadamard 128, which becomes 64 on
    SmolLM2's d = 576).

    >>> fit_block(576, 16, 8)
    (16, 4)
    """
    a, b = g1, g2
    while d % (a * b):
        if b > 1:
            b //= 2
        elif a > 1:
            a //= 2
        else:
            raise ValueError(f"no transform block divides d={d}")
    return a, b


def _gpk(d, *, g1, g2, init, channel_scale, **_):
    g1, g2 = fit_block(d, g1, g2)
    return GPKTransform(d, g1, g2, block=g1 * g2, init=init, channel_scale=channel_scale)


def _block_affine(d, *, g1, g2, init, channel_scale, **_):
    g1, g2 = fit_block(d, g1, g2)
    return BlockAffine(d, g1 * g2, init=init, channel_scale=channel_scale)


# Transform kinds by name: builder(d, *, g1, g2, init, seed, channel_scale, hadamard_size,
# transform_init) -> Transform. Every builder takes all keywords and uses those it needs;
# ``register`` adds a kind (a method then names it in MethodSpec.transform).
REGISTRY = {
    "identity": lambda d, **_: IdentityTransform(d),
    "random_hadamard": lambda d, *, seed, **_: RandomHadamard(d, seed=seed),
    "block_hadamard": lambda d, *, hadamard_size, **_: BlockHadamard(d, hadamard_size),
    "kronecker": lambda d, *, channel_scale, transform_init, seed, **_: KroneckerTransform(
        d, channel_scale=channel_scale, init=transform_init or "identity", seed=seed),
    "gpk": _gpk,
    "block_affine": _block_affine,
    "dense": lambda d, **_: DenseTransform(d),
}


def register(kind: str, builder) -> None:
    """Adds (or replaces) a transform kind of ``build``: builder(d, **keywords) -> Transform,
    taking every keyword of ``build`` (``**_`` for those it ignores)."""
    REGISTRY[kind] = builder


def build(kind: str, d: int, *, g1: int = 8, g2: int = 4, init: str = "hadamard", seed: int = 0,
          channel_scale: bool = False, hadamard_size: int = 32,
          transform_init: str | None = None) -> Transform:
    """The transform ``kind`` for an input of size d (see REGISTRY).

    >>> build("block_hadamard", 64, hadamard_size=32).size
    32
    """
    if kind not in REGISTRY:
        raise ValueError(f"unknown transform {kind!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[kind](d, g1=g1, g2=g2, init=init, seed=seed, channel_scale=channel_scale,
                          hadamard_size=hadamard_size, transform_init=transform_init)
