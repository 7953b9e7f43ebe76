"""LLaVA-1.5: CLIP ViT, MLP projector, Llama decoder; one `<image>` placeholder an image.

Official prompt (run.py of the authors' code): "<image>\\nUSER: {question} Answer the
question using a single word or phrase.\\nASSISTANT:", one `<image>` per image. The
projector is an MLP, so A_ti is the identity and A_si is A_st over the patch grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from convert import llava as llava_convert
from vicrop_jax.families.base import Family
from vicrop_jax.maps import (
    METHODS,
    finite_map,
    for_gradients,
    image_rows,
    log_max_softmax,
    pure_grad_pool,
    safe_ratio,
)
from vicrop_jax.models import llava as llava_models

Array = jax.Array
# The official answer instruction (run.py), after the question.
ANSWER_SUFFIX = " Answer the question using a single word or phrase.\nASSISTANT:"


def llava_prompt(question: str, n_images: int = 1) -> str:
    """The official LLaVA-1.5 prompt with n_images image placeholders."""
    return "<image>" * n_images + f"\nUSER: {question}" + ANSWER_SUFFIX


def grid_map(cfg, m: Array) -> Array:
    """[B, T] image-token values -> finite float32[B, N, N] over the patch grid."""
    if cfg.vision_feature_select_strategy == "full":
        m = m[:, 1:]  # drop the class-token position: the map covers patches only
    g = cfg.vision_config.grid
    return finite_map(m.reshape(m.shape[0], g, g))


def rel_att_from_rows(cfg, rows: Array, input_ids: Array, layers: tuple[int, ...]) -> Array:
    """rel-att from the last-query rows [L, 2B, N, K >= S] of [questions; general prompts]."""
    s = input_ids.shape[1]
    att = image_rows(rows[..., :s], input_ids, cfg.image_token_index, cfg.num_image_tokens)
    att = att[:, jnp.asarray(layers)].mean(1)  # [2B, T]
    b = input_ids.shape[0] // 2
    return grid_map(cfg, safe_ratio(att[:b], att[b:]))


def attention_token_values(module, params, input_ids: Array, attention_mask: Array,
                           pixels: Array, *, method: str, layers: tuple[int, ...], size: int,
                           pair_inputs: dict | None = None, **inputs) -> Array:  # fmt: skip
    """rel-att's question-over-general ratio, or grad-att's A * relu(dv/dA), at each image
    token of a LLaVA-style model (an MLP projector: image tokens are the tower's tokens),
    heads and `layers` averaged (used inside jit).

    Args:
      input_ids, attention_mask: int[2B, S]: rows [0, B) the questions, rows [B, 2B) the
        general prompt for the same images (grad_att reads the first B rows).
      pixels: the module's pixels of the B question images; inputs: its further image
        inputs (LLaVA-NeXT's pack_index).
      pair_inputs: rel_att: image inputs with which one `image_features` call gives the 2B
        rows' features (each image twice, LLaVA-NeXT's doubled packing table); None: the B
        images' features, repeated.
      size: image tokens read per row (a static int; past a row's last image token the
        values are padding).

    Returns:
      float32[B, size]: each row's first `size` image tokens, in prompt order.
    """
    cfg = module.config
    b = input_ids.shape[0] // 2
    tok, sel = cfg.image_token_index, jnp.asarray(layers)
    apply = functools.partial(module.apply, {"params": params})
    if method == "rel_att":
        if pair_inputs is None:
            feats, _ = apply(pixels, method=lambda m, p: m.image_features(p, **inputs))
            feats = jnp.concatenate([feats, feats])
        else:
            feats, _ = apply(pixels, method=lambda m, p: m.image_features(p, **pair_inputs))
        out = apply(input_ids, None, attention_mask, only_last_logits=True,
                    image_features=feats)  # fmt: skip
        s = input_ids.shape[1]
        att = image_rows(out.attentions[..., :s], input_ids, tok, size)[:, sel].mean(1)
        return safe_ratio(att[:b], att[b:])  # [B, size]
    if method == "grad_att":
        apply = functools.partial(for_gradients(module).apply, {"params": params})
        ids, mask = input_ids[:b], attention_mask[:b]
        nl, nh = cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads
        delta0 = jnp.zeros((nl, b, nh, ids.shape[1]), jnp.float32)

        def v(delta):
            o = apply(ids, pixels, mask, attn_delta=delta, only_last_logits=True, **inputs)
            return log_max_softmax(o.logits), o.attentions

        grad, rows = jax.grad(v, has_aux=True)(delta0)
        return image_rows(rows * jax.nn.relu(grad), ids, tok, size)[:, sel].mean(1)  # [B, size]
    raise ValueError(f"{method!r} is not an attention method")


@functools.partial(jax.jit, static_argnames=("module", "method", "layers"))
def llava_maps(
    module,
    params,
    input_ids: Array,
    attention_mask: Array,
    pixels: Array,
    detail: Array | None,
    *,
    method: str,
    layers: tuple[int, ...],
) -> Array:
    """Importance maps for a batch of B images (jitted; static: module, method, layers).

    Args:
      input_ids, attention_mask: int[2B, S]: rows [0, B) the questions, rows [B, 2B) the
        general prompt for the same images (grad_att reads only the first B rows).
      pixels: float[B, H, W, C] preprocessed images (NHWC).
      detail: bool[B, H, W] pure-grad detail mask, else None.

    Returns:
      float32[B, N, N].
    """
    cfg = module.config
    if method in ("rel_att", "grad_att"):
        values = attention_token_values(
            module, params, input_ids, attention_mask, pixels, method=method, layers=layers,
            size=cfg.num_image_tokens,
        )  # fmt: skip
        return grid_map(cfg, values)
    elif method == "pure_grad":

        def v(px):
            o = for_gradients(module).apply({"params": params}, input_ids, px, attention_mask,
                                            only_last_logits=True)  # fmt: skip
            return log_max_softmax(o.logits)

        grad = jax.grad(v)(jnp.concatenate([pixels, pixels]))  # [2B, H, W, C]
        return pure_grad_pool(grad, detail, cfg.vision_config.patch_size)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


class Llava(Family):
    name = "llava"
    config_type = llava_models.LlavaConfig
    module_type = llava_models.LlavaForConditionalGeneration
    models = llava_models
    converter = llava_convert
    paper_layer = (14, 32)
    # BOS and the first image open every prompt (question, general, [original, crop]).
    shares_prompt_prefix = True

    def prompt(self, question: str, n_images: int = 1) -> str:
        return llava_prompt(question, n_images)

    def grid_map(self, config, values: Array) -> Array:
        """Image-token values [B, T] -> the map [B, N, N] (pure; used inside jit)."""
        return grid_map(config, values)

    def maps(self, module, params, enc, pixels, detail, *, method, layers, place, images,
             **options):  # fmt: skip
        del images, options
        return llava_maps(module, params, place(enc["input_ids"]), place(enc["attention_mask"]),
                          pixels, detail, method=method, layers=layers)  # fmt: skip


LLAVA = Llava()
