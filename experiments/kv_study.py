"""KV cache quantization on a full-precision model: wiki-eval perplexity of KV16 / KV8 / KV4.

    .venv/bin/python -m experiments.kv_study [--windows=8 --seqlen=512]
        [--steps=32 --batch=2 --nsamples=16 --calib_seqlen=256 --lr=1e-2 --loss=token_mse]
        [--channel_scale=1] [--baselines=1] [--json=out.json]

Weights and activations stay in full precision; only K (after RoPE) and V are quantized, per
token in MX blocks of 32 along head_dim (batquant_jax/kvquant.py). Rows: KV16, KV8, KV4 without
a transform, KV4 with the fixed block Hadamard, and KV4 with the learned GPK transform (per KV
head, started at the block Hadamard) after a short optimization of the K/V transforms alone.

The optimization sees only wiki-calib windows: layer by layer, the inputs are the
full-precision hidden states (teacher forcing) and the target is the full-precision attention
output; the loss is the error of the KV4 attention output (`--loss=token_mse`, the per-token
relative error, or `mse`). Adam with cosine decay, `--steps` steps of `--batch` windows per layer.
A layer whose loss on its calibration windows does not go below the start keeps the start.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from batquant_jax import data, perplexity
from batquant_jax.kvquant import KVSpec, freeze_all, is_kv_param, set_kv_quant
from batquant_jax.models import forward_nll, load_model

LOSSES = {
    "mse": lambda out, y: jnp.mean((out - y) ** 2),
    "token_mse": lambda out, y: jnp.mean(jnp.sum((out - y) ** 2, -1) / jnp.sum(y ** 2, -1)),
}


def _make_step(tx, loss_fn):
    @functools.partial(jax.jit, static_argnums=0)
    def step(graphdef, params, rest, opt, x, y):
        """x, y: [bs, T, d] attention input (normed hidden states) and full-precision output."""
        def f(p):
            return loss_fn(nnx.merge(graphdef, p, rest)(x), y)

        loss, g = jax.value_and_grad(f)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    @functools.partial(jax.jit, static_argnums=0)
    def loss_at(graphdef, params, rest, x, y):
        return loss_fn(nnx.merge(graphdef, params, rest)(x), y)

    return step, loss_at


def train_kv_transforms(model, calib: np.ndarray, args, log=print) -> list[dict]:
    """Optimizes each layer's installed KVQuant (learned) on calib windows [N, T]; in place.
    Returns per-layer reports (loss at the start and at the end, kept or fell back)."""
    tx = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps))
    step, loss_at = _make_step(tx, LOSSES[args.loss])
    h = model.embed(jnp.asarray(calib))
    n = calib.shape[0] // args.batch
    reports = []
    for i, layer in enumerate(model.layers):
        t0 = time.perf_counter()
        attn = layer.self_attn
        kvq = attn.kv_quant
        x = layer.input_layernorm(h)
        attn.kv_quant = None
        y = jnp.concatenate([attn(x[j:j + args.batch]) for j in range(0, x.shape[0], args.batch)])
        h = jnp.concatenate([layer(h[j:j + args.batch]) for j in range(0, h.shape[0], args.batch)])
        attn.kv_quant = kvq
        graphdef, params, rest = nnx.split(attn, is_kv_param, ...)
        xb = x[: n * args.batch].reshape(n, args.batch, *x.shape[1:])
        yb = y[: n * args.batch].reshape(n, args.batch, *y.shape[1:])

        def full_loss(p, graphdef=graphdef, rest=rest, xb=xb, yb=yb):
            return float(sum(loss_at(graphdef, p, rest, xb[j], yb[j]) for j in range(n))) / n

        start = full_loss(params)
        p, opt = params, tx.init(params)
        for s in range(args.steps):
            p, opt, _ = step(graphdef, p, rest, opt, xb[s % n], yb[s % n])
        end = full_loss(p)
        kept = end < start and all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(p))
        if kept:
            nnx.update(attn, p)
        rep = {"layer": i, "loss_start": start, "loss_end": end, "kept": kept,
               "seconds": round(time.perf_counter() - t0, 1)}
        log(f"layer {i:2d}: loss {start:.4g} -> {end:.4g} ({end / start:.3f})"
            f"{'' if kept else ' fell back'} [{rep['seconds']}s]")
        reports.append(rep)
    return reports


def main() -> None:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib_seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--loss", default="token_mse", choices=sorted(LOSSES))
    ap.add_argument("--channel_scale", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baselines", type=int, default=1, help="0: only the learned row")
    ap.add_argument("--detail", type=int, default=0,
                    help="1: also K-only and V-only MXFP4 rows, and KV8 with the block Hadamard")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    t_all = time.perf_counter()

    lm = load_model(args.model)
    model = lm.model
    eval_ids = data.tokenize_corpus(data.load_corpus("wiki-eval"), lm.tokenizer)
    calib_ids = data.tokenize_corpus(data.load_corpus("wiki-calib"), lm.tokenizer)
    calib = data.sample_windows(calib_ids, args.nsamples, args.calib_seqlen, args.seed)

    rows = []

    def evaluate(name):
        t0 = time.perf_counter()
        r = perplexity.evaluate_perplexity(functools.partial(forward_nll, model), eval_ids,
                                           seqlen=args.seqlen, max_tokens=args.windows * args.seqlen,
                                           batch_size=2)
        rows.append({"row": name, "perplexity": r.perplexity, "window_nll": list(r.window_nll),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{name:34s} ppl {r.perplexity:.4f} [{rows[-1]['seconds']}s]", flush=True)

    def row(name, spec, transform, **kw):
        set_kv_quant(model, spec, transform, **kw)
        evaluate(name)

    if args.baselines:
        row("KV16 (full precision)", None, "none")
        row("KV8 none", "KV8", "none")
        row("KV4 none", "KV4", "none")
        row("KV4 block_hadamard", "KV4", "block_hadamard")
    if args.detail:
        row("K4 only (V16) none", KVSpec("mxfp4", None), "none")
        row("V4 only (K16) none", KVSpec(None, "mxfp4"), "none")
        row("K4 only (V16) block_hadamard", KVSpec("mxfp4", None), "block_hadamard")
        row("V4 only (K16) block_hadamard", KVSpec(None, "mxfp4"), "block_hadamard")
        row("KV8 block_hadamard", "KV8", "block_hadamard")
    reports, train_s = [], 0.0
    if args.steps > 0:
        set_kv_quant(model, "KV4", "learned", channel_scale=bool(args.channel_scale))
        t0 = time.perf_counter()
        reports = train_kv_transforms(model, calib, args)
        train_s = round(time.perf_counter() - t0, 1)
        kept = sum(r["kept"] for r in reports)
        print(f"trained in {train_s}s; {kept}/{len(reports)} layers kept their trained transform")
        freeze_all(model)  # fixed matrices: no solves in the evaluated program
        evaluate(f"KV4 learned ({args.loss}, {args.steps} steps, lr {args.lr:g})")
    base = [r for r in rows if r["row"] == "KV4 block_hadamard"]
    for r in rows:  # paired over the same windows: mean NLL difference and its standard error
        if base and r is not base[0] and r["row"].startswith("KV4"):
            d = np.asarray(r["window_nll"]) - np.asarray(base[0]["window_nll"])
            se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
            print(f"{r['row']} - KV4 block_hadamard: mean window NLL {d.mean():+.4f} +- {se:.4f} "
                  f"(SE, {d.size} windows)")
    total = round(time.perf_counter() - t_all, 1)
    print(f"total {total}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "layers": reports, "train_seconds": train_s,
                       "total_seconds": total}, f, indent=1)

if __name__ == "__main__":
    main()
