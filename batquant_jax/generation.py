"""Text generation with a KV cache, the library: ``generate`` / ``generate_ids``.

From Python (batched prompts, left padding, a stop at EOS per row):

    from batquant_jax.generation import generate
    out = generate(model, tokenizer, ["The capital of France is", "2 + 2 ="], max_new_tokens=32)
    out.tokens, out.texts   # new token ids (EOS included when reached) and their text, per row

How it runs: prompts are left padded to a common length P (rounded up to a multiple of 16), and
one KV cache per layer is preallocated with S slots (P + max_new_tokens - 1, rounded up to a
multiple of 64). A jitted prefill writes the prompts to slots 0 .. P-1 and samples the first
token; a jitted decode step then writes one token per row at slot ``end`` and samples the next.
Shapes are static, so the decode step compiles once per (batch, S, number of EOS ids, sampling)
and never per token.
Each row's RoPE positions start at 0 at its first real token; its pad slots are masked out of
every query. Sampling (``Sampling``) is greedy at temperature 0, else softmax(logits / T)
restricted to the top_k tokens and to the top_p probability mass, drawn with a PRNG key from
``seed`` folded with the step number. The command line is ``batquant_jax.generate``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from batquant_jax.errors import RunError, UserError

PROMPT_MULTIPLE = 16  # prompt lengths are padded up to a multiple of this (fewer prefill shapes)
CACHE_MULTIPLE = 64   # cache lengths are rounded up to a multiple of this (fewer decode shapes)


class GenerateError(UserError):
    """A generation request that cannot run; the message is one line."""


MAX_TEMPERATURE = float(np.finfo(np.float32).max)  # logits / T is computed in float32


class NonFiniteError(RunError):
    """The model's logits were not finite (NaN / Inf): the sampled tokens would be meaningless.
    One-line message; the command exits with 1, as evaluate does for a non-finite perplexity."""


# ----------------------------------------------------------------------------- sampling

@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from logits. temperature 0 = greedy (top_k, top_p unused);
    top_k 0 = no top-k cut; top_p 1 = no nucleus cut. Hashable: a static argument of the steps."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise GenerateError(f"--temperature must be a number in [0, {MAX_TEMPERATURE:g}] "
                                f"(0 = greedy; sampling runs in float32), got {self.temperature}")
        if self.top_k < 0:
            raise GenerateError(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):  # also false for nan
            raise GenerateError(f"--top_p must be in (0, 1] (1 = off), got {self.top_p}")


def sample_tokens(logits, key, sampling: Sampling):
    """logits: `[B, V]` float, key: a PRNG key -> next tokens `[B]` int32.

    Greedy: argmax. Otherwise logits / temperature, then every token below the top_k-th largest
    logit is dropped (top_k > 0), then every token outside the smallest set of most likely tokens
    whose probability reaches top_p (top_p < 1); one categorical draw per row with ``key``.
    """
    import jax
    import jax.numpy as jnp

    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / np.float32(sampling.temperature)
    vocab = x.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = jax.lax.top_k(x, sampling.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if sampling.top_p < 1.0:
        ranked = -jnp.sort(-x, axis=-1)  # descending
        probs = jax.nn.softmax(ranked, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked higher
        cutoff = jnp.min(jnp.where(above < np.float32(sampling.top_p), ranked, jnp.inf),
                         axis=-1, keepdims=True)  # the most likely token is always kept
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- jitted steps

class DecodeState(NamedTuple):
    """What one decode step reads and returns (a pytree; B rows, S cache slots).

    cache: one `KVCache` per layer; token: `[B]` int32, the last token of each row (the next
    step's input); pad: `[B]` int32, left pad slots of each row; done: `[B]` bool, the row has
    produced an EOS; step: int32 scalar, tokens sampled so far; key: the PRNG key of the run;
    finite: `[B]` bool, every logit of the row was finite so far.
    """

    cache: tuple
    token: Any
    pad: Any
    done: Any
    step: Any
    key: Any
    finite: Any = None


def _is_eos(token, eos):
    """token `[B]`, eos `[E]` (E may be 0) -> `[B]` bool."""
    return (token[:, None] == eos[None, :]).any(axis=-1)


def _prefill_fn(graphdef, treedef, leaves, cache, tokens, pad, key, eos, *, sampling):
    """tokens `[B, P]` (left padded, pad `[B]`) into an empty cache of S slots -> (DecodeState
    holding the first sampled token, its logits `[B, V]` float32)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    length = tokens.shape[1]
    slots = jnp.arange(cache[0].k.shape[1], dtype=jnp.int32)
    query = jnp.arange(length, dtype=jnp.int32)
    positions = jnp.maximum(query[None, :] - pad[:, None], 0)
    mask = (slots[None, None, :] <= query[None, :, None]) & (slots[None, None, :] >= pad[:, None, None])
    logits, cache = model.extend(tokens, positions, mask, cache, last_only=True)
    logits = logits[:, 0]
    token = sample_tokens(logits, jax.random.fold_in(key, 0), sampling)
    state = DecodeState(cache=cache, token=token, pad=pad, done=_is_eos(token, eos),
                        step=jnp.ones((), jnp.int32), key=key,
                        finite=jnp.all(jnp.isfinite(logits), axis=-1))
    return state, logits


def _decode_fn(graphdef, treedef, leaves, state: DecodeState, eos, pad_id, *, sampling):
    """One token per row at slot ``end`` of the cache -> (next DecodeState, logits `[B, V]`).
    Rows already done get ``pad_id`` and stay done."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    slot = state.cache[0].end
    slots = jnp.arange(state.cache[0].k.shape[1], dtype=jnp.int32)
    positions = (slot - state.pad)[:, None]
    mask = ((slots[None, :] <= slot) & (slots[None, :] >= state.pad[:, None]))[:, None, :]
    logits, cache = model.extend(state.token[:, None], positions, mask, state.cache)
    logits = logits[:, 0]
    token = sample_tokens(logits, jax.random.fold_in(state.key, state.step), sampling)
    token = jnp.where(state.done, pad_id, token)
    done = state.done | _is_eos(token, eos)
    finite = state.finite & (state.done | jnp.all(jnp.isfinite(logits), axis=-1))
    return DecodeState(cache=cache, token=token, pad=state.pad, done=done, step=state.step + 1,
                       key=state.key, finite=finite), logits


@dataclasses.dataclass
class Steps:
    """The jitted prefill and decode step of one model structure (its graphdef and state tree).

    prefill(leaves, cache, tokens, pad, key, eos, sampling=) and
    decode(leaves, state, eos, pad_id, sampling=) are ``jax.jit`` functions (``_cache_size()``
    counts their compilations); the cache, resp. the DecodeState, is donated.
    """

    prefill: Any
    decode: Any
    compiled: set = dataclasses.field(default_factory=set)


@functools.lru_cache(maxsize=8)
def _steps(graphdef, treedef, fused_mode: str) -> Steps:
    """The steps of one structure under one fused-product mode (read when they are traced)."""
    import jax
    return Steps(
        prefill=jax.jit(functools.partial(_prefill_fn, graphdef, treedef),
                        static_argnames=("sampling",), donate_argnums=(1,)),
        decode=jax.jit(functools.partial(_decode_fn, graphdef, treedef),
                       static_argnames=("sampling",), donate_argnums=(1,)))


def split_model(model) -> tuple[Steps, list]:
    """(the model's jitted steps, its current state as a flat list of arrays). Split at every
    run, so that weights changed in place since the last run are used; the jitted steps are
    shared by every model of the same structure."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    from batquant_jax import fused
    return _steps(graphdef, treedef, fused.get_mode()), leaves


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = PROMPT_MULTIPLE
             ) -> tuple[np.ndarray, np.ndarray]:
    """B token lists -> (tokens `[B, P]` int32 right-aligned, pad `[B]` int32 slots before each
    row's first token), P = the longest prompt rounded up to ``multiple``."""
    length = _round_up(max(len(p) for p in prompts), multiple)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    pad = np.zeros(len(prompts), np.int32)
    for i, p in enumerate(prompts):
        pad[i] = length - len(p)
        tokens[i, pad[i]:] = np.asarray(p, np.int32)
    return tokens, pad


# ----------------------------------------------------------------------------- generation loop

@dataclasses.dataclass
class Generation:
    """The result of one generation over B prompts.

    tokens: B lists of new token ids (EOS included when reached; at most max_new_tokens);
    texts: B decoded strings (special tokens skipped), or None without a tokenizer;
    prompt_lengths: B prompt lengths; finished: B flags, True where the row reached EOS.
    prefill_tokens: real prompt tokens over all rows; decode_tokens: new tokens produced by decode
    steps (each row's first comes from the prefill); *_seconds: wall time without compilation;
    compile_seconds: compilation and one warm-up run of each step for shapes not run before
    (zero when every shape ran before).
    """

    tokens: list[list[int]]
    texts: list[str] | None
    prompt_lengths: list[int]
    finished: list[bool]
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    compile_seconds: float
    kv_cache_bytes: int = 0  # the caches' stored bytes (packed codes + scales when KV-quantized)
    kv_cache_float32_bytes: int = 0  # the same slots in float32

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else math.nan

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else math.nan


def check_request(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_positions: int,
                  vocab_size: int | None = None) -> None:
    """GenerateError unless every prompt is non-empty, holds ids of the vocabulary (when
    ``vocab_size`` is given) and fits with max_new_tokens new tokens into the model's context
    of ``max_positions``."""
    if not prompts:
        raise GenerateError("no prompts given")
    if max_new_tokens <= 0:
        raise GenerateError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty (no tokens)")
    if vocab_size is not None:
        for i, p in enumerate(prompts):
            bad = [int(t) for t in p if not 0 <= int(t) < vocab_size]
            if bad:
                raise GenerateError(f"prompt {i} holds token id {bad[0]}, outside the "
                                    f"vocabulary [0, {vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_positions:
        raise GenerateError(f"prompt of {longest} tokens + --max_new_tokens {max_new_tokens} = "
                            f"{longest + max_new_tokens} exceeds the model's context of "
                            f"{max_positions} positions")


def _warm_up(steps: Steps, name: str, args, kwargs) -> float:
    """Runs ``steps.<name>`` once on throwaway copies of ``args`` unless these argument shapes
    ran before -> seconds spent. Compilation and the slow first run of a new executable then
    stay out of the timed calls."""
    import jax
    shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), args)
    signature = (name, str(shapes), tuple(sorted(kwargs.items())))
    if signature in steps.compiled:
        return 0.0
    start = time.perf_counter()
    leaves, donated, *rest = args
    donated = jax.tree.map(lambda a: a.copy(), donated)
    jax.block_until_ready(getattr(steps, name)(leaves, donated, *rest, **kwargs))
    steps.compiled.add(signature)
    return time.perf_counter() - start


def generate_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: Sampling = Sampling(), seed: int = 0, eos_ids: Sequence[int] = (),
                 pad_id: int = 0, on_step: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 prompt_multiple: int = PROMPT_MULTIPLE, cache_multiple: int = CACHE_MULTIPLE
                 ) -> Generation:
    """Generates up to ``max_new_tokens`` tokens after each of B token-id prompts.

    model: a LlamaForCausalLM (full precision or quantized); prompts: B non-empty lists of ids;
    eos_ids: ids that end a row (its later tokens are not returned; the loop ends when every
    row has ended); pad_id: the id used for padding (never seen by a real token).
    on_step(tokens `[B]` int32, live `[B]` bool) is called after each step with the tokens just
    sampled; live marks the rows whose token is real (not ended before this step).
    Raises GenerateError on a bad request (see ``check_request``) or bad sampling, and
    NonFiniteError at the first step whose logits are not finite (before on_step sees it).
    """
    import jax
    import jax.numpy as jnp

    sampling.validate()
    check_request(prompts, max_new_tokens, int(model.config.max_position_embeddings),
                  int(model.config.vocab_size))
    steps, leaves = split_model(model)
    tokens, pad = left_pad(prompts, pad_id, prompt_multiple)
    batch, length = tokens.shape
    slots = _round_up(length + max_new_tokens - 1, cache_multiple)
    eos = jnp.asarray(np.asarray(list(eos_ids), np.int32).reshape(-1))
    pad_token = jnp.asarray(pad_id, jnp.int32)
    key = jax.random.key(seed)
    cache = model.init_cache(batch, slots)
    cache_bytes = int(sum(c.nbytes for c in cache))
    cache_f32 = int(sum(2 * 4 * np.prod(c.k.shape) for c in cache))
    tokens, pad = jnp.asarray(tokens), jnp.asarray(pad)

    kwargs = {"sampling": sampling}
    compile_s = _warm_up(steps, "prefill", (leaves, cache, tokens, pad, key, eos), kwargs)
    start = time.perf_counter()
    state, _ = steps.prefill(leaves, cache, tokens, pad, key, eos, **kwargs)
    _check_finite(state, 1)
    out = [np.asarray(state.token)]
    done = np.asarray(state.done)
    prefill_s = time.perf_counter() - start
    live = np.ones(batch, bool)
    if on_step is not None:
        on_step(out[-1], live)
    decode_s = 0.0
    if max_new_tokens > 1 and not done.all():
        compile_s += _warm_up(steps, "decode", (leaves, state, eos, pad_token), kwargs)
    for _ in range(max_new_tokens - 1):
        if done.all():
            break
        live = ~done
        start = time.perf_counter()
        state, _ = steps.decode(leaves, state, eos, pad_token, **kwargs)
        _check_finite(state, len(out) + 1)
        out.append(np.asarray(state.token))
        done = np.asarray(state.done)
        decode_s += time.perf_counter() - start
        if on_step is not None:
            on_step(out[-1], live)

    table = np.stack(out, axis=1)  # [B, N]
    eos_set = set(int(e) for e in np.asarray(eos))
    rows, finished = [], []
    for row in table.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_set), None)
        rows.append(row if end is None else row[:end])
        finished.append(end is not None)
    return Generation(tokens=rows, texts=None, prompt_lengths=[len(p) for p in prompts],
                      finished=finished, prefill_tokens=int(sum(len(p) for p in prompts)),
                      prefill_seconds=prefill_s, decode_tokens=int(sum(len(r) - 1 for r in rows)),
                      decode_seconds=decode_s, compile_seconds=compile_s,
                      kv_cache_bytes=cache_bytes, kv_cache_float32_bytes=cache_f32)


def _check_finite(state: DecodeState, n: int) -> None:
    finite = np.asarray(state.finite)
    if not finite.all():
        rows = ", ".join(str(i) for i in np.flatnonzero(~finite)[:8])
        raise NonFiniteError(f"the model's logits are not finite at new token {n} (row {rows}): "
                             "a damaged checkpoint or an overflow; no further token is produced")


# ----------------------------------------------------------------------------- text level

def encode_prompt(tokenizer, text: str, *, chat: bool = False) -> list[int]:
    """A prompt's token ids; with ``chat`` the text is one user message in the tokenizer's chat
    template, followed by the assistant's turn. GenerateError on an empty prompt or a tokenizer
    without a chat template."""
    if not isinstance(text, str) or not text.strip():
        raise GenerateError(f"--prompt is empty; give the text to continue (got {text!r})")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GenerateError("--chat: this model's tokenizer carries no chat template; "
                                "drop --chat to continue the prompt as plain text")
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a broken template raises jinja2's errors (or others)
            msg = " ".join(str(e).split())[:200] or type(e).__name__
            raise GenerateError(f"--chat: the tokenizer's chat template does not render "
                                f"({type(e).__name__}: {msg}); drop --chat or fix the "
                                "template") from None
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def special_ids(tokenizer) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of a tokenizer: its eos_token_id (none if unset); its pad token, else
    its EOS, else 0."""
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


def generate(model, tokenizer, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, chat: bool = False,
             eos_ids: Sequence[int] | None = None, on_step=None) -> Generation:
    """Batched generation for research code: B prompts (strings, or token-id lists) -> Generation
    with each row's new token ids (up to and including its EOS) and text.

    tokenizer: encodes string prompts (``chat`` applies its chat template) and decodes the
    results; may be None when the prompts are token ids (texts is then None). eos_ids: default
    the tokenizer's EOS. Greedy at temperature 0. See ``generate_ids`` for on_step.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise GenerateError("string prompts need a tokenizer")
        ids = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    else:
        ids = [[int(t) for t in p] for p in prompts]
    default_eos, pad_id = special_ids(tokenizer) if tokenizer is not None else ((), 0)
    result = generate_ids(model, ids, max_new_tokens=max_new_tokens,
                          sampling=Sampling(float(temperature), int(top_k), float(top_p)),
                          seed=seed, eos_ids=default_eos if eos_ids is None else eos_ids,
                          pad_id=pad_id, on_step=on_step)
    if tokenizer is not None:
        result.texts = [tokenizer.decode(r, skip_special_tokens=True) for r in result.tokens]
    return result


class TextStream:
    """Turns token ids into text as they arrive: ``push(ids)`` returns the text that is new and
    complete (a partial UTF-8 character is held back until its last byte comes)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def _new(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        return self._new(final=False)

    def flush(self) -> str:
        """The rest of the text (a trailing partial character included)."""
        return self._new(final=True)
