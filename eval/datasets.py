"""Benchmark loaders that read each benchmark's own published files, and safe image loading.

Every loader returns a list of `Example`s in file order; nothing is converted beforehand.

| task    | files read (published layout)                                                   |
|---------|---------------------------------------------------------------------------------|
| textvqa | TextVQA_0.5.1_val.json {"data": [{question_id, question, image_id, answers}]};   |
|         | images {image_root}/{image_id}.jpg (default image root: <json dir>/train_images) |
| vstar   | {root}/direct_attributes, {root}/relative_position: <name>.jpg + <name>.json     |
|         | {question, options (the first is correct), target_object, bbox [[x, y, w, h]]}   |
| pope    | *.jsonl lines {question_id, image, text, label}; images {image_root}/{image}     |
| docvqa  | val_v1.0.json {"data": [{questionId, question, image, answers}]}; images         |
|         | {image_root}/{image} (default image root: the json's directory)                 |
| aokvqa  | aokvqa_v1p0_val.json [{question_id, image_id, question, choices,                 |
|         | correct_choice_idx, direct_answers}]; images {image_root}/{image_id:012d}.jpg    |
| gqa     | testdev_balanced_questions.json {id: {imageId, question, answer}};               |
|         | images {image_root}/{imageId}.jpg                                                |
| vqav2   | v2_OpenEnded_mscoco_val2014_questions.json + v2_mscoco_val2014_annotations.json; |
|         | images {image_root}/COCO_val2014_{image_id:012d}.jpg                             |
| any     | the official repository's unified data.json: [{id?, image_path | image_id,       |
|         | question, labels, short_question?, bbox?}], as its run.py reads it               |

`labels` always holds what `eval.metrics.SCORERS[task]` expects: a list of answer strings,
or for POPE the string "yes"/"no". V* questions are written in the official multiple-choice
form ("<question>\\n(A) ...\\n(B) ...\\n<instruction>", see `eval.metrics.vstar_options`) with the
options in a fixed pseudo-random order per id (the published files list the correct option
first); `labels` is the correct letter and `short_question` the bare question, which the
importance map uses.

Ground-truth boxes (`gt_bbox`) are (x1, y1, x2, y2) pixels of the original image, in its stored
pixel frame. Images are read as the official run.py reads them, `Image.open(p).convert("RGB")`
(`load_image`): no EXIF rotation unless `DataSpec.exif_transpose`, which also moves the GT box
(`load_example_image`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

TASKS = ("textvqa", "vstar", "pope", "docvqa", "aokvqa", "gqa", "vqav2", "synthetic")
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset file that cannot be read as its published schema; names file and record."""


class ImageError(ValueError):
    """An image that cannot be used (missing, corrupt, too large, outside the image root)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One benchmark question.

    id: unique within the dataset (a string). image_path: as the dataset names it, relative
    to image_root (see `image_file`). labels: the ground truth the task's scorer takes.
    short_question: the question used for the map only (V*), else None. gt_bbox: (x1, y1,
    x2, y2) pixels or None. extra: dataset fields kept for analysis (JSON-serialisable).
    """

    id: str
    image_path: str
    question: str
    labels: Any
    image_root: str
    short_question: str | None = None
    gt_bbox: tuple[float, float, float, float] | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def image_file(self) -> str:
        """The image's path; raises ImageError if it would leave image_root.

        The check is lexical (after normalising ".." and absolute paths), so an image root
        that holds symbolic links to shared storage keeps working.
        """
        root = os.path.abspath(self.image_root)
        full = os.path.normpath(os.path.join(root, self.image_path))
        if os.path.commonpath([root, full]) != root:
            raise ImageError(
                f"image path {self.image_path!r} escapes the image root {self.image_root!r}"
            )
        return full


# ---------------------------------------------------------------------------------------
# Images.


def load_image(
    path: str, max_pixels: int | None | str = "pil", exif_transpose: bool = False
) -> Image.Image:
    """`vicrop_jax.processing.read_image`: the official `Image.open(path).convert("RGB")`,
    in the stored pixel frame unless exif_transpose; max_pixels: the most pixels accepted
    ("pil": PIL's limit, None: no limit). Raises ImageError naming the file."""
    from vicrop_jax import processing

    try:
        return processing.read_image(path, exif_transpose=exif_transpose, max_pixels=max_pixels)
    except processing.ImageError as e:
        raise ImageError(str(e)) from None


def load_example_image(
    ex: Example, max_pixels: int | None | str = "pil", exif_transpose: bool = False
) -> tuple[Image.Image, Example]:
    """An example's image (`load_image`) and the example, its GT box moved into the upright
    frame when exif_transpose turned the image."""
    from vicrop_jax.processing import exif_transpose_box

    path = ex.image_file()
    image = load_image(path, max_pixels, exif_transpose)
    orientation = image.info.get("exif_orientation", 1)
    if ex.gt_bbox is not None and orientation != 1:
        w, h = image.size
        stored = (h, w) if orientation >= 5 else (w, h)  # 5-8 swap the sides
        ex = dataclasses.replace(ex, gt_bbox=exif_transpose_box(ex.gt_bbox, stored, orientation))
    return image, ex


# ---------------------------------------------------------------------------------------
# Reading files.


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None


def _read_jsonl(path: str) -> list[Any]:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    return out


class _Record:
    """Field access on one dataset record with errors that name the file and record."""

    def __init__(self, path: str, index: Any, rec: Any, id_key: str | None = None):
        self.path, self.index = path, index
        where = f"record {index}"
        if isinstance(rec, dict) and id_key and id_key in rec:
            where += f" ({id_key} {rec[id_key]!r})"
        self.where = where
        if not isinstance(rec, dict):
            self.fail(f"expected an object, got {type(rec).__name__}")
        self.rec = rec

    def fail(self, msg: str):
        raise DatasetError(f"{self.path}: {self.where}: {msg}")

    def get(self, key: str, types, default=dataclasses.MISSING):
        if key not in self.rec:
            if default is dataclasses.MISSING:
                self.fail(f"missing field {key!r} (fields: {sorted(self.rec)})")
            return default
        value = self.rec[key]
        types = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join(t.__name__ for t in types)
            self.fail(f"field {key!r} must be {names}, got {type(value).__name__}")
        return value

    def answers(self, key: str, pick: Callable[[Any], Any] = lambda a: a) -> list[str]:
        raw = self.get(key, list)
        out = [pick(a) for a in raw]
        if not out or not all(isinstance(a, str) for a in out):
            self.fail(f"field {key!r} must be a non-empty list of answer strings")
        return out


def _unique(examples: list[Example], path: str) -> list[Example]:
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.id in seen:
            raise DatasetError(f"{path}: duplicate id {ex.id!r} (records {seen[ex.id]} and {i})")
        seen[ex.id] = i
    if not examples:
        raise DatasetError(f"{path}: no questions found")
    return examples


def _box(r: _Record, box: Any, key: str, fmt: str = "xywh") -> tuple[float, float, float, float]:
    """A box field as (x1, y1, x2, y2); fmt is how the file writes it ("xywh" or "xyxy")."""
    if not (isinstance(box, list | tuple) and len(box) == 4):
        r.fail(f"field {key!r} must hold [x, y, w, h] / [x1, y1, x2, y2] boxes, got {box!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
        r.fail(f"field {key!r} must hold numbers, got {box!r}")
    a, b, c, d = (float(v) for v in box)
    x1, y1, x2, y2 = (a, b, a + c, b + d) if fmt == "xywh" else (a, b, c, d)
    if x2 < x1 or y2 < y1:
        r.fail(f"field {key!r} has a negative size: {box!r} ({fmt})")
    return (x1, y1, x2, y2)


def _union(boxes: Sequence[tuple[float, ...]]) -> tuple[float, float, float, float]:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


# ---------------------------------------------------------------------------------------
# Loaders, one per benchmark.


def load_textvqa(json_path: str, image_root: str | None = None) -> list[Example]:
    """TextVQA val (TextVQA_0.5.1_val.json); images are <image_root>/<image_id>.jpg."""
    data = _read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DatasetError(f"{json_path}: expected an object with a 'data' list (TextVQA 0.5.1)")
    root = image_root or os.path.join(os.path.dirname(json_path), "train_images")
    out = []
    for i, rec in enumerate(data["data"]):
        r = _Record(json_path, i, rec, "question_id")
        qid = r.get("question_id", (int, str))
        out.append(
            Example(
                id=str(qid),
                image_path=f"{r.get('image_id', str)}.jpg",
                question=r.get("question", str),
                labels=r.answers("answers"),
                image_root=root,
                extra={k: rec[k] for k in ("image_classes", "question_tokens") if k in rec},
            )
        )
    return _unique(out, json_path)


def _vstar_order(example_id: str, n: int) -> list[int]:
    """A fixed pseudo-random permutation of n options per id (stable across runs/machines)."""
    key = hashlib.sha256(example_id.encode()).digest()
    return sorted(range(n), key=lambda i: hashlib.sha256(key + bytes([i])).digest())


def load_vstar(root: str) -> list[Example]:
    """V* Bench in its published folder layout (image + same-name .json per question)."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such V* directory")
    out = []
    for category in VSTAR_CATEGORIES:
        folder = os.path.join(root, category)
        if not os.path.isdir(folder):
            raise DatasetError(f"{root}: missing the {category}/ folder of V* Bench")
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_IMAGE_EXTENSIONS))
        for name in names:
            stem = os.path.splitext(name)[0]
            ann_path = os.path.join(folder, stem + ".json")
            r = _Record(ann_path, stem, _read_json(ann_path))
            question = r.get("question", str)
            options = r.answers("options")
            if len(options) > 4:
                r.fail(f"has {len(options)} options; V* questions have 2 to 4")
            boxes = [_box(r, b, "bbox") for b in r.get("bbox", list, [])]
            ex_id = f"{category}/{stem}"
            order = _vstar_order(ex_id, len(options))
            letters = "ABCD"
            lines = [f"({letters[k]}) {options[j]}" for k, j in enumerate(order)]
            full = "\n".join([question, *lines, VSTAR_INSTRUCTION])
            out.append(
                Example(
                    id=ex_id,
                    image_path=os.path.join(category, name),
                    question=full,
                    labels=[letters[order.index(0)]],
                    image_root=root,
                    short_question=question,
                    gt_bbox=_union(boxes) if boxes else None,
                    extra={
                        "category": category,
                        "options": options,
                        "option_order": order,
                        "target_object": r.get("target_object", list, []),
                    },
                )
            )
    return _unique(out, root)


def load_pope(jsonl_paths: str | Sequence[str], image_root: str) -> list[Example]:
    """POPE question files (*.jsonl); several files get ids prefixed by their file stem."""
    paths = [jsonl_paths] if isinstance(jsonl_paths, str) else list(jsonl_paths)
    out = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        for i, rec in enumerate(_read_jsonl(path)):
            r = _Record(path, f"on line {i + 1}", rec, "question_id")
            label = r.get("label", str).strip().lower()
            if label not in ("yes", "no"):
                r.fail(f"label must be 'yes' or 'no', got {rec['label']!r}")
            qid = str(r.get("question_id", (int, str)))
            out.append(
                Example(
                    id=f"{stem}/{qid}" if len(paths) > 1 else qid,
                    image_path=r.get("image", str),
                    question=r.get("text", str),
                    labels=label,
                    image_root=image_root,
                    extra={"category": rec.get("category", stem)},
                )
            )
    return _unique(out, ",".join(paths))


def load_docvqa(json_path: str, image_root: str | None = None) -> list[Example]:
    """DocVQA val (val_v1.0.json); image paths ("documents/x.png") are under image_root."""
    data = _read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DatasetError(f"{json_path}: expected an object with a 'data' list (DocVQA)")
    root = image_root or os.path.dirname(json_path)
    out = []
    for i, rec in enumerate(data["data"]):
        r = _Record(json_path, i, rec, "questionId")
        out.append(
            Example(
                id=str(r.get("questionId", (int, str))),
                image_path=r.get("image", str),
                question=r.get("question", str),
                labels=r.answers("answers"),
                image_root=root,
                extra={k: rec[k] for k in ("docId", "question_types") if k in rec},
            )
        )
    return _unique(out, json_path)


def load_aokvqa(json_path: str, image_root: str) -> list[Example]:
    """A-OKVQA val (aokvqa_v1p0_val.json), direct answers; COCO 2017 images by image_id."""
    data = _read_json(json_path)
    if not isinstance(data, list):
        raise DatasetError(f"{json_path}: expected a list of questions (A-OKVQA)")
    out = []
    for i, rec in enumerate(data):
        r = _Record(json_path, i, rec, "question_id")
        out.append(
            Example(
                id=str(r.get("question_id", (int, str))),
                image_path=f"{r.get('image_id', int):012d}.jpg",
                question=r.get("question", str),
                labels=r.answers("direct_answers"),
                image_root=image_root,
                extra={
                    "choices": r.get("choices", list, []),
                    "correct_choice_idx": r.get("correct_choice_idx", int, None),
                },
            )
        )
    return _unique(out, json_path)


def load_gqa(json_path: str, image_root: str) -> list[Example]:
    """GQA testdev balanced questions (a dict id -> question); images <imageId>.jpg."""
    data = _read_json(json_path)
    if not isinstance(data, dict):
        raise DatasetError(f"{json_path}: expected an object mapping question ids (GQA)")
    out = []
    for qid, rec in data.items():
        r = _Record(json_path, repr(qid), rec)
        out.append(
            Example(
                id=str(qid),
                image_path=f"{r.get('imageId', str)}.jpg",
                question=r.get("question", str),
                labels=[r.get("answer", str)],
                image_root=image_root,
                extra={"fullAnswer": rec.get("fullAnswer")},
            )
        )
    return _unique(out, json_path)


def load_vqav2(questions_path: str, annotations_path: str, image_root: str) -> list[Example]:
    """VQAv2 val: questions file + annotations file (ten answers per question)."""
    qdata, adata = _read_json(questions_path), _read_json(annotations_path)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise DatasetError(f"{questions_path}: expected an object with a 'questions' list")
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        raise DatasetError(f"{annotations_path}: expected an object with an 'annotations' list")
    subtype = qdata.get("data_subtype", "val2014")
    answers = {}
    for i, rec in enumerate(adata["annotations"]):
        r = _Record(annotations_path, i, rec, "question_id")
        answers[r.get("question_id", int)] = (
            r.answers("answers", lambda a: a.get("answer") if isinstance(a, dict) else None),
            rec.get("answer_type"),
        )
    out = []
    for i, rec in enumerate(qdata["questions"]):
        r = _Record(questions_path, i, rec, "question_id")
        qid = r.get("question_id", int)
        if qid not in answers:
            r.fail(f"has no annotation in {annotations_path}")
        labels, answer_type = answers[qid]
        out.append(
            Example(
                id=str(qid),
                image_path=f"COCO_{subtype}_{r.get('image_id', int):012d}.jpg",
                question=r.get("question", str),
                labels=labels,
                image_root=image_root,
                extra={"answer_type": answer_type},
            )
        )
    return _unique(out, questions_path)


def load_unified(
    json_path: str, image_root: str, task: str, bbox_format: str = "xyxy"
) -> list[Example]:
    """The official repository's data.json: a list of records, read as its run.py does.

    image path: <image_root>/<image_path>, else <image_root>/<image_id>.jpg. id: the record's
    "id", else "question_id", else its index in the list. A ground-truth box may be given as
    "gt_bbox" or "bbox" in `bbox_format` ("xyxy" or "xywh").
    """
    if bbox_format not in ("xyxy", "xywh"):
        raise ValueError(f"bbox_format must be 'xyxy' or 'xywh', got {bbox_format!r}")
    data = _read_json(json_path)
    if not isinstance(data, list):
        raise DatasetError(f"{json_path}: expected a list of records (the official data.json)")
    out = []
    for i, rec in enumerate(data):
        r = _Record(json_path, i, rec, "id")
        if "image_path" in rec:
            image_path = r.get("image_path", str)
        elif "image_id" in rec:
            image_path = f"{r.get('image_id', (int, str))}.jpg"
        else:
            r.fail("needs 'image_path' or 'image_id'")
        if task == "pope":
            labels = r.get("labels", str)
        elif task == "vstar" and isinstance(rec.get("labels"), str):
            labels = [rec["labels"]]
        else:
            labels = r.answers("labels")
        if task == "vstar":
            _check_choice(r, r.get("question", str), labels)
        key = "gt_bbox" if "gt_bbox" in rec else "bbox"
        gt = _box(r, rec[key], key, bbox_format) if rec.get(key) is not None else None
        ex_id = rec.get("id", rec.get("question_id", i))
        extra = {k: v for k, v in rec.items() if k not in ("question", "labels", "image_path")}
        short = r.get("short_question", str, None)
        out.append(
            Example(
                id=str(ex_id),
                image_path=image_path,
                question=r.get("question", str),
                labels=labels,
                image_root=image_root,
                short_question=short,
                gt_bbox=gt,
                extra=_jsonable(extra),
            )
        )
    return _unique(out, json_path)


def _check_choice(r: _Record, question: str, labels: list[str]) -> None:
    """A V* record is multiple choice as its scorer reads it (eval.metrics.vstar_options):
    option lines between the question and the instruction, option letters as labels."""
    from eval.metrics import vstar_options

    try:
        letters = "ABCD"[: len(vstar_options(question))]
    except ValueError as e:
        r.fail(f"task 'vstar' needs a multiple-choice question ('<question>\\n(A) ...\\n(B) "
               f"...\\n<instruction>'): {e}")  # fmt: skip
    bad = [label for label in labels if label not in letters]
    if bad:
        r.fail(f"task 'vstar' needs option letters ({', '.join(letters)}) as labels, got "
               f"{bad[:3]!r}")  # fmt: skip


def load_synthetic(
    out_dir: str, n: int, seed: int, glyphs: str = "letter", sizes: str = "",
    distinct_colors: bool = False,
) -> list[Example]:  # fmt: skip
    """The held-out synthetic benchmark (split "test"), written to out_dir on first use.

    The items are a pure function of (n, seed, glyphs, sizes, distinct_colors); `sizes` is
    a comma list of image shorter sides ("" for eval.synthetic's default), distinct_colors
    gives every shape of an image its own colour. out_dir/synthetic.json records them and
    a directory written with other values is refused rather than silently mixed.
    """
    from eval import synthetic

    try:
        side_list = tuple(int(v) for v in sizes.split(",")) if sizes else synthetic.DEFAULT_SIZES
    except ValueError:
        raise DatasetError(f"synthetic sizes must be a comma list of ints, got {sizes!r}") from None
    want = {"n": n, "seed": seed, "split": "test", "glyphs": glyphs}
    if sizes:
        want["sizes"] = list(side_list)
    if distinct_colors:  # only when set: sets written before the option keep their stamp
        want["distinct_colors"] = True
    stamp = os.path.join(out_dir, "synthetic.json")
    data_json = os.path.join(out_dir, "data.json")
    if os.path.isfile(stamp):
        have = _read_json(stamp)
        if have != want:
            raise DatasetError(f"{out_dir} holds the synthetic set {have}, not {want}; "
                               "use another --synthetic_dir")  # fmt: skip
    if not (os.path.isfile(stamp) and os.path.isfile(data_json)):
        synthetic.write_benchmark(out_dir, n, seed, "test", glyphs=glyphs, sizes=side_list,
                                  distinct_colors=distinct_colors)  # fmt: skip
        with open(stamp, "w") as f:
            json.dump(want, f)
    return load_unified(data_json, out_dir, "synthetic")


def _jsonable(d: dict) -> dict:
    try:
        json.dumps(d)
        return d
    except (TypeError, ValueError):
        return {k: v for k, v in d.items() if _is_jsonable(v)}


def _is_jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where a task's data lives: the unified data.json or the benchmark's own files."""

    data_json: str | None = None
    image_root: str | None = None
    textvqa_json: str | None = None
    vstar_dir: str | None = None
    pope_jsonl: str | None = None  # comma-separated for several files
    docvqa_json: str | None = None
    aokvqa_json: str | None = None
    gqa_json: str | None = None
    vqav2_questions: str | None = None
    vqav2_annotations: str | None = None
    bbox_format: str = "xyxy"
    # The synthetic benchmark (eval.synthetic): written to synthetic_dir on first use.
    synthetic_dir: str | None = None
    synthetic_n: int = 500
    synthetic_seed: int = 1
    synthetic_glyphs: str = "letter"
    synthetic_sizes: str = ""  # comma list of image shorter sides; "" = the generator's
    synthetic_distinct_colors: bool = False  # every shape of an image its own colour
    # Images are read in their stored pixel frame (the official reading); True shows them
    # upright as their EXIF orientation says and moves the GT boxes with them.
    exif_transpose: bool = False

    def __post_init__(self):
        if not self.data_json:
            return
        for f in dataclasses.fields(self):
            if f.name in TASK_DATA_FIELDS and getattr(self, f.name) != f.default:
                raise ValueError(
                    f"--data_json and --{f.name} conflict: the unified data.json replaces the "
                    "task's own files; give one of them"
                )


# DataSpec fields (and eval.run flags) that name a task's own files or the synthetic set:
# --data_json replaces them all.
TASK_DATA_FIELDS = (
    "textvqa_json", "vstar_dir", "pope_jsonl", "docvqa_json", "aokvqa_json", "gqa_json",
    "vqav2_questions", "vqav2_annotations", "synthetic_dir", "synthetic_n", "synthetic_seed",
    "synthetic_glyphs", "synthetic_sizes", "synthetic_distinct_colors",
)  # fmt: skip


def _need(value: str | None, flag: str, task: str) -> str:
    if not value:
        raise DatasetError(f"task {task!r} needs --{flag} (or --data_json for the unified format)")
    return value


def load(task: str, spec: DataSpec) -> list[Example]:
    """The examples of `task` from the files named in `spec`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if spec.data_json:
        return load_unified(
            spec.data_json, _need(spec.image_root, "image_root", task), task, spec.bbox_format
        )
    if task == "synthetic":
        return load_synthetic(
            _need(spec.synthetic_dir, "synthetic_dir", task), spec.synthetic_n,
            spec.synthetic_seed, spec.synthetic_glyphs, spec.synthetic_sizes,
            spec.synthetic_distinct_colors,
        )  # fmt: skip
    if task == "textvqa":
        return load_textvqa(_need(spec.textvqa_json, "textvqa_json", task), spec.image_root)
    if task == "vstar":
        return load_vstar(_need(spec.vstar_dir, "vstar_dir", task))
    if task == "pope":
        paths = _need(spec.pope_jsonl, "pope_jsonl", task).split(",")
        return load_pope(paths, _need(spec.image_root, "image_root", task))
    if task == "docvqa":
        return load_docvqa(_need(spec.docvqa_json, "docvqa_json", task), spec.image_root)
    if task == "aokvqa":
        aok = _need(spec.aokvqa_json, "aokvqa_json", task)
        return load_aokvqa(aok, _need(spec.image_root, "image_root", task))
    if task == "gqa":
        gqa = _need(spec.gqa_json, "gqa_json", task)
        return load_gqa(gqa, _need(spec.image_root, "image_root", task))
    questions = _need(spec.vqav2_questions, "vqav2_questions", task)
    annotations = _need(spec.vqav2_annotations, "vqav2_annotations", task)
    return load_vqav2(questions, annotations, _need(spec.image_root, "image_root", task))
