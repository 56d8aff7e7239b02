"""Quantized linear layers and the method table: how each method transforms, clips and quantizes.

A quantized linear computes, for x: [..., d] and W: [out, d],

    y = Q_A(clip_A(x P)) @ Q_W(clip_W(W P^{-T}))^T (+ bias)

where P is the input transform (shared by the linears that read the same input: P_qkv for
q/k/v, P_o, P_ug for gate/up, P_d for down), Q_A / Q_W are MX fake quantizers with
straight-through gradients, and clip_* the learnable block clipping. Without quantization it
equals x @ W^T exactly (up to float rounding).

While calibrating, the weight side is recomputed from the frozen full-precision weight each step,
so gradients reach P and the clipping logits. ``deploy`` then fixes the weight side to a
quantized weight (RTN or GPTQ), after which the layer only runs the online activation path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from batquant_jax import gptq, mx
from batquant_jax.clipping import DEFAULT_CLIP_INIT, ActClip, WeightClip
from batquant_jax.models.llama import DecoderLayer, Linear
from batquant_jax.transforms import (BlockAffine, BlockHadamard, GPKTransform, IdentityTransform,
                                     KroneckerTransform, RandomHadamard, Transform)


class FrozenWeight(nnx.Variable):
    """A full-precision or quantized weight that calibration never trains."""


class HessianSum(nnx.Variable):
    """Running sum X^T X of a linear's transformed inputs: [d, d] float32 (GPTQ statistics)."""


class InputAbsMax(nnx.Variable):
    """Running max |x| per input channel of a linear's raw inputs: [d] float32 (smooth init)."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What is quantized and how. a_fmt None = activations stay in full precision."""

    w_fmt: str = "mxfp4"
    a_fmt: str | None = "mxfp4"
    scale_mode: str = "floor"
    rounding: str = "even"
    block_size: int = 32


SETTINGS = {
    "W4A4KV16": QuantSpec(w_fmt="mxfp4", a_fmt="mxfp4"),
    "W4A8KV16": QuantSpec(w_fmt="mxfp4", a_fmt="mxfp8"),
    "W4A16": QuantSpec(w_fmt="mxfp4", a_fmt=None),
}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One row of docs/METHOD.md's baseline table: input transform, clipping, training, weights.

    transform: "identity" | "random_hadamard" | "block_hadamard" | "kronecker" | "gpk" | "block_affine"
    clip: None | "block" | "tensor" (granularity of the learnable clipping, activations and weights)
    """

    transform: str = "identity"
    hadamard_size: int = 32
    channel_scale: bool = False
    clip: str | None = None
    act_clip: bool = True      # with clip set: clip the activations ...
    weight_clip: bool = True   # ... and / or the weights
    train: bool = False
    weights: str = "gptq"
    transform_init: str | None = None  # None: the run's init (CalibConfig.init)
    scale_init: str = "ones"   # channel scale start: "ones" or "smooth" (SmoothQuant-style)
    smooth_alpha: float = 0.5  # s = max|x|^alpha / max|W|^(1 - alpha) with scale_init="smooth"


METHODS = {
    "rtn": MethodSpec(weights="rtn"),
    "gptq": MethodSpec(),
    "quarot": MethodSpec(transform="random_hadamard"),
    "brq": MethodSpec(transform="block_hadamard", hadamard_size=32),
    "mr-gptq": MethodSpec(transform="block_hadamard", hadamard_size=128),
    # FlatQuant as its authors run it: random orthogonal Kronecker factors, SmoothQuant-style
    # channel scale (alpha 0.3 from the calibration activation maxima), per-tensor clipping
    "flatquant": MethodSpec(transform="kronecker", channel_scale=True, clip="tensor", train=True,
                            transform_init="random_orthogonal", scale_init="smooth",
                            smooth_alpha=0.3),
    # channel scale started SmoothQuant-style (alpha 0.5): chosen on held-back calibration data
    "batquant": MethodSpec(transform="gpk", channel_scale=True, clip="block", train=True,
                           scale_init="smooth"),
}

# (container attribute, linear names, group name); the first linear of a group records the Hessian.
GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv"),
    ("self_attn", ("o_proj",), "o"),
    ("mlp", ("gate_proj", "up_proj"), "ug"),
    ("mlp", ("down_proj",), "d"),
)
LINEAR_NAMES = tuple(n for _, names, _ in GROUPS for n in names)


def fit_block(d: int, g1: int, g2: int) -> tuple[int, int]:
    """(g1, g2) of the GPK / block-affine transform block used on an input of size d: the
    requested g1 * g2 when it divides d, else the largest block that does, found by halving the
    private factor g2 first, then g1 (the rule docs/METHOD.md gives for block Hadamard 128, which
    becomes 64 on SmolLM2's d = 576)."""
    a, b = g1, g2
    while d % (a * b):
        if b > 1:
            b //= 2
        elif a > 1:
            a //= 2
        else:
            raise ValueError(f"no transform block divides d={d}")
    return a, b


def make_transform(method: MethodSpec, d: int, *, g1: int = 8, g2: int = 4, init: str = "hadamard",
                   seed: int = 0) -> Transform:
    """The input transform of one group for ``method``. d: the linear's in_features. A GPK or
    block-affine block g1 * g2 that does not divide d shrinks to one that does (fit_block)."""
    kind = method.transform
    if kind in ("gpk", "block_affine"):
        g1, g2 = fit_block(d, g1, g2)
    if kind == "identity":
        return IdentityTransform(d)
    if kind == "random_hadamard":
        return RandomHadamard(d, seed=seed)
    if kind == "block_hadamard":
        return BlockHadamard(d, method.hadamard_size)
    if kind == "kronecker":
        return KroneckerTransform(d, channel_scale=method.channel_scale,
                                  init=method.transform_init or "identity", seed=seed)
    if kind == "gpk":
        return GPKTransform(d, g1, g2, block=g1 * g2, init=init, channel_scale=method.channel_scale)
    if kind == "block_affine":
        return BlockAffine(d, g1 * g2, init=init, channel_scale=method.channel_scale)
    raise ValueError(f"unknown transform {kind!r}")


class QuantLinear(nnx.Module):
    """Drop-in replacement for ``Linear``: x: [..., d] -> [..., out].

    transform and act_clip may be shared with sibling linears (same Python object).
    """

    def __init__(self, weight, bias, transform: Transform, act_clip: ActClip,
                 weight_clip: WeightClip, spec: QuantSpec, *, record_hessian: bool = False):
        self.weight = FrozenWeight(jnp.asarray(weight, jnp.float32))
        self.bias = nnx.data(None if bias is None else FrozenWeight(jnp.asarray(bias, jnp.float32)))
        self.transform = transform
        self.act_clip = act_clip
        self.weight_clip = weight_clip
        self.spec = spec
        self.deployed = False  # static: True once the weight side is fixed (deploy)
        # static: before deploy, fake-quantize the weight (RTN) in the forward; False trains
        # against full-precision weights (the final GPTQ pass then handles the weight error)
        self.train_weight_quant = True
        self.recording = False  # static: accumulate X^T X of the transformed inputs when True
        d = self.weight.shape[1]
        self.hessian = nnx.data(HessianSum(jnp.zeros((d, d), jnp.float32)) if record_hessian else None)
        self.absmax = nnx.data(InputAbsMax(jnp.zeros((d,), jnp.float32)) if record_hessian else None)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def quantize_input(self, x: jax.Array) -> jax.Array:
        """x: [..., d] -> Q_A(clip(x P)) (x P when activations stay in full precision)."""
        if self.recording and self.absmax is not None:
            flat_x = jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
            self.absmax[...] = jnp.maximum(self.absmax[...], jnp.max(flat_x, axis=0))
        xt = self.transform(x.astype(jnp.float32))
        if self.recording and self.hessian is not None:
            self.hessian[...] = gptq.hessian_update(self.hessian[...], xt)
        s = self.spec
        if s.a_fmt is None:
            return xt
        return mx.fake_quant(self.act_clip(xt), s.a_fmt, block_size=s.block_size,
                             scale_mode=s.scale_mode, rounding=s.rounding)

    def folded_weight(self) -> jax.Array:
        """clip_W(W P^{-T}): [out, d], full precision (the weight GPTQ/RTN then quantizes)."""
        return self.weight_clip(self.transform.fold(self.weight[...]))

    def effective_weight(self) -> jax.Array:
        """The weight the layer multiplies by: fixed after deploy, else RTN fake quantized (or
        the folded full-precision weight with ``train_weight_quant=False``)."""
        if self.deployed:
            return self.weight[...]
        if not self.train_weight_quant:
            return self.folded_weight()
        s = self.spec
        return mx.fake_quant(self.folded_weight(), s.w_fmt, block_size=s.block_size,
                             scale_mode=s.scale_mode, rounding=s.rounding)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", self.quantize_input(x), self.effective_weight())
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)

    def deploy(self, qweight: jax.Array) -> None:
        """Fix the weight side to ``qweight: [out, d]`` (already transformed, clipped, quantized)."""
        if tuple(qweight.shape) != tuple(self.weight.shape):
            raise ValueError(f"qweight shape {qweight.shape} != {self.weight.shape}")
        self.weight[...] = jnp.asarray(qweight, jnp.float32)
        self.deployed = True


def quantize_layer(layer: DecoderLayer, method: MethodSpec | str, spec: QuantSpec, *,
                   g1: int = 8, g2: int = 4, init: str = "hadamard", seed: int = 0,
                   clip_init: float = DEFAULT_CLIP_INIT,
                   record_hessian: bool = False) -> DecoderLayer:
    """Swap the seven linears of ``layer`` (in place) for QuantLinears of ``method``; returns layer.

    One transform and one activation clip per group (qkv, o, ug, d), one weight clip per linear.
    """
    method = METHODS[method] if isinstance(method, str) else method
    for gi, (container_name, names, _group) in enumerate(GROUPS):
        container = getattr(layer, container_name)
        lin0 = getattr(container, names[0])
        if not isinstance(lin0, Linear):
            raise ValueError(f"{container_name}.{names[0]} is already quantized")
        d = lin0.in_features
        transform = make_transform(method, d, g1=g1, g2=g2, init=init, seed=seed * 1000 + gi)
        clip_on = method.clip is not None and method.act_clip and spec.a_fmt is not None
        act_clip = ActClip(d, spec.block_size, init=clip_init, granularity=method.clip or "block",
                           enabled=clip_on)
        for j, name in enumerate(names):
            lin = getattr(container, name)
            wclip = WeightClip(lin.out_features, d, spec.block_size, init=clip_init,
                               granularity=method.clip or "block",
                               enabled=method.clip is not None and method.weight_clip)
            bias = None if lin.bias is None else lin.bias[...]
            q = QuantLinear(lin.weight[...], bias, transform, act_clip, wclip, spec,
                            record_hessian=record_hessian and j == 0)
            setattr(container, name, q)
    return layer


def set_recording(layer: DecoderLayer, on: bool) -> None:
    """Turn Hessian recording of the group heads on or off (resetting the sums when turned on)."""
    for q in group_heads(layer).values():
        if q.hessian is None:
            raise ValueError("the layer was quantized without record_hessian=True")
        if on:
            q.hessian[...] = jnp.zeros_like(q.hessian[...])
            q.absmax[...] = jnp.zeros_like(q.absmax[...])
        q.recording = on


def quant_linears(layer: DecoderLayer) -> dict[str, QuantLinear]:
    """The seven QuantLinears of a quantized layer, by name (q_proj, ..., down_proj)."""
    out = {}
    for container_name, names, _ in GROUPS:
        container = getattr(layer, container_name)
        for name in names:
            out[name] = getattr(container, name)
    return out


def group_heads(layer: DecoderLayer) -> dict[str, QuantLinear]:
    """The first QuantLinear of each group (the one holding the group's Hessian), by group name."""
    return {g: getattr(getattr(layer, c), names[0]) for c, names, g in GROUPS}


def is_trainable(path, value) -> bool:
    """nnx filter: the learnable transform and clipping parameters of a quantized layer."""
    return isinstance(value, nnx.Param) and any(
        p in ("transform", "act_clip", "weight_clip") for p in path)


def num_trainable(layer: DecoderLayer) -> int:
    return int(sum(np.size(v) for v in jax.tree.leaves(nnx.state(layer, is_trainable))))
