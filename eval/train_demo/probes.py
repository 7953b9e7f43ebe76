"""Held-out measures of a run: the periodic eval through the shipped pipeline, and two
probes of the latest checkpoint (what the image features name; whether answers follow the
question)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from eval import synthetic as syn
from eval.demo import SIZES as DEMO_SIZES
from eval.train_demo import crops
from eval.train_demo.config import GLYPHS, TrainConfig
from eval.train_demo.losses import image_features
from eval.train_demo.state import latest
from vicrop_jax import pipeline
from vicrop_jax.loading import Model, module_for
from vicrop_jax.processing import image_pixels, llava_prompt

EVAL_SPLIT = "val"
DEMO_SIDES = tuple(int(x) for x in DEMO_SIZES.split(","))  # the demo set's shorter sides


def _bucket_means(values: dict[str, list[float]]) -> dict[str, float]:
    out = {b: round(float(sum(v) / len(v)), 4) for b, v in values.items() if v}
    every = [x for v in values.values() for x in v]
    out["all"] = round(float(sum(every) / max(1, len(every))), 4)
    return out


def _near_subject(cell, bbox, size, grid: int) -> bool:
    """Whether map cell (row, col) touches the subject's cells or their 8 neighbours."""
    rows, cols = crops.cell_span(bbox, size, grid)
    return rows[0] - 1 <= cell[0] <= rows[1] and cols[0] - 1 <= cell[1] <= cols[1]


def evaluate(model, params, cfg: TrainConfig) -> dict[str, Any]:
    """Exact-match accuracy by size bucket on held-out items, through the shipped pipeline.

    full: the baseline answer from the image alone; rel_att: ViCrop's answer with the rel-att
    box (vicrop_jax.pipeline.ask_batch); gt_crop: the answer with [image, gt_crop];
    map_hit: the rel-att map's peak cell lies on the subject (one cell of slack);
    box_hit: the rel-att box contains the subject's centre.
    """
    base, grid, n, batch = cfg.dims.image_size, cfg.dims.grid, cfg.eval_items, cfg.eval_batch
    keys = ("full", "rel_att", "gt_crop", "map_hit", "box_hit")
    scores = {k: collections.defaultdict(list) for k in keys}
    options = cfg.synth_options()
    if cfg.eval_sizes:
        options["sizes"] = cfg.eval_sizes
    for start in range(0, n, batch):
        indices = list(range(start, min(n, start + batch)))
        indices += [indices[-1]] * (batch - len(indices))  # a full batch: one compile
        items = [syn.generate_item(cfg.seed, i, split=EVAL_SPLIT, **options) for i in indices]
        recs = [r for _, r in items]
        answers = pipeline.ask_batch(model, [im for im, _ in items], [r["question"] for r in recs],
                                     method="rel_att", max_new_tokens=3, params=params)  # fmt: skip
        pairs = []
        for im, r in items:
            pairs += [im, im.crop(crops.gt_crop(r["bbox"], im.size, base))]
        prompts = [llava_prompt(r["question"], 2) for r in recs]
        gt_answers = pipeline.generate_answers(model, prompts, pairs, 3, params)
        seen = set()
        for i, a, g, r in zip(indices, answers, gt_answers, recs, strict=True):
            if i in seen:
                continue
            seen.add(i)
            bucket, truth = r["size_bucket"], r["answer"]
            peak = np.unravel_index(int(np.argmax(a.att_map)), a.att_map.shape)
            scores["full"][bucket].append(a.original_answer.strip().lower() == truth)
            scores["rel_att"][bucket].append(a.crop_answer.strip().lower() == truth)
            scores["gt_crop"][bucket].append(g.strip().lower() == truth)
            scores["map_hit"][bucket].append(_near_subject(peak, r["bbox"], r["image_size"], grid))
            scores["box_hit"][bucket].append(crops.contains_centre(a.bbox, r["bbox"]))
    out = {k: _bucket_means(v) for k, v in scores.items()}
    out["n"] = {b: len(v) for b, v in scores["full"].items()}
    return out


# ---------------------------------------------------------------------------------------
# What the image features name.


def object_hits(feats, aux, rec, size, grid: int):
    """((role, bucket, "glyph" | "combo"), named) for each object of a synthetic record: does
    the patch head's mean logit over the object's cells (best non-background class) name it?
    feats float[grid * grid, D] of the image; aux the patch heads (numpy)."""
    for k, obj in enumerate(rec["objects"]):
        role = "subject" if k == rec["subject_index"] else "distractor"
        bucket = syn.size_bucket((obj["bbox"][2] - obj["bbox"][0]) / min(size))
        labels = crops.patch_labels([obj], (0, 0, *size), grid, every_cell=True)
        for row, name in enumerate(("glyph", "combo")):
            cells = np.nonzero(labels[row])[0]
            if len(cells):
                logits = feats[cells] @ aux[name]["kernel"] + aux[name]["bias"]
                guess = 1 + int(np.argmax(logits.mean(0)[1:]))
                yield (role, bucket, name), bool(guess == labels[row, cells[0]])


def probe_features(cfg: TrainConfig, n_items: int, sizes: Sequence[int] | None = None,
                   chunk: int = 32) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """How well the latest checkpoint's image features name each object, by its size bucket.

    On the first `n_items` questions of the demo's held-out set (seed 1, split "test", image
    sizes `sizes`, default the demo's), the training-only patch heads' logits are averaged
    over an object's cells (those `patch_labels(every_cell=True)` gives it) and the best
    non-background class is taken: "glyph" over the glyph's cells, "combo" (colour + shape)
    over the shape's. Returns {"subject" | "distractor": {bucket: {"glyph", "combo":
    accuracy, "n": objects}}}. It separates what the vision tower knows from what the
    decoder does with it.
    """
    sizes = DEMO_SIDES if sizes is None else sizes
    processor, config, _, state = latest(cfg)
    module, grid = module_for(config), cfg.dims.grid
    aux = jax.tree.map(np.asarray, state["aux"])
    features = jax.jit(lambda params, px: image_features(module, params, px))
    named = collections.defaultdict(list)
    for start in range(0, n_items, chunk):
        items = [syn.generate_item(1, i, split="test", glyphs=GLYPHS, sizes=sizes)
                 for i in range(start, min(n_items, start + chunk))]  # fmt: skip
        images = [im for im, _ in items]
        px = image_pixels(processor, images + images[-1:] * (chunk - len(images)))
        feats = np.asarray(features(state["params"], px))[: len(images)]
        for f, (image, rec) in zip(feats, items, strict=True):
            for key, right in object_hits(f, aux, rec, image.size, grid):
                named[key].append(right)
    out: dict = {}
    for (role, bucket, name), v in sorted(named.items()):
        row = out.setdefault(role, {}).setdefault(bucket, {})
        row[name] = round(float(np.mean(v)), 4)
        row["n"] = max(row.get("n", 0), len(v))
    return out


# ---------------------------------------------------------------------------------------
# Whether answers follow the question.


def question_probe_items(n_items: int, sizes: Sequence[int] | None = None):
    """[(image, [(question, answer), ...])] for the first `n_items` demo questions (seed 1,
    split "test") whose image holds >= 2 shapes of side >= LARGE_MIN of its shorter side:
    one "What is written on the {color} {shape}?" per such shape."""
    sizes = DEMO_SIDES if sizes is None else sizes
    out = []
    for i in range(n_items):
        image, rec = syn.generate_item(1, i, split="test", glyphs=GLYPHS, sizes=sizes)
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


def probe_questions(cfg: TrainConfig, n_items: int, chunk: int = 32) -> dict[str, Any]:
    """`answer_agreement` of the latest checkpoint on `question_probe_items(n_items)`,
    answered through vicrop_jax.pipeline (greedy, no crop)."""
    processor, config, hf_cfg, state = latest(cfg)
    model = Model(config=config, params=state["params"], processor=processor, hf_config=hf_cfg)
    items = question_probe_items(n_items)
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
