# Run: .venv/bin/python -m experiments.bench_mx [--n 4096] [--reps 20]
"""Speed of the MX numerics against the memory-bound floor, on one n x n float32 array.

Times (after warm-up; median of --reps runs; block_until_ready):
  floor       jitted x * 1.5 + 0.5 (one read, one write: the memory-bound floor)
  fake_quant  jitted mx.fake_quant (MXFP4, floor scales, ties to even) along the last axis
  fake_quant0 the same along axis 0 (includes the transposes)
  quantize    mx.quantize as called eagerly (jitted inside; codes packed two per byte + scales)
  quantize_j  mx.quantize traced inside a caller's jit (XLA CPU fuses the final flatten badly)
  dequantize  jitted mx.dequantize back to float32
and prints each time and its ratio to the floor. Goal: fake_quant <= 2x the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from batquant_jax import mx


def _median_seconds(fn, x, reps: int) -> float:
    jax.block_until_ready(fn(x))  # compile + warm-up
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()

    x = jax.random.normal(jax.random.key(0), (args.n, args.n), jnp.float32)
    q = mx.quantize(x)
    cases = {
        "floor": jax.jit(lambda a: a * 1.5 + 0.5),
        "fake_quant": jax.jit(lambda a: mx.fake_quant(a)),
        "fake_quant0": jax.jit(lambda a: mx.fake_quant(a, axis=0)),
        "quantize": lambda a: mx.quantize(a),
        "quantize_j": jax.jit(lambda a: mx.quantize(a)),
        "dequantize": (jax.jit(lambda m: mx.dequantize(m)), q),
    }
    print(f"device {jax.devices()[0].device_kind}, x: float32 [{args.n}, {args.n}], MXFP4 blocks of 32")
    floor = None
    for name, case in cases.items():
        fn, arg = case if isinstance(case, tuple) else (case, x)
        t = _median_seconds(fn, arg, args.reps)
        floor = t if floor is None else floor
        print(f"{name:12s} {t * 1e3:9.3f} ms   {t / floor:5.2f}x floor")
    print(f"MXArray nbytes {q.nbytes} (float32 {x.nbytes}, ratio {x.nbytes / q.nbytes:.2f})")


if __name__ == "__main__":
    main()
