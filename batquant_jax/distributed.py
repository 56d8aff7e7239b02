"""Data-parallel calibration and evaluation over a device mesh, on one host or several.

Everything here is JAX's own runtime: ``jax.distributed`` joins the processes, ``jax.make_mesh``
names the axes once, ``NamedSharding`` / ``PartitionSpec`` place the arrays, and ``jax.jit``
(GSPMD) inserts the collectives. The mesh has two axes:

  data   calibration windows, captured activations x, y: [N, T, d] and every batch [bs, T, d]
         are split along their first (window) axis; the mean loss of a jitted step over a
         data-sharded batch is the global mean, so its gradients are all-reduced by XLA, and a
         jitted ``X^T X`` over a data-sharded batch is the all-reduced Hessian sum.
  model  2-D weights ``[out, in]`` (embeddings, linears) split along ``out`` when it divides;
         everything else (transforms, clipping logits, Hessians, optimizer state) is replicated.

    mesh = make_mesh("data:4")                     # or "data:2,model:2"; None: all on data
    dp = DataParallel(mesh)
    tokens = dp.shard_rows(windows)                # int32 [N, T], each process keeps its rows
    model, res = quantize_model(model, tokens, "batquant", mesh=mesh)

Several hosts: call ``initialize(coordinator, num_processes, process_id)`` in every process
before anything touches a device; the same code then runs over the global mesh. GPTQ and the
float64 folds run on each process's first local device from replicated inputs, so every process
computes the same deployed weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")


# ----------------------------------------------------------------------------- processes, mesh

def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins a multi-process run (``jax.distributed.initialize``); False when nothing is given.

    Must run before any JAX call touches a device. On CPU the cross-process collectives use
    jax's default CPU implementation (gloo in jax 0.10).
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
    """"data:2,model:2" -> {"data": 2, "model": 2}; None or "" -> all devices on data.

    A size of -1 takes the devices the other axis leaves. The product may be smaller than
    ``n_devices`` (the first devices are used) only in a single-process run.
    """
    sizes = {"data": -1, "model": 1}
    if spec and spec.strip():
        seen = set()
        for part in spec.split(","):
            name, _, size = part.strip().partition(":")
            if name not in AXES or name in seen or not size.strip().lstrip("-").isdigit():
                raise ValueError(f"bad --mesh {spec!r}: expected axes from {AXES} as name:size, "
                                 "e.g. data:4 or data:2,model:2")
            seen.add(name)
            sizes[name] = int(size)
        if "data" not in seen:
            sizes["data"] = -1
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"bad --mesh {spec!r}: sizes must be positive (at most one -1)")
    if free:
        other = math.prod(v for v in sizes.values() if v != -1)
        if n_devices % other:
            raise ValueError(f"--mesh {spec!r}: {n_devices} devices do not split by {other}")
        sizes[free[0]] = n_devices // other
    if math.prod(sizes.values()) > n_devices:
        raise ValueError(f"--mesh {spec!r} needs {math.prod(sizes.values())} devices, "
                         f"{n_devices} available")
    return sizes


def make_mesh(spec: str | None = None) -> Mesh:
    """A ("data", "model") mesh over the global devices (see ``parse_mesh`` for ``spec``)."""
    sizes = parse_mesh(spec, jax.device_count())
    n = math.prod(sizes.values())
    devices = None
    if n < jax.device_count():
        if jax.process_count() > 1:
            raise ValueError(f"--mesh {spec!r} must use all {jax.device_count()} devices of a "
                             "multi-process run")
        devices = jax.devices()[:n]
    # Auto axes: the existing jitted kernels run unchanged and GSPMD propagates the shardings
    return jax.make_mesh((sizes["data"], sizes["model"]), AXES,
                         axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# ----------------------------------------------------------------------------- placement

@functools.partial(jax.jit, static_argnums=(1, 2))
def _to_batches(a, bs, sharding):
    nb = a.shape[0] // bs
    out = a[: nb * bs].reshape(nb, bs, *a.shape[1:])
    return jax.lax.with_sharding_constraint(out, sharding)


@functools.partial(jax.jit, static_argnums=2)
def _take(a, idx, sharding):
    return jax.lax.with_sharding_constraint(a[idx], sharding)


@functools.partial(jax.jit, static_argnums=1)
def _reshard(a, sharding):
    return jax.lax.with_sharding_constraint(a, sharding)


def host_value(x) -> np.ndarray:
    """The full value of an array on this host: all-gathered when other processes hold parts of
    it (every process must call this together then), else read as it is."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Placement helpers for one mesh with axes ("data", "model")."""

    mesh: Mesh

    @property
    def data_size(self) -> int:
        return int(self.mesh.shape["data"])

    @property
    def model_size(self) -> int:
        return int(self.mesh.shape["model"])

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def rows(self, axis: int = 0) -> NamedSharding:
        """Split along ``axis`` over the data axis, replicated over the model axis."""
        return NamedSharding(self.mesh, P(*([None] * axis), "data"))

    def check_batch(self, batch_size: int, what: str = "--batch_size") -> None:
        if batch_size % self.data_size:
            raise ValueError(f"{what} ({batch_size}) must be divisible by the data-axis size "
                             f"({self.data_size}) of the mesh {dict(self.mesh.shape)}")

    # --- windows of this process
    def process_rows(self, n: int) -> slice:
        """The rows of a data-sharded [n, ...] array held by this process's devices."""
        idx = self.rows().addressable_devices_indices_map((n,))
        starts = sorted({s[0].indices(n)[:2] for s in idx.values()})
        lo, hi = starts[0][0], starts[-1][1]
        if sum(b - a for a, b in starts) != hi - lo:
            raise ValueError("this process's devices do not hold a contiguous run of rows")
        return slice(lo, hi)

    def shard_rows(self, full) -> jax.Array:
        """[n, ...] host array, the same on every process -> global array split over data.

        Each process reads only its own rows (``process_rows``)."""
        full = np.asarray(full)
        if full.shape[0] % self.data_size:
            raise ValueError(f"{full.shape[0]} rows do not split over a data axis of "
                             f"{self.data_size}")
        local = full[self.process_rows(full.shape[0])]
        return jax.make_array_from_process_local_data(self.rows(), local, full.shape)

    # --- arrays and modules
    def put(self, x, sharding: NamedSharding | None = None) -> jax.Array:
        """A host value (the same on every process) or any array -> global array."""
        sharding = sharding or self.replicated
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if not x.is_fully_addressable or len(x.sharding.device_set) > 1:
                return _reshard(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    def weight_sharding(self, path, x) -> NamedSharding:
        """[out, in] weights split along out over the model axis; everything else replicated."""
        if (self.model_size > 1 and path and path[-1] == "weight" and np.ndim(x) == 2
                and np.shape(x)[0] % self.model_size == 0):
            return NamedSharding(self.mesh, P("model", None))
        return self.replicated

    def put_module(self, module):
        """Places every state array of ``module`` on the mesh (in place); returns it."""
        state = nnx.state(module)
        placed = jax.tree_util.tree_map_with_path(
            lambda p, v: self.put(v, self.weight_sharding(tuple(getattr(k, "key", getattr(k, "idx", k))
                                                                for k in p), v)), state)
        nnx.update(module, placed)
        return module

    def fetch(self, x) -> np.ndarray:
        """Any global array -> the full numpy value on every process (all-gather when needed)."""
        return host_value(x)

    def local_value(self, x) -> jax.Array:
        """Any array -> its full value on this process's first device."""
        return jax.device_put(self.fetch(x), jax.local_devices()[0])

    def to_local(self, module):
        """Moves every state array of ``module`` to this process's first device (in place)."""
        dev = jax.local_devices()[0]
        state = jax.tree.map(lambda v: jax.device_put(self.fetch(v), dev), nnx.state(module))
        nnx.update(module, state)
        return module

    # --- calibration batches
    def batches(self, a, bs: int) -> jax.Array:
        """[N, ...] -> [N // bs, bs, ...], each batch split over data (remainder dropped)."""
        return _to_batches(a, bs, self.rows(1))

    def take(self, a, idx) -> jax.Array:
        """a[idx] for host indices idx: [bs] -> [bs, ...] split over data (XLA moves the rows)."""
        return _take(a, np.asarray(idx), self.rows())


class Local:
    """The one-device placement: what ``DataParallel`` does, on the default device. Calibration
    talks to a placement (``placement(mesh)``) and never asks which one it has."""

    data_size = 1

    def rows(self, axis: int = 0) -> None:
        return None

    def check_batch(self, batch_size: int, what: str = "--batch_size") -> None:
        """Any batch size fits one device."""

    def shard_rows(self, full) -> jax.Array:
        return jnp.asarray(np.asarray(full))

    def put(self, x, sharding=None) -> jax.Array:
        return jnp.asarray(x)

    def put_module(self, module):
        return module

    def to_local(self, module):
        return module

    def local_value(self, x) -> jax.Array:
        return x

    def batches(self, a, bs: int) -> jax.Array:
        """[N, ...] -> [N // bs, bs, ...] (remainder dropped)."""
        nb = a.shape[0] // bs
        return a[: nb * bs].reshape(nb, bs, *a.shape[1:])

    def take(self, a, idx) -> jax.Array:
        return a[jnp.asarray(idx)]


def placement(mesh: Mesh | None):
    """``DataParallel(mesh)``, or ``Local()`` without a mesh."""
    return Local() if mesh is None else DataParallel(mesh)


# ----------------------------------------------------------------------------- memory estimate

def calibration_bytes_per_device(*, hidden: int, intermediate: int, nsamples: int, seqlen: int,
                                 batch_size: int, data: int, model: int = 1,
                                 bytes_per_value: int = 4) -> dict[str, int]:
    """Rough float32 memory per device of one layer's calibration on a (data, model) mesh.

    activations: the layer inputs x and targets y [N, T, hidden] plus their batched copies,
      split over data (4 buffers of N T hidden / data values);
    step: the live tensors of one training step on bs / data windows: the widest activations
      (q/k/v, gate/up/down at ``intermediate``) with their quantized copies and gradients,
      about 12 x (bs / data) T intermediate values;
    weights: the layer's seven linears (~ 4 hidden^2 + 3 hidden intermediate, attention taken
      as square) as frozen weights plus their folded copies, split over model (2 copies);
    hessians: four replicated [in, in] sums (3 of hidden^2, 1 of intermediate^2).
    """
    b = bytes_per_value
    act = 4 * nsamples * seqlen * hidden * b // data
    step = 12 * (batch_size // data) * seqlen * intermediate * b
    weights = 2 * (4 * hidden * hidden + 3 * hidden * intermediate) * b // model
    hess = (3 * hidden * hidden + intermediate * intermediate) * b
    return {"activations": act, "step": step, "weights": weights, "hessians": hess,
            "total": act + step + weights + hess}
