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

The family's adapter (vicrop_jax.families) builds the prompts and runs its jitted pure core;
this module is the host-side entry that every family shares.

`layer` is an int, a sequence of ints (maps averaged over them), or "all". Maps are float32
[B, N, N]; non-finite values (a zero general-prompt attention or gradient) become 0 and +inf
becomes the largest finite value, so the box search always sees a finite map.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vicrop_jax import bbox as bbox_lib
from vicrop_jax.detail_mask import detail_masks
from vicrop_jax.families import family_of, get_family
from vicrop_jax.loading import Model
from vicrop_jax.maps import METHODS, check_method, relative_depth
from vicrop_jax.processing import GENERAL_QUESTION, check_question, to_rgb

Array = jax.Array
__all__ = [
    "METHODS",
    "default_layer",
    "detail_masks",
    "importance",
    "maps_for_images",
    "model_layers",
]


def default_layer(family: str, num_layers: int) -> int:
    """The paper's LM layer of a family for a num_layers-layer LM (same relative depth)."""
    layer, depth = get_family(family).paper_layer
    return relative_depth(layer, depth, num_layers)


def model_layers(model: Model, layer) -> tuple[int, ...]:
    """The LM layers a map reads: `layer` resolved, or the paper's default for the family."""
    return family_of(model).layers(model.config, layer)


def maps_for_images(
    model: Model,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    *,
    method: str = "rel_att",
    layer=None,
    params=None,
    qformer_layer: int | None = None,
    map_source: str | None = None,
    pad_to_multiple_of: int | None = None,
    place=jnp.asarray,
) -> Array | list[np.ndarray]:
    """Host wrapper: preprocess B (image, question) pairs and compute their maps [B, N, N]
    (a list of B float32[h_i, w_i] maps where the grid follows each image's size).

    qformer_layer (InstructBLIP only): index into the Q-Former's cross-attention layers;
    default the paper's (2 of 6, or the same relative depth).
    map_source (LLaVA-NeXT only): "base", "tiles" or "both" (vicrop_jax.families.llava_next);
    default "both".
    pad_to_multiple_of: bucket prompt lengths (fewer compiled shapes).
    place: np.ndarray -> jax.Array for each batched input (e.g. sharded over a data mesh).
    """
    check_method(method)
    family = family_of(model)
    options = family.map_options(
        model.config, **{k: v for k, v in (("qformer_layer", qformer_layer),
                                          ("map_source", map_source)) if v is not None}
    )  # fmt: skip
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if model.processor is None:
        raise ValueError(f"model at {model.path!r} has no processor/tokenizer files")
    images = [to_rgb(im) for im in images]
    questions = [check_question(q) for q in questions]
    texts = [family.prompt(q) for q in questions]
    texts += [family.prompt(GENERAL_QUESTION)] * len(images)
    enc = family.encode(model.processor, texts, list(images) + list(images), pad_to_multiple_of)
    enc = family.bucket_inputs(model.config, enc, pad_to_multiple_of)
    pixels = place(family.map_pixels(model.config, enc, len(images)))
    detail = None
    if method == "pure_grad":
        # The images' own masks, off any mesh in context: one program per image size for
        # every mesh (under one, each eager op would compile again for its devices).
        with jax.set_mesh(None):
            masks = family.detail_masks(model.config, images, enc)
        detail = place(masks)
    layers = () if method == "pure_grad" else family.layers(model.config, layer)
    params = model.params_or(params)
    maps = family.maps(model.module, params, enc, pixels, detail, method=method, layers=layers,
                       place=place, images=images, **options)  # fmt: skip
    return family.image_maps(model.config, maps, enc)


def importance(
    params,
    image: Image.Image,
    question: str,
    *,
    model: Model,
    method: str = "rel_att",
    layer=None,
    high_res: bool = False,
    high_res_threshold: int | None = None,
    qformer_layer: int | None = None,
    map_source: str | None = None,
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
      high_res_threshold: the tile size; default the family's official one (1024).
      qformer_layer: InstructBLIP only: the Q-Former cross-attention layer of A_ti (an index
        into the cross-attention layers; default the paper's 2 of 6, or the same relative depth).
      map_source: LLaVA-NeXT only: "base" (the base tile's N x N grid), "tiles" (the
        unpadded high-resolution grid) or "both" (averaged on the tiles grid; the default).

    Returns:
      float32[N, N] (or [rows * N, cols * N] with high_res; LLaVA-NeXT's tiles and both
      sources: [h, w], the image's unpadded tiles grid; Qwen2.5-VL: [grid_h / 2, grid_w / 2],
      the image's merged grid).
    """
    image = to_rgb(image)
    kw = dict(method=method, layer=layer, params=params, qformer_layer=qformer_layer,
              map_source=map_source)  # fmt: skip
    if not high_res:
        return maps_for_images(model, [image], [question], **kw)[0]
    if high_res_threshold is None:
        high_res_threshold = family_of(model).high_res_threshold
    tiles = bbox_lib.high_res_tiles(image.size, high_res_threshold)
    rows, cols = bbox_lib.high_res_grid(image.size, high_res_threshold)[:2]
    crops = [image.crop(tuple(int(c) for c in box)) for box in tiles]
    maps = maps_for_images(model, crops, [question] * len(crops), **kw)
    return bbox_lib.merge_tile_maps(one_grid(maps), rows, cols)


def one_grid(maps) -> Array | np.ndarray:
    """Maps of several images as one [n, h, w] array, or a clear error where their grids
    differ (the *_high variants tile maps of one grid)."""
    if not isinstance(maps, list):
        return maps
    shapes = sorted({tuple(m.shape) for m in maps})
    if len(shapes) > 1:
        raise ValueError(
            f"the high-resolution variant needs one map grid for every tile, got {shapes}: "
            "use map_source='base' with it"
        )
    return np.stack(maps)
