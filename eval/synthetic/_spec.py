"""What an item is made of: the palette, glyphs, sizes, questions, the generator's options
(`SynthConfig`), the layout types, size buckets and vocabularies."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

# Fill colours; the printed word is black or white, whichever contrasts (luma 140).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 200, 20),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "purple": (128, 50, 170),
    "pink": (240, 110, 180),
}
SHAPES = ("circle", "square", "triangle")
# Printed words: short, distinct from colour and shape names, and unchanged by the VQA
# answer normalisation (no number words, articles or punctuation).
WORDS = (
    "arc", "axe", "bag", "bat", "bed", "bee", "box", "bus", "cab", "cap", "car", "cat",
    "cow", "cup", "dog", "egg", "elf", "fan", "fig", "fox", "gem", "hat", "hen", "ink",
    "jam", "jar", "jet", "key", "kit", "leg", "lid", "map", "mop", "mug", "net", "nut",
    "oak", "owl", "pan", "pen", "pig", "pin", "pot", "rat", "rug", "saw", "sun", "toy",
    "van", "web", "wig", "yak", "zip", "bird", "boat", "cake", "duck", "fish", "frog",
    "kite", "lamp", "leaf", "lion", "moon", "rose", "ship", "star", "tree", "wolf",
)  # fmt: skip

# Single printed letters (`SynthConfig.glyphs="letter"`, the demo model's task): distinct
# capitals, without A and I (the VQA answer normalisation drops the article "a").
LETTERS = tuple("BDEFHKLMNPRSTUXZ")
GLYPH_KINDS = ("word", "letter")

DEFAULT_SIZES = (224, 288, 336, 448, 512, 640, 768)
HIGH_RES_SIZES = (1152, 1408, 1664, 2048)

SMALL_MAX = 0.08
LARGE_MIN = 0.2
SIZE_BUCKETS = (
    ("small", 0.0, SMALL_MAX),
    ("medium", SMALL_MAX, LARGE_MIN),
    ("large", LARGE_MIN, 1.0),
)

TEXT_QUESTION = "What is written on the {color} {shape}?"
TEXT_SHORT = "{color} {shape}?"
COLOR_QUESTION = "What color is the shape with the text {text}?"
COLOR_SHORT = "text {text}?"
QUESTION_TYPES = ("text", "color")
# Prompt text the LLaVA / InstructBLIP templates and the ViCrop general prompt add around
# a question (image placeholders such as <image> are special tokens, not listed).
PROMPT_TEXTS = (
    "USER:",
    "ASSISTANT:",
    "Answer the question using a single word or phrase.",
    "Write a general description of the image.",
    "Question:",
    "Short answer:",
)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Generator options; every item of a benchmark uses one config.

    Attributes:
      sizes: candidate shorter sides (pixels) of ordinary images.
      high_res_sizes: candidate shorter sides of high-resolution images (all > 1024).
      high_res_fraction: probability that an item is high-resolution.
      rel_range: (min, max) of the subject's relative size, sampled log-uniformly.
      min_subject_px: smallest subject side in pixels of the original image.
      max_aspect: largest long/short side ratio (1.0: square images).
      num_objects: (min, max) shapes per image, inclusive.
      color_question_fraction: probability of a "color" question instead of a "text" one.
      glyphs: "word" (a three or four letter word from WORDS on each shape) or "letter"
        (one capital from LETTERS, drawn larger: about 0.6 of the shape's side).
      clutter: draw background lines, outlines and faint letters.
      distinct_colors: every shape of an image a different colour (shapes may repeat), so
        the question's colour alone names the subject; at most len(COLORS) shapes.
      noise_std: (min, max) standard deviation of the additive brightness noise (grain,
        the same on the three channels). Noise dominates the PNG size: about 350 KB for a
        768 px image at the default, about 30 KB with (0, 0).
    """

    sizes: tuple[int, ...] = DEFAULT_SIZES
    high_res_sizes: tuple[int, ...] = HIGH_RES_SIZES
    high_res_fraction: float = 0.0
    rel_range: tuple[float, float] = (0.03, 0.5)
    min_subject_px: int = 20
    max_aspect: float = 4 / 3
    num_objects: tuple[int, int] = (2, 5)
    color_question_fraction: float = 0.0
    glyphs: str = "word"
    clutter: bool = True
    noise_std: tuple[float, float] = (1.0, 5.0)
    distinct_colors: bool = False

    def __post_init__(self):
        lo, hi = self.rel_range
        if not 0 < lo <= hi <= 0.6:
            raise ValueError(f"rel_range must satisfy 0 < min <= max <= 0.6, got {self.rel_range}")
        if not self.sizes or min(self.sizes) < 32:
            raise ValueError(f"sizes must be non-empty and >= 32 px, got {self.sizes}")
        if self.high_res_fraction > 0 and (
            not self.high_res_sizes or min(self.high_res_sizes) <= 1024
        ):
            raise ValueError(f"high_res_sizes must all exceed 1024, got {self.high_res_sizes}")
        if not 0 <= self.high_res_fraction <= 1 or not 0 <= self.color_question_fraction <= 1:
            raise ValueError("high_res_fraction and color_question_fraction must be in [0, 1]")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        n_lo, n_hi = self.num_objects
        if not 1 <= n_lo <= n_hi <= len(COLORS) * len(SHAPES):
            raise ValueError(f"num_objects out of range: {self.num_objects}")
        if self.distinct_colors and n_hi > len(COLORS):
            raise ValueError(f"distinct_colors allows at most {len(COLORS)} shapes, "
                             f"got num_objects {self.num_objects}")  # fmt: skip
        if not 0 <= self.noise_std[0] <= self.noise_std[1]:
            raise ValueError(f"noise_std must satisfy 0 <= min <= max, got {self.noise_std}")
        if self.glyphs not in GLYPH_KINDS:
            raise ValueError(f"glyphs must be one of {GLYPH_KINDS}, got {self.glyphs!r}")
        if self.min_subject_px < 8:
            raise ValueError(f"min_subject_px must be >= 8, got {self.min_subject_px}")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One coloured shape: kind, colour name, printed word, box and the word's box."""

    kind: str
    color: str
    text: str
    box: tuple[int, int, int, int]
    text_box: tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything needed to render an item, and the question about it."""

    width: int
    height: int
    background: tuple[int, int, int]
    gradient: tuple[float, float]  # brightness change across the image, along x and y
    clutter: tuple[tuple[Any, ...], ...]
    objects: tuple[Shape, ...]
    subject: int  # index into objects
    question_type: str
    noise_std: float
    noise_seed: int


def size_bucket(rel_size: float) -> str:
    """'small' (< SMALL_MAX), 'medium' or 'large' (>= LARGE_MIN) for a relative size."""
    if rel_size < SMALL_MAX:
        return "small"
    return "medium" if rel_size < LARGE_MIN else "large"


def answer_vocabulary() -> tuple[str, ...]:
    """The closed set of answers: the printed words and letters and the colour names, lower
    case (both glyph kinds, so one vocabulary serves every config)."""
    return tuple(sorted(set(WORDS) | {c.lower() for c in LETTERS} | set(COLORS)))


def _tokens(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", text)


def training_vocabulary() -> tuple[str, ...]:
    """Every word and punctuation mark that questions, answers and prompts can contain.

    Case-sensitive: printed words appear lower case in answers and upper case in "color"
    questions, so both forms are listed. Sorted, no duplicates.
    """
    texts = list(PROMPT_TEXTS) + list(answer_vocabulary())
    for color in COLORS:
        for shape in SHAPES:
            texts += [
                TEXT_QUESTION.format(color=color, shape=shape),
                TEXT_SHORT.format(color=color, shape=shape),
            ]
    for word in WORDS + LETTERS:
        texts += [COLOR_QUESTION.format(text=word.upper()), COLOR_SHORT.format(text=word.upper())]
    return tuple(sorted({tok for text in texts for tok in _tokens(text)}))
