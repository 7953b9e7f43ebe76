"""Qwen2.5-VL's vision transformer (transformers' Qwen2_5_VisionTransformerPretrainedModel).

Patches of 14 px (two frames of a still image) at the image's own resolution, a 2D rotary
embedding, window attention over 112 px windows with full attention at
`fullatt_block_indexes`, RMSNorm, SwiGLU with bias, and a 2x2 patch merger to the LM width.

Every image is one row of a padded patch array float[I, P, F] with a layout int32[I, P, 4]
(each patch's grid position, its window, whether it is real): padded patches are masked out of
every attention, so a row gives the numbers of the image alone. The patches stay in the
processor's merge-block order, and window attention is a mask over them: the same numbers as
HF's permutation into window order, attention per window, merger and inverse permutation
(attention is permutation-equivariant and the permutation moves whole 2x2 merge blocks), up
to float32 summation order.

Axis letters: see vicrop_jax.models.common (I images, P patches an image, F a patch's
C * 2 * 14 * 14 values, E vision width, T = P / 4 merged tokens, D the LM width).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicrop_jax.models.common import RMSNorm, activation, config_from_dict, softmax_values
from vicrop_jax.models.llama import apply_rope

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLVisionConfig:
    """Field names follow transformers' Qwen2_5_VLVisionConfig."""

    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    window_size: int = 112
    out_hidden_size: int = 2048
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision_config.hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")  # fmt: skip
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("vision_config: the head size must be a multiple of 4 (2D rotary)")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(
                f"vision_config.window_size={self.window_size} is not a multiple of "
                f"patch_size * spatial_merge_size={self.patch_size * self.spatial_merge_size}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen2_5_VLVisionConfig:
        """From an HF vision config dict (hub: `in_chans`; transformers 5: `in_channels`)."""
        d = dict(d)
        if "in_chans" in d and "in_channels" not in d:
            d["in_channels"] = d["in_chans"]
        rope = d.get("rope_parameters") or {}
        extra = {"rope_theta": float(rope["rope_theta"])} if "rope_theta" in rope else {}
        return config_from_dict(cls, d, **extra)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """F: values of one flattened patch (channels x time x patch x patch)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """A window's side in merged tokens (112 px / 28 px = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


# A patch layout is int32[I, P, 4]: each padded patch's (row, column) in its image's patch
# grid, its attention window within the image, and 1 for a real patch, 0 for the bucket's
# padding (built on the host by models.qwen2_5_vl.patch_inputs).
LAYOUT_ROW, LAYOUT_COL, LAYOUT_WINDOW, LAYOUT_REAL = range(4)


def masked_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Softmax attention of [I, P, N, H] queries/keys/values under bool[I, P, P] (float32
    logits and softmax, HF's eager path); out [I, P, N, H]."""
    h = q.shape[-1]
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [I, N, P, H]
    logits = jnp.einsum("inqh,inkh->inqk", qh, kh, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None], logits * (h**-0.5), jnp.finfo(jnp.float32).min)
    out, _, _ = softmax_values(logits, vh)
    return out.astype(v.dtype).transpose(0, 2, 1, 3)


def vision_rope(v: Qwen2_5_VLVisionConfig, positions: Array) -> tuple[Array, Array]:
    """cos, sin float32[I, P, H] of the 2D rotary embedding: a quarter of the head's
    frequencies for the row, a quarter for the column, the half repeated (HF's layout)."""
    quarter = v.head_dim // 2
    inv = 1.0 / (v.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [I, P, 2, H/4]
    freqs = freqs.reshape(*positions.shape[:-1], -1)  # [I, P, H/2]: rows', then columns'
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class Qwen2_5_VLVisionAttention(nn.Module):
    config: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg = self.config
        i, p, _ = x.shape
        qkv = nn.Dense(3 * cfg.hidden_size, name="qkv")(x).reshape(i, p, 3, cfg.num_heads, -1)
        q, k, v = (apply_rope(qkv[:, :, j], cos, sin) if j < 2 else qkv[:, :, j] for j in range(3))
        out = masked_attention(q, k, v, mask).reshape(i, p, cfg.hidden_size)
        return nn.Dense(cfg.hidden_size, name="proj")(out)


class Qwen2_5_VLMLP(nn.Module):
    """SwiGLU; the vision tower's has biases, the decoder's none."""

    hidden: int
    intermediate: int
    act: str
    bias: bool

    @nn.compact
    def __call__(self, x):
        dense = lambda f, name: nn.Dense(f, use_bias=self.bias, name=name)
        gate = dense(self.intermediate, "gate_proj")(x)
        up = dense(self.intermediate, "up_proj")(x)
        return dense(self.hidden, "down_proj")(activation(self.act)(gate) * up)


class Qwen2_5_VLVisionBlock(nn.Module):
    config: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg = self.config
        x = x + Qwen2_5_VLVisionAttention(cfg, name="attn")(
            RMSNorm(1e-6, name="norm1")(x), cos, sin, mask
        )
        h = RMSNorm(1e-6, name="norm2")(x)
        mlp = Qwen2_5_VLMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, True,
                            name="mlp")  # fmt: skip
        return x + mlp(h)


class Qwen2_5_VLPatchMerger(nn.Module):
    """RMSNorm, 2x2 neighbouring patches concatenated, MLP (GELU) to the LM width."""

    config: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        i, p, e = x.shape
        x = RMSNorm(1e-6, name="ln_q")(x).reshape(i, p // cfg.merge_unit, cfg.merge_unit * e)
        x = nn.Dense(cfg.merge_unit * e, name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return nn.Dense(cfg.out_hidden_size, name="mlp_2")(x)  # [I, T, D]


class PatchProjection(nn.Module):
    """HF's Conv3d patch embedding, kernel = stride = one patch, without bias: a dense map of
    each flattened [C, 2, 14, 14] patch. The kernel keeps the Conv3d weight's layout
    [E, C, 2, 14, 14] (the checkpoint's own)."""

    config: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, patches: Array) -> Array:
        cfg = self.config
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size,
                 cfg.patch_size)  # fmt: skip
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(1, 2, 3, 4),
                                                                   out_axis=0), shape)  # fmt: skip
        # HF casts the pixels to the weights' dtype.
        x = patches.astype(kernel.dtype)
        return jnp.einsum("ipf,ef->ipe", x, kernel.reshape(cfg.hidden_size, -1))  # [I, P, E]


class PatchEmbed(nn.Module):
    config: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, patches: Array) -> Array:
        return PatchProjection(self.config, name="proj")(patches)


class Qwen2_5_VisionTransformer(nn.Module):
    """HF Qwen2_5_VisionTransformerPretrainedModel over padded patch rows."""

    config: Qwen2_5_VLVisionConfig
    remat: bool = False  # recompute each block's activations in the backward pass

    @nn.compact
    def __call__(self, patches: Array, layout: Array) -> tuple[Array, Array]:
        """patches float[I, P, F] (rows in merge-block order), layout int32[I, P, 4] ->
        (merged tokens [I, T, D] with T = P / 4, the last block's hidden states [I, P, E])."""
        cfg = self.config
        x = PatchEmbed(cfg, name="patch_embed")(patches)
        cos, sin = vision_rope(cfg, layout[..., LAYOUT_ROW : LAYOUT_COL + 1])
        mask, windows = layout[..., LAYOUT_REAL] > 0, layout[..., LAYOUT_WINDOW]
        real = mask[:, :, None] & mask[:, None, :]  # [I, P, P]
        window = real & (windows[:, :, None] == windows[:, None, :])
        block = nn.remat(Qwen2_5_VLVisionBlock) if self.remat else Qwen2_5_VLVisionBlock
        for j in range(cfg.depth):
            mask = real if j in cfg.fullatt_block_indexes else window
            x = block(cfg, name=f"blocks_{j}")(x, cos, sin, mask)
        return Qwen2_5_VLPatchMerger(cfg, name="merger")(x), x
