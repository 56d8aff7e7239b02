"""batquant_jax: MXFP4 (W4A4) post-training quantization of LLMs with BATQuant, in JAX/Flax NNX.

The public surface (``__all__``), for research code:

    import batquant_jax as bq
    loaded = bq.load_model("smollm2-135m")                 # .model, .tokenizer, .config
    model, result = bq.quantize_model(loaded.model, windows, method="batquant",
                                      setting="W4A4KV16", tx=optax.adam(1e-3))
    bq.save_quantized("out/ckpt", model, result, loaded.tokenizer)
    model, tokenizer, meta = bq.load_quantized("out/ckpt")

    q = bq.QuantLinear.from_linear(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), method="brq")
    codes = bq.mx.quantize(x)                              # MXArray: packed codes + E8M0 scales

Modules (each readable alone):
  mx           pure-JAX MX numerics: fake_quant, quantize/dequantize, MXArray (packed codes)
  recipe       settings, methods and CalibConfig: every name, default and check, once
  transforms   learnable and fixed input transforms (GPK, block affine, Kronecker, Hadamards)
  clipping     block-wise learnable clipping
  qlayers      QuantLinear (fake quant while calibrating, packed MXArray weight after deploy)
  gptq         MX-aware GPTQ and RTN weight quantization
  calibration  layer-wise calibration and quantize_model
  checkpoint   save_quantized / load_quantized (Orbax) and the resume state
  models       Llama-family decoder in Flax NNX and checkpoint loading
  data         corpora (Wikipedia excerpt, user text) and the calibration sampler
  perplexity   the one perplexity protocol; zeroshot / accuracy: lm-eval-style tasks
  kvquant      quantized KV cache: K/V in MX blocks along head_dim, transforms, packed storage
  generate     text generation with a KV cache (prefill + one-token decode steps)

Importing the package changes no global JAX option; the command-line entry points make CPU
dispatch synchronous (cli.sync_cpu_dispatch), which long CPU runs of your own may want too.
"""

__version__ = "0.2.0"

from batquant_jax import mx, transforms  # noqa: E402
from batquant_jax.calibration import CalibrationResult, quantize_model  # noqa: E402
from batquant_jax.checkpoint import load_quantized, save_quantized  # noqa: E402
from batquant_jax.models import (LlamaConfig, LlamaForCausalLM, forward_logits,  # noqa: E402
                                 forward_nll, load_model)
from batquant_jax.qlayers import QuantLinear  # noqa: E402
from batquant_jax.recipe import METHODS, SETTINGS, CalibConfig, QuantSpec  # noqa: E402

__all__ = [
    "mx", "transforms", "quantize_model", "CalibrationResult", "save_quantized",
    "load_quantized", "LlamaConfig", "LlamaForCausalLM", "load_model", "forward_logits",
    "forward_nll", "QuantLinear", "CalibConfig", "QuantSpec", "METHODS", "SETTINGS",
]
