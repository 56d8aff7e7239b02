"""Every Python example of README.md and docs/ runs as written, in a fresh interpreter."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples():
    for path in DOCS:
        for i, m in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8"))):
            yield pytest.param(m.group(1), id=f"{path.name}-{i}")


def test_there_are_examples():
    assert len(list(examples())) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("code", examples())
def test_example_runs(code, tmp_path):
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
