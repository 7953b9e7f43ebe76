"""ViCrop importance maps: rel-att, grad-att, pure-grad, and the high-resolution variant.

Notation (PAPER.md): A_st is the last input position's attention over the T image tokens
(heads averaged) at the chosen LM layer(s); for LLaVA the connector is an MLP, so A_ti is the
identity and A_si = A_st reshaped to the N x N patch grid. For InstructBLIP, A_ti is the T query
tokens' cross-attention over the ViT patches (class token dropped, heads averaged) at one
Q-Former cross-attention layer, and A_si = A_st @ A_ti (the paper's formula; the official code
slices a fixed 256-key LM span instead, which does not match current checkpoints).

- rel_att:  A_si(x, q) / A_si(x, q'), q' the general prompt; both prompts in one batched pass
  sharing one vision pass.
- grad_att: A * relu(dv/dA) with v = log max softmax of the first answer token; dv/dA is
  `jax.grad` with respect to a zero perturbation added to each layer's last-query row (and,
  for InstructBLIP, to each Q-Former cross-attention: both A_st and A_ti are weighted).
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
from vicrop_jax.loading import Model
from vicrop_jax.processing import (
    GENERAL_QUESTION,
    check_question,
    encode,
    prompt_for,
    to_rgb,
)

Array = jax.Array
METHODS = ("rel_att", "grad_att", "pure_grad")
# The paper's layers (chosen on held-out TextVQA) for the 32-layer 7B models; other depths
# get the same relative depth.
PAPER_LAYER = {"llava": (14, 32), "instructblip": (15, 32)}
# InstructBLIP's Q-Former layer, as the official code indexes it: entry 2 of the
# cross-attention layers (HF's `qformer_outputs.cross_attentions`), i.e. Q-Former layer 4 of 12
# with cross-attention every 2nd layer; 6 such layers in the real model.
PAPER_QFORMER_LAYER = (2, 6)
FAMILIES = ("llava", "instructblip")


def default_layer(family: str, num_layers: int) -> int:
    layer, depth = PAPER_LAYER[family]
    return layer if num_layers == depth else round(layer * num_layers / depth)


def default_qformer_layer(num_cross_layers: int) -> int:
    """The paper's Q-Former cross-attention index, or the same relative depth."""
    layer, depth = PAPER_QFORMER_LAYER
    if num_cross_layers == depth:
        return layer
    return min(round(layer * num_cross_layers / depth), num_cross_layers - 1)


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
    t = cfg.num_image_tokens
    tok = cfg.image_token_index
    sel = jnp.asarray(layers)
    apply = functools.partial(module.apply, {"params": params})
    if method == "rel_att":
        feats, _ = apply(pixels, method=lambda m, p: m.image_features(p))
        out = apply(input_ids, None, attention_mask, only_last_logits=True,
                    image_features=jnp.concatenate([feats, feats]))  # fmt: skip
        return _llava_rel_att(cfg, out.attentions, input_ids, layers)
    elif method == "grad_att":
        ids, mask = input_ids[:b], attention_mask[:b]
        nl, nh = cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads
        delta0 = jnp.zeros((nl, b, nh, ids.shape[1]), jnp.float32)

        def v(delta):
            o = apply(ids, pixels, mask, attn_delta=delta, only_last_logits=True)
            return _log_max_softmax(o.logits), o.attentions

        grad, rows = jax.grad(v, has_aux=True)(delta0)
        m = image_rows(rows * jax.nn.relu(grad), ids, tok, t)[:, sel].mean(1)  # [B, T]
        return _llava_grid(cfg, m)
    elif method == "pure_grad":

        def v(px):
            o = apply(input_ids, px, attention_mask, only_last_logits=True)
            return _log_max_softmax(o.logits)

        grad = jax.grad(v)(jnp.concatenate([pixels, pixels]))  # [2B, H, W, C]
        return _pure_grad_pool(grad, detail, cfg.vision_config.patch_size)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _llava_grid(cfg, m: Array) -> Array:
    """[B, T] image-token values -> finite float32[B, N, N] over the patch grid."""
    if cfg.vision_feature_select_strategy == "full":
        m = m[:, 1:]  # drop the class-token position: the map covers patches only
    g = cfg.vision_config.grid
    return finite_map(m.reshape(m.shape[0], g, g))


def _llava_rel_att(cfg, rows: Array, input_ids: Array, layers: tuple[int, ...]) -> Array:
    """rel-att from the last-query rows [L, 2B, N, K >= S] of [questions; general prompts]."""
    s = input_ids.shape[1]
    att = image_rows(rows[..., :s], input_ids, cfg.image_token_index, cfg.num_image_tokens)
    att = att[:, jnp.asarray(layers)].mean(1)  # [2B, T]
    b = input_ids.shape[0] // 2
    return _llava_grid(cfg, safe_ratio(att[:b], att[b:]))


def _pure_grad_pool(grad: Array, detail: Array, p: int) -> Array:
    """grad [2B, H, W, C] (question rows, then general) -> ratio of channel norms, times the
    detail mask, mean-pooled over p x p patches: [B, H / p, W / p]."""
    b = grad.shape[0] // 2
    norm = jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32)), -1))  # [2B, H, W]
    ratio = finite_map(safe_ratio(norm[:b], norm[b:])) * detail
    h, w = ratio.shape[1:]
    return ratio.reshape(b, h // p, p, w // p, p).mean((2, 4))


@functools.partial(jax.jit, static_argnames=("module", "method", "layers", "qformer_layer"))
def blip_maps(
    module,
    params,
    input_ids: Array,
    attention_mask: Array,
    qformer_input_ids: Array,
    qformer_attention_mask: Array,
    pixels: Array,
    detail: Array | None,
    *,
    method: str,
    layers: tuple[int, ...],
    qformer_layer: int,
) -> Array:
    """InstructBLIP importance maps for a batch of B images (jitted; static: module, method,
    layers, qformer_layer).

    Args:
      input_ids, attention_mask: int[2B, S]: rows [0, B) the questions, rows [B, 2B) the
        general prompt for the same images (grad_att reads only the first B rows).
      qformer_input_ids, qformer_attention_mask: int[2B, L] the same prompts for the Q-Former.
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

    def a_si(st, cross):
        """A_st [B, T] @ A_ti [B, T, P - 1] (class token dropped, heads averaged) -> [B, P - 1]."""
        return jnp.einsum("bt,btp->bp", st, cross.mean(1)[:, :, 1:])

    if method == "rel_att":
        # One ViT pass; the Q-Former runs per prompt (it reads the instruction too).
        vis = apply(pixels, method=lambda m, p: m.vision_features(p))
        feats, cross, _ = apply(
            jnp.concatenate([vis, vis]), qformer_input_ids, qformer_attention_mask,
            method=lambda m, *a: m.query_features(*a),
        )  # fmt: skip
        out = apply(input_ids, None, attention_mask, only_last_logits=True, image_features=feats)
        st = image_rows(out.attentions, input_ids, tok, t)[:, sel].mean(1)  # [2B, T]
        si = a_si(st, cross[qformer_layer])
        m = safe_ratio(si[:b], si[b:])
    elif method == "grad_att":
        ids, mask = input_ids[:b], attention_mask[:b]
        qids, qmask = qformer_input_ids[:b], qformer_attention_mask[:b]
        tc, qc = cfg.text_config, cfg.qformer_config
        delta0 = jnp.zeros((tc.num_hidden_layers, b, tc.num_attention_heads, ids.shape[1]))
        qdelta0 = jnp.zeros((len(qc.cross_attention_layers), b, qc.num_attention_heads, t,
                             cfg.vision_config.num_positions))  # fmt: skip

        def v(delta, qdelta):
            o = apply(
                ids, pixels, mask, attn_delta=delta, only_last_logits=True,
                qformer_input_ids=qids, qformer_attention_mask=qmask, qformer_delta=qdelta,
            )  # fmt: skip
            return _log_max_softmax(o.logits), (o.attentions, o.qformer_cross_attentions)

        (grad, qgrad), (rows, cross) = jax.grad(v, (0, 1), has_aux=True)(delta0, qdelta0)
        st = image_rows(rows * jax.nn.relu(grad), ids, tok, t)[:, sel].mean(1)  # [B, T]
        m = a_si(st, cross[qformer_layer] * jax.nn.relu(qgrad[qformer_layer]))
    elif method == "pure_grad":

        def v(px):
            o = apply(input_ids, px, attention_mask, only_last_logits=True,
                      qformer_input_ids=qformer_input_ids,
                      qformer_attention_mask=qformer_attention_mask)  # fmt: skip
            return _log_max_softmax(o.logits)

        grad = jax.grad(v)(jnp.concatenate([pixels, pixels]))  # [2B, H, W, C]
        return _pure_grad_pool(grad, detail, cfg.vision_config.patch_size)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return finite_map(m.reshape(b, g, g))


def model_layers(model: Model, layer) -> tuple[int, ...]:
    """The LM layers a map reads: `layer` resolved, or the paper's default for the family."""
    nl = model.config.text_config.num_hidden_layers
    return resolve_layers(default_layer(model.family, nl) if layer is None else layer, nl)


def maps_for_images(
    model: Model,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    *,
    method: str = "rel_att",
    layer=None,
    params=None,
    qformer_layer: int | None = None,
    pad_to_multiple_of: int | None = None,
    place=jnp.asarray,
) -> Array:
    """Host wrapper: preprocess B (image, question) pairs and compute their maps [B, N, N].

    qformer_layer (InstructBLIP only): index into the Q-Former's cross-attention layers;
    default the paper's (2 of 6, or the same relative depth).
    pad_to_multiple_of: bucket prompt lengths (fewer compiled shapes).
    place: np.ndarray -> jax.Array for each batched input (e.g. sharded over a data mesh).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if model.family not in FAMILIES:
        raise NotImplementedError(f"importance maps for {model.family!r} are not implemented")
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if model.processor is None:
        raise ValueError(f"model at {model.path!r} has no processor/tokenizer files")
    images = [to_rgb(im) for im in images]
    questions = [check_question(q) for q in questions]
    fam = model.family
    texts = [prompt_for(fam, q) for q in questions]
    texts += [prompt_for(fam, GENERAL_QUESTION)] * len(images)
    enc = encode(model.processor, texts, list(images) + list(images), pad_to_multiple_of)
    n = len(images)
    pixels = place(np.transpose(enc["pixel_values"][:n], (0, 2, 3, 1)))
    detail = None
    if method == "pure_grad":
        res = model.config.vision_config.image_size
        detail = place(np.stack([
            np.asarray(filters.detail_mask(jnp.asarray(filters.resize_for_mask(im, res))))
            for im in images
        ]))  # fmt: skip
    layers = () if method == "pure_grad" else model_layers(model, layer)
    params = model.params if params is None else params
    ids, mask = place(enc["input_ids"]), place(enc["attention_mask"])
    if fam == "llava":
        return llava_maps(model.module, params, ids, mask, pixels, detail, method=method,
                          layers=layers)  # fmt: skip
    n_cross = len(model.config.qformer_config.cross_attention_layers)
    qformer_layer = resolve_layers(
        default_qformer_layer(n_cross) if qformer_layer is None else qformer_layer, n_cross
    )
    if len(qformer_layer) != 1:
        raise ValueError("qformer_layer must be one int")
    return blip_maps(
        model.module, params, ids, mask, place(enc["qformer_input_ids"]),
        place(enc["qformer_attention_mask"]), pixels, detail, method=method, layers=layers,
        qformer_layer=qformer_layer[0],
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
    qformer_layer: int | None = None,
) -> Array:
    """The ViCrop importance map of one image and question.

    Args:
      params: the model's param pytree (model.params, or a sharded/cast copy).
      image: a PIL image of any mode and size.
      question: the question (for V*, the short question).
      model: the Model (config and processor) the params belong to.
      method: "rel_att", "grad_att" or "pure_grad".
      layer: LM layer: an int, a list (maps averaged), or "all"; default the paper's (LLaVA 14
        of 32, InstructBLIP 15 of 32, or the same relative depth). Unused by pure_grad.
      high_res: split the image into tiles of at most `high_res_threshold` px rows, compute a
        map per tile (batched) and tile the maps back together (the official *_high methods).
      qformer_layer: InstructBLIP only: the Q-Former cross-attention layer of A_ti (an index
        into the cross-attention layers; default the paper's 2 of 6, or the same relative depth).

    Returns:
      float32[N, N] (or [rows * N, cols * N] with high_res).
    """
    image = to_rgb(image)
    if not high_res:
        return maps_for_images(model, [image], [question], method=method, layer=layer,
                               params=params, qformer_layer=qformer_layer)[0]  # fmt: skip
    tiles = bbox_lib.high_res_tiles(image.size, high_res_threshold)
    rows, cols = bbox_lib.high_res_grid(image.size, high_res_threshold)[:2]
    crops = [image.crop(tuple(int(c) for c in box)) for box in tiles]
    maps = maps_for_images(model, crops, [question] * len(crops), method=method, layer=layer,
                           params=params, qformer_layer=qformer_layer)  # fmt: skip
    return bbox_lib.merge_tile_maps(maps, rows, cols)
