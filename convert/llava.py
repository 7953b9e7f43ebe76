"""LLaVA-1.5 checkpoints (llava-hf/llava-1.5-*-hf layout) <-> vicrop_jax params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from convert import checkpoint
from convert.checkpoint import export_tensors
from vicrop_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration

# Hub files use `language_model.model.*`, transformers >= 4.52 `model.language_model.*`;
# hub vision keys carry `vision_tower.vision_model.*`, transformers 5 writes `vision_tower.*`.
KEY_TABLE = (
    (r"^model\.language_model\.", "language_model."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
)


def abstract_params(config: LlavaConfig, dtype=jnp.float32):
    """Param shapes without allocating them (jax.eval_shape of init)."""
    module = LlavaForConditionalGeneration(config)
    v = config.vision_config
    ids = jnp.full((1, config.num_image_tokens + 1), config.image_token_index, jnp.int32)
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), dtype)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, pixels))["params"]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def init_params(config: LlavaConfig, seed: int = 0, dtype=jnp.float32):
    """Random params (for smoke runs and benchmarks of full-size shapes)."""
    module = LlavaForConditionalGeneration(config)
    v = config.vision_config
    ids = jnp.full((1, config.num_image_tokens + 1), config.image_token_index, jnp.int32)
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    params = jax.jit(module.init)(jax.random.key(seed), ids, pixels)["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


def load_params(path: str, config: LlavaConfig, dtype=jnp.float32) -> dict:
    return checkpoint.load_params(path, config, abstract_params(config, dtype), KEY_TABLE, dtype)


def export_params(params) -> dict[str, np.ndarray]:
    return export_tensors(params)
