"""Packed MXFP4 decode against float32: resident bytes and decode speed, measured in one run.

    .venv/bin/python -m experiments.bench_packed                      # RTN SmolLM2, in memory
    .venv/bin/python -m experiments.bench_packed --checkpoint=out/smollm2-batquant

Four models decode the same prompt greedily (batch sizes ``--batch_sizes``, ``--prompt_tokens``
then ``--new_tokens``), their runs interleaved round by round so that a change in machine load
hits all of them alike; the median of ``--repeats`` rounds is printed:

- ``float32``: the original model (no quantization) -- the baseline of the ratios;
- ``dequantized``: the quantized model with its weights dequantized once at load (float32);
- ``packed-reference``: packed weights, dequantized inside every forward (``fused`` mode off);
- ``packed``: packed weights through the fused MXFP4 kernel (the default, ``fused`` auto).

It prints resident bytes (the sum of each model's state arrays), tokens/s and the ratio to
float32, and checks that the three quantized paths give the same greedy tokens and (on the first
``--ppl_windows`` windows of wiki-eval) the same perplexity up to float32 rounding. Without
--checkpoint the quantized model is SmolLM2-135M by RTN at W4A4KV16, made in memory (RTN needs
no calibration data).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

import numpy as np

from batquant_jax import checkpoint, cli, fused
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


def _decode(model, ids, batch, new_tokens, mode):
    with fused.matmul_mode(mode):
        run = gen.generate_ids(model, [ids] * batch, max_new_tokens=new_tokens, eos_ids=())
    return run.decode_tokens_per_second, run.tokens


def _ppl(model, ids, windows, mode):
    from batquant_jax import pipeline
    with fused.matmul_mode(mode):
        return pipeline.perplexities(model, {"wiki-eval": ids}, seqlen=512,
                                     max_tokens=512 * windows)["wiki-eval"].perplexity


def main(argv=None) -> int:
    cli.sync_cpu_dispatch()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--prompt_tokens", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--batch_sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl_windows", type=int, default=2)
    ap.add_argument("--output_json", default=None)
    args = ap.parse_args(argv)
    from flax import nnx

    from batquant_jax import data
    from batquant_jax.models import load_model
    packed, tok = _model(args)
    source = (checkpoint.read_json(pathlib.Path(args.checkpoint) / "metadata.json")["source_model"]["spec"]
              if args.checkpoint else args.model)
    original = load_model(source).model
    ids = tok.encode(TEXT * (1 + args.prompt_tokens // 60))[: args.prompt_tokens]
    unpacked = nnx.clone(packed)
    for q in quant_modules(unpacked):
        q.unpack()
    models = {"float32": (original, "off"), "dequantized": (unpacked, "off"),
              "packed-reference": (packed, "off"), "packed": (packed, "auto")}
    print(fused.describe(packed), flush=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    speeds = {(name, b): [] for name in models for b in batches}
    tokens = {}
    for b in batches:
        for name, (model, mode) in models.items():  # compile and warm up outside the clock
            _decode(model, ids, b, args.new_tokens, mode)
        for _ in range(args.repeats):
            for name, (model, mode) in models.items():
                speed, tokens[name, b] = _decode(model, ids, b, args.new_tokens, mode)
                speeds[name, b].append(speed)
    eval_ids = data.tokenize_corpus(data.load_corpus("wiki-eval"), tok)
    out = {"load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(), "rows": {}}
    for name, (model, mode) in models.items():
        sizes = checkpoint.weight_bytes(model)
        row = {**sizes, "perplexity": _ppl(model, eval_ids, args.ppl_windows, mode)}
        for b in batches:
            row[f"decode_tokens_per_s_b{b}"] = statistics.median(speeds[name, b])
            row[f"ratio_to_float32_b{b}"] = (row[f"decode_tokens_per_s_b{b}"]
                                             / statistics.median(speeds["float32", b]))
        out["rows"][name] = row
        per_batch = "; ".join(f"batch {b}: {row[f'decode_tokens_per_s_b{b}']:6.1f} tokens/s "
                              f"({row[f'ratio_to_float32_b{b}']:.2f}x float32)" for b in batches)
        print(f"{name:>16}: resident {sizes['model_resident_bytes'] / 2**20:6.1f} MiB; "
              f"{per_batch}; perplexity {row['perplexity']:.4f}", flush=True)
    quantized = ("dequantized", "packed-reference", "packed")
    same = all(tokens[n, b] == tokens["packed", b] for n in quantized for b in batches)
    ppl = [out["rows"][n]["perplexity"] for n in quantized]
    print(f"quantized paths: same greedy tokens {same}; perplexities differ by at most "
          f"{(max(ppl) - min(ppl)) / min(ppl):.2e} (relative); load average "
          f"{out['load_average']:.1f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
