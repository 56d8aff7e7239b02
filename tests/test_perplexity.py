"""Tests for the perplexity protocol and the evaluate command, on a bigram stand-in model."""

import functools
import json
import pathlib
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batquant_jax import data, evaluate, perplexity

V = 13
TABLE = np.random.default_rng(0).normal(size=(V, V)).astype(np.float32)  # bigram logits


def bigram_nll(tokens, table=TABLE):
    """tokens int32 [B, T] -> float32 [B, T-1]: -log p(tokens[:, t+1] | tokens[:, t])."""
    logp = jax.nn.log_softmax(jnp.asarray(table), axis=-1)
    return -logp[tokens[:, :-1], tokens[:, 1:]]


def reference_ppl(ids, seqlen, windows):
    """The protocol written out in float64 numpy."""
    logp = TABLE.astype(np.float64) - np.log(np.exp(TABLE.astype(np.float64)).sum(-1, keepdims=True))
    w = ids[: windows * seqlen].reshape(windows, seqlen)
    return math.exp(-logp[w[:, :-1], w[:, 1:]].mean())


IDS = np.random.default_rng(1).integers(0, V, size=5 * 16 + 7).astype(np.int32)


def test_matches_reference_and_drops_remainder():
    res = perplexity.evaluate_perplexity(bigram_nll, IDS, seqlen=16)
    assert (res.windows, res.tokens, res.seqlen) == (5, 80, 16)
    assert res.perplexity == pytest.approx(reference_ppl(IDS, 16, 5), rel=1e-6)
    assert res.nll_mean == pytest.approx(math.log(res.perplexity), rel=1e-12)
    logp = TABLE.astype(np.float64) - np.log(np.exp(TABLE.astype(np.float64)).sum(-1, keepdims=True))
    w = IDS[:80].reshape(5, 16)
    np.testing.assert_allclose(res.window_nll, -logp[w[:, :-1], w[:, 1:]].mean(axis=1), rtol=1e-6)


def test_uniform_model_has_perplexity_vocab_size():
    uniform = functools.partial(bigram_nll, table=np.zeros((V, V), np.float32))
    res = perplexity.evaluate_perplexity(uniform, IDS, seqlen=8)
    assert res.perplexity == pytest.approx(V, rel=1e-6)


def test_padding_batches_compile_once_and_match():
    traces = []

    def counted(tokens):
        traces.append(tokens.shape)
        return bigram_nll(tokens)

    seen = []
    res3 = perplexity.evaluate_perplexity(counted, IDS, seqlen=16, batch_size=3,
                                          progress=lambda p: seen.append(p))
    assert traces == [(3, 16)]  # 5 windows -> batches of 3 + 2 padded to 3: one shape
    res1 = perplexity.evaluate_perplexity(bigram_nll, IDS, seqlen=16, batch_size=1)
    assert res3.windows == 5 and res3.perplexity == pytest.approx(res1.perplexity, rel=1e-6)
    assert len(res3.window_nll) == 5  # the padded row is dropped
    np.testing.assert_allclose(res3.window_nll, res1.window_nll, rtol=1e-6)
    assert [p.windows_done for p in seen] == [3, 5] and seen[-1].windows_total == 5
    assert seen[-1].perplexity == res3.perplexity and seen[-1].eta_s == 0.0
    assert seen[0].line().startswith("perplexity: windows 3/5, running ppl ")


def test_max_tokens_keeps_first_windows():
    res = perplexity.evaluate_perplexity(bigram_nll, IDS, seqlen=16, max_tokens=2 * 16 + 15)
    assert res.windows == 2
    assert res.perplexity == pytest.approx(reference_ppl(IDS, 16, 2), rel=1e-6)
    assert perplexity.cut_windows(IDS, 16, 10**9).shape == (5, 16)


def test_prejitted_partial_used_as_is():
    jitted = jax.jit(lambda table, tokens: bigram_nll(tokens, table))
    fn = functools.partial(jitted, jnp.asarray(TABLE))
    assert perplexity._is_jitted(fn) and not perplexity._is_jitted(bigram_nll)
    res = perplexity.evaluate_perplexity(fn, IDS, seqlen=16, batch_size=2)
    assert res.perplexity == pytest.approx(reference_ppl(IDS, 16, 5), rel=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="the text has 10 tokens, fewer than one window of "
                                         "seqlen 16; need at least 16"):
        perplexity.evaluate_perplexity(bigram_nll, IDS[:10], seqlen=16)
    with pytest.raises(ValueError, match="seqlen must be an integer >= 2"):
        perplexity.evaluate_perplexity(bigram_nll, IDS, seqlen=1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        perplexity.evaluate_perplexity(bigram_nll, IDS, seqlen=16, batch_size=0)
    with pytest.raises(ValueError, match=r"nll_fn returned shape \(1, 16\), expected \(1, 15\)"):
        perplexity.evaluate_perplexity(lambda t: t.astype(jnp.float32), IDS, seqlen=16)


# ----------------------------------------------------------------------------- evaluate


class ByteTokenizer:
    is_fast = True

    def encode(self, text, add_special_tokens=True):
        return [b % V for b in text.encode("utf-8")]


@pytest.fixture
def stand_in(monkeypatch):
    model = evaluate.EvalModel(nll_fn=bigram_nll, tokenizer=ByteTokenizer(),
                               description="bigram", max_positions=64)
    monkeypatch.setattr(evaluate, "get_nll_fn", lambda cfg: model)


def test_run_evaluation_with_stand_in(tmp_path, stand_in):
    text = "The quick brown fox jumps over the lazy dog. " * 20  # 900 bytes
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "res" / "ppl.json"
    cfg = evaluate.EvalConfig(eval_data=str(tmp_path / "t.txt"), seqlen=32, max_tokens=None,
                              batch_size=4, output_json=str(out))
    result = evaluate.run_evaluation(cfg)
    ids = np.array(ByteTokenizer().encode(text), np.int32)
    assert (result["windows"], result["tokens"], result["seqlen"]) == (28, 896, 32)
    assert result["perplexity"] == pytest.approx(reference_ppl(ids, 32, 28), rel=1e-6)
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in ("perplexity", "model", "eval_data")} == {
        "perplexity": result["perplexity"], "model": "smollm2-135m",
        "eval_data": str(tmp_path / "t.txt")}
    short = evaluate.EvalConfig(eval_data=str(tmp_path / "t.txt"), seqlen=32, max_tokens=64)
    assert evaluate.run_evaluation(short)["windows"] == 2


def test_run_evaluation_bad_settings(tmp_path, stand_in):
    (tmp_path / "t.txt").write_text("tiny", encoding="utf-8")
    with pytest.raises(evaluate.ConfigError, match="--seqlen 128 exceeds the model's context of 64"):
        evaluate.run_evaluation(evaluate.EvalConfig(eval_data=str(tmp_path / "t.txt"), seqlen=128))
    with pytest.raises(data.DataError, match="has 4 tokens; one window of --seqlen 8 needs at"):
        evaluate.run_evaluation(evaluate.EvalConfig(eval_data=str(tmp_path / "t.txt"), seqlen=8))
    with pytest.raises(evaluate.ConfigError, match="--max_tokens 4 is less than one window"):
        evaluate.run_evaluation(evaluate.EvalConfig(seqlen=8, max_tokens=4))


@pytest.mark.parametrize("flag,message", [
    ("--seqlen=1", "error: --seqlen must be >= 2"),
    ("--batch_size=0", "error: --batch_size must be >= 1, got 0"),
    ("--eval_data=/nonexistent/x.txt", "error: corpus '/nonexistent/x.txt' not found"),
    ("--seqlen=abc", "error: flag --seqlen=abc: invalid literal"),
])
def test_cli_bad_input_exits_2(flag, message):
    proc = subprocess.run([sys.executable, "-m", "batquant_jax.evaluate", flag],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(message) and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_real_model_few_windows(tmp_path):
    pytest.importorskip("batquant_jax.models")
    try:
        data.prepare()
    except data.DataError as e:
        pytest.skip(str(e))
    out = tmp_path / "ppl.json"
    result = evaluate.run_evaluation(evaluate.EvalConfig(seqlen=512, max_tokens=2048,
                                                         batch_size=2, output_json=str(out)))
    assert (result["windows"], result["tokens"]) == (4, 2048)
    # the reference: transformers + torch eager fp32 on the same 4 windows, computed here
    import importlib.util
    bench = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_eval.py"
    spec = importlib.util.spec_from_file_location("bench_eval", bench)
    bench_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_eval)
    from batquant_jax.models import load_model
    tok = load_model("smollm2-135m").tokenizer
    wins = perplexity.cut_windows(data.tokenize_corpus(data.load_corpus("wiki-eval"), tok), 512, 2048)
    ref = bench_eval.torch_side(wins, batch_size=2)["perplexity"]
    assert result["perplexity"] == pytest.approx(ref, rel=1e-3)  # the issue allows 0.5%
    assert json.loads(out.read_text())["perplexity"] == result["perplexity"]
