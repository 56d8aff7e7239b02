"""Per-layer probe on the calibration split: final layer MSE of several method variants.

    .venv/bin/python -m experiments.probe_layers --layers=0,1,2,11 --variants='[["brq", {}],
        ["batquant", {}], ["batquant", {"clip_init": 8.0}]]'

Uses only wiki-calib windows (never the evaluation split): inputs of each probed layer are the
full-precision outputs of the layers before it. Prints mse rtn / init / trained / final per layer.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
from flax import nnx

from batquant_jax import data
from batquant_jax.calibration import CalibConfig, LayerCalibrator
from batquant_jax.models import load_model


def main() -> None:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,1,2,11")
    ap.add_argument("--variants", default='[["brq", {}], ["batquant", {}]]')
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    layers = [int(i) for i in args.layers.split(",")]
    variants = json.loads(args.variants)

    lm = load_model("smollm2-135m")
    ids = data.tokenize_corpus(data.load_corpus("wiki-calib"), lm.tokenizer)
    win = data.sample_windows(ids, args.nsamples, args.seqlen, 0)
    model = lm.model
    probe = LayerCalibrator(CalibConfig(method="rtn"), args.nsamples, log=lambda s: None)
    xs, inputs = model.embed(jnp.asarray(win)), {}
    for i in range(max(layers) + 1):
        if i in layers:
            inputs[i] = xs
        xs = probe.outputs(model.layers[i], probe._batches(xs))

    for method, hp in variants:
        cfg = CalibConfig(method=method, **{"epochs": args.epochs, **hp})
        cal = LayerCalibrator(cfg, args.nsamples, log=lambda s: None)
        finals = []
        for i in layers:
            t0 = time.time()
            _, _, rep, _ = cal.calibrate(nnx.clone(model.layers[i]), inputs[i], i, len(model.layers))
            finals.append(rep.loss_final / rep.loss_rtn)
            print(f"{method:9s} {json.dumps(hp):40s} layer {i:2d}: rtn {rep.loss_rtn:.4g} init "
                  f"{rep.loss_init:.4g} trained {rep.loss_trained:.4g} final {rep.loss_final:.4g} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
        print(f"SUMMARY {method} {json.dumps(hp)} mean final/rtn {sum(finals) / len(finals):.4f}",
              flush=True)


if __name__ == "__main__":
    main()
