"""Qwen2.5-VL checkpoints (Qwen/Qwen2.5-VL-*-Instruct layout) <-> vicrop_jax params.

Hub files (transformers 4) name the tower `visual.*`, the decoder `model.*` and the head
`lm_head.*`; transformers 5 writes `model.visual.*`, `model.language_model.*`, `lm_head.*`.
Both normalise to the Flax tree's `visual`, `language_model`, `lm_head`. The Conv3d patch
embedding keeps its [E, C, 2, 14, 14] layout (the Flax kernel is stored that way). A tied
model (3B) has no lm_head param: a saved lm_head must equal the embedding. Key tables and
checkpoint I/O only: the param tree comes from the caller
(vicrop_jax.models.qwen2_5_vl.abstract_params).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from convert import checkpoint

KEY_TABLE = (
    (r"^model\.visual\.", "visual."),
    (r"^model\.language_model\.", "language_model."),
    (r"^model\.", "language_model."),
)


def load_params(path: str, expected: Mapping, check_finite: bool = True) -> dict:
    """Reads an HF Qwen2.5-VL checkpoint directory (either key layout) onto `expected`.

    Args:
      path: directory with *.safetensors (sharded or not).
      expected: the model's params as ShapeDtypeStructs
        (vicrop_jax.models.qwen2_5_vl.abstract_params); each param comes back in its dtype.
      check_finite: refuse tensors holding NaN or inf.

    Raises:
      CheckpointError listing every unused key, missing param, shape mismatch and non-float
      tensor for a float param; or the tensors holding NaN or inf.
    """
    return checkpoint.load_params(path, expected, KEY_TABLE, check_finite)


def hf_key(path: tuple[str, ...]) -> str:
    """Flax path -> the hub key: `blocks_N` / `layers_N` / `mlp_N` -> `.N`,
    kernel/scale/embedding -> weight, the decoder under `model.`."""
    parts = [re.sub(r"^(blocks|layers|mlp)_(\d+)$", r"\1.\2", p) for p in path]
    if parts[-1] in ("kernel", "scale", "embedding"):
        parts[-1] = "weight"
    if parts[0] == "language_model":
        parts[0] = "model"
    return ".".join(parts)


def export_params(params) -> dict[str, np.ndarray]:
    """Params -> the HF tensors of a hub Qwen2.5-VL checkpoint (which transformers loads)."""
    return checkpoint.export_tensors(params, hf_key)
