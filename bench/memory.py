"""Device memory of the rel-att ViCrop passes at a full-size preset's shapes, no weights.

  python -m bench.memory --preset llava-1.5-7b --dtype bfloat16 --batch_sizes 1,8,32
  python -m bench.memory --model DIR --batch_sizes 32     # DIR's config.json gives the shapes
  python -m bench.memory --preset llava-1.5-13b --mesh_shape data:1,model:2 --budget_gib 24

With --mesh_shape, the per-device plan of the preset (any family's PRESETS) on a (data, model)
mesh: each param's bytes on one device from its family's partition rules
(vicrop_jax.sharding; jax.eval_shape of the params, nothing compiled or allocated, no device
needed), and the KV cache of a batch (rows over data, key/value heads over model); a mesh
whose model axis does not divide a split dimension is refused. Activations are not in it:
the compiled plans below give them on one device.

Compiles vicrop_jax.prefix's three jitted passes (start_pass: prefix, question and general
tails, maps, baseline answers; answer_pass: the same without maps; finish_pass: the crops'
vision tower and the [original, crop] tails, their answers) for the default backend with
abstract parameters (jax.ShapeDtypeStruct: nothing is allocated, so a 7B preset compiles on
a laptop) and reports XLA's buffer assignment for each (`compiled.memory_analysis()`):
argument, output and temporary bytes, and their sum less aliased bytes: what the pass needs
on the device while it runs. The weights and the prefix cache are arguments (the cache is
start_pass's output and stays alive until finish_pass), so the largest sum is the pipeline's
peak, before the runtime's own overhead. On a GPU this is the GPU's plan. On a CPU it is
XLA's CPU plan for the same program: fusion and layout differ from a GPU's, and the CPU
computes bfloat16 dots in float32, so a bfloat16 plan there carries float32 copies of the
weights and of the prefix cache (some hoisted out of the decode loop) that a GPU does not
make; `--dtype float32` gives a CPU plan without those conversions (every big buffer, the
weights and the caches, then twice its bfloat16 size).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import flags

_PRESET = flags.DEFINE_string("preset", "llava-1.5-7b", "vicrop_jax.models.llava.PRESETS name")
_MODEL = flags.DEFINE_string("model", None, "a LLaVA checkpoint directory whose config.json "
                             "gives the shapes instead of --preset")  # fmt: skip
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "weights and cache")
_BATCHES = flags.DEFINE_list("batch_sizes", ["32"], "questions per pass")
_TAIL = flags.DEFINE_integer(
    "text_tokens", 48, "a prompt's text tokens after the first image (bucketed to 8)"
)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 20, "answer tokens (official: 20)")
_LAYER = flags.DEFINE_integer("layer", 14, "rel-att map layer")
_BUDGET = flags.DEFINE_float("budget_gib", 80e9 / 2**30, "device memory to compare against")
_OUT = flags.DEFINE_string("out", None, "write the results as JSON here")
_MESH = flags.DEFINE_string(
    "mesh_shape", "", "plan the preset on a (data, model) mesh, e.g. data:1,model:2 (per-device "
    "weights and KV cache; no compile); empty: XLA's plans of the passes on one device"
)  # fmt: skip
_CACHE = flags.DEFINE_integer(
    "cache_tokens", 1280, "KV cache slots a row holds in the mesh plan (prompt + answer)"
)

GIB = 2**30


def plan(compiled) -> dict:
    """XLA's buffer assignment of a compiled program, GiB."""
    m = compiled.memory_analysis()
    args, out = m.argument_size_in_bytes, m.output_size_in_bytes
    temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
    return {
        "args_gib": args / GIB,
        "out_gib": out / GIB,
        "temp_gib": temp / GIB,
        "alias_gib": alias / GIB,
        "total_gib": (args + out + temp - alias) / GIB,
    }


def pass_plans(config, batch: int, dtype, *, text_tokens: int, max_new_tokens: int,
               layer: int) -> dict:  # fmt: skip
    """{pass name: plan} for one batch size, with abstract params of `config`."""
    from vicrop_jax import prompt_cache
    from vicrop_jax.generate import init_cache
    from vicrop_jax.loading import module_for
    from vicrop_jax.models.llava import abstract_params

    module = module_for(config)
    params = abstract_params(config, dtype)
    s = jax.ShapeDtypeStruct
    v = config.vision_config
    t = config.num_image_tokens
    p = 1 + t  # BOS and the first image
    l1 = -(-text_tokens // 8) * 8
    l2 = -(-(t + text_tokens) // 8) * 8  # the crop's tokens, then the text
    pixels = s((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
    ids = lambda rows, n: s((rows, n), jnp.int32)  # noqa: E731
    common = dict(max_new_tokens=max_new_tokens, eos_ids=(2,), pad_id=0)
    out = {}
    t0 = time.perf_counter()
    c = prompt_cache.start_pass.lower(
        module, params, s((p,), jnp.int32), pixels, ids(2 * batch, l1), ids(2 * batch, l1),
        layers=(layer,), image_start=1, **common,
    ).compile()  # fmt: skip
    out["start_pass"] = {**plan(c), "compile_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    c = prompt_cache.answer_pass.lower(module, params, s((p,), jnp.int32), pixels, ids(batch, l1),
                                 ids(batch, l1), **common).compile()  # fmt: skip
    out["answer_pass"] = {**plan(c), "compile_s": time.perf_counter() - t0}
    cache = jax.eval_shape(lambda: init_cache(config, batch, p, dtype))
    t0 = time.perf_counter()
    c = prompt_cache.finish_pass.lower(
        module, params, cache, pixels, ids(batch, l2), ids(batch, l2), **common
    ).compile()  # fmt: skip
    out["finish_pass"] = {**plan(c), "compile_s": time.perf_counter() - t0}
    return out


def find_preset(name: str):
    """The config of a preset name from any family's models.PRESETS."""
    from vicrop_jax.families import FAMILIES

    for fam in FAMILIES.values():
        if name in getattr(fam.models, "PRESETS", {}):
            return fam.models.PRESETS[name]
    known = sorted(p for f in FAMILIES.values() for p in getattr(f.models, "PRESETS", {}))
    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(known)}")


def mesh_plan(config, shape: tuple[int, int], dtype, *, batch: int, cache_tokens: int) -> dict:
    """Bytes one device holds on a (data, model) mesh of `shape`: the params by the family's
    partition rules (split over model / replicated), the largest param shard, and the KV
    cache of `batch` rows of `cache_tokens` slots. Nothing is allocated."""
    from vicrop_jax import sharding
    from vicrop_jax.families import family_of
    from vicrop_jax.loading import param_specs

    family = family_of(config)
    sizes = dict(zip(sharding.AXES, shape, strict=True))
    sharding.check_model_axis(family.model_split_sizes(config), sizes[sharding.MODEL])
    params = family.abstract_params(config, dtype)
    specs = param_specs(config, params)
    split = replicated = largest = 0
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for x, spec in zip(jax.tree.leaves(params), leaves, strict=True):
        n = sharding.shard_bytes(x.shape, x.dtype, spec, sizes)
        largest = max(largest, n)
        if any(a is not None for a in spec):
            split += n
        else:
            replicated += n
    t = config.text_config
    layer = (batch, cache_tokens, t.num_key_value_heads, t.head_dim)
    cache = 2 * t.num_hidden_layers * sharding.shard_bytes(layer, dtype, sharding.CACHE_SPEC, sizes)
    return {
        "mesh": list(shape),
        "weights_split_gib": split / GIB,
        "weights_replicated_gib": replicated / GIB,
        "largest_param_gib": largest / GIB,
        "kv_cache_gib": cache / GIB,
        "total_gib": (split + replicated + cache) / GIB,
        "batch": batch,
        "cache_tokens": cache_tokens,
    }


def mesh_table(plans: list[dict], budget: float) -> str:
    lines = [
        "| mesh (data x model) | batch | weights split GiB | weights replicated GiB | "
        "KV cache GiB | total GiB | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        fits = "yes" if p["total_gib"] <= budget else "**no**"
        lines.append(
            f"| {p['mesh'][0]} x {p['mesh'][1]} | {p['batch']} | {p['weights_split_gib']:.2f} | "
            f"{p['weights_replicated_gib']:.2f} | {p['kv_cache_gib']:.2f} | "
            f"{p['total_gib']:.2f} | {fits} |"
        )
    return "\n".join(lines)


def table(results: dict, budget: float) -> str:
    lines = [
        "| batch | pass | args GiB | out GiB | temp GiB | total GiB | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, passes in results.items():
        for name, r in passes.items():
            fits = "yes" if r["total_gib"] <= budget else "**no**"
            lines.append(
                f"| {b} | {name} | {r['args_gib']:.1f} | {r['out_gib']:.1f} | "
                f"{r['temp_gib']:.1f} | {r['total_gib']:.1f} | {fits} |"
            )
    return "\n".join(lines)


def main(argv):
    del argv
    from vicrop_jax.models.llava import LlavaConfig
    from vicrop_jax.sharding import parse_mesh_shape
    from vicrop_jax.testing import preset_config_dict

    if _MODEL.value:
        from vicrop_jax.loading import parse_config, read_config

        config, name = parse_config(read_config(_MODEL.value)), _MODEL.value
    else:
        config, name = None, _PRESET.value
    dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
    if _MESH.value:
        shape = parse_mesh_shape(_MESH.value)
        config = config or find_preset(name)
        plans = [mesh_plan(config, shape, dtype, batch=int(b), cache_tokens=_CACHE.value)
                 for b in _BATCHES.value]  # fmt: skip
        print(f"# per-device plan: {name}, {_DTYPE.value}, mesh data {shape[0]} x "
              f"model {shape[1]}, {_CACHE.value} cache slots a row; budget "
              f"{_BUDGET.value:.1f} GiB a device; activations not included\n")  # fmt: skip
        print(mesh_table(plans, _BUDGET.value))
        if _OUT.value:
            with open(_OUT.value, "w") as f:
                json.dump({"preset": name, "dtype": _DTYPE.value, "plans": plans}, f,
                          indent=2)  # fmt: skip
        return
    config = config or LlavaConfig.from_dict(preset_config_dict(name, 32000))
    results = {}
    for b in (int(x) for x in _BATCHES.value):
        results[b] = pass_plans(config, b, dtype, text_tokens=_TAIL.value,
                                max_new_tokens=_MAX_NEW.value, layer=_LAYER.value)  # fmt: skip
    budget = _BUDGET.value
    device = jax.devices()[0]
    print(f"# XLA memory plan: {name}, {_DTYPE.value}, backend {device.platform} "
          f"({device.device_kind}); budget {budget:.1f} GiB\n")  # fmt: skip
    print(table(results, budget))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"preset": name, "dtype": _DTYPE.value,
                       "device": device.device_kind, "budget_gib": budget,
                       "results": results}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    from eval import cli  # --help exits 0

    cli.run(main, (ValueError,))
