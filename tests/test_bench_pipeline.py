"""bench.pipeline end to end on a tiny random LLaVA: both sides run, every ratio is taken
against reference questions timed beside it, and the steady state compiles nothing."""

import json
import os
import subprocess
import sys


def test_pipeline_bench_reports_ratios_beside_the_reference(tiny_llava_dir, tmp_path):
    d, _ = tiny_llava_dir
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "bench.pipeline", f"--model={d}", "--questions=2",
           "--batch_sizes=1,2", "--max_new_tokens=3", "--settle_s=0", f"--out={out}"]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["ours"]) == {"1", "2"}
    for b, o in res["ours"].items():
        assert o["per_question_s"] > 0 and o["reference_beside_s"] > 0, b
        assert res["speedup_throughput"][b] == o["reference_beside_s"] / o["per_question_s"]
        assert o["compilations_first_call"] > 0 and o["compilations_steady"] == 0, b
    assert res["ours"]["1"]["reference_beside_s"] == res["reference"]["latency_s"]
    assert set(res["reference"]["stages_s"]) == {"baseline_answer", "map", "box", "crop_answer"}
    assert "| ours, batch 2 |" in run.stdout
