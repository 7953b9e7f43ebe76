"""Trains the shipped demo model: a small LLaVA on the synthetic small-detail benchmark.

python -m eval.train_demo --flagfile=eval/flags/train_demo.flags           # stage 1
(then train_demo_bind, train_demo_questions and train_demo_finetune.flags: stages 1b-2)
python -m eval.train_demo --flagfile=eval/flags/train_demo_crops.flags     # stage 3, exports
python -m eval.train_demo --flagfile=eval/flags/train_demo_crops.flags --export_only

The model is this project's own Flax LLaVA (CLIP-style ViT, MLP projector, Llama decoder)
with a WordLevel tokenizer (tokenizers library) and an HF LlavaProcessor, exported in HF
format so `vicrop_jax.load_model` reads it through the llava-1.5-7b-hf converter.

What it learns, and why the data look as they do:
  * Input resolution. The processor squashes every image to R x R (no centre crop, so no
    subject is ever cut off; images are at most 4:3). A subject of relative size r spans
    r * R pixels of the model input, so at R = 128 a small subject (r < 0.08) is under
    10 px and its word is unreadable, while a large one (r >= 0.2, >= 26 px) can be read.
  * Two prompts per item, exactly the pipeline's: `llava_prompt(q)` with [image] and
    `llava_prompt(q, 2)` with [image, crop]. The crop imitates what ViCrop passes: a square
    of side max(R * ratio, subject side * g), ratio in [1, 2] as the box search's windows,
    g in [1, 1.5], around the subject with a random offset that keeps it inside, shifted
    into the image (an axis shorter than the box is spanned fully, as the box search does).
    In the crop a subject of s pixels spans about s / ratio pixels whatever R is, so a small
    subject in a large image becomes readable.
  * A fraction (`negative_fraction`) of the pairs get a crop without the subject: the
    answer must then come from the first image, as when the box search misses.
  * Loss: cross-entropy on the answer tokens and EOS only (teacher forcing); prompts are
    left-padded to one fixed length per prompt kind, so one program is compiled.
  * Optional auxiliary loss (`attention_loss_weight`): -log of the share of the single-image
    prompt's answer-position attention (heads averaged, at the LM layer rel-att reads) that
    falls on the subject's patches. It teaches the model where to look, so a demo trained
    with it shows ViCrop's mechanics, not that a model learns where to look by itself; the
    share is logged (`att_subject`) either way.
  * The vision tower runs once per image of the step; the single-image and the pair
    prompts share those features (LlavaForConditionalGeneration's `image_features`).

Stage 2 (`init_from`, eval/flags/train_demo_finetune.flags) fine-tunes a finished run with
`attention_loss_weight`, `general_loss_weight` (the general-description prompt's attention
over the image pulled toward uniform, so rel-att's ratio keeps the question's peak) and a crop
mix with `random_crop_fraction` (boxes anywhere) and `distractor_fraction` (boxes around a
look-alike object): the answer is always the subject's, so the model learns to fall back on
the first image when the crop does not show the subject. Stage 3 (train_demo_crops.flags)
adds `large_partial_fraction` (crops of the search's size that cut a large subject's letter)
and `pair_attention_weight` (the [image, crop] answer's attention on the subject).

Determinism: item i of the stream is `eval.synthetic.generate_item(seed, i, split="train")`
and its crop is drawn from a generator seeded with (seed, i); step s uses items
[s * B, (s + 1) * B). A run resumed from an orbax checkpoint therefore sees the same data
and ends with the same params as an uninterrupted one.

Outputs under `workdir`: checkpoints/ (orbax: params, optimizer state, step), log.jsonl
(train records every `log_every` steps; eval records: exact-match accuracy by size bucket
for the full image, the [image, ground-truth crop] pair and the full rel-att ViCrop
pipeline, plus how often the rel-att map's peak and box hit the subject), settings.json,
processor/ (tokenizer + image processor). The export goes to `export_dir`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from tqdm import tqdm

from convert.checkpoint import read_config, save_safetensors
from convert.llava import export_params
from eval import synthetic as syn
from eval.engine import coverage, peak_map
from vicrop_jax import pipeline
from vicrop_jax.demo import SIZES as DEMO_SIZES
from vicrop_jax.importance import default_layer
from vicrop_jax.loading import Model, load_params, module_for
from vicrop_jax.models.llava import LlavaConfig, abstract_params
from vicrop_jax.processing import GENERAL_QUESTION, image_pixels, llava_prompt
from vicrop_jax.testing import build_tokenizer

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/vicrop_train_demo", "Checkpoints and logs.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", "vicrop_jax/assets/demo", "HF-format output directory ('' to skip export)."
)
_EXPORT_ONLY = flags.DEFINE_bool("export_only", False, "Export the latest checkpoint and exit.")
_PROBE = flags.DEFINE_integer(
    "probe_items",
    0,
    "If > 0: print how well the latest checkpoint's image features name "
    "each object (patch heads, by size bucket) on this many demo questions, and exit.",
)
_PROBE_Q = flags.DEFINE_integer(
    "probe_questions",
    0,
    "If > 0: on the demo questions among the first N whose image holds >= 2 large shapes, "
    "ask the latest checkpoint about each of those shapes (no crop) and print the accuracy "
    "and the share of images where every question got one answer (the question ignored); "
    "then exit.",
)
_SMOKE = flags.DEFINE_bool("smoke", False, "A few steps on a tiny model, to check the script.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the init and of the training stream.")
_STEPS = flags.DEFINE_integer("steps", 9000, "Optimizer steps (the schedule's length).")
_STOP_AT = flags.DEFINE_integer("stop_at", 0, "Stop this run at this step (0: at --steps).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Items per step (each: 1 single + 1 pair row).")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (AdamW).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 200, "Linear warmup steps.")
_WD = flags.DEFINE_float("weight_decay", 0.05, "AdamW weight decay (matrices only).")
_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clip.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Vision input side R (pixels).")
_PATCH = flags.DEFINE_integer("patch_size", 16, "ViT patch side.")
_V_HIDDEN = flags.DEFINE_integer("vision_hidden", 192, "ViT width.")
_V_LAYERS = flags.DEFINE_integer("vision_layers", 4, "ViT depth.")
_V_HEADS = flags.DEFINE_integer("vision_heads", 6, "ViT heads.")
_V_MLP = flags.DEFINE_integer("vision_mlp", 768, "ViT MLP width.")
_T_HIDDEN = flags.DEFINE_integer("text_hidden", 192, "Decoder width.")
_T_LAYERS = flags.DEFINE_integer("text_layers", 4, "Decoder depth.")
_T_HEADS = flags.DEFINE_integer("text_heads", 4, "Decoder query heads.")
_T_KV = flags.DEFINE_integer("text_kv_heads", 2, "Decoder key/value heads (GQA).")
_T_MLP = flags.DEFINE_integer("text_mlp", 512, "Decoder MLP width.")
_NEG = flags.DEFINE_float("negative_fraction", 0.1, "Pairs whose crop misses the subject.")
_RAND_CROP = flags.DEFINE_float(
    "random_crop_fraction", 0.0, "Pairs whose crop is a random box (holding the subject or not)."
)
_DISTRACT = flags.DEFINE_float(
    "distractor_fraction", 0.0, "Pairs whose crop shows another object (alike when possible)."
)
_DISTRACT_LARGE = flags.DEFINE_float(
    "large_distractor_fraction",
    -1.0,
    "distractor_fraction for items whose subject is in the large bucket (-1: the same as "
    "every item's): there the original shows the subject's letter, so a crop of another "
    "object teaches the model to answer from the original rather than read the crop.",
)
_PARTIAL_LARGE = flags.DEFINE_float(
    "large_partial_fraction",
    0.0,
    "Pairs of items whose subject is in the large bucket whose crop is the official search's "
    "size (the model's input side) somewhere on the subject's shape, holding under 80% of its "
    "glyph (what a map spread over a large shape picks): the answer is the subject's, so the "
    "model learns to read it from the original.",
)
_OWN = flags.DEFINE_float(
    "own_crop_fraction",
    0.0,
    "Pairs whose crop is the starting model's own rel-att box on that training image (mined "
    "once, when the run starts, into workdir/own_crops.json); the answer stays the subject's, "
    "so the model learns to check a crop against the question.",
)
_GEN_W = flags.DEFINE_float(
    "general_loss_weight",
    0.0,
    "Weight of KL(uniform || the general prompt's attention over the image) at the rel-att layer.",
)
_ATT_TARGET = flags.DEFINE_enum(
    "attention_target",
    "subject",
    ["subject", "glyph", "centre"],
    "What the attention loss pulls toward: the subject's box or its printed glyph's box (the "
    "share on those cells), or 'centre': a Gaussian over the cells around the glyph's centre "
    "(cross-entropy), so the box search's window lands on the glyph, not a corner of the shape.",
)
_INIT_FROM = flags.DEFINE_string(
    "init_from",
    "",
    "Model to fine-tune from: the workdir of a finished run (its latest "
    "checkpoint) or an exported HF directory (e.g. vicrop_jax/assets/demo; fresh patch heads).",
)
_EVAL_SIZES = flags.DEFINE_list("eval_sizes", [], "Shorter sides of held-out images ([]: default).")
_ATT_W = flags.DEFINE_float(
    "attention_loss_weight", 0.0, "Weight of -log(subject share of the rel-att layer's attention)."
)
_PEAK_W = flags.DEFINE_float(
    "peak_loss_weight",
    0.0,
    "Weight of a margin loss at the rel-att layer: the answer query's highest attention cell "
    "on the subject must beat its highest cell elsewhere (soft maxima of log attention) by "
    "--peak_margin nats. The box search follows the map's peak, not its mass.",
)
_PEAK_MARGIN = flags.DEFINE_float("peak_margin", 0.5, "Margin of the peak loss (nats).")
_RATIO_W = flags.DEFINE_float(
    "ratio_peak_weight",
    0.0,
    "Weight of the peak margin loss (--peak_margin) on rel-att's own map at the rel-att "
    "layer: log(question attention / general-prompt attention) over the image's cells, the "
    "subject's highest cell against the highest elsewhere. The general prompt may meet it by "
    "looking at the other objects, without moving the question's attention.",
)
_PAIR_W = flags.DEFINE_float(
    "pair_attention_weight",
    0.0,
    "Weight of -log(share of the [image, crop] prompt's answer attention, at the rel-att "
    "layer, on the subject's cells: in the image, and in the crop when it holds the glyph): "
    "a crop that shows another object's letter should not be read.",
)
_ATT_BUCKETS = flags.DEFINE_list(
    "attention_buckets",
    [],
    "Subject-size buckets (small, medium, large) whose rows get the attention loss ([]: all); "
    "the other rows keep only the answer and patch losses.",
)
_AUX_W = flags.DEFINE_float(
    "patch_loss_weight", 0.0, "Weight of the patch-label loss on the image features (training)."
)
_PATCH_CELLS = flags.DEFINE_enum(
    "patch_label_cells",
    "centre",
    ["centre", "all"],
    "Patch labels on the cell at each glyph's and shape's centre, or on every cell whose "
    "centre lies inside that glyph's or shape's box.",
)
_PRE_STEPS = flags.DEFINE_integer(
    "pretrain_steps", 0, "First steps: the vision tower alone on the patch-label loss."
)
_PRE_BATCH = flags.DEFINE_integer("pretrain_batch", 32, "Images per pretraining step.")
_COLOR_Q = flags.DEFINE_float("color_question_fraction", 0.0, "'What color ...' questions.")
_GLYPHS = flags.DEFINE_enum("glyphs", "word", ["word", "letter"], "Printed word or one letter.")
_MIN_SUBJECT = flags.DEFINE_integer("min_subject_px", 20, "Smallest subject side (pixels).")
_MAX_ASPECT = flags.DEFINE_float("max_aspect", 4 / 3, "Largest image aspect ratio.")
_CONTRAST = flags.DEFINE_integer(
    "contrast_questions",
    0,
    "Extra single-image rows per item, each asking about another readable shape of the same "
    "image (its own answer): the same pixels with different answers, so reading the most "
    "salient letter cannot pass for following the question.",
)
_PAIR_CONTRAST = flags.DEFINE_integer(
    "pair_contrast_questions",
    0,
    "1: an extra [image, crop] row per item on the same two images, asking about another "
    "shape whose glyph the crop shows (else another readable shape, see "
    "--contrast_questions): a crop showing another object's letter is then the answer to one "
    "question and not to the other, so the model has to match the crop to the question.",
)
_EMBED_SCALE = flags.DEFINE_float(
    "embed_scale",
    1.0,
    "Multiply the text embeddings by this at the first question step (after --pretrain_steps, "
    "or on the --init_from model); 0: by the ratio that gives them the mean norm of that "
    "step's image tokens. The projector's image tokens grow ~80x larger than the text table "
    "in vision pretraining, which drowns a question word's identity after layer 0.",
)
_ANSWER_ATT = flags.DEFINE_float(
    "answer_attention_weight",
    0.0,
    "Weight of the attention loss (-log subject share of the answer query's image attention) "
    "at every decoder layer besides the rel-att one, averaged over those layers: the answer "
    "then has to read the subject, not the image's most salient letter.",
)
_Q_OBJECTS = flags.DEFINE_list(
    "question_num_objects",
    [],
    "min,max shapes per question image ([]: eval.synthetic's default, 2,5); e.g. 2,2 for a "
    "binding curriculum where salient-letter reading scores half with --contrast_questions=1.",
)
_Q_REL = flags.DEFINE_list(
    "question_rel_range",
    [],
    "min,max side of the question images' shapes / the image's shorter side ([]: the "
    "generator's default, 0.03,0.5).",
)
_DISTINCT = flags.DEFINE_bool(
    "distinct_colors",
    False,
    "Question images with every shape a different colour (eval.synthetic.SynthConfig).",
)
_REINIT = flags.DEFINE_list(
    "reinit",
    [],
    "Top-level param subtrees of the --init_from model to initialise afresh (seeded), e.g. "
    "language_model: keep its vision tower and projector, start the decoder again. A decoder "
    "that learned to answer with the image's most salient letter does not unlearn it; a fresh "
    "one on the binding curriculum learns to follow the question (BUILD_NOTES).",
)
_FREEZE = flags.DEFINE_list(
    "freeze",
    [],
    "Top-level param subtrees to keep fixed (no update, no weight decay), e.g. "
    "vision_tower,multi_modal_projector: a decoder trained with attention losses then "
    "cannot reach its goal by reshaping the image features.",
)
_LOG_EVERY = flags.DEFINE_integer("log_every", 25, "Steps between train log records.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 500, "Steps between held-out evals (0: none).")
_EVAL_ITEMS = flags.DEFINE_integer("eval_items", 192, "Held-out items (split 'val').")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 250, "Steps between checkpoints.")

IMAGE_TOKEN = "<image>"
_SPLIT, _EVAL_SPLIT = "train", "val"
# The demo model's top-level param subtrees (vicrop_jax.models.llava; lm_head: untied).
_PARAM_TREES = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")


# ---------------------------------------------------------------------------------------
# Settings and model config.


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The demo LLaVA's sizes (HF config fields are derived in `hf_config`)."""

    image_size: int = 128
    patch_size: int = 16
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 6
    vision_mlp: int = 768
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 512

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run needs; `dims`, `seed`, `steps` and `batch_size` fix a run's identity."""

    workdir: str
    dims: ModelDims = ModelDims()
    export_dir: str = ""
    seed: int = 0
    steps: int = 9000
    stop_at: int = 0
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    negative_fraction: float = 0.1
    random_crop_fraction: float = 0.0
    distractor_fraction: float = 0.0
    large_distractor_fraction: float = -1.0  # < 0: distractor_fraction
    large_partial_fraction: float = 0.0
    own_crop_fraction: float = 0.0
    attention_loss_weight: float = 0.0
    general_loss_weight: float = 0.0
    attention_target: str = "subject"
    peak_loss_weight: float = 0.0
    peak_margin: float = 0.5
    pair_attention_weight: float = 0.0
    ratio_peak_weight: float = 0.0
    attention_buckets: tuple[str, ...] = ()
    init_from: str = ""
    reinit: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    patch_loss_weight: float = 0.0
    patch_label_cells: str = "centre"
    pretrain_steps: int = 0
    pretrain_batch: int = 32
    color_question_fraction: float = 0.0
    glyphs: str = "word"
    min_subject_px: int = 20
    max_aspect: float = 4 / 3
    distinct_colors: bool = False
    contrast_questions: int = 0
    pair_contrast_questions: int = 0
    embed_scale: float = 1.0
    answer_attention_weight: float = 0.0
    question_num_objects: tuple[int, int] | None = None
    question_rel_range: tuple[float, float] | None = None
    log_every: int = 25
    eval_every: int = 500
    eval_items: int = 192
    eval_sizes: tuple[int, ...] = ()
    eval_batch: int = 16
    checkpoint_every: int = 250
    progress: bool = True

    def __post_init__(self):
        if self.embed_scale != 1.0 and not (self.init_from or self.pretrain_steps):
            raise ValueError(
                "embed_scale applies at the first question step after "
                "pretraining or to an init_from model; set one of them"
            )
        if self.pair_contrast_questions not in (0, 1):
            raise ValueError(f"pair_contrast_questions: {self.pair_contrast_questions}, use 0 or 1")
        if self.reinit and not self.init_from:
            raise ValueError("reinit re-initialises parts of an --init_from model; set init_from")
        for name in ("reinit", "freeze"):
            unknown = set(getattr(self, name)) - set(_PARAM_TREES)
            if unknown:
                raise ValueError(f"{name}: unknown {sorted(unknown)}; use some of {_PARAM_TREES}")
        syn.SynthConfig(**self.synth_options())  # a bad generator option fails here, named
        unknown = set(self.attention_buckets) - set(_BUCKETS)
        if unknown:
            raise ValueError(f"attention_buckets: unknown {sorted(unknown)}; use {_BUCKETS}")
        total = self.negative_fraction + self.random_crop_fraction + self.distractor_fraction
        if total > 1 + 1e-9:
            raise ValueError(
                f"negative_fraction + random_crop_fraction + distractor_fraction = {total:g} > 1"
            )
        # Large subjects: their distractor share (large_distractor_fraction when set) and the
        # partial crops come on top.
        total = (self.negative_fraction + self.random_crop_fraction
                 + self.distractor_share("large") + self.large_partial_fraction)  # fmt: skip
        if total > 1 + 1e-9:
            raise ValueError(
                "negative_fraction + random_crop_fraction + large_distractor_fraction + "
                f"large_partial_fraction = {total:g} > 1 on large subjects"
            )

    def distractor_share(self, bucket: str) -> float:
        """The distractor-crop fraction of an item whose subject is in `bucket`."""
        if bucket == "large" and self.large_distractor_fraction >= 0:
            return self.large_distractor_fraction
        return self.distractor_fraction

    def pretrain_options(self) -> dict[str, Any]:
        """Pretraining images: small (fast to render), crowded, every glyph readable."""
        return {**self.synth_options(), "num_objects": (6, 10), "rel_range": (0.1, 0.45),
                "sizes": (224, 256), "min_subject_px": 12, "distinct_colors": False}  # fmt: skip

    def synth_options(self) -> dict[str, Any]:
        return {
            "color_question_fraction": self.color_question_fraction,
            "glyphs": self.glyphs,
            "min_subject_px": self.min_subject_px,
            "max_aspect": self.max_aspect,
            "distinct_colors": self.distinct_colors,
            **({"num_objects": tuple(self.question_num_objects)}
               if self.question_num_objects else {}),
            **({"rel_range": tuple(self.question_rel_range)} if self.question_rel_range else {}),
        }  # fmt: skip

    def identity(self) -> dict[str, Any]:
        keys = ("seed", "steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay",
                "grad_clip", "negative_fraction", "attention_loss_weight", "patch_loss_weight",
                "pretrain_steps", "pretrain_batch", "color_question_fraction", "glyphs",
                "min_subject_px", "max_aspect")  # fmt: skip
        out = {"dims": dataclasses.asdict(self.dims), **{k: getattr(self, k) for k in keys}}
        # Fine-tuning fields, only when set: a run without them keeps its old identity.
        for k in ("random_crop_fraction", "distractor_fraction", "own_crop_fraction",
                  "general_loss_weight", "peak_loss_weight", "pair_attention_weight",
                  "ratio_peak_weight", "init_from", "distinct_colors",
                  "contrast_questions", "answer_attention_weight",
                  "pair_contrast_questions", "large_partial_fraction"):  # fmt: skip
            if getattr(self, k):
                out[k] = getattr(self, k)
        if self.large_distractor_fraction >= 0:
            out["large_distractor_fraction"] = self.large_distractor_fraction
        if self.embed_scale != 1.0:
            out["embed_scale"] = self.embed_scale
        for k in ("question_num_objects", "question_rel_range", "reinit", "freeze"):
            if getattr(self, k):
                out[k] = list(getattr(self, k))
        if self.attention_target != "subject":
            out["attention_target"] = self.attention_target
        if self.peak_loss_weight or self.ratio_peak_weight:
            out["peak_margin"] = self.peak_margin
        if self.patch_label_cells != "centre":
            out["patch_label_cells"] = self.patch_label_cells
        if self.attention_buckets:
            out["attention_buckets"] = list(self.attention_buckets)
        return out


def hf_config(dims: ModelDims, tokenizer) -> dict:
    """The HF LlavaConfig dict of the demo model (the layout of llava-1.5-7b-hf's config)."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": ids(IMAGE_TOKEN),
        "image_seq_length": dims.grid**2,
        "projector_hidden_act": "gelu",
        # The last ViT layer: a 4-layer tower would otherwise compute a layer it never uses.
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": dims.vision_hidden,
            "intermediate_size": dims.vision_mlp, "num_hidden_layers": dims.vision_layers,
            "num_attention_heads": dims.vision_heads, "image_size": dims.image_size,
            "patch_size": dims.patch_size, "projection_dim": dims.vision_hidden,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "model_type": "llama", "vocab_size": len(tokenizer),
            "hidden_size": dims.text_hidden, "intermediate_size": dims.text_mlp,
            "num_hidden_layers": dims.text_layers, "num_attention_heads": dims.text_heads,
            "num_key_value_heads": dims.text_kv_heads, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------------
# Tokenizer and processor.


def prompt_words() -> list[str]:
    """Every whitespace-separated word of every prompt, question and answer the task uses."""
    questions = [GENERAL_QUESTION]
    questions += [
        syn.TEXT_QUESTION.format(color=c, shape=s) for c in syn.COLORS for s in syn.SHAPES
    ]
    questions += [syn.COLOR_QUESTION.format(text=w.upper()) for w in syn.WORDS + syn.LETTERS]
    texts = [llava_prompt(q, 2).replace(IMAGE_TOKEN, " ") for q in questions]
    texts += list(syn.answer_vocabulary())
    return sorted({w for t in texts for w in t.split()})


def build_processor(out_dir: str, dims: ModelDims):
    """Tokenizer (WordLevel) + LlavaProcessor squashing images to R x R, saved to out_dir."""
    import transformers
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = build_tokenizer(out_dir, prompt_words())
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "falls back to the PIL backend" notice
    try:
        image_processor = CLIPImageProcessor(
            size={"height": dims.image_size, "width": dims.image_size},
            crop_size={"height": dims.image_size, "width": dims.image_size},
            do_center_crop=False,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    proc = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=dims.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )  # fmt: skip
    proc.save_pretrained(out_dir)
    return proc


class Tokens:
    """Prompt and answer token ids, cached (the whole task has about a hundred prompts)."""

    def __init__(self, processor, num_image_tokens: int):
        self.tok = processor.tokenizer
        self.t = num_image_tokens
        self.pad = self.tok.pad_token_id
        self.eos = self.tok.eos_token_id
        self._cache: dict[tuple[str, int], list[int]] = {}

    def prompt(self, question: str, n_images: int) -> list[int]:
        """The processor's ids for llava_prompt(question, n_images) (<image> expanded)."""
        key = (question, n_images)
        if key not in self._cache:
            text = llava_prompt(question, n_images).replace(IMAGE_TOKEN, IMAGE_TOKEN * self.t)
            ids = self.tok(text)["input_ids"]
            if self.tok.unk_token_id in ids:
                raise ValueError(f"prompt {text!r} has words outside the tokenizer")
            self._cache[key] = ids
        return self._cache[key]

    def answer(self, answer: str) -> list[int]:
        ids = self.tok(answer, add_special_tokens=False)["input_ids"]
        if not ids or self.tok.unk_token_id in ids:
            raise ValueError(f"answer {answer!r} is not in the tokenizer's vocabulary")
        return [*ids, self.eos]

    def about(self, obj: dict, n_images: int) -> tuple[list[int], list[int]]:
        """(prompt, answer) of the text question about object `obj` (its own letter)."""
        q = syn.TEXT_QUESTION.format(color=obj["color"], shape=obj["shape"])
        return self.prompt(q, n_images), self.answer(obj["text"].lower())

    def max_length(self, n_images: int) -> int:
        """Longest prompt + answer + EOS of the task (fixed padded length, one compile)."""
        qs = [syn.TEXT_QUESTION.format(color=c, shape=s) for c in syn.COLORS for s in syn.SHAPES]
        qs += [syn.COLOR_QUESTION.format(text=w.upper()) for w in syn.WORDS + syn.LETTERS]
        longest_answer = max(len(self.answer(a)) for a in syn.answer_vocabulary())
        return max(len(self.prompt(q, n_images)) for q in qs) + longest_answer


def pack(rows: Sequence[tuple[list[int], list[int]]], length: int, pad: int) -> dict:
    """Left-pads (prompt, answer) rows to `length`.

    Returns input_ids and attention_mask int32[B, length] and loss_mask float32[B, length],
    1 at the answer and EOS positions: the logits at position t are scored against
    input_ids[t + 1] with weight loss_mask[t + 1].
    """

    b = len(rows)
    ids = np.full((b, length), pad, np.int32)
    mask = np.zeros((b, length), np.int32)
    loss = np.zeros((b, length), np.float32)
    for i, (prompt, answer) in enumerate(rows):
        seq = prompt + answer
        if len(seq) > length:
            raise ValueError(f"row of {len(seq)} tokens exceeds the padded length {length}")
        ids[i, length - len(seq) :] = seq
        mask[i, length - len(seq) :] = 1
        loss[i, length - len(answer) :] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}


# ---------------------------------------------------------------------------------------
# Crops.


def fit_box(cx: float, cy: float, side: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A square of `side` px centred at (cx, cy), shifted into the image (an axis shorter
    than the side is spanned fully, as the box search's boxes are)."""

    def axis(c, n):
        if side >= n:
            return 0, n
        lo = min(max(int(round(c - side / 2)), 0), n - side)
        return lo, lo + side

    (x1, x2), (y1, y2) = axis(cx, size[0]), axis(cy, size[1])
    return (x1, y1, x2, y2)


def subject_crop(bbox, size, base: int, rng) -> tuple[int, int, int, int]:
    """A crop like ViCrop's around the subject: side max(base * [1, 2], subject * [1, 1.5]),
    offset at random with the subject kept inside."""
    x1, y1, x2, y2 = bbox
    s = max(x2 - x1, y2 - y1)
    side = int(round(max(base * rng.uniform(1.0, 2.0), s * rng.uniform(1.0, 1.5))))
    slack = max(0.0, (side - s) / 2)
    cx = (x1 + x2) / 2 + rng.uniform(-slack, slack)
    cy = (y1 + y2) / 2 + rng.uniform(-slack, slack)
    return fit_box(cx, cy, side, size)


def miss_crop(bbox, size, base: int, rng, tries: int = 20) -> tuple[int, int, int, int] | None:
    """A base-to-2x-base crop that does not overlap the subject, or None if none was found."""
    x1, y1, x2, y2 = bbox
    for _ in range(tries):
        box = random_crop(size, base, rng)
        if box[2] <= x1 or x2 <= box[0] or box[3] <= y1 or y2 <= box[1]:
            return box
    return None


# A crop "holds" a letter when this share of the letter's box lies inside it (the rule of
# eval.analysis's crop_contents).
HOLDS_LETTER = 0.8


def partial_crop(bbox, text_bbox, size, base: int, rng, tries: int = 20,
                 inside: float = HOLDS_LETTER):  # fmt: skip
    """A base x base crop (the side the official box search always returns) centred inside
    the shape's box `bbox` that holds less than `inside` of its glyph's box `text_bbox` (part
    of the shape, part of the letter or none of it: what a map spread over a large subject
    gives), or None if none was found."""
    x1, y1, x2, y2 = bbox
    for _ in range(tries):
        box = fit_box(rng.uniform(x1, x2), rng.uniform(y1, y2), base, size)
        if coverage(box, text_bbox) < inside:
            return box
    return None


def random_crop(size, base: int, rng) -> tuple[int, int, int, int]:
    """A base-to-2x-base square anywhere in the image (it may hold all, part or none of the
    subject): what a box search that looked in the wrong place, or eval's random_crop, gives."""
    side = int(round(base * rng.uniform(1.0, 2.0)))
    return fit_box(rng.uniform(0, size[0]), rng.uniform(0, size[1]), side, size)


def distractor(rec, rng) -> dict | None:
    """Another object of the item, one sharing the subject's colour or shape when there is
    one (the crop a wrong map peak gives: it looks like the subject to a half-attentive
    reader), or None when the subject is alone."""
    subject = rec["objects"][rec["subject_index"]]
    others = [o for i, o in enumerate(rec["objects"]) if i != rec["subject_index"]]
    if not others:
        return None
    alike = [o for o in others if o["color"] == subject["color"] or o["shape"] == subject["shape"]]
    pool = alike or others
    return pool[int(rng.integers(len(pool)))]


def contrast_objects(rec, k: int, rng) -> list[dict]:
    """k objects of the item to ask about besides its subject: the other shapes readable
    without a crop (side >= LARGE_MIN of the image's shorter side; else >= SMALL_MAX), drawn
    with replacement; the subject itself when no other is readable."""
    short = min(rec["image_size"])
    others = [o for i, o in enumerate(rec["objects"]) if i != rec["subject_index"]]
    for least in (syn.LARGE_MIN, syn.SMALL_MAX):
        pool = [o for o in others if (o["bbox"][2] - o["bbox"][0]) >= least * short]
        if pool:
            break
    else:
        pool = [rec["objects"][rec["subject_index"]]]
    return [pool[int(j)] for j in rng.integers(len(pool), size=k)]


def crop_object(rec, crop, rng) -> dict:
    """The shape a pair-contrast row asks about on [image, crop]: another shape whose glyph
    centre the crop holds (the letter a wrong crop tempts the model to read), else one of
    `contrast_objects` (readable in the image)."""
    inside = [o for i, o in enumerate(rec["objects"])
              if i != rec["subject_index"] and _contains_centre(crop, o["text_bbox"])]  # fmt: skip
    if inside:
        return inside[int(rng.integers(len(inside)))]
    return contrast_objects(rec, 1, rng)[0]


def _contains_centre(box, bbox) -> bool:
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return box[0] <= cx < box[2] and box[1] <= cy < box[3]


def gt_crop(bbox, size, base: int) -> tuple[int, int, int, int]:
    """The subject's box grown to at least base x base around its centre (eval's gt_crop)."""
    x1, y1, x2, y2 = bbox
    return fit_box((x1 + x2) / 2, (y1 + y2) / 2, max(base, x2 - x1, y2 - y1), size)


def _cell_span(bbox, size, grid: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, cols) [start, stop) of the grid cells a box overlaps; the image is squashed to a
    square, so cell (r, c) covers x in [c W / g, (c + 1) W / g), likewise y."""
    (x1, y1, x2, y2), (w, h) = bbox, size
    span = lambda a, b, n: (math.floor(a * grid / n), max(math.ceil(b * grid / n), 1))
    return span(y1, y2, h), span(x1, x2, w)


def subject_cells(bbox, size, grid: int) -> np.ndarray:
    """float32[grid, grid], 1 on the patch cells the subject's box overlaps."""
    (r1, r2), (c1, c2) = _cell_span(bbox, size, grid)
    out = np.zeros((grid, grid), np.float32)
    out[r1:r2, c1:c2] = 1.0
    return out


def pair_cells(subject, size, crop, grid: int) -> np.ndarray:
    """float32[2 * grid * grid]: the [image, crop] prompt's subject cells, the image's
    (`subject_cells`) then the crop's (the subject's box clipped to the crop, on the crop's
    grid), the crop's only when it holds 80% of the glyph's box (else zeros: the crop shows
    another object, or a piece of the subject without its whole letter). `subject` is the
    subject's object record (bbox, text_bbox), `crop` the crop's [x1, y1, x2, y2] in the
    image."""
    own = subject_cells(subject["bbox"], size, grid).reshape(-1)
    inner = np.zeros(grid * grid, np.float32)
    if coverage(crop, subject["text_bbox"]) >= HOLDS_LETTER:
        x1, y1, x2, y2 = crop
        bx1, by1, bx2, by2 = subject["bbox"]
        box = (max(bx1, x1) - x1, max(by1, y1) - y1, min(bx2, x2) - x1, min(by2, y2) - y1)
        inner = subject_cells(box, (x2 - x1, y2 - y1), grid).reshape(-1)
    return np.concatenate([own, inner])


def centre_target(text_bbox, bbox, size, grid: int) -> np.ndarray:
    """float32[grid, grid] summing to 1: eval's `peak_map` of the subject's box, peaked at
    its glyph's centre (standard deviation a quarter of the subject's side), kept on the
    cells the subject overlaps.

    Why not the subject's box: a map that is flat over a large subject ties every window
    inside it, and the official search keeps the first (top-left) one, a corner of the shape
    without the glyph (BUILD_NOTES: the gt_map control). A peak puts the window on the glyph.
    """
    x1, y1, x2, y2 = text_bbox
    return peak_map(bbox, size, grid, centre=((x1 + x2) / 2, (y1 + y2) / 2))


def own_crop_indices(settings: Settings) -> list[int]:
    """The training items (of the run's steps x batch_size) whose pair gets the starting
    model's own rel-att crop: each with probability own_crop_fraction, from its own stream."""
    n = (settings.steps - settings.pretrain_steps) * settings.batch_size
    f = settings.own_crop_fraction
    first = settings.pretrain_steps * settings.batch_size
    return [i for i in range(first, first + n)
            if f and np.random.default_rng([settings.seed, i, 2]).uniform() < f]  # fmt: skip


def mine_own_crops(settings: Settings, model: Model, chunk: int = 32) -> dict[int, tuple]:
    """{item index: `model`'s rel-att ViCrop box on that training item} for the items of
    `own_crop_indices`, the box found as eval.run finds it (vicrop_jax.pipeline.ask_batch).
    Written to workdir/own_crops.json when done and read back from there by a resumed run,
    so every step of a run sees the boxes of the model it started from."""
    path = os.path.join(settings.workdir, "own_crops.json")
    if os.path.isfile(path):
        with open(path) as f:
            return {int(k): tuple(v) for k, v in json.load(f).items()}
    indices, boxes = own_crop_indices(settings), {}
    for at in tqdm(range(0, len(indices), chunk), desc="mining own crops",
                   disable=not settings.progress):  # fmt: skip
        part = indices[at : at + chunk]
        items = [syn.generate_item(settings.seed, i, split=_SPLIT, **settings.synth_options())
                 for i in part]  # fmt: skip
        images, questions = [im for im, _ in items], [r["question"] for _, r in items]
        answers = pipeline.ask_batch(model, images, questions, max_new_tokens=3)
        for i, a in zip(part, answers, strict=True):
            boxes[i] = tuple(int(v) for v in a.bbox)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({str(k): list(v) for k, v in boxes.items()}, f)
    os.replace(tmp, path)
    return boxes


# ---------------------------------------------------------------------------------------
# Batches.


class Data:
    """Deterministic training batches: step s -> items [s * B, (s + 1) * B) of the stream."""

    def __init__(self, settings: Settings, processor, own_crops: dict | None = None):
        self.s = settings
        self.proc = processor
        self.own = own_crops or {}
        dims = settings.dims
        self.tokens = Tokens(processor, dims.grid**2)
        self.len1 = self.tokens.max_length(1)
        self.len2 = self.tokens.max_length(2)

    def pixels(self, images) -> Any:
        """float32[I, R, R, 3] (NHWC) through the checkpoint's own image processor."""
        return image_pixels(self.proc, images)

    def item(self, index: int):
        """(image, crop, record, crop_has_subject) of training item `index`."""
        s = self.s
        image, rec = syn.generate_item(s.seed, index, split=_SPLIT, **s.synth_options())
        rng = np.random.default_rng([s.seed, index, 1])
        box, hit = None, True
        u = rng.uniform()
        if u < s.negative_fraction:
            box = miss_crop(rec["bbox"], image.size, s.dims.image_size, rng)
            hit = box is None
        elif u < s.negative_fraction + s.random_crop_fraction:
            box = random_crop(image.size, s.dims.image_size, rng)
            hit = _contains_centre(box, rec["bbox"])
        elif u < s.negative_fraction + s.random_crop_fraction + s.distractor_share(
            rec["size_bucket"]
        ):
            other = distractor(rec, rng)
            if other is not None:
                box = subject_crop(other["bbox"], image.size, s.dims.image_size, rng)
                hit = _contains_centre(box, rec["bbox"])
        elif rec["size_bucket"] == "large" and u < (
            s.negative_fraction + s.random_crop_fraction + s.distractor_share("large")
            + s.large_partial_fraction
        ):  # fmt: skip
            subject = rec["objects"][rec["subject_index"]]
            box = partial_crop(subject["bbox"], subject["text_bbox"], image.size,
                               s.dims.image_size, rng)  # fmt: skip
            hit = box is None or _contains_centre(box, rec["bbox"])
        if box is None:
            box = subject_crop(rec["bbox"], image.size, s.dims.image_size, rng)
        if index in self.own:  # drawn apart (own_crop_indices): the other items are as before
            box = tuple(self.own[index])
            hit = _contains_centre(box, rec["bbox"])
        return image, image.crop(box), rec, hit, box

    def pretrain_batch(self, step: int) -> dict:
        """Pretraining step `step`: pixels [P] and patch labels [P, 2, T] of crowded images
        (split "pretrain", items [step * P, (step + 1) * P))."""
        p, g = self.s.pretrain_batch, self.s.dims.grid
        items = [syn.generate_item(self.s.seed, step * p + i, split="pretrain",
                                   **self.s.pretrain_options()) for i in range(p)]  # fmt: skip
        every = self.s.patch_label_cells == "all"
        labels = [patch_labels(r["objects"], (0, 0, *im.size), g, every) for im, r in items]
        return {"pixel_values": self.pixels([im for im, _ in items]),
                "patch_labels": np.stack(labels)}  # fmt: skip

    def batch(self, step: int) -> dict:
        """Arrays of one step: pixels [2B] (B images, then their crops), rows for the single
        and the pair prompts, and each item's size bucket."""

        b = self.s.batch_size
        items = [self.item(step * b + i) for i in range(b)]
        t = self.tokens
        single = pack([(t.prompt(r["question"], 1), t.answer(r["answer"]))
                       for _, _, r, *_ in items], self.len1, t.pad)  # fmt: skip
        pair = pack([(t.prompt(r["question"], 2), t.answer(r["answer"]))
                     for _, _, r, *_ in items], self.len2, t.pad)  # fmt: skip
        out = {"pixel_values": self.pixels([im for im, *_ in items] + [c for _, c, *_ in items])}
        g = self.s.dims.grid
        whole = [(0, 0, *im.size) for im, *_ in items]
        out["patch_labels"] = np.stack(
            [
                patch_labels(r["objects"], box, g, self.s.patch_label_cells == "all")
                for box, (_, _, r, *_) in zip(
                    whole + [it[4] for it in items], items + items, strict=True
                )
            ]
        )  # [2B, 2, T]
        out.update({f"single_{k}": v for k, v in single.items()})
        if self.s.general_loss_weight or self.s.ratio_peak_weight:
            general = pack([(t.prompt(GENERAL_QUESTION, 1), [])] * b, self.len1, t.pad)
            out["general_input_ids"] = general["input_ids"]
            out["general_attention_mask"] = general["attention_mask"]
        out.update({f"pair_{k}": v for k, v in pair.items()})
        if self.s.contrast_questions:
            rows = []
            for i, (_, _, r, *_) in enumerate(items):
                rng = np.random.default_rng([self.s.seed, step * b + i, 3])
                rows += [t.about(o, 1) for o in contrast_objects(r, self.s.contrast_questions, rng)]
            contrast = pack(rows, self.len1, t.pad)  # [B * k]: item-major
            out.update({f"contrast_{k}": v for k, v in contrast.items()})
        if self.s.pair_contrast_questions:
            rngs = [np.random.default_rng([self.s.seed, step * b + i, 4]) for i in range(b)]
            rows = [t.about(crop_object(r, box, rng), 2)
                    for (_, _, r, _, box), rng in zip(items, rngs, strict=True)]  # fmt: skip
            packed = pack(rows, self.len2, t.pad)  # [B]
            out.update({f"pair_contrast_{k}": v for k, v in packed.items()})
        key = "text_bbox" if self.s.attention_target == "glyph" else "bbox"
        subjects = [(im.size, r["objects"][r["subject_index"]]) for im, _, r, *_ in items]
        out["subject_cells"] = np.stack(
            [subject_cells(o[key], size, g).reshape(-1) for size, o in subjects]
        )
        if self.s.attention_target == "centre":
            out["target_cells"] = np.stack(
                [centre_target(o["text_bbox"], o["bbox"], size, g).reshape(-1)
                 for size, o in subjects]
            )  # fmt: skip
        if self.s.pair_attention_weight:
            out["pair_cells"] = np.stack(
                [pair_cells(o, sz, it[4], g) for (sz, o), it in zip(subjects, items, strict=True)]
            )  # [B, 2T]
        out["bucket"] = np.array([_BUCKETS.index(r["size_bucket"]) for _, _, r, *_ in items])
        out["crop_hit"] = np.array([hit for _, _, _, hit, _ in items])
        if self.s.attention_buckets:
            keep = [_BUCKETS.index(b) for b in self.s.attention_buckets]
            out["att_row_weight"] = np.isin(out["bucket"], keep).astype(np.float32)
        return out


_BUCKETS = ("small", "medium", "large")
_LOG_ONLY = ("bucket", "crop_hit")  # batch entries for the log, not the step
_DEMO_SIDES = tuple(int(x) for x in DEMO_SIZES.split(","))  # the demo set's shorter sides
_COMBOS = tuple((c, k) for c in syn.COLORS for k in syn.SHAPES)
_GLYPHS_ALL = tuple(w.upper() for w in syn.WORDS) + syn.LETTERS


def patch_labels(objects, box, grid: int, every_cell: bool = False) -> np.ndarray:
    """int32[2, grid * grid] labels of an image's (or a crop's) patch cells, for the
    patch-label loss: row 0, 1 + the index (in _GLYPHS_ALL) of the glyph whose box centre
    lies in the cell; row 1, 1 + the index (in _COMBOS) of the shape whose box centre lies in
    the cell; 0 elsewhere. With `every_cell`, also every cell whose own centre lies inside
    the glyph's (row 0) or the shape's (row 1) box, so that each patch of a large subject
    carries its labels, not only the one at its centre. `box` is the crop's [x1, y1, x2, y2]
    in the image (the whole image for the image itself); cells follow the processor's
    squash of the box to a square."""
    x1, y1, x2, y2 = box
    sx, sy = (x2 - x1) / grid, (y2 - y1) / grid
    centres_x = x1 + (np.arange(grid) + 0.5) * sx  # image x of each column's centre
    centres_y = y1 + (np.arange(grid) + 0.5) * sy
    out = np.zeros((2, grid, grid), np.int32)
    for o in objects:
        for row, key, label in (
            (0, "text_bbox", 1 + _GLYPHS_ALL.index(o["text"].upper())),
            (1, "bbox", 1 + _COMBOS.index((o["color"], o["shape"]))),
        ):
            bx1, by1, bx2, by2 = o[key]
            if every_cell:
                cols = (bx1 <= centres_x) & (centres_x < bx2)
                rows = (by1 <= centres_y) & (centres_y < by2)
                out[row][np.ix_(rows, cols)] = label
            cx, cy = (bx1 + bx2) / 2, (by1 + by2) / 2
            if x1 <= cx < x2 and y1 <= cy < y2:
                c = int((cx - x1) * grid / (x2 - x1))
                r = int((cy - y1) * grid / (y2 - y1))
                out[row, r, c] = label
    return out.reshape(2, -1)


# ---------------------------------------------------------------------------------------
# Loss and train step.


def answer_loss(logits, input_ids, loss_mask):
    """Mean cross-entropy over answer tokens, and per-row exact match of those tokens.

    logits float[B, S, V]; input_ids int[B, S]; loss_mask float[B, S] (see `pack`).
    """

    logits, targets, w = logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
    wrong = (jnp.argmax(logits, -1) != targets) & (w > 0)
    return loss, ~jnp.any(wrong, axis=-1), jax.lax.stop_gradient(ce)


def _query_rows(probs, loss_mask=None):
    """float32[B, K]: the attention (heads averaged) of each row's query that predicts its
    first answer token (the prompt's last; the last position without a loss_mask)."""
    if loss_mask is None:
        return probs.mean(1)[:, -1]
    query = jnp.argmax(loss_mask > 0, axis=1) - 1  # [B]
    return jnp.take_along_axis(probs.mean(1), query[:, None, None], axis=1)[:, 0]


def _answer_rows(probs, input_ids, loss_mask, cells, image_token: int):
    """(rows float32[B, K], first bool[B, K], on float32[B, K]): the attention (heads
    averaged) of the query that predicts the first answer token (the prompt's last), which
    positions hold the first image's tokens, and per-cell weights `cells` [B, T] spread onto
    those positions (0 elsewhere)."""
    rows = _query_rows(probs, loss_mask)
    is_img = input_ids == image_token
    t = cells.shape[1]
    first = is_img & (jnp.cumsum(is_img, axis=1) <= t)
    cell = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, t - 1)
    return rows, first, jnp.take_along_axis(cells, cell, axis=1) * first


def subject_attention(probs, input_ids, loss_mask, subject_cells, image_token: int):
    """Share of the image attention that falls on the subject's cells, per row.

    probs: float32[B, N, S, K] one layer's attention; the query is the position that predicts
    the first answer token (the prompt's last), the share is over the first image's tokens.
    subject_cells: float32[B, T] (see `subject_cells`). Returns float32[B].
    """
    rows, first, on_subject = _answer_rows(probs, input_ids, loss_mask, subject_cells,
                                           image_token)  # fmt: skip
    return jnp.sum(rows * on_subject, -1) / jnp.maximum(jnp.sum(rows * first, -1), 1e-9)


def target_cross_entropy(probs, input_ids, loss_mask, target_cells, image_token: int):
    """-sum_cells target * log(image attention), per row: the answer query's attention over
    the first image's tokens (renormalised) against a target distribution over its cells
    (float32[B, T], rows summing to 1, see `centre_target`). Minimal when they are equal."""
    rows, first, target = _answer_rows(probs, input_ids, loss_mask, target_cells, image_token)
    att = rows / jnp.maximum(jnp.sum(rows * first, -1, keepdims=True), 1e-9)
    return -jnp.sum(target * jnp.log(att + 1e-6), -1)


def peak_margin_loss(probs, input_ids, loss_mask, subject_cells, image_token: int,
                     margin: float = 0.5, temperature: float = 0.1):  # fmt: skip
    """softplus(smax(log attention off the subject) - smax(log attention on it) + margin), per
    row, over the first image's cells of the answer query (heads averaged); smax is a soft
    maximum (temperature * logsumexp(x / temperature)). Near 0 once the subject holds the
    map's highest cell by the margin: the box search's window follows that peak, and a
    large subject can hold a third of the mass spread thin while one small letter elsewhere
    holds the peak (BUILD_NOTES). Also returns whether the hard peak is on the subject."""
    rows, first, on = _answer_rows(probs, input_ids, loss_mask, subject_cells, image_token)
    return _soft_peak_margin(jnp.log(rows + 1e-9), on > 0, first & (on <= 0), margin,
                             temperature)  # fmt: skip


def _soft_peak_margin(values, on, off, margin: float, temperature: float):
    """(softplus(smax(values off) - smax(values on) + margin), whether the hard maximum is on)
    per row, over the last axis; smax is temperature * logsumexp(x / temperature)."""
    inside, outside = jnp.where(on, values, -1e9), jnp.where(off, values, -1e9)
    smax = lambda x: temperature * jax.nn.logsumexp(x / temperature, axis=-1)
    hit = jnp.max(inside, -1) >= jnp.max(outside, -1)
    return jax.nn.softplus(smax(outside) - smax(inside) + margin), hit


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


def ratio_peak_loss(question_att, general_att, subject_cells, margin: float = 0.5,
                    temperature: float = 0.1):  # fmt: skip
    """`peak_margin_loss` on rel-att's map itself, per row: log(question / general) over the
    image's T cells (both [B, T], each summing to 1), the soft maximum on the subject's cells
    against the soft maximum elsewhere. Also returns whether the hard peak is on the subject."""
    logr = jnp.log(question_att + 1e-9) - jnp.log(general_att + 1e-9)
    on = subject_cells > 0
    return _soft_peak_margin(logr, on, ~on, margin, temperature)


def general_uniformity_loss(att):
    """KL(uniform || att) over the image tokens, per row: 0 when the general prompt looks at
    every patch alike, so rel-att's ratio (question / general) keeps the question's peak."""
    t = att.shape[-1]
    return -jnp.mean(jnp.log(att + 1e-6), axis=-1) - jnp.log(t)


def init_aux(key, dim: int) -> dict:
    """The patch-label heads (training only, never exported): linear maps from the projected
    image features (width `dim`) to glyph and colour+shape logits."""
    k1, k2 = jax.random.split(key)
    head = lambda k, n: {"kernel": jax.random.normal(k, (dim, n), jnp.float32) * dim**-0.5,
                         "bias": jnp.zeros((n,), jnp.float32)}  # fmt: skip
    return {"glyph": head(k1, 1 + len(_GLYPHS_ALL)), "combo": head(k2, 1 + len(_COMBOS))}


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
            hit = (jnp.argmax(logits, -1) == y) & (y > 0)
            acc = jnp.sum(hit) / jnp.maximum(jnp.sum(y > 0), 1)
    return total / 2, acc


def loss_fn(module, params, batch, att_weight: float = 0.0, att_layer: int = 0,
            aux=None, patch_weight: float = 0.0, general_weight: float = 0.0,
            peak_weight: float = 0.0, peak_margin: float = 0.5,
            pair_weight: float = 0.0, ratio_weight: float = 0.0,
            answer_att_weight: float = 0.0):  # fmt: skip
    """Both prompt kinds of a batch; the vision tower runs once per image.

    With att_weight > 0, adds att_weight * -log(subject share of the attention) of the single
    prompts at LM layer att_layer (see `subject_attention`); the share is logged either way.
    When the batch holds target_cells (attention_target "centre"), the attention term is
    instead att_weight * the cross-entropy against that target (`target_cross_entropy`).
    With general_weight > 0 (the batch then holds general_* rows: the general-description
    prompt on each image), adds general_weight * KL(uniform || that prompt's attention over
    the image at att_layer) (see `general_uniformity_loss`). With peak_weight > 0, adds
    peak_weight * `peak_margin_loss` of the single prompts at att_layer. With pair_weight > 0
    (the batch then holds pair_cells [B, 2T], see `pair_cells`), adds pair_weight *
    -log(share of the pair prompts' answer attention on those cells) at att_layer. When the
    batch holds att_row_weight [B] (`attention_buckets`), the attention term (share or
    target) is averaged over the rows it weighs. With ratio_weight > 0 (general_* rows in the
    batch), adds ratio_weight * `ratio_peak_loss` at att_layer. When the batch holds
    contrast_* rows (`contrast_questions`: k questions per image about its other shapes),
    their answer loss counts as the single prompts' does; pair_contrast_* rows
    (`pair_contrast_questions`: one more question per [image, crop]) likewise, on the pair
    prompts' image features. With answer_att_weight > 0, adds
    answer_att_weight * the mean over the other decoder layers of -log(subject share) of
    the single prompts (as at att_layer, see `subject_attention`).
    """
    apply = functools.partial(module.apply, {"params": params})
    feats, _ = apply(batch["pixel_values"], method=lambda m, p: m.image_features(p))  # [2B, T, D]
    b = batch["single_input_ids"].shape[0]
    pair_feats = jnp.stack([feats[:b], feats[b:]], axis=1).reshape(2 * b, *feats.shape[1:])
    metrics = {}
    total = 0.0
    if aux is not None:
        p_loss, p_acc = patch_loss(aux, feats, batch["patch_labels"])
        metrics["loss_patch"], metrics["acc_patch_glyph"] = p_loss, p_acc
        total = total + patch_weight * p_loss
    for name, f in (("single", feats[:b]), ("pair", pair_feats)):
        ids, lmask = batch[f"{name}_input_ids"], batch[f"{name}_loss_mask"]
        full = name == "single"
        out = apply(ids, None, batch[f"{name}_attention_mask"], image_features=f,
                    output_full_attentions=full or bool(pair_weight))  # fmt: skip
        loss, correct, _ = answer_loss(out.logits, ids, lmask)
        total = total + loss / 2
        metrics[f"loss_{name}"] = loss
        metrics[f"correct_{name}"] = correct
        if name == "pair" and pair_weight:
            # _answer_rows spreads cells over as many image tokens as they have: both images'.
            share = subject_attention(
                out.full_attentions[att_layer], ids, lmask, batch["pair_cells"],
                module.config.image_token_index,
            )  # fmt: skip
            metrics["att_subject_pair"] = jnp.mean(share)
            total = total + pair_weight * jnp.mean(-jnp.log(share + 1e-6))
        if full:
            single_probs = out.full_attentions[att_layer]
            share = subject_attention(
                single_probs, ids, lmask, batch["subject_cells"],
                module.config.image_token_index,
            )  # fmt: skip
            metrics["att_subject"] = jnp.mean(share)
            others = [i for i in range(len(out.full_attentions)) if i != att_layer]
            if answer_att_weight and others:
                shares = jnp.stack(
                    [
                        subject_attention(
                            out.full_attentions[i],
                            ids,
                            lmask,
                            batch["subject_cells"],
                            module.config.image_token_index,
                        )
                        for i in others
                    ]
                )  # [L-1, B]
                metrics["att_subject_others"] = jnp.mean(shares)
                losses = jnp.stack([_row_mean(-jnp.log(x + 1e-6), batch) for x in shares])
                total = total + answer_att_weight * jnp.mean(losses)
            if peak_weight:
                peak, hit = peak_margin_loss(
                    single_probs, ids, lmask, batch["subject_cells"],
                    module.config.image_token_index, peak_margin,
                )  # fmt: skip
                metrics["peak_on_subject"] = hit
                metrics["loss_peak"] = jnp.mean(peak)
                total = total + peak_weight * jnp.mean(peak)
            if att_weight and "target_cells" in batch:
                ce = target_cross_entropy(
                    single_probs, ids, lmask, batch["target_cells"],
                    module.config.image_token_index,
                )  # fmt: skip
                metrics["loss_att_target"] = jnp.mean(ce)
                total = total + att_weight * _row_mean(ce, batch)
            elif att_weight:
                total = total + att_weight * _row_mean(-jnp.log(share + 1e-6), batch)

    def question_rows(name, image_features):
        """Answer loss of the batch's extra question rows `name`_*, logged as loss_/acc_name."""
        ids = batch[f"{name}_input_ids"]
        out = apply(ids, None, batch[f"{name}_attention_mask"], image_features=image_features)
        loss, correct, _ = answer_loss(out.logits, ids, batch[f"{name}_loss_mask"])
        metrics[f"loss_{name}"], metrics[f"acc_{name}"] = loss, jnp.mean(correct)
        return loss / 2

    if "contrast_input_ids" in batch:  # k rows per image, item-major (Data.batch)
        k = batch["contrast_input_ids"].shape[0] // b
        total = total + question_rows("contrast", jnp.repeat(feats[:b], k, axis=0))
    if "pair_contrast_input_ids" in batch:  # one row per item, on the item's [image, crop]
        total = total + question_rows("pair_contrast", pair_feats)
    if general_weight or ratio_weight:
        ids = batch["general_input_ids"]
        out = apply(ids, None, batch["general_attention_mask"], image_features=feats[:b],
                    output_full_attentions=True)  # fmt: skip
        att = image_attention(out.full_attentions[att_layer], ids,
                              module.config.image_token_index, feats.shape[1])  # fmt: skip
        g_loss = jnp.mean(general_uniformity_loss(att))
        metrics["loss_general"] = g_loss
        metrics["att_subject_general"] = jnp.mean(jnp.sum(att * batch["subject_cells"], -1))
        total = total + general_weight * g_loss
        if ratio_weight:
            q = image_attention(single_probs, batch["single_input_ids"],
                                module.config.image_token_index, feats.shape[1],
                                batch["single_loss_mask"])  # fmt: skip
            r_loss, hit = ratio_peak_loss(q, att, batch["subject_cells"], peak_margin)
            metrics["loss_ratio_peak"], metrics["ratio_peak_on_subject"] = jnp.mean(r_loss), hit
            total = total + ratio_weight * jnp.mean(r_loss)
    return total, metrics


def _row_mean(x, batch):
    """Mean of a per-row loss [B], over the rows batch["att_row_weight"] keeps when given."""
    if "att_row_weight" not in batch:
        return jnp.mean(x)
    w = batch["att_row_weight"]
    return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1.0)


def make_optimizer(settings: Settings):
    """AdamW (decay on matrices only) after global-norm clipping; warmup + cosine to 5%."""
    lr, warmup, steps = settings.learning_rate, max(1, settings.warmup_steps), settings.steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.05
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(settings.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=settings.weight_decay,
                    mask=decay_mask),
    )  # fmt: skip
    if settings.freeze:
        frozen = set(settings.freeze)

        def labels(trainable):
            out = {"aux": jax.tree.map(lambda _: "train", trainable["aux"])}
            out["params"] = {
                k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "train", v)
                for k, v in trainable["params"].items()
            }
            return out

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def _update(tx, state, loss):
    """One optimizer step on {"params", "aux"}: loss(trainable) -> (value, extras).
    Returns (new state, value, extras, gradient norm of the model params)."""
    trainable = {"params": state["params"], "aux": state["aux"]}
    (value, extras), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new = optax.apply_updates(trainable, updates)
    state = {**new, "opt_state": opt_state, "step": state["step"] + 1}
    return state, value, extras, optax.tree.norm(grads["params"])


def make_train_step(module, tx, att_weight: float = 0.0, att_layer: int = 0,
                    patch_weight: float = 0.0, general_weight: float = 0.0,
                    peak_weight: float = 0.0, peak_margin: float = 0.5,
                    pair_weight: float = 0.0, ratio_weight: float = 0.0,
                    answer_att_weight: float = 0.0):  # fmt: skip
    """A jitted (state, batch) -> (state, metrics); state = {params, aux, opt_state, step}
    (aux: the patch-label heads; the optimizer updates {"params", "aux"})."""

    def step(state, batch):
        def f(trainable):
            return loss_fn(module, trainable["params"], batch, att_weight, att_layer,
                           trainable["aux"], patch_weight, general_weight, peak_weight,
                           peak_margin, pair_weight, ratio_weight,
                           answer_att_weight)  # fmt: skip

        state, loss, metrics, grad_norm = _update(tx, state, f)
        return state, {**metrics, "loss": loss, "grad_norm": grad_norm}

    return jax.jit(step, donate_argnums=0)


def make_pretrain_step(module, tx):
    """A jitted (state, batch) -> (state, metrics) on the patch-label loss alone: the vision
    tower, projector and heads learn to tell glyphs and shapes apart (the stage LLaVA gets
    from a pretrained CLIP); the same optimizer, so its moments carry over."""

    def step(state, batch):
        def f(trainable):
            apply = functools.partial(module.apply, {"params": trainable["params"]})
            feats, _ = apply(batch["pixel_values"], method=lambda m, p: m.image_features(p))
            return patch_loss(trainable["aux"], feats, batch["patch_labels"])

        state, loss, acc, grad_norm = _update(tx, state, f)
        return state, {"loss_patch": loss, "acc_patch_glyph": acc, "grad_norm": grad_norm}

    return jax.jit(step, donate_argnums=0)


def compiled_step(config: LlavaConfig, settings: Settings):
    """(train step, optimizer, schedule); runs in one process with the same model and
    optimizer settings (a resumed run, tests) share one compiled step."""
    return _compiled(config, _step_settings(settings))


def _step_settings(settings: Settings) -> Settings:
    """Only the fields a compiled step depends on (the cache key)."""
    opt = {k: getattr(settings, k) for k in _STEP_FIELDS}
    return dataclasses.replace(Settings(workdir=""), **opt)


_STEP_FIELDS = ("learning_rate", "warmup_steps", "weight_decay", "grad_clip", "steps",
                "attention_loss_weight", "patch_loss_weight", "general_loss_weight",
                "peak_loss_weight", "peak_margin", "pair_attention_weight",
                "ratio_peak_weight", "answer_attention_weight", "freeze")  # fmt: skip


@functools.cache
def _compiled(config: LlavaConfig, opt_settings: Settings):
    tx, schedule = make_optimizer(opt_settings)
    layer = default_layer("llava", config.text_config.num_hidden_layers)
    step = make_train_step(module_for(config), tx, opt_settings.attention_loss_weight, layer,
                           opt_settings.patch_loss_weight,
                           opt_settings.general_loss_weight, opt_settings.peak_loss_weight,
                           opt_settings.peak_margin,
                           opt_settings.pair_attention_weight,
                           opt_settings.ratio_peak_weight,
                           opt_settings.answer_attention_weight)  # fmt: skip
    return step, tx, schedule


@functools.cache
def _compiled_pretrain(config: LlavaConfig, opt_settings: Settings):
    return make_pretrain_step(module_for(config), _compiled(config, opt_settings)[1])


def compiled_pretrain_step(config: LlavaConfig, settings: Settings):
    """The pretraining step, shared like `compiled_step`'s (same optimizer object)."""
    return _compiled_pretrain(config, _step_settings(settings))


# ---------------------------------------------------------------------------------------
# Held-out evaluation.


def _bucket_means(values: dict[str, list[float]]) -> dict[str, float]:
    out = {b: round(float(sum(v) / len(v)), 4) for b, v in values.items() if v}
    every = [x for v in values.values() for x in v]
    out["all"] = round(float(sum(every) / max(1, len(every))), 4)
    return out


def _in_box(cell, bbox, size, grid: int) -> bool:
    """Whether map cell (row, col) touches the subject's cells or their 8 neighbours."""
    rows, cols = _cell_span(bbox, size, grid)
    return rows[0] - 1 <= cell[0] <= rows[1] and cols[0] - 1 <= cell[1] <= cols[1]


def evaluate(model, params, settings: Settings) -> dict[str, Any]:
    """Exact-match accuracy by size bucket on held-out items, through the shipped pipeline.

    full: the baseline answer from the image alone; rel_att: ViCrop's answer with the rel-att
    box (vicrop_jax.pipeline.ask_batch); gt_crop: the answer with [image, gt_crop];
    map_hit: the rel-att map's peak cell lies on the subject (one cell of slack);
    box_hit: the rel-att box contains the subject's centre.
    """

    base, grid, n = settings.dims.image_size, settings.dims.grid, settings.eval_items
    keys = ("full", "rel_att", "gt_crop", "map_hit", "box_hit")
    scores = {k: collections.defaultdict(list) for k in keys}
    eb = settings.eval_batch
    for start in range(0, n, eb):
        idx = list(range(start, min(n, start + eb)))
        idx += [idx[-1]] * (eb - len(idx))  # a full batch: one compile for the whole eval
        opts = settings.synth_options()
        if settings.eval_sizes:
            opts["sizes"] = settings.eval_sizes
        items = [syn.generate_item(settings.seed, i, split=_EVAL_SPLIT, **opts) for i in idx]
        images = [im for im, _ in items]
        recs = [r for _, r in items]
        answers = pipeline.ask_batch(model, images, [r["question"] for r in recs],
                                     method="rel_att", max_new_tokens=3, params=params)  # fmt: skip
        pairs = []
        for im, r in items:
            pairs += [im, im.crop(gt_crop(r["bbox"], im.size, base))]
        prompts = [llava_prompt(r["question"], 2) for r in recs]
        gt_answers = pipeline.generate_answers(model, prompts, pairs, 3, params)
        seen = set()
        for i, a, g, r in zip(idx, answers, gt_answers, recs, strict=True):
            if i in seen:
                continue
            seen.add(i)
            bucket, truth = r["size_bucket"], r["answer"]
            peak = np.unravel_index(int(np.argmax(a.att_map)), a.att_map.shape)
            x1, y1, x2, y2 = r["bbox"]
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            bx1, by1, bx2, by2 = a.bbox
            scores["full"][bucket].append(a.original_answer.strip().lower() == truth)
            scores["rel_att"][bucket].append(a.crop_answer.strip().lower() == truth)
            scores["gt_crop"][bucket].append(g.strip().lower() == truth)
            scores["map_hit"][bucket].append(_in_box(peak, r["bbox"], r["image_size"], grid))
            scores["box_hit"][bucket].append(bx1 <= cx < bx2 and by1 <= cy < by2)
    out = {k: _bucket_means(v) for k, v in scores.items()}
    out["n"] = {b: len(v) for b, v in scores["full"].items()}
    return out


# ---------------------------------------------------------------------------------------
# Checkpoints and export.


def checkpoint_manager(workdir: str):
    # Synchronous saves: the train step donates the state's buffers.
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=options)  # fmt: skip


@functools.cache
def _init_fn(config: LlavaConfig):
    """convert.llava.init_params's init, jitted once per config (it compiles on every call)."""
    v = config.vision_config
    ids = jnp.full((1, config.num_image_tokens + 1), config.image_token_index, jnp.int32)
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return jax.jit(lambda key: module_for(config).init(key, ids, pixels)["params"])


def fresh_aux(config, settings: Settings) -> dict:
    """The run's freshly initialised patch-label heads (seeded from settings.seed)."""
    return init_aux(jax.random.key(settings.seed + 1), config.text_config.hidden_size)


def init_state(config, settings: Settings, tx):
    """Fresh state: random params (seeded), optimizer state, step 0."""
    params = _init_fn(config)(jax.random.key(settings.seed))
    aux = fresh_aux(config, settings)
    return {"params": params, "aux": aux, "opt_state": tx.init({"params": params, "aux": aux}),
            "step": jnp.zeros((), jnp.int32)}  # fmt: skip


def abstract_state(config, tx):
    """The state's shapes and dtypes, without computing it (what a restore needs)."""
    params = abstract_params(config, jnp.float32)
    aux = jax.eval_shape(lambda: init_aux(jax.random.key(0), config.text_config.hidden_size))
    step = jax.ShapeDtypeStruct((), jnp.int32)
    opt_state = jax.eval_shape(tx.init, {"params": params, "aux": aux})
    return {"params": params, "aux": aux, "opt_state": opt_state, "step": step}


def restore_latest(manager, like):
    """The latest checkpointed state shaped like `like` (ShapeDtypeStructs), or None."""
    step = manager.latest_step()
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.StandardRestore(like))


def save_state(manager, state) -> None:
    step = int(state["step"])
    if manager.latest_step() != step:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()


def export(params, hf_cfg: dict, processor, out_dir: str) -> str:
    """Writes config.json, model.safetensors (float32) and the tokenizer/processor files."""
    save_safetensors(export_params(params), out_dir, hf_cfg)
    os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)  # safetensors writes 0600
    processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------
# The loop.


class _Log:
    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _check_identity(settings: Settings) -> None:
    """Writes settings.json, or refuses a workdir that holds a different run."""
    path = os.path.join(settings.workdir, "settings.json")
    want = settings.identity()
    if os.path.isfile(path):
        with open(path) as f:
            have = json.load(f)
        if have != json.loads(json.dumps(want)):
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{settings.workdir} holds another run (differs in {diff}); "
                             "use a new --workdir")  # fmt: skip
        return
    with open(path, "w") as f:
        json.dump(want, f, indent=1)


def setup(settings: Settings):
    """(processor, LlavaConfig, hf config dict) of a run; writes workdir/processor."""
    os.makedirs(settings.workdir, exist_ok=True)
    _check_identity(settings)
    processor = build_processor(os.path.join(settings.workdir, "processor"), settings.dims)
    hf_cfg = hf_config(settings.dims, processor.tokenizer)
    return processor, LlavaConfig.from_dict(hf_cfg), hf_cfg


def train(settings: Settings) -> dict:
    """Trains (resuming from the latest checkpoint), evaluates, exports; returns the state."""
    processor, config, hf_cfg = setup(settings)
    train_step, tx, schedule = compiled_step(config, settings)
    pretrain_step = compiled_pretrain_step(config, settings) if settings.pretrain_steps else None
    pre = settings.pretrain_steps
    manager = checkpoint_manager(settings.workdir)
    state = restore_latest(manager, abstract_state(config, tx))
    if state is None and settings.init_from:
        state = init_from_run(settings, config, tx)
    state = init_state(config, settings, tx) if state is None else state
    start = int(state["step"])
    stop = min(settings.steps, settings.stop_at or settings.steps)
    log = _Log(os.path.join(settings.workdir, "log.jsonl"))
    model = Model(config=config, params=None, processor=processor, hf_config=hf_cfg)
    own = {}
    if settings.own_crop_fraction:
        if start and not os.path.isfile(os.path.join(settings.workdir, "own_crops.json")):
            raise FileNotFoundError(f"{settings.workdir}/own_crops.json: the boxes this run "
                                    "started with are gone; start the run again")  # fmt: skip
        own = mine_own_crops(settings, dataclasses.replace(model, params=state["params"]))
    data = Data(settings, processor, own)

    def run_eval(step):
        t0 = time.perf_counter()
        res = evaluate(model, state["params"], settings)
        log.write({"kind": "eval", "step": step, **res, "seconds": time.perf_counter() - t0})
        tqdm.write(f"eval @ {step}: " + json.dumps({k: res[k] for k in ("full", "rel_att",
                                                                         "gt_crop")}))  # fmt: skip

    if start == 0 and settings.eval_every and stop > 0 and not pre:
        run_eval(0)
    window = collections.defaultdict(list)
    pool = concurrent.futures.ThreadPoolExecutor(1)  # renders the next batch during a step
    batch_fn = lambda i: data.pretrain_batch(i) if i < pre else data.batch(i)  # noqa: E731
    pending = pool.submit(batch_fn, start) if start < stop else None
    bar = tqdm(total=stop, initial=start, disable=not settings.progress, dynamic_ncols=True)
    t_last = time.perf_counter()
    for step in range(start, stop):
        batch = pending.result()
        if step + 1 < stop:
            pending = pool.submit(batch_fn, step + 1)
        if settings.embed_scale != 1.0 and step == pre:
            # The first question step (in the loop, so a run resumed at it scales once).
            b = settings.batch_size
            factor = embed_scale_for(
                module_for(config), state["params"], batch["pixel_values"][:b], settings.embed_scale
            )
            state = {**state, "params": scale_text_embeddings(state["params"], factor)}
            log.write({"kind": "embed_scale", "step": step, "factor": round(factor, 4)})
            tqdm.write(f"text embeddings x {factor:.3g} at step {step}")
        if step < pre:
            state, m = pretrain_step(state, batch)
            m = jax.device_get(m)
            for k in ("loss_patch", "acc_patch_glyph", "grad_norm"):
                window[k].append(float(m[k]))
            window["loss"].append(float(m["loss_patch"]))
            bar.update(1)
            bar.set_postfix(pretrain_loss=f"{np.mean(window['loss'][-50:]):.3f}",
                            glyph=f"{np.mean(window['acc_patch_glyph'][-50:]):.2f}")  # fmt: skip
        else:
            m = train_step(state, {k: v for k, v in batch.items() if k not in _LOG_ONLY})
            state, m = m[0], jax.device_get(m[1])
            _record(window, m, batch["bucket"], batch["crop_hit"])
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window['loss'][-50:]):.3f}",
                            acc1=f"{np.mean(window['acc_single'][-400:]):.2f}",
                            acc2=f"{np.mean(window['acc_pair'][-400:]):.2f}",
                            glyph=f"{np.mean(window['acc_patch_glyph'][-50:]):.2f}")  # fmt: skip
        done = step + 1
        if done % settings.log_every == 0 or done == stop or done == pre:
            now = time.perf_counter()
            rec = {k: round(float(np.mean(v)), 4) for k, v in window.items()}
            rec.update(kind="pretrain" if step < pre else "train", step=done,
                       lr=float(schedule(done)),
                       steps_per_s=round(len(window["loss"]) / (now - t_last), 4))  # fmt: skip
            log.write(rec)
            window.clear()
            t_last = now
        if done % settings.checkpoint_every == 0 or done == stop:
            save_state(manager, state)
        if (
            settings.eval_every
            and done > pre
            and (done % settings.eval_every == 0 or done == settings.steps)
        ):
            run_eval(done)
            t_last = time.perf_counter()  # steps_per_s counts training only
    bar.close()
    return _finish(settings, state, pool, manager, hf_cfg, processor)


def _record(window, m, buckets, crop_hit) -> None:
    """Adds one train step's metrics to the logging window (acc_pair_miss_<bucket>: the pair
    prompts whose crop does not hold the subject)."""
    window["loss"].append(float(m["loss"]))
    for name in ("single", "pair"):
        window[f"loss_{name}"].append(float(m[f"loss_{name}"]))
        for b, ok in zip(buckets, m[f"correct_{name}"], strict=True):
            window[f"acc_{name}_{_BUCKETS[b]}"].append(float(ok))
        window[f"acc_{name}"].extend(float(x) for x in m[f"correct_{name}"])
    for b, ok, hit in zip(buckets, m["correct_pair"], crop_hit, strict=True):
        if not hit:
            window[f"acc_pair_miss_{_BUCKETS[b]}"].append(float(ok))
    for k in (
        "grad_norm",
        "att_subject",
        "loss_att_target",
        "loss_patch",
        "acc_patch_glyph",
        "loss_general",
        "att_subject_general",
        "loss_peak",
        "att_subject_pair",
        "loss_ratio_peak",
        "loss_contrast",
        "acc_contrast",
        "loss_pair_contrast",
        "acc_pair_contrast",
        "att_subject_others",
    ):
        if k in m:
            window[k].append(float(m[k]))
    if "peak_on_subject" in m:  # per row: is the answer query's highest image cell on it
        for b, ok in zip(buckets, m["peak_on_subject"], strict=True):
            window[f"peak_subject_{_BUCKETS[b]}"].append(float(ok))
    if "ratio_peak_on_subject" in m:  # per row: is rel-att's map highest on the subject
        for b, ok in zip(buckets, m["ratio_peak_on_subject"], strict=True):
            window[f"ratio_peak_subject_{_BUCKETS[b]}"].append(float(ok))


def _finish(settings, state, pool, manager, hf_cfg, processor):
    pool.shutdown()
    if settings.export_dir and int(state["step"]) == settings.steps:
        export(state["params"], hf_cfg, processor, settings.export_dir)
    manager.close()
    return state


def scale_text_embeddings(params, factor: float):
    """params with the decoder's token embedding table multiplied by `factor` (the LM head
    is untied, so only the inputs change)."""
    lm = params["language_model"]
    table = {"embedding": lm["embed_tokens"]["embedding"] * factor}
    return {**params, "language_model": {**lm, "embed_tokens": table}}


def embed_scale_for(module, params, pixel_values, scale: float) -> float:
    """`scale`, or for 0 the ratio of the mean norm of these images' tokens (the projector's
    output) to the mean row norm of the text embedding table."""
    if scale:
        return scale
    feats, _ = module.apply({"params": params}, pixel_values,
                            method=lambda m, p: m.image_features(p))  # fmt: skip
    table = params["language_model"]["embed_tokens"]["embedding"]
    image = jnp.mean(jnp.linalg.norm(feats.astype(jnp.float32), axis=-1))
    return float(image / jnp.mean(jnp.linalg.norm(table.astype(jnp.float32), axis=-1)))


_CONFIG_DIMS = {
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "image_size", "patch_size"),
    "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads"),
}  # fmt: skip


def _config_dims(cfg: dict) -> dict:
    """The model-shape fields of a (dataclasses.asdict) LlavaConfig (what an export must
    share with the run)."""
    return {f"{part}.{k}": cfg.get(part, {}).get(k) for part, keys in _CONFIG_DIMS.items()
            for k in keys}  # fmt: skip


def _init_from_export(settings: Settings, config) -> tuple[dict, dict]:
    """(params, fresh patch-label heads) of an exported model (config.json +
    model.safetensors, e.g. vicrop_jax/assets/demo), read through the same converter as
    llava-1.5-7b-hf. The export carries no patch heads: they start afresh (seeded)."""
    src = settings.init_from
    have = _config_dims(dataclasses.asdict(LlavaConfig.from_dict(read_config(src))))
    want = _config_dims(dataclasses.asdict(config))
    if have != want:
        diff = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
        raise ValueError(f"--init_from={src} holds a model of other dims (its, ours): {diff}")
    return load_params(src, config, jnp.float32), fresh_aux(config, settings)


def init_from_run(settings: Settings, config, tx):
    """Step-0 state of a fine-tuning run, a fresh optimizer and the model of
    `settings.init_from` (same dims): either a training workdir (the params and patch-label
    heads of its latest checkpoint) or an exported HF directory (`_init_from_export`)."""
    src = settings.init_from
    path = os.path.join(src, "settings.json")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(src, "config.json")):
        params, aux = _init_from_export(settings, config)
        return _fine_tune_state(settings, config, tx, params, aux)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--init_from={src}: neither a training workdir (settings.json) nor an exported "
            "model (config.json)"
        )
    with open(path) as f:
        source = json.load(f)  # the source run's identity
    dims = source["dims"]
    if dims != dataclasses.asdict(settings.dims):
        raise ValueError(f"--init_from={src} holds a model of other dims: {dims}")
    manager = checkpoint_manager(src)
    # Restored with the source run's own optimizer structure (a --freeze run's differs).
    src_tx, _ = make_optimizer(
        dataclasses.replace(settings, freeze=tuple(source.get("freeze", ())))
    )
    state = restore_latest(manager, abstract_state(config, src_tx))
    manager.close()
    if state is None:
        raise FileNotFoundError(f"--init_from={src}: no checkpoint under {src}/checkpoints")
    return _fine_tune_state(settings, config, tx, state["params"], state["aux"])


def _fine_tune_state(settings: Settings, config, tx, params, aux) -> dict:
    """Step-0 state from given params and heads: --reinit subtrees afresh, a new optimizer."""
    if settings.reinit:
        fresh = _init_fn(config)(jax.random.key(settings.seed))
        params = {**params, **{k: fresh[k] for k in settings.reinit}}
    trainable = {"params": params, "aux": aux}
    return {**trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}


def _latest(settings: Settings):
    """(processor, LlavaConfig, hf config, state) of settings.workdir's latest checkpoint."""
    processor, config, hf_cfg = setup(settings)
    tx, _ = make_optimizer(settings)
    manager = checkpoint_manager(settings.workdir)
    state = restore_latest(manager, abstract_state(config, tx))
    manager.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoint under {settings.workdir}/checkpoints")
    return processor, config, hf_cfg, state


def export_latest(settings: Settings) -> str:
    """Exports the latest checkpoint of settings.workdir to settings.export_dir."""
    processor, _, hf_cfg, state = _latest(settings)
    return export(state["params"], hf_cfg, processor, settings.export_dir)


def object_hits(feats, aux, rec, size, grid: int):
    """((role, bucket, "glyph" | "combo"), hit) for each object of a synthetic record: does
    the patch head's mean logit over the object's cells (best non-background class) name it?
    feats float[grid * grid, D] of the image; aux the patch heads (numpy)."""
    for k, obj in enumerate(rec["objects"]):
        role = "subject" if k == rec["subject_index"] else "distractor"
        bucket = syn.size_bucket((obj["bbox"][2] - obj["bbox"][0]) / min(size))
        labels = patch_labels([obj], (0, 0, *size), grid, every_cell=True)
        for row, name in enumerate(("glyph", "combo")):
            cells = np.nonzero(labels[row])[0]
            if len(cells):
                logits = feats[cells] @ aux[name]["kernel"] + aux[name]["bias"]
                guess = 1 + int(np.argmax(logits.mean(0)[1:]))
                yield (role, bucket, name), bool(guess == labels[row, cells[0]])


def probe_features(settings: Settings, n_items: int, sizes: Sequence[int] | None = None,
                   chunk: int = 32) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """How well the latest checkpoint's image features name each object, by its size bucket.

    On the first `n_items` questions of the demo's held-out set (seed 1, split "test", image
    sizes `sizes`, default the demo's vicrop_jax.demo.SIZES), the training-only patch heads'
    logits are averaged over an object's cells (those `patch_labels(every_cell=True)` gives
    it) and the best non-background class is taken:
    "glyph" over the glyph's cells, "combo" (colour + shape) over the shape's. Returns
    {"subject" | "distractor": {bucket: {"glyph", "combo": accuracy, "n": objects}}}. It
    separates what the vision tower knows from what the decoder does with it.
    """
    sizes = _DEMO_SIDES if sizes is None else sizes
    processor, config, _, state = _latest(settings)
    module, grid = module_for(config), settings.dims.grid
    aux = jax.tree.map(np.asarray, state["aux"])
    features = jax.jit(lambda params, px: module.apply(
        {"params": params}, px, method=lambda m, p: m.image_features(p))[0])  # fmt: skip
    hits = collections.defaultdict(list)
    for start in range(0, n_items, chunk):
        items = [syn.generate_item(1, i, split="test", glyphs=settings.glyphs, sizes=sizes)
                 for i in range(start, min(n_items, start + chunk))]  # fmt: skip
        images = [im for im, _ in items]
        px = image_pixels(processor, images + images[-1:] * (chunk - len(images)))
        feats = np.asarray(features(state["params"], px))[: len(images)]
        for f, (image, rec) in zip(feats, items, strict=True):
            for key, hit in object_hits(f, aux, rec, image.size, grid):
                hits[key].append(hit)
    out: dict = {}
    for (role, bucket, name), v in sorted(hits.items()):
        row = out.setdefault(role, {}).setdefault(bucket, {})
        row[name] = round(float(np.mean(v)), 4)
        row["n"] = max(row.get("n", 0), len(v))
    return out


def question_probe_items(n_items: int, glyphs: str, sizes: Sequence[int] | None = None):
    """[(image, [(question, answer), ...])] for the first `n_items` demo questions (seed 1,
    split "test") whose image holds >= 2 shapes of side >= LARGE_MIN of its shorter side:
    one "What is written on the {color} {shape}?" per such shape."""
    sizes = _DEMO_SIDES if sizes is None else sizes
    out = []
    for i in range(n_items):
        image, rec = syn.generate_item(1, i, split="test", glyphs=glyphs, sizes=sizes)
        short = min(image.size)
        big = [o for o in rec["objects"] if o["bbox"][2] - o["bbox"][0] >= syn.LARGE_MIN * short]
        if len(big) >= 2:
            out.append((image, [(syn.TEXT_QUESTION.format(color=o["color"], shape=o["shape"]),
                                 o["text"].lower()) for o in big]))  # fmt: skip
    return out


def answer_agreement(answers: Sequence[Sequence[str]], truths: Sequence[Sequence[str]]):
    """{"images", "questions", "accuracy", "one_answer_images"}: per image, the answers to
    questions about its different shapes and their true answers; "one_answer_images" is the
    share of images where all answers are the same (a model that ignores which shape the
    question names)."""
    flat = [(a.strip().lower(), t) for aa, tt in zip(answers, truths, strict=True)
            for a, t in zip(aa, tt, strict=True)]  # fmt: skip
    same = [len({a.strip().lower() for a in aa}) == 1 for aa in answers]
    return {"images": len(answers), "questions": len(flat),
            "accuracy": round(float(np.mean([a == t for a, t in flat])), 4) if flat else 0.0,
            "one_answer_images": round(float(np.mean(same)), 4) if same else 0.0}  # fmt: skip


def probe_questions(settings: Settings, n_items: int, chunk: int = 32) -> dict[str, Any]:
    """`answer_agreement` of the latest checkpoint on `question_probe_items(n_items)`,
    answered through vicrop_jax.pipeline (greedy, no crop)."""
    processor, config, hf_cfg, state = _latest(settings)
    model = Model(config=config, params=state["params"], processor=processor, hf_config=hf_cfg)
    items = question_probe_items(n_items, settings.glyphs)
    texts = [llava_prompt(q, 1) for _, qa in items for q, _ in qa]
    images = [im for im, qa in items for _ in qa]
    flat: list[str] = []
    for at in range(0, len(texts), chunk):
        flat += pipeline.generate_answers(model, texts[at : at + chunk],
                                          images[at : at + chunk], 3)  # fmt: skip
    answers, at = [], 0
    for _, qa in items:
        answers.append(flat[at : at + len(qa)])
        at += len(qa)
    return answer_agreement(answers, [[a for _, a in qa] for _, qa in items])


SMOKE_DIMS = ModelDims(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2,
                       vision_heads=2, vision_mlp=64, text_hidden=48, text_layers=2,
                       text_heads=4, text_kv_heads=2, text_mlp=96)  # fmt: skip


def _pair(flag, kind):
    """A two-item list flag as (min, max) of `kind`, None when unset."""
    if not flag.value:
        return None
    if len(flag.value) != 2:
        raise app.UsageError(f"--{flag.name} takes min,max, got {','.join(flag.value)!r}")
    return tuple(kind(v) for v in flag.value)


def settings_from_flags() -> Settings:
    dims = ModelDims(
        image_size=_IMAGE_SIZE.value, patch_size=_PATCH.value, vision_hidden=_V_HIDDEN.value,
        vision_layers=_V_LAYERS.value, vision_heads=_V_HEADS.value, vision_mlp=_V_MLP.value,
        text_hidden=_T_HIDDEN.value, text_layers=_T_LAYERS.value, text_heads=_T_HEADS.value,
        text_kv_heads=_T_KV.value, text_mlp=_T_MLP.value,
    )  # fmt: skip
    s = Settings(
        workdir=_WORKDIR.value, dims=dims, export_dir=_EXPORT_DIR.value, seed=_SEED.value,
        steps=_STEPS.value, stop_at=_STOP_AT.value, batch_size=_BATCH.value,
        learning_rate=_LR.value, warmup_steps=_WARMUP.value, weight_decay=_WD.value,
        grad_clip=_CLIP.value, negative_fraction=_NEG.value, attention_loss_weight=_ATT_W.value,
        random_crop_fraction=_RAND_CROP.value, distractor_fraction=_DISTRACT.value,
        large_distractor_fraction=_DISTRACT_LARGE.value,
        large_partial_fraction=_PARTIAL_LARGE.value,
        own_crop_fraction=_OWN.value, patch_label_cells=_PATCH_CELLS.value,
        general_loss_weight=_GEN_W.value, attention_target=_ATT_TARGET.value,
        peak_loss_weight=_PEAK_W.value, peak_margin=_PEAK_MARGIN.value,
        pair_attention_weight=_PAIR_W.value, ratio_peak_weight=_RATIO_W.value,
        attention_buckets=tuple(_ATT_BUCKETS.value),
        init_from=_INIT_FROM.value, reinit=tuple(_REINIT.value), freeze=tuple(_FREEZE.value),
        eval_sizes=tuple(int(x) for x in _EVAL_SIZES.value),
        patch_loss_weight=_AUX_W.value, glyphs=_GLYPHS.value, pretrain_steps=_PRE_STEPS.value,
        pretrain_batch=_PRE_BATCH.value,
        color_question_fraction=_COLOR_Q.value, min_subject_px=_MIN_SUBJECT.value,
        max_aspect=_MAX_ASPECT.value, distinct_colors=_DISTINCT.value,
        contrast_questions=_CONTRAST.value, pair_contrast_questions=_PAIR_CONTRAST.value,
        embed_scale=_EMBED_SCALE.value,
        answer_attention_weight=_ANSWER_ATT.value,
        question_num_objects=_pair(_Q_OBJECTS, int),
        question_rel_range=_pair(_Q_REL, float), log_every=_LOG_EVERY.value,
        eval_every=_EVAL_EVERY.value,
        eval_items=_EVAL_ITEMS.value, checkpoint_every=_CKPT_EVERY.value,
    )  # fmt: skip
    if _SMOKE.value:
        s = dataclasses.replace(s, dims=SMOKE_DIMS, steps=4 + min(s.pretrain_steps, 2),
                                pretrain_steps=min(s.pretrain_steps, 2), pretrain_batch=4,
                                batch_size=2, warmup_steps=1,
                                log_every=2, eval_every=4, eval_items=4, eval_batch=4,
                                checkpoint_every=2)  # fmt: skip
    return s


def main(argv):
    """Intentionally short: settings from flags, then the library-style functions above."""
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    settings = settings_from_flags()
    if _EXPORT_ONLY.value:
        print(f"exported to {export_latest(settings)}")
        return
    if _PROBE.value:
        print(json.dumps(probe_features(settings, _PROBE.value), indent=1))
        return
    if _PROBE_Q.value:
        print(json.dumps(probe_questions(settings, _PROBE_Q.value), indent=1))
        return
    state = train(settings)
    print(f"finished at step {int(state['step'])}; log: {settings.workdir}/log.jsonl")


if __name__ == "__main__":
    app.run(main)
