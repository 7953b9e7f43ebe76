"""Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration): vision tower + Qwen2 decoder.

A thin composite of models.qwen2_5_vl_vision (the vision transformer and its 2x2 merger to
the LM width) and models.qwen2 (the decoder with M-RoPE): the merged tokens of every image
in the batch, in order, replace the prompt's image-token embeddings (HF's masked_scatter),
then the decoder runs. Any number of images per prompt works ([original, crop]).

Dynamic resolution under jit: every image is one row of a padded patch array
float[I, P, F] with a patch layout int32[I, P, 4], built on the host by `patch_inputs` from
HF's flattened pixel_values and image_grid_thw. P is a `bucket`, so images of different
sizes share a few compiled shapes; the padding is masked out of every attention and its
merged tokens are never placed in the prompt, so results equal the unpadded pass. Prompts
are padded on the left (attention_mask 0) the same way.

M-RoPE positions (`rope_index`) are computed on the host from input_ids, the image token id
and each image's grid, by transformers' get_rope_index rule; a pass with a cache records
each row's largest position + 1 in KVCache.position, where decode steps continue on all
three axes (HF's rope_deltas).

Axis letters: see vicrop_jax.models.common (I images, P patches an image, F a patch's
C * 2 * 14 * 14 values, T = P / 4 merged tokens an image).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vicrop_jax.models import llama
from vicrop_jax.models.common import KVCache, ModelOutput, check_config_dict
from vicrop_jax.models.qwen2 import Qwen2_5_VLTextConfig, Qwen2Model
from vicrop_jax.models.qwen2_5_vl_vision import (
    LAYOUT_REAL,
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLVisionConfig,
)
from vicrop_jax.sharding import MODEL

Array = jax.Array

# Model types of the neighbouring Qwen VL families, which this port refuses by name.
UNSUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe")


# Keys of the top-level config.json that describe the model as a whole (the rest of a hub
# file's top level is the text config).
_TOP_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id",
               "vision_end_token_id", "tie_word_embeddings", "model_type")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """Field names follow transformers' Qwen2_5_VLConfig."""

    vision_config: Qwen2_5_VLVisionConfig = Qwen2_5_VLVisionConfig()
    text_config: Qwen2_5_VLTextConfig = Qwen2_5_VLTextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    model_type: str = "qwen2_5_vl"

    def __post_init__(self):
        if self.vision_config.out_hidden_size != self.text_config.hidden_size:
            raise ValueError(
                f"vision_config.out_hidden_size={self.vision_config.out_hidden_size} must equal "
                f"the text hidden_size={self.text_config.hidden_size}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen2_5_VLConfig:
        """From config.json: the hub's flat transformers-4 layout (text fields at the top
        level) or transformers 5's nested text_config."""
        mt = d.get("model_type", "qwen2_5_vl")
        if mt in UNSUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {mt!r} is not supported (Qwen2.5-VL only)")
        if mt != "qwen2_5_vl":
            raise ValueError(f"expected model_type 'qwen2_5_vl', got {mt!r}")
        text = d.get("text_config")
        if text is None:  # the generic check (loading.parse_config) sees nested configs only
            text = {k: v for k, v in d.items() if k not in (*_TOP_FIELDS, "vision_config")}
            check_config_dict(Qwen2_5_VLTextConfig, text)
        text = dict(text)
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        text["tie_word_embeddings"] = tie
        top = {k: d[k] for k in _TOP_FIELDS if k in d}
        top["tie_word_embeddings"] = tie
        return cls(
            vision_config=Qwen2_5_VLVisionConfig.from_dict(d.get("vision_config") or {}),
            text_config=Qwen2_5_VLTextConfig.from_dict(text),
            **top,
        )

    @property
    def image_token_index(self) -> int:
        """The image token id under the name the other families use."""
        return self.image_token_id


def _vision(out: int) -> Qwen2_5_VLVisionConfig:
    return Qwen2_5_VLVisionConfig(out_hidden_size=out)


def _text(vocab, hidden, inter, layers, heads, kv, tie) -> Qwen2_5_VLTextConfig:
    return Qwen2_5_VLTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie,
    )  # fmt: skip


PRESETS: dict[str, Qwen2_5_VLConfig] = {
    "qwen2.5-vl-3b": Qwen2_5_VLConfig(
        vision_config=_vision(2048),
        text_config=_text(151936, 2048, 11008, 36, 16, 2, True),
        tie_word_embeddings=True,
    ),
    "qwen2.5-vl-7b": Qwen2_5_VLConfig(
        vision_config=_vision(3584), text_config=_text(152064, 3584, 18944, 28, 28, 4, False)
    ),
    "qwen2.5-vl-72b": Qwen2_5_VLConfig(
        vision_config=_vision(8192), text_config=_text(152064, 8192, 29568, 80, 64, 8, False)
    ),
}


# ---------------------------------------------------------------------------------------
# Host-side inputs: padded patches, their layout, M-RoPE positions.


def bucket(n: int, minimum: int = 64) -> int:
    """The bucket a size n falls in: `minimum` doubled until it holds n, then multiples of
    a quarter of the power of two above (at most 25% padding, a handful of shapes)."""
    if n <= minimum:
        return minimum
    p = 1 << (n - 1).bit_length()
    step = max(minimum, p // 4)
    return -(-n // step) * step


def check_grid(config: Qwen2_5_VLConfig, image_grid_thw) -> np.ndarray:
    """image_grid_thw as int64[I, 3], checked: images only (t = 1), h and w multiples of the
    merge size. Raises ValueError naming the input."""
    grid = np.asarray(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [images, 3] (t, h, w), got shape {grid.shape}")
    grid = grid.astype(np.int64)
    if (grid[:, 0] != 1).any():
        raise ValueError(f"image_grid_thw: t must be 1 (images only; videos are not supported), "
                         f"got {grid[:, 0].tolist()}")  # fmt: skip
    m = config.vision_config.spatial_merge_size
    if (grid[:, 1:] <= 0).any() or (grid[:, 1:] % m).any():
        raise ValueError(f"image_grid_thw: h and w must be positive multiples of {m}, got "
                         f"{grid[:, 1:].tolist()}")  # fmt: skip
    return grid


def image_token_counts(config: Qwen2_5_VLConfig, image_grid_thw) -> np.ndarray:
    """Merged tokens of each image: t * h * w / 4."""
    grid = check_grid(config, image_grid_thw)
    return grid.prod(-1) // config.vision_config.merge_unit


def _patch_layout_one(v: Qwen2_5_VLVisionConfig, h: int, w: int):
    """(positions [h*w, 2], windows [h*w]) of one image's patches in merge-block order."""
    m, ws = v.spatial_merge_size, v.window_units
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // m, m, w // m, m)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    n_win_w = -(-(w // m) // ws)
    windows = (rows // m // ws) * n_win_w + (cols // m // ws)
    return np.stack([rows, cols], -1), windows


def patch_inputs(config: Qwen2_5_VLConfig, pixel_values, image_grid_thw,
                 patches: int | None = None, images: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """HF's flattened patches -> one padded row of patches an image, and their layout.

    Args:
      pixel_values: float[sum of t*h*w, F] as Qwen2VLImageProcessor gives them (each row a
        [C, 2, 14, 14] patch, rows in merge-block order, images one after another).
      image_grid_thw: int[I, 3] each image's (t, h, w) patch grid.
      patches: P, the padded patches an image (default: `bucket` of the largest image).
      images: pad the image axis to this many rows (empty images, all masked).

    Returns:
      (float[I', P, F] patches, int32[I', P, 4] layout: each patch's row and column in its
      image's patch grid, its attention window, 1 if real, 0 for padding) as numpy.
    """
    v = config.vision_config
    grid = check_grid(config, image_grid_thw)
    pv = np.asarray(pixel_values)
    counts = grid.prod(-1)
    if pv.ndim != 2 or pv.shape != (int(counts.sum()), v.patch_dim):
        raise ValueError(
            f"pixel_values must be [{int(counts.sum())}, {v.patch_dim}] (the patches of "
            f"image_grid_thw {grid.tolist()}, each [C, 2, {v.patch_size}, {v.patch_size}] "
            f"flattened, as the HF processor gives), got {pv.shape}"
        )
    need = int(counts.max()) if len(counts) else 0
    p = bucket(need) if patches is None else patches
    if p < need or p % v.merge_unit:
        raise ValueError(f"patches={p} must be a multiple of {v.merge_unit} holding the largest "
                         f"image's {need} patches")  # fmt: skip
    n = len(counts) if images is None else images
    if n < len(counts):
        raise ValueError(f"images={n} is fewer than the {len(counts)} images given")
    out = np.zeros((n, p, v.patch_dim), pv.dtype)
    layout = np.zeros((n, p, 4), np.int32)
    layout[..., 2] = -1
    start = 0
    for i, ((_, h, w), c) in enumerate(zip(grid, counts, strict=True)):
        out[i, :c] = pv[start : start + c]
        positions, windows = _patch_layout_one(v, int(h), int(w))
        layout[i, :c] = np.concatenate([positions, windows[:, None], np.ones((c, 1))], axis=1)
        start += c
    return out, layout


def rope_index(input_ids, image_grid_thw, attention_mask, config: Qwen2_5_VLConfig
               ) -> np.ndarray:  # fmt: skip
    """M-RoPE positions int32[3, B, S] (temporal, height, width), as transformers'
    get_rope_index for images: per row, over its real tokens, text tokens count on by one on
    all three axes; each run of image tokens is the next image of the batch (in order), its
    merged grid (h/2, w/2) placed at the current position (t, row, column offsets) and the
    count continues at the current position + max(h, w) / 2. Padding gets position 0.

    Raises:
      ValueError: an image run's length differs from its grid's token count, or the runs do
        not use up the images given.
    """
    ids = np.asarray(input_ids)
    b, s = ids.shape
    mask = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask) != 0
    grids = [] if image_grid_thw is None else check_grid(config, image_grid_thw).tolist()
    m = config.vision_config.spatial_merge_size
    out = np.zeros((3, b, s), np.int64)
    k = 0
    for row in range(b):
        toks = ids[row][mask[row]]
        is_img = toks == config.image_token_id
        pos, cur, i = [], 0, 0
        while i < len(toks):
            j = i
            while j < len(toks) and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                pos.append(np.broadcast_to(np.arange(cur, cur + j - i), (3, j - i)))
                cur += j - i
            else:
                if k >= len(grids):
                    raise ValueError(f"input_ids row {row} has more image-token runs than the "
                                     f"{len(grids)} images of image_grid_thw")  # fmt: skip
                t, h, w = grids[k]
                gh, gw = h // m, w // m
                if j - i != t * gh * gw:
                    raise ValueError(
                        f"input_ids row {row}: an image-token run of {j - i} tokens for image "
                        f"{k} whose grid {grids[k]} needs {t * gh * gw}"
                    )
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw),
                                         indexing="ij")  # fmt: skip
                pos.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
                cur += max(gh, gw)
                k += 1
            i = j
        if pos:
            out[:, row, mask[row]] = np.concatenate(pos, axis=1)
    if k != len(grids):
        raise ValueError(f"input_ids hold {k} image-token runs but image_grid_thw has "
                         f"{len(grids)} images")  # fmt: skip
    if out.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError("M-RoPE positions exceed int32")
    return out.astype(np.int32)


# ---------------------------------------------------------------------------------------
# The model.


def token_mask(config: Qwen2_5_VLConfig, patch_layout: Array) -> Array:
    """bool[I, T]: the merged tokens of real patches (a merge block is real or padding whole)."""
    return patch_layout[:, :: config.vision_config.merge_unit, LAYOUT_REAL] > 0


def place_image_features(embeds: Array, input_ids: Array, features: Array, valid: Array,
                         token: int) -> Array:  # fmt: skip
    """Places the real merged tokens at the image-token positions, images in batch order.

    embeds: [B, S, D]; input_ids: [B, S]; features: [I, T, D] (padded rows); valid: bool[I, T]
    the real tokens. The k-th image token of the flattened batch takes the k-th real feature
    row, as HF's masked_scatter does. Counts are checked on the host by the caller.
    """
    is_img = input_ids == token
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    order = jnp.nonzero(valid.reshape(-1), size=valid.size, fill_value=0)[0]
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, valid.size - 1).reshape(is_img.shape)
    return jnp.where(is_img[..., None], flat[order[idx]], embeds)


class Qwen2_5_VLForConditionalGeneration(nn.Module):
    config: Qwen2_5_VLConfig
    remat: bool = False  # per-layer recomputation in backward passes (both stacks')

    def setup(self):
        cfg = self.config
        self.visual = Qwen2_5_VisionTransformer(cfg.vision_config, self.remat)
        self.language_model = Qwen2Model(cfg.text_config, self.remat)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.text_config.vocab_size, use_bias=False)

    def image_features(self, pixel_values: Array, patch_layout: Array) -> Array:
        """Padded patches float[I, P, F], layout int32[I, P, 4] -> merged tokens [I, P / 4, D]
        (padding rows included; `token_mask` says which are real)."""
        merged, _ = self.visual(pixel_values, patch_layout)
        return merged

    def logits(self, hidden: Array) -> Array:
        if self.config.tie_word_embeddings:
            return self.language_model.attend_logits(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: Array,
        pixel_values: Array | None = None,
        attention_mask: Array | None = None,
        cache: KVCache | None = None,
        attn_delta: Array | None = None,
        output_full_attentions: bool = False,
        only_last_logits: bool = False,
        image_features: Array | None = None,
        patch_layout: Array | None = None,
        position_ids: Array | None = None,
    ) -> ModelOutput:
        """One pass over a prompt (prefill) or over new tokens with a cache (decode).

        Args:
          input_ids: int[B, S]; image positions hold config.image_token_id, one run of
            t*h*w/4 tokens an image.
          pixel_values: float[I, P, F] padded patches, with patch_layout int32[I, P, 4]
            (both from `patch_inputs`).
          attention_mask: int/bool[B, S], 0 for (left) padding; defaults to all ones.
          cache: optional KVCache; keys of this pass go to slots [index, index + S).
          attn_delta: optional float[L, B, N, K] added to each layer's last-query attention row.
          output_full_attentions: also return [L, B, N, S, K] probabilities.
          only_last_logits: compute logits for the last position only.
          image_features: optional precomputed [I, T, D] merged tokens used instead of
            pixel_values (patch_layout still says which are real; all are without it).
          patch_layout: the layout of pixel_values (or of image_features' images).
          position_ids: int[3, B, S] M-RoPE positions (`rope_index`); without them every
            real token counts on from the cache's position (text, or a decode step).

        Returns:
          ModelOutput (logits float32, cache, attentions [L, B, N, K], image_features).
        """
        cfg = self.config
        b, s = input_ids.shape
        mask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
        feats = image_features
        if feats is None and pixel_values is not None:
            feats = self.image_features(pixel_values, patch_layout)
        embeds = self.language_model.embed(input_ids)
        if feats is not None:
            valid = (jnp.ones(feats.shape[:2], bool) if patch_layout is None
                     else token_mask(cfg, patch_layout))  # fmt: skip
            embeds = place_image_features(embeds, input_ids, feats, valid, cfg.image_token_id)
        if position_ids is None:
            steps = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            base = 0 if cache is None else cache.position[:, None]
            position_ids = jnp.broadcast_to(base + steps, (3, b, s))
        if cache is None:
            kv_mask = mask
        else:
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
            cache = cache.replace(mask=kv_mask)
        hidden, (k, v), rows, full = self.language_model(
            embeds, position_ids, kv_mask, cache, attn_delta, output_full_attentions,
            only_last_logits,
        )  # fmt: skip
        if only_last_logits:
            hidden = hidden[:, -1:]
        new_cache = None
        if cache is not None:
            last = jnp.max(jnp.where(mask[None], position_ids, -1), axis=(0, 2)) + 1
            new_cache = cache.replace(k=k, v=v, index=cache.index + s,
                                      position=last.astype(jnp.int32), fresh=False)  # fmt: skip
        return ModelOutput(
            logits=self.logits(hidden).astype(jnp.float32),
            cache=new_cache,
            attentions=rows,
            full_attentions=full,
            image_features=feats,
        )


def _init_inputs(config: Qwen2_5_VLConfig, dtype):
    """Inputs that touch every param: one 2 x 2 patch image, its token, one text token."""
    v = config.vision_config
    m = v.spatial_merge_size
    grid = np.array([[1, m, m]])
    patches, layout = patch_inputs(config, np.zeros((m * m, v.patch_dim)), grid, patches=m * m)
    ids = jnp.array([[config.image_token_id, 0]], jnp.int32)
    return ids, jnp.asarray(patches, dtype), jnp.asarray(layout)


def abstract_params(config: Qwen2_5_VLConfig, dtype=jnp.float32) -> dict:
    """The param tree as ShapeDtypeStructs of `dtype`, without allocating it (jax.eval_shape
    of init): what a checkpoint loader fills and what full-size presets are checked against."""
    module = Qwen2_5_VLForConditionalGeneration(config)
    ids, patches, layout = _init_inputs(config, dtype)
    init = lambda: module.init(jax.random.key(0), ids, patches, patch_layout=layout)
    shapes = jax.eval_shape(init)["params"]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def init_params(config: Qwen2_5_VLConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Random params (for smoke runs and benchmarks of full-size shapes)."""
    module = Qwen2_5_VLForConditionalGeneration(config)
    ids, patches, layout = _init_inputs(config, jnp.float32)
    init = jax.jit(lambda key: module.init(key, ids, patches, patch_layout=layout))
    params = init(jax.random.key(seed))["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


def partition_rules(config: Qwen2_5_VLConfig) -> tuple[tuple[str, P], ...]:
    """The layout on a (data, model) mesh (vicrop_jax.sharding): the Qwen2 decoder split as
    llama.partition_rules (the same names; q, k, v biases with their columns), the LM head by
    the vocabulary; the vision tower replicated (0.67 B params; its MLP of 3420 would not
    divide a model axis of 8)."""
    del config
    return (
        *llama.partition_rules("language_model"),
        ("lm_head/kernel", P(None, MODEL)),  # [D, V]
        ("visual/.*", P()),
    )


def model_split_sizes(config: Qwen2_5_VLConfig) -> dict[str, int]:
    """{config field: size} of the dimensions split over the model axis."""
    return llama.model_split_sizes(config.text_config)
