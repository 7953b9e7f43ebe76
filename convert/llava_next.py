"""LLaVA-NeXT checkpoints (llava-hf/llava-v1.6-*-hf layout) <-> vicrop_jax params.

The LLaVA table plus `image_newline`, which hub files keep at the top level and transformers
>= 4.52 writes as `model.image_newline`. Key tables and checkpoint I/O only: the param tree
comes from the caller (vicrop_jax.models.llava_next.abstract_params).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from convert import checkpoint
from convert.llava import KEY_TABLE as LLAVA_KEY_TABLE

KEY_TABLE = ((r"^model\.image_newline$", "image_newline"), *LLAVA_KEY_TABLE)


def load_params(path: str, expected: Mapping, check_finite: bool = True) -> dict:
    """Reads an HF LLaVA-NeXT checkpoint directory onto the param tree `expected`.

    Args:
      path: directory with *.safetensors (sharded or not).
      expected: the model's params as ShapeDtypeStructs
        (vicrop_jax.models.llava_next.abstract_params); each param comes back in its dtype.
      check_finite: refuse tensors holding NaN or inf.

    Raises:
      CheckpointError listing every unused key, missing param, shape mismatch and non-float
      tensor for a float param; or the tensors holding NaN or inf.
    """
    return checkpoint.load_params(path, expected, KEY_TABLE, check_finite)


def export_params(params) -> dict[str, np.ndarray]:
    """Params -> the HF tensors transformers' LlavaNextForConditionalGeneration loads (hub
    layout: `image_newline` at the top level)."""
    return checkpoint.export_tensors(params)
