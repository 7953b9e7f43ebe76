"""Items and benchmarks: a layout's record, (image, record) items, a benchmark on disk."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

from PIL import Image

from eval.synthetic._layout import sample_layout
from eval.synthetic._render import render
from eval.synthetic._spec import (
    COLOR_QUESTION,
    COLOR_SHORT,
    TEXT_QUESTION,
    TEXT_SHORT,
    Layout,
    SynthConfig,
    size_bucket,
)


def layout_record(layout: Layout, seed: int, index: int, split: str) -> dict[str, Any]:
    """The record of a layout (see `generate_item`); cheap, for statistics without pixels."""
    subj = layout.objects[layout.subject]
    color, shape, word = subj.color, subj.kind, subj.text.lower()
    if layout.question_type == "text":
        question = TEXT_QUESTION.format(color=color, shape=shape)
        short = TEXT_SHORT.format(color=color, shape=shape)
        answer = word
    else:
        question = COLOR_QUESTION.format(text=subj.text)
        short = COLOR_SHORT.format(text=subj.text)
        answer = color
    side = subj.box[2] - subj.box[0]
    rel = side / min(layout.width, layout.height)
    prefix = f"{split}_" if split else ""
    return {
        "id": f"{prefix}{seed}_{index:07d}",
        "question": question,
        "short_question": short,
        "answer": answer,
        "labels": [answer] * 10,
        "question_type": layout.question_type,
        "bbox": list(subj.box),
        "rel_size": rel,
        "area_ratio": side * side / (layout.width * layout.height),
        "size_bucket": size_bucket(rel),
        "image_size": [layout.width, layout.height],
        "objects": [
            {
                "shape": o.kind,
                "color": o.color,
                "text": o.text.lower(),
                "bbox": list(o.box),
                "text_bbox": list(o.text_box),
            }
            for o in layout.objects
        ],  # fmt: skip
        "subject_index": layout.subject,
        "seed": seed,
        "index": index,
        "split": split,
    }


def generate_item(
    seed: int, index: int, *, split: str = "", config: SynthConfig | None = None, **options
) -> tuple[Image.Image, dict[str, Any]]:
    """Generates item `index` of the stream (seed, split).

    Args:
      seed: stream seed.
      index: item number within the stream.
      split: optional stream name folded into the seed ("train", "test", ...).
      config: generator options; keyword `options` override its fields
        (e.g. `high_res_fraction=0.5`); an unknown option raises TypeError.

    Returns:
      (image, record): the RGB image and its record: id, question, short_question,
      answer, labels (10 copies of the answer), question_type, bbox ([x1, y1, x2, y2],
      x2/y2 exclusive), rel_size, area_ratio, size_bucket, image_size ([W, H]),
      objects (every shape: shape, color, text, bbox, text_bbox), subject_index,
      seed, index, split.
    """
    cfg = dataclasses.replace(config or SynthConfig(), **options)
    layout = sample_layout(seed, index, split=split, config=cfg)
    return render(layout), layout_record(layout, seed, index, split)


def generate_items(
    n: int, seed: int, *, split: str = "", start: int = 0, config: SynthConfig | None = None,
    **options,
) -> Iterator[tuple[Image.Image, dict[str, Any]]]:  # fmt: skip
    """Yields `generate_item(seed, i, ...)` for i in [start, start + n)."""
    cfg = dataclasses.replace(config or SynthConfig(), **options)
    for index in range(start, start + n):
        yield generate_item(seed, index, split=split, config=cfg)


def write_benchmark(
    out_dir: str, n: int, seed: int, split: str = "test", *, config: SynthConfig | None = None,
    **options,
) -> list[dict[str, Any]]:  # fmt: skip
    """Writes n items as out_dir/images/<id>.png and out_dir/data.json.

    data.json is a list of the records of `generate_item`, each with `image_path`
    (relative to out_dir) added. Returns that list.
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for image, record in generate_items(n, seed, split=split, config=config, **options):
        rel_path = os.path.join("images", f"{record['id']}.png")
        # Noisy images hardly compress; a low level saves most of the encoding time.
        image.save(os.path.join(out_dir, rel_path), compress_level=1)
        records.append({"id": record["id"], "image_path": rel_path, **record})
    with open(os.path.join(out_dir, "data.json"), "w") as f:
        json.dump(records, f, indent=1)
    return records
