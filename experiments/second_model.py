"""The Qwen2.5-Coder-1.5B section of RESULTS.md, built from experiments/results/qwen15b/ alone.

    .venv/bin/python -m experiments.report        # renders it with the rest of RESULTS.md

The files there are what the commands wrote for the 1.5B rows (each row resumable per
checkpoint, run across sessions):
- ``ev-<row>-<text>.json``: ``evaluate --checkpoint=<ckpt> --eval_data=<text> --max_tokens=4096
  --output_json=...`` (8 x 512 tokens, per-window NLLs), row ``fp`` from ``--model``;
- ``heldback-<row>.json``: ``experiments/heldback.py`` (8 x 512 held-back calibration tokens,
  the only text choices are made on);
- ``calibrate-<row>.txt``: the per-layer table ``calibrate`` prints (seconds per layer);
- ``token-diff-<b>-<a>.json``: ``experiments/token_diff.py`` (per-token NLL of two checkpoints
  on the same evaluation windows);
- ``zs-<row>.json``: ``evaluate --checkpoint=<ckpt> --tasks=arc_easy,hellaswag,piqa,winogrande,
  lambada --limit=100 --output_json=...`` (row ``fp`` from ``--model``), per-item correctness.
"""

from __future__ import annotations

import json
import math
import pathlib

from batquant_jax import data
from experiments.rows import geomean, interval, paired_nll, paired_recovery, verdict

HERE = pathlib.Path(__file__).resolve().parent
DIR = HERE / "results" / "qwen15b"
PROBES = HERE / "results" / "diagnose" / "probes" / "qwen2.5-coder-1.5b"
TEXTS = ("wiki-eval", "shakespeare")
ORDER = ("fp", "rtn", "gptq", "quarot", "brq", "mr-gptq", "flatquant", "batquant")
BASELINES = ("rtn", "gptq", "quarot", "brq", "mr-gptq", "flatquant")
# (our row, the baselines' row suffix, what the rows share): one BATQuant / baseline table each
COMPARISONS = (
    ("batquant", "", "at W4A4KV16"), ("batquant-w4a8", "-w4a8", "at W4A8KV16"),
    ("batquant-mix", "-mix", "at W4A4KV16, both calibrated on wiki-calib plus Python source "
     "(`--calib_data=wiki-calib,<stdlib>`: the top-level modules of the Python standard library, "
     "half the windows each)"),
    ("batquant-ones", "", "at W4A4KV16, BATQuant's channel scale started at 1 "
     "(`--scale_init=ones`; chosen on Python source, neither calibration nor evaluation text)"))
# rows calibrated alone on the machine (both cores); every other row had one core of 2, the
# other busy with another row
QUIET = ("batquant-s2", "batquant-ones-s1", "batquant-ones-s2", "batquant-mix")
SEEDS = (0, 1, 2)  # calibration seeds of batquant and brq at W4A4KV16: rows <method>-s<seed>


def zero_shot(folder=DIR) -> dict[str, dict]:
    """{row: zero-shot evaluate JSON} of the ``zs-<row>.json`` files."""
    return _records(pathlib.Path(folder), "zs-")


def zero_shot_lines(runs: dict[str, dict]) -> list[str]:
    """Accuracy per task (acc, %), average and recovery against fp (paired ±1 SE per item)."""
    if "fp" not in runs:
        return []
    tasks = list(runs["fp"]["tasks"])
    items = {row: {t: r["tasks"][t]["per_item"]["acc"] for t in tasks if t in r["tasks"]}
             for row, r in runs.items()}
    n = min(len(v) for v in items["fp"].values())
    out = [f"Zero-shot accuracy (acc, %, the first {n} items of each task, lm-eval's formats; "
           "recovery = average / fp's average on the same items, ±1 SE paired per item):", "",
           "| row | " + " | ".join(tasks) + " | average | recovery |",
           "|---|" + "---|" * (len(tasks) + 2)]
    for row in [r for r in ORDER if r in runs] + sorted(r for r in runs if r not in ORDER):
        accs = [100 * sum(items[row][t]) / len(items[row][t]) if t in items[row] else None
                for t in tasks]
        cells = [f"{a:.0f}" if a is not None else "-" for a in accs]
        done = [a for a in accs if a is not None]
        avg = f"{sum(done) / len(done):.1f}" if len(done) == len(tasks) else "-"
        rec = "-"
        if row != "fp" and len(done) == len(tasks):
            res = paired_recovery(items[row], items["fp"])
            rec = f"{100 * res['recovery']:.1f}% ± {100 * res['recovery_se']:.1f}" if res else "-"
        out.append(f"| {row} | " + " | ".join(cells) + f" | {avg} | {rec} |")
    return out + [""]


def _records(d: pathlib.Path, prefix: str) -> dict[str, dict]:
    """{row: JSON} of the ``<prefix><row>.json`` files in ``d``."""
    return {p.stem[len(prefix):]: json.loads(p.read_text())
            for p in sorted(d.glob(f"{prefix}*.json"))}


def load(folder=DIR) -> tuple[dict, dict, dict, dict]:
    """({row: {text: evaluate JSON}}, {row: heldback JSON}, {row: asyncio evaluate JSON},
    {row: calibration seconds})."""
    d = pathlib.Path(folder)
    evals: dict[str, dict] = {}
    for p in sorted(d.glob("ev-*.json")):
        stem = p.stem[3:]
        for t in TEXTS:
            if stem.endswith("-" + t):
                evals.setdefault(stem[: -len(t) - 1], {})[t] = json.loads(p.read_text())
    held, other = _records(d, "heldback-"), _records(d, "asyncio-")
    seconds = {}
    for p in sorted(d.glob("calibrate-*.txt")):
        rows = [line.split() for line in p.read_text().splitlines()[1:]]
        secs = [float(r[6]) for r in rows if r and r[0].isdigit()]  # after it: "fell back"
        if secs:
            seconds[p.stem[len("calibrate-"):]] = sum(secs)
    return evals, held, other, seconds


def _rows(evals: dict) -> list[str]:
    return [r for r in ORDER if r in evals] + sorted(r for r in evals if r not in ORDER)


def _pair(a: dict, b: dict) -> str:
    res = paired_nll(a["window_nll"], b["window_nll"])
    return "n/a" if res is None else _cell(*res[:2])


def _cell(mean: float, se: float) -> str:
    """'ratio [low, high] better|worse|tie' of a paired per-window NLL difference."""
    return f"{interval(mean, se)} {verdict(mean, se).split(' ')[0]}"


def _side_table(recs: dict, title: str) -> list[str]:
    """Perplexity of some checkpoints on one more text, each against brq's on it."""
    if not recs:
        return []
    out = ["", title, "", "| checkpoint | ppl | vs brq |", "|---|---|---|"]
    for row, rec in recs.items():
        vs = _pair(rec, recs["brq"]) if "brq" in recs and row != "brq" else "-"
        out.append(f"| {row} | {rec['perplexity']:.4f} | {vs} |")
    return out


def section(folder=DIR) -> list[str]:
    """The markdown lines of the section (empty without evaluation files)."""
    evals, held, other, seconds = load(folder)
    if not evals:
        return []
    out = ["## Second model: Qwen2.5-Coder-1.5B-Instruct (seed 0, default budget)", "",
           "qwen2, 28 layers, hidden 1536, from its Q4_K_M GGUF (the same caveat as SmolLM2's: "
           "the weights were 4-bit once). Rows are W4A4KV16 unless named `-w4a8` (W4A8KV16). "
           "`-mix` rows calibrate on wiki-calib plus Python source. "
           "8 x 512 evaluation tokens per text; ratios are paired "
           "over the windows with ±2 SE. Calibration time is the sum of the per-layer times "
           "(one core of 2, the other busy, except rows marked * that ran alone on both cores; "
           "excludes loading and the checkpoint write). Rows are bit-exact for the same code on "
           "the same number of cores; on another core count GPTQ's rounding flips on a few codes "
           "(quarot rerun on 2 cores instead of 1: 0.9919 and 1.0066 of the first run, ties).", "",
           "| row | " + " | ".join(f"{t} ppl | vs fp" for t in TEXTS) + " | calibration |",
           "|---|" + "---|---|" * len(TEXTS) + "---|"]
    fp = evals.get("fp", {})
    for row in _rows(evals):
        cells = []
        for t in TEXTS:
            rec = evals[row].get(t)
            cells.append(f"{rec['perplexity']:.3f}" if rec else "-")
            cells.append(_pair(rec, fp[t]).rsplit(" ", 1)[0] if rec and t in fp and row != "fp"
                         else "-")
        secs = seconds.get(row)
        out.append(f"| {row} | " + " | ".join(cells) + " | "
                   + (f"{secs / 60:.0f} min" + "*" * (row in QUIET) if secs else "-") + " |")
    for ours, suffix, what in COMPARISONS:
        if ours not in evals or not any(b + suffix in evals for b in BASELINES):
            continue
        out += ["", f"BATQuant against each baseline {what} (ratio < 1 favours BATQuant):",
                "", f"| {ours} / | " + " | ".join(TEXTS) + " |", "|---|" + "---|" * len(TEXTS)]
        for base in (b + suffix for b in BASELINES):
            if base in evals:
                cells = [_pair(evals[ours][t], evals[base][t])
                         if t in evals[ours] and t in evals[base] else "-" for t in TEXTS]
                out.append(f"| {base} | " + " | ".join(cells) + " |")
    ones = " (`--scale_init=ones`)"
    out += (seed_lines(evals) + seed_lines(evals, "batquant-ones", ones)
            + seed_lines(evals, "batquant-ones", ones, "batquant", "BATQuant (default start)"))
    out += _side_table(held, "Held-back calibration windows (8 x 512 tokens of wiki-calib's "
                       "last 10% that no calibration window touches; `experiments/heldback.py`), "
                       "where the choice of batquant's channel-scale start was first made:")
    out += _side_table(other, "Another register (`evaluate --eval_data=<stdlib>/asyncio "
                       "--max_tokens=4096`: Python source, neither calibration nor evaluation "
                       "text), where the `ones` start was chosen:")
    out.append("")
    return (out + zero_shot_lines(zero_shot(folder)) + token_lines(folder)
            + probe_lines(PROBES if folder == DIR else pathlib.Path(folder) / "probes"))


def _sources(run: dict) -> list[str]:
    """A probe run's calibration sources (``--calib_data``, wiki-calib when unrecorded)."""
    return data.calib_sources(run.get("calib_data") or "wiki-calib")


def _calibration(run: dict) -> str:
    """A probe run's calibration text: its sources ("wiki-calib + python3.11")."""
    return " + ".join(n if n == "wiki-calib" else pathlib.Path(n).name for n in _sources(run))


def _variant(run: dict) -> str:
    """The calibration text plus any hyperparameter the run changed ("wiki-calib, anchor 25")."""
    hp = run.get("hparams") or {}
    return ", ".join([_calibration(run)] + [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in sorted(hp.items())])


def probe_lines(folder=PROBES) -> list[str]:
    """Layer probes of ``experiments/diagnose.py --layers=... --other_text=...``: per probed
    layer, batquant's per-token relative output error over brq's (calibrated on the same text)
    on its calibration windows, held-back calibration windows and windows of another text
    (neither calibration nor evaluation text); one block of rows per batquant variant (the
    calibration text and changed hyperparameters), the plain wiki-calib run first."""
    runs = [json.loads(p.read_text()) for p in sorted(pathlib.Path(folder).glob("*.json"))]
    runs = [r for r in runs if r.get("other_text")]
    base = {_calibration(r): r for r in runs if r["method"] == "brq" and not r.get("hparams")}
    ours = sorted((r for r in runs if r["method"] == "batquant" and _calibration(r) in base),
                  key=lambda r: (_variant(r) != "wiki-calib", _variant(r)))
    if not ours:
        return []
    first = ours[0]
    layers, other = first["probe_layers"], pathlib.Path(first["other_text"]).name
    out = ["Layer probes (`experiments/diagnose.py --layers=... --other_text=...`: only these "
           f"layers calibrated, teacher-forced, {first['nsamples']} x {first['seqlen']} calibration "
           "tokens): batquant's per-token relative output error over brq's calibrated on the same "
           f"text, on its calibration windows, on {first['holdout']} held-back wiki-calib windows "
           f"and on {first['holdout']} windows of another register (`{other}`; neither "
           "calibration nor evaluation text). Several calibration sources share the windows "
           "evenly. Layers are 0-based; below 1 favours batquant.", "",
           "| calibration | windows | " + " | ".join(f"layer {i}" for i in layers)
           + " | geometric mean |", "|---|---|" + "---|" * (len(layers) + 1)]
    mixed = sorted({_calibration(r) for r in ours if len(_sources(r)) > 1})
    if mixed:  # the other text is unseen there, but its register may not be
        out[0] += (f" Calibrated on {' and '.join(f'`{m}`' for m in mixed)}, the `{other}` "
                   "windows are unseen text, though of a register such a source may share.")
    for run in ours:
        if run["probe_layers"] != layers or pathlib.Path(run["other_text"]).name != other:
            continue
        b = base[_calibration(run)]
        for key, name in (("train", "calibration (trained on)"), ("held", "held-back wiki-calib"),
                          ("other", f"other text ({other})")):
            r = [x[key]["rel_err"] / y[key]["rel_err"] for x, y in zip(run["layers"], b["layers"])]
            out.append(f"| {_variant(run)} | {name} | " + " | ".join(f"{x:.3f}" for x in r)
                       + f" | {geomean(r):.3f} |")
    return out + [""]


def _seed_row(method: str, seed: int) -> str:
    return method if seed == 0 else f"{method}-s{seed}"


def seed_lines(evals: dict, ours: str = "batquant", what: str = "",
               base_row: str = "brq", base: str = "BRQ") -> list[str]:
    """``ours`` / ``base_row`` at W4A4KV16 on each calibration seed that both rows have (seed
    0: the plain rows; seed s: ``<row>-s<s>``, ``calibrate --seed=s``): the paired ratio per
    text and how many seeds meet the goal (ratio <= 0.97 with the ±2 SE interval below 1)."""
    pairs = [(s, evals[_seed_row(ours, s)], evals[_seed_row(base_row, s)]) for s in SEEDS
             if _seed_row(ours, s) in evals and _seed_row(base_row, s) in evals]
    if not any(s for s, _, _ in pairs):
        return []  # seed 0 alone is in the table above
    out = ["", f"BATQuant{what} / {base} at W4A4KV16 across calibration seeds (each seed "
           "calibrates both on its own windows; ratio < 1 favours the first):", "",
           f"| seed ({ours} / {base_row}) | " + " | ".join(TEXTS) + " |",
           "|---|" + "---|" * len(TEXTS)]
    met = {t: 0 for t in TEXTS}
    for seed, a, b in pairs:
        cells = []
        for t in TEXTS:
            res = paired_nll(a[t]["window_nll"], b[t]["window_nll"]) if t in a and t in b else None
            if res is None:
                cells.append("-")
                continue
            mean, se, _ = res
            met[t] += math.exp(mean) <= 0.97 and mean + 2 * se < 0
            cells.append(_cell(mean, se))
        out.append(f"| {seed} | " + " | ".join(cells) + " |")
    if base_row != "brq":  # the goal is set against brq
        return out
    return out + ["", "Seeds meeting the goal (ratio <= 0.97, interval below 1): "
                  + ", ".join(f"{t} {met[t]} of {len(pairs)}" for t in TEXTS) + "."]


def token_lines(folder=DIR) -> list[str]:
    """Where batquant's gap to brq lies, token by token (``token-diff-*.json`` of
    ``experiments/token_diff.py``)."""
    from experiments.token_diff import tables_of
    out = []
    for p in sorted(pathlib.Path(folder).glob("token-diff-*.json")):
        out += ["Per-token NLL on the same evaluation windows (`experiments/token_diff.py`), the "
                "difference split by how often the predicted token occurs in the calibration "
                "text (wiki-calib) and by position:", ""]
        for t in tables_of(json.loads(p.read_text())):
            head, rest = t.split("\n", 1)
            out += [head, "", rest, ""]
    return out


if __name__ == "__main__":
    print("\n".join(section()))
