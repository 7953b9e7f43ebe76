"""The shared-prefix rel-att path (vicrop_jax.prefix) against the processor and the
separate passes."""

import numpy as np
import pytest
from PIL import Image

from vicrop_jax import pipeline, prefix
from vicrop_jax.processing import GENERAL_QUESTION, encode, llava_prompt

QS = ["What is written on the sign?", "What color is the small square near the door?"]


def _unpadded(ids, mask):
    return [list(r[m == 1]) for r, m in zip(ids, mask, strict=True)]


def test_prefix_and_tails_are_the_processors_tokens(tiny_llava):
    model, _ = tiny_llava
    p = prefix.split_prompts(model, QS)
    im = Image.new("RGB", (40, 30))
    texts = [llava_prompt(q) for q in QS] + [llava_prompt(GENERAL_QUESTION)] * 2
    texts += [llava_prompt(q, 2) for q in QS]
    images = [im] * 4 + [im, im] * 2
    enc = encode(model.processor, texts, images)
    want = _unpadded(enc["input_ids"], enc["attention_mask"])
    tails = _unpadded(p.qg, p.qg_mask) + _unpadded(p.pair, p.pair_mask)
    assert [list(p.prefix) + t for t in tails] == want
    assert p.qg.shape[1] % 8 == 0 and p.pair.shape[1] % 8 == 0  # bucketed tail lengths


def test_prompts_without_a_common_image_prefix_are_refused(tiny_llava, monkeypatch):
    model, _ = tiny_llava
    monkeypatch.setattr(prefix, "llava_prompt", lambda q, n=1: f"USER: {q} " + "<image>" * n)
    with pytest.raises(ValueError, match="do not share"):
        prefix.split_prompts(model, QS)


def test_batch_of_mixed_sizes_matches_one_question_at_a_time(tiny_llava):
    model, _ = tiny_llava
    rng = np.random.default_rng(3)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))
            for h, w in ((60, 90), (120, 45), (70, 70))]  # fmt: skip
    qs = [*QS, "Is the light on?"]
    batch = pipeline.ask_batch(model, imgs, qs, max_new_tokens=5)
    for im, q, a in zip(imgs, qs, batch, strict=True):
        one = pipeline.ask_batch(model, [im], [q], max_new_tokens=5, share_prefill=False)[0]
        assert (a.original_answer, a.crop_answer, a.bbox) == (
            one.original_answer, one.crop_answer, one.bbox)  # fmt: skip
        np.testing.assert_allclose(a.att_map, one.att_map, rtol=1e-4, atol=1e-7)
