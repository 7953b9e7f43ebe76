"""InstructBLIP's Querying Transformer (transformers' InstructBlipQFormerModel).

A post-layernorm BERT encoder over [learned query tokens; instruction text tokens]. Self-attention
spans queries and text; layers whose index is a multiple of `cross_attention_frequency` also let
the query part (only) cross-attend to the ViT tokens; queries and text then take separate
feed-forward blocks (`intermediate_query`/`output_query` vs `intermediate`/`output`).

Each cross-attention layer returns the queries' attention over the ViT tokens (A_ti in
PAPER.md); an optional additive perturbation on it (zero by default) lets `jax.grad` give
d(output)/d(cross-attention) for grad-att.

Axis letters: see vicrop_jax.models.common; here Q = query tokens, L = instruction tokens,
P = ViT tokens (class token first), C = cross-attention layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicrop_jax.models.common import LayerNorm, activation, config_from_dict

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class InstructBlipQFormerConfig:
    """Field names follow transformers' InstructBlipQFormerConfig (defaults: BERT-base size)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.cross_attention_frequency < 1:
            raise ValueError("cross_attention_frequency must be >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> InstructBlipQFormerConfig:
        return config_from_dict(cls, d, **overrides)

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        """Indices of the layers with cross-attention (HF: layer_idx % frequency == 0)."""
        f = self.cross_attention_frequency
        return tuple(i for i in range(self.num_hidden_layers) if i % f == 0)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, name=name)


class InstructBlipQFormerMultiHeadAttention(nn.Module):
    """Scaled dot-product attention; `kv` is the same sequence (self) or the ViT tokens (cross)."""

    config: InstructBlipQFormerConfig
    is_cross_attention: bool = False

    @nn.compact
    def __call__(self, x, kv, mask, delta):
        """x [B, S, D], kv [B, K, Dk], mask bool[B, K] or None, delta [B, N, S, K] or None.

        Returns out [B, S, D] and probabilities float32[B, N, S, K] (after adding delta).
        """
        cfg = self.config
        b, s, d = x.shape
        n = cfg.num_attention_heads
        h = d // n
        q = _dense(d, "query")(x).reshape(b, s, n, h)
        k = _dense(d, "key")(kv).reshape(b, kv.shape[1], n, h)
        v = _dense(d, "value")(kv).reshape(b, kv.shape[1], n, h)
        logits = jnp.einsum("bsnh,bknh->bnsk", q, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(h)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        if delta is not None:
            probs = probs + delta.astype(jnp.float32)
        out = jnp.einsum("bnsk,bknh->bsnh", probs.astype(v.dtype), v).reshape(b, s, d)
        return out, probs


class InstructBlipQFormerSelfOutput(nn.Module):
    """dense, then LayerNorm(h + residual) (BERT's post-layernorm)."""

    config: InstructBlipQFormerConfig

    @nn.compact
    def __call__(self, h, residual):
        cfg = self.config
        h = _dense(cfg.hidden_size, "dense")(h)
        return LayerNorm(cfg.layer_norm_eps, name="LayerNorm")(h + residual)


class InstructBlipQFormerAttention(nn.Module):
    config: InstructBlipQFormerConfig
    is_cross_attention: bool = False

    @nn.compact
    def __call__(self, x, kv, mask, delta=None):
        att = InstructBlipQFormerMultiHeadAttention(
            self.config, self.is_cross_attention, name="attention"
        )
        out, probs = att(x, kv, mask, delta)
        return InstructBlipQFormerSelfOutput(self.config, name="output")(out, x), probs


class InstructBlipQFormerIntermediate(nn.Module):
    config: InstructBlipQFormerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        return activation(cfg.hidden_act)(_dense(cfg.intermediate_size, "dense")(x))


class InstructBlipQFormerLayer(nn.Module):
    config: InstructBlipQFormerConfig
    has_cross_attention: bool

    @nn.compact
    def __call__(self, x, mask, image_embeds, query_length, cross_delta):
        """x [B, Q + L, D]; returns the new x and the cross-attention [B, N, Q, P] (or None)."""
        cfg = self.config
        x, _ = InstructBlipQFormerAttention(cfg, name="attention")(x, x, mask)
        queries, text = x[:, :query_length], x[:, query_length:]
        cross = None
        if self.has_cross_attention:
            queries, cross = InstructBlipQFormerAttention(cfg, True, name="crossattention")(
                queries, image_embeds, None, cross_delta
            )
        out = InstructBlipQFormerSelfOutput(cfg, name="output_query")(
            InstructBlipQFormerIntermediate(cfg, name="intermediate_query")(queries), queries
        )
        if text.shape[1]:
            text = InstructBlipQFormerSelfOutput(cfg, name="output")(
                InstructBlipQFormerIntermediate(cfg, name="intermediate")(text), text
            )
            out = jnp.concatenate([out, text], axis=1)
        return out, cross


class InstructBlipQFormerEncoder(nn.Module):
    config: InstructBlipQFormerConfig

    @nn.compact
    def __call__(self, x, mask, image_embeds, query_length, cross_delta):
        cfg = self.config
        crosses = []
        for i in range(cfg.num_hidden_layers):
            has_cross = i in cfg.cross_attention_layers
            delta = None
            if has_cross and cross_delta is not None:
                delta = cross_delta[len(crosses)]
            x, cross = InstructBlipQFormerLayer(cfg, has_cross, name=f"layer_{i}")(
                x, mask, image_embeds, query_length, delta
            )
            if cross is not None:
                crosses.append(cross)
        return x, jnp.stack(crosses)


class InstructBlipQFormerEmbeddings(nn.Module):
    config: InstructBlipQFormerConfig

    @nn.compact
    def __call__(self, query_embeds, input_ids, positions):
        cfg = self.config
        x = query_embeds
        if input_ids is not None:
            words = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
            pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                           name="position_embeddings")(positions)  # fmt: skip
            x = jnp.concatenate([query_embeds, (words + pos).astype(query_embeds.dtype)], axis=1)
        return LayerNorm(cfg.layer_norm_eps, name="layernorm")(x)


class InstructBlipQFormerModel(nn.Module):
    """Returns (last_hidden_state [B, Q + L, D], cross-attentions float32[C, B, N, Q, P])."""

    config: InstructBlipQFormerConfig

    @nn.compact
    def __call__(
        self,
        query_embeds: Array,
        image_embeds: Array,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        cross_delta: Array | None = None,
    ):
        """Runs the Q-Former.

        Args:
          query_embeds: float[B, Q, D] the learned query tokens (broadcast by the caller).
          image_embeds: float[B, P, Dv] the ViT tokens to cross-attend to (all unmasked).
          input_ids: optional int[B, L] instruction tokens (Q-Former vocabulary).
          attention_mask: optional int/bool[B, L], 0 for padding; defaults to all ones.
          cross_delta: optional float[C, B, N, Q, P] added to each cross-attention's
            probabilities (the grad-att perturbation point).

        Returns:
          hidden [B, Q + L, D], cross-attentions float32[C, B, N, Q, P].
        """
        b, nq = query_embeds.shape[:2]
        mask = positions = None
        if input_ids is not None:
            text_mask = (
                jnp.ones(input_ids.shape, bool) if attention_mask is None
                else attention_mask.astype(bool)
            )  # fmt: skip
            # HF uses arange positions; counting real tokens equals that for unpadded and
            # right-padded rows and keeps a left-padded row (the processor pads the Q-Former
            # text on the LM tokenizer's side) equal to its unpadded run.
            positions = jnp.maximum(jnp.cumsum(text_mask, axis=1) - 1, 0)
            mask = jnp.concatenate([jnp.ones((b, nq), bool), text_mask], axis=1)
        x = InstructBlipQFormerEmbeddings(self.config, name="embeddings")(
            query_embeds, input_ids, positions
        )
        return InstructBlipQFormerEncoder(self.config, name="encoder")(
            x, mask, image_embeds.astype(x.dtype), nq, cross_delta
        )
