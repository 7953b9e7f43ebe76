"""ViCrop on Qwen2.5-VL through the public API: ask_batch with each map method on a tiny
checkpoint directory (its image-only processor, generation_config.json's repetition penalty),
maps on each image's own merged grid, boxes inside the images, and the [original, crop]
answer equal to HF generate on the same prompt."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hf_reference import make_tiny_qwen2_5_vl_checkpoint
from vicrop_jax import bbox, pipeline
from vicrop_jax import processing_qwen2_5_vl as qp
from vicrop_jax.importance import importance

MAX_PIXELS = 28 * 28 * 64  # at most 64 merged tokens an image
NEW = 6
QS = ["What is on the sign?", "Which colour is the car?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import vicrop_jax

    d = str(tmp_path_factory.mktemp("tiny_qwen_pipeline"))
    hf = make_tiny_qwen2_5_vl_checkpoint(d)
    model = vicrop_jax.load_model(d, processor_options={"max_pixels": MAX_PIXELS})
    rng = np.random.RandomState(3)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
              for h, w in ((240, 330), (300, 250))]  # fmt: skip
    return d, hf, model, images


def grid(model, image):
    """The image's merged grid (rows, columns) as the processor sizes it."""
    _, g = qp.preprocess(model.processor, [image])
    return tuple(int(v) for v in g[0, 1:] // 2)


@pytest.mark.parametrize("method", ["rel_att", "grad_att", "pure_grad"])
def test_ask_batch_each_method(setup, method):
    d, hf, model, images = setup
    assert model.processor.max_pixels == MAX_PIXELS
    answers = pipeline.ask_batch(model, images, QS, method=method, max_new_tokens=NEW)
    for ans, im in zip(answers, images, strict=True):
        assert ans.att_map.shape == grid(model, im) and np.isfinite(ans.att_map).all()
        assert ans.att_map.max() > 0
        x1, y1, x2, y2 = ans.bbox
        assert 0 <= x1 < x2 <= im.width and 0 <= y1 < y2 <= im.height, ans.bbox
        assert ans.original_answer and ans.crop_answer
    if method != "rel_att":
        return
    # The crop answer: HF generate on one message holding [original, crop], greedy, with the
    # checkpoint's generation_config.json (repetition penalty 1.05).
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(d)
    assert gen.repetition_penalty == 1.05 and not gen.do_sample
    gen.max_new_tokens = NEW
    ans, im = answers[1], images[1]
    enc = qp.encode(model.processor, [(QS[1], [im, im.crop(ans.bbox)])])
    with torch.no_grad():
        out = hf.generate(**{k: torch.tensor(v) for k, v in enc.items()}, generation_config=gen)
    new = out[0, enc["input_ids"].shape[1] :]
    assert model.processor.tokenizer.decode(new, skip_special_tokens=True).strip() == (
        ans.crop_answer
    )
    # importance(): high_res merges the tiles' maps, each cut to the tile's merged grid.
    high = importance(model.params, images[0], QS[0], model=model, method=method,
                      high_res=True, high_res_threshold=160)  # fmt: skip
    rows, cols, tw, th = bbox.high_res_grid(images[0].size, 160)
    gh, gw = grid(model, images[0].crop((0, 0, tw, th)))
    assert rows * cols > 1 and high.shape == (rows * gh, cols * gw), high.shape


def test_high_res_batch_of_images_whose_tiles_differ_in_grid(setup):
    """*_high over a batch whose images tile into different sizes (2 x 2 tiles of 165 x 120,
    2 x 1 of 250 x 150): each image's tiles merge on their own grid."""
    _, _, model, images = setup
    grids = [bbox.high_res_grid(im.size, 160) for im in images]
    assert grids[0][:2] != grids[1][:2] and grids[0][2:] != grids[1][2:]
    answers = pipeline.ask_batch(model, images, QS, method="rel_att", high_res=True,
                                 high_res_threshold=160, max_new_tokens=NEW)  # fmt: skip
    for ans, im, (rows, cols, tw, th) in zip(answers, images, grids, strict=True):
        gh, gw = grid(model, im.crop((0, 0, tw, th)))
        assert ans.att_map.shape == (rows * gh, cols * gw)
        assert np.isfinite(ans.att_map).all() and ans.att_map.max() > 0
        x1, y1, x2, y2 = ans.bbox
        assert 0 <= x1 < x2 <= im.width and 0 <= y1 < y2 <= im.height, ans.bbox


def test_eval_run_smoke_and_max_pixels_identity(setup, tmp_path):
    """eval.run's runner on the tiny checkpoint (a *_high method and a control); a run of
    another processor max_pixels refuses to resume the directory; eval.analysis's
    attention ratio refuses the family."""
    from eval import records
    from eval.runner import Settings, run
    from tests.test_eval_datasets import write_textvqa

    _, _, model, _ = setup
    spec = write_textvqa(str(tmp_path / "data"), n=2)

    def settings(max_pixels):
        return Settings(model=setup[0], task="textvqa", data=spec, output_dir=str(tmp_path / "out"),
                        methods=("rel_att_high", "center_crop"), batch_size=2, max_new_tokens=3,
                        progress=False, processor_max_pixels=max_pixels)  # fmt: skip

    path = run(settings(MAX_PIXELS), model=model, log=lambda msg: None)
    recs = records.read_records(path)
    assert len(recs) == 2
    for r in recs:
        assert r["error"] is None, r["error"]
        assert isinstance(r["original_answer"], str) and isinstance(r["crop_answer"], str)
        x1, y1, x2, y2 = r["bbox"]
        assert 0 <= x1 < x2 <= r["image_size"][0] and 0 <= y1 < y2 <= r["image_size"][1]
    with pytest.raises(records.ConfigMismatch, match="processor_max_pixels"):
        run(settings(MAX_PIXELS // 2), model=model, log=lambda msg: None)
    # The attention-ratio analysis reads one fixed patch grid: refused before any pass.
    from eval.analysis import layer_maps

    with pytest.raises(ValueError, match="fixed patch grid"):
        layer_maps(model, setup[3], QS)


def test_show_draws_a_qwen_map(setup, tmp_path):
    import types

    from vicrop_jax import show

    d, _, _, images = setup
    path = str(tmp_path / "im.png")
    images[0].save(path)
    flags = dict(model=d, image=path, question=QS[0], method="rel_att", layer=None,
                 high_res=False, map_source=None, processor_max_pixels=MAX_PIXELS,
                 exif_transpose=False,
                 out=str(tmp_path / "s.png"))  # fmt: skip
    line = show._show(types.SimpleNamespace(**flags))
    assert "on the 330x240 image" in line and (tmp_path / "s.png").stat().st_size > 0


def test_gt_map_control_draws_on_each_images_merged_grid(setup, tmp_path):
    """eval.run's gt_map control on Qwen2.5-VL: the ideal map is drawn on the image's merged
    grid (the shape its map methods give) and the box is the official search on it."""
    from eval import records
    from eval.engine import peak_map
    from eval.runner import Settings, run
    from tests.test_eval_datasets import write_vstar
    from vicrop_jax.families import family_of

    _, _, model, images = setup
    family = family_of(model)
    for im in images:  # the maps' shape (test_ask_batch_each_method) for an image's size
        assert family.control_map_shape(model.config, im.size, model.processor) == grid(model, im)
    spec = write_vstar(str(tmp_path / "data"), n=1)
    settings = Settings(model=setup[0], task="vstar", data=spec, output_dir=str(tmp_path / "o"),
                        methods=("gt_map",), batch_size=2, max_new_tokens=3, progress=False,
                        processor_max_pixels=MAX_PIXELS)  # fmt: skip
    recs = records.read_records(run(settings, model=model, log=lambda msg: None))
    assert len(recs) == 2
    for r in recs:
        assert r["error"] is None, r["error"]
        size = tuple(r["image_size"])
        shape = family.control_map_shape(model.config, size, model.processor)
        assert shape[0] != shape[1] and tuple(r["map_stats"]["shape"]) == shape
        ideal = peak_map(r["gt_bbox"], size, shape)
        assert list(r["bbox"]) == [int(v) for v in bbox.select_bbox(ideal, size, 224)]
