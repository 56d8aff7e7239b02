"""Method comparison on SmolLM2-135M: calibrate each method on the same windows, then measure
perplexity on the evaluation split. One JSON per (method, setting) under experiments/results/.

    .venv/bin/python -m experiments.compare --methods=rtn,gptq,brq,batquant --setting=W4A4KV16 \
        --nsamples=32 --seqlen=512 --epochs=2 --eval_max_tokens=16384

The full-precision row is measured once per evaluation budget (method "fp"). Calibration data is
`wiki-calib`; perplexity is on `--eval_data` (default `wiki-eval`); the two never share articles.
Extra calibration hyper-parameters: --hparams='{"lr": 1e-3, "init": "identity"}'.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


from batquant_jax import data, pipeline
from batquant_jax.models import load_model

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def run_row(model_name: str, windows, method: str, setting: str, evals: dict, *, epochs: int,
            seed: int, hparams: dict, eval_seqlen: int, eval_max_tokens: int,
            measure=None) -> dict:
    """One (method, setting): ``pipeline.quantize_and_evaluate`` of ``model_name`` on
    ``windows`` (int32 [N, T]) and every text of ``evals``; method "fp" skips calibration."""
    return pipeline.quantize_and_evaluate(model_name, windows, method, setting, evals,
                                          eval_seqlen=eval_seqlen,
                                          eval_max_tokens=eval_max_tokens, measure=measure,
                                          epochs=epochs, seed=seed, **hparams)


def main(argv=None) -> int:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="fp,rtn,gptq,quarot,brq,mr-gptq,flatquant,batquant")
    ap.add_argument("--setting", default="W4A4KV16")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval_data", default="wiki-eval")
    ap.add_argument("--eval_seqlen", type=int, default=512)
    ap.add_argument("--eval_max_tokens", type=int, default=16384)
    ap.add_argument("--hparams", default="{}", help="JSON dict of extra CalibConfig fields")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    args = ap.parse_args(argv)
    hparams = json.loads(args.hparams)
    RESULTS.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args.model)
    calib_ids = data.tokenize_corpus(data.load_corpus("wiki-calib"), loaded.tokenizer)
    eval_ids = data.tokenize_corpus(data.load_corpus(args.eval_data), loaded.tokenizer)
    windows = data.sample_windows(calib_ids, args.nsamples, args.seqlen, args.seed)

    for method in args.methods.split(","):
        row = run_row(args.model, windows, method, args.setting, {args.eval_data: eval_ids},
                      epochs=args.epochs, seed=args.seed, hparams=hparams,
                      eval_seqlen=args.eval_seqlen, eval_max_tokens=args.eval_max_tokens)
        ppl, calib_s = row["eval"][args.eval_data], row["calib_seconds"]
        out = {
            "method": method, "setting": args.setting if method != "fp" else "fp32",
            "perplexity": ppl["perplexity"], "eval_tokens": ppl["tokens"],
            "eval_windows": ppl["windows"], "eval_data": args.eval_data, "calib_seconds": calib_s,
            "eval_seconds": ppl["seconds"], "nsamples": args.nsamples, "seqlen": args.seqlen,
            "epochs": args.epochs, "seed": args.seed, "hparams": hparams, "layers": row["layers"],
        }
        name = f"{method}_{out['setting']}{args.tag}_{args.eval_data}_{args.eval_max_tokens}.json"
        (RESULTS / name).write_text(json.dumps(out, indent=1))
        print(f"RESULT {method:10s} {out['setting']:9s} ppl {ppl['perplexity']:9.3f} "
              f"calib {calib_s:7.1f}s eval {ppl['seconds']:6.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
