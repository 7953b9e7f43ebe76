"""Threaded preprocessing gives the image processor's own output."""

import numpy as np
from PIL import Image
from transformers import AutoProcessor

from vicrop_jax import processing
from vicrop_jax.demo import DEMO_MODEL


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
    assert calls == [4, 4, 2]  # in chunks, not one call
    np.testing.assert_array_equal(out, whole)
    nhwc = processing.image_pixels(proc, images)
    assert nhwc.dtype == np.float32 and nhwc.shape == (10, 64, 64, 3)
    np.testing.assert_array_equal(nhwc, whole.transpose(0, 2, 3, 1))
