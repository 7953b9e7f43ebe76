"""LLaVA-NeXT maps (base grid) vs the paper's recipe computed with the HF PyTorch model."""

import numpy as np
import pytest
import torch
from PIL import Image

from vicrop_jax import detail_mask
from vicrop_jax.families.llava_next import llava_next_prompt
from vicrop_jax.importance import importance, maps_for_images
from vicrop_jax.maps import resolve_layers
from vicrop_jax.processing import GENERAL_QUESTION

QUESTION = "What is written on the red circle?"
T, G = 25, 5  # base-tile tokens and grid of the tiny tower


def _image(seed=0, size=(61, 20)):  # (width, height): a 1 x 2 tile grid, rows unpadded
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


def _inputs(proc, question, image):
    enc = proc(images=image, text=llava_next_prompt(question), return_tensors="pt")
    pos = enc["input_ids"][0].tolist().index(proc.tokenizer.convert_tokens_to_ids("<image>"))
    return enc, pos  # the base tile's T tokens open the image's span


def _official_rel_att(hf, proc, image, layers):
    maps = []
    for q in (QUESTION, GENERAL_QUESTION):
        enc, pos = _inputs(proc, q, image)
        with torch.no_grad():
            att = hf(**enc, output_attentions=True).attentions
        maps.append(np.mean([att[l][0, :, -1, pos : pos + T].mean(0).numpy() for l in layers], 0))
    return (maps[0] / maps[1]).reshape(G, G)


def _official_grad_att(hf, proc, image, layers):
    enc, pos = _inputs(proc, QUESTION, image)
    out = hf(**enc, output_attentions=True)
    z = out.logits[:, -1, :]
    loss = -torch.nn.functional.cross_entropy(z, z.argmax(1))
    atts = [out.attentions[l] for l in layers]
    grads = torch.autograd.grad(loss, atts)
    per = [
        (a * torch.relu(gr))[0, :, -1, pos : pos + T].mean(0).detach().numpy()
        for a, gr in zip(atts, grads, strict=True)
    ]
    return np.mean(per, 0).reshape(G, G)


def _official_pure_grad(hf, proc, image, patch, res):
    norms = []
    for q in (QUESTION, GENERAL_QUESTION):
        enc, _ = _inputs(proc, q, image)
        enc["pixel_values"].requires_grad_(True)
        z = hf(**enc).logits[:, -1, :]
        loss = -torch.nn.functional.cross_entropy(z, z.argmax(1))
        (gpix,) = torch.autograd.grad(loss, enc["pixel_values"])
        norms.append(np.linalg.norm(gpix[0, 0].numpy().transpose(1, 2, 0), axis=2))  # base tile
    mask = np.asarray(detail_mask.detail_mask(np.asarray(detail_mask.resize_for_mask(image, res))))
    grad = norms[0] / norms[1] * mask
    h, w = grad.shape
    return grad.reshape(h // patch, patch, w // patch, patch).mean((1, 3))


@pytest.mark.parametrize("layer", [2, "all"])
def test_rel_att_matches_official(tiny_llava_next, layer):
    model, hf = tiny_llava_next
    img = _image(1)
    layers = resolve_layers(layer, model.config.text_config.num_hidden_layers)
    ref = _official_rel_att(hf, model.processor, img, layers)
    ours = np.asarray(importance(model.params, img, QUESTION, model=model, layer=layer))
    assert ours.shape == (G, G)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_grad_att_matches_official(tiny_llava_next):
    model, hf = tiny_llava_next
    img = _image(2, size=(20, 61))  # tall: columns unpadded
    ref = _official_grad_att(hf, model.processor, img, (2,))
    assert np.abs(ref).max() > 0, "reference map is all zeros: the test would be vacuous"
    ours = np.asarray(importance(model.params, img, QUESTION, model=model, method="grad_att",
                                 layer=2))  # fmt: skip
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7 * np.abs(ref).max())


def test_pure_grad_matches_official(tiny_llava_next):
    model, hf = tiny_llava_next
    img = _image(3, size=(66, 60))  # a 2 x 2 tile grid
    ref = _official_pure_grad(hf, model.processor, img, 7, 35)
    ours = np.asarray(importance(model.params, img, QUESTION, model=model, method="pure_grad"))
    assert ours.shape == (G, G)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_batched_maps_equal_single(tiny_llava_next):
    """Images of different tile grids in one batch give each image's own map."""
    model, _ = tiny_llava_next
    imgs = [_image(4), _image(5, size=(66, 60))]
    qs = [QUESTION, "What color is the square?"]
    for method in ("rel_att", "grad_att"):
        batch = np.asarray(maps_for_images(model, imgs, qs, method=method, layer=2))
        for i in range(2):
            single = np.asarray(maps_for_images(model, [imgs[i]], [qs[i]], method=method, layer=2))
            np.testing.assert_allclose(batch[i], single[0], rtol=1e-5, atol=1e-7)
