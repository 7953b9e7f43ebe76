"""Load time and peak host memory of `vicrop_jax.load_model` on a large checkpoint.

  python -m bench.fullsize_load --dir /tmp/vicrop_fullsize/full --dtype bfloat16
  python -m bench.fullsize_load --dir /tmp/vicrop_fullsize/wide2 --dtype float32

Runs load_model in this process under a guard: a thread reads /proc/self/status (VmRSS)
and /proc/meminfo (MemAvailable) every 20 ms and ends the process (exit status 3) once
the resident set passes --rss_limit_gib or the machine has less than --min_available_gib
left, printing how far the load got; on a machine shared with other jobs a load that needs
more memory than there is stops there instead of meeting the kernel's OOM killer. Reports
the load's seconds, the peak resident set (VmHWM) against the checkpoint's weight bytes,
and the params' bytes.
"""

from __future__ import annotations

import json
import os
import threading
import time

import jax
import jax.numpy as jnp
from absl import flags


def _define_flags():
    """The command line's flags (defined when run as a program, so that modules importing
    this one keep their own)."""
    flags.DEFINE_string("dir", None, "HF checkpoint directory")
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "params dtype")
    flags.DEFINE_float("rss_limit_gib", 16.0, "stop once this process's RSS passes this")
    flags.DEFINE_float("min_available_gib", 2.0, "stop once MemAvailable drops below this")


GIB = 2**30


def _kib(path: str, field: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_gib() -> float:
    return _kib("/proc/self/status", "VmRSS") / 2**20


def peak_rss_gib() -> float:
    return _kib("/proc/self/status", "VmHWM") / 2**20


def available_gib() -> float:
    return _kib("/proc/meminfo", "MemAvailable") / 2**20


def guard(limit_gib: float, min_available_gib: float, t0: float) -> threading.Event:
    """Starts the watchdog thread; set the returned event to stop it."""
    done = threading.Event()

    def watch():
        while not done.wait(0.02):
            rss, avail = rss_gib(), available_gib()
            if rss > limit_gib or avail < min_available_gib:
                print(f"stopped after {time.perf_counter() - t0:.1f} s: RSS {rss:.2f} GiB "
                      f"(limit {limit_gib:g}), MemAvailable {avail:.2f} GiB "
                      f"(floor {min_available_gib:g}); peak RSS {peak_rss_gib():.2f} GiB",
                      flush=True)  # fmt: skip
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()
    return done


def weight_bytes(path: str) -> int:
    from convert.checkpoint import safetensors_files

    return sum(os.path.getsize(f) for f in safetensors_files(path))


def main(argv):
    del argv
    import vicrop_jax

    f = flags.FLAGS
    path = f.dir
    if not path:
        raise ValueError("--dir is required")
    dtype = jnp.bfloat16 if f.dtype == "bfloat16" else jnp.float32
    size = weight_bytes(path)
    before = rss_gib()
    print(f"{path}: {size / GIB:.2f} GiB of safetensors; RSS before {before:.2f} GiB, "
          f"MemAvailable {available_gib():.2f} GiB", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    done = guard(f.rss_limit_gib, f.min_available_gib, t0)
    model = vicrop_jax.load_model(path, dtype=dtype)
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - t0
    done.set()
    leaves = jax.tree.leaves(model.params)
    params = sum(x.size * x.dtype.itemsize for x in leaves)
    peak = peak_rss_gib()
    result = {"dir": path, "dtype": f.dtype, "weights_gib": size / GIB,
              "params_gib": params / GIB, "load_s": seconds, "peak_rss_gib": peak,
              "rss_after_gib": rss_gib(), "peak_over_weights": peak * GIB / size}  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
