"""LLaVA-NeXT (anyres): CLIP ViT over a base tile and a grid of tiles, MLP projector, Llama.

Prompt: the llava-v1.6-vicuna chat turn the HF processor expects, "USER: <image>\\n{question}"
with the official ViCrop LLaVA suffix (" Answer the question using a single word or
phrase.\\nASSISTANT:"). The projector is an MLP, so A_ti is the identity (as LLaVA-1.5), and
one pass gives a value at every image token. Two grids hold them (`map_source`):

  base   the base tile's N x N grid: the whole image squashed to the vision input side, as
         LLaVA-1.5's map (every image has it, whatever tile grid its size selects);
  tiles  the high-resolution grid: the tiles stitched into one grid with the padding rows
         or columns removed (HF's unpad_image), the `image_newline` column skipped; what is
         left covers the original image (the processor resized it, aspect kept, into the
         padded canvas), so its cells are placed on the original image as a uniform grid;
  both   the base map resized onto the tiles grid (each cell the area-weighted mean of the
         base cells under it), each map divided by its mean, then averaged (the default).

pure-grad's tiles map is the stitched tiles' gradient-norm ratio over the unpadded region,
times the detail mask of the image resized (PIL bilinear, as the official mask) to that
region's pixel size, mean-pooled over patches. The box search runs on whichever map with the
base size of the vision input side (336 for the hub models).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from convert import llava_next as llava_next_convert
from vicrop_jax import detail_mask
from vicrop_jax.families.base import Family
from vicrop_jax.families.llava import ANSWER_SUFFIX, attention_token_values
from vicrop_jax.maps import (
    METHODS,
    finite_map,
    for_gradients,
    log_max_softmax,
    pure_grad_pool,
    safe_ratio,
)
from vicrop_jax.models import llava_next as llava_next_models

Array = jax.Array
MAP_SOURCES = ("base", "tiles", "both")
DEFAULT_MAP_SOURCE = "both"


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


@functools.partial(jax.jit, static_argnames=("module", "method", "layers", "base_only"))
def llava_next_maps(
    module,
    params,
    input_ids: Array,
    attention_mask: Array,
    tiles: Array,
    index: Array,
    index_q: Array,
    index_pair: Array,
    base: Array,
    detail: Array | None,
    *,
    method: str,
    layers: tuple[int, ...],
    base_only: bool = True,
) -> Array:
    """Importance maps, or the values they are read from, for B images (jitted).

    Args:
      input_ids, attention_mask: int[2B, S]: rows [0, B) the questions, rows [B, 2B) the
        general prompt for the same images.
      tiles: float[P, H, W, C] the tiles of the 2B prompts' images (the B images twice,
        models.llava_next.anyres_inputs), index int[K] their packing table; index_q the
        first B images' table, index_pair the table of the 2B prompts over the first B
        images' tiles (each image's rows twice).
      base: int[2B] each image's base-tile row in `tiles`.
      detail: bool[B, H, W] pure-grad detail mask at the base tile's size, else None.
      base_only: return the base grid's maps; else the values every grid is read from.

    Returns:
      base_only: float32[B, N, N]. Else rel_att / grad_att: float32[B, S], each question
      row's image-token values in prompt order (`attention_token_values`); pure_grad:
      float32[P / 2, H, W], the question tiles' gradient-norm ratio over the general
      prompt's, before `finite_map`.
    """
    cfg = module.config
    t = cfg.num_image_tokens
    if method in ("rel_att", "grad_att"):
        values = attention_token_values(
            module, params, input_ids, attention_mask, tiles[: tiles.shape[0] // 2],
            method=method, layers=layers, size=t if base_only else input_ids.shape[1],
            pair_inputs={"pack_index": index_pair}, pack_index=index_q,
        )  # fmt: skip
        return grid_map(cfg, values) if base_only else values
    elif method == "pure_grad":

        def v(px):
            o = for_gradients(module).apply({"params": params}, input_ids, px, attention_mask,
                                            only_last_logits=True, pack_index=index)  # fmt: skip
            return log_max_softmax(o.logits)

        grad = jax.grad(v)(tiles)  # [P, H, W, C]
        if base_only:
            return pure_grad_pool(grad[base], detail, cfg.vision_config.patch_size)
        norm = jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32)), -1))  # [P, H, W]
        n = norm.shape[0] // 2
        return safe_ratio(norm[:n], norm[n:])
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def map_tables(cfg, image_sizes) -> tuple[np.ndarray, np.ndarray]:
    """(index_q, index_pair) of `llava_next_maps` from the 2B prompts' image sizes (the B
    images twice), padded to the pinpoints' lengths."""
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    q = sizes[: len(sizes) // 2]
    _, index_q = llava_next_models.pack_index(cfg, q)
    # The second copy reads the first copy's tile rows (and the same newline row).
    pair = np.concatenate([index_q, index_q])
    return (
        llava_next_models.bucket_index(cfg, q, index_q),
        llava_next_models.bucket_index(cfg, np.concatenate([q, q]), pair, newline_of=q),
    )


def area_weights(n_src: int, n_dst: int) -> np.ndarray:
    """float64[n_dst, n_src]: the share of each destination cell covered by each source cell,
    both grids spanning the same extent (rows sum to 1)."""
    # In units of 1 / (n_src * n_dst) a source cell spans n_dst, a destination cell n_src.
    lo = np.arange(n_dst)[:, None] * n_src
    src = np.arange(n_src)[None, :] * n_dst
    overlap = np.clip(np.minimum(lo + n_src, src + n_dst) - np.maximum(lo, src), 0, None)
    return overlap / n_src


def resize_map(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map float[h, w] over an image onto an (H, W) grid over the same image: each new cell
    the area-weighted mean of the cells under it."""
    rows = area_weights(m.shape[0], shape[0])
    cols = area_weights(m.shape[1], shape[1])
    return (rows @ np.asarray(m, np.float64) @ cols.T).astype(np.float32)


def combine_maps(base: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """map_source "both": the base map resized onto the tiles grid, each map divided by its
    mean (so that neither grid's scale dominates), averaged. float32[h, w]."""

    def unit_mean(m):
        mean = float(np.mean(m, dtype=np.float64))
        return np.asarray(m, np.float64) / mean if mean > 0 else np.asarray(m, np.float64)

    both = (unit_mean(resize_map(base, tiles.shape)) + unit_mean(tiles)) / 2
    return both.astype(np.float32)


def tile_token_grid(cfg, values: np.ndarray, height: int, width: int) -> np.ndarray:
    """One image's token values float[>= K] (base tile first, as packed) -> its tiles-grid
    values float[rows', cols'] (unpadded, newline column skipped)."""
    top, bottom, left, right = cfg.unpadded_span(height, width)
    rows, cols = bottom - top, right - left
    t = cfg.num_image_tokens
    return np.asarray(values)[t : t + rows * (cols + 1)].reshape(rows, cols + 1)[:, :cols]


def stitched_region(cfg, tile_values: np.ndarray, height: int, width: int) -> np.ndarray:
    """One image's per-pixel values of its tiles float[rows * cols, S, S] (row-major tiles,
    base excluded) -> the unpadded region of the stitched canvas, float[rows' p, cols' p]."""
    rows, cols = cfg.tile_grid(height, width)
    s, p = cfg.vision_config.image_size, cfg.vision_config.patch_size
    canvas = np.asarray(tile_values).reshape(rows, cols, s, s).transpose(0, 2, 1, 3)
    canvas = canvas.reshape(rows * s, cols * s)
    top, bottom, left, right = cfg.unpadded_span(height, width)
    return canvas[top * p : bottom * p, left * p : right * p]


def region_detail_mask(image: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    """pure-grad's detail mask of an RGB image resized (PIL bilinear, aspect not kept, as
    the official mask) to shape (height, width): bool[height, width]."""
    resized = np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    return np.asarray(detail_mask.detail_mask(jnp.asarray(resized, jnp.uint8)))


def _patch_mean(x: np.ndarray, p: int) -> np.ndarray:
    h, w = x.shape
    return x.reshape(h // p, p, w // p, p).mean((1, 3), dtype=np.float32)


def _finite(x) -> np.ndarray:
    return np.asarray(finite_map(jnp.asarray(x, jnp.float32)))


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
        """The tiles and the packing table, padded to the pinpoints' lengths."""
        tiles, index = llava_next_models.anyres_inputs(
            config, enc["pixel_values"], enc["image_sizes"], bucket=True
        )
        return tiles, {"pack_index": index}

    def bucket_inputs(self, config, enc: dict, multiple: int | None) -> dict:
        """Rows left-padded (masked) as if each image had its pinpoint's full token count
        (`pinpoint_token_count`), the length then rounded up to `multiple`: the shapes of a
        batch follow its images' pinpoints, not their unpadding (one program a pinpoint for
        one image a row); left padding changes no result. None: unchanged."""
        if multiple is None:
            return enc
        ids, mask = enc["input_ids"], enc["attention_mask"]
        queue = [(config.image_token_count(int(h), int(w)), config.pinpoint_token_count(
            int(h), int(w))) for h, w in np.asarray(enc["image_sizes"]).reshape(-1, 2)]  # fmt: skip
        longest = 0
        for r in range(ids.shape[0]):
            real, need = int((ids[r] == config.image_token_index).sum()), int(mask[r].sum())
            while real > 0:  # the row's images, in order
                count, most = queue.pop(0)
                real, need = real - count, need + most - count
            longest = max(longest, need)
        extra = -(-longest // multiple) * multiple - ids.shape[1]
        if extra <= 0:
            return enc
        # Masked slots: any token id serves.
        pad = ((0, 0), (extra, 0))
        return {**enc, "input_ids": np.pad(ids, pad), "attention_mask": np.pad(mask, pad)}

    def map_pixels(self, config, enc: dict, n: int):
        return enc["pixel_values"][np.arange(n), 0].transpose(0, 2, 3, 1)

    def image_tokens(self, config, n_images: int, image_sizes=None) -> int:
        """Every tile's tokens: each image's base grid, unpadded tiles grid and newlines
        (image_sizes (width, height)); an image without a size counts as the most any size
        gets (the largest pinpoint's grid, nothing unpadded)."""
        sizes = list(image_sizes or [])
        if len(sizes) > n_images:
            raise ValueError(f"{len(sizes)} image sizes for {n_images} images")
        g, size = config.vision_config.grid, config.vision_config.image_size
        most = max(h // size * g * (w // size * g + 1) for h, w in config.image_grid_pinpoints)
        known = sum(config.image_token_count(int(h), int(w)) for w, h in sizes)
        return known + (n_images - len(sizes)) * (config.num_image_tokens + most)

    def map_options(self, config, map_source=None, **options):
        """map_source: "base", "tiles" or "both" (the module docstring); default "both"."""
        super().map_options(config, **options)
        source = DEFAULT_MAP_SOURCE if map_source is None else map_source
        if source not in MAP_SOURCES:
            raise ValueError(f"map_source must be one of {', '.join(MAP_SOURCES)}, got {source!r}")
        return {"map_source": source}

    def maps(self, module, params, enc, pixels, detail, *, method, layers, place, images,
             map_source: str = DEFAULT_MAP_SOURCE):  # fmt: skip
        """[B, N, N] base maps (map_source "base"), else a list of B float32[h_i, w_i] maps
        on each image's tiles grid."""
        del pixels
        cfg = module.config
        sizes = enc["image_sizes"]
        tiles, index = llava_next_models.anyres_inputs(cfg, enc["pixel_values"], sizes, True)
        index_q, index_pair = map_tables(cfg, sizes)
        counts, _ = llava_next_models.pack_index(cfg, sizes)
        base = base_tiles(counts)
        base_only = map_source == "base"
        raw = llava_next_maps(
            module, params, place(enc["input_ids"]), place(enc["attention_mask"]),
            place(tiles), place(index), place(index_q),
            place(index_pair), place(base), detail, method=method, layers=layers,
            base_only=base_only,
        )  # fmt: skip
        if base_only:
            return raw
        raw = np.asarray(raw)
        # Per-image host work, off any mesh in context (one program per shape for every mesh).
        with jax.set_mesh(None):
            return self._tile_maps(cfg, raw, enc, detail, images, base, counts, method,
                                   map_source)  # fmt: skip

    def _tile_maps(self, cfg, raw, enc, detail, images, base, counts, method, map_source):
        """The B maps on each image's tiles grid from the pass's raw values."""
        g, p = cfg.vision_config.grid, cfg.vision_config.patch_size
        out = []
        for i, (h, w) in enumerate(np.asarray(enc["image_sizes"])[: len(images)]):
            h, w = int(h), int(w)
            if method == "pure_grad":
                region = _finite(stitched_region(cfg, raw[base[i] + 1 : base[i] + counts[i]], h, w))
                tile_map = _patch_mean(region * region_detail_mask(images[i], region.shape), p)
                base_map = None
                if map_source == "both":
                    base_map = _patch_mean(_finite(raw[base[i]]) * np.asarray(detail[i]), p)
            else:
                tile_map = _finite(tile_token_grid(cfg, raw[i], h, w))
                base_map = _finite(raw[i, : cfg.num_image_tokens].reshape(g, g))
            out.append(tile_map if map_source == "tiles" else combine_maps(base_map, tile_map))
        return out


LLAVA_NEXT = LlavaNext()
