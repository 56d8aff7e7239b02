"""Llama-family decoder (Llama, Qwen2, Qwen3) in Flax NNX, and checkpoint loading."""

from batquant_jax.models.llama import (
    SUPPORTED_ARCHS,
    DecoderLayer,
    Linear,
    LlamaConfig,
    LlamaForCausalLM,
    forward_logits,
    forward_nll,
    hf_param_names,
)
from batquant_jax.models.loading import LoadedModel, ModelLoadError, load_model

__all__ = [
    "SUPPORTED_ARCHS",
    "DecoderLayer",
    "Linear",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoadedModel",
    "ModelLoadError",
    "forward_logits",
    "forward_nll",
    "hf_param_names",
    "load_model",
]
