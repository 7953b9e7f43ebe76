"""Host-side input checks and preprocessing through the checkpoint's own HF processor.

The prompt templates are the families' (vicrop_jax.families); GENERAL_QUESTION is the
official general-description prompt q' of rel-att and pure-grad, the same for every family.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import sys
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vicrop_jax.families.instructblip import blip_prompt  # noqa: F401  (importable here too)
from vicrop_jax.families.llava import llava_prompt  # noqa: F401

GENERAL_QUESTION = "Write a general description of the image."


# Image placeholder texts of the supported processors: in a question they would be expanded
# into image tokens with no image behind them.
IMAGE_PLACEHOLDERS = ("<image>",)


def check_question(question: str, name: str = "question", max_chars: int = 4000) -> str:
    """Rejects empty, absurdly long or placeholder-holding questions, naming the input."""
    if not isinstance(question, str):
        raise TypeError(f"{name} must be a string, got {type(question).__name__}")
    q = question.strip()
    if not q:
        raise ValueError(f"{name} is empty")
    if len(q) > max_chars:
        raise ValueError(f"{name} has {len(q)} characters; at most {max_chars} are accepted")
    for token in IMAGE_PLACEHOLDERS:
        if token in q:
            raise ValueError(f"{name} contains {token!r}, the image placeholder; remove it")
    return q


class ImageError(ValueError):
    """An image file that cannot be used (missing, corrupt, too large); names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, as the official code converts: `image.convert("RGB")`.

    Alpha is dropped (the stored colour under a transparent pixel is kept, not composited);
    16-bit and float images go through PIL's own conversion (which clips at 255).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


# EXIF orientation (tag 0x0112) -> the transpose that shows the image upright, as
# PIL.ImageOps.exif_transpose applies it.
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PIL_LIMIT_LOCK = threading.Lock()


def _allow_in_pil(max_pixels: int | None) -> None:
    """Raises PIL's process-wide bomb limit to at least max_pixels (never lowers it).

    PIL's check reads the module global Image.MAX_IMAGE_PIXELS inside Image.open; raising it
    here, before the open, lets max_pixels above PIL's default through. Only ever raising it
    keeps every thread's outcome fixed: its own check against its own max_pixels decides.
    """
    with _PIL_LIMIT_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and (max_pixels is None or max_pixels > current):
            # A large number rather than None: PIL reads the global twice per check.
            Image.MAX_IMAGE_PIXELS = sys.maxsize if max_pixels is None else max_pixels


def read_image(
    path: str, *, exif_transpose: bool = False, max_pixels: int | None | str = "pil"
) -> Image.Image:
    """An image file as the official ViCrop code reads it: `Image.open(path).convert("RGB")`.

    The stored pixel frame is kept (no EXIF rotation), so boxes given in it stay valid.

    Args:
      path: image file.
      exif_transpose: show the image upright as its EXIF orientation says (what
        PIL.ImageOps.exif_transpose does); `image.info["exif_orientation"]` then holds the
        orientation undone (1: none), for moving boxes with `exif_transpose_box`.
      max_pixels: refuse images with more pixels than this, from the file's header before
        decoding (decompression bombs); "pil": PIL's process-wide limit at the call,
        Image.MAX_IMAGE_PIXELS (which a call with a higher max_pixels raises); None: no
        limit. PIL's own limit is raised to it when lower (`_allow_in_pil`), never lowered.

    Returns:
      A fully decoded RGB PIL image, its file closed.

    Raises:
      ImageError: with the path and the reason.
    """
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such image file")
    if max_pixels == "pil":
        max_pixels = Image.MAX_IMAGE_PIXELS
    _allow_in_pil(max_pixels)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(
                    f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                    "(a possible decompression bomb; raise --max_image_pixels to allow it)"
                )
            if w <= 0 or h <= 0:
                raise ImageError(f"{path}: empty image ({w}x{h})")
            orientation = _orientation(im) if exif_transpose else 1
            rgb = im.convert("RGB")  # for an RGB file, a decoded copy
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{path}: decompression bomb refused by PIL: {e} (raise --max_image_pixels to allow it)"
        ) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ImageError(f"{path}: cannot read image: {type(e).__name__}: {e}") from None
    if exif_transpose:
        if orientation in _UPRIGHT:
            rgb = rgb.transpose(_UPRIGHT[orientation])
        rgb.info["exif_orientation"] = orientation
    return rgb


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation, 1 when absent, unreadable or not one of the eight."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: keep the stored frame
        return 1
    return value if value in _UPRIGHT else 1


def exif_transpose_box(
    box: Sequence[float], size: tuple[int, int], orientation: int
) -> tuple[float, float, float, float]:
    """A box (x1, y1, x2, y2) in the stored pixel frame, moved into the upright frame.

    Args:
      box: pixel edges in the image as stored.
      size: the stored image's (width, height).
      orientation: its EXIF orientation (1-8), as `read_image` reports it.

    Returns:
      (x1, y1, x2, y2) in the image `read_image(..., exif_transpose=True)` returns.
    """
    w, h = size
    t = _UPRIGHT.get(orientation)
    T = Image.Transpose
    move = {  # a point (x, y) of the stored frame -> the same point after the transpose
        None: lambda x, y: (x, y),
        T.FLIP_LEFT_RIGHT: lambda x, y: (w - x, y),
        T.FLIP_TOP_BOTTOM: lambda x, y: (x, h - y),
        T.ROTATE_180: lambda x, y: (w - x, h - y),
        T.ROTATE_90: lambda x, y: (y, w - x),  # counter-clockwise
        T.ROTATE_270: lambda x, y: (h - y, x),
        T.TRANSPOSE: lambda x, y: (y, x),
        T.TRANSVERSE: lambda x, y: (h - y, w - x),
    }[t]
    x1, y1, x2, y2 = (float(v) for v in box)
    (a, b), (c, d) = move(x1, y1), move(x2, y2)
    return (min(a, c), min(b, d), max(a, c), max(b, d))


# Images per preprocessing task; below two chunks the call stays on the calling thread.
_CHUNK = 4


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=os.cpu_count() or 1, thread_name_prefix="vicrop-preprocess"
    )


def _pil_resize_rule(image_processor):
    """image -> (height, width) that `image_processor` resizes it to, when the processor is a
    plain transformers PIL-backend one resizing to a fixed size or a shortest edge (CLIP's,
    BLIP's); the rule gives None for an image the processor would convert first (not RGB, or
    a PNG colour key). None for any other processor (then it runs as it is)."""
    try:
        from transformers.image_processing_backends import PilBackend
        from transformers.image_transforms import get_resize_output_image_size
        from transformers.image_utils import ChannelDimension
    except ImportError:
        return None
    cls = type(image_processor)
    own = ("preprocess", "_preprocess", "process_image", "resize", "convert_to_rgb")
    if not isinstance(image_processor, PilBackend) or any(
        getattr(cls, name) is not getattr(PilBackend, name) for name in own
    ):
        return None
    if not getattr(image_processor, "do_resize", False):
        return None
    size = image_processor.size
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    others = ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")
    short, fixed = get("shortest_edge"), (get("height"), get("width"))
    if any(get(k) for k in others) or not (short or all(fixed)):
        return None

    def rule(image: Image.Image) -> tuple[int, int] | None:
        # the processor composites a colour key on white and converts other modes first
        if image.mode != "RGB" or image.info.get("transparency") is not None:
            return None
        if not short:
            return int(fixed[0]), int(fixed[1])
        shape = np.broadcast_to(np.zeros((), np.uint8), (3, image.height, image.width))
        h, w = get_resize_output_image_size(
            shape, size=short, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
        return int(h), int(w)

    return rule


def _processor_call(image_processor, images: list[Image.Image]) -> np.ndarray:
    """pixel_values of `image_processor(images)`, exactly. For a plain PIL-backend processor
    (`_pil_resize_rule`) the resize runs on each PIL image directly, and the processor then
    does the rest (crop, rescale, normalise) with do_resize=False: the processor itself
    converts each RGB image to a numpy array and back to a PIL image before the same
    Pillow resize, a round trip at full resolution that costs 20-40% of its time on a
    640 x 480 image (tests/test_processing.py checks the arrays are equal)."""
    rule = _pil_resize_rule(image_processor)
    sizes = [rule(im) for im in images] if rule is not None else [None]
    if images and all(s is not None for s in sizes):
        resample = image_processor.resample
        images = [
            im.resize((w, h), resample=resample) for im, (h, w) in zip(images, sizes, strict=True)
        ]
        out = image_processor(images, do_resize=False, return_tensors="np")
    else:
        out = image_processor(images, return_tensors="np")
    return np.asarray(out["pixel_values"])


def preprocess(image_processor, images: list[Image.Image]) -> np.ndarray:
    """The image processor's pixel_values (NCHW, its dtype) for a list of images, computed
    in chunks on a thread pool: the resize (most of the time for large images) runs in
    Pillow, which releases the GIL. Each image is processed on its own, so the result is
    the same array as one call on the whole list (tested)."""
    images = list(images)
    call = lambda chunk: _processor_call(image_processor, chunk)
    chunks = [images[i : i + _CHUNK] for i in range(0, len(images), _CHUNK)]
    if len(chunks) < 2 or (os.cpu_count() or 1) < 2:
        return call(images)
    parts = list(_pool().map(call, chunks))
    if parts[0].ndim == 5:  # anyres tiles: zeros up to the most tiles, as one call pads them
        most = max(p.shape[1] for p in parts)
        parts = [np.pad(p, [(0, 0), (0, most - p.shape[1])] + [(0, 0)] * 3) for p in parts]
    return np.concatenate(parts)


def image_pixels(processor, images: list[Image.Image]) -> np.ndarray:
    """float32[I, H, W, C] (NHWC, the models' layout) from the checkpoint's image processor
    (`processor` is the full processor or its image_processor), see `preprocess`."""
    out = preprocess(getattr(processor, "image_processor", processor), images)
    return np.ascontiguousarray(out.astype(np.float32, copy=False).transpose(0, 2, 3, 1))


def encode(
    processor, texts: list[str], images: list[Image.Image], pad_to_multiple_of: int | None = None
) -> dict[str, np.ndarray]:
    """Tokenises (left-padded) and preprocesses with the checkpoint's own HF processor.

    LLaVA prompts carry their own `<image>` placeholders; InstructBLIP prompts get
    len(images) / len(texts) images each (see `encode_instructblip`). pad_to_multiple_of
    buckets prompt lengths so jit compiles a handful of shapes.
    """
    if hasattr(processor, "qformer_tokenizer"):
        return encode_instructblip(processor, texts, images, pad_to_multiple_of)
    slot: dict[int, int] = {}
    order = [slot.setdefault(id(im), len(slot)) for im in images]
    if len(slot) < len(images):  # an image object given twice (rel-att: [q; general])
        out = _encode_shared(processor, texts, images, order, pad_to_multiple_of)
    else:
        out = _encode_all(processor, texts, images, pad_to_multiple_of)
    if (out["attention_mask"][:, -1] == 0).any():
        raise ValueError("the processor pads on the right; set tokenizer.padding_side='left'")
    return out


def _encode_all(processor, texts, images, pad_to_multiple_of):
    out = processor(images=images, text=texts, return_tensors="np", padding=True,
                    pad_to_multiple_of=pad_to_multiple_of)  # fmt: skip
    return {k: np.asarray(v) for k, v in out.items()}


def _encode_shared(processor, texts, images, order, pad_to_multiple_of):
    """`encode` preprocessing each distinct image object once.

    The processor expands `<image>` from the preprocessed pixel shape alone, so the text goes
    through it with 8 x 8 stand-ins (cheap to resize) and the pixels come from the image
    processor on the distinct images. If the stand-ins' pixel shape differs from the real
    ones' (a processor whose output size depends on the input), the plain path runs.
    """
    unique = list({id(im): im for im in images}.values())
    pixels = preprocess(processor.image_processor, unique)
    stand_in = Image.new("RGB", (8, 8))
    out = _encode_all(processor, texts, [stand_in] * len(images), pad_to_multiple_of)
    # A processor whose token count depends on the image size (image_sizes: anyres) cannot
    # take stand-ins either.
    if "image_sizes" in out or out["pixel_values"].shape[1:] != pixels.shape[1:]:
        return _encode_all(processor, texts, images, pad_to_multiple_of)
    out["pixel_values"] = pixels[np.asarray(order)]
    return out


def encode_instructblip(
    processor, texts: list[str], images: list[Image.Image], pad_to_multiple_of: int | None = None
) -> dict[str, np.ndarray]:
    """InstructBlipProcessor's layout, extended to several images per prompt.

    The text goes through the processor itself (both tokenizers, with its padding rules); for
    one image per prompt the result is exactly the processor's (tested). With k images per
    prompt, k * num_query_tokens image tokens precede the text (images in order) and each
    prompt's Q-Former instruction row is repeated once per image, so `qformer_input_ids` has
    one row per entry of `pixel_values`.
    """
    if not texts or len(images) % len(texts):
        raise ValueError(f"{len(images)} images do not split evenly over {len(texts)} prompts")
    per = len(images) // len(texts)
    enc = {k: np.asarray(v) for k, v in
           processor(text=texts, return_tensors="np", padding=True,
                     pad_to_multiple_of=pad_to_multiple_of).items()}  # fmt: skip
    if (enc["attention_mask"][:, -1] == 0).any():
        raise ValueError("the processor pads on the right; set tokenizer.padding_side='left'")
    token = processor.image_token
    image_id = processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token))
    b, t = len(texts), per * processor.num_query_tokens
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pixels = processor.image_processor(images, return_tensors="np")["pixel_values"]
    return {
        "input_ids": np.concatenate([np.full((b, t), image_id, ids.dtype), ids], axis=1),
        "attention_mask": np.concatenate([np.ones((b, t), mask.dtype), mask], axis=1),
        "qformer_input_ids": np.repeat(enc["qformer_input_ids"], per, axis=0),
        "qformer_attention_mask": np.repeat(enc["qformer_attention_mask"], per, axis=0),
        "pixel_values": np.asarray(pixels),
    }
