"""Quantized linear layers: how each method transforms, clips and quantizes a linear.

A quantized linear computes, for x: [..., d] and W: [out, d],

    y = Q_A(clip_A(x P)) @ Q_W(clip_W(W P^{-T}))^T (+ bias)

where P is the input transform (shared by the linears that read the same input: P_qkv for
q/k/v, P_o, P_ug for gate/up, P_d for down), Q_A / Q_W are MX fake quantizers with
straight-through gradients, and clip_* the learnable block clipping. Without quantization it
equals x @ W^T exactly (up to float rounding).

While calibrating, the weight side is recomputed from the frozen full-precision weight each step,
so gradients reach P and the clipping logits. ``deploy`` then replaces the weight by its packed
MXArray (RTN or GPTQ codes and E8M0 scales), which the forward dequantizes; the layer then runs
only the online activation path. The recipe (settings, methods) lives in ``recipe.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from batquant_jax import fused, mx, transforms
from batquant_jax.clipping import DEFAULT_CLIP_INIT, ActClip, WeightClip
from batquant_jax.models.llama import Attention, DecoderLayer, Linear
from batquant_jax.recipe import METHODS, SETTINGS, CalibConfig, MethodSpec, QuantSpec
from batquant_jax.transforms import Transform, fit_block

__all__ = ["QuantLinear", "QuantSpec", "MethodSpec", "METHODS", "SETTINGS", "GROUPS", "Group",
           "container_of",
           "LINEAR_NAMES", "fit_block", "make_transform", "quantize_layer", "build_quantized_layer", "quant_linears",
           "quant_modules", "group_heads", "set_capture", "packed_weights", "is_trainable", "num_trainable"]


class FrozenWeight(nnx.Variable):
    """A full-precision weight [out, in] that calibration never trains."""


class PackedWeight(nnx.Variable):
    """A deployed weight kept as its ``mx.MXArray`` (packed codes + E8M0 scales, 4.25 bits per
    MXFP4 element); dequantized inside the jitted forward."""


class Group(NamedTuple):
    """Linears of one block that read the same input, so share one input transform and one
    activation clip. container: dotted attribute path from the block to the module holding them
    ("" = the block itself); linears: their attribute names (the first records the group's
    Hessian); name: the group's name in logs and statistics."""

    container: str
    linears: tuple[str, ...]
    name: str


# The Llama / Qwen decoder layer's groups (``layout.LLAMA`` is the whole description).
GROUPS = (
    Group("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv"),
    Group("self_attn", ("o_proj",), "o"),
    Group("mlp", ("gate_proj", "up_proj"), "ug"),
    Group("mlp", ("down_proj",), "d"),
)
LINEAR_NAMES = tuple(n for _, names, _ in GROUPS for n in names)


def container_of(block, path: str):
    """The module at dotted attribute ``path`` of ``block`` ("" = block)."""
    for part in filter(None, path.split(".")):
        block = getattr(block, part)
    return block


def make_transform(method: MethodSpec, d: int, *, g1: int = 8, g2: int = 4, init: str = "hadamard",
                   seed: int = 0) -> Transform:
    """The input transform of one group for ``method`` (``transforms.build`` of its kind).
    d: the linear's in_features. A GPK or block-affine block g1 * g2 that does not divide d
    shrinks to one that does (``transforms.fit_block``)."""
    return transforms.build(method.transform, d, g1=g1, g2=g2, init=init, seed=seed,
                            channel_scale=method.channel_scale,
                            hadamard_size=method.hadamard_size,
                            transform_init=method.transform_init)


class QuantLinear(nnx.Module):
    """Drop-in replacement for a linear layer: x: [..., d] -> [..., out].

    weight: [out, d] (torch layout); transform and act_clip may be shared with sibling linears
    (same Python object). Before ``deploy`` the weight is full precision and fake-quantized in
    the forward (so gradients reach the transform and clipping); after it, the weight is the
    packed ``MXArray`` itself, dequantized inside the forward.

    >>> from flax import nnx
    >>> lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> q = QuantLinear.from_linear(lin, method="brq", setting="W4A8KV16")
    >>> q(jnp.ones((2, 5, 64))).shape
    (2, 5, 32)
    """

    def __init__(self, weight, bias, transform: Transform, act_clip: ActClip,
                 weight_clip: WeightClip, spec: QuantSpec):
        weight = jnp.asarray(weight, jnp.float32)
        if weight.ndim != 2:
            raise ValueError(f"weight must be [out, in], got shape {weight.shape}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = FrozenWeight(weight)
        self.bias = nnx.data(None if bias is None else FrozenWeight(jnp.asarray(bias, jnp.float32)))
        self.transform = transform
        self.act_clip = act_clip
        self.weight_clip = weight_clip
        self.spec = spec
        self.deployed = False  # static: True once the weight is the packed MXArray (deploy)
        # static: before deploy, fake-quantize the weight (RTN) in the forward; False trains
        # against full-precision weights (the final GPTQ pass then handles the weight error)
        self.train_weight_quant = True
        self.capture = False  # static: sow the raw inputs (nnx.Intermediate "inputs") when True

    @classmethod
    def from_linear(cls, linear, method: str | MethodSpec = "batquant",
                    setting: str | QuantSpec = "W4A4KV16", *, transform: Transform | None = None,
                    act_clip: ActClip | None = None, g1: int = 8, g2: int = 4,
                    init: str = "hadamard", seed: int = 0,
                    clip_init: float = DEFAULT_CLIP_INIT) -> "QuantLinear":
        """Wraps a Flax ``nnx.Linear`` (kernel [in, out]) or this package's ``Linear`` (weight
        [out, in]) with ``method``'s transform (or ``transform``: share one between linears that
        read the same input; likewise ``act_clip``), clipping and MX fake quantization at
        ``setting``."""
        if isinstance(linear, nnx.Linear):
            w = jnp.asarray(linear.kernel[...]).T
            b = None if linear.bias is None else linear.bias[...]
        elif isinstance(linear, Linear):
            w, b = linear.dense_weight(), None if linear.bias is None else linear.bias[...]
        else:
            raise TypeError(f"from_linear takes flax.nnx.Linear or batquant_jax Linear, got "
                            f"{type(linear).__name__}")
        method = METHODS[method] if isinstance(method, str) else method
        spec = SETTINGS[setting] if isinstance(setting, str) else setting
        out, d = w.shape
        if transform is None:
            transform = make_transform(method, d, g1=g1, g2=g2, init=init, seed=seed)
        if act_clip is None:
            act_clip = ActClip(d, spec.block_size, init=clip_init,
                               granularity=method.clip or "block",
                               enabled=method.clip is not None and method.act_clip
                               and spec.a_fmt is not None)
        wclip = WeightClip(out, d, spec.block_size, init=clip_init,
                           granularity=method.clip or "block",
                           enabled=method.clip is not None and method.weight_clip)
        return cls(w, b, transform, act_clip, wclip, spec)

    def _clipped_input(self, x: jax.Array) -> jax.Array:
        """x: [..., d] -> clip(x P), what the activation quantizer reads (x P without one)."""
        if self.capture:
            self.sow(nnx.Intermediate, "inputs", x)
        xt = self.transform(x.astype(jnp.float32))
        return xt if self.spec.a_fmt is None else self.act_clip(xt)

    def quantize_input(self, x: jax.Array) -> jax.Array:
        """x: [..., d] -> Q_A(clip(x P)) (x P when activations stay in full precision)."""
        xc = self._clipped_input(x)
        s = self.spec
        return xc if s.a_fmt is None else mx.fake_quant(xc, **s.quant_kwargs("a"))

    def folded_weight(self) -> jax.Array:
        """clip_W(W P^{-T}): [out, d], full precision (the weight GPTQ/RTN then quantizes)."""
        if self.deployed:
            raise ValueError("the layer is deployed: its weight is packed (see packed_weight)")
        return self.weight_clip(self.transform.fold(self.weight[...]))

    @property
    def packed_weight(self) -> mx.MXArray:
        """The deployed weight as its MXArray (codes [out, d/2], scales [out, d/32])."""
        w = self.weight.get_value()
        if not (self.deployed and isinstance(w, mx.MXArray)):
            raise ValueError("the layer holds no packed weight (not deployed, or unpacked)")
        return w

    def effective_weight(self) -> jax.Array:
        """The weight the layer multiplies by: the dequantized packed weight after deploy, else
        RTN fake quantized (or the folded full-precision weight with train_weight_quant=False)."""
        if self.deployed:
            w = self.weight.get_value()
            return mx.dequantize(w) if isinstance(w, mx.MXArray) else w
        if not self.train_weight_quant:
            return self.folded_weight()
        return mx.fake_quant(self.folded_weight(), **self.spec.quant_kwargs("w"))

    def __call__(self, x: jax.Array) -> jax.Array:
        path = None
        if self.deployed:  # a packed weight: maybe the fused product (decided at trace time)
            rows = int(np.prod(x.shape[:-1], dtype=np.int64))
            path = fused.choose(self.weight.get_value(), rows, self.spec.a_fmt)
        if path == "q":  # MXFP4 activations: exact block products of the two code sets
            xq = mx.quantize(self._clipped_input(x), **self.spec.quant_kwargs("a"))
            y = fused.mxfp4_dot_q(xq, self.weight.get_value())
        elif path == "f32":
            y = fused.mxfp4_dot(self.quantize_input(x), self.weight.get_value())
        else:
            y = jnp.einsum("...i,oi->...o", self.quantize_input(x), self.effective_weight())
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)

    def deploy(self, qweight: mx.MXArray) -> None:
        """Fix the weight to ``qweight``, an MXArray of logical shape [out, d] (already
        transformed, clipped and quantized, e.g. ``gptq.gptq_quantize(...).to_mxarray()``);
        the full-precision weight is dropped."""
        if not isinstance(qweight, mx.MXArray):
            raise ValueError(f"deploy takes an mx.MXArray, got {type(qweight).__name__}")
        want = (self.out_features, self.in_features)
        if tuple(qweight.shape) != want or qweight.axis != -1:
            raise ValueError(f"qweight shape {tuple(qweight.shape)} (axis {qweight.axis}) != "
                             f"{want} blocked along the last axis")
        self.weight = PackedWeight(qweight)
        self.deployed = True

    def unpack(self, dtype=jnp.float32) -> None:
        """Replaces the deployed packed weight by its dequantized values in ``dtype`` (a
        FrozenWeight): the same forward, more memory -- for comparisons and benchmarks."""
        w = self.packed_weight
        self.weight = FrozenWeight(mx.dequantize(w, dtype))

    def deploy_placeholder(self) -> None:
        """Deploys zero codes and scales of the right layout (a skeleton to restore into)."""
        s = self.spec
        n_pad = -(-self.in_features // s.block_size) * s.block_size
        width = n_pad // 2 if mx.FORMATS[s.w_fmt].packed else n_pad
        self.deploy(mx.MXArray(jnp.zeros((self.out_features, width), jnp.uint8),
                               jnp.zeros((self.out_features, n_pad // s.block_size), jnp.uint8),
                               s.w_fmt, -1, self.in_features, s.block_size))


def quantize_layer(layer: DecoderLayer, method: MethodSpec | str, spec: QuantSpec | str, *,
                   g1: int = 8, g2: int = 4, init: str = "hadamard", seed: int = 0,
                   clip_init: float = DEFAULT_CLIP_INIT, groups=GROUPS) -> DecoderLayer:
    """Swap the linears of ``layer``'s groups (in place; default the seven of a Llama decoder
    layer) for QuantLinears of ``method``; returns layer.

    One transform and one activation clip per group (qkv, o, ug, d), one weight clip per linear.
    A linear must be a ``flax.nnx.Linear`` or this package's ``Linear`` (TypeError otherwise).
    """
    method = METHODS[method] if isinstance(method, str) else method
    spec = SETTINGS[spec] if isinstance(spec, str) else spec
    for gi, (container_name, names, _group) in enumerate(groups):
        container = container_of(layer, container_name)
        lin0 = getattr(container, names[0])
        where = ".".join(filter(None, (container_name, names[0])))
        if isinstance(lin0, QuantLinear):
            raise ValueError(f"{where} is already quantized")
        if not isinstance(lin0, (Linear, nnx.Linear)):
            raise TypeError(f"{where} is a {type(lin0).__name__}; the groups of a layout name "
                            "flax.nnx.Linear or batquant_jax Linear modules (an nnx.LinearGeneral "
                            "or nnx.Einsum is not a [out, in] matrix: reshape it into a Linear)")
        d = lin0.in_features
        if d % spec.block_size:
            raise ValueError(f"{where} reads {d} input features, not a multiple of the MX block "
                             f"size {spec.block_size}; pad the input (and the weight's columns "
                             "with zeros) to a multiple of it")
        transform = make_transform(method, lin0.in_features, g1=g1, g2=g2, init=init,
                                   seed=seed * 1000 + gi)
        act_clip = None
        for name in names:
            q = QuantLinear.from_linear(getattr(container, name), method, spec,
                                        transform=transform, act_clip=act_clip,
                                        clip_init=clip_init)
            act_clip = q.act_clip  # one activation clip per group
            setattr(container, name, q)
    return layer


def build_quantized_layer(layer: DecoderLayer, cfg: CalibConfig, index: int, *,
                          init: str | None = None, groups=GROUPS) -> DecoderLayer:
    """Swaps ``layer``'s linears (in place) for the QuantLinears of ``cfg``'s method.

    The one place that decides a quantized layer's structure and seeds, so that calibration and
    ``checkpoint.load_quantized`` build identical layers. groups: the block's ``Group`` s
    (default a Llama decoder layer's); a quantized KV cache needs this package's attention.
    """
    layer = quantize_layer(layer, cfg.method_spec, cfg.spec, g1=cfg.g1, g2=cfg.g2,
                           init=init or cfg.start_init, seed=cfg.seed * 100003 + index,
                           clip_init=cfg.clip_init, groups=groups)
    for q in quant_linears(layer, groups).values():
        q.train_weight_quant = cfg.train_weight_quant
    if cfg.spec.kv_fmt is not None:  # keys and values quantized after RoPE (kvquant.py)
        if not isinstance(getattr(layer, "self_attn", None), Attention):
            raise ValueError(f"setting {cfg.setting} quantizes the KV cache, which needs this "
                             "package's Attention in the block (self_attn); use a KV16 setting")
        from batquant_jax.kvquant import KVQuant
        attn = layer.self_attn
        attn.kv_quant = KVQuant(cfg.spec.kv_spec(), attn.num_heads, attn.num_kv_heads,
                                attn.head_dim, transform=cfg.kv_transform)
    return layer


def set_capture(layer: DecoderLayer, on: bool, groups=GROUPS) -> None:
    """Group heads sow their raw inputs (``q.inputs``, an nnx.Intermediate) when ``on``: how
    calibration collects a group's input statistics outside the linears' forward."""
    for q in group_heads(layer, groups).values():
        q.capture = on


def linear_path(group: Group, name: str) -> str:
    """The dotted path of one linear of ``group`` inside its block ("self_attn.q_proj")."""
    return ".".join(filter(None, (group.container, name)))


def quant_linears(layer: DecoderLayer, groups=GROUPS) -> dict[str, QuantLinear]:
    """The QuantLinears of a quantized layer by name: the seven of a Llama layer by attribute
    name (q_proj, ..., down_proj); for other groups by dotted path inside the block."""
    out = {}
    for g in groups:
        container = container_of(layer, g.container)
        for name in g.linears:
            out[name if groups is GROUPS else linear_path(g, name)] = getattr(container, name)
    return out


def quant_modules(module) -> list[QuantLinear]:
    """Every QuantLinear inside ``module`` (a model, a layer, any NNX module), in tree order."""
    return [m for _, m in nnx.iter_modules(module) if isinstance(m, QuantLinear)]


def group_heads(layer: DecoderLayer, groups=GROUPS) -> dict[str, QuantLinear]:
    """The first QuantLinear of each group (whose inputs stand for the group's), by group name."""
    return {g: getattr(container_of(layer, c), names[0]) for c, names, g in groups}


def group_of(groups=GROUPS) -> dict[str, str]:
    """{linear key of ``quant_linears``: its group's name}."""
    return {(n if groups is GROUPS else linear_path(g, n)): g.name for g in groups
            for n in g.linears}


def is_trainable(path, value) -> bool:
    """nnx filter: the learnable transform and clipping parameters of a quantized layer."""
    return isinstance(value, nnx.Param) and any(
        p in ("transform", "act_clip", "weight_clip", "k_transform", "v_transform") for p in path)


def packed_weights(model) -> dict[str, mx.MXArray]:
    """{"layers.{i}.{linear}": MXArray} of every deployed QuantLinear of a model (or
    {"{linear}": MXArray} of one decoder layer)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return {n: q.weight.get_value() for n, q in quant_linears(model).items()
                if isinstance(q, QuantLinear) and isinstance(q.weight.get_value(), mx.MXArray)}
    return {f"layers.{i}.{n}": w for i, layer in enumerate(layers)
            for n, w in packed_weights(layer).items()}


def num_trainable(layer: DecoderLayer) -> int:
    return int(sum(np.size(v) for v in jax.tree.leaves(nnx.state(layer, is_trainable))))
