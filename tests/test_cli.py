"""Tests of what the command lines share (batquant_jax/cli.py)."""

import subprocess
import sys

import jax
import pytest

from batquant_jax import calibrate, cli, evaluate


def _fresh_python(code: str) -> list[str]:
    """stdout lines of ``code`` run by a new interpreter (which must exit 0)."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_import_leaves_jax_options_at_their_defaults():
    # Before the fix `import batquant_jax` set jax_cpu_enable_async_dispatch to False for the
    # whole process. A fresh interpreter: the suite's own process has it set (conftest.py).
    code = ("import jax\n"
            "before = jax.config.read('jax_cpu_enable_async_dispatch')\n"
            "import batquant_jax, batquant_jax.calibration, batquant_jax.checkpoint\n"
            "import batquant_jax.calibrate, batquant_jax.evaluate\n"
            "print(before, jax.config.read('jax_cpu_enable_async_dispatch'))\n")
    assert _fresh_python(code) == ["True True"]


def test_public_names_load_on_first_use():
    code = ("import sys, batquant_jax as bq\n"
            "print(sorted(m for m in sys.modules if m.startswith('batquant_jax.')))\n"
            "print(bq.quantize_model.__module__, bq.mx.__name__, bq.SETTINGS is "
            "sys.modules['batquant_jax.recipe'].SETTINGS)\n"
            "print(all(hasattr(bq, n) for n in bq.__all__), set(bq.__all__) <= set(dir(bq)))\n"
            "try:\n    bq.nope\nexcept AttributeError as e:\n    print(e)\n")
    assert _fresh_python(code) == [
        "[]", "batquant_jax.calibration batquant_jax.mx True", "True True",
        "module 'batquant_jax' has no attribute 'nope'"]


@pytest.mark.parametrize("module", [calibrate, evaluate])
def test_entry_points_make_cpu_dispatch_synchronous_first(module, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "sync_cpu_dispatch", lambda: calls.append("sync"))
    with pytest.raises(SystemExit) as e:  # an unexpected argument: the first check of main
        module.main(["prog", "stray"])
    assert (e.value.code, calls) == (2, ["sync"])


def test_sync_cpu_dispatch_sets_the_option():
    cli.sync_cpu_dispatch()
    assert jax.config.read("jax_cpu_enable_async_dispatch") is False
