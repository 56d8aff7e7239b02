"""The second model, Qwen2.5-Coder-1.5B-Instruct (qwen2, Q4_K / Q6_K GGUF), against transformers
loading the same file. Slow, and skipped unless the GGUF is already in the cache (the suite never
downloads it; ``python -m batquant_jax.evaluate --model=qwen2.5-coder-1.5b`` fetches it)."""

import numpy as np
import pytest

from batquant_jax.models.fetch import QWEN_CODER_1_5B, _stamp_matches, models_dir
from conftest import transformers_from_gguf

GGUF = models_dir() / QWEN_CODER_1_5B.filename
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} not fetched (1.1 GB)")]

PROMPTS = ["def fibonacci(n):", "The capital of France is",
           "# Sort a list of numbers in Python\nnumbers = [5, 3, 8]\n"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def both():
    """(our loaded model with its weights kept in GGUF encoding, transformers' float32 model)."""
    pytest.importorskip("torch")
    import transformers

    from batquant_jax.models import load_model
    assert _stamp_matches(GGUF, QWEN_CODER_1_5B)
    ours = load_model("qwen2.5-coder-1.5b")  # the default: weights="auto" -> stored
    assert ours.info["weights"] == "stored"
    assert ours.info["tensor_types"] == {"Q4_K": 169, "Q6_K": 29, "F32": 141}
    cfg = transformers.Qwen2Config(  # as published, written out independently of the GGUF
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False, max_position_embeddings=32768)
    ref, res, _ = transformers_from_gguf(GGUF, cfg)
    assert not res.missing_keys and not res.unexpected_keys
    return ours, ref


def test_config_logits_and_greedy_tokens_equal_transformers(both):
    import torch

    from batquant_jax import generate as g
    from batquant_jax.models import forward_logits
    ours, ref = both
    c = ours.config
    assert (c.arch, c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
            c.head_dim, c.vocab_size, c.rope_theta, c.attention_bias, c.tie_word_embeddings) == (
        "qwen2", 28, 1536, 8960, 12, 2, 128, 151936, 1e6, True, False)
    assert ours.info["num_params"] == 1_777_088_000
    tok = ours.tokenizer
    text = "def quicksort(items):\n    if len(items) <= 1:\n        return items\n" * 3
    tokens = np.asarray(tok(text)["input_ids"][:48], np.int32)[None]
    with torch.no_grad():
        want = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(forward_logits(ours.model, tokens))
    diff = np.abs(got - want).max()
    print(f"max |logit diff| {diff:.2e} (max |logit| {np.abs(want).max():.1f})")
    assert diff <= 1e-3

    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        mine = g.generate_ids(ours.model, [ids], max_new_tokens=NEW_TOKENS, eos_ids=()).tokens[0]
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                               do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_token_id)
        theirs = out[0, len(ids):].tolist()
        print(f"{prompt!r}: same {mine == theirs}: {tok.decode(mine)!r}")
        assert mine == theirs
