"""Pieces shared by the model families: config parsing, norms, activations, outputs.

Axis letters used across vicrop_jax.models:
  B batch, S query length, K key length (prompt + cache), N query heads, G key/value heads,
  H head dim, D model dim, F MLP dim, V vocabulary, L layers, T image tokens, P patches.
"""

from __future__ import annotations

import dataclasses
import re
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


# Int config fields named like these are token ids or positions (any int); every other int
# field is a count or a size (layers, heads, widths, vocabulary, pixels, tokens).
_ID_FIELD = re.compile(r"_(id|index)$")
_MAX_COUNT = 2**31 - 1  # array dimensions and token ids are int32 on the device
# (a, b, applies): field a must be a multiple of field b, in one config, where `applies`.
_MULTIPLES = (
    # An explicit head_dim frees the heads from splitting hidden_size (HF Llama's q_proj is
    # [heads * head_dim, hidden]); without one the head size is hidden_size // heads.
    ("hidden_size", "num_attention_heads", lambda v: v.get("head_dim") is None),
    ("num_attention_heads", "num_key_value_heads", lambda v: True),
    ("image_size", "patch_size", lambda v: True),
)


def _int_field(f: dataclasses.Field) -> bool | None:
    """None for a field that is not an int; else whether it may be None."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    parts = {p.strip() for p in t.split("|")}
    if "int" not in parts or parts - {"int", "None"}:
        return None
    return "None" in parts


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def check_config_dict(cls, d: Any, where: str = "config.json", prefix: str = "") -> None:
    """Checks an HF config dict against the config dataclass `cls` before anything is built.

    Generic over the dataclass's fields, nested configs (a field whose default is a config
    dataclass, e.g. `text_config`) included: every int field that is a count or a size must
    be a positive int (not a str, float or bool), every token id or index an int, both below
    2**31; within one config `hidden_size` must be a multiple of `num_attention_heads` (unless
    `head_dim` is given), `num_attention_heads` of `num_key_value_heads`, `image_size` of
    `patch_size`. Fields the dict leaves out take the dataclass default.

    Raises:
      ValueError: one line naming the field, e.g. "config.json text_config.num_hidden_layers:
        must be a positive int, got '32'".
    """
    if not isinstance(d, dict):
        label = f"{where} {prefix.rstrip('.')}" if prefix else where
        raise ValueError(f"{label}: must be a JSON object, got a {type(d).__name__}")
    values = {}
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            sub = d.get(f.name)
            check_config_dict(type(default), {} if sub is None else sub, where,
                              f"{prefix}{f.name}.")  # fmt: skip
            continue
        value = values[f.name] = d.get(f.name, default)
        nullable = _int_field(f)
        if nullable is None or f.name not in d or (value is None and nullable):
            continue
        name, null = f"{where} {prefix}{f.name}", " or null" if nullable else ""
        if _ID_FIELD.search(f.name):
            if type(value) is not int:  # bool is an int to isinstance, never here
                raise ValueError(f"{name}: must be an int{null}, got {value!r}")
        elif type(value) is not int or value <= 0:
            raise ValueError(f"{name}: must be a positive int{null}, got {value!r}")
        if abs(value) > _MAX_COUNT:
            raise ValueError(f"{name}: must be below 2**31, got {value}")
    for a, b, applies in _MULTIPLES:
        va, vb = values.get(a), values.get(b)
        if isinstance(va, int) and isinstance(vb, int) and vb > 0 and applies(values) and va % vb:
            raise ValueError(f"{where} {prefix}{a}: {va} is not a multiple of {prefix}{b} ({vb})")


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


def pinned_promote_dtype(*args, dtype=None, inexact=True) -> list:
    """flax's promote_dtype for a Dense's (inputs, kernel, bias), on the CPU behind an
    optimization barrier over all three (`nn.Dense(..., promote_dtype=pinned_promote_dtype)`).

    XLA's CPU backend computes a bfloat16 dot in float32, converting the kernel to a float32
    copy. A kernel does not change inside a decode loop, so XLA hoists that copy out of the
    loop, and every layer's copy stays alive for the whole loop: twice the bfloat16 params
    again. Tying the kernel to the layer's input keeps the copy inside the loop, made when the
    layer runs. XLA's CPU plan of a 20-token greedy generate at 7B width with 4 LM layers (2.6
    GiB of bfloat16 params, the memory-minimising scheduler of bench.fullsize's flags): 4.0
    GiB of temporaries without the barrier, 1.0 GiB with it. Identity on values and
    gradients; other backends (a GPU's bfloat16 dots convert nothing) are left unconstrained.
    """
    if jax.default_backend() == "cpu":
        args = jax.lax.optimization_barrier(args)
    return nn.dtypes.promote_dtype(*args, dtype=dtype, inexact=inexact)


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
