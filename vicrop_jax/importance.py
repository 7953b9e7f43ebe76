"""ViCrop importance maps: rel-att, grad-att, pure-grad, and the high-resolution variant.

Notation (PAPER.md): A_st is the last input position's attention over the T image tokens
(heads averaged) at the chosen LM layer(s); for LLaVA the connector is an MLP, so A_ti is the
identity and A_si = A_st reshaped to the N x N patch grid.

- rel_att:  A_si(x, q) / A_si(x, q'), q' the general prompt; both prompts in one batched pass
  sharing one vision pass.
- grad_att: A * relu(dv/dA) with v = log max softmax of the first answer token; dv/dA is
  `jax.grad` with respect to a zero perturbation added to each layer's last-query row.
- pure_grad: ||dv/dx||_2 over channels for q divided by the same for q', times the detail mask,
  mean-pooled to patches.

`layer` is an int, a sequence of ints (maps averaged over them), or "all". Maps are float32
[B, N, N]; non-finite values (a zero general-prompt attention or gradient) become 0 and +inf
becomes the largest finite value, so the box search always sees a finite map.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vicrop_jax import bbox as bbox_lib
from vicrop_jax import filters
from vicrop_jax.loading import Model, nchw_to_nhwc
from vicrop_jax.processing import GENERAL_QUESTION, check_question, encode, llava_prompt, to_rgb

Array = jax.Array
METHODS = ("rel_att", "grad_att", "pure_grad")
# The paper's layers (chosen on held-out TextVQA) for the 32-layer 7B models; other depths
# get the same relative depth.
PAPER_LAYER = {"llava": (14, 32)}


def default_layer(family: str, num_layers: int) -> int:
    layer, depth = PAPER_LAYER[family]
    return layer if num_layers == depth else round(layer * num_layers / depth)


def resolve_layers(layer, num_layers: int) -> tuple[int, ...]:
    """int | sequence | "all" -> a tuple of valid, non-negative layer indices."""
    if isinstance(layer, str):
        if layer != "all":
            raise ValueError(f"layer must be an int, a list of ints or 'all', got {layer!r}")
        return tuple(range(num_layers))
    layers = (layer,) if isinstance(layer, int | np.integer) else tuple(layer)
    if not layers:
        raise ValueError("layer list is empty")
    out = []
    for i in layers:
        j = int(i) + (num_layers if int(i) < 0 else 0)
        if not 0 <= j < num_layers:
            raise ValueError(f"layer {i} out of range for a {num_layers}-layer model")
        out.append(j)
    return tuple(out)


def finite_map(x: Array) -> Array:
    """NaN -> 0, +inf -> the largest finite value, -inf -> 0 (see module docstring)."""
    finite = jnp.isfinite(x)
    top = jnp.max(jnp.where(finite, x, -jnp.inf), axis=(-2, -1), keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.where(finite, x, jnp.where(x == jnp.inf, top, 0.0)).astype(jnp.float32)


def safe_ratio(num: Array, den: Array) -> Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num > 0, jnp.inf, 0.0))


def image_rows(rows: Array, input_ids: Array, token: int, t: int) -> Array:
    """rows [L, B, N, K] -> heads-averaged attention on each row's T image tokens [B, L, T]."""

    def one(r, ids_row):  # r [L, N, K]
        idx = jnp.nonzero(ids_row == token, size=t)[0]
        return r[:, :, idx].mean(1)  # [L, T]

    return jax.vmap(one, in_axes=(1, 0))(rows, input_ids)


def _log_max_softmax(logits: Array) -> Array:
    """v(x, q) summed over the batch (rows are independent, so grads stay per row)."""
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)).max(-1).sum()


@functools.partial(jax.jit, static_argnames=("module", "method", "layers"))
def llava_maps(
    module,
    params,
    input_ids: Array,
    attention_mask: Array,
    pixels: Array,
    detail: Array | None,
    *,
    method: str,
    layers: tuple[int, ...],
) -> Array:
    """Importance maps for a batch of B images (jitted; static: module, method, layers).

    Args:
      input_ids, attention_mask: int[2B, S]: rows [0, B) the questions, rows [B, 2B) the
        general prompt for the same images (grad_att reads only the first B rows).
      pixels: float[B, H, W, C] preprocessed images (NHWC).
      detail: bool[B, H, W] pure-grad detail mask, else None.

    Returns:
      float32[B, N, N].
    """
    cfg = module.config
    b = pixels.shape[0]
    t, g = cfg.num_image_tokens, cfg.vision_config.grid
    tok = cfg.image_token_index
    sel = jnp.asarray(layers)
    apply = functools.partial(module.apply, {"params": params})
    if method == "rel_att":
        feats, _ = apply(pixels, method=lambda m, p: m.image_features(p))
        out = apply(input_ids, None, attention_mask, only_last_logits=True,
                    image_features=jnp.concatenate([feats, feats]))  # fmt: skip
        att = image_rows(out.attentions, input_ids, tok, t)[:, sel].mean(1)  # [2B, T]
        m = safe_ratio(att[:b], att[b:])
    elif method == "grad_att":
        ids, mask = input_ids[:b], attention_mask[:b]
        nl, nh = cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads
        delta0 = jnp.zeros((nl, b, nh, ids.shape[1]), jnp.float32)

        def v(delta):
            o = apply(ids, pixels, mask, attn_delta=delta, only_last_logits=True)
            return _log_max_softmax(o.logits), o.attentions

        grad, rows = jax.grad(v, has_aux=True)(delta0)
        att = image_rows(rows * jax.nn.relu(grad), ids, tok, t)[:, sel].mean(1)  # [B, T]
        m = att
    elif method == "pure_grad":

        def v(px):
            o = apply(input_ids, px, attention_mask, only_last_logits=True)
            return _log_max_softmax(o.logits)

        grad = jax.grad(v)(jnp.concatenate([pixels, pixels]))  # [2B, H, W, C]
        norm = jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32)), -1))  # [2B, H, W]
        ratio = finite_map(safe_ratio(norm[:b], norm[b:])) * detail
        h, w = ratio.shape[1:]
        p = cfg.vision_config.patch_size
        return ratio.reshape(b, h // p, p, w // p, p).mean((2, 4))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if cfg.vision_feature_select_strategy == "full":
        m = m[:, 1:]  # drop the class-token position: the map covers patches only
    return finite_map(m.reshape(b, g, g))


def _prompts(question: str, n: int) -> list[str]:
    return [llava_prompt(question)] * n + [llava_prompt(GENERAL_QUESTION)] * n


def maps_for_images(
    model: Model,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    *,
    method: str = "rel_att",
    layer=None,
    params=None,
) -> Array:
    """Host wrapper: preprocess B (image, question) pairs and compute their maps [B, N, N]."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if model.family != "llava":
        raise NotImplementedError(f"importance maps for {model.family!r} are not implemented")
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if model.processor is None:
        raise ValueError(f"model at {model.path!r} has no processor/tokenizer files")
    images = [to_rgb(im) for im in images]
    questions = [check_question(q) for q in questions]
    texts = [llava_prompt(q) for q in questions] + [llava_prompt(GENERAL_QUESTION)] * len(images)
    enc = encode(model.processor, texts, list(images) + list(images))
    n = len(images)
    pixels = nchw_to_nhwc(enc["pixel_values"][:n])
    detail = None
    if method == "pure_grad":
        res = model.config.vision_config.image_size
        detail = jnp.stack(
            [filters.detail_mask(jnp.asarray(filters.resize_for_mask(im, res))) for im in images]
        )
    nl = model.config.text_config.num_hidden_layers
    layers = () if method == "pure_grad" else resolve_layers(
        default_layer(model.family, nl) if layer is None else layer, nl
    )  # fmt: skip
    return llava_maps(
        model.module, model.params if params is None else params, jnp.asarray(enc["input_ids"]),
        jnp.asarray(enc["attention_mask"]), pixels, detail, method=method, layers=layers,
    )  # fmt: skip


def importance(
    params,
    image: Image.Image,
    question: str,
    *,
    model: Model,
    method: str = "rel_att",
    layer=None,
    high_res: bool = False,
    high_res_threshold: int = 1024,
) -> Array:
    """The ViCrop importance map of one image and question.

    Args:
      params: the model's param pytree (model.params, or a sharded/cast copy).
      image: a PIL image of any mode and size.
      question: the question (for V*, the short question).
      model: the Model (config and processor) the params belong to.
      method: "rel_att", "grad_att" or "pure_grad".
      layer: LM layer: an int, a list (maps averaged), or "all"; default the paper's (14 of 32,
        or the same relative depth). Unused by pure_grad.
      high_res: split the image into tiles of at most `high_res_threshold` px rows, compute a
        map per tile (batched) and tile the maps back together (the official *_high methods).

    Returns:
      float32[N, N] (or [rows * N, cols * N] with high_res).
    """
    image = to_rgb(image)
    if not high_res:
        return maps_for_images(model, [image], [question], method=method, layer=layer,
                               params=params)[0]  # fmt: skip
    tiles = bbox_lib.high_res_tiles(image.size, high_res_threshold)
    rows, cols = bbox_lib.high_res_grid(image.size, high_res_threshold)[:2]
    crops = [image.crop(tuple(int(c) for c in box)) for box in tiles]
    maps = maps_for_images(model, crops, [question] * len(crops), method=method, layer=layer,
                           params=params)  # fmt: skip
    return bbox_lib.merge_tile_maps(maps, rows, cols)
