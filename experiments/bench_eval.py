"""Perplexity-evaluation speed: this project (JAX) against transformers + torch eager (fp32).

    .venv/bin/python -m experiments.bench_eval --windows=4 --seqlen=512
    .venv/bin/python -m experiments.bench_eval --model=qwen2.5-coder-1.5b --windows=2

Both run in this one process over the same first `--windows` windows of wiki-eval (same token
ids, from the project's tokenizer), the model's GGUF (default SmolLM2-135M-Instruct). Each side
is warmed up on one batch first (JAX: compilation; torch: first-call allocation), then timed.
Prints both perplexities, their relative difference, tokens/s of each and the speed ratio.
The torch side reads the GGUF with transformers' own converter (independent of this project's
loader). Caveat: the GGUF's linear weights were Q4_1; both sides run the same dequantized values.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import pathlib
import sys
import time

import numpy as np

from batquant_jax import data, evaluate, perplexity


def jax_side(cfg: evaluate.EvalConfig, windows: int) -> dict:
    t0 = time.perf_counter()
    evm = evaluate.get_nll_fn(cfg)
    load_s = time.perf_counter() - t0
    ids = data.tokenize_corpus(data.load_corpus(cfg.eval_data), evm.tokenizer)
    wins = perplexity.cut_windows(ids, cfg.seqlen, windows * cfg.seqlen)
    t0 = time.perf_counter()
    np.asarray(evm.nll_fn(wins[: cfg.batch_size]))  # compile for the one batch shape
    compile_s = time.perf_counter() - t0
    res = perplexity.evaluate_perplexity(evm.nll_fn, ids, seqlen=cfg.seqlen,
                                         max_tokens=windows * cfg.seqlen,
                                         batch_size=cfg.batch_size,
                                         progress=perplexity.progress_printer())
    return {"perplexity": res.perplexity, "windows": res.windows, "tokens_per_s":
            res.tokens / res.seconds, "seconds": res.seconds, "compile_s": compile_s,
            "load_s": load_s, "windows_ids": wins}


def torch_side(wins: np.ndarray, batch_size: int, gguf: str | None = None) -> dict:
    import torch

    from experiments.bench_zeroshot import torch_reference

    t0 = time.perf_counter()
    model = torch_reference(gguf)
    load_s = time.perf_counter() - t0

    def nll_sum(batch: np.ndarray) -> float:
        x = torch.from_numpy(batch.astype(np.int64))
        with torch.no_grad():
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        return float(nll.double())

    nll_sum(wins[:batch_size])  # warm-up
    t0 = time.perf_counter()
    total = sum(nll_sum(wins[i:i + batch_size]) for i in range(0, len(wins), batch_size))
    seconds = time.perf_counter() - t0
    n, t = wins.shape
    print(f"torch: {n} windows in {seconds:.1f} s", file=sys.stderr, flush=True)
    return {"perplexity": math.exp(total / (n * (t - 1))), "tokens_per_s": n * t / seconds,
            "seconds": seconds, "load_s": load_s, "threads": torch.get_num_threads()}


def main() -> None:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a model alias or .gguf file")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--eval_data", default="wiki-eval")
    p.add_argument("--output_json", default=None)
    args = p.parse_args()
    cfg = evaluate.EvalConfig(model=args.model, eval_data=args.eval_data, seqlen=args.seqlen,
                              max_tokens=args.windows * args.seqlen, batch_size=args.batch_size)
    cfg.validate()
    jx = jax_side(cfg, args.windows)
    wins = jx.pop("windows_ids")
    gc.collect()  # the JAX model goes before torch builds its float32 copy
    from batquant_jax.models.loading import _resolve
    kind, path = _resolve(args.model)
    th = torch_side(wins, args.batch_size, path if kind == "gguf" else None)
    ratio = jx["tokens_per_s"] / th["tokens_per_s"]
    print(f"windows: {len(wins)} x {args.seqlen} tokens of {args.eval_data}, batch {args.batch_size}")
    print(f"jax   : perplexity {jx['perplexity']:.4f}, {jx['tokens_per_s']:.1f} tok/s "
          f"(compile {jx['compile_s']:.1f} s, load {jx['load_s']:.1f} s)")
    print(f"torch : perplexity {th['perplexity']:.4f}, {th['tokens_per_s']:.1f} tok/s "
          f"(load {th['load_s']:.1f} s, {th['threads']} threads)")
    print(f"ppl relative difference {jx['perplexity'] / th['perplexity'] - 1:+.2e}; "
          f"speed ratio jax/torch {ratio:.2f}")
    if args.output_json:
        out = pathlib.Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"jax": jx, "torch": th, "speed_ratio": ratio,
                                   "windows": len(wins), "seqlen": args.seqlen}, indent=1))


if __name__ == "__main__":
    main()
