"""Every GPU check of the real-size work in one command (8 minutes at most on one H100).

  python -m bench.gpu --out_dir /tmp/vicrop_gpu            # LLaVA-1.5-7B, bfloat16, a GPU
  python -m bench.gpu --tiny --questions 2 --out_dir /tmp/vicrop_gpu_tiny  # tiny, on a CPU

Steps, each its own process with its own time limit (a failed or late step is recorded and
the next one runs), results gathered in OUT_DIR/gpu.json:
  1. checkpoint: bench.fullsize_checkpoint writes the random LLaVA-1.5-7B checkpoint in the
     hub's layout (bfloat16, 3 shards; kept when OUT_DIR already holds it). --tiny: a tiny
     random LLaVA (vicrop_jax.testing.make_random_checkpoint).
  2. pipeline: bench.pipeline on that checkpoint, bfloat16: HF PyTorch (eager, the official
     recipe's separate passes) at batch 1 and ours at batch 1, 8 and 32 in the same process,
     rel-att; seconds per question, the speedups, compile counts, the prefill's TFLOP/s, and
     each side's peak device memory (after batch 32).
  3. memory: bench.memory at batch 32: XLA's buffer plan of each rel-att pass for the
     device (weights, prefix cache, temporaries) against the device's memory.
The device's name, the steps' seconds and exit statuses are recorded with the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _define_flags():
    """The command line's flags (defined when run as a program)."""
    flags.DEFINE_string("out_dir", "/tmp/vicrop_gpu", "checkpoint and results directory")
    flags.DEFINE_bool("tiny", False, "tiny model, float32, small batches (a CPU smoke run)")
    flags.DEFINE_integer("questions", 4, "questions timed per configuration (bench.pipeline)")


def steps(out_dir: str, tiny: bool, questions: int) -> list[tuple[str, list[str], int]]:
    """(name, argv, time limit in seconds) of each step."""
    ckpt = os.path.join(out_dir, "tiny" if tiny else "llava-1.5-7b")
    py = [sys.executable, "-m"]
    if tiny:
        write = [sys.executable, "-c", "import sys; from vicrop_jax.testing import "
                 "make_random_checkpoint as m; m(sys.argv[1])", ckpt]  # fmt: skip
        dtype, batches, limits = "float32", "1,2", (300, 600, 300)  # a slow shared CPU
    else:
        write = py + ["bench.fullsize_checkpoint", "--out", ckpt, "--variant", "full"]
        dtype, batches, limits = "bfloat16", "1,8,32", (150, 240, 90)  # 8 min at most
    big = batches.split(",")[-1]
    return [
        ("checkpoint", write, limits[0]),
        ("pipeline", py + ["bench.pipeline", "--model", ckpt, "--dtype", dtype,
                           "--method", "rel_att", "--batch_sizes", batches,
                           "--questions", str(questions),
                           "--out", os.path.join(out_dir, "pipeline.json")], limits[1]),
        ("memory", py + ["bench.memory", "--model", ckpt, "--dtype", dtype,
                         "--batch_sizes", big, "--out", os.path.join(out_dir, "memory.json")],
         limits[2]),
    ]  # fmt: skip


def device_name() -> str:
    """The first GPU's name from nvidia-smi, else "cpu"."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def main(argv):
    del argv
    f = flags.FLAGS
    os.makedirs(f.out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    summary = {"device": device_name(), "tiny": f.tiny, "steps": {}}
    t_all = time.perf_counter()
    for name, cmd, limit in steps(f.out_dir, f.tiny, f.questions):
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        seconds = time.perf_counter() - t0
        step = {"rc": rc, "seconds": seconds, "limit_s": limit}
        result = os.path.join(f.out_dir, f"{name}.json")
        if os.path.isfile(result):
            with open(result) as fh:
                step["result"] = json.load(fh)
        summary["steps"][name] = step
        print(f"== {name}: exit {rc}, {seconds:.0f} s", flush=True)
    summary["total_s"] = time.perf_counter() - t_all
    with open(os.path.join(f.out_dir, "gpu.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(f"device {summary['device']}: " + ", ".join(
        f"{n} exit {s['rc']} ({s['seconds']:.0f} s)" for n, s in summary["steps"].items()
    ) + f"; {summary['total_s']:.0f} s in all; {os.path.join(f.out_dir, 'gpu.json')}")  # fmt: skip


if __name__ == "__main__":
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
