"""Qwen2.5-VL inputs for images, on a machine without torchvision.

transformers 5 cannot build `Qwen2_5_VLProcessor` without torchvision (its video processor
needs it, whatever the image backend), so this module assembles what the official ViCrop code
gets from it, for images only, from the checkpoint directory's own parts:

- the tokenizer and its chat template (chat_template.jinja, chat_template.json,
  processor_config.json or the tokenizer's own, in that order);
- the Qwen2-VL image processor's PIL backend (`Qwen2VLImageProcessorPil`) with the official
  code's `max_pixels = 256 * 28 * 28`, also forced into `size["longest_edge"]`;
- before it, `qwen_vl_utils.process_vision_info`'s own resize of each image (`fetch_image`):
  the official code passes every image through it, so an image is resized twice (to
  multiples of 28 within qwen_vl_utils' pixel bounds, then by the processor to at most
  max_pixels), and the numbers differ without it.

A prompt is one user message of the chat template holding the image(s), then the text
"{question} Answer the question using a single word or phrase." (the general prompt:
vicrop_jax.processing.GENERAL_QUESTION with the same suffix); each image becomes
<|vision_start|>, grid_t * grid_h * grid_w / merge_size**2 <|image_pad|> tokens, <|vision_end|>.

Shapes: I images, P patches (all images), C = 3 * temporal_patch_size * patch_size**2
(1176), B prompts, S tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# The official ViCrop code's processor setting for Qwen2.5-VL (256 merged tokens an image).
VICROP_MAX_PIXELS = 256 * 28 * 28
ANSWER_SUFFIX = " Answer the question using a single word or phrase."
# qwen_vl_utils (vision_process.py): an image keeps its size rounded to multiples of the
# factor (patch_size * merge_size: 28) within [4, 16384] merged tokens' worth of pixels, and
# an aspect ratio above 200 is refused (the image processor refuses the same).
FETCH_MIN_TOKENS = 4
FETCH_MAX_TOKENS = 16384
MAX_RATIO = 200

IMAGE_TOKEN = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

_TEMPLATE_FILES = (
    ("chat_template.jinja", None),
    ("chat_template.json", "chat_template"),
    ("processor_config.json", "chat_template"),
)


@dataclasses.dataclass
class Qwen2_5_VLImageProcessor:
    """What the family needs of `Qwen2_5_VLProcessor` for images: the tokenizer, the chat
    template and the PIL image processor (`load_processor` builds it)."""

    tokenizer: Any
    image_processor: Any
    chat_template: str
    image_token: str = IMAGE_TOKEN

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    @property
    def factor(self) -> int:
        """The side every resized image is a multiple of: patch_size * merge_size (28)."""
        return int(self.image_processor.patch_size) * self.merge_size

    @property
    def min_pixels(self) -> int:
        return int(self.image_processor.size.shortest_edge)

    @property
    def max_pixels(self) -> int:
        return int(self.image_processor.size.longest_edge)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON object ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a JSON object (a {type(d).__name__})")
    return d


def chat_template(path: str, tokenizer) -> str:
    """The directory's chat template: chat_template.jinja, chat_template.json's or
    processor_config.json's "chat_template", else the tokenizer's (tokenizer_config.json).

    Raises:
      ValueError: the directory has none.
    """
    for name, key in _TEMPLATE_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if key is None:
            with open(file, encoding="utf-8") as f:
                return f.read()
        template = _read_json(file).get(key)
        if isinstance(template, str):
            return template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        return template
    raise ValueError(
        f"{path}: no chat template (chat_template.jinja, chat_template.json, "
        "processor_config.json or tokenizer_config.json)"
    )


def load_processor(path: str, max_pixels: int = VICROP_MAX_PIXELS) -> Qwen2_5_VLImageProcessor:
    """The image-only processor of a Qwen2.5-VL checkpoint directory, offline.

    Args:
      path: directory with the tokenizer files and preprocessor_config.json.
      max_pixels: the image processor's max_pixels and size["longest_edge"] (the official
        ViCrop code's 256 * 28 * 28 by default); min_pixels stays the directory's.

    Raises:
      ValueError: one line naming what is missing or inconsistent.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        raise ValueError(f"{path}: no preprocessor_config.json (the Qwen2-VL image processor)")
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        path, local_files_only=True, max_pixels=max_pixels
    )
    image_processor.size["longest_edge"] = max_pixels  # as the official code forces it
    proc = Qwen2_5_VLImageProcessor(tokenizer, image_processor, chat_template(path, tokenizer))
    if proc.min_pixels > max_pixels:
        raise ValueError(f"max_pixels {max_pixels} is below the processor's min_pixels "
                         f"{proc.min_pixels}")  # fmt: skip
    for token in (IMAGE_TOKEN, VISION_START, VISION_END):
        if token not in tokenizer.get_vocab():
            raise ValueError(f"{path}: the tokenizer has no {token} token")
    _check_model_config(path, proc)
    return proc


def _check_model_config(path: str, proc: Qwen2_5_VLImageProcessor) -> None:
    """Refuses a processor that disagrees with the directory's config.json (when present) on
    the image token id or the patch sizes, which would misplace or miscount image tokens."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return
    config = _read_json(file)
    vision = config.get("vision_config") or {}
    ip = proc.image_processor
    pairs = [
        ("image_token_id", config.get("image_token_id"), proc.image_token_id, IMAGE_TOKEN),
        ("vision_start_token_id", config.get("vision_start_token_id"),
         proc.tokenizer.convert_tokens_to_ids(VISION_START), VISION_START),
        ("vision_config.patch_size", vision.get("patch_size"), ip.patch_size, "patch_size"),
        ("vision_config.spatial_merge_size", vision.get("spatial_merge_size"), ip.merge_size,
         "merge_size"),
        ("vision_config.temporal_patch_size", vision.get("temporal_patch_size"),
         ip.temporal_patch_size, "temporal_patch_size"),
    ]  # fmt: skip
    for field, want, got, what in pairs:
        if want is not None and want != got:
            raise ValueError(f"{file}: {field} is {want} but the processor's {what} is {got}")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:  # fmt: skip
    """qwen_vl_utils' size rule: the (height, width) nearest the image's, each a multiple of
    `factor` (Python's round, half to even; at least one factor), scaled down (floor) above
    max_pixels or up (ceil) below min_pixels with the aspect ratio kept. The image processor's
    own rule (transformers' Qwen2-VL smart_resize) differs only in the floor of one factor on
    the rounded sides, so the two agree on the sides the first resize gives.

    Raises:
      ValueError: the aspect ratio is above MAX_RATIO.
    """
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} is above {MAX_RATIO}"
        )
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """qwen_vl_utils' conversion: RGBA composited on white, any other mode convert("RGB")."""
    if image.mode == "RGBA":
        out = Image.new("RGB", image.size, (255, 255, 255))
        out.paste(image, mask=image.split()[3])
        return out
    return image if image.mode == "RGB" else image.convert("RGB")


def fetch_image(image: Image.Image, factor: int = 28) -> Image.Image:
    """An image as qwen_vl_utils.fetch_image gives it to the processor: RGB (`to_rgb`),
    resized with Pillow's default filter for RGB (bicubic) to `smart_resize`'s size within
    [FETCH_MIN_TOKENS, FETCH_MAX_TOKENS] * factor**2 pixels."""
    rgb = to_rgb(image)
    h, w = smart_resize(rgb.height, rgb.width, factor, FETCH_MIN_TOKENS * factor**2,
                        FETCH_MAX_TOKENS * factor**2)  # fmt: skip
    return rgb.resize((w, h), Image.Resampling.BICUBIC)


def _check_image(proc: Qwen2_5_VLImageProcessor, image, name: str) -> None:
    """One line naming the image when it is not a still image both resizes accept."""
    if isinstance(image, (list, tuple)) or (isinstance(image, np.ndarray) and image.ndim == 4):
        raise ValueError(f"{name} is a video (a sequence of frames); only images are supported")
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL.Image, got {type(image).__name__}")
    w, h = image.size
    if w * h < proc.min_pixels:
        raise ValueError(f"{name} is {w}x{h} = {w * h} pixels, below the processor's "
                         f"min_pixels {proc.min_pixels}")  # fmt: skip
    f = proc.factor
    try:
        h1, w1 = smart_resize(h, w, f, FETCH_MIN_TOKENS * f * f, FETCH_MAX_TOKENS * f * f)
        # The processor's rule equals smart_resize on sides that are multiples of f.
        smart_resize(h1, w1, f, proc.min_pixels, proc.max_pixels)
    except ValueError as e:
        raise ValueError(f"{name} is {w}x{h}: {e} (the processor's limit)") from None


def preprocess(proc: Qwen2_5_VLImageProcessor, images: Sequence[Image.Image],
               names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Pixel patches and grids of `images` as the official code computes them:
    `fetch_image` (qwen_vl_utils' resize), then the PIL image processor.

    Args:
      proc: from `load_processor`.
      images: PIL images (any mode; converted as qwen_vl_utils converts).
      names: how errors name each image (default "image i").

    Returns:
      (pixel_values float32[P, C], image_grid_thw int64[I, 3]).

    Raises:
      ValueError: one line naming the image: a video, below min_pixels, or an aspect ratio
        above 200 before or after the first resize; TypeError for a non-image.
    """
    images = list(images)
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    if not images:
        raise ValueError("no images given")
    for image, name in zip(images, names, strict=True):
        _check_image(proc, image, name)
    fetched = [fetch_image(im, proc.factor) for im in images]
    out = proc.image_processor(fetched, return_tensors="np")
    return (np.asarray(out["pixel_values"], np.float32),
            np.asarray(out["image_grid_thw"], np.int64))  # fmt: skip


def question_prompt(question: str) -> str:
    """The official Qwen2.5-VL prompt text of a question."""
    return f"{question}{ANSWER_SUFFIX}"


def messages(text: str, n_images: int = 1) -> list[dict]:
    """One user message holding n_images images, then the text (the official order)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def check_messages(conversation: list[dict]) -> None:
    """Refuses content the image-only processor cannot give: videos, with one line."""
    for m in conversation:
        content = m.get("content")
        items = content if isinstance(content, list) else []
        for item in items:
            if isinstance(item, dict) and (item.get("type") == "video" or "video" in item):
                raise ValueError(f"a {m.get('role', 'message')} message holds a video; only "
                                 "images are supported")  # fmt: skip


def prompt_text(proc: Qwen2_5_VLImageProcessor, text: str, n_images: int = 1) -> str:
    """The chat template applied to `messages(text, n_images)` with the generation prompt:
    one <|image_pad|> per image, expanded by `expand_image_tokens`."""
    conversation = messages(text, n_images)
    check_messages(conversation)
    return proc.tokenizer.apply_chat_template(
        conversation, chat_template=proc.chat_template, tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip


def expand_image_tokens(proc: Qwen2_5_VLImageProcessor, text: str, grids: np.ndarray) -> str:
    """Each image placeholder of `text` (in order) as t * h * w / merge_size**2 of them, as
    Qwen2_5_VLProcessor expands them for grids int[I, 3] (the processor's image_grid_thw).

    Raises:
      ValueError: the text holds another number of placeholders than grids has rows.
    """
    parts = text.split(proc.image_token)
    if len(parts) - 1 != len(grids):
        raise ValueError(f"the prompt has {len(parts) - 1} image placeholders for "
                         f"{len(grids)} images")  # fmt: skip
    merge = proc.merge_size**2
    out = [parts[0]]
    for grid, rest in zip(grids, parts[1:], strict=True):
        out += [proc.image_token * (int(np.prod(grid)) // merge), rest]
    return "".join(out)


def encode(proc: Qwen2_5_VLImageProcessor, items: Sequence[tuple[str, Sequence[Image.Image]]],
           suffix: str = ANSWER_SUFFIX, pad_to_multiple_of: int | None = None,
           ) -> dict[str, np.ndarray]:  # fmt: skip
    """Left-padded model inputs of prompts, each a question and its images (the official
    message: the images, then "{question}{suffix}").

    Args:
      proc: from `load_processor`.
      items: (question, images) per prompt; [original, crop] for the crop answer.
      suffix: appended to each question (the official answer instruction by default).
      pad_to_multiple_of: bucket the padded length.

    Returns:
      input_ids int64[B, S] (left-padded with the tokenizer's pad id), attention_mask
      int64[B, S], pixel_values float32[P, C] (images in prompt order), image_grid_thw
      int64[I, 3], and mm_token_type_ids int64[B, S] (1 at image tokens), which
      transformers' Qwen2.5-VL reads to build its M-RoPE positions.
    """
    items = list(items)
    if not items:
        raise ValueError("no prompts given")
    texts, images = [], []
    for b, (question, imgs) in enumerate(items):
        imgs = [imgs] if isinstance(imgs, Image.Image) else list(imgs)
        if not imgs:
            raise ValueError(f"prompt {b} has no image")
        texts.append(prompt_text(proc, f"{question}{suffix}", len(imgs)))
        images += imgs
    return encode_texts(proc, texts, images, pad_to_multiple_of)


def encode_texts(proc: Qwen2_5_VLImageProcessor, texts: Sequence[str],
                 images: Sequence[Image.Image], pad_to_multiple_of: int | None = None,
                 ) -> dict[str, np.ndarray]:  # fmt: skip
    """`encode`'s arrays of prompt texts that hold one <|image_pad|> per image (the chat
    template's output, e.g. `prompt_text`), their images flattened in prompt order.

    Raises:
      ValueError: no texts, or the texts' placeholders do not count the images.
    """
    texts, images = list(texts), list(images)
    if not texts:
        raise ValueError("no prompts given")
    counts = [t.count(proc.image_token) for t in texts]
    if sum(counts) != len(images):
        raise ValueError(f"the prompts hold {sum(counts)} image placeholders for "
                         f"{len(images)} images")  # fmt: skip
    names = [f"prompt {b} image {i}" for b, n in enumerate(counts) for i in range(n)]
    pixel_values, grids = preprocess(proc, images, names)
    rows, at = [], 0
    for text, n in zip(texts, counts, strict=True):
        rows.append(proc.tokenizer(expand_image_tokens(proc, text, grids[at : at + n]))[
            "input_ids"])  # fmt: skip
        at += n
    pad = proc.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    length = max(map(len, rows))
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(rows), length), pad, np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row) :] = row
        attention_mask[b, length - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": pixel_values, "image_grid_thw": grids,
            "mm_token_type_ids": (input_ids == proc.image_token_id).astype(np.int64)}  # fmt: skip


def model_inputs(proc: Qwen2_5_VLImageProcessor,
                 items: Sequence[tuple[str, Sequence[Image.Image]]], **kwargs,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """`encode`'s arrays as (input_ids, attention_mask, pixel_values, image_grid_thw)."""
    enc = encode(proc, items, **kwargs)
    return enc["input_ids"], enc["attention_mask"], enc["pixel_values"], enc["image_grid_thw"]
