"""InstructBLIP ViCrop maps vs the paper's formulas computed with the HF PyTorch model.

A_st: the last position's attention over the T query-token positions (heads averaged) at the
LM layer(s); A_ti: one Q-Former cross-attention layer's queries over the ViT patches (class
token dropped, heads averaged); A_si = A_st @ A_ti on the N x N grid. The official code's
fixed 256-key LM slice is replaced by the query-token positions (see BUILD_NOTES.md).
"""

import numpy as np
import torch
from PIL import Image

from vicrop_jax import bbox, detail_mask, pipeline, processing
from vicrop_jax.families import instructblip as blip_family
from vicrop_jax.families.instructblip import default_qformer_layer
from vicrop_jax.importance import default_layer, importance
from vicrop_jax.processing import GENERAL_QUESTION, blip_prompt, encode
from vicrop_jax.testing import blip_hf_forward

QUESTION = "What is written on the red circle?"
GRID, PATCH, RES = 5, 7, 35


def _image(seed=0, size=(61, 47)):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


def _run(hf, proc, question, image, pixels=None):
    """HF vision -> Q-Former -> LM in one autograd graph, recording every attention."""
    enc = {k: torch.tensor(v) for k, v in encode(proc, [blip_prompt(question)], [image]).items()}
    out, cross = blip_hf_forward(hf, enc, enc["pixel_values"] if pixels is None else pixels)
    pos = (enc["input_ids"][0] == hf.config.image_token_index).nonzero()[:, 0]
    return out, cross, pos, enc


def _loss(out):
    z = out.logits[:, -1, :]
    return -torch.nn.functional.cross_entropy(z, z.argmax(1))  # the official v(x, q)


def _paper_rel_att(hf, proc, image, layers, qlayer):
    maps = []
    for q in (QUESTION, GENERAL_QUESTION):
        with torch.no_grad():
            out, cross, pos, _ = _run(hf, proc, q, image)
        atts = out.language_model_outputs.attentions
        st = np.mean([atts[l][0, :, -1, pos].mean(0).numpy() for l in layers], 0)  # [T]
        ti = cross[qlayer][0, :, :, 1:].mean(0).numpy()  # [T, P - 1]
        maps.append(st @ ti)
    return (maps[0] / maps[1]).reshape(GRID, GRID)


def _paper_grad_att(hf, proc, image, layers, qlayer):
    out, cross, pos, _ = _run(hf, proc, QUESTION, image)
    lm = [out.language_model_outputs.attentions[l] for l in layers]
    grads = torch.autograd.grad(_loss(out), [*lm, cross[qlayer]])
    st = np.mean([(a * torch.relu(g))[0, :, -1, pos].mean(0).detach().numpy()
                  for a, g in zip(lm, grads[:-1], strict=True)], 0)  # fmt: skip
    ti = (cross[qlayer] * torch.relu(grads[-1]))[0, :, :, 1:].mean(0).detach().numpy()
    return (st @ ti).reshape(GRID, GRID)


def _paper_pure_grad(hf, proc, image):
    norms = []
    for q in (QUESTION, GENERAL_QUESTION):
        enc = encode(proc, [blip_prompt(q)], [image])
        pix = torch.tensor(enc["pixel_values"], requires_grad=True)
        out, _, _, _ = _run(hf, proc, q, image, pix)
        (gpix,) = torch.autograd.grad(_loss(out), [pix])
        norms.append(np.linalg.norm(gpix[0].numpy().transpose(1, 2, 0), axis=2))
    mask = np.asarray(detail_mask.detail_mask(np.asarray(detail_mask.resize_for_mask(image, RES))))
    grad = norms[0] / norms[1] * mask
    return grad.reshape(GRID, PATCH, GRID, PATCH).mean((1, 3))


def test_paper_layers():
    assert default_layer("instructblip", 32) == 15 and default_qformer_layer(6) == 2
    assert default_layer("instructblip", 5) == 2 and default_qformer_layer(3) == 1


def test_rel_att_matches_paper(tiny_instructblip, remat_counts):
    """Default layers (LM 2 of 5, cross-attention 1 of 3). The question and the general
    prompt differ in length, so the batched pass also checks padding in both tokenizers."""
    model, hf = tiny_instructblip
    remat = remat_counts(blip_family, "blip_maps")
    img = _image(1)
    ref = _paper_rel_att(hf, model.processor, img, (2,), 1)
    ours = np.asarray(importance(model.params, img, QUESTION, model=model))
    assert ours.shape == (GRID, GRID)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    assert np.ptp(ref) > 1e-3, "rel-att reference is flat: the test would be weak"
    assert remat == [0], "a forward-only map recomputes nothing"


def _layers(model):
    """Layers whose activations a gradient pass recomputes: every LM and ViT layer."""
    return model.config.text_config.num_hidden_layers + model.config.vision_config.num_hidden_layers


def test_grad_att_matches_paper(tiny_instructblip, remat_counts):
    model, hf = tiny_instructblip
    remat = remat_counts(blip_family, "blip_maps")
    img = _image(2)
    ref = _paper_grad_att(hf, model.processor, img, (0, 4), 2)
    assert np.abs(ref).max() > 0, "reference map is all zeros: the test would be vacuous"
    ours = np.asarray(importance(model.params, img, QUESTION, model=model, method="grad_att",
                                 layer=[0, 4], qformer_layer=2))  # fmt: skip
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7 * np.abs(ref).max())
    assert remat == [_layers(model)]  # one gradient pass, each layer recomputed


def test_pure_grad_matches_paper(tiny_instructblip, remat_counts):
    model, hf = tiny_instructblip
    remat = remat_counts(blip_family, "blip_maps")
    img = _image(3, size=(80, 52))
    ref = _paper_pure_grad(hf, model.processor, img)
    ours = np.asarray(importance(model.params, img, QUESTION, model=model, method="pure_grad"))
    assert ours.shape == (GRID, GRID)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    assert remat == [_layers(model)]


def test_pipeline_and_importance_for_both_families(tiny_llava, tiny_instructblip, monkeypatch):
    calls = []
    real = processing.encode

    def spy(proc, texts, images, *args):
        out = real(proc, texts, images, *args)
        calls.append((list(texts), len(images), out))
        return out

    monkeypatch.setattr(processing, "encode", spy)
    img = _image(6, size=(90, 64))
    # max_new_tokens as in test_pipeline (LLaVA) and the generation parity test (InstructBLIP),
    # so a full run reuses their compiled functions.
    for (model, _), image_marks, n_new in [
        (tiny_llava, "<image>", 4),
        (tiny_instructblip, None, 16),
    ]:
        calls.clear()
        ans = pipeline.ask(model, img, QUESTION, max_new_tokens=n_new, share_prefill=False)
        # The baseline's, the map's ([question; general prompt]) and the crop answer's.
        (base_texts, n_base, base), (map_texts, _, _), (crop_texts, n_crop, crop) = calls
        assert (n_base, n_crop, len(map_texts)) == (1, 2, 2)
        cfg = model.config
        tokens = [(e["input_ids"] == cfg.image_token_index).sum() for e in (base, crop)]
        assert tokens == [cfg.num_image_tokens, 2 * cfg.num_image_tokens]
        if image_marks:  # LLaVA: placeholders in the text; InstructBLIP: added by the encoder
            assert crop_texts[0].count(image_marks) == 2
        else:
            assert crop_texts == [blip_prompt(QUESTION)]
            assert crop["qformer_input_ids"].shape[0] == 2
        expected = importance(model.params, img, QUESTION, model=model)
        np.testing.assert_allclose(ans.att_map, expected, rtol=1e-5)
        box = tuple(np.asarray(bbox.select_bbox(expected, img.size, RES)).tolist())
        assert box == ans.bbox
        assert isinstance(ans.original_answer, str) and isinstance(ans.crop_answer, str)


def test_official_recipes_read_bfloat16_models(tiny_llava, tiny_instructblip):
    """The torch references of bench.fullsize_reference run on bfloat16 models (numpy has no
    bfloat16): each family's three recipes give finite maps close to the float32 model's."""
    import copy

    from vicrop_jax import testing
    from vicrop_jax.processing import llava_prompt

    img = _image(4)
    la = (tiny_llava[0].processor, llava_prompt, img, QUESTION)
    ba = (tiny_instructblip[0].processor, blip_prompt, img, QUESTION)
    cases = [
        (tiny_llava[1], [(testing.official_rel_att, (*la, [1])),
                         (testing.official_grad_att, (*la, [1])),
                         (testing.official_pixel_grad_norms, la)]),
        (tiny_instructblip[1], [(testing.official_blip_rel_att, (*ba, [2], 1)),
                                (testing.official_blip_grad_att, (*ba, [2], 1)),
                                (testing.official_blip_pixel_grad_norms, ba)]),
    ]  # fmt: skip
    for hf, recipes in cases:
        low = copy.deepcopy(hf).to(torch.bfloat16)
        for recipe, args in recipes:
            want, got = recipe(hf, *args), recipe(low, *args)
            assert np.isfinite(got).all() and got.shape == want.shape, recipe.__name__
            assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9, recipe.__name__
