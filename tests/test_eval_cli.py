"""The command lines of eval/ and bench/ in subprocesses: --help exits 0 and names every
method and model family; a bad setup ends eval.run and eval.analysis with one line, exit
status 2, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eval import cli, records
from tests.conftest import FAST_COMPILE
from tests.test_eval_datasets import write_unified

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = ("eval.run", "eval.report", "eval.analysis", "eval.demo", "eval.synthetic",
        "eval.train_demo", "bench.bbox", "bench.memory", "bench.pipeline")  # fmt: skip


def _cli(module: str, *args, cwd: str = REPO) -> subprocess.CompletedProcess:
    # Of a caller's XLA flags (a device count), only the suite's fast compile.
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_asks_for_help():
    assert cli.asks_for_help(["p", "--help"]) and cli.asks_for_help(["p", "-x=1", "-helpfull"])
    assert cli.asks_for_help(["p", "-?"]) and not cli.asks_for_help(["p", "--help=false"])
    assert not cli.asks_for_help(["p", "--", "--help"]) and not cli.asks_for_help(["p", "--x"])


@pytest.mark.parametrize("module", CLIS)
def test_help_exits_0(module):
    from eval.engine import known_methods
    from vicrop_jax.families import FAMILIES

    p = _cli(module, "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--[no]verbose" in p.stdout
    if module in ("eval.run", "eval.analysis"):
        text = " ".join(p.stdout.split())
        for name in [*known_methods(), *FAMILIES]:
            assert name in text, (module, name)


def _run_case(case: str, tmp) -> tuple[list[str], str]:
    """eval.run arguments and the message expected; --model is wrong unless the case is
    about the model, so a message about anything else shows it came first."""
    spec = write_unified(str(tmp / "data"), n=2)
    args = [f"--data_json={spec.data_json}", f"--image_root={spec.image_root}", "--task=gqa"]
    args += ["--model=/no/such/dir", f"--output_dir={tmp / 'out'}"]
    if case == "output_dir is a file":
        (tmp / "file").write_text("")
        return [*args, f"--output_dir={tmp / 'file'}"], f"--output_dir {tmp / 'file'}: a file"
    if case == "data_json with textvqa_json":
        return [*args, "--textvqa_json=t.json"], "--data_json and --textvqa_json conflict"
    if case == "vstar on open questions":
        return [*args, "--task=vstar"], "task 'vstar' needs a multiple-choice question"
    return args, "checkpoint directory '/no/such/dir' does not exist"


@pytest.mark.parametrize(
    "case",
    ["output_dir is a file", "data_json with textvqa_json", "vstar on open questions", "model"],
)
def test_run_refuses_a_bad_setup_in_one_line(tmp_path, case):
    args, message = _run_case(case, tmp_path)
    p = _cli("eval.run", *args)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.splitlines()[-1]
    assert last.startswith("error: ") and message in last, p.stderr[-2000:]
    if case != "model":  # refused before anything else is said
        assert p.stderr.count("\n") == 1, p.stderr[-2000:]
    # Nothing that would block the corrected command.
    assert not os.path.exists(tmp_path / "out" / records.CONFIG_NAME)


@pytest.mark.parametrize("case", ["missing", "damaged"])
def test_analysis_refuses_a_missing_or_damaged_run_in_one_line(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    (data / "data.json").write_text("[]")
    out = tmp_path / "out"
    message = "no eval.run records to read"
    if case == "damaged":
        out.mkdir()
        (out / "r.jsonl").write_text('{"id": "0"}\nnot json\n{"id": "2"}\n')
        (out / records.CONFIG_NAME).write_text(json.dumps({"task": "synthetic"}))
        message = "line 2 is not a valid record"
    args = ["--analysis=crop_contents", "--model=m", "--task=synthetic"]
    p = _cli("eval.analysis", *args, f"--synthetic_dir={data}", f"--output_dir={out}")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-2000:]
    assert p.stderr.startswith("error: ") and message in p.stderr
