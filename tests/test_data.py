"""Tests for batquant_jax.data: markup stripping, the split, the cache, corpora and samplers."""

import bz2
import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from batquant_jax import data

MARKUP = """{{Infobox person|name=X|born={{birth date|1900|1|1}}}}
'''Alan''' is a [[computer scientist|scientist]] from [[London]].<ref name="a">{{cite web|url=x}}</ref> He wrote [http://example.com a paper]<ref name="b" /> and [[File:A.jpg|thumb|A [[caption]] here]] more.<!-- hidden -->
{| class="wikitable"
|-
| a || {{nested|{{x}}}}
|}
== Life ==
He lived in ''Paris''&nbsp;&amp; Rome (<math>x^2</math>).
* First item
* Second [[de:Alan]]
=== Empty ===
== See also ==
* [[Other]]
=== Under see also ===
Text
== Legacy ==
Remembered.<br/>Still.

[[Category:People]]
"""


def test_clean_wikitext_exact():
    assert data.clean_wikitext(MARKUP) == (
        "Alan is a scientist from London. He wrote a paper and more.\n\nLife\n\n"
        "He lived in Paris & Rome.\nFirst item\nSecond\n\nLegacy\n\nRemembered. Still.")


def test_nested_templates_and_unclosed_text_kept():
    assert data.clean_wikitext("a {{t|{{u|{{v}}}}|w}} b") == "a b"
    assert data.clean_wikitext("a {{unclosed b") == "a {{unclosed b"
    assert data.clean_wikitext("x [[a|[[b]] c]] y") == "x b c y"


def _xml(pages):
    redirect = '<redirect title="X" />'
    body = "".join(
        f"<page><title>{t}</title><ns>{ns}</ns>{redirect if red else ''}"
        f"<revision><text xml:space=\"preserve\">{txt}</text></revision></page>"
        for t, ns, red, txt in pages)
    return (f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}'
            "</mediawiki>").encode("utf-8")


PAGES = ([(f"Article {i}", 0, False, f"'''Article {i}''' is text number {i}.") for i in range(10)]
         + [("Redirected", 0, True, "#REDIRECT [[Article 1]]"),
            ("Wikipedia:Policy", 4, False, "Not an article.")])


def test_parse_and_split_by_title():
    arts = data.parse_articles(_xml(PAGES))
    assert [t for t, _ in arts] == [f"Article {i}" for i in range(10)]
    splits = data.split_articles(arts)
    assert [t for t, _ in splits["wiki-eval"]] == ["Article 1"]  # sha256 rule, fixed forever
    assert len(splits["wiki-calib"]) == 9
    assert splits["wiki-eval"][0][1] == "Article 1\n\nArticle 1 is text number 1."


def test_prepare_from_cached_dump_then_noop(tmp_path, monkeypatch):
    monkeypatch.setenv("BATQUANT_CACHE", str(tmp_path))
    (tmp_path / "enwiki-excerpt.xml.bz2").write_bytes(bz2.compress(_xml(PAGES)))
    info = data.prepare()
    assert (info["fetched"], info["processed"]) == (False, True)
    assert info["splits"]["wiki-eval"]["articles"] == 1
    assert info["splits"]["wiki-calib"]["articles"] == 9
    again = data.prepare()
    assert (again["fetched"], again["processed"]) == (False, False)
    cached = tmp_path / "wiki-calib.v1.txt"
    with pytest.raises(data.DataError, match=rf"^the cached wiki-calib text {cached} was changed "
                                             r"\(sha256 [0-9a-f]{12}, expected 40cc564fc81e\); "
                                             "delete it and rerun"):
        data.load_corpus("wiki-calib")  # this toy dump is not the pinned one
    monkeypatch.setitem(data.CACHED_SHA256, "wiki-calib",
                        hashlib.sha256(cached.read_bytes()).hexdigest())
    calib = data.load_corpus("wiki-calib")
    assert calib.split("\n\n")[:3] == ["Article 0", "Article 0 is text number 0.", "Article 2"]
    assert len(calib) == info["splits"]["wiki-calib"]["chars"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_failed_fetch_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATQUANT_CACHE", str(tmp_path))
    fake = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: fake)
    with pytest.raises(data.DataError, match="No matching distribution found"):
        data.load_corpus("wiki-eval")
    assert list(tmp_path.iterdir()) == []


def test_real_excerpt_split():
    try:
        info = data.prepare()
    except data.DataError as e:  # no cache and no registry access
        pytest.skip(str(e))
    stats = info["splits"]
    assert (stats["wiki-calib"]["articles"], stats["wiki-eval"]["articles"]) == (82, 24)
    assert (stats["wiki-calib"]["chars"], stats["wiki-eval"]["chars"]) == (2165843, 644129)
    assert set(stats["wiki-calib"]["titles"]).isdisjoint(stats["wiki-eval"]["titles"])
    text = data.load_corpus("wiki-eval")
    assert text.startswith("Autism\n\nAutism is a neurodevelopmental disorder")
    assert sum(text.count(s) for s in ("{{", "}}", "[[", "]]", "<ref", "{|")) == 0


def test_edited_cached_text_is_refused(tmp_path, monkeypatch):
    try:
        data.prepare()
    except data.DataError as e:  # no cache and no registry access
        pytest.skip(str(e))
    real = data.cache_dir()
    for f in ("wiki-splits.v1.json", "wiki-calib.v1.txt", "wiki-eval.v1.txt"):
        shutil.copy(real / f, tmp_path / f)
    monkeypatch.setenv("BATQUANT_CACHE", str(tmp_path))
    assert data.load_corpus("wiki-eval").startswith("Autism\n\nAutism is a")
    path = tmp_path / "wiki-eval.v1.txt"
    path.write_text(path.read_text(encoding="utf-8").replace("Autism is a", "Autism is the", 1),
                    encoding="utf-8")
    with pytest.raises(data.DataError, match=rf"^the cached wiki-eval text {path} was changed"):
        data.load_corpus("wiki-eval")
    path.unlink()  # as the message says: delete it and prepare again (from the cached dump)
    monkeypatch.setattr(data, "fetch_raw", lambda root=None: real / "enwiki-excerpt.xml.bz2")
    assert data.prepare()["processed"]
    assert data.load_corpus("wiki-eval").startswith("Autism\n\nAutism is a")


def test_load_corpus_paths(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\ufefffirst é", encoding="utf-8")
    (tmp_path / ".hidden").write_text("never", encoding="utf-8")
    assert data.load_corpus(tmp_path) == "first é\n\nsecond"
    assert data.load_corpus(str(tmp_path / "b.txt")) == "second"


def test_load_corpus_errors(tmp_path):
    with pytest.raises(data.DataError, match="not found: no such file or folder"):
        data.load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"is empty \(0 bytes\)"):
        data.load_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 ok")
    with pytest.raises(data.DataError, match="byte 0xe9 at byte offset 3"):
        data.load_corpus(tmp_path / "latin1.txt")
    (tmp_path / "sub").mkdir()
    with pytest.raises(data.DataError, match="has no text files"):
        data.load_corpus(tmp_path / "sub")


class CharTokenizer:
    """A stand-in slow tokenizer: one id per character (shifted by the text length's parity
    when ``context=True``, so that pieces then encode differently from the whole)."""

    is_fast = False

    def __init__(self, context: bool = False):
        self.calls = 0
        self.context = context

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        self.calls += 1
        return [ord(c) + (len(text) % 2 if self.context else 0) for c in text]


def test_tokenize_corpus_chunks_match_whole():
    text = "\n\n".join(f"paragraph {i} " + "x" * (i % 7) for i in range(200))
    whole = np.array([ord(c) for c in text], np.int32)
    tok = CharTokenizer()
    ids = data.tokenize_corpus(text, tok, chunk_chars=500)
    assert ids.dtype == np.int32 and np.array_equal(ids, whole)
    n_chunks = len(data._paragraph_chunks(text, 500))
    assert n_chunks > 3 and tok.calls == 3 + n_chunks  # boundary check + chunks
    assert "".join(data._paragraph_chunks(text, 500)) == text
    tricky = CharTokenizer(context=True)
    odd = text + "!"  # odd length: whole-text ids are shifted by one
    ids = data.tokenize_corpus(odd, tricky, chunk_chars=500)
    assert tricky.calls == 4  # the boundary check failed: one whole-text call
    assert np.array_equal(ids, np.append(whole, ord("!")) + 1)


def test_sample_windows_reproducible():
    ids = np.arange(1000, dtype=np.int32)
    a = data.sample_windows(ids, 8, 16, seed=3)
    b = data.sample_windows(ids, 8, 16, seed=3)
    assert a.shape == (8, 16) and a.dtype == np.int32 and np.array_equal(a, b)
    starts = np.random.default_rng(3).integers(0, 1000 - 16 + 1, size=8)
    assert np.array_equal(a[:, 0], starts)
    assert np.array_equal(a - a[:, :1], np.broadcast_to(np.arange(16), (8, 16)))
    assert not np.array_equal(a, data.sample_windows(ids, 8, 16, seed=4))
    with pytest.raises(data.DataError, match="corpus has 10 tokens; .* needs at least 16"):
        data.sample_windows(ids[:10], 1, 16, seed=0)


def test_cli_prepare_stats(tmp_path):
    (tmp_path / "enwiki-excerpt.xml.bz2").write_bytes(bz2.compress(_xml(PAGES)))
    env = dict(os.environ, BATQUANT_CACHE=str(tmp_path))
    res = subprocess.run([os.sys.executable, "-m", "batquant_jax.data", "--prepare", "--stats"],
                         capture_output=True, text=True, env=env, check=True)
    assert "Warning" not in res.stderr  # runpy's "found in sys.modules" once the package imported it
    out = res.stdout.splitlines()
    assert out[0].startswith("data: processed Wikipedia excerpt (wiki-calib: 9 articles")
    assert out[2].startswith("wiki-eval: 1 articles, 38 chars")
    assert json.loads((tmp_path / "wiki-splits.v1.json").read_text())["wiki-eval"]["titles"] == [
        "Article 1"]


def test_sample_mixed_shares_the_windows_evenly_among_the_sources():
    a, b = np.arange(1000, dtype=np.int32), np.arange(5000, 6000, dtype=np.int32)
    np.testing.assert_array_equal(data.sample_mixed([a], 5, 16, 3), data.sample_windows(a, 5, 16, 3))
    w = data.sample_mixed([a, b], 5, 16, 3)
    assert w.shape == (5, 16) and [int(r[0] >= 5000) for r in w] == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(w[:3], data.sample_windows(a, 3, 16, [3, 0]))
    np.testing.assert_array_equal(w[3:], data.sample_windows(b, 2, 16, [3, 1]))
    with pytest.raises(data.DataError, match="--nsamples 1 is fewer than the 2 calibration"):
        data.sample_mixed([a, b], 1, 16, 3)
    assert data.calib_sources(" wiki-calib, /x/code ") == ["wiki-calib", "/x/code"]
    with pytest.raises(data.DataError, match="has an empty source"):
        data.calib_sources("wiki-calib,")


def test_shakespeare_by_name_reads_the_checked_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATQUANT_CACHE", str(tmp_path))
    path = tmp_path / "shakespeare.v1.txt"
    path.write_text("not the plays", encoding="utf-8")  # a cached copy: no fetch, then the check
    with pytest.raises(data.DataError, match=rf"^the cached shakespeare text {path} was changed"):
        data.load_corpus("shakespeare")
    with pytest.raises(data.DataError, match="need one of wiki-calib, wiki-eval, shakespeare or"):
        data.load_corpus(tmp_path / "absent")
