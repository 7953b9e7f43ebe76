"""Save and restore converted params with orbax (skip the safetensors mapping next time)."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def save_params(path: str, params) -> str:
    """Writes params to an orbax checkpoint directory `path` (absolute or relative)."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params)
    return path


def restore_params(path: str, like=None):
    """Restores params; `like` (a pytree of arrays or ShapeDtypeStructs) fixes dtypes/sharding."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckpt:
        if like is None:
            return ckpt.restore(path)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        return ckpt.restore(path, target)
