"""One loader per benchmark, each reading its published files (see eval.datasets)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from eval.datasets._common import (
    _IMAGE_EXTENSIONS,
    VSTAR_CATEGORIES,
    VSTAR_INSTRUCTION,
    DatasetError,
    Example,
    _box,
    _jsonable,
    _read_json,
    _read_jsonl,
    _Record,
    _union,
    _unique,
)


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
