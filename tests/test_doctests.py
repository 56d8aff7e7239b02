"""The runnable examples in the public modules' docstrings (CI runs them through this file)."""

import doctest
import importlib

import pytest

MODULES = ["batquant_jax.mx", "batquant_jax.recipe", "batquant_jax.transforms",
           "batquant_jax.layout", "batquant_jax.qlayers", "batquant_jax.calibration",
           "batquant_jax.pipeline"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    res = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
