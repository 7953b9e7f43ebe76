"""eval.run / eval.runner / eval.engine end to end on the tiny random LLaVA.

In process: a smoke run through every loader, all methods and controls (checked against the
library pipeline), bad inputs as error rows, resume, retries, shards, refusing a different
configuration. In subprocesses: the command line (flagfiles, unknown flags, bad data), a
kill -9 mid-run then resume, and data parallelism over 8 simulated CPU devices.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from eval import datasets, records, report
from eval.datasets import DataSpec
from eval.engine import Engine, base_box, gt_box, peak_map, random_box
from eval.runner import Settings, run
from tests.conftest import FAST_COMPILE
from tests.test_eval_datasets import WRITERS, _exif_rotated, write_image, write_unified

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(batch_size=2, max_new_tokens=3, progress=False)


def _settings(model_dir, task, spec, out, methods=("rel_att", "center_crop"), **kw):
    return Settings(
        model=model_dir,
        task=task,
        methods=methods,
        data=spec,
        output_dir=str(out),
        **{**FAST, **kw},
    )


def _records(out) -> dict[str, dict]:
    return {r["id"]: r for r in records.merged_records(str(out))}


def _quiet(msg):
    del msg


def test_smoke_through_every_loader(tiny_llava, tiny_llava_dir, tmp_path):
    model, _ = tiny_llava
    runs = dict(WRITERS)
    runs["textvqa (data.json)"] = write_unified
    for name, writer in runs.items():
        task = name.split()[0]
        spec = writer(str(tmp_path / "data" / name.replace(" ", "_")))
        out = tmp_path / "runs" / name.replace(" ", "_")
        path = run(_settings(tiny_llava_dir[0], task, spec, out), model=model, log=_quiet)
        recs = records.read_records(path)
        assert len(recs) == len(datasets.load(task, spec)), name
        for r in recs:
            assert r["error"] is None, (name, r["error"])
            assert isinstance(r["original_answer"], str) and isinstance(r["crop_answer"], str)
            assert r["method"] == "rel_att" and set(r["methods"]) == {"rel_att", "center_crop"}
            x1, y1, x2, y2 = r["bbox"]
            assert 0 <= x1 < x2 <= r["image_size"][0] and 0 <= y1 < y2 <= r["image_size"][1]
            assert r["map_stats"]["shape"] == [5, 5] and r["timings"]["baseline_answer"] > 0
            assert r["methods"]["center_crop"]["map_stats"] is None
    report.make_report(str(tmp_path / "runs"))
    with open(tmp_path / "runs" / "report.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:5] == ["model", "task", "questions", "errors", "no crop"]
    assert sorted(r[1] for r in rows[1:]) == sorted(n.split()[0] for n in runs)
    assert all(r[3] == "0" and "partial" not in r[2] for r in rows[1:])


def test_all_methods_share_the_baseline_and_match_the_pipeline(
    tiny_llava, tiny_llava_dir, tmp_path
):
    from vicrop_jax import bbox, pipeline
    from vicrop_jax.importance import maps_for_images

    model, _ = tiny_llava
    spec = WRITERS["vstar"](str(tmp_path / "vstar"))
    methods = ("rel_att", "grad_att", "pure_grad_high", "gt_crop", "random_crop", "center_crop",
               "gt_map")  # fmt: skip
    out = tmp_path / "out"
    run(_settings(tiny_llava_dir[0], "vstar", spec, out, methods), model=model, log=_quiet)
    recs = _records(out)
    examples = datasets.load("vstar", spec)[:2]  # one tiled (1500 px), one small image
    images = [datasets.load_image(e.image_file()) for e in examples]
    # The library pipeline on the same questions gives the same answers, maps and boxes.
    ref = pipeline.ask_batch(
        model,
        images,
        [e.question for e in examples],
        max_new_tokens=3,
        short_questions=[e.short_question for e in examples],
    )
    maps = np.asarray(maps_for_images(model, images, [e.short_question for e in examples]))
    for ex, im, a, m in zip(examples, images, ref, maps, strict=True):
        r = recs[ex.id]
        assert set(r["methods"]) == set(methods) and r["error"] is None
        assert r["original_answer"] == a.original_answer
        assert r["crop_answer"] == a.crop_answer and tuple(r["bbox"]) == a.bbox
        assert r["map_stats"]["max"] == pytest.approx(float(m.max()), rel=1e-5)
        size = im.size
        got = {k: tuple(v["bbox"]) for k, v in r["methods"].items()}
        assert got["center_crop"] == base_box((size[0] / 2, size[1] / 2), size, 35)
        assert got["random_crop"] == random_box(ex.id, size, 35, seed=0)
        gx1, gy1, gx2, gy2 = ex.gt_bbox
        x1, y1, x2, y2 = got["gt_crop"]
        assert x1 <= gx1 and y1 <= gy1 and x2 >= gx2 and y2 >= gy2
        assert r["methods"]["gt_crop"]["gt_coverage"] == 1.0
        ideal = peak_map(ex.gt_bbox, size, 5)  # the tiny model's 5 x 5 grid
        assert got["gt_map"] == tuple(int(v) for v in bbox.select_bbox(ideal, size, 35))
        assert r["methods"]["gt_map"]["map_stats"]["max"] == pytest.approx(float(ideal.max()))
        rows, cols = bbox.high_res_grid(size)[:2]
        assert r["methods"]["pure_grad_high"]["map_stats"]["shape"] == [rows * 5, cols * 5]
        for k in methods:
            assert isinstance(r["methods"][k]["crop_answer"], str)
    assert any(r["image_size"][0] > 1024 for r in recs.values())  # the tiled path ran


def test_control_boxes():
    assert base_box((50, 40), (100, 80), 35) == (33, 23, 67, 57)
    assert base_box((0, 0), (100, 80), 35) == (0, 0, 34, 34)  # clamped inside
    assert base_box((10, 10), (20, 12), 35) == (0, 0, 20, 12)  # smaller than the box
    assert gt_box((40, 30, 140, 36), (300, 200), 35) == (40, 16, 140, 50)
    a = random_box("q1", (300, 200), 35, seed=0)
    assert a == random_box("q1", (300, 200), 35, seed=0) != random_box("q2", (300, 200), 35, 0)
    assert a[2] - a[0] == 34 and a[3] - a[1] == 34


def test_peak_map_peaks_inside_the_box_and_its_box_holds_the_centre():
    from vicrop_jax.bbox import select_bbox

    # 256 x 256 image, 4 x 4 grid (64 px cells = the 64 px base); a 192 px box centred at
    # (136, 136): the peak's window holds the centre, a plateau's is the top-left cell.
    box, size = (40, 40, 232, 232), (256, 256)
    m = peak_map(box, size, 4)
    assert m.dtype == np.float32 and abs(float(m.sum()) - 1) < 1e-6
    assert (m > 0).all()  # the box overlaps every cell
    assert np.unravel_index(np.argmax(m), m.shape) == (2, 2)  # cell centre 160, nearest 136
    assert tuple(int(v) for v in select_bbox(m, size, 64)) == (128, 128, 192, 192)
    flat = np.ones((4, 4), np.float32)  # the box's cells, flat: the first window wins
    assert tuple(int(v) for v in select_bbox(flat, size, 64)) == (0, 0, 64, 64)
    small = peak_map((70, 70, 120, 120), size, 4)  # within cell (1, 1)
    assert small[1, 1] == 1.0 and small.sum() == 1.0
    off = peak_map(box, size, 4, centre=(220, 220))  # centre moves the peak
    assert np.unravel_index(np.argmax(off), off.shape) == (3, 3)
    assert abs(float(peak_map((300, 300, 400, 400), size, 4).sum()) - 1) < 1e-6  # outside


def _bad_input_records(root: str) -> tuple[DataSpec, dict[str, str | None]]:
    """A data.json mixing usable odd images and broken questions; id -> expected error."""
    img = f"{root}/images"
    write_image(f"{img}/ok.jpg")
    for mode in ("L", "RGBA", "P", "CMYK", "1"):
        write_image(f"{img}/{mode}.{'jpg' if mode == 'CMYK' else 'png'}", mode=mode)
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)).save(
        f"{img}/I16.png"
    )
    _exif_rotated(f"{img}/exif.jpg")
    write_image(f"{img}/tiny.png", size=(3, 2))
    write_image(f"{img}/big.png", size=(120, 100))
    with open(f"{img}/corrupt.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 garbage")
    os.makedirs(f"{root}/outside", exist_ok=True)
    write_image(f"{root}/outside/x.jpg")
    q = "What is written on the red circle?"
    cases = {  # id: (image_path, question, expected error substring or None)
        "ok": ("ok.jpg", q, None),
        "gray": ("L.png", q, None),
        "rgba": ("RGBA.png", q, None),
        "palette": ("P.png", q, None),
        "cmyk": ("CMYK.jpg", q, None),
        "bw": ("1.png", q, None),
        "16bit": ("I16.png", q, None),
        "exif": ("exif.jpg", q, None),
        "tiny": ("tiny.png", q, None),
        "missing": ("absent.jpg", q, "no such image file"),
        "corrupt": ("corrupt.jpg", q, "cannot read image"),
        "bomb": ("big.png", q, "decompression bomb"),
        "escape": ("../outside/x.jpg", q, "escapes the image root"),
        "absolute": (f"{root}/outside/x.jpg", q, "escapes the image root"),
        "empty": ("ok.jpg", "   ", "question is empty"),
        "huge": ("ok.jpg", "word " * 1000, "at most 4000 are accepted"),
        "many_tokens": ("ok.jpg", "what " * 600, "question too long"),
    }
    recs = [
        {"id": k, "image_path": p, "question": qq, "labels": ["red"]}
        for k, (p, qq, _) in cases.items()
    ]
    return write_unified(root, records=recs), {k: v[2] for k, v in cases.items()}


def test_bad_inputs_become_error_rows_and_the_run_goes_on(tiny_llava, tiny_llava_dir, tmp_path):
    model, _ = tiny_llava
    spec, expected = _bad_input_records(str(tmp_path / "data"))
    s = _settings(tiny_llava_dir[0], "gqa", spec, tmp_path / "out", max_image_pixels=100 * 100)
    run(s, model=model, log=_quiet)
    recs = _records(tmp_path / "out")
    assert set(recs) == set(expected)
    for k, err in expected.items():
        if err is None:
            assert recs[k]["error"] is None, (k, recs[k]["error"])
            assert isinstance(recs[k]["crop_answer"], str)
        else:
            assert err in (recs[k]["error"] or ""), (k, recs[k]["error"])
            assert recs[k]["original_answer"] is None
    assert recs["exif"]["image_size"] == [40, 20]  # the stored frame, as the official reading
    assert recs["tiny"]["bbox"] == [0, 0, 3, 2]
    text = report.make_report(str(tmp_path / "out"))
    assert f"| {sum(e is not None for e in expected.values())} |" in text  # errors column


def test_exif_transpose_turns_images_and_gt_boxes_and_is_part_of_the_identity(
    tiny_llava, tiny_llava_dir, tmp_path
):
    model, _ = tiny_llava
    os.makedirs(tmp_path / "data" / "images")
    stored = Image.new("RGB", (320, 240), (200, 200, 200))
    gt = (200, 20, 280, 80)
    stored.paste((0, 0, 255), gt)
    recs = []
    for k, orientation in enumerate((6, 2)):  # 2: mirrored
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(tmp_path / "data" / "images" / f"{k}.jpg", exif=exif.tobytes())
        recs.append({"id": f"o{orientation}", "image_path": f"{k}.jpg", "question": "q?",
                     "labels": ["x"], "gt_bbox": list(gt)})  # fmt: skip
    spec = write_unified(str(tmp_path / "data"), records=recs)
    methods = ("rel_att", "gt_crop")
    plain = _settings(tiny_llava_dir[0], "gqa", spec, tmp_path / "plain", methods)
    run(plain, model=model, log=_quiet)
    got = _records(tmp_path / "plain")
    assert set(got) == {"o6", "o2"}
    for r in got.values():  # default: the stored frame; the box as the dataset gives it
        assert r["image_size"] == [320, 240] and r["gt_bbox"] == list(gt), r["id"]
        assert r["methods"]["gt_crop"]["gt_coverage"] == 1.0
    upright = dataclasses.replace(plain, data=dataclasses.replace(spec, exif_transpose=True),
                                  output_dir=str(tmp_path / "upright"))  # fmt: skip
    run(upright, model=model, log=_quiet)
    got = _records(tmp_path / "upright")
    assert got["o6"]["image_size"] == [240, 320] and got["o6"]["gt_bbox"] == [160, 200, 220, 280]
    assert got["o2"]["image_size"] == [320, 240] and got["o2"]["gt_bbox"] == [40, 20, 120, 80]
    for r in got.values():
        x1, y1, x2, y2 = r["methods"]["gt_crop"]["bbox"]
        gx1, gy1, gx2, gy2 = r["gt_bbox"]
        assert x1 <= gx1 and y1 <= gy1 and x2 >= gx2 and y2 >= gy2
        assert r["methods"]["gt_crop"]["gt_coverage"] == 1.0
    with pytest.raises(records.ConfigMismatch, match="exif_transpose"):
        run(dataclasses.replace(upright, output_dir=plain.output_dir), model=model, log=_quiet)


def test_visualize_skips_bad_images_and_draws_the_next_good_ones(
    tiny_llava, tiny_llava_dir, tmp_path
):
    from eval.runner import visualize

    model, _ = tiny_llava
    root = str(tmp_path / "data")
    write_image(f"{root}/images/ok0.jpg", (80, 60), seed=0)
    write_image(f"{root}/images/ok1.jpg", (80, 60), seed=1)
    with open(f"{root}/images/cut.jpg", "wb") as f:
        f.write(open(f"{root}/images/ok0.jpg", "rb").read()[:300])
    recs = [{"id": i, "image_path": p, "question": "What is it?", "labels": ["x"]}
            for i, p in [("missing", "absent.jpg"), ("cut", "cut.jpg"), ("ok0", "ok0.jpg"),
                         ("ok1", "ok1.jpg")]]  # fmt: skip
    spec = write_unified(root, records=recs)
    s = _settings(tiny_llava_dir[0], "gqa", spec, tmp_path / "out", ("rel_att",))
    run(s, model=model, log=_quiet)
    logged = []
    pngs = visualize(s, 2, model, log=logged.append)
    assert [os.path.basename(p) for p in pngs] == ["ok0_rel_att.png", "ok1_rel_att.png"]
    assert all(os.path.getsize(p) > 1000 for p in pngs)
    assert len(logged) == 2 and "missing" in logged[0] and "cut" in logged[1]


def test_a_failing_batch_is_retried_per_question(tiny_llava, tiny_llava_dir, tmp_path, monkeypatch):
    model, _ = tiny_llava
    spec = write_unified(str(tmp_path / "data"), n=4)
    real = Engine.answer

    def flaky(self, items, methods, baseline=True):
        if any(it.example.id == "u2" for it in items):
            raise RuntimeError("simulated device failure")
        return real(self, items, methods, baseline)

    monkeypatch.setattr(Engine, "answer", flaky)
    run(_settings(tiny_llava_dir[0], "gqa", spec, tmp_path / "out"), model=model, log=_quiet)
    recs = _records(tmp_path / "out")
    assert recs["u2"]["error"] == "RuntimeError: simulated device failure"
    assert all(recs[k]["error"] is None for k in ("u0", "u1", "u3"))


def test_consecutive_failures_stop_the_run(tiny_llava, tiny_llava_dir, tmp_path):
    model, _ = tiny_llava
    recs = [
        {"id": i, "image_path": f"none{i}.jpg", "question": "q", "labels": ["x"]} for i in range(9)
    ]
    spec = write_unified(str(tmp_path / "data"), records=recs)
    s = _settings(tiny_llava_dir[0], "gqa", spec, tmp_path / "out", max_consecutive_errors=3)
    with pytest.raises(RuntimeError, match="3 questions in a row failed"):
        run(s, model=model, log=_quiet)
    assert len(_records(tmp_path / "out")) in (3, 4)  # the batch in flight is kept


def test_resume_skips_done_and_redoes_a_cut_line(tiny_llava, tiny_llava_dir, tmp_path, monkeypatch):
    model, _ = tiny_llava
    spec = write_unified(str(tmp_path / "data"), n=5)
    s = _settings(tiny_llava_dir[0], "gqa", spec, tmp_path / "out")
    path = run(s, model=model, log=_quiet)
    first = records.read_records(path)
    # Simulate a crash mid-write: drop the last record, leave half a line.
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(lines[:3])
        f.write(lines[3][:40])
    assert len(records.read_records(path)) == 3
    messages = []
    run(s, model=model, log=messages.append)
    assert "3 already done, 2 to answer" in messages[0]
    again = records.read_records(path)
    assert [r["id"] for r in again] == [r["id"] for r in first]
    for a, b in zip(first, again, strict=True):
        assert (a["original_answer"], a["crop_answer"], a["bbox"]) == (
            b["original_answer"],
            b["crop_answer"],
            b["bbox"],
        )
    with open(path) as f:
        assert all(json.loads(line) for line in f)  # every line whole
    # Finished: nothing to do, the model is not even loaded.
    import vicrop_jax.loading

    monkeypatch.setattr(vicrop_jax.loading, "load_model", lambda *a, **k: 1 / 0)
    messages.clear()
    run(s, log=messages.append)
    assert "0 to answer" in messages[0]
    # A damaged line in the middle is not silently dropped.
    with open(path) as f:
        lines = f.readlines()
    lines[1] = "{broken\n"
    with open(path, "w") as f:
        f.writelines(lines)
    with pytest.raises(ValueError, match="line 2 is not a valid record"):
        run(s, log=_quiet)


def test_retry_errors_and_shards_merge(tiny_llava, tiny_llava_dir, tmp_path):
    model, _ = tiny_llava
    spec = write_unified(str(tmp_path / "data"), n=5)
    os.rename(f"{spec.image_root}/u1.jpg", f"{spec.image_root}/later.jpg")
    out = tmp_path / "out"
    for i in range(2):
        run(
            _settings(tiny_llava_dir[0], "gqa", spec, out, shard_index=i, shard_count=2),
            model=model,
            log=_quiet,
        )
    assert len(records.result_files(str(out))) == 2
    recs = _records(out)
    assert len(recs) == 5 and "no such image file" in recs["u1"]["error"]
    os.rename(f"{spec.image_root}/later.jpg", f"{spec.image_root}/u1.jpg")
    messages = []
    run(
        _settings(
            tiny_llava_dir[0], "gqa", spec, out, shard_index=1, shard_count=2, retry_errors=True
        ),
        model=model,
        log=messages.append,
    )
    assert "1 to answer" in messages[0]
    recs = _records(out)
    assert recs["u1"]["error"] is None and len(recs) == 5
    rep = report.Run(str(out))
    assert rep.complete and rep.errors == 0
    # One line per id in every file: the retried question replaced its error row.
    for path in records.result_files(str(out)):
        ids = [r["id"] for r in records.read_records(path)]
        assert len(ids) == len(set(ids)), path


def test_a_different_configuration_is_refused(tiny_llava, tiny_llava_dir, tmp_path):
    model, _ = tiny_llava
    spec = write_unified(str(tmp_path / "data"), n=2)
    out = tmp_path / "out"
    run(_settings(tiny_llava_dir[0], "gqa", spec, out), model=model, log=_quiet)
    for change in (
        {"methods": ("grad_att",)},
        {"max_new_tokens": 5},
        {"layer": "2"},
        {"task": "textvqa"},
    ):
        kw = {"methods": ("rel_att", "center_crop"), **change}
        task = kw.pop("task", "gqa")
        with pytest.raises(records.ConfigMismatch, match="refusing to mix") as e:
            run(_settings(tiny_llava_dir[0], task, spec, out, **kw), model=model, log=_quiet)
        assert next(iter(change)) in str(e.value)
    # Execution settings may change between restarts.
    run(_settings(tiny_llava_dir[0], "gqa", spec, out, batch_size=1), model=model, log=_quiet)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "old.jsonl").write_text('{"id": "u0"}\n')
    with pytest.raises(records.ConfigMismatch, match="no run_config.json"):
        run(_settings(tiny_llava_dir[0], "gqa", spec, stray), model=model, log=_quiet)


def test_other_weights_at_the_same_path_are_refused(tiny_llava, tiny_llava_dir, tmp_path):
    """Retraining into the same directory must not resume the old model's results."""
    from safetensors.numpy import load_file, save_file

    model, _ = tiny_llava
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir[0], ckpt)
    spec = write_unified(str(tmp_path / "data"), n=2)
    out = tmp_path / "out"
    s = _settings(str(ckpt), "gqa", spec, out)
    run(s, model=model, log=_quiet)
    config = records.read_config(str(out))
    assert len(config["weights"]) == 16
    weights = str(ckpt / "model.safetensors")
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(records.ConfigMismatch, match="weights") as e:
        run(s, model=model, log=_quiet)
    assert config["weights"] in str(e.value)
    # A run_config.json from before the fingerprint (no "weights") resumes and is kept.
    del config["weights"]
    with open(out / records.CONFIG_NAME, "w") as f:
        json.dump(config, f)
    run(s, model=model, log=_quiet)
    assert records.read_config(str(out)) == config


def test_a_changed_generation_config_is_refused(tiny_llava, tiny_llava_dir, tmp_path):
    """A repetition penalty changes the answers: a changed generation_config.json at the same
    path must not resume the old results."""
    model, _ = tiny_llava
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir[0], ckpt)
    spec = write_unified(str(tmp_path / "data"), n=2)
    out = tmp_path / "out"
    s = _settings(str(ckpt), "gqa", spec, out)
    run(s, model=model, log=_quiet)
    config = records.read_config(str(out))
    assert config["generation"] == {"repetition_penalty": 1.0, "eos_token_id": 2}
    gen_path = ckpt / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen_path.write_text(json.dumps({**gen, "repetition_penalty": 1.3}))
    with pytest.raises(records.ConfigMismatch, match="generation") as e:
        run(s, model=model, log=_quiet)
    assert "1.3" in str(e.value) and "\n" not in str(e.value)


def test_edited_data_or_images_are_refused(tiny_llava, tiny_llava_dir, tmp_path):
    """Data edited in place must not resume the old results: refused in one line."""
    model, _ = tiny_llava
    spec = write_unified(str(tmp_path / "data"), n=2)
    out = tmp_path / "out"
    s = _settings(tiny_llava_dir[0], "gqa", spec, out)
    path = run(s, model=model, log=_quiet)
    assert len(records.read_config(str(out))["data_content"]) == 16
    fingerprints = {r["id"]: r["image_fingerprint"] for r in records.read_records(path)}
    image = f"{spec.image_root}/u1.jpg"
    assert fingerprints["u1"] == records.file_fingerprint(image)
    with open(spec.data_json) as f:
        original = f.read()
    data = json.loads(original)
    data[1]["labels"] = ["blue"] * 10
    with open(spec.data_json, "w") as f:
        json.dump(data, f)
    with pytest.raises(records.ConfigMismatch) as e:
        run(s, model=model, log=_quiet)
    msg = str(e.value)
    assert "refusing to mix" in msg and "data changed (data_content:" in msg and "\n" not in msg
    with open(spec.data_json, "w") as f:
        f.write(original)
    messages = []
    run(s, model=model, log=messages.append)  # restored: resumes
    assert "2 already done, 0 to answer" in messages[0]
    # The same file name, other pixels (a copy keeps the fingerprint: no mtime in it).
    write_image(image, (80, 60), seed=7)
    with pytest.raises(records.ConfigMismatch) as e:
        run(s, model=model, log=_quiet)
    msg = str(e.value)
    assert "data changed (the image of 1 answered question(s)" in msg and "'u1'" in msg
    assert "\n" not in msg


def test_a_failed_start_leaves_the_directory_usable(tiny_llava, tiny_llava_dir, tmp_path):
    """A wrong --model or --layer writes no configuration; the corrected command runs."""
    from convert.checkpoint import CheckpointError

    model, _ = tiny_llava
    spec = write_unified(str(tmp_path / "data"), n=2)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not exist"):
        run(_settings(str(tmp_path / "no_such_dir"), "gqa", spec, out), log=_quiet)
    with pytest.raises(ValueError, match="99"):
        run(_settings(tiny_llava_dir[0], "gqa", spec, out, layer="99"), model=model, log=_quiet)
    ckpt = tmp_path / "ckpt"  # a download cut short, then completed
    shutil.copytree(tiny_llava_dir[0], ckpt)
    weights = ckpt / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        run(_settings(str(ckpt), "gqa", spec, out), log=_quiet)
    assert not os.path.exists(out / records.CONFIG_NAME) and not records.result_files(str(out))
    shutil.copy(os.path.join(tiny_llava_dir[0], "model.safetensors"), weights)
    run(_settings(str(ckpt), "gqa", spec, out), model=model, log=_quiet)
    shutil.rmtree(out)
    out.mkdir()
    # A configuration written by a failed start (no results) gives way to a new one.
    with open(out / records.CONFIG_NAME, "w") as f:
        json.dump({"model": "/elsewhere", "task": "gqa"}, f)
    messages = []
    run(_settings(tiny_llava_dir[0], "gqa", spec, out), model=model, log=messages.append)
    assert "0 already done, 2 to answer" in messages[0]
    assert records.read_config(str(out))["model"] == os.path.abspath(tiny_llava_dir[0])


def test_a_second_run_of_a_shard_is_refused(tiny_llava, tiny_llava_dir, tmp_path):
    model, _ = tiny_llava
    spec = write_unified(str(tmp_path / "data"), n=2)
    s = _settings(tiny_llava_dir[0], "gqa", spec, tmp_path / "out")
    path = records.shard_file(s.output_dir, s.model_name, s.task, s.methods, 0, 1)
    with records.shard_lock(path):  # another run holds it
        with pytest.raises(
            records.Locked, match=f"being written by another run .pid {os.getpid()}"
        ):
            run(s, model=model, log=_quiet)
    assert not records.result_files(s.output_dir)
    run(s, model=model, log=_quiet)
    assert len(records.read_records(path)) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_dir_is_refused(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    with pytest.raises(records.OutputDirError, match="cannot write there"):
        with records.shard_lock(str(out / "r.jsonl")):
            pass


# ---------------------------------------------------------------------------------------
# Subprocesses: the command line, kill -9, several devices.


def _env(**extra) -> dict:
    # Of a caller's XLA flags (a device count), only the suite's fast compile.
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _flagfile(path, **flags) -> str:
    with open(path, "w") as f:
        f.write("".join(f"--{k}={v}\n" for k, v in flags.items()))
    return str(path)


def test_command_line_errors_are_clear(tiny_llava_dir, tmp_path):
    cmd = [sys.executable, "-m", "eval.run"]
    p = subprocess.run(
        [*cmd, "--model=x", "--task=gqa", "--output_dir=o", "--no_such_flag=1"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "no_such_flag" in p.stderr
    bad = tmp_path / "data.json"
    bad.write_text('[{"image_path": "a.jpg", "question": "q"}]')
    p = subprocess.run(
        [
            *cmd,
            f"--model={tiny_llava_dir[0]}",
            "--task=gqa",
            f"--data_json={bad}",
            f"--image_root={tmp_path}",
            f"--output_dir={tmp_path / 'o'}",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert f"error: {bad}: record 0: missing field 'labels'" in p.stderr
    assert "Traceback" not in p.stderr


_FLAGS_TO_SETTINGS = r"""
import json, sys
import jax
from absl import flags
import eval.run as cli
calls = {}
jax.distributed.initialize = lambda **kw: calls.update(kw)
jax.process_index, jax.process_count = (lambda: 1), (lambda: 3)
flags.FLAGS(sys.argv)
s = cli.settings_from_flags()
print(json.dumps({"calls": calls, "shard": [s.shard_index, s.shard_count], "methods": s.methods,
                  "limit": s.limit, "batch": s.batch_size, "dtype": s.dtype,
                  "vstar": s.data.vstar_dir, "new_tokens": s.max_new_tokens}))
"""


def test_example_flagfiles_and_distributed_shards():
    """The shipped flagfiles parse; --distributed makes process index/count the shard."""
    argv = [
        "prog",
        f"--flagfile={REPO}/eval/flags/vstar_llava.flags",
        f"--flagfile={REPO}/eval/flags/smoke.flags",
        "--distributed",
        "--coordinator_address=host:1234",
        "--num_processes=3",
        "--process_id=1",
    ]
    p = subprocess.run(
        [sys.executable, "-c", _FLAGS_TO_SETTINGS, *argv[1:]],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["calls"] == {"coordinator_address": "host:1234", "num_processes": 3, "process_id": 1}
    assert got["shard"] == [1, 3] and got["limit"] == 8 and got["batch"] == 2
    assert got["methods"][0] == "rel_att_high" and "gt_crop" in got["methods"]
    assert got["dtype"] == "bfloat16" and got["vstar"] == "data/vstar_bench"
    assert got["new_tokens"] == 4
    mine = [n for n in os.listdir(f"{REPO}/eval/flags")
            if n.endswith(("_llava.flags", "_llava_next.flags", "_qwen25vl.flags"))]  # fmt: skip
    script = (
        "import sys; from absl import flags; import eval.run\n"
        "for f in sys.argv[1:]:\n"
        "    flags.FLAGS(['p', '--task=gqa', '--model=m', '--output_dir=o', '--flagfile=' + f])\n"
        "    flags.FLAGS.unparse_flags()\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script, *(f"{REPO}/eval/flags/{n}" for n in [*mine, "smoke.flags"])],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr[-1000:]
    assert len(mine) >= 7


def _comparable(recs: dict) -> dict:
    keep = ("original_answer", "crop_answer", "bbox", "error", "labels", "question")
    return {
        k: (
            {f: r[f] for f in keep},
            {m: (v["crop_answer"], v["bbox"]) for m, v in r["methods"].items()},
        )
        for k, r in recs.items()
    }


def test_kill_minus_9_on_8_devices_then_resume_equals_an_uninterrupted_run(
    tiny_llava, tiny_llava_dir, tmp_path
):
    """The command line runs data parallel over 8 simulated CPU devices and is killed with
    SIGKILL mid-run; resuming (here on one device) completes it, and the records equal an
    uninterrupted single-device run: same ids, answers and boxes, in dataset order."""
    n = 32
    spec = write_unified(str(tmp_path / "data"), n=n)
    methods = "rel_att,random_crop"
    flags = _flagfile(
        tmp_path / "run.flags",
        model=tiny_llava_dir[0],
        task="gqa",
        data_json=spec.data_json,
        image_root=spec.image_root,
        methods=methods,
    )
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "eval.run",
        f"--flagfile={flags}",
        f"--flagfile={REPO}/eval/flags/smoke.flags",
        f"--limit={n}",
        "--max_new_tokens=3",
        f"--output_dir={out}",
        "--noprogress",
    ]
    env = _env(
        XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}",
        JAX_DEFAULT_MATMUL_PRECISION="highest",
    )  # as tests/conftest.py pins in process
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    path = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            files = records.result_files(str(out)) if out.exists() else []
            if files and len(records.read_records(files[0])) >= 3:
                path = files[0]
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    stderr = proc.stderr.read()
    assert path is not None and proc.returncode == -signal.SIGKILL, stderr[-2000:]
    assert "data parallel over 8 local devices" in stderr
    n_killed = len(records.read_records(path))
    assert 3 <= n_killed < n, n_killed
    model, _ = tiny_llava
    settings = _settings(tiny_llava_dir[0], "gqa", spec, out, tuple(methods.split(",")), limit=n)
    messages = []
    assert run(settings, model=model, log=messages.append) == path
    assert f"{n_killed} already done, {n - n_killed} to answer" in messages[0]
    assert [r["id"] for r in records.read_records(path)] == [f"u{i}" for i in range(n)]
    ref = tmp_path / "ref"
    run(dataclasses.replace(settings, output_dir=str(ref)), model=model, log=_quiet)
    a, b = _records(ref), _records(out)
    assert len(a) == n and _comparable(a) == _comparable(b)
    for k in a:
        assert b[k]["map_stats"]["max"] == pytest.approx(a[k]["map_stats"]["max"], rel=1e-5)


def test_items_and_engine_validate(tiny_llava):
    model, _ = tiny_llava
    eng = Engine(model, batch_size=2, max_new_tokens=3)
    ex = datasets.Example("a", "x.jpg", "What is written?", ["x"], "/tmp")
    eng.check_question(ex)
    with pytest.raises(ValueError, match="empty"):
        eng.check_question(datasets.Example("a", "x.jpg", "", ["x"], "/tmp"))
    assert eng.prompt_tokens("what", 2) > 2 * 25
    with pytest.raises(ValueError, match="unknown method"):
        Settings(model="m", task="gqa", methods=("crop",), data=DataSpec(), output_dir="o")
    with pytest.raises(ValueError, match="listed twice"):
        Settings(
            model="m", task="gqa", methods=("rel_att", "rel_att"), data=DataSpec(), output_dir="o"
        )
    s = Settings(
        model="m",
        task="gqa",
        methods=("rel_att", "gt_crop"),
        data=DataSpec(),
        output_dir="o",
        high_res=True,
    )
    assert s.methods == ("rel_att_high", "gt_crop")


def test_engine_shared_prefix_equals_separate_passes(tiny_llava, monkeypatch):
    # LLaVA on one device: the baseline's prefix cache serves every method's [original, crop]
    # answer and rel_att's map comes from the baseline's pass (no map pass of its own); same
    # answers, maps and boxes as the separate passes, a short batch padded, an item without a
    # ground-truth box left out of gt_crop.
    from eval.engine import Item
    from vicrop_jax import prompt_cache as prefix_lib
    from vicrop_jax.pipeline import Executor

    model, _ = tiny_llava
    rng = np.random.RandomState(3)
    items = []
    for i, (w, h) in enumerate([(120, 90), (64, 100), (150, 150)]):
        img = Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
        gt = None if i == 1 else (10.0, 20.0, 50.0, 60.0)
        q = ["What is written on the red circle?", "What color is it?", "Is there a cat?"][i]
        items.append(Item(datasets.Example(f"q{i}", "x.png", q, ["a"], "/tmp", gt_bbox=gt), img))
    methods = ("rel_att", "gt_crop", "center_crop")
    finishes = []
    real_finish = prefix_lib.finish
    monkeypatch.setattr(prefix_lib, "finish", lambda *a: finishes.append(1) or real_finish(*a))
    map_passes = []
    real_maps = Executor.maps
    monkeypatch.setattr(Executor, "maps", lambda *a: map_passes.append(1) or real_maps(*a))
    eng = Engine(model, batch_size=4, max_new_tokens=4)
    shared = eng.answer(items, methods)
    assert len(finishes) == 3 and not map_passes  # one finish per method; no map pass
    monkeypatch.setattr(Executor, "shares_prefix", lambda self, n: False)
    separate = eng.answer(items, methods)
    assert len(finishes) == 3 and len(map_passes) == 1
    for a, b in zip(shared, separate, strict=True):
        assert a["original_answer"] == b["original_answer"]
        for m in methods:
            assert a["methods"][m]["crop_answer"] == b["methods"][m]["crop_answer"], m
            assert a["methods"][m]["bbox"] == b["methods"][m]["bbox"]
        sa, sb = a["methods"]["rel_att"]["map_stats"], b["methods"]["rel_att"]["map_stats"]
        for k in ("max", "mean", "std"):
            assert sa[k] == pytest.approx(sb[k], rel=1e-5), k
        assert sa["peak"] == sb["peak"]
    assert shared[1]["methods"]["gt_crop"]["crop_answer"] is None
    assert shared[1]["methods"]["gt_crop"]["error"] == "no ground-truth box"
    assert all(isinstance(r["methods"]["rel_att"]["crop_answer"], str) for r in shared)


def test_engine_runs_instructblip_like_the_pipeline(tiny_instructblip):
    from eval.engine import Item
    from vicrop_jax import pipeline

    model, _ = tiny_instructblip
    eng = Engine(model, batch_size=2, max_new_tokens=3)
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
              for w, h in [(60, 45), (40, 70)]]  # fmt: skip
    qs = ["What is written on the red circle?", "What color is the square?"]
    items = [Item(datasets.Example(str(i), "x.png", q, ["x"], "/tmp"), im)
             for i, (q, im) in enumerate(zip(qs, images, strict=True))]  # fmt: skip
    res = eng.answer(items, ["rel_att"])
    ref = pipeline.ask_batch(model, images, qs, max_new_tokens=3)
    for r, a in zip(res, ref, strict=True):
        assert r["original_answer"] == a.original_answer
        assert tuple(r["methods"]["rel_att"]["bbox"]) == a.bbox
        assert r["methods"]["rel_att"]["crop_answer"] == a.crop_answer
    n = eng.prompt_tokens(qs[0], 2)
    enc = model.processor(images=images[0], text=eng.prompt(qs[0]), return_tensors="np")
    assert n == enc["input_ids"].shape[1] + model.config.num_query_tokens  # one more image


def test_smoke_llava_next_like_the_pipeline(tiny_llava_next, tmp_path):
    """eval.run on the tiny LLaVA-NeXT: each record's map on its image's tiles grid (the
    default map_source "both"; two images of one pinpoint, unpadded to different grids), the
    same answers and boxes as the library pipeline; a map_source is part of the identity."""
    from vicrop_jax import pipeline

    model, _ = tiny_llava_next
    spec = WRITERS["textvqa"](str(tmp_path / "data"), n=2)
    s = _settings(model.path, "textvqa", spec, tmp_path / "run")
    recs = {r["id"]: r for r in records.read_records(run(s, model=model, log=_quiet))}
    examples = datasets.load("textvqa", spec)
    images = [datasets.load_image(e.image_file()) for e in examples]
    ref = pipeline.ask_batch(model, images, [e.question for e in examples],
                             max_new_tokens=FAST["max_new_tokens"])  # fmt: skip
    grids = set()
    for e, im, a in zip(examples, images, ref, strict=True):
        r = recs[e.id]
        assert r["error"] is None, r["error"]
        top, bottom, left, right = model.config.unpadded_span(im.size[1], im.size[0])
        grids.add((bottom - top, right - left))
        assert r["map_stats"]["shape"] == [bottom - top, right - left] == list(a.att_map.shape)
        assert r["original_answer"] == a.original_answer
        assert tuple(r["bbox"]) == a.bbox and r["crop_answer"] == a.crop_answer
    assert len(grids) == 2, "the images should unpad to different grids"
    with pytest.raises(ValueError, match="map_source"):
        run(dataclasses.replace(s, map_source="base"), model=model, log=_quiet)


def test_synthetic_task_writes_its_set_once_and_reports_by_subject_size(
    tiny_llava, tiny_llava_dir, tmp_path
):
    from eval.runner import visualize
    from eval.synthetic import SIZE_BUCKETS

    model, _ = tiny_llava
    spec = DataSpec(synthetic_dir=str(tmp_path / "data"), synthetic_n=6, synthetic_seed=2,
                    synthetic_sizes="224,240")  # fmt: skip
    s = _settings(tiny_llava_dir[0], "synthetic", spec, tmp_path / "out", ("rel_att", "gt_crop"))
    path = run(s, model=model, log=_quiet)
    recs = records.read_records(path)
    assert len(recs) == 6 and all(r["error"] is None for r in recs)
    stamp = json.loads((tmp_path / "data" / "synthetic.json").read_text())
    assert stamp == {"n": 6, "seed": 2, "split": "test", "glyphs": "letter", "sizes": [224, 240]}
    for r in recs:
        assert len(r["labels"]) == 10 and len(r["labels"][0]) == 1  # one printed letter
        assert r["extra"]["size_bucket"] in {"small", "medium", "large"}
        assert r["gt_bbox"] == r["extra"]["bbox"]
        assert min(r["image_size"]) in (224, 240)
    # The same directory with another set is refused, not mixed.
    with pytest.raises(datasets.DatasetError, match="synthetic set"):
        datasets.load("synthetic", dataclasses.replace(spec, synthetic_n=7))
    with pytest.raises(datasets.DatasetError, match="comma list"):
        datasets.load("synthetic", dataclasses.replace(spec, synthetic_sizes="224,big"))
    with pytest.raises(datasets.DatasetError, match="synthetic set"):
        datasets.load("synthetic", dataclasses.replace(spec, synthetic_distinct_colors=True))
    distinct = dataclasses.replace(spec, synthetic_dir=str(tmp_path / "distinct"),
                                   synthetic_distinct_colors=True)  # fmt: skip
    examples = datasets.load("synthetic", distinct)
    assert json.loads((tmp_path / "distinct" / "synthetic.json").read_text())[
        "distinct_colors"] is True  # fmt: skip
    for ex in examples:
        colours = [o["color"] for o in ex.extra["objects"]]
        assert len(set(colours)) == len(colours)
    report.make_report(str(tmp_path / "out"))
    with open(tmp_path / "out" / "report_buckets.csv") as f:
        rows = list(csv.DictReader(f))
    want = {b: sum(r["extra"]["size_bucket"] == b for r in recs) for b, _, _ in SIZE_BUCKETS}
    got = {row["bucket"].split()[0]: int(row["questions"]) for row in rows}
    assert got == {b: n for b, n in want.items() if n}
    assert all(row["bucket"].split()[1].startswith("[") for row in rows)
    pngs = visualize(s, 2)
    assert len(pngs) == 2 and all(p.endswith("_rel_att.png") and os.path.getsize(p) > 1000
                                  for p in pngs)  # fmt: skip
    # map_question="full": the maps are asked with the question itself, not the set's short
    # (V*-style) one; the choice is part of the run's identity.
    from vicrop_jax.importance import maps_for_images

    full = _settings(tiny_llava_dir[0], "synthetic", spec, tmp_path / "full", ("rel_att",),
                     limit=2, map_question="full")  # fmt: skip
    exs = full.examples()[:2]
    assert all(e.short_question is None for e in exs)
    assert all(e.short_question for e in s.examples())
    got = {r["id"]: r for r in records.read_records(run(full, model=model, log=_quiet))}
    images = [datasets.load_image(e.image_file()) for e in exs]
    want = np.asarray(maps_for_images(model, images, [e.question for e in exs]))
    for e, m in zip(exs, want, strict=True):
        assert got[e.id]["map_stats"]["max"] == pytest.approx(float(m.max()), rel=1e-5)
        short = {r["id"]: r for r in recs}[e.id]  # the first run: the short question's map
        assert got[e.id]["map_stats"]["max"] != short["map_stats"]["max"]
    with pytest.raises(records.ConfigMismatch, match="map_question"):
        run(dataclasses.replace(full, output_dir=s.output_dir, limit=0), model=model, log=_quiet)
    with pytest.raises(ValueError, match="map_question"):
        dataclasses.replace(full, map_question="short")
