"""BLIP/EVA ViT as InstructBLIP uses it (transformers' InstructBlipVisionModel).

Pre-layernorm ViT with a class token, learned position embeddings, a fused qkv projection (its
bias is HF's concat(q_bias, 0, v_bias), stored whole as `qkv.bias`), exact-GELU MLP and a
post-layernorm over every token (InstructBLIP's Q-Former cross-attends to all of them,
the class token included). There is no pre-layernorm, unlike CLIP.

Axis letters: see vicrop_jax.models.common (P = 1 + patches, the class token first).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicrop_jax.models.common import LayerNorm, activation, config_from_dict, full_attention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class InstructBlipVisionConfig:
    """Field names follow transformers' InstructBlipVisionConfig (defaults: EVA ViT-g, 224 px)."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    num_channels: int = 3  # not an HF field: HF's patch conv always takes 3 channels

    def __post_init__(self):
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(
                    f"{name} must be one int (square images), got {getattr(self, name)!r}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstructBlipVisionConfig:
        return config_from_dict(cls, d)

    @property
    def grid(self) -> int:
        """Patches per side (N in PAPER.md)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """P: patches plus the class token."""
        return self.grid**2 + 1


class InstructBlipAttention(nn.Module):
    config: InstructBlipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, p, d = x.shape
        n = cfg.num_attention_heads
        h = d // n
        qkv = nn.Dense(3 * d, use_bias=cfg.qkv_bias, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(b, p, 3, n, h), 2, 0)  # HF's (3, heads, head_dim) order
        out = full_attention(q, k, v).reshape(b, p, d)
        return nn.Dense(d, name="projection")(out)


class InstructBlipMLP(nn.Module):
    config: InstructBlipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = activation(cfg.hidden_act)(nn.Dense(cfg.intermediate_size, name="fc1")(x))
        return nn.Dense(cfg.hidden_size, name="fc2")(x)


class InstructBlipEncoderLayer(nn.Module):
    config: InstructBlipVisionConfig

    @nn.compact
    def __call__(self, x):
        eps = self.config.layer_norm_eps
        att = InstructBlipAttention(self.config, name="self_attn")
        x = x + att(LayerNorm(eps, name="layer_norm1")(x))
        return x + InstructBlipMLP(self.config, name="mlp")(LayerNorm(eps, name="layer_norm2")(x))


class InstructBlipEncoder(nn.Module):
    config: InstructBlipVisionConfig
    remat: bool = False  # recompute each layer's activations in the backward pass

    @nn.compact
    def __call__(self, x):
        layer = nn.remat(InstructBlipEncoderLayer) if self.remat else InstructBlipEncoderLayer
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, name=f"layers_{i}")(x)
        return x


class InstructBlipVisionEmbeddings(nn.Module):
    config: InstructBlipVisionConfig

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("class_embedding", init, (1, 1, d))
        pos = self.param("position_embedding", init, (1, cfg.num_positions, d))
        patch = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="patch_embedding")
        x = patch(pixels.astype(cls.dtype))  # pixels follow the params' dtype, as HF casts them
        b = x.shape[0]
        x = x.reshape(b, -1, d)  # [B, P-1, D], row-major over the patch grid
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], 1)
        return x + pos[:, : x.shape[1]].astype(x.dtype)


class InstructBlipVisionModel(nn.Module):
    """Returns (last_hidden_state [B, P, D] after the post-layernorm, pooled [B, D])."""

    config: InstructBlipVisionConfig
    remat: bool = False  # InstructBlipEncoder's

    @nn.compact
    def __call__(self, pixel_values: Array):
        """pixel_values: float[B, H, W, C] (NHWC; HF's NCHW is transposed by the caller)."""
        x = InstructBlipVisionEmbeddings(self.config, name="embeddings")(pixel_values)
        x = InstructBlipEncoder(self.config, self.remat, name="encoder")(x)
        post = LayerNorm(self.config.layer_norm_eps, name="post_layernorm")
        x = post(x)
        return x, post(x[:, 0])  # HF normalises the class token a second time for pooler_output
