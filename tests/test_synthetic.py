"""Tests for eval.synthetic: determinism, ground truth geometry, size spread, files, CLI."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import metrics
from eval import synthetic as syn

REPO = Path(__file__).resolve().parents[1]
RECORD_KEYS = {
    "id", "image_path", "question", "labels", "short_question", "bbox", "rel_size",
    "size_bucket", "image_size", "answer", "question_type", "area_ratio", "objects",
    "subject_index", "seed", "index", "split",
}  # fmt: skip


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    """bool[H, W]: pixels where two renders differ in any channel."""
    return (_pixels(a) != _pixels(b)).any(-1)


def test_same_seed_and_index_give_identical_item():
    im1, rec1 = syn.generate_item(5, 17, split="test")
    im2, rec2 = syn.generate_item(5, 17, split="test")
    np.testing.assert_array_equal(_pixels(im1), _pixels(im2))
    assert rec1 == rec2
    # The iterator yields the same items as single calls.
    items = list(syn.generate_items(2, 5, split="test", start=16))
    np.testing.assert_array_equal(_pixels(items[1][0]), _pixels(im1))
    assert items[1][1] == rec1


@pytest.mark.parametrize("other", [(6, 17, "test"), (5, 18, "test"), (5, 17, "train")])
def test_seed_index_and_split_change_the_item(other):
    im, rec = syn.generate_item(5, 17, split="test")
    seed, index, split = other
    im_o, rec_o = syn.generate_item(seed, index, split=split)
    assert rec["id"] != rec_o["id"]
    assert im.size != im_o.size or not np.array_equal(_pixels(im), _pixels(im_o))
    assert (rec["objects"], rec["image_size"]) != (rec_o["objects"], rec_o["image_size"])


def test_box_is_the_subject_and_the_word_is_inside_it():
    for index in range(40):
        layout = syn.sample_layout(9, index, split="test")
        s = layout.subject
        shape = layout.objects[s]
        record = syn.layout_record(layout, 9, index, "test")
        assert record["bbox"] == list(shape.box)
        x1, y1, x2, y2 = shape.box
        assert 0 <= x1 < x2 <= layout.width and 0 <= y1 < y2 <= layout.height

        full = syn.render(layout)
        no_subject = syn.render(layout, drop_objects=[s])
        no_word = syn.render(layout, drop_texts=[s])
        subject_px = _changed(full, no_subject)
        ys, xs = np.nonzero(subject_px)
        # Every pixel the subject draws lies in the box, and the box is tight.
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2), index
        # A triangle fills half of its box, a circle ~0.79, a square all of it.
        assert subject_px[y1:y2, x1:x2].mean() > 0.45

        # The word: drawn (some pixels change), inside its text box, on the shape's fill.
        word_px = _changed(full, no_word)
        assert word_px.sum() > 0, index
        ty, tx = np.nonzero(word_px)
        tx1, ty1, tx2, ty2 = shape.text_box
        assert tx.min() >= tx1 and tx.max() < tx2 and ty.min() >= ty1 and ty.max() < ty2
        assert x1 <= tx1 and tx2 <= x2 and y1 <= ty1 and ty2 <= y2
        fill_px = _changed(no_word, no_subject)
        assert fill_px[word_px].all(), f"item {index}: the word spills off its shape"


def test_objects_are_unique_and_apart():
    for index in range(40):
        layout = syn.sample_layout(2, index)
        combos = [(o.color, o.kind) for o in layout.objects]
        words = [o.text for o in layout.objects]
        assert len(set(combos)) == len(combos) and len(set(words)) == len(words)
        assert 1 <= len(layout.objects) <= 5 and 0 <= layout.subject < len(layout.objects)
        boxes = [o.box for o in layout.objects]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_rel_size_spans_the_range_and_fills_every_bucket():
    records = [syn.layout_record(syn.sample_layout(4, i), 4, i, "") for i in range(200)]
    rel = np.array([r["rel_size"] for r in records])
    assert rel.min() < 0.04 and rel.max() > 0.4
    assert 0.028 <= rel.min() and rel.max() <= 0.51
    buckets = collections.Counter(r["size_bucket"] for r in records)
    assert set(buckets) == {"small", "medium", "large"}
    # Log-uniform over [0.03, 0.5] puts about a third in each bucket.
    assert min(buckets.values()) >= 40, buckets
    for r in records:
        assert r["size_bucket"] == syn.size_bucket(r["rel_size"])
        w, h = r["image_size"]
        side = r["bbox"][2] - r["bbox"][0]
        assert side == r["bbox"][3] - r["bbox"][1]
        assert math.isclose(r["rel_size"], side / min(w, h))
        assert side >= syn.SynthConfig().min_subject_px
        assert min(w, h) in syn.DEFAULT_SIZES and max(w, h) / min(w, h) <= 4 / 3 + 0.01
    # Small subjects come in large images, so they stay legible at full resolution.
    small = [r for r in records if r["rel_size"] < 0.05]
    assert small and all(min(r["image_size"]) >= 448 for r in small)
    assert syn.size_bucket(0.079) == "small" and syn.size_bucket(0.08) == "medium"
    assert syn.size_bucket(0.199) == "medium" and syn.size_bucket(0.2) == "large"


def test_high_res_option():
    image, rec = syn.generate_item(1, 0, high_res_fraction=1.0)
    assert min(image.size) > 1024 and list(image.size) == rec["image_size"]
    layouts = [syn.sample_layout(1, i, config=syn.SynthConfig()) for i in range(20)]
    assert all(max(lay.width, lay.height) <= 1024 for lay in layouts)
    mixed = syn.SynthConfig(high_res_fraction=0.5)
    layouts = [syn.sample_layout(1, i, config=mixed) for i in range(40)]
    big = [min(lay.width, lay.height) > 1024 for lay in layouts]
    assert 5 < sum(big) < 35
    assert all(
        max(lay.width, lay.height) <= 1024 for lay, b in zip(layouts, big, strict=True) if not b
    )


def test_color_questions_and_vocabularies():
    answers = set(syn.answer_vocabulary())
    vocab = set(syn.training_vocabulary())
    assert answers == set(syn.WORDS) | set(syn.COLORS) | {c.lower() for c in syn.LETTERS}
    for index in range(20):
        _, rec = syn.generate_item(3, index, color_question_fraction=1.0)
        subject = rec["objects"][rec["subject_index"]]
        assert rec["question_type"] == "color"
        assert rec["answer"] == subject["color"] and subject["text"].upper() in rec["question"]
    for index in range(20):
        rec = syn.layout_record(syn.sample_layout(3, index), 3, index, "")
        assert rec["question"] == f"What is written on the {rec['short_question']}"
        assert rec["answer"] == rec["objects"][rec["subject_index"]]["text"]
    for frac in (0.0, 1.0):
        for index in range(10):
            rec = syn.layout_record(
                syn.sample_layout(3, index, config=syn.SynthConfig(color_question_fraction=frac)),
                3, index, "",
            )  # fmt: skip
            assert rec["answer"] in answers
            for text in (rec["question"], rec["short_question"], rec["answer"]):
                assert set(syn._tokens(text)) <= vocab, text
    for prompt in syn.PROMPT_TEXTS:
        assert set(syn._tokens(prompt)) <= vocab
    # The answers survive the VQA answer normalisation unchanged, so scores are exact.
    assert all(metrics.normalize_answer(a) == a for a in answers)


def test_distinct_colors_gives_every_shape_its_own_colour():
    shared = 0
    for index in range(60):
        plain = syn.sample_layout(3, index, split="test")
        shared += len({o.color for o in plain.objects}) < len(plain.objects)
        layout = syn.sample_layout(3, index, split="test",
                                   config=syn.SynthConfig(distinct_colors=True))  # fmt: skip
        colours = [o.color for o in layout.objects]
        assert len(set(colours)) == len(colours) and 1 <= len(colours) <= 5
    assert shared > 10  # the default repeats colours, so the option is what made them differ
    # The default stream is unchanged by the option's existence (False is the default).
    assert syn.generate_item(3, 0)[1] == syn.generate_item(3, 0, distinct_colors=False)[1]
    with pytest.raises(ValueError, match="distinct_colors"):
        syn.SynthConfig(distinct_colors=True, num_objects=(2, 8))


def test_options_are_checked():
    with pytest.raises(TypeError):
        syn.generate_item(0, 0, no_such_option=1)
    with pytest.raises(ValueError):
        syn.SynthConfig(rel_range=(0.0, 0.5))
    with pytest.raises(ValueError):
        syn.SynthConfig(high_res_fraction=0.5, high_res_sizes=(800,))


def _check_benchmark(out: Path, n: int, split: str):
    records = json.loads((out / "data.json").read_text())
    assert isinstance(records, list) and len(records) == n
    assert len({r["id"] for r in records}) == n
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["split"] == split
        assert r["labels"] == [r["answer"]] * 10
        assert isinstance(r["question"], str) and r["question"].endswith("?")
        assert r["size_bucket"] in {"small", "medium", "large"}
        assert not os.path.isabs(r["image_path"]) and r["image_path"].startswith("images/")
        with Image.open(out / r["image_path"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert list(im.size) == r["image_size"]
        x1, y1, x2, y2 = r["bbox"]
        w, h = r["image_size"]
        assert all(isinstance(v, int) for v in r["bbox"])
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    return records


def test_write_benchmark_schema_and_pixels(tmp_path):
    records = syn.write_benchmark(str(tmp_path), 5, 7, "val")
    assert _check_benchmark(tmp_path, 5, "val") == records
    image, rec = syn.generate_item(7, 3, split="val")
    with Image.open(tmp_path / records[3]["image_path"]) as saved:
        np.testing.assert_array_equal(_pixels(saved.convert("RGB")), _pixels(image))
    assert {k: v for k, v in records[3].items() if k != "image_path"} == rec


def test_cli_writes_n_records(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "eval.synthetic", f"--out={out}", "--n=4", "--seed=1"]
    cmd.append("--split=test")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_benchmark(out, 4, "test")


def test_letter_glyphs():
    answers = set(syn.answer_vocabulary())
    vocab = set(syn.training_vocabulary())
    seen = set()
    for index in range(40):
        _, rec = syn.generate_item(5, index, glyphs="letter")
        assert rec["answer"] in {c.lower() for c in syn.LETTERS} and rec["answer"] in answers
        assert set(syn._tokens(rec["question"])) <= vocab
        for o in rec["objects"]:
            x1, y1, x2, y2 = o["bbox"]
            tx1, ty1, tx2, ty2 = o["text_bbox"]
            assert len(o["text"]) == 1 and x1 <= tx1 < tx2 <= x2 and y1 <= ty1 < ty2 <= y2
            # One glyph is drawn large: its box is at least a third of the shape's side.
            assert max(tx2 - tx1, ty2 - ty1) >= (x2 - x1) / 3
        seen.add(rec["answer"])
    assert len(seen) >= 10
    assert all(metrics.normalize_answer(c.lower()) == c.lower() for c in syn.LETTERS)
    # Word mode is untouched by the option: the same layouts as before it existed.
    assert syn.generate_item(5, 0)[1] == syn.generate_item(5, 0, glyphs="word")[1]
    with pytest.raises(ValueError, match="glyphs"):
        syn.SynthConfig(glyphs="digit")
