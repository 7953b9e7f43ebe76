"""Greedy decoding over an explicit KV cache: one prefill, then a jitted while-loop of steps.

The prefill's outputs (last-query attention rows, first-token logits) are returned too, so
the pipeline reads the ViCrop map from the same pass that starts the baseline answer.

HF `generate(do_sample=False)` still runs the logits processors that the checkpoint's
generation_config.json sets (Qwen2.5-VL Instruct ships a repetition penalty);
`GenerationSettings` holds those settings, read at load time, and every decode applies them
as HF does. A setting that changes greedy tokens and is not implemented here is refused
when the checkpoint loads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vicrop_jax.models.common import KVCache, ModelOutput
from vicrop_jax.sharding import CACHE_SPEC, constrain

Array = jax.Array


@flax.struct.dataclass
class GenerateOutput:
    """tokens: int32[B, M] (pad after EOS); lengths: int32[B] tokens up to and incl. EOS;
    prefill: the prompt pass's ModelOutput (logits of the last position only)."""

    tokens: Array
    lengths: Array
    prefill: ModelOutput


# generation_config.json keys that change what HF generate(do_sample=False, max_new_tokens=M)
# returns (transformers 5.25: GenerationConfig.get_generation_mode, _get_logits_processor and
# _get_stopping_criteria), each with the values that leave greedy search unchanged; any other
# value is refused (`GenerationSettings.from_generation_config`). Keys not listed are either
# read elsewhere (eos_token_id), implemented (repetition_penalty), apply to sampling or beam
# search only (temperature, top_k, top_p, min_p, typical_p, length_penalty, ...: the callers
# pass do_sample=False, as the official code does) or are bookkeeping (pad/bos ids, max_length,
# which max_new_tokens overrides, use_cache, output flags, renormalize_logits: a log-softmax,
# which keeps the argmax).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
    "constraints": (None,),
    "force_words_ids": (None,),
    "dola_layers": (None,),
    "use_mtp": (None, False),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "token_healing": (None, False),
    "guidance_scale": (None, 1.0),
    "sequence_bias": (None, {}),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "watermarking_config": (None,),
    "stop_strings": (None, []),
    "max_time": (None,),
}


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The checkpoint's generation_config.json settings that change greedy tokens, for every
    family (hashable: a static argument of the jitted decoders).

    repetition_penalty: HF's RepetitionPenaltyLogitsProcessor: before each argmax, the logit
      of every token id in the prompt (left padding excluded) or generated so far is divided
      by it when positive and multiplied by it when negative; 1.0 leaves logits unchanged.
    """

    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, gen: dict) -> GenerationSettings:
        """generation_config.json's dict -> settings.

        Raises:
          ValueError: one line naming a key whose value changes greedy decoding and is not
            implemented (beam search, n-gram bans, forced tokens, ...), or an invalid
            repetition_penalty.
        """
        for key, neutral in _NEUTRAL.items():
            value = gen.get(key)
            if value not in neutral:
                raise ValueError(
                    f"{key} = {value!r} changes greedy decoding and is not implemented; "
                    f"supported values: {', '.join(map(repr, neutral))}"
                )
        alpha, top_k = gen.get("penalty_alpha"), gen.get("top_k")
        if alpha is not None and alpha > 0 and top_k is not None and top_k > 1:
            raise ValueError(
                f"penalty_alpha = {alpha!r} with top_k = {top_k!r} selects contrastive search, "
                "which is not implemented"
            )
        penalty = gen.get("repetition_penalty")
        if penalty is None:
            return cls()
        if (
            isinstance(penalty, bool)
            or not isinstance(penalty, (int, float))
            or not (math.isfinite(penalty) and penalty > 0)
        ):
            raise ValueError(f"repetition_penalty must be a positive number, got {penalty!r}")
        return cls(repetition_penalty=float(penalty))

    def identity(self) -> dict:
        """The settings as a JSON-ready dict (an evaluation's run identity)."""
        return dataclasses.asdict(self)


# HF's greedy search with no logits processor: the default of every decoder here.
PLAIN_GREEDY = GenerationSettings()


def prompt_tokens(input_ids: Array, attention_mask: Array | None, vocab: int) -> Array:
    """bool[B, V]: the token ids a repetition penalty sees in each prompt row.

    As HF's generate: every position from the row's first unmasked one on (left padding is
    skipped; padding inside the row would count), and ids past the logits' V ignored.
    """
    b, s = input_ids.shape
    counted = jnp.ones((b, s), bool)
    if attention_mask is not None:
        start = jnp.argmax(attention_mask != 0, axis=1)  # HF's prompt_ignore_length
        counted = jnp.arange(s)[None, :] >= start[:, None]
    ids = jnp.where(counted, jnp.minimum(input_ids, vocab), vocab)
    seen = jnp.zeros((b, vocab + 1), bool).at[jnp.arange(b)[:, None], ids].set(True)
    return seen[:, :vocab]


def penalise(logits: Array, seen: Array, penalty: float) -> Array:
    """HF's repetition penalty on float[B, V] logits (float32) for the ids marked in seen."""
    logits = logits.astype(jnp.float32)
    hit = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, hit, logits)


def init_cache(config, batch: int, length: int, dtype) -> KVCache:
    """An empty cache of `length` slots for a Llama-style text config (under a mesh: rows
    over the data axis, key/value heads over the model axis)."""
    t = config.text_config
    shape = (batch, length, t.num_key_value_heads, t.head_dim)
    layers = range(t.num_hidden_layers)
    zeros = lambda: constrain(jnp.zeros(shape, dtype), CACHE_SPEC)  # noqa: E731
    return KVCache(
        k=tuple(zeros() for _ in layers),
        v=tuple(zeros() for _ in layers),
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
        "module", "max_new_tokens", "eos_ids", "pad_id", "output_prefill", "decode_rows",
        "generation",
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
    generation: GenerationSettings = PLAIN_GREEDY,
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
      generation: the checkpoint's logits settings (Model.generation); the repetition penalty
        counts each row's prompt tokens (input_ids, left padding excluded) and its answer's.

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
    rows = b if decode_rows is None else decode_rows
    if rows != b:
        cache = slice_rows(cache, rows)
    first = pre.logits[:rows, -1]
    seen = None
    if generation.repetition_penalty != 1.0:
        seen = prompt_tokens(input_ids[:rows], attention_mask[:rows], first.shape[-1])
    tokens, lengths = decode(
        apply,
        first,
        cache,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        generation=generation,
        seen=seen,
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
           eos_ids: tuple[int, ...], pad_id: int,
           generation: GenerationSettings = PLAIN_GREEDY,
           seen: Array | None = None) -> tuple[Array, Array]:  # fmt: skip
    """Greedy steps after a prompt pass (traced inside a jitted caller).

    apply: the bound model's apply(ids, pixels, mask, cache=..., only_last_logits=...);
    first_logits float[B, V]: the prompt's last-position logits; cache: the prompt's cache
    (B rows, room for max_new_tokens more slots); generation: the logits settings; seen
    bool[B, V]: the prompt's token ids (`prompt_tokens`), needed when generation has a
    repetition penalty. Returns (tokens int32[B, M] padded with pad_id after EOS, lengths
    int32[B] up to and including EOS).
    """
    b = first_logits.shape[0]
    penalty = generation.repetition_penalty
    if penalty != 1.0 and seen is None:
        raise ValueError("a repetition penalty needs the prompt's tokens (seen)")
    if penalty == 1.0:
        seen = jnp.zeros((b, 0), bool)  # unused: an empty placeholder in the loop state

    def pick(logits, seen):
        if penalty != 1.0:
            logits = penalise(logits, seen, penalty)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if penalty != 1.0:
            seen = seen.at[jnp.arange(b), tok].set(True, mode="drop")
        return tok, seen

    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    tok, seen = pick(first_logits, seen)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, done, _, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, done, lengths, cache, tok, seen = state
        out = apply(tok[:, None], None, jnp.ones((b, 1), jnp.int32), cache=cache,
                    only_last_logits=True)  # fmt: skip
        nxt, seen = pick(out.logits[:, -1], seen)
        nxt = jnp.where(done, pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos)
        return step + 1, tokens, done, lengths, out.cache, nxt, seen

    state = (jnp.int32(1), tokens, done, lengths, cache, tok, seen)
    _, tokens, _, lengths, _, _, _ = jax.lax.while_loop(cond, body, state)
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
