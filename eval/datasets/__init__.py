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

Modules: _common (tasks, errors, `Example`, image reading, JSON and record helpers), _loaders
(one loader per benchmark); `DataSpec` and `load` here. Every name is reachable here.
"""

from __future__ import annotations

import dataclasses

from eval.datasets._common import TASKS as TASKS
from eval.datasets._common import VSTAR_CATEGORIES as VSTAR_CATEGORIES
from eval.datasets._common import VSTAR_INSTRUCTION as VSTAR_INSTRUCTION
from eval.datasets._common import DatasetError as DatasetError
from eval.datasets._common import Example as Example
from eval.datasets._common import ImageError as ImageError
from eval.datasets._common import load_example_image as load_example_image
from eval.datasets._common import load_image as load_image
from eval.datasets._loaders import load_aokvqa as load_aokvqa
from eval.datasets._loaders import load_docvqa as load_docvqa
from eval.datasets._loaders import load_gqa as load_gqa
from eval.datasets._loaders import load_pope as load_pope
from eval.datasets._loaders import load_synthetic as load_synthetic
from eval.datasets._loaders import load_textvqa as load_textvqa
from eval.datasets._loaders import load_unified as load_unified
from eval.datasets._loaders import load_vqav2 as load_vqav2
from eval.datasets._loaders import load_vstar as load_vstar


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
