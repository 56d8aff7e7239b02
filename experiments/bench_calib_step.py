"""Cost of one calibration step against the full-precision forward of the same layer and batch.

    .venv/bin/python -m experiments.bench_calib_step [--model=smollm2-135m] [--layer=0] \\
        [--batch=4] [--seqlen=256] \\
        [--variants='[{}, {"clip": "none"}, {"transform": "block_affine"}]'] [--profile=3]

Real layer weights (default: SmolLM2-135M's layer 0), random hidden states of the residual stream's scale.
For each variant (CalibConfig fields over method=batquant) it prints, as ratios to the
full-precision forward measured in the same run: the quantized forward in training mode, the
weight side alone (fold, weight clip, fake quant of the seven weights), forward + objective,
forward + gradients, and the whole optimizer step. Median of --reps after a warm-up call.
With --memory it prints instead what XLA's memory analysis gives for the compiled optimizer
step and quantized forward: argument, output and temporary bytes.
With --profile=N it then traces N optimizer steps (jax.profiler) and prints the XLA:CPU time
per step by kind of work: products, elementwise fusions, transposes and copies, reductions.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from batquant_jax.calibration import (CalibConfig, LayerCalibrator, apply_layer, is_clip_param,
                                      is_transform_param, build_quantized_layer)
from batquant_jax.models import load_model
from batquant_jax.qlayers import quant_linears


def _median_time(fn, reps):
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _training_state(fp_layer, hparams: dict, batch: int, d: int):
    """(calibrator, quantized layer, its split (graphdef, transform, clip, rest), optimizer
    states): what one training step of ``fp_layer`` reads, as the calibrator builds it."""
    cfg = CalibConfig(method="batquant", batch_size=batch, **hparams)
    cal = LayerCalibrator(cfg, nsamples=batch, log=lambda s: None)
    cal.gain = jnp.ones((d,), jnp.float32)
    layer = build_quantized_layer(nnx.clone(fp_layer), cfg, 0)
    graphdef, tp, cp, rest = nnx.split(layer, is_transform_param, is_clip_param, ...)
    return cal, layer, (graphdef, tp, cp, rest), (cal.tx_t.init(tp), cal.tx_c.init(cp))


def step_memory(fp_layer, x, y, hparams: dict, batch: int) -> dict:
    """{program: (argument, output, temporary bytes)} of the compiled optimizer step and
    quantized forward on x -> y: [batch, T, d], as XLA's memory analysis reports them."""
    cal, layer, (graphdef, tp, cp, rest), (ot, oc) = _training_state(fp_layer, hparams, batch,
                                                                         x.shape[-1])
    qg, qs = nnx.split(layer)
    lowered = {"quantized forward": apply_layer.lower(qg, qs, x),
               "optimizer step": cal.step_fn.lower(graphdef, tp, cp, ot, oc, rest, x, y,
                                                   cal.gain)}
    out = {}
    for name, low in lowered.items():
        m = low.compile().memory_analysis()
        out[name] = (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes)
    return out


def step_programs(fp_layer, x, y, hparams: dict, batch: int) -> dict:
    """{part: a call running it once} for the parts of one training step of ``fp_layer`` on
    x -> y: [batch, T, d]."""
    cal, layer, (graphdef, tp, cp, rest), (ot, oc) = _training_state(fp_layer, hparams, batch,
                                                                         x.shape[-1])
    # the weights and the batch are arguments, as in the step: closed over, XLA would see them
    # as constants and could lay them out (or fold work on them) at compile time
    merged = lambda tp, cp, rest: nnx.merge(graphdef, tp, cp, rest)  # noqa: E731
    objective = lambda tp, cp, rest, x, y: cal.loss_fn(merged(tp, cp, rest)(x), y)  # noqa: E731
    loss = jax.jit(objective)
    grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    wside = jax.jit(lambda tp, cp, rest: [q.effective_weight()
                                          for q in quant_linears(merged(tp, cp, rest)).values()])
    qg, qs = nnx.split(layer)
    return {
        "quantized forward": lambda: apply_layer(qg, qs, x),
        "  weight side alone": lambda: wside(tp, cp, rest),
        "forward + objective": lambda: loss(tp, cp, rest, x, y),
        "forward + gradients": lambda: grad(tp, cp, rest, x, y)[0],
        "optimizer step": lambda: cal.step_fn(graphdef, tp, cp, ot, oc, rest, x, y, cal.gain)[-1],
    }


def _kind(name: str) -> str:
    """The group of an XLA:CPU thunk by its name."""
    if name.startswith(("ynn_fusion", "dot", "convolution")):
        return "products (dot / YNNPACK fusions)"
    if "transpose" in name or name.startswith("copy"):
        return "transposes and copies"
    if "reduce" in name:
        return "reductions"
    return "elementwise fusions" if "fusion" in name else "other"


def profile(step, steps: int, log_dir: str) -> list[tuple[str, float]]:
    """Traces ``steps`` calls of ``step`` with jax.profiler and returns the XLA:CPU thunks'
    milliseconds per call, summed by group (threads' times add up, so the sum can exceed the
    wall time)."""
    jax.block_until_ready(step())
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(step())
    trace = max(pathlib.Path(log_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    wrappers = ("PjitFunction", "ThunkExecutor", "CommonPjRt", "$")
    groups: collections.Counter = collections.Counter()
    for e in json.load(gzip.open(trace))["traceEvents"]:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(wrappers):
            groups[_kind(e["name"])] += e["dur"] / 1e3 / steps
    return groups.most_common()


def main() -> None:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model alias or path")
    ap.add_argument("--layer", type=int, default=0, help="which decoder layer")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--variants", default="[{}]", help="JSON list of CalibConfig field dicts")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also trace N optimizer steps of each variant and print where the "
                         "XLA:CPU time goes")
    ap.add_argument("--memory", action="store_true",
                    help="print the compiled programs' memory (arguments, outputs, XLA "
                         "temporaries) instead of timing them")
    ap.add_argument("--profile_dir", default=None, help="where the trace goes (default: a "
                    "temporary folder)")
    args = ap.parse_args()

    model = load_model(args.model, with_tokenizer=False).model
    fp_layer = model.layers[args.layer]
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seqlen, model.config.hidden_size))
    gd, st = nnx.split(fp_layer)
    y = apply_layer(gd, st, x)
    t_fwd = _median_time(lambda: apply_layer(gd, st, x), args.reps)
    print(f"tokens per batch: {args.batch * args.seqlen}; full-precision layer forward "
          f"{t_fwd * 1e3:.1f} ms")
    for hp in json.loads(args.variants):
        print(f"batquant {json.dumps(hp)}:")
        if args.memory:
            for name, sizes in step_memory(fp_layer, x, y, hp, args.batch).items():
                print("  " + f"{name:22s} " + ", ".join(
                    f"{k} {v / 2**20:7.1f} MiB" for k, v in zip(("arguments", "outputs",
                                                                  "temporaries"), sizes)))
            continue
        programs = step_programs(fp_layer, x, y, hp, args.batch)
        for name, fn in programs.items():
            t = _median_time(fn, args.reps)
            print(f"  {name:22s} {t * 1e3:9.1f} ms  {t / t_fwd:6.2f}x the forward")
        if args.profile:
            with tempfile.TemporaryDirectory() as tmp:
                groups = profile(programs["optimizer step"], args.profile, args.profile_dir or tmp)
            total = sum(ms for _, ms in groups)
            print(f"  profile of {args.profile} steps, XLA:CPU thunks per step:")
            for name, ms in groups:
                print(f"    {name:32s} {ms:9.1f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
