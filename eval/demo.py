"""The demo: ViCrop on the shipped small LLaVA, over synthetic questions it never trained on.

python -m eval.demo                    # the test set: 1,500 questions, every method
python -m eval.demo --validation       # the validation set: 500 questions
python -m eval.demo --n 100            # a quicker look: the set's first 100 questions
python -m eval.demo --model DIR        # another llava-1.5 style checkpoint

Each question asks for the letter printed on one coloured shape; the shapes range from
unreadable to clearly readable at the model's 64 px input. Both sets are eval.synthetic's
split "test" (training draws split "train"), with their own seeds: the validation set
(seed 1, 500 questions) is where every training and selection choice of the demo model is
made; the test set (seed 6, 1,500 questions) is used nowhere else, and its table is the one
to report. The demo writes the set's questions, runs no crop, the three ViCrop maps
(rel_att, grad_att, pure_grad), the ground-truth crop, two control crops (random, centre) and
gt_map through eval.run's machinery, prints accuracy by subject-size bucket with 95%
intervals and saves a few map + box pictures. Rerunning resumes (or reprints) from --out, as
long as the model's weights are the same. eval/flags/demo.flags and demo_validation.flags
run the same two sets through `python -m eval.run`.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import NamedTuple

from absl import app, flags

# The shipped model's directory, found without importing vicrop_jax (and jax).
DEMO_MODEL = os.path.join(
    os.path.dirname(importlib.util.find_spec("vicrop_jax").origin), "assets", "demo"
)
# Image shorter sides of the demo sets: long sides stay <= 512 px.
SIZES = "224,288,336,384"
METHODS = ("rel_att", "grad_att", "pure_grad", "gt_crop", "random_crop", "center_crop", "gt_map")


class DemoSet(NamedTuple):
    """A demo question set: eval.synthetic split "test", this seed, the first n items."""

    name: str
    seed: int
    n: int


# No other code in the repository draws split "test" with seed 6.
TEST_SET = DemoSet("test", seed=6, n=1500)
VALIDATION_SET = DemoSet("validation", seed=1, n=500)


def settings(model: str, n: int, out: str, batch_size: int = 32, validation: bool = False):
    """eval.runner Settings of the demo: the first n questions of the test set (or the
    validation set), every method, the maps asked with the full question. The results go to
    out/<set>/run_<n>_<weights fingerprint>, so other weights (a retrained model) get their
    own directory rather than another model's results."""
    from convert.checkpoint import weights_fingerprint
    from eval.datasets import DataSpec
    from eval.runner import Settings

    ds = VALIDATION_SET if validation else TEST_SET
    data = DataSpec(synthetic_dir=os.path.join(out, ds.name, "data"), synthetic_n=ds.n,
                    synthetic_seed=ds.seed, synthetic_glyphs="letter",
                    synthetic_sizes=SIZES)  # fmt: skip
    run_dir = os.path.join(out, ds.name, f"run_{n}_{weights_fingerprint(model)[:8]}")
    return Settings(model=model, task="synthetic", methods=METHODS, data=data,
                    output_dir=run_dir, max_new_tokens=3,
                    limit=0 if n >= ds.n else n, batch_size=batch_size,
                    map_question="full")  # fmt: skip


def _define_flags():
    """Defined only when run as a script, so importing this module (tests, other absl
    programs) cannot clash on flag names."""
    flags.DEFINE_string("model", DEMO_MODEL, "HF LLaVA checkpoint directory")
    v, t = VALIDATION_SET, TEST_SET
    flags.DEFINE_bool("validation", False, f"the validation set (seed {v.seed}, {v.n} questions) "
                      f"in place of the test set (seed {t.seed}, {t.n} questions)")  # fmt: skip
    flags.DEFINE_integer("n", None, "questions: the first n of the set (default: all)")
    flags.DEFINE_string("out", "/tmp/vicrop_demo", "data, results and pictures go here")
    flags.DEFINE_integer("visualize", 3, "questions to draw (map + box per map method)")
    flags.DEFINE_integer("batch_size", 32, "questions per device call")


def main(argv):
    del argv
    f = flags.FLAGS
    from eval import report
    from eval.runner import load_run_model, run, visualize

    if not os.path.isfile(os.path.join(f.model, "config.json")):
        raise app.UsageError(f"--model {f.model!r} holds no config.json")
    t0 = time.perf_counter()
    total = (VALIDATION_SET if f.validation else TEST_SET).n
    n = total if f.n is None else f.n
    if not 1 <= n <= total:
        raise app.UsageError(f"--n must be in [1, {total}] (the set's size), got {n}")
    s = settings(f.model, n, f.out, f.batch_size, f.validation)
    model = load_run_model(s)  # one load for the run and the pictures
    run(s, model=model)
    print(report.make_report(s.output_dir))
    vis = visualize(s, f.visualize, model)
    if vis:
        print(f"pictures: {os.path.dirname(vis[0])}/ ({len(vis)} files)")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results: {s.output_dir}")


if __name__ == "__main__":
    from eval import cli

    _define_flags()
    cli.run(main, cli.expected_errors())
