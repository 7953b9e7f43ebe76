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
