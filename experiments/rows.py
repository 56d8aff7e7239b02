"""What the study's tables are made of, shared by study.py, report.py, plots.py and
diagnosis_report.py (none of which imports another for it): budgets, rows and suites, the key
that makes two results the same measurement, the results on disk, and the paired statistics
(perplexity ratios over windows, accuracy recovery over items)."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent

RESULTS_DIR = HERE / "results" / "study"
SETTINGS = ("W4A4KV16", "W4A8KV16")
HEADLINE_METHODS = ("rtn", "gptq", "quarot", "brq", "mr-gptq", "flatquant", "batquant")
EVAL_TEXTS = ("wiki-eval", "shakespeare")
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "transformers", "gguf")


# ----------------------------------------------------------------------------- budgets and rows

@dataclasses.dataclass(frozen=True)
class Budget:
    """What one row costs: calibration windows, epochs, evaluation windows per text, seed."""

    nsamples: int
    seqlen: int
    epochs: int
    eval_windows: int = 8
    eval_seqlen: int = 512
    seed: int = 0
    model: str = "smollm2-135m"

    @property
    def eval_max_tokens(self) -> int:
        return self.eval_windows * self.eval_seqlen

    def text(self, calibrated: bool = True) -> str:
        """One line, e.g. 'calib 16x256 tok, 2 ep; eval 8x512 tok/text; seed 0'."""
        ev = f"eval {self.eval_windows}x{self.eval_seqlen} tok/text; seed {self.seed}"
        if not calibrated:
            return ev
        return f"calib {self.nsamples}x{self.seqlen} tok, {self.epochs} ep; {ev}"


# Default budgets on 2 CPU cores (every result states its budget).
# One budget for both suites, so every ablation group's default variant is the headline
# batquant W4A4KV16 row itself (computed once).
SUITE_BUDGETS = {
    "headline": Budget(nsamples=32, seqlen=256, epochs=2, eval_windows=16),
    "ablations": Budget(nsamples=32, seqlen=256, epochs=2, eval_windows=16),
    "kv": Budget(nsamples=32, seqlen=256, epochs=2, eval_windows=16),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: a method at a setting with CalibConfig hyper-parameters.

    hparams: sorted (field, value) pairs passed to quantize_model (any CalibConfig field);
    nsamples, seed: override the suite budget's calibration size and seed (the seed picks the
    calibration windows and every random initialisation).
    """

    suite: str
    group: str
    label: str
    method: str
    setting: str
    hparams: tuple = ()
    nsamples: int | None = None
    seed: int | None = None

    @property
    def id(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "-", f"{self.suite}.{self.group}.{self.label}")

    def budget(self, base: Budget) -> Budget:
        over = {k: v for k, v in (("nsamples", self.nsamples), ("seed", self.seed)) if v is not None}
        return dataclasses.replace(base, **over) if over else base


def _hp(**kw) -> tuple:
    return tuple(sorted(kw.items()))


def headline_rows() -> list[Row]:
    rows = [Row("headline", "fp32", "fp", "fp", "fp32")]
    rows += [Row("headline", s, m, m, s) for s in SETTINGS for m in HEADLINE_METHODS]
    return rows


# transform block -> (g1, g2) with g1 * g2 == block; 32 (the MX block) is the default (8, 4)
BLOCK_FACTORS = {16: (4, 4), 32: (8, 4), 64: (8, 8), 128: (16, 8)}


def ablation_rows() -> list[Row]:
    """batquant at W4A4KV16, one group per question of docs/METHOD.md (and brq, mr-gptq in the
    seed group: the noise of calibration itself). Each group's default variant has no
    hyper-parameters, so it shares its calibration with the headline batquant row when
    the two suites run on one budget (SUITE_BUDGETS)."""
    def row(group, label, hparams=(), **kw):
        return Row("ablations", group, label, "batquant", "W4A4KV16", hparams, **kw)

    rows = [row("transform", "gpk"), row("transform", "block_affine", _hp(transform="block_affine"))]
    # calibration noise: the same comparison (batquant vs its block-rotation start, brq) with
    # other calibration windows and initialisations; seed 0 is the headline pair
    for method in ("batquant", "brq", "mr-gptq"):
        for seed in (0, 1, 2):
            rows.append(Row("ablations", "seed", f"{method} seed={seed}", method, "W4A4KV16",
                            seed=None if seed == 0 else seed))
    for clip in ("none", "weights", "activations", "both"):
        rows.append(row("clip", f"clip={clip}", () if clip == "both" else _hp(clip=clip)))
    for init in ("hadamard", "identity", "auto"):  # auto: per layer, the better of the two
        rows.append(row("init", f"init={init}", () if init == "hadamard" else _hp(init=init)))
    for block, (g1, g2) in BLOCK_FACTORS.items():
        rows.append(row("block", f"block={block}", () if block == 32 else _hp(g1=g1, g2=g2)))
    for g1 in (2, 4, 8, 16):
        rows.append(row("g1", f"g1={g1}", () if g1 == 8 else _hp(g1=g1, g2=32 // g1)))
    for wq in ("gptq", "rtn"):
        rows.append(row("weights", f"weights={wq}",
                        () if wq == "gptq" else _hp(weight_quantizer=wq)))
    for prop in ("fp", "quant"):
        rows.append(row("propagate", f"propagate={prop}",
                        () if prop == "fp" else _hp(propagate=prop)))
    for n in (16, 32, 64, 128):
        rows.append(row("nsamples", f"nsamples={n}", nsamples=None if n == 32 else n))
    return rows


KV_METHODS = ("rtn", "brq", "batquant")
KV_SETTINGS = ("W4A8KV16", "W4A8KV8", "W4A8KV4")
KV4_TRANSFORMS = ("block_hadamard", "learned")  # batquant at W4A8KV4 with a K/V transform


def kv_rows() -> list[Row]:
    """The quantized-KV settings: rtn, brq and batquant at W4A8KV16 (the headline rows, reused),
    W4A8KV8 and W4A8KV4; batquant at W4A8KV4 also with a learned and a block-Hadamard K/V
    transform (kv_transform). batquant's rows first (the goals are about it)."""
    learned = [Row("kv", "W4A8KV4", f"batquant kv={t}", "batquant", "W4A8KV4",
                   _hp(kv_transform=t)) for t in KV4_TRANSFORMS]
    rows = [Row("kv", s, "batquant", "batquant", s) for s in KV_SETTINGS] + learned[1:]
    rows += [Row("kv", s, m, m, s) for m in KV_METHODS[:-1] for s in KV_SETTINGS]
    return rows + learned[:1]


SUITES = {"headline": headline_rows, "ablations": ablation_rows, "kv": kv_rows}


def suite_rows(suite: str) -> list[Row]:
    if suite == "all":
        return [r for make in SUITES.values() for r in make()]
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}, all")
    return SUITES[suite]()


def select(rows: list[Row], only: str | None) -> list[Row]:
    """Rows whose method, label, group or id is one of the comma-separated ``only`` tokens."""
    if not only:
        return rows
    want = {t.strip() for t in only.split(",") if t.strip()}
    return [r for r in rows if want & {r.method, r.label, r.group, r.id}]


def row_key(row: Row, budget: Budget) -> dict:
    """What makes two results the same measurement (JSON-comparable)."""
    if row.method == "fp":  # no calibration: only the evaluation budget matters
        b = {k: getattr(budget, k) for k in ("eval_windows", "eval_seqlen", "model")}
        return {"method": "fp", "setting": "fp32", "hparams": {}, "budget": b,
                "eval_texts": list(EVAL_TEXTS)}
    key = {"method": row.method, "setting": row.setting, "hparams": dict(row.hparams),
           "budget": dataclasses.asdict(row.budget(budget)), "eval_texts": list(EVAL_TEXTS)}
    from batquant_jax.calibration import CalibConfig
    try:
        cfg = CalibConfig(method=row.method, setting=row.setting, **dict(row.hparams))
        trains = cfg.method_spec.train
    except (ValueError, TypeError):  # a pending row (pending_reason says why)
        return key
    if trains:  # a learned method's result depends on the library defaults too: a changed
        # default (objective, initialisation) makes the row stale instead of silently reused
        config = {k: v for k, v in dataclasses.asdict(cfg).items()
                  if NEUTRAL_NEW_FIELDS.get(k, object()) != v}
        key["config"] = {**config, "method_spec": dataclasses.asdict(cfg.method_spec)}
    return key


# CalibConfig fields added after results were recorded, at the value that changes nothing:
# left out of a key, so that adding an option does not make every learned row stale
NEUTRAL_NEW_FIELDS = {"kv_transform": "none", "anchor": 0.0}


def defaults_changed(row: Row, rec: dict) -> bool:
    """True when ``rec`` (a result of ``row``) was measured under library defaults that have
    changed since: its key differs from the key the row would get now at the record's own
    budget."""
    try:
        budget = Budget(**rec["budget"])
    except (KeyError, TypeError):
        return False
    return canon(row_key(row, budget)) != canon(rec.get("key"))


def canon(obj) -> str:
    """A JSON value as one canonical string (sorted keys): what makes two keys equal."""
    return json.dumps(obj, sort_keys=True)


# ----------------------------------------------------------------------------- what is supported

def pending_reason(row: Row) -> str | None:
    """None when the library can run ``row`` as defined, else why not (one line)."""
    if row.method == "fp":
        return None
    from batquant_jax.calibration import CalibConfig

    try:
        fields = {f.name for f in dataclasses.fields(CalibConfig)}
        missing = [k for k, _ in row.hparams if k not in fields]
        if missing:
            raise ValueError(f"CalibConfig has no field {', '.join(missing)}")
        CalibConfig(method=row.method, setting=row.setting, **dict(row.hparams)).validate()
    except (ValueError, TypeError) as e:
        return str(e).splitlines()[0]
    return None



def result_path(results_dir, row: Row) -> pathlib.Path:
    return pathlib.Path(results_dir) / f"{row.id}.json"


def load_results(results_dir) -> dict[str, dict]:
    """{row id: record} of every readable ``*.json`` in results_dir."""
    out = {}
    for path in sorted(pathlib.Path(results_dir).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "row" in rec:
            out[rec["row"]] = rec
    return out


def row_status(row: Row, budget: Budget, results: dict[str, dict]) -> str:
    """'pending' | 'done' (same key on disk) | 'reuse' (same key under another row) | 'stale'
    (this row's file holds another key) | 'todo'."""
    if pending_reason(row) is not None:
        return "pending"
    key = canon(row_key(row, budget))
    rec = results.get(row.id)
    if rec is not None and canon(rec.get("key")) == key:
        return "done"
    if any(canon(r.get("key")) == key for r in results.values()):
        return "reuse"
    return "stale" if rec is not None else "todo"



def _var(xs: list[float]) -> float:
    """Sample variance (n - 1); 0 for fewer than two values."""
    n = len(xs)
    if n < 2:
        return 0.0
    m = sum(xs) / n
    return sum((x - m) ** 2 for x in xs) / (n - 1)


def paired_recovery(quant: dict[str, list], base: dict[str, list]) -> dict | None:
    """Recovery of a quantized model against a baseline from per-item 0/1 correctness.

    quant, base: {task: [0/1 per item]} (items in the same order; a task's first
    min(n_quant, n_base) items are compared; tasks in only one are left out). With T tasks,
    A = mean over tasks of the task's mean accuracy (the table's average), for each side:

      diff     = A_q - A_b, SE = sqrt(sum_t var_t(q - b) / n_t) / T      (paired per item)
      recovery = R = A_q / A_b, SE = sqrt(sum_t var_t(q - R b) / n_t) / T / A_b
                 (delta method: the linearisation of the ratio, paired per item)

    var_t is the sample variance (n - 1) over task t's items. Returns None when no task is
    shared or the baseline average is 0. Per task: {"n", "acc", "base_acc", "diff",
    "diff_se"}.
    """
    names = [t for t in quant if t in base and min(len(quant[t]), len(base[t])) > 0]
    if not names:
        return None
    per_task, aq, ab = {}, [], []
    for t in names:
        n = min(len(quant[t]), len(base[t]))
        q, b = [float(x) for x in quant[t][:n]], [float(x) for x in base[t][:n]]
        d = [x - y for x, y in zip(q, b)]
        per_task[t] = {"n": n, "acc": sum(q) / n, "base_acc": sum(b) / n,
                       "diff": sum(d) / n, "diff_se": (_var(d) / n) ** 0.5}
        aq.append(per_task[t]["acc"])
        ab.append(per_task[t]["base_acc"])
    T = len(names)
    a_q, a_b = sum(aq) / T, sum(ab) / T
    if a_b <= 0:
        return None
    r = a_q / a_b
    var_diff = var_lin = 0.0
    for t in names:
        n = per_task[t]["n"]
        q, b = quant[t][:n], base[t][:n]
        var_diff += _var([x - y for x, y in zip(q, b)]) / n
        var_lin += _var([x - r * y for x, y in zip(q, b)]) / n
    return {"tasks": names, "items": sum(p["n"] for p in per_task.values()),
            "average": a_q, "base_average": a_b,
            "diff": a_q - a_b, "diff_se": var_diff ** 0.5 / T,
            "recovery": r, "recovery_se": var_lin ** 0.5 / T / a_b, "per_task": per_task}


def correctness(rec: dict | None) -> dict[str, list] | None:
    """{task: [0/1 per item]} of a study record's accuracy, or None."""
    acc = (rec or {}).get("accuracy")
    if not acc:
        return None
    return {t: r["correct"] for t, r in acc["per_task"].items()}


def determinism_check(stored: list[float], recomputed: list[float]) -> dict:
    """Per-window NLLs of the stored row against a re-calibration's: the largest absolute
    difference and whether all are bitwise equal."""
    n = min(len(stored), len(recomputed))
    diffs = [abs(a - b) for a, b in zip(stored[:n], recomputed[:n])]
    return {"windows": n, "stored_window_nll": list(stored[:n]),
            "recomputed_window_nll": list(recomputed[:n]),
            "max_abs_diff": max(diffs) if diffs else None,
            "identical": bool(n) and all(a == b for a, b in zip(stored[:n], recomputed[:n]))}



def paired_nll(wa: list[float], wb: list[float]) -> tuple[float, float, int] | None:
    """(mean, standard error, n) of the per-window NLL differences wa - wb; None unless both
    hold the same number (>= 2) of windows."""
    if len(wa) < 2 or len(wa) != len(wb):
        return None
    d = [x - y for x, y in zip(wa, wb)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n), n


def geomean(xs: list[float]) -> float:
    """The geometric mean of positive ratios (layers' error ratios, say)."""
    return math.exp(sum(map(math.log, xs)) / len(xs))


def interval(mean: float, se: float) -> str:
    """'ratio [low, high]': the perplexity ratio exp(mean) and its ±2 SE interval."""
    return f"{math.exp(mean):.4f} [{math.exp(mean - 2 * se):.4f}, {math.exp(mean + 2 * se):.4f}]"


def verdict(mean: float, se: float) -> str:
    """'better' / 'worse' when the ratio's 2-SE interval excludes 1, else 'tie (within 2 SE)'."""
    if mean + 2 * se < 0:
        return "better"
    if mean - 2 * se > 0:
        return "worse"
    return "tie (within 2 SE)"
