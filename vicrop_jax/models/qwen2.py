"""Qwen2.5-VL's language model (transformers' Qwen2_5_VLTextModel): the Qwen2 decoder with
multimodal rotary embeddings (M-RoPE).

Grouped-query attention with q/k/v bias (o_proj without), SwiGLU without bias, RMSNorm, and
M-RoPE: each position is three integers (temporal, height, width), and the head's rotary
frequencies are split by `mrope_section` into three runs, each rotated by one of them. Every
layer returns its last query's attention row; `attn_delta` perturbs it as in
vicrop_jax.models.llama. The KV cache is an explicit common.KVCache (no shared prefix).

Axis letters: see vicrop_jax.models.common.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vicrop_jax.models.common import KVCache, RMSNorm, config_from_dict
from vicrop_jax.models.llama import apply_rope, attend
from vicrop_jax.models.qwen2_5_vl_vision import Qwen2_5_VLMLP

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLTextConfig:
    """Field names follow transformers' Qwen2_5_VLTextConfig (hub files hold them at the top
    level of config.json, transformers 5 under text_config)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    use_sliding_window: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")  # fmt: skip
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} must sum to half the head size "
                f"({self.head_dim // 2})"
            )
        if self.use_sliding_window:
            raise ValueError("use_sliding_window=true is not supported (HF's eager path has none)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen2_5_VLTextConfig:
        """From an HF text config dict; reads `rope_scaling` {type: mrope} (hub, transformers 4)
        and `rope_parameters` {rope_type: default} (transformers 5), `mrope_section` in either."""
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ValueError(f"unsupported rope type {kind!r} for Qwen2.5-VL (default, mrope)")
        extra = {}
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is not None:
            extra["rope_theta"] = float(theta)
        if "mrope_section" in rope:
            extra["mrope_section"] = tuple(int(x) for x in rope["mrope_section"])
        d = {k: v for k, v in d.items() if k not in ("rope_theta", "mrope_section")}
        return config_from_dict(cls, d, **extra)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (tuple(e) if isinstance(e, tuple | list) else (e,))


def mrope_cos_sin(cfg: Qwen2_5_VLTextConfig, positions: Array, table_size: int | None = None
                  ) -> tuple[Array, Array]:  # fmt: skip
    """cos, sin float32[B, S, H] for M-RoPE positions int[3, B, S]: frequency j of the half
    head takes the temporal, height or width position by which `mrope_section` run it is in
    (HF's recomposition), and the half is repeated.

    table_size: a static bound on the positions: cos and sin of every position below it are
    then constants of the compiled program, looked up per axis (as llama.rope_cos_sin, so
    that XLA's CPU fusion does not recompute them inside every layer).
    """
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    bounds = np.cumsum((0, *cfg.mrope_section))
    if table_size is None:
        axis = np.repeat(np.arange(3), cfg.mrope_section)
        freqs = jnp.moveaxis(positions[axis], 0, -1).astype(jnp.float32) * inv  # [B, S, H/2]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)
    with jax.ensure_compile_time_eval():
        freqs = jnp.arange(table_size, dtype=jnp.float32)[:, None] * inv  # [K, H/2]
        tables = jnp.cos(freqs), jnp.sin(freqs)
    out = []
    for table in tables:
        half = jnp.concatenate(
            [table[positions[a], bounds[a] : bounds[a + 1]] for a in range(3)], axis=-1
        )
        out.append(jnp.concatenate([half, half], axis=-1))
    return out[0], out[1]


class Qwen2Attention(nn.Module):
    config: Qwen2_5_VLTextConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, delta, want_full, last_only=False):
        """kv: None or (k_cache, v_cache, index, fresh), as LlamaAttention without a prefix:
        the layer's [B, K, G, H] slots, updated at [:, index:index + S] and returned; with
        `fresh` the queries attend to this pass's S keys alone and the rows are padded with
        zeros to K. last_only: the query (output, row) of the last position only."""
        cfg = self.config
        b, s, _ = x.shape
        n, g, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        k = apply_rope(nn.Dense(g * h, name="k_proj")(x).reshape(b, s, g, h), cos, sin)
        v = nn.Dense(g * h, name="v_proj")(x).reshape(b, s, g, h)
        if last_only:
            x, cos, sin, mask = x[:, -1:], cos[:, -1:], sin[:, -1:], mask[:, -1:]
        q = apply_rope(nn.Dense(n * h, name="q_proj")(x).reshape(b, x.shape[1], n, h), cos, sin)
        empty, rest = 0, None
        if kv is not None:
            k_cache, v_cache, index, fresh = kv
            k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
            new_kv = tuple(
                jax.lax.dynamic_update_slice(buf, new, (0, index, 0, 0))
                for buf, new in ((k_cache, k), (v_cache, v))
            )
            if fresh:  # the slots after this pass's hold nothing yet: leave them out
                empty = k_cache.shape[1] - s
                mask = mask[..., : mask.shape[-1] - empty]
                if delta is not None:
                    rest = delta[..., delta.shape[-1] - empty :]
                    delta = delta[..., : delta.shape[-1] - empty]
            else:
                k, v = new_kv
        else:
            new_kv = (k, v)
        out, rows, probs = attend(q, k, v, mask, delta, want_full)
        if empty:
            rows = jnp.pad(rows, ((0, 0), (0, 0), (0, empty)))
            rows = rows if rest is None else rows.at[..., -empty:].add(rest.astype(rows.dtype))
            if probs is not None:
                probs = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, empty)))
        out = nn.Dense(cfg.hidden_size, use_bias=False, name="o_proj")(
            out.reshape(b, q.shape[1], n * h)
        )
        return out, new_kv, rows, probs


class Qwen2DecoderLayer(nn.Module):
    config: Qwen2_5_VLTextConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, delta, want_full, last_only=False):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x)
        h, kv, rows, probs = Qwen2Attention(cfg, name="self_attn")(
            h, cos, sin, mask, kv, delta, want_full, last_only
        )
        x = (x[:, -1:] if last_only else x) + h
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        mlp = Qwen2_5_VLMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, False,
                            name="mlp")  # fmt: skip
        return x + mlp(h), kv, rows, probs


class Qwen2Model(nn.Module):
    """The decoder stack (HF Qwen2_5_VLTextModel). Embedding lookup is separate (`embed`).
    remat: as llama.LlamaModel's."""

    config: Qwen2_5_VLTextConfig
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size)
        # static: want_full and last_only (self counts as argument 0)
        layer = (
            nn.remat(Qwen2DecoderLayer, static_argnums=(7, 8)) if self.remat else Qwen2DecoderLayer
        )
        self.layers = [layer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps)

    def embed(self, input_ids: Array) -> Array:
        return self.embed_tokens(input_ids)

    def attend_logits(self, x: Array) -> Array:
        """Tied output head: x @ embedding^T."""
        return self.embed_tokens.attend(x)

    def __call__(
        self,
        inputs_embeds: Array,
        positions: Array,
        kv_mask: Array,
        cache: KVCache | None = None,
        attn_delta: Array | None = None,
        output_full_attentions: bool = False,
        last_only: bool = False,
    ):
        """Runs the stack.

        Args:
          inputs_embeds: float[B, S, D].
          positions: int[3, B, S] M-RoPE positions.
          kv_mask: bool[B, K] which key slots are real tokens (K = S without a cache, else the
            cache length, already including this pass's S slots).
          cache: optional KVCache (no shared prefix); this pass writes at cache.index.
          attn_delta: optional float[L, B, N, K] added to each layer's last-query row.
          output_full_attentions: also return every layer's [B, N, S, K] probabilities.
          last_only: the last position's hidden state only (see llama.LlamaModel).

        Returns:
          hidden [B, S or 1, D] after the final norm, new (k, v) tuples of L arrays
          [B, K, G, H], rows float32[L, B, N, K], full probabilities [L, B, N, S, K] or None.
        """
        if cache is not None and cache.prefix_k is not None:
            raise ValueError("Qwen2.5-VL caches take no shared prefix")
        s = inputs_embeds.shape[1]
        start = 0 if cache is None else cache.index
        k_len = kv_mask.shape[1]
        q_slot = start + jnp.arange(s)
        causal = jnp.arange(k_len)[None, :] <= q_slot[:, None]  # [S, K]
        own = jnp.arange(k_len)[None, :] == q_slot[:, None]  # a padding query sees itself
        mask = causal[None] & (kv_mask[:, None, :] | own[None])  # [B, S, K]
        # Positions count at most one per real token (an image's run advances by its grid's
        # larger side), so each is below the number of key slots: a static table bound.
        cos, sin = mrope_cos_sin(self.config, positions, table_size=k_len)
        x = inputs_embeds
        ks, vs, rows, fulls = [], [], [], []
        final = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], cache.index, cache.fresh)
            delta = None if attn_delta is None else attn_delta[i]
            last = last_only and i == final and not output_full_attentions
            x, (k, v), r, p = layer(x, cos, sin, mask, kv, delta, output_full_attentions, last)
            ks.append(k)
            vs.append(v)
            rows.append(r)
            fulls.append(p)
        full = jnp.stack(fulls) if output_full_attentions else None
        return self.norm(x), (tuple(ks), tuple(vs)), jnp.stack(rows), full
