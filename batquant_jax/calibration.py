"""Layer-wise calibration and ``quantize_model`` (docs/METHOD.md, "Calibration").

The recipe (methods, settings, CalibConfig, the named layer objectives) is ``recipe.py``; this
module is the algorithm. It talks to a placement (``distributed.placement``: one device, or
data-parallel over a mesh) and never branches on which one it has.

For each decoder layer l in turn:
  1. inputs x_l: the full-precision outputs of layer l-1 (teacher forcing), or the quantized
     outputs (``propagate="quant"``); targets y_l = layer_l(x_l) in full precision;
  2. swap the layer's linears for QuantLinears of the method (channel scales optionally started
     SmoothQuant-style from one pass over x_l); if the method learns, train its transforms and
     clipping logits with any optax optimizer (default AdamW + cosine decay) on the layer
     objective (``LOSSES``: plain MSE or the per-token relative error, optionally weighted by
     the next RMSNorm's gain; or any ``loss_fn``), straight-through gradients through the MX
     quantizers; one jitted step per batch, the batches driven from Python;
  3. capture each group's inputs and compute the Hessians of the transformed inputs outside
     the linears, fold transform and weight clipping into every weight and quantize it (GPTQ
     or RTN); each linear then holds its packed MXArray and the online activation path.
Every layer logs its objective before and after training, after weight quantization, and that
of plain RTN on the same layer and data.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from batquant_jax import gptq
from batquant_jax.distributed import placement
from batquant_jax.models.llama import LlamaForCausalLM
from batquant_jax.layout import LLAMA, Layout
from batquant_jax.qlayers import (GROUPS, build_quantized_layer, group_heads, group_of,
                                  quant_linears, quantize_layer, set_capture)
from batquant_jax.recipe import (CLIPS, CUSTOM_LOSS, INITS, LOSS_WEIGHTS, LOSSES, METHODS,  # noqa: F401
                                 PROPAGATIONS,
                                 SCALE_INITS, SETTINGS, TRANSFORM_BLOCKS, TRANSFORMS,
                                 WEIGHT_QUANTIZERS, CalibConfig, mse_loss, token_mse_loss)
from batquant_jax.transforms import smooth_init, transform_is_healthy

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def next_norm_gain(model: LlamaForCausalLM, index: int) -> jax.Array:
    """The gain [d] of the RMSNorm that reads decoder layer ``index``'s output."""
    return LLAMA.next_gain(model, index)


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

    def line(self, n: int, loss_name: str = "loss") -> str:
        return (f"layer {self.index + 1}/{n}: {loss_name} rtn {self.loss_rtn:.4g} | init "
                f"{self.loss_init:.4g}"
                f" -> trained {self.loss_trained:.4g} -> final {self.loss_final:.4g}"
                f"{' (fell back)' if self.fell_back else ''} [{self.seconds:.1f}s]")


@dataclasses.dataclass
class CalibrationResult:
    """What ``quantize_model`` did: the config, one report per layer, the wall time, and the
    name of the layer objective (a LOSSES name or the ``loss_fn`` passed in)."""

    config: CalibConfig
    layers: list[LayerReport]
    seconds: float
    loss_name: str = ""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _loss_name(fn) -> str:
    """A loss function's name; a ``functools.partial`` is named after what it wraps,
    "partial(huber)"."""
    if isinstance(fn, functools.partial):
        return f"partial({_loss_name(fn.func)})"
    return getattr(fn, "__name__", None) or type(fn).__name__


def release_free_heap() -> bool:
    """Hands the C heap's free pages back to the system (glibc ``malloc_trim(0)``); True if
    any were. Between layers: the host side of a layer (numpy folds, GPTQ, checkpoint writes,
    XLA:CPU's buffers) frees its memory into glibc's heap, which keeps it: without this, a
    28-layer calibration of a 1.5B model peaked about 60 MiB higher with every layer (5.8 GiB
    at the end against 4.3 GiB in its first layer; 4.45 GiB with it). A no-op returning False
    without glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(trim(0))


# ----------------------------------------------------------------------------- jitted kernels
# graphdef is a static argument: layers of one shape share one compiled program.

@functools.partial(jax.jit, static_argnums=0)
def apply_layer(graphdef, state, x):
    """One batch x: [bs, T, d] -> layer output [bs, T, d]."""
    return nnx.merge(graphdef, state)(x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sq_err(loss_fn, graphdef, state, x, y, gain):
    """The layer objective ``loss_fn(output * gain, target * gain)`` on one batch; gain: [d]."""
    return loss_fn(nnx.merge(graphdef, state)(x) * gain, y * gain)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _group_stats(groups, graphdef, state, x, stats):
    """Runs the layer (group heads capturing their inputs) on one batch x: [bs, T, d] and adds
    each group's transformed-input Hessian X^T X and raw input max |x| to ``stats``
    ({group: (H [d, d], absmax [d])})."""
    layer = nnx.merge(graphdef, state)
    _, captured = nnx.capture(lambda m, h: m(h), nnx.Intermediate)(layer, x)
    out = {}
    for (container, names, g), q in zip(groups, group_heads(layer, groups).values()):
        node = captured
        for part in [p for p in container.split(".") if p] + [names[0]]:
            node = node[part]
        xin = node["inputs"].get_value()[0].astype(jnp.float32)
        h, m = stats[g]
        out[g] = (gptq.hessian_update(h, q.transform(xin)),
                  jnp.maximum(m, jnp.max(jnp.abs(xin).reshape(-1, xin.shape[-1]), axis=0)))
    return out


def _make_step(tx_t, tx_c, objective: LossFn = mse_loss):
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


def is_transform_param(path, value) -> bool:
    """nnx filter: a learnable transform parameter (what ``tx`` optimizes): of the linears'
    input transforms, and of the key / value transforms of a KV-quantized setting."""
    return isinstance(value, nnx.Param) and any(
        p in ("transform", "k_transform", "v_transform") for p in path)


def is_clip_param(path, value) -> bool:
    """nnx filter: a learnable clipping logit (what ``clip_tx`` optimizes)."""
    return isinstance(value, nnx.Param) and ("act_clip" in path or "weight_clip" in path)


def _healthy(layer, max_cond: float, groups=GROUPS) -> bool:
    return all(transform_is_healthy(q.transform, max_cond)
               for q in group_heads(layer, groups).values())


class DecayToStartState(NamedTuple):
    start: Any  # the parameters ``init`` was given


def decay_to_start(rate: float) -> optax.GradientTransformation:
    """Adds ``rate * (params - start)`` to the updates, ``start`` being the parameters ``init``
    saw: AdamW's decoupled weight decay, pulling towards the starting point instead of zero.
    Chained before the learning rate, as ``optax.adamw`` chains its decay."""
    def init(params):
        return DecayToStartState(jax.tree.map(jnp.copy, params))

    def update(updates, state, params):
        if params is None:
            raise ValueError("decay_to_start needs the parameters in update()")
        return jax.tree.map(lambda u, p, s: u + rate * (p - s), updates, params,
                            state.start), state
    return optax.GradientTransformation(init, update)


def default_optimizers(cfg: CalibConfig, total_steps: int):
    """(transform optimizer, clipping optimizer): AdamW with cosine decay from cfg.lr / clip_lr;
    with cfg.anchor > 0 the transforms' AdamW also decays towards their start."""
    total = max(1, total_steps)
    lr_t = optax.cosine_decay_schedule(cfg.lr, total)
    tx_t = (optax.adamw(lr_t, weight_decay=cfg.weight_decay) if cfg.anchor == 0 else
            optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(cfg.weight_decay),
                        decay_to_start(cfg.anchor), optax.scale_by_learning_rate(lr_t)))
    return tx_t, optax.adamw(optax.cosine_decay_schedule(cfg.clip_lr, total), weight_decay=0.0)


class LayerCalibrator:
    """Calibrates decoder layers one at a time; built once per run so programs compile once.

    tx / clip_tx: any optax GradientTransformation for the transform / clipping parameters
    (default ``default_optimizers``); loss_fn(output, target) -> scalar replaces cfg.loss.
    mesh: windows and activations split over its data axis (distributed.py); the calibrator
    talks to its placement only. groups: the blocks' ``Group`` s (``Layout.groups``; default
    a Llama decoder layer's).
    """

    def __init__(self, cfg: CalibConfig, nsamples: int, log: Callable[[str], None] = _stderr,
                 mesh: jax.sharding.Mesh | None = None, *, tx=None, clip_tx=None,
                 loss_fn: LossFn | None = None, groups=GROUPS):
        self.cfg = cfg
        self.groups = tuple(groups)
        self.log = log
        self.place = placement(mesh)
        self.place.check_batch(cfg.batch_size, "batch_size")
        self.steps_per_epoch = nsamples // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"nsamples ({nsamples}) must be >= batch_size ({cfg.batch_size})")
        tx_t, tx_c = default_optimizers(cfg, cfg.epochs * self.steps_per_epoch)
        self.tx_t, self.tx_c = tx or tx_t, clip_tx or tx_c
        if loss_fn is None and cfg.loss == CUSTOM_LOSS:
            raise ValueError(f"loss {CUSTOM_LOSS!r} names an objective passed as loss_fn; pass "
                             f"loss_fn, or one of {', '.join(LOSSES)}")
        self.loss_fn = loss_fn or LOSSES[cfg.loss]
        self.loss_name = cfg.loss if loss_fn is None else _loss_name(loss_fn)
        self.step_fn = _make_step(self.tx_t, self.tx_c, self.loss_fn)

    def mse(self, layer, xb, yb) -> float:
        """The objective (CalibConfig.loss, weighted by loss_weight) averaged over the batches."""
        graphdef, state = nnx.split(layer)
        gain = self.gain
        total = sum(_sq_err(self.loss_fn, graphdef, state, xb[i], yb[i], gain)
                    for i in range(len(xb)))
        return float(total) / len(xb)

    def outputs(self, layer, xb):
        graphdef, state = nnx.split(layer)
        return jnp.concatenate([apply_layer(graphdef, state, xb[i]) for i in range(len(xb))])

    def _train(self, layer, xs, ys, index: int, n_layers: int) -> tuple[int, bool, float]:
        """Trains the learnable parameters of ``layer`` in place; returns (steps, fell_back, best)."""
        cfg, place = self.cfg, self.place
        graphdef, tparams, cparams, rest = nnx.split(layer, is_transform_param, is_clip_param, ...)
        opt_t, opt_c = jax.tree.map(place.put, (self.tx_t.init(tparams), self.tx_c.init(cparams)))
        best = (math.inf, jax.tree.map(jnp.copy, tparams), jax.tree.map(jnp.copy, cparams))
        fell_back, steps, t0 = False, 0, time.time()
        rng = np.random.default_rng([cfg.seed, index])  # per layer: a resumed run draws the same
        for ep in range(cfg.epochs):
            order = rng.permutation(xs.shape[0])[: self.steps_per_epoch * cfg.batch_size]
            losses = []
            for idx in order.reshape(self.steps_per_epoch, cfg.batch_size):
                # split over data on a mesh: XLA all-reduces the gradients
                x, y = place.take(xs, idx), place.take(ys, idx)
                tparams, cparams, opt_t, opt_c, loss = self.step_fn(
                    graphdef, tparams, cparams, opt_t, opt_c, rest, x, y, self.gain)
                losses.append(loss)
            steps += self.steps_per_epoch
            loss = float(jnp.mean(jnp.stack(losses)))
            nnx.update(layer, tparams, cparams)
            ok = math.isfinite(loss) and _healthy(place.to_local(nnx.clone(layer)), cfg.max_cond,
                                                  self.groups)
            if ok and loss < best[0]:
                best = (loss, jax.tree.map(jnp.copy, tparams), jax.tree.map(jnp.copy, cparams))
            elif not ok:
                fell_back = True
                self.log(f"warning: layer {index + 1}: non-finite loss or ill-conditioned transform "
                         f"at epoch {ep + 1}; keeping the best finite parameters")
                break
            rate = (time.time() - t0) / steps
            self.log(f"layer {index + 1}/{n_layers} epoch {ep + 1}/{cfg.epochs} step {steps} "
                     f"train {self.loss_name} {loss:.4g} ({rate:.2f}s/step)")
        nnx.update(layer, best[1], best[2])
        return steps, fell_back, best[0]

    def calibrate(self, fp_layer, xs, index: int, n_layers: int, next_gain=None):
        """Quantizes ``fp_layer`` given its inputs xs: [N, T, d].

        next_gain: [d], the gain of the RMSNorm that reads this layer's output
        (``next_norm_gain``); used by ``loss_weight="next_norm"``, required then.
        Returns (quantized layer with packed weights, its outputs on xs for the next layer,
        LayerReport).
        """
        cfg, spec, method = self.cfg, self.cfg.spec, self.cfg.method_spec
        t0 = time.time()
        xb = self.place.batches(xs, cfg.batch_size)
        ys = self.outputs(fp_layer, xb)
        yb = self.place.batches(ys, cfg.batch_size)
        d = ys.shape[-1]  # the objective weighs the block's output channels
        if cfg.loss_weight == "next_norm":
            if next_gain is None:
                raise ValueError('loss_weight="next_norm" needs next_gain (the layout\'s '
                                 'next_gain, e.g. next_norm_gain)')
            self.gain = jnp.asarray(next_gain, jnp.float32).reshape(d)
        else:
            self.gain = jnp.ones((d,), jnp.float32)
        self.gain = self.place.put(self.gain)

        rtn = self.place.put_module(quantize_layer(nnx.clone(fp_layer), "rtn", spec,
                                                   groups=self.groups))
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

        self.deploy(layer, xb)
        loss_final = loss_rtn if plain_rtn else self.mse(layer, xb, yb)
        report = LayerReport(index, loss_rtn, loss_init, loss_trained, loss_final, steps,
                             time.time() - t0, fell_back)
        next_x = ys if cfg.propagate == "fp" else self.outputs(layer, xb)
        return layer, next_x, report

    def _start(self, fp_layer, xb, index: int, init: str | None = None):
        """A placed quantized copy of ``fp_layer`` at its initial parameters (channel scales
        SmoothQuant-started when the method says so)."""
        method = self.cfg.method_spec
        layer = self.place.put_module(build_quantized_layer(nnx.clone(fp_layer), self.cfg, index,
                                                            init=init, groups=self.groups))
        if method.channel_scale and method.scale_init == "smooth":
            self.smooth_scales(layer, xb, method.smooth_alpha)
        return layer

    def group_stats(self, layer, xb) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{group: (Hessian X^T X of the transformed inputs [d, d], max |x| of the raw inputs
        [d])} over every batch of xb, the inputs captured at each group's head linear."""
        set_capture(layer, True, self.groups)
        graphdef, state = nnx.split(layer)
        set_capture(layer, False, self.groups)
        stats = {g: (jnp.zeros((q.in_features, q.in_features), jnp.float32),
                     jnp.zeros((q.in_features,), jnp.float32))
                 for g, q in group_heads(layer, self.groups).items()}
        stats = jax.tree.map(self.place.put, stats)
        for x in (xb[i] for i in range(len(xb))):  # indexing works across hosts
            stats = _group_stats(self.groups, graphdef, state, x, stats)
        return stats

    def smooth_scales(self, layer, xb, alpha: float) -> None:
        """SmoothQuant-style start of every group's channel scale: ``s = max|x|^alpha /
        max|W|^(1 - alpha)`` per input channel, x over the calibration batches, W over the
        group's linears (the transforms' scales must still be ones)."""
        stats = self.group_stats(layer, xb)
        groups = group_of(self.groups)
        w_max = {}
        for name, q in quant_linears(layer, self.groups).items():
            m = jnp.max(jnp.abs(q.weight[...]), axis=0)
            g = groups[name]
            w_max[g] = m if g not in w_max else jnp.maximum(w_max[g], m)
        for g, q in group_heads(layer, self.groups).items():
            q.transform.set_scale(np.asarray(smooth_init(stats[g][1], w_max[g], alpha)))

    def deploy(self, layer, xb) -> None:
        """Fold transforms + weight clipping into the weights, quantize them (GPTQ or RTN) and
        deploy each QuantLinear at its packed MXArray."""
        cfg, spec, method = self.cfg, self.cfg.spec, self.cfg.method_spec
        hessians = {}
        if method.weights == "gptq":
            hessians = {g: s[0] for g, s in self.group_stats(layer, xb).items()}
        # fold and GPTQ on one local device, the same in every process
        self.place.to_local(layer)
        hessians = {g: self.place.local_value(h) for g, h in hessians.items()}
        groups = group_of(self.groups)
        kw = spec.quant_kwargs("w")
        for name, q in quant_linears(layer, self.groups).items():
            w = jnp.asarray(q.transform.fold_f64(np.asarray(q.weight[...])), jnp.float32)
            w = q.weight_clip(w)
            if method.weights == "gptq":
                res = gptq.gptq_quantize(w, hessians[groups[name]], damp=cfg.damp, **kw)
            else:
                res = gptq.rtn_quantize(w, **kw)
            q.deploy(res.to_mxarray())
        self.place.put_module(layer)


def quantize_model(model: LlamaForCausalLM, calib_tokens, method: str | CalibConfig = "batquant",
                   setting: str | None = None, *, tx=None, clip_tx=None,
                   loss_fn: LossFn | None = None, log: Callable[[str], None] = _stderr,
                   on_layer_done: Callable | None = None, start_layer: int = 0,
                   start_inputs=None, mesh: jax.sharding.Mesh | None = None,
                   layout: Layout = LLAMA, **hparams) -> tuple[LlamaForCausalLM, CalibrationResult]:
    """Quantizes every decoder layer of ``model`` in place with ``method`` at ``setting``.

    calib_tokens: int32 [N, T] calibration windows (N >= batch_size); with a ``layout`` whose
    ``embed`` is None, the first block's inputs [N, T, d] themselves. layout: how to walk the
    model (``layout.Layout``; default this package's Llama / Qwen model). method: a method name, or
    a whole ``CalibConfig`` (then neither ``setting`` nor hparams). setting: default W4A4KV16.
    hparams: any CalibConfig field (``recipe.CalibConfig``: lr, epochs, g1, g2, loss, ...). tx / clip_tx: any optax
    GradientTransformation for the transform / clipping parameters (default: AdamW with cosine
    decay from lr / clip_lr); loss_fn(output, target) -> scalar: the layer objective in place of
    ``loss`` (the log names it). Every linear ends deployed at its packed MXArray.
    on_layer_done(i, layer, next_inputs, report) is called after each layer (resume support:
    ``start_layer`` / ``start_inputs`` continue a run whose first layers are done).
    mesh: a ``distributed.make_mesh`` mesh: the model is placed on it, the windows (a host
    array, the same in every process, or a global array) and activations split over its data
    axis; the windows are cut to whole batches (the later layers see only those anyway).
    Returns (model, CalibrationResult).

    >>> import optax
    >>> from batquant_jax.models import LlamaConfig, LlamaForCausalLM
    >>> from flax import nnx
    >>> model = LlamaForCausalLM(LlamaConfig(num_layers=1), nnx.Rngs(0))
    >>> tokens = np.arange(4 * 32).reshape(4, 32) % 256
    >>> model, res = quantize_model(model, tokens, "batquant", epochs=1, tx=optax.sgd(1e-3),
    ...                             loss_fn=lambda out, y: jnp.mean(jnp.abs(out - y)),
    ...                             log=lambda msg: None)
    >>> res.loss_name, res.layers[0].steps
    ('<lambda>', 1)
    """
    if isinstance(method, CalibConfig):
        if setting is not None or hparams:
            extra = (["setting"] if setting else []) + list(hparams)
            raise ValueError("quantize_model: with a CalibConfig, pass no setting or other "
                             f"fields (got {', '.join(extra)})")
        cfg = method
    else:
        cfg = CalibConfig(method=method, setting=setting or "W4A4KV16", **hparams)
    if loss_fn is not None:  # the recorded recipe says that its objective was not a named one
        cfg = dataclasses.replace(cfg, loss=CUSTOM_LOSS)
    place = placement(mesh)
    place.check_batch(cfg.batch_size, "batch_size")
    if mesh is not None:
        keep = calib_tokens.shape[0] // cfg.batch_size * cfg.batch_size
        tokens = place.put(calib_tokens[:keep], place.rows()) if isinstance(calib_tokens, jax.Array) \
            else place.shard_rows(np.asarray(calib_tokens, None if layout.embed is None
                                             else np.int32)[:keep])
        if start_inputs is not None:
            start_inputs = place.put(start_inputs, place.rows()) \
                if isinstance(start_inputs, jax.Array) \
                else place.shard_rows(np.asarray(start_inputs)[:keep])
    elif layout.embed is None:
        tokens = jnp.asarray(calib_tokens)
    else:
        tokens = jnp.asarray(np.asarray(calib_tokens, np.int32))
    place.put_module(model)
    if layout.embed is not None and tokens.ndim != 2:
        raise ValueError(f"calib_tokens must be [N, T], got shape {tokens.shape}")
    if layout.embed is None and tokens.ndim < 2:
        raise ValueError(f"the calibration inputs must be [N, ..., d], got shape {tokens.shape}")
    blocks = layout.block_list(model)
    n_layers = len(blocks)
    cal = LayerCalibrator(cfg, tokens.shape[0], log, mesh, tx=tx, clip_tx=clip_tx, loss_fn=loss_fn,
                          groups=layout.groups)
    log(f"layer objective: {cal.loss_name}")
    t0 = time.time()
    xs = jnp.asarray(start_inputs) if start_inputs is not None else \
        tokens if layout.embed is None else layout.embed(model, tokens)
    xs = place.put(xs, place.rows())
    reports = []
    for i in range(start_layer, n_layers):
        gain = None if layout.next_gain is None else layout.next_gain(model, i)
        layer, xs, rep = cal.calibrate(blocks[i], xs, i, n_layers, gain)
        blocks[i] = layer
        reports.append(rep)
        done = i + 1 - start_layer
        eta = (time.time() - t0) / done * (n_layers - i - 1)
        log(rep.line(n_layers, cal.loss_name) + f" elapsed {time.time() - t0:.0f}s, eta {eta:.0f}s")
        if on_layer_done is not None:
            on_layer_done(i, layer, xs, rep)
        release_free_heap()
    return model, CalibrationResult(cfg, reports, time.time() - t0, cal.loss_name)
