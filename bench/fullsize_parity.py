"""Exact parity at LLaVA-1.5-7B's full width: ours vs HF torch, float32, on the CPU.

  python -m bench.fullsize_parity --dir /tmp/vicrop_fullsize/wide2 [--out r.json]
  VICROP_FULLSIZE=1 python -m pytest tests/test_fullsize.py     # the same, as a test

Writes (or reuses) the "wide2" random checkpoint of bench.fullsize_checkpoint (every width,
head count, vocabulary, image size and token count of 7B; 2 LM and 2 CLIP layers; about 2.9
GB in float32), loads it into transformers' LlavaForConditionalGeneration (eager attention)
and through vicrop_jax.load_model, and checks on one synthetic-benchmark image and question:
  * logits of the whole prompt (<= 1e-4 max abs) and every layer's last-query attention row
    (<= 1e-5), against one torch forward pass;
  * the 24 x 24 rel-att, grad-att and pure-grad maps (vicrop_jax.importance, and rel-att
    from the shared-prefix pass too) at rtol 1e-4 against the official recipe on the torch
    model (vicrop_jax.testing's: attention of separate question and general-prompt
    passes; -cross-entropy against the argmax backpropagated to the attention probabilities
    or the pixels), at the paper's layer for a 2-layer LM (14 of 32 -> 1);
  * the box each map selects (vicrop_jax.bbox against the official loop,
    bench.bbox_reference) identical;
  * 8 greedy tokens identical: the plain generate, the shared-prefix baseline answer and the
    [original, crop] answer against torch's generate.
Prints every figure (max abs and relative errors, seconds a stage, peak RSS) and fails
listing each check that missed its bar.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bench.fullsize_checkpoint import peak_rss_gib, write_checkpoint


def _define_flags():
    """The command line's flags (defined when run as a program, so that modules importing
    this one keep their own)."""
    flags.DEFINE_string("dir", "/tmp/vicrop_fullsize/wide2", "wide2 checkpoint (made if absent)")
    flags.DEFINE_string("out", None, "write the figures as JSON here")


NEW_TOKENS = 8
LOGITS_BAR, ROWS_BAR, MAP_RTOL = 1e-4, 1e-5, 1e-4
# Absolute floors for map cells near zero, relative to the map's largest magnitude (the
# tiny-config tests' floors): grad-att's relu zeroes cells, pure-grad's mask too.
MAP_ATOL = {"rel_att": 0.0, "grad_att": 1e-7, "pure_grad": 1e-6}


def test_image(seed: int = 3, index: int = 0):
    """A synthetic-benchmark item: (RGB image, question)."""
    from eval.synthetic import generate_item

    image, record = generate_item(seed, index)
    return image, record["question"]


def _torch_inputs(proc, text, images):
    return proc(images=images, text=text, return_tensors="pt")


def official_maps(hf, proc, image, question, layers, g, patch, side) -> dict:
    """The official rel-att, grad-att and pure-grad maps on the torch model
    (vicrop_jax.testing's recipe): {method: () -> float[g, g]}."""
    from vicrop_jax import testing
    from vicrop_jax.importance import detail_masks
    from vicrop_jax.processing import llava_prompt

    def pure_grad():
        ratio = testing.official_pixel_grad_norms(hf, proc, llava_prompt, image, question)
        return testing.patch_mean(ratio * detail_masks([image], side)[0], patch)

    return {
        "rel_att": lambda: testing.official_rel_att(
            hf, proc, llava_prompt, image, question, layers
        ).reshape(g, g),
        "grad_att": lambda: testing.official_grad_att(
            hf, proc, llava_prompt, image, question, layers
        ).reshape(g, g),
        "pure_grad": pure_grad,
    }


def torch_generate(hf, proc, text, images) -> list[int]:
    import torch

    enc = _torch_inputs(proc, text, images)
    with torch.no_grad():
        out = hf.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[0, enc["input_ids"].shape[1] :].tolist()


class Checks:
    """Figures and pass/fail lines, collected so that one run reports every miss."""

    def __init__(self):
        self.figures: dict = {}
        self.failures: list[str] = []

    def max_abs(self, name, ours, ref, bar):
        err = float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())
        self.figures[name] = {"max_abs": err, "bar": bar}
        if not err <= bar:
            self.failures.append(f"{name}: max abs {err:.3g} > {bar:g}")

    def close(self, name, ours, ref, rtol, atol_frac):
        ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
        atol = atol_frac * np.abs(ref).max()
        err = np.abs(ours - ref)
        rel = float((err / np.maximum(np.abs(ref), 1e-30)).max())
        worst = float((err / (atol + rtol * np.abs(ref) + 1e-300)).max())  # <= 1 passes
        self.figures[name] = {"max_abs": float(err.max()), "max_rel": rel, "rtol": rtol,
                              "atol": float(atol), "worst_over_bar": worst}  # fmt: skip
        if ref.shape != ours.shape or not worst <= 1.0:
            self.failures.append(f"{name}: max rel {rel:.3g} (atol {atol:.3g}), rtol {rtol:g}")
        if not np.abs(ref).max() > 0:
            self.failures.append(f"{name}: the reference map is all zeros (a vacuous check)")

    def equal(self, name, ours, ref):
        self.figures[name] = {"ours": ours, "torch": ref}
        if ours != ref:
            self.failures.append(f"{name}: ours {ours} != torch {ref}")


def run_parity(path: str) -> dict:
    """Every check of the module docstring on the wide2 checkpoint at `path`.

    Returns {"figures", "seconds", "peak_rss_gib", "failures"}; failures is empty when every
    check met its bar.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    import vicrop_jax
    from bench.bbox_reference import reference_bbox
    from vicrop_jax import bbox as bbox_lib
    from vicrop_jax import prompt_cache
    from vicrop_jax.generate import greedy_generate, trim
    from vicrop_jax.importance import maps_for_images, model_layers
    from vicrop_jax.loading import nchw_to_nhwc
    from vicrop_jax.processing import image_pixels, llava_prompt

    jax.config.update("jax_default_matmul_precision", "highest")
    seconds: dict[str, float] = {}
    rss: dict[str, float] = {}

    def stage(name, t0):
        seconds[name] = time.perf_counter() - t0
        rss[name] = peak_rss_gib()
        print(f"  {name}: {seconds[name]:.1f} s, peak RSS so far {rss[name]:.2f} GiB", flush=True)

    t0 = time.perf_counter()
    write_checkpoint(path, "wide2")
    stage("checkpoint", t0)
    t0 = time.perf_counter()
    hf = LlavaForConditionalGeneration.from_pretrained(
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

    # Logits and last-query attention rows of one forward pass.
    t0 = time.perf_counter()
    enc = proc(images=image, text=llava_prompt(question), return_tensors="np")
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in enc.items()}, output_attentions=True)
    stage("torch_forward", t0)
    t0 = time.perf_counter()
    out = vicrop_jax.forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    jax.block_until_ready(out.logits)
    stage("jax_forward", t0)
    checks.figures["inputs"] = {"image_size": list(image.size), "question": question,
                                "tokens": int(enc["input_ids"].shape[1])}  # fmt: skip
    checks.max_abs("logits", out.logits, ref.logits.numpy(), LOGITS_BAR)
    rows = np.stack([a[:, :, -1].numpy() for a in ref.attentions])
    checks.max_abs("attention_rows", out.attentions, rows, ROWS_BAR)
    del ref, rows

    # Maps against the official recipe, and the boxes they select.
    layers = model_layers(model, None)
    checks.figures["inputs"]["map_layers"] = list(layers)
    official = official_maps(hf, proc, image, question, layers, g, patch, side)
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

    # Greedy tokens: plain generate, the shared-prefix passes (rel-att map, baseline, crop).
    eos = cfg.text_config.eos_ids
    t0 = time.perf_counter()
    ref_tokens = torch_generate(hf, proc, llava_prompt(question), image)
    stage("torch_generate", t0)
    t0 = time.perf_counter()
    gen = greedy_generate(
        model.module, model.params, jnp.asarray(enc["input_ids"]),
        nchw_to_nhwc(enc["pixel_values"]), jnp.asarray(enc["attention_mask"]),
        max_new_tokens=NEW_TOKENS, eos_ids=eos, pad_id=proc.tokenizer.pad_token_id,
        generation=model.generation,
    )  # fmt: skip
    checks.equal("generate_tokens", trim(gen.tokens, gen.lengths)[0], ref_tokens)
    stage("jax_generate", t0)
    t0 = time.perf_counter()
    prompts, args, kwargs = prompt_cache.start_inputs(model, [image], [question],
                                                      max_new_tokens=NEW_TOKENS)  # fmt: skip
    maps, tokens, lengths, cache = prompt_cache.start_pass(*args, **kwargs)
    checks.close("map_rel_att_shared_prefix", np.asarray(maps[0]), ref_maps["rel_att"], MAP_RTOL,
                 MAP_ATOL["rel_att"])  # fmt: skip
    checks.equal("shared_prefix_baseline_tokens", trim(tokens, lengths)[0], ref_tokens)
    box = tuple(int(v) for v in np.asarray(bbox_lib.select_bbox(maps[0], image.size, side)))
    crop = image.crop(box)
    tokens, lengths = prompt_cache.finish_pass(
        model.module, model.params, cache, jnp.asarray(image_pixels(proc, [crop])),
        jnp.asarray(prompts.pair), jnp.asarray(prompts.pair_mask), max_new_tokens=NEW_TOKENS,
        eos_ids=kwargs["eos_ids"], pad_id=kwargs["pad_id"], generation=kwargs["generation"],
        prefix=jnp.asarray(prompts.prefix),
    )  # fmt: skip
    stage("jax_shared_prefix_passes", t0)
    t0 = time.perf_counter()
    ref_crop = torch_generate(hf, proc, llava_prompt(question, 2), [image, crop])
    stage("torch_generate_crop", t0)
    checks.equal("crop_answer_tokens", trim(tokens, lengths)[0], ref_crop)
    return {"figures": checks.figures, "seconds": seconds, "peak_rss_gib": peak_rss_gib(),
            "rss_after_stage_gib": rss, "failures": checks.failures}  # fmt: skip


def report(result: dict) -> str:
    inputs = result["figures"]["inputs"]
    lines = [f"inputs: {inputs}", "", "| check | figure | bar |", "|---|---|---|"]
    for name, f in result["figures"].items():
        if name == "inputs":
            continue
        if "max_rel" in f:
            lines.append(f"| {name} | max abs {f['max_abs']:.3g}, max rel {f['max_rel']:.3g} | "
                         f"rtol {f['rtol']:g} + atol {f['atol']:.3g} |")  # fmt: skip
        elif "max_abs" in f:
            lines.append(f"| {name} | max abs {f['max_abs']:.3g} | {f['bar']:g} |")
        elif "ours" in f:
            same = "identical" if f["ours"] == f["torch"] else "DIFFERENT"
            lines.append(f"| {name} | {same}: {f['ours']} | equal |")
    secs = ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items())
    lines += ["", f"seconds: {secs}", f"peak RSS {result['peak_rss_gib']:.2f} GiB"]
    lines.append(
        "PASS" if not result["failures"] else "FAIL:\n  " + "\n  ".join(result["failures"])
    )
    return "\n".join(lines)


def run_and_report(run, argv) -> None:
    """The parity benches' main: run(--dir) with torch seeded, the JSON to --out, the report
    printed; exit status 1 when a check missed its bar."""
    del argv
    import torch

    f = flags.FLAGS
    torch.manual_seed(0)
    result = run(f.dir)
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(result, fh, indent=2)
    print(report(result))
    if result["failures"]:
        raise SystemExit(1)


def main(argv):
    run_and_report(run_parity, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
