"""The command line: python -m eval.synthetic --out DIR [--n --seed --split ...]. Flags are
defined only when run as a script, so importing the package next to other absl programs
cannot clash on flag names."""

from __future__ import annotations

from eval.synthetic._items import write_benchmark
from eval.synthetic._spec import SIZE_BUCKETS


def _define_flags():
    from absl import flags

    flags.DEFINE_string("out", None, "Output directory.", required=True)
    flags.DEFINE_integer("n", 500, "Number of items.")
    flags.DEFINE_integer("seed", 1, "Stream seed.")
    flags.DEFINE_string("split", "test", "Split name, folded into the seed.")
    flags.DEFINE_float("high_res_fraction", 0.0, "Fraction of images with sides > 1024 px.")
    flags.DEFINE_float("color_question_fraction", 0.0, "Fraction of 'What color...' questions.")
    flags.DEFINE_float("min_rel", 0.03, "Smallest subject side / image shorter side.")
    flags.DEFINE_float("max_rel", 0.5, "Largest subject side / image shorter side.")
    flags.DEFINE_float("max_aspect", 4 / 3, "Largest image aspect ratio (1: square).")
    flags.DEFINE_float("max_noise", 5.0, "Largest grain noise std (0: none, ~10x smaller PNGs).")


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    records = write_benchmark(
        f.out, f.n, f.seed, f.split,
        high_res_fraction=f.high_res_fraction,
        color_question_fraction=f.color_question_fraction,
        rel_range=(f.min_rel, f.max_rel),
        max_aspect=f.max_aspect,
        noise_std=(min(1.0, f.max_noise), f.max_noise),
    )  # fmt: skip
    counts = {b: sum(r["size_bucket"] == b for r in records) for b, _, _ in SIZE_BUCKETS}
    print(f"wrote {len(records)} items to {f.out}: {counts}")
