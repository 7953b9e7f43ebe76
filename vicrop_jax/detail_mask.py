"""The pure-grad detail mask: the official ``high_pass_filter`` in JAX, bit for bit.

pure-grad keeps only gradient pixels that lie on image detail. The official code
(``utils.high_pass_filter`` with ``reduce=False``, then ``high_pass > np.median(high_pass)``
in ``llava_methods.py`` / ``blip_methods.py``) builds that mask as:

1. PIL-resize the RGB image to ``resolution x resolution`` (torchvision ``TF.resize`` on a
   PIL image is ``Image.resize`` with BILINEAR), then ``TF.to_tensor``: float32 ``u / 255``.
2. ``TF.gaussian_blur(kernel_size=3)`` with the default sigma 0.8 on that float tensor
   (no uint8 rounding), reflect padding, one 3x3 depthwise ``conv2d`` on the CPU.
3. ``h = x - blur(x)``; ``sqrt(sum_c h**2)``; ``scipy.ndimage.median_filter(size=7)``
   (boundary mode 'reflect', i.e. half-sample symmetric).
4. Keep pixels strictly above ``np.median`` of that map.

The final ``>`` turns last-bit differences into different masks: the median filter makes
plateaus of equal values, so a threshold that moves by one ulp flips whole plateaus. So
every float step here reproduces the official rounding exactly:

* torch's CPU ``conv2d`` (oneDNN, AVX2/AVX-512) accumulates the nine taps in row-major
  order with fused multiply-adds from a zero accumulator. XLA contracts ``a * b + c`` into
  FMAs only some of the time, so the blur emulates each FMA with integer significand
  products and error-free sums (``_fma``) that give the same bits on any backend.
* Squares are formed exactly and rounded once, for the same reason; the channel sum and the
  median of the map use numpy's order of operations.

These bit tricks make the blur and map non-differentiable; nothing differentiates the
mask. Exactness holds while every product (kernel weight x pixel, h x h) is zero or at
least 2**-78 in magnitude, so that its low part stays a normal float even where denormals
are flushed; images of k / 255 values stay above 2**-72 (|h| >= 2**-36).

Axis letters: ``...`` any leading batch axes, H height, W width, C channels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from PIL import Image

__all__ = [
    "detail_mask",
    "gaussian_blur3",
    "gaussian_kernel",
    "high_pass",
    "median_filter",
    "resize_for_mask",
]

_F32 = jnp.float32
_HALF_BITS = 12  # a 24-bit significand splits into two 12-bit halves: products fit int32


def gaussian_kernel(size: int = 3, sigma: float | None = None) -> np.ndarray:
    """The 2D Gaussian kernel torchvision's tensor ``gaussian_blur`` builds, in float32.

    Follows torchvision's documented recipe step by step in float32: sample positions
    ``linspace(-(k-1)/2, (k-1)/2, k)``, ``exp(-0.5 * (x / sigma)**2)``, normalise to sum 1,
    outer product of the two 1D kernels. The exp is evaluated in float64 and rounded once:
    numpy's float32 exp is one ulp away from torch's for k=3, the correctly rounded value
    is torch's.

    Args:
      size: odd kernel size.
      sigma: standard deviation; ``None`` gives torchvision's default
        ``0.3 * ((size - 1) * 0.5 - 1) + 0.8`` (0.8 for size 3).

    Returns:
      float32[size, size] kernel (rows: y offsets, columns: x offsets).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    if sigma is None:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    half = (size - 1) * 0.5
    x = np.linspace(-half, half, size, dtype=np.float32)
    z = np.float32(-0.5) * np.square(x / np.float32(sigma))
    pdf = np.exp(z.astype(np.float64)).astype(np.float32)
    k1 = pdf / pdf.sum(dtype=np.float32)
    return np.outer(k1, k1).astype(np.float32)


_KERNEL3 = gaussian_kernel(3)


# ----------------------------------------------------------------------------------------
# Exact float32 arithmetic that no compiler contraction can change.


def _decompose(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Finite float32 -> (int32 significand, int32 exponent, negative) with x = ±sig * 2**exp."""
    bits = lax.bitcast_convert_type(x.astype(_F32), jnp.int32)
    biased = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    sig = jnp.where(biased > 0, mant | 0x800000, mant)  # implicit leading 1 of normals
    exp = jnp.maximum(biased, 1) - 150
    return sig, exp, bits < 0


def _pow2(e: jax.Array) -> jax.Array:
    """2.0**e as float32 for integer e in [-126, 127], built from bits (exact everywhere)."""
    return lax.bitcast_convert_type((e + 127) << 23, _F32)


def _scale(m: jax.Array, e: jax.Array) -> jax.Array:
    """m * 2**e for integer-valued float32 m; two halves keep each factor a normal float."""
    # Past these bounds the true result under/overflows anyway; the clip only keeps the
    # exponent fields of the two factors valid.
    e = jnp.clip(e, -252, 254)
    e1 = e // 2
    return m * _pow2(e1) * _pow2(e - e1)


def _exact_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(hi, lo) float32 with hi + lo == a * b exactly, using integer significand products.

    All float multiplications are by powers of two, hence exact, so an FMA contraction of
    any of them with a later add yields the same value.
    """
    a_sig, a_exp, a_neg = _decompose(a)
    b_sig, b_exp, b_neg = _decompose(b)
    mask = (1 << _HALF_BITS) - 1
    a_hi, a_lo = a_sig >> _HALF_BITS, a_sig & mask
    b_hi, b_lo = b_sig >> _HALF_BITS, b_sig & mask
    # P = a_sig * b_sig < 2**48 = hi_int * 2**24 + lo_int; every term below stays < 2**25.
    mid = a_hi * b_lo + a_lo * b_hi
    low = ((mid & mask) << _HALF_BITS) + a_lo * b_lo
    hi_int = a_hi * b_hi + (mid >> _HALF_BITS) + (low >> 24)
    lo_int = low & 0xFFFFFF
    e = a_exp + b_exp
    sign = jnp.where(a_neg ^ b_neg, _F32(-1), _F32(1))
    hi = sign * _scale(hi_int.astype(_F32), e + 24)
    lo = sign * _scale(lo_int.astype(_F32), e)
    return hi, lo


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's branch-free TwoSum: s = RN(a + b) and s + err == a + b exactly."""
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return s, err


def _add_round_to_odd(a: jax.Array, b: jax.Array) -> jax.Array:
    """a + b rounded to odd: when inexact, the neighbour with an odd last significand bit."""
    s, err = _two_sum(a, b)
    bits = lax.bitcast_convert_type(s, jnp.int32)
    fix = (err != 0) & ((bits & 1) == 0)
    # s != 0 whenever err != 0; +1 on the bits grows |s|, -1 shrinks it.
    step = jnp.where((err > 0) == (s > 0), 1, -1)
    return lax.bitcast_convert_type(jnp.where(fix, bits + step, bits), _F32)


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
    """RN(a * b), immune to being fused into a following add."""
    hi, lo = _exact_product(a, b)
    return hi + lo


def _fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """RN(a * b + c) with a single rounding, like a hardware FMA.

    Boldo & Melquiond (IEEE TC 2008), correctly rounded sum of three floats applied to
    (c, hi, lo) with hi + lo == a * b: two TwoSums, one add rounded to odd, one final add.
    """
    hi, lo = _exact_product(a, b)
    uh, ul = _two_sum(hi, lo)
    th, tl = _two_sum(c, uh)
    return th + _add_round_to_odd(tl, ul)


# ----------------------------------------------------------------------------------------
# Public filters.


@jax.jit
def gaussian_blur3(img: jax.Array) -> jax.Array:
    """3x3 Gaussian blur, sigma 0.8, reflect padding: torchvision ``gaussian_blur(k=3)``.

    Bit-identical to torch's CPU depthwise ``conv2d`` (row-major taps, fused multiply-adds)
    on finite float32 input. Integer input is blurred in float32, rounded half to even and
    cast back, as torchvision does for integer tensors (the official mask path never does
    this: it blurs the float ``to_tensor`` image).

    Args:
      img: float[..., H, W, C] (or an integer dtype); H, W >= 2 (reflect needs a neighbour).

    Returns:
      Blurred image, same shape and dtype as ``img``.
    """
    out_dtype = img.dtype
    x = img.astype(_F32)
    h, w = x.shape[-3], x.shape[-2]
    pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    # jnp 'reflect' mirrors without repeating the edge, like torch's 'reflect'.
    xp = jnp.pad(x, pad, mode="reflect")
    acc = None
    for i in range(3):
        for j in range(3):
            tap = xp[..., i : i + h, j : j + w, :]
            wij = jnp.full((), _KERNEL3[i, j], _F32)
            # torch starts from a zero accumulator: fma(w, v, 0) == RN(w * v).
            acc = _product(wij, tap) if acc is None else _fma(wij, tap, acc)
    if jnp.issubdtype(out_dtype, jnp.integer):
        return jnp.round(acc).astype(out_dtype)
    return acc.astype(out_dtype)


def _forgetful_median(values: list[jax.Array]) -> jax.Array:
    """Elementwise median of an odd number of same-shape arrays (forgetful selection).

    Keep (n + 1) // 2 + 1 candidates; their minimum and maximum each have too many values
    on one side to be the median, so drop both and take in the next value. Only min/max
    ops: it vectorises on any backend, where sorting a short axis per pixel is slow on CPU.
    """
    n = len(values)
    keep = (n + 1) // 2 + 1
    work, rest = list(values[:keep]), list(values[keep:])
    while True:
        for i in range(len(work) - 1):  # bubble the maximum to the end
            work[i], work[i + 1] = (
                jnp.minimum(work[i], work[i + 1]),
                jnp.maximum(work[i], work[i + 1]),
            )
        for i in range(len(work) - 2, 0, -1):  # and the minimum to the front
            work[i - 1], work[i] = (
                jnp.minimum(work[i - 1], work[i]),
                jnp.maximum(work[i - 1], work[i]),
            )
        work = work[1:-1]
        if not rest:
            return work[0]
        work.append(rest.pop(0))


@functools.partial(jax.jit, static_argnames="size")
def median_filter(x: jax.Array, size: int = 7) -> jax.Array:
    """2D median filter equal to ``scipy.ndimage.median_filter(x, size=size)``.

    Boundary: scipy's default mode 'reflect' (half-sample symmetric, ``d c b a | a b c d``),
    which is ``jnp.pad`` mode 'symmetric'. The window of an even ``size`` sits as scipy's
    does (``size // 2`` before the centre), and the output is element ``size**2 // 2`` of
    the sorted window (scipy's rank), so values are selected, never averaged.

    Args:
      x: float[..., H, W].
      size: window side.

    Returns:
      float[..., H, W], same dtype as ``x``.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    h, w = x.shape[-2], x.shape[-1]
    before = size // 2
    pad = [(0, 0)] * (x.ndim - 2) + [(before, size - 1 - before)] * 2
    xp = jnp.pad(x, pad, mode="symmetric")
    shifted = [xp[..., i : i + h, j : j + w] for i in range(size) for j in range(size)]
    if len(shifted) % 2:
        return _forgetful_median(shifted)
    windows = jnp.stack(shifted, axis=-1)  # [..., H, W, size*size]
    return jnp.sort(windows, axis=-1)[..., (size * size) // 2]


def _to_unit_float(image: jax.Array) -> jax.Array:
    """uint8 -> float32 u / 255 exactly as ``TF.to_tensor``; floats pass through as float32."""
    if image.dtype == jnp.uint8:
        # A table of numpy's correctly rounded quotients (== torch's .div(255)) keeps the
        # division off the accelerator, where it could be approximated.
        table = jnp.asarray(np.arange(256, dtype=np.float32) / np.float32(255))
        return table[image.astype(jnp.int32)]
    return image.astype(_F32)


def _median_like_numpy(x: jax.Array) -> jax.Array:
    """``np.median`` over the last two axes: mean of the two middle values, in float32."""
    flat = jnp.sort(x.reshape(*x.shape[:-2], -1), axis=-1)
    n = flat.shape[-1]
    if n % 2:
        return flat[..., n // 2]
    return (flat[..., n // 2 - 1] + flat[..., n // 2]) / 2


@functools.partial(jax.jit, static_argnames="size")
def high_pass(image: jax.Array, size: int = 7) -> jax.Array:
    """The official ``high_pass_filter(..., reduce=False)`` map of an already resized image.

    Args:
      image: uint8[..., H, W, C] (divided by 255 as ``to_tensor`` does) or float[..., H, W, C]
        already in [0, 1]. C is 3 in the official path (images are converted to RGB).
      size: median filter window (official ``km=7``).

    Returns:
      float32[..., H, W]: median-filtered L2 norm over channels of ``x - blur(x)``.
    """
    x = _to_unit_float(image)
    h = x - gaussian_blur3(x)
    # np.square(h).sum(axis=0) on [C, H, W]: squares rounded once, channels added in order.
    total = _product(h[..., 0], h[..., 0])
    for c in range(1, h.shape[-1]):
        total = total + _product(h[..., c], h[..., c])
    return median_filter(jnp.sqrt(total), size=size)


@functools.partial(jax.jit, static_argnames="size")
def detail_mask(image: jax.Array, size: int = 7) -> jax.Array:
    """pure-grad's mask of detailed pixels: ``high_pass > np.median(high_pass)``.

    Args:
      image: uint8[..., H, W, C] or float[..., H, W, C] in [0, 1], already resized to the
        model resolution (see ``resize_for_mask``).
      size: median filter window (official ``km=7``).

    Returns:
      bool[..., H, W]; each image is thresholded at its own median (strict ``>``).
    """
    hp = high_pass(image, size=size)
    return hp > _median_like_numpy(hp)[..., None, None]


def resize_for_mask(pil_image: Image.Image, resolution: int | tuple[int, int]) -> np.ndarray:
    """Host step before ``detail_mask``: the official ``TF.resize(image, (res, res))``.

    torchvision resizes a PIL image with ``Image.resize`` and BILINEAR by default (PIL's
    filter widens when shrinking, so it is antialiased); the aspect ratio is not kept. The
    official loader opens images with ``.convert("RGB")``, done here for other modes.

    Args:
      pil_image: any PIL image.
      resolution: output side (336 for LLaVA-1.5, 224 for InstructBLIP), or (height,
        width) (Qwen2.5-VL: the size its processor resized the image to).

    Returns:
      uint8[height, width, 3].
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if pil_image.mode != "RGB":
        pil_image = pil_image.convert("RGB")
    resized = pil_image.resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def detail_masks(images: Sequence[Image.Image], resolution: int | tuple[int, int]) -> np.ndarray:
    """bool[B, H, W] pure-grad detail masks of images resized to `resolution` (a side, or
    (height, width))."""
    return np.stack([
        np.asarray(detail_mask(jnp.asarray(resize_for_mask(im, resolution)))) for im in images
    ])  # fmt: skip
