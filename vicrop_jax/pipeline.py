"""ViCrop end to end: baseline answer, importance map, box, crop, answer with [original, crop].

`ask(model, image, question)` for one question; `ask_batch` for many. Both, and the
evaluation engine (eval.engine), run `answer_batch`, the one orchestration of a batch of
ViCrop questions: the baseline answers once, then per method its maps (per-tile maps merged
for the *_high variants), its boxes and the [original, crop] answers. Where the family's
prompts share their tokens through the first image (`Family.shares_prompt_prefix`), the
baseline's pass keeps that prefix's KV cache and every crop answer continues from it
(vicrop_jax.prompt_cache), and rel-att's map comes from the same pass when it is asked with
the answered question. An `Executor` says how the model calls run: params, device
placement, and full fixed-size batches (one compiled shape) or one call per list.

`ask(model, image, question)` takes the model first, as the host-side pipeline it is
(images and strings in, answers out); `importance(params, image, question, model=...)`
takes params first, as the functional entry whose params can be cast, sharded or
differentiated.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vicrop_jax import bbox as bbox_lib
from vicrop_jax import prompt_cache
from vicrop_jax.families import family_of
from vicrop_jax.generate import answer_texts, greedy_generate, pad_id
from vicrop_jax.importance import maps_for_images, one_grid
from vicrop_jax.loading import Model
from vicrop_jax.maps import check_method
from vicrop_jax.processing import check_question, to_rgb
from vicrop_jax.sharding import DATA, axis_size, place_batch

Box = tuple[int, int, int, int]


@dataclasses.dataclass
class Answer:
    """One question's ViCrop result; field names follow the official run.py records."""

    question: str
    original_answer: str
    crop_answer: str
    bbox: Box  # (left, top, right, bottom) in original-image pixels
    att_map: np.ndarray  # float32 [N, N] (or the merged high-res map)
    method: str
    timings: dict[str, float]  # seconds per stage, shared by the batch it ran in

    def map_stats(self) -> dict[str, float]:
        m = self.att_map
        return {"min": float(m.min()), "max": float(m.max()), "mean": float(m.mean())}


def base_size(model: Model) -> int:
    """The box search's base size of a model (its family's: the vision input side)."""
    return family_of(model).base_size(model.config)


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
    family = family_of(model)
    enc = family.encode(model.processor, texts, images, pad_to_multiple_of)
    enc = family.bucket_inputs(model.config, enc, pad_to_multiple_of)
    tok = model.processor.tokenizer
    # Extra model inputs (InstructBLIP's Q-Former prompt, LLaVA-NeXT's packing table) ride
    # along to the prefill.
    pixels, extra = family.model_inputs(model.config, enc)
    extra = {k: place(v) for k, v in extra.items()} or None
    out = greedy_generate(
        model.module, model.params_or(params),
        place(enc["input_ids"]), place(pixels),
        place(enc["attention_mask"]), max_new_tokens=max_new_tokens,
        eos_ids=model.config.text_config.eos_ids,
        pad_id=pad_id(tok), extra=extra, generation=model.generation,
    )  # fmt: skip
    return answer_texts(tok, out.tokens, out.lengths)


class StageTimer:
    """Wall time per stage; results are forced to the host so that times are real."""

    def __init__(self, prefix: str = "", totals=None):
        self.prefix = prefix
        self.totals = collections.defaultdict(float) if totals is None else totals

    def __call__(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        self.add(name, time.perf_counter() - t0)
        return out

    def add(self, name: str, seconds: float) -> None:
        self.totals[self.prefix + name] += seconds

    def scoped(self, method: str) -> StageTimer:
        return StageTimer(f"{method}/", self.totals)


class Executor:
    """How the model calls of a ViCrop batch run.

    Args:
      model: a loaded Model with a processor.
      params: params to use instead of model.params (cast, or placed on a mesh).
      layer: LM layer(s) of the attention maps (int, list, "all"); None: the paper's.
      max_new_tokens: the most answer tokens (official: 20).
      batch_size: None: every call takes its whole list as one batch. Else calls run in
        full batches of this size (the last one padded by repeating its last item; padded
        rows are dropped), so jit compiles one shape per call kind.
      pad_to_multiple_of: bucket prompt lengths (fewer compiled shapes), the shared-prompt
        cache's tails too (None: theirs by prompt_cache.TAIL_BUCKET).
      place: np.ndarray -> jax.Array for each batched input (e.g. sharded over a data
        mesh); None: one device, or the mesh's data split. The shared-prompt cache runs
        where inputs are not split: one device, or a mesh whose data axis is 1.
      base_size: the box search's base size; None: the family's (the vision input side).
      map_options: the family's map options (LLaVA-NeXT's map_source, InstructBLIP's
        qformer_layer); None: its defaults.
      mesh: a (data, model) Mesh (vicrop_jax.sharding) that `params` are laid out on: the
        calls run under it (the KV cache is laid out over its axes) and batches are split
        over its data axis (the batch size must then be a multiple of it).
    """

    def __init__(self, model: Model, params=None, *, layer=None, max_new_tokens: int = 20,
                 batch_size: int | None = None, pad_to_multiple_of: int | None = None,
                 place: Callable | None = None, base_size: int | None = None,
                 map_options: Mapping | None = None, mesh=None):  # fmt: skip
        if model.processor is None:
            raise ValueError(f"model at {model.path!r} has no processor/tokenizer files")
        for name, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                        ("base_size", base_size)):  # fmt: skip
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.model, self.family = model, family_of(model)
        self.params = model.params_or(params)
        self.layers = self.family.layers(model.config, layer)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mesh = mesh
        if place is None and axis_size(mesh, DATA) > 1:
            place = place_batch(mesh)
        self.whole_batches = place is None
        self.place = jnp.asarray if place is None else place
        self.base_size = self.family.base_size(model.config) if base_size is None else base_size
        self.map_options = dict(map_options or {})
        self.family.map_options(model.config, **self.map_options)  # a bad option fails here

    def prompt(self, question: str, n_images: int = 1) -> str:
        return self.family.prompt(question, n_images)

    def _on_mesh(self):
        """The context the model calls run in: the mesh, if any."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _chunks(self, n: int):
        """(real, padded) index lists of the calls over n items."""
        size = n if self.batch_size is None else self.batch_size
        for start in range(0, n, max(size, 1)):
            idx = list(range(start, min(start + size, n)))
            yield idx, idx + [idx[-1]] * (size - len(idx))

    def _padded(self, seq: list) -> list:
        """A full batch: the last entry repeated (one compiled shape per batch size)."""
        return seq if self.batch_size is None else seq + [seq[-1]] * (self.batch_size - len(seq))

    def generate(self, texts: list[str], images: list[list[Image.Image]]) -> list[str]:
        """Greedy answers; images[i] are the images of texts[i], in prompt order."""
        answers: list[str] = []
        for real, idx in self._chunks(len(texts)):
            with self._on_mesh():
                answers += generate_answers(
                    self.model, [texts[i] for i in idx], [im for i in idx for im in images[i]],
                    self.max_new_tokens, self.params, pad_to_multiple_of=self.pad_to_multiple_of,
                    place=self.place,
                )[: len(real)]  # fmt: skip
        return answers

    def maps(self, images: list[Image.Image], questions: list[str],
             method: str) -> np.ndarray | list[np.ndarray]:  # fmt: skip
        """Importance maps of (image, question) pairs: float32[n, N, N], or a list of n maps
        where the family's grid follows each image's size and the grids differ."""
        out: list[np.ndarray] = []
        for real, idx in self._chunks(len(images)):
            with self._on_mesh():
                m = maps_for_images(
                    self.model, [images[i] for i in idx], [questions[i] for i in idx],
                    method=method, layer=self.layers, params=self.params,
                    pad_to_multiple_of=self.pad_to_multiple_of, place=self.place,
                    **self.map_options,
                )  # fmt: skip
            out += [np.asarray(x) for x in m][: len(real)]
        return np.stack(out) if len({x.shape for x in out}) == 1 else out

    def shares_prefix(self, n: int) -> bool:
        """Whether n questions run over one shared-prompt cache: the family's prompts share
        their first image, batches are not split, in one call (one cache held at a time)."""
        fits = self.batch_size is None or n <= self.batch_size
        return self.family.shares_prompt_prefix and self.whole_batches and fits

    def start(self, images: list[Image.Image], questions: list[str], with_map: bool):
        """The baseline answers and the prefix cache; with_map, also rel_att's maps from the
        same pass (else the state's maps are None)."""
        images, questions = self._padded(images), self._padded(questions)
        kw = dict(max_new_tokens=self.max_new_tokens, params=self.params)
        if self.pad_to_multiple_of is not None:
            kw["multiple"] = self.pad_to_multiple_of
        with self._on_mesh():
            if with_map:
                return prompt_cache.start(self.model, images, questions, layer=self.layers, **kw)
            return prompt_cache.start_answers(self.model, images, questions, **kw)

    def finish(self, state, crops: list[Image.Image]) -> list[str]:
        """[original, crop] answers over the baseline's prefix cache."""
        with self._on_mesh():
            return prompt_cache.finish(self.model, state, self._padded(crops))[: len(crops)]


@dataclasses.dataclass
class MethodResult:
    """One method's boxes, maps and crop answers for a batch (None where it has no box)."""

    boxes: list[Box | None]
    maps: list[np.ndarray | None]
    crop_answers: list[str | None]


# A box source other than a map: (timer) -> (boxes, maps), one entry per item (eval's controls).
BoxSource = Callable[[StageTimer], tuple[list, list]]


def split_method(name: str) -> tuple[str, bool]:
    """'rel_att_high' -> ('rel_att', True)."""
    base = name.removesuffix("_high")
    return base, base != name


def map_boxes(ex: Executor, method: str, images, map_questions, timed: StageTimer,
              threshold: int, shared_maps=None) -> tuple[list[Box], list[np.ndarray]]:  # fmt: skip
    """Boxes and maps of a map method ("rel_att", ..., "*_high" with tiles of at most
    `threshold` pixels a side) for every image, asked with map_questions; timed: the
    method's timer ("map", "box"); shared_maps: rel_att's maps of the baseline's pass, or
    None. answer_batch's map step, without the crop answers."""
    base, high = split_method(method)
    check_method(base)
    sizes = [im.size for im in images]
    if not high:
        if method == "rel_att" and shared_maps is not None:
            maps = np.asarray(shared_maps)[: len(images)]
        else:
            maps = timed("map", ex.maps, images, map_questions, base)
        if isinstance(maps, list):  # one grid per image: one search each
            boxes = timed("box", lambda: [bbox_lib.select_bbox(m, s, ex.base_size)
                                          for m, s in zip(maps, sizes, strict=True)])  # fmt: skip
        else:
            boxes = timed("box", bbox_lib.select_bboxes, maps, np.array(sizes), ex.base_size)
        return [tuple(int(v) for v in np.asarray(b)) for b in boxes], list(maps)
    tiles, qs, grids = [], [], []
    for im, q in zip(images, map_questions, strict=True):
        boxes = bbox_lib.high_res_tiles(im.size, threshold)
        tiles += [im.crop(tuple(int(c) for c in t)) for t in boxes]
        qs += [q] * len(boxes)
        grids.append(bbox_lib.high_res_grid(im.size, threshold)[:2])
    # Each image's tiles share one map grid; images of other sizes may have other grids
    # (Qwen2.5-VL's follows the tile's size).
    tile_maps = timed("map", ex.maps, tiles, qs, base)
    maps, boxes, start = [], [], 0
    t0 = time.perf_counter()
    for (rows, cols), size in zip(grids, sizes, strict=True):
        own = one_grid(list(tile_maps[start : start + rows * cols]))
        merged = bbox_lib.merge_tile_maps(own, rows, cols)
        start += rows * cols
        maps.append(np.asarray(merged))
        box = np.asarray(bbox_lib.select_bbox(merged, size, ex.base_size))
        boxes.append(tuple(int(v) for v in box))
    timed.add("box", time.perf_counter() - t0)
    return boxes, maps


def answer_batch(
    ex: Executor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    methods: Sequence[str],
    *,
    map_questions: Sequence[str] | None = None,
    controls: Mapping[str, BoxSource] | None = None,
    baseline: bool = True,
    share_prefix: bool = True,
    high_res_threshold: int | None = None,
    timer: StageTimer | None = None,
) -> tuple[list[str | None], dict[str, MethodResult]]:
    """The ViCrop questions of one batch: baseline answers, then each method's result.

    Args:
      ex: how the model calls run.
      images: RGB images; questions: checked questions (the answered ones).
      methods: map methods ("rel_att", "grad_att", "pure_grad", each optionally "_high")
        and names of `controls`.
      map_questions: the questions the maps are asked with (default the questions; V*'s
        short questions).
      controls: box sources by method name (eval's ground-truth and control crops).
      baseline: also answer without a crop (else the baseline answers are None).
      share_prefix: use the shared-prompt cache where the family and executor allow it.
      high_res_threshold: tile size of the *_high variants; default the family's.
      timer: accumulates seconds per stage ("baseline_answer", "<method>/map", ...).

    Returns:
      (baseline answers, {method: MethodResult}).
    """
    images, questions = list(images), list(questions)
    map_qs = questions if map_questions is None else list(map_questions)
    controls = controls or {}
    timer = StageTimer() if timer is None else timer
    threshold = ex.family.high_res_threshold if high_res_threshold is None else high_res_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"high_res_threshold must be a positive int, got {threshold!r}")
    answers: list[str | None] = [None] * len(images)
    state = None
    if baseline and share_prefix and ex.shares_prefix(len(images)):
        # rel_att's map comes from the baseline's pass when asked with the answered question.
        with_map = "rel_att" in methods and map_qs == questions
        state = timer("baseline_answer", ex.start, images, questions, with_map)
        answers = state.answers[: len(images)]
    elif baseline:
        answers = timer("baseline_answer", ex.generate, [ex.prompt(q) for q in questions],
                        [[im] for im in images])  # fmt: skip
    results = {}
    for method in methods:
        timed = timer.scoped(method)
        if method in controls:
            boxes, maps = controls[method](timed)
        else:
            shared_maps = None if state is None else state.maps
            boxes, maps = map_boxes(ex, method, images, map_qs, timed, threshold, shared_maps)
        todo = [i for i, b in enumerate(boxes) if b is not None]
        crop_answers: list[str | None] = [None] * len(images)
        if todo and state is not None:
            # An item without a box gets its whole image as the crop; its answer is dropped.
            crops = [im if b is None else im.crop(b) for im, b in zip(images, boxes, strict=True)]
            got = timed("crop_answer", ex.finish, state, crops)
            for i in todo:
                crop_answers[i] = got[i]
        elif todo:
            got = timed("crop_answer", ex.generate,
                        [ex.prompt(questions[i], n_images=2) for i in todo],
                        [[images[i], images[i].crop(boxes[i])] for i in todo])  # fmt: skip
            for i, a in zip(todo, got, strict=True):
                crop_answers[i] = a
        results[method] = MethodResult(list(boxes), list(maps), crop_answers)
    return answers, results


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
    base_size: int | None = None,
    high_res_threshold: int | None = None,
    map_source: str | None = None,
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
      share_prefill: where the family's prompts share their first image (LLaVA), run that
        prefix once per question and continue every pass from its KV cache (same numbers,
        less work; see vicrop_jax.prompt_cache); False runs the official code's separate
        passes.
      base_size: the box search's base size; default the family's (the vision input side,
        as the official code).
      high_res_threshold: the *_high variants' tile size; default the family's (1024).
      map_source: LLaVA-NeXT only: the grid the map is read on, "base", "tiles" or "both"
        (vicrop_jax.families.llava_next; default "both").

    Returns:
      One Answer per item (an empty list for no items).
    """
    check_method(method)
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    options = {} if map_source is None else {"map_source": map_source}
    ex = Executor(model, params, layer=layer, max_new_tokens=max_new_tokens, base_size=base_size,
                  map_options=options)  # fmt: skip
    if not images:
        return []
    timer = StageTimer()
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
    timer.add("preprocess", time.perf_counter() - t0)
    name = method + ("_high" if high_res else "")
    baseline, results = answer_batch(
        ex, images, questions, [name], map_questions=map_qs, share_prefix=share_prefill,
        high_res_threshold=high_res_threshold, timer=timer,
    )  # fmt: skip
    res = results[name]
    # One method: its stages without the method prefix; a map read from the baseline's pass
    # is timed with it.
    timings = {k.removeprefix(name + "/"): v for k, v in timer.totals.items()}
    if "map" not in timings and "baseline_answer" in timings:
        timings["baseline_answer_and_map"] = timings.pop("baseline_answer")
    return [
        Answer(q, a, c, b, m, name, dict(timings))
        for q, a, c, b, m in zip(
            questions, baseline, res.crop_answers, res.boxes, res.maps, strict=True
        )  # fmt: skip
    ]


def ask(model: Model, image: Image.Image, question: str, **kwargs) -> Answer:
    """ViCrop for one question; keyword arguments as ask_batch (short_question for V*)."""
    short = kwargs.pop("short_question", None)
    return ask_batch(model, [image], [question], short_questions=[short], **kwargs)[0]
