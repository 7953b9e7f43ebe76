"""Llama decoder (LLaVA-1.5's Vicuna, InstructBLIP's Vicuna) as a Flax module.

Mirrors transformers' LlamaModel with eager attention: RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU MLP. Every layer returns its last query's attention row so ViCrop can read
answer-to-image attention; an optional additive perturbation on that row (zero by default)
lets `jax.grad` give d(output)/d(attention) without patching anything.

Axis letters: see vicrop_jax.models.common.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vicrop_jax.models.common import (
    KVCache,
    RMSNorm,
    activation,
    config_from_dict,
    pinned_promote_dtype,
    softmax_values,
)
from vicrop_jax.sharding import MODEL

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Field names follow transformers' LlamaConfig."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # Mistral: a query sees keys fewer than this many positions back (None: every key).
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_type {self.rope_type!r} (default, linear, llama3)")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or int(self.sliding_window) < 1
        ):
            raise ValueError(f"sliding_window must be a positive int, got {self.sliding_window!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """From an HF config dict; reads both `rope_parameters` (v5) and `rope_scaling` (v4)."""
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        extra = {}
        if "rope_theta" in rope or "rope_theta" in d:
            extra["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta")))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        extra["rope_type"] = rope_type
        if rope_type != "default":
            extra["rope_factor"] = float(rope.get("factor", 1.0))
        if rope_type == "llama3":
            extra["rope_low_freq_factor"] = float(rope["low_freq_factor"])
            extra["rope_high_freq_factor"] = float(rope["high_freq_factor"])
            extra["rope_original_max_position_embeddings"] = int(
                rope["original_max_position_embeddings"]
            )
        if d.get("model_type") == "mistral" and "sliding_window" not in d:
            extra["sliding_window"] = 4096  # transformers' MistralConfig default
        d = {k: v for k, v in d.items() if k not in ("rope_theta",)}
        return config_from_dict(cls, d, **extra)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (tuple(e) if isinstance(e, tuple | list) else (e,))


def partition_rules(prefix: str = "language_model") -> tuple[tuple[str, P], ...]:
    """The decoder's layout on a (data, model) mesh (vicrop_jax.sharding), its params under
    `prefix`: q, k, v, gate and up split by output columns (heads, MLP hidden), o and down by
    input rows, the embedding by the vocabulary, norms replicated."""
    p, layer = re.escape(prefix), re.escape(prefix) + r"/layers_\d+"
    return (
        (rf"{p}/embed_tokens/embedding", P(MODEL, None)),  # [V, D]
        (rf"{layer}/self_attn/[qkv]_proj/kernel", P(None, MODEL)),  # [D, N * H]
        (rf"{layer}/self_attn/[qkv]_proj/bias", P(MODEL)),
        (rf"{layer}/self_attn/o_proj/kernel", P(MODEL, None)),  # [N * H, D]
        (rf"{layer}/mlp/(gate|up)_proj/kernel", P(None, MODEL)),  # [D, F]
        (rf"{layer}/mlp/(gate|up)_proj/bias", P(MODEL)),
        (rf"{layer}/mlp/down_proj/kernel", P(MODEL, None)),  # [F, D]
        (rf"{layer}/(self_attn/o_proj|mlp/down_proj)/bias", P()),
        (rf"{layer}/(input|post_attention)_layernorm/scale", P()),
        (rf"{p}/norm/scale", P()),
    )


def model_split_sizes(cfg: LlamaConfig, prefix: str = "text_config") -> dict[str, int]:
    """{config field: size} of the dimensions `partition_rules` splits over the model axis."""
    return {
        f"{prefix}.num_attention_heads": cfg.num_attention_heads,
        f"{prefix}.num_key_value_heads": cfg.num_key_value_heads,
        f"{prefix}.intermediate_size": cfg.intermediate_size,
        f"{prefix}.vocab_size": cfg.vocab_size,
    }


def rope_inv_freq(cfg: LlamaConfig) -> Array:
    """Inverse frequencies [H/2] as HF's rope init functions compute them."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        low_wavelen = cfg.rope_original_max_position_embeddings / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_position_embeddings / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (
            cfg.rope_original_max_position_embeddings / wavelen - cfg.rope_low_freq_factor
        ) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(cfg: LlamaConfig, positions: Array, table_size: int | None = None
                 ) -> tuple[Array, Array]:  # fmt: skip
    """cos, sin: float32[B, S, H] for integer positions [B, S].

    table_size: a static bound on the positions (0 <= position < table_size): cos and sin
    are then computed at trace time for every position below it (a constant of the
    compiled program, the same float32 values) and looked up. Computed in the graph
    instead, XLA's CPU fusion re-evaluates them inside every head's and every layer's q and
    k rotation (about 12 transcendentals per element and layer); a lookup is a load.
    """
    if table_size is None:
        freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)  # [B, S, H/2]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)
    cos, sin = _rope_table(cfg, table_size)
    return jnp.asarray(cos)[positions], jnp.asarray(sin)[positions]


@functools.cache
def _rope_table(cfg: LlamaConfig, size: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32[size, H] of positions [0, size), computed once per (config, size):
    every trace of every program (and under every mesh) reads the same host constant."""
    with jax.ensure_compile_time_eval():
        cos, sin = rope_cos_sin(cfg, jnp.arange(size)[None])
        return np.asarray(cos[0]), np.asarray(sin[0])


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, S, N, H]; the rotate-half convention of HF Llama."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None] + rotated.astype(jnp.float32) * sin[:, :, None]
    return out.astype(x.dtype)


def explicit_attention(q: Array, k: Array, v: Array, mask: Array, want_full: bool = False
                       ) -> tuple[Array, Array, Array | None]:  # fmt: skip
    """Eager softmax attention (HF's eager path, float32 softmax): output [B, S, N, H], the
    last query's probabilities f32[B, N, K], and every query's f32[B, N, S, K] if want_full.

    Computed head-major ([B, G, R x S, H] queries against [B, G, K, H] keys, R = N / G query
    heads a key/value head), normalised after the value product (`common.softmax_values`;
    the rows are exp / sum, the same numbers as jax.nn.softmax). On the CPU, at the demo
    model's prefix, tail and pair-tail shapes, the head-major layout was 1.3-1.7x faster
    than jax.nn.dot_product_attention (whose default is this same XLA einsum path, not a
    fused kernel) plus a separate last-query row.
    """
    b, s, n, h = q.shape
    kl, g = k.shape[1], k.shape[2]
    r = n // g
    f32 = jnp.float32
    qh = q.reshape(b, s, g, r, h).transpose(0, 2, 3, 1, 4).reshape(b, g, r * s, h)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, K, H]
    logits = jnp.einsum("bgqh,bgkh->bgqk", qh, kh, preferred_element_type=f32)
    logits = logits.reshape(b, n, s, kl) / math.sqrt(h)
    logits = jnp.where(mask[:, None], logits, jnp.finfo(f32).min)
    out, e, total = softmax_values(logits.reshape(b, g, r * s, kl), vh)
    out = out.astype(v.dtype).reshape(b, g, r, s, h).transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)
    e, total = e.reshape(b, n, s, kl), total.reshape(b, n, s, 1)
    rows = e[:, :, -1] / total[:, :, -1]
    return out, rows, (e / total if want_full else None)


def attend(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    delta: Array | None,
    want_full: bool,
) -> tuple[Array, Array, Array | None]:
    """Grouped-query attention; returns output, last-query rows and (optionally) full probs.

    One explicit float32 softmax (`explicit_attention`) gives both the output and the last
    query's row, which is all a ViCrop map reads. `delta` [B, N, K] is added to that row:
    since only the last row changes, (P + delta) V = P V + delta V on the last query, so
    `jax.grad` w.r.t. delta is d(output)/d(attention row).

    q: [B, S, N, H]; k, v: [B, K, G, H]; mask: bool[B, S, K].
    Returns out [B, S, N, H], rows float32[B, N, K], probs float32[B, N, S, K] or None.
    """
    b, s, n, h = q.shape
    g = k.shape[2]
    out, rows, probs = explicit_attention(q, k, v, mask, want_full)
    if delta is not None:
        dv = jnp.einsum(
            "bgrk,bkgh->bgrh", delta.reshape(b, g, n // g, -1).astype(v.dtype), v
        ).reshape(b, n, h)
        out = out.at[:, -1].add(dv.astype(out.dtype))
        rows = rows + delta.astype(jnp.float32)
    return out, rows, probs


def prefix_decode_attention(q: Array, pk: Array, pv: Array, k: Array, v: Array,
                            mask: Array) -> tuple[Array, Array]:  # fmt: skip
    """Attention of new queries over a shared prefix and each row's own slots, without
    copying the prefix per row: one softmax over both parts' logits (float32).

    q: [B, S, N, H]; pk, pv: [Bp, P, G, H] (row i reads prefix row i % Bp); k, v: [B, K, G, H];
    mask: bool[B, S, P + K]. Returns out [B, S, N, H] and the last query's rows
    float32[B, N, P + K] (prefix keys first).
    """
    b, s, n, h = q.shape
    bp, p, g, _ = pk.shape
    qg = q.reshape(b // bp, bp, s, g, n // g, h)
    f32 = jnp.float32
    lp = jnp.einsum("tbsgrh,bkgh->tbgrsk", qg, pk, preferred_element_type=f32)
    lp = lp.reshape(b, g, n // g, s, p)
    lk = jnp.einsum("bsgrh,bkgh->bgrsk", qg.reshape(b, s, g, n // g, h), k,
                    preferred_element_type=f32)  # fmt: skip
    logits = jnp.concatenate([lp, lk], axis=-1) / math.sqrt(h)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(f32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, G, R, S, P + K]
    pp = probs[..., :p].astype(v.dtype).reshape(b // bp, bp, g, n // g, s, p)
    out = jnp.einsum("tbgrsk,bkgh->tbsgrh", pp, pv).reshape(b, s, n, h)
    out = out + jnp.einsum("bgrsk,bkgh->bsgrh", probs[..., p:].astype(v.dtype), v).reshape(
        b, s, n, h
    )
    return out, probs[:, :, :, -1].reshape(b, n, -1)


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, delta, want_full, last_only=False):
        """kv: None, or (k_cache, v_cache, index, pk, pv, fresh): this layer's [B, K, G, H]
        cache slots, which it updates in place at [:, index:index + S] and returns, its
        [Bp, P, G, H] shared prefix (KVCache.prefix_k/v, or None), and whether the cache
        was empty before this pass (KVCache.fresh: then the queries attend to this pass's
        S keys alone, not to the K - S empty slots, and the rows are padded with zeros to
        K, the probabilities the empty slots get).
        last_only: keys and values for all S positions, the query (and so the output and
        the row) for the last one only: out [B, 1, D]."""
        cfg = self.config
        b, s, _ = x.shape
        n, g, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda f, name: nn.Dense(
            f, use_bias=cfg.attention_bias, name=name, promote_dtype=pinned_promote_dtype
        )
        k = dense(g * h, "k_proj")(x).reshape(b, s, g, h)
        v = dense(g * h, "v_proj")(x).reshape(b, s, g, h)
        k = apply_rope(k, cos, sin)
        if last_only:
            x, cos, sin, mask = x[:, -1:], cos[:, -1:], sin[:, -1:], mask[:, -1:]
        q = apply_rope(dense(n * h, "q_proj")(x).reshape(b, x.shape[1], n, h), cos, sin)
        pk, empty = None, 0
        if kv is not None:  # one dynamic-update-slice into this layer's own buffer, in place
            k_cache, v_cache, index, pk, pv, fresh = kv
            k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
            new_kv = tuple(
                jax.lax.dynamic_update_slice(buf, new, (0, index, 0, 0))
                for buf, new in ((k_cache, k), (v_cache, v))
            )
            if fresh:  # the slots after this pass's hold nothing yet: leave them out
                empty = k_cache.shape[1] - s
                mask = mask[..., : mask.shape[-1] - empty]
                rest = None if delta is None else delta[..., delta.shape[-1] - empty :]
                delta = None if delta is None else delta[..., : delta.shape[-1] - empty]
            else:
                k, v = new_kv
        else:
            new_kv = (k, v)
        if pk is not None:
            if q.shape[1] == 1 and delta is None and not want_full:  # no per-row prefix copy
                out, rows = prefix_decode_attention(q, pk, pv, k, v, mask)
                probs = None
            else:  # a prompt pass: this layer's prefix tiled over the rows (a transient)
                r = b // pk.shape[0]
                k = jnp.concatenate([jnp.tile(pk, (r, 1, 1, 1)), k], axis=1)
                v = jnp.concatenate([jnp.tile(pv, (r, 1, 1, 1)), v], axis=1)
                out, rows, probs = attend(q, k, v, mask, delta, want_full)
        else:
            out, rows, probs = attend(q, k, v, mask, delta, want_full)
        if empty:
            rows = jnp.pad(rows, ((0, 0), (0, 0), (0, empty)))
            rows = rows if rest is None else rows.at[..., -empty:].add(rest.astype(rows.dtype))
            if probs is not None:
                probs = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, empty)))
        out = dense(cfg.hidden_size, "o_proj")(out.reshape(b, q.shape[1], n * h))
        return out, new_kv, rows, probs


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = activation(cfg.hidden_act)
        dense = lambda f, name: nn.Dense(
            f, use_bias=cfg.mlp_bias, name=name, promote_dtype=pinned_promote_dtype
        )
        gate = dense(cfg.intermediate_size, "gate_proj")(x)
        up = dense(cfg.intermediate_size, "up_proj")(x)
        return dense(cfg.hidden_size, "down_proj")(act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, delta, want_full, last_only=False):
        """last_only: see LlamaAttention; returns the last position only."""
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x)
        h, kv, rows, probs = LlamaAttention(cfg, name="self_attn")(
            h, cos, sin, mask, kv, delta, want_full, last_only
        )
        x = (x[:, -1:] if last_only else x) + h
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        return x + LlamaMLP(cfg, name="mlp")(h), kv, rows, probs


class LlamaModel(nn.Module):
    """The decoder stack (HF LlamaModel). Embedding lookup is separate (`embed`).

    remat: recompute each layer's activations in the backward pass (`nn.remat` a layer, the
    same params): a gradient through the stack keeps the layers' inputs and one layer's
    activations at a time, not every layer's (the gradient maps' passes at real size).
    """

    config: LlamaConfig
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size)
        # static: want_full and last_only (self counts as argument 0)
        layer = (
            nn.remat(LlamaDecoderLayer, static_argnums=(7, 8)) if self.remat else LlamaDecoderLayer
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
          positions: int[B, S] RoPE positions.
          kv_mask: bool[B, K] which key slots are real tokens (K = S without a cache, else the
            cache length, already including this step's S slots).
          cache: optional KVCache; this pass writes its keys at cache.index (after the
            cache's shared prefix, when it has one: then K counts P + the cache's slots in
            attention rows and attn_delta).
          attn_delta: optional float[L, B, N, K] added to each layer's last-query row.
          output_full_attentions: also return every layer's [B, N, S, K] probabilities.
          last_only: the hidden state of the last position only (what a pass that wants
            the last logits reads): the final layer computes keys and values for every
            position (the cache needs them) and the rest (query, attention output, MLP)
            for the last one. Same rows and cache; ignored with output_full_attentions.

        Returns:
          hidden [B, S, D] (or [B, 1, D] with last_only) after the final norm,
          new (k, v): tuples of L arrays [B, K, G, H] (the cache's, or this pass's keys),
          rows float32[L, B, N, K], full probabilities [L, B, N, S, K] or None.
        """
        s = inputs_embeds.shape[1]
        start = 0 if cache is None else cache.index
        k_len = kv_mask.shape[1]
        q_slot = start + jnp.arange(s)  # [S] absolute cache slot of each query
        causal = jnp.arange(k_len)[None, :] <= q_slot[:, None]  # [S, K]
        # A left-padding query sees no real key; letting it see its own slot keeps every row
        # non-empty (an empty row's softmax would spread over masked keys, and a fused kernel
        # may give NaN there), and real rows never see it.
        own = jnp.arange(k_len)[None, :] == q_slot[:, None]
        mask = causal[None] & (kv_mask[:, None, :] | own[None])  # [B, S, K]
        prefix = (None, None) if cache is None else (cache.prefix_k, cache.prefix_v)
        p = 0 if prefix[0] is None else prefix[0][0].shape[1]
        window = self.config.sliding_window
        if window is not None:
            # Counted in positions (real tokens), so a left-padded row keeps its unpadded
            # run's window (HF counts padding slots too); keys after a prefix follow it.
            key_pos = p + jnp.cumsum(kv_mask, axis=1) - 1  # [B, K]
            mask &= positions[:, :, None] - key_pos[:, None, :] < window
        if p:  # the prefix is unpadded and precedes every query
            seen = jnp.ones((*mask.shape[:2], p), bool)
            if window is not None:
                seen = positions[:, :, None] - jnp.arange(p)[None, None] < window
            mask = jnp.concatenate([seen, mask], axis=-1)
        # Positions count real tokens, so each is below the number of key slots (prefix
        # included): a static bound for the lookup table.
        cos, sin = rope_cos_sin(self.config, positions, table_size=mask.shape[-1])
        x = inputs_embeds
        ks, vs, rows, fulls = [], [], [], []
        final = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            kv = None
            if cache is not None:
                pk, pv = (None, None) if prefix[0] is None else (prefix[0][i], prefix[1][i])
                kv = (cache.k[i], cache.v[i], cache.index, pk, pv, cache.fresh)
            delta = None if attn_delta is None else attn_delta[i]
            last = last_only and i == final and not output_full_attentions
            x, (k, v), r, p = layer(x, cos, sin, mask, kv, delta, output_full_attentions, last)
            ks.append(k)
            vs.append(v)
            rows.append(r)
            fulls.append(p)
        full = jnp.stack(fulls) if output_full_attentions else None
        return self.norm(x), (tuple(ks), tuple(vs)), jnp.stack(rows), full


def run_decoder(
    language_model: LlamaModel,
    logits_fn,
    embeds: Array,
    mask: Array,
    cache: KVCache | None,
    attn_delta: Array | None,
    output_full_attentions: bool,
    only_last_logits: bool,
):
    """The decoder half of a vision-language model's pass (shared by LLaVA and InstructBLIP).

    Positions count real tokens only (cumsum of the mask), so a padded row matches its
    unpadded run; with a cache, this pass's keys go to slots [index, index + S).

    Args:
      language_model: the bound LlamaModel submodule; logits_fn: hidden [B, S, D] -> logits.
      embeds: [B, S, D] prompt embeddings with the image features already placed.
      mask: bool[B, S]; cache, attn_delta, output_full_attentions: as LlamaModel.

    Returns:
      (logits float32[B, S or 1, V], new cache or None, rows [L, B, N, K], full or None).
    """
    s = embeds.shape[1]
    steps = jnp.cumsum(mask, axis=1) - 1
    if cache is None:
        positions = jnp.maximum(steps, 0)
        kv_mask = mask
    else:
        positions = cache.position[:, None] + jnp.maximum(steps, 0)
        kv_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
        cache = cache.replace(mask=kv_mask)
    hidden, (k, v), rows, full = language_model(
        embeds, positions, kv_mask, cache, attn_delta, output_full_attentions, only_last_logits
    )
    if only_last_logits:
        hidden = hidden[:, -1:]
    new_cache = None
    if cache is not None:
        new_cache = cache.replace(k=k, v=v, index=cache.index + s, position=positions[:, -1] + 1,
                                  fresh=False)  # fmt: skip
    return logits_fn(hidden).astype(jnp.float32), new_cache, rows, full
