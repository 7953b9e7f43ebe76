"""Pieces shared by the model families: config parsing, norms, activations, outputs.

Axis letters used across vicrop_jax.models:
  B batch, S query length, K key length (prompt + cache), N query heads, G key/value heads,
  H head dim, D model dim, F MLP dim, V vocabulary, L layers, T image tokens, P patches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


def softmax_values(logits: Array, values: Array) -> tuple[Array, Array, Array]:
    """softmax(logits) @ values with the normalisation after the value product.

    logits float32[..., Q, K], values [..., K, H] (same leading axes). Returns (out
    float32[..., Q, H], e float32[..., Q, K], total float32[..., Q, 1]): e = exp(logits -
    max), out = (e in the values' dtype) @ values / total, and the probabilities are e /
    total, the same numbers as jax.nn.softmax. Dividing the [Q, H] product instead of the
    [Q, K] probabilities saves a pass over the larger array (end to end on the CPU: 1.05x;
    with the explicit softmax, tower attention 2.2x faster than jax.nn.dot_product_attention;
    BUILD_NOTES).
    """
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("...qk,...kh->...qh", e.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)  # fmt: skip
    return out / total, e, total


def full_attention(q: Array, k: Array, v: Array) -> Array:
    """Unmasked softmax attention, [B, P, N, H] in and out (a vision tower's).

    Logits and softmax in float32 (HF's eager path); head-major, normalised after the value
    product (`softmax_values`): on the CPU, at the demo's tower shapes (32 x 65 tokens, 6
    heads of 32), 2.2x faster than jax.nn.dot_product_attention, which runs the same XLA
    einsums with the division before the product; the same values to float32 rounding.
    """
    h = q.shape[-1]
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, P, H]
    logits = jnp.einsum("bnqh,bnkh->bnqk", qh, kh, preferred_element_type=jnp.float32)
    out, _, _ = softmax_values(logits * (h**-0.5), vh)
    return out.astype(v.dtype).transpose(0, 2, 1, 3)


def config_from_dict(cls, d: dict[str, Any], **overrides):
    """Builds a frozen config dataclass from an HF config dict, keeping only known fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs.update(overrides)
    for k, v in kwargs.items():
        if isinstance(v, list):
            kwargs[k] = tuple(v)  # configs are hashable: they are static arguments of jit
    return cls(**kwargs)


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    """Returns the activation HF calls `name`; unknown names raise."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}"
        ) from None


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (as HF does under autocast), cast back to the input dtype."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (dim,))
        bias = self.param("bias", nn.initializers.zeros, (dim,))
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, cast to the input dtype, then scale (HF order)."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.epsilon)
        return scale * y.astype(x.dtype)


@flax.struct.dataclass
class KVCache:
    """Decoder key/value cache, a plain pytree passed in and returned.

    k, v: tuples of L arrays [B, K, G, H], one a layer (a layer's write is an in-place
    update of its own buffer; one stacked [L, ...] array made XLA copy it on the CPU);
    mask: bool[B, K], which slots hold real tokens; index: int32[] the next slot to write;
    position: int32[B] the RoPE position of the next token.

    prefix_k, prefix_v: optional tuples of L arrays [Bp, P, G, H], keys and values of an
    unpadded prompt prefix that every row attends to before its own slots (row i uses
    prefix row i % Bp, B a multiple of Bp). Read only: a pass writes to the K slots alone,
    so one prefix serves several rows per question (vicrop_jax/prompt_cache.py) without being
    copied. Attention rows then span P + K keys, the prefix's first.

    fresh: static; True for a cache no pass has written yet (index 0, every slot empty), so
    that the first pass attends to its own keys alone and not to the empty slots after them
    (12-18% of a prompt pass's keys are the answer's room); False after any pass.
    """

    k: Array
    v: Array
    mask: Array
    index: Array
    position: Array
    prefix_k: Array | None = None
    prefix_v: Array | None = None
    fresh: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class ModelOutput:
    """What a forward pass returns.

    logits: [B, S, V] (or [B, 1, V] with only_last_logits).
    cache: the KVCache after this pass (None when none was given).
    attentions: [L, B, N, K] each layer's attention row of the last query, heads kept.
    full_attentions: [L, B, N, S, K] when asked for, else None.
    image_features: [I, T, D] projected image tokens (I images in the batch), or None.
    qformer_cross_attentions: InstructBLIP only: [C, I, N, T, P] each Q-Former cross-attention
      layer's query-token attention over the ViT tokens (class token first), else None.
    """

    logits: Array
    cache: KVCache | None = None
    attentions: Array | None = None
    full_attentions: Array | None = None
    image_features: Array | None = None
    qformer_cross_attentions: Array | None = None
