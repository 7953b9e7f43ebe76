"""Visualise a ViCrop map: the map over the image with the chosen box, saved as PNG.

python -m vicrop_jax.show --model DIR --image F --question Q --method rel_att --out F.png
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from PIL import Image


def render(image: Image.Image, att_map: np.ndarray, box, out: str, title: str = "") -> str:
    """Writes the image with the (bilinearly upsampled) map overlaid and the box drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    w, h = image.size
    fig, axes = plt.subplots(1, 2, figsize=(10, 5 * h / max(w, 1) + 0.6))
    axes[0].imshow(image)
    axes[0].imshow(np.asarray(att_map, np.float32), cmap="jet", alpha=0.45,
                   extent=(0, w, h, 0), interpolation="bilinear")  # fmt: skip
    x1, y1, x2, y2 = (int(v) for v in box)
    for ax in axes[:1]:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white", lw=2))
    axes[0].set_title(title or "importance map and box")
    axes[1].imshow(image.crop((x1, y1, x2, y2)))
    axes[1].set_title(f"crop {x1},{y1},{x2},{y2}")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def parse_layer(text: str | None):
    if text is None or text == "all":
        return text
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


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
    flags.DEFINE_string("out", "vicrop.png", "output PNG")
    return f


def main(argv):
    del argv
    f = flags.FLAGS
    import vicrop_jax
    from vicrop_jax import bbox
    from vicrop_jax.importance import importance
    from vicrop_jax.pipeline import base_size
    from vicrop_jax.processing import to_rgb

    model = vicrop_jax.load_model(f.model)
    image = to_rgb(Image.open(f.image))
    att = np.asarray(importance(model.params, image, f.question, model=model,
                                method=f.method, layer=parse_layer(f.layer),
                                high_res=f.high_res))  # fmt: skip
    box = np.asarray(bbox.select_bbox(att, image.size, base_size(model)))
    print(f"box {box.tolist()} -> {render(image, att, box, f.out, f.question)}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
