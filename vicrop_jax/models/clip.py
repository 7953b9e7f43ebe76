"""CLIP vision tower as LLaVA uses it (transformers' CLIPVisionModel).

Pre-layernorm ViT with a class token, quick-GELU MLP and learned position embeddings. Returns
every layer's hidden states so LLaVA can select `vision_feature_layer` (an int or a list).

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
class CLIPVisionConfig:
    """Field names follow transformers' CLIPVisionConfig (defaults: ViT-L/14 at 336 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPVisionConfig:
        return config_from_dict(cls, d)

    @property
    def grid(self) -> int:
        """Patches per side (N in PAPER.md)."""
        return self.image_size // self.patch_size


class CLIPAttention(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, p, d = x.shape
        n = cfg.num_attention_heads
        h = d // n
        q = nn.Dense(d, name="q_proj")(x).reshape(b, p, n, h)
        k = nn.Dense(d, name="k_proj")(x).reshape(b, p, n, h)
        v = nn.Dense(d, name="v_proj")(x).reshape(b, p, n, h)
        out = full_attention(q, k, v).reshape(b, p, d)
        return nn.Dense(d, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = activation(cfg.hidden_act)(nn.Dense(cfg.intermediate_size, name="fc1")(x))
        return nn.Dense(cfg.hidden_size, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        eps = self.config.layer_norm_eps
        x = x + CLIPAttention(self.config, name="self_attn")(LayerNorm(eps, name="layer_norm1")(x))
        return x + CLIPMLP(self.config, name="mlp")(LayerNorm(eps, name="layer_norm2")(x))


class CLIPEncoder(nn.Module):
    config: CLIPVisionConfig
    remat: bool = False  # recompute each layer's activations in the backward pass

    @nn.compact
    def __call__(self, x):
        hidden = [x]
        layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, name=f"layers_{i}")(x)
            hidden.append(x)
        return hidden


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        p = cfg.patch_size
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,))
        patch = nn.Conv(
            cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            name="patch_embedding",
        )  # fmt: skip
        x = patch(pixels.astype(cls.dtype))  # pixels follow the params' dtype, as HF casts them
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.hidden_size)  # [B, P-1, D], row-major over the patch grid
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.hidden_size)), x], 1)
        pos = nn.Embed(cfg.grid**2 + 1, cfg.hidden_size, name="position_embedding")
        return x + pos(jnp.arange(x.shape[1]))[None].astype(x.dtype)


class CLIPVisionModel(nn.Module):
    """Returns (hidden_states list of L + 1 arrays [B, P, D], pooled [B, D])."""

    config: CLIPVisionConfig
    remat: bool = False  # CLIPEncoder's

    @nn.compact
    def __call__(self, pixel_values: Array):
        """pixel_values: float[B, H, W, C] (NHWC; HF's NCHW is transposed by the caller)."""
        eps = self.config.layer_norm_eps
        x = CLIPVisionEmbeddings(self.config, name="embeddings")(pixel_values)
        x = LayerNorm(eps, name="pre_layrnorm")(x)  # sic: HF's spelling
        hidden = CLIPEncoder(self.config, self.remat, name="encoder")(x)
        pooled = LayerNorm(eps, name="post_layernorm")(hidden[-1][:, 0])
        return hidden, pooled
