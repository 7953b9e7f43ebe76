"""LLaVA-NeXT maps (base grid, tiles grid, both) vs the paper's recipe on the HF PyTorch model.

The references read every image token of one torch pass (vicrop_jax.testing's official
recipe), split them as transformers packs them (base tile, then the stitched tiles after
`unpad_image` with one newline per row) and build the "both" map by upsampling the base map
with np.kron and block means; pure-grad's tiles map stitches the torch pixel gradients.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from tests.hf_reference import NEXT_PINPOINTS
from vicrop_jax import detail_mask, testing
from vicrop_jax.families.llava_next import llava_next_prompt
from vicrop_jax.importance import importance, maps_for_images
from vicrop_jax.maps import resolve_layers
from vicrop_jax.pipeline import ask

QUESTION = "What is written on the red circle?"
T, G, S, P = 25, 5, 35, 7  # base-tile tokens, grid, tile side and patch of the tiny tower


def _image(seed=0, size=(61, 20)):  # (width, height): a 1 x 2 tile grid, rows unpadded
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


def _hf_span(image):
    """HF's tile grid (rows, cols) and the kept (top, left, rows', cols') of the stitched
    patch grid, from transformers' own functions."""
    w, h = image.size
    rows, cols = get_anyres_image_grid_shape((h, w), NEXT_PINPOINTS, S)
    index = torch.arange(rows * G * cols * G).reshape(1, rows * G, cols * G)
    kept = unpad_image(index, (h, w))[0]
    first = int(kept[0, 0])
    return (rows, cols), (first // (cols * G), first % (cols * G), *kept.shape)


def _split(values, image):
    """Per-token values [K] -> (base [G, G], tiles grid [rows', cols'])."""
    _, (_, _, r, c) = _hf_span(image)
    assert values.shape == (T + r * (c + 1),)
    return values[:T].reshape(G, G), values[T:].reshape(r, c + 1)[:, :c]


def _both(base, tiles):
    h, w = tiles.shape
    up = np.kron(base, np.ones((h, w))).reshape(h, G, w, G).mean((1, 3))
    return (up / up.mean() + tiles / tiles.mean()) / 2


def _reference(hf, proc, image, method, layers=(2,)):
    """(base, tiles) maps of the official recipe on the torch model."""
    if method != "pure_grad":
        fn = testing.official_rel_att if method == "rel_att" else testing.official_grad_att
        return _split(fn(hf, proc, llava_next_prompt, image, QUESTION, layers), image)
    ratio = testing.official_pixel_grad_norms(hf, proc, llava_next_prompt, image, QUESTION)
    mask = detail_mask.detail_mask(detail_mask.resize_for_mask(image, S))
    base = testing.patch_mean(ratio[0] * np.asarray(mask), P)
    (rows, cols), (top, left, r, c) = _hf_span(image)
    canvas = ratio[1 : 1 + rows * cols].reshape(rows, cols, S, S).transpose(0, 2, 1, 3)
    region = canvas.reshape(rows * S, cols * S)[top * P : (top + r) * P, left * P : (left + c) * P]
    resized = np.asarray(image.resize((c * P, r * P), Image.Resampling.BILINEAR))
    tiles = testing.patch_mean(region * np.asarray(detail_mask.detail_mask(resized)), P)
    return base, tiles


@pytest.mark.parametrize("layer", [2, "all"])
def test_rel_att_matches_official(tiny_llava_next, layer):
    model, hf = tiny_llava_next
    img = _image(1)
    layers = resolve_layers(layer, model.config.text_config.num_hidden_layers)
    ref, _ = _reference(hf, model.processor, img, "rel_att", layers)
    ours = np.asarray(importance(model.params, img, QUESTION, model=model, layer=layer,
                                 map_source="base"))  # fmt: skip
    assert ours.shape == (G, G)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


# rel-att on a wide image (unpadding removes rows), grad-att on a tall one (columns), pure-grad
# on a 2 x 2 grid: each map source against the reference.
CASES = [("rel_att", (61, 20)), ("grad_att", (20, 61)), ("pure_grad", (66, 60))]


@pytest.mark.parametrize("method,size", CASES)
def test_every_map_source_matches_official(tiny_llava_next, method, size):
    model, hf = tiny_llava_next
    img = _image(2, size=size)
    base, tiles = _reference(hf, model.processor, img, method)
    assert np.abs(tiles).max() > 0, "reference map is all zeros: the test would be vacuous"
    assert tiles.shape != (G, G) and tiles.size > G * G
    for source, ref in (("base", base), ("tiles", tiles), ("both", _both(base, tiles))):
        ours = np.asarray(importance(model.params, img, QUESTION, model=model, method=method,
                                     layer=2, map_source=source))  # fmt: skip
        assert ours.shape == ref.shape, (source, ours.shape, ref.shape)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max(),
                                   err_msg=source)  # fmt: skip


def test_default_source_is_both(tiny_llava_next):
    model, _ = tiny_llava_next
    img = _image(3, size=(20, 61))
    got = importance(model.params, img, QUESTION, model=model, layer=2)
    want = importance(model.params, img, QUESTION, model=model, layer=2, map_source="both")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="map_source must be one of base, tiles, both"):
        importance(model.params, img, QUESTION, model=model, map_source="tile")


def test_batched_maps_equal_single(tiny_llava_next):
    """Images of different tile grids in one batch give each image's own map."""
    model, _ = tiny_llava_next
    imgs = [_image(4), _image(5, size=(66, 60))]
    qs = [QUESTION, "What color is the square?"]
    batch = maps_for_images(model, imgs, qs, method="grad_att", layer=2, map_source="both")
    assert [m.shape for m in batch] == [(3, 10), (10, 10)]
    for i in range(2):
        single = maps_for_images(model, [imgs[i]], [qs[i]], method="grad_att", layer=2,
                                 map_source="both")  # fmt: skip
        np.testing.assert_allclose(batch[i], single[0], rtol=1e-5, atol=1e-7)


def test_box_on_the_tiles_map(tiny_llava_next):
    """ask() places the tiles grid's map on the original image: the official box search at
    base 35 on that map."""
    from bench.bbox_reference import reference_bbox

    model, _ = tiny_llava_next
    img = _image(6, size=(160, 60))
    out = ask(model, img, QUESTION, layer=2, map_source="tiles", max_new_tokens=2)
    assert out.att_map.shape == (3, 10)  # the 1 x 2 grid's 5 x 10, unpadded to 3 rows
    assert out.bbox == tuple(reference_bbox(out.att_map, img.size, S))
