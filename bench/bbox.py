"""Box selection speed: the official-style loop against `vicrop_jax.bbox.select_bboxes`.

Times one batch of maps through the plain-loop reference (bench/bbox_reference.py,
numpy float64, one window sum at a time as in the official code) and through the jitted,
vmapped search, checks that every box agrees, and prints a markdown table and JSON.

  python -m bench.bbox [--batch=256] [--repeats=20] [--out=bbox.json]

"ours" is end to end: host geometry, transfer, device search, and the wait for the
result; compilation is timed apart. The 24x24 maps (LLaVA-1.5) go with ordinary image
sizes, the 96x72 maps (a 4 x 3 high-resolution grid of 24x24 tiles) with 3000x4000-like
images.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import flags

from bench.bbox_reference import reference_bbox
from vicrop_jax.bbox import select_bboxes

_BATCH = flags.DEFINE_integer("batch", 256, "Maps per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls of the jitted search.")
_REF_REPEATS = flags.DEFINE_integer("ref_repeats", 1, "Timed passes of the loop reference.")
_BASE = flags.DEFINE_integer("base", 336, "Model input resolution.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for maps and image sizes.")
_OUT = flags.DEFINE_string("out", None, "Optional path for the JSON results.")

# (map rows, map cols), (width range, height range) of the images.
_CASES = (
    ((24, 24), ((300, 2000), (300, 2000))),
    ((96, 72), ((2800, 3200), (3800, 4200))),
)


def _run_case(shape, size_ranges, batch, repeats, ref_repeats, base, rng) -> dict:
    maps = rng.lognormal(0.0, 1.0, size=(batch, *shape)).astype(np.float32)
    sizes = np.stack([rng.integers(lo, hi, size=batch) for lo, hi in size_ranges], axis=1)

    start = time.perf_counter()
    ours = np.asarray(jax.block_until_ready(select_bboxes(maps, sizes, base)))
    first_s = time.perf_counter() - start  # compile + one run
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(select_bboxes(maps, sizes, base))
        times.append(time.perf_counter() - start)
    ours_s = float(np.median(times))

    ref_times = []
    for _ in range(ref_repeats):
        start = time.perf_counter()
        want = [
            reference_bbox(m, (int(w), int(h)), base) for m, (w, h) in zip(maps, sizes, strict=True)
        ]
        ref_times.append(time.perf_counter() - start)
    ref_s = float(np.median(ref_times))

    mismatches = sum(tuple(o) != w for o, w in zip(ours.tolist(), want, strict=True))
    return {
        "map": f"{shape[0]}x{shape[1]}",
        "batch": batch,
        "reference_s": ref_s,
        "ours_s": ours_s,
        "ours_first_call_s": first_s,
        "speedup": ref_s / ours_s,
        "mismatches": mismatches,
    }


def main(argv: list[str]) -> None:
    del argv
    rng = np.random.default_rng(_SEED.value)
    results = [
        _run_case(shape, ranges, _BATCH.value, _REPEATS.value, _REF_REPEATS.value, _BASE.value, rng)
        for shape, ranges in _CASES
    ]
    device = jax.devices()[0]
    report = {
        "device": f"{device.platform}: {device.device_kind}",
        "jax": jax.__version__,
        "base": _BASE.value,
        "results": results,
    }
    print(f"device {report['device']}, jax {report['jax']}, base {_BASE.value}\n")
    print("| map | batch | reference (s/batch) | ours (ms/batch) | first call (s) | speedup |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['map']} | {r['batch']} | {r['reference_s']:.3f} | {1e3 * r['ours_s']:.2f} "
            f"| {r['ours_first_call_s']:.2f} | {r['speedup']:.0f}x |"
        )
    print("\n" + json.dumps(report, indent=2))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)
    if any(r["mismatches"] for r in results):
        raise SystemExit("boxes differ from the reference")


if __name__ == "__main__":
    from eval import cli  # --help exits 0

    cli.run(main)
