"""The demo entry (eval/demo.py): its two question sets agree with eval/flags/demo.flags and
demo_validation.flags, and the command line checks --n against the set's size."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from eval import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flagfile(path: str) -> dict[str, str]:
    """--name=value lines of a flagfile, nested --flagfile lines read in place."""
    out: dict[str, str] = {}
    with open(os.path.join(REPO, path)) as f:
        for line in f:
            if not line.startswith("--"):
                continue
            name, _, value = line.strip().removeprefix("--").partition("=")
            if name == "flagfile":
                out.update(_flagfile(value))
            else:
                out[name] = value
    return out


@pytest.mark.parametrize("validation", [False, True])
def test_demo_sets_match_their_flagfiles(validation, tmp_path):
    path = "eval/flags/demo_validation.flags" if validation else "eval/flags/demo.flags"
    want = _flagfile(path)
    ds = demo.VALIDATION_SET if validation else demo.TEST_SET
    s = demo.settings(demo.DEMO_MODEL, ds.n, str(tmp_path), validation=validation)
    assert s.limit == 0 and s.task == want["task"]
    assert demo.DEMO_MODEL.endswith(os.path.join(*want["model"].split("/")))
    assert (s.data.synthetic_n, s.data.synthetic_seed) == (ds.n, ds.seed)
    assert str(ds.n) == want["synthetic_n"] and str(ds.seed) == want["synthetic_seed"]
    assert s.data.synthetic_sizes == demo.SIZES == want["synthetic_sizes"]
    assert s.data.synthetic_glyphs == want["synthetic_glyphs"]
    assert ",".join(s.methods) == ",".join(demo.METHODS) == want["methods"]
    assert s.map_question == want["map_question"]
    assert str(s.max_new_tokens) == want["max_new_tokens"]
    assert os.path.basename(os.path.dirname(s.output_dir)) == ds.name
    assert demo.settings(demo.DEMO_MODEL, 10, str(tmp_path), validation=validation).limit == 10


def test_validation_and_test_sets_differ():
    assert demo.TEST_SET.seed != demo.VALIDATION_SET.seed
    assert demo.TEST_SET.n >= 1500 and demo.VALIDATION_SET.n == 500


@pytest.mark.parametrize(
    ("args", "bound"), [(["--n=1501"], 1500), (["--validation", "--n=501"], 500)]
)
def test_command_line_checks_n(args, bound):
    p = subprocess.run([sys.executable, "-m", "eval.demo", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})  # fmt: skip
    assert p.returncode != 0 and f"--n must be in [1, {bound}]" in p.stderr, p.stderr
