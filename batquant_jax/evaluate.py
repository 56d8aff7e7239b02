"""Perplexity of a model on a corpus: ``python -m batquant_jax.evaluate``.

    python -m batquant_jax.evaluate --model=smollm2-135m --eval_data=wiki-eval \\
        --seqlen=512 --max_tokens=65536 --output_json=/tmp/ppl.json
    python -m batquant_jax.evaluate --checkpoint=/tmp/smollm2-batquant --eval_data=wiki-eval

Progress goes to stderr; the last line on stdout is ``perplexity: <value>``. Bad input (an unknown
model, a missing or unreadable corpus, a damaged checkpoint, a bad flag or --output_json path)
prints one line to stderr and exits with 2, before the evaluation. A non-finite perplexity, or a
result that cannot be written, prints one line (holding the result) and exits with 1.
The flags only fill an ``EvalConfig``; ``run_evaluation(cfg)`` does the work.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

from absl import app, flags

from batquant_jax.errors import RunError, UserError
from batquant_jax import cli, data, perplexity


class ConfigError(UserError):
    """An evaluation setting that cannot work; the message is one line."""


class ResultError(RunError):
    """The evaluation ran, but its result is not finite or cannot be written; one line."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. ``max_tokens`` None means the whole corpus."""

    model: str = dataclasses.field(default="smollm2-135m", metadata=cli.help_(
        "model alias (smollm2-135m, qwen2.5-coder-1.5b), Hugging Face folder or GGUF file"))
    eval_data: str = dataclasses.field(default="wiki-eval", metadata=cli.help_(
        "wiki-eval, wiki-calib, shakespeare (five plays, fetched on first use), or a path to a "
        "UTF-8 text file or folder"))
    seqlen: int = dataclasses.field(default=512, metadata=cli.help_("tokens per window"))
    max_tokens: int | None = dataclasses.field(default=65536, metadata=cli.help_(
        "evaluate the first max_tokens // seqlen windows; 0 or negative = all"))
    batch_size: int = dataclasses.field(default=1, metadata=cli.help_("windows per forward pass"))
    output_json: str | None = dataclasses.field(default=None, metadata=cli.help_(
        "write the result to this JSON file"))
    checkpoint: str | None = dataclasses.field(default=None, metadata=cli.help_(
        "evaluate this quantized checkpoint folder (from batquant_jax.calibrate) instead of "
        "--model"))

    def validate(self) -> None:
        """Checks that need no model; ``run_evaluation`` also checks seqlen against the model."""
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be >= 2 (one prediction needs two tokens), "
                              f"got {self.seqlen}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < self.seqlen:
            raise ConfigError(f"--max_tokens {self.max_tokens} is less than one window of "
                              f"--seqlen {self.seqlen}; pass >= {self.seqlen}, or 0 for all")
        if self.checkpoint is None and not self.model.strip():
            raise ConfigError("--model must name a model (an alias or a path), got ''")
        if self.output_json:
            cli.check_output_path("--output_json", self.output_json,
                                  {"--checkpoint": self.checkpoint, "--eval_data": self.eval_data,
                                   "--model": None if self.checkpoint else self.model},
                                  ConfigError)


@dataclasses.dataclass(frozen=True)
class EvalModel:
    """What the evaluation needs from a model: nll_fn int32 [B, T] -> float32 [B, T-1]."""

    nll_fn: Callable[[Any], Any]
    tokenizer: Any
    description: str
    max_positions: int


def get_nll_fn(cfg: EvalConfig) -> EvalModel:
    """Loads ``cfg.model`` and returns its jitted NLL function, tokenizer and a description.

    The model is an argument of the jitted function (not a constant baked into it), so it is
    compiled once per batch shape. Raises ``ModelLoadError`` on a bad model spec.
    """
    from batquant_jax.models import forward_nll  # imported here: the heavy part

    net, tokenizer, description, max_positions = cli.load_for_command(cfg.model, cfg.checkpoint,
                                                                      ConfigError)
    return EvalModel(nll_fn=functools.partial(forward_nll, net), tokenizer=tokenizer,
                     description=description, max_positions=max_positions)


def _log(msg: str) -> None:
    print(f"evaluate: {msg}", file=sys.stderr, flush=True)


def run_evaluation(cfg: EvalConfig) -> dict:
    """Perplexity of ``cfg.model`` on ``cfg.eval_data`` by the project's protocol.

    Returns {"perplexity", "tokens", "windows", "seqlen", "model", "eval_data", "seconds"
    (model loading included), "eval_seconds", "nll_mean", "window_nll" (each window's mean NLL,
    for paired comparisons of two models)} and writes it to ``cfg.output_json`` when set.
    Raises ConfigError, data.DataError or the model loader's error (all ValueErrors with
    one-line messages) on bad input, ResultError for a non-finite perplexity or a failed write.
    """
    cfg.validate()
    start = time.perf_counter()
    _log(f"reading {cfg.eval_data}")
    text = data.load_corpus(cfg.eval_data)  # before the model: a bad path fails fast
    from batquant_jax.models.loading import peek_context
    context = peek_context(cfg.checkpoint or cfg.model, checkpoint=cfg.checkpoint is not None)
    if context is not None and cfg.seqlen > context:  # before a load that may take minutes
        raise ConfigError(f"--seqlen {cfg.seqlen} exceeds the model's context of {context} "
                          "positions")
    _log(f"loading {'checkpoint ' + cfg.checkpoint if cfg.checkpoint else 'model ' + cfg.model}")
    evm = get_nll_fn(cfg)
    if cfg.seqlen > evm.max_positions:
        raise ConfigError(f"--seqlen {cfg.seqlen} exceeds the model's context of "
                          f"{evm.max_positions} positions")
    ids = data.tokenize_corpus(text, evm.tokenizer)
    if ids.size < cfg.seqlen:
        raise data.DataError(f"{cfg.eval_data} has {ids.size} tokens; one window of --seqlen "
                             f"{cfg.seqlen} needs at least {cfg.seqlen}")
    windows = min(ids.size // cfg.seqlen,
                  ids.size if cfg.max_tokens is None else cfg.max_tokens // cfg.seqlen)
    _log(f"{len(text)} chars -> {ids.size} tokens; evaluating {windows} windows of "
         f"{cfg.seqlen} tokens, batch {cfg.batch_size}, with {evm.description}")
    res = perplexity.evaluate_perplexity(
        evm.nll_fn, ids, seqlen=cfg.seqlen, max_tokens=cfg.max_tokens,
        batch_size=cfg.batch_size, progress=perplexity.progress_printer())
    result = {"perplexity": res.perplexity, "tokens": res.tokens, "windows": res.windows,
              "seqlen": res.seqlen, "model": cfg.checkpoint or cfg.model, "eval_data": cfg.eval_data,
              "seconds": round(time.perf_counter() - start, 3),
              "eval_seconds": round(res.seconds, 3), "nll_mean": res.nll_mean,
              "window_nll": list(res.window_nll)}
    if not math.isfinite(res.perplexity):
        raise ResultError(f"perplexity is {res.perplexity} over {res.tokens} tokens: the model's "
                          "predictions are not finite (a damaged checkpoint or an overflow); "
                          "no result is written")
    if cfg.output_json:
        out = pathlib.Path(cfg.output_json).expanduser()
        try:
            data.atomic_write(out, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
        except OSError as e:
            raise ResultError(f"cannot write {out} ({e.strerror or e}); the result was "
                              f"{json.dumps(result)}") from None
        _log(f"wrote {out}")
    return result


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags: one per EvalConfig field (only when run as a program:
    importing this module registers nothing, so other command lines may use the same names)."""
    cli.define_flags_from(EvalConfig)


def config_from_flags(f: flags.FlagValues = FLAGS) -> EvalConfig:
    """Parsed flags -> EvalConfig (max_tokens <= 0 becomes None: the whole corpus)."""
    return cli.config_from(EvalConfig, f, all_if_nonpositive=("max_tokens",))


def main(argv: list[str]) -> None:
    cli.sync_cpu_dispatch()  # before any computation
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; all settings are --flags")
    if FLAGS.checkpoint:
        from batquant_jax.checkpoint import quiet_orbax_logs
        quiet_orbax_logs()
    try:
        _main()
    except KeyboardInterrupt:  # nothing is written before the result: nothing to keep
        cli.fail("interrupted; no result was written", 130)


def _main() -> None:
    if FLAGS.tasks is not None:  # zero-shot accuracy instead of perplexity (block below)
        return accuracy_main()
    only_tasks = [f"--{n}" for n in ("limit", "baseline_json", "token_budget")
                  if FLAGS[n].present]
    if only_tasks:
        cli.fail(f"{', '.join(only_tasks)} only apply with --tasks (zero-shot accuracy); "
                 "perplexity takes --max_tokens")
    try:
        result = run_evaluation(config_from_flags())
    except UserError as e:
        cli.fail(str(e).splitlines()[0])
    except ResultError as e:
        cli.fail(str(e), 1)
    print(f"perplexity: {result['perplexity']:.4f}", flush=True)


# ----------------------------------------------------------------------------- zero-shot accuracy
# ``--tasks`` switches the command to zero-shot accuracy (batquant_jax.accuracy):
#     python -m batquant_jax.evaluate --model=smollm2-135m --tasks=piqa,arc_easy --limit=200
#     python -m batquant_jax.evaluate --checkpoint=DIR --tasks=piqa --baseline_json=fp.json
# --model, --checkpoint and --output_json mean the same as for perplexity.

def define_accuracy_flags() -> None:
    flags.DEFINE_string("tasks", None,
                        "zero-shot accuracy on these comma-separated tasks (arc_easy, "
                        "arc_challenge, hellaswag, piqa, winogrande, boolq, lambada, or a .jsonl "
                        "file of {query, choices, gold} lines) instead of perplexity")
    flags.DEFINE_integer("limit", 0, "with --tasks: the first N items of each task; 0 = all",
                         lower_bound=0)
    flags.DEFINE_string("baseline_json", None,
                        "with --tasks: the --output_json of a full-precision run; adds recovery "
                        "= average acc / baseline average acc on the same items")
    flags.DEFINE_integer("token_budget", 2048, "with --tasks: tokens per forward pass")


def accuracy_main() -> None:
    """``--tasks`` given: score, print the table on stdout; bad input exits 2 in one line."""
    from batquant_jax import accuracy, tasks

    errors = (UserError, accuracy.AccuracyError, tasks.TaskError)
    try:
        cfg = accuracy.AccuracyConfig(
            model=FLAGS.model, checkpoint=FLAGS.checkpoint or None,
            tasks=tuple(tasks.parse_task_list(FLAGS.tasks)),
            limit=FLAGS.limit if FLAGS.limit > 0 else None, output_json=FLAGS.output_json,
            baseline_json=FLAGS.baseline_json, token_budget=FLAGS.token_budget)
        result = accuracy.run_accuracy(cfg)
    except errors as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except accuracy.WriteError as e:
        cli.fail(str(e), code=1)
    print(accuracy.format_table(result), flush=True)


if __name__ == "__main__":
    define_flags()
    define_accuracy_flags()
    app.run(main, flags_parser=cli.parse_flags)
