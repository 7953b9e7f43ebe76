"""Image files read as the official code reads them; threaded preprocessing gives the image
processor's own output."""

import numpy as np
import pytest
from PIL import Image, ImageOps
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


# ---------------------------------------------------------------------------------------
# Reading images: the official Image.open(path).convert("RGB").


def _with_orientation(path: str, image: Image.Image, orientation: int) -> str:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())
    return path


def test_read_image_is_the_official_conversion(tmp_path):
    rng = np.random.RandomState(0)
    rgba = (rng.rand(23, 37, 4) * 255).astype(np.uint8)
    rgba[:5, :, 3] = 0  # transparent rows: the stored colour stays (no white compositing)
    rgba[:5, :, :3] = (10, 200, 30)
    deep = (np.arange(23 * 37).reshape(23, 37) * 80).astype(np.uint16)  # 0 .. 68,000
    images = {
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "la.png": Image.fromarray(rgba[..., [0, 3]], "LA"),
        "deep.png": Image.fromarray(deep),
        "gray.png": Image.fromarray(rgba[..., 0]),
        "bw.png": Image.fromarray(rgba[..., 0] > 128),
        "cmyk.jpg": Image.fromarray(rgba, "RGBA").convert("CMYK"),
        "rgb.jpg": Image.fromarray(rgba[..., :3]),
    }
    keyed = Image.fromarray(rgba[..., 0]).convert("P")
    keyed.info["transparency"] = 0
    images["palette.png"] = keyed
    for name, im in images.items():
        im.save(tmp_path / name)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    for name in images:
        path = str(tmp_path / name)
        got = processing.read_image(path)
        with Image.open(path) as f:
            official = f.convert("RGB")
            assert processing.to_rgb(f).tobytes() == official.tobytes(), name
        assert got.mode == "RGB" and got.size == (37, 23), name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(official), err_msg=name)
    top = np.asarray(processing.read_image(str(tmp_path / "rgba.png")))[:5]
    assert (top == (10, 200, 30)).all()  # under alpha 0: the stored RGB, not white
    deep_rgb = np.asarray(processing.read_image(str(tmp_path / "deep.png")))
    assert (deep_rgb[..., 0] == np.clip(deep, 0, 255)).all()  # PIL's conversion clips at 255
    with pytest.raises(TypeError, match="PIL.Image"):
        processing.to_rgb(rgba)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_transpose_turns_the_image_and_its_boxes_as_pil_does(tmp_path, orientation):
    stored = Image.new("RGB", (37, 23))
    box = (5, 3, 14, 9)
    stored.paste((255, 255, 255), box)  # a white patch: where the box's subject is
    path = _with_orientation(str(tmp_path / "o.png"), stored, orientation)
    plain = processing.read_image(path)
    assert plain.tobytes() == stored.tobytes()  # default: the stored frame, untouched
    upright = processing.read_image(path, exif_transpose=True)
    with Image.open(path) as f:
        assert upright.tobytes() == ImageOps.exif_transpose(f).convert("RGB").tobytes()
    assert upright.info["exif_orientation"] == orientation
    assert upright.size == ((23, 37) if orientation >= 5 else (37, 23))
    ys, xs = np.nonzero(np.asarray(upright)[..., 0] > 128)
    patch = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert processing.exif_transpose_box(box, stored.size, orientation) == patch


def test_unreadable_images_raise_one_line_errors(tmp_path):
    with pytest.raises(processing.ImageError, match="absent.png: no such image file"):
        processing.read_image(str(tmp_path / "absent.png"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(processing.ImageError, match="junk.png: cannot read image"):
        processing.read_image(str(tmp_path / "junk.png"))
    Image.new("RGB", (200, 150), "red").save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(processing.ImageError, match="cut.jpg: cannot read image") as e:
        processing.read_image(str(tmp_path / "cut.jpg"))
    assert "\n" not in str(e.value)


def test_max_pixels_decides_alone_and_the_same_in_every_thread(tmp_path, monkeypatch):
    """PIL's limit (here 1,000 pixels, standing for its default) neither refuses what a higher
    max_pixels allows nor lets through what a lower one refuses, however threads interleave."""
    import concurrent.futures

    Image.new("RGB", (60, 50), "red").save(tmp_path / "big.png")  # 3,000 pixels
    path = str(tmp_path / "big.png")

    def outcome(limit):
        try:
            processing.read_image(path, max_pixels=limit)
            return "read"
        except processing.ImageError as e:
            assert "decompression bomb" in str(e) and "max_image_pixels" in str(e)
            return "refused"

    want = {2_000: "refused", 2_999: "refused", 3_000: "read", 5_000: "read", None: "read"}
    for _ in range(3):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # > 2x: PIL alone would raise
        limits = [lim for lim in want for _ in range(8)]
        np.random.RandomState(len(limits)).shuffle(limits)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(outcome, limits))
        assert got == [want[lim] for lim in limits]
    # One limit for every thread, as in an evaluation: the same answer in every load.
    for limit, expected in ((5_000, "read"), (2_000, "refused")):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert set(pool.map(outcome, [limit] * 40)) == {expected}
