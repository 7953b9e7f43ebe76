"""vicrop_jax.show: the picture's titles stay inside it, the image is read as eval reads it,
and bad input ends the command line with one line, not a traceback."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from eval import datasets
from vicrop_jax import show

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VSTAR_QUESTION = (
    "What is the colour of the small umbrella held by the woman standing next to the blue "
    "bicycle on the far left of the street, behind the fruit stall? It costs $5 or $10.\n"
    "(A) red\n(B) blue\n(C) green\n(D) white\n"
    "Answer with the option's letter from the given choices directly."
)


def _image(w: int, h: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize(
    "size,title",
    [((320, 240), f"{VSTAR_QUESTION}  truth: A  no crop: 'b'  rel_att: 'a'"),
     ((40, 400), "W" * 400),  # tall image, one unbroken wide word
     ((900, 60), "How many?  truth: 2  no crop: '3'  rel_att: '2'"),  # wide image, short title
     ((64, 48), "word " * 900)],  # beyond the line cap
)  # fmt: skip
def test_titles_stay_inside_the_figure_and_apart(size, title):
    w, h = size
    fig = show.figure(_image(w, h), np.random.RandomState(1).rand(5, 5), (0, 0, w // 2, h // 2),
                      title)  # fmt: skip
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    titles = [fig._suptitle] + [ax.title for ax in fig.axes]
    boxes = [t.get_window_extent(renderer) for t in titles]
    assert fig._suptitle.get_text().startswith(title[:8])
    for t, b in zip(titles, boxes, strict=True):
        assert t.get_text(), "every title is drawn"
        assert fig.bbox.x0 <= b.x0 and b.x1 <= fig.bbox.x1, (t.get_text()[:40], b, fig.bbox)
        assert fig.bbox.y0 <= b.y0 and b.y1 <= fig.bbox.y1, (t.get_text()[:40], b, fig.bbox)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    assert fig._suptitle.get_text().count("\n") < show._MAX_TITLE_LINES


def test_render_writes_a_png(tmp_path):
    out = show.render(_image(80, 60), np.ones((5, 5)), (10, 10, 50, 40), str(tmp_path / "a.png"),
                      VSTAR_QUESTION)  # fmt: skip
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] == 1000


def _exif6_jpeg(path: str) -> str:
    """A 320 x 240 JPEG whose EXIF says: rotate 90 degrees clockwise to display."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _image(320, 240).save(path, exif=exif.tobytes())
    return path


def test_show_reads_the_stored_frame_as_eval_does(tiny_llava, tmp_path):
    model, _ = tiny_llava
    path = _exif6_jpeg(str(tmp_path / "exif6.jpg"))
    flags = dict(model=model.path, image=path, question="What is written on the red circle?",
                 method="rel_att", layer=None, high_res=False, map_source=None,
                 processor_max_pixels=None,
                 out=str(tmp_path / "s.png"))  # fmt: skip
    line = show._show(types.SimpleNamespace(**flags, exif_transpose=False))
    assert "on the 320x240 image" in line
    assert datasets.load_image(path).size == (320, 240)  # eval: the same frame
    line = show._show(types.SimpleNamespace(**flags, exif_transpose=True))
    assert "on the 240x320 image" in line
    assert datasets.load_image(path, exif_transpose=True).size == (240, 320)


def test_show_draws_either_llava_next_map(tiny_llava_next, tmp_path, monkeypatch):
    """--map_source picks the grid that is drawn and boxed: the base tile's 5 x 5, or the
    unpadded tiles grid of a wide image (a 1 x 2 grid of 5 x 10 cells, 3 rows kept); the
    box is the official search's on that map."""
    from bench.bbox_reference import reference_bbox

    model, _ = tiny_llava_next
    path = str(tmp_path / "wide.png")
    _image(160, 60).save(path)
    drawn = {}

    def render(image, att_map, box, out, title):
        drawn[out] = (np.asarray(att_map), tuple(int(v) for v in box))
        return out

    monkeypatch.setattr(show, "render", render)
    for source, shape in (("base", (5, 5)), ("tiles", (3, 10)), ("both", (3, 10))):
        flags = dict(model=model.path, image=path, question="What is written on the red circle?",
                     method="rel_att", layer="2", high_res=False, map_source=source,
                     processor_max_pixels=None, exif_transpose=False,
                     out=str(tmp_path / f"{source}.png"))  # fmt: skip
        line = show._show(types.SimpleNamespace(**flags))
        att_map, box = drawn[flags["out"]]
        assert att_map.shape == shape, source
        assert box == tuple(reference_bbox(att_map, (160, 60), 35)), source
        assert f"box {list(box)} on the 160x60 image" in line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vicrop_jax.show", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


def test_show_cli_bad_input_is_one_line_on_stderr(tmp_path):
    good = _exif6_jpeg(str(tmp_path / "good.jpg"))
    data = open(good, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    base = ["--model=/nonexistent/model", "--question=What is it?"]
    cases = {
        "missing image": ([f"--image={tmp_path}/absent.jpg", f"--out={tmp_path}/o.png"],
                          "no such image file"),
        "truncated image": ([f"--image={tmp_path}/cut.jpg", f"--out={tmp_path}/o.png"],
                            "cut.jpg: cannot read image"),
        "missing output folder": ([f"--image={good}", f"--out={tmp_path}/nowhere/o.png"],
                                  "does not exist"),
    }  # fmt: skip
    for name, (args, message) in cases.items():
        r = _cli(*base, *args)
        assert r.returncode == 1, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            name, r.stderr)  # fmt: skip
        assert "Traceback" not in r.stderr + r.stdout, name
    r = _cli(*base, *cases["missing image"][0], "--verbose")
    assert r.returncode == 1 and "Traceback" in r.stderr and "no such image file" in r.stderr
    r = _cli("--help")
    assert r.returncode == 0 and "--question" in r.stdout, r.stderr
