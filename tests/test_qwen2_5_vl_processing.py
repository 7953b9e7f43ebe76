"""The image-only Qwen2.5-VL processor (vicrop_jax.processing_qwen2_5_vl) against transformers'
pieces as Qwen2_5_VLProcessor combines them (it cannot be built without torchvision): the
tokenizer's apply_chat_template, each <|image_pad|> expanded to grid_t * grid_h * grid_w / 4
tokens, and the Qwen2-VL PIL image processor with max_pixels forced into
size["longest_edge"], after qwen_vl_utils' own resize (sizes computed by hand below)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vicrop_jax import processing_qwen2_5_vl as qp
from vicrop_jax.processing import GENERAL_QUESTION
from vicrop_jax.testing import QWEN_CHAT_TEMPLATE, QWEN_VOCAB, build_qwen2_5_vl_processor_files

HUB_MIN_PIXELS, HUB_MAX_PIXELS = 3136, 12845056  # the hub checkpoints' preprocessor config
MAX_PIXELS = 256 * 28 * 28
SUFFIX = " Answer the question using a single word or phrase."
# (height, width) -> qwen_vl_utils' size (multiples of 28, round half to even), then the
# processor's (at most 256 * 28 * 28 pixels):
#   70 x 90:   70/28 = 2.5 -> 2, 90/28 = 3.2 -> 3: 56 x 84, kept (4704 pixels);
#   400 x 500: 14.3 -> 14, 17.9 -> 18: 392 x 504 = 197568, kept;
#   700 x 900: 25 -> 700, 32.1 -> 896; 627200 > 200704: beta = sqrt(627200 / 200704),
#              700 / beta / 28 = 14.1 -> 392, 896 / beta / 28 = 18.1 -> 504: resized twice.
SIZES = {(70, 90): ((56, 84), (56, 84)),
         (400, 500): ((392, 504), (392, 504)),
         (700, 900): ((700, 896), (392, 504))}  # fmt: skip


def _config(image_token_id: int, vision_start: int) -> dict:
    """A tiny Qwen2.5-VL config.json (transformers 5's nested layout)."""
    return {
        "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "image_token_id": image_token_id, "vision_start_token_id": vision_start,
        "text_config": {"model_type": "qwen2_5_vl_text", "vocab_size": QWEN_VOCAB + 7,
                        "hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "intermediate_size": 61},
        "vision_config": {"model_type": "qwen2_5_vl", "depth": 2, "hidden_size": 40,
                          "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "out_hidden_size": 48},
    }  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qwen25vl"))
    tok = build_qwen2_5_vl_processor_files(d, min_pixels=HUB_MIN_PIXELS, max_pixels=HUB_MAX_PIXELS)
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>"])
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(_config(*ids), f)
    return d, qp.load_processor(d)


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))


def _reference(d, question, images):
    """(input_ids, pixel_values, image_grid_thw) of one prompt from transformers' pieces."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = AutoTokenizer.from_pretrained(d)
    ip = Qwen2VLImageProcessorPil.from_pretrained(d, max_pixels=MAX_PIXELS)
    ip.size["longest_edge"] = MAX_PIXELS
    with open(os.path.join(d, "chat_template.json")) as f:
        template = json.load(f)["chat_template"]
    content = [{"type": "image", "image": im} for im in images]
    content.append({"type": "text", "text": question + SUFFIX})
    text = tok.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                   tokenize=False, add_generation_prompt=True)  # fmt: skip
    fetched = [im.resize(SIZES[im.size[::-1]][0][::-1]) for im in images]  # Pillow's default
    out = ip(fetched, return_tensors="np")
    for grid in out["image_grid_thw"]:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(np.prod(grid)) // 4), 1)
    ids = tok(text.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]
    return ids, out["pixel_values"], out["image_grid_thw"]


def test_sizes_follow_qwen_vl_utils_then_the_processor():
    for (h, w), (fetched, processed) in SIZES.items():
        assert qp.smart_resize(h, w) == fetched
        assert qp.smart_resize(*fetched, 28, HUB_MIN_PIXELS, MAX_PIXELS) == processed
    # qwen_vl_utils' own bounds: up to 16384 * 28 * 28 pixels (floor), at least 4 * 28 * 28.
    # 13.2M pixels: beta = 1.0137, 3300 / beta / 28 = 116.3 -> 116, 4000 / beta / 28 = 140.9
    assert qp.smart_resize(3300, 4000) == (3248, 3920)
    # 600 pixels: beta = 2.286, 20 * beta / 28 = 1.6 -> 2, 30 * beta / 28 = 2.4 -> 3 (ceil)
    assert qp.smart_resize(20, 30) == (56, 84)


def test_prompts_equal_transformers_pieces(ckpt):
    """A batch of a question with one image and a question with [original, crop], and the
    general prompt: input_ids (left-padded), pixel_values and image_grid_thw equal the
    reference; the large image is resized twice, and once only would differ."""
    d, proc = ckpt
    small, mid, large = _image(70, 90, 0), _image(400, 500, 1), _image(700, 900, 2)
    items = [("What is written on the sign?", [small]), ("Which color?", [large, mid]),
             (GENERAL_QUESTION, [large])]  # fmt: skip
    enc = qp.encode(proc, items)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    refs = [_reference(d, q, ims) for q, ims in items]
    assert ids.shape[0] == 3 and (mask[:, -1] == 1).all() and (mask == 0).any()
    for b, (ref_ids, _, _) in enumerate(refs):
        assert ids[b, mask[b] == 1].tolist() == ref_ids, f"prompt {b}"
        assert (ids[b, mask[b] == 0] == proc.tokenizer.pad_token_id).all()
    np.testing.assert_array_equal(enc["image_grid_thw"], np.concatenate([r[2] for r in refs]))
    np.testing.assert_array_equal(enc["pixel_values"], np.concatenate([r[1] for r in refs]))
    assert enc["image_grid_thw"].tolist() == [[1, 4, 6], [1, 28, 36], [1, 28, 36], [1, 28, 36]]
    # Each image's tokens sit between <|vision_start|> and <|vision_end|>.
    tok = proc.tokenizer
    start, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    row = ids[1].tolist()
    first = row.index(start) + 1
    assert row[first : row.index(end)] == [proc.image_token_id] * 252
    np.testing.assert_array_equal(enc["mm_token_type_ids"], ids == proc.image_token_id)
    # The processor alone (one resize) gives other pixels for the large image.
    once = proc.image_processor([large], return_tensors="np")["pixel_values"]
    assert once.shape == refs[2][1].shape and not np.allclose(once, refs[2][1], atol=1e-3)
    assert max(map(max, ids.tolist())) < QWEN_VOCAB
    got = qp.model_inputs(proc, items[:1])
    assert [x.shape for x in got] == [(1, len(refs[0][0])), (1, len(refs[0][0])), (24, 1176),
                                      (1, 3)]  # fmt: skip


def test_template_sources_and_max_pixels(ckpt, tmp_path):
    d, proc = ckpt
    assert proc.max_pixels == MAX_PIXELS and proc.min_pixels == HUB_MIN_PIXELS
    assert proc.image_processor.size["longest_edge"] == MAX_PIXELS
    other = str(tmp_path / "tok_template")
    build_qwen2_5_vl_processor_files(other, template_in="tokenizer")
    theirs = qp.load_processor(other, max_pixels=28 * 28 * 64)
    assert theirs.chat_template == QWEN_CHAT_TEMPLATE and theirs.max_pixels == 28 * 28 * 64
    # 700 x 896 after qwen_vl_utils; at most 50176 pixels: beta = 3.54, 7 x 9 merged cells
    _, grids = qp.preprocess(theirs, [_image(700, 900, 3)])
    assert grids.tolist() == [[1, 14, 18]]
    text = qp.prompt_text(proc, "q?", 2)
    assert qp.prompt_text(theirs, "q?", 2) == text
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.index("<|image_pad|>") < text.index("q?")
    os.remove(os.path.join(other, "chat_template.jinja"))
    with open(os.path.join(other, "tokenizer_config.json")) as f:
        config = json.load(f)
    config.pop("chat_template", None)
    with open(os.path.join(other, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="no chat template"):
        qp.load_processor(other)


def test_alpha_is_composited_on_white(ckpt):
    _, proc = ckpt
    clear = Image.new("RGBA", (90, 70), (0, 0, 0, 0))
    assert np.asarray(qp.fetch_image(clear)).min() == 255
    grey = Image.new("L", (90, 70), 77)
    assert np.asarray(qp.fetch_image(grey)).tolist() == np.full((56, 84, 3), 77).tolist()


@pytest.mark.parametrize(
    "images, error, match",
    [
        (
            [(50, 60)],
            ValueError,
            "prompt 1 image 0 is 60x50 = 3000 pixels, below the processor's min_pixels 3136",
        ),
        ([(14, 3000)], ValueError, "prompt 1 image 0 is 3000x14: aspect ratio 214.3 is above 200"),
        # 199.7 as given, 214 after qwen_vl_utils rounds it to 28 x 5992
        ([(70, 90), (30, 5990)], ValueError, "prompt 1 image 1 is 5990x30: aspect ratio 214.0"),
        ([[(70, 90), (70, 90)]], ValueError, "prompt 1 image 0 is a video"),
        (["frames"], ValueError, "prompt 1 image 0 is a video"),
        (["path"], TypeError, "prompt 1 image 0 must be a PIL.Image, got str"),
    ],
)
def test_bad_images_are_refused_naming_the_image(ckpt, images, error, match):
    _, proc = ckpt

    def make(x):
        if x == "frames":
            return np.zeros((2, 56, 56, 3), np.uint8)
        if x == "path":
            return "image.jpg"
        if isinstance(x, list):
            return [make(y) for y in x]
        return Image.new("RGB", x[::-1])

    items = [("fine", [Image.new("RGB", (90, 70))]), ("bad", [make(x) for x in images])]
    with pytest.raises(error) as e:
        qp.encode(proc, items)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_video_messages_and_mismatched_configs_are_refused(ckpt, tmp_path):
    d, _ = ckpt
    with pytest.raises(ValueError, match="a user message holds a video; only images"):
        qp.check_messages([{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}])
    bad = str(tmp_path / "bad")
    tok = build_qwen2_5_vl_processor_files(bad)
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>"])
    config = _config(ids[0] + 1, ids[1])
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=f"image_token_id is {ids[0] + 1} but the processor's"):
        qp.load_processor(bad)
    config = _config(*ids)
    config["vision_config"]["patch_size"] = 16
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="vision_config.patch_size is 16 but the processor's"):
        qp.load_processor(bad)


def test_a_chat_template_other_than_the_prompts_is_refused_at_load(ckpt, tmp_path):
    """Every pass tokenizes the family's prompt text: a checkpoint whose template renders
    ViCrop's messages otherwise (another system turn) is refused in one line at load."""
    import shutil

    from vicrop_jax.families import get_family

    family = get_family("qwen2_5_vl")
    assert family.load_processor(ckpt[0]) is not None  # the test template: the same text
    d = str(tmp_path / "other")
    shutil.copytree(ckpt[0], d)
    path = os.path.join(d, "chat_template.json")
    with open(path) as f:
        template = json.load(f)["chat_template"]
    assert "You are a helpful assistant." in template
    with open(path, "w") as f:
        json.dump({"chat_template": template.replace("a helpful", "a terse")}, f)
    with pytest.raises(ValueError, match="chat template renders a 1-image prompt") as e:
        family.load_processor(d)
    assert "\n" not in str(e.value) and d in str(e.value) and "terse" in str(e.value)
