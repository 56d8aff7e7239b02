"""The quantization recipe: what is quantized (settings), how (methods), and with which
hyper-parameters (CalibConfig). Every name, default and check lives here, once.

Each config validates itself when built; a bad value raises ``RecipeError`` (a ValueError) whose
message is one line and whose ``field`` names the offending field, so a command line can say
``--lr=...`` where the library says ``lr``. The checkpoint code depends on this module (to
rebuild a quantized model's skeleton), not on the training code.

>>> cfg = CalibConfig(method="brq", setting="W4A8KV16", epochs=0)
>>> cfg.spec.a_fmt, cfg.method_spec.transform
('mxfp8', 'block_hadamard')
>>> CalibConfig(method="awq")
Traceback (most recent call last):
...
batquant_jax.recipe.RecipeError: unknown method 'awq'; valid: rtn, gptq, quarot, brq, mr-gptq, flatquant, batquant
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from batquant_jax.errors import UserError
from batquant_jax import mx
from batquant_jax.clipping import DEFAULT_CLIP_INIT
from batquant_jax.kvquant import TRANSFORMS as KV_TRANSFORMS  # defined once, in kvquant
from batquant_jax.transforms import REGISTRY as TRANSFORMS

CLIP_GRANULARITIES = ("block", "tensor")
WEIGHT_QUANTIZERS = ("gptq", "rtn")
PROPAGATIONS = ("fp", "quant")
# "auto": per layer, start from whichever of hadamard / identity has the lower calibration loss
INITS = ("hadamard", "identity", "auto")
CLIPS = ("method", "none", "weights", "activations", "both")
SCALE_INITS = ("method", "ones", "smooth")  # channel scale start (methods with channel_scale)
TRANSFORM_BLOCKS = (16, 32, 64, 128)
LOSS_WEIGHTS = ("none", "next_norm")


class RecipeError(UserError):
    """A bad recipe value. ``fields``: the names of the fields the message speaks of (as words
    of the message); ``value`` / ``valid``: the bad value and, for a choice, the valid ones."""

    def __init__(self, msg: str, fields: str | tuple[str, ...] = (), value: Any = None,
                 valid: tuple | None = None):
        super().__init__(msg)
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.value, self.valid = value, valid

    def flag_message(self) -> str:
        """The message in command-line terms: "--method=awq is unknown; valid: ...", or the
        message with each field written as its flag ("--lr must be ...")."""
        if self.valid is not None:
            return (f"--{self.fields[0]}={self.value} is unknown; valid: "
                    f"{', '.join(map(str, self.valid))}")
        msg = str(self)
        for f in self.fields:
            msg = re.sub(rf"(?<![-\w]){re.escape(f)}(?!\w)", f"--{f}", msg)
        return msg


def one_of(value, valid, field: str) -> None:
    """RecipeError "unknown {field} {value!r}; valid: ..." unless value is in valid."""
    if value not in valid:
        raise RecipeError(f"unknown {field} {value!r}; valid: {', '.join(map(str, valid))}",
                          field, value, tuple(valid))


# ----------------------------------------------------------------------------- layer objectives

def mse_loss(out: jax.Array, target: jax.Array) -> jax.Array:
    """Plain mean squared error over every element of out, target: [..., T, d]."""
    return jnp.mean(jnp.square(out - target))


def token_mse_loss(out: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-token relative error, averaged over tokens: mean_t ||out_t - y_t||^2 / ||y_t||^2.

    out, target: [..., T, d]. Every token weighs the same, however large its hidden state: the
    attention-sink token (position 0) and other massive-activation tokens, whose residual stream
    is orders of magnitude above the rest, no longer own the loss. It is also the error the next
    layer sees, since that layer RMS-normalises each token before its linears.
    """
    err = jnp.sum(jnp.square(out - target), axis=-1)
    energy = jnp.sum(jnp.square(target), axis=-1)
    return jnp.mean(err / (energy + eps * target.shape[-1]))


# The layer objectives by name (CalibConfig.loss). Register your own here, or pass any
# ``loss_fn(output, target) -> scalar`` to ``quantize_model``.
LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "mse": mse_loss, "token_mse": token_mse_loss}
# CalibConfig.loss of a run whose objective was a ``loss_fn`` passed to quantize_model
CUSTOM_LOSS = "custom"


# ----------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What is quantized and how: weight and activation MX formats (a_fmt None = activations
    stay in full precision), the shared-scale rule, element rounding and the MX block."""

    w_fmt: str = "mxfp4"
    a_fmt: str | None = "mxfp4"
    scale_mode: str = "floor"
    rounding: str = "even"
    block_size: int = 32
    kv_fmt: str | None = None  # keys (after RoPE) and values, per token along head_dim

    def __post_init__(self):
        one_of(self.w_fmt, tuple(mx.FORMATS), "w_fmt")
        for name in ("a_fmt", "kv_fmt"):
            if getattr(self, name) is not None:
                one_of(getattr(self, name), tuple(mx.FORMATS), name)
        one_of(self.scale_mode, mx.SCALE_MODES, "scale_mode")
        one_of(self.rounding, mx.ROUNDINGS, "rounding")
        if self.block_size < 1:
            raise RecipeError(f"block_size must be >= 1, got {self.block_size}", "block_size",
                              self.block_size)

    def quant_kwargs(self, which: str = "w") -> dict:
        """The ``mx.fake_quant`` / ``mx.quantize`` keywords of the weights ("w") or activations."""
        return dict(fmt=self.w_fmt if which == "w" else self.a_fmt, block_size=self.block_size,
                    scale_mode=self.scale_mode, rounding=self.rounding)


    def kv_spec(self):
        """The ``kvquant.KVSpec`` of the keys and values (KV16: no quantization)."""
        from batquant_jax.kvquant import KVSpec
        return KVSpec(self.kv_fmt, self.kv_fmt, self.block_size, self.scale_mode, self.rounding)


# W{weights}A{activations}KV{keys and values}: MXFP4 = 4, MXFP8 (E4M3) = 8, 16 = full precision
SETTINGS = {
    "W4A4KV16": QuantSpec(w_fmt="mxfp4", a_fmt="mxfp4"),
    "W4A8KV16": QuantSpec(w_fmt="mxfp4", a_fmt="mxfp8"),
    "W4A16": QuantSpec(w_fmt="mxfp4", a_fmt=None),
    "W4A8KV8": QuantSpec(w_fmt="mxfp4", a_fmt="mxfp8", kv_fmt="mxfp8"),
    "W4A8KV4": QuantSpec(w_fmt="mxfp4", a_fmt="mxfp8", kv_fmt="mxfp4"),
    "W4A4KV8": QuantSpec(w_fmt="mxfp4", a_fmt="mxfp4", kv_fmt="mxfp8"),
    "W4A4KV4": QuantSpec(w_fmt="mxfp4", a_fmt="mxfp4", kv_fmt="mxfp4"),
}


# ----------------------------------------------------------------------------- methods

@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method: input transform, clipping, training, weight quantizer (docs/METHOD.md).

    transform: a name of TRANSFORMS (``transforms.REGISTRY``, built by ``transforms.build``);
    clip: None | "block" | "tensor" (granularity of the learnable clipping).
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

    def __post_init__(self):
        one_of(self.transform, tuple(TRANSFORMS), "transform")
        if self.clip is not None:
            one_of(self.clip, CLIP_GRANULARITIES, "clip")
        one_of(self.weights, WEIGHT_QUANTIZERS, "weight_quantizer")
        one_of(self.scale_init, ("ones", "smooth"), "scale_init")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise RecipeError(f"smooth_alpha must lie in [0, 1], got {self.smooth_alpha}",
                              "smooth_alpha", self.smooth_alpha)


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


def register_method(name: str, spec: MethodSpec, *, replace: bool = False) -> None:
    """Adds a method that ``quantize_model``, ``CalibConfig`` and the checkpoint loader know by
    ``name``: any MethodSpec, its transform any kind of ``transforms.REGISTRY`` (register new
    kinds with ``transforms.register``). ``replace=True`` redefines an existing name.

    >>> register_method("brq64", MethodSpec(transform="block_hadamard", hadamard_size=64))
    >>> CalibConfig(method="brq64").method_spec.hadamard_size
    64
    >>> del METHODS["brq64"]
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", name):
        raise RecipeError(f"a method name is letters, digits, '_', '.', '-', got {name!r}",
                          "method", name)
    if not isinstance(spec, MethodSpec):
        raise RecipeError(f"spec must be a MethodSpec, got {type(spec).__name__}", "method", name)
    if name in METHODS and not replace:
        raise RecipeError(f"method {name!r} exists; pass replace=True to redefine it",
                          "method", name)
    METHODS[name] = spec


# ----------------------------------------------------------------------------- one run

def _help(text: str) -> dict:
    return {"help": text}


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Hyper-parameters of one calibration run (the paper's where it gives them). Each field's
    ``metadata["help"]`` is its command-line help; the calibrate command builds its flags from
    these fields."""

    method: str = dataclasses.field(default="batquant", metadata=_help(
        "quantization method: " + ", ".join(METHODS)))
    setting: str = dataclasses.field(default="W4A4KV16", metadata=_help(
        "quantization setting: " + ", ".join(SETTINGS)))
    epochs: int = dataclasses.field(default=5, metadata=_help(
        "training epochs per layer (learned methods)"))
    batch_size: int = dataclasses.field(default=4, metadata=_help("windows per training step"))
    # the paper's 2e-3 barely moves the transform in 16 steps (BUILD_NOTES)
    lr: float = dataclasses.field(default=1e-2, metadata=_help(
        "learning rate of the transforms (AdamW, cosine decay)"))
    clip_lr: float = dataclasses.field(default=2e-2, metadata=_help(
        "learning rate of the clipping logits"))
    weight_decay: float = dataclasses.field(default=0.0, metadata=_help(
        "AdamW weight decay of the transforms"))
    anchor: float = dataclasses.field(default=0.0, metadata=_help(
        "decay of the transforms towards their start (decoupled, like AdamW's weight decay but "
        "pulling to the initial transform instead of zero; 0: none)"))
    g1: int = dataclasses.field(default=8, metadata=_help(
        "GPK global factor size (g1 * g2: " + ", ".join(map(str, TRANSFORM_BLOCKS)) + ")"))
    g2: int = dataclasses.field(default=4, metadata=_help(
        "GPK private factor size (g1 * g2: " + ", ".join(map(str, TRANSFORM_BLOCKS)) + ")"))
    init: str = dataclasses.field(default="hadamard", metadata=_help(
        "transform initialisation: hadamard, identity, or auto (per layer, the lower "
        "calibration loss)"))
    clip_init: float = dataclasses.field(default=DEFAULT_CLIP_INIT, metadata=_help(
        "initial clipping logit (sigmoid(8) = 0.9997 of the block max/min; the paper's 4.0 "
        "clips 1.8%)"))
    clip: str = dataclasses.field(default="method", metadata=_help(
        "clipping: " + ", ".join(CLIPS) + " (method = the method's own)"))
    transform: str | None = dataclasses.field(default=None, metadata=_help(
        "override the method's transform: " + ", ".join(TRANSFORMS)))
    weight_quantizer: str | None = dataclasses.field(default=None, metadata=_help(
        "gptq or rtn (default: the method's own)"))
    propagate: str = dataclasses.field(default="fp", metadata=_help(
        "inputs of the next layer: fp or quant outputs"))
    scale_mode: str = dataclasses.field(default="floor", metadata=_help(
        "MX shared-scale rule: " + ", ".join(mx.SCALE_MODES)))
    rounding: str = dataclasses.field(default="even", metadata=_help(
        "MX element rounding: " + ", ".join(mx.ROUNDINGS)))
    damp: float = dataclasses.field(default=0.01, metadata=_help(
        "GPTQ dampening (fraction of the mean Hessian diagonal)"))
    seed: int = dataclasses.field(default=0, metadata=_help(
        "seed of the calibration windows, the training order and random transforms"))
    max_cond: float = dataclasses.field(default=1e4, metadata=_help(
        "a trained transform above this condition number falls back to its best earlier state"))
    loss: str = dataclasses.field(default="token_mse", metadata=_help(
        "layer objective: " + ", ".join(LOSSES) + " (token_mse: per-token relative error, "
        "every token weighs the same)"))
    scale_init: str = dataclasses.field(default="method", metadata=_help(
        "channel scale start: " + ", ".join(SCALE_INITS) + " (smooth: SmoothQuant-style from "
        "the calibration activation maxima)"))
    smooth_alpha: float | None = dataclasses.field(default=None, metadata=_help(
        "SmoothQuant alpha of --scale_init=smooth (default: the method's own, 0.5; "
        "flatquant 0.3)"))
    loss_weight: str = dataclasses.field(default="none", metadata=_help(
        "channel weights of the objective: " + ", ".join(LOSS_WEIGHTS) + " (next_norm: the "
        "gain of the RMSNorm that reads the layer's output)"))
    kv_transform: str = dataclasses.field(default="none", metadata=_help(
        "transform of keys and values along head_dim in the KV-quantized settings: "
        + ", ".join(KV_TRANSFORMS) + " (learned: GPK started at block Hadamard, trained with "
        "the layer; K's inverse goes to the queries, V's to the attention output)"))
    # the training objective sees RTN fake-quantized weights (True) or full-precision ones
    # (False: only the activation error is trained; GPTQ handles the weights afterwards)
    train_weight_quant: bool = dataclasses.field(default=True, metadata=_help(
        "train against RTN-quantized weights (else full-precision ones)"))

    MAX_CLIP_LOGIT = 16.0  # beyond, sigmoid(logit) rounds to 1 in float32: logits cannot learn

    def __post_init__(self):
        one_of(self.method, tuple(METHODS), "method")
        one_of(self.setting, tuple(SETTINGS), "setting")
        one_of(self.propagate, PROPAGATIONS, "propagate")
        one_of(self.init, INITS, "init")
        if self.weight_quantizer is not None:
            one_of(self.weight_quantizer, WEIGHT_QUANTIZERS, "weight_quantizer")
        one_of(self.clip, CLIPS, "clip")
        one_of(self.loss, tuple(LOSSES) + (CUSTOM_LOSS,), "loss")
        one_of(self.scale_init, SCALE_INITS, "scale_init")
        one_of(self.loss_weight, LOSS_WEIGHTS, "loss_weight")
        one_of(self.scale_mode, mx.SCALE_MODES, "scale_mode")
        one_of(self.rounding, mx.ROUNDINGS, "rounding")
        one_of(self.kv_transform, KV_TRANSFORMS, "kv_transform")
        if self.transform is not None:
            one_of(self.transform, tuple(TRANSFORMS), "transform")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise RecipeError(f"smooth_alpha must lie in [0, 1], got {self.smooth_alpha}",
                              "smooth_alpha", self.smooth_alpha)
        if self.g1 * self.g2 not in TRANSFORM_BLOCKS:
            raise RecipeError(f"g1 * g2 (the transform block) must be one of "
                              f"{', '.join(map(str, TRANSFORM_BLOCKS))}, got {self.g1} * "
                              f"{self.g2} = {self.g1 * self.g2}", ("g1", "g2"))
        if self.epochs < 0:
            raise RecipeError(f"epochs must be >= 0, got {self.epochs}", "epochs", self.epochs)
        if self.batch_size < 1:
            raise RecipeError(f"batch_size must be >= 1, got {self.batch_size}", "batch_size",
                              self.batch_size)
        for name in ("lr", "clip_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise RecipeError(f"{name} must be a finite number > 0, got {value}", name, value)
        if not (math.isfinite(self.clip_init) and abs(self.clip_init) <= self.MAX_CLIP_LOGIT):
            raise RecipeError(f"clip_init must be a finite logit in [-{self.MAX_CLIP_LOGIT:g}, "
                              f"{self.MAX_CLIP_LOGIT:g}], got {self.clip_init}", "clip_init",
                              self.clip_init)
        for name in ("weight_decay", "anchor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise RecipeError(f"{name} must be a finite number >= 0, got {value}", name,
                                  value)
        if not (math.isfinite(self.max_cond) and self.max_cond >= 1):
            raise RecipeError(f"max_cond must be a finite number >= 1 (a condition number), got "
                              f"{self.max_cond}", "max_cond", self.max_cond)
        if not (math.isfinite(self.damp) and self.damp >= 0):
            raise RecipeError(f"damp must be a finite number >= 0, got {self.damp}", "damp",
                              self.damp)

    def validate(self) -> "CalibConfig":
        """Kept for callers of the earlier API: a built CalibConfig is already valid."""
        return self

    @classmethod
    def from_fields(cls, fields: dict) -> "CalibConfig":
        """From recorded fields (a checkpoint's); fields this version lacks are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    @property
    def spec(self) -> QuantSpec:
        return dataclasses.replace(SETTINGS[self.setting], scale_mode=self.scale_mode,
                                   rounding=self.rounding)

    @property
    def method_spec(self) -> MethodSpec:
        m = METHODS[self.method]
        if self.weight_quantizer is not None:
            m = dataclasses.replace(m, weights=self.weight_quantizer)
        if self.transform is not None:
            m = dataclasses.replace(m, transform=self.transform)
        if self.scale_init != "method":
            m = dataclasses.replace(m, scale_init=self.scale_init)
        if self.smooth_alpha is not None:
            m = dataclasses.replace(m, smooth_alpha=self.smooth_alpha)
        if self.clip == "none":
            m = dataclasses.replace(m, clip=None)
        elif self.clip != "method":
            m = dataclasses.replace(m, clip=m.clip or "block",
                                    act_clip=self.clip in ("activations", "both"),
                                    weight_clip=self.clip in ("weights", "both"))
        return m

    @property
    def start_init(self) -> str:
        """The transform start of a layer built outside calibration (``auto`` resolves to
        hadamard; calibration may then pick identity per layer and record it)."""
        return self.init if self.init != "auto" else "hadamard"
