"""ViCrop maps vs the official recipe computed with the HF PyTorch model (float32, eager)."""

import numpy as np
import pytest
from PIL import Image

from vicrop_jax import detail_mask, testing
from vicrop_jax.importance import importance, maps_for_images
from vicrop_jax.maps import resolve_layers
from vicrop_jax.processing import llava_prompt

QUESTION = "What is written on the red circle?"


def _image(seed=0, size=(61, 47)):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("layer", [2, [1, 3], "all"])
def test_rel_att_matches_official(tiny_llava, layer):
    model, hf = tiny_llava
    cfg = model.config
    img = _image(1)
    layers = resolve_layers(layer, cfg.text_config.num_hidden_layers)
    ref = testing.official_rel_att(hf, model.processor, llava_prompt, img, QUESTION, layers)
    ref = ref.reshape(5, 5)
    ours = np.asarray(importance(model.params, img, QUESTION, model=model, layer=layer))
    assert ours.shape == (5, 5)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


@pytest.mark.parametrize("layer", [2, [0, 4]])
def test_grad_att_matches_official(tiny_llava, layer):
    model, hf = tiny_llava
    img = _image(2)
    layers = resolve_layers(layer, 5)
    ref = testing.official_grad_att(hf, model.processor, llava_prompt, img, QUESTION, layers)
    ref = ref.reshape(5, 5)
    assert np.abs(ref).max() > 0, "reference map is all zeros: the test would be vacuous"
    ours = np.asarray(importance(model.params, img, QUESTION, model=model, method="grad_att",
                                 layer=layer))  # fmt: skip
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7 * np.abs(ref).max())


def test_pure_grad_matches_official(tiny_llava):
    model, hf = tiny_llava
    img = _image(3, size=(80, 52))
    ratio = testing.official_pixel_grad_norms(hf, model.processor, llava_prompt, img, QUESTION)
    mask = np.asarray(detail_mask.detail_mask(detail_mask.resize_for_mask(img, 35)))
    ref = testing.patch_mean(ratio * mask, 7)
    ours = np.asarray(importance(model.params, img, QUESTION, model=model, method="pure_grad"))
    assert ours.shape == (5, 5)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_batched_maps_equal_single(tiny_llava):
    model, _ = tiny_llava
    imgs = [_image(4), _image(5, size=(30, 90))]
    qs = [QUESTION, "What color is the square?"]
    for method in ("rel_att", "grad_att"):
        batch = np.asarray(maps_for_images(model, imgs, qs, method=method, layer=2))
        for i in range(2):
            single = np.asarray(maps_for_images(model, [imgs[i]], [qs[i]], method=method, layer=2))
            np.testing.assert_allclose(batch[i], single[0], rtol=1e-5, atol=1e-7)


def test_bad_arguments(tiny_llava):
    model, _ = tiny_llava
    img = _image(0)
    with pytest.raises(ValueError, match="unknown method 'att'"):
        importance(model.params, img, QUESTION, model=model, method="att")
    with pytest.raises(ValueError, match="layer 9 out of range"):
        importance(model.params, img, QUESTION, model=model, layer=9)
    with pytest.raises(ValueError, match="question is empty"):
        importance(model.params, img, "   ", model=model)


def test_gradient_passes_recompute_each_layer_with_the_same_values(tiny_llava):
    """for_gradients: the pixel gradient through a module whose CLIP and LM layers are
    rematerialised (checkpoint primitives in its jaxpr, one a layer) equals the plain one."""
    import jax
    import jax.numpy as jnp

    from vicrop_jax.maps import for_gradients
    from vicrop_jax.processing import encode

    model, _ = tiny_llava
    enc = encode(model.processor, [llava_prompt(QUESTION)], [_image()])
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    px = jnp.asarray(np.transpose(enc["pixel_values"], (0, 2, 3, 1)))

    def grad_of(module):
        def v(p):
            out = module.apply({"params": model.params}, ids, p, mask, only_last_logits=True)
            return out.logits.max()

        return jax.grad(v), v

    remat = for_gradients(model.module)
    assert remat.remat and not model.module.remat
    text = str(jax.make_jaxpr(grad_of(remat)[0])(px))
    # every LM layer and the CLIP layers up to the feature layer (-2: the last one is unused)
    cfg = model.config
    want = cfg.text_config.num_hidden_layers + cfg.vision_config.num_hidden_layers - 1
    assert text.count("remat") == want, text.count("remat")
    assert "remat" not in str(jax.make_jaxpr(grad_of(model.module)[0])(px))
    ours, plain = (jax.jit(grad_of(m)[0])(px) for m in (remat, model.module))
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-8)


def test_the_paper_layer_of_a_shallow_model_is_one_of_its_layers():
    """The paper's layer at the same relative depth, capped at the last layer: Qwen2.5-VL's
    22 of 36 rounds to 1 on a 1-layer model, which has only layer 0."""
    from vicrop_jax.families import FAMILIES
    from vicrop_jax.importance import default_layer

    assert default_layer("qwen2_5_vl", 36) == 22 and default_layer("qwen2_5_vl", 2) == 1
    assert default_layer("qwen2_5_vl", 1) == 0
    for name in FAMILIES:
        for n in (1, 2, 3, 5):
            layer = default_layer(name, n)
            assert 0 <= layer < n and resolve_layers(layer, n) == (layer,), (name, n)
