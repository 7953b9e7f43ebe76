"""Exact parity at InstructBLIP-Vicuna-7B's full width: ours vs HF torch, float32, on the CPU.

  flock /work/wt/heavy.lock nice -n 5 python -m bench.fullsize_parity_instructblip \\
      --dir /tmp/vicrop_fullsize/blip_wide2 [--out r.json]
  VICROP_FULLSIZE=1 python -m pytest tests/test_fullsize.py -k instructblip   # as a test

Writes (or reuses) bench.fullsize_checkpoint's InstructBLIP "wide2" checkpoint (every width,
head count, vocabulary, image size and token count of the 7B: ViT-g 1408 wide at 224 px, 257
positions, the whole 12-layer Q-Former with 32 queries, Vicuna 4096 wide with 32064 rows; 2 LM
and 2 ViT layers; 3.6 GB in float32), loads it into transformers'
InstructBlipForConditionalGeneration (eager attention) and through vicrop_jax.load_model, and
checks on one synthetic-benchmark image and question (bench.fullsize_parity's bars):
  * logits of the whole prompt (<= 1e-4 max abs), every LM layer's last-query attention row
    and every Q-Former cross-attention map (<= 1e-5), against one torch forward pass;
  * the 16 x 16 rel-att, grad-att and pure-grad maps (vicrop_jax.importance) at rtol 1e-4
    against the paper's formulas on the torch model (vicrop_jax.testing's official_blip_*:
    A_si = A_st @ A_ti from separate question and general-prompt passes; the attentions
    weighted by relu of the gradient of -cross-entropy against the argmax; the pixel
    gradient ratio), at the paper's layers for this depth: LM layer 15 of 32 -> 1 of 2, the
    Q-Former's cross-attention layer 2 of 6 (the real one: the Q-Former keeps its depth);
  * the box each map selects (vicrop_jax.bbox against the official loop,
    bench.bbox_reference) identical;
  * 8 greedy tokens identical: the plain answer and the [original, crop] answer (2 x 32 image
    tokens, the Q-Former instruction once per image) against torch's generate.
Prints every figure and fails listing each check that missed its bar.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bench.fullsize_checkpoint import peak_rss_gib, write_checkpoint
from bench.fullsize_parity import (
    LOGITS_BAR,
    MAP_ATOL,
    MAP_RTOL,
    NEW_TOKENS,
    ROWS_BAR,
    Checks,
    run_and_report,
    test_image,
)


def _define_flags():
    """The command line's flags (defined when run as a program)."""
    flags.DEFINE_string("dir", "/tmp/vicrop_fullsize/blip_wide2",
                        "InstructBLIP wide2 checkpoint (made if absent)")  # fmt: skip
    flags.DEFINE_string("out", None, "write the figures as JSON here")


def official_maps(hf, proc, image, question, layers, qformer_layer, g, patch, side) -> dict:
    """The paper's rel-att, grad-att and pure-grad maps on the torch model:
    {method: () -> float[g, g]}."""
    from vicrop_jax import testing
    from vicrop_jax.importance import detail_masks
    from vicrop_jax.processing import blip_prompt

    def pure_grad():
        ratio = testing.official_blip_pixel_grad_norms(hf, proc, blip_prompt, image, question)
        return testing.patch_mean(ratio * detail_masks([image], side)[0], patch)

    args = (hf, proc, blip_prompt, image, question, layers, qformer_layer)
    return {
        "rel_att": lambda: testing.official_blip_rel_att(*args).reshape(g, g),
        "grad_att": lambda: testing.official_blip_grad_att(*args).reshape(g, g),
        "pure_grad": pure_grad,
    }


def torch_generate(hf, enc) -> list[int]:
    """HF generate's new tokens for the encoded prompt (numpy inputs)."""
    import torch

    inputs = {k: torch.tensor(v) for k, v in enc.items()}
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def run_parity(path: str, config: dict | None = None) -> dict:
    """Every check of the module docstring on the InstructBLIP wide2 checkpoint at `path`
    (config: an InstructBlipConfig dict in place of wide2's, for narrower trial runs).

    Returns {"figures", "seconds", "peak_rss_gib", "rss_after_stage_gib", "failures"};
    failures is empty when every check met its bar.
    """
    import torch
    from transformers import InstructBlipForConditionalGeneration

    import vicrop_jax
    from bench.bbox_reference import reference_bbox
    from vicrop_jax import bbox as bbox_lib
    from vicrop_jax.families.instructblip import default_qformer_layer
    from vicrop_jax.generate import greedy_generate, trim
    from vicrop_jax.importance import maps_for_images, model_layers
    from vicrop_jax.loading import nchw_to_nhwc
    from vicrop_jax.processing import blip_prompt, encode
    from vicrop_jax.testing import blip_hf_forward

    jax.config.update("jax_default_matmul_precision", "highest")
    seconds: dict[str, float] = {}
    rss: dict[str, float] = {}

    def stage(name, t0):
        seconds[name] = time.perf_counter() - t0
        rss[name] = peak_rss_gib()
        print(f"  {name}: {seconds[name]:.1f} s, peak RSS so far {rss[name]:.2f} GiB", flush=True)

    t0 = time.perf_counter()
    write_checkpoint(path, "wide2", config=config, family="instructblip")
    stage("checkpoint", t0)
    t0 = time.perf_counter()
    hf = InstructBlipForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    hf.requires_grad_(False)  # only inputs need gradients: no param gradient buffers
    stage("load_torch", t0)
    t0 = time.perf_counter()
    model = vicrop_jax.load_model(path)
    stage("load_jax", t0)

    cfg = model.config
    proc = model.processor
    g = cfg.vision_config.grid
    side, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    image, question = test_image()
    checks = Checks()
    extra = lambda e: {k: jnp.asarray(v) for k, v in e.items() if k.startswith("qformer_")}  # noqa: E731

    # Logits, LM last-query rows and Q-Former cross-attentions of one forward pass.
    t0 = time.perf_counter()
    enc = encode(proc, [blip_prompt(question)], [image])
    with torch.no_grad():
        tenc = {k: torch.tensor(v) for k, v in enc.items()}
        ref, ref_cross = blip_hf_forward(hf, tenc, tenc["pixel_values"])
    stage("torch_forward", t0)
    t0 = time.perf_counter()
    out = vicrop_jax.forward(
        model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
        qformer_input_ids=enc["qformer_input_ids"],
        qformer_attention_mask=enc["qformer_attention_mask"],
    )  # fmt: skip
    jax.block_until_ready(out.logits)
    stage("jax_forward", t0)
    checks.figures["inputs"] = {
        "image_size": list(image.size), "question": question,
        "tokens": int(enc["input_ids"].shape[1]),
        "qformer_tokens": int(enc["qformer_input_ids"].shape[1]),
    }  # fmt: skip
    checks.max_abs("logits", out.logits, ref.logits.numpy(), LOGITS_BAR)
    rows = np.stack([a[:, :, -1].numpy() for a in ref.language_model_outputs.attentions])
    checks.max_abs("attention_rows", out.attentions, rows, ROWS_BAR)
    cross = np.stack([c.numpy() for c in ref_cross])
    checks.max_abs("qformer_cross_attentions", out.qformer_cross_attentions, cross, ROWS_BAR)
    del ref, ref_cross, rows, cross

    # Maps against the paper's formulas, and the boxes they select.
    layers = model_layers(model, None)
    qlayer = default_qformer_layer(len(cfg.qformer_config.cross_attention_layers))
    checks.figures["inputs"].update(map_layers=list(layers), qformer_layer=qlayer)
    official = official_maps(hf, proc, image, question, layers, qlayer, g, patch, side)
    ref_maps = {}
    for method, fn in official.items():
        t0 = time.perf_counter()
        ref_maps[method] = fn()
        stage(f"torch_{method}", t0)
        t0 = time.perf_counter()
        ours = np.asarray(maps_for_images(model, [image], [question], method=method)[0])
        stage(f"jax_{method}", t0)
        checks.close(f"map_{method}", ours, ref_maps[method], MAP_RTOL, MAP_ATOL[method])
        box = [int(v) for v in np.asarray(bbox_lib.select_bbox(ours, image.size, side))]
        checks.equal(f"box_{method}", box, list(reference_bbox(ref_maps[method], image.size, side)))

    # Greedy tokens: the plain answer, then the [original, crop] answer for rel-att's box.
    eos, pad = cfg.text_config.eos_ids, proc.tokenizer.pad_token_id

    def ours_generate(e):
        gen = greedy_generate(
            model.module, model.params, jnp.asarray(e["input_ids"]),
            nchw_to_nhwc(e["pixel_values"]), jnp.asarray(e["attention_mask"]),
            max_new_tokens=NEW_TOKENS, eos_ids=eos, pad_id=pad, extra=extra(e),
            generation=model.generation,
        )  # fmt: skip
        return trim(gen.tokens, gen.lengths)[0]

    for name, images in [("generate_tokens", [image]), ("crop_answer_tokens", None)]:
        if images is None:
            box = bbox_lib.select_bbox(ref_maps["rel_att"], image.size, side)
            images = [image, image.crop(tuple(int(v) for v in np.asarray(box)))]
        e = encode(proc, [blip_prompt(question)], images)
        t0 = time.perf_counter()
        ref_tokens = torch_generate(hf, e)
        stage(f"torch_{name}", t0)
        t0 = time.perf_counter()
        checks.equal(name, ours_generate(e), ref_tokens)
        stage(f"jax_{name}", t0)
    return {"figures": checks.figures, "seconds": seconds, "peak_rss_gib": peak_rss_gib(),
            "rss_after_stage_gib": rss, "failures": checks.failures}  # fmt: skip


def main(argv):
    run_and_report(run_parity, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
