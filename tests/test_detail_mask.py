"""Parity of vicrop_jax.detail_mask with the official pure-grad high-pass mask.

The reference below re-creates the official ``high_pass_filter(..., reduce=False)`` and the
``> np.median`` threshold with numpy and scipy: ``u / 255`` in float32, an explicit 3x3
kernel over an ``np.pad(mode='reflect')`` image with one fused multiply-add per tap in
row-major order (what torch's CPU conv2d does; the FMA is emulated in float64 with rounding
to odd, an independent route from the module's integer one), numpy's channel sum,
``scipy.ndimage.median_filter`` and ``np.median``. Where torch is installed, torch's own
conv2d is a second reference. Everything must match bit for bit.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from vicrop_jax import detail_mask

# ----------------------------------------------------------------------------------------
# Reference (numpy / scipy).


def _ref_fma(a, b, c):
    """RN32(a * b + c): exact float64 product, TwoSum, round to odd, then round to float32."""
    p = np.float64(a) * np.asarray(b, np.float64)  # 24 x 24 bits: exact in float64
    c = np.asarray(c, np.float64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    bits = s.view(np.int64)
    fix = (err != 0) & ((bits & 1) == 0)
    bits = np.where(fix, bits + np.where((err > 0) == (s > 0), 1, -1), bits)
    # 53 >= 24 + 2 bits, so round-to-odd then round-to-nearest is one correct rounding.
    return bits.view(np.float64).astype(np.float32)


def _ref_blur(x_chw: np.ndarray) -> np.ndarray:
    """torchvision gaussian_blur(k=3) on float32[C, H, W] as torch's CPU conv2d computes it."""
    k = detail_mask.gaussian_kernel(3)
    h, w = x_chw.shape[-2:]
    xp = np.pad(x_chw, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    acc = np.zeros_like(x_chw, dtype=np.float32)
    for i in range(3):
        for j in range(3):
            acc = _ref_fma(k[i, j], xp[:, i : i + h, j : j + w], acc)
    return acc


def _ref_high_pass(img_hwc_u8: np.ndarray, size: int = 7) -> np.ndarray:
    x = img_hwc_u8.astype(np.float32).transpose(2, 0, 1) / np.float32(255)  # TF.to_tensor
    h = x - _ref_blur(x)
    hb = np.sqrt(np.square(h).sum(axis=0))
    return ndimage.median_filter(hb, size=size)


def _ref_mask(img_hwc_u8: np.ndarray) -> np.ndarray:
    hp = _ref_high_pass(img_hwc_u8)
    return hp > np.median(hp)


def _torch_blur(x_chw: np.ndarray) -> np.ndarray:
    """torchvision's tensor blur recipe with torch ops: reflect pad + depthwise conv2d."""
    torch = pytest.importorskip("torch")
    k = torch.from_numpy(detail_mask.gaussian_kernel(3))
    t = torch.from_numpy(np.ascontiguousarray(x_chw))[None]
    t = torch.nn.functional.pad(t, [1, 1, 1, 1], mode="reflect")
    c = x_chw.shape[0]
    return torch.nn.functional.conv2d(t, k.expand(c, 1, 3, 3), groups=c)[0].numpy()


# ----------------------------------------------------------------------------------------
# Images.


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _images() -> dict[str, Image.Image]:
    """Originals of odd, non-square sizes: noise, a drawn document, JPEG gradient, 'photo'."""
    rng = np.random.default_rng(0)
    out = {"noise": Image.fromarray(rng.integers(0, 256, (301, 411, 3), dtype=np.uint8))}
    doc = Image.new("RGB", (517, 389), "white")
    draw = ImageDraw.Draw(doc)
    draw.rectangle([30, 40, 200, 150], fill=(200, 30, 30))
    draw.ellipse([250, 100, 480, 300], fill=(20, 120, 220), outline="black", width=3)
    draw.line([0, 388, 516, 0], fill=(0, 160, 0), width=5)
    for y in range(170, 380, 19):
        draw.text((20, y), "The quick brown fox 0123456789", fill="black")
    out["doc"] = doc
    yy, xx = np.mgrid[0:403, 0:599]
    grad = np.stack([xx * 255 // 598, yy * 255 // 402, np.full_like(xx, 128)], -1)
    out["gradient_jpeg"] = _jpeg(Image.fromarray(grad.astype(np.uint8)), 80)
    small = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    photo = small.resize((640, 479), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    out["photo_jpeg"] = _jpeg(photo, 90)
    return out


IMAGES = _images()


# ----------------------------------------------------------------------------------------
# Kernel.


def test_kernel_is_analytic_gaussian_sigma_0_8():
    k = detail_mask.gaussian_kernel(3)
    x = np.array([-1.0, 0.0, 1.0])
    g = np.exp(-0.5 * (x / 0.8) ** 2)
    g /= g.sum()
    assert k.dtype == np.float32 and k.shape == (3, 3)
    np.testing.assert_allclose(k, np.outer(g, g), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(k, k.T)
    np.testing.assert_array_equal(k, k[::-1, ::-1])
    assert abs(float(k.astype(np.float64).sum()) - 1.0) < 1e-6


def test_kernel_matches_torchvision_recipe_bitwise():
    torch = pytest.importorskip("torch")
    for size in (3, 5):
        sigma = size * 0.15 + 0.35  # torchvision's spelling of the default
        x = torch.linspace(-(size - 1) * 0.5, (size - 1) * 0.5, steps=size)
        pdf = torch.exp(-0.5 * (x / sigma).pow(2))
        k1 = pdf / pdf.sum()
        k2 = torch.mm(k1[:, None], k1[None, :]).numpy()
        np.testing.assert_array_equal(detail_mask.gaussian_kernel(size), k2)


# ----------------------------------------------------------------------------------------
# Exact arithmetic.


def test_fma_and_product_are_correctly_rounded():
    rng = np.random.default_rng(1)
    n = 200_000
    kernel_w = detail_mask.gaussian_kernel(3).ravel()
    a = np.concatenate([rng.choice(kernel_w, n), rng.standard_normal(n).astype(np.float32)]).astype(
        np.float32
    )
    b = np.concatenate(
        [
            rng.integers(0, 256, n).astype(np.float32) / np.float32(255),
            (rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)).astype(np.float32),
        ]
    )
    prod = (a * b).astype(np.float32)
    c = np.concatenate(
        [
            rng.random(n // 2, dtype=np.float32),
            -prod[n // 2 : n],  # heavy cancellation
            (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 10, n)).astype(np.float32),
        ]
    )
    # Sums that land exactly half-way between floats: c = -RN(ab) + half an ulp of it.
    half_ulp = (np.spacing(np.abs(prod)) / 2).astype(np.float32)
    a = np.concatenate([a, a[:n]])
    b = np.concatenate([b, b[:n]])
    c = np.concatenate([c, (prod[:n] + half_ulp[:n]).astype(np.float32)])
    got = np.asarray(jax.jit(detail_mask._fma)(a, b, c))
    np.testing.assert_array_equal(got, _ref_fma(a, b, c))
    got_prod = np.asarray(jax.jit(detail_mask._product)(a, b))
    np.testing.assert_array_equal(got_prod, (a * b).astype(np.float32))


# ----------------------------------------------------------------------------------------
# Blur.


BLUR_SHAPES = [(336, 336), (17, 23), (2, 9), (31, 8)]


@pytest.mark.parametrize("shape", BLUR_SHAPES)
def test_blur_matches_reference_bitwise(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    u8 = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    x = u8.astype(np.float32) / np.float32(255)
    got = np.asarray(detail_mask.gaussian_blur3(jnp.asarray(x)))
    want = _ref_blur(x.transpose(2, 0, 1)).transpose(1, 2, 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got, want)
    # Any float data, not only k / 255.
    xf = rng.standard_normal((*shape, 3)).astype(np.float32)
    got = np.asarray(detail_mask.gaussian_blur3(jnp.asarray(xf)))
    np.testing.assert_array_equal(got, _ref_blur(xf.transpose(2, 0, 1)).transpose(1, 2, 0))


def test_blur_matches_torch_conv2d_bitwise():
    for name in ("doc", "photo_jpeg"):
        x = np.asarray(IMAGES[name].resize((224, 224), Image.Resampling.BILINEAR))
        x = x.astype(np.float32) / np.float32(255)
        got = np.asarray(detail_mask.gaussian_blur3(jnp.asarray(x)))
        want = _torch_blur(x.transpose(2, 0, 1)).transpose(1, 2, 0)
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_blur_batched_and_integer_input():
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (2, 17, 23, 3), dtype=np.uint8)
    got = np.asarray(detail_mask.gaussian_blur3(jnp.asarray(u8)))
    assert got.dtype == np.uint8
    for n in range(2):
        ref = _ref_blur(u8[n].astype(np.float32).transpose(2, 0, 1)).transpose(1, 2, 0)
        # torchvision on integer tensors: blur in float32, torch.round (half to even), cast.
        np.testing.assert_array_equal(got[n], np.round(ref).astype(np.uint8))


# ----------------------------------------------------------------------------------------
# Median filter and median.


@pytest.mark.parametrize("size", [3, 4, 7])
def test_median_filter_matches_scipy(size):
    rng = np.random.default_rng(size)
    for shape in [(17, 23), (5, 9)]:
        # Few distinct values: many ties inside each window.
        x = (rng.integers(0, 6, shape) / 7).astype(np.float32)
        got = np.asarray(detail_mask.median_filter(jnp.asarray(x), size=size))
        np.testing.assert_array_equal(got, ndimage.median_filter(x, size=size))
    xb = rng.standard_normal((2, 13, 11)).astype(np.float32)
    got = np.asarray(detail_mask.median_filter(jnp.asarray(xb), size=size))
    for n in range(2):
        np.testing.assert_array_equal(got[n], ndimage.median_filter(xb[n], size=size))


def test_map_median_matches_numpy():
    rng = np.random.default_rng(3)
    one = np.float32(1)
    cases = [
        rng.standard_normal((6, 8)).astype(np.float32),
        rng.standard_normal((5, 7)).astype(np.float32),
        np.array([[one, np.nextafter(one, np.float32(2))]], np.float32),  # adjacent floats
        np.array([[1e-7, 3e-7, 3e-7, 1.0]], np.float32),
    ]
    for x in cases:
        got = np.asarray(detail_mask._median_like_numpy(jnp.asarray(x)))
        assert got == np.median(x), (got, np.median(x))


# ----------------------------------------------------------------------------------------
# The whole mask.


@jax.jit
def _map_and_mask(u8):
    # One compilation for both public functions (the inner jits inline).
    return detail_mask.high_pass(u8), detail_mask.detail_mask(u8)


@pytest.mark.parametrize("resolution", [336, 224])
def test_detail_mask_matches_official_pipeline(resolution):
    for name, img in IMAGES.items():
        u8 = detail_mask.resize_for_mask(img, resolution)
        hp, mask = map(np.asarray, _map_and_mask(jnp.asarray(u8)))
        ref_hp = _ref_high_pass(u8)
        np.testing.assert_array_equal(hp, ref_hp, err_msg=name)
        ref = ref_hp > np.median(ref_hp)
        assert mask.dtype == np.bool_ and mask.shape == (resolution, resolution)
        assert (mask != ref).sum() == 0, name
        # Not degenerate: about half the pixels, fewer where the map has a plateau at its
        # median (the strict '>' drops the whole plateau).
        assert 0.05 < mask.mean() <= 0.5, (name, mask.mean())


def test_detail_mask_non_square_float_and_batch():
    rng = np.random.default_rng(4)
    doc = np.asarray(IMAGES["doc"].resize((52, 37), Image.Resampling.BILINEAR))
    noise = rng.integers(0, 256, (37, 52, 3), dtype=np.uint8)
    batch = np.stack([doc, noise])
    got = np.asarray(detail_mask.detail_mask(jnp.asarray(batch)))
    for n in range(2):
        np.testing.assert_array_equal(got[n], _ref_mask(batch[n]))
    # Float input in [0, 1] (the to_tensor scale) gives the same mask as uint8.
    as_float = jnp.asarray(batch.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(np.asarray(detail_mask.detail_mask(as_float)), got)


def test_detail_mask_matches_torch_blur_path():
    """Same mask when the blur is torch's own conv2d (the official op) instead of ours."""
    pytest.importorskip("torch")
    u8 = detail_mask.resize_for_mask(IMAGES["gradient_jpeg"], 336)
    x = u8.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    hb = ndimage.median_filter(np.sqrt(np.square(x - _torch_blur(x)).sum(axis=0)), size=7)
    mask = np.asarray(detail_mask.detail_mask(jnp.asarray(u8)))
    np.testing.assert_array_equal(mask, hb > np.median(hb))


def test_resize_for_mask_is_pil_bilinear_rgb():
    img = IMAGES["photo_jpeg"]
    got = detail_mask.resize_for_mask(img, 224)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(img.resize((224, 224), Image.BILINEAR)))
    rgba = img.convert("RGBA")
    np.testing.assert_array_equal(detail_mask.resize_for_mask(rgba, 224), got)
    gray = detail_mask.resize_for_mask(img.convert("L"), 31)
    assert gray.shape == (31, 31, 3)
