"""The shared-prompt KV cache (vicrop_jax.prompt_cache) against the processor and HF PyTorch
on the full prompts (shared vs separate passes end to end: tests/test_pipeline.py and
tests/test_eval_run.py)."""

import numpy as np
import pytest
from PIL import Image

from vicrop_jax import prompt_cache
from vicrop_jax.processing import GENERAL_QUESTION, encode, llava_prompt

QS = ["What is written on the sign?", "What color is the small square near the door?"]


def _unpadded(ids, mask):
    return [list(r[m == 1]) for r, m in zip(ids, mask, strict=True)]


def test_prefix_and_tails_are_the_processors_tokens(tiny_llava):
    model, _ = tiny_llava
    p = prompt_cache.split_prompts(model, QS)
    im = Image.new("RGB", (40, 30))
    texts = [llava_prompt(q) for q in QS] + [llava_prompt(GENERAL_QUESTION)] * 2
    texts += [llava_prompt(q, 2) for q in QS]
    images = [im] * 4 + [im, im] * 2
    enc = encode(model.processor, texts, images)
    want = _unpadded(enc["input_ids"], enc["attention_mask"])
    tails = _unpadded(p.question_general, p.question_general_mask) + _unpadded(p.pair, p.pair_mask)
    assert [list(p.prefix) + t for t in tails] == want
    assert (
        p.question_general.shape[1] % 8 == 0 and p.pair.shape[1] % 8 == 0
    )  # bucketed tail lengths


def test_prompts_without_a_common_image_prefix_are_refused(tiny_llava, monkeypatch):
    model, _ = tiny_llava
    from vicrop_jax.families.llava import Llava

    monkeypatch.setattr(Llava, "prompt", lambda self, q, n=1: f"USER: {q} " + "<image>" * n)
    with pytest.raises(ValueError, match="do not share"):
        prompt_cache.split_prompts(model, QS)


def test_rows_over_one_shared_prefix_match_hf_full_prompts(tiny_llava):
    """Question and general tails (2 x B rows) over one B-row prefix cache (KVCache.prefix_k,
    not copied), then one decode step (the split softmax): logits and attention rows equal
    HF PyTorch's on each full, unpadded prompt."""
    import functools

    import jax.numpy as jnp
    import torch

    from vicrop_jax.processing import image_pixels

    model, hf = tiny_llava
    rng = np.random.default_rng(5)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))
            for h, w in ((50, 61), (43, 37))]  # fmt: skip
    p = prompt_cache.split_prompts(model, QS)
    apply = functools.partial(model.module.apply, {"params": model.params})
    pix = jnp.asarray(image_pixels(model.processor, imgs))
    cache = prompt_cache._prefix_cache(
        apply, model.module, model.params, jnp.asarray(p.prefix), pix
    )
    tails = prompt_cache._tail_cache(cache, 2, p.question_general.shape[1] + 1)
    assert tails.k[0].shape[0] == 4 and tails.prefix_k[0].shape[0] == 2
    out = apply(
        jnp.asarray(p.question_general),
        None,
        jnp.asarray(p.question_general_mask),
        cache=tails,
        only_last_logits=True,
    )
    nxt = jnp.argmax(out.logits[:, -1], -1)
    step = apply(nxt[:, None], None, jnp.ones((4, 1), jnp.int32), cache=out.cache,
                 only_last_logits=True)  # fmt: skip
    texts = [llava_prompt(q) for q in QS] + [llava_prompt(GENERAL_QUESTION)] * 2
    n_pre = len(p.prefix)
    for i, text in enumerate(texts):
        enc = encode(model.processor, [text], [imgs[i % 2]])
        ids = torch.tensor(enc["input_ids"])
        kw = dict(pixel_values=torch.tensor(enc["pixel_values"]))
        with torch.no_grad():
            ref = hf(input_ids=ids, output_attentions=True, **kw)
            ref2 = hf(input_ids=torch.cat([ids, torch.tensor([[int(nxt[i])]])], 1), **kw)
        np.testing.assert_allclose(out.logits[i, -1], ref.logits[0, -1].numpy(), atol=1e-4)
        np.testing.assert_allclose(step.logits[i, -1], ref2.logits[0, -1].numpy(), atol=1e-4)
        real = np.concatenate(
            [np.arange(n_pre), n_pre + np.flatnonzero(p.question_general_mask[i])]
        )
        for layer, a in enumerate(ref.attentions):
            got = np.asarray(out.attentions[layer, i])[:, real]
            np.testing.assert_allclose(got, a[0, :, -1].numpy(), atol=1e-5, err_msg=f"{i} {layer}")
            pad = np.setdiff1d(np.arange(out.attentions.shape[-1]), real)
            assert np.abs(np.asarray(out.attentions[layer, i])[:, pad]).max() == 0.0


def test_a_tokenizer_that_merges_across_the_placeholder_takes_the_expanded_way(tiny_llava):
    """split_prompts tokenises one placeholder an image and repeats the image id; a tokenizer
    for which that differs from tokenising the expanded text (checked once) gets the
    expanded text, as the processor tokenises it."""
    model, _ = tiny_llava
    tok = model.processor.tokenizer
    prompt_cache._SPLITS_ON_IMAGE.pop(tok, None)
    good = prompt_cache.split_prompts(model, QS)
    assert prompt_cache._SPLITS_ON_IMAGE[tok] is True
    prompt_cache._SPLITS_ON_IMAGE[tok] = False  # as if the check had failed: the expanded way
    try:
        slow = prompt_cache.split_prompts(model, QS)
    finally:
        prompt_cache._SPLITS_ON_IMAGE.pop(tok, None)
    for name in ("prefix", "question_general", "question_general_mask", "pair", "pair_mask"):
        np.testing.assert_array_equal(getattr(slow, name), getattr(good, name))


def test_a_fresh_cache_skips_its_empty_slots_with_the_same_results(tiny_llava):
    """KVCache.fresh: the first pass into an empty cache attends to its own keys only (the
    answer's room left out); logits, full-width rows (zeros on the room), the gradient of an
    attention perturbation and the written cache equal those of the same pass over every
    slot (fresh=False)."""
    import functools

    import jax
    import jax.numpy as jnp

    from vicrop_jax.generate import init_cache
    from vicrop_jax.processing import image_pixels

    model, _ = tiny_llava
    enc = encode(model.processor, [llava_prompt(q) for q in QS], [Image.new("RGB", (40, 30))] * 2)
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    pix = jnp.asarray(image_pixels(model.processor, [Image.new("RGB", (40, 30))] * 2))
    apply = functools.partial(model.module.apply, {"params": model.params})
    b, s = ids.shape
    room = 7
    t = model.config.text_config
    delta0 = jnp.zeros((t.num_hidden_layers, b, t.num_attention_heads, s + room))

    def run(fresh):
        cache = init_cache(model.config, b, s + room, jnp.float32).replace(fresh=fresh)

        def f(delta):
            out = apply(ids, pix, mask, cache=cache, attn_delta=delta, only_last_logits=True)
            return out.logits[:, -1].max(-1).sum(), out

        (_, out), grad = jax.value_and_grad(f, has_aux=True)(delta0)
        return out, grad

    (a, ga), (b_, gb) = run(True), run(False)
    assert (
        a.attentions.shape
        == b_.attentions.shape
        == (t.num_hidden_layers, b, t.num_attention_heads, s + room)
    )
    np.testing.assert_allclose(a.logits, b_.logits, atol=1e-5)
    np.testing.assert_allclose(a.attentions, b_.attentions, atol=1e-6)
    assert not np.asarray(a.attentions[..., s:]).any()
    np.testing.assert_allclose(ga, gb, atol=1e-5)
    for x, y in zip(a.cache.k + a.cache.v, b_.cache.k + b_.cache.v, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    assert not a.cache.fresh and not b_.cache.fresh
