"""Layer-wise calibration and ``quantize_model`` (docs/METHOD.md, "Calibration").

For each decoder layer l in turn:
  1. inputs x_l: the full-precision outputs of layer l-1 (teacher forcing), or the quantized
     outputs (``propagate="quant"``); targets y_l = layer_l(x_l) in full precision;
  2. swap the layer's linears for QuantLinears of the method (channel scales optionally started
     SmoothQuant-style from one pass over x_l); if the method learns, train its transforms and
     clipping logits with AdamW + cosine decay on the layer objective (``LOSSES``: plain MSE or
     the per-token relative error, optionally weighted by the next RMSNorm's gain),
     straight-through gradients through the MX quantizers; one jitted step per batch;
  3. record the Hessians of the transformed inputs, fold transform and weight clipping into every
     weight and quantize it (GPTQ or RTN); the layer keeps only its online activation path.
Every layer logs its objective before and after training, after weight quantization, and that
of plain RTN on the same layer and data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from batquant_jax import gptq
from batquant_jax.clipping import DEFAULT_CLIP_INIT
from batquant_jax.distributed import DataParallel
from batquant_jax.models.llama import LlamaForCausalLM
from batquant_jax.qlayers import (GROUPS, METHODS, SETTINGS, MethodSpec, QuantSpec, group_heads,
                                  quant_linears, quantize_layer, set_recording)
from batquant_jax.transforms import smooth_init, transform_is_healthy

WEIGHT_QUANTIZERS = ("gptq", "rtn")
PROPAGATIONS = ("fp", "quant")
# "auto": per layer, start from whichever of hadamard / identity has the lower calibration loss
INITS = ("hadamard", "identity", "auto")
TRANSFORMS = ("identity", "random_hadamard", "block_hadamard", "kronecker", "gpk", "block_affine")
CLIPS = ("method", "none", "weights", "activations", "both")
SCALE_INITS = ("method", "ones", "smooth")  # channel scale start (methods with channel_scale)
TRANSFORM_BLOCKS = (16, 32, 64, 128)


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


# The layer objectives by name (CalibConfig.loss); any loss_fn(out, target) -> scalar also works.
LOSSES = {"mse": mse_loss, "token_mse": token_mse_loss}
# What the objective sees of a layer's output: the raw residual stream ("none"), or the residual
# stream times the gain of the RMSNorm that reads it next ("next_norm": the next layer's input
# norm, the final norm after the last layer). Channels that the next norm shrinks (SmolLM2's
# massive-activation channels carry small gains) then weigh what they weigh downstream.
LOSS_WEIGHTS = ("none", "next_norm")


def next_norm_gain(model: LlamaForCausalLM, index: int) -> jax.Array:
    """The gain [d] of the RMSNorm that reads decoder layer ``index``'s output."""
    norm = model.layers[index + 1].input_layernorm if index + 1 < len(model.layers) else model.norm
    return jnp.asarray(norm.weight[...], jnp.float32)


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Hyper-parameters of one calibration run (paper defaults where the paper gives them)."""

    method: str = "batquant"
    setting: str = "W4A4KV16"
    epochs: int = 5
    batch_size: int = 4
    lr: float = 1e-2  # the paper's 2e-3 barely moves the transform in 16 steps (BUILD_NOTES)
    clip_lr: float = 2e-2
    weight_decay: float = 0.0
    g1: int = 8
    g2: int = 4
    init: str = "hadamard"
    clip_init: float = DEFAULT_CLIP_INIT  # clipping logits at start (clipping.py)
    clip: str = "method"    # "method" (the method's own) | none | weights | activations | both
    transform: str | None = None  # override the method's transform (ablations: "block_affine")
    weight_quantizer: str | None = None  # None: the method's own (rtn for "rtn", else gptq)
    propagate: str = "fp"
    scale_mode: str = "floor"
    rounding: str = "even"
    damp: float = 0.01
    seed: int = 0
    max_cond: float = 1e4
    loss: str = "token_mse"  # the layer objective, a name of LOSSES
    scale_init: str = "method"  # "method" (the method's own) | ones | smooth (SmoothQuant-style)
    smooth_alpha: float | None = None  # None: the method's own (0.5; flatquant 0.3)
    loss_weight: str = "none"  # a name of LOSS_WEIGHTS
    # the training objective sees RTN fake-quantized weights (True) or full-precision ones
    # (False: only the activation error is trained; GPTQ handles the weights afterwards)
    train_weight_quant: bool = True

    def validate(self) -> "CalibConfig":
        def one_of(value, valid, what):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        one_of(self.method, tuple(METHODS), "method")
        one_of(self.setting, tuple(SETTINGS), "setting")
        one_of(self.propagate, PROPAGATIONS, "propagate")
        one_of(self.init, INITS, "init")
        if self.weight_quantizer is not None:
            one_of(self.weight_quantizer, WEIGHT_QUANTIZERS, "weight_quantizer")
        one_of(self.clip, CLIPS, "clip")
        one_of(self.loss, tuple(LOSSES), "loss")
        one_of(self.scale_init, SCALE_INITS, "scale_init")
        one_of(self.loss_weight, LOSS_WEIGHTS, "loss_weight")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must lie in [0, 1], got {self.smooth_alpha}")
        if self.transform is not None:
            one_of(self.transform, TRANSFORMS, "transform")
        if self.g1 * self.g2 not in TRANSFORM_BLOCKS:
            raise ValueError(f"g1 * g2 (the transform block; the MX block is 32) must be one of "
                             f"{TRANSFORM_BLOCKS}, got {self.g1} * {self.g2}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if not (self.lr > 0 and self.clip_lr > 0):
            raise ValueError("lr and clip_lr must be positive")
        return self

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


@dataclasses.dataclass
class LayerReport:
    index: int
    loss_rtn: float       # plain RTN (no transform, no clipping) on this layer
    loss_init: float      # the method at its initial parameters, RTN-fake-quantized weights
    loss_trained: float   # after training (best finite parameters), RTN-fake-quantized weights
    loss_final: float     # after the final weight quantization (GPTQ or RTN)
    steps: int
    seconds: float
    fell_back: bool = False  # training diverged or did not improve: earlier parameters kept

    def line(self, n: int) -> str:
        return (f"layer {self.index + 1}/{n}: mse rtn {self.loss_rtn:.4g} | init {self.loss_init:.4g}"
                f" -> trained {self.loss_trained:.4g} -> final {self.loss_final:.4g}"
                f"{' (fell back)' if self.fell_back else ''} [{self.seconds:.1f}s]")


@dataclasses.dataclass
class CalibrationResult:
    config: CalibConfig
    layers: list[LayerReport]
    qweights: dict[str, object]  # "layers.{i}.{linear}" -> mx.MXArray of the deployed weight
    seconds: float


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- jitted kernels
# graphdef is a static argument: layers of one shape share one compiled program.

@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    """One batch x: [bs, T, d] -> layer output [bs, T, d]."""
    return nnx.merge(graphdef, state)(x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sq_err(loss_fn, graphdef, state, x, y, gain):
    """The layer objective ``loss_fn(output * gain, target * gain)`` on one batch; gain: [d]."""
    return loss_fn(nnx.merge(graphdef, state)(x) * gain, y * gain)


@functools.partial(jax.jit, static_argnums=0)
def _record(graphdef, state, x):
    """Runs the layer (Hessian recording on) on one batch; returns the updated state."""
    layer = nnx.merge(graphdef, state)
    layer(x)
    return nnx.state(layer)


def _make_step(tx_t, tx_c, objective=mse_loss):
    @functools.partial(jax.jit, static_argnums=0)
    def step(graphdef, tparams, cparams, opt_t, opt_c, rest, x, y, gain):
        """One optimizer step on a batch x, y: [bs, T, d] (gain: [d], the objective's channel
        weights); returns the new state and the loss."""
        def loss_fn(tp, cp):
            out = nnx.merge(graphdef, tp, cp, rest)(x)
            return objective(out * gain, y * gain)

        loss, (gt, gc) = jax.value_and_grad(loss_fn, argnums=(0, 1))(tparams, cparams)
        ut, opt_t = tx_t.update(gt, opt_t, tparams)
        uc, opt_c = tx_c.update(gc, opt_c, cparams)
        return (optax.apply_updates(tparams, ut), optax.apply_updates(cparams, uc),
                opt_t, opt_c, loss)
    return step


def _is_transform_param(path, value) -> bool:
    return isinstance(value, nnx.Param) and "transform" in path


def _is_clip_param(path, value) -> bool:
    return isinstance(value, nnx.Param) and ("act_clip" in path or "weight_clip" in path)


def _healthy(layer, max_cond: float) -> bool:
    return all(transform_is_healthy(q.transform, max_cond) for q in group_heads(layer).values())


def build_quantized_layer(layer, cfg: CalibConfig, index: int, *, record_hessian: bool = False,
                          init: str | None = None):
    """Swaps ``layer``'s linears (in place) for the QuantLinears of ``cfg``'s method.

    The one place that decides a quantized layer's structure and seeds, so that calibration and
    ``checkpoint.load_quantized`` build identical layers.
    """
    init = init or (cfg.init if cfg.init != "auto" else "hadamard")
    layer = quantize_layer(layer, cfg.method_spec, cfg.spec, g1=cfg.g1, g2=cfg.g2, init=init,
                           seed=cfg.seed * 100003 + index, clip_init=cfg.clip_init,
                           record_hessian=record_hessian)
    for q in quant_linears(layer).values():
        q.train_weight_quant = cfg.train_weight_quant
    return layer


class LayerCalibrator:
    """Calibrates decoder layers one at a time; built once per run so programs compile once."""

    def __init__(self, cfg: CalibConfig, nsamples: int, log: Callable[[str], None] = _stderr,
                 mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg.validate()
        self.log = log
        # mesh: windows and activations split over its data axis (see distributed.py)
        self.dp = None if mesh is None else DataParallel(mesh)
        if self.dp is not None:
            self.dp.check_batch(cfg.batch_size, "batch_size")
        self.steps_per_epoch = nsamples // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"nsamples ({nsamples}) must be >= batch_size ({cfg.batch_size})")
        total = max(1, cfg.epochs * self.steps_per_epoch)
        self.tx_t = optax.adamw(optax.cosine_decay_schedule(cfg.lr, total), weight_decay=cfg.weight_decay)
        self.tx_c = optax.adamw(optax.cosine_decay_schedule(cfg.clip_lr, total), weight_decay=0.0)
        self.loss_fn = LOSSES[cfg.loss]
        self.step_fn = _make_step(self.tx_t, self.tx_c, self.loss_fn)

    def _batches(self, a):
        """[N, T, d] -> [N // bs, bs, T, d] (drops a remainder smaller than one batch)."""
        bs = self.cfg.batch_size
        if self.dp is not None:
            return self.dp.batches(a, bs)
        nb = a.shape[0] // bs
        return a[: nb * bs].reshape(nb, bs, *a.shape[1:])

    def mse(self, layer, xb, yb) -> float:
        """The objective (CalibConfig.loss, weighted by loss_weight) averaged over the batches."""
        graphdef, state = nnx.split(layer)
        gain = self.gain
        total = sum(_sq_err(self.loss_fn, graphdef, state, xb[i], yb[i], gain)
                    for i in range(len(xb)))
        return float(total) / len(xb)

    def outputs(self, layer, xb):
        graphdef, state = nnx.split(layer)
        return jnp.concatenate([_apply(graphdef, state, xb[i]) for i in range(len(xb))])

    def _train(self, layer, xs, ys, index: int, n_layers: int) -> tuple[int, bool, float]:
        """Trains the learnable parameters of ``layer`` in place; returns (steps, fell_back, best)."""
        cfg = self.cfg
        graphdef, tparams, cparams, rest = nnx.split(layer, _is_transform_param, _is_clip_param, ...)
        opt_t, opt_c = self.tx_t.init(tparams), self.tx_c.init(cparams)
        if self.dp is not None:
            opt_t, opt_c = jax.tree.map(self.dp.put, (opt_t, opt_c))
        best = (math.inf, jax.tree.map(jnp.copy, tparams), jax.tree.map(jnp.copy, cparams))
        fell_back, steps, t0 = False, 0, time.time()
        rng = np.random.default_rng([cfg.seed, index])  # per layer: a resumed run draws the same
        for ep in range(cfg.epochs):
            order = rng.permutation(xs.shape[0])[: self.steps_per_epoch * cfg.batch_size]
            losses = []
            for idx in order.reshape(self.steps_per_epoch, cfg.batch_size):
                if self.dp is not None:  # the batch split over data: XLA all-reduces the grads
                    x, y = self.dp.take(xs, idx), self.dp.take(ys, idx)
                else:
                    idx = jnp.asarray(idx)
                    x, y = xs[idx], ys[idx]
                tparams, cparams, opt_t, opt_c, loss = self.step_fn(
                    graphdef, tparams, cparams, opt_t, opt_c, rest, x, y, self.gain)
                losses.append(loss)
            steps += self.steps_per_epoch
            loss = float(jnp.mean(jnp.stack(losses)))
            nnx.update(layer, tparams, cparams)
            ok = math.isfinite(loss) and _healthy(
                layer if self.dp is None else self.dp.to_local(nnx.clone(layer)), cfg.max_cond)
            if ok and loss < best[0]:
                best = (loss, jax.tree.map(jnp.copy, tparams), jax.tree.map(jnp.copy, cparams))
            elif not ok:
                fell_back = True
                self.log(f"warning: layer {index + 1}: non-finite loss or ill-conditioned transform "
                         f"at epoch {ep + 1}; keeping the best finite parameters")
                break
            rate = (time.time() - t0) / steps
            self.log(f"layer {index + 1}/{n_layers} epoch {ep + 1}/{cfg.epochs} step {steps} "
                     f"train mse {loss:.4g} ({rate:.2f}s/step)")
        nnx.update(layer, best[1], best[2])
        return steps, fell_back, best[0]

    def calibrate(self, fp_layer, xs, index: int, n_layers: int, next_gain=None):
        """Quantizes ``fp_layer`` given its inputs xs: [N, T, d].

        next_gain: [d], the gain of the RMSNorm that reads this layer's output
        (``next_norm_gain``); used by ``loss_weight="next_norm"``, required then.
        Returns (quantized layer, its outputs on xs for the next layer, LayerReport, qweights).
        """
        cfg, spec, method = self.cfg, self.cfg.spec, self.cfg.method_spec
        d = xs.shape[-1]
        if cfg.loss_weight == "next_norm":
            if next_gain is None:
                raise ValueError('loss_weight="next_norm" needs next_gain (next_norm_gain)')
            self.gain = jnp.asarray(next_gain, jnp.float32).reshape(d)
        else:
            self.gain = jnp.ones((d,), jnp.float32)
        if self.dp is not None:
            self.gain = self.dp.put(self.gain)
        t0 = time.time()
        xb = self._batches(xs)
        ys = self.outputs(fp_layer, xb)
        yb = self._batches(ys)

        rtn = self._placed(quantize_layer(nnx.clone(fp_layer), "rtn", spec))
        loss_rtn = self.mse(rtn, xb, yb)
        del rtn
        layer = self._start(fp_layer, xb, index)
        plain_rtn = method == METHODS["rtn"]  # the layer is the RTN one: no loss to recompute
        loss_init = loss_rtn if plain_rtn else self.mse(layer, xb, yb)
        if cfg.init == "auto" and method.train:
            alt = self._start(fp_layer, xb, index, init="identity")
            loss_alt = self.mse(alt, xb, yb)
            if loss_alt < loss_init:
                self.log(f"layer {index + 1}: identity init ({loss_alt:.4g}) beats hadamard "
                         f"({loss_init:.4g})")
                layer, loss_init = alt, loss_alt
        steps, fell_back, loss_trained = 0, False, loss_init
        if method.train and cfg.epochs > 0:
            start = jax.tree.map(jnp.copy, nnx.state(layer, nnx.Param))
            steps, fell_back, _ = self._train(layer, xs[: xb.shape[0] * cfg.batch_size],
                                              ys[: yb.shape[0] * cfg.batch_size], index, n_layers)
            loss_trained = self.mse(layer, xb, yb)
            if not loss_trained <= loss_init:  # training may only improve on its start (or NaN)
                self.log(f"layer {index + 1}: trained loss {loss_trained:.4g} is not below the "
                         f"initial {loss_init:.4g}; keeping the initial transform")
                nnx.update(layer, start)
                loss_trained, fell_back = loss_init, True

        qweights = self.deploy(layer, xb)
        loss_final = loss_rtn if plain_rtn else self.mse(layer, xb, yb)
        report = LayerReport(index, loss_rtn, loss_init, loss_trained, loss_final, steps,
                             time.time() - t0, fell_back)
        next_x = ys if cfg.propagate == "fp" else self.outputs(layer, xb)
        return layer, next_x, report, qweights

    def _start(self, fp_layer, xb, index: int, init: str | None = None):
        """A placed quantized copy of ``fp_layer`` at its initial parameters (channel scales
        SmoothQuant-started when the method says so)."""
        method = self.cfg.method_spec
        layer = self._placed(build_quantized_layer(nnx.clone(fp_layer), self.cfg, index,
                                                   record_hessian=True, init=init))
        if method.channel_scale and method.scale_init == "smooth":
            self.smooth_scales(layer, xb, method.smooth_alpha)
        return layer

    def _record_pass(self, layer, xb) -> None:
        """Runs ``layer`` over every batch with recording on: fills the group heads' Hessian
        sums and input abs-maxima."""
        set_recording(layer, True)
        graphdef, state = nnx.split(layer)
        for x in (xb[i] for i in range(len(xb))):  # indexing works across hosts
            state = _record(graphdef, state, x)
        nnx.update(layer, state)
        set_recording(layer, False)

    def smooth_scales(self, layer, xb, alpha: float) -> None:
        """SmoothQuant-style start of every group's channel scale: ``s = max|x|^alpha /
        max|W|^(1 - alpha)`` per input channel, x over the calibration batches, W over the
        group's linears (the transforms' scales must still be ones)."""
        self._record_pass(layer, xb)
        group_of = {n: g for _, names, g in GROUPS for n in names}
        w_max = {}
        for name, q in quant_linears(layer).items():
            m = jnp.max(jnp.abs(q.weight[...]), axis=0)
            g = group_of[name]
            w_max[g] = m if g not in w_max else jnp.maximum(w_max[g], m)
        for g, q in group_heads(layer).items():
            q.transform.set_scale(np.asarray(smooth_init(q.absmax[...], w_max[g], alpha)))

    def _placed(self, layer):
        return layer if self.dp is None else self.dp.put_module(layer)

    def deploy(self, layer, xb) -> dict[str, object]:
        """Fold transforms + weight clipping into the weights and quantize them (GPTQ or RTN)."""
        cfg, spec, method = self.cfg, self.cfg.spec, self.cfg.method_spec
        hessians = {}
        if method.weights == "gptq":
            self._record_pass(layer, xb)
            hessians = {g: q.hessian[...] for g, q in group_heads(layer).items()}
        if self.dp is not None:  # fold and GPTQ on one local device, the same in every process
            self.dp.to_local(layer)
            hessians = {g: q.hessian[...] for g, q in group_heads(layer).items()}
        group_of = {n: g for _, names, g in GROUPS for n in names}
        qweights = {}
        kw = dict(fmt=spec.w_fmt, block_size=spec.block_size, scale_mode=spec.scale_mode,
                  rounding=spec.rounding)
        for name, q in quant_linears(layer).items():
            w = jnp.asarray(q.transform.fold_f64(np.asarray(q.weight[...])), jnp.float32)
            w = q.weight_clip(w)
            if method.weights == "gptq":
                res = gptq.gptq_quantize(w, hessians[group_of[name]], damp=cfg.damp, **kw)
            else:
                res = gptq.rtn_quantize(w, **kw)
            q.deploy(res.weight)
            qweights[name] = res.to_mxarray()
        for q in group_heads(layer).values():  # the sums are no longer needed
            q.hessian = q.absmax = None
        self._placed(layer)
        return qweights


def quantize_model(model: LlamaForCausalLM, calib_tokens, method: str = "batquant",
                   setting: str = "W4A4KV16", *, log: Callable[[str], None] = _stderr,
                   on_layer_done: Callable | None = None, start_layer: int = 0,
                   start_inputs=None, mesh: jax.sharding.Mesh | None = None,
                   **hparams) -> tuple[LlamaForCausalLM, CalibrationResult]:
    """Quantizes every decoder layer of ``model`` in place with ``method`` at ``setting``.

    calib_tokens: int32 [N, T] calibration windows. hparams: any CalibConfig field.
    on_layer_done(i, layer, next_inputs, report, qweights) is called after each layer (resume
    support: ``start_layer`` / ``start_inputs`` continue a run whose first layers are done).
    mesh: a ``distributed.make_mesh`` mesh: the model is placed on it, the windows (a host
    array, the same in every process, or a global array) and activations split over its data
    axis; the windows are cut to whole batches (the later layers see only those anyway).
    Returns (model, CalibrationResult).
    """
    cfg = CalibConfig(method=method, setting=setting, **hparams).validate()
    if mesh is not None:
        dp = DataParallel(mesh)
        dp.check_batch(cfg.batch_size, "batch_size")
        keep = calib_tokens.shape[0] // cfg.batch_size * cfg.batch_size
        tokens = dp.put(calib_tokens[:keep], dp.rows()) if isinstance(calib_tokens, jax.Array) \
            else dp.shard_rows(np.asarray(calib_tokens, np.int32)[:keep])
        dp.put_module(model)
        if start_inputs is not None:
            start_inputs = dp.put(start_inputs, dp.rows()) if isinstance(start_inputs, jax.Array) \
                else dp.shard_rows(np.asarray(start_inputs)[:keep])
    else:
        tokens = jnp.asarray(np.asarray(calib_tokens, np.int32))
    if tokens.ndim != 2:
        raise ValueError(f"calib_tokens must be [N, T], got shape {tokens.shape}")
    n_layers = len(model.layers)
    cal = LayerCalibrator(cfg, tokens.shape[0], log, mesh)
    t0 = time.time()
    xs = model.embed(tokens) if start_inputs is None else jnp.asarray(start_inputs)
    if mesh is not None:
        xs = dp.put(xs, dp.rows())
    reports, qweights = [], {}
    for i in range(start_layer, n_layers):
        layer, xs, rep, qw = cal.calibrate(model.layers[i], xs, i, n_layers,
                                           next_norm_gain(model, i))
        model.layers[i] = layer
        reports.append(rep)
        qweights.update({f"layers.{i}.{k}": v for k, v in qw.items()})
        done = i + 1 - start_layer
        eta = (time.time() - t0) / done * (n_layers - i - 1)
        log(rep.line(n_layers) + f" elapsed {time.time() - t0:.0f}s, eta {eta:.0f}s")
        if on_layer_done is not None:
            on_layer_done(i, layer, xs, rep, qw)
    return model, CalibrationResult(cfg, reports, qweights, time.time() - t0)
