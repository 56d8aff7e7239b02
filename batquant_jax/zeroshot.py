"""Zero-shot accuracy by log-likelihood, scored as lm-eval 0.4.13 scores it, batched for speed.

For each choice, the summed log-likelihood of its continuation given its context::

    task = tasks.load_task("piqa", limit=200)
    score_fn = make_score_fn(model)                      # jitted, the model is an argument
    result = evaluate_task(score_fn, tokenizer, task)    # {"acc", "acc_stderr", "acc_norm", ...}

Tokens follow lm-eval's ``_encode_pair``: trailing spaces of the context move to the
continuation; context ids = encode(context); continuation ids = encode(context + continuation)
after the first len(context ids) ids; encode is the tokenizer's default call (SmolLM2: no BOS),
an empty context becomes [BOS or EOS]; an input longer than the model's context loses tokens on
the left. acc = argmax of the summed log-likelihoods (ties: first index); acc_norm = argmax after
dividing by len(choice) in characters; stderr = sample std (n - 1) / sqrt(n).

Speed: the context is run once for all its choices. One row packs the context and every choice
continuation after it, each branch attending to the context and to itself only (its positions
continue the context's), so one forward pass scores them all; a branch's last token is only a
target, never an input. Rows are padded to a few power-of-two lengths and batched to about
``token_budget`` tokens, so each (length, batch) shape compiles once; only the positions that
predict a continuation token go through the final norm and the vocabulary projection.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from batquant_jax.models.llama import state_jit
from batquant_jax.tasks import Task

# (tokens, positions, segments, pred_index, targets) -> (logprob, is_greedy), see score_rows.
ScoreFn = Callable[..., tuple[Any, Any]]


# ----------------------------------------------------------------------------- tokens

def encode_pair(tokenizer: Any, context: str, continuation: str,
                cache: dict | None = None) -> tuple[list[int], list[int]]:
    """lm-eval's (context ids, continuation ids) for one request (see the module docstring)."""
    if not context:
        prefix = getattr(tokenizer, "bos_token_id", None)
        if prefix is None:
            prefix = tokenizer.eos_token_id
        return [int(prefix)], list(tokenizer.encode(continuation))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if cache is not None and context in cache:
        ctx = cache[context]
    else:
        ctx = list(tokenizer.encode(context))
        if cache is not None:
            cache[context] = ctx
    whole = list(tokenizer.encode(context + continuation))
    return ctx, whole[len(ctx):]


# ----------------------------------------------------------------------------- packing

@dataclasses.dataclass
class Row:
    """One packed sequence: a context, then the inputs of one or more continuation branches.

    segments: 0 for the context, b >= 1 for branch b. slots[k] = (request index, row position
    whose output predicts the target, target id), in continuation order per request.
    """

    tokens: list[int]
    positions: list[int]
    segments: list[int]
    slots: list[tuple[int, int, int]]


def _start_row(ctx: Sequence[int]) -> Row:
    return Row(list(ctx), list(range(len(ctx))), [0] * len(ctx), [])


def _add_branch(row: Row, ctx_len: int, request: int, cont: Sequence[int]) -> None:
    branch = max(row.segments) + 1
    prev = ctx_len - 1  # the context's last position predicts the first continuation token
    for j, tok in enumerate(cont):
        row.slots.append((request, prev, int(tok)))
        if j < len(cont) - 1:  # the last token is only a target
            row.tokens.append(int(tok))
            row.positions.append(ctx_len + j)
            row.segments.append(branch)
            prev = len(row.tokens) - 1


def pack_requests(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int,
                  pack_len: int = 1024) -> list[Row]:
    """[(context ids, continuation ids)] -> rows of at most ``max(pack_len, own length)`` tokens
    (never more than ``max_len``, the model's context).

    Requests with the same context ids share one context (the first occurrence's row, while it
    has room). A request whose input (context + continuation minus its last token) exceeds
    ``max_len`` is cut on the left, as lm-eval does, in a row of its own.
    """
    rows: list[Row] = []
    open_row: dict[tuple[int, ...], tuple[Row, int]] = {}  # context -> (row, context length)
    for r, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise ValueError(f"request {r} has an empty continuation (nothing to score)")
        if len(cont) > max_len:
            raise ValueError(f"request {r}: a continuation of {len(cont)} tokens exceeds the "
                             f"model's context of {max_len}")
        need = len(ctx) + len(cont) - 1
        if need > max_len:
            keep = list(ctx)[need - max_len:]
            row = _start_row(keep)
            _add_branch(row, len(keep), r, cont)
            rows.append(row)
            continue
        key = tuple(ctx)
        found = open_row.get(key)
        if found is not None and len(found[0].tokens) + len(cont) - 1 <= max(pack_len, need):
            _add_branch(found[0], found[1], r, cont)
            continue
        row = _start_row(ctx)
        _add_branch(row, len(ctx), r, cont)
        rows.append(row)
        open_row[key] = (row, len(ctx))
    return rows


def bucket_length(n: int, max_len: int, smallest: int = 32) -> int:
    """The padded length of a row of n tokens: the next power of two >= smallest, <= max_len."""
    return min(max_len, max(smallest, 1 << max(0, n - 1).bit_length()))


def _pred_bucket(n: int, length: int) -> int:
    """Prediction slots per row: the next power of 4 (>= 4; fewer shapes to compile), or of 2
    when the power of 4 would exceed the row length (the vocabulary projection is costly)."""
    p = 4
    while p < n:
        p *= 4
    if p > length:
        p = max(4, 1 << max(0, n - 1).bit_length())
    return p


# ----------------------------------------------------------------------------- scoring

def score_rows(model, tokens: jax.Array, positions: jax.Array, segments: jax.Array,
               pred_index: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each target and whether it is the greedy (argmax) token.

    tokens, positions, segments: int32 ``[B, T]`` (segment 0 = context, b >= 1 = branch b,
    -1 = padding); pred_index, targets: int32 ``[B, P]`` (the row position whose output predicts
    the target). Returns float32 ``[B, P]`` and bool ``[B, P]``.
    """
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    mask = ((seg_k == 0) | (seg_k == seg_q)) & (positions[:, None, :] <= positions[:, :, None])
    h = model.hidden(tokens, positions, mask)
    h = jnp.take_along_axis(h, pred_index[:, :, None], axis=1)
    return model.target_scores(h, targets)


_score_rows_jit = state_jit(score_rows)  # weights as arguments only (see models.llama.state_jit)


def make_score_fn(model) -> ScoreFn:
    """``score_rows`` jitted with ``model`` as an argument (one compilation per shape)."""
    return functools.partial(_score_rows_jit, model)


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per request: summed log-likelihood and whether every token is the greedy one."""

    loglik: np.ndarray  # float64 [R]
    greedy: np.ndarray  # bool [R]
    rows: int
    tokens: int          # real tokens run through the model (padding excluded)
    padded_tokens: int   # tokens including padding
    shapes: tuple[tuple[int, int, int], ...]  # distinct (batch, length, predictions) run
    seconds: float


def score_requests(score_fn: ScoreFn, encoded: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   max_len: int, token_budget: int = 2048, pack_len: int = 1024,
                   progress: Callable[[int, int, float], None] | None = None) -> Scores:
    """Summed log-likelihood of every (context ids, continuation ids) request.

    Rows are sorted by padded length, batched to about ``token_budget`` tokens per forward pass
    (``token_budget // length`` rows, at least 1; the last batch of a length is padded with
    empty rows) and run through ``score_fn``. progress(rows done, rows, elapsed s) per batch.
    """
    start = time.perf_counter()
    rows = pack_requests(encoded, max_len, pack_len)
    order = sorted(range(len(rows)), key=lambda i: (bucket_length(len(rows[i].tokens), max_len),
                                                    -len(rows[i].slots)))
    n_req = len(encoded)
    loglik = np.zeros(n_req, np.float64)
    greedy = np.ones(n_req, bool)
    shapes: list[tuple[int, int, int]] = []
    real = padded = done = 0
    i = 0
    while i < len(order):
        length = bucket_length(len(rows[order[i]].tokens), max_len)
        batch = max(1, token_budget // length)
        chosen = [rows[k] for k in order[i:i + batch]
                  if bucket_length(len(rows[k].tokens), max_len) == length]
        i += len(chosen)
        n_pred = _pred_bucket(max(len(r.slots) for r in chosen), length)
        tok = np.zeros((batch, length), np.int32)
        pos = np.zeros((batch, length), np.int32)
        seg = np.full((batch, length), -1, np.int32)
        pidx = np.zeros((batch, n_pred), np.int32)
        tgt = np.zeros((batch, n_pred), np.int32)
        for b, row in enumerate(chosen):
            t = len(row.tokens)
            tok[b, :t], pos[b, :t], seg[b, :t] = row.tokens, row.positions, row.segments
            s = len(row.slots)
            pidx[b, :s] = [p for _, p, _ in row.slots]
            tgt[b, :s] = [g for _, _, g in row.slots]
            real += t
        padded += batch * length
        if (batch, length, n_pred) not in shapes:
            shapes.append((batch, length, n_pred))
        lp, gr = score_fn(tok, pos, seg, pidx, tgt)
        lp, gr = np.asarray(lp, np.float64), np.asarray(gr)
        for b, row in enumerate(chosen):
            for s, (req, _, _) in enumerate(row.slots):
                loglik[req] += lp[b, s]
                greedy[req] &= bool(gr[b, s])
        done += len(chosen)
        if progress is not None:
            progress(done, len(rows), time.perf_counter() - start)
    return Scores(loglik, greedy, len(rows), real, padded, tuple(shapes),
                  time.perf_counter() - start)


# ----------------------------------------------------------------------------- metrics

def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error, sample std (n - 1) / sqrt(n) (None for n < 2)."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float(x.mean()), None
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def task_metrics(task: Task, loglik: np.ndarray, greedy: np.ndarray) -> dict[str, Any]:
    """Per-task metrics from per-request scores (requests in item order, choices in order).

    Returns {"n", "acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], ["perplexity"],
    "per_item": {"acc": [0/1...], "pred": [...]}} as lm-eval defines them.
    """
    out: dict[str, Any] = {"n": len(task.items)}
    r = 0
    acc, acc_norm, pred, lls_gold = [], [], [], []
    for item in task.items:
        k = len(item.requests)
        lls, gre = loglik[r:r + k], greedy[r:r + k]
        r += k
        if task.kind == "last_word":
            acc.append(float(gre[0]))
            pred.append(0)
            lls_gold.append(float(lls[0]))
            continue
        p = int(np.argmax(lls))
        pred.append(p)
        acc.append(float(p == item.gold))
        lengths = np.array([float(len(c)) for c in item.choices])
        acc_norm.append(float(int(np.argmax(lls / lengths)) == item.gold))
    out["acc"], out["acc_stderr"] = mean_stderr(acc)
    if "acc_norm" in task.metrics:
        out["acc_norm"], out["acc_norm_stderr"] = mean_stderr(acc_norm)
    if "perplexity" in task.metrics:
        mean_ll = float(np.mean(lls_gold))
        out["perplexity"] = math.exp(-mean_ll) if -mean_ll < 709 else math.inf
    out["per_item"] = {"acc": [int(a) for a in acc], "pred": pred}
    return out


def evaluate_task(score_fn: ScoreFn, tokenizer: Any, task: Task, *, max_len: int,
                  token_budget: int = 2048, progress: Callable[[str], None] | None = None
                  ) -> dict[str, Any]:
    """Tokenize, score and measure one task -> task_metrics(...) plus timing and shape info."""
    t0 = time.perf_counter()
    cache: dict = {}
    encoded = [encode_pair(tokenizer, c, x, cache) for item in task.items
               for c, x in item.requests]
    tokenize_s = time.perf_counter() - t0

    last = [-math.inf]

    def report(done: int, total: int, elapsed: float) -> None:
        if progress is not None and (done == total or elapsed - last[0] >= 5.0):
            last[0] = elapsed
            eta = elapsed / done * (total - done)
            progress(f"{task.name}: rows {done}/{total}, elapsed {elapsed:.1f} s, "
                     f"ETA {eta:.1f} s")

    scores = score_requests(score_fn, encoded, max_len=max_len, token_budget=token_budget,
                            progress=report)
    out = task_metrics(task, scores.loglik, scores.greedy)
    out.update(source=task.source, requests=len(encoded), rows=scores.rows,
               tokens=scores.tokens, padded_tokens=scores.padded_tokens,
               shapes=[list(s) for s in scores.shapes], tokenize_seconds=round(tokenize_s, 3),
               seconds=round(scores.seconds, 3),
               items_per_s=round(len(task.items) / max(scores.seconds, 1e-9), 3))
    return out


def log(msg: str) -> None:
    print(f"zeroshot: {msg}", file=sys.stderr, flush=True)
