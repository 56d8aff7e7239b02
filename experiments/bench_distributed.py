"""Per-step time of data-parallel calibration on 1, 2 and 4 devices for one global batch.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python -m experiments.bench_distributed --hidden=256 --intermediate=768 --seqlen=128 \\
        --nsamples=16 --batch_size=8 --steps=10

For each mesh (data:1, data:2, data:4 over the first devices) one decoder layer of a random
Llama (hidden / intermediate as given) is quantized with BATQuant, its inputs x and targets y
[nsamples, seqlen, hidden] split over the data axis, and the jitted training step (forward,
backward, AdamW; gradients all-reduced by XLA) is timed on the same global batch. Prints the
median step time, the bytes of the activation buffers held per device, and the memory estimate
of ``distributed.calibration_bytes_per_device`` for Qwen3-8B and a 70B model on a GPU mesh.
Fake CPU devices share the host's cores: their times show the overhead of the sharded program,
not a speed-up; on GPUs each device brings its own compute.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from batquant_jax import distributed
from batquant_jax.calibration import (CalibConfig, LayerCalibrator, is_clip_param,
                                      is_transform_param, build_quantized_layer)
from batquant_jax.models.llama import LlamaConfig, LlamaForCausalLM


def bench(mesh_spec: str, args) -> dict:
    cfg = LlamaConfig(arch="llama", vocab_size=256, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=1,
                      num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 256),
                      head_dim=64, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, attention_bias=False, qk_norm=False,
                      max_position_embeddings=args.seqlen)
    model = LlamaForCausalLM(cfg, nnx.Rngs(0))
    mesh = distributed.make_mesh(mesh_spec)
    dp = distributed.DataParallel(mesh)
    ccfg = CalibConfig(batch_size=args.batch_size)
    cal = LayerCalibrator(ccfg, args.nsamples, log=lambda m: None, mesh=mesh)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.nsamples, args.seqlen, args.hidden)).astype(np.float32)
    xs = dp.shard_rows(x)
    dp.put_module(model)
    ys = cal.outputs(model.layers[0], cal._batches(xs)).reshape(xs.shape)
    ys = dp.put(ys, dp.rows())
    layer = dp.put_module(build_quantized_layer(nnx.clone(model.layers[0]), ccfg, 0))
    graphdef, tp, cp, rest = nnx.split(layer, is_transform_param, is_clip_param, ...)
    opt_t, opt_c = jax.tree.map(dp.put, (cal.tx_t.init(tp), cal.tx_c.init(cp)))
    idx = np.arange(args.batch_size)
    bx, by = dp.take(xs, idx), dp.take(ys, idx)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        tp, cp, opt_t, opt_c, loss = cal.step_fn(graphdef, tp, cp, opt_t, opt_c, rest, bx, by)
        jax.block_until_ready(loss)
        if i:  # the first call compiles
            times.append(time.perf_counter() - t0)
    per_device = {str(s.device): s.data.nbytes for s in xs.addressable_shards}
    return {"mesh": mesh_spec, "step_s": statistics.median(times), "loss": float(loss),
            "x_bytes_per_device": max(per_device.values()), "x_bytes_total": x.nbytes}


def main() -> None:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; hidden {args.hidden}, "
          f"intermediate {args.intermediate}, batch {args.batch_size} x {args.seqlen} tokens")
    for spec in ("data:1", "data:2", "data:4"):
        if int(spec.split(":")[1]) > jax.device_count():
            continue
        r = bench(spec, args)
        print(f"{r['mesh']:>7}: step {r['step_s'] * 1e3:8.1f} ms  loss {r['loss']:.4g}  "
              f"x per device {r['x_bytes_per_device'] / 2**20:.2f} MiB of "
              f"{r['x_bytes_total'] / 2**20:.2f} MiB")
    print("estimate per device, float32, 128 x 2048 calibration tokens, batch max(4, data):")
    for name, h, f in (("Qwen3-8B", 4096, 12288), ("70B", 8192, 28672)):
        for data, model in ((1, 1), (4, 1), (8, 1), (4, 2)):
            e = distributed.calibration_bytes_per_device(
                hidden=h, intermediate=f, nsamples=128, seqlen=2048, batch_size=max(4, data),
                data=data, model=model)
            print(f"  {name:>8} data {data} model {model}: " + ", ".join(
                f"{k} {v / 2**30:.2f} GiB" for k, v in e.items()))


if __name__ == "__main__":
    main()
