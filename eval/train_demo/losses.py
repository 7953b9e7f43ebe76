"""The training loss: named terms, each a small function, summed with their weights.

Axes: B batch rows, S sequence, K keys (= S), N heads, T image tokens (the patch grid's
cells), D model width, V vocabulary.

Terms (`loss_fn`, in the order they are summed):
  patch           the patch-label heads' cross-entropy on the image features (training-only
                  heads; `patch_loss_weight`)
  answer_single   cross-entropy on the answer and EOS of the [image] prompts (weight 1/2)
  attention       -log(share of the answer query's image attention on the subject's cells)
                  at the rel-att layer (`attention_loss_weight`)
  answer_pair     as answer_single, on the [image, crop] prompts (weight 1/2)
  pair_attention  as attention, on the [image, crop] prompts: the subject's cells in the
                  image, and in the crop when it holds the letter (`pair_attention_weight`)
  contrast        answer loss of the extra [image] rows about other shapes (weight 1/2)
  pair_contrast   answer loss of the extra [image, crop] rows (weight 1/2)
  general         KL(uniform || the general prompt's image attention) (`general_loss_weight`)
  ratio_peak      a margin loss putting rel-att's map peak on the subject (`ratio_peak_weight`)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from eval.train_demo.config import TrainConfig
from eval.train_demo.crops import COMBO_CLASSES, GLYPH_CLASSES

# Margin (nats) of the ratio peak loss.
PEAK_MARGIN = 0.5


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The weights of the terms a config turns on (the answer terms weigh 1/2 each)."""

    patch: float = 0.0
    attention: float = 0.0
    general: float = 0.0
    ratio_peak: float = 0.0
    pair_attention: float = 0.0

    @classmethod
    def of(cls, cfg: TrainConfig) -> LossWeights:
        return cls(patch=cfg.patch_loss_weight, attention=cfg.attention_loss_weight,
                   general=cfg.general_loss_weight, ratio_peak=cfg.ratio_peak_weight,
                   pair_attention=cfg.pair_attention_weight)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Answers.


def answer_loss(logits, input_ids, loss_mask):
    """Mean cross-entropy over answer tokens, and per-row exact match of those tokens.

    logits float[B, S, V]; input_ids int[B, S]; loss_mask float[B, S] (see data.pack).
    """
    logits, targets, w = logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
    wrong = (jnp.argmax(logits, -1) != targets) & (w > 0)
    return loss, ~jnp.any(wrong, axis=-1)


# ---------------------------------------------------------------------------------------
# Attention.


def _query_rows(probs, loss_mask=None):
    """float32[B, K]: the attention (heads averaged) of each row's query that predicts its
    first answer token (the prompt's last; the last position without a loss_mask)."""
    if loss_mask is None:
        return probs.mean(1)[:, -1]
    query = jnp.argmax(loss_mask > 0, axis=1) - 1  # [B]
    return jnp.take_along_axis(probs.mean(1), query[:, None, None], axis=1)[:, 0]


def subject_attention(probs, input_ids, loss_mask, cells, image_token: int):
    """Share of the image attention that falls on the subject's cells, per row.

    probs: float32[B, N, S, K] one layer's attention; the query is the position that predicts
    the first answer token (the prompt's last). cells: float32[B, T'] per image-token
    weights, spread onto the first T' image tokens of the row (T' = T: the first image,
    crops.subject_cells; 2T: both images of a pair, crops.pair_cells); the share is over
    those tokens. Returns float32[B].
    """
    rows = _query_rows(probs, loss_mask)
    is_img = input_ids == image_token
    t = cells.shape[1]
    counted = is_img & (jnp.cumsum(is_img, axis=1) <= t)
    cell = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, t - 1)
    on_subject = jnp.take_along_axis(cells, cell, axis=1) * counted
    return jnp.sum(rows * on_subject, -1) / jnp.maximum(jnp.sum(rows * counted, -1), 1e-9)


def image_attention(probs, input_ids, image_token: int, num_tokens: int, loss_mask=None):
    """float32[B, T]: the last position's attention (heads averaged) over the first image's
    tokens, renormalised to sum to 1 (the general prompt's rows: left-padded, no answer);
    with loss_mask, the attention of the query that predicts the first answer token instead
    (rel-att's numerator at that layer)."""
    rows = _query_rows(probs, loss_mask)  # [B, K]
    is_img = input_ids == image_token
    first = is_img & (jnp.cumsum(is_img, axis=1) <= num_tokens)
    # The first image's tokens are contiguous; gather them in order.
    start = jnp.argmax(first, axis=1)
    idx = start[:, None] + jnp.arange(num_tokens)[None]
    att = jnp.take_along_axis(rows, idx, axis=1)
    return att / jnp.maximum(att.sum(-1, keepdims=True), 1e-9)


def general_uniformity_loss(att):
    """KL(uniform || att) over the image tokens, per row: 0 when the general prompt looks at
    every patch alike, so rel-att's ratio (question / general) keeps the question's peak."""
    t = att.shape[-1]
    return -jnp.mean(jnp.log(att + 1e-6), axis=-1) - jnp.log(t)


def ratio_peak_loss(question_att, general_att, subject_cells, margin: float = PEAK_MARGIN,
                    temperature: float = 0.1):  # fmt: skip
    """softplus(smax(log ratio off the subject) - smax(log ratio on it) + margin) per row, on
    rel-att's map itself: log(question / general) over the image's T cells (both [B, T],
    each summing to 1); smax is a soft maximum (temperature * logsumexp(x / temperature)).
    Near 0 once the subject holds the map's highest cell by the margin: the box search's
    window follows that peak, not the map's mass. Also returns whether the hard peak is on
    the subject."""
    log_ratio = jnp.log(question_att + 1e-9) - jnp.log(general_att + 1e-9)
    on = subject_cells > 0
    inside, outside = jnp.where(on, log_ratio, -1e9), jnp.where(~on, log_ratio, -1e9)
    smax = lambda x: temperature * jax.nn.logsumexp(x / temperature, axis=-1)
    peak_on_subject = jnp.max(inside, -1) >= jnp.max(outside, -1)
    return jax.nn.softplus(smax(outside) - smax(inside) + margin), peak_on_subject


# ---------------------------------------------------------------------------------------
# Patch-label heads.


def init_aux(key, dim: int) -> dict:
    """The patch-label heads (training only, never exported): linear maps from the projected
    image features (width `dim`) to glyph and colour+shape logits."""
    k1, k2 = jax.random.split(key)
    head = lambda k, n: {"kernel": jax.random.normal(k, (dim, n), jnp.float32) * dim**-0.5,
                         "bias": jnp.zeros((n,), jnp.float32)}  # fmt: skip
    return {"glyph": head(k1, 1 + len(GLYPH_CLASSES)), "combo": head(k2, 1 + len(COMBO_CLASSES))}


def patch_loss(aux, feats, labels, background_weight: float = 0.1):
    """Cross-entropy of the patch-label heads; feats float[I, T, D], labels int[I, 2, T].

    Cells without a label weigh `background_weight`; returns (loss, glyph accuracy on the
    labelled cells)."""
    total, acc = 0.0, None
    for row, name in enumerate(("glyph", "combo")):
        logits = feats.astype(jnp.float32) @ aux[name]["kernel"] + aux[name]["bias"]
        y = labels[:, row]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        w = jnp.where(y > 0, 1.0, background_weight)
        total = total + jnp.sum(ce * w) / jnp.sum(w)
        if name == "glyph":
            right = (jnp.argmax(logits, -1) == y) & (y > 0)
            acc = jnp.sum(right) / jnp.maximum(jnp.sum(y > 0), 1)
    return total / 2, acc


def image_features(module, params, pixel_values):
    """float[I, T, D]: the projected image features (LlavaForConditionalGeneration's)."""
    feats, _ = module.apply({"params": params}, pixel_values,
                            method=lambda m, p: m.image_features(p))  # fmt: skip
    return feats


# ---------------------------------------------------------------------------------------
# The terms.


def patch_term(aux, feats, batch, metrics):
    loss, acc = patch_loss(aux, feats, batch["patch_labels"])
    metrics["loss_patch"], metrics["acc_patch_glyph"] = loss, acc
    return loss


def answer_term(out, batch, name: str, metrics):
    """The answer loss of the batch's `name` rows (logged as loss_name, correct_name)."""
    loss, correct = answer_loss(out.logits, batch[f"{name}_input_ids"], batch[f"{name}_loss_mask"])
    metrics[f"loss_{name}"], metrics[f"correct_{name}"] = loss, correct
    return loss


def extra_question_term(out, batch, name: str, metrics):
    """The answer loss of extra question rows (logged as loss_name, acc_name)."""
    loss, correct = answer_loss(out.logits, batch[f"{name}_input_ids"], batch[f"{name}_loss_mask"])
    metrics[f"loss_{name}"], metrics[f"acc_{name}"] = loss, jnp.mean(correct)
    return loss


def attention_term(subject_share):
    """Mean -log(subject share) over the rows."""
    return jnp.mean(-jnp.log(subject_share + 1e-6))


def pair_attention_term(pair_probs, batch, image_token: int, metrics):
    share = subject_attention(pair_probs, batch["pair_input_ids"], batch["pair_loss_mask"],
                              batch["pair_cells"], image_token)  # fmt: skip
    metrics["att_subject_pair"] = jnp.mean(share)
    return jnp.mean(-jnp.log(share + 1e-6))


def general_term(general_att, batch, metrics):
    loss = jnp.mean(general_uniformity_loss(general_att))
    metrics["loss_general"] = loss
    metrics["att_subject_general"] = jnp.mean(jnp.sum(general_att * batch["subject_cells"], -1))
    return loss


def ratio_peak_term(question_att, general_att, batch, metrics):
    loss, peak_on_subject = ratio_peak_loss(question_att, general_att, batch["subject_cells"])
    metrics["loss_ratio_peak"] = jnp.mean(loss)
    metrics["ratio_peak_on_subject"] = peak_on_subject
    return jnp.mean(loss)


def loss_fn(module, params, batch, weights: LossWeights = LossWeights(), att_layer: int = 0,
            aux=None):  # fmt: skip
    """(total, metrics) of a batch; the vision tower runs once per image of the batch.

    The terms listed in the module docstring, each present when its rows are in the batch
    (contrast_*, pair_contrast_*, general_*, pair_cells) or its weight is set; the patch term
    whenever `aux` (the patch heads) is given. The attention terms read LM layer att_layer.
    """
    apply = functools.partial(module.apply, {"params": params})
    image_token = module.config.image_token_index
    feats = image_features(module, params, batch["pixel_values"])  # [2B, T, D]
    b = batch["single_input_ids"].shape[0]
    # Each item's image then its crop: the pair rows' two images.
    pair_feats = jnp.stack([feats[:b], feats[b:]], axis=1).reshape(2 * b, *feats.shape[1:])
    metrics, terms = {}, []  # terms: (weight, loss) in the order they are summed

    def run(name, image_feats, full_attentions=False):
        ids, mask = batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"]
        return apply(ids, None, mask, image_features=image_feats,
                     output_full_attentions=full_attentions)  # fmt: skip

    if aux is not None:
        terms.append((weights.patch, patch_term(aux, feats, batch, metrics)))
    single = run("single", feats[:b], full_attentions=True)
    terms.append((0.5, answer_term(single, batch, "single", metrics)))
    single_probs = single.full_attentions[att_layer]
    share = subject_attention(single_probs, batch["single_input_ids"], batch["single_loss_mask"],
                              batch["subject_cells"], image_token)  # fmt: skip
    metrics["att_subject"] = jnp.mean(share)
    if weights.attention:
        terms.append((weights.attention, attention_term(share)))
    pair = run("pair", pair_feats, full_attentions=bool(weights.pair_attention))
    terms.append((0.5, answer_term(pair, batch, "pair", metrics)))
    if weights.pair_attention:
        pair_probs = pair.full_attentions[att_layer]
        terms.append((weights.pair_attention,
                      pair_attention_term(pair_probs, batch, image_token, metrics)))  # fmt: skip
    if "contrast_input_ids" in batch:  # k rows per image, item-major (data.Data.batch)
        k = batch["contrast_input_ids"].shape[0] // b
        contrast = run("contrast", jnp.repeat(feats[:b], k, axis=0))
        terms.append((0.5, extra_question_term(contrast, batch, "contrast", metrics)))
    if "pair_contrast_input_ids" in batch:  # one row per item, on the item's [image, crop]
        pair_contrast = run("pair_contrast", pair_feats)
        terms.append((0.5, extra_question_term(pair_contrast, batch, "pair_contrast", metrics)))
    if weights.general or weights.ratio_peak:
        general = run("general", feats[:b], full_attentions=True)
        general_att = image_attention(
            general.full_attentions[att_layer],
            batch["general_input_ids"],
            image_token,
            feats.shape[1],
        )
        terms.append((weights.general, general_term(general_att, batch, metrics)))
        if weights.ratio_peak:
            question_att = image_attention(
                single_probs,
                batch["single_input_ids"],
                image_token,
                feats.shape[1],
                batch["single_loss_mask"],
            )
            terms.append(
                (weights.ratio_peak, ratio_peak_term(question_att, general_att, batch, metrics))
            )
    total = 0.0
    for weight, loss in terms:
        total = total + weight * loss
    return total, metrics
