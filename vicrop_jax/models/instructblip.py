"""InstructBLIP with a Vicuna decoder (transformers' InstructBlipForConditionalGeneration).

A thin composite: BLIP ViT -> Q-Former (learned queries + the instruction text, cross-attending
to the ViT tokens) -> `language_projection` -> the Llama decoder. As the checkpoint's
processor lays the prompt out (transformers >= 4.47), each image owns `num_query_tokens`
image-token positions in `input_ids`; the projected query outputs of every image in the
batch, in order, replace them (HF's masked_scatter). Several images per prompt work the same
way (ViCrop's [original, crop]: the two images' query tokens back to back), each image's
Q-Former reading its prompt's instruction.

Axis letters: see vicrop_jax.models.common (I = images in the batch, T = query tokens per
image, C = Q-Former cross-attention layers, P = ViT tokens incl. the class token).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vicrop_jax.models import llama
from vicrop_jax.models.blip_vision import InstructBlipVisionConfig, InstructBlipVisionModel
from vicrop_jax.models.common import KVCache, ModelOutput
from vicrop_jax.models.llama import LlamaConfig, LlamaModel
from vicrop_jax.models.llava import language_pass
from vicrop_jax.models.qformer import InstructBlipQFormerConfig, InstructBlipQFormerModel
from vicrop_jax.sharding import MODEL

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class InstructBlipConfig:
    """Field names follow transformers' InstructBlipConfig (decoder-only Llama/Vicuna text)."""

    vision_config: InstructBlipVisionConfig = InstructBlipVisionConfig()
    qformer_config: InstructBlipQFormerConfig = InstructBlipQFormerConfig(vocab_size=30523)
    text_config: LlamaConfig = LlamaConfig(vocab_size=32064)
    num_query_tokens: int = 32
    image_token_index: int = 32001
    tie_word_embeddings: bool = False
    model_type: str = "instructblip"

    def __post_init__(self):
        if self.qformer_config.encoder_hidden_size != self.vision_config.hidden_size:
            # HF forces this in InstructBlipConfig.__post_init__; from_dict does the same.
            raise ValueError(
                f"qformer_config.encoder_hidden_size={self.qformer_config.encoder_hidden_size} "
                f"!= vision_config.hidden_size={self.vision_config.hidden_size}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstructBlipConfig:
        if d.get("model_type", "instructblip") != "instructblip":
            raise ValueError(f"expected model_type 'instructblip', got {d.get('model_type')!r}")
        text = dict(d.get("text_config") or {})
        text_type = text.get("model_type", "opt")  # HF's default text config is OPT
        if text_type != "llama":
            extra = (
                " (Flan-T5 InstructBLIP is an encoder-decoder; only the Vicuna/Llama "
                "decoder-only checkpoints are ported)" if text_type in ("t5", "umt5", "mt5")
                else ""
            )  # fmt: skip
            raise ValueError(
                f"InstructBLIP with a {text_type!r} language model is not supported{extra}"
            )
        vision = InstructBlipVisionConfig.from_dict(dict(d.get("vision_config") or {}))
        qformer = InstructBlipQFormerConfig.from_dict(
            dict(d.get("qformer_config") or {}), encoder_hidden_size=vision.hidden_size
        )
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        text["tie_word_embeddings"] = tie
        token = d.get("image_token_index", d.get("image_token_id"))
        if token is None:
            raise ValueError(
                "config.json has no image_token_index: the checkpoint predates InstructBLIP's "
                "image tokens (transformers < 4.47); use a current Salesforce/instructblip-* "
                "revision, whose processor expands one image token per query"
            )
        return cls(
            vision_config=vision,
            qformer_config=qformer,
            text_config=LlamaConfig.from_dict(text),
            num_query_tokens=int(d.get("num_query_tokens", 32)),
            image_token_index=int(token),
            tie_word_embeddings=tie,
        )

    @property
    def num_image_tokens(self) -> int:
        """T: LM positions per image (one per query token)."""
        return self.num_query_tokens


def _vicuna(hidden, inter, layers, heads) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32064, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
        pad_token_id=32000,
    )  # fmt: skip


PRESETS: dict[str, InstructBlipConfig] = {
    "instructblip-vicuna-7b": InstructBlipConfig(text_config=_vicuna(4096, 11008, 32, 32)),
    "instructblip-vicuna-13b": InstructBlipConfig(text_config=_vicuna(5120, 13824, 40, 40)),
}


class InstructBlipForConditionalGeneration(nn.Module):
    config: InstructBlipConfig
    # Per-layer recomputation in backward passes (the ViT's and LlamaModel's; the Q-Former's
    # 12 small layers over 32 queries keep theirs).
    remat: bool = False

    def setup(self):
        cfg = self.config
        q = cfg.qformer_config
        self.vision_model = InstructBlipVisionModel(cfg.vision_config, self.remat)
        self.query_tokens = self.param(
            "query_tokens", nn.initializers.normal(0.02), (1, cfg.num_query_tokens, q.hidden_size)
        )
        self.qformer = InstructBlipQFormerModel(q)
        self.language_projection = nn.Dense(cfg.text_config.hidden_size)
        self.language_model = LlamaModel(cfg.text_config, self.remat)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.text_config.vocab_size, use_bias=False)

    def vision_features(self, pixel_values: Array) -> Array:
        """pixel_values float[I, H, W, C] -> ViT tokens after the post-layernorm [I, P, Dv]."""
        return self.vision_model(pixel_values)[0]

    def query_features(
        self,
        image_embeds: Array,
        qformer_input_ids: Array | None = None,
        qformer_attention_mask: Array | None = None,
        qformer_delta: Array | None = None,
    ) -> tuple[Array, Array, Array]:
        """ViT tokens [I, P, Dv] -> (projected [I, T, D], cross-attentions [C, I, N, T, P],
        Q-Former hidden states [I, T + L, Dq]); the instruction rows align with the images."""
        n = image_embeds.shape[0]
        queries = jnp.broadcast_to(self.query_tokens, (n, *self.query_tokens.shape[1:]))
        hidden, cross = self.qformer(
            queries.astype(image_embeds.dtype), image_embeds, qformer_input_ids,
            qformer_attention_mask, qformer_delta,
        )  # fmt: skip
        projected = self.language_projection(hidden[:, : self.config.num_query_tokens])
        return projected, cross, hidden

    def image_features(
        self,
        pixel_values: Array,
        qformer_input_ids: Array | None = None,
        qformer_attention_mask: Array | None = None,
        qformer_delta: Array | None = None,
    ) -> tuple[Array, Array]:
        """pixel_values float[I, H, W, C] -> (projected [I, T, D], cross-attentions)."""
        feats, cross, _ = self.query_features(
            self.vision_features(pixel_values), qformer_input_ids, qformer_attention_mask,
            qformer_delta,
        )  # fmt: skip
        return feats, cross

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
        qformer_input_ids: Array | None = None,
        qformer_attention_mask: Array | None = None,
        qformer_delta: Array | None = None,
    ) -> ModelOutput:
        """One pass over a prompt (prefill) or over new tokens with a cache (decode).

        Args:
          input_ids: int[B, S]; each image's T positions hold config.image_token_index.
          pixel_values: float[I, H, W, C] for the I images in the batch, in prompt order.
          attention_mask: int/bool[B, S], 0 for padding; defaults to all ones.
          cache: optional KVCache; keys of this pass go to slots [index, index + S).
          attn_delta: optional float[L, B, N, K] added to each LM layer's last-query row.
          output_full_attentions: also return [L, B, N, S, K] probabilities.
          only_last_logits: compute logits for the last position only.
          image_features: optional precomputed projected query outputs [I, T, D], used instead
            of pixel_values.
          qformer_input_ids: int[I, L] the instruction in the Q-Former's vocabulary, one row
            per image (a prompt's row repeated for each of its images); None: queries only.
          qformer_attention_mask: int[I, L], 0 for padding.
          qformer_delta: optional float[C, I, N, T, P] added to the cross-attentions.

        Returns:
          ModelOutput (logits, cache, attentions [L, B, N, K], qformer_cross_attentions
          [C, I, N, T, P] when pixel_values were given, ...).
        """
        feats, cross = image_features, None
        if feats is None and pixel_values is not None:
            feats, cross = self.image_features(
                pixel_values, qformer_input_ids, qformer_attention_mask, qformer_delta
            )
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
            qformer_cross_attentions=cross,
        )


def _init_inputs(config: InstructBlipConfig, dtype) -> tuple[Array, Array, Array]:
    """Inputs that touch every param: an image, its query tokens and a one-token instruction."""
    v = config.vision_config
    ids = jnp.full((1, config.num_query_tokens + 1), config.image_token_index, jnp.int32)
    ids = ids.at[:, -1].set(0)
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), dtype)
    qids = jnp.zeros((1, 1), jnp.int32)
    return ids, pixels, qids


def abstract_params(config: InstructBlipConfig, dtype=jnp.float32) -> dict:
    """The param tree as ShapeDtypeStructs of `dtype`, without allocating it (jax.eval_shape
    of init): what a checkpoint loader fills and what full-size presets are checked against."""
    module = InstructBlipForConditionalGeneration(config)
    ids, pixels, qids = _init_inputs(config, dtype)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), ids, pixels, qformer_input_ids=qids)
    )["params"]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def init_params(config: InstructBlipConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Random params (for smoke runs and benchmarks of full-size shapes)."""
    module = InstructBlipForConditionalGeneration(config)
    ids, pixels, qids = _init_inputs(config, jnp.float32)
    init = jax.jit(lambda key: module.init(key, ids, pixels, qformer_input_ids=qids))
    params = init(jax.random.key(seed))["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


def partition_rules(config: InstructBlipConfig) -> tuple[tuple[str, P], ...]:
    """The layout on a (data, model) mesh (vicrop_jax.sharding): the decoder split as
    llama.partition_rules, the LM head by the vocabulary; the ViT, Q-Former, query tokens and
    projection replicated (1.1 B params; the Q-Former's 12 heads would not divide a model
    axis of 8)."""
    del config
    return (
        *llama.partition_rules("language_model"),
        ("lm_head/kernel", P(None, MODEL)),  # [D, V]
        ("(vision_model|qformer|language_projection)/.*", P()),
        ("query_tokens", P()),
    )


def model_split_sizes(config: InstructBlipConfig) -> dict[str, int]:
    """{config field: size} of the dimensions split over the model axis."""
    return llama.model_split_sizes(config.text_config)
