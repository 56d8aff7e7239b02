"""Text generation, the command: ``python -m batquant_jax.generate``.

    python -m batquant_jax.generate --model=smollm2-135m --prompt="What is MXFP4?" --chat
    python -m batquant_jax.generate --checkpoint=/tmp/smollm2-batquant --prompt="Once upon a time" \\
        --max_new_tokens=64 --temperature=0.7 --top_p=0.9 --seed=1

The command prints the generated text on stdout as it comes (the prompt is not echoed), then
one line on stderr with prefill and decode tokens/s. Bad input (an unknown model, a missing
checkpoint, an empty prompt, a length past the model's context, a bad sampling flag, --chat for a
tokenizer without a chat template) prints one ``error:`` line on stderr and exits with 2; Ctrl-C
keeps what was printed and exits with 130.

The library (batched generation, sampling, the jitted prefill and decode steps) is
``batquant_jax.generation``; its public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
from typing import Any

from absl import app, flags

from batquant_jax import cli
from batquant_jax.errors import UserError
from batquant_jax.generation import (  # noqa: F401  (re-exported: the library's public names)
    CACHE_MULTIPLE, PROMPT_MULTIPLE, DecodeState, GenerateError, Generation, NonFiniteError,
    Sampling, Steps, TextStream, _round_up, _steps, check_request, encode_prompt, generate,
    generate_ids, left_pad, sample_tokens, special_ids, split_model)

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- command line

@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """What to generate (the flags). checkpoint, when set, overrides model."""

    model: str = dataclasses.field(default="smollm2-135m", metadata=cli.help_(
        "model alias (smollm2-135m, qwen2.5-coder-1.5b), Hugging Face folder or GGUF file"))
    checkpoint: str | None = dataclasses.field(default=None, metadata=cli.help_(
        "a quantized checkpoint folder (from batquant_jax.calibrate) instead of --model"))
    prompt: str = dataclasses.field(default="", metadata=cli.help_(
        "the text to continue (or, with --chat, the user message)"))
    chat: bool = dataclasses.field(default=False, metadata=cli.help_(
        "wrap the prompt in the tokenizer's chat template"))
    max_new_tokens: int = dataclasses.field(default=128, metadata=cli.help_(
        "most tokens to generate (fewer when EOS comes first)"))
    temperature: float = dataclasses.field(default=0.0, metadata=cli.help_(
        "sampling temperature; 0 = greedy"))
    top_k: int = dataclasses.field(default=0, metadata=cli.help_(
        "sample among the k most likely tokens; 0 = all"))
    top_p: float = dataclasses.field(default=1.0, metadata=cli.help_(
        "sample among the most likely tokens holding this probability mass; 1 = all"))
    seed: int = dataclasses.field(default=0, metadata=cli.help_("PRNG seed of the sampling"))
    # fused.MODES: how packed MXFP4 weights are multiplied
    fused: str = dataclasses.field(default="auto", metadata=cli.help_(
        "packed MXFP4 weights (and GGUF-encoded full-precision ones): auto = the fused kernel "
        "for decode, dequantize-then-dot for long prefills; on = fused everywhere; off = always "
        "dequantize-then-dot"))

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)

    def validate(self) -> None:
        """Checks that need no model (the context length is checked once it is loaded)."""
        if not self.prompt.strip():
            raise GenerateError(f"--prompt is empty; give the text to continue (got {self.prompt!r})")
        if self.max_new_tokens <= 0:
            raise GenerateError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.sampling.validate()
        if self.checkpoint is None and not self.model.strip():
            raise GenerateError("--model must name a model (an alias or a path), got ''")
        from batquant_jax.fused import MODES
        if self.fused not in MODES:
            raise GenerateError(f"--fused must be one of {', '.join(MODES)}, got {self.fused!r}")


def define_flags() -> None:
    """Defines the command-line flags: one per GenerateConfig field (only when run as a
    program)."""
    cli.define_flags_from(GenerateConfig)


def config_from_flags(f: flags.FlagValues = FLAGS) -> GenerateConfig:
    return cli.config_from(GenerateConfig, f)


def _log(msg: str) -> None:
    print(f"generate: {msg}", file=sys.stderr, flush=True)


def _out(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


@contextlib.contextmanager
def _hold_ctrl_c():
    """Holds Ctrl-C back while a piece of text is written and recorded, then raises it: the
    text on screen at an interruption is then exactly the text recorded, none lost or repeated.
    Does nothing unless Ctrl-C is Python's usual KeyboardInterrupt."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending = []
    signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def load(cfg: GenerateConfig) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) of ``cfg``; the loaders' errors, or GenerateError when
    there is no tokenizer."""
    net, tokenizer, description, _ = cli.load_for_command(cfg.model, cfg.checkpoint,
                                                          GenerateError)
    net.decode_head()  # one token per forward: decode a stored head once, not at every token
    return net, tokenizer, description


def main(argv: list[str]) -> None:
    cli.sync_cpu_dispatch()  # before any computation
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; all settings are --flags")
    try:
        _run(config_from_flags())
    except KeyboardInterrupt:  # before generation started (loading, compiling)
        cli.fail("interrupted", 130)


def _run(cfg: GenerateConfig) -> None:
    errors = (GenerateError,)
    try:
        cfg.validate()
        errors = (UserError,)
        if cfg.checkpoint:
            from batquant_jax.checkpoint import quiet_orbax_logs
            quiet_orbax_logs()
        from batquant_jax.models.loading import peek_context
        context = peek_context(cfg.checkpoint or cfg.model, checkpoint=bool(cfg.checkpoint))
        if context is not None and cfg.max_new_tokens >= context:  # a prompt needs 1 position
            raise GenerateError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a "
                                f"prompt in the model's context of {context} positions")
        _log(f"loading {'checkpoint ' + cfg.checkpoint if cfg.checkpoint else 'model ' + cfg.model}")
        model, tokenizer, description = load(cfg)
        from batquant_jax import fused
        fused.set_mode(cfg.fused)
        path = fused.describe(model)
        if path:
            _log(path)
        ids = encode_prompt(tokenizer, cfg.prompt, chat=cfg.chat)
        check_request([ids], cfg.max_new_tokens, int(model.config.max_position_embeddings))
    except errors as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    eos_ids, pad_id = special_ids(tokenizer)
    _log(f"{description}: prompt of {len(ids)} tokens, up to {cfg.max_new_tokens} new")
    stream = TextStream(tokenizer)

    def on_step(tokens, live):
        if live[0]:
            with _hold_ctrl_c():
                _out(stream.push(tokens[:1]))

    try:
        res = generate_ids(model, [ids], max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling,
                           seed=cfg.seed, eos_ids=eos_ids, pad_id=pad_id, on_step=on_step)
    except KeyboardInterrupt:
        _out(stream.flush() + "\n")
        cli.fail(f"interrupted after {len(stream.ids)} new tokens", 130)
    except NonFiniteError as e:
        _out(stream.flush() + "\n")
        cli.fail(str(e), 1)
    _out(stream.flush() + "\n")
    end = "EOS" if res.finished[0] else f"--max_new_tokens {cfg.max_new_tokens}"
    _log(f"prefill {res.prefill_tokens} tokens in {res.prefill_seconds:.3f} s "
         f"({res.prefill_tokens_per_second:.1f} tokens/s); decode {res.decode_tokens} tokens in "
         f"{res.decode_seconds:.3f} s ({res.decode_tokens_per_second:.1f} tokens/s); "
         f"compile and warm-up {res.compile_seconds:.1f} s; KV cache {res.kv_cache_bytes:,} bytes "
         f"({res.kv_cache_bytes / max(res.kv_cache_float32_bytes, 1):.1%} of float32); "
         f"stopped at {end}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
