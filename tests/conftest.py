"""Shared test setup: CPU dispatch synchronous, as under the command-line entry points.

Importing batquant_jax leaves JAX's options alone; the suite runs as the commands do
(``cli.sync_cpu_dispatch``), which it did when the package import set the option itself.
"""

import numpy as np

from batquant_jax import cli
from batquant_jax.models.stored import BLOCK_TYPES

cli.sync_cpu_dispatch()


# byte offsets of the float16 fields of each block (set to finite values; the rest is random)
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(kind, rows, cols, seed=0, scale=0.01):
    """uint8 [rows, row_bytes]: random GGML blocks of ``kind`` whose float16 fields are finite
    (normal, std ``scale``)."""
    per, size = BLOCK_TYPES[kind]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for off in F16_FIELDS[kind]:
        h = (rng.standard_normal((rows, cols // per)) * scale).astype(np.float16)
        b[..., off:off + 2] = h.view(np.uint8).reshape(rows, cols // per, 2)
    return b.reshape(rows, -1)
