"""Zero-shot scoring: lm-eval's token split, the packed forward against one sequence at a time,
the metrics, the task files and every bad input of the command line."""

import gzip
import json
import math
import os
import subprocess
import sys

import flax.nnx as nnx
import numpy as np
import pytest

from batquant_jax import accuracy, tasks, zeroshot
from batquant_jax.models import forward_logits
from batquant_jax.models.llama import LlamaConfig, LlamaForCausalLM


class ToyTokenizer:
    """Greedy longest match over a small vocabulary with multi-character pieces, so that
    encode(a + b) differs from encode(a) + encode(b) at some boundaries (like BPE)."""

    PIECES = ["Answer:", "Question:", " the", " yes", " no", "ab", "th", "ing", " a", " b", " c"]
    bos_token_id = None
    eos_token_id = 1

    def __init__(self):
        chars = [chr(c) for c in range(32, 127)] + ["\n"]
        self.vocab = {p: i + 2 for i, p in enumerate(chars + self.PIECES)}
        self.longest = max(len(p) for p in self.vocab)

    def encode(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            for n in range(min(self.longest, len(text) - i), 0, -1):
                if text[i:i + n] in self.vocab:
                    ids.append(self.vocab[text[i:i + n]])
                    i += n
                    break
            else:
                raise ValueError(f"no piece for {text[i]!r}")
        return ids


TOK = ToyTokenizer()
CFG = LlamaConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)


@pytest.fixture(scope="module")
def model():
    m = LlamaForCausalLM(CFG, nnx.Rngs(0))
    # larger weights than the 0.02 init so that log-likelihoods differ clearly between choices
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        var.set_value(var[...] * (1.0 if "norm" in str(path) else 8.0))
    return m


def reference_loglik(model, ctx, cont):
    """lm-eval's computation, one request at a time: input (ctx + cont)[:-1], the last len(cont)
    outputs score the continuation."""
    inp = np.asarray(ctx + cont, np.int32)[None, :-1]
    x = np.asarray(forward_logits(model, inp), np.float64)[0]
    m = x.max(-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    rows = logp[len(ctx) - 1:]
    ll = float(sum(rows[j, t] for j, t in enumerate(cont)))
    greedy = bool(all(rows[j].argmax() == t for j, t in enumerate(cont)))
    return ll, greedy


# ---------------------------------------------------------------- tokens

def test_encode_pair_follows_lm_eval_split():
    # continuation ids are the ids of the whole string after the context's ids
    ctx, cont = zeroshot.encode_pair(TOK, "Question: a", " b")
    assert ctx == TOK.encode("Question: a") and cont == TOK.encode(" b")
    # trailing spaces move to the continuation
    ctx, cont = zeroshot.encode_pair(TOK, "x y ", "the")
    assert ctx == TOK.encode("x y") and cont == TOK.encode(" the")
    # a merge across the boundary: whole = encode("xa" + "b") = [x, ab]; ctx = [x, a]
    ctx, cont = zeroshot.encode_pair(TOK, "xa", "b c")
    assert ctx == TOK.encode("xa") and cont == TOK.encode("xab c")[len(ctx):]
    assert cont == [TOK.vocab[" c"]]  # "ab" swallowed the "a": only " c" is left to score
    # an empty context is the EOS token when there is no BOS
    assert zeroshot.encode_pair(TOK, "", " yes") == ([1], [TOK.vocab[" yes"]])


# ---------------------------------------------------------------- packing and scoring

def test_pack_shares_context_and_drops_last_branch_token():
    enc = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10]), ([5, 6, 7], [11, 12, 13])]
    rows = zeroshot.pack_requests(enc, max_len=64)
    assert len(rows) == 1
    r = rows[0]
    assert r.tokens == [5, 6, 7, 8, 11, 12]
    assert r.positions == [0, 1, 2, 3, 3, 4]
    assert r.segments == [0, 0, 0, 1, 2, 2]  # a one-token branch has no input: no segment
    assert r.slots == [(0, 2, 8), (0, 3, 9), (1, 2, 10), (2, 2, 11), (2, 4, 12), (2, 5, 13)]


def test_pack_truncates_on_the_left_like_lm_eval():
    rows = zeroshot.pack_requests([(list(range(10, 20)), [30, 31, 32])], max_len=8)
    # lm-eval input: (ctx + cont)[-(8 + 1):][:-1] = ctx[4:] + [30, 31]
    assert rows[0].tokens == list(range(14, 20)) + [30, 31]
    assert rows[0].positions == list(range(8))
    with pytest.raises(ValueError, match="exceeds the model's context of 8"):
        zeroshot.pack_requests([([1], list(range(9)))], max_len=8)


def test_packed_scores_match_one_sequence_at_a_time(model):
    rng = np.random.default_rng(0)
    enc = []
    for _ in range(9):
        ctx = rng.integers(2, 128, size=rng.integers(1, 40)).tolist()
        for _ in range(rng.integers(1, 5)):
            enc.append((ctx, rng.integers(2, 128, size=rng.integers(1, 12)).tolist()))
    enc.append((rng.integers(2, 128, size=300).tolist(), [3, 4]))  # truncated to 256 on the left
    sc = zeroshot.score_requests(zeroshot.make_score_fn(model), enc, max_len=256, token_budget=256)
    ref = [reference_loglik(model, c[-(256 + 1 - len(x)):] if len(c) + len(x) > 257 else c, x)
           for c, x in enc]
    np.testing.assert_allclose(sc.loglik, [r[0] for r in ref], rtol=1e-4, atol=1e-4)
    assert list(sc.greedy) == [r[1] for r in ref]
    assert sc.rows < len(enc)  # contexts were shared
    assert all(b * t <= 256 for b, t, _ in sc.shapes)
    assert min(abs(a - b) for a, b in zip(sc.loglik[:-1], sc.loglik[1:])) > 1e-3  # not flat


def test_greedy_flag_on_the_model_own_argmax(model):
    ctx = [5, 6, 7, 8]
    logits = np.asarray(forward_logits(model, np.asarray([ctx], np.int32)))[0, -1]
    best = int(logits.argmax())
    worst = int(logits.argmin())
    sc = zeroshot.score_requests(zeroshot.make_score_fn(model), [(ctx, [best]), (ctx, [worst])],
                                 max_len=64)
    assert list(sc.greedy) == [True, False]
    assert sc.loglik[0] > sc.loglik[1]


# ---------------------------------------------------------------- metrics

def _task(items, kind="multiple_choice", metrics=("acc", "acc_norm")):
    return tasks.Task("t", kind, tuple(items), metrics, "test")


def test_metrics_acc_norm_by_characters_and_ties_to_first():
    items = [tasks._mc("q", ["aaaa", "b"], 0), tasks._mc("q", ["x", "y", "z"], 2),
             tasks._mc("q", ["é", "ee"], 1)]
    lls = np.array([-4.0, -2.0,        # acc: 1 (wrong); norm: -1.0 vs -2.0 -> 0 (right)
                    -1.0, -1.0, -1.0,  # tie -> index 0 (wrong) for both
                    -1.0, -1.9])       # norm by characters: -1.0 vs -0.95 -> 1 (right);
    #                                    by bytes it would be -0.5 vs -0.95 -> 0
    m = zeroshot.task_metrics(_task(items), lls, np.zeros(7, bool))
    assert m["per_item"]["pred"] == [1, 0, 0]
    assert m["acc"] == 0.0 and m["acc_norm"] == pytest.approx(2 / 3)
    assert m["acc_norm_stderr"] == pytest.approx(np.std([1, 0, 1], ddof=1) / math.sqrt(3))
    assert m["acc_stderr"] == 0.0 and m["n"] == 3


def test_last_word_metrics():
    items = [tasks._lambada({"query": "a b", "choices": ["c"]}) for _ in range(4)]
    assert items[0].requests == (("a b", " c"),)
    m = zeroshot.task_metrics(_task(items, "last_word", ("acc", "perplexity")),
                              np.array([-1.0, -2.0, -3.0, -2.0]),
                              np.array([True, False, True, True]))
    assert m["acc"] == 0.75 and m["perplexity"] == pytest.approx(math.exp(2.0))
    assert m["acc_stderr"] == pytest.approx(0.5 / 2)


def test_winogrande_partial_scoring_format():
    item = tasks._winogrande({"sentence": "Sarah beat Maria so _ won the cup.", "option1": "Sarah",
                              "option2": "Maria", "answer": "1"})
    assert item.requests == (("Sarah beat Maria so Sarah", " won the cup."),
                             ("Sarah beat Maria so Maria", " won the cup."))
    assert item.gold == 0


def test_recovery_on_the_same_items():
    res = {"tasks": {"a": {"per_item": {"acc": [1, 0, 1, 0]}},
                     "b": {"per_item": {"acc": [1, 1]}}}}
    base = {"model": "fp", "tasks": {"a": {"per_item": {"acc": [1, 1, 1, 1, 0, 0]}},
                                     "c": {"per_item": {"acc": [1]}}}}
    rec = accuracy.recovery(res, base)
    assert rec["tasks"] == {"a": {"n": 4, "acc": 0.5, "baseline_acc": 1.0, "recovery": 0.5}}
    assert rec["recovery"] == 0.5
    with pytest.raises(accuracy.AccuracyError, match="shares no task"):
        accuracy.recovery({"tasks": {"b": res["tasks"]["b"]}}, base)


# ---------------------------------------------------------------- task files

def test_docs_from_requests_drops_normalisation_copies():
    lines = [{"doc_id": 1, "doc": {"q": "second"}}, {"doc_id": 0, "doc": {"q": "first"}},
             {"doc_id": 0, "doc": {"q": "first"}}, {"doc_id": 1_000_000, "doc": {"q": "uncond"}}]
    raw = gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode())
    assert tasks.docs_from_requests(raw) == [{"q": "first"}, {"q": "second"}]


def test_jsonl_task_reads_and_limits(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"query": "2+2=", "choices": ["3", "4"], "gold": 1}\n\n'
                    '{"query": "Sky:", "choices": ["blue", "green", "red"], "gold": 0}\n')
    task = tasks.load_task(str(path))
    assert task.name == "mine" and len(task.items) == 2
    assert task.items[1].requests == (("Sky:", " blue"), ("Sky:", " green"), ("Sky:", " red"))
    assert task.items[0].gold == 1 and task.items[1].choices == ("blue", "green", "red")
    assert len(tasks.load_task(str(path), limit=1).items) == 1


@pytest.mark.parametrize("content,message", [
    ("", "is empty; need one JSON object per line"),
    ("\n  \n", "is empty"),
    ('{"query": "q", "choices": ["a"], "gold": 0}\n{"query": "q", "choices": ["a"]', "line 2: not valid JSON"),
    ('{"query": "q", "choices": ["a", "b"]}\n', "line 1: missing 'gold'"),
    ('\n{"choices": ["a"], "gold": 0}\n', "line 2: missing 'query'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}\n', "line 1: gold 2 is out of range for 2 choices"),
    ('{"query": "q", "choices": ["a", "b"], "gold": -1}\n', "line 1: gold -1 is out of range"),
    ('{"query": "q", "choices": ["a", "b"], "gold": "1"}\n', "line 1: 'gold' must be an integer"),
    ('{"query": "q", "choices": [], "gold": 0}\n', "line 1: 'choices' must be a non-empty list"),
    ('{"query": "q", "choices": ["a", ""], "gold": 0}\n', "line 1: choice 1 must be a non-empty"),
    ('["q", ["a"], 0]\n', "line 1: expected a JSON object, got list"),
])
def test_jsonl_task_bad_lines(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(tasks.TaskError, match=message) as e:
        tasks.load_task(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(tasks.TaskError, match="unknown task 'mmlu'; built-in tasks: arc_easy"):
        tasks.check_task_specs(["piqa", "mmlu"])
    with pytest.raises(tasks.TaskError, match="not found"):
        tasks.load_task(str(tmp_path / "nope.jsonl"))
    assert tasks.parse_task_list(" piqa, arc_easy,,piqa ") == ["piqa", "arc_easy"]


# ---------------------------------------------------------------- command line

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "batquant_jax.evaluate", *args], cwd=cwd,
                          capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("make,args,message", [
    (None, ["--tasks=piqa,mmlu"], "error: unknown task 'mmlu'"),
    (None, ["--tasks="], "error: no task given"),
    (None, ["--tasks=piqa", "--token_budget=0"], "error: --token_budget must be >= 1"),
    (None, ["--tasks=piqa", "--limit=-3"], "error: flag --limit=-3: -3 is not a non-negative integer"),
    (None, ["--tasks={d}/missing.jsonl"], "error: task file {d}/missing.jsonl not found"),
    (None, ["--tasks=piqa", "--output_json={d}"], "error: --output_json {d} is a folder"),
    ("", ["--tasks={d}/t.jsonl"], "error: task file {d}/t.jsonl is empty"),
    ('{"query": "q", "choices": ["a"], "gold": 0}\n{oops\n', ["--tasks={d}/t.jsonl"],
     "error: {d}/t.jsonl line 2: not valid JSON"),
    ('{"query": "q", "choices": ["a"]}\n', ["--tasks={d}/t.jsonl"],
     "error: {d}/t.jsonl line 1: missing 'gold'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 5}\n', ["--tasks={d}/t.jsonl"],
     "error: {d}/t.jsonl line 1: gold 5 is out of range for 2 choices"),
])
def test_cli_bad_input_exits_2(tmp_path, make, args, message):
    if make is not None:
        (tmp_path / "t.jsonl").write_text(make)
    proc = _cli(*[a.format(d=tmp_path) for a in args])
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(message.format(d=tmp_path)) and "Traceback" not in proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1


def test_run_accuracy_on_a_tiny_checkpoint_free_model(tmp_path, monkeypatch, model):
    """The whole run with the model loader replaced: table, JSON and recovery against itself."""
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"query": f"Question: {q}\nAnswer:",
                                        "choices": ["yes", "no", "the thing"], "gold": g}) + "\n"
                            for q, g in [("a b", 0), ("the c", 1), ("ab", 2), ("ca", 0)]))
    monkeypatch.setattr(accuracy, "load_for_scoring", lambda cfg: (model, TOK, "toy", 256))
    out = tmp_path / "acc.json"
    cfg = accuracy.AccuracyConfig(tasks=(str(path),), output_json=str(out))
    res = accuracy.run_accuracy(cfg)
    saved = json.loads(out.read_text())
    assert saved["tasks"]["mine"]["n"] == 4 and saved["average"]["acc"] == res["tasks"]["mine"]["acc"]
    again = accuracy.run_accuracy(accuracy.AccuracyConfig(tasks=(str(path),),
                                                          baseline_json=str(out)))
    assert again["recovery"]["recovery"] == pytest.approx(1.0) or res["tasks"]["mine"]["acc"] == 0
    table = accuracy.format_table(again)
    assert table.splitlines()[0].split() == ["task", "n", "acc", "%", "acc_norm", "%", "perplexity"]
    assert "recovery:" in table and "mine" in table
