"""Map primitives shared by every family's importance cores.

Axis letters: L layers, B batch, N heads, K keys, T image tokens, H x W pixels, C channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
METHODS = ("rel_att", "grad_att", "pure_grad")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return method


def resolve_layers(layer, num_layers: int) -> tuple[int, ...]:
    """int | sequence | "all" -> a tuple of valid, non-negative layer indices."""
    if isinstance(layer, str):
        if layer != "all":
            raise ValueError(f"layer must be an int, a list of ints or 'all', got {layer!r}")
        return tuple(range(num_layers))
    if isinstance(layer, bool | float | np.floating) or not isinstance(
        layer, int | np.integer | Sequence
    ):
        raise ValueError(f"layer must be an int, a list of ints or 'all', got {layer!r}")
    layers = (layer,) if isinstance(layer, int | np.integer) else tuple(layer)
    if not layers:
        raise ValueError("layer list is empty")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise ValueError(f"layer must be an int, a list of ints or 'all', got {layer!r}")
        j = int(i) + (num_layers if int(i) < 0 else 0)
        if not 0 <= j < num_layers:
            raise ValueError(f"layer {i} out of range for a {num_layers}-layer model")
        out.append(j)
    return tuple(out)


def relative_depth(layer: int, depth: int, num_layers: int) -> int:
    """A layer chosen on a `depth`-layer model, at the same relative depth of num_layers
    (at most its last layer: a shallow model's rounding can reach num_layers)."""
    if num_layers == depth:
        return layer
    return min(round(layer * num_layers / depth), num_layers - 1)


def finite_map(x: Array) -> Array:
    """NaN -> 0, +inf -> the map's largest finite value, -inf -> 0, as float32: the box
    search always sees a finite map (a zero general-prompt attention or gradient gives
    +inf or NaN ratios)."""
    finite = jnp.isfinite(x)
    top = jnp.max(jnp.where(finite, x, -jnp.inf), axis=(-2, -1), keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.where(finite, x, jnp.where(x == jnp.inf, top, 0.0)).astype(jnp.float32)


def safe_ratio(num: Array, den: Array) -> Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num > 0, jnp.inf, 0.0))


def image_rows(rows: Array, input_ids: Array, token: int, t: int) -> Array:
    """rows [L, B, N, K] -> heads-averaged attention on each row's T image tokens [B, L, T]."""

    def one(r, ids_row):  # r [L, N, K]
        idx = jnp.nonzero(ids_row == token, size=t)[0]
        return r[:, :, idx].mean(1)  # [L, T]

    return jax.vmap(one, in_axes=(1, 0))(rows, input_ids)


def for_gradients(module):
    """The module as gradient passes run it: each layer's activations recomputed in the
    backward pass (its `remat` switch, where it has one; the same params and values), so a
    gradient through a deep stack holds one layer's activations at a time."""
    return module.clone(remat=True) if hasattr(module, "remat") else module


def log_max_softmax(logits: Array) -> Array:
    """v(x, q) of the paper, summed over the batch (rows are independent, so gradients stay
    per row): the log-probability of the most likely first answer token."""
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)).max(-1).sum()


def pure_grad_pool(grad: Array, detail: Array, p: int) -> Array:
    """grad [2B, H, W, C] (question rows, then general) -> ratio of channel norms, times the
    detail mask, mean-pooled over p x p patches: [B, H / p, W / p]."""
    b = grad.shape[0] // 2
    norm = jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32)), -1))  # [2B, H, W]
    ratio = finite_map(safe_ratio(norm[:b], norm[b:])) * detail
    h, w = ratio.shape[1:]
    return ratio.reshape(b, h // p, p, w // p, p).mean((2, 4))
