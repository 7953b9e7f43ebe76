"""ViCrop end to end: the official-style PyTorch pipeline vs ours, same weights, one process.

  python -m bench.pipeline                       # tiny random LLaVA built on the fly (CPU)
  python -m bench.pipeline --model DIR --method rel_att --batch_sizes 1,8,32 --out r.json
  python -m bench.pipeline --preset llava-1.5-7b --dtype bfloat16   # random 7B shapes (GPU)

Reference (a): HF transformers LlavaForConditionalGeneration, eager attention, batch 1,
separate passes as the official run.py does them: baseline generate; map forward(s) with
output_attentions (or backward); the loop box search; cropped generate with 2 images.
Ours (b): vicrop_jax.pipeline.ask_batch, jitted, at batch 1 and in batches. Compile time is
reported separately (first call) and excluded from steady-state numbers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

# JAX and PyTorch share the GPU in this process: no JAX preallocation of most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "HF checkpoint dir; default a tiny random one")
_METHOD = flags.DEFINE_enum("method", "rel_att", ["rel_att", "grad_att", "pure_grad"], "map")
_N = flags.DEFINE_integer("questions", 8, "questions timed per configuration")
_BATCHES = flags.DEFINE_string("batch_sizes", "1,8,32", "our batch sizes for throughput")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 20, "answer tokens (official: 20)")
_OUT = flags.DEFINE_string("out", None, "write the results as JSON here")
_PRESET = flags.DEFINE_string(
    "preset", None, "random weights with a full-size preset's shapes (e.g. llava-1.5-7b)"
)
_PRESET_LAYERS = flags.DEFINE_list(
    "preset_layers", [], "vision,text layer counts instead of the preset's (a quick CPU look)"
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "both sides' weights")

QUESTION = "What is written on the red circle?"


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    sizes = [(640, 480), (500, 375), (800, 600), (480, 640)]
    return [
        Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
        for w, h in (sizes[i % len(sizes)] for i in range(n))
    ]


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reference_ask(hf, proc, image, question, method, layer, base, max_new):
    """One question the way the official code runs it (batch 1, separate passes)."""
    import torch

    from bench.bbox_reference import reference_bbox
    from vicrop_jax.processing import GENERAL_QUESTION, llava_prompt

    t = {}
    tok_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    n_img = hf.config.image_seq_length

    def gen(text, images):
        enc = proc(images=images, text=text, return_tensors="pt").to(hf.device)
        enc["pixel_values"] = enc["pixel_values"].to(hf.dtype)
        with torch.no_grad():
            # Stops at EOS, as ours does (and the official run.py's generate).
            out = hf.generate(**enc, max_new_tokens=max_new, do_sample=False)
        _sync()
        return out

    t0 = time.perf_counter()
    gen(llava_prompt(question), [image])
    t["baseline_answer"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = int(round(n_img**0.5))

    def att_row(text, grad=False):
        enc = proc(images=[image], text=text, return_tensors="pt").to(hf.device)
        enc["pixel_values"] = enc["pixel_values"].to(hf.dtype)
        pos = enc["input_ids"][0].tolist().index(tok_id)
        if not grad:
            with torch.no_grad():
                a = hf(**enc, output_attentions=True).attentions[layer]
            return a[0, :, -1, pos : pos + n_img].mean(0).float().cpu().numpy()
        out = hf(**enc, output_attentions=True)
        z = out.logits[:, -1]
        loss = -torch.nn.functional.cross_entropy(z, z.argmax(1))
        (g,) = torch.autograd.grad(loss, out.attentions[layer])
        a = out.attentions[layer] * torch.relu(g)
        return a[0, :, -1, pos : pos + n_img].mean(0).detach().float().cpu().numpy()

    if method == "rel_att":
        m = att_row(llava_prompt(question)) / att_row(llava_prompt(GENERAL_QUESTION))
    elif method == "grad_att":
        m = att_row(llava_prompt(question), grad=True)
    else:
        raise ValueError("the reference benchmark covers rel_att and grad_att")
    t["map"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    box = reference_bbox(m.reshape(grid, grid), image.size, base)
    t["box"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    crop = image.crop(tuple(int(v) for v in box))
    gen(llava_prompt(question, 2), [image, crop])
    t["crop_answer"] = time.perf_counter() - t0
    return t


def _peak_memory() -> dict:
    """Peak device memory of each side where the backend reports it (GPU), else {}."""
    import torch

    out = {}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["ours"] = int(stats["peak_bytes_in_use"])
    if torch.cuda.is_available():
        out["reference"] = int(torch.cuda.max_memory_allocated())
    return out


def main(argv):
    del argv
    import torch
    from transformers import LlavaForConditionalGeneration

    import vicrop_jax
    from vicrop_jax import pipeline
    from vicrop_jax.importance import default_layer

    path = _MODEL.value
    if _PRESET.value:
        from vicrop_jax.tiny import make_preset_checkpoint

        layers = [int(x) for x in _PRESET_LAYERS.value] or [None, None]
        path = make_preset_checkpoint(tempfile.mkdtemp(prefix="vicrop_bench_"), _PRESET.value,
                                      dtype=_DTYPE.value, vision_layers=layers[0],
                                      text_layers=layers[1])  # fmt: skip
    elif path is None:
        from vicrop_jax.tiny import make_random_checkpoint

        path = make_random_checkpoint(tempfile.mkdtemp(prefix="vicrop_bench_"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=getattr(torch, _DTYPE.value)
    ).to(device).eval()  # fmt: skip
    model = vicrop_jax.load_model(path, dtype=getattr(jnp, _DTYPE.value))
    layer = default_layer("llava", model.config.text_config.num_hidden_layers)
    base = model.config.vision_config.image_size
    n, method, max_new = _N.value, _METHOD.value, _MAX_NEW.value
    images = make_images(max(n, max(int(b) for b in _BATCHES.value.split(","))))
    res = {"model": path, "preset": _PRESET.value, "dtype": _DTYPE.value, "method": method,
           "questions": n, "max_new_tokens": max_new, "jax_device": str(jax.devices()[0]),
           "torch_device": device}  # fmt: skip

    # (a) reference, batch 1
    reference_ask(hf, model.processor, images[0], QUESTION, method, layer, base, max_new)  # warm
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    for im in images[:n]:
        for k, v in reference_ask(hf, model.processor, im, QUESTION, method, layer, base,
                                  max_new).items():  # fmt: skip
            stages[k] = stages.get(k, 0.0) + v / n
    ref_latency = (time.perf_counter() - t0) / n
    res["reference"] = {"latency_s": ref_latency, "stages_s": stages}

    # (b) ours: compile (first call), then steady state at each batch size
    ours = {}
    for b in (int(x) for x in _BATCHES.value.split(",")):
        batch = images[:b]
        t0 = time.perf_counter()
        pipeline.ask_batch(model, batch, [QUESTION] * b, method=method, layer=layer,
                           max_new_tokens=max_new)  # fmt: skip
        compile_s = time.perf_counter() - t0
        reps = max(1, n // b)
        t0 = time.perf_counter()
        st: dict[str, float] = {}
        for _ in range(reps):
            out = pipeline.ask_batch(model, batch, [QUESTION] * b, method=method, layer=layer,
                                     max_new_tokens=max_new)  # fmt: skip
            for k, v in out[0].timings.items():
                st[k] = st.get(k, 0.0) + v / (reps * b)
        per_q = (time.perf_counter() - t0) / (reps * b)
        ours[b] = {"per_question_s": per_q, "questions_per_s": 1 / per_q,
                   "first_call_s": compile_s, "stages_per_question_s": st}  # fmt: skip
    res["ours"] = ours
    res["peak_memory_bytes"] = _peak_memory()
    res["speedup_latency_b1"] = ref_latency / ours[min(ours)]["per_question_s"]
    res["speedup_throughput"] = {b: ref_latency / o["per_question_s"] for b, o in ours.items()}

    print(f"| pipeline ({method}) | s/question | questions/s | vs reference |")
    print("|---|---|---|---|")
    print(f"| reference, batch 1 | {ref_latency:.4f} | {1 / ref_latency:.1f} | 1.0x |")
    for b, o in ours.items():
        print(f"| ours, batch {b} | {o['per_question_s']:.4f} | {o['questions_per_s']:.1f} | "
              f"{ref_latency / o['per_question_s']:.1f}x |")  # fmt: skip
    print("stages (s/question): reference", {k: round(v, 4) for k, v in stages.items()})
    for b, o in ours.items():
        print(f"  ours b={b}", {k: round(v, 4) for k, v in o["stages_per_question_s"].items()},
              f"first call {o['first_call_s']:.1f}s")  # fmt: skip
    print("device:", res["jax_device"], "| peak memory:", res["peak_memory_bytes"])
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    app.run(main)
