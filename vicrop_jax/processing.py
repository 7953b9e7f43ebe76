"""Prompt templates per model family and host-side preprocessing through the HF processor.

The templates are the official code's (run.py in saccharomycetes/mllms_know): LLaVA asks
"{question} Answer the question using a single word or phrase." after one `<image>` per image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

GENERAL_QUESTION = "Write a general description of the image."
_LLAVA_SUFFIX = " Answer the question using a single word or phrase.\nASSISTANT:"


def llava_prompt(question: str, n_images: int = 1) -> str:
    """The official LLaVA-1.5 prompt with n_images image placeholders."""
    return "<image>" * n_images + f"\nUSER: {question}" + _LLAVA_SUFFIX


def check_question(question: str, name: str = "question", max_chars: int = 4000) -> str:
    """Rejects empty or absurdly long questions with a message naming the input."""
    if not isinstance(question, str):
        raise TypeError(f"{name} must be a string, got {type(question).__name__}")
    q = question.strip()
    if not q:
        raise ValueError(f"{name} is empty")
    if len(q) > max_chars:
        raise ValueError(f"{name} has {len(q)} characters; at most {max_chars} are accepted")
    return q


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image (grayscale, palette, RGBA, CMYK, 16-bit) as 8-bit RGB."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 0 else 1.0
        image = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.split()[-1])
        return canvas
    return image.convert("RGB")


def encode(processor, texts: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
    """Tokenises (left-padded) and preprocesses with the checkpoint's own HF processor."""
    out = processor(images=images, text=texts, return_tensors="np", padding=True)
    mask = np.asarray(out["attention_mask"])
    if (mask[:, -1] == 0).any():
        raise ValueError("the processor pads on the right; set tokenizer.padding_side='left'")
    return {k: np.asarray(v) for k, v in out.items()}
