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
  layout       how calibration walks a model (Layout, LLAMA); saving / loading any NNX model
  checkpoint   save_quantized / load_quantized (Orbax) and the resume state
  models       Llama-family decoder in Flax NNX and checkpoint loading
  data         corpora (Wikipedia excerpt, user text) and the calibration sampler
  perplexity   the one perplexity protocol; zeroshot / accuracy: lm-eval-style tasks
  kvquant      quantized KV cache: K/V in MX blocks along head_dim, transforms, packed storage
  generation   text generation with a KV cache (prefill + one-token decode steps);
               generate is its command

Importing the package changes no global JAX option; the command-line entry points make CPU
dispatch synchronous (cli.sync_cpu_dispatch), which long CPU runs of your own may want too.
"""

__version__ = "0.3.0"

import importlib

# The public names, each with the module it lives in. They are imported on first use (PEP 562),
# so `import batquant_jax` stays cheap and `python -m batquant_jax.<module>` does not find its
# own module imported already by the package.
_PUBLIC = {
    "mx": None, "transforms": None,
    "quantize_model": "calibration", "CalibrationResult": "calibration",
    "save_quantized": "checkpoint", "load_quantized": "checkpoint",
    "LlamaConfig": "models", "LlamaForCausalLM": "models", "load_model": "models",
    "forward_logits": "models", "forward_nll": "models",
    "QuantLinear": "qlayers",
    "Layout": "layout", "Group": "layout", "save_module": "layout", "load_module": "layout",
    "quantized_skeleton": "layout",
    "CalibConfig": "recipe", "QuantSpec": "recipe", "METHODS": "recipe", "SETTINGS": "recipe",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'batquant_jax' has no attribute {name!r}")
    module = _PUBLIC[name]
    value = (importlib.import_module(f"batquant_jax.{name}") if module is None else
             getattr(importlib.import_module(f"batquant_jax.{module}"), name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
