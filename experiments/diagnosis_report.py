"""The "Diagnosis" section of RESULTS.md, built from experiments/results/diagnose/*.json alone.

    .venv/bin/python -m experiments.report        # renders it with the rest of RESULTS.md

Every run there is one ``experiments/diagnose.py`` calibration with per-layer statistics and a
perplexity on the held-back end of wiki-calib ("dev"), the only text decisions are made on.
"""

from __future__ import annotations

import json
import math
import pathlib

from experiments.rows import geomean

HERE = pathlib.Path(__file__).resolve().parent
DIAG_DIR = HERE / "results" / "diagnose"


def load_runs(diag_dir=DIAG_DIR) -> dict[str, dict]:  # noqa: D103
    """{file stem: run record} for every diagnose JSON (sorted by name)."""
    d = pathlib.Path(diag_dir)
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


def describe(run: dict) -> str:
    """'batquant (loss token_mse, lr 0.01, scale smooth), seed 0, 32x256 tok, 2 ep (16 steps)'."""
    cfg = run.get("config", {})
    spec = cfg.get("method_spec", {})
    trains = spec.get("train", run["method"] in ("batquant", "flatquant"))
    what = ""
    if trains:
        parts = [f"loss {cfg.get('loss')}", f"lr {cfg.get('lr'):g}",
                 f"scale {spec.get('scale_init')}"]
        if cfg.get("loss_weight", "none") != "none":
            parts.append(f"weighted {cfg['loss_weight']}")
        if cfg.get("clip_lr", 2e-2) != 2e-2:
            parts.append(f"clip lr {cfg['clip_lr']:g}")
        if not cfg.get("train_weight_quant", True):
            parts.append("full-precision weights in training")
        what = " (" + ", ".join(parts) + ")"
    steps = run["epochs"] * (run["nsamples"] // cfg.get("batch_size", 4))
    train = f", {run['epochs']} ep ({steps} steps)" if trains else ""
    return f"{run['method']}{what}, seed {run['seed']}, {run['nsamples']}x{run['seqlen']} tok{train}"


def probe_table(probes: dict) -> list[str]:
    """Per probed layer: held-back per-token relative error after GPTQ over brq's (same windows)."""
    bases = [r for r in probes.values() if r["method"] == "brq"]
    if not bases:
        return []
    layers = bases[0].get("probe_layers", [])
    lines = ["| variant | " + " | ".join(f"layer {i}" for i in layers) +
             " | geometric mean | same on trained windows | layers kept init | calib s |",
             "|---|" + "---|" * (len(layers) + 4)]
    for run in sorted(probes.values(), key=describe):
        base = _base(probes, run)
        if base is None or run is base:
            continue
        held = [l["held"]["rel_err"] / b["held"]["rel_err"] for l, b in zip(run["layers"], base["layers"])]
        train = [l["train"]["rel_err"] / b["train"]["rel_err"] for l, b in zip(run["layers"], base["layers"])]
        cells = [describe(run)] + [f"{x:.3f}" for x in held]
        cells += [f"{geomean(held):.3f}", f"{geomean(train):.3f}",
                  str(sum(bool(l["fell_back"]) for l in run["layers"])), f"{run['calib_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _ratio(a: dict, b: dict, text: str) -> str:
    from experiments.rows import interval, paired_nll, verdict
    if text not in a or text not in b:
        return "–"
    p = paired_nll(a[text]["window_nll"], b[text]["window_nll"])
    if p is None:
        return "–"
    mean, se, _ = p
    return f"{interval(mean, se)} {verdict(mean, se)}"


def _base(runs: dict, run: dict) -> dict | None:
    """The brq run with the same calibration windows (seed, nsamples, seqlen), if any."""
    for r in runs.values():
        if r["method"] == "brq" and all(r[k] == run[k] for k in ("seed", "nsamples", "seqlen")):
            return r
    return None


def runs_table(runs: dict) -> list[str]:
    lines = ["| run | dev ppl | ratio to brq on dev (±2 SE) | wiki-eval ppl | shakespeare ppl | "
             "held/train layer MSE (mean over layers) | calib s |",
             "|---|---|---|---|---|---|---|"]
    for run in runs.values():
        base = _base(runs, run)
        held = [l["held"]["mse"] / l["train"]["mse"] for l in run["layers"] if l["train"]["mse"] > 0]
        cells = [describe(run), f"{run['dev']['perplexity']:.2f}",
                 _ratio(run, base, "dev") if base is not None and base is not run else "–"]
        cells += [f"{run[t]['perplexity']:.2f}" if t in run else "–" for t in ("wiki-eval", "shakespeare")]
        cells += [f"{sum(held) / len(held):.3f}", f"{run['calib_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _final_in_objective(run: dict, layer: dict) -> float:
    """A (brq) layer's final loss in ``run``'s objective: raw MSE, or the per-token relative
    error that diagnose.py records for every run (token_stats' rel_err)."""
    hp = run.get("config", {})
    if hp.get("loss_weight", "none") != "none":
        return math.nan  # weighted objectives: no like-for-like brq figure is recorded
    return layer["train"]["rel_err"] if hp.get("loss") == "token_mse" else layer["loss_final"]


def layer_table(run: dict, base: dict | None) -> list[str]:
    """Per layer: where the raw error sits, overfitting, and what GPTQ does to the trained gain."""
    lines = ["| layer | top 1% tokens | position 0 | top 1% channels | held/train | rtn | init | "
             "trained (RTN w) | final (GPTQ) | brq final | training gain kept by GPTQ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, l in enumerate(run["layers"]):
        tr, gain = l["train"], l["loss_init"] - l["loss_trained"]
        b = None if base is None else _final_in_objective(run, base["layers"][i])
        ok = b is not None and math.isfinite(b) and gain > 1e-12
        kept = f"{(b - l['loss_final']) / gain:+.2f}" if ok else "–"
        cells = [str(i), f"{tr['top1pct_share']:.2f}", f"{tr['pos0_share']:.2f}",
                 f"{tr.get('top1pct_channel_share', math.nan):.2f}",
                 f"{l['held']['mse'] / tr['mse']:.3f}"]
        cells += [f"{v:.4g}" for v in (l["loss_rtn"], l["loss_init"], l["loss_trained"],
                                       l["loss_final"])]
        cells += [f"{b:.4g}" if b is not None else "–", kept]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def section(diag_dir=DIAG_DIR) -> list[str]:
    runs = load_runs(diag_dir)
    if not runs:
        return []
    out = ["## Diagnosis: why a lower layer loss did not reach perplexity", "",
           "From `experiments/diagnose.py` (one JSON per run in `experiments/results/diagnose/`). "
           "Calibration windows come from the first 90% of wiki-calib's tokens; 'dev' is the "
           "last 10% (8 held-back windows of the layer statistics, 16 x 512 tokens of "
           "perplexity), the only text choices were made on. wiki-eval and Shakespeare "
           "(16 x 512 tokens each) are shown for the report only. The ratio compares a run "
           "with brq on the same calibration windows, paired over the dev windows.", ""]
    out += runs_table(runs)
    probes = load_runs(pathlib.Path(diag_dir) / "probes")
    if probes:
        out += ["### Layer probes: what the choices were made on", "",
                "`experiments/diagnose.py --layers=...`: only the listed decoder layers are "
                "calibrated (teacher-forced inputs, so each probed layer sees exactly what it "
                "sees in a full run). Each cell is the layer's per-token relative output error "
                "(error energy / output energy, averaged over tokens) after GPTQ on 8 held-back "
                "dev windows, divided by brq's on the same windows: below 1 beats block "
                "rotation. Layers are 0-based.", ""]
        out += probe_table(probes)
    for ref in (r for r in runs.values() if r["method"] == "batquant"):
        out += [f"### Per layer: {describe(ref)}", "",
                "Token and channel shares: the part of the layer's squared output error (after "
                "GPTQ, training windows) carried by the top 1% of tokens, by position 0 of each "
                "window (the attention sink) and by the top 1% of hidden channels. held/train: "
                "raw MSE on held-back windows over that on the trained ones. Losses are the "
                "run's objective: rtn (no transform), init (block Hadamard, RTN weights), "
                "trained (RTN weights), final (GPTQ); 'gain kept' = (brq final - final) / "
                "(init - trained), the share of the training gain still there after GPTQ.", ""]
        out += layer_table(ref, _base(runs, ref))
    return out
