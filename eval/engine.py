"""Batched ViCrop for evaluation: one baseline answer per question, shared by every method.

For a batch of questions the engine generates the baseline answer once, then for each method
computes its map, its box and the answer with [original, crop]. Methods:

  rel_att, grad_att, pure_grad   the paper's maps (vicrop_jax.importance.llava_maps)
  <method>_high                  the high-resolution variant: per-tile maps, merged
  gt_crop                        the ground-truth box, grown to at least the base size
                                 around its centre (the box search never returns less)
  random_crop, center_crop       a base-size box (the ratio-1 window of the box search) at a
                                 random centre (fixed per id and seed) / the image centre
  gt_map                         the official box search on an ideal map: a peak at the
                                 ground-truth box's centre (`peak_map`), i.e. what a map
                                 method that knows where to look would crop

Shapes are bucketed so that jit compiles a handful of programs for a whole benchmark: every
call runs a full batch (short batches are padded by repeating their last item; the padded
rows are dropped) and prompts are left-padded to a multiple of LENGTH_BUCKET tokens. Neither
changes a result: rows are independent and RoPE positions count real tokens only.

LLaVA on one device: the prompts start with BOS + the original image, the same for the
baseline and every [original, crop] prompt, so the baseline's pass keeps that prefix's KV
cache and each method's crop answer runs only the crop's vision pass and the rest of the
prompt over it (vicrop_jax.prefix.start_answers / finish; same answers as the separate
passes, tested). rel_att's map comes from that same pass (prefix.start: the question and
general-prompt tails over the prefix) when every map question of the batch is the answered
question; other maps, and rel_att with V*'s short questions, keep their own passes.

With several local devices, batches are data-parallel: the batch axis of every input is
sharded over a 1-D mesh ("data") and the params are replicated; the batch size is rounded up
to a multiple of the device count.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from eval.datasets import Example
from vicrop_jax import bbox as bbox_lib
from vicrop_jax import prefix as prefix_lib
from vicrop_jax.generate import pad_id
from vicrop_jax.importance import default_layer, maps_for_images, resolve_layers
from vicrop_jax.loading import Model
from vicrop_jax.pipeline import generate_answers
from vicrop_jax.processing import check_question, prompt_for

ATTENTION_METHODS = ("rel_att", "grad_att", "pure_grad")
CONTROL_METHODS = ("gt_crop", "random_crop", "center_crop", "gt_map")
LENGTH_BUCKET = 32


def split_method(name: str) -> tuple[str, bool]:
    """'rel_att_high' -> ('rel_att', True)."""
    base = name.removesuffix("_high")
    return base, base != name


def parse_methods(spec: str | Sequence[str], high_res: bool = False) -> tuple[str, ...]:
    """A comma list of method names, validated; high_res adds _high to the map methods."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ValueError("no methods given; choose from " + ", ".join(known_methods()))
    out = []
    for n in names:
        base, high = split_method(n)
        if n in CONTROL_METHODS:
            out.append(n)
        elif base in ATTENTION_METHODS:
            out.append(base + "_high" if (high or high_res) else base)
        else:
            raise ValueError(f"unknown method {n!r}; choose from {', '.join(known_methods())}")
    dup = sorted({m for m in out if out.count(m) > 1})
    if dup:
        raise ValueError(f"method(s) listed twice: {', '.join(dup)}")
    return tuple(out)


def known_methods() -> list[str]:
    return [*ATTENTION_METHODS, *(m + "_high" for m in ATTENTION_METHODS), *CONTROL_METHODS]


# ---------------------------------------------------------------------------------------
# Control boxes.


def _axis(centre: float, half: int, dim: int) -> tuple[int, int]:
    # Clamp low then high, then clip, as the box search does (bbox.py, official utils.py).
    c = min(max(int(centre), half), dim - half)
    return max(c - half, 0), min(c + half, dim)


def base_box(centre: tuple[float, float], size: tuple[int, int], base: int) -> tuple:
    """The ratio-1 box of the box search (side = base) at a centre, kept inside the image."""
    half = base // 2
    (x1, x2), (y1, y2) = (_axis(c, half, d) for c, d in zip(centre, size, strict=True))
    return (x1, y1, x2, y2)


def gt_box(gt: Sequence[float], size: tuple[int, int], base: int) -> tuple:
    """The ground-truth box, grown to at least base x base around its centre, in the image."""
    x1, y1, x2, y2 = gt
    out = []
    for lo, hi, d in ((x1, x2, size[0]), (y1, y2, size[1])):
        half = max(base // 2, math.ceil((hi - lo) / 2))
        out.append(_axis((lo + hi) / 2, half, d))
    (a, b), (c, e) = out
    return (a, c, b, e)


def seeded_rng(example_id: str, seed: int) -> np.random.Generator:
    """A generator fixed by (seed, id), the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}/{example_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_box(example_id: str, size: tuple[int, int], base: int, seed: int) -> tuple:
    rng = seeded_rng(example_id, seed)
    half = base // 2
    centre = [int(rng.integers(half, d - half + 1)) if d - half >= half else d // 2 for d in size]
    return base_box(tuple(centre), size, base)


def box_cells(box: Sequence[float], image_size: Sequence[int], grid: int) -> tuple[int, ...]:
    """A pixel box (x1, y1, x2, y2) as grid cells [c1, c2) x [r1, r2), at least one cell."""
    out = []
    for lo, hi, dim in ((box[0], box[2], image_size[0]), (box[1], box[3], image_size[1])):
        cell = dim / grid
        a = min(max(int(math.floor(lo / cell)), 0), grid - 1)
        b = min(max(int(math.ceil(hi / cell)), a + 1), grid)
        out.append((a, b))
    (c1, c2), (r1, r2) = out
    return c1, r1, c2, r2


def peak_map(box: Sequence[float], size: Sequence[int], grid: int, centre=None,
             sigma: float = 0.25) -> np.ndarray:  # fmt: skip
    """float32[grid, grid] summing to 1: a Gaussian at `centre` (default the box's centre), of
    standard deviation sigma x the box's longer side (pixels), sampled at the cell centres of
    a map spanning the image (`size` = (width, height)) and kept on the box's cells
    (`box_cells`: at least one, inside the grid).

    A peak, not a plateau: a map flat over a box that spans several windows ties them all,
    and the official search keeps the first (top-left) one, a corner of the box.
    """
    (w, h), (x1, y1, x2, y2) = size, box
    cx, cy = centre if centre is not None else ((x1 + x2) / 2, (y1 + y2) / 2)
    sd = max(sigma * max(x2 - x1, y2 - y1), 1e-3)
    xs = (np.arange(grid) + 0.5) * w / grid
    ys = (np.arange(grid) + 0.5) * h / grid
    z = -((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * sd**2)
    c1, r1, c2, r2 = box_cells(box, size, grid)
    keep = np.full((grid, grid), -np.inf)
    keep[r1:r2, c1:c2] = 0.0
    z = z + keep  # -inf off the box: exp gives exact zeros, and the max is a kept cell
    out = np.exp(z - z.max())
    return (out / out.sum()).astype(np.float32)


def coverage(box: Sequence[float], gt: Sequence[float] | None) -> float | None:
    """Fraction of the ground-truth box's area inside box (1.0 for a point-sized GT inside)."""
    if gt is None:
        return None
    ix = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
    iy = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
    area = (gt[2] - gt[0]) * (gt[3] - gt[1])
    if area <= 0:
        cx, cy = (gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2
        return float(box[0] <= cx <= box[2] and box[1] <= cy <= box[3])
    return float(ix * iy / area)


def map_stats(m: np.ndarray) -> dict:
    m = np.asarray(m, np.float64)
    peak = np.unravel_index(int(np.argmax(m)), m.shape)
    return {
        "shape": list(m.shape),
        "min": float(m.min()),
        "max": float(m.max()),
        "mean": float(m.mean()),
        "std": float(m.std()),
        "peak": [int(p) for p in peak],
    }


# ---------------------------------------------------------------------------------------
# Devices.


def local_mesh() -> Mesh | None:
    """A 1-D data mesh over this process's devices, or None with a single device."""
    devices = jax.local_devices()
    return Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None


@dataclasses.dataclass
class Item:
    """A question ready to run: its example and its decoded RGB image."""

    example: Example
    image: Image.Image


class Engine:
    """Runs the baseline and every method over batches of Items on one model.

    Args:
      model: a loaded Model (LLaVA or InstructBLIP) with its processor.
      batch_size: questions per device call (rounded up to a multiple of the device count).
      max_new_tokens: the most answer tokens (official: 20).
      layer: LM layer(s) for the attention maps (int, list, "all"); None: the paper's.
      seed: seed of the random_crop control.
      mesh: a 1-D ("data",) mesh for data parallelism, or None for one device.
    """

    def __init__(
        self,
        model: Model,
        *,
        batch_size: int,
        max_new_tokens: int = 20,
        layer=None,
        seed: int = 0,
        mesh: Mesh | None = None,
    ):
        if model.processor is None:
            raise ValueError(f"model at {model.path!r} has no processor/tokenizer files")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be positive")
        self.model, self.mesh, self.seed = model, mesh, seed
        self.max_new_tokens = max_new_tokens
        n_dev = 1 if mesh is None else mesh.devices.size
        self.batch_size = -(-batch_size // n_dev) * n_dev
        cfg = model.config
        self.base = cfg.vision_config.image_size
        nl = cfg.text_config.num_hidden_layers
        self.layers = resolve_layers(
            default_layer(model.family, nl) if layer is None else layer, nl
        )
        self.tokenizer = model.processor.tokenizer
        self.pad_id = pad_id(self.tokenizer)
        if mesh is None:
            self.params = model.params
        else:
            self.params = jax.device_put(model.params, NamedSharding(mesh, PartitionSpec()))

    # -- inputs ----------------------------------------------------------------------------

    def _place(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        spec = PartitionSpec("data", *([None] * (x.ndim - 1)))
        return jax.device_put(np.asarray(x), NamedSharding(self.mesh, spec))

    def _chunks(self, n: int):
        """Index lists of full batches over n items (the last padded with its last index)."""
        for start in range(0, n, self.batch_size):
            idx = list(range(start, min(start + self.batch_size, n)))
            yield idx, idx + [idx[-1]] * (self.batch_size - len(idx))

    def prompt(self, question: str, n_images: int = 1) -> str:
        return prompt_for(self.model.family, question, n_images)

    def prompt_tokens(self, question: str, n_images: int = 2) -> int:
        """Prompt length in tokens with the image placeholders expanded."""
        prompt = self.prompt(question, n_images)
        ids = self.tokenizer(prompt)["input_ids"]
        placeholders = prompt.count("<image>")  # LLaVA: one token each, expanded by the processor
        return len(ids) - placeholders + n_images * self.model.config.num_image_tokens

    def check_question(self, example: Example) -> None:
        """Raises ValueError for an empty or too long question (too long for the model too)."""
        check_question(example.question)
        if example.short_question is not None:
            check_question(example.short_question, "short_question")
        limit = self.model.config.text_config.max_position_embeddings
        n = self.prompt_tokens(example.question)
        if n + self.max_new_tokens > limit:
            raise ValueError(
                f"question too long: the two-image prompt has {n} tokens, plus "
                f"{self.max_new_tokens} new tokens exceeds the model's {limit} positions"
            )

    # -- model calls ---------------------------------------------------------------------

    def generate(self, texts: list[str], images: list[list[Image.Image]]) -> list[str]:
        """Greedy answers; images[i] are the images of texts[i], in prompt order."""
        answers: list[str] = []
        for real, idx in self._chunks(len(texts)):
            answers += generate_answers(
                self.model, [texts[i] for i in idx], [im for i in idx for im in images[i]],
                self.max_new_tokens, self.params, pad_to_multiple_of=LENGTH_BUCKET,
                place=self._place,
            )[: len(real)]  # fmt: skip
        return answers

    def maps(self, images: list[Image.Image], questions: list[str], method: str) -> np.ndarray:
        """Importance maps float32[n, N, N] of (image, question) pairs, full batches at a time."""
        out = []
        for real, idx in self._chunks(len(images)):
            m = maps_for_images(
                self.model, [images[i] for i in idx], [questions[i] for i in idx],
                method=method, layer=self.layers, params=self.params,
                pad_to_multiple_of=LENGTH_BUCKET, place=self._place,
            )  # fmt: skip
            out.append(np.asarray(m)[: len(real)])
        return np.concatenate(out)

    # -- the shared prefix (vicrop_jax.prefix) ---------------------------------------------

    def _shares_prefix(self, n: int) -> bool:
        """LLaVA prompts start with BOS + the original image, the same for the baseline and
        every [original, crop] prompt; on one device and for at most one batch (one prefix
        cache held at a time) that prefix runs once per question."""
        return self.model.family == "llava" and self.mesh is None and n <= self.batch_size

    def _padded(self, seq: list) -> list:
        """A full batch: the last entry repeated (one compiled shape per batch size)."""
        return seq + [seq[-1]] * (self.batch_size - len(seq))

    def _start(self, items: list[Item], with_map: bool = False):
        """The baseline answers and the prefix cache; with_map, also rel_att's maps from the
        same pass (prefix.start; else prefix.start_answers, maps None)."""
        images = self._padded([it.image for it in items])
        questions = self._padded([it.example.question for it in items])
        kw = dict(max_new_tokens=self.max_new_tokens, params=self.params)
        if with_map:
            return prefix_lib.start(self.model, images, questions, layer=self.layers, **kw)
        return prefix_lib.start_answers(self.model, images, questions, **kw)

    def _finish(self, started, items: list[Item], boxes: list) -> list[str]:
        """[original, crop] answers for every item over the baseline's prefix cache; an item
        without a box gets its whole image as the crop (its answer is dropped)."""
        crops = [
            it.image if b is None else it.image.crop(b) for it, b in zip(items, boxes, strict=True)
        ]
        return prefix_lib.finish(self.model, started, self._padded(crops))[: len(items)]

    # -- one batch ---------------------------------------------------------------------

    def _boxes(self, method: str, items: list[Item], map_qs: list[str], timed: Callable,
               prefix_maps=None):  # fmt: skip
        """Boxes and maps (None for controls) of one method for every item; prefix_maps:
        rel_att's maps [>= n, N, N] already computed by the baseline's pass, or None."""
        sizes = [it.image.size for it in items]
        if method == "gt_map":
            grid = self.base // self.model.config.vision_config.patch_size
            has = [i for i, it in enumerate(items) if it.example.gt_bbox is not None]
            maps = [None] * len(items)
            boxes = [None] * len(items)
            for i in has:
                maps[i] = peak_map(items[i].example.gt_bbox, sizes[i], grid)
            if has:
                found = timed("box", bbox_lib.select_bboxes, np.stack([maps[i] for i in has]),
                              np.array([sizes[i] for i in has]), self.base)  # fmt: skip
                for i, b in zip(has, np.asarray(found), strict=True):
                    boxes[i] = tuple(int(v) for v in b)
            return boxes, maps
        if method in CONTROL_METHODS:
            boxes = []
            for it, size in zip(items, sizes, strict=True):
                ex = it.example
                if method == "gt_crop":
                    gt = ex.gt_bbox
                    boxes.append(None if gt is None else gt_box(gt, size, self.base))
                elif method == "random_crop":
                    boxes.append(random_box(ex.id, size, self.base, self.seed))
                else:
                    boxes.append(base_box((size[0] / 2, size[1] / 2), size, self.base))
            return boxes, [None] * len(items)
        base, high = split_method(method)
        if not high:
            if method == "rel_att" and prefix_maps is not None:
                maps = np.asarray(prefix_maps)[: len(items)]
            else:
                maps = timed("map", self.maps, [it.image for it in items], map_qs, base)
            boxes = timed("box", bbox_lib.select_bboxes, maps, np.array(sizes), self.base)
            return [tuple(int(v) for v in b) for b in np.asarray(boxes)], list(maps)
        grids = [bbox_lib.high_res_grid(s)[:2] for s in sizes]
        crops, qs = [], []
        for it, q in zip(items, map_qs, strict=True):
            tiles = bbox_lib.high_res_tiles(it.image.size)
            crops += [it.image.crop(tuple(int(c) for c in t)) for t in tiles]
            qs += [q] * len(tiles)
        tile_maps = timed("map", self.maps, crops, qs, base)
        maps, boxes, start = [], [], 0
        t0 = time.perf_counter()
        for (rows, cols), size in zip(grids, sizes, strict=True):
            tiles = tile_maps[start : start + rows * cols]
            start += rows * cols
            merged = np.asarray(bbox_lib.merge_tile_maps(tiles, rows, cols))
            box = np.asarray(bbox_lib.select_bbox(merged, size, self.base))
            maps.append(merged)
            boxes.append(tuple(int(v) for v in box))
        timed.add("box", time.perf_counter() - t0)
        return boxes, maps

    def answer(
        self, items: list[Item], methods: Sequence[str], baseline: bool = True
    ) -> list[dict]:
        """Baseline and per-method results for a batch of items.

        Args:
          items: questions with their images.
          methods: names from parse_methods.
          baseline: also answer without a crop (else original_answer is None).

        Returns:
          One dict per item: original_answer, methods {name: {crop_answer, bbox, map_stats,
          gt_coverage, error}}, timings {stage: seconds per question of this batch}.
        """
        timer = _Timer()
        questions = [it.example.question for it in items]
        map_qs = [it.example.short_question or it.example.question for it in items]
        answers = [None] * len(items)
        # LLaVA, one device, one batch: the baseline's prefix pass (BOS + the original image)
        # is kept and every method's [original, crop] answer continues from it; rel_att's map
        # comes from that pass too when it is asked with the answered question (its time is
        # then part of baseline_answer's).
        started = None
        if baseline and self._shares_prefix(len(items)):
            with_map = "rel_att" in methods and map_qs == questions
            started = timer("baseline_answer", self._start, items, with_map)
            answers = started.answers[: len(items)]
        elif baseline:
            answers = timer(
                "baseline_answer",
                self.generate,
                [self.prompt(q) for q in questions],
                [[it.image] for it in items],
            )
        results = [{"original_answer": a, "methods": {}} for a in answers]
        prefix_maps = None if started is None else started.maps
        for method in methods:
            timed = timer.scoped(method)
            boxes, maps = self._boxes(method, items, map_qs, timed, prefix_maps)
            todo = [i for i, b in enumerate(boxes) if b is not None]
            if started is not None and todo:
                answers = timed("crop_answer", self._finish, started, items, boxes)
                answers = [answers[i] for i in todo]
            elif todo:
                texts = [self.prompt(questions[i], n_images=2) for i in todo]
                pairs = [[items[i].image, items[i].image.crop(boxes[i])] for i in todo]
                answers = timed("crop_answer", self.generate, texts, pairs)
            else:
                answers = []
            crops = dict(zip(todo, answers, strict=True))
            for i, res in enumerate(results):
                box = boxes[i]
                res["methods"][method] = {
                    "crop_answer": crops.get(i),
                    "bbox": None if box is None else list(box),
                    "map_stats": None if maps[i] is None else map_stats(maps[i]),
                    "gt_coverage": None if box is None else coverage(box, items[i].example.gt_bbox),
                    "error": None if box is not None else "no ground-truth box",
                }
        per_q = {k: v / len(items) for k, v in timer.totals.items()}
        for res in results:
            res["timings"] = dict(per_q)
        return results


class _Timer:
    """Accumulates wall time per stage; results are forced to the host so times are real."""

    def __init__(self, prefix: str = "", totals=None):
        self.prefix = prefix
        self.totals = collections.defaultdict(float) if totals is None else totals

    def __call__(self, name: str, fn, *args):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.add(name, time.perf_counter() - t0)
        return out

    def add(self, name: str, seconds: float) -> None:
        self.totals[self.prefix + name] += seconds

    def scoped(self, method: str) -> _Timer:
        return _Timer(f"{method}/", self.totals)
