"""Shared test setup: CPU dispatch synchronous, as under the command-line entry points.

Importing batquant_jax leaves JAX's options alone; the suite runs as the commands do
(``cli.sync_cpu_dispatch``), which it did when the package import set the option itself.
"""

import pathlib

import numpy as np

from batquant_jax import cli
from batquant_jax.models.stored import BLOCK_TYPES

cli.sync_cpu_dispatch()


# byte offsets of the float16 fields of each block (set to finite values; the rest is random)
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(kind, rows, cols, seed=0, scale=0.01):
    """uint8 [rows, row_bytes]: random GGML blocks of ``kind`` whose float16 fields are finite
    (normal, std ``scale``)."""
    per, size = BLOCK_TYPES[kind]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for off in F16_FIELDS[kind]:
        h = (rng.standard_normal((rows, cols // per)) * scale).astype(np.float16)
        b[..., off:off + 2] = h.view(np.uint8).reshape(rows, cols // per, 2)
    return b.reshape(rows, -1)


N_LAYERS = 6
WORDS = ("the a one every small large red blue cat dog bird fish tree river stone house sees eats "
         "finds likes near under over with and but quickly slowly today").split()


def make_tiny(folder: pathlib.Path) -> pathlib.Path:
    """Random 6-layer Llama (hidden 64) + word-level tokenizer in ``folder``; returns a text file."""
    from flax import nnx
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig as HFConfig
    from transformers import PreTrainedTokenizerFast

    from batquant_jax.models import LlamaConfig, LlamaForCausalLM, hf_param_names
    folder.mkdir(parents=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "."] + list(WORDS))},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))
    HFConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
             max_position_embeddings=128, tie_word_embeddings=False).save_pretrained(str(folder))
    ours = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=N_LAYERS,
                       num_heads=4, num_kv_heads=2, head_dim=16)
    rng = np.random.default_rng(0)
    weights = {n: ((1.0 if "norm" in n else 0.0) + 0.15 * rng.standard_normal(v.shape)).astype(np.float32)
               for n, v in hf_param_names(LlamaForCausalLM(ours, nnx.Rngs(0))).items()}
    save_file(weights, str(folder / "model.safetensors"))
    r = np.random.default_rng(1)
    text = " ".join(" ".join(r.choice(WORDS, size=r.integers(4, 10))) + "." for _ in range(600))
    path = folder.parent / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


def transformers_from_gguf(path, cfg):
    """transformers' own float32 model of a GGUF file (its dequantizer, its q/k un-permute) for
    ``cfg`` -> (model in eval mode, load_state_dict's result, the converted tensors)."""
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"]
    result = ref.load_state_dict(tensors, strict=False, assign=True)
    ref.tie_weights()
    ref.model.rotary_emb.__init__(cfg)  # rebuild the RoPE buffer off the meta device
    return ref.eval(), result, tensors

