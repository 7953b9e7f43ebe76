"""InstructBLIP (Vicuna) checkpoints (Salesforce/instructblip-vicuna-* layout) <-> params.

Key tables and checkpoint I/O only: the param tree a checkpoint must fill comes from the
caller (vicrop_jax.models.instructblip.abstract_params). The Flax tree uses HF's module names,
so the table only normalises the language-model prefix; the structural rule in
convert.checkpoint does the rest (`layer.N` -> `layer_N`, Linear and Conv transposes,
`.weight` -> kernel/scale/embedding). `query_tokens`, `embeddings.class_embedding` and
`embeddings.position_embedding` are raw parameters kept in HF's shapes ([1, T, D], [1, 1, D],
[1, P, D]).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from convert import checkpoint

# Hub files and transformers 5 both write `language_model.model.*` / `language_model.lm_head.*`;
# the `model.` prefix variants cover a future refactor to the LLaVA-style layout.
KEY_TABLE = (
    (r"^model\.language_model\.", "language_model."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.(vision_model|qformer|query_tokens|language_projection)", r"\1"),
)


def load_params(path: str, expected: Mapping, check_finite: bool = True) -> dict:
    """Reads an HF InstructBLIP checkpoint directory onto the param tree `expected`.

    Args:
      path: directory with *.safetensors (sharded or not).
      expected: the model's params as ShapeDtypeStructs
        (vicrop_jax.models.instructblip.abstract_params); each param comes back in its leaf's
        dtype.
      check_finite: refuse tensors holding NaN or inf.

    Raises:
      CheckpointError listing every unused key, missing param, shape mismatch and non-float
      tensor for a float param; or the tensors holding NaN or inf.
    """
    return checkpoint.load_params(path, expected, KEY_TABLE, check_finite)


def export_params(params) -> dict[str, np.ndarray]:
    """Params -> the HF tensors transformers' InstructBlipForConditionalGeneration loads."""
    return checkpoint.export_tensors(params)
