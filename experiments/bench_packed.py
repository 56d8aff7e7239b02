"""Packed weights in memory: resident bytes and decode speed of a quantized model whose linears
keep their MXFP4 codes + E8M0 scales, against the same model dequantized once at load.

    .venv/bin/python -m experiments.bench_packed                      # RTN SmolLM2, in memory
    .venv/bin/python -m experiments.bench_packed --checkpoint=out/smollm2-batquant

One run prints, for the packed and the dequantized-at-load model: resident bytes (the sum of
the model's state arrays), the same model in float32 and bfloat16, greedy decode tokens/s
(batch 1, ``--prompt_tokens`` then ``--new_tokens``, median of ``--repeats``), the ratio of the
two speeds, and the perplexity of both on the first ``--ppl_windows`` windows of wiki-eval
(they must be equal: the dequantized weights are the packed values). Without --checkpoint the
model is SmolLM2-135M quantized with RTN at W4A4KV16 in memory (RTN needs no calibration
data; it is the cheapest way to a packed model with every linear quantized).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from batquant_jax import checkpoint, cli
from batquant_jax.qlayers import quant_modules
from batquant_jax import generate as gen
from experiments.bench_generate import TEXT


def _model(args):
    from batquant_jax.calibration import quantize_model
    from batquant_jax.models import load_model
    if args.checkpoint:
        model, tok, _ = checkpoint.load_quantized(args.checkpoint)
        return model, tok
    loaded = load_model(args.model)
    dummy = np.zeros((4, 32), np.int32)  # RTN ignores the data; quantize_model wants windows
    model, _ = quantize_model(loaded.model, dummy, "rtn", "W4A4KV16", log=lambda m: None)
    return model, loaded.tokenizer


def _decode_speed(model, ids, new_tokens, repeats):
    runs = [gen.generate_ids(model, [ids], max_new_tokens=new_tokens, eos_ids=())
            for _ in range(repeats)]
    return statistics.median(r.decode_tokens_per_second for r in runs), runs[0].tokens[0]


def _ppl(model, ids, windows):
    from batquant_jax import pipeline
    return pipeline.perplexities(model, {"wiki-eval": ids}, seqlen=512,
                                 max_tokens=512 * windows)["wiki-eval"].perplexity


def main(argv=None) -> int:
    cli.sync_cpu_dispatch()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--prompt_tokens", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl_windows", type=int, default=2)
    ap.add_argument("--output_json", default=None)
    args = ap.parse_args(argv)
    from flax import nnx

    from batquant_jax import data
    packed, tok = _model(args)
    ids = tok.encode(TEXT * (1 + args.prompt_tokens // 60))[: args.prompt_tokens]
    eval_ids = data.tokenize_corpus(data.load_corpus("wiki-eval"), tok)
    unpacked = nnx.clone(packed)
    for q in quant_modules(unpacked):
        q.unpack()
    out = {}
    for name, model in (("packed", packed), ("dequantized", unpacked)):
        sizes = checkpoint.weight_bytes(model)
        speed, tokens = _decode_speed(model, ids, args.new_tokens, args.repeats)
        out[name] = {**sizes, "decode_tokens_per_s": speed, "tokens": tokens,
                     "perplexity": _ppl(model, eval_ids, args.ppl_windows)}
        print(f"{name:>11}: resident {sizes['model_resident_bytes'] / 2**20:7.1f} MiB "
              f"({sizes['model_ratio_vs_float32']:.3f} of float32 "
              f"{sizes['model_float32_bytes'] / 2**20:.1f} MiB; bfloat16 "
              f"{sizes['model_bfloat16_bytes'] / 2**20:.1f} MiB); linear weights "
              f"{sizes['model_packed_weight_bytes'] / 2**20:.1f} MiB packed; decode "
              f"{speed:.1f} tokens/s; perplexity {out[name]['perplexity']:.4f}", flush=True)
    p, d = out["packed"], out["dequantized"]
    print(f"packed / dequantized: resident bytes {p['model_resident_bytes'] / d['model_resident_bytes']:.3f}, "
          f"decode speed {p['decode_tokens_per_s'] / d['decode_tokens_per_s']:.3f}; same greedy "
          f"tokens: {p['tokens'] == d['tokens']}; same perplexity: "
          f"{p['perplexity'] == d['perplexity']}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
