"""LLaVA-NeXT port vs transformers' LlavaNextForConditionalGeneration (float32, eager).

Test images select each pinpoint of the tiny config: a wide one (a 1 x 2 tile grid whose
unpadding removes rows), a tall one (2 x 1, columns removed) and a near-square one (2 x 2).
"""

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import vicrop_jax
from convert import llava_next as convert_llava_next
from vicrop_jax.models import llava_next as models
from vicrop_jax.pipeline import generate_answers

SIZES = [(20, 61), (61, 20), (60, 66)]  # (height, width)


def prompt(n=1):
    from vicrop_jax.families.llava_next import llava_next_prompt

    return llava_next_prompt("What is written on the red circle?", n)


def images(seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in SIZES]


def torch_inputs(inp):
    keys = ("input_ids", "pixel_values", "attention_mask", "image_sizes")
    return {k: torch.tensor(inp[k]) for k in keys}


def test_tile_grids_and_unpadding(tiny_llava_next):
    model, _ = tiny_llava_next
    cfg = model.config
    assert [cfg.tile_grid(h, w) for h, w in SIZES] == [(1, 2), (2, 1), (2, 2)]
    # rows removed (wide), columns removed (tall), nothing removed (square grid)
    assert [cfg.unpadded_span(h, w) for h, w in SIZES] == [
        (1, 4, 0, 10), (0, 10, 1, 4), (0, 10, 0, 10)
    ]  # fmt: skip


@pytest.mark.parametrize("which", [0, 1, 2])
def test_logits_rows_and_packed_features(tiny_llava_next, which):
    model, hf = tiny_llava_next
    im = images()[which]
    inp = model.processor(images=[im], text=[prompt()], return_tensors="np")
    t_inp = torch_inputs(inp)
    with torch.no_grad():
        ref = hf(**t_inp, output_attentions=True)
        ref_feats = hf.model.get_image_features(
            t_inp["pixel_values"], t_inp["image_sizes"]
        ).pooler_output[0]
    tiles, index = models.anyres_inputs(model.config, inp["pixel_values"], inp["image_sizes"])
    feats, _ = model.module.apply(
        {"params": model.params}, tiles, index, method=lambda m, p, i: m.image_features(p, i)
    )
    assert feats.shape[1] == ref_feats.shape[0] == (inp["input_ids"] == 4).sum()
    feat_diff = np.abs(np.asarray(feats[0]) - ref_feats.numpy()).max()
    assert feat_diff <= 1e-5, feat_diff
    out = vicrop_jax.forward(model, inp["input_ids"], inp["pixel_values"], inp["attention_mask"],
                             image_sizes=inp["image_sizes"])  # fmt: skip
    logit_diff = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max()
    assert logit_diff <= 1e-4, logit_diff
    for layer, a in enumerate(ref.attentions):
        row_diff = np.abs(np.asarray(out.attentions[layer]) - a[:, :, -1].numpy()).max()
        assert row_diff <= 1e-5, (layer, row_diff)


def test_batch_of_mixed_sizes(tiny_llava_next):
    """Three images of different tile counts in one batch (HF pads tiles to the most)."""
    model, hf = tiny_llava_next
    inp = model.processor(images=images(), text=[prompt()] * 3, return_tensors="np",
                          padding=True)  # fmt: skip
    with torch.no_grad():
        ref = hf(**torch_inputs(inp))
    out = vicrop_jax.forward(model, inp["input_ids"], inp["pixel_values"], inp["attention_mask"],
                             image_sizes=inp["image_sizes"])  # fmt: skip
    keep = inp["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(out.logits) - ref.logits.numpy())[keep].max()
    assert diff <= 1e-4, diff


def _hf_greedy(hf, inp, n):
    with torch.no_grad():
        out = hf.generate(**torch_inputs(inp), max_new_tokens=n, do_sample=False)
    return out[0, inp["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("n_images", [1, 2])
def test_greedy_tokens(tiny_llava_next, n_images):
    """One image, and [original, crop] as ViCrop's crop answer asks."""
    model, hf = tiny_llava_next
    im = images()[2]
    imgs = [im, im.crop((5, 10, 45, 30))][:n_images]
    text = prompt(n_images)
    inp = model.processor(images=imgs, text=[text], return_tensors="np")
    want = model.processor.tokenizer.decode(_hf_greedy(hf, inp, 6), skip_special_tokens=True)
    got = generate_answers(model, [text], imgs, 6)[0]
    assert got == want.strip(), (got, want)


def test_export_round_trip(tiny_llava_next, tmp_path):
    """export_params -> safetensors -> transformers loads it with the same outputs; both key
    layouts load back (hub `image_newline`, transformers 5 `model.image_newline`)."""
    from safetensors.numpy import load_file
    from transformers import LlavaNextForConditionalGeneration

    from convert.checkpoint import save_safetensors

    model, hf = tiny_llava_next
    tensors = convert_llava_next.export_params(model.params)
    assert "image_newline" in tensors
    cfg = hf.config.to_dict()
    save_safetensors(tensors, str(tmp_path), cfg)
    back = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    for (k, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(back.state_dict().items()),
                              strict=True):  # fmt: skip
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
    expected = models.abstract_params(model.config)
    hub = convert_llava_next.load_params(str(tmp_path), expected)
    np.testing.assert_array_equal(hub["image_newline"], model.params["image_newline"])
    rename = (("language_model.model.", "model.language_model."),
              ("language_model.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
              ("multi_modal_projector.", "model.multi_modal_projector."),
              ("image_newline", "model.image_newline"))  # fmt: skip
    v5 = {}
    for k, v in load_file(f"{tmp_path}/model.safetensors").items():
        new = next((n + k[len(o) :] for o, n in rename if k.startswith(o)), k)
        v5[new] = v
    assert "model.image_newline" in v5
    d5 = tmp_path / "v5"
    save_safetensors(v5, str(d5), cfg)
    again = convert_llava_next.load_params(str(d5), expected)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_preset_param_counts_match_hf(name):
    from transformers import LlavaNextConfig as HFConfig
    from transformers import LlavaNextForConditionalGeneration

    cfg = models.PRESETS[name]
    ours = sum(x.size for x in jax.tree.leaves(models.abstract_params(cfg)))
    t = cfg.text_config
    text = {"model_type": "mistral" if "mistral" in name else "llama",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads}  # fmt: skip
    with torch.device("meta"):
        ref = LlavaNextForConditionalGeneration(HFConfig(text_config=text, image_token_index=32000))
    assert ours == sum(p.numel() for p in ref.parameters()), name


def test_prompt_tokens_count_every_tile(tiny_llava_next):
    """The family's prompt length equals the processor's: base grid, unpadded tiles grid and
    newlines of each image, one image and [original, crop]."""
    from vicrop_jax.families import family_of

    model, _ = tiny_llava_next
    fam, cfg, tok = family_of(model), model.config, model.processor.tokenizer
    ims = images()
    for imgs in ([ims[0]], [ims[1], ims[2]]):
        enc = model.processor(images=imgs, text=[prompt(len(imgs))], return_tensors="np")
        n = fam.prompt_tokens(tok, cfg, "What is written on the red circle?", len(imgs),
                              [im.size for im in imgs])  # fmt: skip
        assert n == enc["input_ids"].shape[1] > len(imgs) * cfg.num_image_tokens + 10
    # without sizes: the most any image can get (the 2 x 2 pinpoint, nothing unpadded)
    assert fam.image_tokens(cfg, 1) == 25 + 10 * 11


def test_pinpoint_buckets_equal_unbucketed_passes(tiny_llava_next):
    """With a length bucket, two images of one pinpoint but different unpadding share every
    input shape (one compiled program), and answers and maps equal the unbucketed passes."""
    from vicrop_jax.families import family_of
    from vicrop_jax.families.llava_next import llava_next_maps
    from vicrop_jax.importance import maps_for_images
    from vicrop_jax.processing import encode

    model, _ = tiny_llava_next
    cfg, fam = model.config, family_of(model)
    rng = np.random.RandomState(4)
    a, b = (Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in
            [(20, 61), (30, 64)])  # fmt: skip
    assert cfg.tile_grid(20, 61) == cfg.tile_grid(30, 64)
    assert cfg.image_token_count(20, 61) != cfg.image_token_count(30, 64)
    shapes = []
    for im in (a, b):
        enc = fam.bucket_inputs(cfg, encode(model.processor, [prompt()], [im], 32), 32)
        tiles, extra = fam.model_inputs(cfg, enc)
        shapes.append((enc["input_ids"].shape, tiles.shape, extra["pack_index"].shape))
    assert shapes[0] == shapes[1], shapes
    qs = ["What is written on the red circle?", "What color is the square?"]
    imgs = [a, images()[2]]  # two pinpoints in one batch
    want = generate_answers(model, [prompt()] * 2, imgs, 4)
    assert generate_answers(model, [prompt()] * 2, imgs, 4, pad_to_multiple_of=32) == want
    want = maps_for_images(model, [a, b], qs, method="rel_att", map_source="tiles")
    got = maps_for_images(model, [a, b], qs, method="rel_att", map_source="tiles",
                          pad_to_multiple_of=32)  # fmt: skip
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    maps_for_images(model, [a], qs[:1], method="grad_att", pad_to_multiple_of=32)
    before = llava_next_maps._cache_size()
    maps_for_images(model, [b], qs[:1], method="grad_att", pad_to_multiple_of=32)
    assert llava_next_maps._cache_size() == before  # the pinpoint's program, reused


def test_strips_and_aspects_outside_every_pinpoint(tiny_llava_next):
    """A 1 x N strip and images far wider or taller than any pinpoint: HF picks the closest
    pinpoint and unpads to one row or column; the same logits here."""
    model, hf = tiny_llava_next
    rng = np.random.RandomState(5)
    ims = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
           for h, w in [(1, 50), (700, 10)]]  # fmt: skip
    inp = model.processor(images=ims, text=[prompt()] * 2, return_tensors="np", padding=True)
    assert [model.config.unpadded_span(h, w) for h, w in inp["image_sizes"]] == [
        (2, 3, 0, 10), (0, 10, 2, 3)
    ]  # fmt: skip
    with torch.no_grad():
        ref = hf(**torch_inputs(inp))
    out = vicrop_jax.forward(model, inp["input_ids"], inp["pixel_values"], inp["attention_mask"],
                             image_sizes=inp["image_sizes"])  # fmt: skip
    keep = inp["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(out.logits) - ref.logits.numpy())[keep].max()
    assert diff <= 1e-4, diff


def test_pinpoints_not_multiples_of_the_tile_are_refused(tiny_llava_next):
    model, hf = tiny_llava_next
    d = hf.config.to_dict()
    d["image_grid_pinpoints"] = [[35, 70], [50, 35]]
    with pytest.raises(ValueError, match=r"image_grid_pinpoints must be \(height, width\) "
                                         r"multiples of 35"):  # fmt: skip
        models.LlavaNextConfig.from_dict(d)


@pytest.fixture(scope="module")
def tiny_mistral_next(tmp_path_factory):
    """The tiny LLaVA-NeXT with a Mistral decoder: GQA, rope theta 1e6 and a 16-token
    sliding window, which a one-image prompt of about 130 tokens exceeds many times."""
    from tests.hf_reference import make_tiny_llava_next

    d = str(tmp_path_factory.mktemp("tiny_mistral_next"))
    hf = make_tiny_llava_next(d, seed=1, text_config={
        "model_type": "mistral", "sliding_window": 16, "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    })  # fmt: skip
    hf.set_attn_implementation("eager")
    return vicrop_jax.load_model(d), hf


def test_mistral_sliding_window_parity(tiny_mistral_next):
    model, hf = tiny_mistral_next
    t = model.config.text_config
    assert (t.sliding_window, t.rope_theta, t.num_key_value_heads) == (16, 1e6, 2)
    im = images()[2]
    inp = model.processor(images=[im], text=[prompt()], return_tensors="np")
    assert inp["input_ids"].shape[1] > 4 * t.sliding_window
    with torch.no_grad():
        ref = hf(**torch_inputs(inp), output_attentions=True)
    out = vicrop_jax.forward(model, inp["input_ids"], inp["pixel_values"], inp["attention_mask"],
                             image_sizes=inp["image_sizes"])  # fmt: skip
    logit_diff = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max()
    assert logit_diff <= 1e-4, logit_diff
    for layer, a in enumerate(ref.attentions):
        row = a[:, :, -1].numpy()
        assert (row[..., : -t.sliding_window] == 0).all()  # the window bites
        row_diff = np.abs(np.asarray(out.attentions[layer]) - row).max()
        assert row_diff <= 1e-5, (layer, row_diff)
    want = model.processor.tokenizer.decode(_hf_greedy(hf, inp, 6), skip_special_tokens=True)
    assert generate_answers(model, [prompt()], [im], 6)[0] == want.strip()


def test_mistral_window_default_follows_hf():
    """A Mistral text config without sliding_window gets transformers' default (4096); an
    explicit null means every key."""
    from transformers import MistralConfig

    from vicrop_jax.models.llama import LlamaConfig

    window = lambda d: LlamaConfig.from_dict(d).sliding_window  # noqa: E731
    assert window({"model_type": "mistral"}) == MistralConfig().sliding_window == 4096
    assert window({"model_type": "mistral", "sliding_window": None}) is None
    assert window({"model_type": "llama"}) is None
