"""LLaVA-1.5 checkpoints (llava-hf/llava-1.5-*-hf layout) <-> vicrop_jax params.

Key tables and checkpoint I/O only: the param tree a checkpoint must fill comes from the
caller (vicrop_jax.models.llava.abstract_params), so this package needs no model code.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from convert import checkpoint

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


def load_params(path: str, expected: Mapping, check_finite: bool = True) -> dict:
    """Reads an HF LLaVA checkpoint directory onto the param tree `expected`.

    Args:
      path: directory with *.safetensors (sharded or not).
      expected: the model's params as ShapeDtypeStructs
        (vicrop_jax.models.llava.abstract_params); each param comes back in its leaf's dtype.
      check_finite: refuse tensors holding NaN or inf.

    Raises:
      CheckpointError listing every unused key, missing param, shape mismatch and non-float
      tensor for a float param; or the tensors holding NaN or inf.
    """
    return checkpoint.load_params(path, expected, KEY_TABLE, check_finite)


def export_params(params) -> dict[str, np.ndarray]:
    """Params -> the HF tensors transformers' LlavaForConditionalGeneration loads."""
    return checkpoint.export_tensors(params)
