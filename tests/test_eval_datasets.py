"""eval.datasets: every loader on tiny files in the benchmark's published schema, malformed
files, and image loading (modes, EXIF, sizes, corrupt files, decompression bombs, paths).

The fake-dataset writers here are shared with the other test_eval_* modules.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from eval import datasets
from eval.datasets import DatasetError, DataSpec, Example, ImageError

QUESTIONS = [
    "What is written on the red circle?",
    "What color is the square?",
    "What is written on the blue triangle?",
    "how many are there in this picture?",
]


def write_image(path: str, size=(64, 48), seed=0, mode="RGB", fmt=None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.RandomState(seed)
    arr = (rng.rand(size[1], size[0], 3) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def _q(i: int) -> str:
    return QUESTIONS[i % len(QUESTIONS)]


def _dump(path: str, obj) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def write_textvqa(root: str, n: int = 3) -> DataSpec:
    data = []
    for i in range(n):
        write_image(f"{root}/train_images/img{i}.jpg", (70 + 9 * i, 50), seed=i)
        data.append(
            {
                "question_id": 100 + i,
                "question": _q(i),
                "image_id": f"img{i}",
                "answers": ["red"] * 7 + ["blue"] * 3,
                "image_classes": ["Sign"],
            }
        )
    return DataSpec(textvqa_json=_dump(f"{root}/TextVQA_0.5.1_val.json", {"data": data}))


def write_vstar(root: str, n: int = 2) -> DataSpec:
    for cat in datasets.VSTAR_CATEGORIES:
        for i in range(n):
            size = (1500, 1100) if i == 0 else (300, 200)  # one high-res image per category
            write_image(f"{root}/{cat}/sa_{i}.jpg", size, seed=i)
            ann = {
                "target_object": ["cup"],
                "bbox": [[40 + i, 30, 20, 10], [100, 90, 5, 6]],
                "question": f"What is the color of the cup {i}?",
                "options": ["white", "black", "red", "green"][: 2 + 2 * (cat[0] == "d")],
            }
            _dump(f"{root}/{cat}/sa_{i}.json", ann)
    return DataSpec(vstar_dir=root)


def write_pope(root: str, n: int = 3) -> DataSpec:
    lines = []
    for i in range(n):
        write_image(f"{root}/val2014/COCO_val2014_{i:012d}.jpg", (80, 60), seed=i)
        lines.append(
            json.dumps(
                {
                    "question_id": i + 1,
                    "image": f"COCO_val2014_{i:012d}.jpg",
                    "text": "Is there a cup in the image?",
                    "label": ["yes", "no"][i % 2],
                }
            )
        )
    path = f"{root}/coco_pope_adversarial.jsonl"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return DataSpec(pope_jsonl=path, image_root=f"{root}/val2014")


def write_docvqa(root: str, n: int = 3) -> DataSpec:
    data = []
    for i in range(n):
        write_image(f"{root}/documents/doc{i}.png", (90, 120), seed=i, fmt="PNG")
        data.append(
            {
                "questionId": 500 + i,
                "question": _q(i),
                "image": f"documents/doc{i}.png",
                "docId": i,
                "answers": ["red", "Red"],
            }
        )
    return DataSpec(
        docvqa_json=_dump(f"{root}/val_v1.0.json", {"dataset_name": "docvqa", "data": data})
    )


def write_aokvqa(root: str, n: int = 3) -> DataSpec:
    data = []
    for i in range(n):
        write_image(f"{root}/val2017/{i + 7:012d}.jpg", (64, 64), seed=i)
        data.append(
            {
                "question_id": f"aok{i}",
                "image_id": i + 7,
                "question": _q(i),
                "choices": ["red", "blue", "green", "white"],
                "correct_choice_idx": 0,
                "direct_answers": ["red"] * 10,
                "difficult_direct_answer": False,
                "rationales": ["it is red"],
            }
        )
    return DataSpec(
        aokvqa_json=_dump(f"{root}/aokvqa_v1p0_val.json", data), image_root=f"{root}/val2017"
    )


def write_gqa(root: str, n: int = 3) -> DataSpec:
    data = {}
    for i in range(n):
        write_image(f"{root}/images/n{i}.jpg", (50, 70), seed=i)
        data[f"20{i}"] = {
            "imageId": f"n{i}",
            "question": _q(i),
            "answer": "red",
            "fullAnswer": "It is red.",
            "types": {},
        }
    return DataSpec(
        gqa_json=_dump(f"{root}/testdev_balanced_questions.json", data), image_root=f"{root}/images"
    )


def write_vqav2(root: str, n: int = 3) -> DataSpec:
    qs, anns = [], []
    for i in range(n):
        write_image(f"{root}/val2014/COCO_val2014_{i + 42:012d}.jpg", (60, 40), seed=i)
        qs.append({"image_id": i + 42, "question": _q(i), "question_id": 4200 + i})
        anns.append(
            {
                "question_id": 4200 + i,
                "image_id": i + 42,
                "answer_type": "other",
                "multiple_choice_answer": "red",
                "answers": [
                    {"answer": "red", "answer_confidence": "yes", "answer_id": k}
                    for k in range(1, 11)
                ],
            }
        )
    q = _dump(
        f"{root}/v2_OpenEnded_mscoco_val2014_questions.json",
        {"data_subtype": "val2014", "questions": qs},
    )
    a = _dump(f"{root}/v2_mscoco_val2014_annotations.json", {"annotations": anns})
    return DataSpec(vqav2_questions=q, vqav2_annotations=a, image_root=f"{root}/val2014")


def write_unified(root: str, n: int = 3, records: list | None = None) -> DataSpec:
    if records is None:
        records = []
        for i in range(n):
            write_image(f"{root}/images/u{i}.jpg", (80, 60), seed=i)
            records.append(
                {
                    "id": f"u{i}",
                    "image_path": f"u{i}.jpg",
                    "question": _q(i),
                    "labels": ["red"] * 10,
                    "bbox": [10, 12, 30, 40],
                }
            )
    return DataSpec(data_json=_dump(f"{root}/data.json", records), image_root=f"{root}/images")


WRITERS = {
    "textvqa": write_textvqa,
    "vstar": write_vstar,
    "pope": write_pope,
    "docvqa": write_docvqa,
    "aokvqa": write_aokvqa,
    "gqa": write_gqa,
    "vqav2": write_vqav2,
}


# ---------------------------------------------------------------------------------------
# Loaders on the published schemas.


@pytest.mark.parametrize("task", sorted(WRITERS))
def test_every_loader_reads_its_published_files(tmp_path, task):
    spec = WRITERS[task](str(tmp_path))
    examples = datasets.load(task, spec)
    assert len(examples) == (4 if task == "vstar" else 3)
    assert len({e.id for e in examples}) == len(examples)
    for ex in examples:
        assert os.path.isfile(ex.image_file()), ex
        assert isinstance(ex.question, str) and ex.question
        if task == "pope":
            assert ex.labels in ("yes", "no")
        else:
            assert ex.labels and all(isinstance(a, str) for a in ex.labels)
        json.dumps(ex.extra)
        im = datasets.load_image(ex.image_file())
        assert im.mode == "RGB"


def test_field_mapping(tmp_path):
    t = datasets.load("textvqa", write_textvqa(str(tmp_path / "t")))
    assert t[0].id == "100" and t[0].image_path == "img0.jpg" and len(t[0].labels) == 10
    assert t[0].image_root.endswith("train_images")
    d = datasets.load("docvqa", write_docvqa(str(tmp_path / "d")))
    assert d[1].id == "501" and d[1].image_path == "documents/doc1.png"
    a = datasets.load("aokvqa", write_aokvqa(str(tmp_path / "a")))
    assert a[0].image_path == "000000000007.jpg" and a[0].extra["correct_choice_idx"] == 0
    v = datasets.load("vqav2", write_vqav2(str(tmp_path / "v")))
    assert v[0].image_path == "COCO_val2014_000000000042.jpg" and v[0].labels == ["red"] * 10
    g = datasets.load("gqa", write_gqa(str(tmp_path / "g")))
    assert g[2].id == "202" and g[2].labels == ["red"]
    u = datasets.load("textvqa", write_unified(str(tmp_path / "u")))
    assert u[0].id == "u0" and u[0].gt_bbox == (10.0, 12.0, 30.0, 40.0)


def test_vstar_question_form_and_label(tmp_path):
    from eval.metrics import vstar_options

    examples = datasets.load("vstar", write_vstar(str(tmp_path)))
    assert [e.id for e in examples][:2] == ["direct_attributes/sa_0", "direct_attributes/sa_1"]
    for ex in examples:
        options = vstar_options(ex.question)  # the official scorer's parsing
        correct = ex.extra["options"][0]  # published files list the correct option first
        letter = ex.labels[0]
        assert options["ABCD".index(letter)] == f"({letter}) {correct}"
        assert ex.question.splitlines()[0] == ex.short_question
        assert ex.question.endswith(datasets.VSTAR_INSTRUCTION)
        x1, y1, x2, y2 = ex.gt_bbox  # union of [x, y, w, h] boxes
        assert (x2, y2) == (105.0, 96.0) and x1 == 40 + int(ex.id[-1])
    # The option order is fixed per id: loading again gives the same questions.
    again = datasets.load("vstar", write_vstar(str(tmp_path)))
    assert [e.question for e in again] == [e.question for e in examples]


def test_pope_several_files_prefix_ids(tmp_path):
    spec = write_pope(str(tmp_path))
    other = str(tmp_path / "coco_pope_random.jsonl")
    with open(spec.pope_jsonl) as f, open(other, "w") as g:
        g.write(f.read())
    both = datasets.load(
        "pope", DataSpec(pope_jsonl=f"{spec.pope_jsonl},{other}", image_root=spec.image_root)
    )
    assert len(both) == 6 and both[0].id == "coco_pope_adversarial/1"


# ---------------------------------------------------------------------------------------
# Malformed files: the error names the file and the record.


def _raises(match: str, fn, *args):
    with pytest.raises(DatasetError, match=match) as e:
        fn(*args)
    return str(e.value)


def test_malformed_files_name_file_and_record(tmp_path):
    p = tmp_path / "TextVQA_0.5.1_val.json"
    p.write_text('{"data": [1, 2,')
    msg = _raises("not valid JSON", datasets.load_textvqa, str(p))
    assert str(p) in msg and "line 1" in msg
    p.write_text(
        json.dumps(
            {
                "data": [
                    {"question_id": 1, "question": "q", "image_id": "a", "answers": ["x"]},
                    {"question_id": 2, "image_id": "b", "answers": ["y"]},
                ]
            }
        )
    )
    msg = _raises("missing field 'question'", datasets.load_textvqa, str(p))
    assert str(p) in msg and "record 1 (question_id 2)" in msg
    p.write_text(
        json.dumps({"data": [{"question_id": 1, "question": 5, "image_id": "a", "answers": ["x"]}]})
    )
    _raises("'question' must be str", datasets.load_textvqa, str(p))
    p.write_text(
        json.dumps({"data": [{"question_id": 1, "question": "q", "image_id": "a", "answers": []}]})
    )
    _raises("non-empty list", datasets.load_textvqa, str(p))
    p.write_text(json.dumps({"rows": []}))
    _raises("'data' list", datasets.load_textvqa, str(p))
    _raises("no such file", datasets.load_textvqa, str(tmp_path / "absent.json"))


def test_malformed_other_benchmarks(tmp_path):
    root = str(tmp_path)
    spec = write_pope(root + "/pope")
    with open(spec.pope_jsonl, "a") as f:
        f.write('{"question_id": 9, "image": "x.jpg", "text": "q", "label": "maybe"}\n')
    msg = _raises("label must be 'yes' or 'no'", datasets.load, "pope", spec)
    assert "line 4" in msg
    with open(spec.pope_jsonl, "a") as f:
        f.write("{oops\n")
    _raises("line 5 is not valid JSON", datasets.load, "pope", spec)
    spec = write_vqav2(root + "/vqa")
    ann = json.load(open(spec.vqav2_annotations))
    ann["annotations"].pop()
    _dump(spec.vqav2_annotations, ann)
    _raises("has no annotation", datasets.load, "vqav2", spec)
    spec = write_vstar(root + "/vstar")
    _dump(
        root + "/vstar/relative_position/sa_1.json",
        {"question": "q", "options": ["a", "b"], "bbox": [[1, 2, 3]]},
    )
    msg = _raises("must hold", datasets.load, "vstar", spec)
    assert "sa_1.json" in msg
    os.remove(root + "/vstar/relative_position/sa_1.json")
    _raises("sa_1.json: no such file", datasets.load, "vstar", spec)
    _raises(
        "missing the direct_attributes", datasets.load, "vstar", DataSpec(vstar_dir=root + "/pope")
    )
    dup = write_unified(
        root + "/u",
        records=[
            {"id": 1, "image_path": "a.jpg", "question": "q", "labels": ["x"]},
            {"id": 1, "image_path": "b.jpg", "question": "q", "labels": ["x"]},
        ],
    )
    _raises("duplicate id '1'", datasets.load, "gqa", dup)
    noimg = write_unified(root + "/u2", records=[{"question": "q", "labels": ["x"]}])
    _raises("record 0: needs 'image_path' or 'image_id'", datasets.load, "gqa", noimg)
    empty = write_unified(root + "/u3", records=[])
    _raises("no questions", datasets.load, "gqa", empty)
    _raises("needs --textvqa_json", datasets.load, "textvqa", DataSpec())


def test_unified_bbox_formats(tmp_path):
    recs = [{"image_id": 3, "question": "q", "labels": ["x"], "gt_bbox": [10, 20, 5, 6]}]
    spec = write_unified(str(tmp_path), records=recs)
    (ex,) = datasets.load_unified(spec.data_json, spec.image_root, "gqa", "xywh")
    assert ex.gt_bbox == (10, 20, 15, 26) and ex.image_path == "3.jpg" and ex.id == "0"
    _raises("negative size", datasets.load_unified, spec.data_json, spec.image_root, "gqa")


def test_vstar_from_data_json_must_be_multiple_choice(tmp_path):
    """--task=vstar on records its scorer cannot read is refused while loading."""
    q = "What colour is the cup?\n(A) red\n(B) blue\nAnswer with the option's letter."
    ok = [{"id": "a", "image_path": "a.jpg", "question": q, "labels": "B"}]
    (ex,) = datasets.load("vstar", write_unified(str(tmp_path / "ok"), records=ok))
    assert ex.labels == ["B"]
    textvqa = [{"id": "t", "image_path": "a.jpg", "question": "What is written?",
                "labels": ["stop"] * 10}]  # fmt: skip
    spec = write_unified(str(tmp_path / "t"), records=textvqa)
    msg = _raises("record 0 .id 't'.: task 'vstar' needs a multiple-choice question",
                  datasets.load, "vstar", spec)  # fmt: skip
    assert "\n" not in msg
    spec = write_unified(str(tmp_path / "l"), records=[{**ok[0], "labels": ["C"]}])
    _raises(r"needs option letters \(A, B\) as labels, got \['C'\]", datasets.load, "vstar", spec)


@pytest.mark.parametrize("flag", ["textvqa_json", "vstar_dir", "synthetic_dir", "synthetic_n"])
def test_data_json_conflicts_with_a_task_data_flag(flag):
    value = 100 if flag == "synthetic_n" else "x"
    with pytest.raises(ValueError, match=f"^--data_json and --{flag} conflict"):
        DataSpec(data_json="d.json", image_root="i", **{flag: value})
    DataSpec(data_json="d.json", image_root="i", bbox_format="xywh")  # shared flags are fine
    DataSpec(**{flag: value})


# ---------------------------------------------------------------------------------------
# Images.


def _exif_rotated(path: str, orientation: int = 6) -> str:
    """A 40 x 20 red JPEG with a blue stripe on its left, tagged with an EXIF orientation."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 degrees clockwise to display
    img.save(path, exif=exif.tobytes())
    return path


def test_image_modes_exif_and_small_sizes(tmp_path):
    d = str(tmp_path)
    paths = {
        "L": write_image(f"{d}/gray.png", mode="L"),
        "RGBA": write_image(f"{d}/rgba.png", mode="RGBA"),
        "P": write_image(f"{d}/palette.png", mode="P"),
        "CMYK": write_image(f"{d}/cmyk.jpg", mode="CMYK"),
        "1": write_image(f"{d}/bw.png", mode="1"),
        "tiny": write_image(f"{d}/tiny.png", size=(3, 2)),
    }
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)).save(
        f"{d}/deep.png"
    )
    paths["I;16"] = f"{d}/deep.png"
    assert Image.open(paths["I;16"]).mode.startswith("I")
    for name, p in paths.items():
        im = datasets.load_image(p)
        assert im.mode == "RGB", name
        assert im.size == ((3, 2) if name == "tiny" else (64, 48)), name
        with Image.open(p) as f:  # the official reading, pixel for pixel
            assert im.tobytes() == f.convert("RGB").tobytes(), name
    # EXIF orientation 6: read in the stored frame (the official reading), upright on request.
    stored = datasets.load_image(_exif_rotated(f"{d}/exif.jpg"))
    assert stored.size == (40, 20)
    with Image.open(f"{d}/exif.jpg") as f:
        assert stored.tobytes() == f.convert("RGB").tobytes()
    rotated = datasets.load_image(f"{d}/exif.jpg", exif_transpose=True)
    assert rotated.size == (20, 40)  # displayed upright: portrait
    top = np.asarray(rotated)[:5].mean((0, 1))
    assert top[2] > 150 and top[0] < 100  # the blue stripe is now on top


def test_rgba_keeps_the_stored_colour_under_transparency(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # stored colour, alpha 0 (fully transparent) on the left
    rgba[:, 15:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = np.asarray(datasets.load_image(str(tmp_path / "a.png")))
    assert (got == (10, 200, 30)).all()  # not composited on white
    with Image.open(tmp_path / "a.png") as f:
        np.testing.assert_array_equal(got, np.asarray(f.convert("RGB")))


@pytest.mark.parametrize("orientation", [6, 2, 5, 7])  # 2, 5, 7: mirrored
def test_exif_transpose_moves_the_gt_box_with_the_image(tmp_path, orientation):
    # The subject (a blue patch) and its GT box, both in the stored pixel frame.
    stored = Image.new("RGB", (320, 240), (200, 200, 200))
    gt = (200, 20, 280, 80)
    stored.paste((0, 0, 255), gt)
    exif = Image.Exif()
    exif[0x0112] = orientation
    os.makedirs(tmp_path / "images")
    stored.save(tmp_path / "images" / "s.jpg", exif=exif.tobytes(), quality=95)
    rec = {"id": "s", "image_path": "s.jpg", "question": "q", "labels": ["x"], "gt_bbox": gt}
    spec = write_unified(str(tmp_path), records=[rec])
    (ex,) = datasets.load_unified(spec.data_json, spec.image_root, "gqa")

    def blue_fraction(image, box):
        a = np.asarray(image.crop(tuple(int(v) for v in box))).astype(int)
        return float(((a[..., 2] > 150) & (a[..., 0] < 100)).mean())

    image, same = datasets.load_example_image(ex)  # default: the stored frame, box as given
    assert image.size == (320, 240) and same.gt_bbox == gt
    assert blue_fraction(image, same.gt_bbox) > 0.95
    upright, moved = datasets.load_example_image(ex, exif_transpose=True)
    assert upright.size == ((240, 320) if orientation >= 5 else (320, 240))
    assert moved.gt_bbox != gt and blue_fraction(upright, moved.gt_bbox) > 0.95
    assert blue_fraction(upright, gt) < 0.5  # the unmoved box would miss the subject
    x1, y1, x2, y2 = moved.gt_bbox
    assert (x2 - x1, y2 - y1) == ((60, 80) if orientation >= 5 else (80, 60))


def test_bad_images_raise_clear_errors(tmp_path, monkeypatch):
    d = str(tmp_path)
    with pytest.raises(ImageError, match="no such image file"):
        datasets.load_image(f"{d}/absent.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="cannot read image"):
        datasets.load_image(f"{d}/junk.jpg")
    full = open(write_image(f"{d}/whole.jpg", (200, 150)), "rb").read()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        datasets.load_image(f"{d}/cut.jpg")
    with pytest.raises(ImageError, match="decompression bomb"):
        datasets.load_image(f"{d}/whole.jpg", max_pixels=100 * 100)
    # PIL's own limit is the default; None takes every size.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)
    with pytest.raises(ImageError, match="decompression bomb"):
        datasets.load_image(f"{d}/whole.jpg")
    assert datasets.load_image(f"{d}/whole.jpg", max_pixels=None).size == (200, 150)


def test_real_bomb_sized_image_is_refused_cheaply(tmp_path):
    # 12000 x 12000 1-bit PNG: a few KB on disk, 144 M pixels once decoded.
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    (tmp_path / "bomb.png").write_bytes(buf.getvalue())
    with pytest.raises(ImageError, match="decompression bomb"):
        datasets.load_image(str(tmp_path / "bomb.png"))


def test_image_paths_must_stay_in_the_root(tmp_path):
    root = str(tmp_path / "images")
    ok = Example("a", "sub/x.jpg", "q", ["x"], root)
    assert ok.image_file() == os.path.join(root, "sub", "x.jpg")
    for bad in ("../secret.jpg", "sub/../../secret.jpg", "/etc/passwd"):
        with pytest.raises(ImageError, match="escapes the image root"):
            Example("a", bad, "q", ["x"], root).image_file()
