"""The "Diagnosis" section of RESULTS.md, built from experiments/results/diagnose/*.json alone.

    .venv/bin/python experiments/report.py        # renders it with the rest of RESULTS.md

Every run there is one ``experiments/diagnose.py`` calibration with per-layer statistics and a
perplexity on the held-back end of wiki-calib ("dev"), the only text decisions are made on.
"""

from __future__ import annotations

import json
import math
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
DIAG_DIR = HERE / "results" / "diagnose"
OBJECTIVE_FIELDS = ("loss", "loss_weight", "scale_init", "smooth_alpha", "lr", "init")


def load_runs(diag_dir=DIAG_DIR) -> dict[str, dict]:
    """{file stem: run record} for every diagnose JSON (sorted by name)."""
    d = pathlib.Path(diag_dir)
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


def describe(run: dict) -> str:
    """'batquant, loss=token_mse, 32x256 tok, 2 ep (16 steps/layer)'."""
    hp = run.get("hparams", {})
    extra = "".join(f", {k}={hp[k]}" for k in OBJECTIVE_FIELDS if k in hp)
    steps = run["epochs"] * (run["nsamples"] // hp.get("batch_size", 4))
    train = f", {run['epochs']} ep ({steps} steps/layer)" if run["method"] in ("batquant", "flatquant") else ""
    return f"{run['method']}{extra}, seed {run['seed']}, {run['nsamples']}x{run['seqlen']} tok{train}"


def _ratio(a: dict, b: dict, text: str) -> str:
    from report import _interval, paired_nll, verdict
    if text not in a or text not in b:
        return "–"
    p = paired_nll(a[text]["window_nll"], b[text]["window_nll"])
    if p is None:
        return "–"
    mean, se, _ = p
    return f"{_interval(mean, se)} {verdict(mean, se)}"


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
    hp = run.get("hparams", {})
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
    ref = next((r for r in runs.values() if r["method"] == "batquant" and not r.get("hparams")), None)
    if ref is not None:
        out += [f"### Per layer: {describe(ref)} (raw MSE objective)", "",
                "Token and channel shares: the part of the layer's squared output error (after "
                "GPTQ, training windows) carried by the top 1% of tokens, by position 0 of each "
                "window (the attention sink) and by the top 1% of hidden channels. held/train: "
                "raw MSE on held-back windows over that on the trained ones. Losses are the "
                "run's objective: rtn (no transform), init (block Hadamard, RTN weights), "
                "trained (RTN weights), final (GPTQ); 'gain kept' = (brq final - final) / "
                "(init - trained), the share of the training gain still there after GPTQ.", ""]
        out += layer_table(ref, _base(runs, ref))
    return out
