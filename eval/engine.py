"""Batched ViCrop for evaluation: one baseline answer per question, shared by every method.

For a batch of questions the engine generates the baseline answer once, then for each method
computes its map, its box and the answer with [original, crop]. Methods:

  rel_att, grad_att, pure_grad   the paper's maps (vicrop_jax.importance, the family's cores)
  <method>_high                  the high-resolution variant: per-tile maps, merged
  gt_crop                        the ground-truth box, grown to at least the base size
                                 around its centre (the box search never returns less)
  random_crop, center_crop       a base-size box (the ratio-1 window of the box search) at a
                                 random centre (fixed per id and seed) / the image centre
  gt_map                         the official box search on an ideal map: a peak at the
                                 ground-truth box's centre (`peak_map`) on the grid the
                                 family's maps have for that image (control_map_shape), i.e.
                                 what a map method that knows where to look would crop

Shapes are bucketed so that jit compiles a handful of programs for a whole benchmark: every
call runs a full batch (short batches are padded by repeating their last item; the padded
rows are dropped) and prompts (the shared-prompt cache's tails too) are left-padded to a
multiple of LENGTH_BUCKET tokens. Neither changes a result: rows are independent and RoPE
positions count real tokens only.

The orchestration of a batch (baseline, maps, boxes, crop answers, the shared-prompt cache
where the family allows it) is the library's, `vicrop_jax.pipeline.answer_batch`; the engine
adds the control boxes, the batching and placement, and the records' fields.

With several local devices, the model runs on a 2-D (data, model) mesh (vicrop_jax.sharding;
by default every device on data): the batch axis of every input is split over data, the params
over model by their family's partition rules (replicated when the model axis is 1); the batch
size is rounded up to a multiple of the data axis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from eval.datasets import Example
from vicrop_jax import bbox as bbox_lib
from vicrop_jax.families import family_of
from vicrop_jax.loading import Model, shard_params
from vicrop_jax.pipeline import Executor, StageTimer, answer_batch, split_method
from vicrop_jax.processing import check_question
from vicrop_jax.sharding import DATA, axis_size, make_mesh

ATTENTION_METHODS = ("rel_att", "grad_att", "pure_grad")
CONTROL_METHODS = ("gt_crop", "random_crop", "center_crop", "gt_map")
# A whole run compiles one program per pass and prompt-length bucket (bench.compile_time
# --eval_flagfile): at 64, LLaVA-1.5's 577-token prefix plus a question of up to 63 tokens
# is one bucket for the maps (640) and for the shared-prompt tails (64, the crop's 640).
LENGTH_BUCKET = 64


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


def box_cells(box: Sequence[float], image_size: Sequence[int], grid) -> tuple[int, ...]:
    """A pixel box (x1, y1, x2, y2) as grid cells [c1, c2) x [r1, r2), at least one cell, on a
    grid of N x N cells (grid = N) or rows x cols (grid = (rows, cols))."""
    rows, cols = (grid, grid) if np.ndim(grid) == 0 else grid
    out = []
    for lo, hi, dim, n in ((box[0], box[2], image_size[0], cols),
                           (box[1], box[3], image_size[1], rows)):  # fmt: skip
        cell = dim / n
        a = min(max(int(math.floor(lo / cell)), 0), n - 1)
        b = min(max(int(math.ceil(hi / cell)), a + 1), n)
        out.append((a, b))
    (c1, c2), (r1, r2) = out
    return c1, r1, c2, r2


def peak_map(box: Sequence[float], size: Sequence[int], grid, centre=None,
             sigma: float = 0.25) -> np.ndarray:  # fmt: skip
    """float32[rows, cols] (grid = N: N x N; grid = (rows, cols)) summing to 1: a Gaussian at
    `centre` (default the box's centre), of standard deviation sigma x the box's longer side
    (pixels), sampled at the cell centres of a map spanning the image (`size` = (width,
    height)) and kept on the box's cells (`box_cells`: at least one, inside the grid).

    A peak, not a plateau: a map flat over a box that spans several windows ties them all,
    and the official search keeps the first (top-left) one, a corner of the box.
    """
    (w, h), (x1, y1, x2, y2) = size, box
    cx, cy = centre if centre is not None else ((x1 + x2) / 2, (y1 + y2) / 2)
    sd = max(sigma * max(x2 - x1, y2 - y1), 1e-3)
    rows, cols = (grid, grid) if np.ndim(grid) == 0 else grid
    xs = (np.arange(cols) + 0.5) * w / cols
    ys = (np.arange(rows) + 0.5) * h / rows
    z = -((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * sd**2)
    c1, r1, c2, r2 = box_cells(box, size, grid)
    keep = np.full((rows, cols), -np.inf)
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


def local_mesh(shape: str | None = None) -> Mesh | None:
    """A (data, model) mesh over this process's devices, `shape` as "data:2,model:4" (an axis
    left out takes the rest; default every device on data), or None with a single device."""
    if len(jax.local_devices()) == 1:
        make_mesh(shape)  # a shape that asks for more devices is refused all the same
        return None
    return make_mesh(shape)


@dataclasses.dataclass
class Item:
    """A question ready to run: its example and its decoded RGB image."""

    example: Example
    image: Image.Image


class Engine:
    """Runs the baseline and every method over batches of Items on one model.

    Args:
      model: a loaded Model (any family of vicrop_jax.families) with its processor.
      batch_size: questions per device call (rounded up to a multiple of the device count).
      max_new_tokens: the most answer tokens (official: 20).
      layer: LM layer(s) for the attention maps (int, list, "all"); None: the paper's.
      seed: seed of the random_crop control.
      mesh: a (data, model) mesh (vicrop_jax.sharding), or None for one device. The params
        are laid out on it by the family's rules (a model loaded with the mesh already is).
      map_options: the family's map options (LLaVA-NeXT's map_source); None: its defaults.
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
        map_options: dict | None = None,
    ):
        if model.processor is None:
            raise ValueError(f"model at {model.path!r} has no processor/tokenizer files")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be positive")
        self.model, self.mesh, self.seed = model, mesh, seed
        self.family = family_of(model)
        self.max_new_tokens = max_new_tokens
        n_data = axis_size(mesh, DATA)
        self.batch_size = -(-batch_size // n_data) * n_data
        self.base = self.family.base_size(model.config)
        self.tokenizer = model.processor.tokenizer
        params = model.params
        if mesh is not None:
            params = shard_params(params, model.config, mesh)
        self.executor = Executor(
            model, params, layer=layer, max_new_tokens=max_new_tokens,
            batch_size=self.batch_size, pad_to_multiple_of=LENGTH_BUCKET, mesh=mesh,
            map_options=map_options,
        )  # fmt: skip
        self.layers, self.params = self.executor.layers, self.executor.params

    def prompt(self, question: str, n_images: int = 1) -> str:
        return self.family.prompt(question, n_images)

    def prompt_tokens(self, question: str, n_images: int = 2, image_sizes=None) -> int:
        """Prompt length in tokens with every image's tokens in place (image_sizes: (width,
        height) of the first images, where the family's token count follows the size)."""
        return self.family.prompt_tokens(self.tokenizer, self.model.config, question, n_images,
                                         image_sizes, processor=self.model.processor)  # fmt: skip

    def check_question(self, example: Example, image_size=None) -> None:
        """Raises ValueError for an empty or too long question (too long for the model too);
        image_size: the image's (width, height), the crop counted at the box search's base
        size (its smallest box)."""
        check_question(example.question)
        if example.short_question is not None:
            check_question(example.short_question, "short_question")
        limit = self.model.config.text_config.max_position_embeddings
        sizes = None if image_size is None else [tuple(image_size), (self.base, self.base)]
        n = self.prompt_tokens(example.question, image_sizes=sizes)
        if n + self.max_new_tokens > limit:
            raise ValueError(
                f"question too long: the two-image prompt has {n} tokens, plus "
                f"{self.max_new_tokens} new tokens exceeds the model's {limit} positions"
            )

    def generate(self, texts: list[str], images: list[list[Image.Image]]) -> list[str]:
        """Greedy answers; images[i] are the images of texts[i], in prompt order."""
        return self.executor.generate(texts, images)

    def maps(self, images: list[Image.Image], questions: list[str], method: str):
        """Importance maps float32[n, N, N] of (image, question) pairs, full batches at a time
        (a list of maps where the family's grid follows each image's size)."""
        return self.executor.maps(images, questions, method)

    # -- control boxes ---------------------------------------------------------------------

    def _control(self, method: str, items: list[Item]):
        """The box source of a control method over items (see the module docstring)."""
        sizes = [it.image.size for it in items]

        def gt_map(timed):
            cfg, proc = self.model.config, self.model.processor
            has = [i for i, it in enumerate(items) if it.example.gt_bbox is not None]
            maps, boxes = [None] * len(items), [None] * len(items)
            groups = {}  # map shape -> items (Qwen2.5-VL: each image's merged grid)
            for i in has:
                shape = tuple(self.family.control_map_shape(cfg, sizes[i], proc))
                maps[i] = peak_map(items[i].example.gt_bbox, sizes[i], shape)
                groups.setdefault(shape, []).append(i)
            for group in groups.values():
                found = timed("box", bbox_lib.select_bboxes, np.stack([maps[i] for i in group]),
                              np.array([sizes[i] for i in group]), self.base)  # fmt: skip
                for i, b in zip(group, np.asarray(found), strict=True):
                    boxes[i] = tuple(int(v) for v in b)
            return boxes, maps

        def fixed(timed):
            del timed
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

        return gt_map if method == "gt_map" else fixed

    # -- one batch ---------------------------------------------------------------------

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
        timer = StageTimer()
        controls = {m: self._control(m, items) for m in methods if m in CONTROL_METHODS}
        answers, by_method = answer_batch(
            self.executor, [it.image for it in items], [it.example.question for it in items],
            methods, map_questions=[it.example.short_question or it.example.question
                                    for it in items],
            controls=controls, baseline=baseline, timer=timer,
        )  # fmt: skip
        results = [{"original_answer": a, "methods": {}} for a in answers]
        for method, res in by_method.items():
            for i, out in enumerate(results):
                box, m = res.boxes[i], res.maps[i]
                out["methods"][method] = {
                    "crop_answer": res.crop_answers[i],
                    "bbox": None if box is None else list(box),
                    "map_stats": None if m is None else map_stats(m),
                    "gt_coverage": None if box is None else coverage(box, items[i].example.gt_bbox),
                    "error": None if box is not None else "no ground-truth box",
                }
        per_q = {k: v / len(items) for k, v in timer.totals.items()}
        for out in results:
            out["timings"] = dict(per_q)
        return results
