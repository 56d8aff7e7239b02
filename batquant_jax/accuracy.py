"""Zero-shot accuracy of a model or a quantized checkpoint on several tasks, with recovery.

    cfg = AccuracyConfig(model="smollm2-135m", tasks=("piqa", "arc_easy"), limit=200)
    result = run_accuracy(cfg)       # {"tasks": {name: {...}}, "average": {...}, ...}
    print(format_table(result))

``recovery`` (with ``baseline_json``, the JSON of a full-precision run): the quantized average
accuracy divided by the baseline's average accuracy on the same items (per task, the first n
items both runs scored), with the per-task recoveries beside it. Used by ``python -m
batquant_jax.evaluate --tasks=...``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import numpy as np

from batquant_jax.errors import UserError
from batquant_jax import tasks as tasks_lib
from batquant_jax import zeroshot


class AccuracyError(UserError):
    """A setting or input that cannot work; the message is one line."""


class WriteError(OSError):
    """The results could not be written (the scores were computed)."""


@dataclasses.dataclass(frozen=True)
class AccuracyConfig:
    """What to score. ``limit`` None = every item; ``token_budget`` = tokens per forward pass."""

    model: str = "smollm2-135m"
    checkpoint: str | None = None
    tasks: tuple[str, ...] = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande",
                              "boolq", "lambada")
    limit: int | None = None
    output_json: str | None = None
    baseline_json: str | None = None
    token_budget: int = 2048

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise AccuracyError(f"--limit must be >= 1 (or 0 for every item), got {self.limit}")
        if self.token_budget < 1:
            raise AccuracyError(f"--token_budget must be >= 1, got {self.token_budget}")
        tasks_lib.check_task_specs(self.tasks)
        if self.output_json:
            from batquant_jax import cli
            cli.check_output_path("--output_json", self.output_json,
                                  {"--checkpoint": self.checkpoint,
                                   "--baseline_json": self.baseline_json,
                                   "--model": None if self.checkpoint else self.model},
                                  AccuracyError)


def load_for_scoring(cfg: AccuracyConfig) -> tuple[Any, Any, str, int]:
    """-> (model, tokenizer, description, max positions) for ``cfg.checkpoint`` or ``cfg.model``."""
    from batquant_jax import cli
    return cli.load_for_command(cfg.model, cfg.checkpoint, AccuracyError)


def read_baseline(path: str) -> dict:
    p = pathlib.Path(path).expanduser()
    try:
        base = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AccuracyError(f"--baseline_json {p} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AccuracyError(f"--baseline_json {p} is not a readable JSON file "
                            f"({type(e).__name__})") from None
    if not isinstance(base, dict) or not isinstance(base.get("tasks"), dict):
        raise AccuracyError(f"--baseline_json {p} holds no 'tasks'; pass the --output_json of a "
                            "zero-shot run")
    return base


def recovery(result: dict, baseline: dict) -> dict[str, Any]:
    """Quantized average acc / baseline average acc over the tasks both scored, each task on
    its first min(n, n_baseline) items (both runs take the first items of a task)."""
    per_task, ours, theirs = {}, [], []
    for name, res in result["tasks"].items():
        base = baseline["tasks"].get(name)
        if not base or "per_item" not in base:
            continue
        n = min(len(res["per_item"]["acc"]), len(base["per_item"]["acc"]))
        a = float(np.mean(res["per_item"]["acc"][:n]))
        b = float(np.mean(base["per_item"]["acc"][:n]))
        per_task[name] = {"n": n, "acc": a, "baseline_acc": b,
                          "recovery": a / b if b > 0 else None}
        ours.append(a)
        theirs.append(b)
    if not per_task:
        raise AccuracyError("--baseline_json shares no task with this run; nothing to compare")
    avg, base_avg = float(np.mean(ours)), float(np.mean(theirs))
    return {"recovery": avg / base_avg if base_avg > 0 else None, "average_acc": avg,
            "baseline_average_acc": base_avg, "tasks": per_task,
            "baseline_model": baseline.get("model")}


def run_accuracy(cfg: AccuracyConfig) -> dict[str, Any]:
    """Score every task of ``cfg`` (see the module docstring); writes ``cfg.output_json``.

    Raises AccuracyError, tasks.TaskError, data.DataError or the model loader's error (all
    ValueErrors with one-line messages) on bad input; every task file is read before the model
    is loaded.
    """
    cfg.validate()
    start = time.perf_counter()
    baseline = read_baseline(cfg.baseline_json) if cfg.baseline_json else None
    loaded_tasks = []
    for spec in cfg.tasks:
        zeroshot.log(f"reading task {spec}")
        loaded_tasks.append(tasks_lib.load_task(spec, cfg.limit))
    names = [t.name for t in loaded_tasks]
    if len(set(names)) != len(names):
        raise AccuracyError(f"two tasks share a name in {names}; rename a .jsonl file")
    if baseline is not None and not any("per_item" in (baseline["tasks"].get(n) or {})
                                        for n in names):
        raise AccuracyError(f"--baseline_json {cfg.baseline_json} shares no task with --tasks "
                            f"({', '.join(names)}); nothing to compare")
    zeroshot.log(f"loading {'checkpoint ' + cfg.checkpoint if cfg.checkpoint else 'model ' + cfg.model}")
    model, tokenizer, description, max_len = load_for_scoring(cfg)
    score_fn = zeroshot.make_score_fn(model)
    results: dict[str, Any] = {}
    for task in loaded_tasks:
        zeroshot.log(f"{task.name}: {len(task.items)} items from {task.source}")
        res = zeroshot.evaluate_task(score_fn, tokenizer, task, max_len=max_len,
                                     token_budget=cfg.token_budget, progress=zeroshot.log)
        line = f"{task.name}: acc {res['acc']:.4f}"
        if "acc_norm" in res:
            line += f", acc_norm {res['acc_norm']:.4f}"
        if "perplexity" in res:
            line += f", perplexity {res['perplexity']:.3f}"
        zeroshot.log(f"{line} ({res['items_per_s']:.2f} items/s)")
        results[task.name] = res
    accs = [r["acc"] for r in results.values()]
    norms = [r["acc_norm"] for r in results.values() if "acc_norm" in r]
    out: dict[str, Any] = {
        "model": cfg.checkpoint or cfg.model, "description": description,
        "limit": cfg.limit, "tasks": results,
        "average": {"acc": float(np.mean(accs)), "tasks": len(accs),
                    "acc_norm": float(np.mean(norms)) if norms else None,
                    "acc_norm_tasks": len(norms)},
        "seconds": round(time.perf_counter() - start, 3)}
    if baseline is not None:
        out["recovery"] = recovery(out, baseline)
    if cfg.output_json:
        path = pathlib.Path(cfg.output_json).expanduser()
        try:
            from batquant_jax.data import atomic_write  # never a half-written file
            atomic_write(path, (json.dumps(out, indent=1) + "\n").encode("utf-8"))
        except OSError as e:
            raise WriteError(f"cannot write --output_json {path}: {e.strerror or e}") from None
        zeroshot.log(f"wrote {path}")
    return out


def _fmt(value: float | None, stderr: float | None = None, scale: float = 100.0) -> str:
    if value is None:
        return "-"
    s = f"{value * scale:.2f}"
    return s + (f" ± {stderr * scale:.2f}" if stderr is not None else "")


def format_table(result: dict) -> str:
    """A plain-text table: task, n, acc ± stderr, acc_norm ± stderr (percent), perplexity."""
    head = ["task", "n", "acc %", "acc_norm %", "perplexity"]
    rows = []
    for name, r in result["tasks"].items():
        rows.append([name, str(r["n"]), _fmt(r["acc"], r.get("acc_stderr")),
                     _fmt(r.get("acc_norm"), r.get("acc_norm_stderr")),
                     f"{r['perplexity']:.3f}" if "perplexity" in r else "-"])
    avg = result["average"]
    rows.append([f"average ({avg['tasks']} tasks)", "", _fmt(avg["acc"]),
                 _fmt(avg["acc_norm"]) + (f" ({avg['acc_norm_tasks']} tasks)"
                                          if avg["acc_norm"] is not None else ""), ""])
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [head] + rows]
    rec = result.get("recovery")
    if rec is not None:
        lines.append(f"recovery: {_fmt(rec['recovery'])}% (average acc {_fmt(rec['average_acc'])} "
                     f"vs baseline {_fmt(rec['baseline_average_acc'])} on the same items)")
    return "\n".join(lines)
