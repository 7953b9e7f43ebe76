"""Qwen2.5-VL maps (families/qwen2_5_vl.py) vs the recipes run on the HF torch model.

rel-att as the official code: the last position's attention at the layer, heads averaged,
over the image tokens, question / general prompt, reshaped to the merged grid. grad-att and
pure-grad by the paper's formulas with torch autograd. A batch of two images of different
sizes, left-padded and bucketed, against single unpadded torch runs.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from tests.hf_reference import make_tiny_qwen2_5_vl, qwen2_5_vl_config_dict
from tests.test_qwen2_5_vl_parity import IMG, images, prompt
from vicrop_jax.detail_mask import detail_masks
from vicrop_jax.families import family_of
from vicrop_jax.families import qwen2_5_vl as qwen_family
from vicrop_jax.families.qwen2_5_vl import map_shapes

QUESTION, GENERAL = (7, 8, 9), (10, 11)
LAYER = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import vicrop_jax

    d = str(tmp_path_factory.mktemp("tiny_qwen_maps"))
    hf = make_tiny_qwen2_5_vl(d, seed=2)
    model = vicrop_jax.load_model(d)
    singles = [images("wide", seed=3), images("square", seed=4)]
    rows = [prompt(g, QUESTION) for _, g in singles] + [prompt(g, GENERAL) for _, g in singles]
    s = max(map(len, rows))
    enc = {
        "input_ids": np.array([[3] * (s - len(r)) + r for r in rows]),
        "attention_mask": np.array([[0] * (s - len(r)) + [1] * len(r) for r in rows]),
        "pixel_values": np.concatenate([p for p, _ in singles] * 2),
        "image_grid_thw": np.concatenate([g for _, g in singles] * 2),
    }
    return model, hf, singles, enc


def torch_pass(hf, ids, pv, grid, pix_grad=False):
    ids = np.array([ids])
    pix = torch.tensor(pv, requires_grad=pix_grad)
    out = hf(input_ids=torch.tensor(ids), pixel_values=pix, image_grid_thw=torch.tensor(grid),
             mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
             output_attentions=True)  # fmt: skip
    return out, pix, ids[0] == IMG


def v(out):
    """The paper's v: log-probability of the most likely first answer token."""
    return torch.log_softmax(out.logits[0, -1], -1).max()


def our_maps(setup, method, detail=None):
    model, _, _, enc = setup
    return family_of(model).maps(model.module, model.params, enc, None, detail, method=method,
                                 layers=(LAYER,), place=jnp.asarray)  # fmt: skip


def check(got, want, shape, name):
    h, w = shape
    assert got.shape == (5, 6)  # the batch's largest grid in each dimension
    np.testing.assert_allclose(got[:h, :w], want, rtol=1e-4, atol=1e-6, err_msg=name)
    assert not got[h:].any() and not got[:, w:].any(), "outside the image's grid: zeros"


def test_rel_att_matches_official_recipe(setup):
    model, hf, singles, enc = setup
    got = our_maps(setup, "rel_att")
    shapes = map_shapes(model.config, enc["image_grid_thw"][:2])
    assert tuple(shapes[0]) == (4, 6)  # H/8 x W/8 px of the tiny tower: not square
    for i, (pv, grid) in enumerate(singles):
        att = []
        for text in (QUESTION, GENERAL):
            with torch.no_grad():
                out, _, img = torch_pass(hf, prompt(grid, text), pv, grid)
            att.append(out.attentions[LAYER][0, :, -1, torch.tensor(img)].mean(0).numpy())
        check(got[i], (att[0] / att[1]).reshape(shapes[i]), shapes[i], f"rel_att {i}")


def _layers(model):
    """Layers whose activations a gradient pass recomputes: every LM layer and ViT block."""
    return model.config.text_config.num_hidden_layers + model.config.vision_config.depth


def test_grad_att_matches_paper_formula(setup, remat_counts):
    model, hf, singles, enc = setup
    remat = remat_counts(qwen_family, "qwen_token_maps")
    got = our_maps(setup, "grad_att")
    assert remat == [_layers(model)]  # one gradient pass, each layer recomputed
    shapes = map_shapes(model.config, enc["image_grid_thw"][:2])
    for i, (pv, grid) in enumerate(singles):
        out, _, img = torch_pass(hf, prompt(grid, QUESTION), pv, grid)
        att = out.attentions[LAYER]
        (g,) = torch.autograd.grad(v(out), [att])
        sel = torch.tensor(img)
        want = (att[0, :, -1, sel] * torch.relu(g[0, :, -1, sel])).mean(0).detach().numpy()
        check(got[i], want.reshape(shapes[i]), shapes[i], f"grad_att {i}")


def test_pure_grad_matches_paper_formula(setup, remat_counts):
    """Gradient w.r.t. the resized image (the patches unflattened back to pixels: a patch
    holds its pixels in two frames), channel norm, question / general, times the detail
    mask, mean over each merged token's 2 x 2 patches."""
    model, hf, singles, enc = setup
    v_cfg = model.config.vision_config
    ps, m = v_cfg.patch_size, v_cfg.spatial_merge_size
    rng = np.random.RandomState(5)
    # The images the processor resized (to each grid x 4 px): the hook resizes them again.
    pils = [Image.fromarray((rng.rand(37, 55, 3) * 255).astype(np.uint8)) for _ in singles]
    masks = [detail_masks([im], (g[0, 1] * ps, g[0, 2] * ps))[0]
             for im, (_, g) in zip(pils, singles, strict=True)]  # fmt: skip
    detail = jnp.asarray(family_of(model).detail_masks(model.config, pils, enc))
    remat = remat_counts(qwen_family, "qwen_token_maps")
    got = our_maps(setup, "pure_grad", detail)
    assert remat == [_layers(model)]
    shapes = map_shapes(model.config, enc["image_grid_thw"][:2])
    for i, (pv, grid) in enumerate(singles):
        _, gh, gw = grid[0]
        norms = []
        for text in (QUESTION, GENERAL):
            out, pix, _ = torch_pass(hf, prompt(grid, text), pv, grid, pix_grad=True)
            (g,) = torch.autograd.grad(v(out), [pix])
            # [patches, C * 2 * ps * ps] -> the image [C, H, W], both frames summed
            g = g.numpy().reshape(gh // m, gw // m, m, m, 3, 2, ps, ps).sum(5)
            image = g.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * ps, gw * ps)
            norms.append(np.sqrt((image.astype(np.float64) ** 2).sum(0)))
        ratio = norms[0] / norms[1] * masks[i]
        h, w = shapes[i]
        want = ratio.reshape(h, m * ps, w, m * ps).mean((1, 3))
        check(got[i], want, shapes[i], f"pure_grad {i}")


def test_end_to_end_with_the_processor(tmp_path):
    """load_model gives the image-only processor; its encoded batch (two images of different
    sizes, left-padded) runs through vicrop_jax.forward as HF runs it, and rel-att maps come
    back on each image's merged grid."""
    import vicrop_jax
    from vicrop_jax import processing_qwen2_5_vl as qp
    from vicrop_jax.testing import QWEN_VOCAB, build_qwen2_5_vl_processor_files

    d = str(tmp_path / "qwen_e2e")
    tok = build_qwen2_5_vl_processor_files(d, max_pixels=28 * 28 * 64)
    ids = {k: tok.convert_tokens_to_ids(f"<|{k}|>") for k in
           ("image_pad", "video_pad", "vision_start", "vision_end")}  # fmt: skip
    config = qwen2_5_vl_config_dict()
    config.update(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                  vision_start_token_id=ids["vision_start"],
                  vision_end_token_id=ids["vision_end"])  # fmt: skip
    config["vision_config"].update(patch_size=14, window_size=112)
    config["text_config"].update(vocab_size=QWEN_VOCAB, eos_token_id=tok.eos_token_id,
                                 bos_token_id=None, pad_token_id=tok.pad_token_id)  # fmt: skip
    hf = make_tiny_qwen2_5_vl(d, seed=6, config=config)
    model = vicrop_jax.load_model(d)
    assert isinstance(model.processor, qp.Qwen2_5_VLImageProcessor)
    family = family_of(model)
    assert family.prompt("What?") == qp.prompt_text(model.processor, "What?" + qp.ANSWER_SUFFIX)
    rng = np.random.RandomState(7)
    pils = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
            for h, w in ((150, 100), (70, 200))]  # fmt: skip
    enc = qp.encode(
        model.processor,
        [("What?", [im]) for im in pils]
        + [("Write a general description of the image.", [im]) for im in pils],
    )
    assert (enc["attention_mask"] == 0).any()
    q = {k: enc[k][:2] for k in ("input_ids", "attention_mask")}
    n = int(enc["image_grid_thw"][:2].prod(-1).sum())
    out = vicrop_jax.forward(model, q["input_ids"], enc["pixel_values"][:n], q["attention_mask"],
                             image_grid_thw=enc["image_grid_thw"][:2])  # fmt: skip
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(q["input_ids"]),
                 attention_mask=torch.tensor(q["attention_mask"]),
                 pixel_values=torch.tensor(enc["pixel_values"][:n]),
                 image_grid_thw=torch.tensor(enc["image_grid_thw"][:2]),
                 mm_token_type_ids=torch.tensor(enc["mm_token_type_ids"][:2]))  # fmt: skip
    real = q["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(out.logits)[real] - ref.logits.numpy()[real]).max()
    assert diff <= 1e-4, diff
    maps = family.maps(model.module, model.params, enc, None, None, method="rel_att",
                       layers=family.layers(model.config), place=jnp.asarray)  # fmt: skip
    shapes = map_shapes(model.config, enc["image_grid_thw"][:2])
    assert maps.shape == (2, *shapes.max(0))
    for i, (h, w) in enumerate(shapes):
        assert (maps[i, :h, :w] > 0).all() and not maps[i, h:].any() and not maps[i, :, w:].any()
