"""Accuracy tables from run directories: the paper's Table 2 layout and size buckets.

python -m eval.report DIR [--variant official|standard]

A missing, empty or damaged directory (no run_config.json, a results line that does not
parse, a record its task cannot score) is reported in one line (--verbose: with the
traceback).

DIR is a run directory (it holds run_config.json) or any directory above several. Every
shard's JSONL is read and merged by id. Rows are (model, task); columns are "no crop"
(the baseline answer) and each method's answer with [original, crop]. Writes report.md,
report.csv (the same table) and report_buckets.csv into DIR and prints the markdown.

Scoring is eval.metrics (the official rules). Records that failed (missing image, ...) score
0 and are counted in the "errors" column, so a broken setup cannot look accurate. A method
that does not apply to a question (gt_crop without a ground-truth box) leaves it out of that
column, whose cell then shows its own n; a failed question without a ground-truth box is
left out of those columns too. V* is scored as option-letter accuracy: the official
rule gives 0.3 per matching label, which equals this when the letter is listed at least four
times, and caps a single-letter label at 30.

Size buckets (questions with a ground-truth box): relative area = box area / image area,
small < 0.005 <= medium < 0.05 <= large, the paper's TextVQA split; for the synthetic
benchmark, the generator's buckets of subject side / image shorter side (eval.synthetic).
Each bucket cell carries the 95% Wilson score interval of its accuracy (`wilson_interval`);
report_buckets.csv gives the bounds as "<column> 95% low" and "<column> 95% high" columns.
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from eval import cli, metrics, records

BUCKETS = (("small", 0.0, 0.005), ("medium", 0.005, 0.05), ("large", 0.05, float("inf")))
VQA_TASKS = ("textvqa", "vqav2", "aokvqa")
NO_CROP = "no crop"
# Methods that need a ground-truth box (eval.engine: no box, no answer).
GT_METHODS = ("gt_crop", "gt_map")
# The standard normal's 0.975 quantile: the z of a two-sided 95% interval.
Z95 = 1.959963984540054


def score(task: str, prediction: str | None, record: dict, variant: str = "official") -> float:
    """Per-question score in percent; a missing prediction (failed question) scores 0."""
    if prediction is None:
        return 0.0
    if task == "vstar":
        labels = record["labels"]
        labels = [labels] if isinstance(labels, str) else labels
        return 100.0 if metrics.vstar_choice(prediction, record["question"]) in labels else 0.0
    if variant == "standard" and task in VQA_TASKS:
        return metrics.vqa_accuracy(prediction, record["labels"], "standard")
    return metrics.SCORERS[task](prediction, record)


def _predictions(record: dict, column: str):
    """(applies, prediction) of a record for a column."""
    if record.get("error"):  # wrong wherever the question would have been asked
        return column not in GT_METHODS or bool(record.get("gt_bbox")), None
    if column == NO_CROP:
        return True, record.get("original_answer")
    m = record.get("methods", {}).get(column)
    if m is None or (m.get("crop_answer") is None and m.get("error")):
        return False, None
    return True, m.get("crop_answer")


def column_scores(task: str, recs: Sequence[dict], columns: Sequence[str], variant: str):
    """{column: (mean score or None, n)} over the records the column applies to.

    Raises:
      ValueError: naming the question, for a record the task's scorer cannot read (a V*
        run over questions that are not multiple choice).
    """
    out = {}
    for col in columns:
        vals = []
        for r in recs:
            applies, pred = _predictions(r, col)
            if not applies:
                continue
            try:
                vals.append(score(task, pred, r, variant))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(
                    f"question {r.get('id')!r} cannot be scored as {task}: {e}"
                ) from None
        out[col] = (metrics.aggregate(vals) if vals else None, len(vals))
    return out


def wilson_interval(p, n, z: float = Z95):
    """Wilson score interval of a proportion p in [0, 1] observed over n > 0 trials.

    Args:
      p: float or float[...] observed proportion(s).
      n: int or int[...] trials, broadcast against p.
      z: the normal quantile of the interval (Z95: 95%, two-sided).

    Returns:
      (low, high), each shaped as p and n broadcast. For scores that are not 0/1 (the VQA
      metric's 30 / 60 / 90) the variance is below p(1 - p), so the interval is wider than
      it needs to be, never narrower.
    """
    p, n = np.asarray(p, np.float64), np.asarray(n, np.float64)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def relative_area(record: dict) -> float | None:
    box, size = record.get("gt_bbox"), record.get("image_size")
    if not box or not size or size[0] * size[1] <= 0:
        return None
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]) / (size[0] * size[1])


def bucket_of(area: float) -> str:
    return next(name for name, lo, hi in BUCKETS if lo <= area < hi)


class Run:
    """One run directory: its config and merged records."""

    def __init__(self, path: str):
        self.path = path
        self.config = records.read_config(path, required=("task", "model", "methods"))
        self.records = records.merged_records(path)
        self.task = self.config["task"]
        self.model = os.path.basename(os.path.normpath(self.config["model"]))
        self.methods = list(self.config["methods"])
        self.total = self.config.get("num_examples")
        self.errors = sum(1 for r in self.records if r.get("error"))

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.records) >= self.total


def _fmt(value: float | None, n: int, row_n: int, ci: tuple[float, float] | None = None) -> str:
    """'66.67', with ci '66.67 [20.8, 93.9]', and ' (n=3)' after it when n is not row_n."""
    if value is None:
        return "-"
    text = f"{value:.2f}" if ci is None else f"{value:.2f} [{ci[0]:.1f}, {ci[1]:.1f}]"
    return text if n == row_n else f"{text} (n={n})"


def table(runs: Sequence[Run], variant: str = "official") -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Table 2 layout over runs."""
    methods: list[str] = []
    for run in runs:
        methods += [m for m in run.methods if m not in methods]
    header = ["model", "task", "questions", "errors", NO_CROP, *methods]
    rows = []
    for run in runs:
        try:
            scores = column_scores(run.task, run.records, [NO_CROP, *run.methods], variant)
        except ValueError as e:
            raise records.DamagedRun(f"{run.path}: {e}") from None
        n = len(run.records)
        done = f"{n}/{run.total}" + ("" if run.complete else " (partial)")
        cells = [_fmt(*scores[c], n) if c in scores else "" for c in [NO_CROP, *methods]]
        rows.append([run.model, run.task, done, str(run.errors), *cells])
    return header, rows


def _interval(value: float | None, n: int) -> tuple[float, float] | None:
    """The 95% Wilson interval (percent) of a mean score in percent over n questions."""
    if value is None:
        return None
    lo, hi = wilson_interval(value / 100, n)
    return 100 * float(lo), 100 * float(hi)


def bucket_table(
    run: Run, variant: str = "official", merged: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Accuracy by relative ground-truth box area (empty if no record has a box).

    Each column's 95% Wilson interval follows it as two columns, "<column> 95% low" and
    "<column> 95% high" (the CSV), or with merged, inside its cell: "79.82 [75.1, 83.9]".
    """
    cols = [NO_CROP, *run.methods]
    header = ["model", "task", "bucket", "questions"]
    for c in cols:
        header += [c] if merged else [c, f"{c} 95% low", f"{c} 95% high"]
    buckets = BUCKETS
    if run.task == "synthetic":  # the generator's buckets, by subject side / image side
        from eval.synthetic import SIZE_BUCKETS as buckets
    groups: dict[str, list[dict]] = {name: [] for name, _, _ in buckets}
    for r in run.records:
        if run.task == "synthetic":  # a record without a bucket stays out, like one without a box
            bucket = (r.get("extra") or {}).get("size_bucket")
            if bucket in groups:
                groups[bucket].append(r)
            continue
        area = relative_area(r)
        if area is not None:
            groups[bucket_of(area)].append(r)
    rows = []
    for name, lo, hi in buckets:
        recs = groups[name]
        if not recs:
            continue
        scores = column_scores(run.task, recs, cols, variant)
        row = [run.model, run.task, f"{name} [{lo:g}, {hi:g})", str(len(recs))]
        for c in cols:
            value, n = scores[c]
            ci = _interval(value, n)
            if merged:
                row.append(_fmt(value, n, len(recs), ci))
            else:
                bounds = ["", ""] if ci is None else [f"{v:.2f}" for v in ci]
                row += [_fmt(value, n, len(recs)), *bounds]
        rows.append(row)
    return header, rows


def timing_table(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """Median seconds per question: the baseline answer and each method's map+box+answer.

    The median, because the first batches of a run include jit compilation.
    """
    header = ["model", "task", "stage", "median s/question"]
    rows = []
    for run in runs:
        timed = [r["timings"] for r in run.records if r.get("timings")]
        if not timed:
            continue
        stages = ["baseline_answer", *run.methods]
        for stage in stages:
            vals = [
                sum(v for k, v in t.items() if k == stage or k.startswith(stage + "/"))
                for t in timed
            ]
            rows.append([run.model, run.task, stage, f"{statistics.median(vals):.3f}"])
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def make_report(root: str, variant: str = "official") -> str:
    """Writes report.md, report.csv, report_buckets.csv into root; returns the markdown."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory")
    runs = [Run(d) for d in records.run_dirs(root)]
    if not runs:
        why = "; it holds .jsonl results without one" if records.result_files(root) else ""
        raise FileNotFoundError(
            f"no run directories (with {records.CONFIG_NAME}) under {root}{why}"
        )
    header, rows = table(runs, variant)
    metric = "VQA leave-one-out (standard)" if variant == "standard" else "official ViCrop"
    parts = [
        f"# ViCrop evaluation: accuracy (%)\n\nScoring: {metric} rules.\n",
        markdown(header, rows),
    ]
    b_header, b_rows, m_header, m_rows = None, [], None, []
    for run in runs:
        bh, br = bucket_table(run, variant)
        b_header, b_rows = bh if br else b_header, b_rows + br
        mh, mr = bucket_table(run, variant, merged=True)
        m_header, m_rows = mh if mr else m_header, m_rows + mr
    if b_rows:
        parts += [
            "\n## Accuracy by ground-truth box size (relative area; synthetic: subject side "
            "/ image shorter side), [95% Wilson interval]\n",
            markdown(m_header, m_rows),
        ]
    t_header, t_rows = timing_table(runs)
    if t_rows:
        parts += ["\n## Time per question (s)\n", markdown(t_header, t_rows)]
    text = "\n".join(parts) + "\n"
    with open(os.path.join(root, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(root, "report.csv"), "w", encoding="utf-8", newline="") as f:
        f.write(_csv(header, rows))
    if b_rows:
        with open(os.path.join(root, "report_buckets.csv"), "w", encoding="utf-8", newline="") as f:
            f.write(_csv(b_header, b_rows))
    return text


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m eval.report DIR [--variant official|standard]")
    print(make_report(argv[1], flags.FLAGS.variant))


if __name__ == "__main__":
    # Defined here, not at import, so that importing the scorers adds no flags to eval.run.
    flags.DEFINE_enum(
        "variant",
        "official",
        ["official", "standard"],
        "VQA metric for TextVQA/VQAv2/A-OKVQA: official 100*min(0.3*matches, 1) or the "
        "standard leave-one-out mean",
    )
    cli.run(main, (OSError, ValueError))
