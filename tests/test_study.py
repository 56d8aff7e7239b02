"""Tests for the study scripts (experiments/study.py, report.py, plots.py) on synthetic JSON
results, and for the Shakespeare loader of batquant_jax.data."""

import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
import pytest

from batquant_jax import data

from experiments import report, study

BUDGET = study.Budget(nsamples=4, seqlen=64, epochs=1, eval_windows=2)


def _record(row, ppl_wiki, ppl_shk, calib_s=10.0, budget=BUDGET, layers=None, params=0):
    b = row.budget(budget)
    ev = lambda p: {"perplexity": p, "nll_mean": 0.0, "tokens": 1024, "windows": 2,  # noqa: E731
                    "seconds": 2.048}
    return {"row": row.id, "suite": row.suite, "group": row.group, "label": row.label,
            "method": row.method, "setting": row.setting, "hparams": dict(row.hparams),
            "key": study.row_key(row, budget), "budget": dataclasses.asdict(b),
            "budget_text": b.text(row.method != "fp"), "calib_seconds": calib_s,
            "trainable_params": params, "wall_seconds": 60.0, "eval": {"wiki-eval": ev(ppl_wiki), "shakespeare": ev(ppl_shk)},
            "layers": layers or [], "env": {"versions": {"jax": "0.10.2"}, "python": "3.11.7",
                                            "machine": "x86_64, 2 CPU threads",
                                            "jax_backend": "cpu", "commit": "abc1234", "dirty": False}}


def _rows():
    return {r.id: r for r in study.headline_rows() + study.ablation_rows()}


def _write(tmp_path, rec):
    (tmp_path / f"{rec['row']}.json").write_text(json.dumps(rec))


@pytest.fixture
def results_dir(tmp_path):
    rows = _rows()
    _write(tmp_path, _record(rows["headline.fp32.fp"], 20.0, 25.0, calib_s=0.0))
    _write(tmp_path, _record(rows["headline.W4A4KV16.rtn"], 80.0, 125.0, calib_s=12.0))
    layers = [{"index": i, "loss_rtn": 1.0, "loss_init": 0.5, "loss_trained": 0.4,
               "loss_final": f, "steps": 1, "seconds": 1.0, "fell_back": i == 1}
              for i, f in enumerate((0.25, 0.75))]
    _write(tmp_path, _record(rows["headline.W4A4KV16.batquant"], 30.0, 50.0, calib_s=123.4,
                             layers=layers, params=3456))
    _write(tmp_path, dict(_record(rows["ablations.init.init=identity"], 40.0, 75.0, calib_s=99.0,
                                  layers=layers, params=1234567), cpu_seconds=90.0))
    return tmp_path


def test_gap_and_recovery_numbers():
    assert report.gap(30.0, 20.0) == pytest.approx(0.5)
    assert report.recovered(0.5, 3.0) == pytest.approx(5 / 6)
    assert report.recovered(3.0, 3.0) == 0.0


def test_headline_table_from_json(results_dir):
    text = report.render(results_dir, plots_dir=results_dir / "none", out_path=results_dir / "R.md")
    lines = text.splitlines()
    b = "calib 4x64 tok, 1 ep; eval 2x512 tok/text; seed 0"
    assert "| fp | 20.00 | +0.0% | – | 25.00 | +0.0% | – | – | eval 2x512 tok/text; seed 0 |" in lines
    assert f"| rtn | 80.00 | +300.0% | 0.0% | 125.00 | +400.0% | 0.0% | 12 | {b} |" in lines
    # wiki: gap 0.5 of RTN's 3.0 -> 83.3% recovered; shakespeare: gap 1.0 of 4.0 -> 75.0%
    assert f"| batquant | 30.00 | +50.0% | 83.3% | 50.00 | +100.0% | 75.0% | 123 | {b} |" in lines
    assert "| gptq | not run |  |  |  |  |  |  |  |" in lines
    assert "Order on wiki-eval: batquant 30.00 < rtn 80.00." in lines
    assert "Order on shakespeare: batquant 50.00 < rtn 125.00." in lines
    assert sum(line.startswith("| quarot | not run") for line in lines) == 2  # both settings
    assert "- headline: calib 4x64 tok, 1 ep; eval 2x512 tok/text; seed 0" in lines
    assert ("- headline: 3 rows computed, 3.0 min of row wall time in all (model load, "
            "calibration and both evaluations)") in lines
    assert ("- ablations: 1 rows computed, 1.0 min of row wall time in all (model load, "
            "calibration and both evaluations); 1.5 min of process CPU time over the 1 rows "
            "that recorded it") in lines
    assert ("- python 3.11.7, jax 0.10.2; backend cpu, x86_64, 2 CPU threads; code abc1234"
            in lines)


def test_ablation_table_and_pending_rows(results_dir):
    lines = report.render(results_dir, plots_dir=results_dir / "none",
                          out_path=results_dir / "R.md").splitlines()
    b = "calib 4x64 tok, 1 ep; eval 2x512 tok/text; seed 0"
    assert (f"| init=identity | 40.00 | +100.0% | 75.00 | +200.0% | 0.5 | 1/2 | 1,234,567 | 99 | "
            f"{b} |") in lines
    for row in study.ablation_rows():
        if row.id == "ablations.init.init=identity":
            continue
        why = study.pending_reason(row)
        want = f"| {row.label} | pending: {why} |" if why else f"| {row.label} | not run |"
        assert sum(line.startswith(want) for line in lines) == 1, row.id


def test_rows_ids_unique_and_defaults_share_one_key():
    rows = study.headline_rows() + study.ablation_rows()
    assert len({r.id for r in rows}) == len(rows) == 15 + 34
    keys = {study._canon(study.row_key(r, study.SUITE_BUDGETS[r.suite])) for r in rows
            if r.suite == "ablations"}
    # 34 ablation rows; the batquant default appears in 9 groups (block, g1, transform, seed,
    # clip, init, propagate, weights, nsamples) and counts once
    assert len(keys) == 34 - 8
    headline = {study._canon(study.row_key(r, study.SUITE_BUDGETS[r.suite])) for r in rows
                if r.suite == "headline"}
    assert len(keys & headline) == 3  # batquant, brq and mr-gptq at W4A4KV16, seed 0
    seeded = {r.label: r.budget(study.SUITE_BUDGETS["ablations"]).seed for r in rows
              if r.group == "seed"}
    assert seeded == {f"{m} seed={s}": s for m in ("batquant", "brq", "mr-gptq") for s in (0, 1, 2)}
    assert [r.id for r in study.select(rows, "rtn,W4A8KV16")][:3] == [
        "headline.W4A4KV16.rtn", "headline.W4A8KV16.rtn", "headline.W4A8KV16.gptq"]
    assert len(study.select(rows, "g1")) == 4


def test_a_changed_library_default_marks_learned_rows(monkeypatch):
    rows = _rows()
    bq, brq = rows["headline.W4A4KV16.batquant"], rows["headline.W4A4KV16.brq"]
    recs = {r.id: _record(r, 30.0, 50.0) for r in (bq, brq)}
    assert not study.defaults_changed(bq, recs[bq.id])
    import batquant_jax.calibration as calibration
    # as if the library's default learning rate had moved
    new = dataclasses.make_dataclass("CalibConfig", [("lr", float, 0.123)],
                                     bases=(calibration.CalibConfig,), frozen=True)
    monkeypatch.setattr(calibration, "CalibConfig", new)
    assert study.defaults_changed(bq, recs[bq.id])  # learned: the row is marked
    assert not study.defaults_changed(brq, recs[brq.id])  # untrained: lr cannot matter


def test_status_resume_reuse_and_stale(results_dir):
    rows = _rows()
    results = study.load_results(results_dir)
    assert study.row_status(rows["headline.W4A4KV16.rtn"], BUDGET, results) == "done"
    assert study.row_status(rows["headline.W4A4KV16.gptq"], BUDGET, results) == "todo"
    other = dataclasses.replace(BUDGET, nsamples=8)
    assert study.row_status(rows["headline.W4A4KV16.rtn"], other, results) == "stale"
    # the fp row depends on the evaluation budget only
    assert study.row_status(rows["headline.fp32.fp"], other, results) == "done"
    # an ablation row with the key of an existing headline row reuses it
    default = rows["ablations.init.init=hadamard"]
    rec = _record(rows["headline.W4A4KV16.batquant"], 30.0, 50.0)
    assert study.row_key(default, BUDGET) == rec["key"]
    assert study.row_status(default, BUDGET, results) == "reuse"
    steps = study.plan([rows["ablations.g1.g1=8"], default, rows["ablations.g1.g1=2"]],
                       lambda r: BUDGET, results_dir)
    assert [s[2] for s in steps] == ["reuse", "reuse", "todo"]
    assert [s[3] for s in steps][:2] == [0.0, 0.0]


def test_estimate_seconds_formula():
    rows = _rows()
    b = study.Budget(nsamples=16, seqlen=250, epochs=2, eval_windows=8, eval_seqlen=500)
    ev = 2 * 4.0 * 1.0  # two texts x 4k tokens x 1 s per 1k tokens
    assert study.estimate_seconds(rows["headline.fp32.fp"], b, 1.0) == pytest.approx(
        study.LOAD_S + ev)
    assert study.estimate_seconds(rows["headline.W4A4KV16.rtn"], b, 1.0) == pytest.approx(
        study.LOAD_S + 4 * 4.0 + ev)
    assert study.estimate_seconds(rows["headline.W4A4KV16.gptq"], b, 1.0) == pytest.approx(
        study.LOAD_S + 5 * 4.0 + study.GPTQ_FIXED_S + ev)
    bat = 5 + 1 + 2 * study.TRAIN_PASSES
    assert study.estimate_seconds(rows["headline.W4A4KV16.batquant"], b, 1.0) == pytest.approx(
        study.LOAD_S + bat * 4.0 + study.GPTQ_FIXED_S + study.TRAIN_FIXED_S + ev)


def test_perplexity_and_layer_plots(results_dir, tmp_path):
    plots = pytest.importorskip("plots")
    from matplotlib.image import imread

    results = study.load_results(results_dir)
    out = plots.plot_perplexity(results, tmp_path / "ppl.png")
    assert imread(out).shape[:2] == (450, 1200)
    out = plots.plot_layer_losses(results, tmp_path / "layers.png")
    assert imread(out).shape[:2] == (450, 600)  # one setting has headline rows
    assert plots.plot_perplexity({}, tmp_path / "none.png") is None


def test_block_stats_numbers():
    plots = pytest.importorskip("plots")
    import numpy as np

    y = np.zeros((1, 64), np.float32)
    y[0, 0], y[0, 1], y[0, 32], y[0, 33] = 6.0, 0.1, 1.0, 0.5  # 0.1/6*4 rounds to 0 in E2M1
    s = plots.block_stats(y)
    assert s["flushed"] == 0.25
    assert s["log2_amax"].tolist() == [np.log2(np.float32(6.0)), 0.0]
    assert s["rel_err"] == pytest.approx(0.1 / np.sqrt(36 + 0.01 + 1 + 0.25))
    x = np.zeros((4, 25))
    x[2, 3] = -10.0  # RMS = sqrt(100 / 100) = 1
    assert plots.outlier_ratio(x) == 10.0
    assert report._median([3.0, 1.0, 2.0]) == 2.0 and report._median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_clean_play_text_exact():
    raw = "TITLE\r\n\r\nby Someone   \r\n\r\n\r\n\r\nACT I.\n\nLine one,\t\nline two.\n\n\nTHE END\n\n"
    assert data.clean_play_text(raw) == "TITLE\n\nby Someone\n\nACT I.\n\nLine one,\nline two."


def test_shakespeare_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("BATQUANT_CACHE", str(tmp_path))
    try:
        text = data.load_shakespeare()
    except data.DataError as e:  # no registry access
        pytest.skip(str(e))
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == (
        "14fab997fd834e2a0c75b2cbef8f497fe5e841960a06d81eab393e03c4e7dd72")
    assert len(text) == 681910
    assert text.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\n")
    assert text.count("\n\nby William Shakespeare\n\n") == 5
    assert "\r" not in text and "\n\n\n" not in text
    assert list(tmp_path.iterdir()) == [tmp_path / "shakespeare.v1.txt"]
    assert data.load_shakespeare() == text  # the cached copy


def _with_windows(row_id, ppl_wiki, ppl_shk, nll):
    """A record of row ``row_id`` whose wiki-eval result holds the per-window NLLs ``nll``."""
    rec = _record(_rows()[row_id], ppl_wiki, ppl_shk)
    rec["eval"]["wiki-eval"] = dict(rec["eval"]["wiki-eval"], window_nll=nll, windows=len(nll),
                                    tokens=512 * len(nll))
    return rec


def test_paired_comparison_and_claim_table(tmp_path):
    import math
    import statistics

    mine = _with_windows("headline.W4A4KV16.batquant", 30.0, 50.0, [2.0, 2.2, 2.4])
    brq = _with_windows("headline.W4A4KV16.brq", 31.0, 50.0, [2.1, 2.25, 2.6])
    quarot = _with_windows("headline.W4A4KV16.quarot", 29.0, 50.0, [2.0, 2.3, 2.3])
    d = [-0.1, -0.05, -0.2]
    mean, se, n = report.paired(mine, brq, "wiki-eval")
    assert n == 3 and mean == pytest.approx(statistics.mean(d), abs=1e-12)
    assert se == pytest.approx(statistics.stdev(d) / math.sqrt(3), abs=1e-12)
    assert report.verdict(mean, se) == "better"          # -0.1167 + 2 * 0.0441 < 0
    assert report.verdict(0.01, 0.01) == "tie (within 2 SE)"
    assert report.verdict(0.05, 0.01) == "worse"
    assert report.paired(mine, brq, "shakespeare") is None  # no per-window NLLs there
    for rec in (mine, brq, quarot):
        _write(tmp_path, rec)
    lines = report.claim_table(study.load_results(tmp_path), "W4A4KV16")
    lo, hi = math.exp(mean - 2 * se), math.exp(mean + 2 * se)
    assert (f"| brq | block rotation (32) | {math.exp(mean):.4f} [{lo:.4f}, {hi:.4f}] (n=3) | "
            f"better | no per-window NLL |  |") in lines
    # quarot: d = [0, -0.1, 0.1] -> mean 0, a tie
    assert any(l.startswith("| quarot | global rotation | 1.0000 [") and "| tie (within 2 SE) |" in l
               for l in lines)
    assert "| flatquant | global affine | not run |  | not run |  |" in lines


def test_claim_locks_a_key_per_live_process(tmp_path):
    import subprocess

    lock = study.claim(tmp_path, '{"k": 1}')
    assert lock is not None and lock.read_text() == str(os.getpid())
    assert study.claim(tmp_path, '{"k": 1}') is None        # held by a live process (this one)
    other = study.claim(tmp_path, '{"k": 2}')                # another key: its own lock
    assert other is not None and other != lock
    lock.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    other.write_text(dead)                                   # left by a process that exited
    assert study.claim(tmp_path, '{"k": 2}') == other and other.read_text() == str(os.getpid())
    assert [p.name for p in tmp_path.iterdir()] == [other.name]  # no temporary file left


def test_main_runs_reuses_and_skips_rows_locked_elsewhere(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_one(row, budget, texts, estimate):
        calls.append(row.id)
        return _record(row, 30.0, 50.0, budget=budget)

    monkeypatch.setattr(study, "run_one", fake_run_one)
    held = _rows()["headline.W4A8KV16.batquant"]
    lock = study.claim(tmp_path, study._canon(study.row_key(held, study.SUITE_BUDGETS["headline"])))
    only = "headline.W4A4KV16.batquant,headline.W4A8KV16.batquant,transform"
    assert study.main(["--suite=all", f"--only={only}", f"--results_dir={tmp_path}",
                       "--no_report"]) == 0
    assert calls == ["headline.W4A4KV16.batquant", "ablations.transform.block_affine"]
    got = study.load_results(tmp_path)
    assert sorted(got) == ["ablations.transform.block_affine", "ablations.transform.gpk",
                           "headline.W4A4KV16.batquant"]
    assert got["ablations.transform.gpk"]["reused_from"] == "headline.W4A4KV16.batquant"
    out = capsys.readouterr().out
    assert "ROW headline.W4A8KV16.batquant: another study process is computing this; skipped" in out
    assert "study: 1 rows were being computed by other processes (headline.W4A8KV16.batquant)" in out
    assert sorted(p.name for p in tmp_path.glob(".*")) == [lock.name]  # only the held lock left


def test_seed_table_pairs_each_seed(tmp_path):
    import math

    a = _with_windows("ablations.seed.batquant-seed=1", 30.0, 50.0, [2.0, 2.2, 2.4])
    b = _with_windows("ablations.seed.brq-seed=1", 31.0, 52.0, [2.1, 2.25, 2.6])
    for rec in (a, b):
        _write(tmp_path, rec)
    lines = report.seed_table(study.load_results(tmp_path))
    mean, se, _ = report.paired(a, b, "wiki-eval")
    ratio = report.interval(mean, se)
    assert ratio == f"{math.exp(mean):.4f} [{math.exp(mean - 2 * se):.4f}, {math.exp(mean + 2 * se):.4f}]"
    assert f"| 1 | 30.00 | 31.00 | {ratio} | better | 50.00 | 52.00 | – | – |" in lines
    assert "| 0 | – | – | – | not run | – | – | – | not run |" in lines
    assert sum(l.startswith("| 2 |") for l in lines) == 1


def test_a_failing_row_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_one(row, budget, texts, estimate):
        calls.append(row.id)
        if row.label == "block=16":
            raise ValueError("d=576 must be a positive multiple of the block size 16\nmore")
        return _record(row, 30.0, 50.0, budget=budget)

    monkeypatch.setattr(study, "run_one", fake_run_one)
    rc = study.main(["--suite=ablations", "--only=block=16,block=64", f"--results_dir={tmp_path}",
                     "--no_report"])
    assert rc == 1
    assert calls == ["ablations.block.block=16", "ablations.block.block=64"]
    assert sorted(study.load_results(tmp_path)) == ["ablations.block.block=64"]
    out = capsys.readouterr().out
    assert ("ROW ablations.block.block=16: FAILED: ValueError: d=576 must be a positive multiple "
            "of the block size 16") in out
    assert "study: 1 rows failed (ablations.block.block=16); see the tracebacks above" in out
    assert not list(tmp_path.glob(".*.lock"))


# ----------------------------------------------------------------------------- zero-shot accuracy

def _accuracy(correct: dict, limit: int = 4) -> dict:
    per = {t: {"n": len(c), "acc": sum(c) / len(c), "acc_stderr": 0.25, "correct": list(c)}
           for t, c in correct.items()}
    accs = [p["acc"] for p in per.values()]
    return {"tasks": list(correct), "limit": limit, "per_task": per,
            "average": {"acc": sum(accs) / len(accs), "tasks": len(accs)},
            "items": sum(len(c) for c in correct.values()), "seconds": 1.0}


QUANT = {"a": [1, 1, 0, 0], "b": [1, 0], "c": [1]}   # "c": not in the baseline, left out
BASE = {"a": [1, 1, 1, 0], "b": [1, 1, 0]}           # "b": only its first 2 items are paired


def test_paired_recovery_numbers():
    import math

    pr = study.paired_recovery(QUANT, BASE)
    # a: q 1/2, f 3/4, d = [0, 0, -1, 0]: var 1/4 -> SE sqrt(1/16) = 1/4
    # b: q 1/2, f 1,   d = [0, -1]:       var 1/2 -> SE sqrt(1/4)  = 1/2
    assert pr["tasks"] == ["a", "b"] and pr["items"] == 6
    assert pr["per_task"]["a"] == {"n": 4, "acc": 0.5, "base_acc": 0.75, "diff": -0.25,
                                   "diff_se": 0.25}
    assert pr["per_task"]["b"] == {"n": 2, "acc": 0.5, "base_acc": 1.0, "diff": -0.5,
                                   "diff_se": 0.5}
    assert pr["average"] == 0.5 and pr["base_average"] == 0.875 and pr["diff"] == -0.375
    assert pr["diff_se"] == pytest.approx(math.sqrt(1 / 16 + 1 / 4) / 2, abs=1e-15)
    assert pr["recovery"] == pytest.approx(4 / 7, abs=1e-15)
    # q - R f with R = 4/7: a -> [3, 3, -4, 0] / 7, var 11/49; b -> [3, -4] / 7, var 1/2;
    # sqrt(11/49/4 + 1/2/2) / 2 / (7/8) = 4 sqrt(15) / 49
    assert pr["recovery_se"] == pytest.approx(4 * math.sqrt(15) / 49, abs=1e-15)
    same = study.paired_recovery(BASE, BASE)
    assert same["recovery"] == 1.0 and same["recovery_se"] == 0.0 and same["diff_se"] == 0.0
    assert study.paired_recovery({"x": [1]}, BASE) is None
    assert study.paired_recovery({"a": [1, 1]}, {"a": [0, 0]}) is None  # baseline average 0


def test_determinism_check_and_has_accuracy():
    chk = study.determinism_check([2.5, 3.25, 9.0], [2.5, 3.0])
    assert chk == {"windows": 2, "stored_window_nll": [2.5, 3.25],
                   "recomputed_window_nll": [2.5, 3.0], "max_abs_diff": 0.25, "identical": False}
    assert study.determinism_check([1.0, 2.0], [1.0, 2.0])["identical"] is True
    assert study.determinism_check([], [1.0])["identical"] is False
    spec = study.AccuracySpec(("a", "b"), 4)
    assert study.has_accuracy({"accuracy": _accuracy({"a": [1], "b": [0]})}, spec)
    assert not study.has_accuracy({"accuracy": _accuracy({"a": [1], "b": [0]}, limit=5)}, spec)
    assert not study.has_accuracy({"accuracy": _accuracy({"a": [1]})}, spec)
    assert not study.has_accuracy({}, spec) and not study.has_accuracy(None, spec)


def test_accuracy_table_recovery_and_plot(results_dir, tmp_path):
    from experiments import plots

    for row_id, correct in (("headline.fp32.fp", BASE), ("headline.W4A4KV16.rtn", QUANT)):
        path = results_dir / f"{row_id}.json"
        rec = json.loads(path.read_text())
        rec["accuracy"] = _accuracy(correct)
        path.write_text(json.dumps(rec))
    results = study.load_results(results_dir)
    lines = report.accuracy_table(results, "W4A4KV16")
    assert lines[0] == ("| method | wiki-eval ppl | a acc % | b acc % | average acc % | Δ vs FP (pp ± SE) | "
                        "recovery % (± SE) | items |")
    assert "| fp | 20.00 | 75.0 ± 25.0 | 66.7 ± 25.0 | 70.8 | – | 100 (baseline) | 7 |" in lines
    assert ("| rtn | 80.00 | 50.0 (-25.0 ± 25.0) | 50.0 (-50.0 ± 50.0) | 50.0 | -37.5 ± 28.0 | "
            "57.1 ± 31.6 | 6 |") in lines
    assert "| batquant | 30.00 | no accuracy yet |  |  |  |  |  |" in lines
    assert report.accuracy_ranking(results, "W4A4KV16") == "rtn 57.1%"
    assert report.accuracy_ranking(results, "W4A8KV16") is None
    text = report.render(results_dir, tmp_path / "plots", tmp_path / "RESULTS.md")
    assert "## Zero-shot accuracy" in text and "Order by recovery: rtn 57.1%." in text
    assert "Rows measured before" not in text  # no record came from an accuracy-only pass
    out = plots.plot_accuracy(results, tmp_path / "accuracy.png")
    assert out is not None and out.stat().st_size > 10_000
    del results["headline.fp32.fp"]
    assert plots.plot_accuracy(results, tmp_path / "none.png") is None


def test_plan_marks_rows_without_accuracy(results_dir):
    spec = study.AccuracySpec(("a",), 2)
    rows = [r for r in study.headline_rows() if r.id in
            ("headline.fp32.fp", "headline.W4A4KV16.rtn", "headline.W4A4KV16.gptq")]
    steps = {r.id: (status, est) for r, _, status, est in
             study.plan(rows, lambda r: BUDGET, results_dir, spec)}
    # rate: 2.048 s / 1024 tokens = 2 s per 1k tokens; 2 check windows of 512 tokens;
    # 2 items x 3 s; rtn's stored calibration took 12 s
    assert steps["headline.W4A4KV16.rtn"] == ("accuracy",
                                             pytest.approx(8.0 + 12.0 + 2.048 + 6.0, abs=1e-9))
    assert steps["headline.fp32.fp"][0] == "accuracy"
    gptq = study.estimate_seconds(rows[2], BUDGET, 2.0) + 6.0
    assert steps["headline.W4A4KV16.gptq"] == ("todo", pytest.approx(gptq, abs=1e-9))
    assert [s for _, _, s, _ in study.plan(rows, lambda r: BUDGET, results_dir)] == \
        ["done", "done", "todo"]


def test_accuracy_only_pass_keeps_key_and_perplexity(results_dir, monkeypatch, capsys):
    from experiments import compare

    seen = []

    def fake_run_row(model, windows, method, setting, evals, *, epochs, seed, hparams,
                     eval_seqlen, eval_max_tokens, measure=None):
        seen.append((method, setting, windows.shape if windows is not None else None, epochs,
                     seed, list(evals), eval_max_tokens))
        return {"calib_seconds": 5.0, "layers": [], "trainable_params": 0,
                "eval": {"wiki-eval": {"window_nll": [2.0, 2.5]}},
                "measured": _accuracy({"a": [1, 0]}, limit=2)}

    class FakeTexts:
        def windows(self, b):
            import numpy as np
            return np.zeros((b.nsamples, b.seqlen), np.int32)

        def ids(self, name):
            return name

    monkeypatch.setattr(compare, "run_row", fake_run_row)
    path = results_dir / "headline.W4A4KV16.rtn.json"
    before = json.loads(path.read_text())
    before["eval"]["wiki-eval"]["window_nll"] = [2.0, 2.75]
    path.write_text(json.dumps(before))
    row = _rows()["headline.W4A4KV16.rtn"]
    taskset = study.TaskSet(study.AccuracySpec(("a",), 2))
    key = study._canon(study.row_key(row, BUDGET))
    study._run_step(row, BUDGET, 10.0, key, results_dir, FakeTexts(), 10.0, 0.0, taskset)
    after = json.loads(path.read_text())
    assert seen == [("rtn", "W4A4KV16", (4, 64), 1, 0, ["wiki-eval"], 1024)]
    assert {k: v for k, v in after.items() if k not in ("accuracy", "accuracy_check")} == before
    assert after["accuracy"]["per_task"]["a"]["correct"] == [1, 0]
    chk = after["accuracy_check"]
    assert (chk["windows"], chk["max_abs_diff"], chk["identical"]) == (2, 0.25, False)
    assert chk["calib_seconds"] == 5.0
    assert "check: first 2 wiki-eval windows DIFFER (max abs NLL difference 0.25)" in \
        capsys.readouterr().out
    seen.clear()  # the same spec again: nothing to do
    study._run_step(row, BUDGET, 10.0, key, results_dir, FakeTexts(), 10.0, 0.0, taskset)
    assert seen == []


def test_pad_predictions_pads_slots_to_the_row_length_and_drops_them():
    import numpy as np

    seen = []

    def fake(tokens, positions, segments, pred_index, targets):
        seen.append(pred_index.shape)
        return pred_index * 10 + targets, targets == 7

    fn = study.pad_predictions(fake)
    tok = np.zeros((2, 8), np.int32)
    pidx = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    tgt = np.array([[7, 0, 7], [1, 7, 2]], np.int32)
    lp, greedy = fn(tok, tok, tok, pidx, tgt)
    assert seen == [(2, 8)]
    assert lp.tolist() == [[17, 20, 37], [41, 57, 62]]
    assert greedy.tolist() == [[True, False, True], [False, True, False]]
    wide = np.zeros((2, 16), np.int32)  # more slots than row positions: left as they are
    fn(tok, tok, tok, wide, wide)
    assert seen[-1] == (2, 16)


def test_accuracy_checks_lines():
    rec = {"env": {"commit": "aaa1111"},
           "accuracy_check": {"identical": False, "max_abs_diff": 0.0574, "windows": 2,
                              "env": {"commit": "bbb2222"}}}
    same = {"env": {"commit": "ccc3333"},
            "accuracy_check": {"identical": True, "max_abs_diff": 0.0, "windows": 2,
                               "env": {"commit": "ccc3333"}}}
    lines = report.accuracy_checks({"headline.W4A4KV16.gptq": rec, "headline.W4A8KV16.rtn": same})
    assert lines == ["gptq W4A4KV16: max abs NLL difference 0.057 (stored at code aaa1111, "
                     "again at bbb2222)",
                     "rtn W4A8KV16: bitwise identical (stored at code ccc3333, again at ccc3333)"]


def test_compare_evals_pairs_windows(tmp_path, capsys):
    from experiments import compare_evals
    a = {"perplexity": 10.0, "windows": 3, "seqlen": 8, "eval_data": "t",
         "window_nll": [2.0, 2.2, 2.4]}
    b = dict(a, perplexity=12.0, window_nll=[2.1, 2.35, 2.45])
    for name, rec in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    assert compare_evals.main([f"--files=a:{tmp_path}/a.json,b:{tmp_path}/b.json",
                               "--pairs=a/b"]) == 0
    out = capsys.readouterr().out.splitlines()
    # differences -0.1, -0.15, -0.05: mean -0.1, SE 0.0289 -> ratio exp(-0.1) = 0.9048
    assert out[2] == ("a/b: ratio 0.9048 [0.8541, 0.9586] over 3 windows: a better "
                      "(per-window NLL difference -0.1000 ± 0.0289)")


def test_token_diff_splits_the_difference():
    from experiments.token_diff import split_difference
    # 2 windows x 4 targets; counts of ids 0..4 in the calibration text
    a = np.zeros((2, 4))
    b = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    targets = np.array([[0, 1, 2, 3], [4, 4, 4, 0]])
    counts = np.array([0, 5, 50, 500, 7])
    s = split_difference(a, b, counts[targets])
    assert s["tokens"] == 8 and s["mean_diff"] == 0.5 and s["windows_b_worse"] == 1.0
    by_count = {r["bin"]: (r["tokens"], r["share_of_total"]) for r in s["by_count"]}
    # both differences fall on id 0, never seen in the calibration text
    assert by_count == {"0": (2, 1.0), "1-9": (4, 0.0), "10-99": (1, 0.0), ">=100": (1, 0.0)}
    assert [r["tokens"] for r in s["by_position"]] == [8, 0, 0]
    assert s["top1pct_share_of_total"] == 0.75 and s["top10pct_share_of_total"] == 0.75


def test_second_model_seed_table(tmp_path):
    from experiments.second_model import section
    def ev(name, text, nll):
        (tmp_path / f"ev-{name}-{text}.json").write_text(json.dumps(
            {"perplexity": float(np.exp(np.mean(nll))), "window_nll": nll}))
    for t in ("wiki-eval", "shakespeare"):
        ev("brq", t, [2.0, 2.2, 2.4])
        ev("batquant", t, [2.1, 2.35, 2.45])  # worse: +0.1 mean
        ev("brq-s1", t, [2.0, 2.2, 2.4])
        ev("batquant-s1", t, [1.9, 2.05, 2.35])  # better: -0.1, SE 0.0289
    ev("brq-s2", "wiki-eval", [2.0, 2.2, 2.4])  # seed 2 has no batquant row yet: left out
    (tmp_path / "calibrate-brq-s2.txt").write_text(  # per-layer seconds, summed
        "layer token_mse rtn init trained final steps seconds\n"
        "1 0.1 0.1 0.1 0.1 16 60.0\n2 0.1 0.1 0.1 0.1 16 90.0\n")
    lines = section(tmp_path)
    assert [x.rsplit("|", 2)[1] for x in lines if x.startswith("| brq-s2 |")] == [" 2 min "]
    (tmp_path / "calibrate-batquant-s2.txt").write_text(
        (tmp_path / "calibrate-brq-s2.txt").read_text())  # a row that ran alone: marked
    ev("batquant-s2", "wiki-eval", [2.0, 2.2, 2.4])
    assert [x.rsplit("|", 2)[1] for x in section(tmp_path)
            if x.startswith("| batquant-s2 |")] == [" 2 min* "]
    (tmp_path / "ev-batquant-s2-wiki-eval.json").unlink()
    i = lines.index("| seed (batquant / brq) | wiki-eval | shakespeare |")
    assert lines[i + 2:i + 4] == [
        "| 0 | 1.1052 [1.0432, 1.1709] worse | 1.1052 [1.0432, 1.1709] worse |",
        "| 1 | 0.9048 [0.8541, 0.9586] better | 0.9048 [0.8541, 0.9586] better |"]
    assert lines[i + 5] == ("Seeds meeting the goal (ratio <= 0.97, interval below 1): "
                            "wiki-eval 1 of 2, shakespeare 1 of 2.")
    for p in tmp_path.glob("*-s1-*.json"):
        p.unlink()
    assert "| seed (batquant / brq) | wiki-eval | shakespeare |" not in section(tmp_path)  # seed 0
    for seed, nll in (("", [2.05, 2.2, 2.4]), ("-s2", [2.0, 2.15, 2.4])):
        ev("batquant-ones" + seed, "wiki-eval", nll)
    lines = section(tmp_path)  # the ones start's seeds: 0 (vs brq) and 2 (vs brq-s2)
    i = lines.index("| seed (batquant-ones / brq) | wiki-eval | shakespeare |")
    assert "(`--scale_init=ones`) / BRQ" in lines[i - 2] and lines[i + 2:i + 4] == [
        "| 0 | 1.0168 [0.9835, 1.0513] tie | - |", "| 2 | 0.9835 [0.9512, 1.0168] tie | - |"]
    assert "| seed (batquant-ones / batquant) | wiki-eval | shakespeare |" not in lines  # no s2
    ev("batquant-s2", "wiki-eval", [2.1, 2.15, 2.4])
    lines = section(tmp_path)
    i = lines.index("| seed (batquant-ones / batquant) | wiki-eval | shakespeare |")
    assert lines[i + 2:i + 4] == [
        "| 0 | 0.9200 [0.8607, 0.9835] better | - |", "| 2 | 0.9672 [0.9048, 1.0339] tie | - |"]
    # the goal line goes with the two tables against brq, not with ones / default start
    assert sum(x.startswith("Seeds meeting") for x in lines) == 2
    ev("brq-mix", "wiki-eval", [2.0, 2.2, 2.4])
    assert not any("plus Python source (`--calib" in x for x in section(tmp_path))  # one row alone
    ev("batquant-mix", "wiki-eval", [1.9, 2.05, 2.35])
    lines = section(tmp_path)
    i = next(i for i, x in enumerate(lines) if "both calibrated on wiki-calib plus Python" in x)
    assert lines[i + 2:i + 5] == ["| batquant-mix / | wiki-eval | shakespeare |", "|---|---|---|",
                                  "| brq-mix | 0.9048 [0.8541, 0.9586] better | - |"]
    for row, nll in (("brq", [2.0, 2.2, 2.4]), ("batquant", [2.1, 2.35, 2.45])):
        (tmp_path / f"asyncio-{row}.json").write_text(json.dumps(
            {"perplexity": float(np.exp(np.mean(nll))), "window_nll": nll}))
    lines = section(tmp_path)
    i = lines.index("| checkpoint | ppl | vs brq |")
    assert "Another register" in lines[i - 2] and lines[i + 2:i + 4] == [
        "| batquant | 9.9742 | 1.1052 [1.0432, 1.1709] worse |", "| brq | 9.0250 | - |"]


def test_second_model_probe_table(tmp_path):
    from experiments.second_model import probe_lines
    def run(method, errs, **kw):
        return {"method": method, "other_text": "/x/asyncio", "probe_layers": [2, 9],
                "nsamples": 32, "seqlen": 256, "holdout": 8, **kw,
                "layers": [{k: {"rel_err": e} for k, e in zip(("train", "held", "other"), row)}
                           for row in errs]}
    (tmp_path / "brq.json").write_text(json.dumps(run("brq", [(0.1, 0.1, 0.1), (0.2, 0.2, 0.2)])))
    assert probe_lines(tmp_path) == []  # no batquant run yet
    (tmp_path / "bq.json").write_text(json.dumps(run("batquant", [(0.08, 0.09, 0.11),
                                                                  (0.18, 0.18, 0.22)])))
    lines = probe_lines(tmp_path)
    assert "teacher-forced, 32 x 256 calibration tokens" in lines[0]
    assert "on 8 held-back wiki-calib windows and on 8 windows of another register (`asyncio`;" \
        in lines[0]
    assert lines[-4:] == ["| wiki-calib | calibration (trained on) | 0.800 | 0.900 | 0.849 |",
                          "| wiki-calib | held-back wiki-calib | 0.900 | 0.900 | 0.900 |",
                          "| wiki-calib | other text (asyncio) | 1.100 | 1.100 | 1.100 |", ""]
    # variants: a batquant hyperparameter against the same brq; a mixed text against its own brq
    mixed = "wiki-calib,/usr/lib/python3.11"
    (tmp_path / "a-anchor.json").write_text(json.dumps(run(
        "batquant", [(0.09, 0.09, 0.1), (0.2, 0.2, 0.2)], hparams={"anchor": 25.0})))
    (tmp_path / "bq-mixed.json").write_text(json.dumps(run(
        "batquant", [(0.05, 0.05, 0.05), (0.1, 0.1, 0.1)], calib_data=mixed)))
    assert probe_lines(tmp_path)[-7:-4] == lines[-4:-1]  # no brq on the mixed text: left out
    (tmp_path / "brq-mixed.json").write_text(json.dumps(run(
        "brq", [(0.1, 0.1, 0.1), (0.1, 0.1, 0.1)], calib_data=mixed)))
    got = probe_lines(tmp_path)
    assert got[-10:-7] == lines[-4:-1]
    assert got[0].endswith(" Calibrated on `wiki-calib + python3.11`, the `asyncio` windows are "
                           "unseen text, though of a register such a source may share.")
    assert got[-6] == ("| wiki-calib + python3.11 | held-back wiki-calib | 0.500 | 1.000 | "
                       "0.707 |")
    assert got[-4] == "| wiki-calib, anchor 25 | calibration (trained on) | 0.900 | 1.000 | 0.949 |"


def test_bench_profile_groups_thunks(tmp_path):
    import jax
    import jax.numpy as jnp
    from experiments.bench_calib_step import _kind, profile
    assert [_kind(n) for n in ("ynn_fusion.177", "dot.28", "transpose_copy_fusion.22",
                               "and_reduce_fusion.2", "multiply_select_fusion", "while")] == [
        "products (dot / YNNPACK fusions)", "products (dot / YNNPACK fusions)",
        "transposes and copies", "reductions", "elementwise fusions", "other"]
    a = jnp.ones((256, 256))
    f = jax.jit(lambda a: jnp.exp(a @ a.T).sum())
    groups = dict(profile(lambda: f(a), 2, str(tmp_path)))
    assert groups["products (dot / YNNPACK fusions)"] > 0
    assert next(tmp_path.rglob("*.trace.json.gz")).stat().st_size > 0


def test_rss_trace_phases_fold_samples_between_lines():
    from experiments.rss_trace import Phase, phases
    m = 2 ** 20
    events = [("sample", 0.1, 100 * m, 100 * m), ("sample", 0.2, 300 * m, 300 * m),
              ("line", 0.3, "loaded"),
              ("sample", 0.4, 250 * m, 300 * m),  # below the mark: no new peak
              ("line", 0.5, "step"),
              ("sample", 0.6, 200 * m, 500 * m),  # a spike between samples, seen by VmHWM
              ("sample", 0.7, 150 * m, 500 * m)]
    assert list(phases(events)) == [Phase(0.3, 300 * m, 300 * m, "loaded"),
                              Phase(0.5, 250 * m, None, "step"),
                              Phase(0.7, 200 * m, 500 * m, "(exit)")]


def test_rss_trace_sees_an_allocation_in_its_phase(capsys):
    from experiments import rss_trace
    child = ("import sys, time\n"
             "print('start', file=sys.stderr, flush=True); time.sleep(0.3)\n"
             "b = bytearray(400 * 2 ** 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.3)\n"
             "print('allocated', file=sys.stderr, flush=True); del b; time.sleep(0.3)\n"
             "print('freed', file=sys.stderr, flush=True); time.sleep(60)\n")
    got = list(rss_trace.phases(rss_trace.trace([sys.executable, "-c", child], 0.02,
                                                stop_after="freed")))
    assert [p.line for p in got][:3] == ["start", "allocated", "freed"]
    start, allocated, freed = got[:3]
    grew = (allocated.new_hwm - start.rss_max) / 2 ** 20
    assert 395 <= grew <= 440  # the 400 MiB buffer, in the phase that allocated it
    assert freed.new_hwm is None and freed.rss_max <= allocated.rss_max
    assert got[-1].seconds < 30  # stopped after "freed", not after the child's sleep


def test_bench_step_memory_counts_every_argument():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from batquant_jax.models import LlamaConfig, LlamaForCausalLM
    from experiments.bench_calib_step import _training_state, step_memory
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    fp_layer = LlamaForCausalLM(cfg, nnx.Rngs(0)).layers[0]
    x = jax.random.normal(jax.random.key(0), (2, 32, 64))
    got = step_memory(fp_layer, x, x, {}, 2)
    _, layer, split, opt = _training_state(fp_layer, {}, 2, 64)
    nbytes = lambda *t: sum(a.nbytes for a in jax.tree.leaves(t))  # noqa: E731
    gain = jnp.ones((64,), jnp.float32)
    assert got["optimizer step"][0] == nbytes(split[1:], opt, x, x, gain)
    assert got["quantized forward"][0] == nbytes(nnx.split(layer)[1], x)
    assert got["quantized forward"][1] == x.nbytes
    assert got["optimizer step"][2] > 0
