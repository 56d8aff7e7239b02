"""Figures for experiments/RESULTS.md (matplotlib, Agg), written under experiments/results/plots/.

    .venv/bin/python -m experiments.plots                          # all three figures
    .venv/bin/python -m experiments.plots --skip_hist              # only those drawn from JSON
    .venv/bin/python -m experiments.plots --checkpoint=/tmp/smollm2-batquant   # learned GPK from
                                                                   # a calibrate.py output
    .venv/bin/python -m experiments.report                         # then refresh RESULTS.md

perplexity.png     perplexity by method and setting on both texts (from the study's JSON files);
accuracy.png       zero-shot accuracy recovery by method and setting, ±1 paired SE, and average
                   accuracy against wiki-eval perplexity (rows with an "accuracy" record);
layer_losses.png   per-layer reconstruction MSE after weight quantization (loss_final) by method;
activation_hist.png + activation_hist.json
                   one outlier-heavy linear input (default: the down_proj input with the
                   largest max|x| / RMS on wiki-calib windows) seen per MX block of 32 before
                   any transform, after a global RandomHadamard, after
                   BlockHadamard(32) and after a learned GPK transform. The GPK transform comes
                   from --checkpoint (batquant_jax.checkpoint.load_quantized) when given, else
                   that layer is calibrated alone on its full-precision inputs with the study's
                   budget (--train_nsamples x --train_seqlen tokens, --train_epochs epochs,
                   seed 0; about a minute on 2 CPU cores), which with fp-propagated inputs and
                   the per-layer seed is the calibration the headline batquant row ran.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import rows as study  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent

PLOTS_DIR = HERE / "results" / "plots"
DPI = 100
COLORS = {"W4A4KV16": "tab:red", "W4A8KV16": "tab:blue"}


def _headline(results: dict) -> tuple[list[str], dict]:
    """(methods in table order, {(method, setting): record}) of the headline rows present."""
    recs = {(r["method"], r["setting"]): r for r in results.values() if r.get("suite") == "headline"}
    methods = [m for m in study.HEADLINE_METHODS if any((m, s) in recs for s in study.SETTINGS)]
    return methods, recs


def plot_perplexity(results: dict, out: pathlib.Path) -> pathlib.Path | None:
    """Grouped bars: x = method, one bar per setting, one panel per text; FP as a dashed line."""
    methods, recs = _headline(results)
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(study.EVAL_TEXTS), figsize=(12, 4.5), dpi=DPI, squeeze=False)
    x = np.arange(len(methods))
    width = 0.8 / len(study.SETTINGS)
    for ax, text in zip(axes[0], study.EVAL_TEXTS):
        for j, setting in enumerate(study.SETTINGS):
            vals = [recs.get((m, setting), {}).get("eval", {}).get(text, {}).get("perplexity",
                                                                                  np.nan)
                    for m in methods]
            ax.bar(x + (j - (len(study.SETTINGS) - 1) / 2) * width, vals, width,
                   label=setting, color=COLORS.get(setting))
        fp = recs.get(("fp", "fp32"), {}).get("eval", {}).get(text)
        ax.set_yscale("log")
        if fp:
            ax.axhline(fp["perplexity"], color="k", ls="--", lw=1,
                       label=f"FP32 {fp['perplexity']:.2f}")
            ax.set_ylim(bottom=0.8 * fp["perplexity"])
        ax.set_xticks(x, methods, rotation=30)
        ax.set_title(f"perplexity on {text}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_accuracy(results: dict, out: pathlib.Path) -> pathlib.Path | None:
    """Left: recovery % (average acc / FP average acc, same items) per method and setting,
    error bars ±1 paired SE (study.paired_recovery). Right: average accuracy against wiki-eval
    perplexity, one point per row. None when no quantized row has accuracy beside an FP one."""
    methods, recs = _headline(results)
    base = study.correctness(recs.get(("fp", "fp32")))
    rec_of = {}
    for (m, s), r in recs.items():
        if m != "fp" and base is not None and r.get("accuracy"):
            pr = study.paired_recovery(study.correctness(r), base)
            if pr is not None:
                rec_of[(m, s)] = pr
    if not rec_of:
        return None
    methods = [m for m in methods if any((m, s) in rec_of for s in study.SETTINGS)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=DPI)
    x = np.arange(len(methods))
    width = 0.8 / len(study.SETTINGS)
    for j, setting in enumerate(study.SETTINGS):
        got = [rec_of.get((m, setting)) for m in methods]
        vals = [100 * g["recovery"] if g else np.nan for g in got]
        errs = [100 * g["recovery_se"] if g else 0.0 for g in got]
        ax.bar(x + (j - (len(study.SETTINGS) - 1) / 2) * width, vals, width, yerr=errs,
               capsize=3, label=setting, color=COLORS.get(setting))
        pts = [(recs[(m, setting)]["eval"]["wiki-eval"]["perplexity"], 100 * g["average"], m)
               for m, g in zip(methods, got) if g and "wiki-eval" in recs[(m, setting)]["eval"]]
        if pts:
            ax2.scatter([p[0] for p in pts], [p[1] for p in pts], color=COLORS.get(setting),
                        label=setting)
            for px, py, m in pts:
                ax2.annotate(m, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(100, color="k", ls="--", lw=1, label="FP32")
    ax.set_xticks(x, methods, rotation=30)
    ax.set_ylabel("recovery % (±1 paired SE)")
    ax.set_title("zero-shot accuracy recovery vs FP32")
    ax.legend(fontsize=8)
    fp = recs[("fp", "fp32")]
    if "wiki-eval" in fp.get("eval", {}):
        ax2.scatter([fp["eval"]["wiki-eval"]["perplexity"]],
                    [100 * fp["accuracy"]["average"]["acc"]], color="k", marker="*", s=80,
                    label="FP32")
    ax2.set_xscale("log")
    ax2.set_xlabel("wiki-eval perplexity (log)")
    ax2.set_ylabel("average accuracy %")
    ax2.set_title("accuracy against perplexity")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_layer_losses(results: dict, out: pathlib.Path) -> pathlib.Path | None:
    """One panel per setting: loss_final against layer index, one line per method (log y)."""
    methods, recs = _headline(results)
    settings = [s for s in study.SETTINGS if any((m, s) in recs for m in methods)]
    if not settings:
        return None
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), dpi=DPI,
                             squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for m in methods:
            rec = recs.get((m, setting), {})
            layers = rec.get("layers") or []
            # rows measured before the objective default changed report raw MSE
            loss = rec.get("key", {}).get("config", {}).get("loss", "mse")
            if layers:
                ax.plot([l["index"] for l in layers], [l["loss_final"] for l in layers],
                        label=f"{m} ({loss})", lw=1.2, ls=":" if m == "rtn" else "-")
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("final layer loss (the row's objective)")
        ax.set_title(setting)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- activations

def _linear_input(layer, h, which: str):
    import jax

    if which == "qkv":
        return layer.input_layernorm(h)
    h = h + layer.self_attn(layer.input_layernorm(h))
    x = layer.post_attention_layernorm(h)
    return jax.nn.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)


def layer_input(model, tokens, index: int, which: str):
    """Full-precision input of layer ``index``'s down_proj ("down", [B, T, ffn]) or of its
    q/k/v projections ("qkv", [B, T, d]) for int32 tokens [B, T]."""
    h = model.embed(tokens)
    for i in range(index):
        h = model.layers[i](h)
    return _linear_input(model.layers[index], h, which)


def outlier_ratio(x) -> float:
    """max |x| / RMS(x) over all tokens and channels: how far the largest activation sits
    above the typical one (about 4-5 for Gaussian data of this size)."""
    x = np.asarray(x, np.float64)
    return float(np.abs(x).max() / np.sqrt(np.mean(x * x)))


def outlier_ratios(model, tokens, which: str) -> list[float]:
    """outlier_ratio of the chosen linear input of every layer (one pass over the model)."""
    h = model.embed(tokens)
    out = []
    for layer in model.layers:
        out.append(outlier_ratio(_linear_input(layer, h, which)))
        h = layer(h)
    return out


def block_stats(y, block: int = 32, fmt: str = "mxfp4") -> dict:
    """y: [..., d] -> {"ratio": |y| / block absmax of nonzero blocks (flat), "log2_amax": per
    block, "rel_err": ||Q(y) - y|| / ||y|| under MX fake quantization, "flushed": share of
    nonzero elements quantized to 0}."""
    import jax.numpy as jnp
    from batquant_jax import mx

    y = np.asarray(y, np.float32).reshape(-1, y.shape[-1])
    q = np.asarray(mx.fake_quant(jnp.asarray(y), fmt, block_size=block))
    blocks = np.abs(y).reshape(y.shape[0], -1, block)
    amax = blocks.max(axis=-1, keepdims=True)
    keep = amax[..., 0] > 0
    nz = y != 0
    return {"ratio": (blocks / np.where(amax > 0, amax, 1.0))[keep].ravel(),
            "log2_amax": np.log2(amax[..., 0][keep]),
            "rel_err": float(np.linalg.norm(q - y) / np.linalg.norm(y)),
            "flushed": float(np.mean((q == 0)[nz])) if nz.any() else 0.0}


def _learned_transform(args, model, loaded_tok_windows, which: str):
    """(GPK transform of the chosen group, provenance dict): from --checkpoint or trained here."""
    from flax import nnx
    from batquant_jax.qlayers import quant_linears

    linear = "down_proj" if which == "down" else "q_proj"
    if args.checkpoint:
        from batquant_jax.checkpoint import load_quantized
        qmodel, _, meta = load_quantized(args.checkpoint)
        t = quant_linears(qmodel.layers[args.hist_layer])[linear].transform
        return t, {"source": f"checkpoint {args.checkpoint}", "method": meta.get("method")}
    from batquant_jax.calibration import CalibConfig, LayerCalibrator

    cfg = CalibConfig(method="batquant", setting="W4A4KV16", epochs=args.train_epochs,
                      batch_size=4, seed=0)
    xs = model.embed(loaded_tok_windows)
    for i in range(args.hist_layer):
        xs = model.layers[i](xs)
    cal = LayerCalibrator(cfg, xs.shape[0], log=lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.time()
    layer, _, rep, _ = cal.calibrate(nnx.clone(model.layers[args.hist_layer]), xs,
                                     args.hist_layer, len(model.layers))
    t = quant_linears(layer)[linear].transform
    return t, {"source": "trained here", "steps": rep.steps, "seconds": time.time() - t0,
               "loss_rtn": rep.loss_rtn, "loss_init": rep.loss_init,
               "loss_trained": rep.loss_trained, "loss_final": rep.loss_final,
               "fell_back": rep.fell_back,
               "budget": f"{xs.shape[0]}x{xs.shape[1]} tok, {args.train_epochs} ep"}


def plot_activation_hist(args, out: pathlib.Path) -> pathlib.Path:
    """Two rows (in-block |x|/absmax, block log2 absmax) x four transforms; stats to JSON."""
    from batquant_jax import data
    from batquant_jax.models import load_model
    from batquant_jax.transforms import BlockHadamard, RandomHadamard

    loaded = load_model("smollm2-135m")
    model = loaded.model
    ids = data.tokenize_corpus(data.load_corpus("wiki-calib"), loaded.tokenizer)
    train = data.sample_windows(ids, args.train_nsamples, args.train_seqlen, seed=0)
    probe = data.sample_windows(ids, args.hist_windows, args.train_seqlen, seed=1)
    ratios = None
    if args.hist_layer < 0:  # the layer whose input has the largest max / RMS on wiki-calib
        ratios = outlier_ratios(model, probe, args.hist_input)
        args.hist_layer = int(np.argmax(ratios))
    x = np.asarray(layer_input(model, probe, args.hist_layer, args.hist_input))
    d = x.shape[-1]
    gpk, prov = _learned_transform(args, model, train, args.hist_input)
    variants = [("none", None), ("RandomHadamard (global)", RandomHadamard(d, seed=0)),
                ("BlockHadamard(32)", BlockHadamard(d, 32)),
                ("learned GPK (training kept its init)" if prov.get("fell_back") else "learned GPK",
                 gpk)]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5), dpi=DPI)
    stats = {}
    for col, (name, t) in enumerate(variants):
        y = x if t is None else np.asarray(t(x))
        s = block_stats(y)
        stats[name] = {"rel_err": s["rel_err"], "flushed": s["flushed"],
                       "mean_ratio": float(s["ratio"].mean())}
        axes[0, col].hist(s["ratio"], bins=64, range=(0, 1), color="tab:gray")
        axes[0, col].set_yscale("log")
        axes[0, col].set_title(f"{name}\nMXFP4 rel. err {s['rel_err']:.3f}, "
                               f"flushed {100 * s['flushed']:.1f}%", fontsize=9)
        axes[0, col].set_xlabel("|x| / block absmax")
        axes[1, col].hist(s["log2_amax"], bins=48, color="tab:purple")
        axes[1, col].set_xlabel("log2(block absmax)")
    what = "down_proj input" if args.hist_input == "down" else "q/k/v input"
    fig.suptitle(f"SmolLM2-135M layer {args.hist_layer} {what} ({x.shape[0] * x.shape[1]} "
                 f"tokens, d={d}), per MX block of 32", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    meta = {"layer": args.hist_layer, "input": what, "d": d, "tokens": int(x.shape[0] * x.shape[1]),
            "outlier_ratio": outlier_ratio(x), "outlier_ratios": ratios, "gpk": prov,
            "transforms": stats}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results_dir", default=str(study.RESULTS_DIR))
    ap.add_argument("--plots_dir", default=str(PLOTS_DIR))
    ap.add_argument("--skip_hist", action="store_true")
    ap.add_argument("--checkpoint", default=None, help="calibrate.py output DIR (batquant)")
    ap.add_argument("--hist_layer", type=int, default=-1,
                    help="layer index; -1: the one whose input has the largest max/RMS")
    ap.add_argument("--hist_input", default="down", choices=("down", "qkv"))
    ap.add_argument("--hist_windows", type=int, default=4)
    ap.add_argument("--train_nsamples", type=int, default=32)
    ap.add_argument("--train_seqlen", type=int, default=256)
    ap.add_argument("--train_epochs", type=int, default=2)
    args = ap.parse_args(argv)
    plots = pathlib.Path(args.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    results = study.load_results(args.results_dir)
    done = [plot_perplexity(results, plots / "perplexity.png"),
            plot_layer_losses(results, plots / "layer_losses.png"),
            plot_accuracy(results, plots / "accuracy.png")]
    if not args.skip_hist:
        t0 = time.time()
        print("plots: activation histograms (loads the model; trains one layer's GPK unless "
              "--checkpoint is given; about a minute)", file=sys.stderr, flush=True)
        done.append(plot_activation_hist(args, plots / "activation_hist.png"))
        print(f"plots: histograms took {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    for p in done:
        print(f"plots: {'wrote ' + str(p) if p else 'skipped a figure (no headline results)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
