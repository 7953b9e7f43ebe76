"""Evaluate ViCrop on a benchmark: python -m eval.run --flagfile=eval/flags/textvqa_llava.flags

Restartable: rerunning the same command resumes where it stopped (see eval.runner); a
results directory holds one configuration (settings, weights, data) and one run at a time.
Then `python -m eval.report OUTPUT_DIR` prints the accuracy tables.
"""

from __future__ import annotations

import functools
import os

from absl import app, flags
from PIL import Image

from eval import cli
from eval.datasets import TASKS
from eval.engine import known_methods
from vicrop_jax.families import FAMILIES

_MODEL = flags.DEFINE_string(
    "model",
    None,
    "HF checkpoint directory (config.json, *.safetensors, tokenizer and processor files) of "
    f"a supported model family: {', '.join(FAMILIES)}",
    required=True,
)
_TASK = flags.DEFINE_enum(
    "task", None, list(TASKS), "benchmark (decides loader and scorer)", required=True
)
_METHODS = flags.DEFINE_list(
    "methods",
    ["rel_att"],
    f"comma list of {', '.join(known_methods())} (*_high: the high-resolution variant; "
    "gt_crop, random_crop, center_crop: control crops; gt_map: the box search on an ideal "
    "map at the ground-truth box); all share one baseline answer per question",
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir",
    None,
    "results directory: one configuration (settings, weights, data), one run at a time",
    required=True,
)

# Data: the official unified data.json, or each benchmark's own published files.
_DATA_JSON = flags.DEFINE_string(
    "data_json", None, "the official repo's unified data.json (in place of the task's own files)"
)
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "directory image paths are relative to")
_BBOX_FORMAT = flags.DEFINE_enum(
    "bbox_format", "xyxy", ["xyxy", "xywh"], "ground-truth box format in --data_json"
)
_EXIF = flags.DEFINE_bool(
    "exif_transpose", False, "turn images upright by their EXIF orientation, GT boxes with them "
    "(default: the stored pixel frame, as the official Image.open(p).convert('RGB'))"
)  # fmt: skip
_TEXTVQA_JSON = flags.DEFINE_string("textvqa_json", None, "TextVQA_0.5.1_val.json")
_VSTAR_DIR = flags.DEFINE_string("vstar_dir", None, "V* Bench folder (direct_attributes/, ...)")
_POPE_JSONL = flags.DEFINE_string("pope_jsonl", None, "POPE question file(s), comma-separated")
_DOCVQA_JSON = flags.DEFINE_string("docvqa_json", None, "DocVQA val_v1.0.json")
_AOKVQA_JSON = flags.DEFINE_string("aokvqa_json", None, "A-OKVQA aokvqa_v1p0_val.json")
_GQA_JSON = flags.DEFINE_string("gqa_json", None, "GQA testdev_balanced_questions.json")
_VQAV2_Q = flags.DEFINE_string("vqav2_questions", None, "VQAv2 val questions json")
_VQAV2_A = flags.DEFINE_string("vqav2_annotations", None, "VQAv2 val annotations json")
_SYNTH_DIR = flags.DEFINE_string(
    "synthetic_dir", None, "task synthetic: where the held-out set is written on first use"
)
_SYNTH_N = flags.DEFINE_integer("synthetic_n", 500, "task synthetic: number of questions")
_SYNTH_SEED = flags.DEFINE_integer("synthetic_seed", 1, "task synthetic: generator seed")
_SYNTH_SIZES = flags.DEFINE_string(
    "synthetic_sizes", "", "task synthetic: comma list of image shorter sides (px)"
)
_SYNTH_GLYPHS = flags.DEFINE_enum(
    "synthetic_glyphs", "letter", ["letter", "word"], "task synthetic: printed letter or word"
)

_SYNTH_DISTINCT = flags.DEFINE_bool(
    "synthetic_distinct_colors",
    False,
    "task synthetic: every shape of an image a different colour",
)

# Method settings.
_LAYER = flags.DEFINE_string(
    "layer",
    None,
    "LM layer: int, comma list (averaged) or 'all'; "
    "default the paper's (14 of 32, same relative depth otherwise)",
)
_MAP_QUESTION = flags.DEFINE_enum(
    "map_question",
    "auto",
    ["auto", "full"],
    "the question the maps are asked with: auto, the dataset's short question where it has "
    "one (V*, the synthetic set; the official behaviour), else the question; full, always the "
    "question that is answered",
)
_MAP_SOURCE = flags.DEFINE_enum(
    "map_source",
    None,
    ["base", "tiles", "both"],
    "LLaVA-NeXT only: the grid the maps are read on: the base tile's, the unpadded tiles "
    "grid, or both averaged on the tiles grid (default both)",
)
_HIGH_RES = flags.DEFINE_bool("high_res", False, "use the *_high variant of every map method")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 20, "most answer tokens (official: 20)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "param dtype")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random_crop control")

# Execution.
_BATCH = flags.DEFINE_integer("batch_size", 8, "questions per device call")
_MESH = flags.DEFINE_string(
    "mesh_shape", "", "the local devices as a (data, model) mesh, e.g. data:2,model:4 (an axis "
    "left out takes the rest): batches split over data, params over model (heads, MLP, "
    "vocabulary); default every device on data"
)  # fmt: skip
_SMOKE = flags.DEFINE_bool("smoke", False, "a smoke run: only the first few questions")
_LIMIT = flags.DEFINE_integer("limit", 0, "only the first N questions (0: all; --smoke: 8)")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "this process's shard")
_SHARD_COUNT = flags.DEFINE_integer("shard_count", 1, "number of shards (processes)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "call jax.distributed.initialize(); process index/count then act as shard index/count",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "for jax.distributed")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "for jax.distributed")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "for jax.distributed")
_MAX_PIXELS = flags.DEFINE_integer(
    "max_image_pixels", Image.MAX_IMAGE_PIXELS,
    "larger images are refused (decompression bombs; may exceed PIL's default); 0: no limit",
)  # fmt: skip
_PROCESSOR_MAX_PIXELS = flags.DEFINE_integer(
    "processor_max_pixels", None,
    "the image processor's max_pixels (Qwen2.5-VL); default the official 256*28*28",
)  # fmt: skip
_RETRY_ERRORS = flags.DEFINE_bool("retry_errors", False, "on resume, redo questions that failed")
_MAX_ERRORS = flags.DEFINE_integer(
    "max_consecutive_errors", 50, "stop after this many failures in a row (a setup problem)"
)
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_VISUALIZE = flags.DEFINE_integer(
    "visualize", 0, "after the run: PNGs (map + box) of the first N questions per map method"
)

SMOKE_LIMIT = 8


def settings_from_flags():
    """Settings from the parsed flags (after jax.distributed, if asked for)."""
    from eval.datasets import DataSpec
    from eval.runner import Settings

    shard_index, shard_count = _SHARD_INDEX.value, _SHARD_COUNT.value
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
        shard_index, shard_count = jax.process_index(), jax.process_count()
    data = DataSpec(
        data_json=_DATA_JSON.value,
        image_root=_IMAGE_ROOT.value,
        bbox_format=_BBOX_FORMAT.value,
        textvqa_json=_TEXTVQA_JSON.value,
        vstar_dir=_VSTAR_DIR.value,
        pope_jsonl=_POPE_JSONL.value,
        docvqa_json=_DOCVQA_JSON.value,
        aokvqa_json=_AOKVQA_JSON.value,
        gqa_json=_GQA_JSON.value,
        vqav2_questions=_VQAV2_Q.value,
        vqav2_annotations=_VQAV2_A.value,
        synthetic_dir=_SYNTH_DIR.value,
        synthetic_n=_SYNTH_N.value,
        synthetic_seed=_SYNTH_SEED.value,
        synthetic_glyphs=_SYNTH_GLYPHS.value,
        synthetic_sizes=_SYNTH_SIZES.value,
        synthetic_distinct_colors=_SYNTH_DISTINCT.value,
        exif_transpose=_EXIF.value,
    )
    return Settings(
        model=_MODEL.value,
        task=_TASK.value,
        methods=tuple(_METHODS.value),
        data=data,
        output_dir=_OUTPUT_DIR.value,
        layer=_LAYER.value,
        map_question=_MAP_QUESTION.value,
        map_source=_MAP_SOURCE.value,
        processor_max_pixels=_PROCESSOR_MAX_PIXELS.value,
        dtype=_DTYPE.value,
        max_new_tokens=_MAX_NEW.value,
        limit=_LIMIT.value or (SMOKE_LIMIT if _SMOKE.value else 0),
        shard_count=shard_count,
        seed=_SEED.value,
        shard_index=shard_index,
        batch_size=_BATCH.value,
        mesh_shape=_MESH.value,
        max_image_pixels=_MAX_PIXELS.value or None,
        retry_errors=_RETRY_ERRORS.value,
        max_consecutive_errors=_MAX_ERRORS.value,
        progress=_PROGRESS.value,
        high_res=_HIGH_RES.value,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from eval import report
    from eval.runner import load_run_model, run, visualize

    settings = settings_from_flags()
    # One load for the run and the pictures, and none when nothing is left to do.
    model = functools.cache(functools.partial(load_run_model, settings))
    path = run(settings, loader=model)
    print(report.make_report(settings.output_dir))
    print(f"results: {path}")
    if _VISUALIZE.value:
        vis = visualize(settings, _VISUALIZE.value, model())
        if vis:
            print(f"{len(vis)} visualisations in {os.path.dirname(vis[0])}")


if __name__ == "__main__":
    cli.run(main, cli.expected_errors())
