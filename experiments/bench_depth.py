"""Peak memory against depth: a random-weight model of the 1.5B's width at 1x and 2x its depth.

    .venv/bin/python -m experiments.bench_depth --layers=28,56 --out=/tmp/depth

For each depth this writes a random qwen2 GGUF shaped like Qwen2.5-Coder-1.5B (hidden 1536,
intermediate 8960, 12 / 2 heads of 128, vocabulary 151,936; linears and embedding Q4_K, output
Q6_K, as in the Q4_K_M file) and runs, each in a fresh process, what the commands run:
- evaluate: ``load_model`` (weights kept in their GGUF encoding, as the commands do above 2 GiB)
  and the perplexity protocol over 2 x 512 random token windows (``forward_nll``, chunked head);
- calibrate: ``quantize_model`` with RTN (or each of ``--methods``) over 32 x 256 windows (the
  default budget's inputs and targets), then ``save_quantized``.
It prints each run's peak RSS (the child's own ``ru_maxrss``) and the file size, so the growth from
one depth to the next can be set against the stored weights the extra layers add. RTN stands for
the calibration's memory shape (per-layer inputs, targets and statistics are the same for every
method; a learning method adds its optimizer state for one layer at a time).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

HIDDEN, INTER, HEADS, KV, HD, VOCAB = 1536, 8960, 12, 2, 128, 151936
F16 = {"Q4_K": (0, 2), "Q6_K": (208,)}
BLOCK = {"Q4_K": (256, 144), "Q6_K": (256, 210)}


def _blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    per, size = BLOCK[kind]
    b = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for off in F16[kind]:
        h = (rng.standard_normal((rows, cols // per)) * 2e-3).astype(np.float16)
        b[..., off:off + 2] = h.view(np.uint8).reshape(rows, cols // per, 2)
    return b.reshape(rows, -1)


def write_gguf(path: pathlib.Path, layers: int, seed: int = 0) -> pathlib.Path:
    import gguf
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(layers)
    w.add_context_length(32768)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)

    def q(name, kind, rows, cols):
        w.add_tensor(name, _blocks(kind, rows, cols, rng), raw_dtype=gguf.GGMLQuantizationType[kind])

    def f32(name, n, base=0.0):
        w.add_tensor(name, (base + 0.1 * rng.standard_normal(n)).astype(np.float32))

    q("token_embd.weight", "Q4_K", VOCAB, HIDDEN)
    q("output.weight", "Q6_K", VOCAB, HIDDEN)
    f32("output_norm.weight", HIDDEN, 1.0)
    shapes = {"attn_q": (HEADS * HD, HIDDEN), "attn_k": (KV * HD, HIDDEN),
              "attn_v": (KV * HD, HIDDEN), "attn_output": (HIDDEN, HEADS * HD),
              "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
    for i in range(layers):
        for name, (rows, cols) in shapes.items():
            q(f"blk.{i}.{name}.weight", "Q4_K", rows, cols)
        for name in ("attn_q", "attn_k", "attn_v"):
            f32(f"blk.{i}.{name}.bias", shapes[name][0])
        f32(f"blk.{i}.attn_norm.weight", HIDDEN, 1.0)
        f32(f"blk.{i}.ffn_norm.weight", HIDDEN, 1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CHILD = r'''
import functools, json, sys, time
import numpy as np
from batquant_jax import cli, perplexity
cli.lean_cpu_schedule(); cli.sync_cpu_dispatch()
from batquant_jax.models import forward_nll, load_model
kind, gguf, out, method = sys.argv[1:5]
t0 = time.time()
model = load_model(gguf, with_tokenizer=False).model
rng = np.random.default_rng(0)
if kind == "evaluate":
    ids = rng.integers(0, 151936, size=2 * 512).astype(np.int32)
    res = perplexity.evaluate_perplexity(functools.partial(forward_nll, model), ids, seqlen=512)
    value = res.perplexity
else:
    from batquant_jax.calibration import quantize_model
    from batquant_jax.checkpoint import save_quantized
    windows = rng.integers(0, 151936, size=(32, 256)).astype(np.int32)
    model, result = quantize_model(model, windows, method, log=lambda m: None)
    save_quantized(out, model, result)
    value = len(result.layers)
import resource
print(json.dumps({"value": float(value), "seconds": round(time.time() - t0, 1),
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
'''


def child(kind: str, gguf: pathlib.Path, out: pathlib.Path, method: str = "rtn") -> dict:
    """Runs one command's work in a fresh process -> its value, seconds and own peak RSS."""
    res = subprocess.run([sys.executable, "-c", CHILD, kind, str(gguf), str(out), method],
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{kind} on {gguf} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="28,56")
    ap.add_argument("--out", default="/tmp/bench_depth")
    ap.add_argument("--kinds", default="evaluate,calibrate")
    ap.add_argument("--methods", default="rtn", help="calibration methods, comma-separated")
    args = ap.parse_args(argv)
    root = pathlib.Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    runs = [(k, m) for k in args.kinds.split(",")
            for m in (args.methods.split(",") if k == "calibrate" else [""])]
    for kind, method in runs:
        for n in (int(v) for v in args.layers.split(",")):
            gguf = root / f"random-{n}.gguf"
            if not gguf.exists():
                t = time.time()
                write_gguf(gguf, n)
                print(f"wrote {gguf} ({gguf.stat().st_size / 2**30:.2f} GiB, "
                      f"{time.time() - t:.0f} s)", file=sys.stderr, flush=True)
            rec = child(kind, gguf, root / f"ckpt-{n}-{method}", method or "rtn")
            rec.update(kind=kind + (f" ({method})" if method else ""), layers=n,
                       gguf_bytes=gguf.stat().st_size)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    print("\n| command | layers | GGUF | peak RSS | seconds |\n|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_kb'] / 2**20:.2f} GiB"
        print(f"| {r['kind']} | {r['layers']} | {r['gguf_bytes'] / 2**30:.2f} GiB | {peak} | "
              f"{r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
