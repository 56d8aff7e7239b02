"""Speed of applying GPK vs full block-affine vs a dense d x d transform to activations.

Command (CPU or whatever device JAX finds):

    .venv/bin/python -m experiments.bench_transforms --dims=4096,1536 --tokens=2048 --repeats=7

For each d, x: [tokens, d] float32; every function is jitted, run once to compile and warm up,
then timed ``repeats`` times with ``block_until_ready``; the median is printed. Besides the
module paths (``GPKTransform.__call__``, ``BlockAffine.__call__``) it times alternative GPK
formulations so the fastest one can be chosen for the module.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from batquant_jax import transforms as T

_DIMS = flags.DEFINE_list("dims", ["4096", "1536"], "hidden sizes d (multiples of 32)")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "rows of x")
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed runs per function (median reported)")
_DENSE = flags.DEFINE_bool("dense", True, "also time the dense x @ P reference")

_HI = jax.lax.Precision.HIGHEST


def time_fns(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall ms, process CPU ms) of each jitted ``fn(*args)`` in ``fns: {name: (fn, args)}``.

    Each function is called once to compile and warm up; the timed calls are interleaved
    (round-robin over the functions) so that a change in machine load hits all of them alike.
    Process CPU time (all threads) is reported too: on a shared CPU it is the steadier measure.
    """
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            times[name][0].append(time.perf_counter() - w0)
            times[name][1].append(time.process_time() - c0)
    return {name: (1e3 * statistics.median(w), 1e3 * statistics.median(c))
            for name, (w, c) in times.items()}


# Alternative GPK formulations: x: [n, d], a: [g1, g1], b: [k, g2, g2] -> x P.
def gpk_a_then_b(x, a, b):
    k, g2, _ = b.shape
    xb = x.reshape(x.shape[0], k, g2, -1)
    z = jnp.einsum("nkrc,cC->nkrC", xb, a, precision=_HI)
    return jnp.einsum("nkrC,krR->nkRC", z, b, precision=_HI).reshape(x.shape)


def gpk_b_then_a(x, a, b):
    k, g2, _ = b.shape
    xb = x.reshape(x.shape[0], k, g2, -1)
    z = jnp.einsum("nkrc,krR->nkRc", xb, b, precision=_HI)
    return jnp.einsum("nkRc,cC->nkRC", z, a, precision=_HI).reshape(x.shape)


def gpk_one_einsum(x, a, b):
    k, g2, _ = b.shape
    xb = x.reshape(x.shape[0], k, g2, -1)
    return jnp.einsum("nkrc,krR,cC->nkRC", xb, b, a, precision=_HI).reshape(x.shape)


def gpk_b_as_broadcast(x, a, b):
    """A by matmul, then B_i as g2 broadcast multiply-adds (no batched tiny matmul)."""
    k, g2, _ = b.shape
    xb = x.reshape(x.shape[0], k, g2, -1)
    z = jnp.einsum("nkrc,cC->nkrC", xb, a, precision=_HI)
    y = sum(z[:, :, r, None, :] * b[None, :, r, :, None] for r in range(g2))
    return y.reshape(x.shape)


def gpk_all_broadcast(x, a, b):
    """Both factors as broadcast multiply-adds (one elementwise fusion per factor)."""
    k, g2, _ = b.shape
    g1 = a.shape[0]
    xb = x.reshape(x.shape[0], k, g2, g1)
    z = sum(xb[..., c, None] * a[c] for c in range(g1))
    y = sum(z[:, :, r, None, :] * b[None, :, r, :, None] for r in range(g2))
    return y.reshape(x.shape)


def gpk_via_blocks(x, a, b):
    """Materialize the k dense blocks B_i (x) A ([k, 32, 32]) and apply them as block-affine."""
    k, g2, _ = b.shape
    g1 = a.shape[0]
    p = jnp.einsum("krR,cC->krcRC", b, a).reshape(k, g2 * g1, g2 * g1)
    xb = x.reshape(x.shape[0], k, g2 * g1)
    return jnp.einsum("nki,kij->nkj", xb, p, precision=_HI).reshape(x.shape)


def block_affine_batched(x, p):
    """Full blocks as a batched matmul over k with tokens as rows: [k, n, 32] @ [k, 32, 32]."""
    k, bs, _ = p.shape
    xb = jnp.transpose(x.reshape(x.shape[0], k, bs), (1, 0, 2))
    return jnp.transpose(jnp.matmul(xb, p, precision=_HI), (1, 0, 2)).reshape(x.shape)


def run_dim(d: int, tokens: int, repeats: int, dense: bool) -> None:
    rng = np.random.default_rng(d)
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
    gpk = T.GPKTransform(d)
    ba = T.BlockAffine(d)
    nnx.update(gpk, jax.tree.map(lambda v: v + 0.1, nnx.state(gpk, nnx.Param)))
    nnx.update(ba, jax.tree.map(lambda v: v + 0.1, nnx.state(ba, nnx.Param)))
    a, b, p = gpk.A[...], gpk.B[...], ba.P[...]

    def module_fn(t):
        graphdef, state = nnx.split(t)
        return jax.jit(lambda s, v: nnx.merge(graphdef, s)(v)), (state, x)

    ref = np.asarray(gpk(x))
    fns = {"GPK module": module_fn(gpk)}
    for name, fn in [("GPK A then B", gpk_a_then_b), ("GPK B then A", gpk_b_then_a),
                     ("GPK one einsum", gpk_one_einsum), ("GPK B broadcast", gpk_b_as_broadcast),
                     ("GPK all broadcast", gpk_all_broadcast),
                     ("GPK via 32x32 blocks", gpk_via_blocks)]:
        jf = jax.jit(fn)
        err = float(np.abs(np.asarray(jf(x, a, b)) - ref).max())
        if err > 1e-4:
            raise RuntimeError(f"{name} disagrees with the module: max abs error {err}")
        fns[name] = (jf, (x, a, b))
    fns["BlockAffine module"] = module_fn(ba)
    fns["BlockAffine batched"] = (jax.jit(block_affine_batched), (x, p))
    if dense:
        pd = jnp.asarray(rng.standard_normal((d, d)) / np.sqrt(d), jnp.float32)
        fns["dense x @ P"] = (jax.jit(lambda v, m: jnp.matmul(v, m, precision=_HI)), (x, pd))
    results = time_fns(fns, repeats)
    print(f"\nd = {d}, x: [{tokens}, {d}] float32, median of {repeats} ({jax.devices()[0]})")
    print(f"  {'':<22s} {'wall ms':>9s} {'cpu ms':>9s}")
    for name, (wall, cpu) in results.items():
        print(f"  {name:<22s} {wall:9.3f} {cpu:9.3f}")
    for i, what in enumerate(("wall", "cpu")):
        gpk_best = min(v[i] for k_, v in results.items() if k_.startswith("GPK"))
        ba_best = min(results["BlockAffine module"][i], results["BlockAffine batched"][i])
        print(f"  {what}: ratio BlockAffine / GPK, modules "
              f"{results['BlockAffine module'][i] / results['GPK module'][i]:.2f}, "
              f"best formulation of each {ba_best / gpk_best:.2f}")


def main(argv):
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    del argv
    for d in _DIMS.value:
        run_dim(int(d), _TOKENS.value, _REPEATS.value, _DENSE.value)


if __name__ == "__main__":
    app.run(main)
