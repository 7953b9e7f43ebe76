"""The demo: ViCrop on the shipped small LLaVA, over held-out synthetic questions.

python -m vicrop_jax.demo                  # 500 held-out questions, every method
python -m vicrop_jax.demo --n 100          # a quicker look
python -m vicrop_jax.demo --model DIR      # another llava-1.5 style checkpoint

Each question asks for the letter printed on one coloured shape; the shapes range from
unreadable to clearly readable at the model's 64 px input. The demo writes the questions
(eval.synthetic, seed 1, split "test": never seen in training), runs no crop, the three
ViCrop maps (rel_att, grad_att, pure_grad), the ground-truth crop and two control crops
(random, centre) through eval.run's machinery, prints accuracy by subject-size bucket and
saves a few map + box pictures. Rerunning resumes (or reprints) from --out, as long as the
model's weights are the same.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
# Image shorter sides of the demo set, as eval/flags/demo.flags: long sides stay <= 512 px.
SIZES = "224,288,336,384"
METHODS = ("rel_att", "grad_att", "pure_grad", "gt_crop", "random_crop", "center_crop", "gt_map")


def settings(model: str, n: int, out: str, batch_size: int = 32):
    """eval.runner Settings of the demo: the first n questions of eval/flags/demo.flags'
    500-item set, every method, the maps asked with the full question. The results go to
    out/run_<n>_<weights fingerprint>, so other weights (a retrained model) get their own
    directory instead of the old results."""
    from convert.checkpoint import weights_fingerprint
    from eval.datasets import DataSpec
    from eval.runner import Settings

    data = DataSpec(synthetic_dir=os.path.join(out, "data"), synthetic_n=500, synthetic_seed=1,
                    synthetic_glyphs="letter", synthetic_sizes=SIZES)  # fmt: skip
    run_dir = os.path.join(out, f"run_{n}_{weights_fingerprint(model)[:8]}")
    return Settings(model=model, task="synthetic", methods=METHODS, data=data,
                    output_dir=run_dir, max_new_tokens=3,
                    limit=0 if n >= 500 else n, batch_size=batch_size,
                    map_question="full")  # fmt: skip


def _define_flags():
    """Defined only when run as a script, so importing this module (tests, other absl
    programs) cannot clash on flag names."""
    flags.DEFINE_string("model", DEMO_MODEL, "HF LLaVA checkpoint directory")
    flags.DEFINE_integer("n", 500, "held-out questions (the first n of the 500-item set)")
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
    if not 1 <= f.n <= 500:
        raise app.UsageError(f"--n must be in [1, 500] (the demo set's size), got {f.n}")
    s = settings(f.model, f.n, f.out, f.batch_size)
    model = load_run_model(s)  # one load for the run and the pictures
    run(s, model=model)
    print(report.make_report(s.output_dir))
    vis = visualize(s, f.visualize, model)
    if vis:
        print(f"pictures: {os.path.dirname(vis[0])}/ ({len(vis)} files)")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results: {s.output_dir}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
