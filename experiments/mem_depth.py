"""Peak memory against depth: the 1.5B's width (hidden 1536, intermediate 8960, 12/2 heads,
vocabulary 151,936) with random Q4_K / Q6_K weights kept stored (as a GGUF load keeps them), at
several depths; one forward NLL of a 512-token window per depth, each in a fresh process.

    .venv/bin/python -m experiments.mem_depth --layers=28,56

Prints, per depth, the peak RSS, the stored weight bytes and their difference (what the forward
itself needs beyond holding the weights), and the slope between the depths.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r'''
import json, resource, sys
from batquant_jax import cli
cli.lean_cpu_schedule()
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from batquant_jax.models import LlamaConfig, LlamaForCausalLM, forward_nll
from batquant_jax.models.llama import hf_param_names
from batquant_jax.models.stored import BLOCK_TYPES, StoredWeight
layers = int(sys.argv[1])
cfg = LlamaConfig(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_layers=layers, num_heads=12, num_kv_heads=2, head_dim=128,
                  attention_bias=True, rope_theta=1e6, max_position_embeddings=4096)
model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, None))
rng = np.random.default_rng(0)
stored = dense = 0
for name, var in hf_param_names(model).items():
    shape = tuple(var.shape)
    if len(shape) == 2:
        kind = "Q6_K" if name in ("lm_head.weight",) or "down_proj" in name else "Q4_K"
        per, size = BLOCK_TYPES[kind]
        b = rng.integers(0, 256, size=(shape[0], shape[1] // per, size), dtype=np.uint8)
        off = 208 if kind == "Q6_K" else 0
        b[..., off:off + 2] = np.array([1e-3], np.float16).view(np.uint8)  # small finite scales
        if kind == "Q4_K":
            b[..., 2:4] = np.array([1e-3], np.float16).view(np.uint8)
        w = StoredWeight.from_ggml(b.reshape(shape[0], -1), kind, shape)
        stored += w.nbytes
        dense += 4 * shape[0] * shape[1]
        var.set_value(w)
    else:
        var.set_value(jnp.ones(shape, jnp.float32) if "norm" in name else jnp.zeros(shape))
tokens = rng.integers(0, cfg.vocab_size, size=(1, 512)).astype(np.int32)
nll = forward_nll(model, tokens)
print(json.dumps({"layers": layers, "stored_bytes": stored, "float32_bytes": dense, "finite": bool(jnp.isfinite(nll).all()),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", default="28,56")
    args = ap.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.layers.split(",")):
        out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        rows.append(r)
        print(f"layers {n:3d}: peak RSS {r['peak_rss'] / 2**30:.2f} GiB, stored weights "
              f"{r['stored_bytes'] / 2**30:.2f} GiB, peak - weights "
              f"{(r['peak_rss'] - r['stored_bytes']) / 2**30:.2f} GiB, finite NLL {r['finite']}",
              flush=True)
    for a, b in zip(rows, rows[1:]):
        per = (b["peak_rss"] - a["peak_rss"]) / (b["layers"] - a["layers"])
        per_w = (b["stored_bytes"] - a["stored_bytes"]) / (b["layers"] - a["layers"])
        per_f = (b["float32_bytes"] - a["float32_bytes"]) / (b["layers"] - a["layers"])
        print(f"per added layer: peak +{per / 2**20:.1f} MiB, stored weights "
              f"+{per_w / 2**20:.1f} MiB (the same layer in float32: {per_f / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
