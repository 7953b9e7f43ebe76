"""XLA compile time of every pass a ViCrop question runs, at a full-size preset's shapes.

  python -m bench.compile_time --preset llava-1.5-7b          # bf16, batch 1
  python -m bench.compile_time --preset llava-1.5-13b --out r.json

Lowers and compiles each jitted pass for the default backend with abstract parameters
(jax.ShapeDtypeStruct: no weights, as bench.memory does) and reports, per pass, the seconds
to trace and lower it to StableHLO and the seconds XLA takes to compile that (the first
call's wait before any computation):
  * rel-att, shared prefix (vicrop_jax.prompt_cache): start_pass (the prefix and the
    [question; general] tails, the map, the baseline answer) and finish_pass (the crop's
    vision tower, the [original, crop] tail, its answer): the two passes of one rel-att
    question; their sum is checked against --bar_s;
  * answer_pass (the baseline answer without a map: grad-att and pure-grad questions), the
    grad-att and pure-grad map passes (vicrop_jax.families.llava.llava_maps), the unshared
    rel-att map pass, and the plain greedy generate (one image, vicrop_jax.generate).
Prompt lengths follow the hub tokenizer's: the question prompt's text after the image is
about 30 tokens, bucketed to --text_tokens. JAX's persistent compilation cache is off for
the run, so every figure is a fresh compile.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from absl import flags


def _define_flags():
    """The command line's flags (defined when run as a program, so that modules importing
    this one keep their own)."""
    flags.DEFINE_list("preset", ["llava-1.5-7b"], "vicrop_jax.models.llava.PRESETS names")
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "weights and cache")
    flags.DEFINE_integer("batch", 1, "questions per pass")
    flags.DEFINE_integer("text_tokens", 32, "a prompt's text tokens after the first image")
    flags.DEFINE_integer("max_new_tokens", 20, "answer tokens (official: 20)")
    flags.DEFINE_float("bar_s", 60.0, "rel-att's passes (start + finish) must compile within")
    flags.DEFINE_list("passes", [], "only these passes (default: all)")
    flags.DEFINE_integer(
        "repeat", 1, "compile each pass this many times afresh and keep the fastest (the machine's "
        "other work only ever adds time)",
    )  # fmt: skip
    flags.DEFINE_string("out", None, "write the results as JSON here")


REL_ATT_PASSES = ("start_pass", "finish_pass")
PAD_ID = 32001


def pass_lowerings(config, batch: int, dtype, *, text_tokens: int, max_new_tokens: int) -> dict:
    """{pass name: () -> jax.stages.Lowered} for abstract params of `config`."""
    from vicrop_jax import prompt_cache
    from vicrop_jax.families import family_of
    from vicrop_jax.families.llava import llava_maps
    from vicrop_jax.generate import greedy_generate, init_cache
    from vicrop_jax.loading import module_for
    from vicrop_jax.models.llava import abstract_params

    module = module_for(config)
    params = abstract_params(config, dtype)
    s = jax.ShapeDtypeStruct
    v = config.vision_config
    t = config.num_image_tokens
    p = 1 + t  # BOS and the first image: the shared prefix
    bucket = lambda n: -(-n // 8) * 8  # noqa: E731
    l1 = bucket(text_tokens)
    l2 = bucket(t + text_tokens)  # the crop's tokens, then the text
    full = bucket(p + text_tokens)  # an unshared one-image prompt
    pixels = s((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
    ids = lambda rows, n: s((rows, n), jnp.int32)  # noqa: E731
    layers = family_of(config).layers(config)
    common = dict(max_new_tokens=max_new_tokens, eos_ids=(2,), pad_id=PAD_ID)
    cache = jax.eval_shape(lambda: init_cache(config, batch, p, dtype))
    prefix = s((p,), jnp.int32)

    def maps(method):
        detail = s((batch, v.image_size, v.image_size), bool) if method == "pure_grad" else None
        return lambda: llava_maps.lower(
            module, params, ids(2 * batch, full), ids(2 * batch, full), pixels, detail,
            method=method, layers=() if method == "pure_grad" else layers,
        )  # fmt: skip

    return {
        "start_pass": lambda: prompt_cache.start_pass.lower(
            module, params, prefix, pixels, ids(2 * batch, l1), ids(2 * batch, l1),
            layers=layers, image_start=1, **common,
        ),
        "finish_pass": lambda: prompt_cache.finish_pass.lower(
            module, params, cache, pixels, ids(batch, l2), ids(batch, l2), **common
        ),
        "answer_pass": lambda: prompt_cache.answer_pass.lower(
            module, params, prefix, pixels, ids(batch, l1), ids(batch, l1), **common
        ),
        "grad_att_map": maps("grad_att"),
        "pure_grad_map": maps("pure_grad"),
        "rel_att_map_unshared": maps("rel_att"),
        "greedy_generate": lambda: greedy_generate.lower(
            module, params, ids(batch, full), pixels, ids(batch, full), **common
        ),
    }  # fmt: skip


def compile_times(config, batch: int, dtype, *, text_tokens: int, max_new_tokens: int,
                  passes=(), repeat: int = 1) -> dict:  # fmt: skip
    """{pass: {"lower_s", "compile_s", "total_s"}}, each pass traced, lowered and compiled
    afresh (JAX's in-memory caches cleared first), the fastest of `repeat` tries."""
    out = {}
    todo = pass_lowerings(config, batch, dtype, text_tokens=text_tokens,
                          max_new_tokens=max_new_tokens)  # fmt: skip
    for _ in range(repeat):
        for name, lower in todo.items():
            if passes and name not in passes:
                continue
            jax.clear_caches()
            t0 = time.perf_counter()
            lowered = lower()
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            r = {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}
            print(f"  {name}: lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s", flush=True)
            if name not in out or r["total_s"] < out[name]["total_s"]:
                out[name] = r
    return out


def table(results: dict, bar: float) -> str:
    lines = [
        "| preset | pass | trace + lower s | XLA compile s | total s |",
        "|---|---|---|---|---|",
    ]
    for preset, passes in results.items():
        for name, r in passes.items():
            lines.append(f"| {preset} | {name} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
                         f"{r['total_s']:.1f} |")  # fmt: skip
        if all(n in passes for n in REL_ATT_PASSES):
            rel = sum(passes[n]["total_s"] for n in REL_ATT_PASSES)
            xla = sum(passes[n]["compile_s"] for n in REL_ATT_PASSES)
            verdict = "within" if rel <= bar else "**over**"
            lines.append(f"| {preset} | rel-att (start + finish) | | {xla:.1f} | {rel:.1f} "
                         f"({verdict} {bar:g} s) |")  # fmt: skip
        every = sum(r["total_s"] for r in passes.values())
        lines.append(f"| {preset} | every pass above | | | {every:.1f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    import platform
    import resource

    from vicrop_jax.models.llava import LlavaConfig
    from vicrop_jax.testing import preset_config_dict

    f = flags.FLAGS
    jax.config.update("jax_enable_compilation_cache", False)
    load_before = os.getloadavg()[0]
    dtype = jnp.bfloat16 if f.dtype == "bfloat16" else jnp.float32
    results = {}
    for preset in f.preset:
        print(f"{preset}:", flush=True)
        config = LlavaConfig.from_dict(preset_config_dict(preset, 32000))
        results[preset] = compile_times(
            config, f.batch, dtype, text_tokens=f.text_tokens,
            max_new_tokens=f.max_new_tokens, passes=tuple(f.passes), repeat=f.repeat,
        )  # fmt: skip
    device = jax.devices()[0]
    load = (load_before, os.getloadavg()[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cpu = platform.processor() or platform.machine()
    print(f"\n# XLA compile time (fastest of {f.repeat}): {f.dtype}, batch "
          f"{f.batch}, text {f.text_tokens} tokens, {f.max_new_tokens} answer tokens; backend "
          f"{device.platform} ({cpu}, {os.cpu_count()} CPUs, 1-min load average {load[0]:.1f} "
          f"before, {load[1]:.1f} after); peak RSS {peak:.2f} GiB\n")  # fmt: skip
    print(table(results, f.bar_s))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump({"dtype": f.dtype, "batch": f.batch, "repeat": f.repeat,
                       "text_tokens": f.text_tokens, "max_new_tokens": f.max_new_tokens,
                       "peak_rss_gib": peak, "load_average": load, "results": results},
                      fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
