"""Training items and batches: tokenizer and processor, the crop mix, packed prompt rows.

Item i of the stream is `eval.synthetic.generate_item(seed, i, split="train")` and its crop
is drawn from a generator seeded with (seed, i, 1); step s uses items [s * B, (s + 1) * B),
so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from eval import synthetic as syn
from eval.train_demo import crops
from eval.train_demo.config import ModelDims, TrainConfig
from vicrop_jax.processing import GENERAL_QUESTION, image_pixels, llava_prompt
from vicrop_jax.testing import build_tokenizer

IMAGE_TOKEN = "<image>"
SPLIT = "train"
BUCKETS = ("small", "medium", "large")
LOG_ONLY = ("bucket", "crop_has_subject")  # batch entries for the log, not the step


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
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=dims.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )  # fmt: skip
    processor.save_pretrained(out_dir)
    return processor


class Tokens:
    """Prompt and answer token ids, cached (the whole task has about a hundred prompts)."""

    def __init__(self, processor, num_image_tokens: int):
        self.tokenizer = processor.tokenizer
        self.num_image_tokens = num_image_tokens
        self.pad = self.tokenizer.pad_token_id
        self.eos = self.tokenizer.eos_token_id
        self._cache: dict[tuple[str, int], list[int]] = {}

    def prompt(self, question: str, n_images: int) -> list[int]:
        """The processor's ids for llava_prompt(question, n_images) (<image> expanded)."""
        key = (question, n_images)
        if key not in self._cache:
            expanded = IMAGE_TOKEN * self.num_image_tokens
            text = llava_prompt(question, n_images).replace(IMAGE_TOKEN, expanded)
            ids = self.tokenizer(text)["input_ids"]
            if self.tokenizer.unk_token_id in ids:
                raise ValueError(f"prompt {text!r} has words outside the tokenizer")
            self._cache[key] = ids
        return self._cache[key]

    def answer(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids or self.tokenizer.unk_token_id in ids:
            raise ValueError(f"answer {answer!r} is not in the tokenizer's vocabulary")
        return [*ids, self.eos]

    def about(self, obj: dict, n_images: int) -> tuple[list[int], list[int]]:
        """(prompt, answer) of the text question about object `obj` (its own letter)."""
        question = syn.TEXT_QUESTION.format(color=obj["color"], shape=obj["shape"])
        return self.prompt(question, n_images), self.answer(obj["text"].lower())

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
# Items.


class Item(NamedTuple):
    """One training item: its image, the [image, crop] prompt's crop and the crop's box."""

    image: Image.Image
    crop: Image.Image
    record: dict
    crop_has_subject: bool  # the crop holds the subject's centre
    box: crops.Box


def training_item(cfg: TrainConfig, index: int) -> Item:
    """Training item `index` and its crop: a miss (negative_fraction), a random box
    (random_crop_fraction), on large subjects another object (large_distractor_fraction) or
    a search-sized box cutting the subject's letter (large_partial_fraction); else, or when
    the drawn kind finds no box, a crop around the subject."""
    image, rec = syn.generate_item(cfg.seed, index, split=SPLIT, **cfg.synth_options())
    rng = np.random.default_rng([cfg.seed, index, 1])
    base, large = cfg.dims.image_size, rec["size_bucket"] == "large"
    box, has_subject = None, True
    u = rng.uniform()
    if u < cfg.negative_fraction:
        box = crops.miss_crop(rec["bbox"], image.size, base, rng)
        has_subject = box is None
    elif u < cfg.negative_fraction + cfg.random_crop_fraction:
        box = crops.random_crop(image.size, base, rng)
        has_subject = crops.contains_centre(box, rec["bbox"])
    elif large and u < (
        cfg.negative_fraction + cfg.random_crop_fraction + cfg.large_distractor_fraction
    ):
        other = crops.distractor(rec, rng)
        if other is not None:
            box = crops.subject_crop(other["bbox"], image.size, base, rng)
            has_subject = crops.contains_centre(box, rec["bbox"])
    elif large and u < (
        cfg.negative_fraction + cfg.random_crop_fraction + cfg.large_distractor_fraction
        + cfg.large_partial_fraction
    ):  # fmt: skip
        subject = rec["objects"][rec["subject_index"]]
        box = crops.partial_crop(subject["bbox"], subject["text_bbox"], image.size, base, rng)
        has_subject = box is None or crops.contains_centre(box, rec["bbox"])
    if box is None:
        box = crops.subject_crop(rec["bbox"], image.size, base, rng)
    return Item(image, image.crop(box), rec, has_subject, box)


# ---------------------------------------------------------------------------------------
# Batches.


class Data:
    """Deterministic training batches: step s -> items [s * B, (s + 1) * B) of the stream."""

    def __init__(self, cfg: TrainConfig, processor):
        self.cfg = cfg
        self.processor = processor
        self.tokens = Tokens(processor, cfg.dims.grid**2)
        self.len1 = self.tokens.max_length(1)
        self.len2 = self.tokens.max_length(2)

    def pixels(self, images) -> Any:
        """float32[I, R, R, 3] (NHWC) through the checkpoint's own image processor."""
        return image_pixels(self.processor, images)

    def item(self, index: int) -> Item:
        return training_item(self.cfg, index)

    def pretrain_batch(self, step: int) -> dict:
        """Pretraining step `step`: pixels [P] and patch labels [P, 2, T] of crowded images
        (split "pretrain", items [step * P, (step + 1) * P))."""
        cfg = self.cfg
        p, every_cell = cfg.pretrain_batch, cfg.patch_label_cells == "all"
        items = [syn.generate_item(cfg.seed, step * p + i, split="pretrain",
                                   **cfg.pretrain_options()) for i in range(p)]  # fmt: skip
        labels = [crops.patch_labels(r["objects"], (0, 0, *im.size), cfg.dims.grid, every_cell)
                  for im, r in items]  # fmt: skip
        return {"pixel_values": self.pixels([im for im, _ in items]),
                "patch_labels": np.stack(labels)}  # fmt: skip

    def batch(self, step: int) -> dict:
        """Arrays of one step: pixels [2B] (B images, then their crops), rows for the single
        and the pair prompts (and the extra rows the config asks for), each item's subject
        cells, size bucket and whether its crop holds the subject."""
        cfg, tokens, b, grid = self.cfg, self.tokens, self.cfg.batch_size, self.cfg.dims.grid
        items = [self.item(step * b + i) for i in range(b)]
        single = pack([(tokens.prompt(it.record["question"], 1), tokens.answer(it.record["answer"]))
                       for it in items], self.len1, tokens.pad)  # fmt: skip
        pair = pack([(tokens.prompt(it.record["question"], 2), tokens.answer(it.record["answer"]))
                     for it in items], self.len2, tokens.pad)  # fmt: skip
        out = {"pixel_values": self.pixels([it.image for it in items] + [it.crop for it in items])}
        boxes = [(0, 0, *it.image.size) for it in items] + [it.box for it in items]
        out["patch_labels"] = np.stack(
            [crops.patch_labels(it.record["objects"], box, grid, cfg.patch_label_cells == "all")
             for box, it in zip(boxes, items + items, strict=True)]
        )  # [2B, 2, T]  # fmt: skip
        out.update({f"single_{k}": v for k, v in single.items()})
        if cfg.general_loss_weight or cfg.ratio_peak_weight:
            general = pack([(tokens.prompt(GENERAL_QUESTION, 1), [])] * b, self.len1, tokens.pad)
            out["general_input_ids"] = general["input_ids"]
            out["general_attention_mask"] = general["attention_mask"]
        out.update({f"pair_{k}": v for k, v in pair.items()})
        if cfg.contrast_questions:
            rows = []
            for i, it in enumerate(items):
                rng = np.random.default_rng([cfg.seed, step * b + i, 3])
                others = crops.contrast_objects(it.record, cfg.contrast_questions, rng)
                rows += [tokens.about(o, 1) for o in others]
            contrast = pack(rows, self.len1, tokens.pad)  # [B * k]: item-major
            out.update({f"contrast_{k}": v for k, v in contrast.items()})
        if cfg.pair_contrast_questions:
            rngs = [np.random.default_rng([cfg.seed, step * b + i, 4]) for i in range(b)]
            rows = [tokens.about(crops.crop_object(it.record, it.box, rng), 2)
                    for it, rng in zip(items, rngs, strict=True)]  # fmt: skip
            packed = pack(rows, self.len2, tokens.pad)  # [B]
            out.update({f"pair_contrast_{k}": v for k, v in packed.items()})
        subjects = [(it.image.size, it.record["objects"][it.record["subject_index"]])
                    for it in items]  # fmt: skip
        out["subject_cells"] = np.stack(
            [crops.subject_cells(o["bbox"], size, grid).reshape(-1) for size, o in subjects]
        )
        if cfg.pair_attention_weight:
            out["pair_cells"] = np.stack(
                [crops.pair_cells(o, size, it.box, grid)
                 for (size, o), it in zip(subjects, items, strict=True)]
            )  # [B, 2T]  # fmt: skip
        out["bucket"] = np.array([BUCKETS.index(it.record["size_bucket"]) for it in items])
        out["crop_has_subject"] = np.array([it.crop_has_subject for it in items])
        return out
