"""eval.report and eval.records on hand-made records (no model): Table 2 layout, size buckets,
errors counted, shards merged, CSV, the command line; and the JSONL file's crash handling."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from eval import records, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rec(i, labels, orig, crops: dict, gt=None, size=(100, 100), error=None, question="q?"):
    methods = {
        m: {
            "crop_answer": a,
            "bbox": [0, 0, 10, 10],
            "map_stats": None,
            "gt_coverage": None,
            "error": None if a is not None else "no ground-truth box",
        }
        for m, a in crops.items()
    }
    first = next(iter(crops))
    return {
        "id": str(i),
        "question": question,
        "labels": labels,
        "original_answer": orig,
        "crop_answer": crops[first],
        "bbox": [0, 0, 10, 10],
        "method": first,
        "gt_bbox": gt,
        "image_size": list(size),
        "methods": methods,
        "timings": {"baseline_answer": 0.5, f"{first}/map": 0.25, f"{first}/crop_answer": 0.25},
        "error": error,
    }


def _write_run(out, task, methods, recs_by_shard, total):
    config = {"task": task, "methods": methods, "model": "/ckpt/llava-x", "num_examples": total}
    records.check_or_write_config(str(out), config)
    for i, recs in enumerate(recs_by_shard):
        path = records.shard_file(str(out), "llava-x", task, methods, i, len(recs_by_shard))
        with records.ResultsFile(path) as f:
            for r in recs:
                f.append(r)


def test_table2_layout_buckets_errors_and_shards(tmp_path):
    ten = ["red"] * 10
    tv = [
        _rec(0, ten, "red", {"rel_att": "red", "gt_crop": "red"}, gt=[0, 0, 5, 5]),  # small
        _rec(1, ten, "blue", {"rel_att": "red", "gt_crop": None}),  # no GT box
        _rec(2, ten, "blue", {"rel_att": "blue", "gt_crop": "red"}, gt=[0, 0, 50, 50]),  # large
        _rec(3, ten, None, {"rel_att": None, "gt_crop": None}, error="ImageError: missing"),
    ]
    _write_run(tmp_path / "tv", "textvqa", ["rel_att", "gt_crop"], [tv[:2], tv[2:]], total=4)
    vq = "Which color?\n(A) red\n(B) blue\nAnswer with the option's letter."
    vs = [_rec(0, ["B"], "(A) red", {"rel_att_high": "blue"}, question=vq)]
    _write_run(tmp_path / "vs", "vstar", ["rel_att_high"], [vs], total=2)
    text = report.make_report(str(tmp_path))
    with open(tmp_path / "report.csv") as f:
        rows = {r["task"]: r for r in csv.DictReader(f)}
    t = rows["textvqa"]
    assert t["questions"] == "4/4" and t["errors"] == "1"
    assert t["no crop"] == "25.00"  # 1 of 4; the failed question counts as wrong
    assert t["rel_att"] == "50.00"
    # Questions 1 and 3 (failed) have no GT box: left out of that column.
    assert t["gt_crop"] == "100.00 (n=2)"
    v = rows["vstar"]
    assert v["questions"] == "1/2 (partial)" and v["no crop"] == "0.00"
    assert v["rel_att_high"] == "100.00" and t.get("rel_att_high") == ""
    with open(tmp_path / "report_buckets.csv") as f:
        buckets = {r["bucket"].split()[0]: r for r in csv.DictReader(f)}
    assert set(buckets) == {"small", "large"}
    assert buckets["small"]["questions"] == "1" and buckets["small"]["no crop"] == "100.00"
    assert buckets["large"]["gt_crop"] == "100.00" and buckets["large"]["rel_att"] == "0.00"
    # Wilson 95% bounds of 1/1 and 0/1: [20.65, 100] and [0, 79.35].
    assert buckets["large"]["gt_crop 95% low"] == "20.65"
    assert buckets["large"]["gt_crop 95% high"] == "100.00"
    assert buckets["large"]["rel_att 95% high"] == "79.35"
    assert "| llava-x | textvqa | large [0.05, inf) | 1 | 0.00 [0.0, 79.3] |" in text
    assert "| llava-x | textvqa | rel_att | 0.500 |" in text  # map + crop answer per question
    assert (tmp_path / "report.md").read_text() == text


def test_wilson_interval_against_hand_computed_bounds():
    # 8 of 10 at 95%: z = 1.959964, z^2 = 3.841459; centre (0.8 + z^2/20) / (1 + z^2/10) =
    # 0.716738, half z / (1 + z^2/10) * sqrt(0.016 + z^2/400) = 0.226576.
    lo, hi = report.wilson_interval(0.8, 10)
    assert (lo, hi) == (pytest.approx(0.490162, abs=1e-6), pytest.approx(0.943318, abs=1e-6))
    # 0 and 20 of 20: the bound is z^2 / (n + z^2) = 0.161125 from 0 (or 1). 750 of 1500:
    # centred, half = z / 1.002561 * sqrt(0.25 / 1500 + z^2 / 9e6) = 0.025271.
    lo, hi = report.wilson_interval([0.0, 1.0, 0.5], [20, 20, 1500])
    assert lo[0] == 0.0 and hi[1] == 1.0
    assert hi[0] == pytest.approx(1 - lo[1]) == pytest.approx(0.161125, abs=1e-6)
    assert (lo[2], hi[2]) == (pytest.approx(0.474729, abs=1e-6), pytest.approx(0.525271, abs=1e-6))


def test_failed_question_counts_in_a_gt_column_only_with_a_gt_box(tmp_path):
    ten = ["red"] * 10
    recs = [
        _rec(0, ten, "red", {"gt_crop": "red"}, gt=[0, 0, 5, 5]),
        _rec(1, ten, None, {"gt_crop": None}, gt=[0, 0, 5, 5], error="ImageError: missing"),
        _rec(2, ten, None, {"gt_crop": None}, error="ImageError: missing"),
    ]
    _write_run(tmp_path, "textvqa", ["gt_crop"], [recs], total=3)
    report.make_report(str(tmp_path))
    with open(tmp_path / "report.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["no crop"] == "33.33" and row["gt_crop"] == "50.00 (n=2)"


def test_scores_follow_the_official_rules():
    r = {"labels": ["yes"] * 3 + ["no"] * 7, "question": "q"}
    assert report.score("textvqa", "yes", r) == pytest.approx(90.0)
    assert report.score("textvqa", "yes", r, "standard") == pytest.approx(100 * 0.9)
    assert report.score("textvqa", None, r) == 0.0
    assert report.score("pope", "NO", {"labels": "no"}) == 0.0  # raw difflib: "NO" reads as yes
    assert report.score("docvqa", "Red", {"labels": ["red"]}) == 0.0  # case-sensitive
    q = "Which?\n(A) red\n(B) blue\n(C) green\nAnswer."
    assert report.score("vstar", "C", {"question": q, "labels": ["B"]}) == 0.0
    assert report.score("vstar", "blue", {"question": q, "labels": "B"}) == 100.0


def _report_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval.report", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def test_report_command_line(tmp_path):
    _write_run(
        tmp_path / "run", "gqa", ["rel_att"], [[_rec(0, ["red"], "red", {"rel_att": "x"})]], total=1
    )
    p = _report_cli(tmp_path, "--variant=standard")
    assert p.returncode == 0, p.stderr
    assert "| llava-x | gqa | 1/1 | 0 | 100.00 | 0.00 |" in p.stdout
    # A missing directory, a damaged one: one line, exit status 2; --verbose adds the traceback.
    p = _report_cli(tmp_path / "none")
    assert (p.returncode, p.stderr) == (2, f"error: {tmp_path / 'none'}: no such directory\n")
    (path,) = records.result_files(str(tmp_path / "run"))
    with open(path, "a") as f:
        f.write('garbage\n{"id": "1"}\n')
    p = _report_cli(tmp_path / "run")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"error: {path}: line 2 is not a valid record")
    p = _report_cli(tmp_path / "run", "--verbose")
    assert p.returncode == 2 and "Traceback" in p.stderr
    assert p.stderr.splitlines()[-1].startswith("error: ")


def _damage(out, case: str) -> None:
    if case == "empty":
        return
    _write_run(out, "gqa", ["rel_att"], [[_rec(0, ["red"], "red", {"rel_att": "x"})]], total=1)
    config = os.path.join(out, records.CONFIG_NAME)
    if case == "no run_config.json":
        os.remove(config)
    elif case == "run_config.json not JSON":
        with open(config, "w") as f:
            f.write("{")
    elif case == "run_config.json without task":
        with open(config, "w") as f:
            json.dump({"methods": ["rel_att"], "model": "m"}, f)
    elif case == "garbage line":
        (path,) = records.result_files(str(out))
        with open(path) as f:
            line = f.read()
        with open(path, "w") as f:
            f.write("[1, 2]\n" + line)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no run directories (with run_config.json) under"),
        ("no run_config.json", "it holds .jsonl results without one"),
        ("run_config.json not JSON", "run_config.json: not valid JSON"),
        ("run_config.json without task", "not an eval.run configuration (missing task)"),
        ("garbage line", "line 1 is not a valid record"),
    ],
)
def test_report_refuses_a_damaged_directory_in_one_line(tmp_path, case, message):
    _damage(tmp_path, case)
    with pytest.raises((OSError, ValueError)) as e:
        report.make_report(str(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_report_names_a_vstar_record_that_is_not_multiple_choice(tmp_path):
    """A V* run directory over questions without options: one line naming the question."""
    recs = [_rec(0, ["A"], "red", {"rel_att": "red"}), _rec(1, ["B"], "x", {"rel_att": "y"})]
    recs[0]["question"] = "Which?\n(A) red\n(B) blue\nAnswer."
    _write_run(tmp_path, "vstar", ["rel_att"], [recs], total=2)
    with pytest.raises(records.DamagedRun) as e:
        report.make_report(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: question '1' cannot be scored as vstar: question must hold")
    assert "\n" not in msg


def test_results_file_survives_cut_writes(tmp_path):
    path = str(tmp_path / "r.jsonl")
    with records.ResultsFile(path) as f:
        for i in range(3):
            f.append({"id": str(i), "x": i})
    with open(path, "ab") as g:
        g.write(b'{"id": "3", "x"')  # killed mid-write
    assert [r["id"] for r in records.read_records(path)] == ["0", "1", "2"]
    with records.ResultsFile(path) as f:  # reopening cuts the partial line
        assert f.ids() == {"0", "1", "2"}
        f.append({"id": "3", "x": 3})
    with open(path) as g:
        assert [json.loads(line)["id"] for line in g] == ["0", "1", "2", "3"]
    with open(path, "a") as g:
        g.write('{"id": "4", "x": 4}')  # complete JSON, newline missing: also redone
    assert len(records.read_records(path)) == 4
    with open(path, "a") as g:
        g.write('\n{"id": "5"}\n')
    assert len(records.read_records(path)) == 6
    with open(path, "w") as g:
        g.write('{"id": "0"}\nnot json\n{"id": "2"}\n')
    with pytest.raises(ValueError, match="line 2 is not a valid record"):
        records.ResultsFile(path)


def test_config_check(tmp_path):
    records.check_or_write_config(str(tmp_path), {"task": "gqa", "methods": ("rel_att",)})
    records.check_or_write_config(str(tmp_path), {"task": "gqa", "methods": ["rel_att"]})
    # No results yet (a failed start): a new configuration replaces the old one.
    records.check_or_write_config(str(tmp_path), {"task": "gqa", "methods": ["grad_att"]})
    assert records.read_config(str(tmp_path))["methods"] == ["grad_att"]
    with records.ResultsFile(str(tmp_path / "r.jsonl")) as f:
        f.append({"id": "0"})
    config = {"task": "gqa", "methods": ["rel_att"], "weights": "b", "data_content": "c"}
    added = ("weights", "data_content")
    with pytest.raises(records.ConfigMismatch) as e:
        records.check_or_write_config(str(tmp_path), config, added)
    msg = str(e.value)
    assert "\n" not in msg and "refusing to mix" in msg and "Use another --output_dir" in msg
    # What changed, by kind; keys a newer version writes are compared when both have them.
    assert "settings changed (methods: existing ['grad_att'], this run ['rel_att'])" in msg
    records.check_or_write_config(str(tmp_path), {**config, "methods": ["grad_att"]}, added)
    with open(tmp_path / records.CONFIG_NAME, "w") as f:
        json.dump(config, f)
    with pytest.raises(records.ConfigMismatch) as e:
        records.check_or_write_config(
            str(tmp_path), {**config, "weights": "B", "data_content": "C"}, added
        )
    assert "weights, data changed (data_content: existing 'c', this run 'C'; weights:" in str(
        e.value
    )


def test_results_file_compacts_to_one_line_per_id(tmp_path):
    path = str(tmp_path / "r.jsonl")
    with records.ResultsFile(path) as f:
        f.compact()  # nothing written: no file made
        assert not os.path.exists(path)
        for rec in ({"id": "a", "error": "E"}, {"id": "b"}, {"id": "a", "error": None}):
            f.append(rec)
        f.compact()
        f.append({"id": "c"})
    with open(path) as g:
        assert [json.loads(line) for line in g] == [
            {"id": "b"},
            {"id": "a", "error": None},
            {"id": "c"},
        ]


def test_a_second_writer_of_a_shard_is_refused(tmp_path):
    path = str(tmp_path / "out" / "r.jsonl")
    with records.shard_lock(path):
        with pytest.raises(records.Locked, match=f"pid {os.getpid()} on "):
            with records.shard_lock(path):
                pass
    with records.shard_lock(path):  # released on exit
        pass
    # A file where the directory should be; a directory where the lock file should be.
    (tmp_path / "file").write_text("")
    with pytest.raises(records.OutputDirError, match="file\\b.*: a file is in the way"):
        with records.shard_lock(str(tmp_path / "file" / "r.jsonl")):
            pass
    os.makedirs(tmp_path / "out" / "x.jsonl.lock")
    with pytest.raises(records.OutputDirError, match="out: cannot write there"):
        with records.shard_lock(str(tmp_path / "out" / "x.jsonl")):
            pass
