"""Accuracy tables from run directories: the paper's Table 2 layout and size buckets.

python -m eval.report DIR [--variant official|standard]

DIR is a run directory (it holds run_config.json) or any directory above several. Every
shard's JSONL is read and merged by id. Rows are (model, task); columns are "no crop"
(the baseline answer) and each method's answer with [original, crop]. Writes report.md,
report.csv (the same table) and report_buckets.csv into DIR and prints the markdown.

Scoring is eval.metrics (the official rules). Records that failed (missing image, ...) score
0 and are counted in the "errors" column, so a broken setup cannot look accurate. A method
that does not apply to a question (gt_crop without a ground-truth box) leaves it out of that
column, whose cell then shows its own n. V* is scored as option-letter accuracy: the official
rule gives 0.3 per matching label, which equals this when the letter is listed at least four
times, and caps a single-letter label at 30.

Size buckets (questions with a ground-truth box): relative area = box area / image area,
small < 0.005 <= medium < 0.05 <= large, the paper's TextVQA split; for the synthetic
benchmark, the generator's buckets of subject side / image shorter side (eval.synthetic).
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from collections.abc import Sequence

from absl import app, flags

from eval import metrics, records

BUCKETS = (("small", 0.0, 0.005), ("medium", 0.005, 0.05), ("large", 0.05, float("inf")))
VQA_TASKS = ("textvqa", "vqav2", "aokvqa")
NO_CROP = "no crop"


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
    if record.get("error"):
        return True, None
    if column == NO_CROP:
        return True, record.get("original_answer")
    m = record.get("methods", {}).get(column)
    if m is None or (m.get("crop_answer") is None and m.get("error")):
        return False, None
    return True, m.get("crop_answer")


def column_scores(task: str, recs: Sequence[dict], columns: Sequence[str], variant: str):
    """{column: (mean score or None, n)} over the records the column applies to."""
    out = {}
    for col in columns:
        vals = []
        for r in recs:
            applies, pred = _predictions(r, col)
            if applies:
                vals.append(score(task, pred, r, variant))
        out[col] = (metrics.aggregate(vals) if vals else None, len(vals))
    return out


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
        self.config = records.read_config(path)
        self.records = records.merged_records(path)
        self.task = self.config["task"]
        self.model = os.path.basename(os.path.normpath(self.config["model"]))
        self.methods = list(self.config["methods"])
        self.total = self.config.get("num_examples")
        self.errors = sum(1 for r in self.records if r.get("error"))

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.records) >= self.total


def _fmt(value: float | None, n: int, row_n: int) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if n == row_n else f"{value:.2f} (n={n})"


def table(runs: Sequence[Run], variant: str = "official") -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Table 2 layout over runs."""
    methods: list[str] = []
    for run in runs:
        methods += [m for m in run.methods if m not in methods]
    header = ["model", "task", "questions", "errors", NO_CROP, *methods]
    rows = []
    for run in runs:
        scores = column_scores(run.task, run.records, [NO_CROP, *run.methods], variant)
        n = len(run.records)
        done = f"{n}/{run.total}" + ("" if run.complete else " (partial)")
        cells = [_fmt(*scores[c], n) if c in scores else "" for c in [NO_CROP, *methods]]
        rows.append([run.model, run.task, done, str(run.errors), *cells])
    return header, rows


def bucket_table(run: Run, variant: str = "official") -> tuple[list[str], list[list[str]]]:
    """Accuracy by relative ground-truth box area (empty if no record has a box)."""
    cols = [NO_CROP, *run.methods]
    header = ["model", "task", "bucket", "questions", *cols]
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
        label = f"{name} [{lo:g}, {hi:g})"
        rows.append(
            [
                run.model,
                run.task,
                label,
                str(len(recs)),
                *(_fmt(*scores[c], len(recs)) for c in cols),
            ]
        )
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
    runs = [Run(d) for d in records.run_dirs(root)]
    if not runs:
        raise FileNotFoundError(f"no run directories (with {records.CONFIG_NAME}) under {root}")
    header, rows = table(runs, variant)
    metric = "VQA leave-one-out (standard)" if variant == "standard" else "official ViCrop"
    parts = [
        f"# ViCrop evaluation: accuracy (%)\n\nScoring: {metric} rules.\n",
        markdown(header, rows),
    ]
    b_header, b_rows = None, []
    for run in runs:
        bh, br = bucket_table(run, variant)
        b_header, b_rows = bh if br else b_header, b_rows + br
    if b_rows:
        parts += [
            "\n## Accuracy by ground-truth box size (relative area; synthetic: subject side "
            "/ image shorter side)\n",
            markdown(b_header, b_rows),
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
    app.run(main)
