"""Which tokens carry the gap between two quantized checkpoints: per-token NLL, same windows.

    .venv/bin/python -m experiments.token_diff --a=brq:DIR_A --b=batquant:DIR_B \\
        --eval_data=wiki-eval,PATH/shakespeare.v1.txt --max_tokens=4096 --output_json=OUT.json

Each checkpoint is loaded once and scored token by token on the windows evaluate's protocol
takes from each text (the first max_tokens // seqlen consecutive windows). The per-token
difference d = NLL_b - NLL_a (nats; positive: b is worse) is then split by
- the target token's count in the calibration text (wiki-calib, the text both were trained on):
  0, 1-9, 10-99, >= 100 occurrences;
- the position of the target in its window;
- the share of the summed difference carried by the 1% and 10% of tokens with the largest |d|;
- the share of windows where b is worse.
The summary is printed as a table per text; the JSON holds it, both NLL arrays and each target's
count (not the token ids: the texts stay out of the results).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from batquant_jax import cli, data, evaluate, perplexity

COUNT_BINS = ((0, 0), (1, 9), (10, 99), (100, None))
POSITION_BINS = ((1, 15), (16, 127), (128, None))


def _bins(values: np.ndarray, bins) -> list[tuple[str, np.ndarray]]:
    out = []
    for lo, hi in bins:
        mask = (values >= lo) & (values <= (np.inf if hi is None else hi))
        name = str(lo) if hi == lo else f">={lo}" if hi is None else f"{lo}-{hi}"
        out.append((name, mask))
    return out


def split_difference(nll_a: np.ndarray, nll_b: np.ndarray, target_counts: np.ndarray) -> dict:
    """The summary of d = nll_b - nll_a ([windows, T-1] each; target_counts: how often each
    predicted token occurs in the calibration text, the same shape)."""
    d = (nll_b - nll_a).astype(np.float64)
    total = float(d.sum())
    n = d.size
    pos = np.broadcast_to(np.arange(1, d.shape[1] + 1), d.shape)
    out = {"tokens": int(n), "mean_a": float(nll_a.mean()), "mean_b": float(nll_b.mean()),
           "mean_diff": total / n,
           "windows_b_worse": float((d.mean(axis=1) > 0).mean()), "by_count": [],
           "by_position": []}
    for key, values, bins in (("by_count", target_counts, COUNT_BINS),
                              ("by_position", pos, POSITION_BINS)):
        for name, mask in _bins(values, bins):
            m = int(mask.sum())
            out[key].append({"bin": name, "tokens": m, "share_of_tokens": m / n,
                             "mean_a": float(nll_a[mask].mean()) if m else 0.0,
                             "mean_diff": float(d[mask].mean()) if m else 0.0,
                             "share_of_total": float(d[mask].sum()) / total if total else 0.0})
    order = np.argsort(-np.abs(d).ravel())
    for frac in (0.01, 0.1):
        k = max(1, int(round(frac * n)))
        out[f"top{int(frac * 100)}pct_share_of_total"] = (float(d.ravel()[order[:k]].sum()) / total
                                                           if total else 0.0)
    return out


def table(name_a: str, name_b: str, text: str, s: dict) -> str:
    lines = [f"{text}: {name_b} - {name_a} per-token NLL, {s['tokens']} tokens; mean "
             f"{s['mean_a']:.4f} -> {s['mean_b']:.4f} ({s['mean_diff']:+.4f} nats); "
             f"{name_b} worse on {100 * s['windows_b_worse']:.0f}% of windows; top 1% of tokens "
             f"by |d| carry {100 * s['top1pct_share_of_total']:.0f}% of the total, top 10% "
             f"{100 * s['top10pct_share_of_total']:.0f}%",
             f"| split | bin | share of tokens | {name_a} NLL | mean d (nats) | d / {name_a} NLL "
             "| share of the total |",
             "|---|---|---|---|---|---|---|"]
    for key, label in (("by_count", "count in calibration text"), ("by_position", "position")):
        for row in s[key]:
            rel = row["mean_diff"] / row["mean_a"] if row["mean_a"] else 0.0
            lines.append(f"| {label} | {row['bin']} | {100 * row['share_of_tokens']:.1f}% | "
                         f"{row['mean_a']:.3f} | {row['mean_diff']:+.4f} | {100 * rel:+.1f}% | "
                         f"{100 * row['share_of_total']:.0f}% |")
    return "\n".join(lines)


def tables_of(result: dict) -> list[str]:
    """The tables of a run's JSON (its NLLs and target counts), one per text."""
    a, b = result["a"][0], result["b"][0]
    out = []
    for text, rec in result["texts"].items():
        s = split_difference(np.asarray(rec["nll"][a]), np.asarray(rec["nll"][b]),
                             np.asarray(rec["target_counts"]))
        out.append(table(a, b, pathlib.Path(text).name, s))
    return out


def main(argv=None) -> int:
    cli.lean_cpu_schedule()
    cli.sync_cpu_dispatch()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="NAME:CHECKPOINT_DIR (the reference)")
    ap.add_argument("--b", required=True, help="NAME:CHECKPOINT_DIR")
    ap.add_argument("--eval_data", default="wiki-eval", help="comma-separated texts")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max_tokens", type=int, default=4096)
    ap.add_argument("--output_json", default=None)
    ap.add_argument("--from_json", default=None,
                    help="summarize a previous --output_json again (no model is run)")
    args = ap.parse_args(argv)
    if args.from_json:
        print("\n".join(tables_of(json.loads(pathlib.Path(args.from_json).read_text()))))
        return 0
    runs = [tuple(x.split(":", 1)) for x in (args.a, args.b)]
    if any(len(r) != 2 for r in runs):
        ap.error("--a and --b take NAME:CHECKPOINT_DIR")
    texts = args.eval_data.split(",")
    nll: dict[str, dict[str, np.ndarray]] = {}
    windows: dict[str, np.ndarray] = {}
    counts = None
    for name, ckpt in runs:
        cfg = evaluate.EvalConfig(checkpoint=ckpt, seqlen=args.seqlen, max_tokens=args.max_tokens)
        evm = evaluate.get_nll_fn(cfg)
        if counts is None:  # the same tokenizer for both (checked through the windows below)
            calib = data.tokenize_corpus(data.load_corpus("wiki-calib"), evm.tokenizer)
            counts = np.bincount(calib, minlength=len(evm.tokenizer) + 1)
        for text in texts:
            ids = data.tokenize_corpus(data.load_corpus(text), evm.tokenizer)
            wins = perplexity.cut_windows(ids, args.seqlen, args.max_tokens)
            if text in windows and not np.array_equal(windows[text], wins):
                raise SystemExit(f"token_diff: {name} tokenizes {text} differently")
            windows[text] = wins
            nll.setdefault(text, {})[name] = np.concatenate(
                [np.asarray(evm.nll_fn(w[None])) for w in wins])
            print(f"token_diff: {name} on {text}: mean NLL {nll[text][name].mean():.4f}",
                  file=sys.stderr, flush=True)
        del evm
    (a, _), (b, _) = runs
    result = {"a": runs[0], "b": runs[1], "seqlen": args.seqlen, "texts": {}}
    for text in texts:
        target_counts = counts[windows[text][:, 1:]]  # no token ids kept: the text stays out
        s = split_difference(nll[text][a], nll[text][b], target_counts)
        print(table(a, b, pathlib.Path(text).name, s))
        result["texts"][text] = dict(
            s, nll={k: np.round(v, 5).tolist() for k, v in nll[text].items()},
            target_counts=target_counts.tolist())
    if args.output_json:
        pathlib.Path(args.output_json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
