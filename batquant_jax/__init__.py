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
  kvquant      quantized KV cache: K/V in MX blocks along head_dim, transforms, packed storage

Importing the package changes no global JAX option; the command-line entry points make CPU
dispatch synchronous (cli.sync_cpu_dispatch), which long CPU runs of your own may want too.
"""

__version__ = "0.1.0"
