"""InstructBLIP (Vicuna): BLIP ViT, Q-Former, Llama decoder.

Official prompt: "Question: {question} Short answer:"; the processor puts each image's
`num_query_tokens` image tokens in front of the text. A_ti is the T query tokens'
cross-attention over the ViT patches (class token dropped, heads averaged) at one Q-Former
cross-attention layer, and A_si = A_st @ A_ti (the paper's formula; the official code slices
a fixed 256-key LM span instead, which does not match current checkpoints).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from convert import instructblip as instructblip_convert
from vicrop_jax.families.base import Family
from vicrop_jax.maps import (
    METHODS,
    finite_map,
    for_gradients,
    image_rows,
    log_max_softmax,
    pure_grad_pool,
    relative_depth,
    resolve_layers,
    safe_ratio,
)
from vicrop_jax.models import instructblip as instructblip_models

Array = jax.Array


def blip_prompt(question: str, n_images: int = 1) -> str:
    """The official InstructBLIP prompt (the image tokens are added by `encode`, per image)."""
    del n_images
    return f"Question: {question} Short answer:"


# The official Q-Former layer: entry 2 of HF's `qformer_outputs.cross_attentions`, i.e.
# Q-Former layer 4 of 12 with cross-attention every 2nd layer; 6 such layers in the real model.
PAPER_QFORMER_LAYER = (2, 6)


def default_qformer_layer(num_cross_layers: int) -> int:
    """The paper's Q-Former cross-attention index, or the same relative depth."""
    layer, depth = PAPER_QFORMER_LAYER
    return min(relative_depth(layer, depth, num_cross_layers), num_cross_layers - 1)


@functools.partial(jax.jit, static_argnames=("module", "method", "layers", "qformer_layer"))
def blip_maps(
    module,
    params,
    input_ids: Array,
    attention_mask: Array,
    qformer_input_ids: Array,
    qformer_attention_mask: Array,
    pixels: Array,
    detail: Array | None,
    *,
    method: str,
    layers: tuple[int, ...],
    qformer_layer: int,
) -> Array:
    """InstructBLIP importance maps for a batch of B images (jitted; static: module, method,
    layers, qformer_layer).

    Args:
      input_ids, attention_mask: int[2B, S]: rows [0, B) the questions, rows [B, 2B) the
        general prompt for the same images (grad_att reads only the first B rows).
      qformer_input_ids, qformer_attention_mask: int[2B, L] the same prompts for the Q-Former.
      pixels: float[B, H, W, C] preprocessed images (NHWC).
      detail: bool[B, H, W] pure-grad detail mask, else None.

    Returns:
      float32[B, N, N].
    """
    cfg = module.config
    b = pixels.shape[0]
    t, g = cfg.num_image_tokens, cfg.vision_config.grid
    tok = cfg.image_token_index
    sel = jnp.asarray(layers)
    apply = functools.partial(module.apply, {"params": params})
    grad_apply = functools.partial(for_gradients(module).apply, {"params": params})

    def a_si(st, cross):
        """A_st [B, T] @ A_ti [B, T, P - 1] (class token dropped, heads averaged) -> [B, P - 1]."""
        return jnp.einsum("bt,btp->bp", st, cross.mean(1)[:, :, 1:])

    if method == "rel_att":
        # One ViT pass; the Q-Former runs per prompt (it reads the instruction too).
        vis = apply(pixels, method=lambda m, p: m.vision_features(p))
        feats, cross, _ = apply(
            jnp.concatenate([vis, vis]), qformer_input_ids, qformer_attention_mask,
            method=lambda m, *a: m.query_features(*a),
        )  # fmt: skip
        out = apply(input_ids, None, attention_mask, only_last_logits=True, image_features=feats)
        st = image_rows(out.attentions, input_ids, tok, t)[:, sel].mean(1)  # [2B, T]
        si = a_si(st, cross[qformer_layer])
        m = safe_ratio(si[:b], si[b:])
    elif method == "grad_att":
        ids, mask = input_ids[:b], attention_mask[:b]
        qids, qmask = qformer_input_ids[:b], qformer_attention_mask[:b]
        tc, qc = cfg.text_config, cfg.qformer_config
        delta0 = jnp.zeros((tc.num_hidden_layers, b, tc.num_attention_heads, ids.shape[1]))
        qdelta0 = jnp.zeros((len(qc.cross_attention_layers), b, qc.num_attention_heads, t,
                             cfg.vision_config.num_positions))  # fmt: skip

        def v(delta, qdelta):
            o = grad_apply(
                ids, pixels, mask, attn_delta=delta, only_last_logits=True,
                qformer_input_ids=qids, qformer_attention_mask=qmask, qformer_delta=qdelta,
            )  # fmt: skip
            return log_max_softmax(o.logits), (o.attentions, o.qformer_cross_attentions)

        (grad, qgrad), (rows, cross) = jax.grad(v, (0, 1), has_aux=True)(delta0, qdelta0)
        st = image_rows(rows * jax.nn.relu(grad), ids, tok, t)[:, sel].mean(1)  # [B, T]
        m = a_si(st, cross[qformer_layer] * jax.nn.relu(qgrad[qformer_layer]))
    elif method == "pure_grad":

        def v(px):
            o = grad_apply(input_ids, px, attention_mask, only_last_logits=True,
                           qformer_input_ids=qformer_input_ids,
                           qformer_attention_mask=qformer_attention_mask)  # fmt: skip
            return log_max_softmax(o.logits)

        grad = jax.grad(v)(jnp.concatenate([pixels, pixels]))  # [2B, H, W, C]
        return pure_grad_pool(grad, detail, cfg.vision_config.patch_size)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return finite_map(m.reshape(b, g, g))


class InstructBlip(Family):
    name = "instructblip"
    config_type = instructblip_models.InstructBlipConfig
    module_type = instructblip_models.InstructBlipForConditionalGeneration
    models = instructblip_models
    converter = instructblip_convert
    # Hub configs carry stale text_config bos/eos ids (0/1); generate() reads the file.
    eos_from_generation_config = True
    paper_layer = (15, 32)
    image_placeholder = None  # the processor puts the image tokens before the text

    def prompt(self, question: str, n_images: int = 1) -> str:
        return blip_prompt(question, n_images)

    def model_inputs(self, config, enc: dict):
        """Pixels and the Q-Former's instruction (qformer_input_ids, qformer_attention_mask)."""
        pixels, _ = super().model_inputs(config, enc)
        return pixels, {k: v for k, v in enc.items() if k.startswith("qformer_")}

    def map_options(self, config, qformer_layer=None, **options):
        """qformer_layer: an index into the Q-Former's cross-attention layers (one int);
        default the paper's (2 of 6, or the same relative depth)."""
        super().map_options(config, **options)
        n_cross = len(config.qformer_config.cross_attention_layers)
        chosen = resolve_layers(
            default_qformer_layer(n_cross) if qformer_layer is None else qformer_layer, n_cross
        )
        if len(chosen) != 1:
            raise ValueError("qformer_layer must be one int")
        return {"qformer_layer": chosen[0]}

    def maps(self, module, params, enc, pixels, detail, *, method, layers, place, images,
             qformer_layer: int):  # fmt: skip
        del images
        return blip_maps(
            module, params, place(enc["input_ids"]), place(enc["attention_mask"]),
            place(enc["qformer_input_ids"]), place(enc["qformer_attention_mask"]), pixels,
            detail, method=method, layers=layers, qformer_layer=qformer_layer,
        )  # fmt: skip


INSTRUCTBLIP = InstructBlip()
