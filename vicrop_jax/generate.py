"""Greedy decoding over an explicit KV cache: one prefill, then a jitted while-loop of steps.

The prefill's outputs (last-query attention rows, first-token logits) are returned too, so
the pipeline reads the ViCrop map from the same pass that starts the baseline answer.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vicrop_jax.models.common import KVCache, ModelOutput

Array = jax.Array


@flax.struct.dataclass
class GenerateOutput:
    """tokens: int32[B, M] (pad after EOS); lengths: int32[B] tokens up to and incl. EOS;
    prefill: the prompt pass's ModelOutput (logits of the last position only)."""

    tokens: Array
    lengths: Array
    prefill: ModelOutput


def init_cache(config, batch: int, length: int, dtype) -> KVCache:
    """An empty cache of `length` slots for a Llama-style text config."""
    t = config.text_config
    shape = (batch, length, t.num_key_value_heads, t.head_dim)
    layers = range(t.num_hidden_layers)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in layers),
        v=tuple(jnp.zeros(shape, dtype) for _ in layers),
        mask=jnp.zeros((batch, length), bool),
        index=jnp.zeros((), jnp.int32),
        position=jnp.zeros((batch,), jnp.int32),
        fresh=True,
    )


def param_dtype(params):
    return jax.tree.leaves(params)[0].dtype


@functools.partial(
    jax.jit,
    static_argnames=(
        "module", "max_new_tokens", "eos_ids", "pad_id", "output_prefill", "decode_rows"
    ),
)  # fmt: skip
def greedy_generate(
    module,
    params,
    input_ids: Array,
    pixel_values: Array | None,
    attention_mask: Array | None,
    attn_delta: Array | None = None,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pad_id: int,
    output_prefill: bool = True,
    extra: dict | None = None,
    decode_rows: int | None = None,
) -> GenerateOutput:
    """Greedy decoding (HF generate with do_sample=False), stopping at EOS or max_new_tokens.

    Args:
      module: a model module whose __call__ takes (input_ids, pixel_values, attention_mask,
        cache=..., only_last_logits=...) and returns ModelOutput.
      params: its params.
      input_ids: int[B, S], left-padded; pixel_values: float[I, H, W, C] (NHWC) or None.
      attention_mask: int[B, S] or None.
      max_new_tokens: M, the most tokens generated per row.
      eos_ids: token ids that end a row; pad_id fills a row after it ended.
      extra: optional dict of further keyword arrays for the prefill pass only (InstructBLIP's
        qformer_input_ids / qformer_attention_mask, or precomputed image_features).
      decode_rows: decode only the first rows of the batch after the prefill (rel-att reads
        the map from a prefill of [questions; general prompts] and answers the questions
        only); tokens and lengths then have decode_rows rows, the prefill all of them.

    Returns:
      GenerateOutput.
    """
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, s), jnp.int32)
    cache = init_cache(module.config, b, s + max_new_tokens, param_dtype(params))
    apply = functools.partial(module.apply, {"params": params})
    pre = apply(
        input_ids, pixel_values, attention_mask, cache=cache, attn_delta=attn_delta,
        only_last_logits=True, **(extra or {}),
    )  # fmt: skip
    cache = pre.cache
    if decode_rows is not None and decode_rows != b:
        cache = slice_rows(cache, decode_rows)
    tokens, lengths = decode(
        apply,
        pre.logits[: cache.mask.shape[0], -1],
        cache,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )
    prefill = pre.replace(cache=None) if not output_prefill else pre
    return GenerateOutput(tokens=tokens, lengths=lengths, prefill=prefill)


def slice_rows(cache: KVCache, rows: int) -> KVCache:
    """The cache of the first `rows` rows."""
    return cache.replace(
        k=tuple(x[:rows] for x in cache.k), v=tuple(x[:rows] for x in cache.v),
        mask=cache.mask[:rows], position=cache.position[:rows],
    )  # fmt: skip


def decode(apply, first_logits: Array, cache: KVCache, *, max_new_tokens: int,
           eos_ids: tuple[int, ...], pad_id: int) -> tuple[Array, Array]:  # fmt: skip
    """Greedy steps after a prompt pass (traced inside a jitted caller).

    apply: the bound model's apply(ids, pixels, mask, cache=..., only_last_logits=...);
    first_logits float[B, V]: the prompt's last-position logits; cache: the prompt's cache
    (B rows, room for max_new_tokens more slots). Returns (tokens int32[B, M] padded with
    pad_id after EOS, lengths int32[B] up to and including EOS).
    """
    b = first_logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    tok = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, done, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, done, lengths, cache, tok = state
        out = apply(tok[:, None], None, jnp.ones((b, 1), jnp.int32), cache=cache,
                    only_last_logits=True)  # fmt: skip
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos)
        return step + 1, tokens, done, lengths, out.cache, nxt

    state = (jnp.int32(1), tokens, done, lengths, cache, tok)
    _, tokens, _, lengths, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, lengths


def pad_id(tokenizer) -> int:
    """The id that fills a row after EOS: the tokenizer's pad token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def answer_texts(tokenizer, tokens, lengths) -> list[str]:
    """Generated rows (tokens [B, M], lengths [B]) as stripped answer strings."""
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in trim(tokens, lengths)]


def trim(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """Per-row token lists cut at their lengths (EOS included)."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [tokens[i, : lengths[i]].tolist() for i in range(tokens.shape[0])]
