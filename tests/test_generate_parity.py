"""Greedy generation with the KV cache against transformers' own ``generate`` on SmolLM2."""

import pathlib
import sys

import numpy as np
import pytest

from batquant_jax import generate as g

PROMPTS = ["The capital of France is",
           "Write a short poem about the sea. The sea is wide and",
           "1, 2, 3,"]
CHAT = "What is the boiling point of water?"
NEW_TOKENS = 40


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_generate_on_smollm2():
    """Four prompts of 5, 13, 8 and 38 tokens (the last in the chat template) in one left-padded
    batch, 40 new tokens each, EOS not stopping either side; then our EOS stop per row."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    from bench_zeroshot import torch_reference

    from batquant_jax.models import load_model

    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    ids = [g.encode_prompt(tok, p) for p in PROMPTS] + [g.encode_prompt(tok, CHAT, chat=True)]
    lengths = [len(i) for i in ids]
    assert len(set(lengths)) == 4 and min(lengths) >= 5 and max(lengths) >= 30
    ours = g.generate_ids(loaded.model, ids, max_new_tokens=NEW_TOKENS, eos_ids=(),
                          pad_id=tok.pad_token_id)

    ref = torch_reference()
    width = max(lengths)
    pad = tok.pad_token_id
    inp = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    att = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        out = ref.generate(input_ids=inp, attention_mask=att, max_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=None, pad_token_id=pad)
    theirs = out[:, width:].tolist()
    for text, a, b in zip(PROMPTS + [CHAT], ours.tokens, theirs):
        print(f"{text!r}: same tokens {a == b}: {tok.decode(a)!r}")
    assert ours.tokens == theirs
    assert [len(t) for t in ours.tokens] == [NEW_TOKENS] * 4

    # with EOS: each row ends at its first EOS, the others run on
    eos = tok.eos_token_id
    stopped = g.generate_ids(loaded.model, ids, max_new_tokens=NEW_TOKENS, eos_ids=[eos],
                             pad_id=pad)
    expected = [t[:t.index(eos) + 1] if eos in t else t for t in theirs]
    assert stopped.tokens == expected
    assert stopped.finished == [eos in t for t in theirs]
    assert np.any(stopped.finished) and not np.all(stopped.finished)
