"""Full-depth LLaVA-1.5-7B, bfloat16, ViCrop questions end to end on this machine's CPU.

  python -m bench.fullsize --dir /tmp/vicrop_fullsize/full --prefill --methods=  # a prefill
  python -m bench.fullsize --dir /tmp/vicrop_fullsize/full \
      --methods rel_att,grad_att,pure_grad --sizes 640x480,2000x1500 --high_res off,on \
      --out r.json --maps_out maps.npz   # maps for bench.fullsize_reference

Loads the checkpoint (bench.fullsize_checkpoint's "full" variant, or the hub's) with
`load_model(dtype=bfloat16)` under bench.fullsize_load's RSS / MemAvailable guard, then asks
one real-looking question (a synthetic scene of eval.synthetic, resized to each --sizes) per
method, image size and high-res setting, and prints per stage: its wall seconds, the XLA
compile and StableHLO lowering seconds within it (JAX's compile events), the rest (tracing,
running, host work) and the peak host RSS so far; then the answers and the box.
--prefill first times one jitted forward pass over the question prompt (compile, then two
runs).
"""

from __future__ import annotations

import collections
import json
import os
import time

# XLA's CPU backend computes bfloat16 dots in float32 through a float32 copy of each weight.
# Its default scheduler (the one that favours concurrency) makes every copy at the program's
# start, all alive at once; and common-subexpression elimination merges the copies of a
# weight that two passes of one program make (rel-att's prefix and tails), keeping each alive
# from the first pass to the second. Either holds twice the bfloat16 params again (XLA's plan
# of rel-att's start_pass at 7B: 22.7 GiB of temporaries; 1.6 GiB with both flags and
# vicrop_jax.models.common.pinned_promote_dtype, which keeps the copies out of decode loops).
CPU_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false --xla_disable_hlo_passes=cse"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FLAGS}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402


def _define_flags():
    """The command line's flags (defined when run as a program)."""
    flags.DEFINE_string("dir", "/tmp/vicrop_fullsize/full", "HF checkpoint directory")
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "params dtype")
    flags.DEFINE_list("methods", ["rel_att"], "rel_att, grad_att, pure_grad")
    flags.DEFINE_list("sizes", ["640x480"], "image sizes WxH")
    flags.DEFINE_list("high_res", ["off"], "off, on (the *_high variants) or both")
    flags.DEFINE_integer("max_new_tokens", 20, "answer tokens (official: 20)")
    flags.DEFINE_bool("prefill", False, "first time one forward pass over the prompt")
    flags.DEFINE_integer(
        "batch_size",
        1,
        "rows of a call: the *_high tiles' map passes run this many tiles at a "
        "time (a whole image's tiles at once need ~4x the activations)",
    )
    flags.DEFINE_float("rss_limit_gib", 21.0, "stop once this process's RSS passes this")
    flags.DEFINE_float("min_available_gib", 1.0, "stop once MemAvailable drops below this")
    flags.DEFINE_string("out", None, "write the results as JSON here")
    flags.DEFINE_string(
        "maps_out",
        None,
        "write each question's map here (.npz, one array "
        "a question, named size_method, e.g. 640x480_rel_att)",
    )


# Tracing nests (a jit inside a jit reports its own trace): only lowering and XLA's compile
# are summed, which do not.
COMPILE_EVENTS = {
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
}


class CompileClock:
    """Seconds JAX spends lowering to StableHLO and XLA spends compiling, summed."""

    def __init__(self):
        self.total = collections.Counter()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.total[COMPILE_EVENTS[event]] += duration

    def snapshot(self) -> dict:
        return dict(self.total)


def timed_stages(clock: CompileClock, peak_rss_gib):
    """A vicrop_jax.pipeline.StageTimer that also records, per stage, the XLA compile and
    lowering seconds inside it, the rest (tracing, running, host work) and the peak RSS after
    it."""
    from vicrop_jax.pipeline import StageTimer

    class Timer(StageTimer):
        def __init__(self, prefix="", totals=None, stages=None):
            super().__init__(prefix, totals)
            self.stages = {} if stages is None else stages

        def __call__(self, name, fn, *args, **kwargs):
            before, t0 = clock.snapshot(), time.perf_counter()
            out = super().__call__(name, fn, *args, **kwargs)
            after, wall = clock.snapshot(), time.perf_counter() - t0
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("compile", "lower")}
            self.stages[self.prefix + name] = {
                "wall_s": wall, "compile_s": d["compile"], "lower_s": d["lower"],
                "rest_s": wall - d["compile"] - d["lower"], "peak_rss_gib": peak_rss_gib(),
            }  # fmt: skip
            s = self.stages[self.prefix + name]
            print(f"    {self.prefix + name}: {wall:.1f} s (XLA compile {s['compile_s']:.1f}, "
                  f"lower {s['lower_s']:.1f}, trace + run {s['rest_s']:.1f}); peak RSS "
                  f"{s['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
            return out

        def scoped(self, method):
            return Timer(f"{method}/", self.totals, self.stages)

    return Timer()


def question_image(width: int, height: int):
    """A synthetic scene (eval.synthetic, item 0 of seed 7) resized to width x height, and
    its question and answer."""
    from PIL import Image

    from eval.synthetic import generate_item

    image, record = generate_item(7, 0, split="bench")
    return image.resize((width, height), Image.BICUBIC), record["question"], record["answer"]


def prefill(model, image, question, clock) -> dict:
    """Compile and run one forward pass over the question's prompt, twice."""
    import vicrop_jax
    from vicrop_jax.families import family_of

    prompt = family_of(model).prompt(question, 1)
    enc = model.processor(images=image, text=prompt, return_tensors="np")
    out = {"tokens": int(enc["input_ids"].shape[1])}
    for i in range(2):
        before, t0 = clock.snapshot(), time.perf_counter()
        logits = vicrop_jax.forward(
            model, input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
            attention_mask=enc["attention_mask"],
        ).logits  # fmt: skip
        jax.block_until_ready(logits)
        wall = time.perf_counter() - t0
        after = clock.snapshot()
        out[f"call{i + 1}"] = {
            "wall_s": wall,
            "compile_s": after.get("compile", 0.0) - before.get("compile", 0.0),
            "lower_s": after.get("lower", 0.0) - before.get("lower", 0.0),
        }
        print(f"  forward call {i + 1}: {json.dumps(out[f'call{i + 1}'])}", flush=True)
    out["finite"] = bool(np.isfinite(np.asarray(logits, np.float32)).all())
    return out


def main(argv):
    del argv
    import platform

    import vicrop_jax
    from bench.fullsize_load import available_gib, guard, peak_rss_gib, rss_gib, weight_bytes
    from vicrop_jax import pipeline

    f = flags.FLAGS
    dtype = jnp.bfloat16 if f.dtype == "bfloat16" else jnp.float32
    clock = CompileClock()
    size = weight_bytes(f.dir)
    print(f"{f.dir}: {size / 2**30:.2f} GiB of safetensors; RSS {rss_gib():.2f} GiB, "
          f"MemAvailable {available_gib():.2f} GiB; {platform.machine()}, {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    guard(f.rss_limit_gib, f.min_available_gib, t0)
    model = vicrop_jax.load_model(f.dir, dtype=dtype)
    jax.block_until_ready(model.params)
    result = {"dir": f.dir, "dtype": f.dtype, "weights_gib": size / 2**30,
              "load_s": time.perf_counter() - t0, "load_peak_rss_gib": peak_rss_gib(),
              "cpus": os.cpu_count(), "questions": []}  # fmt: skip
    print(f"load: {result['load_s']:.1f} s, peak RSS {result['load_peak_rss_gib']:.2f} GiB",
          flush=True)  # fmt: skip

    def save():
        if f.out:
            with open(f.out, "w") as fh:
                json.dump(result, fh, indent=2)

    save()
    sizes = [tuple(int(v) for v in s.split("x")) for s in f.sizes]
    if f.prefill:
        image, question, _ = question_image(*sizes[0])
        result["prefill"] = prefill(model, image, question, clock)
        result["peak_rss_gib"] = peak_rss_gib()
        save()
    high = {"off": [False], "on": [True], "both": [False, True]}
    settings = [h for v in f.high_res for h in high[v]]
    ex = pipeline.Executor(model, max_new_tokens=f.max_new_tokens, batch_size=f.batch_size)
    maps = {}
    for w, h in sizes:
        image, question, answer = question_image(w, h)
        for method in f.methods:
            for high_res in settings:
                name = method + ("_high" if high_res else "")
                print(f"{w}x{h} {name}: {question!r} (true answer {answer!r})", flush=True)
                timer = timed_stages(clock, peak_rss_gib)
                t1 = time.perf_counter()
                base, res = pipeline.answer_batch(ex, [image], [question], [name], timer=timer)
                r = res[name]
                q = {"size": [w, h], "method": name, "question": question, "truth": answer,
                     "original_answer": base[0], "crop_answer": r.crop_answers[0],
                     "box": r.boxes[0], "map_shape": list(np.shape(r.maps[0])),
                     "total_s": time.perf_counter() - t1, "stages": timer.stages}  # fmt: skip
                print(f"  answer {base[0]!r}, with the crop {r.crop_answers[0]!r}, box "
                      f"{r.boxes[0]}; {q['total_s']:.1f} s", flush=True)  # fmt: skip
                result["questions"].append(q)
                result["peak_rss_gib"] = peak_rss_gib()
                save()
                if f.maps_out:
                    maps[f"{w}x{h}_{name}"] = np.asarray(r.maps[0], np.float32)
                    np.savez(f.maps_out, **maps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
