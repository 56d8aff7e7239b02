"""The one perplexity protocol of the project (GPTQ / FlatQuant style).

Tokenize the text whole without special tokens, cut consecutive non-overlapping windows of
``seqlen`` tokens (the remainder is dropped), keep the first ``max_tokens // seqlen`` windows (all
when ``max_tokens`` is None), and report ``exp(mean NLL)`` over the ``seqlen - 1`` next-token
predictions of every window::

    ids = tokenize_corpus(load_corpus("wiki-eval"), tokenizer)          # int32 [n]
    res = evaluate_perplexity(nll_fn, ids, seqlen=512, max_tokens=65536,
                              progress=progress_printer())
    print(res.perplexity)

``nll_fn`` maps int32 ``[B, seqlen]`` to float32 ``[B, seqlen - 1]`` negative log-likelihoods of
``tokens[:, 1:]``. It is compiled once for one shape: the last batch is padded to a full batch
and the padding rows are left out of the mean.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Callable, TextIO

import jax
import numpy as np

NllFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """perplexity = exp(nll_mean); tokens = windows * seqlen tokens read (each window gives
    seqlen - 1 predictions); seconds = wall time of the evaluation, compilation included;
    window_nll = the mean NLL of each window, in window order (paired comparisons of two models
    on the same windows: experiments/report.py)."""

    perplexity: float
    nll_mean: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float
    window_nll: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where an evaluation stands after a batch; ``line()`` formats it for a log."""

    windows_done: int
    windows_total: int
    perplexity: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float

    def line(self) -> str:
        return (f"perplexity: windows {self.windows_done}/{self.windows_total}, "
                f"running ppl {self.perplexity:.4f}, {self.tokens_per_s:,.0f} tok/s, "
                f"elapsed {self.elapsed_s:.1f} s, ETA {self.eta_s:.1f} s")


def progress_printer(stream: TextIO | None = None, every_s: float = 5.0
                     ) -> Callable[[Progress], None]:
    """A progress callback that writes ``Progress.line()`` to ``stream`` (stderr by default)
    after the first batch, at most every ``every_s`` seconds, and after the last batch."""
    last = [-math.inf]

    def report(p: Progress) -> None:
        final = p.windows_done == p.windows_total
        if final or p.elapsed_s - last[0] >= every_s:
            last[0] = p.elapsed_s
            print(p.line(), file=stream or sys.stderr, flush=True)

    return report


def cut_windows(token_ids: np.ndarray, seqlen: int, max_tokens: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows: int ``[n]`` -> int32 ``[W, seqlen]``.

    ``W = n // seqlen`` (the remainder is dropped), then at most ``max_tokens // seqlen``.
    Raises ValueError when not even one window fits.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2 (one prediction needs two tokens), "
                         f"got {seqlen!r}")
    if max_tokens is not None and max_tokens < seqlen:
        raise ValueError(f"max_tokens {max_tokens} is less than one window of seqlen {seqlen}; "
                         "pass max_tokens >= seqlen, or None for the whole text")
    windows = ids.size // seqlen
    if windows == 0:
        raise ValueError(f"the text has {ids.size} tokens, fewer than one window of seqlen "
                         f"{seqlen}; need at least {seqlen} tokens")
    if max_tokens is not None:
        windows = min(windows, max_tokens // seqlen)
    return ids[: windows * seqlen].reshape(windows, seqlen).astype(np.int32)


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


def _is_jitted(fn: Callable) -> bool:
    """True for a ``jax.jit`` / ``nnx.jit`` output, or a functools.partial of one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return callable(getattr(fn, "lower", None))


def evaluate_perplexity(nll_fn: NllFn, token_ids: np.ndarray, *, seqlen: int = 512,
                        max_tokens: int | None = None, batch_size: int = 1,
                        progress: Callable[[Progress], None] | None = None,
                        mesh: jax.sharding.Mesh | None = None) -> PerplexityResult:
    """Perplexity of ``nll_fn`` over the windows of ``token_ids`` (see the module docstring).

    nll_fn: int32 ``[batch_size, seqlen]`` -> float32 ``[batch_size, seqlen - 1]``. A plain
      function is wrapped in ``jax.jit`` once; an already jitted one (``jax.jit``, ``nnx.jit``,
      or a ``functools.partial`` of one, e.g. ``partial(forward_nll, model)``) is used as is,
      which keeps model weights as arguments rather than constants baked into the program.
    token_ids: int ``[n]``, the whole tokenized text.
    progress: called with a ``Progress`` after every batch.
    mesh: a ``distributed.make_mesh`` mesh: every batch is split over its data axis (each process
      reads its own rows; ``batch_size`` must divide by the data-axis size). The model must
      already be on the mesh (``DataParallel(mesh).put_module(model)``).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    windows = cut_windows(token_ids, seqlen, max_tokens)
    n = windows.shape[0]
    n_batches = -(-n // batch_size)
    pad = n_batches * batch_size - n
    if pad:  # repeat the last window: one compiled shape, the rows are dropped below
        windows = np.concatenate([windows, np.repeat(windows[-1:], pad, axis=0)])
    fn = nll_fn if _is_jitted(nll_fn) else jax.jit(nll_fn)
    fetch = np.asarray
    if mesh is not None:
        from batquant_jax.distributed import DataParallel
        dp = DataParallel(mesh)
        dp.check_batch(batch_size, "batch_size")
        fn = lambda t, fn=fn: fn(dp.shard_rows(t))  # noqa: E731
        fetch = dp.fetch

    start = time.perf_counter()
    total, done = 0.0, 0
    per_window: list[float] = []

    def consume(out: jax.Array, valid: int) -> None:
        nonlocal total, done
        nll = np.asarray(fetch(out), dtype=np.float64)
        if nll.shape != (batch_size, seqlen - 1):
            raise ValueError(f"nll_fn returned shape {nll.shape}, expected "
                             f"{(batch_size, seqlen - 1)} for tokens {(batch_size, seqlen)}")
        total += float(nll[:valid].sum())
        per_window.extend(float(v) for v in nll[:valid].mean(axis=1))
        done += valid
        if progress is not None:
            elapsed = time.perf_counter() - start
            rate = done * seqlen / max(elapsed, 1e-9)
            progress(Progress(done, n, _exp(total / (done * (seqlen - 1))), rate, elapsed,
                              (n - done) * seqlen / rate))

    pending = None
    for b in range(n_batches):
        out = fn(windows[b * batch_size:(b + 1) * batch_size])  # dispatched asynchronously
        if pending is not None:
            consume(*pending)
        pending = (out, min(batch_size, n - b * batch_size))
    consume(*pending)

    nll_mean = total / (n * (seqlen - 1))
    return PerplexityResult(perplexity=_exp(nll_mean), nll_mean=nll_mean, tokens=n * seqlen,
                            windows=n, seqlen=int(seqlen), seconds=time.perf_counter() - start,
                            window_nll=tuple(per_window))
