"""Shared test setup: CPU dispatch synchronous, as under the command-line entry points.

Importing batquant_jax leaves JAX's options alone; the suite runs as the commands do
(``cli.sync_cpu_dispatch``), which it did when the package import set the option itself.
"""

from batquant_jax import cli

cli.sync_cpu_dispatch()
