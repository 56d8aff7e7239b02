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
import time


from batquant_jax import data, perplexity
from batquant_jax.calibration import quantize_model
from batquant_jax.models import forward_nll, load_model

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _ppl(model, eval_ids, seqlen, max_tokens):
    import functools
    res = perplexity.evaluate_perplexity(functools.partial(forward_nll, model), eval_ids,
                                         seqlen=seqlen, max_tokens=max_tokens, batch_size=1)
    return res


def run_row(model_name: str, windows, method: str, setting: str, evals: dict, *, epochs: int,
            seed: int, hparams: dict, eval_seqlen: int, eval_max_tokens: int,
            measure=None) -> dict:
    """Calibrates one (method, setting) on ``windows`` (int32 [N, T]) and evaluates it on every
    text of ``evals`` ({name: int32 token ids}); method "fp" skips calibration.

    Returns {"calib_seconds", "layers": [LayerReport dicts], "trainable_params",
    "eval": {name: {"perplexity", "nll_mean", "tokens", "windows", "seconds", "window_nll"}}},
    plus "measured": measure(model) when ``measure`` is given (e.g. zero-shot accuracy of the
    calibrated model, in memory).
    """
    from batquant_jax.qlayers import num_trainable

    model = load_model(model_name, with_tokenizer=False).model
    t0 = time.time()
    layers, params = [], 0
    if method != "fp":
        model, res = quantize_model(model, windows, method, setting, epochs=epochs, seed=seed,
                                    **hparams)
        layers = [vars(r) for r in res.layers]
        params = sum(num_trainable(layer) for layer in model.layers)
    calib_s = time.time() - t0
    out = {"calib_seconds": calib_s, "layers": layers, "trainable_params": int(params), "eval": {}}
    for name, ids in evals.items():
        ppl = _ppl(model, ids, eval_seqlen, eval_max_tokens)
        out["eval"][name] = {"perplexity": ppl.perplexity, "nll_mean": ppl.nll_mean,
                             "tokens": ppl.tokens, "windows": ppl.windows, "seconds": ppl.seconds,
                             "window_nll": list(ppl.window_nll)}
    if measure is not None:
        out["measured"] = measure(model)
    return out


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
