"""InstructBLIP (Vicuna) checkpoints (Salesforce/instructblip-vicuna-* layout) <-> params.

The Flax tree uses HF's module names, so the table only normalises the language-model prefix;
the structural rule in convert.checkpoint does the rest (`layer.N` -> `layer_N`, Linear and
Conv transposes, `.weight` -> kernel/scale/embedding). `query_tokens`,
`embeddings.class_embedding` and `embeddings.position_embedding` are raw parameters kept in
HF's shapes ([1, T, D], [1, 1, D], [1, P, D]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from convert import checkpoint
from convert.checkpoint import export_tensors
from vicrop_jax.models.instructblip import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

# Hub files and transformers 5 both write `language_model.model.*` / `language_model.lm_head.*`;
# the `model.` prefix variants cover a future refactor to the LLaVA-style layout.
KEY_TABLE = (
    (r"^model\.language_model\.", "language_model."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.(vision_model|qformer|query_tokens|language_projection)", r"\1"),
)


def _init_args(config: InstructBlipConfig, dtype):
    """Inputs that touch every param: an image, its query tokens and a one-token instruction."""
    v = config.vision_config
    ids = jnp.full((1, config.num_query_tokens + 1), config.image_token_index, jnp.int32)
    ids = ids.at[:, -1].set(0)
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), dtype)
    qids = jnp.zeros((1, 1), jnp.int32)
    return ids, pixels, qids


def abstract_params(config: InstructBlipConfig, dtype=jnp.float32):
    """Param shapes without allocating them (jax.eval_shape of init)."""
    module = InstructBlipForConditionalGeneration(config)
    ids, pixels, qids = _init_args(config, dtype)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), ids, pixels, qformer_input_ids=qids)
    )["params"]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def init_params(config: InstructBlipConfig, seed: int = 0, dtype=jnp.float32):
    """Random params (for smoke runs and benchmarks of full-size shapes)."""
    module = InstructBlipForConditionalGeneration(config)
    ids, pixels, qids = _init_args(config, jnp.float32)
    init = jax.jit(lambda key: module.init(key, ids, pixels, qformer_input_ids=qids))
    params = init(jax.random.key(seed))["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


def load_params(path: str, config: InstructBlipConfig, dtype=jnp.float32) -> dict:
    return checkpoint.load_params(path, config, abstract_params(config, dtype), KEY_TABLE, dtype)


def export_params(params) -> dict[str, np.ndarray]:
    return export_tensors(params)
