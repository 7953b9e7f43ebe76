"""ViCrop end to end: baseline answer, importance map, box, crop, answer with [original, crop].

`ask(model, image, question)` for one question; `ask_batch` for many (each stage batched).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vicrop_jax import bbox as bbox_lib
from vicrop_jax import prefix as prefix_lib
from vicrop_jax.generate import answer_texts, greedy_generate, pad_id
from vicrop_jax.importance import importance, maps_for_images
from vicrop_jax.loading import Model
from vicrop_jax.processing import check_question, encode, prompt_for, to_rgb

BASE_SIZE = {"llava": None, "instructblip": None}  # None: the vision tower's input resolution


@dataclasses.dataclass
class Answer:
    """One question's ViCrop result; field names follow the official run.py records."""

    question: str
    original_answer: str
    crop_answer: str
    bbox: tuple[int, int, int, int]  # (left, top, right, bottom) in original-image pixels
    att_map: np.ndarray  # float32 [N, N] (or the merged high-res map)
    method: str
    timings: dict[str, float]  # seconds per stage, shared by the batch it ran in

    def map_stats(self) -> dict[str, float]:
        m = self.att_map
        return {"min": float(m.min()), "max": float(m.max()), "mean": float(m.mean())}


def base_size(model: Model) -> int:
    return model.config.vision_config.image_size


def generate_answers(
    model: Model,
    texts: list[str],
    images: list[Image.Image],
    max_new_tokens: int,
    params=None,
    *,
    pad_to_multiple_of: int | None = None,
    place=jnp.asarray,
) -> list[str]:
    """Greedy answers for a batch of prompts (their images flattened in prompt order).

    pad_to_multiple_of buckets prompt lengths; place(np.ndarray) -> jax.Array puts each input
    on device (e.g. sharded over a data mesh; the default is one device).
    """
    enc = encode(model.processor, texts, images, pad_to_multiple_of)
    tok = model.processor.tokenizer
    # InstructBLIP's Q-Former inputs ride along to the prefill; LLaVA has none (extra=None).
    extra = {k: place(v) for k, v in enc.items() if k.startswith("qformer_")} or None
    out = greedy_generate(
        model.module, model.params if params is None else params,
        place(enc["input_ids"]), place(np.transpose(enc["pixel_values"], (0, 2, 3, 1))),
        place(enc["attention_mask"]), max_new_tokens=max_new_tokens,
        eos_ids=model.config.text_config.eos_ids,
        pad_id=pad_id(tok), extra=extra,
    )  # fmt: skip
    return answer_texts(tok, out.tokens, out.lengths)


def _timed(timings: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    return out


def ask_batch(
    model: Model,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    *,
    method: str = "rel_att",
    layer=None,
    high_res: bool = False,
    short_questions: Sequence[str | None] | None = None,
    max_new_tokens: int = 20,
    params=None,
    share_prefill: bool = True,
) -> list[Answer]:
    """ViCrop for a batch of (image, question) pairs.

    Args:
      model: a loaded Model with a processor.
      images: PIL images of any mode and size.
      questions: the questions asked for the answers.
      method: "rel_att", "grad_att" or "pure_grad".
      layer: LM layer(s) for the attention methods (see importance.importance).
      high_res: the *_high variant (per-tile maps merged).
      short_questions: optional per-item questions used for the map only (V*).
      max_new_tokens: the most answer tokens (the official code uses 20).
      params: params to use instead of model.params (e.g. cast or sharded).
      share_prefill: for LLaVA rel-att, run the prompts' common prefix (BOS and the first
        image) once per question and read the map from the baseline answer's pass (same
        numbers, less work; see vicrop_jax.prefix); False runs the official code's separate
        passes.

    Returns:
      One Answer per item.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    images = [to_rgb(im) for im in images]
    questions = [check_question(q) for q in questions]
    shorts = list(short_questions) if short_questions is not None else [None] * len(questions)
    if len(shorts) != len(questions):
        raise ValueError(f"{len(shorts)} short_questions but {len(questions)} questions")
    map_qs = [
        check_question(s, "short_question") if s else q
        for s, q in zip(shorts, questions, strict=True)
    ]
    timings["preprocess"] = time.perf_counter() - t0

    # rel-att reads its map from the prefill that starts the baseline answer (one prefill and
    # one vision pass for both) when the map is asked with the answered question itself.
    shared = (
        share_prefill and model.family == "llava" and method == "rel_att" and not high_res
        and map_qs == questions
    )  # fmt: skip
    stacked = started = None
    if shared:
        started = _timed(
            timings, "baseline_answer_and_map", prefix_lib.start, model, images, questions,
            max_new_tokens=max_new_tokens, layer=layer, params=params,
        )  # fmt: skip
        stacked, baseline = started.maps, started.answers
    else:
        baseline = _timed(
            timings, "baseline_answer", generate_answers, model,
            [prompt_for(model.family, q) for q in questions], images, max_new_tokens, params,
        )  # fmt: skip
    if high_res:
        p = model.params if params is None else params
        maps = [
            np.asarray(_timed(timings, "map", importance, p, im, q, model=model, method=method,
                              layer=layer, high_res=True))
            for im, q in zip(images, map_qs, strict=True)
        ]  # fmt: skip
        boxes = [
            np.asarray(_timed(timings, "box", bbox_lib.select_bbox, m, im.size, base_size(model)))
            for m, im in zip(maps, images, strict=True)
        ]
    else:
        if stacked is None:
            stacked = _timed(timings, "map", maps_for_images, model, images, map_qs,
                             method=method, layer=layer, params=params)  # fmt: skip
        sizes = np.array([im.size for im in images])
        boxes = list(np.asarray(_timed(timings, "box", bbox_lib.select_bboxes, stacked, sizes,
                                       base_size(model))))  # fmt: skip
        maps = list(np.asarray(stacked))
    boxes = [tuple(int(v) for v in b) for b in boxes]
    crops = [im.crop(b) for im, b in zip(images, boxes, strict=True)]
    if started is not None:
        cropped = _timed(timings, "crop_answer", prefix_lib.finish, model, started, crops)
    else:
        pairs = [x for im, c in zip(images, crops, strict=True) for x in (im, c)]
        cropped = _timed(
            timings, "crop_answer", generate_answers, model,
            [prompt_for(model.family, q, n_images=2) for q in questions], pairs,
            max_new_tokens, params,
        )  # fmt: skip
    return [
        Answer(q, a, c, b, m, method + ("_high" if high_res else ""), dict(timings))
        for q, a, c, b, m in zip(questions, baseline, cropped, boxes, maps, strict=True)
    ]


def ask(model: Model, image: Image.Image, question: str, **kwargs) -> Answer:
    """ViCrop for one question; keyword arguments as ask_batch (short_question for V*)."""
    short = kwargs.pop("short_question", None)
    return ask_batch(model, [image], [question], short_questions=[short], **kwargs)[0]
