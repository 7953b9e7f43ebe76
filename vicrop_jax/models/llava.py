"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration): CLIP tower + MLP projector + Llama.

A thin composite: the image features of every image in the batch, in order, replace the
prompt's image-token embeddings (HF's masked_scatter), then the Llama decoder runs. Any number
of images per prompt works, which ViCrop's [original, crop] answer needs.

Axis letters: see vicrop_jax.models.common (I = images in the batch, T = tokens per image).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vicrop_jax.models import llama
from vicrop_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from vicrop_jax.models.common import KVCache, ModelOutput, activation, pinned_promote_dtype
from vicrop_jax.models.llama import LlamaConfig, LlamaModel, run_decoder
from vicrop_jax.sharding import MODEL

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """Field names follow transformers' LlavaConfig."""

    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    text_config: LlamaConfig = LlamaConfig(vocab_size=32064)
    image_token_index: int = 32000
    image_seq_length: int = 576
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | tuple[int, ...] = -2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    model_type: str = "llava"

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' or 'full', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        if d.get("model_type", "llava") != "llava":
            raise ValueError(f"expected model_type 'llava', got {d.get('model_type')!r}")
        vision = dict(d.get("vision_config") or {})
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(
                f"unsupported LLaVA vision tower {vision.get('model_type')!r} (CLIP only)"
            )
        text = dict(d.get("text_config") or {})
        if text.get("model_type", "llama") != "llama":
            raise ValueError(f"unsupported LLaVA language model {text.get('model_type')!r}")
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        text["tie_word_embeddings"] = tie
        fields = {f.name for f in dataclasses.fields(cls)} - {"vision_config", "text_config"}
        top = {k: v for k, v in d.items() if k in fields}
        if "image_token_id" in d and "image_token_index" not in d:
            top["image_token_index"] = d["image_token_id"]
        if isinstance(top.get("vision_feature_layer"), list):
            top["vision_feature_layer"] = tuple(top["vision_feature_layer"])
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
        """T: tokens per image after feature selection."""
        g = self.vision_config.grid
        return g * g + (1 if self.vision_feature_select_strategy == "full" else 0)


def _vicuna(hidden, inter, layers, heads) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32064, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=0,
    )  # fmt: skip


PRESETS: dict[str, LlavaConfig] = {
    "llava-1.5-7b": LlavaConfig(text_config=_vicuna(4096, 11008, 32, 32)),
    "llava-1.5-13b": LlavaConfig(text_config=_vicuna(5120, 13824, 40, 40)),
}


class LlavaMultiModalProjector(nn.Module):
    config: LlavaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d = cfg.text_config.hidden_size
        x = nn.Dense(d, use_bias=cfg.multimodal_projector_bias, name="linear_1")(x)
        x = activation(cfg.projector_hidden_act)(x)
        return nn.Dense(d, use_bias=cfg.multimodal_projector_bias, name="linear_2")(x)


def merge_image_features(embeds: Array, input_ids: Array, features: Array, token: int) -> Array:
    """Places image features at the image-token positions, images in batch order.

    embeds: [B, S, D]; input_ids: [B, S]; features: [I, T, D]. The k-th image token of the
    flattened batch takes the k-th feature row, as HF's masked_scatter does. Counts are
    checked on the host by the caller (a traced function cannot raise).
    """
    is_img = input_ids == token
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    idx = jnp.cumsum(is_img.reshape(-1)) - 1
    idx = jnp.clip(idx, 0, flat.shape[0] - 1).reshape(is_img.shape)
    return jnp.where(is_img[..., None], flat[idx], embeds)


def language_pass(
    model, input_ids, feats, attention_mask, cache, attn_delta, output_full_attentions,
    only_last_logits,
):  # fmt: skip
    """The language-model half of a pass, shared by LLaVA and InstructBLIP (called from their
    `__call__`; `model` has language_model, logits and config.image_token_index): embed,
    place the image features `feats` [I, T, D] (or None) at the image-token positions, run
    the decoder. Returns llama.run_decoder's (logits, cache, rows, full)."""
    b, s = input_ids.shape
    mask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
    embeds = model.language_model.embed(input_ids)
    if feats is not None:
        embeds = merge_image_features(embeds, input_ids, feats, model.config.image_token_index)
    return run_decoder(
        model.language_model, model.logits, embeds, mask, cache, attn_delta,
        output_full_attentions, only_last_logits,
    )  # fmt: skip


class LlavaForConditionalGeneration(nn.Module):
    config: LlavaConfig
    remat: bool = False  # per-layer recomputation in backward passes (LlamaModel's)

    def setup(self):
        cfg = self.config
        self.vision_tower = CLIPVisionModel(cfg.vision_config, self.remat)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.language_model = LlamaModel(cfg.text_config, self.remat)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.text_config.vocab_size, use_bias=False, promote_dtype=pinned_promote_dtype
            )

    def image_features(self, pixel_values: Array) -> tuple[Array, Array]:
        """pixel_values float[I, H, W, C] -> (projected [I, T, D], selected vision [I, T, Dv])."""
        hidden, _ = self.vision_tower(pixel_values)
        picked = [hidden[i] for i in self.config.feature_layers]
        if self.config.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]  # drop the class token
        selected = jnp.concatenate(picked, axis=-1)
        return self.multi_modal_projector(selected), selected

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
    ) -> ModelOutput:
        """One pass over a prompt (prefill) or over new tokens with a cache (decode).

        Args:
          input_ids: int[B, S]; image positions hold config.image_token_index.
          pixel_values: float[I, H, W, C] for the I images in the batch, in prompt order.
          attention_mask: int/bool[B, S], 0 for (left) padding; defaults to all ones.
          cache: optional KVCache; keys of this pass go to slots [index, index + S).
          attn_delta: optional float[L, B, N, K] added to each layer's last-query attention row.
          output_full_attentions: also return [L, B, N, S, K] probabilities.
          only_last_logits: compute logits for the last position only.
          image_features: optional precomputed [I, T, D] projected features, used instead of
            pixel_values (lets several prompts share one vision pass).

        Returns:
          ModelOutput (logits, cache, attentions [L, B, N, K], ...).
        """
        feats = image_features
        if feats is None and pixel_values is not None:
            feats, _ = self.image_features(pixel_values)
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


def _init_inputs(config: LlavaConfig, dtype) -> tuple[Array, Array]:
    """Inputs that touch every param: one image and its image tokens, then one text token."""
    v = config.vision_config
    ids = jnp.full((1, config.num_image_tokens + 1), config.image_token_index, jnp.int32)
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), dtype)
    return ids, pixels


def abstract_params(config: LlavaConfig, dtype=jnp.float32) -> dict:
    """The param tree as ShapeDtypeStructs of `dtype`, without allocating it (jax.eval_shape
    of init): what a checkpoint loader fills and what full-size presets are checked against."""
    module = LlavaForConditionalGeneration(config)
    ids, pixels = _init_inputs(config, dtype)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, pixels))["params"]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def init_params(config: LlavaConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Random params (for smoke runs and benchmarks of full-size shapes)."""
    module = LlavaForConditionalGeneration(config)
    ids, pixels = _init_inputs(config, jnp.float32)
    params = jax.jit(module.init)(jax.random.key(seed), ids, pixels)["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


def partition_rules(config: LlavaConfig) -> tuple[tuple[str, P], ...]:
    """The layout on a (data, model) mesh (vicrop_jax.sharding): the decoder split as
    llama.partition_rules, the LM head by the vocabulary; the vision tower and projector
    replicated (0.3 B params: every device runs them on its share of the batch)."""
    del config
    return (
        *llama.partition_rules("language_model"),
        ("lm_head/kernel", P(None, MODEL)),  # [D, V]
        ("(vision_tower|multi_modal_projector)/.*", P()),
    )


def model_split_sizes(config: LlavaConfig) -> dict[str, int]:
    """{config field: size} of the dimensions split over the model axis."""
    return llama.model_split_sizes(config.text_config)
