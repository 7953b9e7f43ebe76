"""Synthetic small-detail VQA benchmark: printed words on coloured shapes at many sizes.

Each item is an image with background clutter (a tinted gradient, faint lines, faint shape
outlines, faint letters, pixel noise) and 2-5 coloured shapes (circle, square, triangle in
a fixed palette; every colour+shape pair at most once per image), each carrying one word
printed in upper case. One shape is the subject of the question:

  * "text" questions: "What is written on the red circle?" -> "cat" (the word, lower case);
  * "color" questions: "What color is the shape with the text CAT?" -> "red".

Answers come from a small closed set (`answer_vocabulary()`), so a tiny model can learn the
task; `training_vocabulary()` lists every word a question, answer or prompt can contain.

Subject size. The subject's box is square, side s pixels. `rel_size = s / min(W, H)`:
with the LLaVA-1.5 processor (shortest side resized to 336) the subject spans
`rel_size * 336` pixels of the model input. `rel_size` is sampled log-uniformly over
`rel_range` (default [0.03, 0.5]); the image's shorter side is then drawn from the sizes
where the subject is at least `min_subject_px` pixels, so a small subject is never
illegible in the original image too (which no crop could fix): small subjects therefore
come in the larger images. Buckets (`size_bucket`):

  * small:  rel_size < 0.08         (< 27 px at a 336 px input: the word is a few-pixel
                                     smudge, unreadable without zooming in);
  * medium: 0.08 <= rel_size < 0.2  (27-67 px: borderline);
  * large:  rel_size >= 0.2         (>= 67 px: clearly readable).

Over the default range each bucket holds about a third of the items. For a square subject
in a square image the thresholds are area ratios 0.0064 and 0.04, close to the area split
used for TextVQA in the paper.

Determinism. An item is a pure function of (seed, index, split, options): the layout is
drawn from `np.random.default_rng` seeded with those integers, and the pixels are rendered
from the layout alone (Pillow drawing; the noise has its own seed inside the layout). The
split name is folded into the seed, so "train" and "test" with the same seed differ.

Conventions. Boxes are `[x1, y1, x2, y2]` in image pixels with x2, y2 exclusive (a PIL
crop box); `image_size` is `[width, height]`. Text is drawn with Pillow's built-in font
(`ImageFont.load_default(size=...)`, no font files). Non-square images (aspect up to
`max_aspect`, default 4:3) put some subjects outside the central square, which a
processor that centre-crops (as llava-1.5-7b-hf's does) will cut; pass `max_aspect=1.0`
for square images.

CLI:
  python -m eval.synthetic --out DIR --n 500 --seed 1 --split test
writes DIR/images/*.png and DIR/data.json (one record per item, see `write_benchmark`).

Modules: _spec (palette, glyphs, questions, SynthConfig, the layout types, buckets and
vocabularies), _layout (sampling), _render (pixels), _items (records, items, the benchmark
writer), _cli (the command line). Every name is reachable here, as eval.synthetic.<name>.
"""

from eval.synthetic._cli import _define_flags as _define_flags
from eval.synthetic._cli import main as main
from eval.synthetic._items import generate_item, generate_items, layout_record, write_benchmark
from eval.synthetic._layout import _faint as _faint
from eval.synthetic._layout import _log_uniform as _log_uniform
from eval.synthetic._layout import _overlaps as _overlaps
from eval.synthetic._layout import _place_text as _place_text
from eval.synthetic._layout import _rng as _rng
from eval.synthetic._layout import _sample_clutter as _sample_clutter
from eval.synthetic._layout import _text_area as _text_area
from eval.synthetic._layout import _text_mask as _text_mask
from eval.synthetic._layout import sample_layout
from eval.synthetic._render import _draw_shape as _draw_shape
from eval.synthetic._render import _noise as _noise
from eval.synthetic._render import _noise_bank as _noise_bank
from eval.synthetic._render import render
from eval.synthetic._spec import COLOR_QUESTION as COLOR_QUESTION
from eval.synthetic._spec import COLOR_SHORT as COLOR_SHORT
from eval.synthetic._spec import (
    COLORS,
    DEFAULT_SIZES,
    GLYPH_KINDS,
    HIGH_RES_SIZES,
    LARGE_MIN,
    LETTERS,
    SHAPES,
    SIZE_BUCKETS,
    SMALL_MAX,
    WORDS,
    Layout,
    Shape,
    SynthConfig,
    answer_vocabulary,
    size_bucket,
    training_vocabulary,
)
from eval.synthetic._spec import PROMPT_TEXTS as PROMPT_TEXTS
from eval.synthetic._spec import QUESTION_TYPES as QUESTION_TYPES
from eval.synthetic._spec import TEXT_QUESTION as TEXT_QUESTION
from eval.synthetic._spec import TEXT_SHORT as TEXT_SHORT
from eval.synthetic._spec import _tokens as _tokens

__all__ = [
    "COLORS",
    "DEFAULT_SIZES",
    "GLYPH_KINDS",
    "HIGH_RES_SIZES",
    "LARGE_MIN",
    "LETTERS",
    "SHAPES",
    "SIZE_BUCKETS",
    "SMALL_MAX",
    "WORDS",
    "Layout",
    "Shape",
    "SynthConfig",
    "answer_vocabulary",
    "generate_item",
    "generate_items",
    "layout_record",
    "render",
    "sample_layout",
    "size_bucket",
    "training_vocabulary",
    "write_benchmark",
]
