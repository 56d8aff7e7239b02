"""Cost of one calibration step against the full-precision forward of the same layer and batch.

    .venv/bin/python experiments/bench_calib_step.py [--method=batquant] [--batch=4] [--seqlen=512]

Real SmolLM2-135M layer weights (layer 0), random hidden states of the residual stream's scale.
Prints the median times (after warm-up) and the ratio step / forward, measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from batquant_jax.calibration import CalibConfig, LayerCalibrator, _apply, _is_clip_param, _is_transform_param
from batquant_jax.models import load_model
from batquant_jax.qlayers import quantize_layer


def _median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="batquant")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()

    model = load_model("smollm2-135m", with_tokenizer=False).model
    fp_layer = model.layers[0]
    d = model.config.hidden_size
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seqlen, d))
    gd, st = nnx.split(fp_layer)
    y = _apply(gd, st, x)
    t_fwd = _median_time(lambda: _apply(gd, st, x), args.reps)

    cfg = CalibConfig(method=args.method, batch_size=args.batch)
    cal = LayerCalibrator(cfg, nsamples=args.batch, log=lambda s: None)
    layer = quantize_layer(nnx.clone(fp_layer), cfg.method_spec, cfg.spec, record_hessian=True)
    graphdef, tp, cp, rest = nnx.split(layer, _is_transform_param, _is_clip_param, ...)
    ot, oc = cal.tx_t.init(tp), cal.tx_c.init(cp)
    t_step = _median_time(lambda: cal.step_fn(graphdef, tp, cp, ot, oc, rest, x, y)[-1], args.reps)
    qg, qs = nnx.split(layer)
    t_qfwd = _median_time(lambda: _apply(qg, qs, x), args.reps)

    print(f"tokens per batch: {args.batch * args.seqlen}")
    print(f"full-precision layer forward: {t_fwd * 1e3:8.1f} ms")
    print(f"quantized layer forward     : {t_qfwd * 1e3:8.1f} ms  ({t_qfwd / t_fwd:.2f}x)")
    print(f"{args.method} training step   : {t_step * 1e3:8.1f} ms  ({t_step / t_fwd:.2f}x the forward)")


if __name__ == "__main__":
    main()
