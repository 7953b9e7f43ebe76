"""Qwen2.5-VL: dynamic-resolution ViT with a 2x2 merger, Qwen2 decoder with M-RoPE.

Official ViCrop code for Qwen2.5-VL (`qwen2_5_methods.py`): the chat template, image then
text, "{question} Answer the question using a single word or phrase."; the map is the last
position's attention at layer 22 of 36, heads averaged, over the image tokens (between
`<|vision_start|>` and `<|vision_end|>`), question / general prompt, on the merged grid
image_grid_thw[1:] / 2 (H/28 x W/28, usually not square). The box search's base size is 224.

Maps of a batch come back as float32[B, Hm, Wm]: image i's map fills its own merged grid
(`map_shapes`) in the top-left corner, zeros elsewhere.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from convert import qwen2_5_vl as qwen_convert
from vicrop_jax import processing_qwen2_5_vl as qwen_processing
from vicrop_jax.detail_mask import detail_masks
from vicrop_jax.families.base import Family
from vicrop_jax.maps import (
    METHODS,
    finite_map,
    for_gradients,
    image_rows,
    log_max_softmax,
    safe_ratio,
)
from vicrop_jax.models import qwen2_5_vl as qwen_models

Array = jax.Array
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json"}

# One image in the chat template: the processor expands the pad to the image's tokens.
IMAGE_TURN = qwen_processing.VISION_START + qwen_processing.IMAGE_TOKEN + qwen_processing.VISION_END
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def qwen_prompt(question: str, n_images: int = 1) -> str:
    """The chat template's text for one user message (n_images images, then the question
    with the official suffix) and the assistant's turn opened (add_generation_prompt)."""
    return (SYSTEM_TURN + "<|im_start|>user\n" + IMAGE_TURN * n_images + question
            + qwen_processing.ANSWER_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip


def check_chat_template(path: str, processor) -> None:
    """Refuses a checkpoint whose chat template renders ViCrop's messages (one and two images,
    then the question) as other text than `qwen_prompt`, which every pass tokenizes."""
    probe = "What is on the sign?"
    for n in (1, 2):
        ours = qwen_prompt(probe, n)
        theirs = qwen_processing.prompt_text(processor, probe + qwen_processing.ANSWER_SUFFIX, n)
        if theirs != ours:
            at = len(os.path.commonprefix([ours, theirs]))
            raise ValueError(
                f"{path}: its chat template renders a {n}-image prompt as "
                f"{theirs[max(at - 20, 0) : at + 40]!r}... where Qwen2.5-VL-Instruct's gives "
                f"{ours[max(at - 20, 0) : at + 40]!r}...; ViCrop's prompts follow the latter"
            )


def map_shapes(config, image_grid_thw) -> np.ndarray:
    """int[I, 2]: each image's map shape, its merged grid (h / 2, w / 2)."""
    grid = qwen_models.check_grid(config, image_grid_thw)
    return grid[:, 1:] // config.vision_config.spatial_merge_size


def tokens_to_maps(config, values: np.ndarray, image_grid_thw) -> np.ndarray:
    """Token values [B, T'] (each row's image tokens first, in merge-block = row-major order
    of the merged grid) -> float32[B, Hm, Wm] maps, each in its grid's top-left corner."""
    shapes = map_shapes(config, image_grid_thw)
    hm, wm = shapes.max(0)
    out = np.zeros((len(shapes), hm, wm), np.float32)
    for i, (h, w) in enumerate(shapes):
        out[i, :h, :w] = np.asarray(values[i, : h * w]).reshape(h, w)
    return out


def detail_patches(config, masks, layout: np.ndarray) -> np.ndarray:
    """Pure-grad detail masks bool[H_i, W_i] at each resized image's size -> the patch layout
    of the images' padded patches: float32[B, P, ps, ps] (0 on padding)."""
    v = config.vision_config
    ps, m = v.patch_size, v.spatial_merge_size
    out = np.zeros((len(masks), layout.shape[1], ps, ps), np.float32)
    for i, mask in enumerate(masks):
        h, w = mask.shape[0] // ps, mask.shape[1] // ps
        x = np.asarray(mask, np.float32).reshape(h // m, m, ps, w // m, m, ps)
        out[i, : h * w] = x.transpose(0, 3, 1, 4, 2, 5).reshape(h * w, ps, ps)
    return out


@functools.partial(jax.jit, static_argnames=("module", "method", "layers"))
def qwen_token_maps(
    module,
    params,
    input_ids: Array,
    attention_mask: Array,
    position_ids: Array,
    patches: Array,
    layout: Array,
    detail: Array | None,
    *,
    method: str,
    layers: tuple[int, ...],
) -> Array:
    """Importance values on each image's merged tokens (jitted; static: module, method, layers).

    Args:
      input_ids, attention_mask: int[2B, S]: rows [0, B) the questions, rows [B, 2B) the
        general prompt for the same images; position_ids int[3, 2B, S] (`rope_index`).
      patches, layout: the 2B prompts' images (the B images twice), padded (`patch_inputs`).
      detail: float[B, P, ps, ps] pure-grad detail masks in patch layout, else None.

    Returns:
      float32[B, T] (T = P / 4), image i's values in its first t*h*w/4 entries.
    """
    cfg = module.config
    b = input_ids.shape[0] // 2
    t = patches.shape[1] // cfg.vision_config.merge_unit
    tok = cfg.image_token_id
    sel = jnp.asarray(layers)
    valid = qwen_models.token_mask(cfg, layout)  # [2B, T]
    apply = functools.partial(module.apply, {"params": params})
    grad_apply = functools.partial(for_gradients(module).apply, {"params": params})
    if method == "rel_att":
        out = apply(input_ids, patches, attention_mask, only_last_logits=True,
                    patch_layout=layout, position_ids=position_ids)  # fmt: skip
        s = input_ids.shape[1]
        att = image_rows(out.attentions[..., :s], input_ids, tok, t)[:, sel].mean(1)  # [2B, T]
        return jnp.where(valid[:b], finite_map(safe_ratio(att[:b], att[b:])), 0.0)
    elif method == "grad_att":
        ids, mask, pos = input_ids[:b], attention_mask[:b], position_ids[:, :b]
        nl, nh = cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads
        delta0 = jnp.zeros((nl, b, nh, ids.shape[1]), jnp.float32)

        def v(delta):
            o = grad_apply(ids, patches[:b], mask, attn_delta=delta, only_last_logits=True,
                           patch_layout=layout[:b], position_ids=pos)  # fmt: skip
            return log_max_softmax(o.logits), o.attentions

        grad, rows = jax.grad(v, has_aux=True)(delta0)
        m = image_rows(rows * jax.nn.relu(grad), ids, tok, t)[:, sel].mean(1)  # [B, T]
        return jnp.where(valid[:b], finite_map(m), 0.0)
    elif method == "pure_grad":
        v_cfg = cfg.vision_config
        ps, tp = v_cfg.patch_size, v_cfg.temporal_patch_size

        def v(px):
            o = grad_apply(input_ids, px, attention_mask, only_last_logits=True,
                           patch_layout=layout, position_ids=position_ids)  # fmt: skip
            return log_max_softmax(o.logits)

        grad = jax.grad(v)(patches)  # [2B, P, F]
        # The gradient w.r.t. the resized image: a patch holds its pixels twice (two frames).
        grad = grad.reshape(*grad.shape[:2], v_cfg.in_channels, tp, ps, ps).sum(3)
        norm = jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32)), 2))  # [2B, P, ps, ps]
        ratio = finite_map(safe_ratio(norm[:b], norm[b:])) * detail
        pooled = ratio.reshape(b, t, v_cfg.merge_unit * ps * ps).mean(-1)  # a 28 px block
        return jnp.where(valid[:b], pooled, 0.0)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


class Qwen2_5_VL(Family):
    name = "qwen2_5_vl"
    config_type = qwen_models.Qwen2_5_VLConfig
    module_type = qwen_models.Qwen2_5_VLForConditionalGeneration
    models = qwen_models
    converter = qwen_convert
    # Official: layer 22 of Qwen2.5-VL-3B's 36.
    paper_layer = (22, 36)
    image_placeholder = qwen_processing.IMAGE_TOKEN
    # generate() stops at generation_config.json's eos ids (the Instruct checkpoints': the
    # chat turn's <|im_end|> and <|endoftext|>).
    eos_from_generation_config = True

    def prompt(self, question: str, n_images: int = 1) -> str:
        return qwen_prompt(question, n_images)

    def load_processor(self, path: str, max_pixels: int | None = None):
        """The image-only processor (vicrop_jax.processing_qwen2_5_vl: transformers'
        Qwen2_5_VLProcessor needs torchvision), or None without processor files.
        max_pixels: the image processor's (default the official 256 * 28 * 28)."""
        names = set(os.listdir(path))
        if "preprocessor_config.json" not in names or not names & TOKENIZER_FILES:
            return None
        if max_pixels is None:
            max_pixels = qwen_processing.VICROP_MAX_PIXELS
        proc = qwen_processing.load_processor(path, max_pixels)
        check_chat_template(path, proc)
        return proc

    def encode(self, processor, texts, images, pad_to_multiple_of=None):
        """The image-only processor's arrays of chat-template prompts (`prompt`)."""
        return qwen_processing.encode_texts(processor, texts, images, pad_to_multiple_of)

    def image_maps(self, config, maps, enc):
        """[B, Hm, Wm] maps -> each image's map on its merged grid (`map_shapes`)."""
        shapes = map_shapes(config, np.asarray(enc["image_grid_thw"])[: len(maps)])
        return [maps[i, :h, :w] for i, (h, w) in enumerate(shapes)]

    def prompt_tokens(self, tokenizer, config, question, n_images, image_sizes=None,
                      processor=None):  # fmt: skip
        """Prompt length in tokens: the images of image_sizes ((width, height) each) as the
        processor sizes them, the others at its largest (max_pixels / 28**2 merged tokens)."""
        if processor is None:
            raise ValueError("Qwen2.5-VL prompt lengths need the processor (its max_pixels)")
        text = len(tokenizer(self.prompt(question, n_images))["input_ids"]) - n_images
        sizes = list(image_sizes or [])[:n_images]
        tokens = (n_images - len(sizes)) * (processor.max_pixels // processor.factor**2)
        for size in sizes:
            h, w = self.control_map_shape(config, size, processor)
            tokens += h * w
        return text + tokens

    def base_size(self, config) -> int:
        """The official box search's base size for Qwen2.5-VL: 224."""
        del config
        return 224

    def map_grid(self, config) -> int:
        raise NotImplementedError("Qwen2.5-VL maps follow each image's grid: see map_shapes")

    def control_map_shape(self, config, image_size, processor=None) -> tuple[int, int]:
        """The merged grid (rows, cols) of an image of image_size ((width, height)) as the
        processor sizes it: fetch_image's resize, then the image processor's (28 px a
        merged token at the default merge size)."""
        if processor is None:
            raise ValueError("Qwen2.5-VL map shapes need the processor (its max_pixels)")
        del config
        f = processor.factor
        w, h = image_size
        h1, w1 = qwen_processing.smart_resize(
            h, w, f, qwen_processing.FETCH_MIN_TOKENS * f * f,
            qwen_processing.FETCH_MAX_TOKENS * f * f)  # fmt: skip
        h2, w2 = qwen_processing.smart_resize(h1, w1, f, processor.min_pixels,
                                              processor.max_pixels)  # fmt: skip
        return h2 // f, w2 // f

    def model_inputs(self, config, enc: dict):
        """The processor's arrays -> (padded patches float[I, P, F]; patch_layout and the
        M-RoPE position_ids of the prompts)."""
        patches, layout = qwen_models.patch_inputs(
            config, enc["pixel_values"], enc["image_grid_thw"]
        )
        pos = qwen_models.rope_index(
            enc["input_ids"], enc["image_grid_thw"], enc.get("attention_mask"), config
        )
        return patches, {"patch_layout": layout, "position_ids": pos}

    def map_pixels(self, config, enc: dict, n: int):
        """The first n images' padded patches float[n, P, F]."""
        patches, _ = self.model_inputs(config, enc)
        return patches[:n]

    def detail_masks(self, config, images, enc: dict):
        """pure-grad's detail masks at each image's resized size (its patch grid x 14 px),
        in the patch layout of the maps' padded patches: float32[B, P, 14, 14]."""
        ps = config.vision_config.patch_size
        grids = qwen_models.check_grid(config, enc["image_grid_thw"])[: len(images)]
        masks = [detail_masks([im], (int(h) * ps, int(w) * ps))[0]
                 for im, (_, h, w) in zip(images, grids, strict=True)]  # fmt: skip
        _, layout = qwen_models.patch_inputs(config, enc["pixel_values"], enc["image_grid_thw"])
        return detail_patches(config, masks, layout[: len(images)])

    def maps(self, module, params, enc, pixels, detail, *, method, layers, place, images=None,
             **options):  # fmt: skip
        """float32[B, Hm, Wm] maps (each image's in its top-left corner, `map_shapes`;
        `image_maps` cuts them). detail: the pure-grad masks float[B, P, ps, ps] in patch
        layout (`detail_patches`)."""
        del pixels, images, options
        cfg = module.config
        patches, extra = self.model_inputs(cfg, enc)
        values = qwen_token_maps(
            module, params, place(enc["input_ids"]), place(enc["attention_mask"]),
            place(extra["position_ids"]), place(patches), place(extra["patch_layout"]), detail,
            method=method, layers=layers,
        )  # fmt: skip
        b = enc["input_ids"].shape[0] // 2
        return tokens_to_maps(cfg, np.asarray(values), np.asarray(enc["image_grid_thw"])[:b])


QWEN2_5_VL = Qwen2_5_VL()
