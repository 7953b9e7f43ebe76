"""LLaVA-NeXT (transformers' LlavaNextForConditionalGeneration): anyres CLIP + MLP + Llama.

The processor resizes each image to the best of `image_grid_pinpoints` (aspect kept, zero
padded) and cuts it into `image_size` tiles, after a base tile of the whole image squashed to
`image_size`. Every tile goes through the CLIP tower and the projector; HF's
`pack_image_features` then lays out each image's tokens as: the base tile's grid, then the
tiles stitched into one (rows * grid) x (cols * grid) grid, the padding rows or columns removed
(`unpad_image`) and `image_newline` closing every row.

Which tokens an image gets depends on its size, so shapes do: the packing is an index table
built on the host from the processor's `image_sizes` (`anyres_inputs`), and the module gathers
with it (one gather, jit-friendly, the same numbers as HF's view/permute/slice/cat).

Axis letters: see vicrop_jax.models.common (P tiles of all images, T tokens per tile, K packed
image tokens of the batch).
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
from vicrop_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from vicrop_jax.models.common import KVCache, ModelOutput
from vicrop_jax.models.llama import LlamaConfig, LlamaModel
from vicrop_jax.models.llava import LlavaMultiModalProjector, language_pass
from vicrop_jax.sharding import MODEL

Array = jax.Array
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig:
    """Field names follow transformers' LlavaNextConfig."""

    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    text_config: LlamaConfig = LlamaConfig(vocab_size=32064)
    image_token_index: int = 32000
    image_seq_length: int = 576
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | tuple[int, ...] = -2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    model_type: str = "llava_next"

    def __post_init__(self):
        # HF's packing views each tile's tokens as a grid x grid square: with the class token
        # kept ("full") the view fails, so only "default" is a working LLaVA-NeXT setting.
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                "LLaVA-NeXT needs vision_feature_select_strategy 'default', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        pins = tuple(tuple(int(x) for x in p) for p in self.image_grid_pinpoints)
        size = self.vision_config.image_size
        if not pins or any(len(p) != 2 or p[0] % size or p[1] % size or min(p) < 1 for p in pins):
            raise ValueError(
                f"image_grid_pinpoints must be (height, width) multiples of {size}, got {pins}"
            )
        object.__setattr__(self, "image_grid_pinpoints", pins)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaNextConfig:
        if d.get("model_type", "llava_next") != "llava_next":
            raise ValueError(f"expected model_type 'llava_next', got {d.get('model_type')!r}")
        vision = dict(d.get("vision_config") or {})
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(
                f"unsupported LLaVA-NeXT vision tower {vision.get('model_type')!r} (CLIP only)"
            )
        text = dict(d.get("text_config") or {})
        if text.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"unsupported LLaVA-NeXT language model {text.get('model_type')!r}")
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        text["tie_word_embeddings"] = tie
        fields = {f.name for f in dataclasses.fields(cls)} - {"vision_config", "text_config"}
        top = {k: v for k, v in d.items() if k in fields}
        if "image_token_id" in d and "image_token_index" not in d:
            top["image_token_index"] = d["image_token_id"]
        if isinstance(top.get("vision_feature_layer"), list):
            top["vision_feature_layer"] = tuple(top["vision_feature_layer"])
        if top.get("image_grid_pinpoints") is None:
            top.pop("image_grid_pinpoints", None)
        top["tie_word_embeddings"] = tie
        return cls(
            vision_config=CLIPVisionConfig.from_dict(vision),
            text_config=LlamaConfig.from_dict(text),
            **top,
        )

    @property
    def feature_layers(self) -> tuple[int, ...]:
        vfl = self.vision_feature_layer
        return (vfl,) if isinstance(vfl, int) else tuple(vfl)

    @property
    def num_image_tokens(self) -> int:
        """T: tokens of one tile (the base image's grid)."""
        return self.vision_config.grid**2

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """HF's select_best_resolution: the pinpoint keeping the most pixels, then wasting
        the fewest; (height, width)."""
        best, best_eff, best_waste = None, 0, float("inf")
        for ph, pw in self.image_grid_pinpoints:
            scale = min(pw / width, ph / height)
            eff = min(int(width * scale) * int(height * scale), width * height)
            waste = pw * ph - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (ph, pw), eff, waste
        return best

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles an image of this size gets (besides its base tile)."""
        ph, pw = self.best_resolution(height, width)
        size = self.vision_config.image_size
        return ph // size, pw // size

    def unpadded_span(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the stitched tile grid that HF's unpad_image keeps."""
        rows, cols = self.tile_grid(height, width)
        g = self.vision_config.grid
        ch, cw = rows * g, cols * g
        if width / height > cw / ch:
            new_h = int(round(height * (cw / width), 7))
            pad = (ch - new_h) // 2
            return pad, ch - pad, 0, cw
        new_w = int(round(width * (ch / height), 7))
        pad = (cw - new_w) // 2
        return 0, ch, pad, cw - pad

    def image_token_count(self, height: int, width: int) -> int:
        """Image tokens of one image: base grid, unpadded tile grid, one newline per row."""
        top, bottom, left, right = self.unpadded_span(height, width)
        return self.num_image_tokens + (bottom - top) * (right - left + 1)

    def pinpoint_token_count(self, height: int, width: int) -> int:
        """The most image tokens any image of this size's pinpoint gets (nothing unpadded):
        the length its tokens are bucketed to, so that one program serves the pinpoint."""
        rows, cols = self.tile_grid(height, width)
        g = self.vision_config.grid
        return self.num_image_tokens + rows * g * (cols * g + 1)


def pack_index(config: LlavaNextConfig, image_sizes) -> tuple[np.ndarray, np.ndarray]:
    """Host-side packing table of a batch of images (HF's pack_image_features as a gather).

    Args:
      image_sizes: int[I, 2] (height, width) of the original images, as the processor gives.

    Returns:
      (tiles int[I]: tiles per image, base included; index int32[K]: for each packed image
      token, its row in the tiles' flattened features [P * T] in image order, or P * T for
      `image_newline`).
    """
    g, t = config.vision_config.grid, config.num_image_tokens
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    counts = np.array([1 + np.prod(config.tile_grid(int(h), int(w))) for h, w in sizes], int)
    newline = int(counts.sum()) * t
    out, start = [], 0
    for (h, w), n in zip(sizes, counts, strict=True):
        rows, cols = config.tile_grid(int(h), int(w))
        top, bottom, left, right = config.unpadded_span(int(h), int(w))
        out.append(start * t + np.arange(t))  # the base tile, row major
        y = np.arange(top, bottom)[:, None]
        x = np.arange(left, right)[None, :]
        # Grid cell (y, x) is patch (y % g, x % g) of tile (y // g, x // g), tiles row major.
        tile = 1 + (y // g) * cols + x // g
        grid = (start + tile) * t + (y % g) * g + x % g  # [rows', cols']
        grid = np.concatenate([grid, np.full((grid.shape[0], 1), newline)], axis=1)
        out.append(grid.reshape(-1))
        start += int(n)
    return counts, np.concatenate(out).astype(np.int32)


def bucket_index(config: LlavaNextConfig, image_sizes, index: np.ndarray,
                 newline_of=None) -> np.ndarray:  # fmt: skip
    """A packing table padded at the end (with the newline row) to the sum of the images'
    `pinpoint_token_count`: its length then depends on the pinpoints alone. The padding rows
    are never read (image tokens take the table's rows in order, HF's masked_scatter).
    newline_of: the image sizes whose tiles the table reads (default image_sizes)."""
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    total = sum(config.pinpoint_token_count(int(h), int(w)) for h, w in sizes)
    read = sizes if newline_of is None else np.asarray(newline_of).reshape(-1, 2)
    tiles = sum(1 + int(np.prod(config.tile_grid(int(h), int(w)))) for h, w in read)
    newline = tiles * config.num_image_tokens
    return np.concatenate([index, np.full(total - index.shape[0], newline, np.int32)])


def anyres_inputs(
    config: LlavaNextConfig, pixel_values, image_sizes, bucket: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The processor's arrays -> the module's, on the host (a caller places them): (tiles
    float[P, H, W, C], pack_index int32[K]).

    pixel_values: float[I, P_max, C, H, W] (HF layout, tiles zero-padded to the batch's
    most) or already float[P, H, W, C]; image_sizes: int[I, 2] (height, width). bucket: pad
    the table to the images' pinpoint lengths (`bucket_index`; shapes then follow the
    pinpoints only).
    """
    counts, index = pack_index(config, image_sizes)
    if bucket:
        index = bucket_index(config, image_sizes, index)
    px = np.asarray(pixel_values)
    if px.ndim == 5:
        px = np.concatenate([px[i, :n] for i, n in enumerate(counts)]).transpose(0, 2, 3, 1)
    elif px.shape[0] != counts.sum():
        raise ValueError(f"{px.shape[0]} tiles given, the image sizes need {counts.sum()}")
    return np.ascontiguousarray(px), index


def _vicuna(hidden, inter, layers, heads) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32064, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=0,
    )  # fmt: skip


# llava-hf/llava-v1.6-{vicuna-7b,vicuna-13b,mistral-7b}-hf (Mistral: GQA, rope theta 1e6,
# sliding_window null in the released config: every key attended).
PRESETS: dict[str, LlavaNextConfig] = {
    "llava-v1.6-vicuna-7b": LlavaNextConfig(text_config=_vicuna(4096, 11008, 32, 32)),
    "llava-v1.6-vicuna-13b": LlavaNextConfig(text_config=_vicuna(5120, 13824, 40, 40)),
    "llava-v1.6-mistral-7b": LlavaNextConfig(
        text_config=LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            pad_token_id=None,
        )  # fmt: skip
    ),
}


class LlavaNextForConditionalGeneration(nn.Module):
    config: LlavaNextConfig
    remat: bool = False  # per-layer recomputation in backward passes (LlamaModel's)

    def setup(self):
        cfg = self.config
        d = cfg.text_config.hidden_size
        self.vision_tower = CLIPVisionModel(cfg.vision_config, self.remat)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.language_model = LlamaModel(cfg.text_config, self.remat)
        self.image_newline = self.param(
            "image_newline", nn.initializers.normal(d**-0.5), (d,), jnp.float32
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.text_config.vocab_size, use_bias=False)

    def tile_features(self, pixel_values: Array) -> Array:
        """Tiles float[P, H, W, C] -> projected features [P, T, D] (class token dropped)."""
        hidden, _ = self.vision_tower(pixel_values)
        selected = jnp.concatenate([hidden[i][:, 1:] for i in self.config.feature_layers], -1)
        return self.multi_modal_projector(selected)

    def image_features(self, pixel_values: Array, pack_index: Array) -> tuple[Array, Array]:
        """Tiles [P, H, W, C] and the packing table int[K] -> (packed [1, K, D], per tile
        [P, T, D]): every image's tokens in prompt order, as HF's pack_image_features."""
        tiles = self.tile_features(pixel_values)
        flat = tiles.reshape(-1, tiles.shape[-1])
        flat = jnp.concatenate([flat, self.image_newline[None].astype(flat.dtype)])
        return flat[pack_index][None], tiles

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
        pack_index: Array | None = None,
    ) -> ModelOutput:
        """One pass over a prompt (prefill) or over new tokens with a cache (decode).

        Args:
          input_ids: int[B, S] as the processor expands them (each image's
            `image_token_count` image tokens).
          pixel_values: float[P, H, W, C]: every image's tiles, base tile first, images in
            prompt order (`anyres_inputs` from the processor's pixel_values and image_sizes).
          attention_mask: int/bool[B, S], 0 for (left) padding; defaults to all ones.
          cache: optional KVCache; keys of this pass go to slots [index, index + S).
          attn_delta: optional float[L, B, N, K] added to each layer's last-query row.
          output_full_attentions: also return [L, B, N, S, K] probabilities.
          only_last_logits: compute logits for the last position only.
          image_features: optional packed [.., K, D] features used instead of pixel_values.
          pack_index: int[K] the packing table of the images (`anyres_inputs`).

        Returns:
          ModelOutput (logits, cache, attentions [L, B, N, K], image_features [1, K, D]).
        """
        feats = image_features
        if feats is None and pixel_values is not None:
            if pack_index is None:
                raise ValueError("LLaVA-NeXT pixel_values need pack_index (anyres_inputs)")
            feats, _ = self.image_features(pixel_values, pack_index)
        logits, new_cache, rows, full = language_pass(
            self, input_ids, feats, attention_mask, cache, attn_delta, output_full_attentions,
            only_last_logits,
        )  # fmt: skip
        return ModelOutput(
            logits=logits,
            cache=new_cache,
            attentions=rows,
            full_attentions=full,
            image_features=feats,
        )


def _init_inputs(config: LlavaNextConfig, dtype):
    """Inputs that touch every param: one base tile and one 1 x 1 tile grid, then text."""
    v = config.vision_config
    t = config.num_image_tokens
    index = jnp.concatenate([jnp.arange(2 * t), jnp.array([2 * t])]).astype(jnp.int32)
    ids = jnp.full((1, index.shape[0] + 1), config.image_token_index, jnp.int32)
    pixels = jnp.zeros((2, v.image_size, v.image_size, v.num_channels), dtype)
    return ids, pixels, index


def abstract_params(config: LlavaNextConfig, dtype=jnp.float32) -> dict:
    """The param tree as ShapeDtypeStructs of `dtype` (jax.eval_shape of init)."""
    module = LlavaNextForConditionalGeneration(config)
    ids, pixels, index = _init_inputs(config, dtype)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, pixels, pack_index=index))[
        "params"
    ]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def init_params(config: LlavaNextConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Random params (for smoke runs and benchmarks of full-size shapes)."""
    module = LlavaNextForConditionalGeneration(config)
    ids, pixels, index = _init_inputs(config, jnp.float32)
    init = jax.jit(lambda k: module.init(k, ids, pixels, pack_index=index))
    params = init(jax.random.key(seed))["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


def partition_rules(config: LlavaNextConfig) -> tuple[tuple[str, P], ...]:
    """The layout on a (data, model) mesh: as LLaVA-1.5's (vicrop_jax.models.llava), and the
    row separator `image_newline` replicated."""
    del config
    return (
        *llama.partition_rules("language_model"),
        ("lm_head/kernel", P(None, MODEL)),  # [D, V]
        ("(vision_tower|multi_modal_projector)/.*", P()),
        ("image_newline", P()),
    )


def model_split_sizes(config: LlavaNextConfig) -> dict[str, int]:
    """{config field: size} of the dimensions split over the model axis."""
    return llama.model_split_sizes(config.text_config)
