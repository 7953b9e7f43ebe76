"""Qwen2.5-VL port vs transformers' Qwen2_5_VLForConditionalGeneration (float32, eager).

The tiny model (tests/hf_reference.py) has 4 px patches and 16 px windows, so a 32 x 48 px
image is 8 x 12 patches in 6 windows (window attention splits it) and a 40 x 40 one leaves
partial windows; every prompt has text after its images (M-RoPE's text-after-image rule).
Patches and image_grid_thw are laid out with numpy as HF's Qwen2VLImageProcessor does.
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import vicrop_jax
from convert.checkpoint import CheckpointError, save_safetensors
from convert.qwen2_5_vl import export_params
from tests.hf_reference import QWEN_IDS, make_tiny_qwen2_5_vl, qwen2_5_vl_config_dict
from vicrop_jax.generate import greedy_generate
from vicrop_jax.loading import checked_abstract_params, parse_config
from vicrop_jax.models import qwen2_5_vl as qwen

IMG, VS, VE = QWEN_IDS["image"], QWEN_IDS["vision_start"], QWEN_IDS["vision_end"]
SIZES = {"wide": (32, 48), "small": (24, 16), "square": (40, 40)}


def patchify(image: np.ndarray, ps: int = 4, m: int = 2, tp: int = 2):
    """[C, H, W] -> (patches [h * w, C * tp * ps * ps], (1, h, w)) in HF's layout: merge blocks
    row-major, the patches of a block row-major, each patch [C, frame, ps, ps] (the frame
    repeated)."""
    c, hh, ww = image.shape
    gh, gw = hh // ps, ww // ps
    x = image.reshape(c, gh // m, m, ps, gw // m, m, ps).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, ps, ps))
    return np.ascontiguousarray(x.reshape(gh * gw, -1), np.float32), (1, gh, gw)


def images(*names, seed=0):
    """(pixel_values [patches, F], image_grid_thw [I, 3]) of the named test images."""
    rng = np.random.RandomState(seed)
    out = [patchify(rng.randn(3, *SIZES[n]).astype(np.float32)) for n in names]
    return np.concatenate([p for p, _ in out]), np.array([g for _, g in out])


def prompt(grid, text=(7, 8, 9)) -> list[int]:
    """BOS, a word, each image between vision start/end, then text after the images."""
    ids = [1, 5]
    for t, h, w in grid:
        ids += [VS] + [IMG] * (t * h * w // 4) + [VE]
    return ids + list(text)


def hf_forward(hf, ids, pv, grid, mask=None, **kw):
    ids = np.asarray(ids)
    with torch.no_grad():
        return hf(
            input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv),
            image_grid_thw=torch.tensor(grid), attention_mask=None if mask is None else
            torch.tensor(mask), mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
            **kw,
        )  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_qwen"))
    hf = make_tiny_qwen2_5_vl(d)
    return vicrop_jax.load_model(d), hf, d


@functools.partial(jax.jit, static_argnames=("module",))
def _run(module, params, ids, px, mask, layout, pos):
    return module.apply({"params": params}, ids, px, mask, patch_layout=layout,
                        position_ids=pos)  # fmt: skip


def apply(model, ids, pv, grid, mask=None, patches=None):
    """Our jitted pass, patches padded to `patches` (default: the bucket)."""
    px, layout = qwen.patch_inputs(model.config, pv, grid, patches=patches)
    pos = qwen.rope_index(ids, grid, mask, model.config)
    return _run(model.module, model.params, jnp.asarray(ids), jnp.asarray(px),
                None if mask is None else jnp.asarray(mask), jnp.asarray(layout),
                jnp.asarray(pos))  # fmt: skip


def generate(model, ids, pv, grid, mask=None, patches=None, max_new_tokens=6):
    """Our greedy tokens, patches padded to `patches` (default: the bucket)."""
    px, layout = qwen.patch_inputs(model.config, pv, grid, patches=patches)
    pos = qwen.rope_index(ids, grid, mask, model.config)
    extra = {"patch_layout": jnp.asarray(layout), "position_ids": jnp.asarray(pos)}
    return greedy_generate(
        model.module, model.params, jnp.asarray(ids), jnp.asarray(px),
        None if mask is None else jnp.asarray(mask), max_new_tokens=max_new_tokens, eos_ids=(),
        pad_id=3, extra=extra,
    )  # fmt: skip


def test_config_formats():
    """The hub's flat transformers-4 config and transformers 5's nested one parse the same."""
    nested = qwen2_5_vl_config_dict(tie_word_embeddings=True)
    text, vision = dict(nested["text_config"]), dict(nested["vision_config"])
    rope = text.pop("rope_parameters")
    vision["in_chans"] = vision.pop("in_channels")
    flat = {k: v for k, v in nested.items() if k not in ("text_config", "vision_config")}
    flat.update(text, vision_config=vision, rope_theta=rope["rope_theta"],
                rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
                model_type="qwen2_5_vl")  # fmt: skip
    a, b = parse_config(nested), parse_config(flat)
    assert a == b
    assert a.text_config.mrope_section == (1, 2, 2) and a.tie_word_embeddings
    assert a.vision_config.window_units == 2
    with pytest.raises(CheckpointError, match="num_hidden_layers: must be a positive int, got '2'"):
        parse_config({**flat, "num_hidden_layers": "2"})  # checked in the flat layout too
    deep = qwen2_5_vl_config_dict()
    deep["vision_config"]["depth"] = 10**9  # sized by extrapolation, not traced
    with pytest.raises(CheckpointError, match="vision_config.depth = 1000000000: the model's"):
        checked_abstract_params(parse_config(deep))
    with pytest.raises(CheckpointError, match="'qwen2_vl' is not supported"):
        parse_config({**nested, "model_type": "qwen2_vl"})
    with pytest.raises(CheckpointError, match="'qwen3_vl' is not supported"):
        parse_config({**nested, "model_type": "qwen3_vl"})


def test_rope_index_matches_hf(tiny):
    """Left-padded batch, two images in one row: positions equal HF's get_rope_index."""
    model, hf, _ = tiny
    _, grid = images("wide", "small", "square")
    rows = [prompt(grid[:2]), prompt(grid[2:], text=(7, 8, 9, 10, 11, 12))]
    s = max(map(len, rows))
    ids = np.array([[3] * (s - len(r)) + r for r in rows])
    mask = np.array([[0] * (s - len(r)) + [1] * len(r) for r in rows])
    pos = qwen.rope_index(ids, grid, mask, model.config)
    mm = torch.tensor((ids == IMG).astype(int))
    ref, _ = hf.model.get_rope_index(torch.tensor(ids), mm, torch.tensor(grid),
                                     attention_mask=torch.tensor(mask))  # fmt: skip
    np.testing.assert_array_equal(pos, ref.numpy())
    # Text after the image continues at the image start + max(h, w) / 2, not the token count.
    assert pos[0, 0, -1] < mask[0].sum() - 1
    with pytest.raises(ValueError, match="image-token run"):
        qwen.rope_index(ids, grid[::-1], mask, model.config)


def test_vision_tower(tiny):
    model, hf, _ = tiny
    pv, grid = images("wide", "square")
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    px, layout = qwen.patch_inputs(model.config, pv, grid)
    assert len(set(layout[0, :96, 2].tolist())) == 6, "the wide image spans 6 windows"
    feats = jax.jit(lambda p, x, lay: model.module.apply(
        {"params": p}, x, lay, method=lambda m, x, lay: m.image_features(x, lay),
    ))(model.params, jnp.asarray(px), jnp.asarray(layout))  # fmt: skip
    valid = np.asarray(qwen.token_mask(model.config, jnp.asarray(layout)))
    np.testing.assert_allclose(np.asarray(feats)[valid], ref, atol=1e-5, err_msg="merger output")
    # A larger bucket of patches and of images (an empty one) gives the same tokens.
    px, layout = qwen.patch_inputs(model.config, pv, grid, patches=192, images=3)
    assert px.shape == (3, 192, 96) and not layout[2, :, 3].any()
    feats = model.module.apply({"params": model.params}, jnp.asarray(px), jnp.asarray(layout),
                               method=lambda m, x, lay: m.image_features(x, lay))  # fmt: skip
    valid = np.asarray(qwen.token_mask(model.config, jnp.asarray(layout)))
    np.testing.assert_allclose(np.asarray(feats)[valid], ref, atol=1e-5, err_msg="larger bucket")


@pytest.mark.parametrize("names", [("wide",), ("wide", "small")])
def test_logits_and_attention_rows(tiny, names):
    model, hf, _ = tiny
    pv, grid = images(*names)
    ids = np.array([prompt(grid)])
    ref = hf_forward(hf, ids, pv, grid, output_attentions=True)
    out = vicrop_jax.forward(model, ids, pv, image_grid_thw=grid, output_full_attentions=True)
    logit_diff = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max()
    assert logit_diff <= 1e-4, logit_diff
    assert out.attentions.shape[0] == len(ref.attentions) == 2
    for layer, a in enumerate(ref.attentions):
        row_diff = np.abs(np.asarray(out.attentions[layer]) - a[:, :, -1].numpy()).max()
        assert row_diff <= 1e-5, (layer, row_diff)
        full_diff = np.abs(np.asarray(out.full_attentions[layer]) - a.numpy()).max()
        assert full_diff <= 1e-5, (layer, full_diff)
    if len(names) == 2:  # the order of the images is respected
        pv_swapped, grid_swapped = images(*names[::-1])
        ids_swapped = np.array([prompt(grid_swapped)])
        swapped = vicrop_jax.forward(model, ids_swapped, pv_swapped, image_grid_thw=grid_swapped)
        change = np.abs(np.asarray(swapped.logits[0, -1]) - np.asarray(out.logits[0, -1]))
        assert change.max() > 1e-3


def test_bad_inputs(tiny):
    model, _, _ = tiny
    pv, grid = images("wide")
    ids = np.array([prompt(grid)])
    with pytest.raises(ValueError, match="image_grid_thw's 1 images need 24"):
        vicrop_jax.forward(model, ids[:, 1:-6], pv, image_grid_thw=grid)
    with pytest.raises(ValueError, match="image_grid_thw is required"):
        vicrop_jax.forward(model, ids, pv)
    with pytest.raises(ValueError, match="videos are not supported"):
        vicrop_jax.forward(model, ids, pv, image_grid_thw=[[2, 8, 6]])


def test_gradients_match_torch(tiny):
    """d log max softmax / d (each layer's last-query row) and / d pixel_values, as torch's
    autograd of the official -CE(argmax) objective."""
    model, hf, _ = tiny
    pv, grid = images("wide")
    ids = np.array([prompt(grid)])
    pix = torch.tensor(pv, requires_grad=True)
    out = hf(input_ids=torch.tensor(ids), pixel_values=pix, image_grid_thw=torch.tensor(grid),
             mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
             output_attentions=True)  # fmt: skip
    z = out.logits[:, -1, :]
    loss = -torch.nn.functional.cross_entropy(z, z.argmax(-1))
    *g_att, g_pix = torch.autograd.grad(loss, [*out.attentions, pix])
    ref_pix = g_pix.numpy()
    px, layout = qwen.patch_inputs(model.config, pv, grid)
    pos = jnp.asarray(qwen.rope_index(ids, grid, None, model.config))
    cfg = model.config.text_config
    delta0 = jnp.zeros((cfg.num_hidden_layers, 1, cfg.num_attention_heads, ids.shape[1]))

    def v(delta, patches):
        o = model.module.apply({"params": model.params}, jnp.asarray(ids), patches,
                               attn_delta=delta, patch_layout=jnp.asarray(layout),
                               position_ids=pos)  # fmt: skip
        return jax.nn.log_softmax(o.logits[:, -1]).max(-1).sum()

    gd, gp = jax.jit(jax.grad(v, argnums=(0, 1)))(delta0, jnp.asarray(px))
    for layer, g in enumerate(g_att):
        ref = g[0, :, -1].numpy()
        scale = max(np.abs(ref).max(), 1)
        np.testing.assert_allclose(gd[layer, 0], ref, atol=1e-5 * scale, rtol=1e-4,
                                   err_msg=f"layer {layer}")  # fmt: skip
    np.testing.assert_allclose(np.asarray(gp)[0, : len(pv)], ref_pix,
                               atol=1e-5 * np.abs(ref_pix).max(), rtol=1e-4)  # fmt: skip
    assert not np.asarray(gp)[0, len(pv) :].any(), "padding patches get no gradient"


def test_padded_batch_equals_single_runs(tiny):
    """A left-padded batch of a one-image prompt and a two-image prompt, images of different
    sizes bucketed to one patch shape: each row equals HF's single unpadded run (logits,
    every layer's rows) and 16 greedy tokens equal HF generate's."""
    model, hf, _ = tiny
    assert qwen.bucket(8 * 12) == qwen.bucket(10 * 10) == 128  # one compiled shape for both
    singles = [images("wide", seed=0), images("square", "small", seed=1)]
    rows = [prompt(g, text=t) for (_, g), t in zip(singles, [(7, 8, 9, 10), (7,)], strict=True)]
    s = max(map(len, rows))
    ids = np.array([[3] * (s - len(r)) + r for r in rows])
    mask = np.array([[0] * (s - len(r)) + [1] * len(r) for r in rows])
    assert (mask == 0).any() and len(set(map(len, rows))) == 2
    pv = np.concatenate([p for p, _ in singles])
    grid = np.concatenate([g for _, g in singles])
    out = apply(model, ids, pv, grid, mask)
    gen = generate(model, ids, pv, grid, mask, max_new_tokens=16)
    for i, ((p1, g1), r) in enumerate(zip(singles, rows, strict=True)):
        one = np.array([r])
        ref = hf_forward(hf, one, p1, g1, output_attentions=True)
        diff = np.abs(np.asarray(out.logits[i, -len(r) :]) - ref.logits[0].numpy()).max()
        assert diff <= 1e-4, (i, diff)
        for layer, a in enumerate(ref.attentions):
            got = np.asarray(out.attentions[layer, i])
            assert not got[:, : s - len(r)].any(), "padding gets no attention"
            row_diff = np.abs(got[:, s - len(r) :] - a[0, :, -1].numpy()).max()
            assert row_diff <= 1e-5, (i, layer, row_diff)
        with torch.no_grad():
            ref_gen = hf.generate(
                input_ids=torch.tensor(one), pixel_values=torch.tensor(p1),
                image_grid_thw=torch.tensor(g1), attention_mask=torch.ones(one.shape, dtype=int),
                mm_token_type_ids=torch.tensor((one == IMG).astype(np.int64)),
                do_sample=False, max_new_tokens=16, min_new_tokens=16,
            )  # fmt: skip
        assert np.asarray(gen.tokens[i]).tolist() == ref_gen[0, len(r) :].tolist(), i


def test_converter_layouts_tied_and_export(tiny, tmp_path):
    """Hub keys (our export, and what transformers 5's save_pretrained writes) and
    transformers 5's `model.visual.*` / `model.language_model.*` keys load the same params;
    a tied model; strict about unknown keys; the export loads back into transformers."""
    model, hf, d = tiny
    tensors = export_params(model.params)
    assert all(k.split(".")[0] in ("visual", "model", "lm_head") for k in tensors)
    assert "visual.patch_embed.proj.weight" in tensors and "visual.merger.mlp.2.bias" in tensors
    hub = str(tmp_path / "hub")
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    save_safetensors(tensors, hub, config)
    with open(os.path.join(hub, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 9], "repetition_penalty": 1.05}, f)
    assert vicrop_jax.load_model(hub).config.text_config.eos_ids == (2, 9)  # as generate()
    v5 = str(tmp_path / "v5")  # transformers 5's own key layout
    v5_key = lambda k: re.sub(r"^model\.", "model.language_model.", k) if k.startswith(
        "model.") else re.sub(r"^visual\.", "model.visual.", k)  # fmt: skip
    renamed = {v5_key(k): v for k, v in tensors.items()}
    assert "model.language_model.embed_tokens.weight" in renamed
    assert "model.visual.blocks.0.attn.qkv.weight" in renamed
    save_safetensors(renamed, v5, config)
    for path in (hub, v5):
        again = vicrop_jax.load_model(path)
        for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(model.params), strict=True):
            np.testing.assert_array_equal(a, b)
    from transformers import Qwen2_5_VLForConditionalGeneration

    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(hub).eval()
    back.set_attn_implementation("eager")
    pv, grid = images("small")
    ids = np.array([prompt(grid)])
    np.testing.assert_allclose(hf_forward(back, ids, pv, grid).logits.numpy(),
                               hf_forward(hf, ids, pv, grid).logits.numpy(), atol=1e-6)  # fmt: skip
    # Strict: an unknown key is named.
    save_safetensors({**tensors, "visual.extra.weight": np.zeros(2, np.float32)}, hub, config)
    with pytest.raises(CheckpointError, match="visual.extra.weight"):
        vicrop_jax.load_model(hub)
    # Tied embeddings: no lm_head param; the head is the embedding.
    tied_dir = str(tmp_path / "tied")
    tied_hf = make_tiny_qwen2_5_vl(tied_dir, seed=1, tie_word_embeddings=True)
    tied = vicrop_jax.load_model(tied_dir)
    assert tied.config.tie_word_embeddings and "lm_head" not in tied.params
    ref = hf_forward(tied_hf, ids, pv, grid).logits.numpy()
    out = vicrop_jax.forward(tied, ids, pv, image_grid_thw=grid)
    assert np.abs(np.asarray(out.logits) - ref).max() <= 1e-4


def test_preset_param_counts_equal_hf():
    """qwen2.5-vl-3b / 7b / 72b: jax.eval_shape's param count equals HF's on the meta device."""
    import dataclasses

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    for name, cfg in qwen.PRESETS.items():
        t, v = dataclasses.asdict(cfg.text_config), dataclasses.asdict(cfg.vision_config)
        rope = {"rope_type": "default", "rope_theta": t.pop("rope_theta"),
                "mrope_section": list(t.pop("mrope_section"))}  # fmt: skip
        v.pop("rope_theta")
        hf_cfg = Qwen2_5_VLConfig(text_config={**t, "rope_parameters": rope}, vision_config=v,
                                  tie_word_embeddings=cfg.tie_word_embeddings)  # fmt: skip
        with torch.device("meta"):
            hf = Qwen2_5_VLForConditionalGeneration(hf_cfg)
        want = sum(p.numel() for p in hf.parameters())
        got = sum(x.size for x in jax.tree.leaves(qwen.abstract_params(cfg)))
        assert got == want, (name, got, want)


def test_bfloat16_close_to_float32(tiny):
    model, _, d = tiny
    m16 = vicrop_jax.load_model(d, dtype=jnp.bfloat16)
    pv, grid = images("wide")
    ids = np.array([prompt(grid)])
    o32 = vicrop_jax.forward(model, ids, pv, image_grid_thw=grid)
    o16 = vicrop_jax.forward(m16, ids, pv, image_grid_thw=grid)
    assert o16.attentions.dtype == jnp.float32  # softmax stays float32
    logit_diff = float(jnp.abs(o16.logits - o32.logits).max())
    att_diff = float(jnp.abs(o16.attentions - o32.attentions).max())
    # bf16 weights and activations, float32 softmax and norms (the LLaVA bounds).
    assert logit_diff < 0.1, logit_diff
    assert att_diff < 0.02, att_diff
