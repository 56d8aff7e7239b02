"""Why a lower layer loss does not reach perplexity: per-layer diagnosis of one calibration.

    .venv/bin/python -m experiments.diagnose --method=batquant --tag=mse
    .venv/bin/python -m experiments.diagnose --method=batquant --tag=token_mse \\
        --hparams='{"loss": "token_mse"}'

Decisions are made on the calibration text only: wiki-calib is cut in two, the first 90% of its
tokens give the calibration windows, the last 10% (the "dev" part, never trained on) give the
held-back windows and the dev perplexity. wiki-eval and Shakespeare are measured only with
--report_eval, for the report, never to choose.

Per decoder layer, with the quantized layer after the final weight quantization (GPTQ or RTN):
- raw per-token squared error on the trained windows and on held-back windows (teacher-forced
  inputs for both): its mean, the share carried by the top 1% of tokens and by position 0;
- the mean per-token relative error (error energy / output energy);
- the calibration losses of the method (rtn / init / trained / final, in the run's objective).
One JSON per run under experiments/results/diagnose/.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from batquant_jax import data, perplexity
from batquant_jax.calibration import CalibConfig, LayerCalibrator, next_norm_gain
from batquant_jax.models import forward_nll, load_model

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "diagnose"
DEV_FRACTION = 0.1


def split_calib(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """wiki-calib token ids -> (training pool: first 90%, dev: last 10%)."""
    cut = int(len(ids) * (1 - DEV_FRACTION))
    return ids[:cut], ids[cut:]


def _batches(cal: LayerCalibrator, a: jax.Array) -> jax.Array:
    """[N, T, d] -> the calibrator's batches [N // bs, bs, T, d]."""
    return cal.place.batches(a, cal.cfg.batch_size)


def token_stats(out: jax.Array, target: jax.Array) -> dict:
    """out, target: [N, T, d] -> statistics of the per-token squared error."""
    err = np.asarray(jnp.sum(jnp.square(out - target), axis=-1), np.float64)  # [N, T]
    energy = np.asarray(jnp.sum(jnp.square(target), axis=-1), np.float64)
    per_ch = np.asarray(jnp.sum(jnp.square(out - target), axis=(0, 1)), np.float64)  # [d]
    ch = np.sort(per_ch)[::-1]
    flat = np.sort(err.ravel())[::-1]
    top = max(1, int(round(0.01 * flat.size)))
    total = float(flat.sum())
    return {
        "mse": total / err.size / out.shape[-1],
        "top1pct_share": float(flat[:top].sum() / total),
        "pos0_share": float(err[:, 0].sum() / total),
        "top1pct_channel_share": float(ch[: max(1, int(round(0.01 * ch.size)))].sum() / total),
        "top_channels": [int(c) for c in np.argsort(per_ch)[::-1][:8]],
        "rel_err": float(np.mean(err / energy)),
        "rel_err_no_pos0": float(np.mean(err[:, 1:] / energy[:, 1:])),
    }


def ppl(model, ids, seqlen: int, max_tokens: int) -> dict:
    res = perplexity.evaluate_perplexity(functools.partial(forward_nll, model), ids,
                                         seqlen=seqlen, max_tokens=max_tokens, batch_size=1)
    return {"perplexity": res.perplexity, "windows": res.windows,
            "window_nll": [float(v) for v in res.window_nll]}


def main(argv=None) -> int:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="batquant")
    ap.add_argument("--setting", default="W4A4KV16")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", type=int, default=8, help="held-back windows (dev part)")
    ap.add_argument("--eval_seqlen", type=int, default=512)
    ap.add_argument("--eval_max_tokens", type=int, default=8192)
    ap.add_argument("--calib_data", default="wiki-calib",
                    help="calibration sources as calibrate takes them (several joined by ',' "
                         "share the windows); wiki-calib stands for its first 90%%")
    ap.add_argument("--hparams", default="{}", help="JSON dict of extra CalibConfig fields")
    ap.add_argument("--report_eval", action="store_true",
                    help="also measure wiki-eval and shakespeare (reporting only)")
    ap.add_argument("--other_text", default="",
                    help="also measure each layer on held-out windows of this text (a UTF-8 "
                         "file or folder of another register, neither calibration nor "
                         "evaluation text: how far what the layer learned carries)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--layers", default="", help="probe: calibrate only these layer indices "
                    "(comma-separated; the others stay full precision, no perplexity)")
    args = ap.parse_args(argv)
    hparams = json.loads(args.hparams)
    RESULTS.mkdir(parents=True, exist_ok=True)
    probe = sorted(int(i) for i in args.layers.split(",") if i.strip())
    name = f"{args.method}_{args.setting}_{args.nsamples}x{args.seqlen}_ep{args.epochs}" \
           f"_s{args.seed}{'_' + args.tag if args.tag else ''}" \
           f"{'_layers' + '-'.join(map(str, probe)) if probe else ''}"
    out_dir = RESULTS / "probes" if probe else RESULTS
    if args.model != "smollm2-135m":  # each other model's runs in a folder of their own
        out_dir = out_dir / args.model

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    pool, dev = split_calib(data.tokenize_corpus(data.load_corpus("wiki-calib"), tok))
    pools = [pool if name == "wiki-calib" else data.tokenize_corpus(data.load_corpus(name), tok)
             for name in data.calib_sources(args.calib_data)]
    windows = jnp.asarray(data.sample_mixed(pools, args.nsamples, args.seqlen, args.seed))
    held = jnp.asarray(data.sample_windows(dev, args.holdout, args.seqlen, args.seed))
    other = (jnp.asarray(data.sample_windows(
        data.tokenize_corpus(data.load_corpus(args.other_text), tok), args.holdout, args.seqlen,
        args.seed)) if args.other_text else None)

    cfg = CalibConfig(method=args.method, setting=args.setting, epochs=args.epochs,
                      seed=args.seed, **hparams).validate()
    cal = LayerCalibrator(cfg, args.nsamples)
    hcal = LayerCalibrator(cfg, args.holdout)
    xs, hx = model.embed(windows), model.embed(held)
    ox = model.embed(other) if other is not None else None
    layers, t0 = [], time.time()
    n = len(model.layers)
    for i in range(n):
        fp = model.layers[i]
        hy = hcal.outputs(fp, _batches(hcal, hx))
        oy = hcal.outputs(fp, _batches(hcal, ox)) if ox is not None else None
        if probe and i not in probe:  # teacher forcing: the next inputs are full precision
            xs, hx, ox = cal.outputs(fp, _batches(cal, xs)), hy, oy
            if i > max(probe):
                break
            continue
        layer, nxt, rep = cal.calibrate(fp, xs, i, n, next_norm_gain(model, i))
        # the full-precision targets: what calibrate passes on under propagate="fp"
        ys = nxt if cfg.propagate == "fp" else cal.outputs(fp, _batches(cal, xs))
        out_train = cal.outputs(layer, _batches(cal, xs))
        out_held = hcal.outputs(layer, _batches(hcal, hx))
        row = {**vars(rep), "train": token_stats(out_train, ys[: out_train.shape[0]]),
               "held": token_stats(out_held, hy)}
        if ox is not None:
            row["other"] = token_stats(hcal.outputs(layer, _batches(hcal, ox)), oy)
        layers.append(row)
        model.layers[i] = layer
        print(rep.line(n) + f" | raw train {row['train']['mse']:.4g} held "
              f"{row['held']['mse']:.4g} top1% {row['train']['top1pct_share']:.2f} pos0 "
              f"{row['train']['pos0_share']:.2f} [{time.time() - t0:.0f}s]", file=sys.stderr,
              flush=True)
        xs, hx, ox = nxt, hy, oy
    calib_s = time.time() - t0
    config = {**dataclasses.asdict(cfg), "method_spec": dataclasses.asdict(cfg.method_spec)}
    out = {"model": args.model, "method": args.method, "setting": args.setting,
           "nsamples": args.nsamples, "other_text": args.other_text or None,
           "calib_data": args.calib_data,
           "seqlen": args.seqlen, "epochs": args.epochs, "seed": args.seed, "hparams": hparams,
           "config": config,
           "holdout": args.holdout, "calib_seconds": calib_s, "layers": layers}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    if probe:
        out["probe_layers"] = probe
        path.write_text(json.dumps(out, indent=1))
        print(f"RESULT {name} mean held rel_err "
              f"{np.mean([l['held']['rel_err'] for l in layers]):.5f}"
              + (f" other rel_err {np.mean([l['other']['rel_err'] for l in layers]):.5f}"
                 if other is not None else ""), flush=True)
        return 0
    out["dev"] = ppl(model, dev, args.eval_seqlen, args.eval_max_tokens)
    path.write_text(json.dumps(out, indent=1))
    if args.report_eval:
        for text in ("wiki-eval", "shakespeare"):
            out[text] = ppl(model, data.tokenize_corpus(data.load_corpus(text), tok), args.eval_seqlen, 16 * 512)
            path.write_text(json.dumps(out, indent=1))
    print(f"RESULT {name} dev ppl {out['dev']['perplexity']:.3f}"
          + "".join(f" {t} {out[t]['perplexity']:.3f}" for t in ("wiki-eval", "shakespeare")
                    if t in out) + f" calib {calib_s:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
