"""Paired comparison of `evaluate --output_json` files on the same windows.

    .venv/bin/python -m experiments.compare_evals --files=fp:fp.json,brq:brq.json,batquant:bq.json \
        --pairs=batquant/brq,batquant/mr-gptq

Prints each file's perplexity and, for every pair a/b, the perplexity ratio exp(mean NLL
difference) with its ±2 standard-error interval over the windows (experiments/report.py's
paired statistics) and the verdict (better / worse / tie within 2 SE).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from experiments.rows import interval, paired_nll, verdict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", required=True, help="comma list of name:path")
    ap.add_argument("--pairs", default="", help="comma list of a/b names")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.files.split(","):
        name, _, path = item.partition(":")
        rec = json.loads(pathlib.Path(path).read_text())
        if "window_nll" not in rec:
            print(f"{path} has no window_nll (an evaluate JSON of an older version)", file=sys.stderr)
            return 2
        runs[name] = rec
    for name, rec in runs.items():
        print(f"{name:12s} ppl {rec['perplexity']:.4f}  ({rec['windows']} x {rec['seqlen']} tokens of "
              f"{rec['eval_data']})")
    for pair in filter(None, args.pairs.split(",")):
        a, _, b = pair.partition("/")
        res = paired_nll(runs[a]["window_nll"], runs[b]["window_nll"])
        if res is None:
            print(f"{a}/{b}: not comparable (different window counts)")
            continue
        mean, se, n = res
        print(f"{a}/{b}: ratio {interval(mean, se)} over {n} windows: {a} {verdict(mean, se)}"
              f" (per-window NLL difference {mean:+.4f} ± {se:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
