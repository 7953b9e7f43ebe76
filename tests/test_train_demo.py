"""The demo-model trainer (eval/train_demo/): config and flags, data, losses, resume, export."""

import collections
import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

import vicrop_jax
from eval import synthetic as syn
from eval.train_demo import crops, data, losses, probes, state, train
from eval.train_demo.config import (
    GLYPHS,
    Actions,
    ModelDims,
    TrainConfig,
    define_flags,
    flag_fields,
    from_flags,
)
from vicrop_jax.loading import module_for
from vicrop_jax.processing import llava_prompt

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prime-ish, distinct sizes so a wrong transpose fails loudly; 3 x 3 patch grid.
DIMS = ModelDims(image_size=33, patch_size=11, vision_hidden=14, vision_layers=1,
                 vision_heads=2, vision_mlp=23, text_hidden=24, text_layers=1, text_heads=4,
                 text_kv_heads=2, text_mlp=29)  # fmt: skip


def _settings(workdir, **kw) -> TrainConfig:
    base = dict(workdir=str(workdir), dims=DIMS, steps=3, batch_size=2, learning_rate=3e-3,
                warmup_steps=1, eval_every=0, log_every=1, checkpoint_every=100,
                progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _differs(a, b) -> list[bool]:
    """Per leaf of two same-structure param trees: does any element differ?"""
    return jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != y)), a, b))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = _settings(tmp_path_factory.mktemp("td_setup"))
    processor, config, hf = state.setup(s)
    return s, processor, config, hf


# The uninterrupted run of the resume test: two pretraining steps (vision tower on patch
# labels), then three question steps, exported. The fine-tune and probe tests start from it.
_BASE = dict(steps=5, pretrain_steps=2, pretrain_batch=3, patch_loss_weight=1.0)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """(settings, final state) of the `_BASE` run, trained once per module and process."""
    d = tmp_path_factory.mktemp("td_base")
    s = _settings(d / "base", export_dir=str(d / "export"), **_BASE)
    return s, train.train(s)


def test_tokenizer_covers_every_prompt_and_answer(setup):
    _, processor, _, _ = setup
    tok = processor.tokenizer
    for w in data.prompt_words():
        assert tok.convert_tokens_to_ids(w) != tok.unk_token_id, w
    for a in syn.answer_vocabulary():
        assert len(tok(a, add_special_tokens=False)["input_ids"]) == 1, a


def test_tokens_and_pixels_match_the_hf_processor(setup):
    s, processor, config, _ = setup
    batches = data.Data(s, processor)
    image, rec = syn.generate_item(0, 3, split="train")
    crop = image.crop((10, 20, 150, 130))
    for n, images in ((1, [image]), (2, [image, crop])):
        ref = processor(images=images, text=[llava_prompt(rec["question"], n)], return_tensors="np")
        assert batches.tokens.prompt(rec["question"], n) == ref["input_ids"][0].tolist()
        assert (ref["input_ids"] == config.image_token_index).sum() == n * config.num_image_tokens
        np.testing.assert_array_equal(
            batches.pixels(images), np.asarray(ref["pixel_values"]).transpose(0, 2, 3, 1)
        )


def test_loss_mask_covers_exactly_the_answer_and_eos(setup):
    s, processor, config, _ = setup
    batches = data.Data(s, processor)
    batch = batches.batch(5)
    tok = processor.tokenizer
    recs = [batches.item(5 * s.batch_size + i)[2] for i in range(s.batch_size)]
    for name, n in (("single", 1), ("pair", 2)):
        ids, mask, loss = (batch[f"{name}_{k}"] for k in ("input_ids", "attention_mask",
                                                           "loss_mask"))  # fmt: skip
        assert ids.shape == (s.batch_size, batches.len1 if n == 1 else batches.len2)
        for row, rec in enumerate(recs):
            marked = ids[row][loss[row] > 0].tolist()
            assert marked == [tok.convert_tokens_to_ids(rec["answer"]), tok.eos_token_id]
            assert loss[row, -2:].tolist() == [1.0, 1.0] and loss[row, :-2].sum() == 0
            real = ids[row][mask[row] > 0].tolist()
            assert real[:-2] == batches.tokens.prompt(rec["question"], n)
            assert (ids[row][mask[row] == 0] == tok.pad_token_id).all()  # left padding
            assert mask[row, -1] == 1 and (np.diff(mask[row]) >= 0).all()
    assert batch["pixel_values"].shape == (2 * s.batch_size, 33, 33, 3)
    # pack() on its own: two-token answers, padding on the left.
    packed = data.pack([([1, 7], [9, 10, 2]), ([1, 7, 8, 8], [9, 2])], 7, pad=3)
    np.testing.assert_array_equal(packed["loss_mask"], [[0, 0, 0, 0, 1, 1, 1],
                                                        [0, 0, 0, 0, 0, 1, 1]])  # fmt: skip
    np.testing.assert_array_equal(packed["input_ids"][0], [3, 3, 1, 7, 9, 10, 2])


def test_answer_loss_scores_only_marked_targets():
    logits = np.zeros((1, 4, 5), np.float32)
    logits[0, 1, 3] = 10.0  # position 1 predicts input 2 (token 3), which is marked
    logits[0, 0, 1] = 10.0  # position 0 predicts the unmarked input 1: wrong, not counted
    ids = np.array([[0, 4, 3, 2]])
    mask = np.array([[0, 0, 1, 0]], np.float32)
    loss, correct = losses.answer_loss(logits, ids, mask)
    assert float(loss) < 1e-3 and bool(correct[0])


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(setup):
    s, processor, config, _ = setup
    step, tx, _ = train.compiled_step(config, s)
    run = state.init_state(config, s, tx)
    batch = {k: v for k, v in data.Data(s, processor).batch(0).items() if k not in data.LOG_ONLY}
    values = []
    for _ in range(3):
        run, m = step(run, batch)
        values.append(float(m["loss"]))
    assert values[-1] < values[0] - 0.1, values


def test_resume_equals_uninterrupted_and_export_loads(base_run, tmp_path):
    # The interrupted run stops inside the pretraining and once more inside the second phase.
    base, full = base_run
    export_dir = base.export_dir
    train.train(_settings(tmp_path / "b", stop_at=1, **_BASE))
    train.train(_settings(tmp_path / "b", stop_at=3, **_BASE))
    resumed = train.train(_settings(tmp_path / "b", **_BASE))
    assert int(full["step"]) == int(resumed["step"]) == 5
    jax.tree.map(np.testing.assert_array_equal, full["params"], resumed["params"])
    jax.tree.map(np.testing.assert_array_equal, full["aux"], resumed["aux"])
    with pytest.raises(ValueError, match="another run"):
        train.train(_settings(tmp_path / "b", **{**_BASE, "seed": 1}))
    kinds = [json.loads(line)["kind"] for line in open(os.path.join(base.workdir, "log.jsonl"))]
    assert kinds == ["pretrain", "pretrain", "train", "train", "train"], kinds

    model = vicrop_jax.load_model(export_dir)
    flat = dict(jax.tree_util.tree_leaves_with_path(model.params))
    for path, v in jax.tree_util.tree_leaves_with_path(full["params"]):
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(v))
    prompt = llava_prompt("What is written on the red circle?", 2)
    enc = model.processor(images=[Image.new("RGB", (60, 40))] * 2, text=[prompt],
                          return_tensors="np")  # fmt: skip
    ids = enc["input_ids"][0]
    assert (ids == model.config.image_token_index).sum() == 2 * model.config.num_image_tokens
    assert model.processor.tokenizer.unk_token_id not in ids.tolist()
    assert enc["pixel_values"].shape == (2, 3, 33, 33)


def test_evaluate_reports_every_bucket_through_the_pipeline(setup):
    s, processor, config, hf = setup
    s = dataclasses.replace(s, eval_items=3, eval_batch=2)
    _, tx, _ = train.compiled_step(config, s)
    params = state.init_state(config, s, tx)["params"]
    model = vicrop_jax.Model(config=config, params=None, processor=processor, hf_config=hf)
    res = probes.evaluate(model, params, s)
    assert sum(res["n"].values()) == 3
    for k in ("full", "rel_att", "gt_crop", "map_hit", "box_hit"):
        assert 0.0 <= res[k]["all"] <= 1.0


def test_crops_hold_the_subject_or_miss_it():
    rng = np.random.default_rng(0)
    size, bbox = (500, 400), (300, 350, 330, 380)
    for _ in range(50):
        x1, y1, x2, y2 = crops.subject_crop(bbox, size, 64, rng)
        assert 0 <= x1 <= bbox[0] and bbox[2] <= x2 <= size[0]
        assert 0 <= y1 <= bbox[1] and bbox[3] <= y2 <= size[1]
        assert 64 <= x2 - x1 <= 128 and x2 - x1 == y2 - y1
        m = crops.miss_crop(bbox, size, 64, rng)
        assert m[2] <= bbox[0] or bbox[2] <= m[0] or m[3] <= bbox[1] or bbox[3] <= m[1]
    assert crops.fit_box(10, 10, 600, size) == (0, 0, 500, 400)
    assert crops.gt_crop((0, 0, 10, 10), size, 64) == (0, 0, 64, 64)


def test_subject_cells_and_attention_share():
    # x 50-60 -> col 2; y 0-30 -> rows 0-1
    cells = crops.subject_cells((50, 0, 60, 30), (100, 60), 4)
    np.testing.assert_array_equal(np.argwhere(cells), [[0, 2], [1, 2]])
    # One row: [bos, img x4, q, answer, eos]; the query predicting the answer is position 5.
    ids = np.array([[1, 4, 4, 4, 4, 9, 7, 2]])
    loss_mask = np.array([[0, 0, 0, 0, 0, 0, 1, 1]], np.float32)
    probs = np.zeros((1, 2, 8, 8), np.float32)
    probs[0, :, 5] = [0.5, 0, 0.3, 0.1, 0, 0.1, 0, 0]  # image tokens 2, 3 = cells 1, 2
    probs[0, :, 7, 1] = 1.0  # another query: ignored
    share = losses.subject_attention(probs, ids, loss_mask, np.array([[0, 1, 0, 0]], np.float32), 4)
    np.testing.assert_allclose(share, [0.3 / 0.4], rtol=1e-6)


def test_pair_cells_mark_the_subject_in_the_image_and_in_a_crop_holding_its_glyph():
    subject = {"bbox": [50, 0, 60, 30], "text_bbox": [52, 10, 58, 20]}  # glyph centre (55, 15)
    size, grid = (100, 60), 4
    own = crops.subject_cells(subject["bbox"], size, grid).reshape(-1)
    # Crop [40, 0, 80, 40): 10 px cells; the subject [50, 60) x [0, 30) -> col 1, rows 0-2.
    cells = crops.pair_cells(subject, size, (40, 0, 80, 40), grid)
    assert cells.shape == (2 * grid * grid,) and cells.dtype == np.float32
    np.testing.assert_array_equal(cells[:16], own)
    np.testing.assert_array_equal(np.argwhere(cells[16:].reshape(4, 4)), [[0, 1], [1, 1], [2, 1]])
    # A crop with a corner of the subject but not its glyph's centre: the image's cells only.
    corner = crops.pair_cells(subject, size, (20, 0, 54, 12), grid)
    np.testing.assert_array_equal(corner[:16], own)
    assert not corner[16:].any()
    # A crop through the glyph (its centre inside, 4 of its 6 columns): the image's only.
    cut = crops.pair_cells(subject, size, (54, 0, 94, 40), grid)
    np.testing.assert_array_equal(cut[:16], own)
    assert not cut[16:].any() and crops.contains_centre((54, 0, 94, 40), subject["text_bbox"])
    # The share runs over both images' tokens: [bos, img x2, img x2, q, answer, eos] with
    # 1 x 2 grids per image; the answer's query attends 0.2 to image 1's cell 1 and 0.6 to
    # the crop's cell 0, 0.2 to text.
    ids = np.array([[1, 4, 4, 4, 4, 9, 7, 2]])
    loss_mask = np.array([[0, 0, 0, 0, 0, 0, 1, 1]], np.float32)
    probs = np.zeros((1, 2, 8, 8), np.float32)
    probs[0, :, 5] = [0, 0, 0.2, 0.6, 0, 0.2, 0, 0]
    both = np.array([[0, 1, 0, 0]], np.float32)  # the image's cell 1, not the crop's
    np.testing.assert_allclose(losses.subject_attention(probs, ids, loss_mask, both, 4), [0.25],
                               rtol=1e-6)  # fmt: skip


def test_patch_labels_mark_glyph_and_shape_cells_in_image_and_crop():
    objects = [
        {"text": "k", "shape": "circle", "color": "red", "bbox": [0, 0, 20, 20],
         "text_bbox": [4, 4, 16, 16]},
        {"text": "cat", "shape": "square", "color": "blue", "bbox": [70, 30, 90, 50],
         "text_bbox": [72, 36, 88, 44]},
    ]  # fmt: skip
    labels = crops.patch_labels(objects, (0, 0, 100, 60), 4).reshape(2, 4, 4)
    k, cat = 1 + crops.GLYPH_CLASSES.index("K"), 1 + crops.GLYPH_CLASSES.index("CAT")
    red_circle = 1 + crops.COMBO_CLASSES.index(("red", "circle"))
    blue_square = 1 + crops.COMBO_CLASSES.index(("blue", "square"))
    # centre (10, 10) -> col 0, row 0; centre (80, 40) -> col 3 (80 * 4 / 100), row 2.
    assert labels[0, 0, 0] == k and labels[0, 2, 3] == cat
    assert labels[1, 0, 0] == red_circle and labels[1, 2, 3] == blue_square
    assert (labels > 0).sum() == 4
    # A crop [60, 20, 100, 60) holds only the square; its centre is at (20, 20) of 40 x 40.
    crop = crops.patch_labels(objects, (60, 20, 100, 60), 4).reshape(2, 4, 4)
    assert crop[0, 2, 2] == cat and crop[1, 2, 2] == blue_square and (crop > 0).sum() == 2
    # every_cell: cells are 10 x 10 in the crop; cell centres at 65, 75, 85, 95 (x) and
    # 25, 35, 45, 55 (y). The square [70, 90) x [30, 50) holds columns 1-2, rows 1-2; the
    # glyph [72, 88) x [36, 44) holds no cell centre but keeps its centre cell.
    every = crops.patch_labels(objects, (60, 20, 100, 60), 4, every_cell=True).reshape(2, 4, 4)
    assert (every[1] == blue_square).sum() == 4 and (every[1, 1:3, 1:3] == blue_square).all()
    assert (every[0] > 0).sum() == 1 and every[0, 2, 2] == cat


def test_ratio_peak_loss_is_low_when_rel_att_peaks_on_the_subject():
    subject = jnp.array([[0.0, 1.0, 1.0, 0.0]])
    q = jnp.array([[0.1, 0.3, 0.3, 0.3]])
    loss = lambda g: losses.ratio_peak_loss(q, jnp.asarray(g), subject, margin=0.5)
    bad, _ = loss([[0.25, 0.25, 0.25, 0.25]])  # ratio ties: cell 3 as high as the subject
    good, hit_good = loss([[0.1, 0.15, 0.15, 0.6]])  # the general prompt covers cell 3
    assert float(good[0]) < float(bad[0]) and bool(hit_good[0])
    grad = jax.grad(lambda g: losses.ratio_peak_loss(q, g, subject)[0].sum())(
        jnp.full((1, 4), 0.25)
    )
    assert grad[0, 3] < 0 < grad[0, 1]  # more general attention off the subject, less on it


# A fine-tune with the map losses and crop mix on and the patch loss off (the patch heads take
# no part). Several tests train it, so they share one compiled step.
_TUNE = dict(steps=2, attention_loss_weight=1.0, general_loss_weight=0.5,
             random_crop_fraction=0.3, large_distractor_fraction=0.3, large_partial_fraction=0.3,
             patch_loss_weight=0.0, pair_attention_weight=1.0, ratio_peak_weight=1.0,
             pair_contrast_questions=1)  # fmt: skip


def test_finetune_from_a_run_restarts_the_schedule_and_trains_the_map_losses(base_run, tmp_path):
    # A fine-tune from the base run with the attention, general-prompt and crop-mix options: it
    # starts from the base's params (step 0, fresh optimizer), logs the map losses, and
    # refuses a source with other dims or without checkpoints.
    src, base = base_run
    kw = dict(_TUNE, init_from=src.workdir)
    s = _settings(tmp_path / "ft", **kw)
    _, config, _ = state.setup(s)
    _, tx, _ = train.compiled_step(config, s)
    start = state.init_from_run(s, config, tx)
    assert int(start["step"]) == 0
    jax.tree.map(np.testing.assert_array_equal, start["params"], base["params"])
    tuned = train.train(s)
    assert int(tuned["step"]) == 2
    recs = [json.loads(line) for line in open(tmp_path / "ft" / "log.jsonl")]
    assert all(0.0 <= r["loss_general"] for r in recs if r["kind"] == "train")
    assert all(0.0 < r["att_subject_pair"] <= 1.0 for r in recs if r["kind"] == "train")
    assert all(0.0 < r["loss_ratio_peak"] for r in recs if r["kind"] == "train")
    saved = json.load(open(tmp_path / "ft" / "settings.json"))
    assert saved["init_from"] == kw["init_from"]
    assert saved == s.identity() and saved["large_partial_fraction"] == 0.3
    other = dataclasses.replace(DIMS, text_mlp=DIMS.text_mlp * 2)
    with pytest.raises(ValueError, match="other dims"):
        state.init_from_run(_settings(tmp_path / "x", dims=other, **kw), config, tx)
    with pytest.raises(FileNotFoundError, match="settings.json"):
        state.init_from_run(_settings(tmp_path / "y", init_from=str(tmp_path / "none")), config, tx)
    # reinit: the named subtrees start afresh (the seed's init), the rest is the base's.
    fresh = state.init_state(config, s, tx)["params"]
    re = state.init_from_run(
        _settings(tmp_path / "r", reinit=("language_model",), **kw), config, tx
    )
    for name, tree in re["params"].items():
        want = fresh[name] if name == "language_model" else base["params"][name]
        jax.tree.map(np.testing.assert_array_equal, tree, want)
    # The base's decoder moved, so the check above can tell them apart.
    assert any(_differs(fresh["language_model"], base["params"]["language_model"]))
    with pytest.raises(ValueError, match="lm_haed"):
        _settings(tmp_path / "q", reinit=("lm_haed",), **kw)
    with pytest.raises(ValueError, match="init_from"):
        _settings(tmp_path / "q", reinit=("language_model",))


def test_freeze_keeps_the_named_subtrees_fixed(base_run, tmp_path):
    # A fine-tune with the vision tower and projector frozen: they stay bitwise the base's
    # (no update, no weight decay), the decoder moves; a run from that frozen run restores
    # its checkpoint (another optimizer structure) and trains everything again.
    src, base = base_run
    frozen = ("vision_tower", "multi_modal_projector")
    kw = dict(steps=2, init_from=src.workdir, attention_loss_weight=1.0, patch_loss_weight=1.0,
              weight_decay=0.5)  # fmt: skip
    tuned = train.train(_settings(tmp_path / "ft", freeze=frozen, **kw))
    for name in frozen:
        jax.tree.map(np.testing.assert_array_equal, tuned["params"][name], base["params"][name])
    assert all(_differs(tuned["params"]["language_model"], base["params"]["language_model"]))
    assert json.load(open(tmp_path / "ft" / "settings.json"))["freeze"] == list(frozen)
    again = train.train(_settings(tmp_path / "ft2", **_TUNE, init_from=str(tmp_path / "ft")))
    assert any(_differs(again["params"]["vision_tower"], tuned["params"]["vision_tower"]))
    with pytest.raises(ValueError, match="vision_towr"):
        _settings(tmp_path / "q", freeze=("vision_towr",))


def test_finetune_from_an_export_reads_it_through_the_converter(base_run, tmp_path):
    # A fine-tune whose --init_from is an exported HF directory (as vicrop_jax/assets/demo):
    # the params are the exported ones, the patch heads start afresh (seeded); an
    # export of other dims and a directory that is neither a workdir nor an export refuse.
    src, base = base_run
    kw = dict(steps=2, init_from=src.export_dir, attention_loss_weight=1.0,
              patch_loss_weight=1.0, freeze=("vision_tower",))  # fmt: skip
    s = _settings(tmp_path / "ft", **kw)
    _, config, _ = state.setup(s)
    _, tx, _ = train.compiled_step(config, s)
    start = state.init_from_run(s, config, tx)
    jax.tree.map(np.testing.assert_array_equal, start["params"], base["params"])
    fresh = state.init_state(config, s, tx)["aux"]
    jax.tree.map(np.testing.assert_array_equal, start["aux"], fresh)
    assert any(_differs(fresh, base["aux"]))  # so the check above can tell them apart
    other = dataclasses.replace(DIMS, vision_heads=7)  # the same param shapes
    so = _settings(tmp_path / "x", dims=other, **kw)
    _, config_o, _ = state.setup(so)
    with pytest.raises(ValueError, match="num_attention_heads"):
        state.init_from_run(so, config_o, tx)
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        state.init_from_run(_settings(tmp_path / "y", init_from=str(tmp_path)), config, tx)
    # Without the patch loss the heads take no part: a fine-tune from the export and one from
    # the exporting run's workdir (its trained heads) end with the same params, bitwise.
    assert _TUNE["patch_loss_weight"] == 0.0
    from_export = train.train(_settings(tmp_path / "e0", **_TUNE, init_from=src.export_dir))
    from_run = train.train(_settings(tmp_path / "w0", **_TUNE, init_from=src.workdir))
    jax.tree.map(np.testing.assert_array_equal, from_export["params"], from_run["params"])
    assert int(from_export["step"]) == 2
    assert any(_differs(from_export["params"]["language_model"], base["params"]["language_model"]))


def test_general_uniformity_and_image_attention():
    # Rows [pad, bos, img x3, q]: the last position's attention over the 3 image tokens.
    ids = np.array([[0, 1, 4, 4, 4, 9]])
    probs = np.zeros((1, 2, 6, 6), np.float32)
    probs[0, :, 5] = [0, 0.4, 0.1, 0.2, 0.3, 0]
    att = losses.image_attention(probs, ids, 4, 3)
    np.testing.assert_allclose(att, [[1 / 6, 2 / 6, 3 / 6]], rtol=1e-6)
    assert float(losses.general_uniformity_loss(np.full((1, 3), 1 / 3, np.float32))[0]) < 1e-5
    assert float(losses.general_uniformity_loss(att)[0]) > 0.05


def test_crop_mix_gives_random_and_lookalike_crops():
    # Half random boxes and, on large subjects, the other half around another object (alike
    # when possible): most large subjects' crops do not hold the subject.
    s = TrainConfig(workdir="", dims=DIMS, negative_fraction=0.0, random_crop_fraction=0.5,
                    large_distractor_fraction=0.5)  # fmt: skip
    large_held, lookalike = [], 0
    for i in range(60):
        image, crop, rec, hit, box = data.training_item(s, i)
        assert crop.size == (box[2] - box[0], box[3] - box[1])
        assert hit == crops.contains_centre(box, rec["bbox"])
        if rec["size_bucket"] == "large":
            large_held.append(hit)
        other = crops.distractor(rec, np.random.default_rng(i))
        if other is not None:
            subj = rec["objects"][rec["subject_index"]]
            lookalike += other["color"] == subj["color"] or other["shape"] == subj["shape"]
    # most of these crops do not hold the subject
    assert len(large_held) >= 10 and sum(large_held) < 0.75 * len(large_held), large_held
    assert lookalike > 0


_CHAIN = (
    "train_demo",
    "train_demo_bind",
    "train_demo_questions",
    "train_demo_finetune",
    "train_demo_crops",
)


def _flag_lines(name: str) -> list[str]:
    """The flag lines of eval/flags/`name`.flags, comments dropped, includes kept."""
    path = os.path.join(_REPO, "eval", "flags", f"{name}.flags")
    lines = [line.strip() for line in open(path)]
    return [line for line in lines if line and not line.startswith("#")]


def _parse(argv: list[str]) -> TrainConfig:
    """TrainConfig from command-line arguments, through flags generated from the config."""
    values = flags.FlagValues()
    define_flags(TrainConfig, values)
    define_flags(Actions, values)
    values(["train_demo", *argv])
    return from_flags(TrainConfig, values)


def test_the_shipped_flagfiles_chain(monkeypatch):
    # Each stage starts from the previous stage's workdir with the same model, stage 1b
    # re-initialises the decoder, and only the last stage exports.
    monkeypatch.chdir(_REPO)  # the stage flagfiles include the common one by its path
    stages = [_parse([f"--flagfile=eval/flags/{name}.flags"]) for name in _CHAIN]
    assert stages[0].init_from == ""  # stage 1 starts from scratch
    for prev, cur in zip(stages[:-1], stages[1:], strict=True):
        assert cur.init_from == prev.workdir and cur.workdir != prev.workdir
        assert cur.identity()["dims"] == prev.identity()["dims"]
    assert [s.export_dir for s in stages] == ["", "", "", "", "vicrop_jax/assets/demo"]
    # The vision tower and projector stage 1 trained stay fixed from stage 1b on.
    frozen = ("vision_tower", "multi_modal_projector")
    assert [s.freeze for s in stages] == [(), frozen, frozen, frozen, frozen]
    assert [s.reinit for s in stages] == [(), ("language_model",), (), (), ()]
    assert stages[1].question_num_objects == (2, 2) and stages[1].question_rel_range == (0.2, 0.4)
    assert [s.eval_sizes for s in stages][-2:] == [(224, 288, 336, 384)] * 2


# The flags no shipped flagfile needs to set: where a run writes, how often it reports, and
# what the entry point does instead of training.
OPERATIONAL = {"workdir", "export_dir", "stop_at", "log_every", "eval_every", "eval_items",
               "eval_sizes", "checkpoint_every", "smoke", "export_only", "probe_items",
               "probe_questions"}  # fmt: skip


def test_every_flag_is_set_by_the_recipe_or_operational():
    """The trainer holds the shipped recipe: each flag is set by a stage flagfile (or the
    common one they include) or is operational; the stage flagfiles include the common one
    first and do not restate it."""
    common = _flag_lines("train_demo_common")
    include = "--flagfile=eval/flags/train_demo_common.flags"
    set_by_recipe = {line[2:].split("=")[0] for line in common}
    for name in _CHAIN:
        lines = _flag_lines(name)
        assert lines[0] == include, name
        assert not set(lines[1:]) & set(common), name  # what differs, only
        set_by_recipe |= {line[2:].split("=")[0] for line in lines[1:]}
    fields = flag_fields(TrainConfig) + flag_fields(Actions)
    names = {f.name for f, _ in fields}
    assert len(names) == len(fields)  # one flag per field
    for f, _ in fields:
        assert f.name in set_by_recipe or f.name in OPERATIONAL, f.name
        assert f.metadata["operational"] == (f.name in OPERATIONAL), f.name
        assert f.metadata["help"], f.name
    # --distinct_colors is a bare boolean; --noname would name a false one.
    flagged = {n[2:] if n.startswith("no") and n[2:] in names else n for n in set_by_recipe}
    assert flagged <= names, flagged - names
    # The flagfiles say what a stage does, not how it came about.
    for name in ("train_demo_common", *_CHAIN):
        text = open(os.path.join(_REPO, "eval", "flags", f"{name}.flags")).read().lower()
        for pattern in (r"\bsess(ion)s?\b", r" was ", r"\(new\)"):  # history words
            assert not re.search(pattern, text), (name, pattern)


def test_flags_round_trip_through_the_config():
    cfg = _parse(["--image_size=33", "--freeze=vision_tower,lm_head", "--distinct_colors",
                  "--question_rel_range=0.2,0.4", "--eval_sizes=224,288", "--workdir=/tmp/x",
                  "--patch_label_cells=all"])  # fmt: skip
    want = TrainConfig(workdir="/tmp/x", dims=dataclasses.replace(ModelDims(), image_size=33),
                       freeze=("vision_tower", "lm_head"), question_rel_range=(0.2, 0.4),
                       distinct_colors=True, eval_sizes=(224, 288),
                       patch_label_cells="all")  # fmt: skip
    assert cfg == want
    assert _parse([]) == TrainConfig()  # the flags' defaults are the fields'
    ident = cfg.identity()
    assert ident["dims"]["image_size"] == 33 and ident["question_rel_range"] == [0.2, 0.4]
    assert not {"workdir", "export_dir", "stop_at", "eval_sizes", "progress"} & set(ident)
    assert set(ident) == {f.name for f in dataclasses.fields(TrainConfig)
                          if not f.metadata.get("operational")}  # fmt: skip
    with pytest.raises(flags.IllegalFlagValueError, match="question_num_objects takes 2"):
        _parse(["--question_num_objects=2"])
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(["--patch_label_cells=every"])
    with pytest.raises(ValueError, match="patch_label_cells"):
        TrainConfig(patch_label_cells="every")


def test_large_subjects_get_their_own_distractor_share():
    """large_distractor_fraction=1 with no other crop kinds: every large item's crop is
    centred on another object (when there is one), every other item's on the subject;
    the same items and draws otherwise (the small ones' crops are unchanged)."""
    kw = dict(workdir="", dims=DIMS, negative_fraction=0.0)
    base = TrainConfig(**kw)
    large = TrainConfig(**kw, large_distractor_fraction=1.0)
    assert large.identity()["large_distractor_fraction"] == 1.0
    assert base.identity()["large_distractor_fraction"] == 0.0
    seen = set()
    for i in range(60):
        _, _, rec, hit_a, box_a = data.training_item(base, i)
        _, _, _, hit_b, box_b = data.training_item(large, i)
        bucket = rec["size_bucket"]
        seen.add(bucket)
        assert hit_a  # the subject's own crop
        if bucket != "large" or crops.distractor(rec, np.random.default_rng([0, i, 1])) is None:
            assert box_b == box_a
        else:
            assert box_b != box_a
    assert {"small", "large"} <= seen
    with pytest.raises(ValueError, match="large_distractor_fraction"):
        TrainConfig(**kw, random_crop_fraction=0.5, large_distractor_fraction=0.6)


def test_large_partial_crops_show_the_shape_but_not_its_glyph():
    """large_partial_fraction=1 with no other crop kinds: every large item's crop is a
    base x base box centred on the subject's shape holding under 80% of its glyph (so the
    whole letter is only in the original); the other items keep their subject crops, the same
    draws as without the option."""
    kw = dict(workdir="", dims=DIMS, negative_fraction=0.0)
    base, part = TrainConfig(**kw), TrainConfig(**kw, large_partial_fraction=1.0)
    assert part.identity()["large_partial_fraction"] == 1.0
    assert base.identity()["large_partial_fraction"] == 0.0
    partial = 0
    for i in range(60):
        _, _, rec, _, box_a = data.training_item(base, i)
        _, _, _, hit_b, box_b = data.training_item(part, i)
        if rec["size_bucket"] != "large":
            assert box_b == box_a
            continue
        subject = rec["objects"][rec["subject_index"]]
        overlaps = lambda box, bb: box[0] < bb[2] and bb[0] < box[2] and box[1] < bb[3] and (
            bb[1] < box[3])  # fmt: skip
        if box_b != box_a:  # a partial crop (else none was found: the subject's own crop)
            partial += 1
            assert box_b[2] - box_b[0] == box_b[3] - box_b[1] == DIMS.image_size
            assert overlaps(box_b, subject["bbox"])
            assert crops.coverage(box_b, subject["text_bbox"]) < crops.HOLDS_LETTER == 0.8
            assert hit_b == crops.contains_centre(box_b, rec["bbox"])
    assert partial >= 3
    with pytest.raises(ValueError, match="large_partial_fraction"):
        TrainConfig(**kw, random_crop_fraction=0.5, large_partial_fraction=0.6)


def test_object_hits_read_the_patch_heads_per_object():
    """Features that are the cells' one-hot labels, read by identity heads, name every object;
    a head with its classes rolled by one names none."""
    grid = 8
    image, rec = syn.generate_item(1, 5, split="test", glyphs=GLYPHS, sizes=(256,))
    labels = np.zeros((2, grid * grid), np.int64)
    for obj in rec["objects"]:  # each object's own cells (as object_hits reads them)
        own = crops.patch_labels([obj], (0, 0, *image.size), grid, every_cell=True)
        labels = np.where(own > 0, own, labels)
    n_g, n_c = 1 + len(crops.GLYPH_CLASSES), 1 + len(crops.COMBO_CLASSES)
    feats = np.concatenate([np.eye(n_g)[labels[0]], np.eye(n_c)[labels[1]]], axis=1)
    eye = lambda n, off: np.eye(n_g + n_c)[:, off : off + n]  # noqa: E731
    heads = {"glyph": {"kernel": eye(n_g, 0), "bias": np.zeros(n_g)},
             "combo": {"kernel": eye(n_c, n_g), "bias": np.zeros(n_c)}}  # fmt: skip
    hits = list(probes.object_hits(feats, heads, rec, image.size, grid))
    names = {k[2] for k, _ in hits}
    assert names == {"glyph", "combo"} and all(h for _, h in hits)
    roles = [k[0] for k, _ in hits]
    assert roles.count("subject") == 2 and len(hits) == 2 * len(rec["objects"])
    rolled = {k: {"kernel": np.roll(v["kernel"], 1, axis=1), "bias": v["bias"]}
              for k, v in heads.items()}  # fmt: skip
    assert not any(h for _, h in probes.object_hits(feats, rolled, rec, image.size, grid))


def test_probe_features_on_a_trained_run(base_run):
    s, _ = base_run
    out = probes.probe_features(s, 3, sizes=(224,), chunk=2)
    counted = {}
    for i in range(3):
        _, rec = syn.generate_item(1, i, split="test", glyphs=GLYPHS, sizes=(224,))
        for k, o in enumerate(rec["objects"]):
            role = "subject" if k == rec["subject_index"] else "distractor"
            key = (role, syn.size_bucket((o["bbox"][2] - o["bbox"][0]) / 224))
            counted[key] = counted.get(key, 0) + 1
    got = {(r, b): v["n"] for r, buckets in out.items() for b, v in buckets.items()}
    assert got == counted
    assert all(0 <= v[k] <= 1 for b in out.values() for v in b.values() for k in ("glyph", "combo"))


def test_answer_agreement_counts_images_answered_alike():
    got = probes.answer_agreement([["k", "K "], ["m", "p"], ["x", "x", "z"]],
                              [["k", "m"], ["m", "p"], ["x", "y", "z"]])  # fmt: skip
    assert got == {"images": 3, "questions": 7, "accuracy": round(5 / 7, 4),
                   "one_answer_images": round(1 / 3, 4)}  # fmt: skip


def test_question_probe_asks_about_each_large_shape_of_a_run(base_run):
    items = probes.question_probe_items(40)
    assert items  # some of the first 40 demo images hold two large shapes
    for _, qa in items:
        assert len(qa) >= 2 and len({q for q, _ in qa}) == len(qa)
        assert all(q.startswith("What is written on the ") and len(a) == 1 for q, a in qa)
    s, _ = base_run
    out = probes.probe_questions(s, 40, chunk=8)
    assert out["images"] == len(items) and out["questions"] == sum(len(qa) for _, qa in items)
    assert 0 <= out["accuracy"] <= 1 and 0 <= out["one_answer_images"] <= 1


def test_contrast_objects_are_other_readable_shapes_or_the_subject():
    rec = {"image_size": [300, 200], "subject_index": 0, "objects": [
        {"bbox": [0, 0, 50, 50], "text": "K"},     # the subject
        {"bbox": [60, 0, 110, 50], "text": "M"},   # 50 px: 0.25 of 200, readable
        {"bbox": [120, 0, 130, 10], "text": "P"},  # 10 px: small
    ]}  # fmt: skip
    got = crops.contrast_objects(rec, 6, np.random.default_rng(0))
    assert [o["text"] for o in got] == ["M"] * 6
    rec["objects"][1]["bbox"] = [60, 0, 80, 20]  # 0.1: only medium readable -> still M
    assert {o["text"] for o in crops.contrast_objects(rec, 4, np.random.default_rng(1))} == {"M"}
    rec["objects"] = rec["objects"][:1] + rec["objects"][2:]  # no readable other shape
    alone = crops.contrast_objects(rec, 2, np.random.default_rng(2))
    assert [o["text"] for o in alone] == ["K"] * 2


def _asked(tok, ids, lmask, objects):
    """(the objects a row's question names, its answer text)."""
    prompt = tok.decode(ids[lmask == 0])
    asked = [o for o in objects if f"the {o['color']} {o['shape']}?" in prompt]
    return asked, tok.decode(ids[lmask > 0][:-1]).strip()  # the answer tokens, not EOS


def test_contrast_rows_ask_about_other_shapes_of_the_same_image(setup):
    s, processor, config, _ = setup
    s = dataclasses.replace(s, contrast_questions=2, pair_contrast_questions=1,
                            distinct_colors=True, random_crop_fraction=0.5,
                            large_distractor_fraction=0.4, batch_size=6)  # fmt: skip
    batches = data.Data(s, processor)
    batch = batches.batch(0)
    b = s.batch_size
    assert batch["contrast_input_ids"].shape == (2 * b, batches.len1)
    assert batch["pair_contrast_input_ids"].shape == (b, batches.len2)
    tok = processor.tokenizer
    in_crop = 0
    for i in range(b):
        _, _, rec, hit, box = batches.item(i)
        assert bool(batch["crop_has_subject"][i]) == hit
        assert len({o["color"] for o in rec["objects"]}) == len(rec["objects"])
        for j in range(2):
            row = 2 * i + j
            asked, answer = _asked(tok, batch["contrast_input_ids"][row],
                                   batch["contrast_loss_mask"][row], rec["objects"])  # fmt: skip
            assert len(asked) == 1 and asked[0]["text"].lower() == answer
        # The pair row: on the item's own [image, crop], about another shape, the one whose
        # glyph the crop shows when there is one.
        ids, lmask = batch["pair_contrast_input_ids"][i], batch["pair_contrast_loss_mask"][i]
        assert (ids == config.image_token_index).sum() == 2 * config.num_image_tokens
        (o,), answer = _asked(tok, ids, lmask, rec["objects"])
        assert o["text"].lower() == answer
        others = [x for k, x in enumerate(rec["objects"]) if k != rec["subject_index"]]
        shown = [x for x in others if crops.contains_centre(box, x["text_bbox"])]
        short = min(rec["image_size"])
        readable = [x for x in others if x["bbox"][2] - x["bbox"][0] >= syn.SMALL_MAX * short]
        assert o in (shown or readable or [rec["objects"][rec["subject_index"]]])
        in_crop += bool(shown)
    assert in_crop  # some crop shows another shape's letter (the case the rows are for)
    with pytest.raises(ValueError, match="pair_contrast_questions"):
        dataclasses.replace(s, pair_contrast_questions=2)
    # The rows enter the loss: a step on them reports it, and other answers change it.
    step, tx, _ = train.compiled_step(config, s)
    run = state.init_state(config, s, tx)
    feed = {k: v for k, v in batch.items() if k not in data.LOG_ONLY}
    loss_fn = jax.jit(functools.partial(losses.loss_fn, module_for(config)))  # one compile
    m_a = loss_fn(run["params"], feed)[1]
    rolled = {f"{p}_{k}": np.roll(feed[f"{p}_{k}"], 1, axis=0)
              for p in ("contrast", "pair_contrast")
              for k in ("input_ids", "loss_mask", "attention_mask")}  # fmt: skip
    m_b = loss_fn(run["params"], {**feed, **rolled})[1]
    for k in ("loss_contrast", "loss_pair_contrast"):
        assert abs(float(m_a[k]) - float(m_b[k])) > 1e-4, k
    _, m = step(run, feed)
    for k in ("contrast", "pair_contrast"):
        assert np.isfinite(float(m[f"loss_{k}"])) and 0 <= float(m[f"acc_{k}"]) <= 1


def test_question_images_can_be_a_two_shape_curriculum():
    s = TrainConfig(workdir="", dims=DIMS, distinct_colors=True, question_num_objects=(2, 2),
                    question_rel_range=(0.2, 0.4))  # fmt: skip
    for i in range(12):
        image, _, rec, *_ = data.training_item(s, i)
        assert len(rec["objects"]) == 2 and rec["size_bucket"] == "large"
        assert 0.2 <= rec["rel_size"] <= 0.4
        assert len({o["color"] for o in rec["objects"]}) == 2
    ident = s.identity()
    assert ident["question_num_objects"] == [2, 2] and ident["question_rel_range"] == [0.2, 0.4]
    assert TrainConfig(workdir="", dims=DIMS).identity()["question_num_objects"] is None
    # Pretraining images keep their own crowd (6-10 shapes, any colours).
    assert s.pretrain_options()["num_objects"] == (6, 10)
    with pytest.raises(ValueError, match="num_objects"):
        TrainConfig(workdir="", dims=DIMS, question_num_objects=(3, 2))


def test_record_logs_each_prompt_once_and_the_missed_crops_apart():
    window = collections.defaultdict(list)
    yes_no, no_yes = np.array([True, False]), np.array([False, True])
    m = {"loss": 1.0, "loss_single": 0.5, "loss_pair": 0.25, "correct_single": yes_no,
         "correct_pair": no_yes}  # fmt: skip
    train.record_step(window, m, np.array([2, 0]), crop_has_subject=np.array([False, True]))
    assert window["acc_single"] == [1.0, 0.0] and window["acc_pair"] == [0.0, 1.0]
    assert window["acc_single_large"] == [1.0] and window["acc_pair_small"] == [1.0]
    assert window["acc_pair_miss_large"] == [0.0] and "acc_pair_miss_small" not in window
