"""HF torch's maps and boxes for bench.fullsize's questions, in a process of their own.

  python -m bench.fullsize --dir DIR --methods rel_att,grad_att,pure_grad --sizes 640x480 \
      --out ours.json --maps_out ours.npz
  python -m bench.fullsize_reference --dir DIR --methods rel_att,grad_att,pure_grad \
      --sizes 640x480 --ours ours.npz --ours_json ours.json --out ref.json

Loads the same checkpoint into transformers' LlavaForConditionalGeneration or
InstructBlipForConditionalGeneration (eager attention,
--dtype, parameters without gradients), asks bench.fullsize's question of the same image for
each method with the official recipe (vicrop_jax.testing's: attention of the question and
the general-prompt passes; -cross-entropy against the argmax backpropagated to the attention
probabilities or the pixels) at the paper's layer, and selects each map's box with the
official loop (bench.bbox_reference). With --ours (bench.fullsize's --maps_out) it reports,
per map, the relative error of ours against torch's (Frobenius norm of the difference over
torch's, and the largest cell difference over torch's largest cell), the Pearson correlation,
whether the two maps' top cells agree, and whether the boxes are the same (ours from
--ours_json, or the official loop on our map).

Run after bench.fullsize, not beside it: each process holds the whole checkpoint.

  python -m bench.fullsize_reference --truth torch_f32.npz --compare ours_bf16.npz,torch_bf16.npz

compares saved maps only (no model): each file's maps against --truth's of the same key (e.g.
both bfloat16 implementations against torch float32 on a checkpoint that fits in float32).
"""

from __future__ import annotations

import functools
import json
import os
import time

import numpy as np
from absl import flags


def _define_flags():
    """The command line's flags (defined when run as a program)."""
    flags.DEFINE_string("dir", "/tmp/vicrop_fullsize/full", "HF checkpoint directory")
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "torch weights dtype")
    flags.DEFINE_list(
        "methods", ["rel_att", "grad_att", "pure_grad"],
        "map methods, each optionally *_high (the official tiles, their maps merged)")  # fmt: skip
    flags.DEFINE_list("sizes", ["640x480"], "image sizes WxH")
    flags.DEFINE_string("ours", None, "bench.fullsize --maps_out file to compare against")
    flags.DEFINE_string("ours_json", None, "bench.fullsize --out file (its boxes)")
    flags.DEFINE_string("out", None, "write the results as JSON here")
    flags.DEFINE_string("maps_out", None, "write torch's maps here (.npz)")
    flags.DEFINE_string("truth", None, "with --compare: the maps (.npz) to compare against")
    flags.DEFINE_list("compare", [], "with --truth: map files (.npz) to compare, no model")


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Figures of one map against the reference map of the same grid."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return {"shape_ours": list(ours.shape), "shape_torch": list(ref.shape)}
    diff = ours - ref
    return {
        "rel_fro": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
        "max_abs_over_max": float(np.abs(diff).max() / np.abs(ref).max()),
        "pearson": float(np.corrcoef(ours.ravel(), ref.ravel())[0, 1]),
        "same_argmax": bool(np.argmax(ours) == np.argmax(ref)),
    }


def compare_files(truth: str, others) -> list[dict]:
    """Each file's maps against truth's of the same key: [{key, file, **compare}]."""
    ref = np.load(truth)
    out = []
    for path in others:
        maps = np.load(path)
        for key in ref.files:
            if key in maps.files:
                out.append({"key": key, "file": path, **compare(maps[key], ref[key])})
                print(json.dumps(out[-1]), flush=True)
    return out


def official_map(maps_of, image, method: str) -> np.ndarray:
    """The official map of one method; maps_of(image) -> {method: () -> map} (the family's
    recipes on the torch model). "*_high": the official tiles' maps (one at a time),
    merged as the official code does."""
    from bench.bbox_reference import reference_grid, reference_merge, reference_tiles

    base = method.removesuffix("_high")
    if base == method:
        return np.asarray(maps_of(image)[base](), np.float32)
    tiles = [image.crop(t) for t in reference_tiles(image.size)]
    maps = [np.asarray(maps_of(t)[base](), np.float32) for t in tiles]
    return reference_merge(maps, *reference_grid(image.size))


def torch_recipes(config, layers):
    """(transformers model class, official_maps(hf, proc, image, question) -> {method: () ->
    map}) of a LLaVA or InstructBLIP config."""
    from transformers import InstructBlipForConditionalGeneration, LlavaForConditionalGeneration

    from bench import fullsize_parity, fullsize_parity_instructblip
    from vicrop_jax.families.instructblip import default_qformer_layer

    v = config.vision_config
    shapes = (v.grid, v.patch_size, v.image_size)
    if config.model_type == "llava":
        return (
            LlavaForConditionalGeneration,
            lambda hf, proc, image, question: fullsize_parity.official_maps(
                hf, proc, image, question, layers, *shapes
            ),
        )
    if config.model_type == "instructblip":
        q = default_qformer_layer(len(config.qformer_config.cross_attention_layers))
        return (
            InstructBlipForConditionalGeneration,
            lambda hf, proc, image, question: fullsize_parity_instructblip.official_maps(
                hf, proc, image, question, layers, q, *shapes
            ),
        )
    raise ValueError(f"--dir: a {config.model_type} checkpoint; llava or instructblip only")


def main(argv):
    del argv
    f = flags.FLAGS
    if f.truth or f.compare:
        if not (f.truth and f.compare):
            raise ValueError("--truth and --compare go together")
        rows = compare_files(f.truth, f.compare)
        if f.out:
            with open(f.out, "w") as fh:
                json.dump(rows, fh, indent=2)
        return
    import torch

    from bench.bbox_reference import reference_bbox
    from bench.fullsize import question_image
    from bench.fullsize_load import peak_rss_gib
    from vicrop_jax.families import family_of
    from vicrop_jax.loading import load_processor, parse_config

    torch.manual_seed(0)
    with open(os.path.join(f.dir, "config.json")) as fh:
        config = parse_config(json.load(fh))
    layers = family_of(config).layers(config)
    hf_class, official_maps = torch_recipes(config, layers)
    side = config.vision_config.image_size
    ours = dict(np.load(f.ours)) if f.ours else {}
    ours_boxes = {}
    if f.ours_json:
        with open(f.ours_json) as fh:
            for q in json.load(fh)["questions"]:
                ours_boxes[f"{q['size'][0]}x{q['size'][1]}_{q['method']}"] = q["box"]

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if f.dtype == "bfloat16" else torch.float32
    hf = hf_class.from_pretrained(f.dir, dtype=dtype, attn_implementation="eager").eval()
    hf.requires_grad_(False)  # gradients flow to activations and pixels only
    proc = load_processor(f.dir)
    result = {"dir": f.dir, "dtype": f.dtype, "layers": list(layers), "threads":
              torch.get_num_threads(), "load_s": time.perf_counter() - t0,
              "load_peak_rss_gib": peak_rss_gib(), "questions": []}  # fmt: skip
    print(f"torch load: {result['load_s']:.1f} s, peak RSS {result['load_peak_rss_gib']:.2f} GiB; "
          f"layers {list(layers)}", flush=True)  # fmt: skip
    maps = {}

    def save():
        if f.out:
            with open(f.out, "w") as fh:
                json.dump(result, fh, indent=2)
        if f.maps_out:
            np.savez(f.maps_out, **maps)

    for size in f.sizes:
        w, h = (int(v) for v in size.split("x"))
        image, question, _ = question_image(w, h)
        maps_of = functools.partial(official_maps, hf, proc, question=question)
        for method in f.methods:
            key = f"{w}x{h}_{method}"
            t1 = time.perf_counter()
            ref = official_map(maps_of, image, method)
            maps[key] = ref
            q = {"key": key, "question": question, "seconds": time.perf_counter() - t1,
                 "peak_rss_gib": peak_rss_gib(),
                 "box_torch": list(reference_bbox(ref, image.size, side))}  # fmt: skip
            if key in ours:
                q.update(compare(ours[key], ref))
                q["box_ours_official_loop"] = list(reference_bbox(ours[key], image.size, side))
            if key in ours_boxes:
                q["box_ours"] = list(ours_boxes[key])
                q["same_box"] = q["box_ours"] == q["box_torch"]
            print(f"  {key}: {json.dumps(q)}", flush=True)
            result["questions"].append(q)
            save()
    result["peak_rss_gib"] = peak_rss_gib()
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
