"""batquant_jax: MXFP4 (W4A4) post-training quantization of LLMs with BATQuant, in JAX/Flax NNX.

Modules (each readable alone):
  mx           pure-JAX MX numerics: fake_quant, quantize/dequantize, MXArray (packed 4-bit codes)
  transforms   learnable and fixed input transforms (GPK, block affine, Kronecker, Hadamards)
  clipping     block-wise learnable clipping
  gptq         MX-aware GPTQ and RTN weight quantization
  models       Llama-family decoder in Flax NNX and checkpoint loading
  data         corpora (Wikipedia excerpt, user text) and the calibration sampler
  perplexity   the one perplexity protocol
  calibration  layer-wise calibration and quantize_model
"""

__version__ = "0.1.0"

import jax as _jax

# XLA's CPU client can deadlock (0% CPU, waiting forever) when several large programs are queued
# by asynchronous dispatch at once (seen here during calibration; a known JAX CPU issue). Dispatch
# on the CPU is made synchronous; GPU and TPU backends are unaffected by this option.
_jax.config.update("jax_cpu_enable_async_dispatch", False)
