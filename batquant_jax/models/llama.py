"""Llama-family decoder (Llama 2/3, Qwen2, Qwen3) in Flax NNX.

The whole architecture lives here: `LlamaConfig`, the layers and the causal LM. Weights use the
torch layout (`Linear.weight: [out, in]`) and Hugging Face parameter names, so checkpoints map
one to one (see `loading.py`).

Every linear layer of a decoder layer (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`) is
only ever *called* (`self.q_proj(x)`), never read, so any `nnx.Module` with the same
`__call__(x: [..., in]) -> [..., out]` can replace it by plain attribute assignment:

    layer.self_attn.q_proj = MyQuantLinear(layer.self_attn.q_proj)

Compute is float32 by default (norms, softmax and log-softmax always run in float32); pass
`dtype=jnp.bfloat16` for bfloat16 parameters and activations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from batquant_jax import fused, mx
from batquant_jax.models.stored import StoredWeight, dense, dense_after

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
_ROPE_TYPES = ("llama3", "linear")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static description of a Llama-family decoder.

    `rope_scaling` is None or a sorted tuple of (key, value) pairs with a "rope_type" key
    ("llama3": keys factor, low_freq_factor, high_freq_factor, original_max_position_embeddings;
    "linear": key factor). `attention_bias` puts biases on q/k/v (Qwen2 style); for arch "llama"
    and "qwen3" it also puts one on o_proj, as Hugging Face does. `qk_norm` applies a per-head
    RMSNorm to q and k before RoPE (Qwen3).
    """

    arch: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported arch {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type")
            if kind not in _ROPE_TYPES:
                raise ValueError(f"unsupported rope scaling {kind!r}; supported: {', '.join(_ROPE_TYPES)}")

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias and self.arch != "qwen2"

    @classmethod
    def from_hf(cls, hf_config) -> "LlamaConfig":
        """Builds the config from a transformers config object (transformers 4.x or 5.x fields)."""
        arch = getattr(hf_config, "model_type", None)
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {act!r}; only silu (SwiGLU) is implemented")
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        legacy = getattr(hf_config, "rope_scaling", None)
        if isinstance(legacy, dict):  # transformers 4.x keeps scaling apart from rope_theta
            rope.update(legacy)
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind == "llama3":
            scaling = (("factor", float(rope["factor"])),
                       ("high_freq_factor", float(rope["high_freq_factor"])),
                       ("low_freq_factor", float(rope["low_freq_factor"])),
                       ("original_max_position_embeddings", int(rope["original_max_position_embeddings"])),
                       ("rope_type", "llama3"))
        elif kind == "linear":
            scaling = (("factor", float(rope["factor"])), ("rope_type", "linear"))
        else:
            raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, {', '.join(_ROPE_TYPES)}")
        return cls(
            arch=arch,
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size),
            num_layers=int(hf_config.num_hidden_layers),
            num_heads=int(heads),
            num_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 2048)),
        )


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies, float32 `[head_dim // 2]`, with the configured scaling applied."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    if config.rope_scaling is None:
        return inv
    s = dict(config.rope_scaling)
    if s["rope_type"] == "linear":
        return (inv / np.float32(s["factor"])).astype(np.float32)
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions: `[..., T]` -> (cos, sin), each float32 `[..., T, 2 * len(inv_freq)]`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: `[B, T, H, hd]`; cos, sin: `[B or 1, T, hd]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rotated * s


def _normal(rngs: nnx.Rngs | None, shape, dtype, std=0.02):
    if rngs is None:
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ weight.T (+ bias). weight: `[out, in]` (torch layout); x: `[..., in]` -> `[..., out]`.

    With `rngs=None` the parameters start at zero (cheap construction before loading weights).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 rngs: nnx.Rngs | None = None, *, dtype=jnp.float32):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nnx.Param(_normal(rngs, (self.out_features, self.in_features), dtype))
        self.bias = nnx.data(nnx.Param(jnp.zeros((self.out_features,), dtype)) if bias else None)
        self.dtype = jnp.dtype(dtype)

    def dense_weight(self) -> jax.Array:
        """The weight `[out, in]` as an array of the layer's dtype (a `StoredWeight`, kept in
        its file's encoding, is decoded here, inside whatever jit calls the layer)."""
        return dense(self.weight.get_value(), self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects last dim {self.in_features}, got shape {x.shape}")
        value = self.weight.get_value()
        if self.dtype == jnp.float32 and fused.choose_stored(value, int(np.prod(x.shape[:-1]))):
            y = fused.stored_dot(x, value)  # few rows (decoding): never the float32 matrix
        else:
            x, w = dense_after(x, value, self.dtype)
            y = jnp.einsum("...i,oi->...o", x.astype(w.dtype), w)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token embedding table. weight: `[V, d]`; tokens `[...]` int -> `[..., d]`."""

    def __init__(self, num_embeddings: int, features: int, rngs: nnx.Rngs | None = None, *,
                 dtype=jnp.float32):
        self.weight = nnx.Param(_normal(rngs, (int(num_embeddings), int(features)), dtype))
        self.dtype = jnp.dtype(dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        w = self.weight.get_value()
        if isinstance(w, StoredWeight):  # decode only the rows looked up
            return w.take_rows(tokens, self.dtype)
        return jnp.take(w, tokens, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied output head: h `[..., d]` -> `[..., V]`."""
        h, w = dense_after(h, self.weight.get_value(), self.dtype)
        return jnp.einsum("...d,vd->...v", h.astype(w.dtype), w)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in float32. x: `[..., d]`."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32):
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.ones((int(dim),), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * xf.astype(x.dtype)).astype(x.dtype)


def _positions(positions: jax.Array | None, batch: int, length: int) -> jax.Array:
    if positions is None:
        return jnp.arange(length, dtype=jnp.int32)[None, :]
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None, :]
    if positions.ndim != 2 or positions.shape[-1] != length or positions.shape[0] not in (1, batch):
        raise ValueError(f"positions must be [T] or [B, T] with T={length}, got {positions.shape}")
    return positions


class KVCache(NamedTuple):
    """One attention layer's keys and values for incremental decoding (a pytree).

    k, v: `[B, S, num_kv_heads, head_dim]`, S slots preallocated; keys are stored after RoPE.
    In a KV-quantized setting (the attention holds a `kvquant.KVQuant`), k and v are
    `mx.MXArray`s instead: the cache is stored packed (codes plus E8M0 scales, one block of 32
    along head_dim per token) and dequantized for attention.
    end: int32 scalar, the number of slots written so far (the next token goes to slot `end`).
    Which slots a query may read is the caller's mask (see `LlamaForCausalLM.extend`).
    """

    k: Any
    v: Any
    end: jax.Array

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, length: int, dtype=jnp.float32,
              kv_spec=None) -> "KVCache":
        """Zero cache of `length` slots for `batch` rows; packed where `kv_spec` (a
        `kvquant.KVSpec`) quantizes keys / values."""
        shape = (int(batch), int(length), config.num_kv_heads, config.head_dim)

        def store(fmt):
            if kv_spec is None or fmt is None:
                return jnp.zeros(shape, dtype)
            return mx.quantize(jnp.zeros(shape, jnp.float32), fmt, block_size=kv_spec.block_size)

        k_fmt, v_fmt = (None, None) if kv_spec is None else (kv_spec.k_fmt, kv_spec.v_fmt)
        return cls(store(k_fmt), store(v_fmt), jnp.zeros((), jnp.int32))

    def append(self, k: jax.Array, v: jax.Array, kv_spec=None) -> "KVCache":
        """k, v: `[B, T, num_kv_heads, head_dim]` written to slots end .. end + T - 1 (a packed
        side quantized with `kv_spec`'s scale mode and rounding: k, v coming out of the
        attention's KVQuant already lie on the MX grid, so their codes are exact).

        The caller keeps end + T <= S (an update past the end would be clamped by XLA).
        """
        start = (0, self.end, 0, 0)

        def put(store, x):
            if not isinstance(store, mx.MXArray):
                return jax.lax.dynamic_update_slice(store, x.astype(store.dtype), start)
            q = mx.quantize(x.astype(jnp.float32), store.fmt, block_size=store.block_size,
                            scale_mode=kv_spec.scale_mode, rounding=kv_spec.rounding)
            return dataclasses.replace(
                store, codes=jax.lax.dynamic_update_slice(store.codes, q.codes, start),
                scales=jax.lax.dynamic_update_slice(store.scales, q.scales, start))

        return KVCache(put(self.k, k), put(self.v, v), self.end + k.shape[1])

    def values(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) as arrays `[B, S, num_kv_heads, head_dim]` (a packed side dequantized)."""
        def read(store):
            return mx.dequantize(store) if isinstance(store, mx.MXArray) else store
        return read(self.k), read(self.v)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys and values (codes and scales when packed)."""
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((self.k, self.v))))


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE; scores and softmax in float32."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs | None = None, *, dtype=jnp.float32):
        c = config
        d, q_dim, kv_dim = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.config = c
        self.q_proj = Linear(d, q_dim, c.attention_bias, rngs, dtype=dtype)
        self.k_proj = Linear(d, kv_dim, c.attention_bias, rngs, dtype=dtype)
        self.v_proj = Linear(d, kv_dim, c.attention_bias, rngs, dtype=dtype)
        self.o_proj = Linear(q_dim, d, c.o_proj_bias, rngs, dtype=dtype)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = nnx.data(None)
            self.k_norm = nnx.data(None)
        self.kv_quant = nnx.data(None)  # a kvquant.KVQuant: quantized K/V after RoPE

    def __call__(self, x: jax.Array, positions: jax.Array | None = None,
                 mask: jax.Array | None = None, *, cache: KVCache | None = None):
        """x: `[B, T, d]`, positions: `[T]` or `[B, T]` (default arange(T)) -> `[B, T, d]`.

        mask: bool `[B, T, T]` (query, key), True where the query may attend to the key; None is
        the causal mask. Several sequences can share one row this way (a shared prefix with
        branches, each branch attending to the prefix and to itself only).

        cache: incremental decoding. The T new keys (after RoPE) and values are written to the
        cache's slots end .. end + T - 1, the queries then attend to all S slots of the cache
        through mask, which is required and has shape `[B, T, S]` (query, slot); returns
        (`[B, T, d]`, the updated cache).
        """
        if cache is not None and mask is None:
            raise ValueError("attention with a KV cache needs a mask [B, T, S] over its slots")
        b, t, _ = x.shape
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(b, t, h, hd)
        k = self.k_proj(x).reshape(b, t, kv, hd)
        v = self.v_proj(x).reshape(b, t, kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(_positions(positions, b, t), rope_inv_freq(self.config))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_quant is not None:
            q, k, v = self.kv_quant(q, k, v)
        q = q.reshape(b, t, kv, h // kv, hd)
        if cache is not None:  # incremental decoding: attend to the cache's slots
            cache = cache.append(k, v, None if self.kv_quant is None else self.kv_quant.spec)
            k, v = cache.values()
        scores = jnp.einsum("btkgd,bskd->bkgts", q.astype(jnp.float32), k.astype(jnp.float32))
        scores = scores * np.float32(hd ** -0.5)
        if mask is None:
            allowed = jnp.tril(jnp.ones((t, t), dtype=bool))
        else:
            allowed = jnp.asarray(mask, dtype=bool)[:, None, None]  # [B, 1, 1, T, T]
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * hd)
        if self.kv_quant is not None:  # V's transform inverse, per query head
            out = self.kv_quant.attend_out(out.reshape(b, t, h, hd)).reshape(b, t, h * hd)
        if cache is not None:
            return self.o_proj(out), cache
        return self.o_proj(out)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x: `[..., d]` -> `[..., d]`."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs | None = None, *, dtype=jnp.float32):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, f, False, rngs, dtype=dtype)
        self.up_proj = Linear(d, f, False, rngs, dtype=dtype)
        self.down_proj = Linear(f, d, False, rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: h + attn(norm(h)), then h + mlp(norm(h)). h: `[B, T, d]`."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs | None = None, *, dtype=jnp.float32):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, rngs, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, rngs, dtype=dtype)

    def __call__(self, h: jax.Array, positions: jax.Array | None = None,
                 mask: jax.Array | None = None, *, cache: KVCache | None = None):
        """h: `[B, T, d]`, positions: `[T]` or `[B, T]` (default arange(T)), mask: bool
        `[B, T, T]` or None (causal; see `Attention`) -> `[B, T, d]`.

        With a `KVCache` (mask `[B, T, S]` then, see `Attention`) -> (`[B, T, d]`, new cache).
        """
        if h.ndim != 3:
            raise ValueError(f"DecoderLayer expects hidden states [B, T, d], got shape {h.shape}")
        if cache is not None:
            a, cache = self.self_attn(self.input_layernorm(h), positions, mask, cache=cache)
            h = h + a
            return h + self.mlp(self.post_attention_layernorm(h)), cache
        h = h + self.self_attn(self.input_layernorm(h), positions, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nnx.Module):
    """Causal LM: embed -> decoder layers -> final norm -> lm_head (or tied embedding).

    `LlamaForCausalLM(config, nnx.Rngs(0))` initialises random weights; `rngs=None` gives zeros;
    `from_weights(config, weights)` loads a dict keyed by Hugging Face names.
    """

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs | None = None, *, dtype=jnp.float32):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, rngs, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(config, rngs, dtype=dtype) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = nnx.data(None if config.tie_word_embeddings else
                                Linear(config.hidden_size, config.vocab_size, False, rngs, dtype=dtype))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: `[B, T]` int -> hidden states `[B, T, d]`."""
        given = getattr(tokens, "dtype", None) or np.asarray(tokens).dtype  # before jnp narrows it
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [B, T], got {given}{tokens.shape}")
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:  # eager: ids are checkable
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
        return self.embed_tokens(tokens)

    def head(self, h: jax.Array) -> jax.Array:
        """h: `[B, T, d]` -> logits `[B, T, V]` float32 (final norm, then lm_head or tied embedding)."""
        h = self.norm(h)
        logits = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.float32)

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
        """tokens: `[B, T]` -> last decoder layer output `[B, T, d]` (before the final norm).

        positions: `[T]` or `[B, T]` (default arange(T)); mask: bool `[B, T, T]` (query, key)
        or None for causal attention (see `Attention`).
        """
        return self.decode_embeddings(self.embed(tokens), positions, mask)

    def decode_embeddings(self, h: jax.Array, positions: jax.Array | None = None,
                          mask: jax.Array | None = None) -> jax.Array:
        """The decoder layers on input embeddings h `[B, T, d]` (what `embed` returns, or any
        vectors: gradient analysis, soft prompts) -> last layer output `[B, T, d]`."""
        for layer in self.layers:
            h = layer(h, positions, mask)
        return h

    def logits_from_embeddings(self, h: jax.Array, positions: jax.Array | None = None
                               ) -> jax.Array:
        """Input embeddings `[B, T, d]` -> logits `[B, T, V]` float32; differentiable in h:
        ``jax.grad(lambda h: model.logits_from_embeddings(h)[0, -1, t])(model.embed(ids))``."""
        return self.head(self.decode_embeddings(h, positions))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens: `[B, T]` int -> logits `[B, T, V]` float32."""
        return self.head(self.hidden(tokens, positions))

    def init_cache(self, batch: int, length: int) -> tuple[KVCache, ...]:
        """Empty KV caches, one per layer, of `length` slots for `batch` rows (model dtype)."""
        return tuple(KVCache.empty(self.config, batch, length, self.dtype,
                                   None if layer.self_attn.kv_quant is None
                                   else layer.self_attn.kv_quant.spec)
                     for layer in self.layers)

    def extend(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: Sequence[KVCache], *, last_only: bool = False
               ) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """Runs `tokens` on top of `cache` (incremental decoding: prefill, then one token a step).

        tokens: `[B, T]` int, written to slots end .. end + T - 1 of every layer's cache (S
        slots, end + T <= S); positions: `[B, T]` (RoPE positions); mask: bool `[B, T, S]`
        (query, slot), True where the query may read the slot (after the write). Returns
        (logits `[B, T, V]` float32, or `[B, 1, V]` for the last token only with `last_only`,
        the updated caches).
        """
        h = self.embed(tokens)
        new = []
        for layer, c in zip(self.layers, cache, strict=True):
            h, c = layer(h, positions, mask, cache=c)
            new.append(c)
        if last_only:
            h = h[:, -1:]
        return self.head(h), tuple(new)

    def nll(self, tokens: jax.Array) -> jax.Array:
        """tokens: `[B, T]`, T >= 2 -> `[B, T-1]` float32 negative log-likelihood of tokens[:, 1:]."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"nll needs tokens [B, T] with T >= 2, got shape {tokens.shape}")
        h = self.hidden(tokens)[:, :-1]
        targets = tokens[:, 1:].astype(jnp.int32)
        w = self._chunked_head()
        if w is not None:
            # never the [B, T, V] logits (nor, for a stored head, the decoded [V, d] head)
            return _chunked_nll(self.norm(h), w, targets)
        logp = jax.nn.log_softmax(self.head(h), axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    def decode_head(self) -> None:
        """Holds an output head kept in its source encoding (``StoredWeight``) as float32 from
        here on: the same values, decoded once (2,048 rows at a time). For generation, whose
        every forward is one token: decoding the 151,936-row head of Qwen at each token cost
        ten times the product itself. No-op for a float head."""
        weight = self._head_weight()
        if isinstance(weight.get_value(), StoredWeight):
            weight.set_value(weight.get_value().dense_by_rows())

    def _head_weight(self) -> nnx.Param:
        """The output head's weight variable (the embedding's when tied)."""
        return (self.embed_tokens if self.lm_head is None else self.lm_head).weight

    def _chunked_head(self):
        """The output head's weight when scores go over vocabulary chunks (a stored head, or
        more than CHUNKED_VOCAB_ABOVE rows), else None."""
        w = self._head_weight().get_value()
        return w if isinstance(w, StoredWeight) or w.shape[0] > CHUNKED_VOCAB_ABOVE else None

    def target_scores(self, h: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        """h: `[B, P, d]` (before the final norm), targets: int `[B, P]` -> (log-probability of
        each target float32, whether it is the argmax token bool), both `[B, P]`. A large or
        stored head goes over vocabulary chunks (never the `[B, P, V]` logits: 1.2 GB for 2,048
        slots of Qwen's 151,936), else the one-shot log-softmax."""
        targets = jnp.asarray(targets, jnp.int32)
        w = self._chunked_head()
        if w is not None:
            nll, best = _chunked_nll(self.norm(h), w, targets, argmax=True)
            return -nll, best == targets
        logits = self.head(h)
        logp = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return lp, jnp.argmax(logits, axis=-1) == targets

    @classmethod
    def from_weights(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], *,
                     dtype=jnp.float32) -> "LlamaForCausalLM":
        """Builds the model from arrays keyed by Hugging Face names ("model.norm.weight", ...).

        Parameters are never initialised: the module is built abstractly, then every parameter is
        set from `weights` (read one at a time: a lazy Mapping keeps the peak at one tensor). A
        `stored.StoredWeight` value is kept as it is and decoded inside the forward. Raises
        ValueError on a missing, unexpected or mis-shaped tensor. `lm_head.weight` is ignored when
        embeddings are tied; rotary buffers are ignored.
        """
        model = nnx.eval_shape(lambda: cls(config, None, dtype=dtype))
        names = hf_param_names(model)
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
        ignorable = ("rotary_emb.inv_freq", "lm_head.weight")
        extra = [n for n in weights if n not in names and not n.endswith(ignorable)]
        if extra:
            raise ValueError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[0]!r}")
        for name, var in names.items():
            w = weights[name]
            if tuple(w.shape) != tuple(var.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, expected {tuple(var.shape)}")
            if isinstance(w, StoredWeight):  # kept in its file's encoding, decoded per call
                var.set_value(w)
            else:
                var.set_value(jnp.asarray(np.asarray(w), dtype=dtype))
        return model


HEAD_CHUNK_ROWS = 16384  # vocabulary rows of a stored head decoded at a time
# a float head of more rows than this also gets the chunked NLL (Qwen's 151,936; SmolLM2's
# 49,152 keeps the one-shot log-softmax, and with it its recorded results bit for bit)
CHUNKED_VOCAB_ABOVE = 65536


def _chunk_rows(vocab: int) -> int:
    """The largest divisor of ``vocab`` that is at most HEAD_CHUNK_ROWS (151936 -> 9496)."""
    return max(d for d in range(1, min(vocab, HEAD_CHUNK_ROWS) + 1) if vocab % d == 0)


def _chunked_nll(h: jax.Array, w, targets: jax.Array, argmax: bool = False):
    """-log softmax(h @ W.T)[target] over vocabulary chunks: a running max and sum of exps
    (online logsumexp), one chunk of the head (a StoredWeight decoded per chunk, or an array)
    at a time inside a scan. h: `[B, T, d]` (after the final norm), targets: `[B, T]` ->
    `[B, T]` float32. argmax: also the int32 `[B, T]` index of each row's largest logit (the
    first of equal ones, as ``jnp.argmax``): returns (nll, argmax)."""
    vocab, rows = w.shape[0], _chunk_rows(w.shape[0])
    stored = isinstance(w, StoredWeight)
    src = w.data if stored else w
    data = src.reshape((vocab // rows, rows) + src.shape[1:])
    hf = h.astype(jnp.float32)

    def body(carry, chunk):
        m, s, tgt = carry[:3]
        i, block = chunk
        hb, block = jax.lax.optimization_barrier((hf, block))
        wc = (StoredWeight(block, w.kind, (rows, w.shape[1])).dense() if stored
              else block.astype(jnp.float32))
        logits = jnp.einsum("btd,vd->btv", hb, wc)
        m_chunk = jnp.max(logits, axis=-1)
        m_new = jnp.maximum(m, m_chunk)
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
        local = targets - i * rows
        inside = (local >= 0) & (local < rows)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, rows - 1)[..., None], -1)[..., 0]
        new = (m_new, s, jnp.where(inside, picked, tgt))
        if argmax:  # an earlier chunk keeps a tie
            best = carry[3]
            new += (jnp.where(m_chunk > m, jnp.argmax(logits, axis=-1) + i * rows, best),)
        return new, None

    init = (jnp.full(targets.shape, -jnp.inf, jnp.float32), jnp.zeros(targets.shape, jnp.float32),
            jnp.zeros(targets.shape, jnp.float32))
    if argmax:
        init += (jnp.zeros(targets.shape, jnp.int32),)
    out, _ = jax.lax.scan(body, init, (jnp.arange(vocab // rows), data))
    nll = (out[0] + jnp.log(out[1])) - out[2]
    return (nll, out[3]) if argmax else nll


def hf_param_names(model: LlamaForCausalLM) -> dict[str, nnx.Param]:
    """Maps each Hugging Face parameter name to the model's nnx.Param (e.g. 'model.layers.0...')."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(str(p) for p in path)
        out[key if path[0] == "lm_head" else "model." + key] = _lookup(model, path)
    return out


def _lookup(module, path):
    for p in path:
        module = module[p] if isinstance(p, int) else getattr(module, p)
    return module


class state_jit:
    """``fn(model, *args)`` jitted with the model's arrays as arguments only.

    ``nnx.jit`` also returns every array of the module (to carry mutations out), so XLA writes a
    copy of all weights on each call: 2.6 GB more for the 1.5B checkpoint, and its evaluation
    peaked at 7.1 GiB instead of 4.7. Here the module is split, its state passed in and nothing
    but ``fn``'s result comes out (mutations inside ``fn`` are dropped: for pure forwards). One
    compiled program per (model structure, fused-product mode, argument shapes: a forward traced
    under one ``fused`` mode is not reused under another); ``lower`` as ``jax.jit``'s."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def _jitted(self, model):
        graphdef, state = nnx.split(model)
        return _state_jitted(graphdef, self.fn, fused.get_mode()), state

    def __call__(self, model, *args):
        jitted, state = self._jitted(model)
        return jitted(state, *args)

    def lower(self, model, *args):
        jitted, state = self._jitted(model)
        return jitted.lower(state, *args)


@functools.lru_cache(maxsize=32)
def _state_jitted(graphdef, fn, mode):  # mode: only a cache key (read when fn is traced)
    return jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))


@state_jit
def forward_logits(model: LlamaForCausalLM, tokens: jax.Array) -> jax.Array:
    """Jitted `model(tokens)`: tokens `[B, T]` -> logits `[B, T, V]` float32."""
    return model(tokens)


@state_jit
def forward_nll(model: LlamaForCausalLM, tokens: jax.Array) -> jax.Array:
    """Jitted `model.nll(tokens)`: tokens `[B, T]` -> `[B, T-1]` float32."""
    return model.nll(tokens)
