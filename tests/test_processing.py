"""Threaded preprocessing gives the image processor's own output."""

import numpy as np
from PIL import Image
from transformers import AutoProcessor

from eval.demo import DEMO_MODEL
from vicrop_jax import processing


def test_preprocess_in_chunks_equals_one_processor_call(monkeypatch):
    proc = AutoProcessor.from_pretrained(DEMO_MODEL)
    rng = np.random.RandomState(0)
    sizes = [(640, 480), (97, 203), (64, 64), (333, 250), (1200, 900)] * 2  # 10 images
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for w, h in sizes]
    whole = np.asarray(proc.image_processor(images, return_tensors="np")["pixel_values"])
    monkeypatch.setattr(processing.os, "cpu_count", lambda: 2)  # the threaded path, always
    calls = []
    real = proc.image_processor.__class__.__call__

    def spy(self, imgs, *a, **k):
        calls.append(len(imgs))
        return real(self, imgs, *a, **k)

    monkeypatch.setattr(proc.image_processor.__class__, "__call__", spy)
    out = processing.preprocess(proc.image_processor, images)
    assert sorted(calls) == [2, 4, 4]  # in chunks, not one call (threads: in any order)
    np.testing.assert_array_equal(out, whole)
    nhwc = processing.image_pixels(proc, images)
    assert nhwc.dtype == np.float32 and nhwc.shape == (10, 64, 64, 3)
    np.testing.assert_array_equal(nhwc, whole.transpose(0, 2, 3, 1))


def _random_images(sizes, seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for w, h in sizes]


def test_direct_resize_equals_the_processor(monkeypatch):
    """The PIL-backend fast path (resize on the PIL image, the processor does the rest) gives
    the processor's own arrays, bit for bit: the demo's fixed 64 x 64, LLaVA-1.5's shortest
    edge 336 + centre crop, BLIP's 384 x 384; odd sizes, extreme aspects, upscaling."""
    from transformers import BlipImageProcessor, CLIPImageProcessor

    demo = AutoProcessor.from_pretrained(DEMO_MODEL).image_processor
    llava = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size=336, do_center_crop=True)
    blip = BlipImageProcessor()
    sizes = [(640, 480), (97, 203), (1, 1), (3, 700), (1200, 900), (336, 336), (500, 37)]
    images = _random_images(sizes)
    seen = []
    for ip in (demo, llava, blip):
        real = ip.__class__.__call__

        def spy(self, imgs, *a, _real=real, **k):
            seen.append(k.get("do_resize", True))
            return _real(self, imgs, *a, **k)

        want = np.asarray(ip(images, return_tensors="np")["pixel_values"])
        monkeypatch.setattr(ip.__class__, "__call__", spy)
        got = processing._processor_call(ip, images)
        monkeypatch.undo()
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert seen == [False, False, False]  # the fast path ran for all three


def test_non_rgb_images_take_the_processors_own_path():
    """A grayscale image is not resized directly (the processor's conversion runs first);
    the result is still the processor's."""
    proc = AutoProcessor.from_pretrained(DEMO_MODEL).image_processor
    gray = Image.fromarray((np.random.RandomState(1).rand(50, 80) * 255).astype(np.uint8))
    rule = processing._pil_resize_rule(proc)
    assert rule(gray) is None
    assert rule(gray.convert("RGB")) == (64, 64)
    keyed = gray.convert("RGB")
    keyed.info["transparency"] = (0, 0, 0)  # a PNG colour key: the processor's own path
    assert rule(keyed) is None
    want = np.asarray(proc([gray], return_tensors="np")["pixel_values"])
    np.testing.assert_array_equal(processing._processor_call(proc, [gray]), want)
