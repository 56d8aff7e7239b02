"""Generation with the KV cache on tiny random models: cached logits against the full forward,
left padding, EOS, sampling, compilation counts, and the command line (output, bad input,
Ctrl-C) on a tiny Llama folder and a tiny rtn checkpoint."""

import os
import re
import subprocess
import sys

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batquant_jax import generate as g
from batquant_jax.models import LlamaConfig, LlamaForCausalLM, forward_logits, load_model
from conftest import make_tiny

CFG = LlamaConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=256)
# Qwen3 style: q/k norms and attention biases take the same cached path
CFG_QWEN3 = LlamaConfig(arch="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=1, head_dim=32,
                        attention_bias=True, qk_norm=True, max_position_embeddings=256)
SEQ = [int(t) for t in np.random.default_rng(3).integers(0, 128, size=40)]


def _model(config=CFG):
    m = LlamaForCausalLM(config, nnx.Rngs(0))
    # larger weights than the 0.02 init, so that logits are far from ties
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        var.set_value(var[...] * (1.0 if "norm" in str(path) else 8.0))
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


def full_logits(model, ids):
    """Logits `[T, V]` of one unpadded sequence by the ordinary full forward."""
    return np.asarray(forward_logits(model, np.asarray([ids], np.int32)))[0]


def reference_greedy(model, ids, n, width=64):
    """n greedy tokens, recomputing the full forward over the whole sequence each time (right
    padded to ``width``, which the causal mask keeps out of the real positions)."""
    seq = list(ids)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq)] = seq
        seq.append(int(np.asarray(forward_logits(model, padded))[0, len(seq) - 1].argmax()))
    return seq[len(ids):]


# ----------------------------------------------------------------------------- cache and steps

@pytest.mark.parametrize("config", [CFG, CFG_QWEN3], ids=["llama", "qwen3"])
def test_prefill_logits_equal_full_forward_at_every_position(config):
    """Row k of a left-padded batch holds SEQ[:k+1]; its prefill logits are the full forward's
    at position k (all 16 rows share one padded length, so pad slots of 0..15 are masked)."""
    m = _model(config)
    steps, leaves = g.split_model(m)
    prompts = [SEQ[:k] for k in range(1, 17)]
    tokens, pad = g.left_pad(prompts, pad_id=0)
    assert tokens.shape == (16, 16) and pad.tolist() == list(range(15, -1, -1))
    state, logits = steps.prefill(leaves, m.init_cache(16, 64), jnp.asarray(tokens),
                                  jnp.asarray(pad), jax.random.key(0), jnp.zeros((0,), jnp.int32),
                                  sampling=g.Sampling())
    ref = full_logits(m, SEQ[:16])
    diff = np.abs(np.asarray(logits) - ref).max()
    assert diff <= 1e-5, diff
    assert np.asarray(state.token).tolist() == ref.argmax(-1).tolist()
    assert int(state.cache[0].end) == 16


@pytest.mark.parametrize("config", [CFG, CFG_QWEN3], ids=["llama", "qwen3"])
def test_decode_step_logits_equal_full_forward_at_every_position(config):
    """Two rows of different prompt lengths (one left padded), each fed its own continuation
    one token a step: every step's logits are the unpadded full forward's at that position."""
    m = _model(config)
    steps, leaves = g.split_model(m)
    rows = [SEQ[:30], SEQ[10:35]]
    starts = [5, 2]  # prompt lengths
    tokens, pad = g.left_pad([r[:s] for r, s in zip(rows, starts)], pad_id=0)
    eos, pad_id = jnp.zeros((0,), jnp.int32), jnp.asarray(0, jnp.int32)
    state, logits = steps.prefill(leaves, m.init_cache(2, 64), jnp.asarray(tokens), jnp.asarray(pad),
                                  jax.random.key(0), eos, sampling=g.Sampling())
    refs = [full_logits(m, r) for r in rows]
    worst = max(np.abs(np.asarray(logits)[i] - refs[i][s - 1]).max() for i, s in enumerate(starts))
    for step in range(20):
        forced = [rows[i][starts[i] + step] for i in range(2)]
        state = state._replace(token=jnp.asarray(forced, jnp.int32))
        state, logits = steps.decode(leaves, state, eos, pad_id, sampling=g.Sampling())
        got = np.asarray(logits)
        worst = max(worst, *(np.abs(got[i] - refs[i][starts[i] + step]).max() for i in range(2)))
    assert worst <= 1e-5, worst
    assert int(state.cache[0].end) == 16 + 20


@pytest.mark.parametrize("kv, transform", [("KV4", "block_hadamard"), ("KV8", "none")])
def test_packed_kv_cache_gives_the_full_forward_logits(kv, transform):
    """KV-quantized attention: the cache stores K and V packed (MX codes + E8M0 scales) and the
    decode logits are those of the full forward with the same fake-quantized K and V."""
    from batquant_jax import mx
    from batquant_jax.kvquant import kv_cache_bytes, set_kv_quant
    m = _model(CFG_QWEN3)
    set_kv_quant(m, kv, transform=transform)
    steps, leaves = g.split_model(m)
    tokens, pad = g.left_pad([SEQ[:7]], pad_id=0)
    eos, pad_id = jnp.zeros((0,), jnp.int32), jnp.asarray(0, jnp.int32)
    cache = m.init_cache(1, 64)
    assert isinstance(cache[0].k, mx.MXArray) and isinstance(cache[0].v, mx.MXArray)
    assert sum(c.nbytes for c in cache) == kv_cache_bytes(
        kv, batch=1, seq_len=64, num_kv_heads=1, head_dim=32, num_layers=2)
    state, logits = steps.prefill(leaves, cache, jnp.asarray(tokens), jnp.asarray(pad),
                                  jax.random.key(0), eos, sampling=g.Sampling())
    ref = full_logits(m, SEQ[:27])
    worst = np.abs(np.asarray(logits)[0] - ref[6]).max()
    for step in range(20):
        state = state._replace(token=jnp.asarray([SEQ[7 + step]], jnp.int32))
        state, logits = steps.decode(leaves, state, eos, pad_id, sampling=g.Sampling())
        worst = max(worst, np.abs(np.asarray(logits)[0] - ref[7 + step]).max())
    assert worst <= 1e-4, worst


def test_attention_with_cache_needs_a_mask(model):
    layer = model.layers[0]
    x = jnp.zeros((1, 1, CFG.hidden_size))
    with pytest.raises(ValueError, match="needs a mask"):
        layer.self_attn(x, jnp.zeros((1, 1), jnp.int32), cache=model.init_cache(1, 8)[0])


def test_greedy_equals_recomputing_the_full_forward(model):
    res = g.generate_ids(model, [SEQ[:7]], max_new_tokens=24)
    assert res.tokens == [reference_greedy(model, SEQ[:7], 24)]
    assert res.finished == [False] and res.prompt_lengths == [7]
    assert (res.prefill_tokens, res.decode_tokens) == (7, 23)


def test_left_padded_batch_equals_single_prompts(model):
    prompts = [SEQ[:7], SEQ[3:5], SEQ[:19], [SEQ[0]]]  # padded to 32 (19 > 16)
    batch = g.generate_ids(model, prompts, max_new_tokens=20)
    singles = [g.generate_ids(model, [p], max_new_tokens=20).tokens[0] for p in prompts]
    assert batch.tokens == singles
    assert len({tuple(t) for t in singles}) == 4  # the rows do differ


def test_decode_step_compiles_once(model):
    g._steps.cache_clear()
    seen = []
    res = g.generate_ids(model, [SEQ[:5], SEQ[:9]], max_new_tokens=50,
                         on_step=lambda tok, live: seen.append(tok.copy()))
    assert len(seen) == 50 and [len(t) for t in res.tokens] == [50, 50]
    steps, _ = g.split_model(model)
    assert (steps.prefill._cache_size(), steps.decode._cache_size()) == (1, 1)
    assert res.compile_seconds > 0
    # same shapes again (other prompts of the same padded length, a length of new tokens in the
    # same cache size 128, other values): no compilation
    res = g.generate_ids(model, [SEQ[20:31], SEQ[1:3]], max_new_tokens=60)
    assert (steps.prefill._cache_size(), steps.decode._cache_size()) == (1, 1)
    assert res.compile_seconds == 0.0


def test_eos_stops_each_row(model):
    prompts = [SEQ[:7], SEQ[3:5], SEQ[:19]]
    free = g.generate_ids(model, prompts, max_new_tokens=16).tokens
    eos = free[0][3]  # row 0 stops at its 4th token; the others where (if) they produce it
    expected = [r[:r.index(eos) + 1] if eos in r else r for r in free]
    assert any(eos not in r for r in free)
    live_seen = []
    res = g.generate_ids(model, prompts, max_new_tokens=16, eos_ids=[eos], pad_id=0,
                         on_step=lambda tok, live: live_seen.append(live.copy()))
    assert res.tokens == expected
    assert res.finished == [eos in r for r in free]
    assert [int(v[0]) for v in live_seen[:5]] == [1, 1, 1, 1, 0]
    # every row ends at EOS: the loop stops there
    steps = []
    res = g.generate_ids(model, [SEQ[:7], SEQ[:7]], max_new_tokens=16, eos_ids=[eos],
                         on_step=lambda tok, live: steps.append(tok))
    assert res.tokens == [expected[0]] * 2 and res.finished == [True, True]
    assert len(steps) == len(expected[0]) <= 4


def test_sampling_with_a_seed_is_reproducible(model):
    kw = dict(max_new_tokens=24, sampling=g.Sampling(temperature=1.0, top_p=0.95))
    a = g.generate_ids(model, [SEQ[:7], SEQ[:3]], seed=1, **kw).tokens
    b = g.generate_ids(model, [SEQ[:7], SEQ[:3]], seed=1, **kw).tokens
    c = g.generate_ids(model, [SEQ[:7], SEQ[:3]], seed=2, **kw).tokens
    greedy = g.generate_ids(model, [SEQ[:7], SEQ[:3]], max_new_tokens=24).tokens
    assert a == b
    assert a != c and a != greedy


def test_top_k_1_equals_greedy(model):
    prompts = [SEQ[:7], SEQ[3:5]]
    greedy = g.generate_ids(model, prompts, max_new_tokens=24).tokens
    top1 = g.generate_ids(model, prompts, max_new_tokens=24, seed=5,
                          sampling=g.Sampling(temperature=1.5, top_k=1)).tokens
    assert top1 == greedy


def test_sample_tokens_keeps_top_k_and_top_p_sets():
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)  # ranked: 1, 3, 2, 0
    logits = jnp.asarray(np.log(probs))[None, :]
    keys = jax.random.split(jax.random.key(0), 2000)

    def drawn(sampling):
        out = jax.vmap(lambda k: g.sample_tokens(logits, k, sampling))(keys)
        return sorted(set(np.asarray(out).ravel().tolist()))

    assert drawn(g.Sampling(temperature=1.0)) == [0, 1, 2, 3]
    assert drawn(g.Sampling(temperature=1.0, top_k=2)) == [1, 3]
    assert drawn(g.Sampling(temperature=1.0, top_k=9)) == [0, 1, 2, 3]  # k past the vocabulary
    assert drawn(g.Sampling(temperature=1.0, top_p=0.5)) == [1]
    assert drawn(g.Sampling(temperature=1.0, top_p=0.75)) == [1, 3]
    assert drawn(g.Sampling(temperature=1.0, top_p=0.9)) == [1, 2, 3]
    assert drawn(g.Sampling(temperature=1.0, top_k=2, top_p=0.9)) == [1, 3]
    assert drawn(g.Sampling()) == [1]
    # frequencies follow softmax(logits / T): T = 1 gives about half for token 1
    out = np.asarray(jax.vmap(lambda k: g.sample_tokens(logits, k, g.Sampling(1.0)))(keys))
    assert abs((out == 1).mean() - 0.5) < 0.05


@pytest.mark.parametrize("bad, message", [
    (dict(max_new_tokens=0), "--max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens=250), "prompt of 7 tokens + --max_new_tokens 250 = 257 exceeds the "
                               "model's context of 256 positions"),
    (dict(sampling=g.Sampling(temperature=-1.0)), "--temperature must be a number in [0, "),
    (dict(sampling=g.Sampling(temperature=float("nan"))), "--temperature must be"),
    (dict(sampling=g.Sampling(1.0, top_p=0.0)), "--top_p must be in (0, 1] (1 = off), got 0.0"),
    (dict(sampling=g.Sampling(1.0, top_k=-2)), "--top_k must be >= 0"),
])
def test_bad_requests(model, bad, message):
    kw = dict(max_new_tokens=8) | bad
    with pytest.raises(g.GenerateError, match=re.escape(message)):
        g.generate_ids(model, [SEQ[:7]], **kw)
    with pytest.raises(g.GenerateError, match="prompt 1 is empty"):
        g.generate_ids(model, [SEQ[:3], []], max_new_tokens=4)


class ByteTokenizer:
    """Token i is byte i; decoding replaces an incomplete UTF-8 sequence by U+FFFD."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_partial_characters():
    stream = g.TextStream(ByteTokenizer())
    pieces = [stream.push([b]) for b in "hé€!".encode()]
    assert pieces == ["h", "", "é", "", "", "€", "!"]
    stream.push([0xE2])
    assert stream.flush() == "\ufffd"


# ----------------------------------------------------------------------------- command line

TRACE_MARKS = ("Traceback", "Unable to initialize backend")
WRAPPER = r'''
import os, signal, sys
from absl import app
from batquant_jax import cli, generate
# a process started in the background of a non-interactive shell inherits SIGINT ignored:
# restore Python's own handler, as an interactive run has it
signal.signal(signal.SIGINT, signal.default_int_handler)
after = int(os.environ["SIGINT_AFTER"])
real_push = generate.TextStream.push
def push(self, ids):
    out = real_push(self, ids)
    if len(self.ids) == after:  # Ctrl-C while the next token is on its way
        os.kill(os.getpid(), signal.SIGINT)
    return out
generate.TextStream.push = push
generate.define_flags()  # what `python -m batquant_jax.generate` runs
app.run(generate.main, flags_parser=cli.parse_flags)
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama folder (word-level tokenizer without a chat template), loaded in-process."""
    root = tmp_path_factory.mktemp("gen")
    make_tiny(root / "model")
    loaded = load_model(str(root / "model"))
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"))
    return {"root": root, "folder": root / "model", "loaded": loaded, "env": env}


def run_cli(tiny, args, wrapper_env=None):
    if wrapper_env is None:
        cmd = [sys.executable, "-m", "batquant_jax.generate", *args]
        env = tiny["env"]
    else:
        wrapper = tiny["root"] / "sigint.py"
        wrapper.write_text(WRAPPER, encoding="utf-8")
        cmd = [sys.executable, str(wrapper), *args]
        env = dict(tiny["env"], **wrapper_env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def one_error(stderr):
    lines = stderr.strip().splitlines()
    assert [m for m in TRACE_MARKS if m in stderr] == []
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:]
    return lines[-1]


def test_cli_streams_the_greedy_text(tiny):
    res = run_cli(tiny, [f"--model={tiny['folder']}", "--prompt=the red cat sees",
                         "--max_new_tokens=12"])
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = tiny["loaded"]
    want = g.generate(loaded.model, loaded.tokenizer, "the red cat sees", max_new_tokens=12)
    # ids past the tokenizer's 31 words decode to nothing
    assert len(want.tokens[0]) == 12 and len(want.texts[0].split()) >= 6
    assert res.stdout == want.texts[0] + "\n"
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"generate: prefill 4 tokens in [0-9.]+ s \([0-9.]+ tokens/s\); "
                        r"decode 11 tokens in [0-9.]+ s \([0-9.]+ tokens/s\); compile and "
                        r"warm-up [0-9.]+ s; KV cache [0-9,]+ bytes \(100.0% of float32\); "
                        r"stopped at --max_new_tokens 12", last), last


def test_cli_ctrl_c_keeps_the_text_and_exits_130(tiny):
    res = run_cli(tiny, [f"--model={tiny['folder']}", "--prompt=the red cat sees",
                         "--max_new_tokens=40"],
                  wrapper_env={"SIGINT_AFTER": "5"})
    assert res.returncode == 130, res.stderr[-2000:]
    assert one_error(res.stderr) == "error: interrupted after 5 new tokens"
    loaded = tiny["loaded"]
    want = g.generate(loaded.model, loaded.tokenizer, "the red cat sees", max_new_tokens=5)
    assert len(want.tokens[0]) == 5 and want.texts[0]
    assert res.stdout == want.texts[0] + "\n"


@pytest.mark.parametrize("args, message", [
    (["--checkpoint={root}/nothing_here", "--prompt=the cat"],
     "checkpoint folder {root}/nothing_here does not exist"),
    (["--model={root}/no_model", "--prompt=the cat"],
     "model path {root}/no_model does not exist (give a Hugging Face model folder, a .gguf file "
     "or an alias: smollm2-135m, qwen2.5-coder-1.5b)"),
    (["--prompt="], "--prompt is empty; give the text to continue (got '')"),
    (["--prompt=   "], "--prompt is empty; give the text to continue (got '   ')"),
    (["--prompt=the cat", "--max_new_tokens=0"], "--max_new_tokens must be >= 1, got 0"),
    (["--prompt=the cat", "--max_new_tokens=-3"], "--max_new_tokens must be >= 1, got -3"),
    (["--prompt=the cat", "--max_new_tokens=127"],
     "prompt of 2 tokens + --max_new_tokens 127 = 129 exceeds the model's context of 128 positions"),
    (["--prompt=the cat", "--temperature=-0.5"],
     "--temperature must be a number in [0, 3.40282e+38] (0 = greedy; sampling runs in float32), got -0.5"),
    (["--prompt=the cat", "--temperature=nan"],
     "--temperature must be a number in [0, 3.40282e+38] (0 = greedy; sampling runs in float32), got nan"),
    (["--prompt=the cat", "--temperature=1e308"],
     "--temperature must be a number in [0, 3.40282e+38] (0 = greedy; sampling runs in float32), "
     "got 1e+308"),
    (["--prompt=the cat", "--top_p=0"], "--top_p must be in (0, 1] (1 = off), got 0.0"),
    (["--prompt=the cat", "--top_p=1.5"], "--top_p must be in (0, 1] (1 = off), got 1.5"),
    (["--prompt=the cat", "--top_k=-1"], "--top_k must be >= 0 (0 = off), got -1"),
    (["--prompt=the cat", "--chat", "--max_new_tokens=8"],
     "--chat: this model's tokenizer carries no chat template; drop --chat to continue the "
     "prompt as plain text"),
    (["--prompt=the cat", "extra"], "unexpected arguments ['extra']; all settings are --flags"),
])
def test_cli_bad_input_exits_2(tiny, args, message):
    root = tiny["root"]
    args = [a.format(root=root) for a in args]
    if not any(a.startswith(("--model", "--checkpoint")) for a in args):
        args.insert(0, f"--model={tiny['folder']}")
    res = run_cli(tiny, args)
    assert res.returncode == 2, res.stderr[-2000:]
    assert one_error(res.stderr) == "error: " + message.format(root=root)
    assert res.stdout == ""


@pytest.fixture(scope="module")
def rtn_checkpoint(tiny):
    """The tiny model quantized by rtn (W4A4), as calibrate writes it."""
    from batquant_jax import calibrate
    out = tiny["root"] / "rtn"
    calibrate.run_calibration(
        calibrate.CalibrateConfig(model=str(tiny["folder"]), calib_data=str(tiny["root"] / "text.txt"),
                                  output_dir=str(out), nsamples=2, seqlen=32, method="rtn"),
        log=lambda s: None, out=lambda s: None)
    return out


def test_cli_on_a_quantized_checkpoint(tiny, rtn_checkpoint):
    from batquant_jax.checkpoint import load_quantized
    res = run_cli(tiny, [f"--checkpoint={rtn_checkpoint}", "--prompt=the red cat sees",
                         "--max_new_tokens=10"])
    assert res.returncode == 0, res.stderr[-2000:]
    model, tokenizer, _ = load_quantized(rtn_checkpoint)
    want = g.generate(model, tokenizer, "the red cat sees", max_new_tokens=10)
    fp = g.generate(tiny["loaded"].model, tokenizer, "the red cat sees", max_new_tokens=10)
    assert res.stdout == want.texts[0] + "\n" and len(want.tokens[0]) == 10
    assert want.tokens != fp.tokens  # the quantized model is the one that ran
