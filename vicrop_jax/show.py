"""Visualise a ViCrop map: the map over the image with the chosen box, saved as PNG.

python -m vicrop_jax.show --model DIR --image F --question Q --method rel_att --out F.png
    [--map_source base|tiles|both]   (LLaVA-NeXT: which grid's map is drawn and boxed)

The image is read as the official code reads it (`vicrop_jax.processing.read_image`:
`Image.open(F).convert("RGB")`, the stored pixel frame); --exif_transpose turns it upright.
Bad input (a missing or unreadable image or model, a missing output folder) ends with one
line on stderr and exit status 1; --verbose adds the traceback.
"""

from __future__ import annotations

import os
import sys
import textwrap
import traceback

import numpy as np
from absl import app, flags
from PIL import Image

_TITLE_PT = 11  # the question's font size (points)
_MAX_TITLE_LINES = 12  # a longer question is cut, ending in "..."
_WIDTH_IN = 10.0


def _wrap(text: str, width: int) -> str:
    """text wrapped to `width` characters per line, its own line breaks kept."""
    lines = []
    for para in text.splitlines() or [""]:
        lines += textwrap.wrap(para, width) or [""]
    if len(lines) > _MAX_TITLE_LINES:
        lines = lines[:_MAX_TITLE_LINES]
        lines[-1] = lines[-1][: max(width - 3, 1)] + "..."
    return "\n".join(lines)


def figure(image: Image.Image, att_map: np.ndarray, box, title: str = ""):
    """The picture `render` saves, as a matplotlib Figure (no pyplot state).

    Left: the image with the map (bilinearly upsampled) overlaid and the box drawn; right:
    the crop. `title` (the question and answers) goes above both panels, wrapped to the
    figure's width; every title lies inside the figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    w, h = image.size
    panel_in = min(max(_WIDTH_IN / 2 * h / max(w, 1), 1.0), 8.0)  # very tall: shrunk
    title = title.strip()
    # A first guess at characters per line (an average glyph is ~0.55 em wide), narrowed
    # below until the rendered text fits.
    chars = int(_WIDTH_IN * 72 / (0.55 * _TITLE_PT))
    text = _wrap(title, chars) if title else ""
    lines = text.count("\n") + 1 if text else 0
    title_in = lines * _TITLE_PT * 1.35 / 72
    fig = Figure(figsize=(_WIDTH_IN, panel_in + 0.6 + title_in), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    axes[0].imshow(image)
    axes[0].imshow(np.asarray(att_map, np.float32), cmap="jet", alpha=0.45,
                   extent=(0, w, h, 0), interpolation="bilinear")  # fmt: skip
    x1, y1, x2, y2 = (int(v) for v in box)
    axes[0].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white", lw=2))
    axes[0].set_title("importance map and box")
    axes[1].imshow(image.crop((x1, y1, x2, y2)))
    axes[1].set_title(f"crop {x1},{y1},{x2},{y2}")
    for ax in axes:
        ax.axis("off")
    if text:
        # parse_math=False: a "$" in a question is text, not mathtext.
        sup = fig.suptitle(text, fontsize=_TITLE_PT, parse_math=False)
        renderer = fig.canvas.get_renderer()
        limit = fig.bbox.width * 0.98
        while sup.get_window_extent(renderer).width > limit and chars > 10:
            chars = int(chars * 0.85)
            sup.set_text(_wrap(title, chars))
        # Glyphs wider than the guess can add lines: grow the figure to hold them.
        extra = sup.get_text().count("\n") + 1 - lines
        if extra > 0:
            fig.set_figheight(fig.get_figheight() + extra * _TITLE_PT * 1.35 / 72)
    return fig


def render(image: Image.Image, att_map: np.ndarray, box, out: str, title: str = "") -> str:
    """Writes `figure(image, att_map, box, title)` to the PNG file `out`; returns out."""
    figure(image, att_map, box, title).savefig(out, dpi=100)
    return out


def parse_layer(text: str | None):
    if text is None or text == "all":
        return text
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


_HELP_FLAGS = ("-?", "-h", "--help", "--helpshort", "--helpfull", "--helpxml")


def _define_flags():
    """The CLI's flags, defined only when run as a script: importing `render` from another
    absl program (eval.run) must not clash on flag names."""
    f = flags.FLAGS
    flags.DEFINE_string("model", None, "HF checkpoint directory", required=True)
    flags.DEFINE_string("image", None, "image file", required=True)
    flags.DEFINE_string("question", None, "question", required=True)
    flags.DEFINE_enum("method", "rel_att", ["rel_att", "grad_att", "pure_grad"], "map")
    flags.DEFINE_string("layer", None, "LM layer: int, comma list or 'all'")
    flags.DEFINE_bool("high_res", False, "the *_high variant")
    flags.DEFINE_enum("map_source", None, ["base", "tiles", "both"],
                      "LLaVA-NeXT only: the base tile's grid, the unpadded tiles grid, or both "
                      "averaged on the tiles grid (default both)")  # fmt: skip
    flags.DEFINE_integer(
        "processor_max_pixels",
        None,
        "the image processor's max_pixels (Qwen2.5-VL; default the official)",
    )
    flags.DEFINE_bool("exif_transpose", False, "turn the image upright by its EXIF orientation")
    flags.DEFINE_string("out", "vicrop.png", "output PNG")
    flags.DEFINE_bool("verbose", False, "on failure, print the traceback too")
    return f


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that asking for help exits 0 (absl exits 1)."""
    try:
        return app.parse_flags_with_usage(argv)
    except SystemExit as e:
        if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise


def _show(f) -> str:
    import vicrop_jax
    from vicrop_jax import bbox
    from vicrop_jax.importance import importance
    from vicrop_jax.pipeline import base_size
    from vicrop_jax.processing import read_image

    folder = os.path.dirname(os.path.abspath(f.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out {f.out}: the folder {folder} does not exist")
    image = read_image(f.image, exif_transpose=f.exif_transpose)
    options = {} if f.processor_max_pixels is None else {"max_pixels": f.processor_max_pixels}
    model = vicrop_jax.load_model(f.model, processor_options=options)
    att = np.asarray(importance(model.params, image, f.question, model=model,
                                method=f.method, layer=parse_layer(f.layer),
                                high_res=f.high_res, map_source=f.map_source))  # fmt: skip
    box = np.asarray(bbox.select_bbox(att, image.size, base_size(model)))
    out = render(image, att, box, f.out, f.question)
    return f"box {box.tolist()} on the {image.size[0]}x{image.size[1]} image -> {out}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        print(_show(f))
    except (ValueError, OSError) as e:  # bad input: the message says what to fix
        if f.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
