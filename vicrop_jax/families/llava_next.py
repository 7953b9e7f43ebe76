"""LLaVA-NeXT (anyres): CLIP ViT over a base tile and a grid of tiles, MLP projector, Llama.

Prompt: the llava-v1.6-vicuna chat turn the HF processor expects, "USER: <image>\\n{question}"
with the official ViCrop LLaVA suffix (" Answer the question using a single word or
phrase.\\nASSISTANT:"). Maps are read on the base tile's N x N grid: the
base tile is the whole image squashed to the vision input side, the grid that the box
search's base size refers to, and every image has it whatever tile grid its size selects.
The projector is an MLP, so A_ti is the identity (as LLaVA-1.5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from convert import llava_next as llava_next_convert
from vicrop_jax.families.base import Family
from vicrop_jax.families.llava import ANSWER_SUFFIX
from vicrop_jax.maps import (
    METHODS,
    finite_map,
    image_rows,
    log_max_softmax,
    pure_grad_pool,
    safe_ratio,
)
from vicrop_jax.models import llava_next as llava_next_models

Array = jax.Array


def llava_next_prompt(question: str, n_images: int = 1) -> str:
    """The LLaVA-NeXT (vicuna) prompt with n_images image placeholders."""
    return "USER: " + "<image>" * n_images + f"\n{question}" + ANSWER_SUFFIX


def grid_map(cfg, m: Array) -> Array:
    """[B, T] base-tile token values -> finite float32[B, N, N]."""
    g = cfg.vision_config.grid
    return finite_map(m.reshape(m.shape[0], g, g))


def base_tiles(counts: Array) -> np.ndarray:
    """Rows of each image's base tile among the flattened tiles (tiles per image: counts)."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("module", "method", "layers"))
def llava_next_maps(
    module,
    params,
    input_ids: Array,
    attention_mask: Array,
    tiles: Array,
    pack_index: Array,
    base: Array,
    detail: Array | None,
    *,
    method: str,
    layers: tuple[int, ...],
) -> Array:
    """Importance maps on the base grid for B images (jitted; static: module, method, layers).

    Args:
      input_ids, attention_mask: int[2B, S]: rows [0, B) the questions, rows [B, 2B) the
        general prompt for the same images.
      tiles: float[P, H, W, C] the tiles of the 2B prompts' images (the B images twice), and
        pack_index int[K] their packing table (models.llava_next.anyres_inputs).
      base: int[2B] each image's base-tile row in `tiles`.
      detail: bool[B, H, W] pure-grad detail mask at the base tile's size, else None.

    Returns:
      float32[B, N, N].
    """
    cfg = module.config
    b = input_ids.shape[0] // 2
    t, tok = cfg.num_image_tokens, cfg.image_token_index
    sel = jnp.asarray(layers)
    apply = functools.partial(module.apply, {"params": params})
    # The first B images' tiles and tokens: the questions' half of the batch.
    n_tiles = tiles.shape[0] // 2
    half = pack_index.shape[0] // 2
    tiles_q = tiles[:n_tiles]
    index_q = jnp.where(pack_index[:half] == 2 * n_tiles * t, n_tiles * t, pack_index[:half])
    if method == "rel_att":
        feats, _ = apply(tiles_q, index_q, method=lambda m, p, i: m.image_features(p, i))
        out = apply(input_ids, None, attention_mask, only_last_logits=True,
                    image_features=jnp.concatenate([feats, feats]))  # fmt: skip
        s = input_ids.shape[1]
        att = image_rows(out.attentions[..., :s], input_ids, tok, t)[:, sel].mean(1)  # [2B, T]
        return grid_map(cfg, safe_ratio(att[:b], att[b:]))
    elif method == "grad_att":
        ids, mask = input_ids[:b], attention_mask[:b]
        nl, nh = cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads
        delta0 = jnp.zeros((nl, b, nh, ids.shape[1]), jnp.float32)

        def v(delta):
            o = apply(ids, tiles_q, mask, attn_delta=delta, only_last_logits=True,
                      pack_index=index_q)  # fmt: skip
            return log_max_softmax(o.logits), o.attentions

        grad, rows = jax.grad(v, has_aux=True)(delta0)
        m = image_rows(rows * jax.nn.relu(grad), ids, tok, t)[:, sel].mean(1)  # [B, T]
        return grid_map(cfg, m)
    elif method == "pure_grad":

        def v(px):
            o = apply(input_ids, px, attention_mask, only_last_logits=True,
                      pack_index=pack_index)  # fmt: skip
            return log_max_softmax(o.logits)

        grad = jax.grad(v)(tiles)[base]  # [2B, H, W, C]: the base tiles
        return pure_grad_pool(grad, detail, cfg.vision_config.patch_size)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


class LlavaNext(Family):
    name = "llava_next"
    config_type = llava_next_models.LlavaNextConfig
    module_type = llava_next_models.LlavaNextForConditionalGeneration
    models = llava_next_models
    converter = llava_next_convert
    paper_layer = (14, 32)

    def prompt(self, question: str, n_images: int = 1) -> str:
        return llava_next_prompt(question, n_images)

    def grid_map(self, config, values: Array) -> Array:
        return grid_map(config, values)

    def model_inputs(self, config, enc: dict):
        tiles, index = llava_next_models.anyres_inputs(
            config, enc["pixel_values"], enc["image_sizes"]
        )
        return tiles, {"pack_index": index}

    def map_pixels(self, config, enc: dict, n: int):
        return enc["pixel_values"][np.arange(n), 0].transpose(0, 2, 3, 1)

    def maps(self, module, params, enc, pixels, detail, *, method, layers, place, **options):
        del pixels, options
        cfg = module.config
        tiles, index = llava_next_models.anyres_inputs(cfg, enc["pixel_values"], enc["image_sizes"])
        counts, _ = llava_next_models.pack_index(cfg, enc["image_sizes"])
        return llava_next_maps(
            module, params, place(enc["input_ids"]), place(enc["attention_mask"]), tiles,
            index, jnp.asarray(base_tiles(counts)), detail, method=method, layers=layers,
        )  # fmt: skip


LLAVA_NEXT = LlavaNext()
