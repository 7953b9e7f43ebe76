"""eval.analysis: window ratio arithmetic by hand; per-layer attention maps and ratios and the
layer sweep on the tiny random LLaVA."""

from __future__ import annotations

import numpy as np
import pytest

from eval import analysis, datasets
from eval.engine import Item
from tests.test_eval_datasets import WRITERS, write_unified


def test_box_cells_and_window_ratio_by_hand():
    assert analysis.box_cells((0, 0, 10, 10), (100, 50), 5) == (0, 0, 1, 1)
    assert analysis.box_cells((30, 20, 61, 21), (100, 50), 5) == (1, 2, 4, 3)
    assert analysis.box_cells((99, 49, 99, 49), (100, 50), 5) == (4, 4, 5, 5)  # >= 1 cell
    # rows x cols: 5 rows of 10 px, 10 columns of 10 px
    assert analysis.box_cells((30, 20, 61, 21), (100, 50), (5, 10)) == (3, 2, 7, 3)
    att = np.zeros((4, 4))
    att[1, 2] = 1.0
    # A 1x1 window on the hot cell: 1 / mean over 16 windows (1/16) = 16.
    assert analysis.window_ratio(att, (2, 1, 3, 2)) == pytest.approx(16.0)
    # A 2x2 window holding it: 1 / (4 windows of 9 contain it -> mean 4/9).
    assert analysis.window_ratio(att, (1, 0, 3, 2)) == pytest.approx(9 / 4)
    assert analysis.window_ratio(np.ones((4, 4)), (0, 0, 2, 3)) == pytest.approx(1.0)
    assert analysis.held_out("a", 1.0) and not analysis.held_out("a", 0.0)


def test_layer_maps_and_attention_ratios(tiny_llava, tmp_path):
    from vicrop_jax.loading import forward
    from vicrop_jax.processing import encode, llava_prompt

    model, _ = tiny_llava
    exs = datasets.load("vstar", WRITERS["vstar"](str(tmp_path)))[1::2]  # the small images
    items = [Item(e, datasets.load_image(e.image_file())) for e in exs]
    qs = [e.short_question for e in exs]
    maps = analysis.layer_maps(model, [it.image for it in items], qs)
    assert maps.shape == (2, 5, 5, 5)  # [B, L, N, N]
    # By hand: the last position's row over the image tokens, heads averaged.
    enc = encode(model.processor, [llava_prompt(q) for q in qs], [it.image for it in items])
    rows = np.asarray(
        forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"]).attentions
    )
    for b in range(2):
        pos = np.nonzero(enc["input_ids"][b] == model.config.image_token_index)[0]
        want = rows[:, b][:, :, pos].mean(1).reshape(5, 5, 5)
        np.testing.assert_allclose(maps[b], want, rtol=1e-5, atol=1e-7)
    ratios = analysis.attention_ratios(model, items, batch_size=2)
    assert ratios.shape == (2, 5) and np.isfinite(ratios).all() and (ratios > 0).all()
    summary = analysis.ratio_summary(ratios)
    assert summary["questions"] == 2 and len(summary["mean"]) == 5


def test_layer_sweep_chooses_on_held_out_and_reports_on_the_rest(tiny_llava, tmp_path):
    model, _ = tiny_llava
    spec = write_unified(str(tmp_path), n=6)
    items = [Item(e, datasets.load_image(e.image_file())) for e in datasets.load("gqa", spec)]
    out = analysis.layer_sweep(model, items, "gqa", [2, 4], batch_size=2, max_new_tokens=3)
    assert out["best_layer"] in (2, 4) and set(out["heldout_accuracy"]) == {2, 4}
    assert out["heldout_n"] + out["test_n"] == 6 and out["heldout_n"] > 0
    best = out["heldout_accuracy"][out["best_layer"]]
    assert best == max(out["heldout_accuracy"].values())
    if out["test_n"]:
        assert 0 <= out["test_accuracy"] <= 100 and 0 <= out["test_no_crop"] <= 100
    with pytest.raises(ValueError, match="no layers"):
        analysis.layer_sweep(model, items, "gqa", [])


def test_crop_contents_groups_crops_by_what_they_show():
    # One large-subject image: the subject's text at (100-140, 100-140), another object's
    # at (10-30, 10-30). Three questions, each with one rel_att crop: on the subject (read
    # right), on the other object (answered with its text), on neither (wrong).
    objects = [{"text": "k", "text_bbox": [100, 100, 140, 140]},
               {"text": "p", "text_bbox": [10, 10, 30, 30]}]  # fmt: skip
    synthetic = [{"id": f"q{i}", "objects": objects, "subject_index": 0,
                  "size_bucket": "large"} for i in range(3)]  # fmt: skip
    boxes, answers = ([90, 90, 150, 150], [0, 0, 40, 40], [200, 200, 260, 260]), ("k", "p", "z")
    records = [{"id": f"q{i}", "question": "What is written on the red circle?",
                "labels": ["k"] * 10, "original_answer": "k" if i < 2 else "x",
                "methods": {"rel_att": {"bbox": b, "crop_answer": a, "error": None}}}
               for i, (b, a) in enumerate(zip(boxes, answers, strict=True))]  # fmt: skip
    out = analysis.crop_contents(records, synthetic)["rel_att"]["large"]
    assert list(out) == ["subject_text", "other_text", "neither"]
    assert out["subject_text"] == {"n": 1, "crop_accuracy": 100.0, "no_crop_accuracy": 100.0,
                                   "answered_other": 0}  # fmt: skip
    assert out["other_text"] == {"n": 1, "crop_accuracy": 0.0, "no_crop_accuracy": 100.0,
                                 "answered_other": 1}  # fmt: skip
    assert out["neither"]["n"] == 1 and out["neither"]["no_crop_accuracy"] == 0.0
    # A crop holding only 3/4 of the subject's text is not "subject_text" at 0.8.
    records[0]["methods"]["rel_att"]["bbox"] = [90, 90, 130, 150]
    assert "subject_text" not in analysis.crop_contents(records, synthetic)["rel_att"]["large"]
    assert "rel_att | large | other_text | 1 | 0.0 | 100.0 | 1" in "\n".join(
        analysis.crop_contents_lines(analysis.crop_contents(records, synthetic))
    )
    with pytest.raises(ValueError, match="q0"):
        analysis.crop_contents(records, synthetic[1:])
