"""The crop-and-ask pipeline, visualisation and degenerate maps."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vicrop_jax import bbox, pipeline, processing
from vicrop_jax.importance import importance
from vicrop_jax.maps import finite_map

Q = "What is written on the red circle?"


def _img(w=90, h=64, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("share", [True, False])
def test_ask_uses_one_image_then_two(tiny_llava, monkeypatch, share):
    from vicrop_jax import prompt_cache as prefix_mod

    model, _ = tiny_llava
    calls = []
    real = processing.encode

    def spy(proc, texts, images, *args):
        calls.append((list(texts), [im.size for im in images]))
        return real(proc, texts, images, *args)

    pixel_calls = []
    real_pixels = prefix_mod.image_pixels

    def pixel_spy(proc, images):
        pixel_calls.append([im.size for im in images])
        return real_pixels(proc, images)

    # Every family's default encode reads vicrop_jax.processing.encode.
    monkeypatch.setattr(processing, "encode", spy)
    monkeypatch.setattr(prefix_mod, "image_pixels", pixel_spy)
    img = _img()
    ans = pipeline.ask(model, img, Q, max_new_tokens=4, share_prefill=share)
    if share:  # the original's vision pass and prefix once, then the crop's
        assert calls == []
        x1, y1, x2, y2 = ans.bbox
        assert pixel_calls == [[img.size], [(x2 - x1, y2 - y1)]]
        p = prefix_mod.split_prompts(model, [Q])
        tok = model.processor.tokenizer
        image_id = model.config.image_token_index
        assert list(p.prefix).count(image_id) == model.config.num_image_tokens
        assert [(r == image_id).sum() for r in p.question_general] == [0, 0]
        assert (p.pair[0] == image_id).sum() == model.config.num_image_tokens
        assert Q in tok.decode(p.question_general[0], skip_special_tokens=True)
        crop_texts, crop_imgs = ["<image>" * 2], [img.size, (x2 - x1, y2 - y1)]
    else:  # baseline, then the map pass, as the official code
        (base_texts, base_imgs), _, (crop_texts, crop_imgs) = calls
        assert base_texts == [base_texts[0]] and base_texts[0].count("<image>") == 1
        assert base_imgs == [img.size]
        assert pixel_calls == []
    assert crop_texts[0].count("<image>") == 2
    x1, y1, x2, y2 = ans.bbox
    assert crop_imgs == [img.size, (x2 - x1, y2 - y1)]
    assert 0 <= x1 < x2 <= img.size[0] and 0 <= y1 < y2 <= img.size[1]
    assert isinstance(ans.original_answer, str) and isinstance(ans.crop_answer, str)
    stages = {"baseline_answer_and_map"} if share else {"baseline_answer", "map"}
    assert set(ans.timings) == {"preprocess", "box", "crop_answer", *stages}
    expected = importance(model.params, img, Q, model=model)
    np.testing.assert_allclose(ans.att_map, expected, rtol=1e-5)
    assert tuple(np.asarray(bbox.select_bbox(expected, img.size, 35)).tolist()) == ans.bbox


def test_ask_batch_matches_single_and_short_question(tiny_llava):
    model, _ = tiny_llava
    imgs = [_img(seed=1), _img(120, 40, seed=2)]
    qs = [Q, "What color is the square?"]
    batch = pipeline.ask_batch(model, imgs, qs, method="grad_att", max_new_tokens=4)
    for i in range(2):
        one = pipeline.ask(model, imgs[i], qs[i], method="grad_att", max_new_tokens=4)
        assert one.bbox == batch[i].bbox
        assert one.original_answer == batch[i].original_answer
        assert one.crop_answer == batch[i].crop_answer
    short = pipeline.ask(model, imgs[0], qs[0], short_question="red circle?", max_new_tokens=2)
    np.testing.assert_allclose(
        short.att_map, importance(model.params, imgs[0], "red circle?", model=model), rtol=1e-5
    )


def test_high_res_pipeline(tiny_llava):
    model, _ = tiny_llava
    img = _img(2300, 1100, seed=3)
    ans = pipeline.ask(model, img, Q, high_res=True, max_new_tokens=2)
    rows, cols = bbox.high_res_grid(img.size)[:2]
    assert (rows, cols) == (2, 4)
    assert ans.att_map.shape == (rows * 5, cols * 5)
    assert ans.method == "rel_att_high"
    x1, y1, x2, y2 = ans.bbox
    assert 0 <= x1 < x2 <= 2300 and 0 <= y1 < y2 <= 1100


@pytest.mark.parametrize(
    "m",
    [np.zeros((5, 5)), np.ones((5, 5)), np.full((5, 5), np.nan),
     np.where(np.eye(5) > 0, np.inf, 1.0), np.where(np.eye(5) > 0, np.nan, 2.0)],
)  # fmt: skip
def test_degenerate_maps_give_finite_valid_boxes(m):
    fm = np.asarray(finite_map(np.asarray(m, np.float32)))
    assert np.isfinite(fm).all()
    for size in [(90, 64), (1000, 30), (20, 20)]:
        x1, y1, x2, y2 = np.asarray(bbox.select_bbox(fm, size, 35)).tolist()
        assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]


def test_show_cli_writes_png(tiny_llava, tmp_path):
    model, _ = tiny_llava
    img_path = tmp_path / "in.png"
    _img().save(img_path)
    out = tmp_path / "out.png"
    r = subprocess.run(
        [sys.executable, "-m", "vicrop_jax.show", f"--model={model.path}", f"--image={img_path}",
         f"--question={Q}", "--method=grad_att", "--layer=2", f"--out={out}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "box [" in r.stdout
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.format == "PNG"


def test_shared_prefill_equals_separate_passes(tiny_llava):
    model, _ = tiny_llava
    imgs = [_img(seed=6), _img(70, 110, seed=7)]
    qs = [Q, "What color is the square?"]
    shared = pipeline.ask_batch(model, imgs, qs, max_new_tokens=6)
    separate = pipeline.ask_batch(model, imgs, qs, max_new_tokens=6, share_prefill=False)
    assert "baseline_answer_and_map" in shared[0].timings
    assert "baseline_answer" in separate[0].timings
    for a, b in zip(shared, separate, strict=True):
        assert a.original_answer == b.original_answer
        assert a.crop_answer == b.crop_answer and a.bbox == b.bbox
        np.testing.assert_allclose(a.att_map, b.att_map, rtol=1e-5, atol=1e-7)


def test_encode_preprocesses_a_repeated_image_once_with_the_same_result(tiny_llava):
    from vicrop_jax.processing import GENERAL_QUESTION, encode, llava_prompt

    model, _ = tiny_llava
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (90, 40, 3), np.uint8))
    texts = [llava_prompt("What is on the sign?"), llava_prompt("Which colour is the car here?")]
    texts += [llava_prompt(GENERAL_QUESTION)] * 2
    calls = []
    proc = model.processor
    real = proc.image_processor.__class__.__call__

    def counting(self, images, *args, **kwargs):
        images = images if isinstance(images, list) else [images]
        calls.append(sum(im.size != (8, 8) for im in images))  # real images, not stand-ins
        return real(self, images, *args, **kwargs)

    shared = encode(proc, texts, [a, b, a, b], pad_to_multiple_of=8)
    # The reference: distinct (equal-pixel) copies, which the plain path processes in full.
    plain = encode(proc, texts, [a, b, a.copy(), b.copy()], pad_to_multiple_of=8)
    assert set(shared) == set(plain)
    for k in plain:
        np.testing.assert_array_equal(shared[k], plain[k], err_msg=k)
    import unittest.mock

    with unittest.mock.patch.object(proc.image_processor.__class__, "__call__", counting):
        encode(proc, texts, [a, b, a, b])
    assert sum(calls) == 2  # the two distinct images, once each, not four


def test_bad_arguments_are_refused_with_one_clear_error(tiny_llava):
    model, _ = tiny_llava
    img = _img()
    assert pipeline.ask_batch(model, [], []) == []
    for kwargs, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(layer=True), "layer must be"),
        (dict(layer=2.0), "layer must be"),
        (dict(layer=[1, 2.5]), "layer must be"),
        (dict(base_size=0), "base_size"),
        (dict(high_res=True, high_res_threshold=0), "high_res_threshold"),
        (dict(method="att"), "unknown method"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipeline.ask(model, img, Q, **kwargs)
    # An image placeholder in a question is refused on every path, before any model call.
    bad = "What is <image> on the sign?"
    for share in (True, False):
        with pytest.raises(ValueError, match="image placeholder"):
            pipeline.ask(model, img, bad, share_prefill=share)
    with pytest.raises(ValueError, match="short_question contains '<image>'"):
        pipeline.ask(model, img, Q, short_question="<image>")
    with pytest.raises(ValueError, match="image placeholder"):
        importance(model.params, img, bad, model=model)


def test_base_size_and_tiling_threshold_are_arguments(tiny_llava):
    model, _ = tiny_llava
    img = _img(200, 120, seed=9)
    ans = pipeline.ask(model, img, Q, max_new_tokens=2, base_size=20)
    want = bbox.select_bbox(importance(model.params, img, Q, model=model), img.size, 20)
    assert ans.bbox == tuple(np.asarray(want).tolist())
    high = pipeline.ask(model, img, Q, high_res=True, high_res_threshold=100, max_new_tokens=2)
    rows, cols = bbox.high_res_grid(img.size, 100)[:2]
    assert (rows, cols) != (1, 1) and high.att_map.shape == (rows * 5, cols * 5)
    ref = importance(model.params, img, Q, model=model, high_res=True, high_res_threshold=100)
    np.testing.assert_allclose(high.att_map, ref, rtol=1e-5, atol=1e-7)


def test_engine_refuses_a_placeholder_question_per_item(tiny_llava):
    from eval.datasets import Example
    from eval.engine import Engine

    model, _ = tiny_llava
    eng = Engine(model, batch_size=2, max_new_tokens=2)
    good = Example("a", "x.png", Q, ["a"], "/tmp")
    eng.check_question(good)
    for bad in (Example("b", "x.png", "<image> what?", ["a"], "/tmp"),
                Example("c", "x.png", Q, ["a"], "/tmp", short_question="<image>")):  # fmt: skip
        with pytest.raises(ValueError, match="image placeholder"):
            eng.check_question(bad)
