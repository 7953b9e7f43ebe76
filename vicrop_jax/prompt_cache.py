"""The shared-prompt KV cache: a question's prompts share their tokens through the first image.

For a family whose prompts start with the image (`Family.shares_prompt_prefix`; LLaVA-1.5:
BOS, then the first image's T tokens, then the text, the [original, crop] prompt putting the
crop's T tokens before the text) the question prompt, the general-description prompt and the
[original, crop] prompt of one question share their first 1 + T tokens, which are most of
each prompt (577 of about 620 for LLaVA-1.5-7B). This module runs that prefix once per
question:

  1. `start`: the vision tower on the originals, the prefix pass (one row per question) into
     a KV cache, then the question and general tails as 2B rows that both read that
     cache. The tails' last-query rows at the map layer(s) give the rel-att map; the
     question rows go on to the baseline answer.
  2. (host) the box search on the maps, the crops, their preprocessing.
  3. `finish`: the vision tower on the crops and the [original, crop] tails over the same
     prefix cache, then their answers.

`start_answers` is step 1 without the map (the baseline answers and the cache only), for
maps asked with another question (V*'s short one) or by another method;
`pipeline.answer_batch` runs every method's crop answer through `finish`. Each pass gives its
tails a cache of their own slots that reads the prefix cache in place (KVCache.prefix_k/v):
the question and general rows share one copy of the prefix, and no pass copies it.

Same maps and answers as the unshared passes (tests/test_pipeline.py and the eval engine's
tests compare them; tests/test_prompt_cache.py checks logits and attention rows against HF
PyTorch on the full prompts): the prefix has no padding, so its keys and RoPE positions
are the unshared prompt's; the tails are left-padded inside their own cache (masked slots)
and their positions continue from the prefix's.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vicrop_jax.families import family_of
from vicrop_jax.generate import (
    PLAIN_GREEDY,
    GenerationSettings,
    answer_texts,
    decode,
    init_cache,
    pad_id,
    param_dtype,
    prompt_tokens,
    slice_rows,
)
from vicrop_jax.loading import Model
from vicrop_jax.maps import safe_ratio
from vicrop_jax.models.common import KVCache
from vicrop_jax.processing import GENERAL_QUESTION, image_pixels
from vicrop_jax.sharding import CACHE_SPEC, constrain

Array = jax.Array
# The tails' lengths are bucketed to a multiple of this (fewer compiled shapes).
TAIL_BUCKET = 8


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class Prompts:
    """Token ids of a batch's prompts split at the shared prefix.

    prefix: int32[P] (BOS and the first image's tokens, the same for every prompt);
    question_general: int32[2B, L1] left-padded tails of [question prompts; general
    prompts], question_general_mask;
    pair: int32[B, L2] left-padded tails of the [original, crop] prompts, pair_mask.
    """

    prefix: np.ndarray
    question_general: np.ndarray
    question_general_mask: np.ndarray
    pair: np.ndarray
    pair_mask: np.ndarray


# tokenizer -> whether one image placeholder tokenises like T of them (see _expanded_ids)
_SPLITS_ON_IMAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _expanded_ids(model: Model, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` as the processor gives them, each image placeholder expanded to
    the model's T image tokens: tokenised with one placeholder an image and the image id
    repeated afterwards (the placeholder is an added token that the tokenizer splits on, so
    the text around it tokenises the same; T x shorter strings to tokenise, 576 for
    LLaVA-1.5). The first call with a tokenizer also tokenises its first text expanded, as
    the processor does, and that tokenizer takes the expanded way for good if the two
    disagree."""
    tok = model.processor.tokenizer
    t, image_id = model.config.num_image_tokens, model.config.image_token_index
    image_text = getattr(model.processor, "image_token", "<image>")
    full = lambda xs: tok([x.replace(image_text, image_text * t) for x in xs],
                          add_special_tokens=True)["input_ids"]  # fmt: skip
    if not _SPLITS_ON_IMAGE.get(tok, True):
        return full(texts)
    expand = lambda row: [x for i in row for x in ([i] * t if i == image_id else [i])]
    ids = [expand(row) for row in tok(texts, add_special_tokens=True)["input_ids"]]
    if ids and tok not in _SPLITS_ON_IMAGE:
        _SPLITS_ON_IMAGE[tok] = ids[0] == full(texts[:1])[0]
    return ids if _SPLITS_ON_IMAGE.get(tok, True) else full(texts)


def split_prompts(model: Model, questions: Sequence[str], multiple: int = TAIL_BUCKET) -> Prompts:
    """Tokenises the three prompts of each question and splits off their common prefix.

    Raises ValueError when the prompts do not start with the same tokens through the first
    image (a template that puts text before the image cannot share the prefix).
    """
    tok = model.processor.tokenizer
    t, image_id = model.config.num_image_tokens, model.config.image_token_index
    n = len(questions)
    prompt = family_of(model).prompt
    texts = [prompt(q) for q in questions] + [prompt(GENERAL_QUESTION)]
    texts += [prompt(q, 2) for q in questions]
    ids = _expanded_ids(model, texts)
    ids = ids[:n] + ids[n : n + 1] * n + ids[n + 1 :]  # the general prompt, once a question
    if image_id not in ids[0]:
        raise ValueError("the prompt has no image token; cannot share its prefix")
    p = ids[0].index(image_id) + t
    prefix = ids[0][:p]
    tails = []
    for row in ids:
        if row[:p] != prefix:
            raise ValueError("the prompts do not share their tokens through the first image")
        tails.append(row[p:])

    def pad(rows):
        length = _bucket(max(len(r) for r in rows), multiple)
        out = np.full((len(rows), length), pad_id(tok), np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            out[i, length - len(r) :] = r
            mask[i, length - len(r) :] = 1
        return out, mask

    question_general, question_general_mask = pad(tails[: 2 * n])
    pair, pair_mask = pad(tails[2 * n :])
    return Prompts(np.asarray(prefix, np.int32), question_general, question_general_mask, pair,
                   pair_mask)  # fmt: skip


def _tail_cache(prefix, copies: int, length: int) -> KVCache:
    """An empty cache of `length` slots (one tail and its answer) for `copies` x B rows that
    attend to the prefix cache's keys first, through KVCache.prefix_k/v: the prefix is read
    in place, never padded or copied per row (row i reads prefix row i % B)."""
    b, _, g, h = prefix.k[0].shape
    shape = (copies * b, length, g, h)
    zeros = lambda x: constrain(jnp.zeros(shape, x.dtype), CACHE_SPEC)  # noqa: E731
    return KVCache(
        k=tuple(zeros(x) for x in prefix.k),
        v=tuple(zeros(x) for x in prefix.v),
        mask=jnp.zeros((copies * b, length), bool),
        index=jnp.zeros((), jnp.int32),
        position=jnp.tile(prefix.position, copies),
        prefix_k=prefix.k,
        prefix_v=prefix.v,
        fresh=True,
    )


def _prefix_cache(apply, module, params, prefix, pixels):
    """The vision tower on the originals and the prefix pass, one row per image, into a KV
    cache of exactly the prefix's slots."""
    b, p = pixels.shape[0], prefix.shape[0]
    feats, _ = apply(pixels, method=lambda m, x: m.image_features(x))
    cache = init_cache(module.config, b, p, param_dtype(params))
    ids = jnp.broadcast_to(prefix, (b, p))
    return apply(ids, None, None, cache=cache, only_last_logits=True,
                 image_features=feats).cache  # fmt: skip


def _seen(generation: GenerationSettings, prefix, tails, tails_mask, vocab: int):
    """bool[R, V]: the token ids of each row's whole prompt (the shared prefix, then its
    left-padded tail) for the repetition penalty, as HF sees the unshared prompt; None
    without a penalty."""
    if generation.repetition_penalty == 1.0:
        return None
    shared = prompt_tokens(prefix[None, :], None, vocab)  # [1, V]
    return shared | prompt_tokens(tails, tails_mask, vocab)


_STATIC = ("module", "max_new_tokens", "eos_ids", "pad_id", "generation")


@functools.partial(jax.jit, static_argnames=_STATIC)
def answer_pass(module, params, prefix, pixels, q, q_mask, *, max_new_tokens, eos_ids,
                pad_id, generation=PLAIN_GREEDY):  # fmt: skip
    """Prefix pass and question tails, then the baseline answers (jitted); no maps.

    q, q_mask int32[B, L1]. Returns (tokens int32[B, M], lengths int32[B], the prefix cache).
    """
    apply = functools.partial(module.apply, {"params": params})
    cache = _prefix_cache(apply, module, params, prefix, pixels)
    tail = _tail_cache(cache, 1, q.shape[1] + max_new_tokens)
    out = apply(q, None, q_mask, cache=tail, only_last_logits=True)
    first = out.logits[:, -1]
    seen = _seen(generation, prefix, q, q_mask, first.shape[-1])
    tokens, lengths = decode(apply, first, out.cache, max_new_tokens=max_new_tokens,
                             eos_ids=eos_ids, pad_id=pad_id, generation=generation,
                             seen=seen)  # fmt: skip
    return tokens, lengths, cache


@functools.partial(
    jax.jit,
    static_argnames=(*_STATIC, "layers", "image_start"),
)  # fmt: skip
def start_pass(module, params, prefix, pixels, tails, tails_mask, *, layers, image_start,
               max_new_tokens, eos_ids, pad_id, generation=PLAIN_GREEDY):  # fmt: skip
    """Prefix pass, [question; general] tails, rel-att maps, baseline answers (jitted).

    prefix int32[P]; pixels float[B, H, W, C]; tails, tails_mask int32[2B, L1]. Returns (maps
    float32[B, N, N], tokens int32[B, M], lengths int32[B], the prefix cache: the prefix's
    slots only).
    """
    b = pixels.shape[0]
    apply = functools.partial(module.apply, {"params": params})
    cache = _prefix_cache(apply, module, params, prefix, pixels)
    tail_cache = _tail_cache(cache, 2, tails.shape[1] + max_new_tokens)
    out = apply(tails, None, tails_mask, cache=tail_cache, only_last_logits=True)
    t = module.config.num_image_tokens
    rows = out.attentions[jnp.asarray(layers)][..., image_start : image_start + t]  # [l,2B,N,T]
    att = rows.mean((0, 2))  # [2B, T]
    maps = family_of(module.config).grid_map(module.config, safe_ratio(att[:b], att[b:]))
    first = out.logits[:b, -1]
    tokens, lengths = decode(
        apply,
        first,
        slice_rows(out.cache, b),
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        generation=generation,
        seen=_seen(generation, prefix, tails[:b], tails_mask[:b], first.shape[-1]),
    )
    return maps, tokens, lengths, cache


@functools.partial(jax.jit, static_argnames=_STATIC)
def finish_pass(module, params, cache, crop_pixels, pair, pair_mask, *, max_new_tokens,
                eos_ids, pad_id, generation=PLAIN_GREEDY, prefix=None):  # fmt: skip
    """The [original, crop] tails over the prefix cache, then their answers (jitted).

    prefix int32[P]: the shared prefix's ids, needed only for a repetition penalty."""
    apply = functools.partial(module.apply, {"params": params})
    feats, _ = apply(crop_pixels, method=lambda m, x: m.image_features(x))
    tail = _tail_cache(cache, 1, pair.shape[1] + max_new_tokens)
    out = apply(pair, None, pair_mask, cache=tail, only_last_logits=True, image_features=feats)
    first = out.logits[:, -1]
    return decode(
        apply,
        first,
        out.cache,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        generation=generation,
        seen=_seen(generation, prefix, pair, pair_mask, first.shape[-1]),
    )


@dataclasses.dataclass
class PromptCache:
    """The prefix KV cache of a batch's questions and what was read from its pass: maps
    float32[B, N, N] (device; None from `start_answers`), the baseline answers, and the
    state `finish` continues from."""

    maps: Array
    answers: list[str]
    prompts: Prompts
    cache: object
    params: object
    max_new_tokens: int


def _eos_pad(model: Model):
    return model.config.text_config.eos_ids, pad_id(model.processor.tokenizer)


def start_inputs(model: Model, images: Sequence[Image.Image], questions: Sequence[str], *,
                 max_new_tokens: int, layer=None, params=None,
                 multiple: int = TAIL_BUCKET):  # fmt: skip
    """(Prompts, args tuple, kwargs dict) of `start_pass` for B RGB images and checked
    questions: what `start` runs, exposed so that a benchmark can compile and time the pass
    by itself. multiple: the tails' lengths are bucketed to a multiple of it."""
    if not family_of(model).shares_prompt_prefix:
        raise ValueError(f"{model.family} prompts do not start with a shared image prefix")
    params = model.params_or(params)
    prompts = split_prompts(model, questions, multiple)
    eos_ids, pad = _eos_pad(model)
    pixels = image_pixels(model.processor, images)
    image_start = int(np.argmax(prompts.prefix == model.config.image_token_index))
    tails = prompts.question_general, prompts.question_general_mask
    args = (model.module, params, jnp.asarray(prompts.prefix), jnp.asarray(pixels),
            *(jnp.asarray(x) for x in tails))  # fmt: skip
    kwargs = dict(layers=family_of(model).layers(model.config, layer), image_start=image_start,
                  max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad,
                  generation=model.generation)  # fmt: skip
    return prompts, args, kwargs


def start(model: Model, images: Sequence[Image.Image], questions: Sequence[str], *,
          max_new_tokens: int, layer=None, params=None,
          multiple: int = TAIL_BUCKET) -> PromptCache:  # fmt: skip
    """Step 1 for B RGB images and checked questions (see the module docstring); multiple:
    the tails' bucket multiple."""
    prompts, args, kwargs = start_inputs(model, images, questions, max_new_tokens=max_new_tokens,
                                         layer=layer, params=params,
                                         multiple=multiple)  # fmt: skip
    maps, tokens, lengths, cache = start_pass(*args, **kwargs)
    answers = answer_texts(model.processor.tokenizer, tokens, lengths)
    return PromptCache(maps, answers, prompts, cache, args[1], max_new_tokens)


def start_answers(model: Model, images: Sequence[Image.Image], questions: Sequence[str], *,
                  max_new_tokens: int, params=None,
                  multiple: int = TAIL_BUCKET) -> PromptCache:  # fmt: skip
    """`start` without the map: the baseline answers and the prefix cache that `finish`
    continues from (for maps asked with another question, or none). `maps` is None."""
    prompts, args, kwargs = start_inputs(model, images, questions, max_new_tokens=max_new_tokens,
                                         params=params, multiple=multiple)  # fmt: skip
    b = len(questions)
    module, params, prefix, pixels, tails, tails_mask = args
    tokens, lengths, cache = answer_pass(
        module, params, prefix, pixels, tails[:b], tails_mask[:b], max_new_tokens=max_new_tokens,
        eos_ids=kwargs["eos_ids"], pad_id=kwargs["pad_id"], generation=model.generation,
    )  # fmt: skip
    answers = answer_texts(model.processor.tokenizer, tokens, lengths)
    return PromptCache(None, answers, prompts, cache, params, max_new_tokens)


def finish(model: Model, state: PromptCache, crops: Sequence[Image.Image]) -> list[str]:
    """Step 3: the answers given [original, crop] for each question of `start`."""
    eos_ids, pad = _eos_pad(model)
    p = state.prompts
    pixels = image_pixels(model.processor, crops)
    tokens, lengths = finish_pass(
        model.module, state.params, state.cache, jnp.asarray(pixels),
        jnp.asarray(p.pair), jnp.asarray(p.pair_mask), max_new_tokens=state.max_new_tokens,
        eos_ids=eos_ids, pad_id=pad, generation=model.generation, prefix=jnp.asarray(p.prefix),
    )  # fmt: skip
    return answer_texts(model.processor.tokenizer, tokens, lengths)
