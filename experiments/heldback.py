"""Perplexity on held-back calibration windows: the split decisions are made on.

    .venv/bin/python -m experiments.heldback --checkpoint=DIR --output_json=OUT.json
    .venv/bin/python -m experiments.heldback --model=qwen2.5-coder-1.5b --output_json=fp.json

The calibration text (wiki-calib) is cut as `experiments/diagnose.py` cuts it: its last 10% of
tokens is the dev part. From the dev part this takes consecutive windows of --seqlen tokens,
skipping every window that overlaps one of the calibration windows the checkpoint was trained
on (read from its metadata: nsamples, seqlen and seed of the calibration), and keeps the first
--windows of them. The evaluation texts (wiki-eval, shakespeare) are never read.

The output JSON has evaluate's fields (window_nll included), so `experiments.compare_evals`
pairs two runs: every checkpoint calibrated with the same nsamples / seqlen / seed gets the
same windows (the script checks and records their digest).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import numpy as np

from batquant_jax import checkpoint, cli, data, perplexity
from experiments.diagnose import split_calib


def heldback_windows(ids: np.ndarray, calib: dict, seqlen: int, n: int) -> np.ndarray:
    """int32 [n, seqlen] windows from the dev part of ``ids`` that share no token position with
    the calibration windows described by ``calib`` ({"nsamples", "seqlen", "seed"})."""
    pool, dev = split_calib(ids)
    rng = np.random.default_rng(int(calib["seed"]))  # data.sample_windows' draw, positions only
    starts = rng.integers(0, ids.size - calib["seqlen"] + 1, size=int(calib["nsamples"]))
    used = np.zeros(ids.size, bool)
    for s in starts:
        used[s:s + calib["seqlen"]] = True
    out = []
    for s in range(pool.size, ids.size - seqlen + 1, seqlen):
        if not used[s:s + seqlen].any():
            out.append(ids[s:s + seqlen])
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"heldback: only {len(out)} clean windows of {seqlen} tokens in the dev "
                         f"part; ask for fewer")
    return np.stack(out).astype(np.int32)


def main(argv=None) -> int:
    cli.lean_cpu_schedule()
    cli.sync_cpu_dispatch()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--model", default=None, help="a float model (instead of --checkpoint)")
    ap.add_argument("--calib", default='{"nsamples": 32, "seqlen": 256, "seed": 0}',
                    help="with --model: the calibration windows to avoid (JSON)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--output_json", required=True)
    args = ap.parse_args(argv)
    if (args.checkpoint is None) == (args.model is None):
        ap.error("pass exactly one of --checkpoint and --model")
    start = time.perf_counter()
    if args.checkpoint is not None:
        meta = json.loads((pathlib.Path(args.checkpoint) / "metadata.json").read_text())
        calib = {k: meta["calib_data"][k] for k in ("nsamples", "seqlen", "seed")}
        if meta["calib_data"]["name"] != "wiki-calib":
            raise SystemExit(f"heldback: {args.checkpoint} was calibrated on "
                             f"{meta['calib_data']['name']}, not wiki-calib")
    else:
        calib = json.loads(args.calib)
    from batquant_jax.models import forward_nll
    net, tok, description, _ = cli.load_for_command(args.model or "", args.checkpoint)
    ids = data.tokenize_corpus(data.load_corpus("wiki-calib"), tok)
    win = heldback_windows(ids, calib, args.seqlen, args.windows)
    digest = checkpoint.array_digest(win)
    print(f"heldback: {args.windows} x {args.seqlen} dev windows (sha256 {digest[:12]}) avoiding "
          f"the calibration windows {calib}; {description}", file=sys.stderr, flush=True)
    res = perplexity.evaluate_perplexity(functools.partial(forward_nll, net), win.reshape(-1),
                                         seqlen=args.seqlen, batch_size=1,
                                         progress=perplexity.progress_printer())
    result = {"perplexity": res.perplexity, "tokens": res.tokens, "windows": res.windows,
              "seqlen": res.seqlen, "model": args.checkpoint or args.model,
              "eval_data": "wiki-calib dev (held back)", "windows_sha256": digest,
              "calib_windows": calib, "seconds": round(time.perf_counter() - start, 3),
              "nll_mean": res.nll_mean, "window_nll": list(res.window_nll)}
    data.atomic_write(pathlib.Path(args.output_json),
                      (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    print(f"heldback: perplexity {res.perplexity:.4f}; wrote {args.output_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
