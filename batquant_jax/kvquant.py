"""Quantized KV cache: keys and values in MX blocks along head_dim, one token at a time.

The settings W4A8KV8, W4A8KV4, W4A4KV8 and W4A4KV4 add a KV part to the linear-layer setting:
KV16 keeps keys and values in full precision, KV8 stores them as MXFP8 (E4M3), KV4 as MXFP4
(E2M1). A block is `block_size` (32) consecutive elements of one head's key (or value) vector
of one token, so every token is quantized on its own: a cache filled token by token holds the
same values as one filled by a whole-sequence forward.

Keys are quantized after RoPE (what a cache stores). An optional invertible transform along
head_dim, per KV head (`per_head=True`) or shared by all heads, moves the error without changing
attention in exact arithmetic:

    K' = K M_k        Q' = Q M_k^{-T}       Q' K'^T = Q K^T
    V' = V M_v        out = probs V' M_v^{-1} = probs V

with M = diag(1/s) P (s a per-channel scale when the transform has one, P its matrix). Only K'
and V' are quantized; Q' is not (scores and softmax stay in full precision), and M_v^{-1} acts
on the attention output of each query head, before o_proj (`KVQuant.attend_out`).

Transforms (`TRANSFORMS`): "none"; "block_hadamard" (fixed normalized Sylvester Hadamard on each
MX block, `transforms.BlockHadamard`); "learned" (`transforms.GPKTransform`, the BATQuant
block-affine GPK, started at the block Hadamard, optionally with a channel scale). head_dim is
small (64 on SmolLM2), so each transform is used as its dense [hd, hd] matrix and its inverse.

Usage::

    set_kv_quant(model, "KV4", transform="block_hadamard")   # a KVQuant in every attention
    logits = model(tokens)                                   # attention on dequantized K', V'
    set_kv_quant(model, None)                                # back to full precision

Packed cache storage: `pack_kv` / `unpack_kv` (MXArray codes + E8M0 scales, equal to the fake
quantization bit for bit) and `kv_cache_bytes` (K and V bytes of a cache).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from batquant_jax import mx
from batquant_jax.transforms import BlockHadamard, Constant, GPKTransform, Transform, kron_factors

_HI = jax.lax.Precision.HIGHEST
TRANSFORMS = ("none", "block_hadamard", "learned")


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """How keys and values are stored. k_fmt / v_fmt: an `mx.FORMATS` name or None (full
    precision); blocks of `block_size` along head_dim; scale_mode / rounding as in `mx`."""

    k_fmt: str | None = None
    v_fmt: str | None = None
    block_size: int = 32
    scale_mode: str = "floor"
    rounding: str = "even"

    def __post_init__(self):
        for name in ("k_fmt", "v_fmt"):
            fmt = getattr(self, name)
            if fmt is not None and fmt not in mx.FORMATS:
                raise ValueError(f"{name} {fmt!r} is not an MX format; "
                                 f"valid: None, {sorted(mx.FORMATS)}")
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"block_size must be a positive even int, got {self.block_size!r}")
        if self.scale_mode not in mx.SCALE_MODES:
            raise ValueError(f"scale_mode {self.scale_mode!r} is not one of {list(mx.SCALE_MODES)}")
        if self.rounding not in mx.ROUNDINGS:
            raise ValueError(f"rounding {self.rounding!r} is not one of {list(mx.ROUNDINGS)}")

    @property
    def quantized(self) -> bool:
        """True when keys or values are quantized."""
        return self.k_fmt is not None or self.v_fmt is not None

    def check_head_dim(self, head_dim: int) -> None:
        """ValueError unless head_dim is a positive multiple of block_size."""
        if head_dim <= 0 or head_dim % self.block_size:
            raise ValueError(f"head_dim {head_dim} must be a positive multiple of the KV block "
                             f"size {self.block_size}")


KV_FORMATS: dict[str, KVSpec] = {
    "KV16": KVSpec(None, None),
    "KV8": KVSpec("mxfp8", "mxfp8"),
    "KV4": KVSpec("mxfp4", "mxfp4"),
}


def kv_spec(setting: str | KVSpec | None) -> KVSpec:
    """The KVSpec of a KV name ("KV4"), of a setting name's KV part ("W4A8KV4"), or a KVSpec
    itself; None and settings without a KV part ("W4A16") mean KV16."""
    if setting is None:
        return KV_FORMATS["KV16"]
    if isinstance(setting, KVSpec):
        return setting
    m = re.search(r"(KV\d+)$", str(setting))
    if m is None:
        if re.fullmatch(r"W\d+(A\d+)?", str(setting)):
            return KV_FORMATS["KV16"]
        raise ValueError(f"no KV format in {setting!r}; expected one of {sorted(KV_FORMATS)} or a "
                         "setting such as W4A4KV8")
    if m.group(1) not in KV_FORMATS:
        raise ValueError(f"unknown KV format {m.group(1)!r} in {setting!r}; "
                         f"valid: {sorted(KV_FORMATS)}")
    return KV_FORMATS[m.group(1)]


def _make_transform(kind: str, head_dim: int, block_size: int, channel_scale: bool,
                    init_noise: float, rngs: nnx.Rngs | None) -> Transform:
    if kind == "block_hadamard":
        return BlockHadamard(head_dim, block_size)
    g2, g1 = kron_factors(block_size)  # 32 -> private 4 x 4, global 8 x 8, as in the linears
    return GPKTransform(head_dim, g1, g2, block=block_size, init="hadamard",
                        channel_scale=channel_scale, init_noise=init_noise, rngs=rngs)


class KVQuant(nnx.Module):
    """Transforms and fake-quantizes Q, K, V of one attention after RoPE (see the module doc).

    `__call__(q, k, v) -> (q', k', v')` with q: [B, T, H, hd], k, v: [B, S, KV, hd] (query head
    h uses KV head h // (H / KV)); attention then runs on the returned arrays and
    `attend_out(out)` maps its output [B, T, H, hd] back (V's inverse). Gradients pass
    straight through the quantizers to the learned transforms' parameters (`nnx.Param`).

    transform / v_transform: kinds from `TRANSFORMS` for K / V (v_transform None: as K).
    per_head: one transform per KV head (else one shared by all heads). channel_scale: the
    learned transform also carries a per-channel scale. init_noise > 0 perturbs a learned start
    (needs rngs).
    """

    def __init__(self, spec: KVSpec | str | None, num_heads: int, num_kv_heads: int,
                 head_dim: int, *, transform: str = "none", v_transform: str | None = None,
                 per_head: bool = True, channel_scale: bool = False, init_noise: float = 0.0,
                 rngs: nnx.Rngs | None = None):
        spec = kv_spec(spec)
        spec.check_head_dim(head_dim)
        if num_kv_heads <= 0 or num_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a positive multiple of num_kv_heads "
                             f"{num_kv_heads}")
        v_transform = transform if v_transform is None else v_transform
        for kind in (transform, v_transform):
            if kind not in TRANSFORMS:
                raise ValueError(f"unknown KV transform {kind!r}; valid: {list(TRANSFORMS)}")
        self.spec = spec
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.k_kind, self.v_kind, self.per_head = transform, v_transform, bool(per_head)

        def build(kind):
            if kind == "none":
                return nnx.data(None)
            n = num_kv_heads if per_head else 1
            return nnx.List([_make_transform(kind, head_dim, spec.block_size, channel_scale,
                                             init_noise, rngs) for _ in range(n)])

        self.k_transform = build(transform)
        self.v_transform = build(v_transform)
        # set by `freeze`: Constant (M, M^{-1}) [KV, hd, hd] used instead of the transforms
        self.k_fixed = nnx.data(None)
        self.v_fixed = nnx.data(None)

    # ------------------------------------------------------------------ transforms
    def matrices(self, which: str) -> tuple[jax.Array, jax.Array] | None:
        """(M, M^{-1}) of K's or V's transform (which: "k" | "v"), float32 [KV, hd, hd] each
        (one per KV head, repeated when shared), or None without a transform."""
        fixed = self.k_fixed if which == "k" else self.v_fixed
        if fixed is not None:
            return fixed[0][...], fixed[1][...]
        ts = self.k_transform if which == "k" else self.v_transform
        if ts is None:
            return None
        eye = jnp.eye(self.head_dim, dtype=jnp.float32)
        m = jnp.stack([t(eye) for t in ts])
        # fold(I) = diag(s) P^{-T} = (M^{-1})^T, with the transform's own small solves (GPK:
        # 8 x 8 and 4 x 4 factors) instead of a 64 x 64 elimination; exact M^T for the Hadamard
        minv = jnp.swapaxes(jnp.stack([t.fold(eye) for t in ts]), -1, -2)
        reps = (self.num_kv_heads // m.shape[0], 1, 1)
        return jnp.tile(m, reps), jnp.tile(minv, reps)

    def freeze(self) -> None:
        """Replaces the transforms by their current (M, M^{-1}) as fixed `Constant` arrays: no
        learnable parameters left, no solves per call (for evaluation and generation)."""
        for which, mats in zip(("k", "v"), transform_matrices(self)):
            if mats is not None:
                fixed = nnx.List([Constant(jax.lax.stop_gradient(a)) for a in mats])
                setattr(self, f"{which}_fixed", fixed)
                setattr(self, f"{which}_transform", None)

    def _grouped(self, x):  # [B, T, H, hd] -> [B, T, KV, G, hd]
        b, t, h, hd = x.shape
        if h != self.num_heads or hd != self.head_dim:
            raise ValueError(f"expected [B, T, {self.num_heads}, {self.head_dim}], got {x.shape}")
        return x.reshape(b, t, self.num_kv_heads, h // self.num_kv_heads, hd)

    def _check_kv(self, x, name):
        if x.ndim != 4 or x.shape[2:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"{name} must be [B, S, {self.num_kv_heads}, {self.head_dim}], "
                             f"got {x.shape}")

    def rotate(self, q, k, v):
        """The transforms alone: (Q M_k^{-T}, K M_k, V M_v), shapes and dtypes kept."""
        self._check_kv(k, "k")
        self._check_kv(v, "v")
        mk = self.matrices("k")
        if mk is not None:
            m, minv = mk
            qg = jnp.einsum("btkgd,ked->btkge", self._grouped(q).astype(jnp.float32), minv,
                            precision=_HI)
            q = qg.reshape(q.shape).astype(q.dtype)
            k = jnp.einsum("btkd,kde->btke", k.astype(jnp.float32), m, precision=_HI).astype(k.dtype)
        mv = self.matrices("v")
        if mv is not None:
            vt = jnp.einsum("btkd,kde->btke", v.astype(jnp.float32), mv[0], precision=_HI)
            v = vt.astype(v.dtype)
        return q, k, v

    def quantize(self, k, v):
        """Fake quantization of (already transformed) k, v: [B, S, KV, hd], blocks along hd;
        straight-through gradient. A side whose format is None passes unchanged."""
        s = self.spec

        def fq(x, fmt):
            if fmt is None:
                return x
            return mx.fake_quant(x, fmt, axis=-1, block_size=s.block_size,
                                 scale_mode=s.scale_mode, rounding=s.rounding)

        return fq(k, s.k_fmt), fq(v, s.v_fmt)

    def __call__(self, q, k, v):
        """q: [B, T, H, hd], k, v: [B, S, KV, hd] (after RoPE) -> (q', Q_K(k'), Q_V(v'))."""
        q, k, v = self.rotate(q, k, v)
        k, v = self.quantize(k, v)
        return q, k, v

    def attend_out(self, out):
        """Attention output over V', [B, T, H, hd] -> out M_v^{-1} (unchanged without V transform)."""
        mv = self.matrices("v")
        if mv is None:
            return out
        og = jnp.einsum("btkgd,kde->btkge", self._grouped(out).astype(jnp.float32), mv[1],
                        precision=_HI)
        return og.reshape(out.shape).astype(out.dtype)

    # ------------------------------------------------------------------ packed storage
    def pack(self, k, v):
        """Cache storage of (transformed) k, v: [B, S, KV, hd] -> (MXArray | array, same for v);
        `unpack` of it equals `quantize(k, v)` exactly."""
        return pack_kv(k, self.spec.k_fmt, self.spec), pack_kv(v, self.spec.v_fmt, self.spec)

    def unpack(self, kp, vp, dtype=jnp.float32):
        """Inverse of `pack`: -> (k, v) [B, S, KV, hd] as dtype."""
        return unpack_kv(kp, dtype), unpack_kv(vp, dtype)

    @property
    def num_params(self) -> int:
        """Learnable scalars (`nnx.Param` leaves of the transforms)."""
        return int(sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param))))


@nnx.jit
def transform_matrices(kvq: KVQuant):
    """Jitted `(kvq.matrices("k"), kvq.matrices("v"))`: each (M, M^{-1}) [KV, hd, hd] or None.
    One compiled program serves every layer of a model (eager, the GPK solves are slow)."""
    return kvq.matrices("k"), kvq.matrices("v")


def pack_kv(x, fmt: str | None, spec: KVSpec | None = None):
    """x: [..., hd] (keys or values, [B, S, KV, hd]) -> MXArray with codes [..., hd/2] (4-bit) or
    [..., hd] and scales [..., hd / block_size]; fmt None returns x unchanged."""
    if fmt is None:
        return x
    s = spec or KVSpec(fmt, fmt)
    return mx.quantize(x, fmt, axis=-1, block_size=s.block_size, scale_mode=s.scale_mode,
                       rounding=s.rounding)


def unpack_kv(p, dtype=jnp.float32) -> jax.Array:
    """Inverse of `pack_kv`: an MXArray (or a full-precision array) -> values [..., hd] as dtype."""
    if isinstance(p, mx.MXArray):
        return mx.dequantize(p, dtype)
    return jnp.asarray(p).astype(dtype)


def bytes_per_vector(fmt: str | None, head_dim: int, block_size: int = 32,
                     unquantized_bytes: int = 2) -> int:
    """Bytes of one head's key (or value) of one token: MXFP4 hd/2 + hd/block_size, 8- and
    6-bit formats (one code per byte) hd + hd/block_size, None hd * unquantized_bytes."""
    if fmt is None:
        return head_dim * unquantized_bytes
    codes = head_dim // 2 if mx.FORMATS[fmt].packed else head_dim
    return codes + -(-head_dim // block_size)


def kv_cache_bytes(spec: KVSpec | str | None, *, batch: int, seq_len: int, num_kv_heads: int,
                   head_dim: int, num_layers: int = 1, unquantized_bytes: int = 2) -> int:
    """Bytes of K and V of a cache of `seq_len` tokens per sequence (per layer times num_layers);
    unquantized_bytes: element size of a full-precision side (2: KV16 as bfloat16)."""
    s = kv_spec(spec)
    per = sum(bytes_per_vector(f, head_dim, s.block_size, unquantized_bytes)
              for f in (s.k_fmt, s.v_fmt))
    return num_layers * batch * seq_len * num_kv_heads * per


def set_kv_quant(model, spec: KVSpec | str | None, transform: str = "none", *,
                 v_transform: str | None = None, per_head: bool = True,
                 channel_scale: bool = False, init_noise: float = 0.0,
                 seed: int = 0) -> list[KVQuant | None]:
    """Installs a new KVQuant in the attention of every layer of `model` (anything with
    `.layers` of decoder layers, or one decoder layer); spec None removes them (KV16 without a
    transform: the original computation). Returns the installed modules, in layer order.
    seed: the generator of init_noise (layer i draws from seed + i)."""
    layers = list(model.layers) if hasattr(model, "layers") else [model]
    out = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if spec is None:
            attn.kv_quant = None
            out.append(None)
            continue
        rngs = nnx.Rngs(seed + i) if init_noise > 0 else None
        attn.kv_quant = KVQuant(spec, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                transform=transform, v_transform=v_transform, per_head=per_head,
                                channel_scale=channel_scale, init_noise=init_noise, rngs=rngs)
        out.append(attn.kv_quant)
    return out


def freeze_all(model) -> int:
    """`KVQuant.freeze` on every KVQuant of `model` that still has a transform (fixed M, M^{-1}:
    no solves per forward; for evaluation and generation, after which the model's state no
    longer matches a checkpoint skeleton). Returns how many were frozen."""
    todo = [m for _, m in nnx.iter_modules(model) if isinstance(m, KVQuant)
            and (m.k_transform is not None or m.v_transform is not None)]
    for m in todo:
        m.freeze()
    return len(todo)


def kv_params(module) -> nnx.State:
    """The learnable KV transform parameters of a model / layer / KVQuant (an nnx filter result:
    `nnx.Param` leaves under a `k_transform` / `v_transform` path)."""
    return nnx.state(module, is_kv_param)


def is_kv_param(path, value) -> bool:
    """nnx filter: a learnable parameter of a KV transform."""
    return isinstance(value, nnx.Param) and any(p in ("k_transform", "v_transform") for p in path)


__all__ = ["KVSpec", "KV_FORMATS", "TRANSFORMS", "KVQuant", "kv_spec", "transform_matrices",
           "pack_kv", "unpack_kv", "bytes_per_vector", "kv_cache_bytes", "set_kv_quant",
           "freeze_all", "kv_params", "is_kv_param"]
