"""The evaluation loop: load a benchmark, answer every question, append results, resume.

`run(settings)` is what `python -m eval.run` calls. It

1. loads the task's examples (eval.datasets) and keeps this shard's share (every
   shard_count-th example from shard_index);
2. locks this shard's results file (a second run of the shard is refused, naming the
   holder's pid) and refuses if the output directory holds results of another
   configuration (eval.records): the run's identity is its settings, the weights'
   fingerprint and a digest of the data's questions, and every result keeps the
   fingerprint of its image, checked again on every resume;
3. reopens this shard's JSONL, drops a line cut short by a crash, and skips the ids already
   there (error rows too, unless retry_errors);
4. loads the model (only when questions are left), writes run_config.json, answers the rest
   in batches (eval.engine) while the next batch's images load in threads, and appends one
   record per question, flushed and fsync'd. A failed start (a wrong --model or --layer)
   writes no configuration; a directory without results takes a new one.
5. leaves one line per id in the JSONL (a retried error replaces its error row).

A question that cannot be answered (missing, corrupt or oversized image, a path outside the
image root, an empty or too long question) becomes an error row and the run goes on. If a
whole batch fails, its questions are retried one at a time so only the culprit is lost.
After `max_consecutive_errors` failures in a row the run stops: that is a setup problem (a
wrong --image_root, out of memory), not bad data.

One JSON record per question (the official run.py names first; the top-level answer, box
and map statistics are those of the first method):

  id, question, labels             the dataset's (labels: what eval.metrics scores against)
  original_answer                  the answer with the image alone (shared by all methods)
  crop_answer, bbox, method        the first method's answer with [image, crop], its box
                                   [x1, y1, x2, y2] in original pixels, its name
  methods                          {name: {crop_answer, bbox, map_stats, gt_coverage, error}}
                                   for every method; error "no ground-truth box" for gt_crop
                                   without one; gt_coverage: share of the GT box in the box
  map_stats                        {shape, min, max, mean, std, peak [row, col]} or null
  task, model, short_question, image_path, image_size [w, h], gt_bbox [x1, y1, x2, y2]|null
  image_fingerprint                the image file's size and sha256 prefix (null if unread)
  timings                          seconds per question: load_image, baseline_answer,
                                   <method>/map, <method>/box, <method>/crop_answer (a
                                   batch's stage time divided by its questions)
  error                            null, or "Type: message" (then answers are null;
                                   traceback holds the last frames for compute failures)
  shard, extra                     the shard that wrote it; dataset fields kept for analysis
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from PIL import Image

from eval import datasets, records, report
from eval.datasets import DataSpec, Example, ImageError
from eval.engine import ATTENTION_METHODS, Engine, Item, local_mesh, parse_methods
from vicrop_jax.sharding import parse_mesh_shape

FORMAT_VERSION = 1
# run_config.json keys compared only where the file holds them (its run resumes without).
ADDED_KEYS = ("weights", "data_content", "generation")


class TooManyErrors(RuntimeError):
    """max_consecutive_errors questions failed in a row: a setup problem, the run stops."""


def _weights_identity(model: str) -> dict:
    """{"weights": fingerprint} for a local safetensors checkpoint, else {} (a path that does
    not load fails later, with the loader's message)."""
    from convert.checkpoint import CheckpointError, weights_fingerprint

    try:
        return {"weights": weights_fingerprint(model)}
    except (CheckpointError, OSError):
        return {}


def _generation_identity(model: str) -> dict:
    """{"generation": settings} from the checkpoint's generation_config.json (the logits
    settings every greedy answer applies, and its eos ids), else {} (a directory that does
    not load fails later, with the loader's message)."""
    from convert.checkpoint import CheckpointError
    from vicrop_jax.loading import generation_settings, read_generation_config

    try:
        settings = generation_settings(model).identity()
        eos = read_generation_config(model).get("eos_token_id")
    except (CheckpointError, OSError):
        return {}
    return {"generation": {**settings, "eos_token_id": eos}}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run needs. Fields under "identity" must match to resume a directory."""

    # identity
    model: str
    task: str
    methods: tuple[str, ...]
    data: DataSpec
    output_dir: str
    layer: str | None = None
    dtype: str = "float32"
    max_new_tokens: int = 20
    limit: int = 0
    shard_count: int = 1
    seed: int = 0
    # "auto": the maps are asked with the dataset's short question where it has one (V*, the
    # synthetic set), as the official code; "full": always with the question answered.
    map_question: str = "auto"
    # LLaVA-NeXT's map grid ("base", "tiles", "both"); None: the family's default.
    map_source: str | None = None
    # The processor's max_pixels (Qwen2.5-VL); None: the family's (official 256 * 28 * 28).
    processor_max_pixels: int | None = None
    # execution only
    shard_index: int = 0
    batch_size: int = 8
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS
    retry_errors: bool = False
    max_consecutive_errors: int = 50
    progress: bool = True
    data_parallel: bool = True
    # The (data, model) device mesh, "data:2,model:4" (vicrop_jax.sharding.parse_mesh_shape);
    # empty: every local device on data (when data_parallel).
    mesh_shape: str = ""
    high_res: bool = False  # adds _high to every map method (the names then say it)

    def __post_init__(self):
        object.__setattr__(self, "methods", parse_methods(self.methods, self.high_res))
        if self.task not in datasets.TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {datasets.TASKS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} not in [0, {self.shard_count})")
        if self.map_question not in ("auto", "full"):
            raise ValueError(f"map_question must be 'auto' or 'full', got {self.map_question!r}")
        mp = self.processor_max_pixels
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp < 1):
            raise ValueError(f"processor_max_pixels must be a positive int, got {mp!r}")
        if self.limit < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("limit must be >= 0, batch_size and max_new_tokens >= 1")
        parse_mesh_shape(self.mesh_shape)
        try:
            parse_layer(self.layer)
        except ValueError:
            msg = f"layer must be an int, a comma list or 'all', got {self.layer!r}"
            raise ValueError(msg) from None

    def identity(self, examples: Sequence[Example]) -> dict:
        """The run_config.json content: what decides the results, not how they are computed.

        `examples`: the questions of the run (every shard's). The images' content is checked
        per result (`image_fingerprint`), so a run that fixes a missing image can retry it.
        """
        # Image roots are left out: moving the images does not change the results.
        data = {}
        for k, v in dataclasses.asdict(self.data).items():
            if not v or k == "image_root" or (k.startswith("synthetic_") and
                                              self.task != "synthetic"):  # fmt: skip
                continue
            if k.endswith(("_json", "_jsonl", "_dir", "_questions", "_annotations")):
                v = ",".join(map(os.path.abspath, v.split(",")))
            data[k] = v
        return {
            "format_version": FORMAT_VERSION,
            "model": os.path.abspath(self.model),
            "task": self.task,
            "methods": list(self.methods),
            "data": data,
            "layer": self.layer,
            "dtype": self.dtype,
            "max_new_tokens": self.max_new_tokens,
            "limit": self.limit,
            "shard_count": self.shard_count,
            "seed": self.seed,
            "num_examples": len(examples),
            # Data edited in place must not resume the old results.
            "data_content": data_content(examples),
            # Only when set: directories written before the option resume unchanged.
            **({"map_question": self.map_question} if self.map_question != "auto" else {}),
            **({"map_source": self.map_source} if self.map_source else {}),
            # A processor of another max_pixels sees other image tokens.
            **({"processor_max_pixels": mp} if (mp := self.processor_max_pixels) else {}),
            # Retrained or replaced weights at the same path must not resume the old results.
            **_weights_identity(self.model),
            # Nor a changed generation_config.json (a repetition penalty changes answers).
            **_generation_identity(self.model),
        }

    def examples(self) -> list[Example]:
        """The task's questions, with short_question dropped under map_question="full"."""
        examples = datasets.load(self.task, self.data)
        if self.map_question == "full":
            examples = [dataclasses.replace(e, short_question=None) for e in examples]
        return examples

    @property
    def model_name(self) -> str:
        return os.path.basename(os.path.normpath(self.model))


def data_content(examples: Sequence[Example]) -> str:
    """A digest of the questions: every field of every example (id, question, labels, short
    question, ground-truth box, image path, extra fields such as V* options) but the image
    root, as moving the images changes no result. Costs a JSON dump of the examples: about
    40 ms per thousand questions on one core."""
    names = [f.name for f in dataclasses.fields(Example) if f.name != "image_root"]
    digest = hashlib.sha256()
    for ex in examples:
        fields = [getattr(ex, name) for name in names]
        digest.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:16]


def map_options(s: Settings) -> dict:
    """The family map options a run sets (none: the family's defaults)."""
    return {"map_source": s.map_source} if s.map_source else {}


def parse_layer(text: str | None):
    """None, "14", "12,14" or "all" -> what vicrop_jax.importance takes."""
    if text is None or text == "" or text == "all":
        return text or None
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


def _load(example: Example, s: Settings) -> tuple[Image.Image, Example, float, str]:
    """The example's image, the example (GT box in the image's frame), the seconds it took,
    the file's fingerprint."""
    t0 = time.perf_counter()
    image, example = datasets.load_example_image(example, s.max_image_pixels, s.data.exif_transpose)
    seconds = time.perf_counter() - t0
    # A second read of the file, from the page cache: the identity of the image the result
    # is computed with, checked on every resume (_check_images).
    return image, example, seconds, records.file_fingerprint(example.image_file())


def _check_images(s: Settings, shard: Sequence[Example], done: dict[str, dict]) -> None:
    """Refuses results whose image file differs from the one behind them.

    Hashes every answered question's image file once per start (records.file_fingerprint,
    each distinct file once, 4 threads): about 1.5 s per GB read on one core, more when
    the files are not in the page cache. Error rows and records without a fingerprint are
    not checked.
    """
    wanted = {}
    for ex in shard:
        rec = done.get(ex.id)
        if rec and not rec.get("error") and rec.get("image_fingerprint"):
            wanted[ex.id] = (ex, rec["image_fingerprint"])

    def fingerprint(ex: Example) -> str:
        try:
            return records.file_fingerprint(ex.image_file())
        except (OSError, ValueError) as e:
            return f"unreadable ({type(e).__name__})"

    paths = {ex.image_path: ex for ex, _ in wanted.values()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        current = dict(zip(paths, pool.map(fingerprint, paths.values()), strict=True))
    changed = [(i, ex, fp) for i, (ex, fp) in wanted.items() if current[ex.image_path] != fp]
    if changed:
        i, ex, fp = changed[0]
        raise records.ConfigMismatch(
            f"{s.output_dir} holds results of a different configuration; refusing to mix "
            f"them: data changed (the image of {len(changed)} answered question(s) differs "
            f"from the one behind its result; first: question {i!r}, "
            f"{ex.image_path}: {fp} -> {current[ex.image_path]}). Use another --output_dir, or "
            "restore the images to resume."
        )


def _base_record(ex: Example, s: Settings) -> dict:
    return {
        "id": ex.id,
        "question": ex.question,
        "labels": ex.labels,
        "original_answer": None,
        "crop_answer": None,
        "bbox": None,
        "method": s.methods[0],
        "task": s.task,
        "model": s.model_name,
        "short_question": ex.short_question,
        "image_path": ex.image_path,
        "image_size": None,
        "image_fingerprint": None,
        "gt_bbox": None if ex.gt_bbox is None else list(ex.gt_bbox),
        "map_stats": None,
        "methods": {},
        "timings": {},
        "error": None,
        "shard": s.shard_index,
        "extra": ex.extra,
    }


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _answer_safely(engine: Engine, items: list[Item], methods, log) -> list[dict]:
    """engine.answer, or one item at a time when the batch fails."""
    try:
        return engine.answer(items, methods)
    except Exception as e:  # noqa: BLE001 - isolate the failing question, keep the run going
        if len(items) == 1:
            log(f"question {items[0].example.id} failed: {_error(e)}")
            return [{"error": _error(e), "traceback": traceback.format_exc(limit=4)}]
        log(f"a batch of {len(items)} failed ({_error(e)}); retrying its questions one by one")
    return [_answer_safely(engine, [it], methods, log)[0] for it in items]


class _Progress:
    """tqdm bar with ETA and running accuracy (no crop vs the first method)."""

    def __init__(self, s: Settings, done: list[dict], total: int):
        from tqdm import tqdm

        self.task, self.first = s.task, s.methods[0]
        self.sums = [0.0, 0.0]
        self.n = self.errors = 0
        for r in done:
            self._add(r)
        self.bar = tqdm(
            total=total,
            initial=len(done),
            desc=f"{s.task} shard {s.shard_index}",
            unit="q",
            disable=not s.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self._show()

    def _add(self, r: dict) -> None:
        self.n += 1
        self.errors += bool(r.get("error"))
        self.sums[0] += report.score(self.task, r.get("original_answer"), r)
        self.sums[1] += report.score(self.task, r.get("crop_answer"), r)

    def _show(self) -> None:
        if self.n:
            self.bar.set_postfix(
                {
                    "no_crop": f"{self.sums[0] / self.n:.1f}",
                    self.first: f"{self.sums[1] / self.n:.1f}",
                    "errors": self.errors,
                },
                refresh=False,
            )

    def update(self, r: dict) -> None:
        self._add(r)
        self._show()
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run(
    settings: Settings,
    model=None,
    log: Callable[[str], None] | None = None,
    loader: Callable[[], object] | None = None,
) -> str:
    """Runs (or resumes) one shard of an evaluation; returns its JSONL path.

    Args:
      settings: the run's Settings.
      model: an already loaded vicrop_jax Model for settings.model (tests), else loaded here
        when questions are left.
      log: where messages go (default: stderr).
      loader: loads the model when it is needed (default: load_run_model(settings)).

    Raises:
      records.ConfigMismatch: the output directory holds results of another configuration.
      records.Locked: another process is writing this shard's results.
      records.OutputDirError: the output directory cannot be created or written.
      datasets.DatasetError: a dataset file does not follow its published schema.
      TooManyErrors: max_consecutive_errors questions failed in a row.
    """
    s = settings
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    examples = s.examples()
    if s.limit:
        examples = examples[: s.limit]
    identity = s.identity(examples)
    shard = examples[s.shard_index :: s.shard_count]
    path = records.shard_file(
        s.output_dir, s.model_name, s.task, s.methods, s.shard_index, s.shard_count
    )
    with records.shard_lock(path), records.ResultsFile(path) as out:
        # Another configuration is refused before anything loads; this one is written only
        # once the model has loaded and the engine accepted the settings.
        records.check_config(s.output_dir, identity, ADDED_KEYS)
        out.compact()  # a run stopped while retrying errors left two lines for an id
        _check_images(s, shard, out.latest())
        finished = out.ids(include_errors=not s.retry_errors)
        todo = [ex for ex in shard if ex.id not in finished]
        log(
            f"{path}: {len(shard)} questions in this shard, {len(shard) - len(todo)} already "
            f"done, {len(todo)} to answer"
        )
        try:
            engine = _engine(s, model, loader, log) if todo else None
            records.check_or_write_config(s.output_dir, identity, ADDED_KEYS)
            if todo:
                _run_shard(s, todo, out, engine, log, total=len(shard))
        finally:
            out.compact()  # one line per id: a retried error replaces its error row
    return path


def run_mesh(s: Settings):
    """The run's device mesh (eval.engine.local_mesh), or None: one device, or
    data_parallel off without a mesh_shape."""
    return local_mesh(s.mesh_shape) if s.data_parallel or s.mesh_shape else None


def load_run_model(s: Settings):
    """The run's model: settings.model in settings.dtype, laid out on the run's mesh."""
    import jax.numpy as jnp

    from vicrop_jax.loading import load_model

    dtype = jnp.bfloat16 if s.dtype == "bfloat16" else jnp.float32
    options = {} if s.processor_max_pixels is None else {"max_pixels": s.processor_max_pixels}
    return load_model(s.model, dtype=dtype, mesh=run_mesh(s), processor_options=options)


def _engine(s: Settings, model, loader, log) -> Engine:
    """The model (loaded if not given) in an Engine with the run's settings."""
    if model is None:
        from safetensors import SafetensorError

        t0 = time.perf_counter()
        try:
            model = (loader or functools.partial(load_run_model, s))()
        except SafetensorError as e:
            raise ValueError(f"{s.model}: unreadable safetensors weights ({e})") from e
        log(f"loaded {s.model} ({s.dtype}) in {time.perf_counter() - t0:.1f}s")
    mesh = run_mesh(s)
    if mesh is not None:
        n, (d, m) = mesh.devices.size, mesh.devices.shape
        log(f"data parallel over {n} local devices" if m == 1 else
            f"mesh of {n} local devices: data {d} x model {m}")  # fmt: skip
    return Engine(
        model,
        batch_size=s.batch_size,
        max_new_tokens=s.max_new_tokens,
        layer=parse_layer(s.layer),
        seed=s.seed,
        mesh=mesh,
        map_options=map_options(s),
    )


def _run_shard(s: Settings, todo: list[Example], out, engine: Engine, log, total: int) -> None:
    bs = engine.batch_size
    batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
    redo = {ex.id for ex in todo}
    done = [r for r in out.latest().values() if r["id"] not in redo]
    progress = _Progress(s, done, total)
    streak = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:

        def submit(batch):
            return [pool.submit(_load, ex, s) for ex in batch]

        pending = submit(batches[0])
        try:
            for k, batch in enumerate(batches):
                loads, pending = pending, submit(batches[k + 1]) if k + 1 < len(batches) else []
                rows, items, slots = [], [], []
                for ex, fut in zip(batch, loads, strict=True):
                    rec = _base_record(ex, s)
                    rows.append(rec)
                    try:
                        image, ex, seconds, fingerprint = fut.result()
                        engine.check_question(ex, image.size)
                    except (ImageError, OSError, ValueError, TypeError) as e:
                        rec["error"] = _error(e)
                        continue
                    rec["image_size"] = list(image.size)
                    rec["gt_bbox"] = None if ex.gt_bbox is None else list(ex.gt_bbox)
                    rec["image_fingerprint"] = fingerprint
                    rec["timings"] = {"load_image": seconds}
                    items.append(Item(ex, image))
                    slots.append(rec)
                results = _answer_safely(engine, items, s.methods, log) if items else []
                for rec, res in zip(slots, results, strict=True):
                    _fill(rec, res, s.methods[0])
                for rec in rows:
                    out.append(rec)
                    progress.update(rec)
                    streak = streak + 1 if rec["error"] else 0
                    if streak >= s.max_consecutive_errors:
                        raise TooManyErrors(
                            f"{streak} questions in a row failed, the last with: {rec['error']}. "
                            "Stopping: this looks like a setup problem (image root, memory). "
                            "Fix it and rerun with --retry_errors; finished records are kept."
                        )
        finally:
            for fut in pending:
                fut.cancel()
            progress.close()


def _fill(rec: dict, res: dict, first: str) -> None:
    if res.get("error"):
        rec["error"], rec["traceback"] = res["error"], res.get("traceback")
        return
    rec["original_answer"] = res["original_answer"]
    rec["methods"] = res["methods"]
    rec["timings"] = {**rec["timings"], **res["timings"]}
    m = res["methods"][first]
    rec["crop_answer"], rec["bbox"], rec["map_stats"] = m["crop_answer"], m["bbox"], m["map_stats"]


def visualize(
    settings: Settings, n: int, model=None, log: Callable[[str], None] | None = None
) -> list[str]:
    """Writes output_dir/vis/<id>_<method>.png: each map method's map over the image, its
    box and the question's answers, for the first n questions of the run that can be drawn
    (a question whose image or question is unusable is skipped, with a line to `log`), with
    the run's layer and dtype. model: the run's model if already loaded (else loaded here)."""
    from vicrop_jax import pipeline
    from vicrop_jax.show import render

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    methods = [m for m in settings.methods if m.removesuffix("_high") in ATTENTION_METHODS]
    if not methods or n <= 0:
        return []
    model = load_run_model(settings) if model is None else model
    out_dir = os.path.join(settings.output_dir, "vis")
    os.makedirs(out_dir, exist_ok=True)
    paths, drawn = [], 0
    for ex in settings.examples():
        if drawn >= n:
            break
        try:
            image, ex, _, _ = _load(ex, settings)
            answers = {m: pipeline.ask(model, image, ex.question, method=m.removesuffix("_high"),
                                       high_res=m.endswith("_high"),
                                       short_question=ex.short_question,
                                       layer=parse_layer(settings.layer),
                                       max_new_tokens=settings.max_new_tokens,
                                       **map_options(settings))
                       for m in methods}  # fmt: skip
        except (ImageError, ValueError, TypeError) as e:
            log(f"not drawing {ex.id}: {_error(e)}")
            continue
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in ex.id)
        for m, a in answers.items():
            title = (f"{ex.question}  truth: {ex.labels[0]}  no crop: {a.original_answer!r}  "
                     f"{m}: {a.crop_answer!r}")  # fmt: skip
            paths.append(render(image, a.att_map, a.bbox, os.path.join(out_dir, f"{safe}_{m}.png"),
                                title))  # fmt: skip
        drawn += 1
    return paths
